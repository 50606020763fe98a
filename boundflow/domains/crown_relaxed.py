"""CROWN backward rules of the relaxed ops: every activation (through the relaxation
registry), ``maxpool2d`` and ``softmax``. Each reads its input's interval from the context.

- **Activations**: the entry's lower and upper lines on the input interval (learned
  parameters from ``ctx.alphas`` where given, one set per side); positive coefficients take
  the lower line on the lower side and the upper line on the upper side, negative ones the
  other.
- **maxpool2d** (as auto_LiRPA bounds it): in each window let ``j`` be the element with the
  largest lower bound. ``y >= x_j`` always. If ``l_j >= u_k`` for every other element ``k``
  the window's output *is* ``x_j``, so ``y <= x_j`` too (exact); otherwise ``y <=`` the
  constant ``max_k u_k``. The padding is -inf: it is never ``j`` and never the maximum.
- **softmax** is a *cut*, not a linear relaxation: its output ``y`` is bounded over a set it
  is known to lie in, ``{y : l_y <= y <= u_y, sum of y along the axis = 1}``, where
  ``[l_y, u_y]`` is the tight interval of softmax over its input's interval (from the
  context; ``interval.softmax_interval``). ``A·y`` is minimised over that set exactly (a
  fractional knapsack: start at ``l_y`` and give the remaining mass ``1 - sum l_y`` to the
  smallest coefficients first) and maximised likewise. The result is a constant: no
  coefficients pass to the input, so dependencies between the softmax and other paths to
  its readers are lost (meant for a softmax that ends the network). Sound because every
  true softmax output is in that set; never looser than concretising over the interval
  alone, and exact for the sum of the outputs.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from boundflow.domains import activations
from boundflow.domains.coeffs import BackwardContext, Coeffs, dot_trailing, sum_trailing
from boundflow.domains.interval import Interval, softmax_interval
from boundflow.domains.relaxation import Lines, split_params
from boundflow.ir import ops
from boundflow.ir.graph import Graph, Node


def _bias_term(c1: torch.Tensor, b1, c2: torch.Tensor, b2):
    """``sum(c1·b1) + sum(c2·b2)`` over trailing axes, skipping zero (None) biases."""
    terms = [dot_trailing(c, b) for c, b in ((c1, b1), (c2, b2)) if b is not None]
    if not terms:
        return 0.0
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def relax(a: Coeffs, low: Lines, up: Lines):
    """Coefficients through an elementwise relaxation: ``low`` are the lines the lower bound
    uses (lower line for positive coefficients, upper line for negative), ``up`` those of the
    upper bound. Returns ``(coeffs, lb_add, ub_add)``."""
    # the negative part as A - A⁺ (equal for finite A): under autograd a subtraction's
    # backward is free where a second clamp's is another pass over the coefficients
    lA_pos = a.lA.clamp(min=0)
    lA_neg = a.lA - lA_pos
    uA_pos = lA_pos if a.uA is a.lA else a.uA.clamp(min=0)
    uA_neg = lA_neg if a.uA is a.lA else a.uA - uA_pos
    out = Coeffs(torch.addcmul(lA_pos * low.lower_slope, lA_neg, low.upper_slope),
                 torch.addcmul(uA_pos * up.upper_slope, uA_neg, up.lower_slope))
    return (out, _bias_term(lA_neg, low.upper_bias, lA_pos, low.lower_bias),
            _bias_term(uA_pos, up.upper_bias, uA_neg, up.lower_bias))


# the most bytes of relaxation lines one memo keeps (:class:`LinesMemo`)
MEMO_BYTES = 64 << 20


class LinesMemo(dict):
    """One run's memo of default lines (see :func:`default_lines`): per activation node,
    ``(lower, upper, mode, lines)``. It stops keeping new entries once they would hold more
    than ``budget`` bytes of lines (a large network's lines are as large as its
    pre-activations, three times over; recomputing them is cheap next to holding them)."""

    def __init__(self, budget: int):
        super().__init__()
        self.room = int(budget)
        # a run's slices of its buffers by (buffer, start, size): the same slice objects for
        # every task bounding that part, so a part's lines are found once (:class:`PartMemo`)
        self.slices: dict = {}

    def keep(self, name: str, entry: tuple) -> None:
        old = self.get(name)
        freed = 0 if old is None else _line_bytes(old[3])
        need = _line_bytes(entry[3])
        if need - freed <= self.room:
            self[name] = entry
            self.room -= need - freed
        elif old is not None:                 # the old entry is stale now: let it go
            del self[name]
            self.room += freed


class PartMemo(LinesMemo):
    """One part of a batch's view of a run's :class:`LinesMemo`: its entries live in the
    run's memo (one byte budget) under the key and ``suffix``, so the tasks of a run that
    bound the batch in parts (cache-sized chunks) share each part's lines, as whole-batch
    tasks share theirs. Valid for intervals that are the same tensors from task to task:
    the caller hands each part the same slice objects (``slices``, per run)."""

    def __init__(self, parent: LinesMemo, suffix: str):
        dict.__init__(self)
        self.parent, self.suffix, self.room = parent, suffix, 0

    def get(self, key, default=None):
        return self.parent.get(key + self.suffix, default)

    def keep(self, name: str, entry: tuple) -> None:
        self.parent.keep(name + self.suffix, entry)


def _line_bytes(lines: Lines) -> int:
    return sum(t.numel() * t.element_size() for t in lines if t is not None)


def memoised(memo: dict | None, key: str, pre: Interval, tag, compute):
    """``compute()``, a function of the interval ``pre`` (and ``tag``) only, kept in
    ``memo`` under ``key`` while ``pre`` is the same pair of tensors (``is``): a new interval
    replaces it, and intervals that carry gradients (an optimiser's) are never kept."""
    hit = None if memo is None else memo.get(key)
    if hit is not None and hit[0] is pre.lower and hit[1] is pre.upper and hit[2] == tag:
        return hit[3]
    value = compute()
    if memo is not None and not (pre.lower.requires_grad or pre.upper.requires_grad):
        entry = (pre.lower, pre.upper, tag, value)
        if isinstance(memo, LinesMemo):
            memo.keep(key, entry)
        else:
            memo[key] = entry
    return value


def default_lines(node: Node, pre: Interval, mode: str, memo: dict | None) -> Lines:
    """The lines of activation ``node`` on its input's interval ``pre`` (``[B, *shape]``)
    under the lower-slope ``mode``. ``memo`` (one run's, shared by its backward passes:
    every pass crosses the activations below its start, so a deep network found each one's
    lines once per start) keeps them per node while ``pre`` is the same pair of tensors
    (:func:`memoised`)."""
    def compute() -> Lines:
        relaxation = activations.get(node.op)
        state = relaxation.prepare(pre.lower, pre.upper, node.attrs)
        return relaxation.lines(state, node.attrs,
                                relaxation.default_params(state, node.attrs, mode))
    return memoised(memo, node.name, pre, mode, compute)


def activation(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    relaxation = activations.get(node.op)
    pre = ctx.bounds[node.inputs[0]]
    if ctx.alphas is not None and node.name in ctx.alphas:
        # [B, 1, *shape]; the state depends on the interval alone (an optimiser's steps
        # share it)
        state = memoised(ctx.lines, node.name + "|state", pre, "state",
                         lambda: relaxation.prepare(pre.lower.unsqueeze(1),
                                                    pre.upper.unsqueeze(1), node.attrs))
        t_low, t_up = ctx.alphas[node.name]
        n = relaxation.n_params
        low = relaxation.lines(state, node.attrs, split_params(t_low, n))
        up = relaxation.lines(state, node.attrs, split_params(t_up, n))
    else:                                                # [B, 1, *shape], as the rows read it
        low = up = Lines(*(None if t is None else t.unsqueeze(1)
                           for t in default_lines(node, pre, ctx.lower_slope, ctx.lines)))
    out, lb, ub = relax(a, low, up)
    return [out], lb, ub


# --- maxpool2d -----------------------------------------------------------------------------

def _window_index(shape, attrs, device) -> tuple[torch.Tensor, int, int]:
    """Flat positions ``[K, L]`` in the (-inf) padded plane of each window's elements."""
    (kh, kw), (sh, sw), (ph, pw) = (tuple(attrs[k]) for k in ("kernel_size", "stride",
                                                               "padding"))
    H, W = shape[-2] + 2 * ph, shape[-1] + 2 * pw
    ho, wo = (H - kh) // sh + 1, (W - kw) // sw + 1
    rows = (torch.arange(ho, device=device) * sh)[:, None] + torch.arange(kh, device=device)
    cols = (torch.arange(wo, device=device) * sw)[:, None] + torch.arange(kw, device=device)
    flat = rows[None, :, :, None, None] * W + cols[None, None, None, :, :]  # [1,ho,kh,wo,kw]
    index = flat.reshape(ho, kh, wo, kw).permute(1, 3, 0, 2).reshape(kh * kw, ho * wo)
    return index, H, W


def maxpool_relaxation(pre: Interval, attrs: Mapping):
    """Per window ``[B, C, L]``: the unpadded flat position of the element with the largest
    lower bound, whether it dominates the window, and the window's largest upper bound."""
    (ph, pw) = tuple(attrs["padding"])
    l, u = pre.lower, pre.upper
    B, C, h, w = l.shape
    index, H, W = _window_index(l.shape, attrs, l.device)

    def windows(t):                                              # [B, C, K, L]
        padded = torch.nn.functional.pad(t, (pw, pw, ph, ph), value=-math.inf)
        return padded.flatten(2)[:, :, index]

    lw, uw = windows(l), windows(u)
    best = lw.argmax(2, keepdim=True)                            # [B, C, 1, L]
    lower_best = lw.gather(2, best)
    others = uw.scatter(2, best, -math.inf).amax(2, keepdim=True)
    dominant = (lower_best >= others).squeeze(2)
    pos = index[best.squeeze(2), torch.arange(index.shape[1], device=l.device)]
    pos = (pos // W - ph) * w + (pos % W - pw)                   # into the unpadded plane
    return pos, dominant, uw.amax(2)


def maxpool2d(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    pre = ctx.bounds[node.inputs[0]]
    pos, dom, umax = memoised(ctx.lines, node.name, pre, "maxpool",
                              lambda: maxpool_relaxation(pre, node.attrs))
    in_shape = ctx.shapes[node.inputs[0]]
    dom = dom.unsqueeze(1).to(a.lA.dtype)                        # [B, 1, C, L]
    umax = umax.unsqueeze(1)
    lA, uA = a.lA.flatten(3), a.uA.flatten(3)                    # [B', S, C, L]
    lA_pos, lA_neg = lA.clamp(min=0), lA.clamp(max=0)
    uA_pos, uA_neg = uA.clamp(min=0), uA.clamp(max=0)
    # the lower line is x_j, the upper x_j where j dominates, else the constant max u
    to_x = (lA_pos + lA_neg * dom, uA_pos * dom + uA_neg)
    lb = sum_trailing(lA_neg * (1 - dom) * umax)
    ub = sum_trailing(uA_pos * (1 - dom) * umax)
    B, S = max(lA.shape[0], pos.shape[0]), lA.shape[1]
    index = pos.unsqueeze(1).expand(B, S, -1, -1)

    def scatter(c):
        c = c.expand(B, S, -1, -1)
        out = torch.zeros((B, S, in_shape[0], in_shape[1] * in_shape[2]), dtype=c.dtype,
                          device=c.device)
        return out.scatter_add(3, index, c).reshape((B, S) + tuple(in_shape))
    return [Coeffs(scatter(to_x[0]), scatter(to_x[1]))], lb, ub


# --- softmax -------------------------------------------------------------------------------

def _min_over_simplex_box(A: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``min A·y`` over ``lo <= y <= hi``, ``sum(y) = 1`` along the last axis, summed over
    the other trailing axes: ``[B, S]``. The greedy fill is the LP's optimum."""
    A, lo, hi = torch.broadcast_tensors(A, lo, hi)
    rest = (1 - lo.sum(-1, keepdim=True)).clamp(min=0)
    order = A.argsort(-1)
    a_sorted = A.gather(-1, order)
    room = (hi - lo).clamp(min=0).gather(-1, order)
    before = room.cumsum(-1) - room
    fill = torch.minimum((rest - before).clamp(min=0), room)
    return sum_trailing(A * lo) + sum_trailing(a_sorted * fill)


def softmax(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    axis = node.attrs["axis"] + 1
    y = softmax_interval(ctx.bounds[node.inputs[0]], axis)
    lo, hi = y.lower.unsqueeze(1).movedim(axis + 1, -1), y.upper.unsqueeze(1).movedim(axis + 1, -1)
    lA, uA = a.lA.movedim(axis + 1, -1), a.uA.movedim(axis + 1, -1)
    lb = _min_over_simplex_box(lA, lo, hi)
    ub = -_min_over_simplex_box(-uA, lo, hi)
    return [], lb, ub


RELAXED_RULES = {"maxpool2d": maxpool2d, "softmax": softmax,
                 **{op: activation for op in activations.ACTIVATIONS}}


def inexact(graph: Graph, name: str, bound: Interval) -> torch.Tensor:
    """Where (``[B, *shape]``) the relaxations of the relaxed ops reading node ``name`` are
    not exact, i.e. the neurons whose bounds matter to them (ReLU: the unstable ones)."""
    relaxed = ops.having("relaxed")
    mask = torch.zeros_like(bound.lower, dtype=torch.bool)
    for reader in graph.nodes:
        if reader.op not in relaxed or name not in reader.inputs:
            continue
        if reader.op in activations.ACTIVATIONS:
            mask |= activations.get(reader.op).inexact(bound.lower, bound.upper, reader.attrs)
        else:
            mask |= bound.lower < bound.upper
    return mask


def settled(graph: Graph, name: str, bound: Interval) -> torch.Tensor:
    """Where (``[B, *shape]``) every reader of node ``name`` is a nondecreasing activation
    whose image of the neuron's interval is one point (ReLU: ``u <= 0``): any tighter
    interval inside ``bound`` has the same image, so tightening such a neuron changes
    nothing downstream of ``name``, by IBP or CROWN. Nowhere if ``name`` has no reader
    (its interval is a result) or a reader of any other kind."""
    readers = [n for n in graph.nodes if name in n.inputs]
    mask = torch.full_like(bound.lower, bool(readers), dtype=torch.bool)
    for reader in readers:
        relaxation = activations.ACTIVATIONS.get(reader.op)
        if relaxation is None or not relaxation.monotone:
            return torch.zeros_like(mask)
        lo, hi = relaxation.interval(bound.lower, bound.upper, reader.attrs)
        mask &= lo == hi
    return mask

