"""The MoE layer every routing type shares: dispatch, expert parallelism, statistics.


Shapes: ``T`` tokens, ``d`` model dim, ``N`` experts. Every type has the same
experts (``--moe-sublayers`` residual FFN sublayers each), the same expert
count and placement, so only routing differs.

A routing type (:mod:`.stablemoe_layer`, :mod:`.baseline_layers`) implements only
:meth:`MoELayer.route` and :meth:`MoELayer.aux_losses`.

Padding positions go to no expert and take no part in the losses or the load
statistics (the paper's code counts them). Auxiliary losses are sums over
tokens, so the criterion normalises them as it does the cross-entropy.
"""

import contextlib
import contextvars
import logging
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from ..distributed.expert_parallel import (
    ExpertShard,
    Splits,
    exchange,
    gather_counts,
    replica_group,
    scale_expert_gradients,
)
from .dispatch import Dispatch, capacity_split
from .experts import Experts
from .health import CollapseMonitor
from .options import option_default

logger = logging.getLogger(__name__)

Stats = Dict[str, torch.Tensor]

_READING_STATS = contextvars.ContextVar("stablemoe_reading_stats", default=False)


@contextlib.contextmanager
def reading_moe_stats():
    """Forwards run inside read the MoE layers' losses and routing statistics.

    Inside, eval-mode forwards compute them too (training forwards always do;
    plain inference, e.g. ``fairseq-eval-lm`` and ``fairseq-generate``, leaves
    them out), and a training forward may return auxiliary losses (outside, the
    decoder refuses them: nothing would train the routers). The ``stablemoe``
    criterion runs the model inside, as does ``stablemoe-routing-summary``.
    """
    token = _READING_STATS.set(True)
    try:
        yield
    finally:
        _READING_STATS.reset(token)


def moe_stats_read() -> bool:
    """Whether the current forward runs inside :func:`reading_moe_stats`."""
    return _READING_STATS.get()


class Routing(NamedTuple):
    """What a router decided for ``T`` tokens."""

    choice: torch.Tensor  # (T,) long: expert of every token
    gate: Optional[torch.Tensor]  # (T, 1) fp32 scale of the expert output (a column, as it scales rows), None for 1
    stats: Stats  # losses and diagnostics (0-dim tensors)
    scores: Optional[torch.Tensor] = None  # (T, N) fp32 with grad, for losses that need the global load
    target: Optional[torch.Tensor] = None  # (T,) long: the backbone's choice to count (StableMoE stage 1)


