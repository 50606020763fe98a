"""Backward linear bound propagation (CROWN) as a table of per-op backward rules.

A backward pass starts at a node with a matrix ``A`` of shape ``[B, S, *node_shape]`` (the
spec ``C``, or the identity to bound every neuron) and pushes a pair of linear bounds

    lA·x + lb  <=  A·node  <=  uA·x + ub

back through the graph until ``x`` is the input, where they are concretised against the box:
``lA·mid - |lA|·rad + lb`` and ``uA·mid + |uA|·rad + ub``. Each rule maps the coefficients of
a node's output to those of its inputs (``A·W`` for linear, a transposed convolution for
conv2d, the ReLU relaxation for relu) and adds the constant terms to the biases. Where a
node has several readers, their coefficients add up.

ReLU relaxation, for pre-activation bounds ``[l, u]``: stable neurons are exact (slope 1
or 0); for an unstable one (``l < 0 < u``) the upper line is the chord ``u(x - l)/(u - l)``
and the lower line ``a·x`` with ``a`` in [0, 1]: ``a = 1`` if ``u > -l`` else 0 ("adaptive"),
or ``zero`` / ``one``, or a learned alpha (alpha-CROWN).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F

from boundflow.domains.crown_conv import conv_chain, crown_conv_rows
from boundflow.domains.interval import Interval, RULES as IBP_RULES
from boundflow.domains.traversal import ancestors, apply_rule
from boundflow.errors import BoundFlowError, UnsupportedOpError
from boundflow.ir.domain_plan import DomainPlan, preactivations
from boundflow.ir.graph import Graph, Node

LOWER_SLOPES = ("adaptive", "zero", "one")
# bound conv pre-activations with local (patch) coefficients where the graph allows
PATCHES = True
# largest number of elements one backward coefficient tensor may hold before the spec
# dimension is split into chunks
CHUNK_ELEMENTS = 1 << 25


class Coeffs(NamedTuple):
    """Coefficients of the lower and upper linear bounds, ``[B, S, *shape]`` each."""

    lA: torch.Tensor
    uA: torch.Tensor


class BackwardContext(NamedTuple):
    """What rules read besides the coefficients: intervals of the nodes bounded so far (a
    ReLU reads its pre-activation's; nothing else is needed), the lower slopes of ReLUs (mode
    name, or alpha tensors per relu node and side) and every node's per-sample shape (filled
    in from the graph by :func:`backward`)."""

    bounds: Mapping[str, Interval]
    lower_slope: str
    alphas: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None
    shapes: Mapping[str, tuple[int, ...]] | None = None


# --- backward rules: (node, params, coeffs, ctx) -> ([coeffs per input], lb_add, ub_add) ----

def _sum_trailing(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).sum(-1)


def _same(a: Coeffs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Coeffs:
    """``fn`` on both sides; once where they are still one tensor (before any ReLU)."""
    if a.lA is a.uA:
        out = fn(a.lA)
        return Coeffs(out, out)
    return Coeffs(fn(a.lA), fn(a.uA))


def linear(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    w, b = p["weight"], p.get("bias")
    out = _same(a, lambda t: torch.matmul(t, w))
    if b is None:
        return [out], 0.0, 0.0
    return [out], *_const_term(a, b)


def _output_padding(in_hw, out_hw, kernel, stride, padding, dilation):
    return tuple(in_hw[i] - ((out_hw[i] - 1) * stride[i] - 2 * padding[i]
                             + dilation[i] * (kernel[i] - 1) + 1) for i in (0, 1))


def _conv_t(t: torch.Tensor, weight: torch.Tensor, in_shape, stride, padding, dilation, groups
            ) -> torch.Tensor:
    b, s = t.shape[:2]
    flat = t.reshape((b * s,) + tuple(t.shape[2:]))
    op = _output_padding(in_shape[1:], t.shape[3:], weight.shape[2:], stride, padding,
                         dilation)
    out = F.conv_transpose2d(flat, weight, None, stride, padding, op, groups, dilation)
    return out.reshape((b, s) + tuple(in_shape))


def conv2d(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    at = node.attrs
    in_shape = ctx.shapes[node.inputs[0]]
    fn = lambda t: _conv_t(t, p["weight"], in_shape, at["stride"], at["padding"],  # noqa
                           at["dilation"], at["groups"])
    out = _same(a, fn)
    b = p.get("bias")
    if b is None:
        return [out], 0.0, 0.0
    low = (a.lA.sum((-1, -2)) * b).sum(-1)
    return [out], low, (low if a.lA is a.uA else (a.uA.sum((-1, -2)) * b).sum(-1))


def relu_relaxation(l: torch.Tensor, u: torch.Tensor):
    """Upper line (slope, intercept) and the unstable mask for pre-activation bounds [l, u]."""
    unstable = (l < 0) & (u > 0)
    width = torch.where(unstable, u - l, torch.ones_like(u))
    up_slope = torch.where(unstable, u / width, (l >= 0).to(u.dtype))
    up_bias = torch.where(unstable, -l * u / width, torch.zeros_like(u))
    return up_slope, up_bias, unstable


def default_lower_slope(l: torch.Tensor, u: torch.Tensor, mode: str) -> torch.Tensor:
    """The lower slope of unstable neurons (stable ones are fixed separately)."""
    if mode == "adaptive":
        return (u > -l).to(u.dtype)
    if mode == "zero":
        return torch.zeros_like(u)
    if mode == "one":
        return torch.ones_like(u)
    raise BoundFlowError(f"lower slope {mode!r} is not one of {LOWER_SLOPES}")


def relu(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    pre = ctx.bounds[node.inputs[0]]
    l, u = pre.lower.unsqueeze(1), pre.upper.unsqueeze(1)          # [B, 1, *shape]
    up_slope, up_bias, unstable = relu_relaxation(l, u)
    active = (l >= 0).to(u.dtype)
    if ctx.alphas is not None and node.name in ctx.alphas:
        lo_l, lo_u = ctx.alphas[node.name]
    else:
        lo_l = lo_u = default_lower_slope(l, u, ctx.lower_slope)
    lo_l = torch.where(unstable, lo_l, active)
    lo_u = torch.where(unstable, lo_u, active)
    lA_pos, lA_neg = a.lA.clamp(min=0), a.lA.clamp(max=0)
    uA_pos, uA_neg = a.uA.clamp(min=0), a.uA.clamp(max=0)
    out = Coeffs(lA_pos * lo_l + lA_neg * up_slope, uA_pos * up_slope + uA_neg * lo_u)
    return [out], _sum_trailing(lA_neg * up_bias), _sum_trailing(uA_pos * up_bias)


def _const_term(a: Coeffs, c: torch.Tensor, sign: float = 1.0):
    low = sign * _sum_trailing(a.lA * c)
    return low, (low if a.lA is a.uA else sign * _sum_trailing(a.uA * c))


def add(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    if len(node.inputs) == 2:
        return [a, a], 0.0, 0.0
    return [a], *_const_term(a, p["other"])


def sub(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    if len(node.inputs) == 2:
        return [a, _same(a, torch.neg)], 0.0, 0.0
    return [a], *_const_term(a, p["other"], -1.0)


def mul(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    return [_same(a, lambda t: t * p["other"])], 0.0, 0.0


def div(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    return [_same(a, lambda t: t / p["other"])], 0.0, 0.0


def batchnorm(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    ndim = a.lA.dim() - 3
    scale = p["weight"] / torch.sqrt(p["var"] + node.attrs["eps"])
    shift = (p["bias"] - p["mean"] * scale).reshape((-1,) + (1,) * ndim)
    scale = scale.reshape((-1,) + (1,) * ndim)
    return [_same(a, lambda t: t * scale)], *_const_term(a, shift)


def _reshape_back(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    shape = ctx.shapes[node.inputs[0]]
    return [_same(a, lambda t: t.reshape(t.shape[:2] + shape))], 0.0, 0.0


def permute(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    dims = node.attrs["dims"]
    inverse = [dims.index(j) for j in range(len(dims))]
    return [_same(a, lambda t: t.permute(0, 1, *(2 + i for i in inverse)))], 0.0, 0.0


def avgpool2d(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    at = node.attrs
    in_shape = ctx.shapes[node.inputs[0]]
    kh, kw = at["kernel_size"]
    weight = torch.full((in_shape[0], 1, kh, kw), 1.0 / (kh * kw), dtype=a.lA.dtype,
                        device=a.lA.device)
    fn = lambda t: _conv_t(t, weight, in_shape, at["stride"], at["padding"], (1, 1),  # noqa
                           in_shape[0])
    return [_same(a, fn)], 0.0, 0.0


def identity(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    return [a], 0.0, 0.0


def concat(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    axis = node.attrs["axis"] + 2
    sizes = [ctx.shapes[i][axis - 2] for i in node.inputs]
    parts = zip(a.lA.split(sizes, axis), a.uA.split(sizes, axis))
    return [Coeffs(l, u) for l, u in parts], 0.0, 0.0


RULES: dict[str, Callable] = {
    "linear": linear, "conv2d": conv2d, "relu": relu, "add": add, "sub": sub, "mul": mul,
    "div": div, "batchnorm": batchnorm, "flatten": _reshape_back, "reshape": _reshape_back,
    "permute": permute, "avgpool2d": avgpool2d, "identity": identity, "concat": concat,
}


# --- the backward walk ---------------------------------------------------------------------

def _add(a: Coeffs, b: Coeffs) -> Coeffs:
    if a.lA is a.uA and b.lA is b.uA:
        total = a.lA + b.lA
        return Coeffs(total, total)
    return Coeffs(a.lA + b.lA, a.uA + b.uA)


def concretize(a: Coeffs, lb, ub, x: Interval) -> Interval:
    """Bounds over the input box of ``lA·x + lb`` (lower) and ``uA·x + ub`` (upper)."""
    mid = ((x.upper + x.lower) / 2).flatten(1).unsqueeze(-1)        # [B, n, 1]
    rad = ((x.upper - x.lower) / 2).flatten(1).unsqueeze(-1)
    lA, uA = a.lA.flatten(2), a.uA.flatten(2)                      # [B or 1, S, n]
    lower = (torch.matmul(lA, mid) - torch.matmul(lA.abs(), rad)).squeeze(-1) + lb
    upper = (torch.matmul(uA, mid) + torch.matmul(uA.abs(), rad)).squeeze(-1) + ub
    return Interval(lower, upper)


def backward(graph: Graph, start: str, A: torch.Tensor, x: Interval,
             tensors: Mapping[str, torch.Tensor], ctx: BackwardContext) -> Interval:
    """Bounds of ``A·start`` over the input box. ``A`` is ``[B, S, *start_shape]``, or
    ``[1, S, *start_shape]`` when it is the same for every sample (an identity start): it
    then stays batch-free through the affine ops and broadcasts at the first ReLU, so
    those steps run once instead of once per sample."""
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
        if node.op == "input":
            return concretize(a, lb, ub, x)
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
    # the start node does not depend on the input: its value is the constant bias
    zero = torch.zeros(x.lower.shape[0], A.shape[1], dtype=A.dtype, device=A.device)
    return Interval(zero + lb, zero + ub)


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


def unstable_index(bound: Interval) -> torch.Tensor:
    """Flat indices of the neurons unstable (``l < 0 < u``) in any sample of the batch."""
    mask = ((bound.lower < 0) & (bound.upper > 0)).flatten(1).any(0)
    return mask.nonzero().flatten()


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


def unstable_rows(bound: Interval) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the flat indices of its unstable neurons, padded to the largest count:
    ``index`` and ``valid`` of shape ``[B, k]``."""
    mask = ((bound.lower < 0) & (bound.upper > 0)).flatten(1)
    k = int(mask.sum(1).max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]
    return order, torch.gather(mask, 1, order)


