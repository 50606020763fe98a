"""The planner's passes. Each takes a :class:`PlannerContext` and returns a new one; none runs a
kernel or reads a clock. In order (``PASSES``):

normalise -> partition -> assign_domains -> assign_layouts -> liveness -> reuse_buffers
-> plan_cache -> select_lowering
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from boundflow.backend.relax.coverage import patch_walk
from boundflow.domains.forward import supported as forward_supported
from boundflow.ir import ops
from boundflow.ir.analysis import ancestors, ibp_exact_nodes
from boundflow.ir.domain_plan import DomainPlan
from boundflow.ir.graph import Graph
from boundflow.ir.knobs import Knobs
from boundflow.ir.normalize import normalised
from boundflow.ir.plan import (CacheEntry, CachePlan, DomainSection, LayoutPlan, LoweringPlan,
                               StoragePlan)
from boundflow.ir.task_graph import Buffer, PlanError, Task, TaskGraph
from boundflow.ir.workload import Workload
from boundflow.planner.space import SearchSpace, folds_output, knobs_for

INPUT_TASK = "input"
BOUNDS = "@bounds"
NHWC = (1, 2, 0)
# Op facts are asked of the traits in ``boundflow.ir.ops``: ``elementwise`` (output element i
# reads only input element i, so a task of them may write over a dying input), ``row_major``
# (reads its input in row-major order: flatten, reshape, linear), ``relaxed`` (its CROWN rule
# reads its input's interval: activations, maxpool2d, softmax).


@dataclass(frozen=True)
class PlannerContext:
    """Everything the passes know so far; fields fill in as the pipeline runs."""

    source: Graph
    workload: Workload
    knobs: Knobs | None
    lower_slope: str = "adaptive"
    alpha: tuple[tuple[str, Any], ...] = ()
    sparse: bool | None = None                      # None: auto (see BoundOptions)
    graph: Graph | None = None                      # normalised
    rewrites: tuple[str, ...] = ()
    space: SearchSpace | None = None
    groups: tuple[tuple[str, ...], ...] = ()
    domain: DomainSection | None = None
    node_layouts: tuple[tuple[str, tuple[int, ...]], ...] = ()
    task_graph: TaskGraph | None = None
    layout_plan: LayoutPlan | None = None
    liveness: tuple[tuple[str, int, int], ...] = ()
    storage_plan: StoragePlan | None = None
    cache_plan: CachePlan | None = None
    lowering_plan: LoweringPlan | None = None

    def but(self, **changes: Any) -> "PlannerContext":
        return dataclasses.replace(self, **changes)


# --- normalise ---------------------------------------------------------------------------

def normalise(ctx: PlannerContext) -> PlannerContext:
    graph, log = normalised(ctx.source)
    space = SearchSpace.of(graph, ctx.workload)
    knobs = knobs_for(graph, ctx.workload, ctx.knobs)
    return ctx.but(graph=graph, rewrites=log, space=space, knobs=knobs)


# --- partition ---------------------------------------------------------------------------

def _groups(graph: Graph, workload: Workload, edges) -> tuple[tuple[str, ...], ...]:
    """Connected components of the fused edges, each in graph order, ordered by last node."""
    skip = {graph.input.name} | ({graph.output} if folds_output(graph, workload) else set())
    parent = {n.name: n.name for n in graph.nodes if n.name not in skip}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for p, c in edges:
        parent[find(p)] = find(c)
    members: dict[str, list[str]] = {}
    for n in graph.nodes:
        if n.name in parent:
            members.setdefault(find(n.name), []).append(n.name)
    position = {n.name: i for i, n in enumerate(graph.nodes)}
    return tuple(sorted((tuple(g) for g in members.values()), key=lambda g: position[g[-1]]))


def partition(ctx: PlannerContext) -> PlannerContext:
    """Fuse the knob-selected edges into tasks (IBP only; domains come next)."""
    edges = [e for e, on in zip(ctx.space.fusible, ctx.knobs.partition) if on]
    groups = _groups(ctx.graph, ctx.workload, edges)
    tg = build_tasks(ctx.graph, ctx.workload, groups, (), "ibp")
    return ctx.but(groups=groups, task_graph=tg)


TIGHTENING = ("crown", "forward")       # task kinds that tighten a pre-activation's interval


def _tight_buffer(node: str, kind: str) -> str:
    return f"{node}@{kind}"


def build_tasks(graph: Graph, workload: Workload, groups, crown: tuple[str, ...],
                final: str, forward: tuple[str, ...] = ()) -> TaskGraph:
    """The task graph of ``groups`` (IBP tasks), a CROWN task per node of ``crown``, a
    forward-mode task per node of ``forward`` and the final task; every buffer in row-major
    layout and lower/upper form."""
    fold = folds_output(graph, workload)
    source = graph.output_node.inputs[0] if fold else graph.output
    inp = graph.input.name
    kind_of = {**{c: "crown" for c in crown}, **{f: "forward" for f in forward}}
    tightened = set(kind_of)
    by = {n.name: n for n in graph.nodes}

    def final_buf(v: str) -> str:
        return _tight_buffer(v, kind_of[v]) if v in tightened else v

    relaxed = ops.having("relaxed")

    def relaxed_inputs_above(v: str) -> list[str]:
        """The inputs of the relaxed ops a backward pass from ``v`` crosses: it reads
        their intervals to relax them."""
        up = ancestors(graph, [v])
        return list(dict.fromkeys(by[r].inputs[0] for r in (n.name for n in graph.nodes)
                                  if r in up and by[r].op in relaxed))

    # (a forward-mode task reads the same intervals: those of the relaxed ops behind it)
    backward_reads: dict[str, list[str]] = {c: relaxed_inputs_above(c) for c in tightened}
    if final != "ibp":
        backward_reads[BOUNDS] = relaxed_inputs_above(graph.output)
    needed_by_backward = {v for vs in backward_reads.values() for v in vs}
    group_of = {n: gi for gi, g in enumerate(groups) for n in g}
    users = graph.consumers()

    def buffer(name: str, node: str) -> Buffer:
        shape = by[node].shape
        return Buffer(name, node, shape, workload.dtype, "lu", tuple(range(len(shape))))

    tasks = [Task(INPUT_TASK, "input", (inp,), (), (inp,))]
    buffers = {inp: buffer(inp, inp)}
    for gi, group in enumerate(groups):
        ins, outs = [], []
        for name in group:
            for i in by[name].inputs:
                if i not in group:
                    ins.append(final_buf(i))
            if (any(group_of.get(u) != gi for u in users[name]) or name == source
                    or name in needed_by_backward or name in tightened):
                outs.append(name)
        tasks.append(Task(f"ibp:{group[-1]}", "ibp", group, tuple(dict.fromkeys(ins)),
                          tuple(outs)))
        for o in outs:
            buffers[o] = buffer(o, o)
        for o in outs:
            if o in tightened:
                ins = (o, inp) + tuple(final_buf(v) for v in backward_reads[o])
                kind = kind_of[o]
                tasks.append(Task(f"{kind}:{o}", kind, (o,), tuple(dict.fromkeys(ins)),
                                  (final_buf(o),)))
                buffers[final_buf(o)] = buffer(final_buf(o), o)
    ins = (final_buf(source),)
    if final != "ibp":
        ins += (inp,) + tuple(final_buf(v) for v in backward_reads[BOUNDS])
    out_shape = (workload.n_specs,) if workload.n_specs else graph.output_shape
    buffers[BOUNDS] = Buffer(BOUNDS, "", tuple(out_shape), workload.dtype, "lu",
                             tuple(range(len(out_shape))))
    tasks.append(Task("final", "final", (graph.output,) if fold else (),
                      tuple(dict.fromkeys(ins)), (BOUNDS,),
                      (("fold", fold), ("method", final))))
    return TaskGraph(tuple(tasks), tuple(buffers.values()), BOUNDS)


# --- domains -----------------------------------------------------------------------------

def assign_domains(ctx: PlannerContext) -> PlannerContext:
    """The domain plan from the knobs; CROWN or forward mode only where IBP is not already
    exact. Fused edges out of such a pre-activation are cut (its tightened interval must
    exist before the relaxed op reading it does) and each gets a ``crown`` or ``forward``
    task; the final task gets its method.
    The sparse setting is recorded as given (None: auto) where there are crown tasks, else
    False."""
    graph, knobs = ctx.graph, ctx.knobs
    plan = DomainPlan(tuple(zip(ctx.space.preactivations, knobs.domains)), knobs.final)
    plan.check(graph)
    exact = ibp_exact_nodes(graph)
    crown = tuple(p for p, d in plan.intermediate if d == "crown" and p not in exact)
    forward = tuple(p for p, d in plan.intermediate if d == "forward" and p not in exact)
    if forward and not forward_supported(graph):
        raise PlanError(f"forward-mode bounds do not cover every op of this model "
                        f"(marked forward: {list(forward)})")
    edges = [e for e, on in zip(ctx.space.fusible, knobs.partition)
             if on and e[0] not in crown + forward]
    groups = _groups(graph, ctx.workload, edges)
    domain = DomainSection(plan.intermediate, plan.final, crown, ctx.lower_slope,
                           ctx.alpha if plan.final == "alpha-crown" else (),
                           ctx.sparse if crown else False)
    return ctx.but(groups=groups, domain=domain,
                   task_graph=build_tasks(graph, ctx.workload, groups, crown, plan.final,
                                          forward))


# --- layouts -----------------------------------------------------------------------------

def _layout_name(layout: tuple[int, ...]) -> str:
    if layout == tuple(range(len(layout))):
        return "rowmajor"
    return "nhwc" if layout == NHWC else "perm" + "".join(map(str, layout))


def permuted_layout(dims, in_layout: tuple[int, ...]) -> tuple[int, ...]:
    """The physical order of ``permute(x, dims)`` when it only relabels ``x``'s memory."""
    inverse = [list(dims).index(j) for j in range(len(dims))]
    return tuple(inverse[a] for a in in_layout)


