"""The end of a tuning run: the best candidate and the default path of ``verify`` measured
together in one runner pass, the best-plan record written with that comparison, the report.

The search measured each candidate once, at its own moment; a machine's load moves between
moments, so the comparison that decides what ``verify --db`` runs is made again, side by side:
``LocalRunner.compare`` times the baseline and the best candidate interleaved in one worker.
Which plan is compared is decided side by side too: the search's ``FINALISTS`` best candidates
are timed with the default path in one interleaved pass, and the fastest there goes on
(:func:`_finalist`). On a loaded machine one plan measured twice, minutes apart, differs by
20-50%, so the best of many single measurements is as often the luckiest plan as the
fastest.
The plan replaces the default path only if it beats it clearly: in objective and by 3% of
time (:func:`~boundflow.search.objective.beats_default`), and in most of the
interleaved timing rounds (``WINS``); and it must do so again in a second, independent pass
(``CONFIRM`` passes in all), so that a tie within the noise, which one pass can read as a win,
never hands over a plan. The record keeps the comparison of the pass least favourable to the
plan (``Database.set_best(..., baseline_value=...)``); when the plan did
not beat the default, the default path itself is recorded as the best, and verification runs
it (:func:`boundflow.search.lookup.tuned_plan`).
"""

from __future__ import annotations

import inspect
import math
import time
from typing import TYPE_CHECKING

from boundflow.measure import MeasureResult
from boundflow.search.objective import beats_default

WINS = 0.7          # of the interleaved rounds, the share the plan must be faster in
CONFIRM = 2         # independent interleaved passes the plan must win, each on its own
FINALISTS = 3       # the search's best candidates timed together before one is confirmed

if TYPE_CHECKING:
    from boundflow.search.tuner import Tuner, TuneReport


def build(tuner: "Tuner", inputs: list, seconds: float | None = None) -> list:
    """The tuner's builder on ``inputs``; with ``seconds``, compiles still running then are
    stopped (``BuildResult.cut``) where the builder can be told."""
    if seconds is not None and "seconds" in inspect.signature(tuner.builder.build).parameters:
        return tuner.builder.build(inputs, seconds=seconds)
    return tuner.builder.build(inputs)


def compare(tuner: "Tuner", candidates: list[tuple], config=None,
            seconds: float | None = None) -> list[MeasureResult]:
    """``candidates`` ((bundle, backend) pairs) measured in one runner pass under ``config``
    (default: the tuner's ``final_config``), interleaved where the runner can (``compare``),
    else one after the other. ``seconds``: how long their compiles may take, where the
    builder can be told (a compile cut then fails every one of them)."""
    inputs = [tuner._input(b, backend) for b, backend in candidates]
    builds = build(tuner, inputs, seconds)
    together = getattr(tuner.runner, "compare", None)
    if together is not None:
        return together(inputs, builds, config or tuner.final_config)
    return tuner.runner.run(inputs, builds)


def report(tuner: "Tuner", history: dict, by_cand: dict, before: int, curve: list,
           start: float) -> "TuneReport":
    from boundflow.search.tuner import TuneReport

    objective, base = tuner.objective, tuner.baseline
    best_c = tuner._best(history) or base
    bundle = bundle_of(tuner, best_c, by_cand)
    search_default, search_best = history[base], history.get(best_c)
    ranked = finalists(tuner, history) if best_c != base else []
    if best_c == base:
        default = best = search_default
        value_d = value_b = objective.measured(default, default)
        kept = True
    else:
        best_c = _finalist(tuner, ranked, by_cand, best_c)
        bundle, search_best = bundle_of(tuner, best_c, by_cand), history.get(best_c)
        kept, default, best, value_d, value_b = _confirmed(tuner, bundle, best_c)
    if kept and math.isfinite(value_d):          # the default path is what verify should run
        tuner.db.set_best(tuner.baseline_bundle, objective.name, base[1], value_d,
                          baseline_value=value_d, best_s=default.median_s,
                          baseline_s=default.median_s)
    elif not kept:
        tuner.db.set_best(bundle, objective.name, best_c[1], value_b, baseline_value=value_d,
                          best_s=best.median_s, baseline_s=default.median_s)
    if best_c == base:
        desc = f"the default path of verify ({base[1]}: the default plan)"
    elif best_c in by_cand:
        desc = tuner.space.describe(by_cand[best_c])
    else:
        desc = f"plan {best_c[0][:12]} on {best_c[1]} (from another run)"
    now = tuner._measured_now
    first = None if tuner._first is None else tuner._first - start
    return TuneReport(tuner.workload, objective.name, default, best, bundle, desc,
                      tuner.baseline_bundle, now, before, curve, time.monotonic() - start,
                      max(0, len(history) - before - now), tuner._run_id,
                      best_backend=best_c[1], default_backend=base[1], kept_default=kept,
                      search_default=search_default, search_best=search_best,
                      cost_model=tuner.ranker.choice.describe(), first_measurement_s=first,
                      finalists=tuple(c[0] for c in ranked), held=tuple(tuner._held_curve),
                      challenges=tuner._challenges)