class MoELayer(nn.Module):
    """Routing-independent part: expert sharding, dispatch, experts, gating, load.

    In a job of ``W`` data-parallel processes each process holds ``N / W`` of
    the experts (``experts.<i>`` is global expert ``rank * N / W + i``) and
    tokens travel to them with all-to-all (see :mod:`distributed.expert_parallel`); routers are
    replicated. Routing and losses are those of one process holding all
    experts on the global batch.

    Subclasses implement :meth:`route`.
    """

    @property
    def wants_stats(self) -> bool:
        """Whether this forward computes the losses and routing diagnostics: in training, and at eval
        inside :func:`reading_moe_stats`."""
        return self.training or moe_stats_read()

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        num_experts: int,
        num_sublayers: int,
        padding_idx: int,
        capacity_factor: Optional[float] = option_default("capacity_factor"),
        activation_fn: str = "relu",
        layer_name: str = "moe",
        collapse_share: float = option_default("collapse_share"),
        collapse_updates: int = option_default("collapse_updates"),
    ):
        super().__init__()
        self.num_experts = num_experts
        self.padding_idx = padding_idx
        self.capacity_factor = capacity_factor
        self.layer_name = layer_name
        self.shard = ExpertShard.current(num_experts)
        # one draw from the caller's generator whatever the layout; each expert is seeded from it
        # and its global id, so the model does not depend on the number of processes
        seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())  # a host draw, under any default device
        self.experts = Experts(
            self.shard.num_local,
            embed_dim,
            ffn_dim,
            num_sublayers,
            activation_fn,
            first_expert=self.shard.first_expert,
            seed=seed,
            replicas=self.shard.replicas,
        )
        scale_expert_gradients(list(self.experts.parameters()), self.shard.world_size)
        replica_group(self.shard)  # collective: made now, on every process in the same order
        self.num_updates = 0
        self.collapse = CollapseMonitor(layer_name, collapse_share, collapse_updates)

    def set_num_updates(self, num_updates: int) -> None:
        """Called by fairseq at the start of every train step and on checkpoint load."""
        self.num_updates = num_updates
        self.collapse.layer_name = self.layer_name
        self.collapse.step(num_updates)

    def route(self, h: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> Routing:
        """Assign tokens to experts (no collective: called once per forward on each process).

        Args:
            h: ``(T, d)`` hidden states; tokens: ``(T,)`` ids; valid: ``(T,)``
            fp32, 1.0 for non-pad tokens.
        """
        raise NotImplementedError

    def aux_losses(self, routing: Routing, load: torch.Tensor, valid: torch.Tensor) -> Stats:
        """Losses that need the global load ``(N,)`` (fp32, all processes) of ``routing.choice``."""
        return {}

    def observe(self, tokens: torch.Tensor, target: torch.Tensor, pad: torch.Tensor) -> None:
        """Record ``routing.target`` ``(T,)`` of the tokens ``(T,)`` (``pad``: ``(T,)`` bool)."""

    @torch.no_grad()
    def assignment(self, features: torch.Tensor, tokens: torch.Tensor, training_routing: bool = True) -> torch.Tensor:
        """The expert of every token, ``(...)`` long, without running the experts.

        ``training_routing``: the routing training used at the current update
        count (else the inference routing). Used by the fluctuation analysis.
        """
        was_training = self.training
        self.train(training_routing)
        try:
            h = features.reshape(-1, features.shape[-1])
            tok = tokens.reshape(-1)
            with _fp32(h):
                routing = self.route(h, tok, tok.ne(self.padding_idx).float())
        finally:
            self.train(was_training)
        return routing.choice.view(tokens.shape)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> Tuple[torch.Tensor, Stats]:
        """Route, run the experts and gate.

        Collective with expert parallelism: every process must call it the
        same number of times (one ``all_gather`` of the counts, two
        ``all_to_all`` forward and two backward). One host sync (the counts).

        Args:
            features: ``(..., d)`` hidden states (``(T, B, d)`` in the decoder).
            tokens: ``(...)`` token ids at the same positions (``(T, B)``).
        Returns:
            ``(output, stats)``: output of the shape of ``features``; ``stats``
            holds 0-dim tensors ``num_tokens`` (this process's non-pad tokens),
            ``global_tokens`` (all processes'), ``dropped`` (tokens over
            capacity), ``load`` (``(N,)`` non-pad tokens per expert over all
            processes) and the router's own entries (``balance_loss``, ...).
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
        with _fp32(h):  # routing maths in fp32, also under --amp
            routing = self.route(h, tok, valid)
        plan = Dispatch(routing.choice, self.num_experts, skip=pad)

        # every process's per-expert counts: the one collective and host sync; the capacity
        # (global per expert) and its split among the senders follow from them on every process
        shard = self.shard
        load = self._count(routing.choice, valid)  # fp32 counts are exact up to 2**24 tokens
        if shard.is_parallel:
            counts = gather_counts(load, shard.world_size)
            host = [[int(c) for c in row] for row in counts.tolist()]
            load = counts.sum(0)
        else:
            host = [[int(c) for c in load.tolist()]]
        kept = capacity_split(host, self.capacity_factor)
        if routing.target is not None:
            self.observe(tok, routing.target, pad)
        with _fp32(h):
            stats = dict(routing.stats, **self.aux_losses(routing, load, valid))

        plan.keep(kept[shard.rank], host[shard.rank])
        routed = plan.gather(h)
        if shard.is_parallel:
            expert_out = exchange(routed, Splits(kept, shard), shard, self.experts)
        else:
            expert_out = self.experts(routed, kept[0])
        output = plan.combine(h, expert_out, routing.gate)

        if self.training:
            self.collapse.observe(load)
        num_tokens = valid.sum()
        stats.update(
            num_tokens=num_tokens,
            global_tokens=load.sum() if shard.is_parallel else num_tokens,  # on one process the same count
            load=load,
            dropped=load.new_full((), float(sum(host[shard.rank]) - sum(kept[shard.rank]))),  # a fill: no copy
        )
        return output.view_as(features), stats

    def _count(self, choice: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``(N,)`` fp32 number of this process's non-pad tokens per expert."""
        return torch.zeros(self.num_experts, dtype=torch.float32, device=choice.device).index_add_(0, choice, valid)


def _fp32(h: torch.Tensor):
    """Autocast off (routing affinities, gates and losses stay fp32 under ``--amp``)."""
    return torch.autocast(device_type=h.device.type, enabled=False)
