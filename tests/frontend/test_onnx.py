"""The ONNX frontend: models exported from the torch examples give the same bounds as the
torch path; the benchmark models compute what ONNX's reference runtime computes."""

from __future__ import annotations

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


def _model(nodes, inits, in_shape=(1, 2), out_shape=(1, 2)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                                     list(in_shape))],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT,
                                                         list(out_shape))], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_unsupported_op_names_op_and_node(tmp_path):
    m = _model([helper.make_node("Sigmoid", ["X"], ["Y"], name="squash")], [])
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    with pytest.raises(bf.UnsupportedOpError, match=r"'Sigmoid' at node 'squash'"):
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
