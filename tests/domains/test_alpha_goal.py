"""alpha-CROWN with a search's goal: the samples it proves leave the optimisation, and the
rest take exactly the steps they take in the full batch (``optimise(done=...)``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import boundflow.domains.alpha as alpha_mod
from boundflow.bab.bounder import PlanBounder
from boundflow.domains.adam import Adam
from boundflow.domains.alpha import AlphaConfig
from boundflow.domains.concrete import evaluate
from boundflow.ir.graph import GraphBuilder
from boundflow.ir.split import ReluSplit
from tests.helpers import counted_calls

C2 = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
RANGES = ((0, 1), (1, 2))          # two disjuncts, one row each
STEPS = AlphaConfig(iterations=6)


def _net(act: str, seed: int = 0, n_in: int = 3, hidden: int = 12):
    rng = np.random.default_rng(seed)
    attrs = {"min_val": -0.4, "max_val": 0.6} if act == "hardtanh" else {}
    b = GraphBuilder()
    h = b.input((n_in,))
    for _ in range(2):
        h = b.add_node("linear", [h], params={
            "weight": rng.standard_normal((hidden, b.shape(h)[0])) * 0.8,
            "bias": rng.standard_normal(hidden) * 0.3})
        h = b.add_node(act, [h], attrs=attrs)
    h = b.add_node("linear", [h], params={"weight": rng.standard_normal((3, hidden)) * 0.6,
                                          "bias": np.zeros(3)})
    return b.build(h)


def _boxes(n=96, d=3, seed=1):
    rng = np.random.default_rng(seed)
    lo = torch.from_numpy(rng.uniform(-1, 1, (n, d))).float()
    return lo, lo + torch.from_numpy(rng.uniform(0.05, 0.8, (n, d))).float()


# PAIRS_FRACTION 0: every dense start's rows the batch's union of inexact neurons; 2: each
# sample's own (alpha._Rows), whose slopes the shrink renumbers
@pytest.mark.parametrize("pairs", [0.0, 2.0])
@pytest.mark.parametrize("act", ["relu", "hardtanh"])   # hardtanh: two slopes per neuron
def test_proven_boxes_leave_and_the_rest_are_bounded_as_in_the_full_batch(monkeypatch, act,
                                                                          pairs):
    monkeypatch.setattr(alpha_mod, "PAIRS_FRACTION", pairs)
    g = _net(act)
    lo, hi = _boxes()
    plain = PlanBounder(g, C2, method="alpha-crown", batch=128, alpha=STEPS)
    full = plain(lo, hi)
    # thresholds that leave about half the boxes open, half proven at various steps
    thr = full.quantile(0.3, dim=0) - 0.05
    check = ReluSplit({}, goal=(thr, RANGES))
    takes = counted_calls(monkeypatch, Adam, "take")
    goal = PlanBounder(g, C2, method="alpha-crown", batch=128, alpha=STEPS,
                       goal=(thr, RANGES))
    lb = goal(lo, hi)
    assert takes                                               # the batch did shrink
    done_full, done = check.proven_rows(full), check.proven_rows(lb)
    assert 10 < int(done.sum()) < lo.shape[0] - 10
    assert torch.equal(done, done_full)                        # the same verdicts
    assert torch.allclose(lb[~done], full[~done], atol=1e-6, rtol=0)   # same steps
    assert (lb[done] <= full[done] + 1e-6).all()               # stopped, never tighter
    # sound: sampled points and corners of every box lie above the bounds
    pts = lo[:, None] + torch.rand(lo.shape[0], 200, 3) * (hi - lo)[:, None]
    corners = torch.tensor([[(k >> i) & 1 for i in range(3)] for k in range(8)]).float()
    pts = torch.cat([pts, lo[:, None] + corners[None] * (hi - lo)[:, None]], 1)
    cy = evaluate(g, pts.reshape(-1, 3).double()).reshape(lo.shape[0], -1, 3) \
        @ torch.as_tensor(C2).T
    assert (cy >= lb[:, None].double() - 1e-5).all()


@pytest.mark.parametrize("pairs", [0.0, 2.0])
def test_boxes_leaving_in_two_rounds_are_written_back_to_their_places(monkeypatch, pairs):
    """Two shrinks (the second indexes the survivors of the first): the boxes never done
    get exactly the full batch's bounds, those done keep the bound they had then."""
    monkeypatch.setattr(alpha_mod, "PAIRS_FRACTION", pairs)
    g = _net("relu", seed=2)
    lo, hi = _boxes(40)
    full = PlanBounder(g, C2, method="alpha-crown", batch=64, alpha=STEPS)(lo, hi)
    calls, retired = [0], []

    def proven_rows(self, lower):
        # retire every third of the live boxes at the first call, every second at the third
        calls[0] += 1
        done = torch.zeros(lower.shape[0], dtype=torch.bool)
        if calls[0] == 1:
            done[::3] = True
        elif calls[0] == 3:
            done[::2] = True
        return done
    monkeypatch.setattr(ReluSplit, "proven_rows", proven_rows)
    takes = counted_calls(monkeypatch, Adam, "take")
    lb = PlanBounder(g, C2, method="alpha-crown", batch=64, alpha=STEPS,
                     goal=(torch.zeros(2), RANGES))(lo, hi)
    assert len(takes) == 2
    first = torch.arange(40)[::3]                          # retired at the first shrink
    rest = torch.tensor([i for i in range(40) if i % 3])
    second = rest[::2]                                     # retired at the second
    never = torch.tensor(sorted(set(range(40)) - set(first.tolist()) - set(second.tolist())))
    assert torch.allclose(lb[never], full[never], atol=1e-6, rtol=0)
    retired = torch.cat([first, second])
    assert (lb[retired] <= full[retired] + 1e-6).all()
    assert not torch.allclose(lb[retired], full[retired], atol=1e-6)   # they stopped early


