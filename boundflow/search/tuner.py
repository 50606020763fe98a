"""The tuner loop: propose → claim → (build → measure → record), one candidate at a time, →
refit, in rounds; then one final runner pass that compares the best plan with the default.

``Tuner(graph, lower, upper, C, method=..., db=...)`` tunes the workload of that query (batch,
specs, method, dtype, target). A candidate is a plan *on a backend*: the space
(:class:`~boundflow.search.space.TuneSpace`) holds the backend as a decision beside the
planner's choices, the lowering of each group of tasks and the schedules, so the default path
of ``verify`` (the default plan on the torch backend, :func:`boundflow.api.default_plan`) is a
point of it. That point is the **baseline**: it is measured first, whatever backends are
searched, and it is the reference of the tightness floor and of every speedup reported.

Each round the strategy proposes a batch of unmeasured candidates (scored by the cost model:
XGBoost, or the analytic model where XGBoost ranks the workload's own plans worse, see
``ranking.py``), the run claims them in the database, and then builds, measures and records
them one at a time in worker processes (every result goes into the database with the plan's
features, failures too), so the progress bar moves with every measured plan and a time budget
is checked between candidates. Measurements time the whole call as ``verify`` makes it (see
``boundflow.measure``). After the baseline, the seeds (the default plan on the other backends
searched, the backends' schedule presets, as MetaSchedule and Ansor seed theirs with
rule-based schedules) are measured in the order the model scores them; in batches of three
or more (not for the random strategy) the model's best plan of a pool sampled across the
whole space goes ahead of the seeds it is predicted to beat, where it is predicted to beat
the incumbent (a warm model's best guess is often many decisions from the default, where
the strategies, which climb from the incumbent, reach it late).

The search holds an incumbent, the plan it climbs from: a candidate whose single measurement
beats it is timed again beside it, interleaved in one runner pass, and held only if it is
faster there too (``_challenge``): on a loaded machine single measurements differ by 20-50%,
more than most plans do.

At the end, the best candidate found is measured again **in one runner pass with the
baseline**, interleaved (``LocalRunner.compare``): the report's ``default`` and ``best`` and
every speedup come from that pass, and the best-plan record keeps it (``Database.set_best``
with the baseline's value), so ``verify --db`` refuses a record that was not faster than the
default path measured with it (:func:`boundflow.search.lookup.tuned_plan`).

``trials`` is the budget of candidates for this workload and machine, over the backends
searched, *in the database*: running the same command again after an interruption continues
where it stopped, and a candidate already measured is never measured again. ``seconds`` bounds
one run's wall time, the final comparison included: a candidate is started only if it is
expected to finish, with the final pass, inside the budget.

Several tuners may tune one workload at once (processes on this machine, or on machines that
share a PostgreSQL database): each round's candidates are claimed atomically against the
budget (``Database.claim``), so no candidate is measured twice on one machine and together
they stop at ``trials``; a run that has measured its share waits while other live runs still
measure the last ones (should one die, its claims come back). A heartbeat thread keeps the run
alive in the database, every ``heartbeat_timeout / 4`` seconds, however long a candidate
takes; a run killed without a word is found dead once its heartbeat is ``heartbeat_timeout``
old (at once, by a run on the same machine) and its claims go back to the others.

Objectives: see ``objective.py``. The best plan under the objective is recorded in the database
under the objective's name, which is what ``verify --db`` looks up.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import numbers
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from boundflow.db import DEFAULT_HEARTBEAT_TIMEOUT, Database
from boundflow.errors import BoundFlowError
from boundflow.ir.graph import Graph
from boundflow.ir.plan import PlanBundle
from boundflow.ir.task_graph import PlanError
from boundflow.ir.workload import Workload
from boundflow.measure import LocalBuilder, LocalRunner, MeasureConfig, MeasureInput, \
    MeasureResult
from boundflow.measure.result import machine
from boundflow.planner.passes import normalised
from boundflow.search.final import CONFIRM, build, bundle_of, compare, \
    finalists as finalists_of, report, wins
from boundflow.search.objective import Objective, ObjectiveError  # noqa: F401 - re-exported
from boundflow.search.objective import beats_default
from boundflow.search.ranking import COST_MODEL, Ranker  # noqa: F401 - COST_MODEL re-exported
from boundflow.search.session import Heartbeat, Progress
from boundflow.search.space import DEFAULT_BACKEND, Assignment, Candidate, TuneSpace
from boundflow.search.strategies import descend, make
from boundflow.search.tightness import WidthPrior, dominated

# how much tighter than the width head's pooled prediction a bounds signature no plan of
# which is measured yet is taken (log units): enough to measure the signatures predicted
# within about 10% of the baseline's width once each (search.tightness)
EXPLORE_WIDTH = 0.1
# plans sampled per batch for its one plan of bounds no measurement has, and how many such
# plans a search measures at most (Tuner._new_signature; deep models have thousands)
EXPLORE_SAMPLES = 64
EXPLORE_SIGNATURES = 8
# how much faster than the baseline the model must predict a plan of a signature that only
# tightens less for one such plan to be measured (once a search, Tuner._new_signature)
LONG_SHOT = 2.0
# the model's global pick (Tuner._global_pick): a pool of plans sampled across the whole space
# (this many at the start, GLOBAL_REFRESH more each batch), scored whole by the cost model
# each batch; its best unmeasured one takes a slot where the model predicts it beats the
# incumbent. The strategies climb from the incumbent one decision (or one linearisation) at a
# time; a pretrained model's best guess is often decisions away (a warm start's zero-shot
# pick, measured first, instead of 17 trials later)
GLOBAL_SAMPLES = 512
GLOBAL_REFRESH = 32
# ... fewer for spaces of many decisions, whose plans take longer to plan and score: at most
# this many decisions sampled in all at the start (512 plans up to 39 decisions; an 80-layer
# MLP's 341 decisions: 58 plans, not 11 s of planning; the descent below plans as many
# again), and the pool kept to this many
GLOBAL_DECISIONS = 20000
GLOBAL_POOL = 1024
# ... then coordinate descent on the model (strategies.descend) from the pool's best few, as
# many plans scored as were sampled; the points it ends on join the pool
GLOBAL_DESCENTS = 3

log = logging.getLogger("boundflow.search")

DEFAULT_OBJECTIVE = "time@width"
_FIRST_GUESS_S = {True: 6.0, False: 1.0}     # one candidate, before any is measured: compiled?


def _whole(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass
class TuneReport:
    """What a tuning run found. ``default`` and ``best`` are measured together in the final
    runner pass (``best`` is ``default`` when the default path was the best candidate), so
    ``speedup`` is the default path's time over the tuned plan's under the same load;
    ``kept_default`` says the tuned plan was not faster, and ``verify --db`` will run the
    default path. ``search_default`` / ``search_best``: the same two as measured during the
    search."""

    workload: Workload
    objective: str
    default: MeasureResult
    best: MeasureResult
    best_bundle: PlanBundle
    best_description: str
    default_bundle: PlanBundle
    measured_now: int                  # candidates this run measured
    measured_before: int               # candidates in the database when it started (any run's)
    curve: list[tuple[int, float]] = field(default_factory=list)   # (trial, best objective)
    seconds: float = 0.0
    measured_by_others: int = 0        # candidates other runs measured while this one ran
    run_id: int | None = None
    best_backend: str = DEFAULT_BACKEND
    default_backend: str = DEFAULT_BACKEND
    kept_default: bool = True
    search_default: MeasureResult | None = None
    search_best: MeasureResult | None = None
    cost_model: str = ""               # which model ranked, and why (Choice.describe)
    first_measurement_s: float | None = None    # from the start to the first measured plan
    finalists: tuple[str, ...] = ()    # plan keys timed side by side before one was confirmed
    # (measured plans, plan key, backend) each time the plan the search held changed, the
    # baseline first; and how many side-by-side challenges decided them
    held: tuple[tuple[int, str, str], ...] = ()
    challenges: int = 0

    @property
    def speedup(self) -> float | None:
        """Default path over tuned plan, whole call, same runner pass (None if either
        failed)."""
        if self.default.ok and self.best.ok and self.best.median_s:
            return self.default.median_s / self.best.median_s
        return None


class Tuner:
    """See the module docstring. ``backend``: the backends searched, a name, names (a
    sequence, or ``"torch,relax"``) or None for every registered backend. ``callbacks`` are
    called after every round with ``(tuner, assignments, results)``. ``heartbeat_timeout``:
    seconds after which a run that has not said it is alive is dead (its claims go to other
    runs); the run says so every quarter of it, from a thread, so it need not exceed a
    candidate's ``timeout_s``. ``final_config``: the protocol of the final comparison
    (default: ``config``). ``pretrained``: the cost model starts from the shipped training
    set (:mod:`boundflow.costmodel.pretrained`), else cold. ``bounds``: the query tuned
    for, ``"lower"`` (a verdict's: ``verify``, ``Verifier.verify`` and branch-and-bound read
    lower bounds only, and alpha-CROWN optimises that side alone) or ``"both"``; None: lower
    with specs ``C``, both without. Candidates are measured making that query."""

    def __init__(self, graph: Graph, lower: np.ndarray, upper: np.ndarray,
                 C: np.ndarray | None, *, method: str, db: Database,
                 strategy: str = "cpsat", backend: str | Sequence[str] | None = None,
                 target: str = "llvm", objective: str | Objective = DEFAULT_OBJECTIVE,
                 dtype: str | None = None, config: MeasureConfig = MeasureConfig(),
                 batch_size: int = 8, seed: int = 0, epsilon: float = 0.1, builder=None,
                 runner=None, progress: bool = True, callbacks: Sequence[Callable[..., Any]] = (),
                 heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
                 final_config: MeasureConfig | None = None, pretrained: bool = True,
                 bounds: str | None = None, **strategy_options: Any):
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
                                    method=method, dtype=dtype, target=target,
                                    bounds=("lower" if n_specs else "both") if bounds is None
                                    else bounds)
        self.db = db
        self.machine = machine()             # what this host's measurements record
        self.heartbeat_timeout = float(heartbeat_timeout)
        self.objective = objective if isinstance(objective, Objective) else \
            Objective.parse(objective)
        self.space = TuneSpace(graph, self.workload, backend)
        self.backends = self.space.backends
        self.backend = self.space.backend
        self.baseline_bundle, self.baseline = self._baseline()
        self.scope = tuple(dict.fromkeys(self.backends + (self.baseline[1],)))
        self.normalised, _ = normalised(graph)
        self.widths = WidthPrior(self.normalised, self.baseline_bundle)
        self.config, self.batch_size, self.progress = config, batch_size, progress
        self.final_config = final_config or config
        self.builder = builder if builder is not None else LocalBuilder(timeout_s=config.timeout_s)
        self.runner = runner if runner is not None else LocalRunner(config)
        self.callbacks = list(callbacks)
        self.ranker = Ranker(self.graph, self.workload, seed, use_pretrained=pretrained)
        self.reference: MeasureResult | None = None
        self._ref_log_width: float | None = None
        self._run_id: int | None = None
        self._measured_now = 0
        self._mine: dict[Candidate, MeasureResult] = {}
        self._unmapped: set[Candidate] = set()
        self._twins: set[Candidate] = set()      # this space's twins of mapped older plans
        self._spent: dict[str, list[float]] = {}
        self._refit_s = 0.0
        self._first: float | None = None
        self._held: Candidate | None = None          # the incumbent, see _challenge
        self._held_value = math.inf
        self._lost: set[Candidate] = set()
        self._held_curve: list[tuple[int, str, str]] = []
        self._challenges = 0
        if strategy == "cpsat" and self.objective.kind == "time@mem":
            strategy_options.setdefault("memory_budget", self.objective.memory_budget)
        self.strategy = make(strategy, self.space, seed=seed, epsilon=epsilon,
                             **strategy_options)
        self.strategy_name = strategy
        self._explore_rng = random.Random(seed + 1)      # _new_signature's samples
        self._explored: set = set()                      # the signatures it proposed
        self._long_shot = False                          # a dominated one proposed
        self._global_rng = random.Random(seed + 2)       # _global_pick's pool
        self._global_pool: dict[Candidate, Assignment] = {}
        self._global_sampled = False

    def _baseline(self) -> tuple[PlanBundle, Candidate]:
        """The default path of ``verify`` without a database: the default plan on the
        default backend (on the CPU; for another target, where verify needs a backend that
        compiles, on the first backend searched)."""
        from boundflow.api import BoundOptions, default_plan
        from boundflow.target import target_kind

        bundle = default_plan(self.graph, self.workload, BoundOptions(self.workload.method))
        on = DEFAULT_BACKEND if target_kind(self.workload.target) == "llvm" else self.backend
        return bundle, (bundle.key, on)

    # -- the model ---------------------------------------------------------------------------
    @property
    def model(self):
        """The XGBoost model (what is saved into the database)."""
        return self.ranker.model

    def _candidates(self, assignments: Sequence[Assignment]):
        ok, cands = [], []
        for i, a in enumerate(assignments):
            try:
                cands.append((self.space.bundle(a), self.space.backend_of(a)))
                ok.append(i)
            except BoundFlowError:
                pass
        return ok, cands

    def score(self, assignments: Sequence[Assignment]) -> np.ndarray:
        """The model's predicted objective of each assignment (``inf`` when it does not
        plan)."""
        ok, cands = self._candidates(assignments)
        out = np.full(len(assignments), np.inf)
        if cands:
            out[ok] = self.objective.predicted(self._heads(cands), self._ref_log_width)
        return out

    def width_score(self, assignments: Sequence[Assignment]) -> np.ndarray:
        """Each assignment's log width (CP-SAT's width floor, which adds the exploration
        allowance once, to the floor, not once per changed decision); ``inf`` when it
        does not plan."""
        ok, cands = self._candidates(assignments)
        out = np.full(len(assignments), np.inf)
        if cands:
            out[ok] = self._heads(cands, optimistic=0.0)["log_width"]
        return out

    def _heads(self, cands: Sequence[tuple[PlanBundle, str]],
               optimistic: float = EXPLORE_WIDTH) -> dict[str, np.ndarray]:
        """The model's heads for ``cands``, the width head corrected by what the plans'
        bounds signatures say (:mod:`boundflow.search.tightness`), an unmeasured
        signature ``optimistic`` tighter."""
        heads = dict(self.ranker.predict(self.ranker.features(cands)))
        heads["log_width"] = self.widths.log_widths([b for b, _ in cands], heads["log_width"],
                                                    self._ref_log_width, optimistic,
                                                    self.objective.width_slack)
        return heads

    def refit(self) -> dict:
        """Fit the cost model on the database's records (saved into it) and choose the model
        that ranks this workload's plans; recalibrate the tightness floor."""
        start = time.monotonic()
        metrics = self.ranker.refit(self.db)
        self._calibrate()
        self._refit_s = time.monotonic() - start
        return metrics

    def _calibrate(self) -> None:
        """The tightness floor in the model's own units: its predicted width of the baseline
        (the analytic model's widths are only relative)."""
        X = self.ranker.features([(self.baseline_bundle, self.baseline[1])])
        self._ref_log_width = float(self.ranker.predict(X)["log_width"][0])

    # -- measuring ---------------------------------------------------------------------------
    def _input(self, bundle: PlanBundle, backend: str) -> MeasureInput:
        return MeasureInput(bundle, self.graph, self.lower, self.upper, self.C, backend)

    def _measure(self, bundle: PlanBundle, backend: str,
                 deadline: float | None = None, reserve: float = 0.0) -> MeasureResult | None:
        """Build, run and record one candidate (claimed by this run: the write releases the
        claim). With a ``deadline``, its compile is stopped if still running ``reserve``
        seconds before it (then nothing is recorded, and None comes back: the compile said
        nothing about the plan), and its timing is cut down to end by then
        (``MeasureConfig.max_seconds``: a slow plan is timed with fewer calls)."""
        start = time.monotonic()
        inp = self._input(bundle, backend)
        builds = build(self, [inp], None if deadline is None else
                       max(0.0, deadline - time.monotonic() - reserve))
        if builds[0].cut:
            log.info("the compile of %s was stopped: the time budget ran out", bundle.key)
            return None
        kw = {}
        if deadline is not None and "config" in inspect.signature(self.runner.run).parameters:
            kw["config"] = self._cut_config(deadline, reserve)
        result = self.runner.run([inp], builds, **kw)[0]
        self.db.add_measurement(bundle, result, features=self.ranker.plan_features(bundle),
                                graph=self.graph, run_id=self._run_id)
        self._measured_now += 1
        self._mine.setdefault((bundle.key, backend), result)
        if result.ok:
            self.widths.observe(bundle, result.mean_width)
        self._first = self._first or time.monotonic()
        self._spent.setdefault(backend, []).append(time.monotonic() - start)
        return result

    def _cut_config(self, deadline: float, reserve: float) -> MeasureConfig:
        """The search's protocol cut down to end ``reserve`` seconds before ``deadline``
        (``MeasureConfig.max_seconds``: a slow plan is timed with fewer calls)."""
        room = max(0.5, deadline - time.monotonic() - reserve)
        return dataclasses.replace(self.config, max_seconds=min(
            room, self.config.max_seconds or math.inf))

    def _history(self) -> dict[Candidate, MeasureResult]:
        """This workload's measurements on the backends searched (and the baseline's) on
        this machine, by any run, by candidate (fastest kept); and whatever this run measured
        (a runner may record another machine: a candidate is never proposed twice all the
        same)."""
        out: dict[Candidate, MeasureResult] = dict(self._mine)
        for r in self.db.records_for_training(self.workload, include_failed=True):
            m = r.measurement.result
            if m.backend not in self.scope or m.machine != self.machine:
                continue
            c = (r.candidate.key, m.backend)
            prev = out.get(c)
            if prev is None or (m.ok and (not prev.ok or m.median_s < prev.median_s)):
                out[c] = m
        return out

    def _claimed_by_others(self) -> set[Candidate]:
        return {(c.candidate_key, c.backend) for c in self.db.claims(self.workload)
                if c.run_id != self._run_id and c.backend in self.scope
                and c.machine == self.machine}

    def _learn(self, history: dict[Candidate, MeasureResult],
               by_cand: dict[Candidate, Assignment]) -> None:
        """Map candidates measured by earlier or other runs back to assignments."""
        new = [c for c in history if c not in by_cand and c not in self._unmapped]
        if not new:
            return
        records = {r.key: r for r in self.db.candidates(self.workload,
                                                        keys=sorted({c[0] for c in new}))}
        for c in new:
            rec = records.get(c[0])
            bundle = None if rec is None else rec.bundle()
            a = None if bundle is None else self.space.assignment_of(bundle, c[1])
            if a is None:
                self._unmapped.add(c)
            else:
                by_cand[c] = a
                if (twin := self.space.candidate(a)) != c:    # an older BoundFlow's key
                    self._twins.add(twin)
                if history[c].ok:
                    self.widths.observe(bundle, history[c].mean_width,
                                        own=c in self._mine)

    def _wait(self, beat: Heartbeat, others: set, deadline: float | None) -> None:
        """Wait (the heartbeat goes on) until the candidates other runs claim are not
        ``others`` any more (one was measured, or its run finished or died), or
        ``deadline``."""
        while deadline is None or time.monotonic() < deadline:
            time.sleep(min(0.25, self.heartbeat_timeout / 8))
            beat.check()
            if self._claimed_by_others() != others:
                return

    # -- the time budget ---------------------------------------------------------------------
    def _expected(self, backend: str) -> float:
        """Seconds one more candidate on ``backend`` is expected to take (build, measure,
        record): the mean of this run's so far (the first left out once there are others: it
        started the worker processes), else a first guess."""
        from boundflow.backend import create

        guess = _FIRST_GUESS_S[create(backend).needs_build]
        spent = self._spent.get(backend, [])
        if len(spent) > 1:
            return float(np.mean(spent[1:][-8:]))
        return min(spent[0], guess) if spent else guess

    def _final_reserve(self, history: dict[Candidate, MeasureResult]) -> float:
        """Seconds to keep for the end: the pass timing the finalists with the baseline,
        then the final comparison of one with the baseline, once for each of the ``CONFIRM``
        passes it may take (their calls under the final protocol, plus loading them)."""
        best = self._best(history)
        if best is None or best == self.baseline:
            return 0.0
        cfg = self.final_config
        calls = 1 + cfg.warmup + 2 * cfg.repeat * cfg.number
        per_call = sum(history[c].median_s or 0.0 for c in (best, self.baseline))
        finalists = sum(history[c].median_s or 0.0 for c in
                        (self.baseline, *finalists_of(self, history)))
        return CONFIRM * (1.0 + calls * per_call) + 1.0 + calls * finalists

    def _fits(self, backend: str, deadline: float | None,
              history: dict[Candidate, MeasureResult]) -> bool:
        if deadline is None:
            return True
        need = self._expected(backend) + self._final_reserve(history)
        return time.monotonic() + need <= deadline

    # -- the loop ----------------------------------------------------------------------------
    def tune(self, trials: int = 32, seconds: float | None = None,
             stop: Callable[[float], bool] | None = None) -> TuneReport:
        """Measure until the workload has ``trials`` candidates in the database (on this
        machine and the backends searched, measured by any run), ``seconds`` pass (the final
        comparison included), or ``stop(best objective so far)`` says so."""
        start = time.monotonic()
        if not _whole(trials) or trials < 1:
            raise BoundFlowError(f"trials must be a whole number >= 1, not {trials!r}")
        if seconds is not None and not (isinstance(seconds, (int, float)) and seconds > 0):
            raise BoundFlowError(f"seconds must be a number > 0, not {seconds!r}")
        run_id = self.db.start_run(self.workload, self.strategy_name,
                                   {"trials": trials, "seconds": seconds,
                                    "objective": self.objective.name,
                                    "backend": list(self.backends),
                                    "batch_size": self.batch_size}, graph=self.graph,
                                   backend=",".join(self.scope), machine=self.machine,
                                   heartbeat_timeout=self.heartbeat_timeout)
        self._run_id, self._measured_now, self._mine, self._first = run_id, 0, {}, None
        beat = Heartbeat(None if self.db.is_private else self.db, run_id,
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

    def _best(self, history: dict[Candidate, MeasureResult]) -> Candidate | None:
        """The plan the search holds (:meth:`_challenge`) when it is not the baseline; else
        the candidate of least objective that no challenge ruled out (the baseline on a tie;
        never another run's plan this space cannot re-plan), None if none is finite."""
        if self._held is not None and self._held != self.baseline and self._held in history:
            return self._held
        scored = [(self.objective.measured(r, self.reference), c != self.baseline, c)
                  for c, r in history.items()
                  if c == self.baseline or (c not in self._lost and c not in self._unmapped)]
        if not scored:
            return None
        value, _, c = min(scored, key=lambda t: (t[0], t[1]))
        return c if math.isfinite(value) else None

    def _best_value(self, history) -> float:
        return min((self.objective.measured(r, self.reference) for r in history.values()),
                   default=math.inf)

    # -- the incumbent -----------------------------------------------------------------------
    def _hold(self, c: Candidate, value: float, n: int) -> None:
        self._held, self._held_value = c, value
        self._held_curve.append((n, c[0], c[1]))

    def _challenge_s(self, c: Candidate, history: dict[Candidate, MeasureResult]) -> float:
        """Seconds one challenge of the held plan by ``c`` is expected to take."""
        cfg = self.config
        calls = 1 + cfg.warmup + 2 * cfg.repeat * cfg.number       # kernels timed after
        per_call = sum(history[x].median_s or 0.0 for x in (c, self._held) if x in history)
        return 1.0 + calls * per_call

    def _challenge(self, history: dict[Candidate, MeasureResult],
                   by_cand: dict[Candidate, Assignment], deadline: float | None) -> None:
        """Challenge the plan the search holds with the best measured candidate, when that
        one's single measurement beat the held plan's value: both are timed again side by
        side, interleaved in one runner pass under the search's protocol (``compare``), and
        the challenger is held if it wins there as a tuned plan must beat the default path
        (better objective, 3% faster, faster in most paired rounds: a plan timed against
        itself this way reads up to 16% apart on a 5 ms call here); the loser never
        challenges again. A single measurement on a busy machine can be 20-50% off, so
        without this the search would hold (and climb from, and report) whichever plan was
        luckiest. One challenge per call (after each measurement); none where the time left
        cannot take it; with a runner that cannot time plans side by side, the best
        measurement is held."""
        pool = {c: self.objective.measured(r, self.reference) for c, r in history.items()
                if c != self._held and c not in self._lost and c not in self._unmapped}
        pool = {c: v for c, v in pool.items() if math.isfinite(v)}
        if not pool:
            return
        c = min(pool, key=lambda k: (pool[k], str(k)))
        if not pool[c] < self._held_value:
            return
        if getattr(self.runner, "compare", None) is None:
            self._hold(c, pool[c], len(history))
            return
        need = self._challenge_s(c, history)
        if deadline is not None and \
                time.monotonic() + need + self._final_reserve(history) > deadline:
            return
        start = time.monotonic()
        try:
            pair = [(bundle_of(self, x, by_cand), x[1]) for x in (self._held, c)]
        except BoundFlowError as e:             # another run's row that does not re-plan
            log.warning("plan %s is not run: %s", c[0][:12], e)
            self._lost.add(c)
            return
        config, room = self.config, None
        if deadline is not None:                  # cut down to the time left, as _measure
            reserve = self._final_reserve(history)
            config = self._cut_config(deadline, reserve)
            room = max(0.0, deadline - time.monotonic() - reserve)
        held, challenger = compare(self, pair, config, seconds=room)
        self._challenges += 1
        if c[1] in self._spent and self._spent[c[1]]:
            self._spent[c[1]][-1] += time.monotonic() - start    # a trial's cost, on average
        v_held = self.objective.measured(held, self.reference)
        v_new = self.objective.measured(challenger, self.reference)
        log.debug("challenge: %s %.4g ms vs held %s %.4g ms side by side", c[0][:12],
                 (challenger.median_s or math.nan) * 1e3, self._held[0][:12],
                 (held.median_s or math.nan) * 1e3)
        if (not math.isfinite(v_held) and math.isfinite(v_new)) or \
                (beats_default(v_new, v_held, challenger.median_s, held.median_s)
                 and wins(challenger, held)):
            self._lost.add(self._held)
            self._hold(c, v_new, len(history))
        else:
            self._lost.add(c)
            if math.isfinite(v_held):
                self._held_value = v_held

    def _tune(self, beat: Heartbeat, trials: int, seconds: float | None, start: float,
              stop: Callable[[float], bool] | None) -> TuneReport:
        deadline = None if seconds is None else start + seconds
        history = self._history()
        before = len(history)
        progress = Progress(self.progress, trials, before, self.workload,
                            self.objective.kind != "mix")
        try:
            # the baseline first: the first run to claim it measures it, others wait (it is
            # measured even past the budget). A failure recorded before this run (an earlier
            # run's, perhaps cut short) is measured again once: it may have been transient,
            # and every tune of the workload would otherwise stop on it for good
            retried = False
            while self.baseline not in history or not (history[self.baseline].ok or retried):
                if self.baseline in history or \
                        self.db.claim(self._run_id, [self.baseline], backends=self.scope):
                    retried = True
                    self._measure(self.baseline_bundle, self.baseline[1])
                else:
                    self._wait(beat, {self.baseline}, None)    # until its claim goes
                history = self._history()
            self.reference = history[self.baseline]
            if self.reference.ok:
                self.widths.reference(self.reference.mean_width)
            if not self.reference.ok:
                raise BoundFlowError(f"the default plan failed to run on the "
                                     f"{self.baseline[1]} backend ({self.reference.error_kind}"
                                     f": {self.reference.error}); nothing to tune against")
            if self.reference.mean_width is None:       # inf or NaN (see measure.tightness)
                raise BoundFlowError("the default plan's bounds over this input box are not "
                                     "finite (they overflow in this precision): use a "
                                     "smaller box or --dtype float64; nothing to tune "
                                     "against")
            progress.update(len(history), self._best_value(history), self.reference)
            self._held, self._lost, self._held_curve, self._challenges = None, set(), [], 0
            self._hold(self.baseline, self.objective.measured(self.reference, self.reference),
                       len(history))
            by_cand: dict[Candidate, Assignment] = {}
            default_a = self.space.default()
            if self.space.candidate(default_a) == self.baseline:
                by_cand[self.baseline] = default_a
            self._learn(history, by_cand)             # earlier runs' candidates, as points
            self.refit()
            self._challenge(history, by_cand, deadline)
            best = self._best_value(history)
            curve: list[tuple[int, float]] = [(len(history), best)]
            cut = False
            while True:
                beat.check()
                if stop is not None and stop(best):
                    break
                fitting = [b for b in self.backends if self._fits(b, deadline, history)]
                if not fitting:
                    break
                claimed = self._claimed_by_others()
                others = claimed - history.keys()
                left = trials - len(history) - len(others)
                proposals = self._propose(min(self.batch_size, left), history, by_cand,
                                          others, fitting) if left > 0 else []
                done: list[tuple[Assignment, MeasureResult]] = []
                if proposals:
                    cands = [self.space.candidate(a) for a in proposals]
                    got = set(self.db.claim(self._run_id, cands, budget=trials,
                                            backends=self.scope))
                    mine = [(a, c) for a, c in zip(proposals, cands) if c in got]
                    for a, c in mine:                # one at a time, the budget between
                        if not self._fits(c[1], deadline, history):
                            continue
                        beat.check()
                        r = self._measure(self.space.bundle(a), c[1], deadline,
                                          self._final_reserve(history))
                        if r is None:                # its compile was cut: time is up
                            cut = True
                            break
                        by_cand[c] = a
                        done.append((a, r))
                        history[c] = r
                        self._challenge(history, by_cand, deadline)
                        progress.update(len(history), self._best_value(history),
                                        self.reference)
                    if mine and not done:
                        break                        # none fits in the time left (or cut)
                    # none got: other runs took them first, or filled the budget; look again
                elif others:
                    # other runs measure the last candidates; should one die, they come back
                    self._wait(beat, claimed, deadline)
                else:
                    break                  # the budget is spent, or the space exhausted
                history = self._history()  # with what other runs measured meanwhile
                self._learn(history, by_cand)
                self._challenge(history, by_cand, deadline)
                best = self._best_value(history)
                if len(history) > curve[-1][0]:
                    curve.append((len(history), best))
                progress.update(len(history), best, self.reference)
                if done:
                    assignments = [a for a, _ in done]
                    self.strategy.tell(assignments, [self.objective.measured(r, self.reference)
                                                     for _, r in done])
                    if deadline is None or time.monotonic() + self._refit_s + \
                            self._final_reserve(history) <= deadline:
                        self.refit()
                    for cb in self.callbacks:
                        cb(self, assignments, [r for _, r in done])
                if cut:
                    break
        finally:
            progress.close()

        return report(self, history, by_cand, before, curve, start)

    def _propose(self, n: int, history: dict[Candidate, MeasureResult],
                 by_cand: dict[Candidate, Assignment], others: set[Candidate],
                 backends: Sequence[str] | None = None) -> list[Assignment]:
        """Up to ``n`` candidates, on ``backends`` (default: all searched; those a time
        budget still has room for), measured and claimed by no run: the default first, then
        the seeds (the default on the other backends, schedule presets) in the model's
        order, with the model's best plan of the whole space (:meth:`_global_pick`, where
        ``n >= 3``) ahead of those it is predicted to beat, then the strategy's, then (where
        two slots or more are left) one plan of bounds no measurement has
        (:meth:`_new_signature`)."""
        backends = set(backends or self.backends)
        incumbents = self._incumbents(history, by_cand)
        if self.strategy_name == "cpsat" and self.objective.kind == "time@width" \
                and self._ref_log_width is not None:
            self.strategy.max_log_width = self._ref_log_width + self.objective.width_slack \
                + EXPLORE_WIDTH
            self.strategy.width_score = self.width_score
        # a plan mapped from another key (an older BoundFlow's twin, ``assignment_of``) is
        # measured under that key: its twin here is not measured again
        seen = set(history) | others | self._twins
        seeds, values = self._seeds(seen)
        first = [self.space.default()] + seeds
        # where a batch has three slots or more: the model's best plan of the whole space,
        # ahead of the seeds it is predicted to beat (not for the random strategy, whose
        # samples stay uniform: tools/costmodel_dataset.py builds training sets with it)
        pick = self._global_pick(seen, backends, incumbents) \
            if n >= 3 and self.strategy_name != "random" else None
        if pick is not None:
            first.insert(1 + sum(v <= pick[1] for v in values), pick[0])
        out = []
        for a in first:
            c = self.space.candidate(a)
            if c not in seen and c[1] in backends and len(out) < n:
                seen.add(c)
                out.append(a)
        # one slot of a batch, after the strategy's picks: bounds not measured yet
        explore = n - len(out) >= 2 and self.objective.kind in ("time@width", "mix") \
            and len(self._explored) < EXPLORE_SIGNATURES
        n_own = n - 1 if explore else n
        for _ in range(3):                  # the strategy's picks on the backends allowed
            if len(out) >= n_own:
                break
            picks = self.strategy.ask(n_own - len(out), self.score, set(seen), incumbents)
            if not picks:
                break
            for pick in picks:
                seen.add(self.space.candidate(pick))
                # a pick on a backend with no room left: the same plan on one with room
                options = [pick] if pick[0] in backends else \
                    [self.space.with_choice(pick, 0, b) for b in sorted(backends)]
                for a in options:
                    c = self.space.candidate(a)
                    if a is pick or c not in seen:
                        seen.add(c)
                        out.append(a)
                        break
        out = out[:n_own]
        if explore:
            a = self._new_signature(seen, backends)
            if a is not None:
                seen.add(self.space.candidate(a))
                out.append(a)
        return out[:n]

    def _seeds(self, seen: set) -> tuple[list[Assignment], list[float]]:
        """The space's seeds not in ``seen`` (the default on the other backends, schedule
        presets), the model's favourites first (a stable sort: where it cannot tell them
        apart, the space's order), and their scores."""
        seeds = [a for a in self.space.seeds() if self.space.candidate(a) not in seen]
        if not seeds:
            return [], []
        scores = self.score(seeds)
        order = np.argsort(scores, kind="stable")
        return [seeds[i] for i in order], [float(scores[i]) for i in order]

    def _global_pick(self, seen: set, backends: set, incumbents: list[Assignment]
                     ) -> tuple[Assignment, float] | None:
        """The best-scored unmeasured plan of a pool sampled across the whole space
        (``GLOBAL_SAMPLES``, fewer for spaces of many decisions, then ``GLOBAL_REFRESH`` more
        each call, at most ``GLOBAL_POOL`` kept) or of the descents on the model from its
        best ``GLOBAL_DESCENTS`` (as many plans scored as were sampled), and its score, if
        the model predicts it beats the incumbent (the default before any is held); else
        None."""
        scale = max(1, len(self.space.decisions))
        first = max(GLOBAL_REFRESH, min(GLOBAL_SAMPLES, GLOBAL_DECISIONS // scale))
        budget = GLOBAL_REFRESH if self._global_sampled else first
        for _ in range(budget):
            a = self.space.sample(self._global_rng)
            try:
                c = self.space.candidate(a)
            except (PlanError, BoundFlowError):
                continue
            self._global_pool.setdefault(c, a)
        self._global_sampled = True       # once, even where no sample planned
        while len(self._global_pool) > GLOBAL_POOL:      # the oldest go first
            del self._global_pool[next(iter(self._global_pool))]
        pool = [a for c, a in self._global_pool.items() if c not in seen and c[1] in backends]
        if not pool:
            return None
        base = incumbents[0] if incumbents else self.space.default()
        scores = self.score(pool + [base])
        # then down from the pool's best on the model, one decision at a time, on the
        # backends allowed, scoring as many plans as were sampled: the model's best is
        # rarely among random samples (the NHWC CNN's: 0.30 ms after the descent, 0.39-0.43
        # ms for the best-scored samples)
        def allowed(points):
            out = np.full(len(points), np.inf)
            ok = [i for i, a in enumerate(points) if self.space.backend_of(a) in backends]
            if ok:
                out[ok] = self.score([points[i] for i in ok])
            return out
        scored = dict(zip(pool, map(float, scores[:-1])))
        for start in sorted(scored, key=scored.get)[:GLOBAL_DESCENTS]:
            spent = len(scored)
            end = descend(self.space, allowed, scored, start, self._global_rng, budget=budget)
            budget -= len(scored) - spent
            if math.isfinite(scored[end]):
                self._global_pool.setdefault(self.space.candidate(end), end)
            if budget <= 0:
                break
        while len(self._global_pool) > GLOBAL_POOL:      # the oldest go first
            del self._global_pool[next(iter(self._global_pool))]
        # every point scored again in one call, the incumbent's too: the width rules pool
        # an unmeasured signature's width over the plans of one call, so scores of the
        # descent's small calls do not compare with the pool's
        points = [a for a, v in scored.items() if math.isfinite(v)
                  and self.space.candidate(a) not in seen]
        if not points:
            return None
        scores = self.score(points + [base])
        i = int(np.argmin(scores[:-1]))
        return (points[i], float(scores[i])) if scores[i] < scores[-1] else None

    def _new_signature(self, seen: set, backends: set) -> Assignment | None:
        """The best-scored of ``EXPLORE_SAMPLES`` sampled plans whose bounds signature
        (:func:`~boundflow.search.tightness.signature`) no measurement has, None if none.
        Under ``time@width`` a signature that only tightens less than the baseline is no
        candidate (it is rarely as tight), but for one plan a search predicted ``LONG_SHOT``
        times faster than the baseline. The model predicts widths and times of a new
        signature from other workloads; where it is wrong about one (the digits CNN's
        forward-mode layer: the fastest plans, as tight as the default, predicted slower),
        a search that only follows it never measures that signature: this slot does, once
        per signature, at most ``EXPLORE_SIGNATURES`` of them, the best-scored first."""
        widths = self.widths
        floor = self.objective.kind == "time@width"
        pool, shots, sigs = [], [], set()
        for _ in range(EXPLORE_SAMPLES):
            a = self.space.sample(self._explore_rng)
            try:
                c, bundle = self.space.candidate(a), self.space.bundle(a)
            except (PlanError, BoundFlowError):
                continue
            sig = widths.signature(bundle)
            if c in seen or c[1] not in backends or sig in sigs or sig in self._explored \
                    or sig == widths.baseline or widths.measured(sig) is not None:
                continue
            sigs.add(sig)
            (shots if floor and dominated(sig, widths.baseline) else pool).append((a, sig))
        # once a search, a signature that only tightens less, where the model predicts it
        # LONG_SHOT times faster than the baseline: on some nets and boxes it is exactly as
        # tight (VNN-COMP's test_small: IBP as tight as CROWN, 5x faster, which the width
        # rules hold looser until measured: a tune found it after 52-59 trials)
        if shots and not self._long_shot:
            _, cands = self._candidates([a for a, _ in shots])   # all plan: sampled so
            t = self._heads(cands + [(self.baseline_bundle, self.baseline[1])])["log_time"]
            i = int(np.argmin(t[:-1]))
            if t[i] <= t[-1] - math.log(LONG_SHOT):
                self._long_shot = True
                self._explored.add(shots[i][1])
                return shots[i][0]
        if not pool:
            return None
        a, sig = pool[int(np.argmin(self.score([a for a, _ in pool])))]
        self._explored.add(sig)           # once each, even if its plan fails to measure
        return a

    def _incumbents(self, history: dict[Candidate, MeasureResult],
                    by_cand: dict[Candidate, Assignment]) -> list[Assignment]:
        """The best measured assignments, best first, the held plan (:meth:`_challenge`)
        ahead of them; none that lost a challenge (the search never climbs from a plan that
        was only lucky)."""
        ranked = sorted(((self.objective.measured(r, self.reference), str(c), c)
                         for c, r in history.items() if c in by_cand and c not in self._lost))
        order = [c for v, _, c in ranked if math.isfinite(v)]
        if self._held in by_cand and self._held in order:
            order = [self._held] + [c for c in order if c != self._held]
        return [by_cand[c] for c in order]

    def close(self) -> None:
        for part in (self.builder, self.runner):
            close = getattr(part, "close", None)
            if close is not None:
                close()
