"""The ops of issue 15 (maxpool2d, pad, slice, gather, softmax, sigmoid, tanh, leaky_relu,
hardtanh, conv_transpose2d) through the planner and both backends: every plan builds and runs,
the planned path equals the un-partitioned reference, sampled points lie inside, the Relax
backend agrees with the torch backend and lowers exactly what its generators cover.

Bounding through a new op needs its rules in ``boundflow.domains``; a case whose rules are not
there yet is skipped, naming the op. The TIR kernels of the new ops are also checked on their
own (IBP-only and CROWN plans wholly in TIR) against a small float64 reference below.
"""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from boundflow.api import compute_bounds
from boundflow.backend.torch import TorchExecutor
from boundflow.domains import interval
from boundflow.domains.alpha import AlphaConfig
from boundflow.domains.driver import reference_bounds
from boundflow.domains.interval import Interval
from boundflow.domains.traversal import graph_tensors
from boundflow.errors import UnsupportedOpError
from boundflow.ir import GraphBuilder, ops
from boundflow.ir import domain_plan
from boundflow.ir.analysis import ancestors, preactivations
from boundflow.ir.spec import InputSpec, margin_spec
from boundflow.ir.workload import Workload
from boundflow.planner import default, normalised, plan, space
from tests.helpers import assert_contains, box_points

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
relax = pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="TVM not installed")
ALPHA = AlphaConfig(iterations=3)
BATCH = 2


# --- the graphs ------------------------------------------------------------------------------

def _rng():
    return np.random.default_rng(11)


def _linear(b, h, n, rng):
    return b.add_node("linear", [h], params={"weight": rng.standard_normal((n, b.shape(h)[-1]))
                                             * 0.6, "bias": rng.standard_normal(n) * 0.1})


def _conv(b, h, out, rng, k=3, padding=1, stride=1):
    c = b.shape(h)[0]
    return b.add_node("conv2d", [h], params={"weight": rng.standard_normal((out, c, k, k)) * 0.4,
                                             "bias": rng.standard_normal(out) * 0.1},
                      attrs={"stride": (stride, stride), "padding": (padding, padding),
                             "dilation": (1, 1), "groups": 1})


def _flat(b, h):
    return b.add_node("flatten", [h], attrs={"start_dim": 0, "end_dim": -1})


def conv_maxpool(dtype):
    rng, b = _rng(), GraphBuilder(dtype)
    h = _conv(b, b.input((1, 6, 6)), 2, rng)
    h = b.add_node("maxpool2d", [h], attrs={"kernel_size": (2, 2), "stride": (2, 2),
                                            "padding": (0, 0)})
    h = b.add_node("relu", [h])
    return b.build(_linear(b, _flat(b, h), 3, rng))


def sigmoid_tanh(dtype):
    rng, b = _rng(), GraphBuilder(dtype)
    h = b.add_node("sigmoid", [_linear(b, b.input((4,)), 6, rng)])
    h = b.add_node("tanh", [_linear(b, h, 5, rng)])
    return b.build(_linear(b, h, 3, rng))


def leaky_hardtanh(dtype):
    rng, b = _rng(), GraphBuilder(dtype)
    h = b.add_node("leaky_relu", [_linear(b, b.input((4,)), 6, rng)],
                   attrs={"negative_slope": 0.1})
    h = b.add_node("hardtanh", [_linear(b, h, 6, rng)], attrs={"min_val": -0.5,
                                                               "max_val": 0.7})
    return b.build(_linear(b, h, 3, rng))


def pad_conv(dtype):
    rng, b = _rng(), GraphBuilder(dtype)
    h = b.add_node("relu", [_conv(b, b.input((1, 5, 5)), 2, rng)])
    h = b.add_node("pad", [h], attrs={"pads": ((0, 0), (1, 2), (2, 0)), "value": 0.3})
    h = b.add_node("relu", [_conv(b, h, 2, rng, padding=0)])
    return b.build(_linear(b, _flat(b, h), 3, rng))


