"""Input splitting's branching rules: the CROWN coefficients a box's bound leaves behind are
that bound's (the model's gradient on a box inside one linear piece; a sound linear bound
whose minimum over a wide box is the plan's bound), and each rule picks the dimension its
score says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boundflow.bab.bounder import PlanBounder
from boundflow.bab.branching import RULES, coefficients, split_dims
from boundflow.domains.backward import linear_bounds
from boundflow.domains.coeffs import BackwardContext
from boundflow.domains.concrete import evaluate
from boundflow.domains.traversal import graph_tensors
from boundflow.ir.analysis import preactivations
from tests.bab.test_input_split import _net


def _bounded(g, C, lo, hi):
    bounder = PlanBounder(g, C, method="crown", batch=lo.shape[0], keep=preactivations(g))
    lb = bounder(lo, hi)
    return bounder, lb


@pytest.mark.parametrize("seed", range(3))
def test_coefficients_are_the_gradient_on_a_box_inside_one_linear_piece(seed):
    g = _net(seed, n_in=3, hidden=10)
    C = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.uniform(-1, 1, (8, 3)))
    lo, hi = x - 1e-7, x + 1e-7                  # no ReLU input changes sign in the box
    bounder, lb = _bounded(g, C, lo, hi)
    rows = torch.from_numpy(C)[torch.arange(8) % 2]
    lA = coefficients(g, graph_tensors(g, bounder.dtype), bounder.kept, rows.to(bounder.dtype))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((evaluate(g, xg) * rows).sum(), xg)
    assert lA.shape == (8, 3)
    torch.testing.assert_close(lA.double(), grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_coefficients_give_a_sound_linear_bound_whose_minimum_is_the_plans(seed):
    g = _net(10 + seed, n_in=2, hidden=12)
    C = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [1.0, 0.0, -1.0]])
    rng = np.random.default_rng(seed)
    centre = torch.from_numpy(rng.uniform(-1, 1, (16, 2)))
    rad = torch.from_numpy(rng.uniform(0.05, 0.6, (16, 2)))
    lo, hi = centre - rad, centre + rad
    bounder, lb = _bounded(g, C, lo, hi)
    row = torch.arange(16) % 3
    rows = torch.from_numpy(C)[row].to(bounder.dtype)
    tensors = graph_tensors(g, bounder.dtype)
    lA = coefficients(g, tensors, bounder.kept, rows).double()
    # the constant of the same walk (CROWN's: what backward() concretises)
    _, const, _ = linear_bounds(g, g.output, rows.reshape(16, 1, 3), tensors,
                                BackwardContext(bounder.kept, "adaptive", None))
    const = const.reshape(16).double()
    mid, r = (lo + hi) / 2, (hi - lo) / 2
    minimum = (lA * mid).sum(1) - (lA.abs() * r).sum(1) + const
    plan = lb.double()[torch.arange(16), row]
    # the plan's bound is this minimum (or IBP's, where that is higher: never lower)
    assert (minimum <= plan + 1e-5).all()
    assert torch.isclose(minimum, plan, rtol=1e-5, atol=1e-5).float().mean() >= 0.5
    pts = lo[:, None] + torch.rand((16, 400, 2), dtype=torch.float64) * (hi - lo)[:, None]
    y = evaluate(g, pts.reshape(-1, 2)).reshape(16, 400, 3)
    true = (y * torch.from_numpy(C)[row][:, None]).sum(-1)
    line = (pts * lA[:, None]).sum(-1) + const[:, None]
    assert (line <= true + 1e-5).all(), "the linear bound is not below the model"


def test_no_coefficients_without_the_bounds_of_every_relu_input():
    g = _net(0)
    rows = torch.ones(4, 3, dtype=torch.float32)
    assert coefficients(g, graph_tensors(g, torch.float32), {}, rows) is None


def test_each_rule_picks_the_dimension_its_score_says():
    lo = torch.zeros(3, 3)
    hi = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    grad = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    co = torch.tensor([[0.0, 100.0, 101.0], [0.0, 0.0, 9.0], [0.0, 0.0, 0.0]])
    assert split_dims("widest", lo, hi, grad, co).tolist() == [0, 1, 0]
    assert split_dims("sensitivity", lo, hi, grad, co).tolist() == [0, 1, 0]
    assert split_dims("coefficients", lo, hi, grad, co).tolist() == [2, 2, 0]
    # box 0: shares (3/4, 1/4, 0) and (0, 100/201, 101/201): the geometric mean is nonzero
    # on dimension 1 alone, where both slopes are (their sum, 3/4 against 0.75 and 0.5,
    # would take dimension 0; a plain sum of the slopes, 3 against 101 and 101, would
    # follow the coefficients' scale to dimension 2)
    # box 1: sqrt(1/3 * 1) on dimension 2 only: 2; box 2: no slope, the widest
    assert split_dims("combined", lo, hi, grad, co).tolist() == [1, 2, 0]
    # slopes on no common dimension: no agreement, the widest (not the gradient's 0)
    assert split_dims("combined", lo[:1], torch.tensor([[1.0, 1.0, 2.0]]),
                      torch.tensor([[1.0, 0.0, 0.0]]),
                      torch.tensor([[0.0, 1.0, 0.0]])).tolist() == [2]
    # coefficients unknown (zero, or None) leave the gradient's choice
    assert split_dims("combined", lo, hi, grad, torch.zeros(3, 3)).tolist() == [0, 1, 0]
    assert split_dims("combined", lo[:1], hi[1:2], torch.tensor([[0.0, 0.0, 5.0]]),
                      torch.zeros(1, 3)).tolist() == [2]          # not the widest, 1
    # no gradient (the row flat at the centre): the widest, not the coefficients' choice
    assert split_dims("combined", lo[:1], hi[1:2], torch.zeros(1, 3),
                      torch.tensor([[0.0, 0.0, 5.0]])).tolist() == [1]
    # the geometric mean, not the product: shares (0.4, 0.6) both, widths (2, 1): 0.8
    # against 0.6 (the product, 0.32 against 0.36, would take dimension 1)
    assert split_dims("combined", lo[:1, :2], torch.tensor([[2.0, 1.0]]),
                      torch.tensor([[0.4, 0.6]]), torch.tensor([[4.0, 6.0]])).tolist() == [0]
    # the two slopes in different precisions
    assert split_dims("combined", lo[:1], hi[1:2], torch.tensor([[0.0, 1.0, 5.0]]),
                      torch.tensor([[0.0, 2.0, 1.0]], dtype=torch.float64)).tolist() == [1]
    assert split_dims("combined", lo, hi, grad, None).tolist() == [0, 1, 0]
    assert split_dims("coefficients", lo, hi, grad, None).tolist() == [0, 1, 0]
    assert set(RULES) == {"combined", "sensitivity", "coefficients", "widest"}


def test_a_nan_slope_is_no_slope():
    lo, hi = torch.zeros(1, 2), torch.tensor([[1.0, 2.0]])
    grad = torch.tensor([[float("nan"), 1.0]])
    assert split_dims("sensitivity", lo, hi, grad, None).tolist() == [1]


@pytest.mark.parametrize("rule", ["combined", "sensitivity"])
def test_the_search_branches_on_the_coefficients_of_its_own_bounds(rule, monkeypatch):
    import importlib

    module = importlib.import_module("boundflow.bab.input_split")
    seen = []

    def spy(rule_, lo, hi, grad, coeffs):
        seen.append((rule_, coeffs.clone()))
        return split_dims(rule_, lo, hi, grad, coeffs)

    monkeypatch.setattr(module, "split_dims", spy)
    g = _net(5, hidden=24)
    lo, hi = np.array([-1.0, -0.5]), np.array([0.5, 1.0])
    C = np.array([[1.0, -1.0, 0.0]])
    grid = np.stack(np.meshgrid(*[np.linspace(a, b, 400) for a, b in zip(lo, hi)]), -1)
    thr = (evaluate(g, torch.from_numpy(grid.reshape(-1, 2))).numpy() @ C.T).min(0) - 1e-3
    from boundflow.bab import BabConfig, input_split

    res = input_split(g, lo, hi, C, thr, [(0, 1)], BabConfig(batch=4, branching=rule))
    assert res.status == "unsat" and seen and all(r == rule for r, _ in seen)
    given = [bool((c != 0).any()) for _, c in seen]
    # the default rule gets every queued box's coefficients; the gradient's rule none
    assert all(given) if rule == "combined" else not any(given)


def _rewritten_net(kind: str):
    """A net whose plans run on a rewritten graph (BatchNorm folded, an identity dropped),
    or whose first ReLU reads the input itself."""
    from boundflow.ir import GraphBuilder

    rng = np.random.default_rng(7)
    b = GraphBuilder()
    h = b.input((3,))

    def lin(h, n):
        return b.add_node("linear", [h], params={
            "weight": rng.standard_normal((n, b.shape(h)[0])) * 0.7,
            "bias": rng.standard_normal(n) * 0.2})
    if kind == "relu on the input":
        h = b.add_node("relu", [h])
    z = lin(h, 10)
    if kind == "batchnorm":
        z = b.add_node("batchnorm", [z], params={
            "mean": rng.standard_normal(10) * 0.1, "var": np.ones(10), "weight": np.ones(10),
            "bias": np.zeros(10)}, attrs={"eps": 1e-5})
    if kind == "identity":
        z = b.add_node("identity", [z])
    h = b.add_node("relu", [z])
    h = b.add_node("relu", [lin(h, 10)])
    return b.build(lin(h, 3))


@pytest.mark.parametrize("kind", ["batchnorm", "identity", "relu on the input"])
def test_coefficients_reach_the_branching_on_a_rewritten_graph(kind, monkeypatch):
    import importlib

    from boundflow.bab import BabConfig, input_split

    module = importlib.import_module("boundflow.bab.input_split")
    seen = []

    def spy(rule_, lo, hi, grad, coeffs):
        seen.append(bool((coeffs != 0).any()))
        return split_dims(rule_, lo, hi, grad, coeffs)

    monkeypatch.setattr(module, "split_dims", spy)
    g = _rewritten_net(kind)
    lo, hi = -np.ones(3), np.ones(3)
    C = np.array([[1.0, -1.0, 0.0]])
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 41)] * 3), -1).reshape(-1, 3)
    thr = (evaluate(g, torch.from_numpy(grid)).numpy() @ C.T).min(0) - 0.1
    res = input_split(g, lo, hi, C, thr, [(0, 1)], BabConfig(batch=8, escalate="none",
                                                             max_domains=2_000))
    assert res.domains > 1 and seen and all(seen)


def test_a_nan_slope_entry_leaves_the_others_their_ranking():
    lo, hi = torch.zeros(1, 3), torch.ones(1, 3)
    grad = torch.tensor([[float("nan"), 1.0, 2.0]])
    co = torch.tensor([[0.0, 3.0, 1.0]])
    # shares: gradient 0, 1/3, 2/3; coefficients 0, 3/4, 1/4: geometric means 0, 1/2,
    # 0.41: dimension 1
    assert split_dims("combined", lo, hi, grad, co).tolist() == [1]


@pytest.mark.parametrize("kind", ["batchnorm", "identity"])
def test_the_forward_screen_runs_on_a_rewritten_graph(kind):
    """The screen's reference bounds name the plan graph's ReLU inputs (a model's names
    were refused as nodes the plan does not compute)."""
    from boundflow.bab import BabConfig, input_split
    from boundflow.bab.bounder import ForwardScreen

    g = _rewritten_net(kind)
    C = np.array([[1.0, -1.0, 0.0]])
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 41)] * 3), -1).reshape(-1, 3)
    thr = (evaluate(g, torch.from_numpy(grid)).numpy() @ C.T).min(0) - 0.1
    assert ForwardScreen.usable(g, "crown")
    res = input_split(g, -np.ones(3), np.ones(3), C, thr, [(0, 1)],
                      BabConfig(batch=8, screen="forward", branching="widest",
                                escalate="none", max_domains=5_000))
    assert res.status == "unsat" and res.domains > 1
