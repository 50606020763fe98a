"""A small linear layer takes its lower and upper bounds in one product of ``[l | u]`` with
``[[W⁺, W⁻], [W⁻, W⁺]]`` (boundflow.backend.torch._affine_joint), and a relu after it clamps
both halves at once. The bounds equal centre/radius form's (up to rounding) and contain
sampled outputs; large layers, conv layers and one-number radii keep centre/radius form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import boundflow as bf
from boundflow.api import as_graph
from boundflow.backend import torch as tb
from boundflow.backend.torch import Value, _affine_cr, _affine_joint, _joint_pays
from tests.helpers import assert_contains, box_points, counted_calls, true_outputs


def _deep(width: int = 24, skip: bool = False) -> torch.nn.Module:
    """An MLP of small layers; with ``skip`` a pre-activation also feeds an add, so its
    relu cannot run in place (the joint value is read by the table's rule instead)."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = torch.nn.Linear(10, width)
            self.l2 = torch.nn.Linear(width, width)
            self.l3 = torch.nn.Linear(width, width, bias=False)
            self.l4 = torch.nn.Linear(width, 3)

        def forward(self, x):
            h = torch.relu(self.l1(x))
            y = self.l2(h)
            z = torch.relu(y) + y if skip else torch.relu(y)
            return self.l4(torch.relu(self.l3(z)))
    return Net().eval()


def _bounds(model, x, eps, method, monkeypatch, on: bool, dtype=None):
    """Bounds with the joint product allowed (``on``) or never, and how many layers took it."""
    taken = counted_calls(monkeypatch, tb, "_affine_joint")
    if not on:
        monkeypatch.setattr(tb, "JOINT_MACS", 0)
    try:
        b = bf.compute_bounds(as_graph(model, torch.from_numpy(x[:1])), x, eps=eps,
                              method=method, dtype=dtype)
    finally:
        monkeypatch.undo()
    return b, len(taken)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("batch", [1, 7])
def test_joint_product_equals_centre_radius_and_is_sound(method, skip, batch, monkeypatch):
    model = _deep(skip=skip)
    x = np.random.default_rng(batch).normal(size=(batch, 10)).astype(np.float32)
    joint, n = _bounds(model, x, 0.05, method, monkeypatch, True)
    plain, m = _bounds(model, x, 0.05, method, monkeypatch, False)
    assert n > 0 and m == 0
    scale = 1 + float(plain.upper.abs().max())
    np.testing.assert_allclose(joint.lower, plain.lower, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(joint.upper, plain.upper, rtol=0, atol=2e-6 * scale)
    pts = box_points(x - 0.05, x + 0.05, n=2000)
    assert_contains(joint.lower, joint.upper, true_outputs(model, pts), tol=1e-5)


def test_joint_product_in_float64_matches_to_rounding(monkeypatch):
    model = _deep().double()
    x = np.random.default_rng(3).normal(size=(4, 10))
    joint, n = _bounds(model, x, 0.1, "ibp", monkeypatch, True, dtype="float64")
    plain, _ = _bounds(model, x, 0.1, "ibp", monkeypatch, False, dtype="float64")
    assert n > 0
    np.testing.assert_allclose(joint.lower, plain.lower, rtol=0, atol=1e-11)
    np.testing.assert_allclose(joint.upper, plain.upper, rtol=0, atol=1e-11)


def test_one_layer_both_forms_and_both_inputs():
    """``l' = W⁺l + W⁻u + b``, ``u' = W⁺u + W⁻l + b`` from lower/upper or centre/radius
    input, with and without a bias; the halves are views of the joint tensor."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    lo = torch.randn(3, 6, generator=g, dtype=torch.float64)
    hi = lo + torch.rand(3, 6, generator=g, dtype=torch.float64)
    w2 = torch.randn(4, 5, generator=g, dtype=torch.float64)
    for bias in (None, torch.randn(5, generator=g, dtype=torch.float64)):
        params = {"weight": w} if bias is None else {"weight": w, "bias": bias}
        want_lo = lo @ w.clamp(min=0).T + hi @ w.clamp(max=0).T
        want_hi = hi @ w.clamp(min=0).T + lo @ w.clamp(max=0).T
        if bias is not None:
            want_lo, want_hi = want_lo + bias, want_hi + bias
        for v in (Value("lu", lo, hi), Value("lu", lo, hi).as_form("cr")):
            out = _affine_joint(dict(params), v)
            torch.testing.assert_close(out.a, want_lo, rtol=0, atol=1e-12)
            torch.testing.assert_close(out.b, want_hi, rtol=0, atol=1e-12)
            assert out.a.data_ptr() == out.joint.data_ptr() and out.joint.shape == (3, 10)
            nxt = {"weight": w2}
            again = _affine_joint(dict(nxt), out)             # reads the joint tensor as is
            cr = _affine_cr(_Node("linear"), dict(nxt), out)
            torch.testing.assert_close(again.a, cr.a - cr.b, rtol=0, atol=1e-9)
            torch.testing.assert_close(again.b, cr.a + cr.b, rtol=0, atol=1e-9)


class _Node:
    def __init__(self, op):
        self.op, self.attrs = op, {}


def test_only_small_linear_layers_on_two_dimensional_values_take_it():
    small = {"weight": torch.ones(48, 48)}
    big = {"weight": torch.ones(300, 300)}
    v = Value("lu", torch.zeros(32, 48), torch.ones(32, 48))
    assert _joint_pays(_Node("linear"), small, v)
    assert not _joint_pays(_Node("linear"), small, Value("lu", torch.zeros(64, 48),
                                                          torch.ones(64, 48)))   # 2^17 MACs
    assert not _joint_pays(_Node("linear"), big, Value("lu", torch.zeros(1, 300),
                                                        torch.ones(1, 300)))     # weight bytes
    assert not _joint_pays(_Node("conv2d"), {"weight": torch.ones(4, 3, 3, 3)},
                           Value("lu", torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)))
    uniform = Value("cr", torch.zeros(32, 48), torch.full((32, 1), 0.1).expand(32, 48))
    assert not _joint_pays(_Node("linear"), small, uniform)       # no radius product at all


def test_point_intervals_stay_intervals():
    """Where ``l = u`` the halves sum the same products in different orders: without care
    ``l' > u'`` by rounding in most entries (575 of 600 in a review's trial)."""
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        for _ in range(20):
            w = torch.randn(30, 20, generator=g, dtype=dtype)
            x = torch.randn(8, 20, generator=g, dtype=dtype) * 100
            out = _affine_joint({"weight": w, "bias": torch.randn(30, generator=g,
                                                                  dtype=dtype)},
                                Value("lu", x, x.clone()))
            assert bool((out.a <= out.b).all())


def test_eps_zero_bounds_are_ordered_end_to_end(monkeypatch):
    model = _deep(skip=True)
    x = np.random.default_rng(5).normal(size=(6, 10)).astype(np.float32) * 30
    b, n = _bounds(model, x, 0.0, "ibp", monkeypatch, True)
    assert n > 0 and bool((b.lower <= b.upper).all())


def test_a_cached_task_output_holds_no_joint_tensor(monkeypatch):
    """Task outputs leave without the joint tensor: a cache entry of a joint value costs
    what one of centre/radius form's does."""
    from boundflow.backend.torch import TorchExecutor
    from boundflow.ir.spec import InputSpec
    from boundflow.ir.workload import Workload
    from boundflow.planner import default, plan
    from boundflow.runtime.cache import BoundCache

    model = _deep()
    g = as_graph(model, torch.zeros(1, 10))
    w = Workload.of(g, batch=2, method="crown-ibp", n_specs=0)
    exe = TorchExecutor(plan(g, w, default(g, w)), g)
    box = InputSpec.linf(np.zeros((2, 10), np.float32), 0.1)
    sizes = []
    for on in (True, False):
        if not on:
            monkeypatch.setattr(tb, "JOINT_MACS", 0)
        cache = BoundCache()
        exe.run(box, None, reuse_ibp=True, cache=cache)
        sizes.append(cache.stats()["bytes"])
    assert sizes[0] == sizes[1] > 0


def test_an_in_place_relu_never_writes_memory_a_task_reads_elsewhere():
    """IBP's relu runs in place only on a value its task made fresh: a relu of a view of the
    input box (here ``flatten(x)``; another branch reads ``x``) must leave the box alone;
    the bounds equal the reference IBP and hold on sampled points."""
    from boundflow.domains.interval import Interval, ibp
    from boundflow.domains.traversal import graph_tensors

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.a, self.b = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)

        def forward(self, x):
            return self.a(torch.relu(torch.flatten(x, 1))) + self.b(x.permute(0, 2, 1)
                                                                     .reshape(-1, 6))
    model = Net().eval()
    x = np.random.default_rng(0).normal(size=(3, 2, 3)).astype(np.float32)
    g = as_graph(model, torch.from_numpy(x[:1]))
    got = bf.compute_bounds(g, x, eps=0.5, method="ibp")
    ref = ibp(g, Interval(torch.from_numpy(x - 0.5), torch.from_numpy(x + 0.5)),
              graph_tensors(g, torch.float32))
    np.testing.assert_allclose(got.lower, ref.lower, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.upper, ref.upper, rtol=0, atol=1e-5)
    pts = box_points(x - 0.5, x + 0.5, n=500)
    assert_contains(got.lower, got.upper, true_outputs(model, pts), tol=1e-5)


def test_an_in_place_relu_never_clamps_a_value_a_view_still_reads():
    """A task holding ``h = linear(x)``, ``v = reshape(h)`` and ``relu(h)`` (a plan
    verifier accepts a hand-made fusion like it): the relu is h's last reader, but v shares
    h's memory and is read after it, so the relu must not run in place."""
    import dataclasses

    from boundflow.backend.torch import TorchExecutor
    from boundflow.domains.interval import Interval, ibp
    from boundflow.domains.traversal import graph_tensors
    from boundflow.ir.normalize import normalised
    from boundflow.ir.workload import Workload
    from boundflow.planner import default, plan as make_plan

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.a, self.b, self.c = (torch.nn.Linear(6, 4), torch.nn.Linear(4, 3),
                                      torch.nn.Linear(4, 3))

        def forward(self, x):
            h = self.a(x)
            v = h.reshape(-1, 2, 2)
            return self.b(torch.relu(h)) + self.c(torch.flatten(v, 1))
    model = Net().eval()
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    g = as_graph(model, torch.from_numpy(x[:1]))
    gn, _ = normalised(g)
    w = Workload.of(gn, batch=3, n_specs=0, method="ibp")
    exe = TorchExecutor(make_plan(gn, w, default(gn, w)), g)
    last = next(t for t in exe.tasks if t.kind == "ibp" and "linear" not in t.nodes)
    nodes = ("linear",) + tuple(last.nodes)                       # the first layer fused in
    merged = dataclasses.replace(last, name="merged", nodes=nodes, inputs=("x",))
    counts = dict.fromkeys(nodes, 0)
    for n in nodes:
        for i in exe.nodes[n].inputs:
            if i in counts:
                counts[i] += 1
    exe._readers["merged"] = counts
    box = Interval(torch.from_numpy(x - 0.5), torch.from_numpy(x + 0.5))
    outs, _ = exe._ibp(merged, {"x": tb.Value("lu", box.lower, box.upper)},
                       graph_tensors(exe.graph, torch.float32), False)
    got = outs[merged.outputs[0]]
    ref = ibp(g, box, graph_tensors(g, torch.float32))
    torch.testing.assert_close(got.a, ref.lower, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.b, ref.upper, rtol=0, atol=1e-5)


def test_the_result_is_row_major_whatever_the_plans_layout():
    """An NHWC plan's output buffer is a permuted view of its slot; the bounds a run returns
    are row-major tensors all the same (``.view`` works on them)."""
    from boundflow.backend.torch import TorchExecutor
    from boundflow.ir.normalize import normalised
    from boundflow.ir.workload import Workload
    from boundflow.planner import default, plan as make_plan

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU()).eval()
    x = np.random.default_rng(0).normal(size=(2, 2, 4, 5)).astype(np.float32)
    g = as_graph(model, torch.from_numpy(x[:1]))
    gn, _ = normalised(g)
    w = Workload.of(gn, batch=2, n_specs=0, method="ibp")
    k = default(gn, w)
    bundle = make_plan(gn, w, k.replace(layouts=tuple("NHWC" for _ in k.layouts)))
    r = TorchExecutor(bundle, g).run(bf.InputSpec.box(x - 0.1, x + 0.1))
    ref = bf.compute_bounds(g, x, eps=0.1, method="ibp")
    assert r.lower.is_contiguous() and r.upper.is_contiguous()
    torch.testing.assert_close(r.lower.view(2, -1), ref.lower.reshape(2, -1))
    torch.testing.assert_close(r.upper.view(2, -1), ref.upper.reshape(2, -1))
