"""Interval bound propagation (IBP) as a table of per-op rules.

Values are :class:`Interval` pairs of tensors with a leading batch dimension. Affine maps with
a weight use the centre/radius form, ``mid' = W·mid + b`` and ``rad' = |W|·rad``, which costs
two products instead of four; monotone maps are computed on the endpoints directly;
activations take their interval image from the relaxation registry
(:mod:`boundflow.domains.activations`). Every rule works in float32 and float64 alike.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from boundflow.domains import activations
from boundflow.domains.gemv import bgemv
from boundflow.domains.traversal import propagate
from boundflow.ir.graph import Graph, Node


class Interval(NamedTuple):
    lower: torch.Tensor
    upper: torch.Tensor


def _center_radius(x: Interval) -> tuple[torch.Tensor, torch.Tensor]:
    return (x.upper + x.lower) / 2, (x.upper - x.lower) / 2


def _from_center_radius(mid: torch.Tensor, rad: torch.Tensor) -> Interval:
    return Interval(mid - rad, mid + rad)


def _each(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Interval]:
    """A rule for a map that is nondecreasing in every input element (views, pooling, pad,
    slice, gather): it maps each endpoint."""
    def rule(node: Node, params: dict, x: Interval) -> Interval:
        return Interval(fn(node, x.lower), fn(node, x.upper))
    return rule


def linear(node: Node, params: dict, x: Interval) -> Interval:
    mid, rad = _center_radius(x)
    w = params["weight"]
    w_abs = params["weight_abs"] if "weight_abs" in params else w.abs()
    return _from_center_radius(F.linear(mid, w, params.get("bias")), F.linear(rad, w_abs))


def conv2d(node: Node, params: dict, x: Interval) -> Interval:
    mid, rad = _center_radius(x)
    a = node.attrs
    kw = dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"],
              groups=a["groups"])
    w = params["weight"]
    w_abs = params["weight_abs"] if "weight_abs" in params else w.abs()
    return _from_center_radius(F.conv2d(mid, w, params.get("bias"), **kw),
                               F.conv2d(rad, w_abs, None, **kw))


def _scale(x: Interval, s: torch.Tensor) -> Interval:
    lo, hi = x.lower * s, x.upper * s
    return Interval(torch.minimum(lo, hi), torch.maximum(lo, hi))


def add(node: Node, params: dict, x: Interval, y: Interval | None = None) -> Interval:
    if y is None:
        c = params["other"]
        return Interval(x.lower + c, x.upper + c)
    return Interval(x.lower + y.lower, x.upper + y.upper)


def sub(node: Node, params: dict, x: Interval, y: Interval | None = None) -> Interval:
    if y is None:
        c = params["other"]
        return Interval(x.lower - c, x.upper - c)
    return Interval(x.lower - y.upper, x.upper - y.lower)


def mul(node: Node, params: dict, x: Interval) -> Interval:
    s = params.get("nonneg_scale")        # nowhere negative: the ends stay in order
    return _scale(x, params["other"]) if s is None else Interval(x.lower * s, x.upper * s)


def div(node: Node, params: dict, x: Interval) -> Interval:
    s = params.get("nonneg_scale")        # 1 / other, nowhere negative (graph_tensors)
    return _scale(x, 1 / params["other"]) if s is None else Interval(x.lower * s, x.upper * s)


def batchnorm(node: Node, params: dict, x: Interval) -> Interval:
    shape = (-1,) + (1,) * (x.lower.dim() - 2)
    scale = params["weight"] / torch.sqrt(params["var"] + node.attrs["eps"])
    shift = params["bias"] - params["mean"] * scale
    y = _scale(x, scale.reshape(shape))
    return Interval(y.lower + shift.reshape(shape), y.upper + shift.reshape(shape))


def concat(node: Node, params: dict, *xs: Interval) -> Interval:
    axis = node.attrs["axis"] + 1
    return Interval(torch.cat([x.lower for x in xs], axis), torch.cat([x.upper for x in xs], axis))


def _flatten(node: Node, t: torch.Tensor) -> torch.Tensor:
    end = node.attrs["end_dim"]
    return t.flatten(node.attrs["start_dim"] + 1, end + 1 if end >= 0 else end)


def _avgpool(node: Node, t: torch.Tensor) -> torch.Tensor:
    a = node.attrs
    return F.avg_pool2d(t, a["kernel_size"], a["stride"], a["padding"], count_include_pad=True)


def _maxpool(node: Node, t: torch.Tensor) -> torch.Tensor:
    """Max pooling; the padding is -inf (never the maximum), as torch's is."""
    a = node.attrs
    return F.max_pool2d(t, a["kernel_size"], a["stride"], a["padding"])


def pad_widths(node: Node) -> list[int]:
    """``pads`` as ``F.pad`` takes them: (before, after) pairs from the last axis back."""
    return [int(v) for pair in reversed(node.attrs["pads"]) for v in pair]


def _pad(node: Node, t: torch.Tensor) -> torch.Tensor:
    return F.pad(t, pad_widths(node), value=float(node.attrs["value"]))


def _slice(node: Node, t: torch.Tensor) -> torch.Tensor:
    a = node.attrs
    index = (slice(None),) * (a["axis"] + 1) + (slice(a["start"], a["end"], a["step"]),)
    return t[index]