def _needed_layout(node, src, node_layout) -> tuple[int, ...] | None:
    """The layout ``node`` needs its input ``src`` in when that comes from another task
    (``None``: any). ``row_major`` ops read row-major; a permute reads any layout (it becomes
    a view or a copy); an op of another rank than its input (gather dropping an axis) reads
    any layout, since both backends index a buffer through its logical axes; every other op
    reads its input in its own output's layout."""
    if ops.has(node.op, "row_major"):
        return tuple(range(len(src.shape)))
    if node.op == "permute" or len(node.shape) != len(src.shape):
        return None
    return node_layout[node.name]


def assign_layouts(ctx: PlannerContext) -> PlannerContext:
    """Conv regions take their knob layout; a permute whose output layout is its input's
    memory relabelled becomes a view; where a task needs another layout than a buffer has,
    a ``layout`` conversion task is inserted; affine outputs take their knob form; a task
    made only of views writes an alias of its input buffer."""
    graph, tg = ctx.graph, ctx.task_graph
    by = {n.name: n for n in graph.nodes}
    node_layout = {n.name: tuple(range(len(n.shape))) for n in graph.nodes}
    regions = []
    for region, choice in zip(ctx.space.regions, ctx.knobs.layouts):
        regions.append((region, choice))
        if choice == "NHWC":
            for name in region:
                node_layout[name] = NHWC
    views = []
    for n in graph.nodes:
        if n.op == "permute" and permuted_layout(n.attrs["dims"], node_layout[n.inputs[0]]) \
                == node_layout[n.name]:
            views.append(n.name)
        elif ops.has(n.op, "view") and ops.has(n.op, "row_major") and \
                node_layout[n.inputs[0]] == tuple(range(len(by[n.inputs[0]].shape))):
            views.append(n.name)
    forms = dict(zip(ctx.space.affine, ctx.knobs.forms))
    buffers = {b.name: dataclasses.replace(
        b, layout=node_layout[b.node] if b.node and b.name != graph.input.name else b.layout,
        form=forms.get(b.name, "lu")) for b in tg.buffers}
    # conversions at task boundaries
    tasks: list[Task] = []
    conversions: dict[str, Task] = {}
    for t in tg.tasks:
        if t.kind != "ibp":
            tasks.append(t)
            continue
        rename = {}
        members = set(t.nodes)
        for name in t.nodes:
            node = by[name]
            for i in node.inputs:
                if i in members:
                    continue
                src = next(b for b in t.inputs if buffers[b].node == i)
                need = _needed_layout(node, by[i], node_layout)
                if need is None or buffers[src].layout == need:
                    continue
                conv = f"{src}@{_layout_name(need)}"
                if conv not in conversions:
                    buffers[conv] = dataclasses.replace(buffers[src], name=conv, layout=need)
                    conversions[conv] = Task(f"layout:{conv}", "layout", (), (src,), (conv,),
                                             (("layout", need),))
                    tasks.append(conversions[conv])
                rename[src] = conv
        tasks.append(dataclasses.replace(t, inputs=tuple(rename.get(b, b) for b in t.inputs)))
    # tasks made of views alias their input
    view_set = set(views)
    for t in tasks:
        if t.kind == "ibp" and len(t.inputs) == 1 and len(t.outputs) == 1 \
                and all(n in view_set for n in t.nodes):
            src = buffers[t.inputs[0]]
            buffers[t.outputs[0]] = dataclasses.replace(buffers[t.outputs[0]],
                                                        alias_of=src.name, form=src.form)
    layout_plan = LayoutPlan(tuple(regions), tuple(views), tuple(conversions), ctx.rewrites)
    return ctx.but(task_graph=tg.replace(tasks=tasks, buffers=buffers.values()),
                   layout_plan=layout_plan, node_layouts=tuple(node_layout.items()))


