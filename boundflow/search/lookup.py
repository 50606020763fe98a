"""Verification time: the tuned plan of a workload, from the tuning database."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from boundflow.ir.plan import PlanBundle
from boundflow.ir.workload import Workload


@dataclass(frozen=True)
class TunedPlan:
    bundle: PlanBundle
    backend: str
    objective: str
    median_s: float | None     # as measured when tuned
    lookup_seconds: float      # opening the database, finding and parsing the plan


def tuned_plan(db, workload: Workload, objective: str = "time@width") -> TunedPlan | None:
    """The best plan recorded for ``workload`` under ``objective`` (``db``: a
    :class:`~boundflow.db.Database`, a path or a URL), or None. An objective that is not one
    of the valid forms raises :class:`~boundflow.search.ObjectiveError` (rather than finding
    nothing); it is looked up by its canonical name (``time@mem:1e6`` is
    ``time@mem:1000000``)."""
    from boundflow.db import Database
    from boundflow.search.objective import Objective

    objective = Objective.parse(objective).name
    start = time.perf_counter()
    own = not isinstance(db, Database)
    database = Database(db) if own else db
    try:
        rec = database.best(workload, objective=objective)
    finally:
        if own:
            database.close()
    if rec is None:
        return None
    bundle = rec.candidate.bundle()
    return TunedPlan(bundle, rec.measurement.result.backend, objective,
                     rec.measurement.result.median_s, time.perf_counter() - start)


def describe_missing(db, workload: Workload, objective: str) -> str:
    """The one-line notice when there is no tuned plan."""
    where = db if isinstance(db, (str, Path)) else getattr(db, "url", "the database")
    return (f"no tuned plan for this workload ({workload.method}, batch "
            f"{workload.batch}, {workload.n_specs} specs, {workload.dtype}, {workload.target}; "
            f"objective {objective}) in {where}: using the default plan")