def slice_gather(dtype):
    rng, b = _rng(), GraphBuilder(dtype)
    h = b.add_node("relu", [_conv(b, b.input((2, 4, 4)), 3, rng)])
    h = b.add_node("slice", [h], attrs={"axis": 1, "start": 1, "end": 4, "step": 2})
    h = b.add_node("gather", [h], attrs={"axis": 0, "indices": (2, 0, 2), "keepdim": True})
    h = b.add_node("relu", [_conv(b, h, 2, rng)])
    g = b.add_node("gather", [h], attrs={"axis": 0, "indices": (1,), "keepdim": False})
    return b.build(_linear(b, _flat(b, g), 3, rng))


def conv_transpose(dtype):
    rng, b = _rng(), GraphBuilder(dtype)
    h = b.add_node("relu", [_conv(b, b.input((2, 3, 3)), 2, rng)])
    h = b.add_node("conv_transpose2d", [h],          # two groups of 1 -> 2 channels
                   params={"weight": rng.standard_normal((2, 2, 3, 3)) * 0.4,
                           "bias": rng.standard_normal(4) * 0.1},
                   attrs={"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1),
                          "output_padding": (1, 1), "groups": 2})
    h = b.add_node("relu", [h])
    return b.build(_linear(b, _flat(b, h), 3, rng))


def softmax(dtype):
    rng, b = _rng(), GraphBuilder(dtype)
    h = b.add_node("softmax", [_linear(b, b.input((4,)), 5, rng)], attrs={"axis": 0})
    return b.build(_linear(b, h, 3, rng))


CASES = {f.__name__: f for f in (conv_maxpool, sigmoid_tanh, leaky_hardtanh, pad_conv,
                                 slice_gather, conv_transpose, softmax)}


def batchnorm_after_relu(dtype):
    """Not a new op, but a new TIR backward rule: a batchnorm no layer absorbs."""
    rng, b = _rng(), GraphBuilder(dtype)
    h = b.add_node("relu", [_conv(b, b.input((1, 4, 4)), 2, rng)])
    h = b.add_node("batchnorm", [h], params={
        "mean": rng.standard_normal(2) * 0.1, "var": rng.uniform(0.5, 2, 2),
        "weight": rng.standard_normal(2), "bias": rng.standard_normal(2) * 0.1},
        attrs={"eps": 1e-5})
    h = b.add_node("relu", [_conv(b, h, 2, rng)])
    return b.build(_linear(b, _flat(b, h), 3, rng))


def _query(g, dtype, eps=0.1, seed=0):
    centre = np.random.default_rng(seed).uniform(-1, 1, (BATCH,) + g.input_shape)
    x = InputSpec.linf(centre.astype(dtype), eps)
    n_out = int(np.prod(g.output_shape))
    return x, margin_spec(np.arange(BATCH) % n_out, n_out)


def _needs_plannable(g):
    """Skip unless the domain plan knows the pre-activations the planner does."""
    if domain_plan.preactivations(g) != preactivations(g):
        pytest.skip("ir.domain_plan.preactivations does not follow ir.analysis yet")


def _missing_rules(g, method) -> str:
    """What ``boundflow.domains`` lacks to bound every op of ``g`` by ``method`` ("": none)."""
    from boundflow.domains import crown

    tables = [("IBP", interval.RULES)] + ([("CROWN", crown.RULES)] if method != "ibp" else [])
    for what, table in tables:
        missing = sorted({n.op for n in g.nodes[1:]} - set(table))
        if missing:
            return f"boundflow.domains has no {what} rule for {missing} yet"
    return ""


def _needs_rules(g, method):
    """Skip unless ``boundflow.domains`` bounds every op of ``g`` by ``method`` and the graph
    can be planned."""
    if _missing_rules(g, method):
        pytest.skip(_missing_rules(g, method))
    _needs_plannable(g)


def _truth(g, x, n=300):
    """The model at sampled points of the box: [batch, n, n_out] (float64)."""
    from boundflow.domains.concrete import evaluate

    pts = box_points(x.lower, x.upper, n=n)
    flat = torch.from_numpy(pts.reshape((-1,) + pts.shape[2:]))
    try:
        y = evaluate(g, flat)
    except UnsupportedOpError as e:
        pytest.skip(f"no concrete rule yet: {e}")
    return y.reshape(BATCH, pts.shape[1], -1).numpy()


