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

Counting is exact and costs no collective in the forward: on ``W`` processes
each forward adds only this process's non-pad tokens to a local ``pending``
``(V, N)`` table, and the tables are summed over processes (one ``all_reduce``
of the int64 ``pending`` delta, then added to the totals and zeroed) only
where they are read: when a logging window ends, when the refit window opens
and at the stage boundary (:meth:`RoutingCounts.close_window`, reached at the
same update on every process), and before a checkpoint is written
(:func:`flush_routing_counts`, called on every rank by :mod:`fairseq_hooks.trainer_checkpoints`).
Integer sums do not depend on when they are taken, so the totals, the logged
figures and the refit table are those of counting every token at once; the
saved buffers are the global totals, identical on every process, so a
checkpoint of any rank holds them whole and a resume continues them exactly.
On one process the forward counts straight into the totals. Counts are int64.
"""

import contextlib
import contextvars
import logging
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from fairseq.logging import metrics

logger = logging.getLogger(__name__)

_COUNTING = contextvars.ContextVar("stablemoe_counting", default=True)


@contextlib.contextmanager
def not_counted():
    """Forwards run inside are not counted (fairseq's dummy batches: a process with no batch left
    runs its first batch again with the loss zeroed; see :mod:`fairseq_hooks.trainer_step`)."""
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

    Buffers (in the state dict; global totals, identical on every process):
    ``window_counts`` and ``refit_counts`` ``(V, N)`` int64, ``window_majority``
    ``(V,)`` int64 (each id's majority expert in the last window it appeared
    in, -1 never), ``handover`` ``(5,)`` float64 (:data:`HANDOVER_FIELDS`; all 0
    before the boundary, -1 for a figure that does not apply). On ``W > 1``
    processes the totals lag behind the forwards until :meth:`flush`; the
    not-yet-summed counts of this process are the non-persistent ``pending``
    ``(V, N)`` int64 (made at the first expert-parallel forward).
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
        self.register_buffer("pending", None, persistent=False)
        self._last_counted = -1  # completed updates at the last counted forward (it belongs to the next one)
        # forwards counted into `pending` since the last flush: the same on every process (each counts in the
        # same forwards), so every process takes the same flushes; and whether they are in the refit window
        self._pending_forwards = 0
        self._pending_refit = False

    def in_refit_window(self, num_updates: int) -> bool:
        """Whether a forward at ``num_updates`` completed updates belongs to the refit window."""
        return self.boundary - self.refit_updates <= num_updates < self.boundary

    @torch.no_grad()
    def observe(self, tokens: torch.Tensor, choice: torch.Tensor, pad: torch.Tensor, shard, num_updates: int) -> None:
        """Count one stage-1 training forward: ``(T,)`` ids, ``(T,)`` backbone experts, ``(T,)`` bool pad.

        ``shard``: the layer's :class:`distributed.expert_parallel.ExpertShard`; ``num_updates``:
        completed updates. No collective: on ``W > 1`` processes this process's
        tokens go to ``pending``, summed over processes by :meth:`flush`.
        """
        refit = self.in_refit_window(num_updates)
        if shard.is_parallel:
            if self._pending_forwards and refit != self._pending_refit:
                raise RuntimeError(
                    f"routing counts: a forward at update count {num_updates} would mix counts inside and outside "
                    f"the refit window (updates {self.boundary - self.refit_updates}..{self.boundary - 1}): call "
                    f"the layer's set_num_updates({num_updates}) before the update's first forward, on every "
                    "process (fairseq's train step does)"
                )
            if self.pending is None:  # on the buffers' device: all_reduce takes it (NCCL: CUDA tensors only)
                self.pending = torch.zeros(self.window_counts.shape, dtype=torch.long, device=self.window_counts.device)
            tables = [self.pending]
            self._pending_forwards += 1
            self._pending_refit = refit
        else:
            tables = [self.window_counts, self.refit_counts] if refit else [self.window_counts]
        self._last_counted = num_updates
        if not _COUNTING.get():  # a dummy batch (it still takes part in the flushes above)
            return
        codes = tokens * self.window_counts.shape[1] + choice
        weight = (~pad).long()
        for table in tables:
            table.view(-1).index_add_(0, codes, weight)

    @torch.no_grad()
    def flush(self) -> None:
        """Add every process's ``pending`` counts to the totals (and zero them).

        Collective (one ``all_reduce`` of ``(V, N)`` int64 on the buffers'
        device) when a forward was counted since the last flush on ``W > 1``
        processes; every process has counted the same forwards, so every
        process takes the same flushes. Otherwise nothing to do.
        """
        if not self._pending_forwards:
            return
        dist.all_reduce(self.pending)
        self.window_counts += self.pending
        if self._pending_refit:
            self.refit_counts += self.pending
        self.pending.zero_()
        self._pending_forwards = 0

    @torch.no_grad()
    def close_window(self, num_updates: int) -> Optional[Dict[str, float]]:
        """End the logging window if ``num_updates`` (completed updates) ends one and it holds tokens.

        Windows end at multiples of ``window`` and at the boundary, once the
        update's forwards are all counted (with ``--update-freq`` fairseq sets
        the count again before each of them: a window never ends inside the
        update that follows it). The counts are flushed (:meth:`flush`) there
        and where the refit window opens, before anything is decided from
        them. Returns ``{"tokens", "agree_ceiling", "churn_tokens",
        "route_churn"}`` (None if no window ended); ``route_churn`` is None
        when no token's id appeared before.
        """
        if self._last_counted >= num_updates:
            return None
        ends = not num_updates % self.window or num_updates == self.boundary
        if ends or num_updates == self.boundary - self.refit_updates:
            self.flush()
        if not ends:
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
            if name not in self._non_persistent_buffers_set:
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
        if self.pending is not None:  # the loaded totals replace what was counted before (the forward count
            self.pending.zero_()  # stays: every process keeps taking the same flushes)

    def extra_repr(self) -> str:
        V, N = self.window_counts.shape
        return f"vocab={V}, experts={N}, boundary={self.boundary}, refit={self.refit_updates}, window={self.window}"


def flush_routing_counts(model: nn.Module) -> None:
    """:meth:`RoutingCounts.flush` every layer's counts, in module order (collective: call it on every process,
    e.g. before every rank saves its checkpoint, so that the saved totals hold every counted token)."""
    for module in model.modules():
        if isinstance(module, RoutingCounts):
            module.flush()


def log_window(stats: Optional[Dict[str, float]]) -> None:
    """Log a closed window's ``agree_ceiling`` and ``route_churn`` with fairseq's metrics, weighted by its
    tokens (so several MoE layers, or windows within one log interval, average by tokens)."""
    if stats is None:
        return
    metrics.log_scalar("agree_ceiling", stats["agree_ceiling"], stats["tokens"], round=3)
    if stats["route_churn"] is not None:
        metrics.log_scalar("route_churn", stats["route_churn"], stats["churn_tokens"], round=3)
