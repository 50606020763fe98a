"""CROWN for convolutional pre-activations with local ("patch") coefficients.

Bounding every neuron ``(c, i, j)`` of a conv layer by a backward pass needs, at each
upstream feature map, coefficients that are non-zero only inside the receptive field of
pixel ``(i, j)``. The dense rule stores them as full ``[rows, C, H, W]`` maps; here each row
keeps only its window ``[C, Rh, Rw]``, placed at ``(i·S - O, j·S - O)`` of the map, where the
window size ``R``, stride ``S`` and offset ``O`` grow as the walk passes each convolution.
The arithmetic is the dense rule's, restricted to where it is not zero; out-of-map window
entries are masked to zero (they stand for padding, which is constant 0).

It applies when the path from the start node back to the input is a chain of conv2d
(groups 1, dilation 1), activations (any entry of the relaxation registry: their lines are
elementwise, so they are unfolded into windows like any map) and per-channel affine ops
(``linear`` and ``elementwise`` ops with a window rule in ``_AFFINE``, by a constant that is
scalar or per channel), starting at a conv2d; :func:`conv_chain` says. Any other op (maxpool,
pad, ...) makes the start fall back to dense coefficients.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from boundflow.domains import activations
from boundflow.domains.interval import Interval
from boundflow.domains.relaxation import split_params, stack_params
from boundflow.ir import ops
from boundflow.ir.graph import Graph, Node


def _per_channel(t: torch.Tensor | None) -> bool:
    return t is None or t.dim() == 0 or t.numel() == 1 or (
        t.dim() == 3 and t.shape[1:] == (1, 1)) or t.dim() == 1


def conv_chain(graph: Graph, start: str, tensors: Mapping[str, torch.Tensor]
               ) -> list[Node] | None:
    """The nodes from ``start`` back to (not including) the input, or None if the fast path
    does not apply."""
    node = graph.node(start)
    if node.op != "conv2d":
        return None
    chain = []
    while node.op != "input":
        if len(node.inputs) != 1 or len(node.shape) != 3:
            return None
        if node.op == "conv2d":
            if node.attrs["groups"] != 1 or tuple(node.attrs["dilation"]) != (1, 1):
                return None
        elif node.op in _AFFINE and ops.has(node.op, "linear") \
                and ops.has(node.op, "elementwise"):
            if "other" in node.params:
                other = tensors[node.params["other"]]
                if other.dim() == 1 and other.numel() != 1:
                    return None              # a per-width constant, not per channel
                if not _per_channel(other):
                    return None
        elif node.op not in activations.ACTIVATIONS:
            return None
        chain.append(node)
        node = graph.node(node.inputs[0])
    return chain if len(node.shape) == 3 else None


class _Windows:
    """Coefficients ``[B', L, Cs, C, Rh, Rw]`` (L start positions, Cs start channels) and the
    window geometry at the current map."""

    def __init__(self, A, size, stride, offset, out_hw):
        self.A, self.size, self.stride, self.offset, self.out_hw = A, size, stride, offset, out_hw

    def unfold(self, t: torch.Tensor) -> torch.Tensor:
        """A map ``[B, C, H, W]`` as windows ``[B, L, 1, C, Rh, Rw]`` (zero outside the map)."""
        B, C, H, W = t.shape
        (rh, rw), (sh, sw), (oh, ow), (ho, wo) = self.size, self.stride, self.offset, self.out_hw
        need_h, need_w = (ho - 1) * sh + rh, (wo - 1) * sw + rw
        t = F.pad(t, (ow, max(0, need_w - W - ow), oh, max(0, need_h - H - oh)))
        t = t[..., :need_h, :need_w]       # exactly the area the windows cover
        cols = F.unfold(t, (rh, rw), stride=(sh, sw))            # [B, C*rh*rw, L]
        return cols.reshape(B, C, rh, rw, ho * wo).permute(0, 4, 1, 2, 3).unsqueeze(2)


def _channel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1, 1) if t.dim() >= 1 and t.numel() > 1 else t.reshape(())


class PatchSlopes(dict):
    """alpha-CROWN parameters in window layout, ``activation name -> (lower-side,
    upper-side)`` tensors ``[B, L, Cs, C, Rh, Rw]`` (stacked on a leading axis for entries
    with several parameters per neuron); created from the default parameters the first time
    an activation is met, and collected in ``params`` for the optimiser."""

    def __init__(self):
        super().__init__()
        self.params: list[torch.Tensor] = []


def crown_conv_rows(graph: Graph, chain: list[Node], bound: Interval, x: Interval,
                    tensors: Mapping[str, torch.Tensor], bounds: Mapping[str, Interval],
                    lower_slope: str, alphas: PatchSlopes | None = None) -> Interval:
    """CROWN bounds ``[B, n]`` of every neuron of ``chain[0]`` (a conv2d), in its flat order;
    with ``alphas``, the activations' relaxation parameters come from there (alpha-CROWN)."""
    start = chain[0]
    w = tensors[start.params["weight"]]
    Cs, Ho, Wo = start.shape
    L = Ho * Wo
    A = w.reshape(1, 1, Cs, *w.shape[1:]).expand(1, L, *((Cs,) + tuple(w.shape[1:])))
    win = _Windows(A, tuple(w.shape[2:]), tuple(start.attrs["stride"]),
                   tuple(start.attrs["padding"]), (Ho, Wo))
    lA = uA = win.A
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    lb = ub = tensors[start.params["bias"]].reshape(1, 1, Cs) if "bias" in start.params else zero
    mask_of = lambda name: win.unfold(torch.ones((1,) + graph.node(name).shape,  # noqa: E731
                                                dtype=w.dtype, device=w.device))

    def wsum(t):                                   # sum over (C, Rh, Rw)
        return t.sum((-1, -2, -3))

    for node in chain[1:]:
        mask = mask_of(node.name)
        lA, uA = lA * mask, (uA * mask if uA is not lA else None)
        uA = lA if uA is None else uA
        p = {r: tensors[k] for r, k in node.params.items()}
        if node.op in activations.ACTIVATIONS:
            low, up = _relax_windows(node, win, bounds, lower_slope, alphas, lA.shape)
            lpos, lneg, upos, uneg = lA.clamp(min=0), lA.clamp(max=0), uA.clamp(min=0), \
                uA.clamp(max=0)
            lb, ub = lb + _bias(lneg, low.upper_bias, lpos, low.lower_bias), \
                ub + _bias(upos, up.upper_bias, uneg, up.lower_bias)
            lA, uA = lpos * low.lower_slope + lneg * low.upper_slope, \
                upos * up.upper_slope + uneg * up.lower_slope
        elif node.op == "conv2d":
            wk = p["weight"]
            if "bias" in p:
                b = p["bias"].reshape(-1, 1, 1)
                lb = lb + wsum(lA * b)
                ub = ub + wsum(uA * b) if uA is not lA else lb
            s, pad = tuple(node.attrs["stride"]), tuple(node.attrs["padding"])

            def through(t):
                shape = t.shape
                flat = t.reshape((-1,) + tuple(shape[3:]))
                out = F.conv_transpose2d(flat, wk, stride=s)
                return out.reshape(tuple(shape[:3]) + tuple(out.shape[1:]))
            same = uA is lA
            lA = through(lA)
            uA = lA if same else through(uA)
            win = _Windows(None, tuple((win.size[i] - 1) * s[i] + wk.shape[2 + i] for i in (0, 1)),
                           tuple(win.stride[i] * s[i] for i in (0, 1)),
                           tuple(win.offset[i] * s[i] + pad[i] for i in (0, 1)), (Ho, Wo))
        else:                                      # per-channel affine
            scale, shift = _affine(node, p)
            if shift is not None:
                lb = lb + wsum(lA * shift)
                ub = ub + wsum(uA * shift) if uA is not lA else lb
            if scale is not None:
                same = uA is lA
                lA = lA * scale
                uA = lA if same else uA * scale
    mask = mask_of(graph.nodes[0].name)
    mid = win.unfold((x.upper + x.lower) / 2) * mask
    rad = win.unfold((x.upper - x.lower) / 2) * mask
    lower = wsum(lA * mid) - wsum(lA.abs() * rad) + lb
    upper = wsum(uA * mid) + wsum(uA.abs() * rad) + ub
    B = x.lower.shape[0]
    flat = lambda t: t.expand(B, L, Cs).permute(0, 2, 1).reshape(B, Cs * L)  # noqa: E731
    return Interval(flat(lower), flat(upper))


def _bias(c1, b1, c2, b2):
    """``wsum(c1·b1) + wsum(c2·b2)``, skipping zero (None) biases."""
    terms = [(c * b).sum((-1, -2, -3)) for c, b in ((c1, b1), (c2, b2)) if b is not None]
    if not terms:
        return 0.0
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _relax_windows(node: Node, win: _Windows, bounds: Mapping[str, Interval], mode: str,
                   alphas: PatchSlopes | None, shape):
    """The (lower-side, upper-side) lines of an activation in window layout. Without alphas
    the lines are found on the map and unfolded; with them the relaxation's state is unfolded
    and the lines are found per window entry from the learned parameters."""
    relaxation = activations.get(node.op)
    pre = bounds[node.inputs[0]]
    state = relaxation.prepare(pre.lower, pre.upper, node.attrs)
    if alphas is None:
        lines = relaxation.lines(state, node.attrs,
                                 relaxation.default_params(state, node.attrs, mode))
        lines = type(lines)(*(None if t is None else win.unfold(t) for t in lines))
        return lines, lines
    state = tuple(win.unfold(t) for t in state)
    t_low, t_up = _learned(alphas, node.name, relaxation, state, node.attrs, mode, shape)
    return relaxation.lines(state, node.attrs, t_low), relaxation.lines(state, node.attrs, t_up)


def _learned(alphas: PatchSlopes, name: str, relaxation, state, attrs, mode: str, shape):
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


def _affine(node: Node, p: dict):
    """(scale, shift) of a per-channel affine node, each None or broadcastable [C,1,1]."""
    return _AFFINE[node.op](node, p)


def _batchnorm(node: Node, p: dict):
    scale = p["weight"] / torch.sqrt(p["var"] + node.attrs["eps"])
    return scale.reshape(-1, 1, 1), (p["bias"] - p["mean"] * scale).reshape(-1, 1, 1)


# window rules of the per-channel affine ops: (node, params) -> (scale, shift)
_AFFINE = {
    "identity": lambda node, p: (None, None),
    "batchnorm": _batchnorm,
    "mul": lambda node, p: (_channel(p["other"]), None),
    "div": lambda node, p: (1 / _channel(p["other"]), None),
    "add": lambda node, p: (None, _channel(p["other"])),
    "sub": lambda node, p: (None, -_channel(p["other"])),
}
