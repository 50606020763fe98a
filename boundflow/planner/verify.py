"""The plan verifier: every invariant a finished plan keeps, checked on whatever a
:class:`PlannerContext` holds so far. ``plan(..., verify=True)`` runs it after every pass and
names the pass that broke an invariant."""

from __future__ import annotations

from boundflow.ir.analysis import ibp_exact_nodes
from boundflow.ir.graph import verify_graph
from boundflow.ir.plan import CACHE_SCOPES, KEY_FIELDS
from boundflow.ir.task_graph import PlanError
from boundflow.planner.passes import BOUNDS, PlannerContext
from boundflow.planner.space import folds_output


def verify_plan(ctx: PlannerContext) -> None:
    """Raise :class:`PlanError` at the first broken invariant."""
    if ctx.graph is None:
        return
    graph = verify_graph(ctx.graph)
    if ctx.task_graph is not None:
        _check_tasks(ctx)
    if ctx.domain is not None:
        ctx.domain.plan.check(graph)
        crown = {p for p, d in ctx.domain.intermediate if d == "crown"}
        if not set(ctx.domain.crown_nodes) <= crown:
            raise PlanError("CROWN runs on a node the domain plan does not mark crown")
        tasks = {t.nodes[0] for t in ctx.task_graph.tasks if t.kind == "crown"}
        if tasks != set(ctx.domain.crown_nodes):
            raise PlanError(f"crown tasks {sorted(tasks)} do not match the crown nodes "
                            f"{sorted(ctx.domain.crown_nodes)}")
        exact = ibp_exact_nodes(graph)
        forward = {p for p, d in ctx.domain.intermediate if d == "forward" and p not in exact}
        tasks = {t.nodes[0] for t in ctx.task_graph.tasks if t.kind == "forward"}
        if tasks != forward:
            raise PlanError(f"forward tasks {sorted(tasks)} do not match the nodes marked "
                            f"forward {sorted(forward)}")
        final = ctx.task_graph.task("final")
        if final.attr("method") != ctx.domain.final:
            raise PlanError(f"the final task runs {final.attr('method')}, the plan says "
                            f"{ctx.domain.final}")
    if ctx.layout_plan is not None:
        _check_layouts(ctx)
    if ctx.storage_plan is not None:
        _check_storage(ctx)
    if ctx.cache_plan is not None:
        compute = {t.name for t in ctx.task_graph.tasks if t.kind != "input"}
        entries = {e.task: e for e in ctx.cache_plan.entries}
        if set(entries) != compute:
            raise PlanError("the cache plan does not cover exactly the compute tasks")
        for e in entries.values():
            if e.scope not in CACHE_SCOPES or not set(e.key) <= set(KEY_FIELDS):
                raise PlanError(f"cache entry of {e.task!r}: bad scope or key {e}")
    if ctx.lowering_plan is not None:
        compute = [t.name for t in ctx.task_graph.tasks if t.kind != "input"]
        if [t for t, _, _ in ctx.lowering_plan.tasks] != compute:
            raise PlanError("the lowering plan does not list every compute task in order")


def _check_tasks(ctx: PlannerContext) -> None:
    graph, tg = ctx.graph, ctx.task_graph
    tg.validate({n.name: n.shape for n in graph.nodes}, ctx.workload.dtype)
    if tg.output != BOUNDS or tg.tasks[-1].name != "final":
        raise PlanError("the last task must be 'final', writing the bounds")
    owner: dict[str, str] = {}
    for t in tg.tasks:
        if t.kind in ("ibp", "final", "input"):
            for n in t.nodes:
                if n in owner:
                    raise PlanError(f"node {n!r} is computed by {owner[n]!r} and {t.name!r}")
                owner[n] = t.name
    missing = [n.name for n in graph.nodes if n.name not in owner]
    if missing:
        raise PlanError(f"no task computes nodes {missing}")
    fold = folds_output(graph, ctx.workload)
    if tg.task("final").attr("fold") != fold:
        raise PlanError("the final task's fold flag does not match the workload")


def _check_layouts(ctx: PlannerContext) -> None:
    tg = ctx.task_graph
    layouts = dict(ctx.node_layouts)
    for b in tg.buffers:
        if b.name.startswith(f"{b.node}@") and b.name not in (f"{b.node}@crown",
                                                                 f"{b.node}@forward") \
                or not b.node:
            continue                                   # conversions, bounds
        if b.name != ctx.graph.input.name and b.layout != layouts[b.node]:
            raise PlanError(f"buffer {b.name!r} has layout {b.layout}, its node "
                            f"{layouts[b.node]}")
    convs = {t.outputs[0] for t in tg.tasks if t.kind == "layout"}
    if convs != set(ctx.layout_plan.conversions):
        raise PlanError("the layout plan's conversions do not match the layout tasks")


def _check_storage(ctx: PlannerContext) -> None:
    tg, sp = ctx.task_graph, ctx.storage_plan
    live = {b: (f, l) for b, f, l in sp.liveness}
    assign = dict(sp.assignment)
    roots = {tg.root(b.name) for b in tg.buffers} - {ctx.graph.input.name}
    if set(assign) != roots:
        raise PlanError(f"slots are given to {sorted(assign)}, buffers needing memory are "
                        f"{sorted(roots)}")
    for b, s in assign.items():
        if sp.slots[s] < tg.buffer(b).bytes_per_sample:
            raise PlanError(f"slot {s} ({sp.slots[s]} B) is too small for {b!r}")
    inplace = set(sp.inplace)
    by_slot: dict[int, list[str]] = {}
    for b, s in assign.items():
        by_slot.setdefault(s, []).append(b)
    for s, bs in by_slot.items():
        bs.sort(key=lambda b: live[b][0])
        for a, b in zip(bs, bs[1:]):
            fa, la = live[a]
            fb, _ = live[b]
            if fb < la or (fb == la and b not in inplace):
                raise PlanError(f"buffers {a!r} (live {fa}..{la}) and {b!r} (from {fb}) "
                                f"share slot {s} while both are live")
    if sp.planned_bytes != sum(sp.slots):
        raise PlanError("planned bytes are not the sum of the slots")
