"""The distributed job torchrun started, as fairseq's ``distributed_training`` settings.

fairseq finds a torchrun job only through the CUDA devices it sees: ``distributed_world_size``
defaults to ``torch.cuda.device_count()`` and ``infer_init_method`` returns early when that is 1,
and ``device_id = rank % device_count()``. So on CPU (no device), and on GPUs with one visible
device per process (``CUDA_VISIBLE_DEVICES`` set per rank, as many clusters do), a plain
``torchrun fairseq-<tool>`` runs W independent one-process jobs. :func:`torchrun_settings` gives the
job's settings from torchrun's environment instead; ``stablemoe-train``
(:mod:`cli.train`) adds them as flags, and :mod:`fairseq_hooks.eval_tools` applies them when fairseq's own
tools run with ``--user-dir``.
"""

from typing import Any, Dict, Mapping


def torchrun_settings(env: Mapping[str, str], cpu: bool, device_count: int = 0) -> Dict[str, Any]:
    """fairseq's ``distributed_training`` settings of the job torchrun started ({} outside torchrun or for W = 1).

    Args:
        env: the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``LOCAL_RANK``).
        cpu: the job runs on CPU processes (``--cpu``): the gloo backend.
        device_count: CUDA devices this process sees; the device is ``LOCAL_RANK`` modulo it
            (one visible device per process: device 0).
    """
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")) or int(env["WORLD_SIZE"]) <= 1:
        return {}
    local_rank = int(env.get("LOCAL_RANK", "0"))
    settings: Dict[str, Any] = {
        "distributed_init_method": "env://",
        "distributed_world_size": int(env["WORLD_SIZE"]),
        "distributed_rank": int(env["RANK"]),
        "distributed_no_spawn": True,
        "device_id": local_rank % device_count if (not cpu and device_count > 0) else local_rank,
    }
    if cpu:
        settings["distributed_backend"] = "gloo"
    return settings
