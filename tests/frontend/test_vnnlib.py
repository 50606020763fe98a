"""VNN-LIB: parsing, errors that name the line, and verdicts that are never wrong."""

from __future__ import annotations

import csv

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import boundflow as bf
from boundflow.api import BoundOptions
from boundflow.frontend.onnx import load_onnx
from boundflow.frontend.vnnlib import VnnlibError, parse_vnnlib
from boundflow.vnncomp import check_property, onnx_runner
from tests.conftest import shared_path

HEADER = "(declare-const X_0 Real)\n(declare-const X_1 Real)\n" \
         "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
BOX = "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n"


def test_parse_box_and_constraints():
    prop = parse_vnnlib(HEADER + BOX + "(assert (<= Y_0 Y_1))\n(assert (>= Y_0 0.5))")
    (d,) = prop.disjuncts
    np.testing.assert_array_equal(d.lower, [0, 0])
    np.testing.assert_array_equal(d.upper, [1, 1])
    # unsafe: y0 - y1 <= 0 and 0.5 - y0 <= 0; refuted by y0 - y1 > 0 or -y0 > -0.5
    np.testing.assert_array_equal(d.C, [[1, -1], [-1, 0]])
    np.testing.assert_array_equal(d.threshold, [0, -0.5])


def test_disjunctions_expand_to_dnf():
    text = HEADER + BOX + "(assert (or (and (>= Y_0 2)) (and (>= Y_1 3) (<= Y_0 (+ Y_1 1)))))"
    prop = parse_vnnlib(text)
    assert len(prop.disjuncts) == 2
    assert [len(d.C) for d in prop.disjuncts] == [1, 2]
    inputs_in_or = HEADER + "(assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) " \
        "(>= Y_0 1)) (and (>= X_0 2) (<= X_0 3) (>= X_1 0) (<= X_1 1) (>= Y_0 1))))"
    assert len(parse_vnnlib(inputs_in_or).groups()) == 2


@pytest.mark.parametrize("text, match", [
    (HEADER + BOX + "(assert (<= Y_0 Y_1)", r"line 9: '\(' is never closed"),
    (HEADER + BOX + "(assert (<= Y_0 Y_1)))", r"line 9: unbalanced"),
    (HEADER + BOX + "(assert (<= Y_0 Z_1))", r"line 9: 'Z_1' is neither"),
    (HEADER + BOX + "(assert (<= (* Y_0 Y_1) 1))", r"line 9: product of two variables"),
    (HEADER + "(assert (>= X_0 0))\n(assert (<= Y_0 1))", "lower and an upper bound"),
    (HEADER + BOX + "(assert (<= X_0 Y_1))", r"line 9: a constraint mixing inputs"),
    (HEADER + BOX + "(assert (xor (<= Y_0 1)))", r"line 9: unsupported connective"),
    ("(declare-const X_0 Int)", "line 1: X_0 has sort Int"),
    ("(declare-const A Real)", "must be named X_i or Y_j"),
    (HEADER, "no assert"),
])
def test_malformed_vnnlib_names_line_and_reason(text, match):
    with pytest.raises(VnnlibError, match=match):
        parse_vnnlib(text)


def test_size_mismatch_with_the_model():
    with pytest.raises(VnnlibError, match="declares 2 inputs but the model takes 5"):
        parse_vnnlib(HEADER + BOX + "(assert (<= Y_0 Y_1))", n_inputs=5, n_outputs=2)


@pytest.fixture(scope="module")
def identity_relu(tmp_path_factory):
    """y = relu(x) on two inputs, as an ONNX file."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [2, 2], [1, 0, 0, 1])
    nodes = [helper.make_node("MatMul", ["X", "W"], ["H"]), helper.make_node("Relu", ["H"], ["Y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                                     [1, 2])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2])], [w])
    path = tmp_path_factory.mktemp("onnx") / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize("unsafe, expected", [
    ("(assert (>= Y_0 2))", "unsat"),                                   # holds: y0 <= 1
    ("(assert (or (and (>= Y_0 2)) (and (>= Y_1 3))))", "unsat"),
    ("(assert (>= Y_0 0.5))\n(assert (<= Y_1 0.5))", "sat"),           # x = (0.8, 0.2)
    ("(assert (<= Y_0 -0.1))", "unsat"),                                # relu >= 0
])
def test_hand_written_properties_with_known_answers(identity_relu, unsafe, expected):
    graph = load_onnx(identity_relu)
    prop = parse_vnnlib(HEADER + BOX + unsafe, 2, 2)
    for method in ("ibp", "crown", "alpha-crown"):
        result = check_property(graph, prop, BoundOptions(method),
                                confirm=onnx_runner(identity_relu))
        assert result.status == expected, (method, result)
        if expected == "sat":
            x, y = result.counterexample
            assert np.all((0 <= x) & (x <= 1)) and y[0] >= 0.5 and y[1] <= 0.5
            assert result.vnncomp().startswith("sat\n((X_0 ")


def _instances():
    try:
        path = shared_path("benchmarks", "instances.csv")
    except pytest.skip.Exception:
        return []
    with open(path) as f:
        return [(r["onnx"], r["vnnlib"], r["expected"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("method", ["ibp", "crown", "alpha-crown"])
def test_benchmark_verdicts_are_never_wrong(method):
    base = shared_path("benchmarks")
    solved = 0
    for onnx_rel, vnn_rel, expected in _instances():
        graph = load_onnx(base / onnx_rel)
        n_in, n_out = int(np.prod(graph.input_shape)), int(np.prod(graph.output_shape))
        prop = bf.frontend.vnnlib.load_vnnlib(base / vnn_rel, n_in, n_out)
        result = check_property(graph, prop, BoundOptions(method, alpha=bf.AlphaConfig(10)),
                                timeout=60, confirm=onnx_runner(base / onnx_rel))
        assert result.status in (expected, "unknown", "timeout"), (onnx_rel, vnn_rel, result)
        solved += result.status == expected
        if onnx_rel.startswith("vnncomp_test/") and method != "ibp":
            assert result.status == expected, (onnx_rel, vnn_rel, result.status)
    assert solved >= 1
