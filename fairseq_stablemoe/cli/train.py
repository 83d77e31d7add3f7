"""stablemoe-train: fairseq's tools with the plugin and, under torchrun, the distributed flags.

    torchrun --nproc_per_node 8 $(which stablemoe-train) DATA --arch stablemoe_lm ...
    torchrun --nproc_per_node 2 -m fairseq_stablemoe.launch DATA ... --cpu
    torchrun --nproc_per_node 2 -m fairseq_stablemoe.launch eval-lm DATA --path ckpt/checkpoint_last.pt --cpu
    torchrun --nproc_per_node 2 -m fairseq_stablemoe.launch generate DATA --path ckpt/checkpoint_best.pt --cpu

A first argument ``train`` (the default), ``eval-lm``, ``generate``,
``interactive`` or ``validate`` picks the fairseq tool (``fairseq_cli.<tool>``).

fairseq's own detection of torchrun derives the world size from the number of
CUDA devices (and divides by it for the device id), so on CPU it finds no job.
Under torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` set, ``WORLD_SIZE >
1``) this adds, unless given (:func:`distributed.torchrun.torchrun_settings`; the plugin applies
the same settings to fairseq's own tools run with ``--user-dir`` under torchrun, see
:func:`fairseq_hooks.eval_tools._call_main`)::

    --distributed-init-method env:// --distributed-world-size $WORLD_SIZE
    --distributed-rank $RANK --distributed-no-spawn
    --device-id $LOCAL_RANK               (modulo the CUDA devices the process sees)
    --distributed-backend gloo            (with --cpu only)

and, in every case, ``--user-dir`` of this package if missing. Then it runs
the tool. Without torchrun it is the plain fairseq tool (fairseq's own
multi-GPU spawning and Slurm support apply).
"""

import logging
import os
import sys
from typing import List, Mapping, Optional, Tuple

from ..distributed.torchrun import torchrun_settings

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the plugin, for --user-dir
#: first argument -> fairseq module whose ``cli_main`` runs
TOOLS = {
    "train": "fairseq_cli.train",
    "eval-lm": "fairseq_cli.eval_lm",
    "generate": "fairseq_cli.generate",
    "interactive": "fairseq_cli.interactive",
    "validate": "fairseq_cli.validate",
}


def split_tool(argv: List[str]) -> Tuple[str, List[str]]:
    """``(tool, rest of argv)``; ``train`` when the first argument names no tool."""
    if argv and argv[0] in TOOLS:
        return argv[0], argv[1:]
    return "train", argv


def given(argv: List[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_args(argv: List[str], env: Mapping[str, str]) -> List[str]:
    """The flags to add to ``argv`` (a fairseq-train command line) in environment ``env``."""
    added: List[str] = []
    if not given(argv, "--user-dir"):
        added.extend(["--user-dir", PACKAGE_DIR])
    cpu = given(argv, "--cpu")
    for key, value in torchrun_settings(env, cpu=cpu, device_count=0 if cpu else _cuda_devices()).items():
        flag = "--" + key.replace("_", "-")
        if not given(argv, flag):
            added.extend([flag] if value is True else [flag, str(value)])
    return added


def cli_main(argv: Optional[List[str]] = None) -> None:
    tool, argv = split_tool(list(sys.argv[1:] if argv is None else argv))
    added = launch_args(argv, os.environ)
    if added and os.environ.get("RANK", "0") == "0":
        print(f"stablemoe-train ({tool}) adds: " + " ".join(added), file=sys.stderr)
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
    import importlib

    module = importlib.import_module(TOOLS[tool])
    from ..fairseq_hooks import eval_tools

    eval_tools.install()  # this package was imported before the tool's module: wrap its entry points now
    module.cli_main()


if __name__ == "__main__":
    cli_main()
