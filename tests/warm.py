"""Run ``python -m <tool>`` command lines of the tests from a warm interpreter: a fork of a process that
has already imported torch and fairseq, instead of a fresh interpreter that spends seconds importing them.

:func:`run` is ``subprocess.run(cmd, capture_output=True, text=True, ...)`` for a command line of this
interpreter, ``[sys.executable, "-m", MODULE, ARGS...]``: a process forked from multiprocessing's fork
server (started once per test process, its modules preloaded) runs ``MODULE`` as ``__main__`` with
``runpy``, in the command's environment, folder and standard streams, and exits with the tool's status.

``torchrun`` command lines (``-m torch.distributed.run --nproc_per_node W [--master_port P] -m MODULE
ARGS``) run as torchrun runs them on one node: W forked workers with torchrun's environment (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ...; rank 0 holds the rendezvous
store), their output into the command's streams, and when a worker fails, the others stopped and a
non-zero status.

Everything else runs in a fresh interpreter as before: another interpreter, other launcher options, or an
environment that differs from the fork server's in what is read when torch, fairseq or the device guard are
imported (:data:`IMPORT_TIME_ENV`). ``STABLEMOE_TEST_COLD=1`` runs every command in a fresh interpreter;
``STABLEMOE_TEST_COMMAND_LOG=FILE`` appends each command's wall time to FILE.

Neither fairseq nor the plugin is preloaded (:data:`PRELOAD`): each tool imports them as a fresh interpreter
does, so logging's set-up, the registries and the plugin's hooks happen in every command as they would.
"""

import atexit
import json
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional, Sequence

COLD_ENV = "STABLEMOE_TEST_COLD"
#: a file that :func:`run` appends each command's wall time to (seconds, warm or fresh, the command)
LOG_ENV = "STABLEMOE_TEST_COMMAND_LOG"

#: imported by the fork server: the libraries under fairseq that take most of a fresh interpreter's start.
#: fairseq and its tools are not among them: each command imports them afresh, so that what they do when
#: imported (logging's set-up before fairseq is imported, the registries, the plugin's hooks) is what a
#: fresh interpreter does
PRELOAD = [
    "torch",
    "torch.distributed",
    "numpy",
    "scipy.stats",
    "sklearn.metrics",
    "omegaconf",
    "hydra",
    "sacrebleu",
]

#: variables read when the preloaded modules are imported (OpenMP's thread count, the device guard,
#: fairseq's log level): a command whose environment differs in one of them runs in a fresh interpreter
IMPORT_TIME_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "PYTHONPATH",
    "PYTHONHASHSEED",
    "PYTHONWARNINGS",
    "LOGLEVEL",
    "CUDA_VISIBLE_DEVICES",
    "STABLEMOE_DEVICE_GUARD",
    "STABLEMOE_DEVICE_GUARD_PATHS",
)
#: the environment the fork server starts in, and every command's where it does not set these variables
SERVER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_context = None
_fresh_path: List[str] = []  # sys.path of a fresh interpreter in the server's environment, after its first entry
_started_in: Dict[str, str] = {}  # the environment the running fork server started in


def _server_environment() -> Dict[str, str]:
    """The running fork server's environment (a test may change ``os.environ`` later), or the one it
    would start in."""
    return dict(_started_in) if _context is not None else dict(os.environ, **SERVER_ENV)


def _command_env(env=None) -> Dict[str, str]:
    """A command's environment: ``env`` (default this process's) with one OpenMP thread, unless it sets another."""
    return {**SERVER_ENV, **(os.environ if env is None else env)}


