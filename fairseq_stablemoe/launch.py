"""stablemoe-train: ``fairseq-train`` with the plugin and, under torchrun, the distributed flags.

    torchrun --nproc_per_node 8 $(which stablemoe-train) DATA --arch stablemoe_lm ...
    torchrun --nproc_per_node 2 -m fairseq_stablemoe.launch DATA ... --cpu

fairseq's own detection of torchrun derives the world size from the number of
CUDA devices (and divides by it for the device id), so with torchrun the
flags have to be given by hand. Under torchrun (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` set, ``WORLD_SIZE > 1``) this adds, unless given::

    --distributed-init-method env:// --distributed-world-size $WORLD_SIZE
    --distributed-rank $RANK --distributed-no-spawn --device-id $LOCAL_RANK
    --distributed-backend gloo            (with --cpu only)

and, in every case, ``--user-dir`` of this package if missing. Then it runs
``fairseq_cli.train``. Without torchrun it is plain ``fairseq-train`` (fairseq's
own multi-GPU spawning and Slurm support apply).
"""

import logging
import os
import sys
from typing import List, Mapping, Optional

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def given(argv: List[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def launch_args(argv: List[str], env: Mapping[str, str]) -> List[str]:
    """The flags to add to ``argv`` (a fairseq-train command line) in environment ``env``."""
    added: List[str] = []

    def add(flag: str, *values: str) -> None:
        if not given(argv, flag):
            added.extend([flag, *values])

    if not given(argv, "--user-dir"):
        added.extend(["--user-dir", PACKAGE_DIR])
    torchrun = all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))
    if torchrun and int(env["WORLD_SIZE"]) > 1:
        add("--distributed-init-method", "env://")
        add("--distributed-world-size", env["WORLD_SIZE"])
        add("--distributed-rank", env["RANK"])
        add("--distributed-no-spawn")
        add("--device-id", env.get("LOCAL_RANK", "0"))
        if given(argv, "--cpu"):
            add("--distributed-backend", "gloo")
    return added


def cli_main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    added = launch_args(argv, os.environ)
    if added and os.environ.get("RANK", "0") == "0":
        print("stablemoe-train adds: " + " ".join(added), file=sys.stderr)
    sys.argv = [sys.argv[0]] + argv + added
    # fairseq-train's own logging (importing this package, and so fairseq, before
    # fairseq_cli.train has already given the root logger a plain stderr handler)
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        stream=sys.stdout,
        force=True,
    )
    from fairseq_cli.train import cli_main as train_main

    train_main()


if __name__ == "__main__":
    cli_main()
