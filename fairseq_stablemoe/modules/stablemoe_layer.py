"""StableMoE's layer (Dai et al., ACL 2022): two-stage routing with a distilled router.

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
"""

import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.dataclass.configs import CommonConfig

from .baseline_layers import balanced_assignment, load_libbase
from .moe_layer import MoELayer, Routing, Stats
from .options import option_default
from .router import BackboneRouter, DistilledRouter, chosen_affinity, finite_affinities, top1
from .routing_counts import RoutingCounts, log_window

logger = logging.getLogger(__name__)


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
        distill_dim: int = option_default("distill_dim"),
        two_stage_updates: int = option_default("two_stage_updates"),
        capacity_factor: Optional[float] = option_default("capacity_factor"),
        activation_fn: str = "relu",
        layer_name: str = "moe",
        stage1_assignment: str = option_default("stage1_assignment"),
        distill_router: str = option_default("distill_router"),
        distill_router_layers: int = option_default("distill_router_layers"),
        distill_router_heads: int = option_default("distill_router_heads"),
        distill_refit: bool = option_default("distill_refit"),
        refit_updates: Optional[int] = option_default("refit_updates"),
        routing_window: int = CommonConfig.log_interval,
        routing_counts: bool = not option_default("no_routing_counts"),
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
