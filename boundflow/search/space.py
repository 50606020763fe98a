"""The tuning space of one workload: the backend, the planner's decisions, how each group of
tasks is lowered, and the backends' schedule knobs.

A point is an **assignment**: one choice per decision, a tuple in ``decisions`` order, so it
hashes and compares. The decisions:

* ``backend[0]``: the backend that runs the plan, one of the backends searched (registered
  names; the default verify backend first when it is searched);
* the planner's decisions (:class:`~boundflow.planner.space.SearchSpace`): partition, domains,
  final, layouts, forms, storage, Relax fusion; not the domain of a pre-activation IBP bounds
  exactly (``ibp_exact_nodes``: the planner ignores it there), which keeps the default's;
* ``lowering[<group>]`` for the forward tasks (``fwd``: ibp, layout), the ``crown`` tasks and
  the ``final`` task: how a backend that compiles lowers them, one of
  :data:`~boundflow.ir.knobs.LOWERINGS` (a ``tir`` kernel or a ``torch`` callback). An
  extern-library lowering (a BLAS or oneDNN call per task) joins the space as one more value
  of ``LOWERINGS`` once a backend's ``compiles`` and executor know it: the choices are read
  from there, nothing here changes;
* ``schedule[<group>.<knob>]``: the schedule knobs of the backends that tune schedules, once
  for the forward tasks (ibp, layout) and once for the backward tasks (crown, final):
  per-task schedules would multiply the space by the number of tasks for little gain.

Lowering, Relax fusion and schedule decisions exist only when a searched backend tunes
schedules, and change nothing on a backend that does not (torch): there the plan keeps the
default knobs' values, so the default assignment on the torch backend is exactly the plan that
``verify`` runs without a database (:func:`boundflow.api.default_plan`).

A **candidate** is a plan on a backend: ``candidate(a)`` is ``(PlanBundle.key, backend)``; two
assignments may give the same candidate (schedules of a plan with no backward task, or any
lowering choice on the torch backend), so callers identify candidates by it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from boundflow.errors import BoundFlowError
from boundflow.ir.graph import Graph
from boundflow.ir.knobs import LOWERINGS, Knobs
from boundflow.ir.plan import PlanBundle
from boundflow.ir.workload import Workload

GROUPS = {"fwd": ("ibp", "layout"), "bwd": ("crown", "final")}           # schedules
LOWERING_GROUPS = {"fwd": ("ibp", "layout"), "crown": ("crown",), "final": ("final",)}
_COMPILED_ONLY = ("fuse_passes",)        # planner decisions only a compiling backend reads
DEFAULT_BACKEND = "torch"                # what `verify` runs without --db (BoundOptions)

Assignment = tuple
Candidate = tuple          # (PlanBundle.key, backend name)


@dataclass(frozen=True)
class Decision:
    field: str                  # "backend", a Knobs field, "lowering" or "schedule"
    position: int | str         # index in the field; the group for lowering;
    choices: tuple[Any, ...]    # "<group>.<knob>" for schedules

    @property
    def name(self) -> str:
        return f"{self.field}[{self.position}]"


def backend_names(backends: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """The backends a space searches: a name, names (a sequence or ``"a,b"``), or None for
    every registered backend; the default verify backend first; each checked."""
    from boundflow import backend as registry

    if backends is None:
        names = list(registry.names())
    elif isinstance(backends, str):
        names = [b.strip() for b in backends.split(",") if b.strip()]
    else:
        names = list(backends)
    if not names:
        raise BoundFlowError("no backend to search: name one or more of "
                             f"{', '.join(registry.names())}")
    for n in names:
        registry.create(n)                   # names the valid ones if not one
    names = list(dict.fromkeys(names))
    names.sort(key=lambda n: n != DEFAULT_BACKEND)
    return tuple(names)


class TuneSpace:
    """See the module docstring. ``backends``: see :func:`backend_names`."""

    def __init__(self, graph: Graph, workload: Workload,
                 backends: str | tuple[str, ...] | list[str] | None = None):
        from boundflow import backend as registry
        from boundflow.planner import space as planner_space

        self.graph, self.workload = graph, workload
        self.backends = backend_names(backends)
        self._impl = {b: registry.create(b) for b in self.backends}
        self.compiling = tuple(b for b in self.backends if self._impl[b].tunes_schedules)
        self.base = planner_space(graph, workload)
        self._plans: dict[tuple, PlanBundle] = {}

    @property
    def backend(self) -> str:
        """The first backend searched (the default verify backend when it is one)."""
        return self.backends[0]

    def tunes(self, backend: str) -> bool:
        """Whether lowering, Relax fusion and schedules change ``backend``'s code."""
        return self._impl[backend].tunes_schedules

    @cached_property
    def _default_knobs(self) -> Knobs:
        from boundflow.planner import default as default_knobs

        return default_knobs(self.graph, self.workload)

    @cached_property
    def _exact(self) -> frozenset[str]:
        """Pre-activations IBP bounds exactly: the planner runs no backward or forward pass
        there whatever their domain knob says, so the knob is no decision (each choice would
        be the same compiled code under another plan key, measured again)."""
        from boundflow.ir.analysis import ibp_exact_nodes
        from boundflow.planner import normalised

        return frozenset(ibp_exact_nodes(normalised(self.graph)[0]))

    @cached_property
    def decisions(self) -> tuple[Decision, ...]:
        out = [Decision("backend", 0, self.backends)]
        out += [Decision(f, i, c) for f, i, c in self.base.decisions()
                if f != "lowering" and (self.compiling or f not in _COMPILED_ONLY)
                and not (f == "domains" and self.base.preactivations[i] in self._exact)]
        if self.compiling:
            kinds = {"ibp", "layout", "final"} | \
                ({"crown"} if "crown" in self.base.domain_choices else set())
            default = self._default_knobs.lowering
            order = (default,) + tuple(v for v in LOWERINGS if v != default)
            for group, members in LOWERING_GROUPS.items():
                if kinds & set(members):
                    out.append(Decision("lowering", group, order))
            schedules: dict[str, tuple] = {}
            for b in self.compiling:
                schedules.update(self._impl[b].schedule_space(self.workload.target))
            for group in GROUPS:
                for knob, choices in schedules.items():
                    out.append(Decision("schedule", f"{group}.{knob}", tuple(choices)))
        return tuple(out)

    @property
    def size(self) -> int:
        n = 1
        for d in self.decisions:
            n *= len(d.choices)
        return n

    def default(self, backend: str | None = None) -> Assignment:
        """The planner's heuristic plan, with default lowering and schedules, on ``backend``
        (default: the first searched, the default verify backend when it is one)."""
        k = self._default_knobs
        a = tuple(self._value(k, d) for d in self.decisions)
        return self.with_choice(a, 0, backend or self.backend)

    def _value(self, k: Knobs, d: Decision) -> Any:
        if d.field == "backend":
            return self.backend
        if d.field in ("schedule", "lowering"):
            return d.choices[0]
        v = getattr(k, d.field)
        return v[d.position] if isinstance(v, tuple) else v

    def seeds(self) -> list[Assignment]:
        """The first points a tuner measures after the default (in the order its model
        scores them, ``Tuner._seeds``): the default plan on every other backend searched,
        and, on each backend that has them, its schedule presets
        (``schedule_presets(target)``) on the default plan, for every task and for the
        backward tasks only; here in that order."""
        out = [self.default(b) for b in self.backends[1:]]
        for b in self.compiling:
            presets = getattr(self._impl[b], "schedule_presets", None)
            base = self.default(b)
            for preset in (presets(self.workload.target) if presets else ()):
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

    def backend_of(self, a: Assignment) -> str:
        return a[0]

    def knobs(self, a: Assignment) -> Knobs:
        """The planner knobs of ``a`` (per-task lowering and schedules not yet: see
        ``bundle``). On a backend that tunes no schedules, the default knobs' lowering and
        fusion."""
        tuned = self.tunes(self.backend_of(a))
        values = {(d.field, d.position): v for d, v in zip(self.decisions, a)
                  if d.field not in ("backend", "schedule", "lowering")
                  and (tuned or d.field not in _COMPILED_ONLY)}
        return self.base.from_choices(values, base=self._default_knobs)

    def schedules(self, a: Assignment) -> dict[str, tuple[tuple[str, Any], ...]]:
        """Per group, the schedule pairs ``a`` gives its tasks (non-default values only;
        none on a backend that tunes no schedules)."""
        out: dict[str, list] = {g: [] for g in GROUPS}
        if self.tunes(self.backend_of(a)):
            for d, v in zip(self.decisions, a):
                if d.field == "schedule" and v != d.choices[0]:
                    group, knob = str(d.position).split(".", 1)
                    out[group].append((knob, v))
        return {g: tuple(sorted(p)) for g, p in out.items()}

    def lowerings(self, a: Assignment) -> dict[str, str]:
        """Per lowering group, the lowering ``a`` gives its tasks (the default knobs' on a
        backend that tunes none)."""
        out = {g: self._default_knobs.lowering for g in LOWERING_GROUPS}
        if self.tunes(self.backend_of(a)):
            out.update({str(d.position): v for d, v in zip(self.decisions, a)
                        if d.field == "lowering"})
        return out

    def bundle(self, a: Assignment) -> PlanBundle:
        """The plan of ``a`` (cached by the plan's own choices, whatever the backend)."""
        from boundflow.planner import plan

        k = self.knobs(self.check(a))
        groups, lowering = self.schedules(a), self.lowerings(a)
        memo = (k.key, tuple(sorted(groups.items())), tuple(sorted(lowering.items())))
        hit = self._plans.get(memo)
        if hit is not None:
            return hit
        if any(groups.values()) or len(set(lowering.values())) > 1 or \
                lowering["fwd"] != k.lowering:
            tasks = plan(self.graph, self.workload, k).task_graph.tasks
            per_task, per_lowering = [], []
            for t in tasks:
                for g, kinds in GROUPS.items():
                    if t.kind in kinds and groups[g]:
                        per_task.append((t.name, groups[g]))
                for g, kinds in LOWERING_GROUPS.items():
                    if t.kind in kinds and lowering[g] != lowering["fwd"]:
                        per_lowering.append((t.name, lowering[g]))
            k = k.replace(schedule=tuple(per_task), lowering=lowering["fwd"],
                          task_lowering=tuple(per_lowering))
        b = plan(self.graph, self.workload, k)
        if len(self._plans) > 20000:
            self._plans.clear()
        self._plans[memo] = b
        return b

    def candidate(self, a: Assignment) -> Candidate:
        """``(plan key, backend)``: what is measured when ``a`` is."""
        return self.bundle(a).key, self.backend_of(a)

    def assignment_of(self, bundle: PlanBundle, backend: str | None = None
                      ) -> Assignment | None:
        """The point of this space a plan on ``backend`` (default: the first searched) came
        from (None when it is not one: another workload, a backend not searched, or per-task
        choices this space does not express). A plan an older BoundFlow stored with another
        domain on an exact pre-activation maps to its twin here (``_twin``): the same code."""
        backend = backend or self.backend
        if bundle.workload.key != self.workload.key or backend not in self.backends:
            return None
        kind_of = {t.name: t.kind for t in bundle.task_graph.tasks}
        per_group: dict[str, dict] = {}
        lowering: dict[str, str] = {}
        for task, low, pairs in bundle.lowering_plan.tasks:
            for g, kinds in GROUPS.items():
                if kind_of.get(task) in kinds and pairs:
                    per_group.setdefault(g, dict(pairs))
            for g, kinds in LOWERING_GROUPS.items():
                if kind_of.get(task) in kinds:          # the knob (``auto`` unresolved)
                    lowering.setdefault(g, bundle.knobs.lowering_of(task))
        values = []
        for d in self.decisions:
            if d.field == "backend":
                values.append(backend)
            elif d.field == "schedule":
                group, knob = str(d.position).split(".", 1)
                values.append(per_group.get(group, {}).get(knob, d.choices[0]))
            elif d.field == "lowering":
                values.append(lowering.get(str(d.position), d.choices[0]))
            else:
                values.append(self._value(bundle.knobs, d))
        a = tuple(values)
        try:
            mine = self.bundle(a)
            if mine.key == bundle.key:
                return a
            return a if self._twin(bundle, mine) else None
        except BoundFlowError:
            return None

    def _twin(self, stored: PlanBundle, mine: PlanBundle) -> bool:
        """Whether ``stored`` (a plan read from a database, made by a BoundFlow whose space
        decided the domain of exact pre-activations) is ``mine`` but for the domain knob of
        pre-activations IBP bounds exactly, which changes no code: its knobs must give
        exactly it (so it is honest) and, those domains set to ``mine``'s, ``mine``'s knobs."""
        from boundflow.planner import plan

        pre = self.base.preactivations
        if stored.knobs.domains == mine.knobs.domains or len(stored.knobs.domains) != len(pre):
            return False
        domains = tuple(m if p in self._exact else s for p, s, m in
                        zip(pre, stored.knobs.domains, mine.knobs.domains))
        if stored.knobs.replace(domains=domains) != mine.knobs:
            return False
        return plan(self.graph, self.workload, stored.knobs).key == stored.key

    def describe(self, a: Assignment, base: Assignment | None = None) -> str:
        """``a`` readably: its backend, and the choices that differ from ``base`` (default:
        the default plan on that backend) and matter on it."""
        backend = self.backend_of(a)
        base = self.default(backend) if base is None else base
        tuned = self.tunes(backend)
        diff = [f"{d.name}={v}" for d, v, b in zip(self.decisions, a, base)
                if v != b and d.field != "backend"
                and (tuned or d.field not in ("lowering", "schedule", *_COMPILED_ONLY))]
        return f"{backend}: " + (", ".join(diff) if diff else "the default plan")
