"""ONNX converters for pooling, transposed convolution and the nonlinear activations:
MaxPool, GlobalAveragePool, ReduceMean (over H and W), ConvTranspose, Sigmoid, Tanh, LeakyRelu, Elu,
Clip, Softmax; and the pads rule they share with Conv and AveragePool.

The converters take ``(converter, inputs, attributes)`` like those of ``frontend/onnx.py``,
which lists them in its tables. A form BoundFlow does not take raises
:class:`UnsupportedOpError` naming the attribute and the node.
"""

from __future__ import annotations

import math

import numpy as np

from boundflow.errors import ShapeError
from boundflow.frontend.onnx_index import full_axis, ints

FLOAT_MAX = float(np.finfo(np.float32).max)   # old opsets' Clip defaults mean "no bound"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def symmetric_pads(c, at) -> tuple[int, int]:
    """A 2-D window's ``pads`` as (pad H, pad W): explicit and the same at both ends, or
    ``auto_pad=VALID`` (none)."""
    auto = _text(at.get("auto_pad", "NOTSET"))
    if auto == "VALID":
        return 0, 0
    if auto != "NOTSET":
        raise c.fail(f"auto_pad={auto!r} is not supported (give explicit pads)")
    pads = list(at.get("pads", [0, 0, 0, 0]))
    if len(pads) != 4:
        raise c.fail(f"pads {pads} must hold 4 values (begin and end of 2 spatial axes)",
                     ShapeError)
    if pads[:2] != pads[2:]:
        raise c.fail(f"asymmetric pads {pads} are not supported")
    return pads[0], pads[1]


def kernel_2d(c, at, what: str) -> tuple[int, int]:
    kernel = tuple(int(k) for k in at["kernel_shape"])
    if len(kernel) != 2:
        raise c.fail(f"{what} with a {len(kernel)}-D kernel {kernel} is not supported")
    return kernel


def check_ceil_mode(c, at, x, kernel, stride, pads, what: str) -> None:
    """``ceil_mode=1`` is taken where it gives the floor mode's shape (it then computes the
    same); where it would add a partial window it is refused."""
    if not at.get("ceil_mode", 0):
        return
    for i in (0, 1):
        span = x.shape[i + 1] + 2 * pads[i] - kernel[i]
        if span % stride[i]:
            raise c.fail(f"{what} with ceil_mode=1 that adds a partial window is not "
                         f"supported")


def maxpool(c, a, at):
    x = a[0]
    kernel = kernel_2d(c, at, "MaxPool")
    if len(c.node.output) > 1 and c.node.output[1]:
        raise c.fail("MaxPool's second output (the Indices) is not supported")
    if at.get("storage_order", 0):
        raise c.fail(f"MaxPool with storage_order={at['storage_order']} is not supported")
    if any(d != 1 for d in at.get("dilations", [1, 1])):
        raise c.fail(f"MaxPool with dilations {list(at['dilations'])} is not supported")
    pads = symmetric_pads(c, at)
    stride = tuple(int(s) for s in at.get("strides", [1, 1]))
    check_ceil_mode(c, at, x, kernel, stride, pads, "MaxPool")
    return c.add("maxpool2d", [x], attrs={"kernel_size": kernel, "stride": stride,
                                          "padding": pads})


def _global_mean(c, x, keepdims: bool, what: str):
    """The mean over H and W of (C, H, W): average pooling with one window, then a reshape
    to (C,) unless the axes are kept."""
    if len(x.shape) != 3:
        raise c.fail(f"{what} of a tensor of per-sample shape {x.shape} is not supported "
                     f"(only (C, H, W))")
    hw = x.shape[1:]
    out = c.add("avgpool2d", [x], attrs={"kernel_size": hw, "stride": hw, "padding": (0, 0)})
    return out if keepdims else c.add("reshape", [out], attrs={"shape": (x.shape[0],)})


def global_avgpool(c, a, at):
    return _global_mean(c, a[0], True, "GlobalAveragePool")


def reduce_mean(c, a, at):
    x = a[0]
    rank = len(c.full_shape(x))
    given = a[1] if len(a) > 1 and a[1] is not None else at.get("axes")
    if given is None:
        raise c.fail("ReduceMean over every axis (the batch axis among them) is not supported")
    axes = sorted(full_axis(c, v, rank) for v in ints(c, given, "the ReduceMean axes"))
    if not c.batched or len(x.shape) != 3 or axes != [rank - 2, rank - 1]:
        raise c.fail(f"ReduceMean over axes {axes} of a tensor of shape {c.full_shape(x)} is "
                     f"not supported (only the mean over H and W of (N, C, H, W))")
    return _global_mean(c, x, bool(at.get("keepdims", 1)), "ReduceMean")


def conv_transpose(c, a, at):
    """ONNX crops ``pads`` (begin b, end e) and then appends ``output_padding`` o at the end;
    torch crops p at both ends and appends op. They agree with p = b and op = o + b - e, which
    torch (and the IR) take where 0 <= op < max(stride, dilation)."""
    x = a[0]
    w = c.const(a[1], "the ConvTranspose weight")
    if w.ndim != 4 or len(x.shape) != 3:
        raise c.fail(f"ConvTranspose with a {w.ndim - 2}-D kernel is not supported")
    if "kernel_shape" in at and tuple(at["kernel_shape"]) != w.shape[2:]:
        raise c.fail(f"kernel_shape {list(at['kernel_shape'])} differs from the weight's "
                     f"{list(w.shape[2:])}", ShapeError)
    stride = [int(s) for s in at.get("strides", [1, 1])]
    dilation = [int(d) for d in at.get("dilations", [1, 1])]
    out_pad = [int(o) for o in at.get("output_padding", [0, 0])]
    begin, end = _transpose_pads(c, at, x, w, stride, dilation, out_pad)
    out_pad = [o + b - e for o, b, e in zip(out_pad, begin, end)]
    if any(not 0 <= o < max(s, d) for o, s, d in zip(out_pad, stride, dilation)):
        raise c.fail(f"ConvTranspose pads {begin + end} with output_padding "
                     f"{list(at.get('output_padding', [0, 0]))} are not supported (the end "
                     f"pad may be below the begin pad by less than the stride)")
    params = {"weight": w}
    if len(a) > 2 and a[2] is not None:
        params["bias"] = c.const(a[2], "the ConvTranspose bias")
    attrs = {"stride": tuple(stride), "padding": tuple(begin), "dilation": tuple(dilation),
             "output_padding": tuple(out_pad), "groups": int(at.get("group", 1))}
    return c.add("conv_transpose2d", [x], params=params, attrs=attrs)