def _reference(g, x, C, dp):
    gn = normalised(g)[0]
    dt = torch.float64 if g.dtype == "float64" else torch.float32
    return reference_bounds(gn, Interval(torch.as_tensor(x.lower).to(dt),
                                         torch.as_tensor(x.upper).to(dt)),
                            graph_tensors(gn, dt), torch.as_tensor(C.C).to(dt), dp, alpha=ALPHA)


# --- the planner -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_every_plan_passes_the_verifier(case, method):
    g = CASES[case]("float64")
    _needs_plannable(g)
    w = Workload.of(g, batch=BATCH, method=method, n_specs=1)
    sp = space(g, w)
    rng = random.Random(3)
    for knobs in [default(g, w)] + [sp.sample(rng) for _ in range(8)]:
        plan(g, w, knobs, alpha=ALPHA, verify=True)


def test_crown_plan_bounds_every_relaxed_input():
    """With sigmoid and maxpool2d, a CROWN task and the CROWN final task read the bounds of
    the input of every relaxed op they cross, and the domain plan covers those inputs."""
    rng, b = _rng(), GraphBuilder("float64")
    h = _conv(b, b.input((1, 6, 6)), 2, rng)
    h = b.add_node("maxpool2d", [h], attrs={"kernel_size": (2, 2), "stride": (2, 2),
                                            "padding": (0, 0)})
    h = b.add_node("sigmoid", [_linear(b, _flat(b, h), 5, rng)])
    h = b.add_node("relu", [_linear(b, h, 4, rng)])
    g = b.build(_linear(b, h, 3, rng))
    _needs_plannable(g)
    pre = preactivations(g)
    assert [g.node(p).op for p in pre] == ["conv2d", "linear", "linear"]
    w = Workload.of(g, batch=1, method="crown", n_specs=1)
    bundle = plan(g, w, verify=True)
    tg = bundle.task_graph
    node_of = {bf.name: bf.node for bf in tg.buffers}
    crown = {t.nodes[0]: t for t in tg.tasks if t.kind == "crown"}
    # the conv output is exact under IBP (one mixing op from the input): no CROWN task
    assert set(crown) == set(pre) - {pre[0]}
    for start, t in crown.items():
        read = {node_of[i] for i in t.inputs[2:]}
        up = ancestors(g, [start])
        above = {n.inputs[0] for n in g.nodes if ops.has(n.op, "relaxed") and n.name in up}
        assert read == above, (start, read, above)
    final = tg.task("final")
    assert {node_of[i] for i in final.inputs[2:]} == set(pre)


def test_layout_regions_hold_new_ops_in_any_layout():
    """Every region NHWC and every node its own task: slice and gather read NHWC buffers, and
    a gather that drops an axis asks for no conversion to a layout of its own (wrong) rank."""
    g = slice_gather("float64")
    _needs_plannable(g)
    w = Workload.of(g, batch=1, method="ibp", n_specs=1)
    sp = space(g, w)
    assert sp.regions
    k = default(g, w).replace(layouts=tuple("NHWC" for _ in sp.regions),
                              partition=tuple(False for _ in sp.fusible))
    bundle = plan(g, w, k, verify=True)
    for buf in bundle.task_graph.buffers:
        assert len(buf.layout) == len(buf.shape), buf


