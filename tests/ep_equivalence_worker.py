"""One process of the expert-parallel equivalence test (run by test_expert_parallel.py).

Builds a stablemoe_lm and fairseq's own Trainer (legacy_ddp, plain SGD, no
clipping) from real command-line arguments, loads the common initial weights
(its shard of the experts), runs a few train steps on its share of a fixed
global batch and saves its parameters and the per-step logged losses; for each
of the comma-separated MoE types in turn, in one process group.

    python ep_equivalence_worker.py DATA_DIR INIT_DIR OUT_DIR --rank R --world-size W --port P
        --moe-types T1,T2 [--num-experts N]

Files: ``INIT_DIR/T.pt`` (written by the 1-process run, read by the others) and
``OUT_DIR/T-rankR.pt``.

Besides the parameters and losses it saves the logged load statistics of every
update (computed from the global per-expert counts, so they must not depend on W).
"""

import argparse
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8
SEQ_LEN = 16
NUM_EXPERTS = 4
STEPS = 3
TWO_STAGE = 2  # updates 0 and 1 in stage 1, update 2 in stage 2
LOAD_STATS = ("max_load", "load_entropy", "moe0_top_share", "moe0_idle")


def model_args(data_dir: str, world_size: int, rank: int, moe_type: str, num_experts: int = NUM_EXPERTS):
    args = [
        data_dir,
        "--user-dir",
        str(REPO / "fairseq_stablemoe"),
        "--task",
        "language_modeling",
        "--arch",
        "stablemoe_lm",
        "--moe-type",
        moe_type,
        "--criterion",
        "stablemoe",
        "--decoder-layers",
        "2",
        "--decoder-embed-dim",
        "16",
        "--decoder-ffn-embed-dim",
        "32",
        "--decoder-attention-heads",
        "2",
        "--num-experts",
        str(num_experts),
        "--moe-sublayers",
        "2",
        "--distill-dim",
        "8",
        "--two-stage-updates",
        str(TWO_STAGE),
        "--dropout",
        "0",
        "--optimizer",
        "sgd",
        "--lr",
        "0.5",
        "--clip-norm",
        "0",
        "--tokens-per-sample",
        str(SEQ_LEN),
        "--max-tokens",
        "4096",
        "--cpu",
        "--seed",
        "1",
        "--ddp-backend",
        "legacy_ddp",
        "--distributed-world-size",
        str(world_size),
        "--distributed-rank",
        str(rank),
    ]
    return args


def global_batch(pad: int, vocab: int):
    g = torch.Generator().manual_seed(123)
    src = torch.randint(4, vocab, (GLOBAL_BATCH, SEQ_LEN), generator=g)
    tgt = torch.randint(4, vocab, (GLOBAL_BATCH, SEQ_LEN), generator=g)
    lengths = torch.full((GLOBAL_BATCH,), SEQ_LEN)
    # right padding in a few rows of each process's share
    for row, keep in ((1, 10), (5, 3), (6, 12)):
        src[row, keep:] = pad
        tgt[row, keep:] = pad
        lengths[row] = keep
    return src, tgt, lengths


def sample_for(rows, src, tgt, lengths, pad):
    tgt_rows = tgt[rows]
    return {
        "id": torch.tensor(rows),
        "nsentences": len(rows),
        "ntokens": int(tgt_rows.ne(pad).sum()),
        "net_input": {"src_tokens": src[rows], "src_lengths": lengths[rows]},
        "target": tgt_rows,
    }


def shard_state(state, shard):
    """The rank's view of a 1-process state dict: its experts renumbered to local ids."""
    out = {}
    for key, value in state.items():
        m = re.search(r"\.experts\.(\d+)\.", key)
        if m is None:
            out[key] = value
            continue
        local = int(m.group(1)) - shard.first_expert
        if 0 <= local < shard.num_local:
            out[key.replace(f".experts.{m.group(1)}.", f".experts.{local}.")] = value
    return out


def train_one(opts, moe_type: str) -> None:
    """Build the model and fairseq's Trainer for ``moe_type``, train STEPS steps, save what they gave."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    train_parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        train_parser, model_args(opts.data_dir, opts.world_size, opts.rank, moe_type, opts.num_experts)
    )
    cfg = convert_namespace_to_omegaconf(args)
    torch.manual_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)

    init_file = Path(opts.init_dir) / f"{moe_type}.pt"
    init = torch.load(init_file, weights_only=True) if init_file.exists() else None
    if init is None:  # the 1-process run writes the common initial weights
        torch.save(model.state_dict(), init_file)
    else:
        from fairseq_stablemoe.distributed.expert_parallel import ExpertShard

        model.load_state_dict(shard_state(init, ExpertShard(opts.world_size, opts.rank, opts.num_experts)))

    trainer = Trainer(cfg, task, model, criterion)
    pad = task.dictionary.pad()
    src, tgt, lengths = global_batch(pad, len(task.dictionary))
    per_rank = GLOBAL_BATCH // opts.world_size
    rows = list(range(opts.rank * per_rank, (opts.rank + 1) * per_rank))
    losses, load_stats = [], []
    for _ in range(STEPS):
        log = trainer.train_step([sample_for(rows, src, tgt, lengths, pad)])
        losses.append(float(log["loss"]))
        load_stats.append({k: float(log[k]) for k in LOAD_STATS if k in log})
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in trainer.get_model().state_dict().items()},
            "losses": losses,
            "load_stats": load_stats,
        },
        Path(opts.out_dir) / f"{moe_type}-rank{opts.rank}.pt",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("init_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--moe-types", default="stablemoe")
    parser.add_argument("--num-experts", type=int, default=NUM_EXPERTS)
    opts = parser.parse_args()

    if opts.world_size > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{opts.port}", rank=opts.rank, world_size=opts.world_size
        )
    for moe_type in opts.moe_types.split(","):
        train_one(opts, moe_type)
    if opts.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
