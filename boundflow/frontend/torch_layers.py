"""ATen converters for pooling, transposed convolution and the nonlinear activations:
max_pool2d, adaptive_avg_pool2d and the mean over H and W (both average pooling with one
window), conv_transpose2d, sigmoid, tanh, leaky_relu, elu, hardtanh / relu6 / clamp, softmax; and
the ceil-mode rule average pooling shares.

The converters take ``(converter, bound arguments)`` like those of ``frontend/torch.py``, which
lists them in its table.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch


def pair(v) -> tuple[int, int]:
    v = [v] if isinstance(v, int) else list(v)
    return tuple(int(i) for i in v) * 2 if len(v) == 1 else tuple(int(i) for i in v)


def conv_transpose(c, a: dict):
    x = a["input"]
    params = {"weight": c.array(a["weight"], "the weight")}
    if params["weight"].ndim != 4:
        raise c.fail(f"conv_transpose with a {params['weight'].ndim - 2}-D kernel is not "
                     f"supported")
    if a["bias"] is not None:
        params["bias"] = c.array(a["bias"], "the bias")
    if isinstance(a["padding"], str):
        raise c.fail(f"conv_transpose2d with padding={a['padding']!r} (give integer padding)")
    attrs = {"stride": pair(a["stride"]), "padding": pair(a["padding"]),
             "output_padding": pair(a["output_padding"]), "dilation": pair(a["dilation"]),
             "groups": int(a["groups"])}
    return c.add("conv_transpose2d", [x], params=params, attrs=attrs)


def unary(op: str) -> Callable:
    return lambda c, a: c.add(op, [a["self"]])


def leaky_relu(c, a: dict):
    slope = float(a["negative_slope"])
    if not 0.0 <= slope <= 1.0:
        raise c.fail(f"leaky_relu with negative_slope={slope} outside [0, 1] is not supported")
    return c.add("leaky_relu", [a["self"]], attrs={"negative_slope": slope})


def elu(c, a: dict):
    alpha = float(a["alpha"])
    if float(a["scale"]) != 1.0 or float(a["input_scale"]) != 1.0:
        raise c.fail("elu with scale or input_scale other than 1 (SELU, CELU) is not supported")
    if not 0.0 < alpha <= 1.0:
        raise c.fail(f"elu with alpha={alpha} outside (0, 1] is not supported")
    return c.add("elu", [a["self"]], attrs={"alpha": alpha})


def scalar_bound(c, value: Any, default: float, what: str) -> float:
    if value is None:
        return default
    if not isinstance(value, (int, float, torch.Tensor)):
        raise c.fail(f"the clamp {what} must be a constant number, not {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise c.fail(f"clamp with a {what} tensor of shape {tuple(value.shape)} is not "
                         f"supported (only a scalar)")
        value = value.item()
    return float(value)


def clip(c, x, lo: float, hi: float, what: str):
    """Clamp to [lo, hi]: ``relu`` for [0, inf), else ``hardtanh`` (either bound may be
    infinite)."""
    if math.isnan(lo) or math.isnan(hi) or not lo < hi:
        raise c.fail(f"{what} to [{lo}, {hi}] is not supported (min must be below max)")
    if lo == -math.inf and hi == math.inf:
        return x
    if lo == 0.0 and hi == math.inf:
        return c.add("relu", [x])
    return c.add("hardtanh", [x], attrs={"min_val": lo, "max_val": hi})


def clamp(c, a: dict):
    lo = scalar_bound(c, a.get("min"), -math.inf, "min")
    hi = scalar_bound(c, a.get("max"), math.inf, "max")
    return clip(c, a["self"], lo, hi, "clamp")


def hardtanh(c, a: dict):
    return clip(c, a["self"], float(a["min_val"]), float(a["max_val"]), "hardtanh")


def maxpool(c, a: dict):
    x = a["self"]
    kernel = pair(a["kernel_size"])
    stride = pair(a["stride"]) if a["stride"] else kernel
    padding = pair(a["padding"])
    if pair(a["dilation"]) != (1, 1):
        raise c.fail(f"max_pool2d with dilation {list(a['dilation'])} is not supported")
    if len(x.shape) != 3:
        raise c.fail(f"max_pool2d of per-sample shape {x.shape} is not supported (only "
                     f"(C, H, W))")
    out = c.add("maxpool2d", [x], attrs={"kernel_size": kernel, "stride": stride,
                                         "padding": padding})
    check_ceil_mode(c, a, x, out, kernel, stride, padding, "max_pool2d")
    return out


def maxpool_with_indices(c, a: dict) -> tuple:
    return (maxpool(c, a), None)


def check_ceil_mode(c, a, x, out, kernel, stride, padding, what) -> None:
    """ceil_mode only matters where it would add a window."""
    if a["ceil_mode"]:
        h = [(x.shape[i + 1] + 2 * padding[i] - kernel[i] + stride[i] - 1) // stride[i] + 1
             for i in (0, 1)]
        if tuple(h) != out.shape[1:]:
            raise c.fail(f"{what} with ceil_mode=True that adds a partial window")


def global_mean(c, x, keepdim: bool):
    """The mean over H and W of (C, H, W): one average-pooling window, then a reshape to (C,)
    unless the axes are kept."""
    hw = x.shape[1:]
    out = c.add("avgpool2d", [x], attrs={"kernel_size": hw, "stride": hw, "padding": (0, 0)})
    return out if keepdim else c.add("reshape", [out], attrs={"shape": (x.shape[0],)})


def adaptive_avgpool(c, a: dict):
    """Adaptive average pooling to (oh, ow) where oh divides H and ow divides W: windows of
    (H/oh, W/ow), which is what torch computes there."""
    x = a["self"]
    size = a["output_size"]
    size = [size, size] if isinstance(size, int) else list(size) * (2 if len(size) == 1 else 1)
    if len(x.shape) == 3:     # None keeps that axis
        size = [x.shape[i + 1] if s is None else s for i, s in enumerate(size)]
    if len(x.shape) != 3 or any(not isinstance(s, int) or s < 1 or x.shape[i + 1] % s
                                for i, s in enumerate(size)):
        raise c.fail(f"adaptive_avg_pool2d of per-sample shape {x.shape} to {list(size)} is "
                     f"not supported (only to sizes that divide H and W)")
    kernel = (x.shape[1] // size[0], x.shape[2] // size[1])
    return c.add("avgpool2d", [x], attrs={"kernel_size": kernel, "stride": kernel,
                                          "padding": (0, 0)})


def mean(c, a: dict):
    x = a["self"]
    full = len(x.shape) + 1
    dims = sorted(d % full for d in (a["dim"] or range(full)))
    if a.get("dtype") is not None or len(x.shape) != 3 or dims != [2, 3]:
        raise c.fail(f"mean over dims {list(a['dim'] or [])} of a tensor of shape "
                     f"{('batch',) + x.shape} is not supported (only the mean over H and W "
                     f"of (N, C, H, W))")
    return global_mean(c, x, bool(a["keepdim"]))


def softmax(c, a: dict):
    x = a["self"]
    if a.get("dtype") is not None or a.get("half_to_float"):
        raise c.fail("softmax with a dtype conversion is not supported")
    return c.add("softmax", [x], attrs={"axis": c.sample_dim(a["dim"], x)})


def clamp_min(c, a: dict):
    return clip(c, a["self"], scalar_bound(c, a["min"], -math.inf, "min"), math.inf, "clamp_min")


def clamp_max(c, a: dict):
    return clip(c, a["self"], -math.inf, scalar_bound(c, a["max"], math.inf, "max"), "clamp_max")


def relu6(c, a: dict):
    return clip(c, a["self"], 0.0, 6.0, "relu6")


CONVERTERS: dict[str, Callable] = {
    "aten::conv_transpose2d.input": conv_transpose,
    "aten::sigmoid": unary("sigmoid"),
    "aten::sigmoid_": unary("sigmoid"),
    "aten::tanh": unary("tanh"),
    "aten::tanh_": unary("tanh"),
    "aten::leaky_relu": leaky_relu,
    "aten::leaky_relu_": leaky_relu,
    "aten::elu": elu,
    "aten::elu_": elu,
    "aten::hardtanh": hardtanh,
    "aten::hardtanh_": hardtanh,
    "aten::relu6": relu6,
    "aten::clamp": clamp,
    "aten::clamp_": clamp,
    "aten::clamp.Tensor": clamp,
    "aten::clamp_min": clamp_min,
    "aten::clamp_max": clamp_max,
    "aten::max_pool2d": maxpool,
    "aten::max_pool2d_with_indices": maxpool_with_indices,
    "aten::adaptive_avg_pool2d": adaptive_avgpool,
    "aten::_adaptive_avg_pool2d": adaptive_avgpool,
    "aten::mean.dim": mean,
    "aten::softmax.int": softmax,
    "aten::_softmax": softmax,
}