# --- storage -----------------------------------------------------------------------------

def liveness(ctx: PlannerContext) -> PlannerContext:
    """First and last task index using each buffer's memory (aliases count for their
    root); the output buffer lives past the last task; the input box is the caller's."""
    tg = ctx.task_graph
    n = len(tg.tasks)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, t in enumerate(tg.tasks):
        for b in t.outputs:
            r = tg.root(b)
            first.setdefault(r, i)
            last[r] = max(last.get(r, i), i)
        for b in t.inputs:
            r = tg.root(b)
            last[r] = max(last.get(r, i), i)
    last[tg.root(tg.output)] = n
    rows = tuple((b, first[b], last[b]) for b in first if b != ctx.graph.input.name)
    return ctx.but(liveness=rows)


def _size_class(nbytes: int) -> int:
    return 1 << max(nbytes - 1, 0).bit_length()


def _inplace_candidates(task: Task, by) -> tuple[str, ...]:
    if task.kind in TIGHTENING:
        return task.inputs[:1]
    if task.kind == "ibp" and all(ops.has(by[n].op, "elementwise") for n in task.nodes):
        return task.inputs
    return ()


def reuse_buffers(ctx: PlannerContext) -> PlannerContext:
    """Give each buffer a slot: greedily, in task order, a free slot of the same size class
    (else the smallest larger one, else a new slot); an elementwise task may write its output
    over an input that dies there, of the same size, layout and form. A buffer's slot is freed
    after its last reader has run. With storage knob ``none`` every buffer has its own slot."""
    tg = ctx.task_graph
    by = {n.name: n for n in ctx.graph.nodes}
    last = {b: l for b, _, l in ctx.liveness}
    reuse = ctx.knobs.storage == "reuse"
    slots: list[int] = []                 # bytes per sample of each slot
    holder: dict[int, str] = {}           # slot -> the buffer in it now
    assignment: dict[str, int] = {}
    inplace: list[str] = []
    for i, t in enumerate(tg.tasks):
        dying = {tg.root(b) for b in t.inputs if last.get(tg.root(b)) == i}
        for out in t.outputs:
            if out not in last:            # an alias, or the caller's input box
                continue
            buf = tg.buffer(out)
            need = buf.bytes_per_sample
            slot = None
            if reuse:
                for cand in map(tg.root, _inplace_candidates(t, by)):
                    cb = tg.buffer(cand)
                    if cand in dying and cand in assignment and cb.bytes_per_sample == need \
                            and cb.layout == buf.layout and cb.form == buf.form:
                        slot = assignment[cand]
                        dying.discard(cand)
                        inplace.append(out)
                        break
                if slot is None:
                    free = [s for s in range(len(slots)) if s not in holder]
                    fits = [s for s in free if slots[s] >= need
                            or _size_class(slots[s]) == _size_class(need)]
                    if fits:
                        slot = min(fits, key=lambda s: (_size_class(slots[s]) !=
                                                        _size_class(need), slots[s]))
            if slot is None:
                slots.append(0)
                slot = len(slots) - 1
            slots[slot] = max(slots[slot], need)
            holder[slot] = out
            assignment[out] = slot
        if reuse:
            for r in dying:
                if r in assignment and holder.get(assignment[r]) == r:
                    del holder[assignment[r]]
    unshared = sum(tg.buffer(b).bytes_per_sample for b in assignment)
    plan = StoragePlan(reuse, ctx.liveness, tuple(slots), tuple(assignment.items()),
                       tuple(inplace), sum(slots), unshared)
    return ctx.but(storage_plan=plan)


