"""The Relax backend's rule-based kernels: packed weights, register-tiled schedules by default,
a padded batch, the ``auto`` lowering's cost rule, and the compile flags they rely on."""

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import te, tirx  # noqa: E402

from boundflow.backend.relax.coverage import patch_walk  # noqa: E402
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
    # at least a cache line of float32 columns: 16 (48 divides by it) where the lanes are fewer
    assert f"T.vectorized(T.int64({min(max(lanes, 16), 48)}))" in text
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


def test_auto_lowering_sends_dense_backward_walks_through_convolutions_to_aten_the_rest_to_tir():
    mlp, _ = _lowerings("digits_mlp", "crown")
    assert {low for _, low in mlp} == {"tir"}
    cnn, g = _lowerings("digits_cnn", "crown")
    op = {n.name: n.op for n in g.nodes}
    kinds = set()
    for task, low in cnn:
        if task.kind in ("crown", "final"):        # every walk back to the input crosses a conv
            window = task.kind == "crown" and patch_walk(g, task.nodes[0])
            kinds.add(window)
            assert low == ("tir" if window else "torch"), task.name   # window form in TIR
        elif task.kind == "ibp":                   # blocked direct convolutions in TIR
            assert low == "tir", task.name
    assert kinds == {True, False}                  # a conv's crown task; the head and final
    assert any(op[n] == "conv2d" for t, _ in cnn if t.kind == "ibp" for n in t.nodes)
    assert {low for _, low in cnn} == {"torch", "tir"}
    forced, _ = _lowerings("digits_cnn", "crown", lowering="tir")
    assert {low for _, low in forced} == {"tir"}


def _mlp(n_in: int):
    from boundflow.ir import GraphBuilder

    rng = np.random.default_rng(n_in)
    b = GraphBuilder()
    h = b.input((n_in,))
    for width in (8, 8):
        h = b.add_node("relu", [b.add_node("linear", [h], params={
            "weight": rng.standard_normal((width, b.shape(h)[0])), "bias": np.zeros(width)})])
    return b.build(b.add_node("linear", [h], params={"weight": rng.standard_normal((3, 8))}))


def test_auto_lowering_sends_input_splittings_backward_walks_to_torch():
    """A network of at most 16 inputs bounded in batches of 32 or more (input splitting's
    boxes, most ReLUs stable) has its ``crown`` tasks as torch ops (they bound only the rows
    that can change; TIR every row); IBP and the final bound stay in TIR. Fewer boxes, or more
    inputs: TIR."""
    from boundflow.planner.passes import SPLIT_INPUT_DIMS, SPLIT_MIN_BATCH

    def lowerings(g, batch):
        w = Workload.of(g, batch=batch, method="crown")
        bundle = plan(g, w)
        kinds = {t.name: t.kind for t in bundle.task_graph.tasks}
        return {(kinds[t], low) for t, low, _ in bundle.lowering_plan.tasks}
    small, wide = _mlp(SPLIT_INPUT_DIMS), _mlp(SPLIT_INPUT_DIMS + 1)
    assert lowerings(small, SPLIT_MIN_BATCH) == {("ibp", "tir"), ("crown", "torch"),
                                                 ("final", "tir")}
    assert lowerings(small, SPLIT_MIN_BATCH - 1) == {("ibp", "tir"), ("crown", "tir"),
                                                     ("final", "tir")}
    assert lowerings(wide, 1024) == {("ibp", "tir"), ("crown", "tir"), ("final", "tir")}
    w = Workload.of(small, batch=1024, method="crown")             # knobs still choose
    forced = plan(small, w, default(small, w).replace(lowering="tir"))
    assert {low for _, low, _ in forced.lowering_plan.tasks} == {"tir"}


