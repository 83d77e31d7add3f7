"""``stablemoe-routing-summary``: what a trained checkpoint's MoE layers do on a split.

Runs the model in eval mode (inference routing: the distilled router for
StableMoE) over a binarised split and prints, per MoE layer, every expert's
share of the non-pad tokens as routed and as the backbone router would route,
max over mean load, and how often the distilled router agrees with the
backbone router. For a StableMoE checkpoint taken at or after the stage
boundary it also prints the hand-over recorded at the boundary (kept in the
checkpoint, so no training data is needed): over the refit window (the last
``--refit-updates`` stage-1 updates), the share of tokens on which the frozen
routing agrees with the backbone's majority routing, and the ceiling, the
share of tokens whose backbone expert is their id's majority expert (the best
any token-id router can reach on them).

For a router that reads the token id alone (StableMoE's ``wordemb`` distilled
router, hash layers) it also prints each expert's most frequent tokens in the
split, and ``--table FILE`` writes the whole token-to-expert table of the
inference routing as TSV: ``layer``, ``token_id``, ``token``, ``expert`` and
``count`` (the token's non-pad occurrences in the split's model input), one
row per dictionary entry and MoE layer.

    stablemoe-routing-summary DATA_DIR --path CHECKPOINT [--split test] [--json OUT.json] [--table OUT.tsv]
"""

import argparse
import json
import logging
import sys
from typing import Dict, List, Optional, Sequence

import torch

from ..checkpoints.reading import CheckpointLoadError, load_fairseq_state, num_updates_of
from ..modules.baseline_layers import HashLayer
from ..modules.moe_layer import reading_moe_stats

#: tokens listed per expert in the printed summary
TOP_TOKENS = 8


def token_table(layer, vocab_size: int) -> Optional[torch.Tensor]:
    """``(V,)`` long: the expert the inference routing gives each token id, for a router that reads the
    id alone (StableMoE's ``wordemb`` distilled router, hash layers); None for one that reads context."""
    if isinstance(layer, HashLayer):
        return layer.token_to_expert.clone()
    router = getattr(layer, "distill_router", None)
    if router is None or router.kind != "wordemb":
        return None
    device = router.embed_tokens.weight.device
    ids = torch.arange(vocab_size, device=device)
    dim = layer.backbone.expert_centroids.shape[1]
    features = torch.zeros(vocab_size, dim, device=device, dtype=layer.backbone.expert_centroids.dtype)
    with torch.no_grad():  # the routing fairseq-eval-lm uses (a token-id router: the features do not matter)
        return layer.assignment(features, ids, training_routing=False)


def summarise(
    data_dir: str, path: str, split: str = "test", max_tokens: int = 8192, cpu: bool = True, trusted: bool = False
) -> Dict[str, object]:
    """Per-layer routing statistics of ``path`` on ``split`` (see module doc)."""
    from fairseq import checkpoint_utils

    state = load_fairseq_state(path, trusted=trusted)
    num_updates = num_updates_of(state)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [path], arg_overrides={"data": data_dir}, state=state
    )
    model = models[0]
    if not hasattr(model.decoder, "moe_layers"):
        raise ValueError(f"{path} is not a stablemoe_lm checkpoint")
    try:
        task.load_dataset(split)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"split {split!r} not found in {data_dir}: {e}") from e
    device = torch.device("cpu" if cpu or not torch.cuda.is_available() else "cuda")
    model.to(device).eval()
    totals: List[Dict[str, torch.Tensor]] = []
    vocab = len(task.source_dictionary)
    pad = task.source_dictionary.pad()
    occurrences = torch.zeros(vocab, dtype=torch.long)  # non-pad occurrences of each id in the model input
    itr = task.get_batch_iterator(
        dataset=task.dataset(split),
        max_tokens=max_tokens,
        max_positions=model.max_positions(),
        ignore_invalid_inputs=True,
        num_workers=0,
    ).next_epoch_itr(shuffle=False)
    # reading_moe_stats: the backbone's load and the agreement, which inference leaves out
    with torch.no_grad(), reading_moe_stats():
        for sample in itr:
            if not sample:
                continue
            src = sample["net_input"]["src_tokens"]
            occurrences += torch.bincount(src[src.ne(pad)].reshape(-1), minlength=vocab)
            _, extra = model.decoder.extract_features(src.to(device), None)
            for j, stats in enumerate(extra["moe"]):
                if stats is None:
                    continue
                if len(totals) <= j:
                    totals.append({})
                for key in ("load", "backbone_load", "agree", "num_tokens"):
                    if key in stats:
                        totals[j][key] = totals[j].get(key, 0) + stats[key].detach().double().cpu()
    handovers = [
        layer.moe.counts.handover_dict() if getattr(layer.moe, "counts", None) is not None else None
        for layer in model.decoder.moe_layers
    ]
    layers = []
    for j, t in enumerate(totals):
        n = float(t["num_tokens"])
        load = (t["load"] / max(n, 1)).tolist()
        entry = {"layer": j, "tokens": int(n), "load": load, "max_over_mean": max(load) * len(load)}
        if "backbone_load" in t:
            entry["backbone_load"] = (t["backbone_load"] / max(n, 1)).tolist()
            entry["agreement"] = float(t["agree"]) / max(n, 1)
        if j < len(handovers) and handovers[j] is not None:
            entry["handover"] = handovers[j]
        table = token_table(model.decoder.moe_layers[j].moe, vocab) if j < len(model.decoder.moe_layers) else None
        if table is not None:
            table = table.cpu()
            entry["table"] = table.tolist()
            entry["top_tokens"] = [
                [
                    [task.source_dictionary[i], int(occurrences[i])]
                    for i in sorted(
                        (i for i in (table == e).nonzero().view(-1).tolist() if occurrences[i] > 0),
                        key=lambda i: -int(occurrences[i]),
                    )[:TOP_TOKENS]
                ]
                for e in range(len(load))
            ]
        layers.append(entry)
    moe_type = str(getattr(cfg.model, "moe_type", "stablemoe"))
    two_stage = int(getattr(cfg.model, "two_stage_updates", 0))
    return {
        "symbols": list(task.source_dictionary.symbols),
        "counts": occurrences.tolist(),
        "checkpoint": path,
        "split": split,
        "num_updates": num_updates,
        "moe_type": moe_type,
        "stage": (2 if num_updates >= two_stage else 1) if moe_type == "stablemoe" else None,
        "layers": layers,
    }


