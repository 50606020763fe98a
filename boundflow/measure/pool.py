"""Worker processes for building and measuring: TVM's ``PopenPoolExecutor`` (the pool
MetaSchedule uses), which kills a worker that passes its timeout or dies and starts a fresh
one, so one bad candidate never stops the batch."""

from __future__ import annotations

import time
import traceback
from concurrent.futures import Future
from typing import Any, Callable

from boundflow.errors import BoundFlowError


class Pool:
    """Lazily started ``PopenPoolExecutor`` with ``n_workers`` workers and a per-call
    ``timeout_s``."""

    def __init__(self, n_workers: int = 1, timeout_s: float = 120.0):
        if n_workers < 1:
            raise BoundFlowError(f"need at least one worker, not {n_workers}")
        self.n_workers, self.timeout_s = n_workers, timeout_s
        self._executor = None

    def submit(self, fn: Callable, *args: Any) -> Future:
        if self._executor is None:
            from tvm.support.popen_pool import PopenPoolExecutor

            self._executor = PopenPoolExecutor(max_workers=self.n_workers,
                                               timeout=self.timeout_s)
        return self._executor.submit(fn, *args)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def stop(self, futures: list[Future], wait_s: float = 10.0) -> None:
        """Stop the calls of ``futures`` now: kill the worker processes (and their children)
        until each of them is done (the executor's thread then sees its worker die, and
        starts a fresh one on the next call). A call submitted a moment ago may not have
        started its process yet: it is killed as soon as it has, for up to ``wait_s``."""
        from tvm.support.popen_pool import kill_child_processes

        ex, end = self._executor, time.monotonic() + wait_s
        while ex is not None and not all(f.done() for f in futures) \
                and time.monotonic() < end:
            for w in list(getattr(ex, "_worker_map", {}).values()):
                proc = getattr(w, "_proc", None)
                if proc is not None and proc.poll() is None:
                    try:
                        kill_child_processes(proc.pid)
                        proc.kill()
                    except Exception:   # noqa: BLE001 - gone meanwhile
                        pass
            time.sleep(0.02)


def failure(error: BaseException, timeout_s: float) -> tuple[str, str]:
    """The (error kind, message) a worker failure is recorded with."""
    if isinstance(error, TimeoutError):
        return "timeout", f"no result within {timeout_s:g} s; the worker was killed"
    if isinstance(error, ChildProcessError):
        return "crash", "the worker process died (segfault, abort, or killed for memory)"
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
