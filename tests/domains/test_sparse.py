"""Sparse intermediate bounds (the ``sparse`` option). Auto (``None``, the default) bounds
only the neurons of a crown layer whose tighter bound can change a result, where that is
faster, and must give the bounds of bounding every neuron (``False``); ``True`` bounds only
the IBP-unstable ones (looser downstream, still sound)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import boundflow as bf
from boundflow.domains import crown as crown_mod
from boundflow.domains.crown import crown_nodes, intermediate_bounds
from boundflow.domains.crown_relaxed import settled
from boundflow.domains.interval import Interval
from boundflow.domains.traversal import graph_tensors
from boundflow.ir import DomainPlan, GraphBuilder
from tests.helpers import assert_contains, box_points, example_graph, true_outputs

EXAMPLES = ["random_mlp", "random_deep_mlp", "random_cnn", "random_residual"]
ALPHA = bf.AlphaConfig(iterations=5)


@pytest.fixture(params=["rule", "always"])
def fractions(request, monkeypatch):
    """The auto rule as it is, or taking the sparse walk wherever a neuron can be skipped
    (so the sparse walks run on every example)."""
    if request.param == "always":
        _always(monkeypatch)
    return request.param


def _always(monkeypatch):
    monkeypatch.setattr(crown_mod, "DENSE_FRACTION", 1.0)
    monkeypatch.setattr(crown_mod, "DENSE_MIN_SAVED", 0)
    monkeypatch.setattr(crown_mod, "PATCH_FRACTION", 1.0)


def _intervals(g, x, eps, sparse):
    box = Interval(torch.as_tensor(x - eps), torch.as_tensor(x + eps))
    return intermediate_bounds(g, box, graph_tensors(g, torch.float64),
                               DomainPlan.for_method(g, "crown"), sparse=sparse)


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_auto_sparse_gives_the_bounds_of_every_neuron_and_is_sound(name, method, fractions):
    ex, graph = example_graph(name)
    x, eps = ex.inputs[:3].astype(np.float32), 0.02
    C = bf.margin_spec(np.array([0, 1, 2]), graph.output_shape[-1]).C
    auto = bf.compute_bounds(graph, x, eps=eps, C=C, method=method, alpha=ALPHA)
    full = bf.compute_bounds(graph, x, eps=eps, C=C, method=method, alpha=ALPHA, sparse=False)
    assert auto.lower.dtype == torch.float32
    torch.testing.assert_close(auto.lower, full.lower, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(auto.upper, full.upper, rtol=1e-5, atol=1e-5)
    values = true_outputs(graph, box_points(x - eps, x + eps, n=2000))
    assert_contains(auto.lower, auto.upper, values, C=C, tol=1e-5, what=f"auto sparse {name}")


@pytest.mark.parametrize("name", EXAMPLES)
def test_auto_sparse_leaks_no_loose_interval_into_a_reader(name, monkeypatch):
    """Every interval under auto equals that of bounding every neuron, except skipped
    neurons' own, which must be settled (their readers map them to one point) and contain
    the tighter one. ``True`` leaves stable neurons' IBP intervals to IBP downstream."""
    _always(monkeypatch)
    ex, g = example_graph(name)
    x = ex.inputs[:3].astype(np.float64)
    full, auto, unstable = (_intervals(g, x, 0.02, s) for s in (False, None, True))
    tightened = crown_nodes(g, DomainPlan.for_method(g, "crown"))
    skipped, leaked = 0, 0.0
    for node in g.nodes:
        a, f, u = auto[node.name], full[node.name], unstable[node.name]
        if node.name not in tightened:
            torch.testing.assert_close(a.lower, f.lower, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(a.upper, f.upper, rtol=1e-10, atol=1e-10)
            leaked = max(leaked, float((u.upper - f.upper).max()))
            continue
        differs = ((a.lower - f.lower).abs() > 1e-10) | ((a.upper - f.upper).abs() > 1e-10)
        assert not (differs & ~settled(g, node.name, a)).any(), node.name
        assert torch.all(a.lower <= f.lower + 1e-10) and torch.all(a.upper >= f.upper - 1e-10)
        skipped += int(differs.sum())
    assert skipped > 0                  # the sparse walk did skip neurons
    assert leaked > 1e-3                # and True does leak: the check can tell


def test_settled_needs_every_reader_to_map_the_neuron_to_one_point():
    b = GraphBuilder("float64")
    p = b.add_node("linear", [b.input((2,))], params={"weight": np.eye(2)})
    q = b.add_node("linear", [b.add_node("relu", [p])], params={"weight": np.eye(2)})
    both = b.add_node("add", [b.add_node("relu", [q]), q])
    g = b.build(b.add_node("sigmoid", [both]))
    iv = Interval(torch.tensor([[-2.0, -1.0]]), torch.tensor([[-0.5, 1.0]]))
    assert settled(g, p, iv).tolist() == [[True, False]]           # relu: u <= 0
    assert not settled(g, q, iv).any()                             # also read by add
    assert not settled(g, g.output, iv).any()                      # a result
    point = Interval(torch.tensor([[0.5, -1.0]]), torch.tensor([[0.5, 1.0]]))
    assert settled(g, both, point).tolist() == [[True, False]]     # sigmoid of a point


@pytest.mark.parametrize("bad", ["auto", 1, 0.0])
def test_sparse_takes_none_true_or_false(bad):
    ex, graph = example_graph("random_mlp")
    with pytest.raises(bf.BoundFlowError, match="sparse"):
        bf.compute_bounds(graph, ex.inputs[:1], eps=0.01, method="crown", sparse=bad)


def test_the_plan_records_the_sparse_setting():
    from boundflow.ir.plan import PlanBundle
    from boundflow.ir.workload import Workload
    from boundflow.planner import check_plan, plan

    _, graph = example_graph("random_deep_mlp")
    work = Workload.of(graph, batch=2, method="crown")
    bundle = plan(graph, work)
    assert bf.api.BoundOptions().sparse is None and bundle.domain_plan.sparse is None
    assert PlanBundle.from_json(bundle.to_json()) == bundle
    assert check_plan(graph, bundle) is bundle
    for setting in (True, False):
        assert plan(graph, work, sparse=setting).domain_plan.sparse is setting
    ibp = plan(graph, Workload.of(graph, batch=2, method="ibp"))
    assert ibp.domain_plan.sparse is False                  # no crown tasks: nothing to pick
