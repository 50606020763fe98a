"""Schedules for the task PrimFuncs, driven by a task's schedule knobs.

The knobs and their legal values are this backend's to define, per target kind
(``space(target)``), so a search can enumerate them; a task's knobs come from the plan's
lowering plan as (name, value) pairs. A primitive that does not apply to a stage (a shape it
cannot split, a stage that cannot be inlined) is skipped for that stage, never an error.

llvm (every stage of the function); ``auto`` (the default) lets a rule pick per stage from its
shape and the CPU's vector width, as MetaSchedule's and Ansor's rule-based first schedules do:

- ``inline``: fold elementwise stages (centre/radius conversions, epilogues) into their
  readers, except where a reader has more loops (a per-neuron slope read by every spec row
  would be recomputed per row);
- ``parallel``: fuse the two outer loops of each stage and run them in parallel;
- ``vectorize``: split the innermost loop of elementwise stages by that width and vectorise it
  (``auto``: the CPU's lanes where the extent divides);
- ``tile`` / ``tile_rows``: the register tile of reduction stages (linear, conv, the CROWN
  products): ``tile`` vectorised columns of the innermost spatial loop times ``tile_rows``
  rows of the next one, with the reduction loops moved outside the tile (innermost reduction
  unrolled by 4), so each loaded weight / input element is used for a whole tile of outputs.
  ``auto``: ``tile`` = the CPU's lanes, at least 16 (a cache line of float32: two AVX2
  vectors; one left the FMA units half idle), where they divide the extent (the whole row
  where it is shorter, else its widest divisor down to 4: 10 for 50), ``tile_rows`` = the
  first of 4, 3, 5, 2 that provably divides the row extent (the kernels pad a symbolic batch
  to a multiple of 4 so that it does); 0 / 1 turn either off;
- ``cache_write``: accumulate the tile in a ``local`` buffer written back per tile;
- ``unroll``: the auto-unroll limit of reduction stages.

cuda: with ``threads`` and ``shared`` both 0 the function goes to TVM's default GPU pipeline
(dlight). ``threads`` > 0 with ``shared`` 0 binds every stage itself: its spatial loops fused
and split over ``blockIdx.x`` × ``threadIdx.x`` with that many threads per block (reductions
run serially inside a thread). ``shared`` > 0 (a reduction chunk; 16, the default) schedules
each reduction stage by its shape, with ``threads`` (128 where 0) as the block's thread
budget:

- reuse (some input is not indexed by some output loop of extent > 1, as a weight is not by
  the batch), a reduction of at least 32, inner reduction loops (all but the outermost) of
  at most 2 × ``shared`` elements (a convolution's window), and outputs that give both a
  block and a thread level: multi-level tiling. Each spatial loop
  is split into a block part and a thread part (innermost loops first; a symbolic batch
  stays on blocks), the outermost reduction loop split into chunks (a divisor of it) of
  about ``shared`` elements together with the inner reduction loops, every input staged
  per chunk in shared memory by the block's threads together (48 KB at most, else the
  function goes to dlight), the accumulator in a register;
- otherwise, a reduction of at least 64 (a bias term ``Σ A·b`` per spec row, a reduction over
  a whole map): one block per output, the reduction spread over a warp or two (32 or 64
  threads whatever ``threads`` says: cross-thread reduction);
- otherwise bound as ``threads`` does.

A function whose stages cannot all be scheduled that way goes to dlight (logged at debug).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import tvm
from tvm import s_tir, sym, tirx

from boundflow.backend.relax.schedule_space import AUTO, CUDA, LLVM, _kind, check, sample, space

__all__ = ["schedule", "space", "check", "sample", "LLVM", "CUDA"]

_REDUCE = 2                                  # IterVar.iter_type of a reduction axis
_SHARED_BYTES = 48 * 1024                     # static shared memory per block on every GPU
log = logging.getLogger("boundflow.relax")
_ERRORS = (RuntimeError, ValueError, TypeError)   # TVM's (ScheduleError is a RuntimeError)


def _try(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except _ERRORS:
        return False


def _reused(sch: s_tir.Schedule, b) -> bool:
    """Whether a reader of block ``b`` has more spatial loops than ``b`` (each element is
    read by many of its iterations): inlining would recompute it that many times."""
    def spatial(block) -> int:
        return sum(int(iv.iter_type) != _REDUCE for iv in sch.get(block).iter_vars)
    own = spatial(b)
    return any(spatial(c) > own for c in sch.get_consumers(b))


def _is_reduction(sch: s_tir.Schedule, b) -> bool:
    return any(int(iv.iter_type) == _REDUCE for iv in sch.get(b).iter_vars)


def schedule(func: tirx.PrimFunc, knobs: Mapping[str, Any], target: Any) -> tirx.PrimFunc:
    """``func`` scheduled for ``target`` under ``knobs`` (see the module docstring)."""
    k = check(knobs, target)
    if _kind(target) == "cuda":
        return _cuda(func, k["threads"], k["shared"])
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
    if k["inline"]:
        for b in list(sch.get_child_blocks(root)):
            if sch.get(b).name_hint not in outputs and not _is_reduction(sch, b) \
                    and not _reused(sch, b):
                _try(sch.compute_inline, b)
    for b in list(sch.get_child_blocks(root)):
        lanes = _lanes(target, sch.get(b))
        reduction = _is_reduction(sch, b)
        n_spatial = sum(int(iv.iter_type) != _REDUCE for iv in sch.get(b).iter_vars)
        vector = 0 if reduction else int(_vectorize_inner(sch, b, k["vectorize"], lanes))
        if reduction:
            _tile_reduction(sch, b, k, lanes)
        if k["parallel"] and n_spatial >= 2:
            loops = sch.get_loops(b)
            if len(loops) - vector >= 2 and _try(sch.fuse, loops[0], loops[1]):
                loops = sch.get_loops(b)
            if len(loops) - vector >= 1:
                _try(sch.parallel, loops[0])
        if reduction and k["unroll"]:
            _try(sch.annotate, sch.get_loops(b)[0], "pragma_auto_unroll_max_step", k["unroll"])
    return sch.mod["main"]


def _lanes(target: Any, block) -> int:
    """SIMD lanes of the element type ``block`` writes."""
    from boundflow.backend.relax.target import tvm_target, vector_lanes

    dtype = str(block.writes[0].source.dtype) if block.writes else "float32"
    return vector_lanes(tvm_target(target), dtype)


def _const(extent) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _divides(extent, factor: int) -> bool:
    """Whether ``factor`` provably divides ``extent`` (a constant or a symbolic expression
    such as a batch padded to a multiple of 4)."""
    if factor <= 1:
        return True
    return bool(sym.Analyzer().can_prove(tirx.floormod(extent, factor) == 0))


def _vectorize_inner(sch: s_tir.Schedule, b, width: Any, lanes: int) -> bool:
    """Vectorise the innermost loop of elementwise block ``b`` by ``width`` (``auto``: the
    CPU's lanes where they divide it, the whole loop where it is shorter); whether it did."""
    loops = sch.get_loops(b)
    if not loops or not width:
        return False
    ext = _const(sch.get(loops[-1]).extent)
    if width == AUTO:
        width = _column_tile(ext, lanes)
        if not width:
            return False
    if ext == width:
        return _try(sch.vectorize, loops[-1])
    try:
        parts = sch.split(loops[-1], factors=[None, width])
    except _ERRORS:
        return False
    return _try(sch.vectorize, parts[-1])


TILE_MIN = 16            # the auto column tile's width where the lanes are fewer (float32)


def _column_tile(extent: int | None, lanes: int) -> int:
    """The vector width of a loop of ``extent`` by rule: the CPU's lanes where they divide
    it, the whole loop where it is shorter, else the widest power of two from half the lanes
    down to 4 that divides it, else its widest divisor from the lanes down to 4 (a row of
    50 goes as 5 × 10; 0: none)."""
    if extent is None:
        return 0
    if extent <= lanes:
        return extent
    for t in (lanes, lanes // 2, lanes // 4):
        if t >= 4 and extent % t == 0:
            return t
    return next((t for t in range(lanes, 3, -1) if extent % t == 0), 0)


def _tile_reduction(sch: s_tir.Schedule, b, knobs: Mapping[str, Any], lanes: int) -> None:
    """Register tiling of reduction block ``b`` (``tile`` / ``tile_rows`` in the module
    docstring); left as it is where its loops are not the plain spatial-then-reduction nest
    or its innermost spatial extent is not a known multiple of the tile."""
    kinds = [int(iv.iter_type) == _REDUCE for iv in sch.get(b).iter_vars]
    loops = sch.get_loops(b)
    if len(loops) != len(kinds) or kinds != sorted(kinds) or kinds[0]:
        return
    n_sp = kinds.index(True)
    ext = _const(sch.get(loops[n_sp - 1]).extent)
    # by rule at least a cache line of columns (16 float32): two AVX2 vectors, one AVX-512
    # (one AVX2 vector a tile left the FMA units half idle: CROWN's A·W 1.6x slower)
    tj = knobs["tile"] if knobs["tile"] != AUTO else _column_tile(ext, max(lanes, TILE_MIN))
    if not tj or ext is None or ext % tj:
        return
    ti = knobs["tile_rows"]
    row = sch.get(loops[n_sp - 2]).extent if n_sp >= 2 else None
    if ti == AUTO:
        ti = next((t for t in (4, 3, 5, 2) if row is not None and _divides(row, t)), 1)
        while ti > 1 and ti * -(-tj // lanes) > 8:     # accumulators fit the registers
            ti //= 2
    if row is None or not _divides(row, ti):
        ti = 1
    cw = None
    if knobs["cache_write"]:
        try:
            cw = sch.cache_write(b, 0, "local")
        except _ERRORS:
            cw = None
    loops = sch.get_loops(b)
    jo, ji = sch.split(loops[n_sp - 1], factors=[None, tj])
    if ti > 1:
        io, ii = sch.split(loops[n_sp - 2], factors=[None, ti])
    reduce_loops = sch.get_loops(b)[n_sp + (2 if ti > 1 else 1):]
    last = reduce_loops[-1]
    r_ext = _const(sch.get(last).extent)
    inner_k = None
    if r_ext is not None and r_ext % 4 == 0 and r_ext > 4:
        ko, inner_k = sch.split(last, factors=[None, 4])
        reduce_loops = reduce_loops[:-1] + [ko, inner_k]
    tile_loops = [ii, ji] if ti > 1 else [ji]
    sch.reorder(*([io, jo] if ti > 1 else [jo]), *reduce_loops, *tile_loops)
    if cw is not None:
        sch.reverse_compute_at(cw, jo)
    _try(sch.vectorize, ji)
    if ti > 1:
        _try(sch.unroll, ii)
    if inner_k is not None:
        _try(sch.unroll, inner_k)
    _try(sch.decompose_reduction, b, reduce_loops[0])
    if cw is not None:
        _try(sch.vectorize, sch.get_loops(cw)[-1])


def _cuda(func: tirx.PrimFunc, threads: int, shared: int = 0) -> tirx.PrimFunc:
    """``func`` with every stage bound to blocks × threads (see the module docstring);
    ``func`` unchanged (for the default GPU pipeline) when both knobs are 0 or a stage cannot
    be scheduled."""
    if not threads and not shared:
        return func
    budget = threads or 128
    sch = s_tir.Schedule(func)
    try:
        for b in sch.get_child_blocks(sch.get_sblock("root")):
            kinds = [int(iv.iter_type) == _REDUCE for iv in sch.get(b).iter_vars]
            loops = sch.get_loops(b)
            if len(loops) != len(kinds) or kinds != sorted(kinds) or not kinds or kinds[0]:
                return func
            n_sp = kinds.count(False)
            r_ext = _product(sch.get(lp).extent for lp in loops[n_sp:])
            inner = _product(sch.get(lp).extent for lp in loops[n_sp + 1:])
            factors = _thread_factors(sch, loops[:n_sp], budget) if shared else []
            if shared and r_ext is not None and r_ext >= 32 and inner <= 2 * shared \
                    and _has_reuse(sch, b) and _tileable(sch, loops[:n_sp], factors):
                _cuda_tile(sch, b, n_sp, factors, shared)
            elif shared and r_ext is not None and r_ext >= 64:
                _cuda_allreduce(sch, b, n_sp, 64 if r_ext >= 512 else 32)
            else:
                _cuda_bind(sch, b, n_sp, budget)
    except Exception as e:                  # TVM raises many kinds; the fallback is dlight's
        log.debug("cuda schedule left %s to dlight: %s", func.attrs.get("global_symbol"), e)
        return func
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)     # dlight leaves it alone


def _product(extents) -> int | None:
    out = 1
    for e in extents:
        c = _const(e)
        if c is None:
            return None
        out *= c
    return out


def _cuda_bind(sch: s_tir.Schedule, b, n_sp: int, threads: int) -> None:
    """Spatial loops fused over blocks × ``threads``; reductions serial in each thread."""
    loops = sch.get_loops(b)
    fused = sch.fuse(*loops[:n_sp]) if n_sp > 1 else loops[0]
    bx, tx = sch.split(fused, factors=[None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _has_reuse(sch: s_tir.Schedule, b) -> bool:
    """Whether some input of ``b`` is read by more than one output: its region does not
    depend on some spatial iteration variable."""
    block = sch.get(b)
    spatial = {iv.var for iv in block.iter_vars
               if int(iv.iter_type) != _REDUCE and _const(iv.dom.extent) != 1}
    for region in block.reads:
        used = [v for rng in region.region for v in tirx.analysis.undefined_vars(rng.min)]
        if any(not any(v.same_as(u) for u in used) for v in spatial):
            return True
    return False


def _cuda_allreduce(sch: s_tir.Schedule, b, n_sp: int, lanes: int) -> None:
    """One block per output (spatial loops fused), the fused reduction split over ``lanes``
    threads that combine their partial sums (TVM's cross-thread reduction)."""
    loops = sch.get_loops(b)
    sp = sch.fuse(*loops[:n_sp]) if n_sp > 1 else loops[0]
    red = loops[n_sp:]
    r = sch.fuse(*red) if len(red) > 1 else red[0]
    _, ri = sch.split(r, factors=[None, lanes])
    sch.bind(sp, "blockIdx.x")
    sch.bind(ri, "threadIdx.x")


def _largest_divisor(extent: int, limit: int) -> int:
    return next(d for d in range(min(extent, limit), 0, -1) if extent % d == 0)


def _thread_factors(sch: s_tir.Schedule, spatial, budget: int) -> list[int]:
    """Per spatial loop, the part of it a block's threads take: the largest divisor of its
    extent within what the inner loops left of ``budget`` (a symbolic batch: 1)."""
    factors, left = [], budget
    for lp in reversed(spatial):                  # threads over the innermost loops first
        c = _const(sch.get(lp).extent)
        t = _largest_divisor(c, left) if c is not None else 1    # the batch: blocks only
        factors.append(t)
        left //= t
    return factors[::-1]


def _tileable(sch: s_tir.Schedule, spatial, factors: list[int]) -> bool:
    """Whether the tiling has both levels: some threads, and a block loop (a loop not
    wholly in the threads)."""
    return math.prod(factors) > 1 and any(_const(sch.get(lp).extent) != t
                                          for lp, t in zip(spatial, factors))


def _cuda_tile(sch: s_tir.Schedule, b, n_sp: int, factors: list[int], chunk: int) -> None:
    """Multi-level tiling of reduction block ``b`` with its inputs staged in shared memory
    per reduction chunk (the module docstring); ``factors``: :func:`_thread_factors`."""
    loops = sch.get_loops(b)
    outer, inner = [], []
    for lp, t in zip(loops[:n_sp], factors):
        if t == 1:
            outer.append(lp)
        elif _const(sch.get(lp).extent) == t:
            inner.append(lp)
        else:
            o, i = sch.split(lp, factors=[None, t])
            outer.append(o)
            inner.append(i)
    red = loops[n_sp:]                            # chunks of the outermost reduction loop
    rest = _product(sch.get(lp).extent for lp in red[1:])
    k = _largest_divisor(int(_const(sch.get(red[0]).extent)), max(1, chunk // rest))
    ko, ki = sch.split(red[0], factors=[None, k])
    sch.reorder(*outer, *inner, ko, ki, *red[1:])
    bx = sch.fuse(*outer) if len(outer) > 1 else outer[0] if outer else None
    tx = sch.fuse(*inner) if len(inner) > 1 else inner[0] if inner else None
    if bx is None or tx is None:
        raise ValueError("nothing to bind")
    n_threads = math.prod(factors)
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    acc = sch.cache_write(b, 0, "local")
    sch.reverse_compute_at(acc, tx)
    staged = 0
    for i in range(len(sch.get(b).reads)):
        stage = sch.cache_read(b, i, "shared", consumer_blocks=[b])
        sch.compute_at(stage, ko)
        around = sch.get_loops(stage)
        depth = next(i for i, lp in enumerate(around) if sch.get(lp).same_as(sch.get(ko)))
        copy = around[depth + 1:]
        if not copy:                                  # one element per chunk
            continue
        size = _product(sch.get(lp).extent for lp in copy)
        if size is None:
            raise ValueError("a staged region of symbolic size")
        staged += size * tvm.DataType(str(sch.get(stage).writes[0].source.dtype)).bits // 8
        if staged > _SHARED_BYTES:
            raise ValueError("the staged chunks do not fit in shared memory")
        fused = sch.fuse(*copy) if len(copy) > 1 else copy[0]
        _, t = sch.split(fused, factors=[None, n_threads])
        sch.bind(t, "threadIdx.x")
    sch.decompose_reduction(b, ko)
