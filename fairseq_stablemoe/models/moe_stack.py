"""MoE layers in a fairseq Transformer stack: where they go, how they are built and checked.

Shared by :mod:`.stablemoe_lm` and :mod:`.stablemoe_transformer`.
"""

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from fairseq.dataclass.configs import CommonConfig
from fairseq.utils import safe_getattr

from ..distributed.expert_parallel import layout_problem, world_size_and_rank
from ..modules.baseline_layers import DenseFFNLayer, HashLayer
from ..modules.moe_layer import MoELayer
from ..modules.moe_types import MOE_LAYERS
from ..modules.options import MOE_TYPES, moe_option
from ..modules.stablemoe_layer import StableMoELayer

logger = logging.getLogger(__name__)


def moe_layer_positions(num_dense_layers: int, num_moe_layers: int) -> List[int]:
    """The default placement, as dense-block indices (see :func:`parse_moe_positions`).

    BASE layers style: layer ``i`` (in order) inserted at index
    ``((i + 1) * L) // (K + 1)`` of the growing list, i.e. after dense block
    ``((i + 1) * L) // (K + 1) - i``.
    """
    return [((i + 1) * num_dense_layers) // (num_moe_layers + 1) - i for i in range(num_moe_layers)]


def parse_moe_positions(spec: Optional[str], opt: str, num_dense_layers: int, dense_opt: str) -> List[int]:
    """``"P1,P2,..."`` -> sorted dense-block indices, each in ``[0, L]``; ValueError naming ``opt`` otherwise."""
    try:
        positions = [int(p) for p in str(spec).split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"{opt} takes comma-separated integers (got {spec!r})") from None
    bad = [p for p in positions if p < 0 or p > num_dense_layers]
    if not positions or bad:
        raise ValueError(
            f"{opt} {spec}: every position must be between 0 (before the first block) and {dense_opt} "
            f"({num_dense_layers}, after the last block)"
        )
    return sorted(positions)


def resolved_moe_positions(args, moe_opt: str, positions_opt: str, dense_opt: str) -> List[int]:
    """Where the MoE layers of one stack go, as dense-block indices.

    ``moe_opt``/``positions_opt``/``dense_opt``: the options (``--moe-layers``,
    ``--moe-layer-positions``, ``--decoder-layers``), read from ``args``.
    """
    attr = lambda opt: opt[2:].replace("-", "_")  # noqa: E731
    dense = getattr(args, attr(dense_opt))
    spec = safe_getattr(args, attr(positions_opt), None)
    if spec is not None and str(spec).strip():
        return parse_moe_positions(spec, positions_opt, dense, dense_opt)
    return moe_layer_positions(dense, getattr(args, attr(moe_opt)))


class MoEDecoderLayer(nn.Module):
    """Adapts an MoE layer to fairseq's decoder-layer (or encoder-layer) call signature.

    The decoder (encoder) hands the token ids in through :attr:`input_tokens`
    (``(T, B)``) before running its layers; the layer keeps its statistics in
    :attr:`last_stats` for the decoder to collect.

    Args:
        moe: the MoE layer, called as ``moe(x, tokens) -> (x, stats)``.
        decoder: return ``(x, None, None)`` as decoder layers do (else ``x``, as encoder layers).
    """

    def __init__(self, moe: nn.Module, decoder: bool = True):
        super().__init__()
        self.moe = moe
        self.decoder = decoder
        self.input_tokens: Optional[torch.Tensor] = None
        #: ``(T_ctx, B)`` the whole prefix in incremental decoding, for a causal distilled router
        self.router_context: Optional[torch.Tensor] = None
        self.last_stats: Optional[Dict[str, torch.Tensor]] = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        """``x``: ``(T, B, d)`` -> ``(x, None, None)`` (decoder) or ``x`` (encoder)."""
        if self.input_tokens is None:
            raise RuntimeError(
                "MoE layer called without token ids: run it through a StableMoE encoder/decoder, "
                "which passes the input tokens to the router"
            )
        if self.router_context is not None:
            x, self.last_stats = self.moe(x, self.input_tokens, context=self.router_context)
        else:
            x, self.last_stats = self.moe(x, self.input_tokens)
        return (x, None, None) if self.decoder else x

    def upgrade_state_dict_named(self, state_dict, name: str) -> None:
        """fairseq's encoder calls this on every layer when loading; nothing to upgrade."""


def insert_moe_layers(
    layers: nn.ModuleList, positions: Sequence[int], build: Any, decoder: bool, where: str
) -> List[MoEDecoderLayer]:
    """Insert one MoE layer after dense block ``p`` of ``layers`` for every ``p`` in ``positions``.

    ``positions``: dense-block indices in ``[0, len(layers)]`` (0: before the
    first block), sorted; equal ones stack. ``build()`` makes one MoE layer;
    ``where`` names the stack in log messages.
    """
    inserted: List[MoEDecoderLayer] = []
    for j, pos in enumerate(sorted(positions)):
        layer = MoEDecoderLayer(build(), decoder=decoder)
        layers.insert(pos + j, layer)  # the j layers inserted before it sit below it
        inserted.append(layer)
    for idx, layer in enumerate(layers):
        if isinstance(layer, MoEDecoderLayer) and hasattr(layer.moe, "layer_name"):
            layer.moe.layer_name = f"{where} MoE layer {inserted.index(layer)} ({where}.layers.{idx})"
    return inserted


def build_moe_layer(args, dictionary, embed_dim: int, ffn_dim: int) -> nn.Module:
    """The MoE layer of ``--moe-type`` (input ``(T, B, d)`` and token ids ``(T, B)``).

    ``dictionary``: of the token ids the layer sees (the distilled router's and
    the hash map's vocabulary). An option missing from ``args`` (a checkpoint
    saved before it existed) takes its :class:`MoEOptions` default.
    """
    opt = lambda name: moe_option(args, name)  # noqa: E731
    moe_type = str(opt("moe_type"))
    layer = MOE_LAYERS.get(moe_type)
    if layer is None:
        raise ValueError(f"unknown --moe-type {moe_type!r}: choose one of {', '.join(MOE_TYPES)}")
    if layer is DenseFFNLayer:
        return DenseFFNLayer(embed_dim, ffn_dim, opt("moe_sublayers"), args.activation_fn)
    kwargs = dict(
        embed_dim=embed_dim,
        ffn_dim=ffn_dim,
        num_experts=opt("num_experts"),
        num_sublayers=opt("moe_sublayers"),
        padding_idx=dictionary.pad(),
        capacity_factor=opt("capacity_factor"),
        activation_fn=args.activation_fn,
        collapse_share=opt("collapse_share"),
        collapse_updates=opt("collapse_updates"),
    )
    if layer is StableMoELayer:
        kwargs.update(
            vocab_size=len(dictionary),
            distill_dim=opt("distill_dim"),
            two_stage_updates=opt("two_stage_updates"),
            stage1_assignment=str(opt("stage1_assignment")),
            distill_router=str(opt("distill_router")),
            distill_router_layers=opt("distill_router_layers"),
            distill_router_heads=opt("distill_router_heads"),
            distill_refit=bool(opt("distill_refit")),
            refit_updates=opt("refit_updates"),
            routing_window=int(safe_getattr(args, "log_interval", None) or CommonConfig.log_interval),
            routing_counts=not opt("no_routing_counts"),
        )
    elif layer is HashLayer:
        kwargs.update(symbols=list(dictionary.symbols))
    return layer(**kwargs)


def refit_problems(args, distill_router: str) -> List[str]:
    """What is wrong with ``--distill-refit`` / ``--refit-updates`` (each with the fix)."""
    problems = []
    refit = bool(moe_option(args, "distill_refit"))
    refit_updates = moe_option(args, "refit_updates")
    stage1 = args.two_stage_updates
    if refit and str(args.moe_type) != "stablemoe":
        problems.append(
            f"--distill-refit refits StableMoE's distilled router; --moe-type {args.moe_type} has none: "
            "drop --distill-refit or use --moe-type stablemoe"
        )
    if refit and distill_router != "wordemb":
        problems.append(
            f"--distill-refit freezes a token id -> expert table, but --distill-router {distill_router} routes by "
            "context: use --distill-router wordemb or drop --distill-refit"
        )
    if refit and moe_option(args, "no_routing_counts"):
        problems.append("--distill-refit needs the routing counts: drop --no-routing-counts")
    if refit and stage1 < 1:
        problems.append(f"--distill-refit needs a stage 1 to count: --two-stage-updates must be >= 1 (got {stage1})")
    if refit_updates is not None and stage1 >= 1 and not 1 <= refit_updates <= stage1:
        problems.append(
            f"--refit-updates must be between 1 and --two-stage-updates ({stage1}), the stage-1 updates it "
            f"counts (got {refit_updates})"
        )
    return problems


def validate_moe_args(args, stacks: Sequence[Tuple[str, str, str]], model_name: str = "stablemoe_lm") -> None:
    """Refuse bad MoE options with an error that names the option and the fix.

    ``stacks``: ``(MoE-count option, MoE-positions option, dense-layers
    option)`` for every stack that gets MoE layers, e.g. ``("--moe-layers",
    "--moe-layer-positions", "--decoder-layers")``.
    """
    problems = []
    if args.num_experts < 1:
        problems.append(f"--num-experts must be >= 1 (got {args.num_experts})")
    placements = []
    for opt, positions_opt, dense_opt in stacks:
        attr = lambda o: o[2:].replace("-", "_")  # noqa: E731
        count, dense = getattr(args, attr(opt)), getattr(args, attr(dense_opt))
        spec = safe_getattr(args, attr(positions_opt), None)
        if spec is not None and str(spec).strip():
            try:
                count = len(parse_moe_positions(spec, positions_opt, dense, dense_opt))
            except ValueError as e:
                problems.append(str(e))
        elif count < 0 or count > dense:
            problems.append(
                f"{opt} must be between 0 and {dense_opt} ({dense}) (got {count}); "
                f"raise {dense_opt} or lower {opt}, or place them with {positions_opt}"
            )
        placements.append((opt, count, dense_opt, dense))
    if args.moe_sublayers < 1:
        problems.append(f"--moe-sublayers must be >= 1 (got {args.moe_sublayers})")
    if args.distill_dim < 1:
        problems.append(f"--distill-dim must be >= 1 (got {args.distill_dim})")
    if args.two_stage_updates < 0:
        problems.append(
            f"--two-stage-updates must be >= 0 (got {args.two_stage_updates}); "
            "it is the update count at which the distilled router takes over"
        )
    distill_router = str(moe_option(args, "distill_router"))
    if distill_router == "transformer":
        layers = moe_option(args, "distill_router_layers")
        heads = moe_option(args, "distill_router_heads")
        if layers < 1:
            problems.append(f"--distill-router-layers must be >= 1 (got {layers})")
        if heads < 1 or args.distill_dim % heads:
            problems.append(f"--distill-router-heads {heads} must divide --distill-dim ({args.distill_dim})")
    problems.extend(refit_problems(args, distill_router))
    if args.capacity_factor is not None and args.capacity_factor <= 0:
        problems.append(f"--capacity-factor must be > 0 or unset (got {args.capacity_factor})")
    world_size, _ = world_size_and_rank()
    ddp_backend = safe_getattr(args, "ddp_backend", None)
    has_experts = str(args.moe_type) != "dense" and any(count > 0 for _, count, _, _ in placements)
    if world_size > 1 and has_experts and ddp_backend not in (None, "legacy_ddp", "no_c10d"):
        problems.append(
            f"--ddp-backend {ddp_backend} would average (and at start-up overwrite) the experts, "
            "which differ between processes: use --ddp-backend legacy_ddp"
        )
    zero_sharding = safe_getattr(args, "zero_sharding", "none")
    if world_size > 1 and has_experts and zero_sharding not in (None, "none"):
        problems.append(
            f"--zero-sharding {zero_sharding} would overwrite each process's experts with those of the process "
            "that updates them (fairscale's OSS broadcasts every parameter from its owner), and the experts "
            "differ between processes: use --zero-sharding none"
        )
    if world_size > 1 and has_experts and safe_getattr(args, "use_bmuf", False):
        problems.append(
            "--use-bmuf would overwrite the experts, which differ between processes (BMUF broadcasts rank 0's "
            "parameters after its warm-up and then averages every parameter across processes): drop --use-bmuf"
        )
    if has_experts and layout_problem(args.num_experts, world_size):
        problems.append(layout_problem(args.num_experts, world_size))
    for opt, count, dense_opt, _ in placements:
        layerdrop_opt = dense_opt.replace("-layers", "-layerdrop")
        layerdrop = safe_getattr(args, layerdrop_opt[2:].replace("-", "_"), 0.0) or 0.0
        if world_size > 1 and has_experts and count > 0 and layerdrop > 0:
            problems.append(
                f"{layerdrop_opt} {layerdrop} could skip an MoE layer on some processes and not on others, "
                f"whose all-to-alls would then wait forever: use {layerdrop_opt} 0 with expert parallelism"
            )
    for opt in ("character_embeddings", "adaptive_input"):
        if safe_getattr(args, opt, False):
            problems.append(f"--{opt.replace('_', '-')} is not supported by {model_name}")
    if problems:
        raise ValueError(f"{model_name}: " + "; ".join(problems))


def check_moe_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Clear errors, before torch's size-mismatch ones, for a checkpoint that does not fit ``model``.

    * a distilled router whose vocabulary is not the dictionary's;
    * a file holding another number of experts per layer than this process
      (a per-rank file opened in one process, or the other way round).
    """
    from ..checkpoints.rank_files import experts_per_layer

    for name, param in model.named_parameters():
        if name.endswith("distill_router.embed_tokens.weight") and name in state_dict:
            got, want = state_dict[name].shape[0], param.shape[0]
            if got != want:
                raise ValueError(
                    f"the checkpoint's distilled router ({name}) has {got} token ids but the "
                    f"dictionary has {want} entries: load it with the dictionary it was trained "
                    "with (the data directory given to fairseq-train)"
                )
    held = experts_per_layer(state_dict)
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            prefix = f"{name}.experts."
            if prefix in held and held[prefix] != len(module.experts):
                raise ValueError(
                    f"the checkpoint holds {held[prefix]} experts in {name} but this process holds "
                    f"{len(module.experts)} of --num-experts {module.num_experts}: a per-rank file of an "
                    "expert-parallel run opens in one process only after `stablemoe-consolidate FILE`, and "
                    "a consolidated file resumes on W processes after `stablemoe-consolidate FILE --shards W`"
                )
