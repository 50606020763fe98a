"""Worker processes for building and measuring: TVM's ``PopenPoolExecutor`` (the pool
MetaSchedule uses), which kills a worker that passes its timeout or dies and starts a fresh
one, so one bad candidate never stops the batch."""

from __future__ import annotations

import os
import time
import traceback
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

from boundflow.errors import BoundFlowError


# What the worker processes print (TVM's warnings, a crash's last words, the traceback of a
# Ctrl-C that reached a worker as it started) goes here, under the cache folder, not to the
# terminal: a plan's error comes back through the pool and is recorded with its measurement.
# Started afresh (the old one kept as ``.1``) once it passes LOG_BYTES.
LOG_NAME = "measure-workers.log"
LOG_BYTES = 4 << 20


def worker_log() -> Path:
    """The workers' log file (see :data:`LOG_NAME`)."""
    from boundflow.backend.base import cache_root

    return cache_root() / "logs" / LOG_NAME


def _open_log():
    """The workers' log, opened for appending (None where it cannot be: then they print to
    this process's stderr, as before)."""
    path = worker_log()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size > LOG_BYTES:
            os.replace(path, path.with_name(LOG_NAME + ".1"))
        return open(path, "ab", buffering=0)
    except OSError:
        return None


class Pool:
    """Lazily started ``PopenPoolExecutor`` with ``n_workers`` workers and a per-call
    ``timeout_s``; the workers' output goes to :func:`worker_log`."""

    def __init__(self, n_workers: int = 1, timeout_s: float = 120.0):
        if n_workers < 1:
            raise BoundFlowError(f"need at least one worker, not {n_workers}")
        self.n_workers, self.timeout_s = n_workers, timeout_s
        self._executor = None
        self._log = None

    def submit(self, fn: Callable, *args: Any) -> Future:
        if self._executor is None:
            from tvm.support.popen_pool import PopenPoolExecutor

            self._log = self._log or _open_log()
            self._executor = PopenPoolExecutor(max_workers=self.n_workers,
                                               timeout=self.timeout_s, stdout=self._log,
                                               stderr=self._log)
        return self._executor.submit(fn, *args)

    def close(self) -> None:
        """Kill the workers and shut the executor down, without waiting. TVM's ``shutdown``
        can raise (``PopenWorker.kill`` races the pool thread that clears ``_proc``: an
        AttributeError after Ctrl-C) with its lock held, and the pool thread then hung the
        interpreter's exit for good: the workers are killed first, and such a shutdown is
        finished here."""
        ex, self._executor = self._executor, None
        if ex is not None:
            self._shutdown(ex)
        if self._log is not None:   # the workers hold their own copies of the descriptor
            self._log.close()
            self._log = None

    @staticmethod
    def _shutdown(ex: Any) -> None:
        _kill_workers(ex)
        try:
            ex.shutdown(wait=False)
        except Exception:   # noqa: BLE001 - TVM's race: release its lock, finish the shutdown
            lock = getattr(ex, "_lock", None)
            if lock is not None and lock.locked():
                try:
                    lock.release()
                except RuntimeError:
                    pass
            _kill_workers(ex)
            pool = getattr(ex, "_threadpool", None)
            if pool is not None:
                pool.shutdown(wait=False)
            ex._shutdown = True

    def stop(self, futures: list[Future], wait_s: float = 10.0) -> None:
        """Stop the calls of ``futures`` now: kill the worker processes (and their children)
        until each of them is done (the executor's thread then sees its worker die, and
        starts a fresh one on the next call). A call submitted a moment ago may not have
        started its process yet: it is killed as soon as it has, for up to ``wait_s``."""
        ex, end = self._executor, time.monotonic() + wait_s
        while ex is not None and not all(f.done() for f in futures) \
                and time.monotonic() < end:
            _kill_workers(ex)
            time.sleep(0.02)


def _kill_workers(ex: Any) -> None:
    """Kill the worker processes of executor ``ex`` (and their children) that still run."""
    from tvm.support.popen_pool import kill_child_processes

    for w in list(getattr(ex, "_worker_map", {}).values()):
        proc = getattr(w, "_proc", None)
        if proc is not None and proc.poll() is None:
            try:
                kill_child_processes(proc.pid)
                proc.kill()
            except Exception:   # noqa: BLE001 - gone meanwhile
                pass


def failure(error: BaseException, timeout_s: float) -> tuple[str, str]:
    """The (error kind, message) a worker failure is recorded with. An interrupt (Ctrl-C,
    ``KeyboardInterrupt``, or ``SystemExit``), the parent's or a worker's, is no failure of
    the plan: it is raised again, so the tune stops and records nothing for it."""
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        raise error
    if isinstance(error, TimeoutError):
        return "timeout", f"no result within {timeout_s:g} s; the worker was killed"
    if isinstance(error, ChildProcessError):
        return "crash", (f"the worker process died (segfault, abort, or killed for memory; "
                         f"what it printed is in {worker_log()})")
    if isinstance(error, MemoryError):
        # the worker pool sends the traceback as the message: its last line is the error
        lines = [line for line in str(error).splitlines() if line.strip()]
        last = lines[-1].removeprefix("MemoryError: ").strip() if lines else ""
        return "memory", f"out of memory: {last}" if last else "out of memory"
    from boundflow.errors import MeasureError, UnsupportedOpError
    from boundflow.measure.result import WorkerError

    if isinstance(error, WorkerError):
        return "run", str(error)
    kind = "unsupported" if isinstance(error, (MeasureError, UnsupportedOpError)) else "run"
    lines = traceback.format_exception_only(type(error), error)
    return kind, "".join(lines).strip()
