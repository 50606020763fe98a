"""The tuner loop: propose → claim → build → measure → record → refit, in rounds.

``Tuner(graph, lower, upper, C, method=..., db=...)`` tunes the workload of that query (batch,
specs, method, dtype, target) on one backend. Each round the strategy proposes a batch of
unmeasured plans (scored by the cost model), the run claims them in the database, the builder
and runner measure the ones it got in worker processes, every result goes into the database
with its features (failures too, with their error), and the XGBoost cost model is refitted on
every record in the database and saved into it. The default plan is measured first: it is the
reference of the tightness floor and of the final comparison.

After the default, the backend's schedule presets on the default plan are measured first
(``TuneSpace.seeds``), as MetaSchedule and Ansor seed their searches with rule-based
schedules; the strategy proposes the rest.

``trials`` is the budget of plans for this workload, backend and machine *in the database*:
running the same command again after an interruption continues where it stopped, and a plan
already measured is never measured again. ``seconds`` bounds one run's wall time.

Several tuners may tune one workload at once (processes on this machine, or on machines that
share a PostgreSQL database): each round's plans are claimed atomically against the budget
(``Database.claim``), so no plan is measured twice on one machine and together they stop at
``trials`` plans; a run that has measured its share waits while other live runs still measure
the last plans (should one die, its plans come back). A heartbeat thread keeps the run alive
in the database, every ``heartbeat_timeout / 4`` seconds, however long a candidate takes; a run
killed without a word is found dead once its heartbeat is ``heartbeat_timeout`` old (at once,
by a run on the same machine) and its claims go back to the others.

Objectives: see ``objective.py``. The best plan under the objective is recorded in the database
under the objective's name, which is what ``verify --db`` looks up.
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from boundflow.costmodel.features import FEATURE_VERSION, features
from boundflow.costmodel.model import HEADS, XGBCostModel, targets
from boundflow.db import DEFAULT_HEARTBEAT_TIMEOUT, Database
from boundflow.errors import BoundFlowError, DatabaseError
from boundflow.ir.graph import Graph
from boundflow.ir.plan import PlanBundle
from boundflow.ir.workload import Workload
from boundflow.measure import LocalBuilder, LocalRunner, MeasureConfig, MeasureInput, \
    MeasureResult
from boundflow.measure.result import machine
from boundflow.planner.passes import normalised
from boundflow.search.objective import Objective, ObjectiveError  # noqa: F401 - re-exported
from boundflow.search.space import Assignment, TuneSpace
from boundflow.search.strategies import make

COST_MODEL = "xgb-cost-model"
DEFAULT_OBJECTIVE = "time@width"


def _whole(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass
class TuneReport:
    workload: Workload
    objective: str
    default: MeasureResult
    best: MeasureResult
    best_bundle: PlanBundle
    best_description: str
    default_bundle: PlanBundle
    measured_now: int                  # plans this run measured
    measured_before: int               # plans in the database when it started (any run's)
    curve: list[tuple[int, float]] = field(default_factory=list)   # (trial, best objective)
    seconds: float = 0.0
    measured_by_others: int = 0        # plans other runs measured while this one ran
    run_id: int | None = None


class Tuner:
    """See the module docstring. ``callbacks`` are called after every round with
    ``(tuner, assignments, results)``. ``heartbeat_timeout``: seconds after which a run that
    has not said it is alive is dead (its claims go to other runs); the run says so every
    quarter of it, from a thread, so it need not exceed a candidate's ``timeout_s``."""

    def __init__(self, graph: Graph, lower: np.ndarray, upper: np.ndarray,
                 C: np.ndarray | None, *, method: str, db: Database,
                 strategy: str = "cpsat", backend: str = "relax", target: str = "llvm",
                 objective: str | Objective = DEFAULT_OBJECTIVE, dtype: str | None = None,
                 config: MeasureConfig = MeasureConfig(), batch_size: int = 8, seed: int = 0,
                 epsilon: float = 0.1, builder=None, runner=None, progress: bool = True,
                 callbacks: Sequence[Callable[..., Any]] = (),
                 heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT, **strategy_options: Any):
        if not (isinstance(heartbeat_timeout, (int, float)) and
                math.isfinite(heartbeat_timeout) and heartbeat_timeout > 0):
            raise BoundFlowError(f"heartbeat_timeout must be a number of seconds > 0, not "
                                 f"{heartbeat_timeout!r}")
        if not _whole(batch_size) or batch_size < 1:
            raise BoundFlowError(f"batch_size must be a whole number >= 1, not {batch_size!r}")
        self.graph = graph
        self.lower, self.upper = np.asarray(lower), np.asarray(upper)
        self.C = None if C is None else np.asarray(C)
        n_specs = 0 if self.C is None else int(self.C.shape[1])
        self.workload = Workload.of(graph, batch=int(self.lower.shape[0]), n_specs=n_specs,
                                    method=method, dtype=dtype, target=target)
        self.db, self.backend = db, backend
        self.machine = machine()             # what this host's measurements record
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.objective = objective if isinstance(objective, Objective) else \
            Objective.parse(objective)
        self.space = TuneSpace(graph, self.workload, backend)
        self.normalised, _ = normalised(graph)
        self.config, self.batch_size, self.progress = config, batch_size, progress
        self.builder = builder if builder is not None else LocalBuilder(timeout_s=config.timeout_s)
        self.runner = runner if runner is not None else LocalRunner(config)
        self.callbacks = list(callbacks)
        self.model = XGBCostModel(seed=seed)
        self.reference: MeasureResult | None = None
        self._ref_log_width: float | None = None
        self._run_id: int | None = None
        self._measured_now = 0
        self._mine: dict[str, MeasureResult] = {}
        self._unmapped: set[str] = set()
        if strategy == "cpsat" and self.objective.kind == "time@mem":
            strategy_options.setdefault("memory_budget", self.objective.memory_budget)
        self.strategy = make(strategy, self.space, seed=seed, epsilon=epsilon,
                             **strategy_options)
        self.strategy_name = strategy

    # -- the model ---------------------------------------------------------------------------
    def _features(self, bundles: Sequence[PlanBundle]) -> np.ndarray:
        return np.stack([features(b, self.normalised) for b in bundles])

    def score(self, assignments: Sequence[Assignment]) -> np.ndarray:
        """The model's predicted objective of each assignment (``inf`` when it does not
        plan)."""
        ok, bundles = [], []
        for i, a in enumerate(assignments):
            try:
                bundles.append(self.space.bundle(a))
                ok.append(i)
            except BoundFlowError:
                pass
        out = np.full(len(assignments), np.inf)
        if bundles:
            heads = self.model.predict(self._features(bundles))
            out[ok] = self.objective.predicted(heads, self._ref_log_width)
        return out

    def width_score(self, assignments: Sequence[Assignment]) -> np.ndarray:
        bundles = [self.space.bundle(a) for a in assignments]
        return self.model.predict(self._features(bundles))["log_width"]

    def refit(self) -> dict[str, float]:
        """Fit the cost model on every record in the database that has features of this
        version; saved into the database."""
        records = [r for r in self.db.records_for_training()
                   if r.candidate.features is not None
                   and len(r.candidate.features) == self.model.X.shape[1]]
        if not records:
            self._calibrate()
            return {}
        X = np.array([r.candidate.features for r in records])
        Y = {h: np.array([targets(r.measurement.result)[h] for r in records]) for h in HEADS}
        self.model.fit(X, Y)
        metrics = {"n_train": len(records), "heads": sorted(self.model.models)}
        self.db.save_cost_model(COST_MODEL, self.model.save(), FEATURE_VERSION, metrics)
        self._calibrate()
        return metrics

    def _calibrate(self) -> None:
        """The tightness floor in the model's own units: its predicted width of the default
        plan (the analytic model's widths are only relative)."""
        default = self.space.bundle(self.space.default())
        self._ref_log_width = float(self.model.predict(self._features([default]))["log_width"][0])

    # -- measuring ---------------------------------------------------------------------------
    def _measure(self, bundles: Sequence[PlanBundle]) -> list[MeasureResult]:
        """Build, run and record ``bundles`` (claimed by this run: each write releases its
        claim)."""
        inputs = [MeasureInput(b, self.graph, self.lower, self.upper, self.C, self.backend)
                  for b in bundles]
        builds = self.builder.build(inputs)
        results = self.runner.run(inputs, builds)
        feats = self._features(bundles)
        for b, r, f in zip(bundles, results, feats):
            self.db.add_measurement(b, r, features=f, graph=self.graph, run_id=self._run_id)
            self._measured_now += 1
            self._mine.setdefault(b.key, r)
        return results

    def _history(self) -> dict[str, MeasureResult]:
        """This workload's measurements on this backend and machine, by any run, by plan key
        (fastest kept); and whatever this run measured (a runner may record another
        machine: a plan is never proposed twice all the same)."""
        out: dict[str, MeasureResult] = dict(self._mine)
        for r in self.db.records_for_training(self.workload, include_failed=True):
            m = r.measurement.result
            if m.backend != self.backend or m.machine != self.machine:
                continue
            prev = out.get(r.candidate.key)
            if prev is None or (m.ok and (not prev.ok or m.median_s < prev.median_s)):
                out[r.candidate.key] = m
        return out

    def _claimed_by_others(self) -> set[str]:
        return {c.candidate_key for c in self.db.claims(self.workload)
                if c.run_id != self._run_id and c.backend == self.backend
                and c.machine == self.machine}

    def _learn(self, history: dict[str, MeasureResult], by_key: dict[str, Assignment]) -> None:
        """Map plans measured by earlier or other runs back to assignments (incumbents)."""
        new = [k for k in history if k not in by_key and k not in self._unmapped]
        if not new:
            return
        for c in self.db.candidates(self.workload, keys=new):
            a = self.space.assignment_of(c.bundle())
            if a is None:
                self._unmapped.add(c.key)
            else:
                by_key[c.key] = a

    def _wait(self, beat: "_Heartbeat", others: set[str], deadline: float | None) -> None:
        """Wait (the heartbeat goes on) until the plans other runs claim are not ``others``
        any more (one was measured, or its run finished or died), or ``deadline``."""
        while deadline is None or time.monotonic() < deadline:
            time.sleep(min(0.25, self.heartbeat_timeout / 8))
            beat.check()
            if self._claimed_by_others() != others:
                return

    def tune(self, trials: int = 32, seconds: float | None = None,
             stop: Callable[[float], bool] | None = None) -> TuneReport:
        """Measure until the workload has ``trials`` plans in the database (on this backend
        and machine, measured by any run), ``seconds`` pass, or ``stop(best objective so
        far)`` says so."""
        start = time.monotonic()
        if not _whole(trials) or trials < 1:
            raise BoundFlowError(f"trials must be a whole number >= 1, not {trials!r}")
        run_id = self.db.start_run(self.workload, self.strategy_name,
                                   {"trials": trials, "seconds": seconds,
                                    "objective": self.objective.name, "backend": self.backend,
                                    "batch_size": self.batch_size}, graph=self.graph,
                                   backend=self.backend, machine=self.machine,
                                   heartbeat_timeout=self.heartbeat_timeout)
        self._run_id, self._measured_now, self._mine = run_id, 0, {}
        beat = _Heartbeat(None if self.db.is_private else self.db, run_id,
                          self.heartbeat_timeout)
        status = "failed"
        try:
            report = self._tune(beat, trials, seconds, start, stop)
            status = "finished"
            return report
        finally:
            beat.stop()
            try:
                n_plans = len(self._history())
            except BoundFlowError:
                n_plans = self._measured_now
            self.db.finish_run(run_id, status, n_plans)

    def _tune(self, beat: "_Heartbeat", trials: int, seconds: float | None, start: float,
              stop: Callable[[float], bool] | None) -> TuneReport:
        default_a = self.space.default()
        default_b = self.space.bundle(default_a)
        history = self._history()
        before = len(history)
        # the default plan is the reference: the first run to claim it measures it, others wait
        # (it is measured even past the budget)
        while default_b.key not in history:
            if self.db.claim(self._run_id, [default_b.key]):
                self._measure([default_b])
            else:
                self._wait(beat, {default_b.key}, None)   # until its claim goes
            history = self._history()
        self.reference = history[default_b.key]
        if not self.reference.ok:
            raise BoundFlowError(f"the default plan failed to run ({self.reference.error_kind}: "
                                 f"{self.reference.error}); nothing to tune against")
        self._calibrate()
        by_key = {default_b.key: default_a}
        self._learn(history, by_key)                 # earlier runs' plans, as points
        self.refit()
        best = min((self.objective.measured(r, self.reference) for r in history.values()),
                   default=math.inf)
        curve: list[tuple[int, float]] = [(len(history), best)]
        progress = _Progress(self.progress, trials, len(history), self.workload,
                             self.objective.kind != "mix")
        try:
            while True:
                beat.check()
                if seconds is not None and time.monotonic() - start > seconds:
                    break
                if stop is not None and stop(best):
                    break
                claimed = self._claimed_by_others()
                others = claimed - history.keys()
                left = trials - len(history) - len(others)
                proposals = self._propose(min(self.batch_size, left), history, by_key,
                                          others) if left > 0 else []
                mine: list[tuple[Assignment, PlanBundle]] = []
                results: list[MeasureResult] = []
                if proposals:
                    bundles = [self.space.bundle(a) for a in proposals]
                    got = set(self.db.claim(self._run_id, [b.key for b in bundles],
                                            budget=trials))
                    mine = [(a, b) for a, b in zip(proposals, bundles) if b.key in got]
                    results = self._measure([b for _, b in mine]) if mine else []
                    for a, b in mine:
                        by_key[b.key] = a
                    # none got: other runs took them first, or filled the budget; look again
                elif others:
                    # other runs measure the last plans; should one die, they come back here
                    self._wait(beat, claimed, None if seconds is None else start + seconds)
                else:
                    break                      # the budget is spent, or the space exhausted
                history = self._history()      # with what other runs measured meanwhile
                self._learn(history, by_key)
                best = min((self.objective.measured(r, self.reference)
                            for r in history.values()), default=math.inf)
                if len(history) > curve[-1][0]:
                    curve.append((len(history), best))
                progress.update(len(history), best, self.reference)
                if mine:
                    assignments = [a for a, _ in mine]
                    self.strategy.tell(assignments, [self.objective.measured(r, self.reference)
                                                     for r in results])
                    self.refit()
                    for cb in self.callbacks:
                        cb(self, assignments, results)
        finally:
            progress.close()
        return self._report(history, by_key, before, curve, start)

    def _propose(self, n: int, history: dict[str, MeasureResult],
                 by_key: dict[str, Assignment], others: set[str]) -> list[Assignment]:
        """Up to ``n`` plans measured and claimed by no run: seeds first, then the
        strategy's."""
        incumbents = self._incumbents(history, by_key)
        if self.strategy_name == "cpsat" and self.objective.kind == "time@width" \
                and self._ref_log_width is not None:
            self.strategy.max_log_width = self._ref_log_width + self.objective.width_slack
            self.strategy.width_score = self.width_score
        seen = set(history) | others
        seeds = [a for a in self.space.seeds() if self.space.bundle(a).key not in seen][:n]
        if n <= len(seeds):
            return seeds
        return seeds + self.strategy.ask(n - len(seeds), self.score,
                                         seen | {self.space.bundle(a).key for a in seeds},
                                         incumbents)

    def _incumbents(self, history: dict[str, MeasureResult], by_key: dict[str, Assignment]
                    ) -> list[Assignment]:
        ranked = sorted((self.objective.measured(r, self.reference), k)
                        for k, r in history.items() if k in by_key)
        return [by_key[k] for v, k in ranked if math.isfinite(v)]

    def _report(self, history, by_key, before, curve, start) -> TuneReport:
        default_b = self.space.bundle(self.space.default())
        scored = sorted(((self.objective.measured(r, self.reference), k)
                         for k, r in history.items()), key=lambda vk: vk[0])
        best_key = scored[0][1] if scored and math.isfinite(scored[0][0]) else default_b.key
        best_bundle = None
        if best_key in by_key:
            best_bundle = self.space.bundle(by_key[best_key])
        else:                                   # measured by another run
            (c,) = self.db.candidates(self.workload, keys=[best_key])
            best_bundle = c.bundle()
        best = history[best_key]
        value = self.objective.measured(best, self.reference)
        self.db.set_best(best_bundle, self.objective.name, self.backend, value)
        desc = self.space.describe(by_key[best_key]) if best_key in by_key else \
            f"plan {best_key[:12]} (from another run)"
        now = self._measured_now
        return TuneReport(self.workload, self.objective.name, history[default_b.key], best,
                          best_bundle, desc, default_b, now, before, curve,
                          time.monotonic() - start,
                          max(0, len(history) - before - now), self._run_id)

    def close(self) -> None:
        for part in (self.builder, self.runner):
            close = getattr(part, "close", None)
            if close is not None:
                close()


class _Progress:
    """A rich progress bar with the best time so far (nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int, workload: Workload,
                 is_time: bool = True):
        self.bar, self.is_time = None, is_time
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
            TimeElapsedColumn

        self.bar = Progress(TextColumn("tuning {task.description}"), BarColumn(),
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
                text += f" ({reference.median_s * 1e3 / ms:.2f}x default)"
        self.bar.update(self.task, completed=done, best=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _Heartbeat:
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
