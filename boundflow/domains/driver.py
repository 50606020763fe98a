"""The method driver: the final bound step every engine shares, and the un-partitioned
reference walk.

:func:`final_bounds` is the one implementation of a method's last step (the spec applied to
the output interval, then for CROWN and alpha-CROWN a backward pass from the output,
intersected with it); the planned executors call it for their ``final`` task. The reference
walk :func:`reference_bounds` bounds every node in graph order under a domain plan, without
tasks, layouts or storage: tests hold every plan to it. Users never reach it: every bound a
user computes runs a plan (``boundflow.api``).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from boundflow.domains.alpha import AlphaConfig, optimise
from boundflow.domains.backward import backward_chunked, identity_start, intersect
from boundflow.domains.coeffs import BackwardContext
from boundflow.domains.crown import intermediate_bounds
from boundflow.domains.interval import Interval, spec_interval
from boundflow.ir.domain_plan import DomainPlan
from boundflow.ir.graph import Graph


def folds_spec(graph: Graph) -> bool:
    """Whether a spec ``C`` is folded into the output layer (a 1-D ``linear``): the interval
    the spec is applied to is then that layer's input, and ``|C·W|·rad`` is tighter than
    ``|C|·|W|·rad``."""
    out = graph.output_node
    return out.op == "linear" and len(out.shape) == 1


def final_bounds(graph: Graph, x: Interval, tensors: Mapping[str, torch.Tensor],
                 C: torch.Tensor | None, src: Interval, fold: bool, method: str,
                 bounds: Mapping[str, Interval], plan: DomainPlan,
                 lower_slope: str = "adaptive", alpha: AlphaConfig | None = None,
                 patches: bool = True, upper: bool = True, lines: dict | None = None,
                 done: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Interval:
    """Bounds of the output (or of ``C·output``) by ``method`` ("ibp", "crown",
    "alpha-crown"). ``src`` is the output's interval, or with ``fold`` the interval of the
    output layer's input; ``bounds`` holds the pre-activation intervals the backward pass
    relaxes at (``plan`` says which of them alpha-CROWN re-derives; ``patches`` whether
    its conv-chain starts keep window-layout coefficients). ``upper=False``: alpha-CROWN
    optimises the lower bound only (the upper stays CROWN's). ``lines``: the run's memo of
    the activations' default lines (``BackwardContext.lines``). ``done(lower) -> [B]``: the
    samples whose lower bounds (of ``C·output``) are all a caller needs; alpha-CROWN stops
    optimising those (:func:`~boundflow.domains.alpha.optimise`)."""
    out = graph.output_node
    if C is None:
        by_ibp = src
    elif fold:
        bias = tensors[out.params["bias"]] if "bias" in out.params else None
        by_ibp = spec_interval(src, C, tensors[out.params["weight"]], bias)
    else:
        by_ibp = spec_interval(src, C)
    if method == "ibp":
        return by_ibp
    if C is None:
        zero = torch.zeros((1,) + tuple(out.shape), dtype=x.lower.dtype, device=x.lower.device)
        A = identity_start(Interval(zero, zero))
    else:
        A = C.reshape((C.shape[0], C.shape[1]) + tuple(out.shape))
    ctx = BackwardContext(bounds, lower_slope, None, patches=patches, lines=lines)
    res = backward_chunked(graph, graph.output, A, x, tensors, ctx)
    if method == "alpha-crown":
        res = optimise(graph, plan, A, x, tensors, bounds, lower_slope, alpha, res, patches,
                       upper, done)
    shape = by_ibp.lower.shape
    return intersect(by_ibp, Interval(res.lower.reshape(shape), res.upper.reshape(shape)))


def reference_bounds(graph: Graph, x: Interval, tensors: Mapping[str, torch.Tensor],
                     C: torch.Tensor | None, plan: DomainPlan, lower_slope: str = "adaptive",
                     alpha: AlphaConfig | None = None, sparse: bool | None = False,
                     patches: bool = True) -> Interval:
    """The un-partitioned reference: intermediate bounds under ``plan`` in graph order, then
    :func:`final_bounds`. ``sparse`` picks the neurons of crown layers a backward pass
    bounds (:func:`~boundflow.domains.crown.crown_node`: False every one, None the ones
    that can change a result, True the IBP-inexactly relaxed ones); ``patches`` (default)
    bounds conv-chain pre-activations with window-layout coefficients, ``False`` with dense
    ones (the same bounds, slower: for tests)."""
    plan.check(graph)
    bounds = intermediate_bounds(graph, x, tensors, plan, lower_slope, sparse, patches)
    fold = C is not None and folds_spec(graph)
    src = bounds[graph.output_node.inputs[0]] if fold else bounds[graph.output]
    return final_bounds(graph, x, tensors, C, src, fold, plan.final, bounds, plan,
                        lower_slope, alpha, patches)
