"""The planner: ``plan(graph, workload, knobs) -> PlanBundle`` as a list of passes.

>>> bundle = plan(graph, Workload.of(graph, batch=1, method="crown"))
>>> PlanBundle.from_json(bundle.to_json()) == bundle
True
"""

from __future__ import annotations

from typing import Any

from boundflow.domains.alpha import AlphaConfig
from boundflow.errors import BoundFlowError
from boundflow.ir.graph import Graph
from boundflow.ir.knobs import Knobs
from boundflow.ir.plan import PlanBundle
from boundflow.ir.task_graph import PlanError
from boundflow.ir.workload import Workload
from boundflow.planner.passes import PASSES, PlannerContext, normalised
from boundflow.planner.space import SearchSpace, default_knobs
from boundflow.planner.verify import verify_plan


def alpha_settings(alpha: AlphaConfig | None) -> tuple[tuple[str, Any], ...]:
    a = alpha or AlphaConfig()
    return (("decay", a.decay), ("intermediate", a.intermediate),
            ("iterations", a.iterations), ("lr", a.lr))


def plan(graph: Graph, workload: Workload, knobs: Knobs | None = None, *,
         lower_slope: str = "adaptive", alpha: AlphaConfig | None = None,
         verify: bool = False) -> PlanBundle:
    """The PlanBundle of ``graph`` for ``workload`` under ``knobs`` (default: the heuristic
    ``default_knobs``). With ``verify`` the plan verifier runs after every pass."""
    if not isinstance(graph, Graph):
        raise BoundFlowError(f"plan() takes a boundflow Graph, got {type(graph).__name__}")
    workload.check_graph(graph)
    ctx = PlannerContext(graph, workload, knobs, lower_slope, alpha_settings(alpha))
    for step in PASSES:
        ctx = step(ctx)
        if verify:
            try:
                verify_plan(ctx)
            except PlanError as e:
                raise PlanError(f"after pass {step.__name__!r}: {e}") from None
    return PlanBundle(ctx.workload, ctx.knobs, ctx.graph.structural_hash(), ctx.task_graph,
                      ctx.domain, ctx.layout_plan, ctx.storage_plan, ctx.cache_plan,
                      ctx.lowering_plan)


def space(graph: Graph, workload: Workload) -> SearchSpace:
    """The search space of ``graph`` (normalised as the planner does) for ``workload``."""
    return SearchSpace.of(normalised(graph)[0], workload)


def default(graph: Graph, workload: Workload) -> Knobs:
    return default_knobs(normalised(graph)[0], workload)


__all__ = ["plan", "space", "default", "PlanBundle", "Knobs", "Workload", "SearchSpace",
           "PASSES", "verify_plan", "normalised"]
