"""The window ("patch") rules of CROWN: per op, how window coefficients pass from a node's
output to its inputs.

The walk that drives this table is :mod:`boundflow.domains.crown_conv`; the window geometry is
:mod:`boundflow.domains.crown_windows`. Coefficients are :class:`Coeffs` pairs of shape
``[B', L', Cs, C, Rh, Rw]``: for each of the ``L`` start positions (``L' = 1`` while they are
all alike) and ``Cs`` start channels, or for each of ``L`` selected start neurons (``Cs =
1``), the coefficients on a window of ``C x Rh x Rw`` entries of the current ``C x H x W``
map. ``B'`` is 1 until a relaxation makes them differ per sample.

A window rule is ``rule(node, params, coeffs, window, ctx) -> ([coeffs per input], lb_add,
ub_add)`` with constant terms ``[B', L', Cs]`` (or 0.0); the windows it leaves on the inputs
are :func:`input_windows`, and :func:`covers` says which nodes the rules take. The
arithmetic is the dense rule's (:mod:`boundflow.domains.crown_rules`,
:mod:`boundflow.domains.crown_relaxed`) restricted to where it is not zero:

- **conv2d** (any stride, padding, dilation, groups): the adjoint convolution of each window,
  a transposed convolution without padding; the window grows to ``(R-1)·s + d·(k-1) + 1``,
  its stride to ``S·s``, its offset to ``O·s + p``. The bias adds ``sum(A)·b`` per channel.
- **avgpool2d**: a grouped conv2d with the fixed weight ``1/(kh·kw)`` (padding counts, as
  in IBP).
- **pad** (constant, on the spatial axes): the same coefficients, the window's offset grown
  by the leading pad; the entries on the border add ``value·sum(A there)``.
- **maxpool2d**: its relaxation (``crown_relaxed``: ``y >= x_j`` for the element ``j`` of
  largest lower bound; ``y <= x_j`` where ``j`` dominates, else ``y <= max u``) is
  elementwise on the output windows; then each entry's coefficient goes to ``j``'s place in
  its ``kh x kw`` block and the blocks are summed into the input window (``F.fold``), a
  conv-like growth.
- **activations**: their lines (learned ones from :class:`PatchSlopes`) unfolded into windows.
- **per-element affine ops** (identity, batchnorm, mul/div/add/sub by a constant): a scale
  and a shift, per channel or per element (then unfolded into windows).
- **add / sub of two nodes**: the coefficients go to both (negated to the subtrahend);
  **concat** along channels: split along ``C``.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F

from boundflow.domains import activations
from boundflow.domains.coeffs import Coeffs, same
from boundflow.domains.crown_relaxed import default_lines, maxpool_relaxation, memoised
from boundflow.domains.crown_rules import scattered_conv_t
from boundflow.domains.crown_windows import Window
from boundflow.domains.interval import Interval, pad_widths
from boundflow.domains.relaxation import split_params, stack_params
from boundflow.ir.graph import Node

class PatchSlopes(dict):
    """alpha-CROWN parameters in window layout, ``activation name -> (lower-side,
    upper-side)`` tensors ``[B, L, Cs, C, Rh, Rw]`` (stacked on a leading axis for entries
    with several parameters per neuron); created from the default parameters the first time
    an activation is met, and collected in ``params`` for the optimiser."""

    def __init__(self):
        super().__init__()
        self.params: list[torch.Tensor] = []


class PatchContext(NamedTuple):
    """What window rules read besides the coefficients: node intervals (a relaxed op reads
    its input's), the lower-slope mode, learned parameters (or None: CROWN) and every node's
    per-sample shape."""

    bounds: Mapping[str, Interval]
    lower_slope: str
    alphas: PatchSlopes | None
    shapes: Mapping[str, tuple[int, ...]]
    lines: dict | None = None           # the run's memo of default lines (crown_relaxed)


def wsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over a window (``C, Rh, Rw``): ``[B', L', Cs]``."""
    return t.sum((-1, -2, -3))


def _terms(*pairs):
    """``wsum(c·b)`` summed over ``(c, b)`` pairs, skipping zero (None) ``b``."""
    terms = [wsum(c * b) for c, b in pairs if b is not None]
    return sum(terms[1:], terms[0]) if terms else 0.0


def _both(a: Coeffs, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``fn`` of both sides (once while they are one tensor) as constant terms."""
    low = fn(a.lA)
    return low, (low if a.lA is a.uA else fn(a.uA))


def _transpose(t: torch.Tensor, weight: torch.Tensor, stride, dilation, groups: int
               ) -> torch.Tensor:
    """The adjoint of a convolution on windows: a transposed one without padding."""
    lead, flat = tuple(t.shape[:3]), t.reshape((-1,) + tuple(t.shape[3:]))
    if tuple(stride) == (1, 1):
        out = _flipped_conv(flat, weight, tuple(dilation), groups)
    else:
        out = scattered_conv_t(flat, weight, tuple(stride), tuple(dilation), groups)
    return out.reshape(lead + tuple(out.shape[1:]))


def _flipped_conv(t, weight, dilation, groups: int):
    """A stride-1 transposed convolution as the convolution with the flipped kernel (in and
    out channels swapped per group) on windows padded by the kernel's extent less one
    (faster on CPU than the transposed one)."""
    co, ci_g, kh, kw = weight.shape
    w = weight.reshape(groups, co // groups, ci_g, kh, kw).transpose(1, 2)
    w = w.reshape(groups * ci_g, co // groups, kh, kw).flip(2, 3)
    pad = tuple(dilation[i] * (weight.shape[2 + i] - 1) for i in (0, 1))
    return F.conv2d(t, w, None, 1, pad, dilation, groups)


# --- window rules ------------------------------------------------------------------------

def conv2d(node: Node, p: dict, a: Coeffs, win: Window, ctx: PatchContext):
    at = node.attrs
    out = same(a, lambda t: _transpose(t, p["weight"], at["stride"], at["dilation"],
                                       at["groups"]))
    if "bias" not in p:
        return [out], 0.0, 0.0
    return [out], *_both(a, lambda t: (t.sum((-1, -2)) * p["bias"]).sum(-1))


def _pool_weight(node: Node, ctx: PatchContext, like: torch.Tensor) -> torch.Tensor:
    kh, kw = node.attrs["kernel_size"]
    C = ctx.shapes[node.inputs[0]][0]
    return torch.full((C, 1, kh, kw), 1.0 / (kh * kw), dtype=like.dtype, device=like.device)


def avgpool2d(node: Node, p: dict, a: Coeffs, win: Window, ctx: PatchContext):
    weight = _pool_weight(node, ctx, a.lA)
    return [same(a, lambda t: _transpose(t, weight, node.attrs["stride"], (1, 1),
                                         weight.shape[0]))], 0.0, 0.0


def pad(node: Node, p: dict, a: Coeffs, win: Window, ctx: PatchContext):
    value = float(node.attrs["value"])
    if value == 0.0:
        return [a], 0.0, 0.0
    in_shape = ctx.shapes[node.inputs[0]]
    zeros = torch.zeros((1,) + tuple(in_shape), dtype=a.lA.dtype, device=a.lA.device)
    border = win.unfold(F.pad(zeros, pad_widths(node), value=1.0))
    return [a], *_both(a, lambda t: value * wsum(t * border))


def maxpool2d(node: Node, p: dict, a: Coeffs, win: Window, ctx: PatchContext):
    """The dense rule's lines, per window entry: ``y >= x_j``; ``y <= x_j`` where ``j``
    dominates its pooling window, else ``y <=`` its largest upper bound."""
    at = node.attrs
    (kh, kw), (sh, sw), (ph, pw) = (tuple(at[k]) for k in ("kernel_size", "stride", "padding"))
    pre = ctx.bounds[node.inputs[0]]
    pos, dom, umax = memoised(ctx.lines, node.name, pre, "maxpool",       # [B, C, Ho*Wo]
                              lambda: maxpool_relaxation(pre, at))
    C, Ho, Wo = node.shape
    w_in = ctx.shapes[node.inputs[0]][2]
    B = pos.shape[0]
    rows = torch.arange(Ho, device=pos.device).repeat_interleave(Wo) * sh - ph
    cols = torch.arange(Wo, device=pos.device).repeat(Ho) * sw - pw
    k = (pos // w_in - rows) * kw + (pos % w_in - cols)          # j's place in its block
    onehot = F.one_hot(k, kh * kw).to(a.lA.dtype)                # [B, C, Ho*Wo, K]
    select = win.unfold(onehot.permute(0, 1, 3, 2).reshape(B, C * kh * kw, Ho, Wo))
    select = select.reshape(select.shape[:3] + (C, kh * kw) + select.shape[-2:])
    dom, umax = (win.unfold(t.reshape(B, C, Ho, Wo).to(a.lA.dtype)) for t in (dom, umax))
    lpos, lneg, upos, uneg = (t.clamp(min=0) if i % 2 == 0 else t.clamp(max=0)
                              for i, t in enumerate((a.lA, a.lA, a.uA, a.uA)))
    lb = wsum(lneg * (1 - dom) * umax)
    ub = wsum(upos * (1 - dom) * umax)
    grown = win.grown((kh, kw), (sh, sw), (0, 0))

    def to_input(c):                                  # each entry to j, blocks summed
        c = c.unsqueeze(4) * select                   # [B, L, Cs, C, K, Rh, Rw]
        lead = tuple(c.shape[:3])
        cols_ = c.reshape((-1, C * kh * kw, win.size[0] * win.size[1]))
        out = F.fold(cols_, grown.size, (kh, kw), stride=(sh, sw))
        return out.reshape(lead + tuple(out.shape[1:]))
    return [Coeffs(to_input(lpos + lneg * dom), to_input(upos * dom + uneg))], lb, ub


def activation(node: Node, p: dict, a: Coeffs, win: Window, ctx: PatchContext):
    low, up = _relax_windows(node, win, ctx, a.lA.shape)
    lpos = a.lA.clamp(min=0)
    lneg = a.lA - lpos
    upos = lpos if a.uA is a.lA else a.uA.clamp(min=0)
    uneg = lneg if a.uA is a.lA else a.uA - upos
    out = Coeffs(lpos * low.lower_slope + lneg * low.upper_slope,
                 upos * up.upper_slope + uneg * up.lower_slope)
    return [out], _terms((lneg, low.upper_bias), (lpos, low.lower_bias)), \
        _terms((upos, up.upper_bias), (uneg, up.lower_bias))


def _relax_windows(node: Node, win: Window, ctx: PatchContext, shape):
    """The (lower-side, upper-side) lines of an activation in window layout. Without alphas
    the lines are found on the map and unfolded; with them the relaxation's state is unfolded
    and the lines are found per window entry from the learned parameters."""
    relaxation = activations.get(node.op)
    pre = ctx.bounds[node.inputs[0]]
    if ctx.alphas is None:
        lines = default_lines(node, pre, ctx.lower_slope, ctx.lines)
        lines = type(lines)(*_unfold_each(win, lines))
        return lines, lines
    state = _unfold_each(win, relaxation.prepare(pre.lower, pre.upper, node.attrs))
    t_low, t_up = learned(ctx.alphas, node.name, relaxation, state, node.attrs,
                           ctx.lower_slope, shape)
    return relaxation.lines(state, node.attrs, t_low), relaxation.lines(state, node.attrs, t_up)


def _unfold_each(win: Window, tensors) -> tuple:
    """Several maps of one shape (or None) as windows, by one unfold of them stacked."""
    present = [t for t in tensors if t is not None]
    if len({(t.shape, t.dtype) for t in present}) != 1:
        return tuple(None if t is None else win.unfold(t) for t in tensors)
    C = present[0].shape[1]
    parts = iter(p.contiguous() for p in win.unfold(torch.cat(present, 1)).split(C, 3))
    return tuple(None if t is None else next(parts) for t in tensors)


def learned(alphas: PatchSlopes, name: str, relaxation, state, attrs, mode: str, shape):
    """The (lower-side, upper-side) parameters of activation ``name``, made the first time
    from the default ones, broadcast to the coefficients' window layout ``shape``."""
    if name not in alphas:
        default = relaxation.default_params(state, attrs, mode)
        full = torch.broadcast_shapes(default[0].shape, shape)
        init = stack_params(tuple(torch.broadcast_to(t.detach(), full) for t in default))
        pair = (init.clone().requires_grad_(True), init.clone().requires_grad_(True))
        alphas[name] = pair
        alphas.params.extend(pair)
    a_l, a_u = alphas[name]
    return split_params(a_l, relaxation.n_params), split_params(a_u, relaxation.n_params)


def _elementwise(t: torch.Tensor, shape, win: Window) -> torch.Tensor:
    """A constant broadcast over a ``shape`` (C, H, W) map, as ``[C, 1, 1]`` where it is per
    channel, else in window layout."""
    t = t.reshape((1,) * (3 - t.dim()) + tuple(t.shape)) if t.dim() < 3 else t
    if t.shape[1:] == (1, 1):
        return t
    return win.unfold(torch.broadcast_to(t, tuple(shape)).unsqueeze(0))


def _batchnorm(node: Node, p: dict):
    scale = p["weight"] / torch.sqrt(p["var"] + node.attrs["eps"])
    return scale.reshape(-1, 1, 1), (p["bias"] - p["mean"] * scale).reshape(-1, 1, 1)


# per-element affine ops: (node, params) -> (scale, shift), each None or a constant
_AFFINE = {
    "identity": lambda node, p: (None, None),
    "batchnorm": _batchnorm,
    "mul": lambda node, p: (p["other"], None),
    "div": lambda node, p: (1 / p["other"], None),
    "add": lambda node, p: (None, p["other"]),
    "sub": lambda node, p: (None, -p["other"]),
}


def affine(node: Node, p: dict, a: Coeffs, win: Window, ctx: PatchContext):
    if len(node.inputs) == 2:                          # add / sub of two nodes
        return [a, a if node.op == "add" else same(a, torch.neg)], 0.0, 0.0
    scale, shift = _AFFINE[node.op](node, p)
    lb = ub = 0.0
    if shift is not None:
        shift = _elementwise(shift, node.shape, win)
        lb, ub = _both(a, lambda t: wsum(t * shift))
    if scale is not None:
        scale = _elementwise(scale, node.shape, win)
        a = same(a, lambda t: t * scale)
    return [a], lb, ub


def concat(node: Node, p: dict, a: Coeffs, win: Window, ctx: PatchContext):
    sizes = [ctx.shapes[i][0] for i in node.inputs]
    return [Coeffs(lo, up) for lo, up in zip(a.lA.split(sizes, 3), a.uA.split(sizes, 3))], \
        0.0, 0.0


RULES: dict[str, Callable] = {
    "conv2d": conv2d, "avgpool2d": avgpool2d, "pad": pad, "maxpool2d": maxpool2d,
    "concat": concat, **{op: affine for op in _AFFINE},
    **{op: activation for op in activations.ACTIVATIONS},
}


# --- geometry and coverage ---------------------------------------------------------------

def input_windows(node: Node, win: Window, tensors: Mapping[str, torch.Tensor]
                  ) -> list[Window]:
    """The windows the rule of ``node`` leaves on each of its inputs."""
    at = node.attrs
    if node.op == "conv2d":
        kernel = tuple(tensors[node.params["weight"]].shape[2:])
        return [win.grown(kernel, at["stride"], at["padding"], at["dilation"])]
    if node.op in ("avgpool2d", "maxpool2d"):
        return [win.grown(at["kernel_size"], at["stride"], at["padding"])]
    if node.op == "pad":
        return [win.shifted((int(at["pads"][1][0]), int(at["pads"][2][0])))]
    return [win] * len(node.inputs)


def covers(node: Node, shapes: Mapping[str, tuple[int, ...]],
           tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether the window rules take ``node`` (else the start falls back to dense)."""
    ins = [shapes[i] for i in node.inputs]
    if node.op not in RULES or len(node.shape) != 3 or any(len(s) != 3 for s in ins):
        return False
    if node.op == "pad":
        return tuple(node.attrs["pads"][0]) == (0, 0)        # spatial padding only
    if node.op == "concat":
        return node.attrs["axis"] == 0                       # along channels
    if node.op in _AFFINE:
        if any(s != node.shape for s in ins):
            return False
        other = tensors.get(node.params.get("other", ""))
        return other is None or (other.dim() <= 3 and torch.broadcast_shapes(
            tuple(other.shape), node.shape) == node.shape)
    return True
