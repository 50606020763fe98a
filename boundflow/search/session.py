"""What a tuning run keeps alive beside its loop: the progress bar and the heartbeat."""

from __future__ import annotations

import math
import threading

from boundflow.db import Database
from boundflow.errors import BoundFlowError, DatabaseError
from boundflow.ir.workload import Workload
from boundflow.measure import MeasureResult


class Progress:
    """A rich progress bar with the best time so far (nothing when disabled). Its ratio to
    the default path is of single measurements taken minutes apart, so it says
    ``unconfirmed``: the report's ratio comes from the final side-by-side pass
    (:mod:`boundflow.search.final`)."""

    def __init__(self, enabled: bool, total: int, done: int, workload: Workload,
                 is_time: bool = True):
        self.bar, self.is_time = None, is_time
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, \
            TimeElapsedColumn

        self.bar = Bar(TextColumn("tuning {task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[best]}"),
                            TimeElapsedColumn(), transient=False)
        self.task = self.bar.add_task(f"{workload.method} batch {workload.batch}", total=total,
                                      completed=done, best="")
        self.bar.start()

    def update(self, done: int, best: float, reference: MeasureResult | None) -> None:
        if self.bar is None:
            return
        text = ""
        if math.isfinite(best) and not self.is_time:
            text = f"best objective {best:.4f}"
        elif math.isfinite(best):
            ms = math.exp(best) * 1e3
            text = f"best {ms:.3f} ms"
            if reference is not None and reference.median_s:
                text += f" ({reference.median_s * 1e3 / ms:.2f}x the default, unconfirmed)"
        self.bar.update(self.task, completed=done, best=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class Heartbeat:
    """A daemon thread that tells the database, every ``timeout / 4`` seconds, that run
    ``run_id`` is alive; ``check()`` raises once the database says the run is not running
    (it was found dead and its plans handed to other runs). With no database (a private
    in-memory one, which no other process sees) it does nothing."""

    def __init__(self, db: Database | None, run_id: int, timeout: float):
        self.db, self.run_id, self.timeout = db, run_id, timeout
        self.lost = False
        self._stop = threading.Event()
        self._thread = None
        if db is not None:
            self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id}",
                                            daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            try:
                if not self.db.heartbeat(self.run_id):
                    self.lost = True
                    return
            except BoundFlowError:
                pass                    # unreachable for now: the next beat tries again

    def check(self) -> None:
        if self.lost:
            raise DatabaseError(f"tuning run {self.run_id} was found dead (no heartbeat for "
                                f"more than {self.timeout:g} s) and its plans handed to other "
                                f"runs; stopping")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
