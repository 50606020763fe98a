"""Permute rewrites are exact: same bounds, fewer permutes."""

import numpy as np
import pytest
import torch

from boundflow.api import compute_bounds
from boundflow.ir.graph import GraphBuilder
from boundflow.ir.rewrite import simplify_permutes

rng = np.random.default_rng(0)


def _bounds_equal(a, b, method):
    x = rng.random((2, 3, 4, 5))
    for m in ("ibp", method):
        p, q = compute_bounds(a, x, eps=0.1, method=m, dtype="float64"), \
            compute_bounds(b, x, eps=0.1, method=m, dtype="float64")
        torch.testing.assert_close(p.lower, q.lower, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p.upper, q.upper, rtol=1e-12, atol=1e-12)


def _ops(g):
    return [n.op for n in g.nodes]


def test_transpose_pair_cancels():
    b = GraphBuilder()
    x = b.input((3, 4, 5))
    h = b.add_node("permute", [x], attrs={"dims": (0, 2, 1)})
    h = b.add_node("permute", [h], attrs={"dims": (0, 2, 1)})
    h = b.add_node("relu", [h])
    h = b.add_node("flatten", [h], attrs={"start_dim": 0, "end_dim": -1})
    g = b.build(b.add_node("linear", [h], params={"weight": rng.normal(size=(4, 60))}))
    out, log = simplify_permutes(g)
    assert "permute" not in _ops(out) and len(log) == 2
    _bounds_equal(g, out, "crown")


def test_permute_sinks_below_elementwise_ops_and_folds_into_linear():
    b = GraphBuilder()
    x = b.input((3, 4, 5))
    h = b.add_node("permute", [x], attrs={"dims": (1, 2, 0)})           # (4, 5, 3)
    h = b.add_node("add", [h], params={"other": rng.normal(size=(5, 3))})
    h = b.add_node("relu", [h])
    h = b.add_node("mul", [h], params={"other": rng.random((1, 1, 3)) + 0.5})
    h = b.add_node("flatten", [h], attrs={"start_dim": 0, "end_dim": -1})
    h = b.add_node("linear", [h], params={"weight": rng.normal(size=(6, 60)),
                                          "bias": rng.normal(size=6)})
    g = b.build(h)
    out, log = simplify_permutes(g)
    assert "permute" not in _ops(out)
    assert [line.split()[0] for line in log] == ["sank", "sank", "sank", "folded"]
    assert out.node("relu").inputs == ("add",)           # the relu now reads the sunk add
    _bounds_equal(g, out, "crown")


def test_permute_feeding_a_conv_stays():
    b = GraphBuilder()
    x = b.input((4, 5, 3))
    h = b.add_node("permute", [x], attrs={"dims": (2, 0, 1)})
    g = b.build(b.add_node("conv2d", [h], params={"weight": rng.normal(size=(2, 3, 3, 3))},
                           attrs={"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1),
                                  "groups": 1}))
    out, log = simplify_permutes(g)
    assert out is g and log == ()


@pytest.mark.parametrize("dims", [(1, 2, 0), (2, 1, 0), (0, 2, 1)])
def test_composition_of_two_permutes(dims):
    b = GraphBuilder()
    x = b.input((3, 4, 5))
    h = b.add_node("permute", [x], attrs={"dims": dims})
    h = b.add_node("permute", [h], attrs={"dims": (1, 0, 2)})
    g = b.build(b.add_node("relu", [h]))
    out, _ = simplify_permutes(g)
    assert _ops(out).count("permute") <= 1
    xs = torch.as_tensor(rng.random((2, 3, 4, 5)))
    from boundflow.domains.concrete import evaluate
    torch.testing.assert_close(evaluate(g, xs.float()), evaluate(out, xs.float()))


def test_permute_sinks_below_activations_but_not_batchnorm():
    """Any one-input elementwise op whose only constant is ``other`` commutes with a permute
    (sigmoid, leaky_relu); batchnorm's constants are per channel, so a permute stays above."""
    b = GraphBuilder("float64")
    x = b.input((3, 4, 5))
    h = b.add_node("permute", [x], attrs={"dims": (1, 2, 0)})           # (4, 5, 3)
    h = b.add_node("sigmoid", [h])
    h = b.add_node("leaky_relu", [h], attrs={"negative_slope": 0.2})
    h = b.add_node("batchnorm", [h], params={
        "mean": rng.normal(size=4), "var": rng.random(4) + 0.5, "weight": rng.normal(size=4),
        "bias": rng.normal(size=4)}, attrs={"eps": 1e-5})
    h = b.add_node("flatten", [h], attrs={"start_dim": 0, "end_dim": -1})
    g = b.build(b.add_node("linear", [h], params={"weight": rng.normal(size=(4, 60))}))
    out, log = simplify_permutes(g)
    assert [line.split()[0] for line in log] == ["sank", "sank"]
    assert out.node("permute").inputs == ("leaky_relu",)
    assert out.node("batchnorm").inputs == ("permute",)
    from boundflow.domains.interval import RULES

    if {"sigmoid", "leaky_relu"} <= set(RULES):
        _bounds_equal(g, out, "crown")