def format_summary(summary: Dict[str, object]) -> str:
    lines = [
        f"routing on {summary['split']} ({summary['moe_type']}, update {summary['num_updates']}"
        + (f", stage {summary['stage']}" if summary["stage"] else "")
        + "; shares of non-pad tokens, inference routing)"
    ]
    for layer in summary["layers"]:
        lines.append(
            f"  MoE layer {layer['layer']}: {layer['tokens']} tokens, max/mean load {layer['max_over_mean']:.2f}"
        )
        lines.append("    routed (distilled router) : " + " ".join(f"{100 * x:5.1f}%" for x in layer["load"]))
        if "backbone_load" in layer:
            lines.append(
                "    backbone router would send: " + " ".join(f"{100 * x:5.1f}%" for x in layer["backbone_load"])
            )
            lines.append(
                f"    distilled router agrees with the backbone router on {100 * layer['agreement']:.1f}% of tokens"
            )
        handover = layer.get("handover")
        if handover:
            agree = handover["agree_majority"]
            lines.append(
                f"    hand-over at the boundary (last {int(handover['refit_updates'])} stage-1 updates, "
                f"{int(handover['tokens'])} tokens): frozen routing agrees with the backbone's majority routing on "
                + ("n/a (context router)" if agree is None else f"{100 * agree:.1f}%")
                + f"; ceiling {100 * handover['ceiling']:.1f}%"
            )
        for e, tokens in enumerate(layer.get("top_tokens", [])):
            lines.append(f"    expert {e}: " + " ".join(f"{tok}({n})" for tok, n in tokens))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stablemoe-routing-summary",
        description="What a trained checkpoint's MoE layers do on a split: each expert's load, the agreement "
        "of the inference routing with the backbone router, the stage-boundary hand-over and each expert's "
        "most frequent tokens.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data_dir", help="binarised data directory (with dict.txt)")
    parser.add_argument("--path", required=True, help="checkpoint")
    parser.add_argument("--split", default="test", help="the split of DATA_DIR to route")
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens per batch of the forwards")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is there")
    parser.add_argument("--json", help="also write the summary here")
    parser.add_argument(
        "--table",
        help="write the token-to-expert table of the inference routing here (TSV: layer, token_id, token, expert, "
        "count); needs a router that reads the token id alone (StableMoE's wordemb router, hash layers)",
    )
    parser.add_argument("--user-dir", help="accepted for symmetry with fairseq; the plugin is imported anyway")
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="load with weights_only=False (trusted files only)"
    )
    return parser


def run(args: argparse.Namespace) -> Dict[str, object]:
    """Summarise, print, write ``--json``; returns the summary."""
    import fairseq_stablemoe  # noqa: F401

    summary = summarise(args.data_dir, args.path, args.split, args.max_tokens, args.cpu, args.trust_checkpoint)
    if args.table and not any("table" in layer for layer in summary["layers"]):
        raise ValueError(
            f"--table: {args.path}'s MoE layers route by context ({summary['moe_type']}), not by the token id "
            "alone: there is no token-to-expert table (use a StableMoE checkpoint with --distill-router wordemb, "
            "or hash layers)"
        )
    print(format_summary(summary))
    if args.table:
        write_table(summary, args.table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in summary.items() if k not in ("symbols", "counts")}, f, indent=2)
    return summary


def write_table(summary: Dict[str, object], path: str) -> None:
    """The token-to-expert tables of ``summary`` as TSV (see the module doc)."""
    symbols, counts = summary["symbols"], summary["counts"]
    with open(path, "w", encoding="utf-8") as f:
        f.write("layer\ttoken_id\ttoken\texpert\tcount\n")
        for layer in summary["layers"]:
            for i, expert in enumerate(layer.get("table", [])):
                f.write(f"{layer['layer']}\t{i}\t{symbols[i]}\t{expert}\t{counts[i]}\n")


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        run(args)
    except (ValueError, FileNotFoundError, CheckpointLoadError) as e:
        print(f"stablemoe-routing-summary: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli_main()
