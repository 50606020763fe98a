"""Small graphs holding the ops of issue 15 (activations through the relaxation registry,
maxpool2d, pad, slice, gather, softmax, conv_transpose2d), shared by the domain tests."""

from __future__ import annotations

import math

import numpy as np

from boundflow.ir import GraphBuilder


def _conv(b, x, w, c_out, k=3, pad=1, stride=1):
    c_in = b.shape(x)[0]
    return b.add_node("conv2d", [x], params={"weight": w(c_out, c_in, k, k) * 0.5,
                                             "bias": w(c_out) * 0.1},
                      attrs={"stride": (stride, stride), "padding": (pad, pad),
                             "dilation": (1, 1), "groups": 1})


def _linear(b, x, w, n_out, scale=1.0):
    return b.add_node("linear", [x], params={"weight": w(n_out, b.shape(x)[-1]) * scale,
                                             "bias": w(n_out) * 0.1})


def _flatten(b, x):
    return b.add_node("flatten", [x], attrs={"start_dim": 0, "end_dim": -1})


def _act(op, **attrs):
    return lambda b, x, w: b.add_node(op, [x], attrs=attrs)


# one small subgraph per new op: name -> (input shape, build(builder, x, random) -> output)
NEW_OP_BUILDERS = {
    "relu": ((5,), _act("relu")),
    "leaky_relu": ((5,), _act("leaky_relu", negative_slope=0.1)),
    "hardtanh": ((5,), _act("hardtanh", min_val=-0.5, max_val=1.0)),
    "hardtanh_inf_low": ((5,), _act("hardtanh", min_val=-math.inf, max_val=0.7)),
    "hardtanh_inf_high": ((5,), _act("hardtanh", min_val=-0.3, max_val=math.inf)),
    "sigmoid": ((5,), _act("sigmoid")),
    "tanh": ((5,), _act("tanh")),
    "elu": ((5,), _act("elu", alpha=0.6)),
    "maxpool2d": ((2, 6, 6), lambda b, x, w: b.add_node(
        "maxpool2d", [x], attrs={"kernel_size": (3, 2), "stride": (2, 2), "padding": (1, 1)})),
    "maxpool2d_overlap": ((2, 5, 5), lambda b, x, w: b.add_node(
        "maxpool2d", [x], attrs={"kernel_size": (3, 3), "stride": (1, 2), "padding": (1, 0)})),
    "pad": ((2, 3, 4), lambda b, x, w: b.add_node(
        "pad", [x], attrs={"pads": ((0, 0), (1, 2), (2, 0)), "value": 0.5})),
    "slice": ((3, 7), lambda b, x, w: b.add_node(
        "slice", [x], attrs={"axis": 1, "start": 1, "end": 7, "step": 2})),
    "gather": ((4, 5), lambda b, x, w: b.add_node(
        "gather", [x], attrs={"axis": 0, "indices": (3, 0, 3), "keepdim": True})),
    "gather_drop": ((4, 5), lambda b, x, w: b.add_node(
        "gather", [x], attrs={"axis": 1, "indices": (2,), "keepdim": False})),
    "softmax": ((2, 5), lambda b, x, w: b.add_node("softmax", [x], attrs={"axis": 1})),
    "conv_transpose2d": ((3, 4, 4), lambda b, x, w: b.add_node(
        "conv_transpose2d", [x], params={"weight": w(3, 2, 3, 3), "bias": w(2)},
        attrs={"stride": (2, 1), "padding": (1, 0), "output_padding": (1, 0),
               "dilation": (1, 2), "groups": 1})),
    "conv_transpose2d_groups": ((4, 3, 3), lambda b, x, w: b.add_node(
        "conv_transpose2d", [x], params={"weight": w(4, 1, 2, 3)},
        attrs={"stride": (2, 2), "padding": (0, 1), "output_padding": (1, 1),
               "dilation": (1, 1), "groups": 2})),
}


def single_op_graph(case: str, dtype: str = "float64", seed: int = 1):
    """The op alone on its input."""
    shape, build = NEW_OP_BUILDERS[case]
    rng = np.random.default_rng(seed)
    b = GraphBuilder(dtype)
    return b.build(build(b, b.input(shape), lambda *s: rng.standard_normal(s)))


def op_network(case: str, dtype: str = "float64", seed: int = 7):
    """The op inside a network: x -> mixing affine map -> op -> relu -> flatten -> linear, so
    the op's input is a sum of inputs and its output a pre-activation bounded by backward
    passes through the op."""
    shape, build = NEW_OP_BUILDERS[case]
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.standard_normal(s)  # noqa: E731
    b = GraphBuilder(dtype)
    x = b.input(shape)
    h = _conv(b, x, w, shape[0]) if len(shape) == 3 else _linear(b, x, w, shape[-1], 0.7)
    h = b.add_node("relu", [build(b, h, w)])
    return b.build(_linear(b, _flatten(b, h), w, 3))


