"""The graph IR: shape inference per op, the verifier, hashes and normalisation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from boundflow.domains.concrete import evaluate
from boundflow.errors import GraphError, ShapeError, UnsupportedOpError
from boundflow.ir import Graph, GraphBuilder, infer_shape, normalize, verify_graph

W = lambda *s: np.ones(s, np.float32)  # noqa: E731


@pytest.mark.parametrize("op, attrs, ins, params, out", [
    ("linear", {}, [(5,)], {"weight": (3, 5), "bias": (3,)}, (3,)),
    ("linear", {}, [(2, 5)], {"weight": (3, 5)}, (2, 3)),
    ("conv2d", {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1},
     [(3, 8, 8)], {"weight": (4, 3, 3, 3)}, (4, 6, 6)),
    ("conv2d", {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1},
     [(3, 32, 32)], {"weight": (16, 3, 4, 4)}, (16, 16, 16)),
    ("conv2d", {"stride": (1, 2), "padding": (2, 0), "dilation": (2, 1), "groups": 2},
     [(4, 9, 9)], {"weight": (6, 2, 3, 3), "bias": (6,)}, (6, 9, 4)),
    ("relu", {}, [(2, 3)], {}, (2, 3)),
    ("add", {}, [(2, 3), (2, 3)], {}, (2, 3)),
    ("add", {}, [(2, 3)], {"other": (3,)}, (2, 3)),
    ("sub", {}, [(3, 4, 4)], {"other": (3, 1, 1)}, (3, 4, 4)),
    ("mul", {}, [(3, 4, 4)], {"other": ()}, (3, 4, 4)),
    ("div", {}, [(3,)], {"other": (3,)}, (3,)),
    ("batchnorm", {"eps": 1e-5}, [(3, 2, 2)],
     {"mean": (3,), "var": (3,), "weight": (3,), "bias": (3,)}, (3, 2, 2)),
    ("flatten", {"start_dim": 0, "end_dim": -1}, [(2, 3, 4)], {}, (24,)),
    ("flatten", {"start_dim": 1, "end_dim": 2}, [(2, 3, 4)], {}, (2, 12)),
    ("reshape", {"shape": (4, -1)}, [(2, 3, 4)], {}, (4, 6)),
    ("permute", {"dims": (1, 2, 0)}, [(2, 3, 4)], {}, (3, 4, 2)),
    ("avgpool2d", {"kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0)},
     [(3, 8, 7)], {}, (3, 4, 3)),
    ("avgpool2d", {"kernel_size": (3, 3), "stride": (1, 1), "padding": (1, 1)},
     [(3, 5, 5)], {}, (3, 5, 5)),
    ("identity", {}, [(7,)], {}, (7,)),
    ("concat", {"axis": 0}, [(2, 3), (4, 3)], {}, (6, 3)),
    ("concat", {"axis": -1}, [(2, 3), (2, 1), (2, 2)], {}, (2, 6)),
])
def test_shape_inference(op, attrs, ins, params, out):
    assert infer_shape(op, attrs, ins, params) == out


def test_shape_inference_matches_torch_for_convs_and_pools():
    for stride, pad, dil, groups in [(1, 0, 1, 1), (2, 1, 1, 1), (3, 2, 2, 2), (1, 3, 3, 4)]:
        x = torch.zeros(1, 4, 11, 13)
        w = torch.zeros(8, 4 // groups, 3, 2)
        y = torch.nn.functional.conv2d(x, w, stride=stride, padding=pad, dilation=dil,
                                       groups=groups)
        attrs = {"stride": (stride,) * 2, "padding": (pad,) * 2, "dilation": (dil,) * 2,
                 "groups": groups}
        assert infer_shape("conv2d", attrs, [(4, 11, 13)], {"weight": tuple(w.shape)}) == \
            tuple(y.shape[1:])
        if pad <= 1:
            p = torch.nn.functional.avg_pool2d(x, (3, 2), stride, pad)
            attrs = {"kernel_size": (3, 2), "stride": (stride,) * 2, "padding": (pad,) * 2}
            assert infer_shape("avgpool2d", attrs, [(4, 11, 13)], {}) == tuple(p.shape[1:])


@pytest.mark.parametrize("op, attrs, ins, params, match", [
    ("linear", {}, [(5,)], {"weight": (3, 4)}, "in-features"),
    ("linear", {}, [(4,)], {"weight": (3, 4), "bias": (4,)}, "bias"),
    ("conv2d", {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 2},
     [(3, 8, 8)], {"weight": (4, 3, 3, 3)}, "groups"),
    ("conv2d", {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1},
     [(3, 2, 2)], {"weight": (4, 3, 3, 3)}, "does not fit"),
    ("add", {}, [(2, 3), (3, 2)], {}, "must be equal"),
    ("add", {}, [(2, 3)], {"other": (2,)}, "broadcast"),
    ("reshape", {"shape": (5, -1)}, [(2, 3)], {}, "cannot reshape"),
    ("permute", {"dims": (0, 0)}, [(2, 3)], {}, "permutation"),
    ("concat", {"axis": 0}, [(2, 3), (2, 4)], {}, "differ"),
])
def test_shape_errors_say_why(op, attrs, ins, params, match):
    with pytest.raises(ShapeError, match=match):
        infer_shape(op, attrs, ins, params)


def test_unknown_op_lists_the_valid_ones():
    with pytest.raises(UnsupportedOpError, match="conv2d"):
        infer_shape("lstm", {}, [(3,)], {})


def test_builder_names_the_bad_node():
    b = GraphBuilder()
    x = b.input((4,))
    with pytest.raises(ShapeError, match=r"node 'fc2' \[linear\] \(from layer2\).*in-features"):
        b.add_node("linear", [x], params={"weight": W(3, 5)}, name="fc2", source="layer2")
    with pytest.raises(GraphError, match="NaN"):
        b.add_node("linear", [x], params={"weight": np.full((3, 4), np.nan)}, name="bad")
    with pytest.raises(GraphError, match="divides by a constant that contains 0"):
        b.add_node("div", [x], params={"other": np.array([1.0, 0.0, 2.0, 3.0])})
    with pytest.raises(GraphError, match="not defined"):
        b.add_node("relu", ["nope"])


def _mlp(seed=0, dtype="float32", names=("input", "fc1", "act", "fc2")):
    rng = np.random.default_rng(seed)
    b = GraphBuilder(dtype)
    x = b.input((4,), name=names[0])
    h = b.add_node("linear", [x], params={"weight": rng.standard_normal((8, 4)),
                                          "bias": rng.standard_normal(8)}, name=names[1])
    h = b.add_node("relu", [h], name=names[2])
    return b.build(b.add_node("linear", [h], params={"weight": rng.standard_normal((3, 8))},
                              name=names[3]))


def test_verifier_catches_each_broken_invariant():
    g = _mlp()
    verify_graph(g)
    nodes = list(g.nodes)
    broken = {
        "recorded shape": [*nodes[:3], dataclasses.replace(nodes[3], shape=(4,))],
        "not defined before": [nodes[0], nodes[2], nodes[1], nodes[3]],
        "used twice": [*nodes[:3], dataclasses.replace(nodes[3], name="fc1")],
        "first node": nodes[1:],
        "dtype": [*nodes[:3], dataclasses.replace(nodes[3], dtype="int8")],
    }
    for match, ns in broken.items():
        with pytest.raises(GraphError, match=match):
            verify_graph(Graph(tuple(ns), g.params, ns[-1].name))
    params = dict(g.params)
    params[nodes[1].params["weight"]] = np.full((8, 4), np.inf, np.float32)
    with pytest.raises(GraphError, match=r"node 'fc1' \[linear\].*NaN or inf"):
        verify_graph(Graph(g.nodes, params, g.output))
    with pytest.raises(GraphError, match="output 'zzz'"):
        verify_graph(Graph(g.nodes, g.params, "zzz"))


def test_structural_hash_ignores_weights_and_names_but_not_shapes():
    a, b = _mlp(seed=0), _mlp(seed=1)
    renamed = _mlp(seed=0, names=("x", "a", "b", "c"))
    assert a.structural_hash() == b.structural_hash() == renamed.structural_hash()
    assert a.weights_hash() != b.weights_hash()
    assert a.weights_hash() == renamed.weights_hash() == _mlp(seed=0).weights_hash()
    assert a.structural_hash() != _mlp(dtype="float64").structural_hash()
    wider = GraphBuilder()
    x = wider.input((5,))
    assert wider.build(wider.add_node("relu", [x])).structural_hash() != a.structural_hash()


def test_normalize_folds_batchnorm_and_keeps_the_function():
    rng = np.random.default_rng(0)
    b = GraphBuilder("float64")
    x = b.input((2, 5, 5))
    c = b.add_node("conv2d", [x], params={"weight": rng.standard_normal((3, 2, 3, 3))},
                   attrs={"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1})
    bn = b.add_node("batchnorm", [c], params={
        "mean": rng.standard_normal(3), "var": rng.random(3) + 0.1,
        "weight": rng.standard_normal(3), "bias": rng.standard_normal(3)}, attrs={"eps": 1e-5})
    g = b.build(b.add_node("identity", [b.add_node("relu", [bn])]))
    n = normalize(g)
    assert [node.op for node in n.nodes] == ["input", "conv2d", "relu"]
    pts = torch.from_numpy(rng.standard_normal((7, 2, 5, 5)))
    torch.testing.assert_close(evaluate(n, pts), evaluate(g, pts))


def test_normalize_keeps_batchnorm_when_the_layer_has_other_readers():
    rng = np.random.default_rng(0)
    b = GraphBuilder("float64")
    x = b.input((3,))
    h = b.add_node("linear", [x], params={"weight": rng.standard_normal((3, 3))})
    bn = b.add_node("batchnorm", [h], params={"mean": np.zeros(3), "var": np.ones(3),
                                              "weight": np.full(3, 2.0), "bias": np.ones(3)},
                    attrs={"eps": 0.0})
    g = b.build(b.add_node("add", [h, bn]))
    assert [node.op for node in normalize(g).nodes] == ["input", "linear", "batchnorm", "add"]
