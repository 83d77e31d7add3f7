"""torchrun's job under every fairseq tool, on GPU as on CPU (CUDA availability and device count stubbed).

fairseq finds a torchrun job only through the CUDA devices a process sees: with one visible GPU per
process (``device_count() == 1``) ``distributed_world_size`` defaults to 1 and fairseq runs W
one-process jobs, and fairseq-generate (which the plugin makes distributed) called itself without
end. Here fairseq's ``distributed_main`` is replaced by a recorder: every tool must reach it once,
in torchrun's job (``env://``, its world size and rank, the one visible device).
"""

import os

import pytest
import torch
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.distributed import utils as distributed_utils

import fairseq_stablemoe
from fairseq_stablemoe.distributed.torchrun import torchrun_settings
from fairseq_stablemoe.fairseq_hooks import eval_tools

USER_DIR = os.path.dirname(fairseq_stablemoe.__file__)
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}


def test_settings_of_torchrun_jobs():
    assert torchrun_settings(TORCHRUN, cpu=True) == {
        "distributed_init_method": "env://",
        "distributed_world_size": 4,
        "distributed_rank": 3,
        "distributed_no_spawn": True,
        "device_id": 1,
        "distributed_backend": "gloo",
    }
    one_gpu_each = torchrun_settings(TORCHRUN, cpu=False, device_count=1)
    assert one_gpu_each["device_id"] == 0 and "distributed_backend" not in one_gpu_each  # fairseq's nccl
    assert torchrun_settings(TORCHRUN, cpu=False, device_count=8)["device_id"] == 1
    assert torchrun_settings(dict(TORCHRUN, WORLD_SIZE="1", RANK="0"), cpu=False, device_count=1) == {}
    assert torchrun_settings({}, cpu=False, device_count=1) == {}


def parse(tool: str, *args: str):
    parser = {
        "train": lambda: options.get_training_parser(),
        "eval-lm": lambda: options.get_eval_lm_parser(),
        "validate": lambda: options.get_validation_parser(),
        "generate": lambda: options.get_generation_parser(),
    }[tool]()
    argv = ["data-bin", "--user-dir", USER_DIR, *args]
    if tool == "train":
        argv += ["--arch", "stablemoe_lm", "--task", "language_modeling"]
    else:
        argv += ["--path", "checkpoint_last.pt"]
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))


@pytest.fixture
def one_gpu_per_process(monkeypatch):
    """torchrun's environment, one visible CUDA device, and fairseq's distributed_main recorded."""
    for key, value in TORCHRUN.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    calls = []

    def recorder(device_id, main, cfg, kwargs):
        calls.append((device_id, cfg.distributed_training))
        if len(calls) > 3:
            raise RuntimeError("distributed_main entered again and again")

    monkeypatch.setattr(distributed_utils, "distributed_main", recorder)
    return calls


@pytest.mark.parametrize("tool", ["train", "eval-lm", "validate"])
def test_every_tool_joins_the_torchrun_job_with_one_gpu_per_process(one_gpu_per_process, tool):
    ran_alone = []
    cfg = parse(tool, *(["--task", "language_modeling"] if tool == "validate" else []))
    assert cfg.distributed_training.distributed_world_size == 1  # fairseq's default here: device_count()
    distributed_utils.call_main(cfg, lambda cfg, **kw: ran_alone.append(cfg))
    assert not ran_alone, "fairseq ran the tool as a one-process job"
    ((device_id, dt),) = one_gpu_per_process
    assert (dt.distributed_init_method, dt.distributed_world_size, dt.distributed_rank) == ("env://", 4, 3)
    assert device_id == dt.device_id == 0 and dt.distributed_no_spawn
    assert dt.distributed_backend == "nccl"


def test_generate_starts_the_torchrun_job_once(one_gpu_per_process):
    cfg = parse("generate", "--task", "translation")
    eval_tools._generate_main(cfg)  # before: call_main ran it again as a one-process job, forever
    ((device_id, dt),) = one_gpu_per_process
    assert (dt.distributed_init_method, dt.distributed_world_size, dt.distributed_rank) == ("env://", 4, 3)
    assert device_id == 0


def test_cpu_processes_get_gloo(one_gpu_per_process):
    cfg = parse("eval-lm", "--cpu")
    distributed_utils.call_main(cfg, lambda cfg, **kw: None)
    ((device_id, dt),) = one_gpu_per_process
    assert dt.distributed_backend == "gloo" and device_id == 1  # LOCAL_RANK: no CUDA device to divide by
