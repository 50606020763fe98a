"""The planner: ``plan(graph, workload, knobs) -> PlanBundle`` as a list of passes.

>>> bundle = plan(graph, Workload.of(graph, batch=1, method="crown"))
>>> PlanBundle.from_json(bundle.to_json()) == bundle
True
"""

from __future__ import annotations

from typing import Any

from boundflow.domains.alpha import AlphaConfig
from boundflow.domains.crown import LOWER_SLOPES
from boundflow.errors import BoundFlowError
from boundflow.ir.graph import Graph
from boundflow.ir.knobs import Knobs
from boundflow.ir.plan import PlanBundle
from boundflow.ir.task_graph import PlanError
from boundflow.ir.workload import Workload
from boundflow.ir.normalize import normalised
from boundflow.planner.passes import PASSES, PlannerContext
from boundflow.planner.space import SearchSpace, default_knobs
from boundflow.planner.verify import verify_plan


def alpha_settings(alpha: AlphaConfig | None) -> tuple[tuple[str, Any], ...]:
    a = alpha or AlphaConfig()
    return (("decay", a.decay), ("intermediate", a.intermediate),
            ("iterations", a.iterations), ("lr", a.lr))


def plan(graph: Graph, workload: Workload, knobs: Knobs | None = None, *,
         lower_slope: str = "adaptive", alpha: AlphaConfig | None = None,
         sparse: bool | None = None, verify: bool = False) -> PlanBundle:
    """The PlanBundle of ``graph`` for ``workload`` under ``knobs`` (default: the heuristic
    ``default_knobs``). ``lower_slope``, ``alpha`` and ``sparse`` are relaxation settings
    the plan records (see :class:`~boundflow.api.BoundOptions`; ``sparse`` None is auto).
    With ``verify`` the plan verifier runs after every pass."""
    if not isinstance(graph, Graph):
        raise BoundFlowError(f"plan() takes a boundflow Graph, got {type(graph).__name__}")
    if lower_slope not in LOWER_SLOPES:
        raise PlanError(f"lower slope {lower_slope!r} is not one of {LOWER_SLOPES}")
    if not (sparse is None or isinstance(sparse, bool)):
        raise PlanError(f"sparse must be None (auto), True or False, got {sparse!r}")
    workload.check_graph(graph)
    ctx = PlannerContext(graph, workload, knobs, lower_slope, alpha_settings(alpha), sparse)
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


def check_plan(graph: Graph, bundle: PlanBundle) -> PlanBundle:
    """``bundle`` if it is exactly the plan this planner makes of ``graph`` from the bundle's
    own workload, knobs and settings; else :class:`PlanError`.

    A plan read from a file or a database is data, not code: a tampered storage plan (two
    live buffers in one slot), task graph or cache plan could make a backend compute unsound
    bounds. Re-planning from the stored knobs and requiring the same plan admits exactly the
    plans the planner (whose passes keep soundness) could have made.
    """
    if not isinstance(bundle, PlanBundle):
        raise PlanError(f"a plan must be a PlanBundle, got {type(bundle).__name__}")
    if tuple(bundle.workload.input_shape) != tuple(graph.input_shape):
        raise PlanError(f"plan {bundle.key[:12]} was made for inputs of shape "
                        f"{list(bundle.workload.input_shape)}; this model takes "
                        f"{list(graph.input_shape)}")
    d = bundle.domain_plan
    if d.lower_slope not in LOWER_SLOPES:
        raise PlanError(f"plan {bundle.key[:12]}: lower slope {d.lower_slope!r} is not one of "
                        f"{LOWER_SLOPES}")
    try:
        alpha = AlphaConfig(**dict(d.alpha)) if d.alpha else None
        again = plan(graph, bundle.workload, bundle.knobs, lower_slope=d.lower_slope,
                     alpha=alpha, sparse=d.sparse)
    except PlanError as e:
        raise PlanError(f"plan {bundle.key[:12]} cannot be re-derived from its knobs: {e}") \
            from None
    except (TypeError, ValueError) as e:
        raise PlanError(f"plan {bundle.key[:12]} has invalid settings: {e}") from None
    if again.key != bundle.key:
        parts = [f for f in ("task_graph", "domain_plan", "layout_plan", "storage_plan",
                             "cache_plan", "lowering_plan", "graph_hash")
                 if getattr(again, f) != getattr(bundle, f)]
        raise PlanError(f"plan {bundle.key[:12]} is not the plan its knobs give for this model "
                        f"(differs in {', '.join(parts) or 'its encoding'}): it was edited or "
                        f"made for another model; re-plan it with `boundflow plan` or "
                        f"`boundflow tune`")
    return bundle


def space(graph: Graph, workload: Workload) -> SearchSpace:
    """The search space of ``graph`` (normalised as the planner does) for ``workload``."""
    return SearchSpace.of(normalised(graph)[0], workload)


def default(graph: Graph, workload: Workload) -> Knobs:
    return default_knobs(normalised(graph)[0], workload)


__all__ = ["plan", "check_plan", "space", "default", "PlanBundle", "Knobs", "Workload", "SearchSpace",
           "PASSES", "verify_plan", "normalised"]
