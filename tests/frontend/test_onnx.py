"""The ONNX frontend: models exported from the torch examples give the same bounds as the
torch path; the benchmark models compute what ONNX's reference runtime computes."""

from __future__ import annotations

import gzip
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import boundflow as bf
import boundflow.examples as examples
from boundflow.api import as_graph
from boundflow.domains.concrete import evaluate
from boundflow.frontend.onnx import from_onnx, load_onnx
from tests.conftest import shared_path


def _export(module: torch.nn.Module, x: np.ndarray) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.from_numpy(x[:1]),), buf, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def _module(name: str) -> torch.nn.Module:
    ex = examples.load(name)
    return ex.model if isinstance(ex.model, torch.nn.Module) else examples.digits_module(name)


@pytest.mark.parametrize("name", sorted(examples.EXAMPLES))
def test_onnx_export_of_each_example_gives_the_torch_bounds(name):
    ex = examples.load(name)
    from_torch = as_graph(ex.model, torch.from_numpy(ex.inputs[:1]))
    from_onnx_graph = from_onnx(_export(_module(name), ex.inputs))
    for method in ("ibp", "crown-ibp", "crown"):
        a = bf.compute_bounds(from_onnx_graph, ex.inputs[:2], eps=0.02, method=method)
        b = bf.compute_bounds(from_torch, ex.inputs[:2], eps=0.02, method=method)
        torch.testing.assert_close(a.lower, b.lower, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.upper, b.upper, rtol=1e-5, atol=1e-5)


BENCHMARK_MODELS = ["vnncomp_test/test_nano.onnx", "vnncomp_test/test_tiny.onnx",
                    "vnncomp_test/test_small.onnx", "vnncomp_test/test_sat.onnx",
                    "acasxu/onnx/ACASXU_run2a_1_1_batch_2000.onnx"]


@pytest.mark.parametrize("rel", BENCHMARK_MODELS)
def test_benchmark_models_compute_what_onnx_computes(rel):
    from onnx.reference import ReferenceEvaluator

    path = shared_path("benchmarks", rel)
    graph = load_onnx(path)
    model = onnx.load(str(path))
    sess = ReferenceEvaluator(model)
    inits = {t.name for t in model.graph.initializer}
    (inp,) = [i for i in model.graph.input if i.name not in inits]
    name = inp.name
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.standard_normal(shape).astype(np.float32)
        (want, *_) = sess.run(None, {name: x})
        got = evaluate(graph, torch.from_numpy(x.reshape((1,) + graph.input_shape)))
        np.testing.assert_allclose(got.numpy().reshape(-1), np.asarray(want).reshape(-1),
                                   rtol=1e-5, atol=1e-5)


def _model(nodes, inits, in_shape=(1, 2), out_shape=(1, 2), opsets=(("", 13),)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                                     list(in_shape))],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT,
                                                         list(out_shape))], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def test_unsupported_op_names_op_and_node(tmp_path):
    m = _model([helper.make_node("Erf", ["X"], ["Y"], name="squash")], [])
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    with pytest.raises(bf.UnsupportedOpError, match=r"'Erf' at node 'squash'"):
        load_onnx(path)


def test_not_onnx_and_missing_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x00garbage that is not a protobuf \xff" * 10)
    with pytest.raises(bf.ModelLoadError, match="not a readable ONNX model|no nodes"):
        load_onnx(path)
    with pytest.raises(bf.ModelLoadError, match="does not exist"):
        load_onnx(tmp_path / "nope.onnx")


