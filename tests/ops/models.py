"""Small IR models, one per op of issue 15 in context, built with :class:`GraphBuilder`
(seeded weights), for the soundness and agreement tests: each returns ``(graph, x)`` with
``x`` a batch of two input centres."""

from __future__ import annotations

import zlib

import numpy as np

from boundflow.ir import GraphBuilder


def _w(rng, *shape, scale=0.6):
    return rng.normal(0, scale, shape)


def _mlp(act: str, attrs=None, depth: int = 2, dtype="float32"):
    def build():
        rng = np.random.default_rng(zlib.crc32(act.encode()) % 1000)   # hash() varies per run
        b = GraphBuilder(dtype)
        h, n = b.input((5,)), 5
        for _ in range(depth):
            h = b.add_node("linear", [h], params={"weight": _w(rng, 8, n),
                                                  "bias": _w(rng, 8, scale=0.2)})
            h = b.add_node(act, [h], attrs=attrs or {})
            n = 8
        out = b.add_node("linear", [h], params={"weight": _w(rng, 3, n)})
        return b.build(out), rng.uniform(-1, 1, (2, 5))
    return build


def _sigmoid_tanh(dtype="float32"):
    rng = np.random.default_rng(1)
    b = GraphBuilder(dtype)
    h = b.input((4,))
    h = b.add_node("linear", [h], params={"weight": _w(rng, 6, 4), "bias": _w(rng, 6)})
    h = b.add_node("sigmoid", [h])
    h = b.add_node("linear", [h], params={"weight": _w(rng, 6, 6, scale=1.5)})
    h = b.add_node("tanh", [h])
    out = b.add_node("linear", [h], params={"weight": _w(rng, 3, 6)})
    return b.build(out), rng.uniform(-1, 1, (2, 4))


def _conv_maxpool(dtype="float32"):
    rng = np.random.default_rng(2)
    b = GraphBuilder(dtype)
    h = b.input((1, 6, 6))
    h = b.add_node("conv2d", [h], params={"weight": _w(rng, 3, 1, 3, 3), "bias": _w(rng, 3)},
                   attrs={"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1})
    h = b.add_node("relu", [h])
    h = b.add_node("maxpool2d", [h], attrs={"kernel_size": (2, 2), "stride": (2, 2),
                                            "padding": (0, 0)})
    h = b.add_node("flatten", [h], attrs={"start_dim": 0, "end_dim": -1})
    out = b.add_node("linear", [h], params={"weight": _w(rng, 3, 27)})
    return b.build(out), rng.uniform(0, 1, (2, 1, 6, 6))


def _pad_conv(dtype="float32"):
    rng = np.random.default_rng(3)
    b = GraphBuilder(dtype)
    h = b.input((2, 4, 4))
    h = b.add_node("pad", [h], attrs={"pads": ((0, 0), (1, 0), (0, 2)), "value": 0.5})
    h = b.add_node("conv2d", [h], params={"weight": _w(rng, 2, 2, 2, 2)},
                   attrs={"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1})
    h = b.add_node("relu", [h])
    h = b.add_node("flatten", [h], attrs={"start_dim": 0, "end_dim": -1})
    out = b.add_node("linear", [h], params={"weight": _w(rng, 2, b.shape(h)[0])})
    return b.build(out), rng.uniform(0, 1, (2, 2, 4, 4))


def _slice_gather(dtype="float32"):
    rng = np.random.default_rng(4)
    b = GraphBuilder(dtype)
    x = b.input((6,))
    h = b.add_node("linear", [x], params={"weight": _w(rng, 8, 6)})
    h = b.add_node("relu", [h])
    s = b.add_node("slice", [h], attrs={"axis": 0, "start": 1, "end": 7, "step": 2})
    g = b.add_node("gather", [h], attrs={"axis": 0, "indices": (7, 0, 4), "keepdim": True})
    h = b.add_node("add", [s, g])
    h = b.add_node("relu", [h])
    out = b.add_node("linear", [h], params={"weight": _w(rng, 2, 3)})
    return b.build(out), rng.uniform(-1, 1, (2, 6))


def _conv_transpose(dtype="float32"):
    rng = np.random.default_rng(5)
    b = GraphBuilder(dtype)
    h = b.input((2, 3, 3))
    h = b.add_node("conv_transpose2d", [h], params={"weight": _w(rng, 2, 2, 2, 2),
                                                    "bias": _w(rng, 2)},
                   attrs={"stride": (2, 2), "padding": (0, 0), "output_padding": (0, 0),
                          "dilation": (1, 1), "groups": 1})
    h = b.add_node("relu", [h])
    h = b.add_node("flatten", [h], attrs={"start_dim": 0, "end_dim": -1})
    out = b.add_node("linear", [h], params={"weight": _w(rng, 2, b.shape(h)[0])})
    return b.build(out), rng.uniform(-1, 1, (2, 2, 3, 3))


def _softmax(dtype="float32"):
    rng = np.random.default_rng(6)
    b = GraphBuilder(dtype)
    h = b.input((4,))
    h = b.add_node("linear", [h], params={"weight": _w(rng, 6, 4)})
    h = b.add_node("relu", [h])
    h = b.add_node("linear", [h], params={"weight": _w(rng, 3, 6)})
    out = b.add_node("softmax", [h], attrs={"axis": 0})
    return b.build(out), rng.uniform(-1, 1, (2, 4))


def _global_avgpool(dtype="float32"):
    rng = np.random.default_rng(7)
    b = GraphBuilder(dtype)
    h = b.input((2, 4, 4))
    h = b.add_node("conv2d", [h], params={"weight": _w(rng, 3, 2, 3, 3)},
                   attrs={"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1})
    h = b.add_node("tanh", [h])
    h = b.add_node("avgpool2d", [h], attrs={"kernel_size": (4, 4), "stride": (4, 4),
                                            "padding": (0, 0)})
    h = b.add_node("flatten", [h], attrs={"start_dim": 0, "end_dim": -1})
    out = b.add_node("linear", [h], params={"weight": _w(rng, 2, 3)})
    return b.build(out), rng.uniform(-1, 1, (2, 2, 4, 4))


MODELS = {
    "sigmoid_tanh": _sigmoid_tanh,
    "leaky_relu": lambda dtype="float32": _mlp("leaky_relu", {"negative_slope": 0.1},
                                               dtype=dtype)(),
    "hardtanh": lambda dtype="float32": _mlp("hardtanh", {"min_val": -0.5, "max_val": 0.8},
                                             dtype=dtype)(),
    "clip_relu6": lambda dtype="float32": _mlp("hardtanh", {"min_val": 0.0,
                                                            "max_val": float("inf")},
                                               dtype=dtype)(),
    "elu": lambda dtype="float32": _mlp("elu", {"alpha": 0.8}, dtype=dtype)(),
    "conv_maxpool": _conv_maxpool,
    "pad_conv": _pad_conv,
    "slice_gather": _slice_gather,
    "conv_transpose": _conv_transpose,
    "softmax": _softmax,
    "global_avgpool_tanh": _global_avgpool,
}
