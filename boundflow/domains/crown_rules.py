"""CROWN's backward rule table: one rule per op (the contract is in
:mod:`boundflow.domains.coeffs`).

Affine and view ops map coefficients exactly: ``A·W`` for linear, the adjoint convolution
for conv2d (a transposed convolution) and for conv_transpose2d (a convolution), cropping for
pad (the border's constant adds ``value·sum`` of the cropped-off coefficients), scattering
into zeros of the input's shape for slice and gather. Relaxed ops (activations, maxpool2d,
softmax) are in :mod:`boundflow.domains.crown_relaxed`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from boundflow.domains.coeffs import BackwardContext, Coeffs, const_term, same, sum_trailing
from boundflow.domains.crown_relaxed import RELAXED_RULES
from boundflow.domains.interval import gather_index, pad_widths
from boundflow.ir.graph import Node


def linear(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    w, b = p["weight"], p.get("bias")
    out = same(a, lambda t: torch.matmul(t, w))
    if b is None:
        return [out], 0.0, 0.0
    return [out], *const_term(a, b)


SCATTER_CHANNELS = 4


def _output_padding(in_hw, out_hw, kernel, stride, padding, dilation):
    return tuple(in_hw[i] - ((out_hw[i] - 1) * stride[i] - 2 * padding[i]
                             + dilation[i] * (kernel[i] - 1) + 1) for i in (0, 1))


def scattered_conv_t(t, weight, stride, dilation, groups: int):
    """A strided transposed convolution as one matrix product (every kernel tap of every
    window entry) and a scatter-add of the products to their output entries (on CPU much
    faster than the transposed convolution for the few output channels of early layers)."""
    n, co, r1, r2 = t.shape
    _, ci_g, k1, k2 = weight.shape
    h = (r1 - 1) * stride[0] + dilation[0] * (k1 - 1) + 1
    w = (r2 - 1) * stride[1] + dilation[1] * (k2 - 1) + 1
    taps = torch.matmul(weight.reshape(groups, co // groups, ci_g * k1 * k2).transpose(1, 2),
                        t.reshape(n, groups, co // groups, r1 * r2))   # [n, g, ci_g·k·k, r·r]
    dev = t.device
    rows = (torch.arange(k1, device=dev) * dilation[0])[:, None, None, None] \
        + (torch.arange(r1, device=dev) * stride[0])[None, None, :, None]
    cols = (torch.arange(k2, device=dev) * dilation[1])[None, :, None, None] \
        + (torch.arange(r2, device=dev) * stride[1])[None, None, None, :]
    index = (rows * w + cols).reshape(-1)                                # over (k1, k2, r1, r2)
    out = torch.zeros(n * groups * ci_g, h * w, dtype=t.dtype, device=dev).index_add(
        1, index, taps.reshape(n * groups * ci_g, -1))
    return out.reshape(n, groups * ci_g, h, w)


def conv_t(t: torch.Tensor, weight: torch.Tensor, in_shape, stride, padding, dilation, groups
           ) -> torch.Tensor:
    """The adjoint of a convolution on ``[B, S, *out_shape]`` coefficients. A strided one
    onto at most ``SCATTER_CHANNELS`` input channels (a first layer on an image) goes as one
    matrix product and a scatter-add (:func:`scattered_conv_t`), cropped to the padded
    input: on CPU 1.4x faster there than ATen's transposed convolution, which is faster
    everywhere else."""
    b, s = t.shape[:2]
    flat = t.reshape((b * s,) + tuple(t.shape[2:]))
    if tuple(stride) != (1, 1) and weight.shape[1] * groups <= SCATTER_CHANNELS:
        full = scattered_conv_t(flat, weight, tuple(stride), tuple(dilation), groups)
        (ph, pw), (H, W) = padding, in_shape[1:]
        full = F.pad(full, (0, max(0, pw + W - full.shape[-1]), 0,
                            max(0, ph + H - full.shape[-2])))
        return full[..., ph:ph + H, pw:pw + W].reshape((b, s) + tuple(in_shape))
    op = _output_padding(in_shape[1:], t.shape[3:], weight.shape[2:], stride, padding,
                         dilation)
    out = F.conv_transpose2d(flat, weight, None, stride, padding, op, groups, dilation)
    return out.reshape((b, s) + tuple(in_shape))


def _channel_bias(a: Coeffs, b: torch.Tensor):
    low = (a.lA.sum((-1, -2)) * b).sum(-1)
    return low, (low if a.lA is a.uA else (a.uA.sum((-1, -2)) * b).sum(-1))


def conv2d(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    at = node.attrs
    in_shape = ctx.shapes[node.inputs[0]]
    fn = lambda t: conv_t(t, p["weight"], in_shape, at["stride"], at["padding"],  # noqa
                          at["dilation"], at["groups"])
    out = same(a, fn)
    b = p.get("bias")
    if b is None:
        return [out], 0.0, 0.0
    return [out], *_channel_bias(a, b)


def conv_transpose2d(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    """The adjoint of a transposed convolution is the convolution with the same weight; it
    yields ``floor(output_padding / stride)`` rows and columns past the input, which no input
    element reaches, so they are cropped."""
    at = node.attrs
    in_shape = ctx.shapes[node.inputs[0]]

    def fn(t):
        b, s = t.shape[:2]
        out = F.conv2d(t.reshape((b * s,) + tuple(t.shape[2:])), p["weight"], None,
                       tuple(at["stride"]), tuple(at["padding"]), tuple(at["dilation"]),
                       at["groups"])
        return out[..., :in_shape[1], :in_shape[2]].reshape((b, s) + tuple(in_shape))
    out = same(a, fn)
    b = p.get("bias")
    if b is None:
        return [out], 0.0, 0.0
    return [out], *_channel_bias(a, b)


def add(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    if len(node.inputs) == 2:
        return [a, a], 0.0, 0.0
    return [a], *const_term(a, p["other"])


def sub(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    if len(node.inputs) == 2:
        return [a, same(a, torch.neg)], 0.0, 0.0
    return [a], *const_term(a, p["other"], -1.0)


def mul(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    return [same(a, lambda t: t * p["other"])], 0.0, 0.0


def div(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    return [same(a, lambda t: t / p["other"])], 0.0, 0.0


def batchnorm(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    ndim = a.lA.dim() - 3
    scale = p["weight"] / torch.sqrt(p["var"] + node.attrs["eps"])
    shift = (p["bias"] - p["mean"] * scale).reshape((-1,) + (1,) * ndim)
    scale = scale.reshape((-1,) + (1,) * ndim)
    return [same(a, lambda t: t * scale)], *const_term(a, shift)


def _reshape_back(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    shape = ctx.shapes[node.inputs[0]]
    return [same(a, lambda t: t.reshape(t.shape[:2] + shape))], 0.0, 0.0


def permute(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    dims = node.attrs["dims"]
    inverse = [dims.index(j) for j in range(len(dims))]
    return [same(a, lambda t: t.permute(0, 1, *(2 + i for i in inverse)))], 0.0, 0.0


def avgpool2d(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    at = node.attrs
    in_shape = ctx.shapes[node.inputs[0]]
    kh, kw = at["kernel_size"]
    weight = torch.full((in_shape[0], 1, kh, kw), 1.0 / (kh * kw), dtype=a.lA.dtype,
                        device=a.lA.device)
    fn = lambda t: conv_t(t, weight, in_shape, at["stride"], at["padding"], (1, 1),  # noqa
                          in_shape[0])
    return [same(a, fn)], 0.0, 0.0


def pad(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    in_shape = ctx.shapes[node.inputs[0]]
    pads = node.attrs["pads"]

    def crop(t):
        for k, (before, _) in enumerate(pads):
            t = t.narrow(k + 2, int(before), in_shape[k])
        return t
    out = same(a, crop)
    value = float(node.attrs["value"])
    if value == 0.0:
        return [out], 0.0, 0.0
    border = F.pad(torch.zeros(in_shape, dtype=a.lA.dtype, device=a.lA.device),
                   pad_widths(node), value=1.0)
    low = value * sum_trailing(a.lA * border)
    return [out], low, (low if a.lA is a.uA else value * sum_trailing(a.uA * border))


def _scatter_back(a: Coeffs, in_shape, axis: int, index: torch.Tensor) -> Coeffs:
    """Coefficients of elements ``index`` of tensor ``axis``, in zeros of the input's shape
    (repeated indices add up)."""
    def fn(t):
        out = torch.zeros(t.shape[:2] + tuple(in_shape), dtype=t.dtype, device=t.device)
        return out.index_add(axis, index, t)
    return same(a, fn)


def slice_(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    at = node.attrs
    index = torch.arange(at["start"], at["end"], at["step"], device=a.lA.device)
    return [_scatter_back(a, ctx.shapes[node.inputs[0]], at["axis"] + 2, index)], 0.0, 0.0


def gather(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    axis = node.attrs["axis"] + 2
    if not node.attrs["keepdim"]:
        a = same(a, lambda t: t.unsqueeze(axis))
    index = gather_index(node, a.lA.device)
    return [_scatter_back(a, ctx.shapes[node.inputs[0]], axis, index)], 0.0, 0.0


def identity(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    return [a], 0.0, 0.0


def concat(node: Node, p: dict, a: Coeffs, ctx: BackwardContext):
    axis = node.attrs["axis"] + 2
    sizes = [ctx.shapes[i][axis - 2] for i in node.inputs]
    parts = zip(a.lA.split(sizes, axis), a.uA.split(sizes, axis))
    return [Coeffs(l, u) for l, u in parts], 0.0, 0.0


RULES: dict[str, Callable] = {
    "linear": linear, "conv2d": conv2d, "conv_transpose2d": conv_transpose2d, "add": add,
    "sub": sub, "mul": mul, "div": div, "batchnorm": batchnorm, "flatten": _reshape_back,
    "reshape": _reshape_back, "permute": permute, "avgpool2d": avgpool2d, "pad": pad,
    "slice": slice_, "gather": gather, "identity": identity, "concat": concat,
    **RELAXED_RULES,
}