# --- the torch backend -----------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_torch_plans_equal_the_reference_and_are_sound(case, method):
    g = CASES[case]("float64")
    _needs_rules(g, method)
    x, C = _query(g, np.float64)
    truth = _truth(g, x)
    w = Workload.of(g, batch=BATCH, method=method, dtype="float64", n_specs=C.n_specs)
    sp = space(g, w)
    rng = random.Random(5)
    refs = {}
    for knobs in [default(g, w)] + [sp.sample(rng) for _ in range(4)]:
        bundle = plan(g, w, knobs, alpha=ALPHA)
        out = TorchExecutor(bundle, g).run(x, C)
        dp = bundle.domain_plan.plan
        if dp not in refs:
            refs[dp] = _reference(g, x, C, dp)
        ref = refs[dp]
        for got, want in ((out.lower, ref.lower), (out.upper, ref.upper)):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-9,
                                       err_msg=f"knobs {knobs.to_json()}")
        assert_contains(out.lower, out.upper, truth, C.C, what=f"{case} {method}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_api_is_sound_and_near_float64(case):
    g32, g64 = CASES[case]("float32"), CASES[case]("float64")
    _needs_rules(g32, "crown")
    x, C = _query(g32, np.float32)
    truth = _truth(g64, InputSpec.box(x.lower.astype(np.float64), x.upper.astype(np.float64)))
    for method in METHODS:
        out = compute_bounds(g32, x, C=C, method=method, alpha=ALPHA)
        assert out.lower.dtype == torch.float32
        assert_contains(out.lower, out.upper, truth, C.C, tol=1e-5, what=f"{case} {method}")


# --- the Relax backend -----------------------------------------------------------------------

from boundflow.backend.relax.coverage import (CROWN_KERNELS, IBP_KERNELS,  # noqa: E402
                                              lowers_to_tir, uncovered_ops)


def _relax():
    from boundflow.backend.relax import executor

    return executor


@relax
def test_coverage_lists_exactly_the_generators_kernels():
    from boundflow.backend.relax.crown_kernels import BackwardLowering
    from boundflow.backend.relax.kernels import TaskLowering

    assert IBP_KERNELS == {op for op in ops.names() if hasattr(TaskLowering, "_" + op)} - {
        "input"}
    assert CROWN_KERNELS - {"input"} == {op for op in ops.names()
                                         if hasattr(BackwardLowering, "_back_" + op)}


def _ibp_reference(g, lower, upper):
    """Float64 IBP of the ops these graphs use, for the TIR kernels: affine maps by the
    positive / negative weight split, monotone ops at both ends, selections by indexing."""
    P = {k: torch.tensor(np.asarray(v, np.float64)) for k, v in g.params.items()}
    env = {}
    for n in g.nodes:
        a, p = n.attrs, {r: P[k] for r, k in n.params.items()}
        if n.op == "input":
            env[n.name] = (torch.as_tensor(lower, dtype=torch.float64),
                           torch.as_tensor(upper, dtype=torch.float64))
            continue
        lo, hi = env[n.inputs[0]]
        if ops.has(n.op, "weighted"):
            f = {"linear": lambda v, w: F.linear(v, w),
                 "conv2d": lambda v, w: F.conv2d(v, w, stride=a["stride"],
                                                 padding=a["padding"]),
                 "conv_transpose2d": lambda v, w: F.conv_transpose2d(
                     v, w, stride=a["stride"], padding=a["padding"], groups=a["groups"],
                     output_padding=a["output_padding"], dilation=a["dilation"])}[n.op]
            wp, wn = p["weight"].clamp(min=0), p["weight"].clamp(max=0)
            bias = p["bias"] if n.op == "linear" else p["bias"][:, None, None]
            env[n.name] = (f(lo, wp) + f(hi, wn) + bias, f(hi, wp) + f(lo, wn) + bias)
            continue
        if n.op == "pad":
            pads = [int(v) for pair in reversed(a["pads"]) for v in pair]
            fn = lambda v: F.pad(v, pads, value=float(a["value"]))  # noqa: E731
        elif n.op == "slice":
            fn = lambda v: v[(slice(None),) * (a["axis"] + 1)  # noqa: E731
                             + (slice(a["start"], a["end"], a["step"]),)]
        elif n.op == "gather":
            def fn(v, a=a):
                out = v.index_select(a["axis"] + 1, torch.tensor(a["indices"]))
                return out if a["keepdim"] else out.squeeze(a["axis"] + 1)
        elif n.op == "batchnorm":
            s = p["weight"] / torch.sqrt(p["var"] + a["eps"])
            t = p["bias"] - p["mean"] * s
            s, t = s[:, None, None], t[:, None, None]
            env[n.name] = (torch.minimum(lo * s, hi * s) + t, torch.maximum(lo * s, hi * s) + t)
            continue
        elif n.op == "flatten":
            fn = lambda v: v.flatten(1)  # noqa: E731
        elif n.op == "maxpool2d":
            fn = lambda v: F.max_pool2d(v, a["kernel_size"], a["stride"], a["padding"])  # noqa
        else:
            fn = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
                  "leaky_relu": lambda v: F.leaky_relu(v, a.get("negative_slope", 0)),
                  "hardtanh": lambda v: F.hardtanh(v, a.get("min_val", -1),
                                                   a.get("max_val", 1))}[n.op]
        env[n.name] = (fn(lo), fn(hi))          # monotone (non-decreasing) in every element
    return env[g.output]