# --- cache and lowering ------------------------------------------------------------------

def plan_cache(ctx: PlannerContext) -> PlannerContext:
    """What a BoundCache may keep across runs (``persistent``): the outputs of CROWN tasks,
    of the final task, and of the tasks whose buffers a CROWN or final task reads (with them
    cached a later query resumes there); everything else is ``run``-scoped. Keys name the
    task, its domain, the input box, the split state and the layout; final bounds also the
    spec (``C``)."""
    tg = ctx.task_graph
    producer = tg.producer()
    frontier = {producer[b] for t in tg.tasks if t.kind in (*TIGHTENING, "final")
                for b in t.inputs}
    entries = []
    for t in tg.tasks:
        if t.kind == "input":
            continue
        scope = "persistent" if t.kind in (*TIGHTENING, "final") or t.name in frontier \
            else "run"
        key = ("task", "domain", "box", "split", "layout")
        if t.kind == "final":
            key = ("task", "domain", "spec", "box", "split")
        entries.append(CacheEntry(t.name, scope, key))
    return ctx.but(cache_plan=CachePlan(tuple(entries)))


# What ``auto`` sends to ATen (a library call) rather than TIR, by measurement
# (benchmarks/bench_kernels.py, bench_gemm.py). IBP's convolutions are blocked direct
# convolutions in TIR (register tile of output positions × a vector of output channels, packed
# weights) and beat ATen's at batch 1 and 32, without the per-call cost of a callback; its
# transposed convolution is still a plain loop nest. A CROWN walk from a spatial node that
# keeps window ("patch") coefficients in TIR (``coverage.patch_walk``) is on par with ATen's
# or faster and runs there; any other CROWN walk crossing a convolution has dense coefficients
# there (the rows vectorised, several times slower than ATen's) and goes to ATen.
# GEMM-shaped work (linear layers, CROWN products) is on par with ATen in TIR and runs there.
_LIBRARY_IBP_OPS = frozenset({"conv_transpose2d"})
# A ``crown`` task of a network of at most ``SPLIT_INPUT_DIMS`` inputs, in a batch of at least
# ``SPLIT_MIN_BATCH``, runs as torch ops: that is branch-and-bound's input splitting
# (``bab.INPUT_SPLIT_MAX_DIMS``; batches of 1,024 boxes by default), whose small boxes leave
# most ReLUs stable, and the torch rule bounds only the rows that can change (sparse) where the
# TIR kernel bounds every row. ACAS Xu CROWN on sub-boxes of property 6, one thread: TIR 2.25x
# the torch ops' time at 32 boxes, 3.48x at 256, 3.5x at 1,024 (two threads); with the rule,
# 1.01x at 256 (the same torch ops as callbacks; 13 s to compile instead of 58).
SPLIT_INPUT_DIMS = 16
SPLIT_MIN_BATCH = 32
_LIBRARY_CROWN_OPS = frozenset(op for op in ops.having("weighted") if ops.has(op, "spatial")) \
    | {"conv_transpose2d"}