@pytest.mark.parametrize("out", [4, 18, 24, 32])
def test_blocked_conv_weights_hold_the_same_elements(out):
    from boundflow.backend.relax.kernels import conv_block

    w = np.random.default_rng(out).standard_normal((out, 3, 2, 5)).astype(np.float32)
    graph, tensors = _Params({"c.weight": w}), {"c.weight": torch.from_numpy(w)}
    for key, want in (("c.weight", w), ("c.weight|abs", np.abs(w))):
        got = param_tensor(tensors, key + "|O").numpy()
        ob = conv_block(out)
        assert got.shape == param_shape(graph, key + "|O") == (-(-out // ob), 3, 2, 5, ob)
        for o in range(got.shape[0] * ob):
            np.testing.assert_array_equal(got[o // ob, ..., o % ob], want[o] if o < out else 0.0)


def _conv_net(out, groups, stride, dilation, padding):
    from boundflow.ir import GraphBuilder

    rng = np.random.default_rng(out + 10 * groups + stride)
    b = GraphBuilder()
    h = b.input((4, 9, 9))
    h = b.add_node("conv2d", [h], params={"weight": rng.standard_normal((out, 4 // groups, 3, 3))
                                          * 0.4, "bias": rng.standard_normal(out) * 0.1},
                   attrs={"stride": (stride, stride), "padding": (padding, padding),
                          "dilation": (dilation, dilation), "groups": groups})
    h = b.add_node("relu", [h])
    h = b.add_node("conv2d", [h], params={"weight": rng.standard_normal((5, out, 2, 2)) * 0.3},
                   attrs={"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1})
    h = b.add_node("flatten", [b.add_node("relu", [h])], attrs={"start_dim": 0, "end_dim": -1})
    n = b.shape(h)[0]
    h = b.add_node("linear", [h], params={"weight": rng.standard_normal((3, n)) * 0.3,
                                          "bias": np.zeros(3)})
    return b.build(h)


@pytest.mark.parametrize("out, groups, stride, dilation, padding", [
    (4, 1, 1, 1, 1), (18, 1, 2, 1, 1), (24, 1, 1, 2, 2), (32, 2, 2, 1, 0), (8, 2, 1, 1, 1)])
@pytest.mark.parametrize("batch", [1, 3])
def test_blocked_convolutions_are_sound_and_give_the_torch_backends_bounds(
        out, groups, stride, dilation, padding, batch):
    """IBP through TIR's blocked direct convolutions (channel blocks whole, zero-padded, per
    group, and the plain form where a block would straddle groups) equals the torch backend
    and contains sampled points of the box."""
    from tests.helpers import assert_contains, box_points

    g = _conv_net(out, groups, stride, dilation, padding)
    rng = np.random.default_rng(batch)
    x = InputSpec.linf(rng.standard_normal((batch, 4, 9, 9)).astype(np.float32), 0.1)
    w = Workload.of(g, batch=batch, method="ibp", n_specs=0)
    bundle = plan(g, w, default(g, w).replace(lowering="tir"))
    exe = RelaxExecutor(bundle, g)
    assert exe.fallbacks == []
    out_b, ref = exe.run(x, None), TorchExecutor(bundle, g).run(x, None)
    scale = max(1.0, float(ref.upper.abs().max()))
    torch.testing.assert_close(out_b.lower, ref.lower, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(out_b.upper, ref.upper, rtol=1e-5, atol=1e-5 * scale)
    pts = box_points(x.lower, x.upper, n=200)
    flat = torch.from_numpy(pts.reshape((-1, 4, 9, 9)))
    y = flat
    for node in g.nodes[1:]:
        p = {k: torch.as_tensor(np.array(g.params[v]), dtype=torch.float64)
             for k, v in node.params.items()}
        if node.op == "conv2d":
            a = node.attrs
            y = torch.nn.functional.conv2d(y, p["weight"], p.get("bias"), a["stride"],
                                           a["padding"], a["dilation"], a["groups"])
        elif node.op == "relu":
            y = y.relu()
        elif node.op == "flatten":
            y = y.flatten(1)
        elif node.op == "linear":
            y = y @ p["weight"].T + p["bias"]
    assert_contains(out_b.lower, out_b.upper, y.reshape(batch, pts.shape[1], -1).numpy(),
                    tol=1e-5)