def gather_index(node: Node, device) -> torch.Tensor:
    return torch.tensor([int(i) for i in node.attrs["indices"]], dtype=torch.long,
                        device=device)


def _gather(node: Node, t: torch.Tensor) -> torch.Tensor:
    axis = node.attrs["axis"] + 1
    out = t.index_select(axis, gather_index(node, t.device))
    return out if node.attrs["keepdim"] else out.squeeze(axis)


def conv_transpose_args(node: Node) -> dict:
    a = node.attrs
    return dict(stride=tuple(a["stride"]), padding=tuple(a["padding"]),
                output_padding=tuple(a["output_padding"]), groups=a["groups"],
                dilation=tuple(a["dilation"]))


def conv_transpose2d(node: Node, params: dict, x: Interval) -> Interval:
    mid, rad = _center_radius(x)
    w = params["weight"]
    w_abs = params["weight_abs"] if "weight_abs" in params else w.abs()
    kw = conv_transpose_args(node)
    return _from_center_radius(F.conv_transpose2d(mid, w, params.get("bias"), **kw),
                               F.conv_transpose2d(rad, w_abs, None, **kw))


def softmax_interval(x: Interval, axis: int) -> Interval:
    """The tight interval of ``softmax(x)`` along tensor ``axis`` over the box ``x``:
    ``y_i`` is smallest where ``x_i = l_i`` and every other ``x_j = u_j``, so
    ``y_i >= 1 / (1 + sum_{j!=i} exp(u_j - l_i)) = sigmoid(l_i - logsumexp_{j!=i} u_j)``,
    and ``y_i <= sigmoid(u_i - logsumexp_{j!=i} l_j)`` likewise (the log-sum-exp over the
    others taken directly, without cancellation; with one element, ``[1, 1]``)."""
    lo, hi = x.lower.movedim(axis, -1), x.upper.movedim(axis, -1)
    n = lo.shape[-1]
    if n == 1:
        one = torch.ones_like(x.lower)
        return Interval(one, one)
    self_mask = torch.eye(n, dtype=torch.bool, device=lo.device)

    def others(t):                         # [..., n, n]: row i holds t_j for j != i
        return torch.logsumexp(t.unsqueeze(-2).masked_fill(self_mask, -math.inf), -1)

    low, up = torch.sigmoid(lo - others(hi)), torch.sigmoid(hi - others(lo))
    return Interval(low.movedim(-1, axis), up.movedim(-1, axis))


def softmax(node: Node, params: dict, x: Interval) -> Interval:
    return softmax_interval(x, node.attrs["axis"] + 1)


def _activation(op: str) -> Callable[..., Interval]:
    relaxation = activations.get(op)

    def rule(node: Node, params: dict, x: Interval) -> Interval:
        return Interval(*relaxation.interval(x.lower, x.upper, node.attrs))
    return rule


RULES: dict[str, Callable[..., Interval]] = {
    "linear": linear,
    "conv2d": conv2d,
    "conv_transpose2d": conv_transpose2d,
    "add": add,
    "sub": sub,
    "mul": mul,
    "div": div,
    "batchnorm": batchnorm,
    "flatten": _each(_flatten),
    "reshape": _each(lambda n, t: t.reshape((t.shape[0],) + tuple(n.attrs["shape"]))),
    "permute": _each(lambda n, t: t.permute(0, *(d + 1 for d in n.attrs["dims"]))),
    "avgpool2d": _each(_avgpool),
    "maxpool2d": _each(_maxpool),
    "pad": _each(_pad),
    "slice": _each(_slice),
    "gather": _each(_gather),
    "softmax": softmax,
    "identity": _each(lambda n, t: t),
    "concat": concat,
    **{op: _activation(op) for op in sorted(activations.ACTIVATIONS)},
}


def spec_interval(x: Interval, C: torch.Tensor, weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> Interval:
    """Bounds of ``C·(W·x + b)`` (``C`` batched ``[B, S, n]``), with ``C·W`` formed first so
    the radius is ``|C·W|·rad``, never looser than ``|C|·|W|·rad``."""
    mid, rad = _center_radius(Interval(x.lower.flatten(1), x.upper.flatten(1)))
    if weight is not None:
        cw = torch.matmul(C, weight)                          # [B, S, in]
        offset = torch.matmul(C, bias) if bias is not None else 0.0
    else:
        cw, offset = C, 0.0
    return _from_center_radius(bgemv(cw, mid) + offset, bgemv(cw.abs(), rad))


def ibp(graph: Graph, x: Interval, tensors: dict[str, torch.Tensor],
        C: torch.Tensor | None = None) -> Interval:
    """IBP bounds of the graph's output, or of ``C·output`` when ``C`` is given.

    With ``C`` and a final ``linear`` layer, ``C`` is folded into that layer's weight.
    """
    out = graph.output_node
    if C is None:
        return propagate(graph, RULES, x, tensors, [out.name], "IBP")[out.name]
    if out.op == "linear" and len(graph.node(out.inputs[0]).shape) == 1:
        pre = propagate(graph, RULES, x, tensors, [out.inputs[0]], "IBP")[out.inputs[0]]
        bias = tensors[out.params["bias"]] if "bias" in out.params else None
        return spec_interval(pre, C, tensors[out.params["weight"]], bias)
    y = propagate(graph, RULES, x, tensors, [out.name], "IBP")[out.name]
    return spec_interval(y, C)
