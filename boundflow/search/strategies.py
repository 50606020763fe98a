"""Search strategies over a :class:`TuneSpace`, in ask/tell form.

``ask(n, score, seen, incumbents)`` proposes up to ``n`` assignments whose candidates are not
in ``seen`` (``TuneSpace.candidate``: (plan key, backend) pairs already measured); ``score(assignments)`` is the cost model's predicted
objective (lower is better), ``incumbents`` the best measured assignments so far, best first.
``tell(assignments, values)`` reports measured objectives (``inf`` for failures and plans
outside the constraints). Every strategy fills a share ``epsilon`` of each batch with random
unmeasured plans, so the model sees more than its own favourites.

* ``random``: uniform samples.
* ``greedy``: coordinate descent from each incumbent: one decision at a time, every choice
  scored by the model, the best kept; repeated until a pass changes nothing. The best-scored
  unmeasured points seen on the way are proposed.
* ``beam``: a beam of width ``B`` over the decisions in order: each state is expanded by every
  choice of the next decision (the rest from the incumbent), the ``B`` best by the model kept.
* ``cpsat``: OR-Tools CP-SAT over one Boolean per (decision, choice), exactly one per decision.
  The objective is the model's per-choice cost around the incumbent (the predicted change when
  that one decision takes that choice); constraints: a memory budget on the planned peak bytes
  (per-choice changes, exact for the incumbent's neighbours), a tightness floor on the
  predicted width, and legality (a solution the planner rejects is cut off, and the solver
  asked again). The solver's best solutions are re-scored with the full model; after each
  round of measurements the model is refitted and the next round linearises around the new
  incumbent.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np

from boundflow.errors import BoundFlowError
from boundflow.ir.task_graph import PlanError
from boundflow.search.space import Assignment, TuneSpace

Score = Callable[[Sequence[Assignment]], np.ndarray]
STRATEGIES = ("random", "greedy", "beam", "cpsat")


class Strategy:
    name = "base"

    def __init__(self, space: TuneSpace, seed: int = 0, epsilon: float = 0.1):
        self.space, self.rng, self.epsilon = space, random.Random(seed), epsilon
        self.history: list[tuple[Assignment, float]] = []

    def tell(self, assignments: Sequence[Assignment], values: Sequence[float]) -> None:
        self.history += list(zip(assignments, values))

    def _key(self, a: Assignment) -> tuple | None:
        try:
            return self.space.candidate(a)
        except (PlanError, BoundFlowError):
            return None

    def _random(self, n: int, seen: set, taken: set) -> list[Assignment]:
        out = []
        for _ in range(50 * max(n, 1)):
            if len(out) == n:
                break
            a = self.space.sample(self.rng)
            k = self._key(a)
            if k is not None and k not in seen and k not in taken:
                taken.add(k)
                out.append(a)
        return out

    def propose(self, n: int, score: Score, seen: set, incumbents: list[Assignment]
                ) -> list[Assignment]:
        """The strategy's own picks (best first)."""
        raise NotImplementedError

    def ask(self, n: int, score: Score, seen: set, incumbents: list[Assignment]
            ) -> list[Assignment]:
        n_random = sum(self.rng.random() < self.epsilon for _ in range(n))
        picks = self.propose(n - n_random, score, seen, incumbents) if n > n_random else []
        taken = {self._key(a) for a in picks}
        return picks + self._random(n - len(picks), seen, taken)

    def _best_unseen(self, pool: dict[Assignment, float], n: int, seen: set
                     ) -> list[Assignment]:
        out, taken = [], set()
        for a, _ in sorted(pool.items(), key=lambda kv: kv[1]):
            k = self._key(a)
            if k is None or k in seen or k in taken:
                continue
            taken.add(k)
            out.append(a)
            if len(out) == n:
                break
        return out


def _scored(score: Score, pool: dict[Assignment, float], points: list[Assignment]
            ) -> np.ndarray:
    new = [a for a in dict.fromkeys(points) if a not in pool]
    if new:
        for a, v in zip(new, score(new)):
            pool[a] = float(v)
    return np.array([pool[a] for a in points])


def descend(space: TuneSpace, score: Score, pool: dict[Assignment, float], start: Assignment,
            rng: random.Random, passes: int = 3, budget: float = math.inf) -> Assignment:
    """Coordinate descent on the model from ``start``: one decision at a time (a random
    order each pass), every choice scored, the best kept; until a pass changes nothing, after
    ``passes`` passes, or once ``budget`` more points have been scored. ``pool`` (assignment
    -> score) holds every point scored, the way down included; returns the end point."""
    cur = start
    cur_v = _scored(score, pool, [cur])[0]
    limit = len(pool) + budget
    for _ in range(passes):
        changed = False
        order = list(range(len(space.decisions)))
        rng.shuffle(order)
        for i in order:
            if len(pool) >= limit:
                return cur
            options = [space.with_choice(cur, i, c) for c in space.decisions[i].choices]
            vals = _scored(score, pool, options)
            j = int(np.argmin(vals))
            if vals[j] < cur_v - 1e-12:
                cur, cur_v, changed = options[j], vals[j], True
        if not changed:
            break
    return cur


class RandomSearch(Strategy):
    name = "random"

    def propose(self, n, score, seen, incumbents):
        return self._random(n, seen, set())


