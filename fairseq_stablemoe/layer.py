"""The StableMoE layer (Dai et al., ACL 2022): two-stage routing, sigmoid gate,
balance loss and router distillation.

Shapes: ``T`` tokens, ``d`` model dim, ``N`` experts.

* Stage 1 (training, ``num_updates < two_stage_updates``): the backbone router
  assigns ``a_t = argmax_i s[t, i]`` with ``s[t, i] = h_t . E_i``; output
  ``h_t + sigmoid(s[t, a_t]) * FFN_{a_t}(h_t)``. Balance loss
  ``sum_i ((|A_i| - n/N) / (n/N)) * sum_{t in A_i} sigmoid(s[t, i])`` with counts
  as constants; distillation loss ``sum_t CE(s_hat_t, a_t)``.
* Stage 2 (training, ``num_updates >= two_stage_updates``): the frozen distilled
  router assigns ``a_t = argmax_i s_hat[t, i]``; the gate still uses the
  backbone centroids; no auxiliary loss.
* Inference (``eval()``): routes with the distilled router.

Padding positions go to no expert and take no part in the losses or the load
statistics (the paper's code counts them).
"""

import logging
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dispatch import Dispatch, capacity_for
from .experts import Expert, Experts
from .parallel import ExpertShard, all_reduce_sum, exchange, scale_expert_gradients
from .router import BackboneRouter, DistilledRouter, make_finite

logger = logging.getLogger(__name__)


