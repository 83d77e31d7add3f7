"""``stablemoe`` criterion: cross-entropy plus the stage-1 auxiliary losses.

``loss = CE + balance_factor * L_bal + distill_factor * L_dis`` in stage 1 and
``CE`` alone in stage 2 (CE label-smoothed with ``--label-smoothing``, as
``label_smoothed_cross_entropy``); every term is a sum over non-pad tokens,
normalised by fairseq's sample size as ``cross_entropy`` is. The logged
``loss`` (the smoothed CE) and ``nll_loss`` (the CE) leave the auxiliary
losses out (base 2), so they compare with fairseq's criteria across stages; ``balance_loss`` and
``distill_loss`` are logged per token (natural units, before their factors:
the distillation loss is a cross-entropy in nats; a perfectly balanced Switch
loss is 1).
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.dataclass import FairseqDataclass
from omegaconf import II

from ..modules.moe_layer import reading_moe_stats


@dataclass
class StableMoECriterionConfig(FairseqDataclass):
    balance_factor: float = field(
        default=0.3, metadata={"help": "weight of the stage-1 balance loss (paper code: 0.3)"}
    )
    distill_factor: float = field(
        default=0.3, metadata={"help": "weight of the stage-1 router distillation loss (paper code: 0.3)"}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "epsilon for label smoothing, 0 means no label smoothing"}
    )
    sentence_avg: bool = II("optimization.sentence_avg")


def moe_stats(net_output) -> List[Dict[str, torch.Tensor]]:
    """The per-MoE-layer statistics a StableMoE model returns (``[]`` if none)."""
    extra = net_output[1] if isinstance(net_output, (tuple, list)) and len(net_output) > 1 else None
    if not isinstance(extra, dict):
        return []
    return [s for s in extra.get("moe", []) if s is not None]


@register_criterion("stablemoe", dataclass=StableMoECriterionConfig)
class StableMoECriterion(FairseqCriterion):
    def __init__(self, task, balance_factor: float, distill_factor: float, label_smoothing: float, sentence_avg: bool):
        super().__init__(task)
        if balance_factor < 0 or distill_factor < 0:
            raise ValueError(
                f"--balance-factor ({balance_factor}) and --distill-factor ({distill_factor}) must be >= 0"
            )
        self.balance_factor = balance_factor
        self.distill_factor = distill_factor
        self.sentence_avg = sentence_avg
        self.eps = label_smoothing

    def forward(self, model, sample, reduce=True):
        # the auxiliary losses are used in training, and validation logs the routing statistics
        with reading_moe_stats():
            net_output = model(**sample["net_input"])
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        lprobs = lprobs.view(-1, lprobs.size(-1))
        target = model.get_targets(sample, net_output).view(-1)
        if self.eps > 0:
            loss, nll = label_smoothed_nll_loss(lprobs, target, self.eps, ignore_index=self.padding_idx, reduce=reduce)
        else:
            nll = F.nll_loss(lprobs, target, ignore_index=self.padding_idx, reduction="sum" if reduce else "none")
            loss = nll
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }

        layers = moe_stats(net_output)
        if layers:
            balance = sum(s["balance_loss"] for s in layers if "balance_loss" in s)
            distill = sum(s["distill_loss"] for s in layers if "distill_loss" in s)
            if model.training:
                loss = loss + self.balance_factor * balance + self.distill_factor * distill
            num_experts = layers[0]["load"].numel()
            moe_tokens = sum(s["num_tokens"] for s in layers)
            # "load" counts the global batch (every process); each process logs its share of
            # the global figures, so the sum over processes is the global batch's value
            share = [s["num_tokens"] / s["global_tokens"].clamp(min=1.0) for s in layers]
            logging_output.update(
                {
                    "balance_loss": _detach(balance),
                    "distill_loss": _detach(distill),
                    "moe_tokens": moe_tokens.detach(),
                    "moe_max_load": sum(s["load"].max() * num_experts * w for s, w in zip(layers, share)).detach(),
                    "moe_entropy": sum(_load_entropy(s["load"]) * s["num_tokens"] for s in layers).detach(),
                    "moe_dropped": sum(s["dropped"] for s in layers).detach(),
                }
            )
            # per-layer health: the busiest expert's share of tokens and the experts left idle
            # (idle: every process logs the global count once per forward; averaged over forwards)
            logging_output["moe_batches"] = 1
            for j, (s, w) in enumerate(zip(layers, share)):
                logging_output[f"moe{j}_top"] = (s["load"].max() * w).detach()
                logging_output[f"moe{j}_tokens"] = s["num_tokens"].detach()
                logging_output[f"moe{j}_idle"] = (s["load"] == 0).sum().detach()
            for key, stat in (("moe_agree", "agree"), ("moe_nonfinite", "nonfinite")):
                if stat in layers[0]:
                    logging_output[key] = sum(s[stat] for s in layers).detach()
            if "stage" in layers[0]:
                logging_output["moe_stage"] = (layers[0]["stage"] * sample_size).detach()
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        ntokens = total("ntokens")
        sample_size = total("sample_size")
        metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / ntokens / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))

        if not any("moe_tokens" in log for log in logging_outputs):
            return
        moe_tokens = total("moe_tokens")
        metrics.log_scalar("balance_loss", total("balance_loss") / sample_size, sample_size, round=4)
        metrics.log_scalar("distill_loss", total("distill_loss") / sample_size, sample_size, round=4)
        if any("moe_stage" in log for log in logging_outputs):
            metrics.log_scalar("stage", total("moe_stage") / sample_size, sample_size, round=2)
        if moe_tokens > 0:
            # agreement of the distilled router with the backbone router, max load over
            # mean load, and load entropy normalised to 1 = perfectly even
            if any("moe_agree" in log for log in logging_outputs):
                metrics.log_scalar("router_agree", total("moe_agree") / moe_tokens, moe_tokens, round=3)
            metrics.log_scalar("max_load", total("moe_max_load") / moe_tokens, moe_tokens, round=3)
            metrics.log_scalar("load_entropy", total("moe_entropy") / moe_tokens, moe_tokens, round=3)
            metrics.log_scalar("dropped", total("moe_dropped") / moe_tokens, moe_tokens, round=4)
        batches = total("moe_batches")
        j = 0
        while any(f"moe{j}_top" in log for log in logging_outputs):
            layer_tokens = total(f"moe{j}_tokens")
            if layer_tokens > 0:
                metrics.log_scalar(f"moe{j}_top_share", total(f"moe{j}_top") / layer_tokens, layer_tokens, round=3)
            metrics.log_scalar(f"moe{j}_idle", total(f"moe{j}_idle") / max(batches, 1), batches, round=2)
            j += 1
        if any("moe_nonfinite" in log for log in logging_outputs):
            metrics.log_scalar_sum("nonfinite", total("moe_nonfinite"), round=0)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def _detach(value):
    return value.detach() if torch.is_tensor(value) else value


def _load_entropy(load: torch.Tensor) -> torch.Tensor:
    """Entropy of a load vector ``(N,)``, divided by ``log N`` (1 = even); 0 for no tokens."""
    n = load.numel()
    total = load.sum()
    if n < 2:
        return load.new_ones(())
    p = load / total.clamp(min=1e-9)
    ent = -(p * torch.log(p.clamp(min=1e-12))).sum()
    return ent / math.log(n)
