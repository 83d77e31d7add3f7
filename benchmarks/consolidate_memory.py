"""Peak memory of ``stablemoe-consolidate`` against the sizes of its input and output files.

Builds a synthetic one-process checkpoint (shared weights plus ``--experts`` experts in one MoE
layer, Adam-like optimizer state by name, as the plugin saves it), splits it into per-rank files
for ``--world`` processes, then runs in a fresh process each:

* ``merge``: the ``--world`` per-rank files -> one checkpoint with all experts;
* ``reshard``: the ``--world`` per-rank files -> per-rank files for ``--to`` processes.

For each it prints the process's peak resident memory above that of a process that only imported
the tool (``extra_mib``), next to the largest input file and the largest output file. Streaming
keeps ``extra_mib`` below ``largest input + largest output`` rather than the whole model's size;
docs/consolidation.md's table reads about 130 MiB over the larger of the two.

    python benchmarks/consolidate_memory.py --shared-mib 64 --expert-mib 32 --experts 16 --world 4 --to 2
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys
from fairseq_stablemoe.cli import consolidate
base = consolidate.peak_memory_mib()
consolidate.cli_main(sys.argv[1:])
print("PEAK", consolidate.peak_memory_mib() - base)
"""


def synthetic(shared_mib: float, expert_mib: float, experts: int):
    from fairseq_stablemoe.checkpoints.rank_files import META_KEY

    def tensor(mib):  # fp32 parameters
        return torch.randn(max(1, int(mib * 2**20 / 4 / 256)), 256)

    model = {"decoder.embed_tokens.weight": tensor(shared_mib)}
    for e in range(experts):
        model[f"decoder.layers.1.moe.experts.{e}.0.fc1.weight"] = tensor(expert_mib)
    names = list(model)
    opt = {
        "state": {i: {"exp_avg": torch.zeros_like(model[n])} for i, n in enumerate(names)},
        "param_groups": [{"lr": 0.1, "params": list(range(len(names)))}],
    }
    meta = {
        "format": 1,
        "world_size": 1,
        "rank": 0,
        "num_experts": experts,
        "run_id": "bench",
        "num_updates": 1,
        "expert_layers": ["decoder.layers.1.moe.experts."],
        "optimizer_param_names": names,
    }
    return {
        "model": model,
        "last_optimizer_state": opt,
        "optimizer_history": [{"num_updates": 1}],
        "extra_state": {META_KEY: meta},
        "args": None,
        "cfg": None,
    }


def peak(argv):
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, cwd=ROOT, check=True)
    return float(out.stdout.strip().splitlines()[-1].split()[1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared-mib", type=float, default=64)
    p.add_argument("--expert-mib", type=float, default=32, help="one expert's parameters (its Adam state doubles it)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--to", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = os.path.join(tmp, "one.pt")
        torch.save(synthetic(args.shared_mib, args.expert_mib, args.experts), one)
        run = os.path.join(tmp, "run", "ckpt.pt")
        subprocess.run(
            [sys.executable, "-m", "fairseq_stablemoe.cli.consolidate", one, "--shards", str(args.world), "-o", run],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        inputs = [os.path.join(tmp, "run", f"ckpt-rank{r}-of{args.world}.pt") for r in range(args.world)]
        largest_in = max(os.path.getsize(p) for p in inputs) / 2**20
        for name, argv, outs in [
            ("merge", [run, "-o", os.path.join(tmp, "merged.pt")], [os.path.join(tmp, "merged.pt")]),
            (
                "reshard",
                [run, "--shards", str(args.to), "-o", os.path.join(tmp, "re", "ckpt.pt")],
                [os.path.join(tmp, "re", f"ckpt-rank{r}-of{args.to}.pt") for r in range(args.to)],
            ),
        ]:
            extra = peak(argv)
            largest_out = max(os.path.getsize(p) for p in outs) / 2**20
            total = (os.path.getsize(one)) / 2**20
            print(
                f"case={name} world={args.world} to={1 if name == 'merge' else args.to} extra_mib={extra:.0f} "
                f"largest_input_mib={largest_in:.0f} largest_output_mib={largest_out:.0f} "
                f"whole_model_mib={total:.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
