"""Exact distillation: the backbone's stage-1 routing counted per (token id, expert).

StableMoE's distilled router learns to predict the backbone's expert from the
token id alone. For a token-id table that objective has an exact minimiser on
any set of tokens: each id's most frequent backbone expert (the *majority
map*). :class:`RoutingCounts` counts, exactly and over all processes, the
backbone's stage-1 choice of every non-pad training token in a ``(V, N)``
table, and gives:

* per logging window (``window`` updates, fairseq's ``--log-interval``):
  ``agree_ceiling``, the share of the window's tokens whose backbone expert is
  their id's majority expert, the best any token-id router can reach on them;
  and ``route_churn``, the share of the window's tokens whose id's majority
  expert changed since the last window in which the id appeared;
* at the stage boundary (:meth:`RoutingCounts.handover`), over the last
  ``refit_updates`` stage-1 updates (the *refit window*): the majority map,
  which ``--distill-refit`` freezes as the routing, and how the frozen
  routing agrees with it and with the backbone (kept in the checkpoint as
  the buffer ``handover``).

Counting is global and exact: in a forward on ``W`` processes the ``(token id,
expert)`` codes of every process's non-pad tokens are all-gathered (padded to
the largest process's token count, which the layer's count exchange already
brought to the host, so no extra host sync) and every process adds all of
them, so the tables are identical on every process, a checkpoint of any rank
holds them whole, and a resume continues them exactly. Counts are int64.
"""

import contextlib
import contextvars
import logging
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from fairseq.logging import metrics

logger = logging.getLogger(__name__)

_COUNTING = contextvars.ContextVar("stablemoe_counting", default=True)


@contextlib.contextmanager
def not_counted():
    """Forwards run inside are not counted (fairseq's dummy batches: a process with no batch left
    runs its first batch again with the loss zeroed; see :mod:`.training_hooks`)."""
    token = _COUNTING.set(False)
    try:
        yield
    finally:
        _COUNTING.reset(token)


#: entries of the ``handover`` buffer
HANDOVER_FIELDS = ("agree_majority", "agree_backbone", "ceiling", "tokens", "refit_updates")