def _build(dtype, seed, fn):
    rng = np.random.default_rng(seed)
    b = GraphBuilder(dtype)
    return b.build(fn(b, lambda *s: rng.standard_normal(s)))


# small models for the tightness order, one per new op family: name -> (input shape, build)
def _conv_maxpool(b, w):
    h = b.add_node("relu", [_conv(b, b.input((1, 6, 6)), w, 3)])
    h = b.add_node("maxpool2d", [_conv(b, h, w, 3)], attrs={
        "kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0)})
    return _linear(b, _flatten(b, h), w, 3)


def _sigmoid_tanh(b, w):
    h = b.add_node("sigmoid", [_linear(b, b.input((4,)), w, 6)])
    h = b.add_node("tanh", [_linear(b, h, w, 5)])
    return _linear(b, h, w, 3)


def _leaky(b, w):
    h = b.add_node("leaky_relu", [_linear(b, b.input((4,)), w, 6)],
                   attrs={"negative_slope": 0.2})
    h = b.add_node("leaky_relu", [_linear(b, h, w, 6)], attrs={"negative_slope": 0.05})
    return _linear(b, h, w, 3)


def _hardtanh(b, w):
    h = b.add_node("hardtanh", [_linear(b, b.input((4,)), w, 6)],
                   attrs={"min_val": -1.0, "max_val": 1.0})
    h = b.add_node("hardtanh", [_linear(b, h, w, 6)],
                   attrs={"min_val": -math.inf, "max_val": 0.5})
    return _linear(b, h, w, 3)


def _conv_transpose(b, w):
    h = b.add_node("conv_transpose2d", [b.input((2, 3, 3))],
                   params={"weight": w(2, 3, 3, 3) * 0.5, "bias": w(3) * 0.1},
                   attrs={"stride": (2, 2), "padding": (1, 1), "output_padding": (1, 1),
                          "dilation": (1, 1), "groups": 1})
    h = b.add_node("conv_transpose2d", [b.add_node("relu", [h])],
                   params={"weight": w(3, 2, 2, 2) * 0.5},
                   attrs={"stride": (1, 1), "padding": (0, 0), "output_padding": (0, 0),
                          "dilation": (1, 1), "groups": 1})
    h = b.add_node("relu", [h])
    return _linear(b, _flatten(b, h), w, 3)


def _pad_conv(b, w):
    pads = {"pads": ((0, 0), (1, 1), (1, 1)), "value": 0.3}
    h = _conv(b, b.add_node("pad", [b.input((2, 4, 4))], attrs=pads), w, 3, pad=0)
    h = b.add_node("relu", [h])
    h = _conv(b, b.add_node("pad", [h], attrs=pads), w, 2, pad=0)
    return _linear(b, _flatten(b, b.add_node("relu", [h])), w, 3)


def _slice_gather(b, w):
    h = b.add_node("relu", [_linear(b, b.input((5,)), w, 8)])
    h = b.add_node("slice", [h], attrs={"axis": 0, "start": 1, "end": 8, "step": 2})
    h = b.add_node("relu", [_linear(b, h, w, 6)])
    h = b.add_node("gather", [h], attrs={"axis": 0, "indices": (5, 1, 1, 3), "keepdim": True})
    return _linear(b, h, w, 3)


def _softmax_end(b, w):
    h = b.add_node("relu", [_linear(b, b.input((4,)), w, 6)])
    h = b.add_node("relu", [_linear(b, h, w, 6)])
    return b.add_node("softmax", [_linear(b, h, w, 4)], attrs={"axis": 0})


def _conv_sigmoid_chain(b, w):
    """A conv chain through smooth and clipped activations (patch form applies)."""
    h = b.add_node("sigmoid", [_conv(b, b.input((2, 6, 6)), w, 3)])
    h = b.add_node("hardtanh", [_conv(b, h, w, 3)], attrs={"min_val": -0.5, "max_val": 0.5})
    h = b.add_node("tanh", [_conv(b, h, w, 2, k=2, pad=0, stride=2)])
    h = b.add_node("leaky_relu", [_conv(b, h, w, 2)], attrs={"negative_slope": 0.1})
    return _linear(b, _flatten(b, h), w, 2)


MODELS = {
    "conv_maxpool": _conv_maxpool,
    "sigmoid_tanh": _sigmoid_tanh,
    "leaky_relu": _leaky,
    "hardtanh": _hardtanh,
    "conv_transpose": _conv_transpose,
    "pad_conv": _pad_conv,
    "slice_gather": _slice_gather,
    "softmax_end": _softmax_end,
    "conv_activation_chain": _conv_sigmoid_chain,
}


def model(name: str, dtype: str = "float64", seed: int = 0):
    return _build(dtype, seed, MODELS[name])
