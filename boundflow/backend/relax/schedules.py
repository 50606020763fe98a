"""Schedules for the task PrimFuncs, driven by a task's schedule knobs.

The knobs and their legal values are this backend's to define (``SPACE``), so a search can
enumerate them; a task's knobs come from the plan's lowering plan as (name, value) pairs.

llvm: ``inline`` folds single-use elementwise stages (centre/radius conversions, epilogues)
into their readers; ``parallel`` runs the outer spatial loops of each stage in parallel;
``vectorize`` splits the innermost spatial loop of elementwise stages by that width;
``unroll`` sets the auto-unroll limit of reduction stages. A primitive that does not apply to
a stage (a shape it cannot split, a stage that cannot be inlined) is skipped for that stage,
never an error. For ``cuda`` the default GPU pipeline (dlight) schedules the functions.
"""

from __future__ import annotations

from typing import Any, Mapping

import tvm
from tvm import s_tir, tirx

SPACE: dict[str, tuple[Any, ...]] = {      # first value of each: the default
    "inline": (False, True),     # inlining a conversion into a conv re-computes it per tap
    "parallel": (True, False),
    "vectorize": (0, 4, 8, 16),
    "unroll": (64, 0, 16),
}
DEFAULT: dict[str, Any] = {name: choices[0] for name, choices in SPACE.items()}

_REDUCE = 2          # IterVar.iter_type of a reduction axis


def check(knobs: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs with defaults filled in; an unknown name or value raises."""
    from boundflow.errors import BoundFlowError

    out = dict(DEFAULT)
    for name, value in knobs.items():
        if name not in SPACE:
            raise BoundFlowError(f"schedule knob {name!r} is not one of {sorted(SPACE)}")
        if value not in SPACE[name]:
            raise BoundFlowError(f"schedule knob {name}={value!r} is not one of {SPACE[name]}")
        out[name] = value
    return out


def _try(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except (tvm.error.TVMError, s_tir.ScheduleError, ValueError):
        return False


def schedule(func: tirx.PrimFunc, knobs: Mapping[str, Any], target: Any) -> tirx.PrimFunc:
    """``func`` scheduled for ``target`` under ``knobs`` (see the module docstring)."""
    k = check(knobs)
    if getattr(target, "kind", None) is not None and target.kind.name != "llvm":
        return func
    sch = s_tir.Schedule(func)
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(sch.get_sblock("root"))}

    def blocks():
        return sch.get_child_blocks(sch.get_sblock("root"))

    if k["inline"]:
        for b in list(blocks()):
            blk = sch.get(b)
            if blk.name_hint not in outputs and all(int(iv.iter_type) != _REDUCE
                                                    for iv in blk.iter_vars):
                _try(sch.compute_inline, b)
    for b in blocks():
        blk = sch.get(b)
        reduce = any(int(iv.iter_type) == _REDUCE for iv in blk.iter_vars)
        loops = sch.get_loops(b)
        n_spatial = sum(int(iv.iter_type) != _REDUCE for iv in blk.iter_vars)
        if k["parallel"] and n_spatial >= 2:
            outer = loops[:2]
            if _try(sch.fuse, *outer):
                loops = sch.get_loops(b)
            _try(sch.parallel, loops[0])
        if reduce:
            if k["unroll"]:
                _try(sch.annotate, sch.get_loops(b)[0], "pragma_auto_unroll_max_step",
                     k["unroll"])
        elif k["vectorize"] and len(sch.get_loops(b)) >= 2:
            inner = sch.get_loops(b)[-1]
            parts = None
            try:
                parts = sch.split(inner, factors=[None, k["vectorize"]])
            except (tvm.error.TVMError, s_tir.ScheduleError, ValueError):
                parts = None
            if parts is not None:
                _try(sch.vectorize, parts[-1])
    return sch.mod["main"]


def sample(rng) -> tuple[tuple[str, Any], ...]:
    """Random legal schedule knobs of one task (``rng``: a ``random.Random``), as the
    (name, value) pairs ``Knobs.schedule`` holds."""
    return tuple(sorted((name, rng.choice(choices)) for name, choices in SPACE.items()))
