"""The warm interpreter the tests start their commands from (``tests/warm.py``) against a fresh one: the
same output from fairseq's tools, and torchrun's jobs with torchrun's environment and failure handling."""

import os
import re
import sys

import pytest
import warm
from conftest import USER_DIR
from corpus import free_port

#: a torchrun worker that prints what torchrun gives it and sums the ranks over the process group;
#: rank 1 exits with status 3 when its argument says so (rank 0 then waits in a collective). Each line is
#: one write(2): under torchrun the workers' stdout is unbuffered, and print's pieces interleave.
PROBE = """
import os, sys, datetime
import torch, torch.distributed as dist
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "GROUP_RANK", "OMP_NUM_THREADS")
say = lambda line: os.write(1, (line + "\\n").encode())  # one write a line: the workers share stdout
say(f"env {os.environ['RANK']} {dict((k, os.environ.get(k)) for k in keys)}")
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
if sys.argv[1:] == ["fail"] and dist.get_rank() == 1:
    sys.exit(3)
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
say(f"sum {os.environ['RANK']} {t.item()}")
dist.destroy_process_group()
"""


def _log_lines(text: str):
    """The log records of a tool's output, without time stamps and timings (Python's warnings left out)."""
    text = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| ", "", text, flags=re.M)
    text = re.sub(r"in [0-9.]+s \([0-9.]+ tokens/s\)", "in TIME", text)
    return [line for line in text.splitlines() if re.match(r"(INFO|WARNING|ERROR)\b", line)]


def test_eval_lm_prints_the_same_warm_and_fresh(trained_run, monkeypatch):
    cmd = [sys.executable, "-m", "fairseq_cli.eval_lm", trained_run.corpus.data_dir, "--user-dir", USER_DIR]
    cmd += ["--path", trained_run.save_dir / "checkpoint_last.pt", "--tokens-per-sample", "32", "--cpu"]
    assert warm.runs_warm(cmd)
    hot = warm.run(cmd, timeout=300)
    monkeypatch.setenv(warm.COLD_ENV, "1")
    cold = warm.run(cmd, timeout=300)
    assert hot.returncode == cold.returncode == 0, (hot.stderr + cold.stderr)[-3000:]
    assert hot.stdout == cold.stdout
    assert any("Perplexity" in line for line in _log_lines(hot.stderr))
    assert _log_lines(hot.stderr) == _log_lines(cold.stderr)


def _probe_job(tmp_path, monkeypatch, mode: str, *args: str, timeout: int):
    """:data:`PROBE` on 2 processes from torchrun: forked workers (warm) or torchrun itself (cold)."""
    (tmp_path / "probe.py").write_text(PROBE)
    if mode == "cold":
        monkeypatch.setenv(warm.COLD_ENV, "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    return warm.run([*cmd, "-m", "probe", *args], cwd=tmp_path, timeout=timeout)


@pytest.mark.parametrize("mode", ["warm", pytest.param("cold", marks=pytest.mark.slow)])
def test_torchrun_jobs_get_torchrun_s_environment(tmp_path, monkeypatch, mode):
    """Warm: W forked workers; cold: torchrun itself. The same environment and collective results."""
    out = _probe_job(tmp_path, monkeypatch, mode, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for rank in (0, 1):
        env = eval(re.search(rf"^env {rank} (\{{.*\}})$", out.stdout, re.M).group(1))
        assert env.pop("MASTER_ADDR")
        assert env == {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "0",
            "OMP_NUM_THREADS": "1",
        }
        assert f"sum {rank} 3.0" in out.stdout


@pytest.mark.parametrize("mode", ["warm", pytest.param("cold", marks=pytest.mark.slow)])
def test_a_failing_torchrun_worker_stops_the_job(tmp_path, monkeypatch, mode):
    """A worker that exits with an error while the other waits in a collective: the job fails, no hang."""
    out = _probe_job(tmp_path, monkeypatch, mode, "fail", timeout=100)
    assert out.returncode != 0
    assert "sum 1" not in out.stdout


def test_commands_that_differ_at_import_time_start_fresh(monkeypatch):
    """Another thread count than the fork server's, another interpreter, or launcher options it does not
    know: a fresh interpreter."""
    module = [sys.executable, "-m", "json.tool", "--help"]
    assert warm.runs_warm(module)
    assert not warm.runs_warm([sys.executable, "-c", "print(1)"])
    assert not warm.runs_warm(module, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert not warm.runs_warm(["python3", *module[1:]])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert warm.runs_warm([*torchrun, "--master_port", "1234", "-m", "json.tool"])
    assert not warm.runs_warm([*torchrun, "--rdzv-backend", "c10d", "-m", "json.tool"])
    assert not warm.runs_warm([*torchrun, "x.py"])
    warm.warm_up()
    monkeypatch.setenv("LOGLEVEL", "DEBUG")  # after the fork server started: it imported without it
    assert not warm.runs_warm(module)
    started = warm._server_environment().get("LOGLEVEL")
    as_started = {k: v for k, v in os.environ.items() if k != "LOGLEVEL"}
    assert warm.runs_warm(module, env=dict(as_started, **({"LOGLEVEL": started} if started else {})))
    monkeypatch.delenv("LOGLEVEL")
    monkeypatch.setenv(warm.COLD_ENV, "1")
    assert not warm.runs_warm(module)
