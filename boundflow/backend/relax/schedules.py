"""Schedules for the task PrimFuncs, driven by a task's schedule knobs.

The knobs and their legal values are this backend's to define, per target kind
(``space(target)``), so a search can enumerate them; a task's knobs come from the plan's
lowering plan as (name, value) pairs. A primitive that does not apply to a stage (a shape it
cannot split, a stage that cannot be inlined) is skipped for that stage, never an error.

llvm (every stage of the function):

- ``inline``: fold single-use elementwise stages (centre/radius conversions, epilogues) into
  their readers;
- ``parallel``: fuse the two outer spatial loops of each stage and run them in parallel;
- ``vectorize``: split the innermost spatial loop of elementwise stages by that width (and, with
  ``tile``, vectorise the tile of reduction stages);
- ``tile``: register tiling of reduction stages (linear, conv, the CROWN products): the
  innermost spatial loop is split by the tile and the reduction loops moved outside the tile,
  so each loaded weight / input element is used for a whole tile of outputs;
- ``cache_write``: with ``tile``, accumulate the tile in a ``local`` buffer written back per
  tile;
- ``unroll``: the auto-unroll limit of reduction stages.

cuda: ``threads`` = 0 hands the function to TVM's default GPU pipeline (dlight); a positive
value binds every stage itself: its spatial loops fused and split over ``blockIdx.x`` ×
``threadIdx.x`` with that many threads per block (reductions run serially inside a thread).
A function whose stages cannot all be bound that way goes to dlight.
"""

from __future__ import annotations

from typing import Any, Mapping

from tvm import s_tir, tirx

from boundflow.backend.relax.schedule_space import CUDA, LLVM, _kind, check, sample, space

__all__ = ["schedule", "space", "check", "sample", "LLVM", "CUDA"]

_REDUCE = 2                                  # IterVar.iter_type of a reduction axis
_ERRORS = (RuntimeError, ValueError, TypeError)   # what TVM raises (ScheduleError is a RuntimeError)


def _try(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except _ERRORS:
        return False


def _is_reduction(sch: s_tir.Schedule, b) -> bool:
    return any(int(iv.iter_type) == _REDUCE for iv in sch.get(b).iter_vars)


def schedule(func: tirx.PrimFunc, knobs: Mapping[str, Any], target: Any) -> tirx.PrimFunc:
    """``func`` scheduled for ``target`` under ``knobs`` (see the module docstring)."""
    k = check(knobs, target)
    if _kind(target) == "cuda":
        return _cuda(func, k["threads"])
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    if k["inline"]:
        for b in list(sch.get_child_blocks(root)):
            if sch.get(b).name_hint not in outputs and not _is_reduction(sch, b):
                _try(sch.compute_inline, b)
    for b in list(sch.get_child_blocks(root)):
        if _is_reduction(sch, b) and k["tile"]:
            _tile_reduction(sch, b, k["tile"], k["cache_write"], k["vectorize"])
        blk = sch.get(b)
        n_spatial = sum(int(iv.iter_type) != _REDUCE for iv in blk.iter_vars)
        if k["parallel"] and n_spatial >= 2:
            loops = sch.get_loops(b)
            if _try(sch.fuse, loops[0], loops[1]):
                loops = sch.get_loops(b)
            _try(sch.parallel, loops[0])
        if _is_reduction(sch, b):
            if k["unroll"]:
                _try(sch.annotate, sch.get_loops(b)[0], "pragma_auto_unroll_max_step",
                     k["unroll"])
        elif k["vectorize"] and len(sch.get_loops(b)) >= 2:
            try:
                parts = sch.split(sch.get_loops(b)[-1], factors=[None, k["vectorize"]])
            except _ERRORS:
                continue
            _try(sch.vectorize, parts[-1])
    return sch.mod["main"]


def _tile_reduction(sch: s_tir.Schedule, b, tile: int, cache_write: bool,
                    vectorize: int) -> None:
    """Register tiling of reduction block ``b`` (see ``tile`` in the module docstring); left
    as it is where the innermost spatial extent is not a known multiple of ``tile``."""
    kinds = [int(iv.iter_type) == _REDUCE for iv in sch.get(b).iter_vars]
    loops = sch.get_loops(b)
    if len(loops) != len(kinds) or kinds != sorted(kinds):      # spatial loops, then reduce
        return
    n_sp = kinds.index(True)
    if n_sp < 2:
        return
    ext = sch.get(loops[n_sp - 1]).extent
    if not isinstance(ext, tirx.IntImm) or int(ext) < tile or int(ext) % tile:
        return
    cw = None
    if cache_write:
        try:
            cw = sch.cache_write(b, 0, "local")
        except _ERRORS:
            cw = None
    loops = sch.get_loops(b)
    outer, inner = sch.split(loops[n_sp - 1], factors=[None, tile])
    reduce_loops = sch.get_loops(b)[n_sp + 1:]
    sch.reorder(outer, *reduce_loops, inner)
    if cw is not None:
        sch.reverse_compute_at(cw, outer)
    if vectorize:
        try:
            init = sch.decompose_reduction(b, reduce_loops[0])
        except _ERRORS:
            return
        _try(sch.vectorize, sch.get_loops(init)[-1])
        _try(sch.vectorize, sch.get_loops(b)[-1])
        if cw is not None:
            _try(sch.vectorize, sch.get_loops(cw)[-1])


def _cuda(func: tirx.PrimFunc, threads: int) -> tirx.PrimFunc:
    """``func`` with every stage bound over blocks × ``threads``; ``func`` unchanged (for the
    default GPU pipeline) when ``threads`` is 0 or a stage cannot be bound."""
    if not threads:
        return func
    sch = s_tir.Schedule(func)
    try:
        for b in sch.get_child_blocks(sch.get_sblock("root")):
            kinds = [int(iv.iter_type) == _REDUCE for iv in sch.get(b).iter_vars]
            loops = sch.get_loops(b)
            if len(loops) != len(kinds) or kinds != sorted(kinds) or not kinds or kinds[0]:
                return func
            n_sp = kinds.count(False)
            fused = sch.fuse(*loops[:n_sp]) if n_sp > 1 else loops[0]
            bx, tx = sch.split(fused, factors=[None, threads])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
    except _ERRORS:
        return func
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)     # dlight leaves it alone
