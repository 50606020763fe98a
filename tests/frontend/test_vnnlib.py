"""VNN-LIB: parsing, errors that name the line, and verdicts that are never wrong."""

from __future__ import annotations

import csv
import gzip
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import boundflow as bf
from boundflow.api import BoundOptions
from boundflow.frontend import files
from boundflow.frontend.onnx import load_onnx
from boundflow.frontend.vnnlib import (MAX_DISJUNCTS, Property, VnnlibError, load_vnnlib,
                                       parse_vnnlib)
from boundflow import vnncomp
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
    (HEADER + "(declare-const X_0 Real)\n" + BOX + "(assert (<= Y_0 Y_1))",
     r"line \d+: X_0 is declared a second time"),
    (HEADER, "no assert"),
    (HEADER + BOX + "(assert (>= Y_0 nan))", r"line 9: 'nan' is not a finite number"),
    (HEADER + BOX + "(assert (>= (+) Y_0))", r"line 9: unsupported term '\(\+ \.\.\.\)'"),
    (HEADER + BOX + "stray", r"line 9: expected a parenthesised command, got 'stray'"),
    (HEADER + BOX + "(assert (<= Y_0))", r"line 9: <= takes two arguments"),
])
def test_malformed_vnnlib_names_line_and_reason(text, match):
    with pytest.raises(VnnlibError, match=match):
        parse_vnnlib(text)


def test_products_with_constants_are_linear():
    prop = parse_vnnlib(HEADER + BOX + "(assert (<= (* 2 (+ Y_0 1)) (- Y_1 (* Y_0 -3) 4)))")
    # 2·y0 + 2 <= y1 + 3·y0 - 4  ->  -y0 - y1 + 6 <= 0: refuted by -y0 - y1 > -6
    np.testing.assert_array_equal(prop.disjuncts[0].C, [[-1, -1]])
    np.testing.assert_array_equal(prop.disjuncts[0].threshold, [-6])


def _timed(text: str) -> tuple[Property, float]:
    """The parsed property and the CPU seconds it took (robust to a busy machine)."""
    start = time.process_time()
    prop = parse_vnnlib(text)
    return prop, time.process_time() - start


def test_64k_single_variable_asserts_parse_within_a_ceiling():
    """The box of a 32k-input property as 64k top-level asserts (2.9 MB): quadratic list
    concatenation made this take 53 s in issue 13 (5.6 s of CPU here); about 1 s now."""
    n = 32_000
    lines = [f"(declare-const X_{i} Real)" for i in range(n)] + \
            ["(declare-const Y_0 Real)", "(declare-const Y_1 Real)"]
    for i in range(n):
        lines += [f"(assert (>= X_{i} {i}))", f"(assert (<= X_{i} {i + 0.5}))"]
    lines.append("(assert (>= Y_0 Y_1))")
    prop, seconds = _timed("\n".join(lines))
    assert seconds < 15, f"64k asserts took {seconds:.1f} s"
    (d,) = prop.disjuncts
    np.testing.assert_array_equal(d.lower, np.arange(n))
    np.testing.assert_array_equal(d.upper, np.arange(n) + 0.5)
    np.testing.assert_array_equal(d.C, [[-1, 1]])


