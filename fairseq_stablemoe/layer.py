"""MoE layers: StableMoE (Dai et al., ACL 2022) and the baselines it is compared with.

Shapes: ``T`` tokens, ``d`` model dim, ``N`` experts. Every type has the same
experts (``--moe-sublayers`` residual FFN sublayers each), the same expert
count and placement, so only routing differs.

* ``stablemoe`` (:class:`StableMoELayer`):
  stage 1 (training, ``num_updates < two_stage_updates``): the backbone router
  assigns ``a_t = argmax_i s[t, i]`` with ``s[t, i] = h_t . E_i``; output
  ``h_t + sigmoid(s[t, a_t]) * FFN_{a_t}(h_t)``. Balance loss
  ``sum_i ((|A_i| - n/N) / (n/N)) * sum_{t in A_i} sigmoid(s[t, i])`` with counts
  as constants; distillation loss ``sum_t CE(s_hat_t, a_t)``.
  Stage 2 (training, ``num_updates >= two_stage_updates``): the frozen
  distilled router assigns ``a_t = argmax_i s_hat[t, i]``; the gate still uses
  the backbone centroids; no auxiliary loss. Inference (``eval()``): the
  distilled router.
* ``switch`` (:class:`SwitchLayer`): softmax over the affinities, top-1,
  output ``h + p_a(h) * FFN_a(h)``, Switch Transformer load-balancing loss.
* ``base`` (:class:`BaseLayer`): balanced assignment in training (fairseq's
  ``libbase``, as BASE layers), greedy top-1 at inference, sigmoid gate.
* ``hash`` (:class:`HashLayer`): a fixed hash of the token's string to an
  expert; no router, no gate, no auxiliary loss.
* ``dense`` (:class:`DenseFFNLayer`): one expert's network for every token.

Padding positions go to no expert and take no part in the losses or the load
statistics (the paper's code counts them). Auxiliary losses are sums over
tokens, so the criterion normalises them as it does the cross-entropy.
"""

import contextlib
import contextvars
import hashlib
import logging
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dispatch import Dispatch, capacity_split
from .experts import Expert, Experts
from .health import DEFAULT_PATIENCE, DEFAULT_SHARE, CollapseMonitor
from .parallel import ExpertShard, Splits, exchange, gather_counts, replica_group, scale_expert_gradients
from .router import BackboneRouter, DistilledRouter, chosen_affinity, finite_affinities, top1
from .routing_counts import RoutingCounts, log_window

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
    tokens travel to them with all-to-all (see :mod:`.parallel`); routers are
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
        capacity_factor: Optional[float] = None,
        activation_fn: str = "relu",
        layer_name: str = "moe",
        collapse_share: float = DEFAULT_SHARE,
        collapse_updates: int = DEFAULT_PATIENCE,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.padding_idx = padding_idx
        self.capacity_factor = capacity_factor
        self.layer_name = layer_name
        self.shard = ExpertShard.current(num_experts)
        # one draw from the caller's generator whatever the layout; each expert is seeded from it
        # and its global id, so the model does not depend on the number of processes
        seed = int(torch.randint(0, 2**62, (1,)).item())
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


