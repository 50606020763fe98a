"""IBP rules: tiny exact cases, soundness by sampling per op, and agreement with an
independent float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import boundflow as bf
from boundflow.domains.interval import Interval, RULES, ibp
from boundflow.domains.traversal import graph_tensors
from boundflow.ir import GraphBuilder, ops
from tests.domains.cases import NEW_OP_BUILDERS, single_op_graph
from tests.helpers import assert_contains, box_points, true_outputs
from tests.reference import reference_ibp


def _bounds(graph, lower, upper, dtype=torch.float64, C=None):
    x = Interval(torch.as_tensor(lower, dtype=dtype), torch.as_tensor(upper, dtype=dtype))
    cm = None if C is None else torch.as_tensor(C, dtype=dtype)
    return ibp(graph, x, graph_tensors(graph, dtype), cm)


def test_linear_relu_by_hand():
    # y1 = x1 - 2 x2 + 1 on x1 in [0,1], x2 in [-1,1] is [-1, 4]; y2 = x1/2 + x2 is [-1, 1.5]
    b = GraphBuilder("float64")
    x = b.input((2,))
    y = b.add_node("linear", [x], params={"weight": [[1.0, -2.0], [0.5, 1.0]], "bias": [1.0, 0]})
    g_lin = b.build(y)
    r = b.add_node("relu", [y])
    g_relu = b.build(r)
    lo, hi = np.array([[0.0, -1.0]]), np.array([[1.0, 1.0]])
    out = _bounds(g_lin, lo, hi)
    assert out.lower.tolist() == [[-1.0, -1.0]] and out.upper.tolist() == [[4.0, 1.5]]
    out = _bounds(g_relu, lo, hi)
    assert out.lower.tolist() == [[0.0, 0.0]] and out.upper.tolist() == [[4.0, 1.5]]


def test_jax_verify_style_linear_case():
    # a linear layer on [z-1, z+1]: 3x + 2 with z = 1 gives exactly [2, 8]; w=-3 flips it
    b = GraphBuilder("float64")
    x = b.input((1,))
    g = b.build(b.add_node("linear", [x], params={"weight": [[3.0], [-3.0]], "bias": [2.0, 2.0]}))
    out = _bounds(g, np.array([[0.0]]), np.array([[2.0]]))
    assert out.lower.tolist() == [[2.0, -4.0]] and out.upper.tolist() == [[8.0, 2.0]]


def test_sub_of_two_intervals_and_spec_by_hand():
    b = GraphBuilder("float64")
    x = b.input((2,))
    a = b.add_node("mul", [x], params={"other": [2.0, -1.0]})       # [2x1, -x2]
    g = b.build(b.add_node("sub", [a, x]))                            # [x1, -2 x2]
    out = _bounds(g, np.array([[1.0, 1.0]]), np.array([[2.0, 3.0]]))
    # x1 in [1,2], x2 in [1,3]: 2x1 - x1 by IBP is [2-2, 4-1] = [0, 3]; -x2 - x2 is [-6, -2]
    assert out.lower.tolist() == [[0.0, -6.0]] and out.upper.tolist() == [[3.0, -2.0]]
    C = np.array([[[1.0, -1.0]]])
    out = _bounds(g, np.array([[1.0, 1.0]]), np.array([[2.0, 3.0]]), C=C)
    assert out.lower.tolist() == [[2.0]] and out.upper.tolist() == [[9.0]]


def _conv(b, x, w):
    return b.add_node("conv2d", [x], params={"weight": w(6, 2, 3, 3), "bias": w(6)},
                      attrs={"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2),
                             "groups": 2})


# one small subgraph per op: name -> (input shape, build(builder, x, random) -> output)
OP_BUILDERS = {
    "linear": ((6,), lambda b, x, w: b.add_node("linear", [x], params={"weight": w(4, 6),
                                                                        "bias": w(4)})),
    "conv2d": ((4, 7, 7), _conv),
    "relu": ((5,), lambda b, x, w: b.add_node("relu", [x])),
    "add": ((2, 3), lambda b, x, w: b.add_node(
        "add", [x, b.add_node("mul", [x], params={"other": w(2, 3)})])),
    "add_const": ((2, 3), lambda b, x, w: b.add_node("add", [x], params={"other": w(3)})),
    "sub": ((4,), lambda b, x, w: b.add_node("sub", [b.add_node("relu", [x]), x])),
    "sub_const": ((4,), lambda b, x, w: b.add_node("sub", [x], params={"other": w(4)})),
    "mul": ((3, 2, 2), lambda b, x, w: b.add_node("mul", [x], params={"other": w(3, 1, 1)})),
    "div": ((3, 2, 2), lambda b, x, w: b.add_node("div", [x],
                                                   params={"other": [[0.5, -2.0]]})),
    "batchnorm": ((3, 2, 2), lambda b, x, w: b.add_node(
        "batchnorm", [x], params={"mean": w(3), "var": np.abs(w(3)) + 0.1, "weight": w(3),
                                  "bias": w(3)}, attrs={"eps": 1e-5})),
    "flatten": ((2, 2, 3), lambda b, x, w: b.add_node(
        "linear", [b.add_node("flatten", [x], attrs={"start_dim": 0, "end_dim": -1})],
        params={"weight": w(3, 12)})),
    "reshape": ((2, 6), lambda b, x, w: b.add_node(
        "linear", [b.add_node("reshape", [x], attrs={"shape": (3, -1)})],
        params={"weight": w(2, 4)})),
    "permute": ((2, 3, 4), lambda b, x, w: b.add_node(
        "linear", [b.add_node("permute", [x], attrs={"dims": (2, 0, 1)})],
        params={"weight": w(2, 3)})),
    "avgpool2d": ((2, 5, 5), lambda b, x, w: b.add_node(
        "avgpool2d", [b.add_node("mul", [x], params={"other": w(2, 5, 5)})],
        attrs={"kernel_size": (3, 2), "stride": (2, 2), "padding": (1, 1)})),
    "identity": ((3,), lambda b, x, w: b.add_node("identity", [x])),
    "concat": ((2, 3), lambda b, x, w: b.add_node(
        "concat", [x, b.add_node("relu", [x]), b.add_node("mul", [x], params={"other": -1.0})],
        attrs={"axis": 0})),
}


def _single_op_graphs(dtype: str):
    """One small graph per op, with random parameters, named by op."""
    rng = np.random.default_rng(1)
    w = lambda *s: rng.standard_normal(s)  # noqa: E731
    cases = {}
    for name, (shape, build) in OP_BUILDERS.items():
        b = GraphBuilder(dtype)
        cases[name] = b.build(build(b, b.input(shape), w))
    return cases


OP_CASES = sorted(_single_op_graphs("float64"))


def test_every_op_has_an_ibp_rule_and_a_case():
    assert set(RULES) == set(ops.names()) - {"input"}
    covered = {name.split("_const")[0] for name in OP_CASES}
    # the ops of issue 15 have their cases (and sampled tests) in test_new_ops.py
    covered |= {single_op_graph(case).output_node.op for case in NEW_OP_BUILDERS}
    assert covered >= set(RULES)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", OP_CASES)
def test_op_sound_by_sampling(case, dtype):
    graph = _single_op_graphs(dtype)[case]
    rng = np.random.default_rng(2)
    centre = rng.standard_normal((2,) + graph.input_shape)
    lower, upper = centre - 0.7, centre + 0.7
    out = _bounds(graph, lower, upper, dtype=getattr(torch, dtype))
    values = true_outputs(_single_op_graphs("float64")[case], box_points(lower, upper))
    assert_contains(out.lower, out.upper, values, tol=1e-9 if dtype == "float64" else 1e-5)


@pytest.mark.parametrize("case", OP_CASES)
def test_op_matches_first_principles_reference(case):
    graph = _single_op_graphs("float64")[case]
    rng = np.random.default_rng(3)
    centre = rng.standard_normal((3,) + graph.input_shape)
    lower, upper = centre - 0.3, centre + 0.5
    out = _bounds(graph, lower, upper)
    ref_lo, ref_hi = reference_ibp(graph, lower, upper)
    np.testing.assert_allclose(out.lower.numpy(), ref_lo, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(out.upper.numpy(), ref_hi, rtol=1e-5, atol=1e-9)
    f32 = _bounds(_single_op_graphs("float32")[case], lower, upper, dtype=torch.float32)
    assert f32.lower.dtype == torch.float32
    np.testing.assert_allclose(f32.lower.numpy(), ref_lo, rtol=1e-4, atol=1e-4)


def test_point_box_gives_the_exact_output():
    ex = bf.GraphBuilder("float64")
    x = ex.input((3,))
    g = ex.build(ex.add_node("relu", [ex.add_node("linear", [x], params={
        "weight": np.arange(6.0).reshape(2, 3) - 2})]))
    p = np.array([[0.3, -1.2, 2.0]])
    out = _bounds(g, p, p)
    assert torch.equal(out.lower, out.upper)
    np.testing.assert_allclose(out.lower.numpy(), true_outputs(g, p[:, None])[:, 0])


@pytest.mark.parametrize("op", ["mul", "div"])
def test_scaling_by_a_constant_nowhere_negative_skips_the_reorder_and_stays_exact(op):
    """A multiplier nowhere negative (an input normalisation's 1 / std) keeps the ends in
    order, so its rule scales them without min/max (graph_tensors marks it); a multiplier of
    mixed sign is never marked, and both bound exactly what sampled points reach."""
    from boundflow.domains.traversal import NONNEG

    rng = np.random.default_rng(3)
    lo = rng.normal(size=(4, 6))
    hi = lo + rng.uniform(0, 2, size=(4, 6))
    for other, marked in ((rng.uniform(0.1, 3, 6), True), (np.r_[0.0, rng.uniform(1, 2, 5)],
                          op == "mul"), (rng.normal(size=6), False)):
        if op == "div" and (other == 0).any():
            continue
        b = GraphBuilder("float64")
        y = b.add_node(op, [b.input((6,))], params={"other": other})
        g = b.build(y)
        tensors = graph_tensors(g, torch.float64)
        assert any(k.endswith(NONNEG[op]) for k in tensors) == marked, other
        out = _bounds(g, lo, hi)
        pts = box_points(lo, hi, n=200)
        assert_contains(out.lower, out.upper, true_outputs(g, pts))
        s = other if op == "mul" else 1 / other
        want_lo, want_hi = np.minimum(lo * s, hi * s), np.maximum(lo * s, hi * s)
        assert np.array_equal(out.lower.numpy(), want_lo) and \
            np.array_equal(out.upper.numpy(), want_hi)