class RoutingCounts(nn.Module):
    """Counts of the backbone's stage-1 choices per token id, for one StableMoE layer.

    Args:
        vocab_size: ``V``, token ids; num_experts: ``N``.
        boundary: the stage boundary (``--two-stage-updates``).
        refit_updates: ``U``, the refit window: the forwards of updates
            ``boundary - U + 1 .. boundary``.
        window: updates per logging window (``--log-interval``).

    Buffers (in the state dict; identical on every process): ``window_counts``
    and ``refit_counts`` ``(V, N)`` int64, ``window_majority`` ``(V,)`` int64
    (each id's majority expert in the last window it appeared in, -1 never),
    ``handover`` ``(5,)`` float64 (:data:`HANDOVER_FIELDS`; all 0 before the
    boundary, -1 for a figure that does not apply).
    """

    def __init__(self, vocab_size: int, num_experts: int, boundary: int, refit_updates: int, window: int):
        super().__init__()
        self.num_experts = num_experts
        self.boundary = boundary
        self.refit_updates = refit_updates
        self.window = max(1, window)
        self.register_buffer("window_counts", torch.zeros(vocab_size, num_experts, dtype=torch.long))
        self.register_buffer("refit_counts", torch.zeros(vocab_size, num_experts, dtype=torch.long))
        self.register_buffer("window_majority", torch.full((vocab_size,), -1, dtype=torch.long))
        self.register_buffer("handover", torch.zeros(len(HANDOVER_FIELDS), dtype=torch.float64))
        self._last_counted = -1  # completed updates at the last counted forward (it belongs to the next one)

    def in_refit_window(self, num_updates: int) -> bool:
        """Whether a forward at ``num_updates`` completed updates belongs to the refit window."""
        return self.boundary - self.refit_updates <= num_updates < self.boundary

    @torch.no_grad()
    def observe(
        self,
        tokens: torch.Tensor,
        choice: torch.Tensor,
        pad: torch.Tensor,
        tokens_per_rank: Sequence[int],
        shard,
        num_updates: int,
    ) -> None:
        """Count one stage-1 training forward: ``(T,)`` ids, ``(T,)`` backbone experts, ``(T,)`` bool pad.

        ``tokens_per_rank``: every process's non-pad token count (python ints,
        from the layer's count exchange); ``shard``: the layer's
        :class:`.parallel.ExpertShard`; ``num_updates``: completed updates.
        Collective on ``W`` processes.
        """
        V, N = self.window_counts.shape
        sentinel = V * N
        skip = pad if _COUNTING.get() else torch.ones_like(pad)
        codes = (tokens * N + choice).masked_fill(skip, sentinel)
        if shard.is_parallel:
            # this process's codes first (the sentinel sorts last), padded to the largest count
            longest = max(tokens_per_rank)
            codes = codes.sort().values[:longest]
            if codes.numel() < longest:
                codes = torch.cat([codes, codes.new_full((longest - codes.numel(),), sentinel)])
            parts = [torch.empty_like(codes) for _ in range(shard.world_size)]
            dist.all_gather(parts, codes)
            codes = torch.cat(parts)
        self._last_counted = num_updates
        weight = codes.ne(sentinel).long()
        codes = codes.clamp(max=sentinel - 1)
        self.window_counts.view(-1).index_add_(0, codes, weight)
        if self.in_refit_window(num_updates):
            self.refit_counts.view(-1).index_add_(0, codes, weight)

    @torch.no_grad()
    def close_window(self, num_updates: int) -> Optional[Dict[str, float]]:
        """End the logging window if ``num_updates`` (completed updates) ends one and it holds tokens.

        Windows end at multiples of ``window`` and at the boundary, once the
        update's forwards are all counted (with ``--update-freq`` fairseq sets
        the count again before each of them: a window never ends inside the
        update that follows it). Returns
        ``{"tokens", "agree_ceiling", "churn_tokens", "route_churn"}`` (None if
        no window ended); ``route_churn`` is None when no token's id appeared
        before.
        """
        if (num_updates % self.window and num_updates != self.boundary) or self._last_counted >= num_updates:
            return None
        counts = self.window_counts
        per_id = counts.sum(1)
        tokens = int(per_id.sum())
        if tokens == 0:
            return None
        top, majority = counts.max(1).values, counts.argmax(1)  # argmax: the first of tied experts
        seen = per_id > 0
        before = self.window_majority
        compared = seen & before.ge(0)
        churn_base = int(per_id[compared].sum())
        churned = int(per_id[compared & majority.ne(before)].sum())
        self.window_majority.copy_(torch.where(seen, majority, before))
        self.window_counts.zero_()
        return {
            "tokens": tokens,
            "agree_ceiling": float(top.sum()) / tokens,
            "churn_tokens": churn_base,
            "route_churn": churned / churn_base if churn_base else None,
        }

    @torch.no_grad()
    def majority(self, own: torch.Tensor) -> torch.Tensor:
        """``(V,)`` each id's most frequent backbone expert over the refit window.

        ``own``: ``(V,)`` the distilled router's own choice, kept for ids the
        window never saw and chosen among tied experts when it is one of them
        (else the first tied expert).
        """
        counts = self.refit_counts
        top = counts.max(1).values
        own_is_top = counts.gather(1, own.unsqueeze(1)).squeeze(1).eq(top)
        return torch.where(own_is_top | top.eq(0), own, counts.argmax(1))

    @torch.no_grad()
    def handover_stats(self, frozen: Optional[torch.Tensor], own: Optional[torch.Tensor]) -> torch.Tensor:
        """Fill and return ``handover``: the frozen routing against the refit window's counts.

        ``frozen``: ``(V,)`` the frozen token -> expert table (None for a router
        that reads context: its agreements are -1, not applicable); ``own``: the distilled
        router's own table for the majority's ties (None: first index).
        """
        counts = self.refit_counts.double()
        per_id = counts.sum(1)
        tokens = per_id.sum()
        stats = torch.full_like(self.handover, -1.0)
        stats[3] = tokens
        stats[4] = self.refit_updates
        if tokens > 0:
            stats[2] = counts.max(1).values.sum() / tokens
            if frozen is not None:
                majority = self.majority(frozen if own is None else own)
                stats[0] = per_id[frozen.eq(majority)].sum() / tokens
                stats[1] = counts.gather(1, frozen.unsqueeze(1)).sum() / tokens
        self.handover.copy_(stats)
        return stats

    def handover_dict(self) -> Optional[Dict[str, float]]:
        """``handover`` as a dict (None before the boundary; None for a figure that does not apply)."""
        values = self.handover.tolist()
        if values[3] <= 0:  # no tokens: not at the boundary yet
            return None
        return {name: (None if v < 0 else v) for name, v in zip(HANDOVER_FIELDS, values)}

    def _apply(self, fn, recurse=True):
        # --fp16/--bf16 cast floating buffers (module.half()): the hand-over keeps float64, on the new device
        handover = self.handover
        out = super()._apply(fn, recurse)
        self.handover = handover.to(device=self.handover.device, dtype=torch.float64)
        return out

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # a checkpoint saved before the counts existed: keep the empty tables
        for name, buffer in self.named_buffers(recurse=False):
            state_dict.setdefault(prefix + name, buffer)
        shape = state_dict[prefix + "window_counts"].shape
        if shape != self.window_counts.shape:
            error_msgs.append(
                f"{prefix}window_counts: the checkpoint counts {shape[0]} token ids x {shape[1]} experts, the "
                f"model {self.window_counts.shape[0]} x {self.window_counts.shape[1]}: use the dict.txt and "
                "--num-experts the model was trained with"
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        V, N = self.window_counts.shape
        return f"vocab={V}, experts={N}, boundary={self.boundary}, refit={self.refit_updates}, window={self.window}"


def log_window(stats: Optional[Dict[str, float]]) -> None:
    """Log a closed window's ``agree_ceiling`` and ``route_churn`` with fairseq's metrics, weighted by its
    tokens (so several MoE layers, or windows within one log interval, average by tokens)."""
    if stats is None:
        return
    metrics.log_scalar("agree_ceiling", stats["agree_ceiling"], stats["tokens"], round=3)
    if stats["route_churn"] is not None:
        metrics.log_scalar("route_churn", stats["route_churn"], stats["churn_tokens"], round=3)