def _crown_sparse(graph: Graph, node: str, bound: Interval, x: Interval,
                  tensors: Mapping[str, torch.Tensor], ctx: BackwardContext) -> Interval:
    """CROWN on each sample's own unstable neurons only."""
    index, valid = unstable_rows(bound)
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


def crown_node(graph: Graph, node: str, bound: Interval, x: Interval,
               tensors: Mapping[str, torch.Tensor], ctx: BackwardContext,
               index: torch.Tensor | None = None, sparse: bool = False) -> Interval:
    """Tighten the pre-activation ``bound`` of ``node`` by CROWN on the neurons ``index``:
    by default all of them; with ``sparse`` only those ``bound`` leaves unstable. Stable
    neurons already have an exact ReLU relaxation, so ``sparse`` saves work where the node
    is bounded only for its relaxation; but their intervals also feed IBP downstream, which
    ``sparse`` leaves looser (and then more crown layers are no longer never-looser)."""
    if index is None and sparse and ctx.alphas is None:
        return _crown_sparse(graph, node, bound, x, tensors, ctx)
    if index is None and ctx.alphas is None and PATCHES:
        chain = conv_chain(graph, node, tensors)
        if chain is not None:
            rows = crown_conv_rows(graph, chain, bound, x, tensors, ctx.bounds, ctx.lower_slope)
            return tighten_rows(bound, torch.arange(rows.lower.shape[1],
                                                    device=rows.lower.device), rows)
    if index is None:
        index = unstable_index(bound) if sparse else torch.arange(
            bound.lower[0].numel(), device=bound.lower.device)
    if index.numel() == 0:
        return bound
    A = selection_start(bound, index)
    if ctx.alphas is None:
        rows = backward_chunked(graph, node, A, x, tensors, ctx)
    else:
        rows = backward(graph, node, A, x, tensors, ctx)
    return tighten_rows(bound, index, rows, straight_through=ctx.alphas is not None)


