"""The tuner loop: propose → build → measure → record → refit, in rounds.

``Tuner(graph, lower, upper, C, method=..., db=...)`` tunes the workload of that query (batch,
specs, method, dtype, target) on one backend. Each round the strategy proposes a batch of
unmeasured plans (scored by the cost model), the builder and runner measure them in worker
processes, every result goes into the database with its features (failures too, with their
error), and the XGBoost cost model is refitted on every record in the database and saved into
it. The default plan is measured first: it is the reference of the tightness floor and of the
final comparison.

After the default, the backend's schedule presets on the default plan are measured first
(``TuneSpace.seeds``), as MetaSchedule and Ansor seed their searches with rule-based
schedules; the strategy proposes the rest.

``trials`` is the budget of measured plans for this workload and backend *in the database*:
running the same command again after an interruption continues where it stopped, and a plan
already measured is never measured again. ``seconds`` bounds one run's wall time.

Objectives (``Objective.parse``): ``time`` (fastest, whatever the tightness), ``time@width``
(fastest among plans whose mean bound width is no worse than the default plan's: the default),
``time@mem:BYTES`` (fastest within a peak-memory budget), ``mix:A,B`` (minimise log time +
A·log width + B·log peak bytes). The best plan under the objective is recorded in the database
under the objective's name, which is what ``verify --db`` looks up.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from boundflow.costmodel.features import FEATURE_VERSION, features
from boundflow.costmodel.model import HEADS, XGBCostModel, targets
from boundflow.db import Database
from boundflow.errors import BoundFlowError
from boundflow.ir.graph import Graph
from boundflow.ir.plan import PlanBundle
from boundflow.ir.workload import Workload
from boundflow.measure import LocalBuilder, LocalRunner, MeasureConfig, MeasureInput, \
    MeasureResult
from boundflow.planner.passes import normalised
from boundflow.search.space import Assignment, TuneSpace
from boundflow.search.strategies import make

COST_MODEL = "xgb-cost-model"
DEFAULT_OBJECTIVE = "time@width"


@dataclass(frozen=True)
class Objective:
    kind: str = "time@width"              # time, time@width, time@mem, mix
    memory_budget: int | None = None
    width_weight: float = 0.0
    memory_weight: float = 0.0
    width_slack: float = 1e-4             # float32 plans differ by rounding

    @classmethod
    def parse(cls, text: str) -> "Objective":
        try:
            if text in ("time", "time@width"):
                return cls(text)
            if text.startswith("time@mem:"):
                return cls("time@mem", memory_budget=int(float(text.split(":", 1)[1])))
            if text.startswith("mix:"):
                a, b = (float(v) for v in text.split(":", 1)[1].split(","))
                return cls("mix", width_weight=a, memory_weight=b)
        except ValueError:
            pass
        raise BoundFlowError(f"objective {text!r} is not time, time@width, time@mem:BYTES or "
                             f"mix:A,B")

    @property
    def name(self) -> str:
        if self.kind == "time@mem":
            return f"time@mem:{self.memory_budget}"
        if self.kind == "mix":
            return f"mix:{self.width_weight:g},{self.memory_weight:g}"
        return self.kind

    def measured(self, r: MeasureResult, reference: MeasureResult | None) -> float:
        """The objective of a measurement (lower is better; ``inf`` when it failed or breaks a
        constraint)."""
        if not r.ok or r.median_s is None or r.median_s <= 0:
            return math.inf
        value = math.log(r.median_s)
        if self.kind == "time@width":
            ref = None if reference is None else reference.mean_width
            if ref is not None and (r.mean_width is None
                                    or r.mean_width > ref * (1 + self.width_slack) + 1e-12):
                return math.inf
        elif self.kind == "time@mem":
            if r.peak_bytes is None or r.peak_bytes > self.memory_budget:
                return math.inf
        elif self.kind == "mix":
            if r.mean_width is None or r.peak_bytes is None:
                return math.inf
            value += self.width_weight * math.log(max(r.mean_width, 1e-30)) + \
                self.memory_weight * math.log(max(r.peak_bytes, 1))
        return value

    def predicted(self, heads: dict[str, np.ndarray], ref_log_width: float | None
                  ) -> np.ndarray:
        """The objective from predicted heads; a predicted constraint violation is a
        penalty (so the ranking still orders the violators)."""
        value = heads["log_time"].copy()
        if self.kind == "time@width" and ref_log_width is not None:
            excess = heads["log_width"] - (ref_log_width + self.width_slack)
            value += np.where(excess > 0, 5.0 + 50.0 * excess, 0.0)
        elif self.kind == "time@mem":
            excess = heads["log_mem"] - math.log(self.memory_budget)
            value += np.where(excess > 0, 5.0 + excess, 0.0)
        elif self.kind == "mix":
            value += self.width_weight * heads["log_width"] + \
                self.memory_weight * heads["log_mem"]
        return value


@dataclass
class TuneReport:
    workload: Workload
    objective: str
    default: MeasureResult
    best: MeasureResult
    best_bundle: PlanBundle
    best_description: str
    default_bundle: PlanBundle
    measured_now: int
    measured_before: int
    curve: list[tuple[int, float]] = field(default_factory=list)   # (trial, best objective)
    seconds: float = 0.0


class Tuner:
    """See the module docstring. ``callbacks`` are called after every round with
    ``(tuner, assignments, results)``."""

    def __init__(self, graph: Graph, lower: np.ndarray, upper: np.ndarray,
                 C: np.ndarray | None, *, method: str, db: Database,
                 strategy: str = "cpsat", backend: str = "relax", target: str = "llvm",
                 objective: str | Objective = DEFAULT_OBJECTIVE, dtype: str | None = None,
                 config: MeasureConfig = MeasureConfig(), batch_size: int = 8, seed: int = 0,
                 epsilon: float = 0.1, builder=None, runner=None, progress: bool = True,
                 callbacks: Sequence[Callable[..., Any]] = (), **strategy_options: Any):
        self.graph = graph
        self.lower, self.upper = np.asarray(lower), np.asarray(upper)
        self.C = None if C is None else np.asarray(C)
        n_specs = 0 if self.C is None else int(self.C.shape[1])
        self.workload = Workload.of(graph, batch=int(self.lower.shape[0]), n_specs=n_specs,
                                    method=method, dtype=dtype, target=target)
        self.db, self.backend = db, backend
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
        inputs = [MeasureInput(b, self.graph, self.lower, self.upper, self.C, self.backend)
                  for b in bundles]
        builds = self.builder.build(inputs)
        results = self.runner.run(inputs, builds)
        feats = self._features(bundles)
        for b, r, f in zip(bundles, results, feats):
            self.db.add_measurement(b, r, features=f, graph=self.graph)
        return results

    def _history(self) -> dict[str, MeasureResult]:
        """This workload's measurements on this backend, by plan key (fastest kept)."""
        out: dict[str, MeasureResult] = {}
        for r in self.db.records_for_training(self.workload, include_failed=True):
            m = r.measurement.result
            if m.backend != self.backend:
                continue
            prev = out.get(r.candidate.key)
            if prev is None or (m.ok and (not prev.ok or m.median_s < prev.median_s)):
                out[r.candidate.key] = m
        return out

    def tune(self, trials: int = 32, seconds: float | None = None,
             stop: Callable[[float], bool] | None = None) -> TuneReport:
        """Measure until the workload has ``trials`` plans in the database, ``seconds`` pass,
        or ``stop(best objective so far)`` says so."""
        start = time.monotonic()
        if trials < 1:
            raise BoundFlowError("trials must be at least 1")
        run_id = self.db.start_run(self.workload, self.strategy_name,
                                   {"trials": trials, "seconds": seconds,
                                    "objective": self.objective.name, "backend": self.backend,
                                    "batch_size": self.batch_size}, graph=self.graph)
        status = "failed"
        try:
            report = self._tune(trials, seconds, start, stop)
            status = "finished"
            return report
        finally:
            history = self._history()
            self.db.finish_run(run_id, status, len(history))

    def _tune(self, trials: int, seconds: float | None, start: float,
              stop: Callable[[float], bool] | None) -> TuneReport:
        default_a = self.space.default()
        default_b = self.space.bundle(default_a)
        history = self._history()
        before = len(history)
        if default_b.key not in history:
            history[default_b.key] = self._measure([default_b])[0]
        self.reference = history[default_b.key]
        if not self.reference.ok:
            raise BoundFlowError(f"the default plan failed to run ({self.reference.error_kind}: "
                                 f"{self.reference.error}); nothing to tune against")
        self._calibrate()
        by_key = {default_b.key: default_a}
        for c in self.db.candidates(self.workload):       # earlier runs' plans, as points
            if c.key in history and c.key not in by_key:
                a = self.space.assignment_of(c.bundle())
                if a is not None:
                    by_key[c.key] = a
        self.refit()
        curve: list[tuple[int, float]] = []
        best = min((self.objective.measured(r, self.reference) for r in history.values()),
                   default=math.inf)
        curve.append((len(history), best))
        progress = _Progress(self.progress, trials, len(history), self.workload,
                             self.objective.kind != "mix")
        try:
            while len(history) < trials:
                if seconds is not None and time.monotonic() - start > seconds:
                    break
                if stop is not None and stop(best):
                    break
                n = min(self.batch_size, trials - len(history))
                incumbents = self._incumbents(history, by_key)
                if self.strategy_name == "cpsat" and self.objective.kind == "time@width" \
                        and self._ref_log_width is not None:
                    self.strategy.max_log_width = self._ref_log_width + self.objective.width_slack
                    self.strategy.width_score = self.width_score
                seeds = [a for a in self.space.seeds()
                         if self.space.bundle(a).key not in history][:n]
                proposals = seeds + self.strategy.ask(n - len(seeds), self.score,
                                                      set(history) | {self.space.bundle(a).key
                                                                      for a in seeds},
                                                      incumbents) if n > len(seeds) else seeds
                if not proposals:
                    break                                   # the space is exhausted
                bundles = [self.space.bundle(a) for a in proposals]
                results = self._measure(bundles)
                values = []
                for a, b, r in zip(proposals, bundles, results):
                    history[b.key] = r
                    by_key[b.key] = a
                    values.append(self.objective.measured(r, self.reference))
                self.strategy.tell(proposals, values)
                best = min([best] + values)
                curve.append((len(history), best))
                self.refit()
                progress.update(len(history), best, self.reference)
                for cb in self.callbacks:
                    cb(self, proposals, results)
        finally:
            progress.close()
        return self._report(history, by_key, before, curve, start)

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
        else:                                   # measured in an earlier run
            for c in self.db.candidates(self.workload):
                if c.key == best_key:
                    best_bundle = c.bundle()
        best = history[best_key]
        value = self.objective.measured(best, self.reference)
        self.db.set_best(best_bundle, self.objective.name, self.backend, value)
        desc = self.space.describe(by_key[best_key]) if best_key in by_key else \
            f"plan {best_key[:12]} (from an earlier run)"
        return TuneReport(self.workload, self.objective.name, history[default_b.key], best,
                          best_bundle, desc, default_b, len(history) - before, before, curve,
                          time.monotonic() - start)

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