def test_gemm_with_transb_alpha_and_bias():
    w = helper.make_tensor("W", TensorProto.FLOAT, [3, 2], [1, 2, 3, 4, 5, 6])
    b = helper.make_tensor("B", TensorProto.FLOAT, [3], [0.5, -0.5, 1])
    nodes = [helper.make_node("Gemm", ["X", "W", "B"], ["H"], transB=1, alpha=2.0),
             helper.make_node("Relu", ["H"], ["Y"])]
    graph = from_onnx(_model(nodes, [w, b], out_shape=(1, 3)))
    y = evaluate(graph, torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    # 2·W·x + B, then relu: W·(1,1) = (3,7,11); W·(1,-1) = (-1,-1,-1)
    np.testing.assert_allclose(y.numpy(), [[6.5, 13.5, 23.0], [0.0, 0.0, 0.0]])


def _ints(name, values):
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _floats(name, shape):
    return helper.make_tensor(name, TensorProto.FLOAT, list(shape),
                              [0.5] * int(np.prod(shape)))


_node = helper.make_node
_IMAGE = {"in_shape": (1, 1, 4, 4), "out_shape": (1, 1, 2, 2)}
MALFORMED = {   # name: (nodes, initializers, _model keywords, error, message)
    "undefined input": ([_node("Relu", ["nope"], ["Y"], name="r")], [], {}, bf.GraphError,
                        r"input 'nope' is not defined by an initializer, the graph input or "
                        r"an earlier node .* at node 'r' \(Relu\)"),
    "Concat without axis": ([_node("Concat", ["X", "X"], ["Y"], name="cat")], [], {},
                            bf.GraphError, r"required attribute 'axis' is missing at node 'cat'"),
    "Concat axis out of range": ([_node("Concat", ["X", "X"], ["Y"], name="cat", axis=3)], [],
                                 {}, bf.ShapeError, r"axis 3 is out of range for a tensor of "
                                                    r"rank 2 at node 'cat'"),
    "AveragePool without kernel_shape": ([_node("AveragePool", ["X"], ["Y"], name="pool")], [],
                                         _IMAGE, bf.GraphError,
                                         r"required attribute 'kernel_shape' is missing"),
    "Reshape to the wrong size": ([_node("Reshape", ["X", "s"], ["Y"], name="rs")],
                                  [_ints("s", [1, 3])], {}, bf.ShapeError,
                                  r"Reshape to \[1, 3\] does not fit the 2 elements of shape "
                                  r"\[1, 2\] at node 'rs'"),
    "Reshape with two -1": ([_node("Reshape", ["X", "s"], ["Y"], name="rs")],
                            [_ints("s", [-1, -1])], {}, bf.ShapeError,
                            r"Reshape to \[-1, -1\] is invalid: give at most one -1"),
    "folded Reshape to the wrong size": ([_node("Reshape", ["W", "s"], ["V"], name="rs"),
                                          _node("Add", ["X", "V"], ["Y"])],
                                         [_floats("W", [2]), _ints("s", [3])], {},
                                         bf.ShapeError, r"Reshape to \[3\] does not fit the 2 "
                                                        r"elements of shape \[2\]"),
    "opset 99": ([_node("Relu", ["X"], ["Y"])], [], {"opsets": [("", 99)]},
                 bf.ModelLoadError, r"imports ONNX opset 99, newer than opset \d+, the newest "
                                    r"the installed onnx"),
    "unknown domain": ([_node("Relu", ["X"], ["Y"], name="r", domain="com.example")], [],
                       {"opsets": [("", 13), ("com.example", 3)]}, bf.UnsupportedOpError,
                       r"domain 'com.example' \(opset 3\) is not supported"),
    "Gemm with one input": ([_node("Gemm", ["X"], ["Y"], name="g")], [], {}, bf.GraphError,
                            r"Gemm takes 2 to 3 inputs, got 1 at node 'g'"),
    "Transpose perm not a permutation": ([_node("Transpose", ["X"], ["Y"], perm=[1, 1])], [],
                                         {}, bf.ShapeError, r"perm=\[1, 1\] is not a permutation"),
    "folded Gather out of range": ([_node("Gather", ["W", "i"], ["V"], name="ga"),
                                    _node("Add", ["X", "V"], ["Y"])],
                                   [_floats("W", [2]), _ints("i", [5])], {}, bf.GraphError,
                                   r"cannot convert: index 5 is out of bounds .* at node 'ga'"),
    "a value defined twice": ([_node("Relu", ["X"], ["Y"]), _node("Relu", ["X"], ["Y"])], [],
                              {}, bf.GraphError, r"output 'Y' is already defined"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_models_give_one_clean_error(case, tmp_path):
    nodes, inits, kw, error, match = MALFORMED[case]
    model = _model(nodes, inits, **kw)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    for load in (lambda: from_onnx(model), lambda: load_onnx(path)):
        with pytest.raises(error, match=match) as info:
            load()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("target, in_shape", [([0, -1], (1, 2, 3)), ([-1, 6], (1, 2, 3)),
                                              ([1, 3, -1], (1, 6)), ([6], (6,))])
def test_reshape_targets_with_0_and_minus_1_still_convert(target, in_shape):
    nodes = [helper.make_node("Reshape", ["X", "s"], ["Y"])]
    out_shape = [1, 6] if target != [1, 3, -1] else [1, 3, 2]
    graph = from_onnx(_model(nodes, [_ints("s", target)], in_shape,
                             out_shape if len(in_shape) > 1 else [6]))
    x = np.arange(12.0).reshape((2,) + in_shape[1:]) if len(in_shape) > 1 else np.arange(6.0)
    got = evaluate(graph, torch.from_numpy(x.reshape((-1,) + graph.input_shape)).float())
    np.testing.assert_array_equal(got.numpy().reshape(-1), x.reshape(-1))


def test_gzipped_onnx_loads_like_the_plain_file(tmp_path):
    plain = shared_path("benchmarks", "vnncomp_test", "test_nano.onnx")
    packed = gzip.compress(plain.read_bytes())
    (tmp_path / "nano.onnx.gz").write_bytes(packed)
    (tmp_path / "nano.onnx").write_bytes(packed)                # told apart by the magic bytes
    want = load_onnx(plain)
    for name in ("nano.onnx.gz", "nano.onnx"):
        got = load_onnx(tmp_path / name)
        assert got.structural_hash() == want.structural_hash()
        assert got.weights_hash() == want.weights_hash()


def test_corrupt_and_misnamed_gzip_models_give_clean_errors(tmp_path):
    m = _model([helper.make_node("Relu", ["X"], ["Y"])], [])
    packed = gzip.compress(m.SerializeToString())
    (tmp_path / "cut.onnx.gz").write_bytes(packed[:len(packed) - 12])
    (tmp_path / "plain.onnx.gz").write_bytes(m.SerializeToString())
    for name, match in [("cut", "corrupt or truncated gzip data"), ("plain", "not gzip data")]:
        with pytest.raises(bf.ModelLoadError, match=match) as info:
            load_onnx(tmp_path / f"{name}.onnx.gz")
        assert str(info.value).startswith(str(tmp_path / f"{name}.onnx.gz"))