_MIXING = {"linear", "conv2d", "avgpool2d"}


def ibp_exact_nodes(graph: Graph) -> set[str]:
    """Nodes whose IBP interval is already exact: affine in the input through at most one
    op that mixes elements (a linear map of a box is bounded exactly by centre/radius, a
    composition of two is not). CROWN cannot tighten them, so it is not run there."""
    mixes: dict[str, float] = {}
    for node in graph.nodes:
        ins = [mixes[i] for i in node.inputs]
        if node.op == "input":
            mixes[node.name] = 0
        elif node.op == "relu":
            mixes[node.name] = math.inf
        elif node.op in _MIXING:
            mixes[node.name] = ins[0] + 1
        elif len(ins) == 2 and node.op in ("add", "sub"):  # two input-dependent terms
            mixes[node.name] = max(ins) + 2
        else:
            mixes[node.name] = max(ins)
    return {name for name, m in mixes.items() if m <= 1}


def intermediate_bounds(graph: Graph, x: Interval, tensors: Mapping[str, torch.Tensor],
                        plan: DomainPlan, lower_slope: str = "adaptive", sparse: bool = False
                        ) -> dict[str, Interval]:
    """Intervals of every node: IBP throughout, and at each pre-activation the plan marks
    ``crown`` a backward pass from that node, intersected with its IBP interval (so a tighter
    bound never loosens one). Each node is bounded once per method."""
    crown_nodes = {n for n, d in plan.intermediate if d == "crown"} - ibp_exact_nodes(graph)
    bounds: dict[str, Interval] = {}
    ctx = BackwardContext(bounds, lower_slope, None)
    for node in graph.nodes:
        if node.op == "input":
            bounds[node.name] = x
            continue
        iv = apply_rule(IBP_RULES, node, tensors, [bounds[i] for i in node.inputs], "IBP")
        if node.name in crown_nodes:
            iv = crown_node(graph, node.name, iv, x, tensors, ctx, sparse=sparse)
        bounds[node.name] = iv
    return bounds


__all__ = ["backward", "intermediate_bounds", "relu_relaxation", "LOWER_SLOPES",
           "preactivations"]