def _transpose_pads(c, at, x, w, stride, dilation, out_pad) -> tuple[list[int], list[int]]:
    """(begin, end) pads: given, or derived from ``output_shape`` / ``auto_pad=SAME_*`` as
    the ONNX specification derives them."""
    auto = _text(at.get("auto_pad", "NOTSET"))
    pads = [int(p) for p in at.get("pads", [0, 0, 0, 0])]
    if len(pads) != 4:
        raise c.fail(f"pads {pads} must hold 4 values", ShapeError)
    if auto == "VALID":
        return [0, 0], [0, 0]
    if auto not in ("NOTSET", "SAME_UPPER", "SAME_LOWER"):
        raise c.fail(f"auto_pad={auto!r} is not supported")
    if "output_shape" not in at and auto == "NOTSET":
        return pads[:2], pads[2:]
    if any(pads):
        raise c.fail("ConvTranspose with both pads and output_shape / auto_pad=SAME is not "
                     "supported")
    target = [int(s) for s in at["output_shape"][-2:]] if "output_shape" in at \
        else [x.shape[i + 1] * stride[i] for i in (0, 1)]
    total = [stride[i] * (x.shape[i + 1] - 1) + out_pad[i] + (w.shape[i + 2] - 1) * dilation[i]
             + 1 - target[i] for i in (0, 1)]
    if min(total) < 0:
        raise c.fail(f"ConvTranspose output_shape {target} is larger than the transposed "
                     f"convolution gives", ShapeError)
    small, large = [t // 2 for t in total], [t - t // 2 for t in total]
    return (small, large) if auto == "SAME_UPPER" else (large, small)


def leaky_relu(c, a, at):
    alpha = float(at.get("alpha", 0.01))
    if not 0.0 <= alpha <= 1.0:
        raise c.fail(f"LeakyRelu with alpha={alpha} outside [0, 1] is not supported")
    return c.add("leaky_relu", [a[0]], attrs={"negative_slope": alpha})


def elu(c, a, at):
    alpha = float(at.get("alpha", 1.0))
    if not 0.0 < alpha <= 1.0:
        raise c.fail(f"Elu with alpha={alpha} outside (0, 1] is not supported")
    return c.add("elu", [a[0]], attrs={"alpha": alpha})


def _bound(c, value, default: float, what: str) -> float:
    if value is None:
        return default
    arr = np.asarray(c.const(value, what), dtype=np.float64)
    if arr.size != 1:
        raise c.fail(f"{what} must be a scalar, got shape {arr.shape}", ShapeError)
    v = float(arr.reshape(()))
    return math.copysign(math.inf, v) if abs(v) >= FLOAT_MAX else v


def clip(c, a, at):
    """Clip to [min, max] (attributes before opset 11, optional inputs from it; a missing
    bound is infinite): ``relu`` for [0, inf), else ``hardtanh`` (torch's hardtanh, relu6 and
    clamp export as Clip)."""
    if c.opset < 11:
        lo, hi = (_bound(c, at.get(k), d, f"the Clip {k}") for k, d in
                  (("min", -math.inf), ("max", math.inf)))
    else:
        lo = _bound(c, a[1] if len(a) > 1 else None, -math.inf, "the Clip min")
        hi = _bound(c, a[2] if len(a) > 2 else None, math.inf, "the Clip max")
    if math.isnan(lo) or math.isnan(hi) or not lo < hi:
        raise c.fail(f"Clip to [{lo}, {hi}] is not supported (min must be below max)")
    if lo == -math.inf and hi == math.inf:
        return a[0]
    if lo == 0.0 and hi == math.inf:
        return c.add("relu", [a[0]])
    return c.add("hardtanh", [a[0]], attrs={"min_val": lo, "max_val": hi})


def softmax(c, a, at):
    """Softmax along one axis. Before opset 13 ONNX flattens the axes from ``axis`` on into
    one; that is a single-axis softmax where at most one of them is longer than 1."""
    x = a[0]
    shape = c.full_shape(x)
    axis = int(at.get("axis", 1 if c.opset < 13 else -1))
    if not -len(shape) <= axis < len(shape):
        raise c.fail(f"axis {axis} is out of range for a tensor of rank {len(shape)}",
                     ShapeError)
    axis %= len(shape)
    if c.opset < 13:
        long = [i for i in range(axis, len(shape)) if shape[i] > 1]
        if len(long) > 1 or (c.batched and axis == 0):
            raise c.fail(f"Softmax (opset {c.opset}) with axis={axis} normalises over the "
                         f"flattened axes {axis}.. of shape {list(shape)} together; only a "
                         f"softmax along one per-sample axis is supported")
        axis = long[0] if long else axis
    return c.add("softmax", [x], attrs={"axis": c.axis(axis, x)})