def auto_lowering(task: Task, graph: Graph, batch: int = 1) -> str:
    """The cost rule behind the ``auto`` lowering: ``torch`` (ATen's library kernels) for an
    ``ibp`` task holding a transposed convolution and for a backward walk crossing any
    convolution (a ``crown`` task's and a CROWN ``final`` task's walk runs from its start back
    to the input) unless it is a ``crown`` walk in window form, for a ``crown`` task of a
    network of at most :data:`SPLIT_INPUT_DIMS` inputs in a batch of at least
    :data:`SPLIT_MIN_BATCH`, and for a ``forward`` task (forward mode has no TIR kernel),
    ``tir`` otherwise."""
    if task.kind == "forward":
        return "torch"
    op = {n.name: n.op for n in graph.nodes}
    if task.kind == "crown":
        if math.prod(graph.input_shape) <= SPLIT_INPUT_DIMS and batch >= SPLIT_MIN_BATCH:
            return "torch"
        if patch_walk(graph, task.nodes[0]):
            return "tir"
        work, library = ancestors(graph, list(task.nodes)), _LIBRARY_CROWN_OPS
    elif task.kind == "final" and task.attr("method") != "ibp":
        work, library = ancestors(graph, [graph.output]), _LIBRARY_CROWN_OPS
    else:
        work, library = task.nodes, _LIBRARY_IBP_OPS
    return "torch" if any(op[n] in library for n in work) else "tir"


