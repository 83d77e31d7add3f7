"""``stablemoe-fluctuation``: routing fluctuation across the checkpoints of one run.

For every non-pad token of a binarised split and every MoE layer, the expert
chosen at each checkpoint, with the routing training used at that update
(StableMoE: backbone router in stage 1, distilled router in stage 2; Switch:
top-1; BASE: the balanced assignment of each batch; Hash: the hash), or with
the inference routing (``--inference-routing``). Per-rank files of an
expert-parallel run (``checkpoint_1_500-rank0-of2.pt``) are consolidated in
memory: name any one rank's file. Reports

* per consecutive pair of checkpoints, the fluctuation ratio: the share of
  tokens whose expert changed (over all MoE layers, and per layer);
* per token, the last fluctuation step: the last checkpoint whose expert
  differs from the final one, in percent of training, as the cumulative share
  of tokens against that step (the paper's Figure 2).

    stablemoe-fluctuation DATA_DIR CKPT1 CKPT2 [...] --split valid --json OUT.json --plot OUT.png
"""

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..checkpoints.consolidation import ConsolidateError, merge_files, shard_paths
from ..checkpoints.reading import (
    CheckpointLoadError,
    finish_fairseq_state,
    load_fairseq_state,
    num_updates_of,
    parse_rank_path,
)

logger = logging.getLogger(__name__)

REQUIRED_SAME = ("arch", "moe_type", "num_experts", "moe_layers", "decoder_layers", "decoder_embed_dim")


@dataclass
class CheckpointRouting:
    path: str
    num_updates: int
    choices: List[torch.Tensor]  # per MoE layer: (n_tokens,) long


def _load(path: str, data_dir: str, trusted: bool = False):
    from fairseq import checkpoint_utils

    parsed = parse_rank_path(path)
    if parsed is not None:  # a per-rank file of an expert-parallel run: merge the run's files in memory
        base, _, world = parsed
        try:
            state = finish_fairseq_state(merge_files(shard_paths(base, world), keep_optimizer=False), path)
        except ConsolidateError as e:
            raise ValueError(str(e)) from e
    else:
        state = load_fairseq_state(path, trusted=trusted)
    if state.get("cfg") is None or state["cfg"].get("model") is None:
        raise ValueError(f"{path} is not a fairseq model checkpoint (no model config)")
    arch = str(getattr(state["cfg"]["model"], "_name", None) or getattr(state["cfg"]["model"], "arch", ""))
    if not arch.startswith("stablemoe"):
        raise ValueError(f"{path} is a {arch!r} checkpoint, not a stablemoe_lm one")
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [path], arg_overrides={"data": data_dir}, state=state
    )
    num_updates = num_updates_of(state)
    return models[0], cfg, task, num_updates


def _model_signature(cfg) -> Dict[str, object]:
    """What must agree between checkpoints of one run."""
    sig = {k: str(getattr(cfg.model, k, None)) for k in REQUIRED_SAME}
    sig["seed"] = str(cfg.common.seed)
    sig["save_dir"] = str(cfg.checkpoint.save_dir)
    return sig


def routing_of(
    model, task, split: str, max_tokens: int, training_routing: bool, device: torch.device
) -> List[torch.Tensor]:
    """Per MoE layer, the expert of every non-pad token of ``split``, in a fixed order."""
    layers = [layer for layer in model.decoder.moe_layers if hasattr(layer.moe, "assignment")]
    if not layers:
        raise ValueError("the checkpoint has no routed MoE layer (dense model?): nothing to measure")
    pad = task.source_dictionary.pad()
    collected: List[List[torch.Tensor]] = [[] for _ in layers]

    def hook_for(i):
        def hook(module, args, output):
            tokens = module.input_tokens
            choice = module.moe.assignment(args[0], tokens, training_routing=training_routing)
            collected[i].append(choice[tokens.ne(pad)].cpu())

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        itr = task.get_batch_iterator(
            dataset=task.dataset(split),
            max_tokens=max_tokens,
            max_positions=model.max_positions(),
            ignore_invalid_inputs=True,
            seed=1,
            num_workers=0,
        ).next_epoch_itr(shuffle=False)
        model.eval()
        with torch.no_grad():
            for sample in itr:
                if not sample:
                    continue
                tokens = sample["net_input"]["src_tokens"].to(device)
                model.decoder.extract_features(tokens, None)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(c) if c else torch.zeros(0, dtype=torch.long) for c in collected]