def _fork_context():
    """multiprocessing's fork server with :data:`PRELOAD` imported, started on first use."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.update(SERVER_ENV)
        try:
            from multiprocessing import forkserver

            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _started_in.update(os.environ, **SERVER_ENV)
        probe = "import json, sys; print(json.dumps(sys.path[1:]))"
        env = dict(_started_in, STABLEMOE_DEVICE_GUARD="0")
        _fresh_path[:] = json.loads(
            subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
        )
        _context = context
    return _context


def _parse_torchrun(args: Sequence[str]):
    """``(world, port, main)`` of a one-node torchrun command line, or None for options it does not know."""
    world, port, i = None, None, 0
    while i < len(args):
        a = args[i]
        if a in ("-m", "--module"):
            main = ["-m", *args[i + 1 :]]
            break
        if not a.startswith("-"):
            return None  # a script path: run torchrun itself
        key, value = (a.split("=", 1) + [None])[:2]
        if value is None:
            if i + 1 >= len(args):
                return None
            value, i = args[i + 1], i + 1
        if key in ("--nproc_per_node", "--nproc-per-node"):
            world = int(value)
        elif key in ("--master_port", "--master-port"):
            port = int(value)
        elif key == "--nnodes" and value == "1":
            pass
        else:
            return None
        i += 1
    else:
        return None
    if world is None or len(main) < 2:
        return None
    return world, port or 29500, main


def _plan(cmd: Sequence[str], env: Dict[str, str]) -> Optional[dict]:
    """What a warm run of ``cmd`` in environment ``env`` does, or None when it runs in a fresh interpreter."""
    cmd = [str(c) for c in cmd]
    if os.environ.get(COLD_ENV) == "1" or len(cmd) < 2 or cmd[0] != sys.executable:
        return None
    server = _server_environment()
    if any(env.get(k) != server.get(k) for k in IMPORT_TIME_ENV):
        return None
    if cmd[1].endswith(".py") and os.path.isfile(cmd[1]):
        return {"module": None, "script": os.path.abspath(cmd[1]), "args": cmd[2:], "world": 0, "port": None}
    if len(cmd) < 3 or cmd[1] != "-m":
        return None
    if cmd[2] == "torch.distributed.launch":
        return None
    if cmd[2] == "torch.distributed.run":
        parsed = _parse_torchrun(cmd[3:])
        if parsed is None:
            return None
        world, port, main = parsed
        return {"module": main[1], "script": None, "args": main[2:], "world": world, "port": port}
    return {"module": cmd[2], "script": None, "args": cmd[3:], "world": 0, "port": None}


def _run_main(plan: dict) -> int:
    """``python -m module args`` (or ``python script args``) in this process; its exit status (the output
    flushed, the exit handlers run)."""
    try:
        # sys.path as a fresh interpreter's: the script's folder or the working folder first
        sys.path[:] = [os.path.dirname(plan["script"]) if plan["script"] else os.getcwd(), *plan["fresh_path"]]
        if plan["script"]:
            sys.argv = [plan["script"], *plan["args"]]
            runpy.run_path(plan["script"], run_name="__main__")
        else:
            sys.argv = [plan["module"], *plan["args"]]
            runpy.run_module(plan["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    return code


def _torchrun_env(rank: int, world: int, port: int) -> Dict[str, str]:
    """The variables torchrun gives worker ``rank`` of a one-node job (rank 0 holds the store)."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "ROLE_RANK": str(rank),
        "ROLE_NAME": "default",
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "GROUP_WORLD_SIZE": "1",
        "ROLE_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_RUN_ID": "none",
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


