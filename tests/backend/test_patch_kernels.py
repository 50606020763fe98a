"""CROWN's window ("patch") form in TIR (``backend/relax/crown_patch_kernels.py``): a crown
task from a spatial node whose walk the window rules cover runs in window form on the Relax
backend (by default, and under ``lowering="tir"``), its bounds equal the dense walk's (the torch
reference without patches) and the torch backend's, and sampled points lie inside.

The graphs cross every window rule but identity (normalisation removes it): convolutions of
several kernels, strides, paddings, a dilation and groups; avgpool; batchnorm; per-channel and
per-element constants (mul, div, add, sub); a residual add and a sub of two nodes whose windows
differ; a constant and a zero pad; a concat along channels. Float64, so agreement is checked
to 1e-9. The intermediate bounds are checked through an IBP final step too (its bounds move
with every intermediate interval; CROWN's final step hides some of them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

from boundflow.backend.relax.coverage import lowers_to_tir, patch_walk  # noqa: E402
from boundflow.backend.relax.executor import RelaxExecutor  # noqa: E402
from boundflow.backend.torch import TorchExecutor  # noqa: E402
from boundflow.domains.driver import reference_bounds  # noqa: E402
from boundflow.domains.interval import Interval  # noqa: E402
from boundflow.domains.traversal import graph_tensors  # noqa: E402
from boundflow.ir import GraphBuilder  # noqa: E402
from boundflow.ir.domain_plan import DomainPlan  # noqa: E402
from boundflow.ir.spec import InputSpec, margin_spec  # noqa: E402
from boundflow.ir.workload import Workload  # noqa: E402
from boundflow.planner import default, normalised, plan  # noqa: E402
from tests.helpers import assert_contains, box_points, true_outputs  # noqa: E402


def _conv(b, h, out, rng, k=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
          bias=True):
    c = b.shape(h)[0]
    params = {"weight": rng.standard_normal((out, c // groups) + tuple(k)) * 0.5}
    if bias:
        params["bias"] = rng.standard_normal(out) * 0.2
    return b.add_node("conv2d", [h], params=params,
                      attrs={"stride": stride, "padding": padding, "dilation": dilation,
                             "groups": groups})


def _head(b, h, rng):
    h = b.add_node("flatten", [h], attrs={"start_dim": 0, "end_dim": -1})
    return b.build(b.add_node("linear", [h], params={
        "weight": rng.standard_normal((3, b.shape(h)[0])) * 0.3}))


def _batchnorm(b, h, rng):
    c = b.shape(h)[0]
    return b.add_node("batchnorm", [h], params={"mean": rng.standard_normal(c) * 0.1,
                                                "var": rng.random(c) + 0.5,
                                                "weight": rng.standard_normal(c),
                                                "bias": rng.standard_normal(c)},
                      attrs={"eps": 1e-5})


def strided():
    """Kernels 3 / 4x2 / 5, strides 1 / (2, 1) / 3, paddings, a batchnorm after a relu (not
    folded into a convolution) and a scalar mul."""
    rng, b = np.random.default_rng(0), GraphBuilder("float64")
    h = b.add_node("relu", [_conv(b, b.input((2, 11, 10)), 4, rng)])
    h = _conv(b, _batchnorm(b, h, rng), 4, rng, k=(4, 2), stride=(2, 1), padding=(2, 0))
    h = b.add_node("relu", [b.add_node("mul", [h], params={"other": np.array(1.5)})])
    h = b.add_node("relu", [_conv(b, h, 3, rng, k=(5, 5), stride=(3, 3), padding=(2, 2))])
    return _head(b, h, rng)


def residual():
    """A residual block (the skip's window differs from the main path's), a sub of two
    nodes, per-element and per-channel constants."""
    rng, b = np.random.default_rng(1), GraphBuilder("float64")
    x = b.add_node("relu", [_conv(b, b.input((2, 8, 8)), 3, rng, stride=(2, 2))])
    h = b.add_node("relu", [_conv(b, x, 3, rng)])
    h = _conv(b, h, 3, rng, bias=False)
    h = b.add_node("relu", [b.add_node("add", [h, x])])
    d = b.add_node("div", [h], params={"other": rng.random((3, 4, 4)) + 0.5})
    s = b.add_node("sub", [b.add_node("relu", [_conv(b, d, 3, rng)]), h])
    s = b.add_node("add", [s], params={"other": rng.standard_normal((3, 1, 1))})
    s = b.add_node("sub", [s], params={"other": rng.standard_normal((3, 4, 4))})
    return _head(b, b.add_node("relu", [s]), rng)


def pool_pad_concat():
    """Avgpool (a crown start too), a constant pad and a zero pad, a dilated and a grouped
    convolution, a concat along channels."""
    rng, b = np.random.default_rng(2), GraphBuilder("float64")
    x = b.add_node("relu", [_conv(b, b.input((2, 9, 9)), 4, rng)])
    x = b.add_node("pad", [x], attrs={"pads": ((0, 0), (0, 1), (1, 0)), "value": 0.0})
    p = b.add_node("relu", [b.add_node("avgpool2d", [x], attrs={
        "kernel_size": (2, 2), "stride": (2, 2), "padding": (1, 1)})])
    p = b.add_node("pad", [p], attrs={"pads": ((0, 0), (1, 0), (0, 2)), "value": 0.4})
    g = _conv(b, p, 4, rng, groups=2, padding=(0, 0))
    d = _conv(b, p, 2, rng, dilation=(2, 2), padding=(1, 1))
    h = b.add_node("concat", [b.add_node("relu", [g]), b.add_node("relu", [d])],
                   attrs={"axis": 0})
    h = b.add_node("relu", [_conv(b, h, 3, rng)])
    return _head(b, h, rng)


GRAPHS = {"strided": strided, "residual": residual, "pool_pad_concat": pool_pad_concat}


def _bundle(g, lowering=None):
    w = Workload.of(g, batch=2, method="crown", dtype="float64")
    knobs = default(g, w)
    if lowering:
        knobs = knobs.replace(lowering=lowering, task_lowering=())
    return plan(g, w, knobs, sparse=False)


@pytest.mark.parametrize("name,lowering", [(n, None) for n in sorted(GRAPHS)]
                         + [("strided", "tir")])
def test_window_form_in_tir_equals_the_dense_walk_and_is_sound(name, lowering):
    """``None``: the default plan (its final task's dense walk through the convolutions on
    ATen); ``tir``: every task in TIR (the dense walk too, its rows innermost)."""
    g = GRAPHS[name]()
    x = np.random.default_rng(3).standard_normal((2,) + g.input_shape)
    bundle = _bundle(g, lowering)
    gn = normalised(g)[0]
    window = [t for t in bundle.task_graph.tasks
              if t.kind == "crown" and patch_walk(gn, t.nodes[0])]
    # the default (auto) sends each window-form walk to TIR
    assert len(window) >= 2, name
    assert all(lowers_to_tir(bundle, t, g) for t in window)
    eps = 0.25
    spec = InputSpec.linf(x, eps)
    C = margin_spec(np.zeros(2, dtype=int), 3)
    out = RelaxExecutor(bundle, g).run(spec, C)
    ref = TorchExecutor(bundle, g).run(spec, C)
    box = Interval(torch.as_tensor(x - eps), torch.as_tensor(x + eps))
    dense = reference_bounds(g, box, graph_tensors(g, torch.float64), torch.as_tensor(C.C),
                             DomainPlan.for_method(g, "crown"), patches=False)
    for other in (ref, dense):
        torch.testing.assert_close(out.lower, other.lower, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.upper, other.upper, rtol=1e-9, atol=1e-9)
    values = true_outputs(g, box_points(x - eps, x + eps, n=2000))
    assert_contains(out.lower, out.upper, values, C=C.C)
    if lowering is None:                 # the same intermediate bounds, then an IBP final step
        ibp = plan(g, bundle.workload, bundle.knobs.replace(final="ibp"), sparse=False)
        out, ref = RelaxExecutor(ibp, g).run(spec, C), TorchExecutor(ibp, g).run(spec, C)
        torch.testing.assert_close(out.lower, ref.lower, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.upper, ref.upper, rtol=1e-9, atol=1e-9)
        assert_contains(out.lower, out.upper, values, C=C.C)