def finalists(tuner: "Tuner", history: dict) -> list[tuple]:
    """The search's ``FINALISTS`` best candidates (not the baseline), best first: the plan it
    holds (which won its challenges side by side), then the best measured that no challenge
    ruled out."""
    value = {c: tuner.objective.measured(r, tuner.reference) for c, r in history.items()
             if c != tuner.baseline and c not in tuner._lost and c not in tuner._unmapped}
    ranked = sorted((c for c, v in value.items() if math.isfinite(v)), key=value.get)
    held = tuner._held
    if held in value:
        ranked = [held] + [c for c in ranked if c != held]
    return ranked[:FINALISTS]


def _finalist(tuner: "Tuner", ranked: list[tuple], by_cand: dict, best_c: tuple) -> tuple:
    """The candidate to confirm against the default path: of the search's best few
    (``ranked``), the one best in a pass timing them all with the default path, interleaved
    (``best_c``, the search's best, when there is one finalist or that pass fails)."""
    if len(ranked) < 2:
        return best_c
    res = compare(tuner, [(tuner.baseline_bundle, tuner.baseline[1])] +
                  [(bundle_of(tuner, c, by_cand), c[1]) for c in ranked])
    if not res[0].ok:
        return best_c
    values = [tuner.objective.measured(r, res[0]) for r in res[1:]]
    i = min(range(len(values)), key=values.__getitem__)
    return ranked[i] if math.isfinite(values[i]) else best_c


def _confirmed(tuner: "Tuner", bundle, best_c: tuple):
    """``(kept, default, best, value_d, value_b)``: the best candidate against the default
    path in up to ``CONFIRM`` interleaved passes, stopping at the first it does not win;
    ``kept`` (the default stays) unless it won them all. The results are those of the pass
    least favourable to the plan."""
    objective, base = tuner.objective, tuner.baseline
    worst = None
    for _ in range(CONFIRM):
        default, best = compare(tuner, [(tuner.baseline_bundle, base[1]), (bundle, best_c[1])])
        value_d = objective.measured(default, default)
        value_b = objective.measured(best, default)
        won = beats_default(value_b, value_d, best.median_s, default.median_s) and \
            wins(best, default)
        ratio = (default.median_s or 0.0) / best.median_s if best.median_s else 0.0
        if worst is None or ratio < worst[0]:
            worst = (ratio, default, best, value_d, value_b)
        if not won:
            return (True, default, best, value_d, value_b)
    return (False, *worst[1:])


def wins(best: MeasureResult, default: MeasureResult) -> bool:
    """Whether ``best`` was faster than ``default`` in at least ``WINS`` of the timing rounds
    they shared (paired by round, as ``compare`` interleaves them)."""
    pairs = list(zip(best.times, default.times))
    if len(pairs) < 3:
        return True                 # too few rounds to say more than the medians do
    return sum(b < d for b, d in pairs) >= math.ceil(WINS * len(pairs))


def bundle_of(tuner: "Tuner", c: tuple, by_cand: dict):
    if c == tuner.baseline:
        return tuner.baseline_bundle
    if c in by_cand:
        return tuner.space.bundle(by_cand[c])
    (rec,) = tuner.db.candidates(tuner.workload, keys=[c[0]])      # measured by another run
    from boundflow.planner import check_plan

    return check_plan(tuner.graph, rec.bundle())      # a database row is data: re-planned