def analyse(runs: Sequence[CheckpointRouting]) -> Dict[str, object]:
    """Fluctuation ratios per pair and the last-fluctuation curve (see module doc)."""
    if len(runs) < 2:
        raise ValueError("fluctuation needs at least two checkpoints of the same run")
    num_layers = len(runs[0].choices)
    pairs = []
    for a, b in zip(runs, runs[1:]):
        changed = [(x != y) for x, y in zip(a.choices, b.choices)]
        total = sum(int(c.sum()) for c in changed)
        count = sum(c.numel() for c in changed)
        pairs.append(
            {
                "from_update": a.num_updates,
                "to_update": b.num_updates,
                "ratio": total / max(count, 1),
                "per_layer": [float(c.float().mean()) if c.numel() else 0.0 for c in changed],
            }
        )
    final = runs[-1]
    total_updates = max(final.num_updates, 1)
    # last checkpoint index whose choice differs from the final one (-1: never)
    last_idx = []
    for layer in range(num_layers):
        last = torch.full_like(final.choices[layer], -1)
        for k, run in enumerate(runs[:-1]):
            last = torch.where(run.choices[layer] != final.choices[layer], torch.full_like(last, k), last)
        last_idx.append(last)
    all_last = torch.cat(last_idx)
    # a token whose expert last differed at checkpoint k settled during the step to k+1
    step_pct = [100.0 * r.num_updates / total_updates for r in runs]
    last_pct = torch.tensor([0.0] + step_pct[1:])[(all_last + 1).clamp(min=0)]
    last_pct = torch.where(all_last < 0, torch.zeros_like(last_pct), last_pct)
    curve = [float((last_pct <= p).float().mean()) for p in step_pct]
    return {
        "checkpoints": [{"path": r.path, "update": r.num_updates} for r in runs],
        "num_tokens": int(final.choices[0].numel()),
        "num_layers": num_layers,
        "pairs": pairs,
        "last_fluctuation": {"update_pct": step_pct, "cumulative_share": curve},
        "share_last_fluctuation_after_20pct": float((last_pct > 20.0).float().mean()),
        "final_pair_ratio": pairs[-1]["ratio"],
    }


