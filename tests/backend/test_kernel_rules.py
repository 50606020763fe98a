"""The Relax backend's rule-based kernels: packed weights, register-tiled schedules by default,
a padded batch, the ``auto`` lowering's cost rule, and the compile flags they rely on."""

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import te, tirx  # noqa: E402

from boundflow.backend.relax.cache import CompileCache  # noqa: E402
from boundflow.backend.relax.executor import RelaxExecutor, _no_alias, build_module  # noqa: E402
from boundflow.backend.relax.kernels import PANEL, param_shape, param_tensor  # noqa: E402
from boundflow.backend.relax.schedules import schedule  # noqa: E402
from boundflow.backend.relax.target import host_cpu, tvm_target, vector_lanes  # noqa: E402
from boundflow.backend.torch import TorchExecutor  # noqa: E402
from boundflow.ir.spec import InputSpec, margin_spec  # noqa: E402
from boundflow.ir.workload import Workload  # noqa: E402
from boundflow.planner import default, normalised, plan  # noqa: E402
from tests.helpers import example_graph  # noqa: E402


class _Params:
    def __init__(self, params):
        self.params = params


@pytest.mark.parametrize("rows, cols", [(5, 7), (3, 16), (4, 37)])
def test_packed_weights_hold_the_same_elements(rows, cols):
    w = np.random.default_rng(rows * cols).standard_normal((rows, cols)).astype(np.float32)
    name = "head.weight|folded"                  # a normalised name holds "|" itself
    graph, tensors = _Params({name: w}), {name: torch.from_numpy(w)}
    for key, want in ((name, w), (name + "|abs", np.abs(w)), (name + "|T", w.T),
                      (name + "|abs|T", np.abs(w.T))):
        got = param_tensor(tensors, key).numpy()
        assert got.shape == param_shape(graph, key)
        np.testing.assert_array_equal(got, want)
        panel = param_tensor(tensors, key + "|P").numpy()
        assert panel.shape == param_shape(graph, key + "|P")
        r, c = want.shape
        assert panel.shape == (-(-c // PANEL), r, PANEL)
        for j in range(panel.shape[0] * PANEL):
            column = panel[j // PANEL, :, j % PANEL]
            np.testing.assert_array_equal(column, want[:, j] if j < c else 0.0)


def _linear_func(n_in=64, n_out=48, dtype="float32"):
    n = tirx.Var("n", "int64")
    a = te.placeholder((n, n_in), dtype, name="a")
    w = te.placeholder((n_in, n_out), dtype, name="w")
    k = te.reduce_axis((0, n_in), name="k")
    out = te.compute((n, n_out), lambda b, o: te.sum(a[b, k] * w[k, o], axis=k), name="out")
    return te.create_prim_func([a, w, out], index_dtype_override="int64")


def test_default_schedule_register_tiles_and_vectorises_reductions():
    target = tvm_target("llvm")
    text = schedule(_linear_func(), {}, target).script()
    lanes = vector_lanes(target)
    assert 48 % lanes == 0 or lanes > 48
    assert '"local"' in text                         # an accumulator tile
    assert "T.vectorized" in text and "T.unroll" in text
    assert f"T.vectorized(T.int64({min(lanes, 48)}))" in text
    off = schedule(_linear_func(), {"tile": 0}, target).script()
    assert '"local"' not in off and "T.vectorized" not in off


def test_llvm_means_this_cpu_unless_mcpu_is_named():
    assert str(tvm_target("llvm").attrs["mcpu"]) == host_cpu()
    assert str(tvm_target("llvm -mcpu=x86-64").attrs["mcpu"]) == "x86-64"
    assert vector_lanes(tvm_target("llvm -mcpu=x86-64")) == 4
    assert vector_lanes(tvm_target("llvm -mcpu=x86-64"), "float64") == 2
    assert CompileCache.key("p", tvm_target("llvm")) != \
        CompileCache.key("p", tvm_target("llvm -mcpu=x86-64"))


def test_every_kernel_is_compiled_noalias():
    f = _linear_func().without_attr("tirx.noalias")
    mod = _no_alias(tvm.IRModule({"main": f}))
    assert bool(mod["main"].attrs["tirx.noalias"])


@pytest.mark.parametrize("batch", [1, 2, 5, 7])
def test_a_padded_batch_gives_the_torch_backends_bounds(batch):
    ex, g = example_graph("digits_mlp")
    x = InputSpec.linf(np.resize(ex.inputs, (batch,) + ex.inputs.shape[1:]).astype(np.float32),
                       0.05)
    C = margin_spec(np.arange(batch) % 10, 10)
    for method in ("ibp", "crown"):
        w = Workload.of(g, batch=batch, method=method)
        bundle = plan(g, w)
        out, ref = RelaxExecutor(bundle, g).run(x, C), TorchExecutor(bundle, g).run(x, C)
        scale = max(1.0, float(ref.upper.abs().max()))
        torch.testing.assert_close(out.lower, ref.lower, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(out.upper, ref.upper, rtol=1e-5, atol=1e-5 * scale)


def _lowerings(name, method, **changes):
    _, g = example_graph(name)
    w = Workload.of(g, batch=2, method=method)
    bundle = plan(g, w, default(g, w).replace(**changes))
    tasks = {t.name: t for t in bundle.task_graph.tasks}
    return [(tasks[t], low) for t, low, _ in bundle.lowering_plan.tasks], normalised(g)[0]


def test_auto_lowering_sends_convolution_work_to_aten_and_the_rest_to_tir():
    mlp, _ = _lowerings("digits_mlp", "crown")
    assert {low for _, low in mlp} == {"tir"}
    cnn, g = _lowerings("digits_cnn", "crown")
    op = {n.name: n.op for n in g.nodes}
    for task, low in cnn:
        if task.kind in ("crown", "final"):        # every walk back to the input crosses a conv
            assert low == "torch", task.name
        elif task.kind == "ibp":
            holds_conv = any(op[n] == "conv2d" for n in task.nodes)
            assert low == ("torch" if holds_conv else "tir"), task.name
    assert {low for _, low in cnn} == {"torch", "tir"}
    forced, _ = _lowerings("digits_cnn", "crown", lowering="tir")
    assert {low for _, low in forced} == {"tir"}