class GreedySearch(Strategy):
    name = "greedy"

    def __init__(self, space, seed=0, epsilon=0.1, starts: int = 3, passes: int = 3):
        super().__init__(space, seed, epsilon)
        self.starts, self.passes = starts, passes

    def propose(self, n, score, seen, incumbents):
        pool: dict[Assignment, float] = {}
        starts = list(incumbents[: self.starts]) or [self.space.default()]
        for start in starts:
            descend(self.space, score, pool, start, self.rng, self.passes)
        return self._best_unseen(pool, n, seen)


class BeamSearch(Strategy):
    name = "beam"

    def __init__(self, space, seed=0, epsilon=0.1, width: int = 8):
        super().__init__(space, seed, epsilon)
        self.width = width

    def propose(self, n, score, seen, incumbents):
        pool: dict[Assignment, float] = {}
        beam = list(dict.fromkeys(list(incumbents[:2]) + [self.space.default()]))
        for i, d in enumerate(self.space.decisions):
            expanded = list(dict.fromkeys(self.space.with_choice(a, i, c)
                                          for a in beam for c in d.choices))
            vals = _scored(score, pool, expanded)
            beam = [expanded[j] for j in np.argsort(vals, kind="stable")[: self.width]]
        return self._best_unseen(pool, n, seen)


class CPSATSearch(Strategy):
    name = "cpsat"

    def __init__(self, space, seed=0, epsilon=0.1, memory_budget: int | None = None,
                 max_log_width: float | None = None, width_score: Score | None = None,
                 time_limit_s: float = 5.0):
        super().__init__(space, seed, epsilon)
        self.memory_budget, self.max_log_width = memory_budget, max_log_width
        self.width_score, self.time_limit_s = width_score, time_limit_s

    def _marginals(self, fn: Score, pool: dict, inc: Assignment) -> list[np.ndarray]:
        base = _scored(fn, pool, [inc])[0]
        out = []
        for i, d in enumerate(self.space.decisions):
            opts = [self.space.with_choice(inc, i, c) for c in d.choices]
            out.append(_scored(fn, pool, opts) - base)
        return out

    def _memory(self, a: Assignment) -> float:
        try:
            return float(self.space.bundle(a).peak_bytes(self.space.workload.batch))
        except (PlanError, BoundFlowError):
            return math.inf

    def propose(self, n, score, seen, incumbents):
        from ortools.sat.python import cp_model

        inc = incumbents[0] if incumbents else self.space.default()
        pool: dict[Assignment, float] = {}
        cost = self._marginals(score, pool, inc)
        decisions = self.space.decisions
        model = cp_model.CpModel()
        x = [[model.NewBoolVar(f"x{i}_{j}") for j in range(len(d.choices))]
             for i, d in enumerate(decisions)]
        for row in x:
            model.AddExactlyOne(row)
        scale = 1e4

        def linear(deltas):
            return sum(int(round(scale * float(v))) * x[i][j]
                       for i, row in enumerate(deltas) for j, v in enumerate(row)
                       if math.isfinite(v) and v != 0)
        if self.memory_budget is not None:
            m0 = self._memory(inc)
            mem = [np.array([self._memory(self.space.with_choice(inc, i, c)) - m0
                             for c in d.choices]) for i, d in enumerate(decisions)]
            for i, row in enumerate(mem):                 # a choice alone over budget: never
                for j, v in enumerate(row):
                    if not math.isfinite(v) or m0 + v > self.memory_budget:
                        model.Add(x[i][j] == 0)
            model.Add(sum(int(round(v)) * x[i][j] for i, row in enumerate(mem)
                          for j, v in enumerate(row) if math.isfinite(v))
                      <= int(self.memory_budget - m0))
        if self.max_log_width is not None and self.width_score is not None:
            wpool: dict = {}
            w0 = _scored(self.width_score, wpool, [inc])[0]
            dw = self._marginals(self.width_score, wpool, inc)
            model.Add(linear(dw) <= int(round(scale * (self.max_log_width - w0))))
        obj = []
        for i, row in enumerate(cost):
            for j, v in enumerate(row):
                c = v if math.isfinite(v) else 1e3
                obj.append(int(round(scale * c)) * x[i][j])
        model.Minimize(sum(obj))
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = self.time_limit_s
        solver.parameters.num_workers = 1
        # CP-SAT's own SIGINT handler outlives Solve: a later Ctrl-C killed the process
        # outright (no message, its run left "running"); Python's KeyboardInterrupt instead
        solver.parameters.catch_sigint_signal = False
        solver.parameters.random_seed = self.rng.randrange(1 << 30)
        found: list[Assignment] = []
        for _ in range(4 * max(n, 1)):
            status = solver.Solve(model)
            if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                break
            picks = [next(j for j in range(len(row)) if solver.Value(row[j])) for row in x]
            a = tuple(decisions[i].choices[j] for i, j in enumerate(picks))
            model.AddBoolOr([x[i][j].Not() for i, j in enumerate(picks)])   # no-good: next
            k = self._key(a)
            if k is None or k in seen:              # illegal, or measured: cut and go on
                continue
            found.append(a)
            if len(found) >= 2 * n:
                break
        _scored(score, pool, found)                 # re-rank with the full model
        return self._best_unseen({a: pool[a] for a in found}, n, seen)


def make(name: str, space: TuneSpace, seed: int = 0, epsilon: float = 0.1, **options
         ) -> Strategy:
    classes = {c.name: c for c in (RandomSearch, GreedySearch, BeamSearch, CPSATSearch)}
    if name not in classes:
        raise BoundFlowError(f"strategy {name!r} is not one of {STRATEGIES}")
    return classes[name](space, seed=seed, epsilon=epsilon, **options)
