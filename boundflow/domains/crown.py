"""CROWN as a bound method: tightening a node's interval by backward passes, and the
intermediate bounds of a domain plan.

The pieces live by role: the backward rule table in :mod:`boundflow.domains.crown_rules`
(affine and view ops) and :mod:`boundflow.domains.crown_relaxed` (activations through the
relaxation registry :mod:`boundflow.domains.activations`, maxpool2d, softmax), the walk in
:mod:`boundflow.domains.backward`, the patch (receptive-field) form in
:mod:`boundflow.domains.crown_conv`. This module decides, per node, which of them runs.

The names other packages use are importable from here: ``BackwardContext``, ``crown_node``,
``LOWER_SLOPES``, and ``ibp_exact_nodes`` (defined in :mod:`boundflow.ir.analysis`).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from boundflow.domains.activations import default_lower_slope, relu_relaxation
from boundflow.domains.backward import (backward, backward_chunked, concretize, identity_start,
                                        intersect, masked_index, masked_rows, selection_start,
                                        tighten_rows)
from boundflow.domains.coeffs import BackwardContext, Coeffs
from boundflow.domains.crown_conv import conv_chain, crown_conv_rows
from boundflow.domains.crown_relaxed import inexact, settled
from boundflow.domains.crown_rules import RULES
from boundflow.domains.forward import forward_bounds
from boundflow.domains.interval import Interval, RULES as IBP_RULES
from boundflow.domains.relaxation import LOWER_SLOPES
from boundflow.domains.traversal import apply_rule
from boundflow.ir.analysis import ibp_exact_nodes, preactivations
from boundflow.ir.domain_plan import DomainPlan
from boundflow.ir.graph import Graph


# ``sparse="auto"`` (``None``) bounds a node's needed neurons only while they are at most
# this fraction of its neurons (per sample for dense rows, over the batch for patch rows);
# above it, bounding every neuron at once is faster (benchmarks/bench_sparse.py). Dense
# rows must also save at least DENSE_MIN_SAVED rows over the batch: on small layers the
# per-sample rows cost more than the rows they save.
DENSE_FRACTION = 0.6
DENSE_MIN_SAVED = 256
PATCH_FRACTION = 0.7


def _crown_masked(graph: Graph, node: str, bound: Interval, x: Interval,
                  tensors: Mapping[str, torch.Tensor], ctx: BackwardContext,
                  mask: torch.Tensor) -> Interval:
    """CROWN on each sample's own neurons ``mask`` (``[B, *shape]``) only, dense rows; the
    other neurons keep ``bound``."""
    index, valid = masked_rows(mask)
    B, k = index.shape
    if k == 0:
        return bound
    shape = tuple(bound.lower.shape[1:])
    A = torch.zeros(B, k, math.prod(shape), dtype=bound.lower.dtype, device=bound.lower.device)
    A.scatter_(2, index.unsqueeze(-1), valid.unsqueeze(-1).to(A.dtype))
    rows = backward_chunked(graph, node, A.reshape((B, k) + shape), x, tensors, ctx)
    lo, hi = bound.lower.flatten(1), bound.upper.flatten(1)
    new_lo = torch.where(valid, torch.maximum(lo.gather(1, index), rows.lower), lo.gather(1, index))
    new_hi = torch.where(valid, torch.minimum(hi.gather(1, index), rows.upper), hi.gather(1, index))
    return Interval(lo.scatter(1, index, new_lo).reshape(bound.lower.shape),
                    hi.scatter(1, index, new_hi).reshape(bound.upper.shape))


def needed(graph: Graph, node: str, bound: Interval) -> torch.Tensor:
    """The neurons (``[B, *shape]``) of ``node`` whose tighter bound can change any result:
    all but those both exactly relaxed and :func:`~boundflow.domains.crown_relaxed.settled`
    under ``bound`` (ReLU: all but the stable inactive ones, ``u <= 0``)."""
    return inexact(graph, node, bound) | ~settled(graph, node, bound)


def _crown_needed(graph: Graph, node: str, bound: Interval, x: Interval,
                  tensors: Mapping[str, torch.Tensor], ctx: BackwardContext,
                  chain: list | None) -> Interval | None:
    """``bound`` tightened on the :func:`needed` neurons only: every result equals that of
    tightening every neuron (up to float rounding). None where the needed neurons are too
    many for this to be faster (``DENSE_FRACTION``, ``DENSE_MIN_SAVED``,
    ``PATCH_FRACTION``). Patch rows (``chain``) share one neuron index over the batch: the
    union of the samples' needs."""
    B, n = bound.lower.shape[0], bound.lower[0].numel()
    if chain is None and B * n * (1 - DENSE_FRACTION) < DENSE_MIN_SAVED:
        return None                     # too small to pay, whatever the mask
    mask = needed(graph, node, bound)
    if chain is None:
        most = int(mask.flatten(1).sum(1).max()) if mask.numel() else 0
        if most > DENSE_FRACTION * n or B * (n - most) < DENSE_MIN_SAVED:
            return None
        return _crown_masked(graph, node, bound, x, tensors, ctx, mask)
    index = masked_index(mask)
    if index.numel() > PATCH_FRACTION * n:
        return None
    if index.numel() == 0:
        return bound
    rows = crown_conv_rows(graph, chain, bound, x, tensors, ctx.bounds, ctx.lower_slope,
                           index=index, lines=ctx.lines)
    return tighten_rows(bound, index, rows)


