"""The backward walk of CROWN, driven by the rule table of :mod:`boundflow.domains.crown_rules`.

A backward pass starts at a node with a matrix ``A`` of shape ``[B, S, *node_shape]`` (the
spec ``C``, or the identity to bound every neuron) and pushes a pair of linear bounds

    lA·x + lb  <=  A·node  <=  uA·x + ub

back through the graph until ``x`` is the input, where they are concretised against the box:
``lA·mid - |lA|·rad + lb`` and ``uA·mid + |uA|·rad + ub``. Where a node has several readers,
their coefficients add up. Also here: start matrices, and intersecting rows into bounds.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from boundflow.domains.coeffs import BackwardContext, Coeffs
from boundflow.domains.crown_rules import RULES
from boundflow.domains.gemv import bgemv
from boundflow.domains.interval import Interval
from boundflow.errors import UnsupportedOpError
from boundflow.ir.graph import Graph, ancestors

# largest number of elements one backward coefficient tensor may hold before the spec
# dimension is split into chunks
CHUNK_ELEMENTS = 1 << 25


def _add(a: Coeffs, b: Coeffs) -> Coeffs:
    if a.lA is a.uA and b.lA is b.uA:
        total = a.lA + b.lA
        return Coeffs(total, total)
    return Coeffs(a.lA + b.lA, a.uA + b.uA)


def concretize(a: Coeffs, lb, ub, x: Interval) -> Interval:
    """Bounds over the input box of ``lA·x + lb`` (lower) and ``uA·x + ub`` (upper)."""
    mid = ((x.upper + x.lower) / 2).flatten(1)                     # [B, n]
    rad = ((x.upper - x.lower) / 2).flatten(1)
    lA = a.lA.flatten(2)                                            # [B or 1, S, n]
    lc, lr = bgemv(lA, mid), bgemv(lA.abs(), rad)
    if a.uA is a.lA:                                                # one map: its products once
        return Interval(lc - lr + lb, lc + lr + ub)
    uA = a.uA.flatten(2)
    return Interval(lc - lr + lb, bgemv(uA, mid) + bgemv(uA.abs(), rad) + ub)


def backward(graph: Graph, start: str, A: torch.Tensor, x: Interval,
             tensors: Mapping[str, torch.Tensor], ctx: BackwardContext) -> Interval:
    """Bounds of ``A·start`` over the input box. ``A`` is ``[B, S, *start_shape]``, or
    ``[1, S, *start_shape]`` when it is the same for every sample (an identity start): it
    then stays batch-free through the affine ops and broadcasts at the first relaxation, so
    those steps run once instead of once per sample."""
    a, lb, ub = linear_bounds(graph, start, A, tensors, ctx)
    if a is not None:
        return concretize(a, lb, ub, x)
    # the start node does not depend on the input: its value is the constant bias
    zero = torch.zeros(x.lower.shape[0], A.shape[1], dtype=A.dtype, device=A.device)
    return Interval(zero + lb, zero + ub)


def linear_bounds(graph: Graph, start: str, A: torch.Tensor,
                  tensors: Mapping[str, torch.Tensor], ctx: BackwardContext
                  ) -> tuple[Coeffs | None, torch.Tensor | float, torch.Tensor | float]:
    """The linear bounds ``lA·x + lb <= A·start <= uA·x + ub`` in the input ``x``, before
    they are concretised: ``(Coeffs(lA, uA), lb, ub)``, the coefficients None where
    ``start`` does not depend on the input (:func:`backward` for ``A``)."""
    need = ancestors(graph, [start])
    order = [n for n in graph.nodes if n.name in need]
    if ctx.shapes is None:
        ctx = ctx._replace(shapes={n.name: n.shape for n in graph.nodes})
    pending: dict[str, Coeffs] = {start: Coeffs(A, A)}
    lb = ub = 0.0
    for node in reversed(order):
        a = pending.pop(node.name, None)
        if a is None:
            continue
        if ctx.lower_terms is not None and node.name in ctx.lower_terms:
            a = Coeffs(a.lA + ctx.lower_terms[node.name], a.uA)
        if node.op == "input":
            return a, lb, ub
        rule = RULES.get(node.op)
        if rule is None:
            raise UnsupportedOpError(f"CROWN has no rule for op {node.op!r} "
                                     f"({node.describe()})")
        params = {role: tensors[key] for role, key in node.params.items()}
        ins, dl, du = rule(node, params, a, ctx)
        lb, ub = lb + dl, ub + du
        for name, coeffs in zip(node.inputs, ins):
            prev = pending.get(name)
            pending[name] = coeffs if prev is None else _add(prev, coeffs)
    return None, lb, ub


def backward_chunked(graph: Graph, start: str, A: torch.Tensor, x: Interval,
                     tensors: Mapping[str, torch.Tensor], ctx: BackwardContext) -> Interval:
    """``backward`` with the spec dimension split so no coefficient tensor grows too big."""
    widest = max(math.prod(n.shape) for n in graph.nodes)
    per_spec = x.lower.shape[0] * widest
    chunk = max(1, CHUNK_ELEMENTS // max(per_spec, 1))
    if A.shape[1] <= chunk:
        return backward(graph, start, A, x, tensors, ctx)
    parts = [backward(graph, start, a, x, tensors, ctx) for a in A.split(chunk, 1)]
    return Interval(torch.cat([p.lower for p in parts], 1), torch.cat([p.upper for p in parts], 1))


# --- start matrices and rows ---------------------------------------------------------------

def selection_start(bound: Interval, index: torch.Tensor) -> torch.Tensor:
    """Start matrix ``[1, k, *shape]`` (the same for every sample) whose row ``j`` picks
    neuron ``index[j]``."""
    shape = tuple(bound.lower.shape[1:])
    n = math.prod(shape)
    rows = torch.zeros(len(index), n, dtype=bound.lower.dtype, device=bound.lower.device)
    rows[torch.arange(len(index)), index] = 1.0
    return rows.reshape((1, len(index)) + shape)


def identity_start(bound: Interval) -> torch.Tensor:
    """The identity as a start matrix: ``[1, n, *shape]`` for a node of ``n`` neurons."""
    n = math.prod(bound.lower.shape[1:])
    return selection_start(bound, torch.arange(n, device=bound.lower.device))


def masked_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the neurons ``mask`` (``[B, *shape]``) marks in any sample."""
    return mask.flatten(1).any(0).nonzero().flatten()


