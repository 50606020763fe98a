"""The tuning space of one workload: the planner's decisions plus the backend's schedule knobs.

A point is an **assignment**: one choice per decision, a tuple in ``decisions`` order, so it
hashes and compares. The planner's decisions come from :class:`~boundflow.planner.space.
SearchSpace`; on the Relax backend the schedule knobs of ``schedule_space.space(target)`` are
added twice, once for the forward tasks (ibp, layout) and once for the backward tasks (crown,
final): per-task schedules would multiply the space by the number of tasks for little gain.
On the torch backend lowering, Relax fusion and schedules change nothing and are left out.

``bundle(assignment)`` plans it (cached); two assignments may give the same plan (e.g. backward
schedule knobs of a plan with no backward task), so callers identify candidates by
``PlanBundle.key``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from boundflow.errors import BoundFlowError
from boundflow.ir.graph import Graph
from boundflow.ir.knobs import Knobs
from boundflow.ir.plan import PlanBundle
from boundflow.ir.workload import Workload

GROUPS = {"fwd": ("ibp", "layout"), "bwd": ("crown", "final")}
_TORCH_IRRELEVANT = ("lowering", "fuse_passes")

Assignment = tuple


@dataclass(frozen=True)
class Decision:
    field: str                  # a Knobs field, or "schedule"
    position: int | str         # index in the field, or "<group>.<knob>" for schedules
    choices: tuple[Any, ...]

    @property
    def name(self) -> str:
        return f"{self.field}[{self.position}]"


class TuneSpace:
    """See the module docstring."""

    def __init__(self, graph: Graph, workload: Workload, backend: str = "relax"):
        from boundflow.planner import space as planner_space

        if backend not in ("relax", "torch"):
            raise BoundFlowError(f"backend {backend!r} is not relax or torch")
        self.graph, self.workload, self.backend = graph, workload, backend
        self.base = planner_space(graph, workload)
        self._plans: dict[Assignment, PlanBundle] = {}

    @cached_property
    def decisions(self) -> tuple[Decision, ...]:
        out = [Decision(f, i, c) for f, i, c in self.base.decisions()
               if not (self.backend == "torch" and f in _TORCH_IRRELEVANT)]
        if self.backend == "relax":
            from boundflow.backend.relax.schedule_space import space as schedule_space

            for group in GROUPS:
                for knob, choices in schedule_space(self.workload.target).items():
                    out.append(Decision("schedule", f"{group}.{knob}", choices))
        return tuple(out)

    @property
    def size(self) -> int:
        n = 1
        for d in self.decisions:
            n *= len(d.choices)
        return n

    def default(self) -> Assignment:
        """The planner's heuristic plan with the backend's default schedules."""
        from boundflow.planner import default as default_knobs

        k = default_knobs(self.graph, self.workload)
        return tuple(self._value(k, d) for d in self.decisions)

    @staticmethod
    def _value(k: Knobs, d: Decision) -> Any:
        if d.field == "schedule":
            return d.choices[0]
        v = getattr(k, d.field)
        return v[d.position] if isinstance(v, tuple) else v

    def seeds(self) -> list[Assignment]:
        """The default plan under each of the backend's schedule presets, for every task and
        for the backward tasks only: the first points a tuner measures after the default."""
        if self.backend != "relax":
            return []
        from boundflow.backend.relax.schedule_space import presets

        base = self.default()
        out = []
        for preset in presets(self.workload.target):
            for groups in (("fwd", "bwd"), ("bwd",)):
                a = list(base)
                for i, d in enumerate(self.decisions):
                    if d.field == "schedule":
                        group, knob = str(d.position).split(".", 1)
                        if group in groups and knob in preset:
                            a[i] = preset[knob]
                out.append(tuple(a))
        return list(dict.fromkeys(out))

    def sample(self, rng: random.Random) -> Assignment:
        return tuple(rng.choice(d.choices) for d in self.decisions)

    def with_choice(self, a: Assignment, index: int, value: Any) -> Assignment:
        return a[:index] + (value,) + a[index + 1:]

    def check(self, a: Assignment) -> Assignment:
        if len(a) != len(self.decisions):
            raise BoundFlowError(f"an assignment of {len(a)} choices for a space of "
                                 f"{len(self.decisions)} decisions")
        for v, d in zip(a, self.decisions):
            if v not in d.choices:
                raise BoundFlowError(f"{d.name} = {v!r} is not one of {d.choices}")
        return tuple(a)

    def knobs(self, a: Assignment) -> Knobs:
        """The planner knobs of ``a`` (schedules not yet per task: see ``bundle``)."""
        values = {(d.field, d.position): v for d, v in zip(self.decisions, a)
                  if d.field != "schedule"}
        k = self.base.from_choices(values)
        if self.backend == "torch":
            k = k.replace(lowering="torch")
        return k

    def schedules(self, a: Assignment) -> dict[str, tuple[tuple[str, Any], ...]]:
        """Per group, the schedule pairs ``a`` gives its tasks (non-default values only)."""
        out: dict[str, list] = {g: [] for g in GROUPS}
        for d, v in zip(self.decisions, a):
            if d.field == "schedule" and v != d.choices[0]:
                group, knob = str(d.position).split(".", 1)
                out[group].append((knob, v))
        return {g: tuple(sorted(p)) for g, p in out.items()}

    def bundle(self, a: Assignment) -> PlanBundle:
        """The plan of ``a`` (cached)."""
        from boundflow.planner import plan

        hit = self._plans.get(a)
        if hit is not None:
            return hit
        k = self.knobs(self.check(a))
        groups = self.schedules(a)
        if any(groups.values()):
            tasks = plan(self.graph, self.workload, k).task_graph.tasks
            per_task = []
            for t in tasks:
                for g, kinds in GROUPS.items():
                    if t.kind in kinds and groups[g]:
                        per_task.append((t.name, groups[g]))
            k = k.replace(schedule=tuple(per_task))
        b = plan(self.graph, self.workload, k)
        if len(self._plans) > 20000:
            self._plans.clear()
        self._plans[a] = b
        return b

    def assignment_of(self, bundle: PlanBundle) -> Assignment | None:
        """The point of this space a plan came from (None when it is not one: another
        workload, or per-task schedules this space does not express)."""
        if bundle.workload.key != self.workload.key:
            return None
        kind_of = {t.name: t.kind for t in bundle.task_graph.tasks}
        per_group: dict[str, dict] = {}
        for task, _, pairs in bundle.lowering_plan.tasks:
            for g, kinds in GROUPS.items():
                if kind_of.get(task) in kinds and pairs:
                    per_group.setdefault(g, dict(pairs))
        values = []
        for d in self.decisions:
            if d.field == "schedule":
                group, knob = str(d.position).split(".", 1)
                values.append(per_group.get(group, {}).get(knob, d.choices[0]))
            else:
                values.append(self._value(bundle.knobs, d))
        a = tuple(values)
        try:
            return a if self.bundle(a).key == bundle.key else None
        except BoundFlowError:
            return None

    def describe(self, a: Assignment, base: Assignment | None = None) -> str:
        """``a`` readably: the choices that differ from ``base`` (default: the default)."""
        base = self.default() if base is None else base
        diff = [f"{d.name}={v}" for d, v, b in zip(self.decisions, a, base) if v != b]
        return ", ".join(diff) if diff else "(the default plan)"