def _workers(plan: dict) -> int:
    """torchrun's job: ``world`` forked workers; a failing one stops the others. torchrun's status."""
    world, pids = plan["world"], {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            os.environ.update(_torchrun_env(rank, world, plan["port"]))
            os._exit(_run_main(plan))
        pids[pid] = rank
    failed = False
    while pids:
        pid, status = os.wait()
        pids.pop(pid, None)
        if os.waitstatus_to_exitcode(status) != 0 and not failed:
            failed = True
            print(f"[warm torchrun] worker {world - len(pids) - 1} failed: stopping the others", file=sys.stderr)
            for other in pids:
                try:
                    os.kill(other, signal.SIGTERM)
                except ProcessLookupError:
                    pass
    sys.stderr.flush()
    return 1 if failed else 0


def _child(plan: dict, env: Dict[str, str], cwd: str, out: str, err: str, stdin: Optional[str]) -> None:
    """The forked process: the command's folder, environment and streams, then the tool (or torchrun's job)."""
    os.setsid()  # its own process group: a timeout stops the tool and every worker it forked
    multiprocessing.set_start_method(None, force=True)  # the platform's default again, not the fork server
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path, flags in ((1, out, os.O_WRONLY | os.O_APPEND), (2, err, os.O_WRONLY | os.O_APPEND)):
        target = os.open(path, flags)
        os.dup2(target, fd)
        os.close(target)
    source = os.open(stdin or os.devnull, os.O_RDONLY)
    os.dup2(source, 0)
    os.close(source)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if env.get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(line_buffering=True)
    code = _workers(plan) if plan["world"] else _run_main(plan)
    os._exit(code)


class Started:
    """A command started by :func:`start`: ``wait``, ``poll``, ``kill`` and ``output`` as a ``Popen``'s.

    A warm command runs in a process forked from the fork server, its output in files of a folder of its
    own; a cold one (see :func:`_plan`) in ``subprocess.Popen`` with its output in the same files.
    """

    def __init__(self, cmd: Sequence, env=None, cwd=None, input: Optional[str] = None, merge: bool = False):
        self.args = [str(c) for c in cmd]
        env = _command_env(env)
        self._tmp = tempfile.TemporaryDirectory(prefix="warm-")
        self._out = os.path.join(self._tmp.name, "stdout")
        self._err = self._out if merge else os.path.join(self._tmp.name, "stderr")
        for path in {self._out, self._err}:
            open(path, "w").close()
        stdin = None
        if input is not None:
            stdin = os.path.join(self._tmp.name, "stdin")
            with open(stdin, "w") as f:
                f.write(input)
        self.returncode = None
        plan = _plan(self.args, env)
        self.warm = plan is not None
        if self.warm:
            context = _fork_context()
            plan["fresh_path"] = list(_fresh_path)
            folder = os.path.abspath(cwd or os.getcwd())
            self._proc = context.Process(target=_child, args=(plan, env, folder, self._out, self._err, stdin))
            self._proc.start()
        else:
            streams = [open(self._out, "a"), open(self._err, "a")]
            with open(stdin or os.devnull) as source:
                self._proc = subprocess.Popen(
                    self.args, env=env, cwd=cwd, stdin=source, stdout=streams[0], stderr=streams[1]
                )
            for stream in streams:
                stream.close()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            code = self._proc.exitcode if self.warm else self._proc.poll()
            if code is not None:
                self._finish(code)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        """The exit status; ``subprocess.TimeoutExpired`` (the command still running) after ``timeout`` s."""
        if self.returncode is None:
            if self.warm:
                self._proc.join(timeout)
                code = self._proc.exitcode
            else:
                try:
                    code = self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    code = None
            if code is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._finish(code)
        return self.returncode

    def _finish(self, code: int) -> None:
        if self.warm:
            self._proc.join()
            try:  # workers left behind by a tool that exited early
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.returncode = code

    def kill(self) -> None:
        """Stop the command and every process it started."""
        if self.returncode is not None:
            return
        if self.warm:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.join()
            self.returncode = self._proc.exitcode
        else:
            self._proc.kill()
            self.returncode = self._proc.wait()

    def communicate(self, timeout: Optional[float] = None):
        """``wait(timeout)``, then :meth:`output`: ``Popen.communicate``'s ``(stdout, stderr)``."""
        self.wait(timeout)
        return self.output()

    def output(self):
        """``(stdout, stderr)`` as text (stderr ``""`` when merged into stdout); the folder is removed."""
        out = open(self._out, errors="replace").read()
        err = "" if self._err == self._out else open(self._err, errors="replace").read()
        self._tmp.cleanup()
        return out, err


def runs_warm(cmd: Sequence, env=None) -> bool:
    """Whether :func:`start` runs ``cmd`` (in ``env``, default this process's) from the warm interpreter."""
    return _plan([str(c) for c in cmd], _command_env(env)) is not None


def start(cmd: Sequence, env=None, cwd=None, input: Optional[str] = None, merge: bool = False) -> Started:
    """Start ``cmd`` (warm where :func:`_plan` allows); ``merge``: its stderr into its stdout."""
    return Started(cmd, env=env, cwd=cwd, input=input, merge=merge)


def run(
    cmd: Sequence,
    *,
    env=None,
    cwd=None,
    input: Optional[str] = None,
    timeout=None,
    merge: bool = False,
    check: bool = False,
    capture_output: bool = True,
    text: bool = True,
):
    """``subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, input=input, timeout=timeout,
    check=check)`` (``merge``: ``stderr=STDOUT``), warm where :func:`_plan` allows. ``capture_output`` and
    ``text`` are accepted for ``subprocess.run``'s calls and must be true."""
    assert capture_output and text, "warm.run captures the output as text"
    started = start(cmd, env=env, cwd=cwd, input=input, merge=merge)
    began = time.time()
    try:
        started.wait(timeout)
    except subprocess.TimeoutExpired:
        started.kill()
        out, err = started.output()
        raise subprocess.TimeoutExpired(started.args, timeout, output=out, stderr=err) from None
    out, err = started.output()
    if os.environ.get(LOG_ENV):
        with open(os.environ[LOG_ENV], "a") as f:
            f.write(
                f"{time.time() - began:.1f}\t{'warm' if started.warm else 'fresh'}\t{' '.join(started.args[1:8])}\n"
            )
    done = subprocess.CompletedProcess(started.args, started.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def context():
    """multiprocessing's context for a test's worker processes: the fork server (torch imported, one OpenMP
    thread), or ``spawn`` with ``STABLEMOE_TEST_COLD=1``."""
    if os.environ.get(COLD_ENV) == "1":
        return multiprocessing.get_context("spawn")
    return _fork_context()


def warm_up() -> None:
    """Start the fork server now (a session fixture does, while the first test sets up)."""
    _fork_context()
