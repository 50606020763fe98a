"""The PlanBundle: everything a backend needs to run one plan, as one JSON-able value.

``task_graph`` (what runs, over which buffers), ``domain_plan`` (which method bounds what),
``layout_plan`` (conv regions' layouts, permutes made free, conversions inserted, graph
rewrites), ``storage_plan`` (liveness, buffer slots, in-place writes, planned bytes),
``cache_plan`` (what the BoundCache may keep, under which key), ``lowering_plan`` (per task:
lowering and schedule), plus the ``knobs`` and ``workload`` it came from. ``to_json`` /
``from_json`` round-trip exactly; a JSON of another schema version is refused by name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

from boundflow.errors import BoundFlowError
from boundflow.ir.domain_plan import DomainPlan
from boundflow.ir.graph import memo
from boundflow.ir.knobs import Knobs
from boundflow.ir.task_graph import (Buffer, PlanError, Task, TaskGraph, parse_json, record,
                                     thaw)
from boundflow.ir.workload import Workload

SCHEMA_VERSION = 1
CACHE_SCOPES = ("run", "persistent")
# fields a cache key may hold (see boundflow.runtime.cache.CacheKey)
KEY_FIELDS = ("task", "domain", "spec", "box", "split", "layout")


@dataclass(frozen=True)
class DomainSection:
    """The domain plan as chosen (``intermediate``, ``final``), the pre-activations CROWN
    actually tightens (``crown_nodes``: those marked crown whose IBP interval is not already
    exact) and the relaxation options."""

    intermediate: tuple[tuple[str, str], ...]
    final: str
    crown_nodes: tuple[str, ...]
    lower_slope: str = "adaptive"
    alpha: tuple[tuple[str, Any], ...] = ()
    # crown tasks bound: False every neuron; None (auto) the neurons whose bound can change
    # a result, where faster (same bounds as False); True only the IBP-unstable neurons
    sparse: bool | None = False

    @property
    def plan(self) -> DomainPlan:
        return DomainPlan(self.intermediate, self.final)


@dataclass(frozen=True)
class LayoutPlan:
    """``regions``: (nodes, "NCHW" | "NHWC") per conv region; ``views``: permute / reshape
    nodes that move no data under this layout; ``conversions``: the layout tasks inserted;
    ``rewrites``: what normalisation did to the graph (permutes cancelled, sunk, folded)."""

    regions: tuple[tuple[tuple[str, ...], str], ...] = ()
    views: tuple[str, ...] = ()
    conversions: tuple[str, ...] = ()
    rewrites: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoragePlan:
    """Per buffer its live range (first/last task index), its slot; slot sizes; buffers
    written in place over a dying input. Sizes are bytes per sample (the batch is a run-time
    value): ``planned_bytes`` with this assignment, ``unshared_bytes`` with a slot each."""

    reuse: bool
    liveness: tuple[tuple[str, int, int], ...]
    slots: tuple[int, ...]
    assignment: tuple[tuple[str, int], ...]
    inplace: tuple[str, ...]
    planned_bytes: int
    unshared_bytes: int

    def slot_of(self, buffer: str) -> int:
        return dict(self.assignment)[buffer]


@dataclass(frozen=True)
class CacheEntry:
    task: str
    scope: str
    key: tuple[str, ...]


@dataclass(frozen=True)
class CachePlan:
    entries: tuple[CacheEntry, ...] = ()

    def entry(self, task: str) -> CacheEntry | None:
        for e in self.entries:
            if e.task == task:
                return e
        return None


@dataclass(frozen=True)
class LoweringPlan:
    """Per task: ``(task, lowering, schedule pairs)``."""

    tasks: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...] = ()

    def lowering(self, task: str) -> str:
        return {t: low for t, low, _ in self.tasks}[task]


@dataclass(frozen=True)
class PlanBundle:
    workload: Workload
    knobs: Knobs
    graph_hash: str               # structural hash of the graph the tasks refer to
    task_graph: TaskGraph
    domain_plan: DomainSection
    layout_plan: LayoutPlan
    storage_plan: StoragePlan
    cache_plan: CachePlan
    lowering_plan: LoweringPlan
    schema_version: int = SCHEMA_VERSION

    def to_json(self, indent: int | None = None) -> str:
        d = {
            "schema_version": self.schema_version,
            "workload": self.workload.to_dict(),
            "knobs": thaw(self.knobs),
            "graph_hash": self.graph_hash,
            "task_graph": {"tasks": thaw(self.task_graph.tasks),
                           "buffers": thaw(self.task_graph.buffers),
                           "output": self.task_graph.output},
            "domain_plan": thaw(self.domain_plan),
            "layout_plan": thaw(self.layout_plan),
            "storage_plan": thaw(self.storage_plan),
            "cache_plan": thaw(self.cache_plan),
            "lowering_plan": thaw(self.lowering_plan),
        }
        return json.dumps(d, sort_keys=True, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "PlanBundle":
        d = parse_json(text, "not a plan JSON")
        if not isinstance(d, dict) or "schema_version" not in d:
            raise BoundFlowError("not a plan JSON: it has no schema_version")
        if d["schema_version"] != SCHEMA_VERSION:
            raise BoundFlowError(f"plan JSON has schema version {d['schema_version']!r}; "
                                 f"this BoundFlow reads version {SCHEMA_VERSION} (re-plan "
                                 f"the model with this version)")
        try:
            tg = d["task_graph"]
            task_graph = TaskGraph(tuple(record(Task, t) for t in tg["tasks"]),
                                   tuple(record(Buffer, b) for b in tg["buffers"]),
                                   str(tg["output"]))
            return cls(
                workload=Workload.from_dict(d["workload"]),
                knobs=Knobs.from_dict(d["knobs"]),
                graph_hash=str(d["graph_hash"]),
                task_graph=task_graph,
                domain_plan=record(DomainSection, d["domain_plan"]),
                layout_plan=record(LayoutPlan, d["layout_plan"]),
                storage_plan=record(StoragePlan, d["storage_plan"]),
                cache_plan=record(CachePlan, d["cache_plan"], {"entries": CacheEntry}),
                lowering_plan=record(LoweringPlan, d["lowering_plan"]),
                schema_version=SCHEMA_VERSION,
            )
        except KeyError as e:
            raise PlanError(f"plan JSON lacks the field {e.args[0]!r}") from None
        except TypeError as e:
            raise PlanError(f"plan JSON is malformed: {e}") from None

    @property
    def key(self) -> str:
        """Hash of the whole plan (what a compile cache keys on; computed once)."""
        return memo(self, "_key",
                    lambda: hashlib.sha256(self.to_json().encode()).hexdigest()[:24])

    @property
    def compile_key(self) -> str:
        """The key of what a backend compiles of this plan: :attr:`key` of the plan with
        its workload reading both sides. A lower-bounds workload's plan (a verdict's) and its
        both-sides twin compile to the same module (the side is an argument of each call),
        so they share one compiled module."""
        if self.workload.bounds == "both":
            return self.key
        return memo(self, "_compile_key", lambda: replace(
            self, workload=replace(self.workload, bounds="both")).key)

    def peak_bytes(self, batch: int | None = None) -> int:
        """Planned bytes of buffer memory at ``batch`` (default: the workload's)."""
        return self.storage_plan.planned_bytes * (batch or self.workload.batch)