def _robustness_property(n_in: int, n_out: int, n_disjuncts: int) -> str:
    """A box of top-level asserts and one ``or`` over output constraints, the shape of
    VNN-COMP classification-robustness properties."""
    lines = [f"(declare-const X_{i} Real)" for i in range(n_in)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    for i in range(n_in):
        lo = i / n_in
        lines += [f"(assert (>= X_{i} {lo:.6f}))", f"(assert (<= X_{i} {lo + 0.01:.6f}))"]
    alternatives = "\n".join(f"  (and (>= Y_{k % n_out} Y_{(k + 1) % n_out}) (<= Y_0 {k}.5))"
                              for k in range(n_disjuncts))
    lines.append(f"(assert (or\n{alternatives}))")
    return "\n".join(lines)


def test_a_big_or_under_a_shared_box_parses_quickly():
    """784 inputs, 30,000 disjuncts, 1.2 MB: each disjunct used to copy the whole box
    (about 40 s for 5,000 disjuncts); the box is now built once and shared."""
    text = _robustness_property(784, 10, 30_000)
    assert len(text) > 1_000_000
    prop, seconds = _timed(text)
    assert seconds < 15, f"the 1.2 MB property took {seconds:.1f} s"
    assert len(prop.disjuncts) == 30_000
    d = prop.disjuncts[12_345]
    np.testing.assert_allclose(d.lower[[0, 783]], [0, 783 / 784], atol=1e-6)
    # (>= Y_5 Y_6) is y6 - y5 <= 0; (<= Y_0 12345.5) is y0 - 12345.5 <= 0
    np.testing.assert_array_equal(d.C, [np.eye(10)[6] - np.eye(10)[5], np.eye(10)[0]])
    np.testing.assert_array_equal(d.threshold, [0, 12345.5])
    (group,) = prop.groups()
    assert group[1].C.shape == (1, 60_000, 10)


def test_deep_nesting_parses_without_recursion():
    n = 5_000
    nested_and = "(assert " + "(and (>= Y_0 1) " * n + "(<= Y_1 2)" + ")" * n + ")"
    (d,) = parse_vnnlib(HEADER + BOX + nested_and).disjuncts
    assert d.C.shape == (n + 1, 2)
    nested_or = "(assert " + "(or (>= Y_0 1) " * n + "(<= Y_1 2)" + ")" * n + ")"
    assert len(parse_vnnlib(HEADER + BOX + nested_or).disjuncts) == n + 1
    nested_sum = "(assert (>= " + "(+ Y_0 " * n + "1" + ")" * n + " 0))"
    (d,) = parse_vnnlib(HEADER + BOX + nested_sum).disjuncts
    np.testing.assert_array_equal(d.C, [[-n, 0]])
    np.testing.assert_array_equal(d.threshold, [1])


def test_a_dnf_over_max_disjuncts_is_refused_before_it_is_built():
    pairs = "(or (>= Y_0 1) (>= Y_1 1)) " * 20                  # 2**20 disjuncts
    start = time.process_time()
    with pytest.raises(VnnlibError, match=f"more than {MAX_DISJUNCTS} disjuncts"):
        parse_vnnlib(HEADER + BOX + f"(assert (and {pairs}))")
    assert time.process_time() - start < 5
    deep = "(assert " + "(and (or (>= Y_0 1) (>= Y_1 1)) " * 5_000 + "(<= Y_1 2)" + \
        ")" * 5_000 + ")"
    with pytest.raises(VnnlibError, match=r"line 9: the formula expands to more than"):
        parse_vnnlib(HEADER + BOX + deep)


def _nano(name: str):
    return shared_path("benchmarks", "vnncomp_test", name)


def _same_property(a, b) -> None:
    assert (a.n_inputs, a.n_outputs, len(a.disjuncts)) == (b.n_inputs, b.n_outputs,
                                                           len(b.disjuncts))
    for x, y in zip(a.disjuncts, b.disjuncts):
        for field in ("lower", "upper", "C", "threshold"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))


def test_gzipped_vnnlib_reads_like_the_plain_file(tmp_path):
    plain = _nano("test_nano.vnnlib")
    packed = gzip.compress(plain.read_bytes())
    (tmp_path / "p.vnnlib.gz").write_bytes(packed)
    (tmp_path / "no_suffix.vnnlib").write_bytes(packed)     # told apart by the magic bytes
    want = load_vnnlib(plain, 1, 1)
    _same_property(load_vnnlib(tmp_path / "p.vnnlib.gz", 1, 1), want)
    _same_property(load_vnnlib(tmp_path / "no_suffix.vnnlib", 1, 1), want)