def pyplot():
    """matplotlib's pyplot on the Agg backend; a clear error if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "--plot needs matplotlib, a dependency of fairseq-stablemoe: reinstall the package "
            "(pip install .) or run pip install matplotlib"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(result: Dict[str, object], path: str, title: str = "") -> None:
    """The fluctuation between consecutive checkpoints (all MoE layers, and each layer when there are
    several) and the last-fluctuation-step curve. Hollow markers of decreasing size keep lines that
    coincide (layers that never change expert) visible one inside the other."""
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    pairs = result["pairs"]
    updates = [p["to_update"] for p in pairs]
    lines = [("all MoE layers", [p["ratio"] for p in pairs])]
    if result.get("num_layers", 1) > 1:
        lines += [(f"MoE layer {j}", [p["per_layer"][j] for p in pairs]) for j in range(result["num_layers"])]
    for i, (label, ratios) in enumerate(lines):
        ax1.plot(
            updates,
            [100 * r for r in ratios],
            marker="osD^v"[i % 5],
            markersize=max(8 - 1.5 * i, 3),
            markerfacecolor="none",
            linestyle=["-", "--", "-.", ":"][i % 4],
            label=label,
        )
    ax1.set(
        xlabel="update (checkpoint)",
        ylabel="tokens whose expert changed (%)",
        title="fluctuation since the previous checkpoint",
    )
    if len(lines) > 1:
        ax1.legend(fontsize=8)
    lf = result["last_fluctuation"]
    ax2.plot(lf["update_pct"], [100 * c for c in lf["cumulative_share"]], marker="o", markerfacecolor="none")
    ax2.set(
        xlabel="training progress (%)",
        ylabel="tokens that no longer change (%)",
        title="last fluctuation step (all MoE layers)",
    )
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure(
    data_dir: str,
    checkpoints: Sequence[str],
    split: str = "valid",
    max_tokens: int = 4096,
    inference_routing: bool = False,
    cpu: bool = False,
    trusted: bool = False,
) -> Dict[str, object]:
    """Load every checkpoint in turn and analyse its routing of ``split``."""
    if len(checkpoints) < 2:
        raise ValueError("give at least two checkpoints of one run (e.g. those saved with --save-interval-updates)")
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    runs: List[CheckpointRouting] = []
    signature: Optional[Dict[str, object]] = None
    for path in checkpoints:
        model, cfg, task, num_updates = _load(path, data_dir, trusted)
        sig = _model_signature(cfg)
        if signature is None:
            signature = sig
        elif sig != signature:
            diff = {k: (signature[k], sig[k]) for k in sig if sig[k] != signature[k]}
            raise ValueError(f"{path} is not from the same run/architecture as {checkpoints[0]}: {diff}")
        try:
            task.load_dataset(split)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"split {split!r} not found in {data_dir}: {e}") from e
        model.to(device)
        choices = routing_of(model, task, split, max_tokens, training_routing=not inference_routing, device=device)
        runs.append(CheckpointRouting(path, num_updates, choices))
        logger.info("%s: update %d, %d tokens routed", path, num_updates, choices[0].numel())
        del model
    runs.sort(key=lambda r: r.num_updates)
    if len({r.num_updates for r in runs}) != len(runs):
        raise ValueError("two checkpoints have the same update count: are they from different runs?")
    result = analyse(runs)
    result["routing"] = "inference" if inference_routing else "training"
    result["split"] = split
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stablemoe-fluctuation",
        description="Routing fluctuation across the checkpoints of one run: the share of tokens whose expert "
        "changed between consecutive checkpoints, and each token's last fluctuation step (the paper's Figure 2).",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data_dir", help="binarised data directory (with dict.txt)")
    parser.add_argument("checkpoints", nargs="+", help="checkpoints of one run, any order")
    parser.add_argument("--split", default="valid", help="the split of DATA_DIR whose tokens are routed")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG plot here")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch of the forwards")
    parser.add_argument("--inference-routing", action="store_true", help="route as at inference (distilled router)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is there")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load checkpoints with weights_only=False (arbitrary pickles: only for files you trust)",
    )
    parser.add_argument("--user-dir", help="accepted for symmetry with fairseq; the plugin is imported anyway")
    return parser


def run(args: argparse.Namespace) -> Dict[str, object]:
    """Measure, print the table, write ``--json``/``--plot``; returns the result."""
    import fairseq_stablemoe  # noqa: F401  (registers the model)

    if args.plot:
        pyplot()  # before the (long) measurement: a missing matplotlib is an ImportError now
    result = measure(
        args.data_dir,
        args.checkpoints,
        args.split,
        args.max_tokens,
        args.inference_routing,
        args.cpu,
        args.trust_checkpoint,
    )
    print(f"{'from':>8} {'to':>8} {'fluctuation':>12}")
    for p in result["pairs"]:
        print(f"{p['from_update']:>8} {p['to_update']:>8} {100 * p['ratio']:>11.2f}%")
    print(f"tokens: {result['num_tokens']} x {result['num_layers']} MoE layer(s), {result['routing']} routing")
    late = 100 * result["share_last_fluctuation_after_20pct"]
    print(f"share of tokens whose last fluctuation is past 20% of training: {late:.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(result, args.plot)
    return result


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        run(args)
    except (ImportError, ValueError, FileNotFoundError, CheckpointLoadError) as e:
        print(f"stablemoe-fluctuation: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli_main()