class StableMoELayer(nn.Module):
    """A StableMoE layer.

    In a job of ``W`` data-parallel processes each process holds ``N / W`` of
    the experts (``experts.<i>`` is global expert ``rank * N / W + i``) and
    tokens travel to them with all-to-all (see :mod:`.parallel`); routers are
    replicated. Routing, the balance loss (counts over the global batch) and
    the distillation loss are those of one process holding all experts.

    Args:
        embed_dim: ``d``.
        ffn_dim: inner dimension of every expert sublayer.
        num_experts: ``N``.
        num_sublayers: residual FFN sublayers per expert (``--moe-sublayers``).
        vocab_size / padding_idx: of the token ids read by the distilled router.
        distill_dim: embedding size of the distilled router (``--distill-dim``).
        two_stage_updates: update count at which stage 2 starts.
        capacity_factor: optional per-expert capacity, as a multiple of ``n/N``;
            tokens over it pass through unchanged. None: no token is dropped.
        activation_fn: expert activation.
        layer_name: used in log messages.
    """

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        num_experts: int,
        num_sublayers: int,
        vocab_size: int,
        padding_idx: int,
        distill_dim: int = 50,
        two_stage_updates: int = 0,
        capacity_factor: Optional[float] = None,
        activation_fn: str = "relu",
        layer_name: str = "moe",
    ):
        super().__init__()
        self.num_experts = num_experts
        self.padding_idx = padding_idx
        self.two_stage_updates = two_stage_updates
        self.capacity_factor = capacity_factor
        self.layer_name = layer_name
        self.backbone = BackboneRouter(embed_dim, num_experts)
        self.distill_router = DistilledRouter(vocab_size, distill_dim, num_experts, padding_idx)
        self.shard = ExpertShard.current(num_experts)
        self.experts = Experts(self.shard.num_local, embed_dim, ffn_dim, num_sublayers, activation_fn)
        scale_expert_gradients(list(self.experts.parameters()), self.shard.world_size)
        self.num_updates = 0

    # ------------------------------------------------------------------ stages
    @property
    def in_stage2(self) -> bool:
        return self.num_updates >= self.two_stage_updates

    def set_num_updates(self, num_updates: int) -> None:
        """Called by fairseq after every update and on checkpoint load."""
        self.num_updates = num_updates
        router = self.distill_router
        if self.in_stage2:
            if not router.is_frozen:
                router.freeze()
                logger.info(
                    "%s: stage 2 from update %d: distilled router frozen, routing by token id",
                    self.layer_name,
                    num_updates,
                )
            else:
                router.restore_frozen()
        elif router.is_frozen:
            router.unfreeze()
            logger.info("%s: update count %d is before the stage boundary: router unfrozen", self.layer_name, num_updates)

    # ----------------------------------------------------------------- forward
    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Route, run the experts and gate.

        Args:
            features: ``(..., d)`` hidden states (e.g. ``(T, B, d)`` in the decoder).
            tokens: ``(...)`` token ids at the same positions (``(T, B)``).
        Returns:
            ``(output, stats)``: output of the shape of ``features``; ``stats``
            holds 0-dim tensors ``balance_loss`` and ``distill_loss`` (absent
            in stage 2), ``num_tokens`` (non-pad), ``agree`` (tokens where the
            distilled and backbone routers pick the same expert),
            ``nonfinite`` (replaced affinities), ``dropped`` (tokens over
            capacity), ``load`` (``(N,)`` non-pad tokens per expert, as routed)
            and ``backbone_load`` (``(N,)``, as the backbone router would route).
        """
        if tokens.shape != features.shape[:-1]:
            raise ValueError(
                f"{self.layer_name}: token ids of shape {tuple(tokens.shape)} do not match "
                f"features of shape {tuple(features.shape)}"
            )
        h = features.reshape(-1, features.shape[-1])
        tok = tokens.reshape(-1)
        pad = tok.eq(self.padding_idx)
        valid = (~pad).to(torch.float32)
        stage2 = self.in_stage2

        # backbone affinities (fp32, with grad: they feed the gate and the balance loss)
        scores = self.backbone(h)
        finite_scores, nonfinite = make_finite(scores.detach())
        backbone_choice = finite_scores.argmax(dim=1)

        # distilled affinities; no autograd once the router is frozen or at inference
        distill_grad = self.training and not stage2
        with torch.set_grad_enabled(distill_grad and torch.is_grad_enabled()):
            distill_scores = self.distill_router(tok)
        finite_distill, nonfinite_distill = make_finite(distill_scores.detach())
        distill_choice = finite_distill.argmax(dim=1)

        choice = backbone_choice if (self.training and not stage2) else distill_choice
        scores = torch.where(torch.isfinite(scores), scores, finite_scores)
        gate = torch.sigmoid(scores.gather(1, choice.unsqueeze(1)).squeeze(1))

        # dispatch, experts, combine
        num_tokens = valid.sum()
        capacity = capacity_for(h.shape[0], self.num_experts, self.capacity_factor)
        plan = Dispatch(choice, self.num_experts, capacity=capacity, skip=pad if pad.any() else None)
        routed = plan.gather(h)
        if self.shard.is_parallel:
            expert_out = exchange(routed, plan.counts, self.shard, self.experts)
        else:
            expert_out = self.experts(routed, plan.counts)
        delta = plan.scatter(expert_out)
        output = h + gate.to(h.dtype).unsqueeze(1) * delta

        zeros = torch.zeros(self.num_experts, dtype=torch.float32, device=h.device)
        stats: Dict[str, torch.Tensor] = {
            "num_tokens": num_tokens,
            "load": zeros.index_add(0, choice, valid),
            "backbone_load": zeros.index_add(0, backbone_choice, valid),
            "agree": ((backbone_choice == distill_choice).float() * valid).sum(),
            "nonfinite": (nonfinite + nonfinite_distill).float(),
            "dropped": (num_tokens - float(sum(plan.counts))).clamp(min=0.0),
        }
        if not stage2:
            stats["balance_loss"], stats["distill_loss"] = self._stage1_losses(
                scores, backbone_choice, distill_scores, valid
            )
        return output.view_as(features), stats

    def _stage1_losses(
        self,
        scores: torch.Tensor,
        backbone_choice: torch.Tensor,
        distill_scores: torch.Tensor,
        valid: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Balance and distillation losses (sums over non-pad tokens).

        Args:
            scores: ``(T, N)`` backbone affinities (finite, with grad).
            backbone_choice: ``(T,)`` backbone argmax (``A_i`` membership).
            distill_scores: ``(T, N)`` distilled affinities.
            valid: ``(T,)`` 1.0 for non-pad tokens.
        """
        # |A_i| and n over the global batch (all processes), as constants
        counts_n = torch.zeros(self.num_experts + 1, dtype=torch.float32, device=scores.device)
        counts_n[: self.num_experts].index_add_(0, backbone_choice, valid)
        counts_n[self.num_experts] = valid.sum()
        all_reduce_sum(counts_n)
        counts = counts_n[: self.num_experts]
        mean_load = counts_n[self.num_experts] / self.num_experts
        # (|A_i| - n/N) / (n/N), a constant; 0 for an all-padding batch
        weight = (counts - mean_load) / mean_load.clamp(min=1e-9)
        gate_own = torch.sigmoid(scores.gather(1, backbone_choice.unsqueeze(1)).squeeze(1))
        balance = (weight[backbone_choice] * gate_own * valid).sum()
        distill_target = backbone_choice
        distill = (F.cross_entropy(distill_scores, distill_target, reduction="none") * valid).sum()
        return balance, distill


class DenseFFNLayer(nn.Module):
    """``--moe-type dense``: one expert's network applied to every token.

    The same sublayers as one expert, so it has the active parameters per token
    of an MoE layer; no router, no gate, no auxiliary loss.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, num_sublayers: int, activation_fn: str = "relu"):
        super().__init__()
        self.ffn = Expert(embed_dim, ffn_dim, num_sublayers, activation_fn)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> Tuple[torch.Tensor, None]:
        """``features``: ``(..., d)`` -> ``(output of the same shape, None)``."""
        return self.ffn(features), None