class StableMoELayer(MoELayer):
    """StableMoE: two-stage routing with a distilled token-id router.

    Args (besides :class:`MoELayer`'s):
        vocab_size: of the token ids read by the distilled router.
        distill_dim: embedding size of the distilled router (``--distill-dim``).
        two_stage_updates: update count at which stage 2 starts.
        stage1_assignment: ``greedy`` (top-1 of the backbone, the paper's) or
            ``balanced`` (BASE layers' balanced assignment) in stage-1 training;
            the distillation target is the backbone's top-1 either way.
        distill_router, distill_router_layers, distill_router_heads: the
            distilled router's kind and sizes (see :class:`DistilledRouter`).
        distill_refit: at the boundary, freeze the backbone's majority routing
            of the refit window as the token table (a ``wordemb`` router only).
        refit_updates: the refit window, the last stage-1 updates counted for
            it (default: the last half of stage 1).
        routing_window: updates per window of the logged ``agree_ceiling`` and
            ``route_churn`` (fairseq's ``--log-interval``).
        routing_counts: count the backbone's stage-1 routing per token id
            (:class:`.routing_counts.RoutingCounts`); ``distill_refit`` needs it.
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
        stage1_assignment: str = "greedy",
        distill_router: str = "wordemb",
        distill_router_layers: int = 1,
        distill_router_heads: int = 2,
        distill_refit: bool = False,
        refit_updates: Optional[int] = None,
        routing_window: int = 100,
        routing_counts: bool = True,
        **kwargs,
    ):
        super().__init__(
            embed_dim,
            ffn_dim,
            num_experts,
            num_sublayers,
            padding_idx,
            capacity_factor,
            activation_fn,
            layer_name,
            **kwargs,
        )
        self.two_stage_updates = two_stage_updates
        if stage1_assignment not in ("greedy", "balanced"):
            raise ValueError(f"unknown --stage1-assignment {stage1_assignment!r}: choose greedy or balanced")
        self.stage1_assignment = stage1_assignment
        self._libbase = load_libbase("--stage1-assignment balanced") if stage1_assignment == "balanced" else None
        self.backbone = BackboneRouter(embed_dim, num_experts)
        self.distill_router = DistilledRouter(
            vocab_size,
            distill_dim,
            num_experts,
            padding_idx,
            kind=distill_router,
            layers=distill_router_layers,
            heads=distill_router_heads,
        )
        # (token ids the distilled router reads, time steps to route) during forward/assignment
        self._router_input: Optional[Tuple[torch.Tensor, int]] = None
        if refit_updates is None:
            refit_updates = max(1, two_stage_updates // 2)
        if distill_refit and (distill_router != "wordemb" or not routing_counts):
            raise ValueError(
                "--distill-refit freezes a token id -> expert table: it needs --distill-router wordemb and the "
                "routing counts (drop --no-routing-counts)"
            )
        if routing_counts and two_stage_updates > 0 and not 1 <= refit_updates <= two_stage_updates:
            raise ValueError(
                f"--refit-updates {refit_updates} must be between 1 and --two-stage-updates ({two_stage_updates})"
            )
        self.distill_refit = distill_refit
        self.counts = (
            RoutingCounts(vocab_size, num_experts, two_stage_updates, refit_updates, routing_window)
            if routing_counts
            else None
        )

    @property
    def needs_context(self) -> bool:
        """Whether routing reads earlier tokens (incremental decoding then passes the whole prefix)."""
        return self.distill_router.causal_context

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, context: Optional[torch.Tensor] = None):
        """:meth:`MoELayer.forward`; ``context``: ``(T_ctx, B)`` the token ids up to and including
        ``tokens`` (``(T, B)``), for a causal distilled router in incremental decoding (default: ``tokens``)."""
        self._router_input = (tokens if context is None else context, tokens.shape[0] if tokens.dim() else 1)
        try:
            return super().forward(features, tokens)
        finally:
            self._router_input = None

    @torch.no_grad()
    def assignment(self, features: torch.Tensor, tokens: torch.Tensor, training_routing: bool = True) -> torch.Tensor:
        self._router_input = (tokens, tokens.shape[0] if tokens.dim() else 1)
        try:
            return super().assignment(features, tokens, training_routing)
        finally:
            self._router_input = None

    @property
    def in_stage2(self) -> bool:
        return self.num_updates >= self.two_stage_updates

    def set_num_updates(self, num_updates: int) -> None:
        """End a routing-count window (logged); freeze the distilled router at the boundary (with
        ``distill_refit``: the majority table); keep it frozen after it."""
        super().set_num_updates(num_updates)
        router = self.distill_router
        if self.counts is not None and self.training:
            log_window(self.counts.close_window(num_updates))
        if self.in_stage2:
            if not router.is_frozen:
                router.freeze()
                self._hand_over(num_updates)
            else:
                router.restore_frozen()
        elif router.is_frozen:
            router.unfreeze()
            logger.info(
                "%s: update count %d is before the stage boundary: router unfrozen", self.layer_name, num_updates
            )

    @torch.no_grad()
    def _hand_over(self, num_updates: int) -> None:
        """At the freeze: refit the table (``distill_refit``), fill and log the hand-over statistics."""
        router, counts = self.distill_router, self.counts
        if counts is not None:
            counts.flush()  # the refit window's last counts, summed over processes (a no-op when flushed already)
        # nothing counted: stage 2 from the start, or a model about to load a checkpoint (fairseq sets the
        # update count before loading the state, which then brings the frozen router and its table)
        if counts is None or counts.refit_counts.sum() == 0:
            logger.info(
                "%s: stage 2 from update %d: distilled router frozen, routing by token id",
                self.layer_name,
                num_updates,
            )
            return
        own = router.own_table() if router.routes_by_table else None
        if self.distill_refit:
            router.set_table(counts.majority(own))
        frozen = router.choice_table()[0] if router.routes_by_table else None
        counts.handover_stats(frozen, own)
        stats = counts.handover_dict()
        pct = lambda v: "n/a (the router reads context)" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        logger.info(
            "%s: stage 2 from update %d: distilled router frozen%s; over the last %d stage-1 updates (%d tokens) "
            "the frozen routing agrees with the backbone's majority routing on %s of the tokens and with the "
            "backbone on %s; ceiling (majority's own agreement with the backbone) %.1f%%",
            self.layer_name,
            num_updates,
            " with the backbone's majority table (--distill-refit)" if self.distill_refit else "",
            counts.refit_updates,
            int(stats["tokens"]),
            pct(stats["agree_majority"]),
            pct(stats["agree_backbone"]),
            100 * stats["ceiling"],
        )

    def observe(self, tokens: torch.Tensor, target: torch.Tensor, pad: torch.Tensor) -> None:
        """Count the backbone's stage-1 choices per token id (:class:`.routing_counts.RoutingCounts`)."""
        self.counts.observe(tokens, target, pad, self.shard, self.num_updates)

    def route(self, h: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> Routing:
        """Stage 1 (training): backbone; stage 2 and inference: distilled router.

        Extra stats (in training, and at eval inside :func:`reading_moe_stats`):
        ``distill_loss`` (stage 1 only; ``balance_loss`` comes from
        :meth:`aux_losses` in stage-1 training), ``agree`` (tokens where both
        routers pick the same expert), ``nonfinite`` (replaced affinities),
        ``stage`` (1.0 or 2.0), and at eval ``backbone_load`` (``(N,)``, where
        the backbone router would send the tokens). At eval without
        :func:`reading_moe_stats` the backbone's affinities only give the gate (its
        chosen column, :func:`chosen_affinity`). A frozen ``wordemb`` router
        routes by its token id table (:meth:`DistilledRouter.lookup`); its
        affinities are computed only for the distillation loss.
        """
        stage2 = self.in_stage2
        with_stats = self.wants_stats
        router = self.distill_router
        # distilled routing: a frozen wordemb router is a token id -> expert table
        by_table = router.routes_by_table
        if by_table:
            distill_choice, nonfinite_distill = router.lookup(tokens, count=with_stats)
        distill_scores = None
        if not by_table or (with_stats and not stage2):  # the distillation loss reads the affinities
            router_tokens, steps = self._router_input if self._router_input is not None else (tokens, tokens.shape[0])
            # no autograd once the router is frozen or at inference
            with torch.set_grad_enabled(self.training and not stage2 and torch.is_grad_enabled()):
                distill_scores = router(router_tokens, steps)
            if distill_scores.shape[0] != h.shape[0]:
                raise ValueError(
                    f"{self.layer_name}: the distilled router routed {distill_scores.shape[0]} tokens for "
                    f"{h.shape[0]} hidden states: pass token ids time first, (T, B), as the features (T, B, d)"
                )
            if not by_table:
                with torch.no_grad():  # only its arg-max routes; the distillation loss reads the raw affinities
                    distill_choice, nonfinite_distill = finite_affinities(distill_scores, count=with_stats)
                    distill_choice = top1(distill_choice)

        if not with_stats:  # inference: the distilled router routes, the backbone gives the gate only
            return Routing(distill_choice, torch.sigmoid(chosen_affinity(self.backbone(h), distill_choice)), {})
        # backbone affinities (fp32, with grad: they feed the gate and the balance loss)
        scores, nonfinite = finite_affinities(self.backbone(h), count=True)
        backbone_choice = top1(scores)
        if self.training and not stage2:
            # the distillation target stays the backbone's top-1 (as the paper's code, also with BA)
            choice = backbone_choice
            if self.stage1_assignment == "balanced":
                choice = balanced_assignment(self._libbase, scores.detach(), backbone_choice, valid, self.num_experts)
        else:
            choice = distill_choice
        gate = torch.sigmoid(scores.gather(1, choice.unsqueeze(1)))
        stats: Stats = {
            "agree": backbone_choice.eq(distill_choice).float().dot(valid),
            "nonfinite": nonfinite + nonfinite_distill,
            "stage": scores.new_full((), 2.0 if stage2 else 1.0, dtype=torch.float32),  # a fill: no copy
        }
        if not self.training:
            stats["backbone_load"] = self._count(backbone_choice, valid)
        scores_for_loss = target = None
        if not stage2:
            stats["distill_loss"] = (F.cross_entropy(distill_scores, backbone_choice, reduction="none") * valid).sum()
            if self.training:  # the balance loss counts the backbone's choice, which routes in training
                scores_for_loss = scores
                target = backbone_choice if self.counts is not None else None
        return Routing(choice, gate, stats, scores_for_loss, target)

    def aux_losses(self, routing: Routing, load: torch.Tensor, valid: torch.Tensor) -> Stats:
        """Stage 1 (training): ``sum_i ((|A_i| - n/N) / (n/N)) * sum_{t in A_i} sigmoid(s[t, i])`` over non-pad tokens.

        ``|A_i|`` and ``n`` count the global batch, as constants; the gate of
        a stage-1 training forward is ``sigmoid(s[t, a_t])``.
        """
        if routing.scores is None:
            return {}
        mean_load = load.sum() / self.num_experts
        weight = (load - mean_load) / mean_load.clamp(min=1e-9)  # 0 for an all-padding batch
        return {"balance_loss": (weight[routing.choice] * routing.gate.squeeze(1) * valid).sum()}


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
