"""A hard wall-clock limit for one command: the work runs in a forked child, the parent waits.

A limit checked between steps cannot interrupt a step (a model load, a TVM compile, a
bound computation inside native code), and a watchdog thread cannot run while native code
holds the interpreter lock. So :func:`run_with_deadline` forks before anything heavy is
imported: the child does the work, writing its standard output and standard error into two
pipes; in a process that already runs threads (torch's thread pools: a forked child of such
a process can deadlock) the command runs instead as a fresh ``python -m boundflow.cli``
process. Either way the child leads a process group of its own, so whatever it started dies
with it; the parent passes standard error on as it comes (notices, progress), keeps standard
output until the child has finished and then relays it, or kills the child at the deadline
and answers for it. A half-printed result therefore never reaches the user. Where ``fork``
does not exist the work runs in-process and only the between-steps checks apply.
"""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence


_SUPERVISED = "BOUNDFLOW_DEADLINE_PARENT"     # set for a spawned child: its parent's pid


def run_with_deadline(work: Callable[[], int], argv: Sequence[str], deadline: float,
                      on_timeout: Callable[[], int], *, spawn: bool | None = None) -> int:
    """Run ``work()`` (returning an exit status; the same as ``boundflow *argv``) and return
    its status, or ``on_timeout()``'s when the monotonic clock passes ``deadline`` first (the
    child's process group is killed then). A child that dies of a signal is reported on one
    line with status 2. ``spawn`` forces running ``boundflow *argv`` in a fresh process (True)
    or forking (False); by default a process that runs threads spawns."""
    if not hasattr(os, "fork") or os.environ.get(_SUPERVISED) == str(os.getppid()):
        return work()                      # no fork here, or our parent keeps the deadline
    sys.stdout.flush()
    sys.stderr.flush()
    if spawn if spawn is not None else not _single_threaded():
        pid, out_r, err_r = _spawn(argv)
    else:
        pid, out_r, err_r = _fork(work)
    try:
        done = _collect(out_r, err_r, pid, deadline)
    except BaseException:                                  # Ctrl-C: take the child along
        _kill(pid)
        raise
    finally:
        os.close(out_r)
        os.close(err_r)
    if done is None:
        _kill(pid)
        return on_timeout()
    output, wait_status = done
    sys.stdout.write(output.decode(errors="replace"))
    sys.stdout.flush()
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        print(f"boundflow: error: the verification process died of signal {sig} "
              f"({signal.Signals(sig).name})", file=sys.stderr)
        return 2
    return os.WEXITSTATUS(wait_status)


def _single_threaded() -> bool:
    """Whether forking is safe: no thread but this one, and no library loaded whose thread
    pools or locks a child would inherit half-initialised (torch, TVM)."""
    if any(m in sys.modules for m in ("torch", "tvm", "tvm_ffi")):
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return True


def _fork(work: Callable[[], int]) -> tuple[int, int, int]:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                           # the child
        os.close(out_r)
        os.close(err_r)
        os.setpgid(0, 0)
        _child(work, out_w, err_w)
    os.close(out_w)
    os.close(err_w)
    return pid, out_r, err_r


def _spawn(argv: Sequence[str]) -> tuple[int, int, int]:
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env[_SUPERVISED] = str(os.getpid())
    proc = subprocess.Popen([sys.executable, "-m", "boundflow.cli", *argv], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    out_r, err_r = os.dup(proc.stdout.fileno()), os.dup(proc.stderr.fileno())
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = 0                 # reaped by os.waitpid here, not by Popen
    return proc.pid, out_r, err_r


def _child(work: Callable[[], int], out_fd: int, err_fd: int) -> None:
    """Run ``work`` with Python's standard streams on the two pipes; never returns."""
    status = 1
    try:
        sys.stdout = io.TextIOWrapper(io.FileIO(out_fd, "w"), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(err_fd, "w"), write_through=True)
        status = work()
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    except BaseException:                                  # keep Python's usual report
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def _collect(out_fd: int, err_fd: int, pid: int, deadline: float
             ) -> tuple[bytes, int] | None:
    """What the child ``pid`` wrote to ``out_fd`` and its wait status once it has exited
    (``err_fd`` is passed on to ``sys.stderr`` meanwhile), or None at the deadline. The
    child's exit is polled as well as the pipes' ends, since a process it started (a
    compiler, a pool worker) may hold the pipes open after it is gone."""
    chunks: list[bytes] = []
    open_fds = [out_fd, err_fd]

    def read(timeout: float) -> None:
        for fd in select.select(open_fds, [], [], timeout)[0] if open_fds else ():
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                open_fds.remove(fd)
            elif fd == out_fd:
                chunks.append(chunk)
            else:
                sys.stderr.write(chunk.decode(errors="replace"))
                sys.stderr.flush()

    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            while open_fds and select.select(open_fds, [], [], 0)[0]:
                read(0)                                    # drain what is buffered
            return b"".join(chunks), status
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if open_fds:
            read(min(left, 0.05))
        else:
            time.sleep(min(left, 0.02))


def _kill(pid: int) -> None:
    """Kill the child's process group (what it started too), and reap the child."""
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