def test_corrupt_misnamed_and_oversized_gzip_give_clean_errors(tmp_path, monkeypatch):
    packed = gzip.compress((HEADER + BOX + "(assert (>= Y_0 1))\n" * 200).encode())
    (tmp_path / "cut.vnnlib.gz").write_bytes(packed[:len(packed) // 2])
    (tmp_path / "bad.vnnlib.gz").write_bytes(packed[:10] + b"\xff" * 40)
    (tmp_path / "plain.vnnlib.gz").write_text(HEADER + BOX)
    (tmp_path / "bomb.vnnlib.gz").write_bytes(packed)
    for name, match in [("cut", "corrupt or truncated gzip"), ("bad", "corrupt or truncated"),
                        ("plain", "not gzip data"), ("missing", "cannot read")]:
        with pytest.raises(VnnlibError, match=match) as info:
            load_vnnlib(tmp_path / f"{name}.vnnlib.gz")
        assert str(info.value).startswith(str(tmp_path / f"{name}.vnnlib.gz"))
        assert "\n" not in str(info.value)
    monkeypatch.setattr(files, "MAX_DECOMPRESSED_BYTES", 1000)
    with pytest.raises(VnnlibError, match="decompresses to more than 1,000 bytes"):
        load_vnnlib(tmp_path / "bomb.vnnlib.gz")


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


@pytest.mark.parametrize("unsafe", ["(assert (< Y_0 0))", "(assert (> Y_1 1))",
                                    "(assert (< Y_0 (- Y_1 1)))"])
def test_equality_meets_no_strict_comparison(identity_relu, unsafe):
    """y = relu(x) on [0, 1]^2 meets y0 <= 0, y1 >= 1 and y0 <= y1 - 1 (at x = (0, 1)) but
    never y0 < 0, y1 > 1 or y0 < y1 - 1: read as non-strict, the falsifier's boundary
    point was answered sat, a wrong verdict. The strict row's threshold is the float64 just
    below the non-strict one's."""
    graph = load_onnx(identity_relu)
    loose_text = unsafe.replace("(< ", "(<= ").replace("(> ", "(>= ")
    loose = parse_vnnlib(HEADER + BOX + loose_text, 2, 2)
    strict = parse_vnnlib(HEADER + BOX + unsafe, 2, 2)
    (d_loose,), (d_strict,) = loose.disjuncts, strict.disjuncts
    assert np.array_equal(d_strict.C, d_loose.C)
    assert d_strict.threshold[0] == np.nextafter(d_loose.threshold[0], -np.inf)
    confirm = onnx_runner(identity_relu)
    assert check_property(graph, loose, BoundOptions("crown"), confirm=confirm,
                          timeout=5.0).status == "sat"
    result = check_property(graph, strict, BoundOptions("crown"), timeout=2.0,
                            confirm=confirm)
    assert result.status != "sat", result


def test_a_counterexample_on_a_strict_input_bound_is_moved_inside_or_dropped(identity_relu,
                                                                          monkeypatch):
    """y = relu(x): ``X_0 < 1`` with ``y0 >= 1`` holds only at x0 = 1, which the strict
    bound excludes: the falsifier's point x0 = 1 (clipped to the closed box) was answered
    sat. Where one float64 step inside still violates (``y0 >= 0.5``), that point is the
    answer."""
    graph = load_onnx(identity_relu)
    box = ("(assert (>= X_0 0))\n(assert (< X_0 1))\n(assert (>= X_1 0))\n"
           "(assert (<= X_1 1))\n")
    prop = parse_vnnlib(HEADER + box + "(assert (>= Y_0 1))", 2, 2)
    assert prop.strict_bounds == ((0, True, 1.0),)
    confirm = onnx_runner(identity_relu)
    closed = parse_vnnlib(HEADER + BOX + "(assert (>= Y_0 1))", 2, 2)
    assert check_property(graph, closed, BoundOptions("crown"), confirm=confirm,
                          timeout=5.0).status == "sat"
    result = check_property(graph, prop, BoundOptions("crown"), confirm=confirm, timeout=2.0)
    assert result.status != "sat", result
    # satisfiable inside: a sat answer, its input strictly below 1
    inside = parse_vnnlib(HEADER + box + "(assert (>= Y_0 0.5))", 2, 2)
    result = check_property(graph, inside, BoundOptions("crown"), confirm=confirm,
                            timeout=5.0)
    assert result.status == "sat" and result.counterexample[0][0] < 1.0
    assert inside.admits(*result.counterexample)
    assert not prop.admits(np.array([1.0, 0.5]), np.array([1.0, 0.5]))
    # a point below 1 in float64 that the float32 model reads as 1 is no answer either
    near_one = vnncomp.PropertyResult("sat", (np.array([1.0 - 2.0 ** -30, 0.5]),
                                              np.array([1.0, 0.5])))
    monkeypatch.setattr(vnncomp, "_decide", lambda *args: near_one)
    assert check_property(graph, prop, confirm=confirm).status == "unknown"
    assert prop.strictly_inside(np.array([1.0, 0.5]))[0] == np.nextafter(1.0, 0.0)
    assert prop.strictly_inside(np.array([1.0, 0.5]), np.float32)[0] == \
        np.nextafter(np.float32(1.0), np.float32(0.0))
    tenth = parse_vnnlib(HEADER + BOX + "(assert (> X_1 0.1))\n(assert (<= Y_0 Y_1))", 2, 2)
    x1 = tenth.strictly_inside(np.array([0.5, 0.1]), np.float32)[1]
    assert x1 > 0.1 and np.float32(x1) == x1 and np.nextafter(np.float32(x1), 0) <= 0.1


@pytest.mark.parametrize("atom, holds", [("(< 1 2)", True), ("(< 1 1)", False),
                                         ("(<= 1 1)", True), ("(> 1 1)", False)])
def test_a_constant_strict_atom_is_strict(atom, holds):
    prop = parse_vnnlib(HEADER + BOX + f"(assert (<= Y_0 Y_1))\n(assert {atom})", 2, 2)
    assert prop.disjuncts[0].empty_box is not holds


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
