"""Knobs: every searchable choice the planner takes for one workload.

Knobs are positional: each field lines up with one list of decisions of the workload's
:class:`~boundflow.planner.space.SearchSpace` (its fusible edges, pre-activations, conv
regions, affine nodes), so they carry no node names, hash the same for structurally equal
models and map one-to-one onto the variables of a solver. Per-task choices (lowering and the
backend's opaque schedule parameters) are keyed by task name, because tasks exist only once a
partition is chosen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from boundflow.errors import BoundFlowError
from boundflow.ir.task_graph import freeze, parse_json, record, thaw

LAYOUTS = ("NCHW", "NHWC")
# a task's lowering: a ``torch`` (ATen) callback, a ``tir`` kernel, or ``auto``: the planner's
# cost rule picks one of the two per task (``planner.passes.auto_lowering``)
LOWERINGS = ("torch", "tir", "auto")
STORAGE = ("reuse", "none")


@dataclass(frozen=True)
class Knobs:
    """``partition``: per fusible edge, fuse its two nodes into one task; ``domains``: per
    pre-activation, ``ibp`` or ``crown``; ``final``: ``ibp`` / ``crown`` / ``alpha-crown``;
    ``layouts``: per conv region, ``NCHW`` or ``NHWC``; ``forms``: per affine node, keep its
    interval as ``lu`` (lower/upper) or ``cr`` (centre/radius); ``lowering``: every task's
    lowering unless ``task_lowering`` overrides it; ``schedule``: per task, backend-owned
    parameters as (name, value) pairs; ``storage``: ``reuse`` buffers or give each its own;
    ``fuse_passes``: let the backend's own fusion passes (Relax FuseOps + FuseTIR) merge
    neighbouring task kernels further."""

    partition: tuple[bool, ...] = ()
    domains: tuple[str, ...] = ()
    final: str = "crown"
    layouts: tuple[str, ...] = ()
    forms: tuple[str, ...] = ()
    lowering: str = "torch"
    task_lowering: tuple[tuple[str, str], ...] = ()
    schedule: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    storage: str = "reuse"
    fuse_passes: bool = False

    def __post_init__(self):
        bad = [v for v in self.layouts if v not in LAYOUTS]
        bad += [v for v in self.forms if v not in ("lu", "cr")]
        bad += [v for v in (self.lowering, *dict(self.task_lowering).values())
                if v not in LOWERINGS]
        if self.storage not in STORAGE:
            bad.append(self.storage)
        if bad:
            raise BoundFlowError(f"knobs hold unknown choices {bad}")
        if not isinstance(self.fuse_passes, bool):
            raise BoundFlowError("knobs.fuse_passes must be a boolean")
        if not all(isinstance(p, bool) for p in self.partition):
            raise BoundFlowError("partition knobs must be booleans")

    def to_json(self) -> str:
        return json.dumps(thaw(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Any) -> "Knobs":
        return record(cls, d)

    @classmethod
    def from_json(cls, text: str) -> "Knobs":
        return cls.from_dict(parse_json(text, "knobs are not valid JSON"))

    @property
    def key(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "Knobs":
        d = thaw(self)
        d.update({k: thaw(freeze(v)) for k, v in changes.items()})
        return Knobs.from_dict(d)

    def task_schedule(self, task: str) -> tuple[tuple[str, Any], ...]:
        return dict(self.schedule).get(task, ())

    def lowering_of(self, task: str) -> str:
        return dict(self.task_lowering).get(task, self.lowering)
