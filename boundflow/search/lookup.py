"""Verification time: the tuned plan of a workload, from the tuning database, or why none.

A best-plan record is used only if it beat the default path of ``verify`` (the default plan on
the torch backend) measured with it in the tuner's final runner pass, in objective and by 3% of
time (:func:`~boundflow.search.objective.beats_default`); a record that did not, or that was
never compared with it (recorded from measurements alone, or by an older BoundFlow), is
refused, and :func:`describe_missing` says why in one line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from boundflow.ir.plan import PlanBundle
from boundflow.ir.workload import Workload


@dataclass(frozen=True)
class TunedPlan:
    bundle: PlanBundle
    backend: str
    objective: str
    median_s: float | None     # its whole call, in the tuner's final pass
    lookup_seconds: float      # opening the database, finding and parsing the plan
    default_s: float | None = None      # the default path's, in the same pass

    @property
    def speedup(self) -> float | None:
        """The default path's time over this plan's, measured together."""
        return self.default_s / self.median_s if self.default_s and self.median_s else None


@dataclass(frozen=True)
class Lookup:
    """The outcome of a lookup: the plan to run, or None and the reason (one line)."""

    tuned: TunedPlan | None
    reason: str


def _where(db) -> str:
    return str(db) if isinstance(db, (str, Path)) else getattr(db, "url", "the database")


def _describe(w: Workload, objective: str) -> str:
    side = "" if w.upper else " (lower bounds)"
    return (f"{w.method}{side}, batch {w.batch}, {w.n_specs} specs, {w.dtype}, {w.target}; "
            f"objective {objective}")


def lookup(db, workload: Workload, objective: str = "time@width") -> Lookup:
    """The tuned plan of ``workload`` under ``objective`` (``db``: a
    :class:`~boundflow.db.Database`, a path or a URL), or None with the reason: no record,
    a record never compared with the default path, or one that was not faster than it. An
    objective that is not one of the valid forms raises
    :class:`~boundflow.search.ObjectiveError` (rather than finding nothing); it is looked up
    by its canonical name (``time@mem:1e6`` is ``time@mem:1000000``)."""
    from boundflow.db import Database
    from boundflow.search.objective import Objective, beats_default

    objective = Objective.parse(objective).name
    start = time.perf_counter()
    own = not isinstance(db, Database)
    database = Database(db, existing=True) if own else db
    both_sides = None        # a miss of a verdict's workload: was it tuned for both sides?
    try:
        rec = database.best_plan(workload, objective=objective)
        if rec is None and not workload.upper:
            both_sides = database.best_plan(replace(workload, bounds="both"),
                                            objective=objective)
    finally:
        if own:
            database.close()
    what = f"({_describe(workload, objective)}) in {_where(db)}"
    if rec is None:
        hint = "" if both_sides is None else (
            " (a plan tuned for both sides of the bounds is recorded: BoundFlow before "
            "2026-11-27 tuned verdicts that way; run `boundflow tune` again to tune the lower "
            "side verify reads)")
        return Lookup(None, f"no tuned plan for this workload {what}{hint}: using the "
                            f"default plan")
    if not rec.compared:
        return Lookup(None, f"the tuned plan for this workload {what} is refused: it was "
                            f"never measured against the default path (recorded by "
                            f"measurements alone or an older BoundFlow; run `boundflow tune` "
                            f"again): using the default plan")
    if not beats_default(rec.value, rec.baseline_value, rec.best_s, rec.baseline_s):
        if rec.value == rec.baseline_value and rec.best_s == rec.baseline_s:
            return Lookup(None, f"tuning found no plan faster than the default path for this "
                                f"workload {what}: using the default plan")
        times = ""
        if rec.best_s and rec.baseline_s:
            times = (f" ({rec.best_s * 1e3:.3f} ms against {rec.baseline_s * 1e3:.3f} ms, "
                     f"measured together)")
        return Lookup(None, f"the tuned plan for this workload {what} is refused: it was "
                            f"not faster than the default path{times}: using the default plan")
    bundle = rec.candidate.bundle()
    tuned = TunedPlan(bundle, rec.backend, objective, rec.best_s,
                      time.perf_counter() - start, rec.baseline_s)
    return Lookup(tuned, "")


def tuned_plan(db, workload: Workload, objective: str = "time@width") -> TunedPlan | None:
    """The tuned plan of ``workload`` under ``objective``, or None (see :func:`lookup`; the
    reason is :func:`describe_missing`)."""
    return lookup(db, workload, objective).tuned


def describe_missing(db, workload: Workload, objective: str) -> str:
    """The one-line notice when :func:`tuned_plan` found no plan to use: why."""
    return lookup(db, workload, objective).reason or \
        f"a tuned plan was found for this workload in {_where(db)}"


def describe_best(db, workload: Workload, objective: str = "time@width") -> str | None:
    """One line on the best-plan record (for ``db show``): its plan, backend, and its time
    against the default path measured in the same runner pass; None when there is none."""
    rec = db.best_plan(workload, objective=objective)
    if rec is None:
        return None
    line = f"best ({objective}): {rec.candidate.key[:12]} on {rec.backend}"
    if not rec.compared:
        return line + " (never measured against the default path: not used by verify)"
    if rec.speedup:
        line += (f", {rec.best_s * 1e3:.3f} ms vs default path {rec.baseline_s * 1e3:.3f} ms "
                 f"in the same pass ({rec.speedup:.2f}x)")
    from boundflow.search.objective import beats_default

    return line + ("" if beats_default(rec.value, rec.baseline_value, rec.best_s,
                                       rec.baseline_s) else
                   ": not faster, verify runs the default path")