def masked_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the flat indices of the neurons ``mask`` marks, padded to the largest
    count: ``index`` and ``valid`` of shape ``[B, k]``."""
    mask = mask.flatten(1)
    k = int(mask.sum(1).max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
    return order, torch.gather(mask, 1, order)


def intersect(a: Interval, b: Interval) -> Interval:
    return Interval(torch.maximum(a.lower, b.lower), torch.minimum(a.upper, b.upper))


def tighten_rows(bound: Interval, index: torch.Tensor, rows: Interval,
                 straight_through: bool = False) -> Interval:
    """``bound`` with neurons ``index`` intersected with ``rows`` (``[B, k]``).

    With ``straight_through`` the value is the same but the gradient goes to ``rows`` as if
    they had been kept: an optimiser whose rows start no tighter than ``bound`` would get
    no gradient from ``max`` (or half of it at ties) and stall."""
    lo, hi = bound.lower.flatten(1), bound.upper.flatten(1)
    new_lo = torch.maximum(lo[:, index], rows.lower)
    new_hi = torch.minimum(hi[:, index], rows.upper)
    if straight_through:
        new_lo = rows.lower + (new_lo - rows.lower).detach()
        new_hi = rows.upper + (new_hi - rows.upper).detach()
    lo = lo.index_copy(1, index, new_lo)
    hi = hi.index_copy(1, index, new_hi)
    return Interval(lo.reshape(bound.lower.shape), hi.reshape(bound.upper.shape))