def test_it_stops_when_every_box_is_proven(monkeypatch):
    g = _net("relu")
    lo, hi = _boxes(16)
    thr = torch.tensor([-1e3, -1e3])            # CROWN's start proves them all
    passes = counted_calls(monkeypatch, alpha_mod, "backward")
    final = lambda: [p for p in passes if p[1] == g.output]  # noqa: E731  (not the rows')
    PlanBounder(g, C2, method="alpha-crown", batch=32, alpha=STEPS)(lo, hi)
    assert len(final()) == STEPS.iterations + 1
    passes.clear()
    PlanBounder(g, C2, method="alpha-crown", batch=32, alpha=STEPS, goal=(thr, RANGES))(lo, hi)
    assert len(final()) == 1


def test_proven_rows_needs_every_disjunct_and_a_nan_proves_nothing():
    split = ReluSplit({}, goal=(torch.zeros(3), ((0, 2), (2, 3))))
    lower = torch.tensor([[1.0, -1.0, 1.0],      # both disjuncts ruled out
                          [-1.0, -1.0, 1.0],     # the first one not
                          [1.0, 1.0, float("nan")]])
    assert split.proven_rows(lower).tolist() == [True, False, False]
    assert not split.proven(lower) and split.proven(lower[:1])
    assert not ReluSplit({}).proven_rows(lower).any()


@pytest.mark.parametrize("axis", [0, 1])
def test_adam_take_keeps_the_trajectory_of_the_entries_kept(axis):
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(4, 5, generator=gen)
    target = torch.randn(4, 5, generator=gen)
    keep = torch.tensor([0, 2, 3])

    def loss(p, t):
        return ((p - t) ** 3).abs().sum()

    a = init.clone().requires_grad_(True)
    opt_a = Adam([([a], 0.3)])
    b = init.clone().requires_grad_(True)
    opt_b = Adam([([b], 0.3)])
    for step in range(6):
        if step == 2:            # b goes on with the kept entries only
            nb = b.detach().index_select(axis, keep).requires_grad_(True)
            opt_b.take({b: (nb, axis)}, keep)
            b = nb
        for p, o, t in ((a, opt_a, target), (b, opt_b, target if step < 2
                                              else target.index_select(axis, keep))):
            o.zero_grad()
            loss(p, t).backward()
            o.step()
            o.decay(0.9)
    # (equal up to rounding: the fused kernel's vector and scalar tails round differently)
    assert torch.allclose(b, a.detach().index_select(axis, keep), atol=1e-6, rtol=0)
    assert not torch.allclose(b, init.index_select(axis, keep), atol=1e-2)


@pytest.mark.parametrize("act", ["relu", "hardtanh"])
def test_each_samples_own_rows_bound_as_the_batchs_union_does(monkeypatch, act):
    """A dense start's rows per (sample, neuron) pair give the bounds the union's rows give
    (a neuron exact in a sample changes nothing there), and sound ones."""
    g = _net(act, seed=3)
    lo, hi = _boxes(48, seed=4)
    out, used = {}, {}
    for pairs in (0.0, 2.0):
        monkeypatch.setattr(alpha_mod, "PAIRS_FRACTION", pairs)
        rows = counted_calls(monkeypatch, alpha_mod._Rows, "bound")
        out[pairs] = PlanBounder(g, C2, method="alpha-crown", batch=64, alpha=STEPS)(lo, hi)
        used[pairs] = len(rows)
        monkeypatch.undo()
    assert used[0.0] == 0 and used[2.0] > 0
    assert torch.allclose(out[0.0], out[2.0], atol=1e-5, rtol=1e-5)
    pts = lo[:, None] + torch.rand(lo.shape[0], 300, 3) * (hi - lo)[:, None]
    cy = evaluate(g, pts.reshape(-1, 3).double()).reshape(lo.shape[0], -1, 3) \
        @ torch.as_tensor(C2).T
    assert (cy >= out[2.0][:, None].double() - 1e-5).all()