def crown_node(graph: Graph, node: str, bound: Interval, x: Interval,
               tensors: Mapping[str, torch.Tensor], ctx: BackwardContext,
               index: torch.Tensor | None = None, sparse: bool | None = False) -> Interval:
    """Tighten the pre-activation ``bound`` of ``node`` by CROWN on the neurons ``index``,
    by default chosen by ``sparse``:

    - ``False``: every neuron;
    - ``None`` (auto): only the :func:`needed` ones where that is faster. Exact: the
      neurons left out are exactly relaxed and every reader maps any interval inside theirs
      to the same point, so no result (later intervals, by IBP or CROWN, final bounds)
      changes, and more crown layers stay never looser;
    - ``True``: only those whose relaxation (by the relaxed ops reading ``node``) is
      inexact under ``bound`` (for ReLU: the unstable ones). Their intervals also feed IBP
      downstream, which this leaves looser (so more crown layers are no longer
      never-looser).

    Spatial pre-activations are bounded in patch form where ``ctx.patches`` allows and the
    patch form covers every node upstream (:func:`boundflow.domains.crown_conv.conv_chain`)
    (``sparse=True`` always uses dense rows)."""
    if index is None and ctx.alphas is None:
        if sparse is True:
            return _crown_masked(graph, node, bound, x, tensors, ctx,
                                 inexact(graph, node, bound))
        chain = conv_chain(graph, node, tensors) if ctx.patches else None
        if sparse is None:
            out = _crown_needed(graph, node, bound, x, tensors, ctx, chain)
            if out is not None:
                return out
        if chain is not None:
            rows = crown_conv_rows(graph, chain, bound, x, tensors, ctx.bounds, ctx.lower_slope,
                                   lines=ctx.lines)
            return tighten_rows(bound, torch.arange(rows.lower.shape[1],
                                                    device=rows.lower.device), rows)
    if index is None:
        index = masked_index(inexact(graph, node, bound)) if sparse else torch.arange(
            bound.lower[0].numel(), device=bound.lower.device)
    if index.numel() == 0:
        return bound
    A = selection_start(bound, index)
    if ctx.alphas is None:
        rows = backward_chunked(graph, node, A, x, tensors, ctx)
    else:
        rows = backward(graph, node, A, x, tensors, ctx)
    return tighten_rows(bound, index, rows, straight_through=ctx.alphas is not None)


def crown_nodes(graph: Graph, plan: DomainPlan) -> set[str]:
    """The pre-activations a backward pass tightens under ``plan``: those it marks ``crown``
    that IBP does not bound exactly already."""
    return {n for n, d in plan.intermediate if d == "crown"} - ibp_exact_nodes(graph)


def forward_nodes(graph: Graph, plan: DomainPlan) -> set[str]:
    """The pre-activations forward mode tightens under ``plan``: those it marks ``forward``
    that IBP does not bound exactly already."""
    return {n for n, d in plan.intermediate if d == "forward"} - ibp_exact_nodes(graph)


def intermediate_bounds(graph: Graph, x: Interval, tensors: Mapping[str, torch.Tensor],
                        plan: DomainPlan, lower_slope: str = "adaptive",
                        sparse: bool | None = False,
                        patches: bool = True) -> dict[str, Interval]:
    """Intervals of every node: IBP throughout, and at each pre-activation the plan marks
    ``crown`` a backward pass from that node (``forward``: forward-mode linear bounds, each
    relaxed op on the way relaxed over the best interval known for its input), intersected
    with its IBP interval (so a tighter bound never loosens one). Each node is bounded once
    per method."""
    tighten = crown_nodes(graph, plan)
    forward = forward_nodes(graph, plan)
    bounds: dict[str, Interval] = {}
    ctx = BackwardContext(bounds, lower_slope, None, patches=patches)

    def known(n: str, lo: torch.Tensor, hi: torch.Tensor):
        return torch.maximum(lo, bounds[n].lower), torch.minimum(hi, bounds[n].upper)
    for node in graph.nodes:
        if node.op == "input":
            bounds[node.name] = x
            continue
        iv = apply_rule(IBP_RULES, node, tensors, [bounds[i] for i in node.inputs], "IBP")
        if node.name in tighten:
            iv = crown_node(graph, node.name, iv, x, tensors, ctx, sparse=sparse)
        elif node.name in forward:
            iv = intersect(forward_bounds(graph, x, tensors, [node.name], known)[node.name], iv)
        bounds[node.name] = iv
    return bounds


__all__ = ["BackwardContext", "Coeffs", "LOWER_SLOPES", "RULES", "backward", "backward_chunked",
           "concretize", "crown_node", "crown_nodes", "default_lower_slope", "ibp_exact_nodes",
           "identity_start", "intermediate_bounds", "intersect", "preactivations",
           "relu_relaxation"]
