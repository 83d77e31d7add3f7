"""The layers StableMoE is compared with: Switch, BASE, Hash and a dense FFN.

* ``switch`` (:class:`SwitchLayer`): softmax over the affinities, top-1,
  output ``h + p_a(h) * FFN_a(h)``, Switch Transformer load-balancing loss.
* ``base`` (:class:`BaseLayer`): balanced assignment in training (fairseq's
  ``libbase``, as BASE layers), greedy top-1 at inference, sigmoid gate.
* ``hash`` (:class:`HashLayer`): a fixed hash of the token's string to an
  expert; no router, no gate, no auxiliary loss.
* ``dense`` (:class:`DenseFFNLayer`): one expert's network for every token.
"""

import hashlib
import logging
from typing import Sequence, Tuple

import torch
import torch.nn as nn

from .experts import Expert
from .moe_layer import MoELayer, Routing, Stats
from .router import BackboneRouter, finite_affinities, top1

logger = logging.getLogger(__name__)


class SwitchLayer(MoELayer):
    """Switch Transformer routing: softmax, top-1, probability gate, load-balancing loss.

    ``balance_loss`` is ``N * sum_i f_i * P_i`` (``f_i`` share of tokens sent
    to expert ``i``, ``P_i`` mean router probability, over the global batch)
    times the number of tokens, so that after the criterion's division by the
    sample size it is the Switch loss.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, num_experts: int, num_sublayers: int, padding_idx: int, **kwargs):
        super().__init__(embed_dim, ffn_dim, num_experts, num_sublayers, padding_idx, **kwargs)
        self.backbone = BackboneRouter(embed_dim, num_experts)

    def route(self, h: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> Routing:
        with_stats = self.wants_stats
        scores, nonfinite = finite_affinities(self.backbone(h), count=with_stats)
        probs = torch.softmax(scores, dim=1)
        choice = top1(scores)
        gate = probs.gather(1, choice.unsqueeze(1))
        if not with_stats:
            return Routing(choice, gate, {})
        return Routing(choice, gate, {"nonfinite": nonfinite}, probs)

    def aux_losses(self, routing: Routing, load: torch.Tensor, valid: torch.Tensor) -> Stats:
        if routing.scores is None:
            return {}
        frac = load / load.sum().clamp(min=1.0)
        probs = routing.scores
        return {"balance_loss": self.num_experts * (frac * (probs * valid.unsqueeze(1)).sum(0)).sum()}


class BaseLayer(MoELayer):
    """BASE layers routing: balanced assignment in training, greedy top-1 at inference.

    Training solves the assignment of this process's non-pad tokens to the
    experts with equal shares (fairseq's ``libbase`` auction algorithm, as
    fairseq's BASE layers; the ``n mod N`` tokens left over go greedy). The
    gate is ``sigmoid(h . E_a)``; no auxiliary loss.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, num_experts: int, num_sublayers: int, padding_idx: int, **kwargs):
        super().__init__(embed_dim, ffn_dim, num_experts, num_sublayers, padding_idx, **kwargs)
        self.backbone = BackboneRouter(embed_dim, num_experts)
        self._libbase = load_libbase("--moe-type base")

    def route(self, h: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> Routing:
        with_stats = self.wants_stats
        scores, nonfinite = finite_affinities(self.backbone(h), count=with_stats)
        choice = top1(scores)
        if self.training:
            choice = self._balanced(scores.detach(), choice, valid)
        gate = torch.sigmoid(scores.gather(1, choice.unsqueeze(1)))
        return Routing(choice, gate, {"nonfinite": nonfinite} if with_stats else {})

    def _balanced(self, scores: torch.Tensor, greedy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return balanced_assignment(self._libbase, scores, greedy, valid, self.num_experts)


def load_libbase(what: str):
    """fairseq's ``libbase`` extension (balanced assignment); ``what`` names the option that needs it."""
    try:
        from fairseq import libbase
    except ImportError as e:  # pragma: no cover - fairseq builds it
        raise ImportError(f"{what} needs fairseq's libbase extension (built with fairseq); reinstall fairseq") from e
    return libbase


def balanced_assignment(
    libbase, scores: torch.Tensor, greedy: torch.Tensor, valid: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """BASE layers' balanced assignment of this process's non-pad tokens.

    Equal shares of ``n // N`` tokens per expert by fairseq's ``libbase``
    auction over ``scores`` (``(T, N)``, finite); the ``n mod N`` tokens left
    over, and padding, keep ``greedy``. Returns ``(T,)`` long.
    """
    idx = valid.nonzero().squeeze(1)
    per_expert = idx.numel() // num_experts
    if per_expert == 0:
        return greedy
    take = idx[: per_expert * num_experts]
    order = libbase.balanced_assignment(scores.index_select(0, take).float().cpu().contiguous())
    order = order.to(scores.device)
    expert_of_slot = torch.arange(num_experts, device=scores.device).repeat_interleave(per_expert)
    choice = greedy.clone()
    choice[take[order]] = expert_of_slot
    return choice


class HashLayer(MoELayer):
    """Hash layers: a fixed random map from token to expert; no router, gate or loss.

    The map hashes the token's *string* (sha1), so it does not depend on the
    order of fairseq's dictionary; it is kept in the checkpoint as the buffer
    ``token_to_expert`` (``(vocab,)``).
    """

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        num_experts: int,
        num_sublayers: int,
        padding_idx: int,
        symbols: Sequence[str] = (),
        **kwargs,
    ):
        super().__init__(embed_dim, ffn_dim, num_experts, num_sublayers, padding_idx, **kwargs)
        self.register_buffer("token_to_expert", hash_symbols(symbols, num_experts))

    def route(self, h: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> Routing:
        return Routing(self.token_to_expert[tokens], None, {})

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "token_to_expert"
        if key in state_dict and state_dict[key].shape != self.token_to_expert.shape:
            raise ValueError(
                f"{self.layer_name}: the checkpoint's hash map covers {state_dict[key].numel()} token ids but "
                f"the dictionary has {self.token_to_expert.numel()}: use the dict.txt the model was trained with"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def hash_symbols(symbols: Sequence[str], num_experts: int) -> torch.Tensor:
    """``(len(symbols),)`` long: ``sha1(symbol) mod N`` for every dictionary entry."""
    return torch.tensor(
        [int.from_bytes(hashlib.sha1(s.encode("utf-8")).digest()[:8], "little") % num_experts for s in symbols],
        dtype=torch.long,
    )


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