TIR_CASES = ("conv_maxpool", "sigmoid_tanh", "leaky_hardtanh", "pad_conv", "slice_gather",
             "conv_transpose")


@relax
@pytest.mark.parametrize("case", TIR_CASES)
def test_tir_ibp_kernels_of_new_ops_match_a_float64_reference(case):
    """IBP plans of these graphs lower wholly to TIR (no spec, final IBP): the bounds equal
    an independent float64 IBP, and at a point they are the model's output."""
    g = CASES[case]("float32")
    _needs_plannable(g)
    w = Workload.of(g, batch=BATCH, method="ibp", n_specs=0)
    bundle = plan(g, w, default(g, w).replace(partition=tuple(
        i % 2 == 0 for i in range(len(space(g, w).fusible))), lowering="tir"))
    exe = _relax().RelaxExecutor(bundle, g)
    assert exe.fallbacks == []
    x, _ = _query(g, np.float32)
    out = exe.run(x)
    lo, hi = _ibp_reference(g, x.lower, x.upper)
    scale = max(1.0, float(hi.abs().max()))
    torch.testing.assert_close(out.lower.double(), lo, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(out.upper.double(), hi, rtol=1e-4, atol=1e-5 * scale)
    point = InputSpec.box(x.lower, x.lower)
    at = exe.run(point)
    y, _ = _ibp_reference(g, x.lower, x.lower)
    torch.testing.assert_close(at.lower.double(), y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(at.upper.double(), y, rtol=1e-4, atol=1e-5)


@relax
@pytest.mark.parametrize("case", ["pad_conv", "slice_gather", "conv_transpose",
                                  "batchnorm_after_relu"])
def test_tir_crown_kernels_of_linear_new_ops_are_sound_and_tighter(case):
    """CROWN plans through pad, slice, gather, conv_transpose2d and batchnorm lower wholly to
    TIR; sampled outputs lie inside and the bounds are no looser than IBP's."""
    g = {**CASES, "batchnorm_after_relu": batchnorm_after_relu}[case]("float32")
    x, C = _query(g, np.float32)
    w = Workload.of(g, batch=BATCH, method="crown", n_specs=C.n_specs)
    bundle = plan(g, w, default(g, w).replace(lowering="tir"))
    exe = _relax().RelaxExecutor(bundle, g)
    assert exe.fallbacks == [] and any(t.kind == "crown" for t in bundle.task_graph.tasks)
    out = exe.run(x, C)
    wi = Workload.of(g, batch=BATCH, method="ibp", n_specs=C.n_specs)
    ibp_plan = plan(g, wi, default(g, wi).replace(lowering="tir"))
    ibp = _relax().RelaxExecutor(ibp_plan, g).run(x, C)
    assert (out.lower >= ibp.lower - 1e-5).all() and (out.upper <= ibp.upper + 1e-5).all()
    pts = box_points(x.lower, x.upper, n=300)
    y = _ibp_reference(g, pts.reshape((-1,) + g.input_shape),
                       pts.reshape((-1,) + g.input_shape))[0]
    assert_contains(out.lower, out.upper, y.reshape(BATCH, pts.shape[1], -1).numpy(), C.C,
                    tol=1e-5)
    if _missing_rules(g, "crown"):
        return
    ref = TorchExecutor(bundle, g).run(x, C)
    scale = max(1.0, float(ref.upper.abs().max()))
    torch.testing.assert_close(out.lower, ref.lower, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(out.upper, ref.upper, rtol=1e-4, atol=1e-4 * scale)


def _expected_fallbacks(bundle, g):
    return [t.name for t in bundle.task_graph.tasks if t.kind != "input"
            and not lowers_to_tir(bundle, t, g)]


@pytest.fixture(scope="module")
def relax_runs():
    """One compiled CROWN plan per case (compiles cost seconds): (bundle, executor, query)."""
    made = {}

    def get(case):
        if case not in made:
            g = CASES[case]("float32")
            _needs_rules(g, "crown")
            x, C = _query(g, np.float32)
            w = Workload.of(g, batch=BATCH, method="crown", n_specs=C.n_specs)
            bundle = plan(g, w)
            made[case] = g, bundle, _relax().RelaxExecutor(bundle, g), x, C
        return made[case]
    return get


@relax
@pytest.mark.parametrize("case", sorted(CASES))
def test_relax_crown_plans_build_and_agree_with_torch(case, relax_runs):
    g, bundle, exe, x, C = relax_runs(case)
    assert exe.fallbacks == _expected_fallbacks(bundle, g)
    for t in bundle.task_graph.tasks:             # a task with an op the kernels lack falls back
        if t.kind != "input" and uncovered_ops(t, normalised(g)[0]):
            assert t.name in exe.fallbacks
    out, ref = exe.run(x, C), TorchExecutor(bundle, g).run(x, C)
    scale = max(1.0, float(ref.upper.abs().max()))
    torch.testing.assert_close(out.lower, ref.lower, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(out.upper, ref.upper, rtol=1e-4, atol=1e-4 * scale)


@relax
@pytest.mark.parametrize("case", ["softmax", "conv_maxpool"])
def test_relax_alpha_crown_and_torch_lowering_run(case):
    """alpha-CROWN (its final task a callback) and an all-callback plan also run."""
    g = CASES[case]("float32")
    _needs_rules(g, "alpha-crown")
    x, C = _query(g, np.float32)
    w = Workload.of(g, batch=BATCH, method="alpha-crown", n_specs=C.n_specs)
    for knobs in (default(g, w), default(g, w).replace(lowering="torch")):
        bundle = plan(g, w, knobs, alpha=ALPHA)
        exe = _relax().RelaxExecutor(bundle, g)
        assert "final" in exe.fallbacks
        out, ref = exe.run(x, C), TorchExecutor(bundle, g).run(x, C)
        scale = max(1.0, float(ref.upper.abs().max()))
        torch.testing.assert_close(out.lower, ref.lower, rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(out.upper, ref.upper, rtol=1e-4, atol=1e-4 * scale)


@relax
def test_every_new_op_plan_builds_a_relax_module():
    """Whatever the domains cover, a plan of every case builds (tasks with ops the
    generators lack become callbacks); building is cheap, compiling is not done here."""
    for case, make in sorted(CASES.items()):
        g = make("float32")
        _needs_plannable(g)
        for method in ("ibp", "crown"):
            w = Workload.of(g, batch=BATCH, method=method, n_specs=1)
            bundle = plan(g, w)
            _relax().build_module(bundle, normalised(g)[0])


def test_features_and_backend_count_tasks_the_kernels_lack_as_callbacks():
    """The cost model's kernel / callback counts and ``Backend.compiles`` follow the
    generators' coverage (a softmax task is a callback) without importing TVM's kernels."""
    from boundflow.backend import create
    from boundflow.costmodel.features import PLAN_FEATURE_NAMES, plan_features

    g = softmax("float32")
    _needs_plannable(g)
    w = Workload.of(g, batch=BATCH, method="crown-ibp", n_specs=2)
    bundle = plan(g, w)
    gn = normalised(g)[0]
    lowered = {t.name: lowers_to_tir(bundle, t, g) for t in bundle.task_graph.tasks
               if t.kind != "input"}
    assert lowered == {"ibp:softmax": False, "final": False}      # softmax behind the final
    relax_backend = create("relax")
    assert not any(relax_backend.compiles(bundle, t, g) for t in bundle.task_graph.tasks)
    f = dict(zip(PLAN_FEATURE_NAMES, plan_features(bundle, gn)))
    assert f["n_kernels"] == 0 and f["n_callbacks"] == 2
