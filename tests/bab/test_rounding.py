"""Verdicts never rest on rounding: a bound computed in float32 rounds to nearest, so a spec
counts as proven only by a margin above a few units in the last place, and a property one
of whose disjuncts constrains no output is violated by any point of its box."""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from boundflow.bab.common import Disjuncts
from boundflow.frontend.onnx import from_onnx
from boundflow.frontend.vnnlib import parse_vnnlib
from boundflow.ir.spec import proof_margin, proven
from boundflow.vnncomp import check_property

HEAD = "".join(f"(declare-const {v} Real)\n" for v in ("X_0", "X_1", "Y_0", "Y_1"))
BOX = ("(assert (>= X_0 -0.7))\n(assert (<= X_0 0.9))\n(assert (>= X_1 -0.3))\n"
       "(assert (<= X_1 0.6))\n")


def _mlp(seed: int):
    """A float32 2-6-2 ReLU net (ONNX Gemm layers, as exported)."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(size=(6, 2)), rng.normal(size=6) * 0.5
    w2, b2 = rng.normal(size=(2, 6)), rng.normal(size=2)
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n)
             for a, n in ((w1, "W1"), (b1, "b1"), (w2, "W2"), (b2, "b2"))]
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
    return from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def test_a_proof_needs_a_margin_above_rounding():
    for lower, threshold, want in [(1.3e-7, 0.0, False), (1e-4, 0.0, True),
                                   (1.0 + 1e-6, 1.0, False), (1.0 + 1e-4, 1.0, True),
                                   (-5.0, -5.0 - 1e-3, True), (0.0, 0.0, False)]:
        assert bool(proven(np.float32([lower]), np.float64([threshold]))[0]) is want
        assert bool(proven(torch.tensor([lower]), torch.tensor([threshold]))[0]) is want
    # float64 bounds round 2^29 times finer
    assert proven(torch.tensor([1.3e-7], dtype=torch.float64), 0.0).all()
    assert proven(np.float64([1e-12]), 0.0).all()
    spec = Disjuncts(np.eye(2), np.zeros(2), [(0, 1), (1, 2)], torch.float32)
    margins = spec.margins(torch.tensor([[1.3e-7, 1.0]]))
    assert margins[0, 0] <= 0 < margins[0, 1]
    assert torch.allclose(margins, proof_margin(torch.tensor([[1.3e-7, 1.0]]), spec.thr))


def test_a_counterexample_by_1e7_is_never_answered_unsat():
    """The net of seed 2 reaches 1e-7 below the threshold at a corner of the box (an exact
    LP over its activation patterns says so), where the model run in float32 (as the ONNX
    runtime confirms a counterexample) misses it. CROWN in float32 bounded the corner's
    boxes 1.3e-7 above the threshold: unsat, wrongly, before proofs needed a margin."""
    graph = _mlp(2)
    prop = parse_vnnlib(HEAD + BOX + "(assert (<= (- Y_0 Y_1) -0.9986083658626522))\n", 2, 2)

    def in_float32(x):
        return graph_output32(graph, x)
    result = check_property(graph, prop, timeout=3.0, confirm=in_float32)
    assert result.status in ("sat", "timeout", "unknown")
    if result.status == "sat":                      # then a real one, in float64
        x, _ = result.counterexample
        y = graph_output(graph, x)
        assert y[0] - y[1] <= -0.9986083658626522


def graph_output32(graph, x):
    from boundflow.domains.concrete import evaluate

    x = torch.as_tensor(np.asarray(x, np.float32)).reshape(1, 2)
    return evaluate(graph, x)[0].double().numpy()


def graph_output(graph, x):
    from boundflow.domains.concrete import evaluate

    return evaluate(graph, torch.as_tensor(np.asarray(x, np.float64)).reshape(1, 2))[0].numpy()


def test_a_disjunct_without_output_constraints_is_violated_anywhere_in_its_box():
    graph = _mlp(0)
    prop = parse_vnnlib(HEAD + BOX + "(assert (or (<= Y_0 -100) (and (>= X_0 -1))))\n", 2, 2)
    result = check_property(graph, prop, timeout=10.0)
    assert result.status == "sat"
    x, _ = result.counterexample
    assert -0.7 <= x[0] <= 0.9 and -0.3 <= x[1] <= 0.6


def test_every_proof_check_takes_the_margin():
    """beta-CROWN's early stop, and the tuner's verified fraction, read proofs as verdicts
    do: a bound 1.3e-7 above its threshold in float32 proves nothing."""
    from boundflow.ir.split import ReluSplit
    from boundflow.measure.result import tightness

    split = ReluSplit({}, goal=(torch.zeros(2), ((0, 1), (1, 2))))
    assert not split.proven(torch.tensor([[1.3e-7, 1.0]]))
    assert split.proven(torch.tensor([[1e-4, 1.0]]))
    assert tightness(np.float32([[1.3e-7], [1e-4]]), np.ones((2, 1)), True)[
        "verified_fraction"] == 0.5


def test_a_nan_bound_proves_nothing():
    """A bound that came out NaN leaves its box open (NaN compares false either way): the
    search ends by its limits, never with unsat."""
    from boundflow.bab import BabConfig, input_split

    graph = _mlp(1)

    class NaNBounder:
        dtype, calls, graph_ = torch.float32, 0, graph

        def __call__(self, lo, hi):
            return torch.full((lo.shape[0], 1), float("nan"))

    result = input_split(graph, np.array([-0.7, -0.3]), np.array([0.9, 0.6]),
                         np.array([[1.0, -1.0]]), np.array([-100.0]), [(0, 1)],
                         BabConfig(max_domains=200), bounder=NaNBounder())
    assert result.status in ("unknown", "timeout")