def select_lowering(ctx: PlannerContext) -> PlannerContext:
    """Each compute task's lowering and schedule parameters, from the knobs (``auto``
    resolved per task by :func:`auto_lowering`; a ``forward`` task always ``torch``)."""
    names = {t.name for t in ctx.task_graph.tasks}
    unknown = sorted(set(dict(ctx.knobs.task_lowering)) - names |
                     set(dict(ctx.knobs.schedule)) - names)
    if unknown:
        raise PlanError(f"knobs set lowering or schedule for tasks {unknown}, which this "
                        f"plan does not have")

    def lowering(t: Task) -> str:
        chosen = ctx.knobs.lowering_of(t.name)
        # a forward task has no TIR kernel: whatever the knobs say, it runs as torch ops
        return auto_lowering(t, ctx.graph, ctx.workload.batch) \
            if chosen == "auto" or t.kind == "forward" \
            else chosen
    rows = tuple((t.name, lowering(t), ctx.knobs.task_schedule(t.name))
                 for t in ctx.task_graph.tasks if t.kind != "input")
    return ctx.but(lowering_plan=LoweringPlan(rows))


Pass = Callable[[PlannerContext], PlannerContext]
PASSES: tuple[Pass, ...] = (normalise, partition, assign_domains, assign_layouts, liveness,
                            reuse_buffers, plan_cache, select_lowering)

