"""The input-split search's second bound (alpha-CROWN on the boxes the plan leaves open,
once the search has run ``ESCALATE_AFTER_S``): sound on every box it touches, never before
its time, only on open boxes, and it decides a property CROWN's splitting does not close
(ACAS Xu 1_1 property 5)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import boundflow.bab.escalate as escalate
from boundflow.bab import BabConfig, input_split
from boundflow.bab.bounder import PlanBounder
from boundflow.bab.escalate import Escalation
from boundflow.domains.alpha import AlphaConfig
from boundflow.domains.concrete import evaluate
from tests.bab.test_input_split import BENCH, _Checked, _net, _truth


def _margins(thr):
    return lambda lb: (lb - torch.as_tensor(thr, dtype=lb.dtype)).max(1).values


def test_it_waits_its_time_then_tightens_only_the_open_boxes_soundly():
    g = _net(3, n_in=3)
    C = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    thr = np.array([0.0, 0.0])
    crown = PlanBounder(g, C, method="crown", batch=64)
    alpha = _Checked(PlanBounder(g, C, method="alpha-crown", batch=64,
                                 alpha=AlphaConfig(iterations=1)), C)
    esc = Escalation(alpha, _margins(thr), after=0.5)
    rng = np.random.default_rng(0)
    lo = torch.from_numpy(rng.uniform(-1, 1, (48, 3))).float()
    hi = lo + torch.from_numpy(rng.uniform(0.01, 0.5, (48, 3))).float()
    lb = crown(lo, hi)
    assert esc(lo, hi, lb) is lb and esc.refined == 0            # not yet: nothing spent
    esc.timed(0.6)
    assert esc.active and esc.switching() and not esc.switching()  # the queue's turn, once
    lb[:8] = 1e3                                                  # proven: left alone
    out = esc(lo, hi, lb)
    open_ = ~(_margins(thr)(lb) > 0)
    assert esc.refined == int(open_.sum()) == alpha.checked        # every open box, once
    assert torch.equal(out[:8], lb[:8]) and (out >= lb).all()     # only tightens
    assert (out[8:] > lb[8:]).any()                               # and does tighten
    # exactly the better of the two bounds on each open box, the plan's on the others
    best = torch.maximum(lb[open_], alpha.inner(lo[open_], hi[open_]))
    assert torch.allclose(out[open_], best, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[~open_], lb[~open_])
    # the combined bound holds on sampled points of each box
    pts = lo[8:, None] + torch.rand(40, 64, 3) * (hi - lo)[8:, None]
    cy = evaluate(g, pts.reshape(-1, 3).double()).reshape(40, 64, 3) @ \
        torch.as_tensor(C).T
    assert (cy >= out[8:, None].double() - 1e-5).all()


@pytest.mark.parametrize("seed", range(6))
def test_escalated_searches_are_sound_and_never_wrong(seed, monkeypatch):
    """Escalating from the start: every batch of either bound holds on sampled points and
    corners of its boxes, and the verdict agrees with dense sampling."""
    monkeypatch.setattr(escalate, "ESCALATE_AFTER_S", 0.0)
    g = _net(seed)
    lo, hi = np.array([-1.0, -0.5]), np.array([0.5, 1.0])
    C = np.array([[1.0, -1.0, 0.0]])
    rng = np.random.default_rng(100 + seed)
    y = evaluate(g, torch.from_numpy(lo + rng.random((4000, 2)) * (hi - lo))).numpy() @ C.T
    thr = np.quantile(y, 0.002, axis=0) - (0.05 if seed % 2 else -0.02)
    bounder = _Checked(PlanBounder(g, C, method="crown", batch=64), C)
    refiner = _Checked(PlanBounder(g, C, method="alpha-crown", batch=64,
                                   alpha=AlphaConfig(iterations=1)), C)
    res = input_split(g, lo, hi, C, thr, [(0, 1)], BabConfig(batch=64, max_domains=20_000),
                      bounder=bounder, refiner=refiner, deadline=time.monotonic() + 60)
    if _truth(g, lo, hi, C, thr, [(0, 1)]):
        assert res.status != "unsat", "unsat where a counterexample exists"
    assert res.status in ("unsat", "sat")
    assert res.refined == refiner.checked
    if res.domains > 1:
        assert res.refined > 0
    assert res.bound_calls == bounder.calls + refiner.inner.calls


def test_none_never_escalates(monkeypatch):
    monkeypatch.setattr(escalate, "ESCALATE_AFTER_S", 0.0)
    g = _net(1)
    lo, hi = np.array([-1.0, -0.5]), np.array([0.5, 1.0])
    C = np.array([[1.0, -1.0, 0.0]])
    y = evaluate(g, torch.from_numpy(lo + np.random.default_rng(1).random((4000, 2))
                                     * (hi - lo))).numpy() @ C.T
    res = input_split(g, lo, hi, C, y.min(0) - 0.05, [(0, 1)],
                      BabConfig(batch=64, escalate="none"), deadline=time.monotonic() + 60)
    assert res.refined == 0 and res.status == "unsat"


# ACAS Xu property 5 (VNN-COMP's prop_5.vnnlib: the normalised input box, and "strong right
# is not minimal": y_i <= y_4 for some i < 4), on the shared network 1_1, where it holds
_PROP5_LO = np.array([-0.324274257, 0.031830989, -0.499999896, -0.5, -0.5])
_PROP5_HI = np.array([-0.321785085, 0.063661977, -0.499204121, -0.227272727, -0.166666667])
_ACAS = BENCH / "acasxu" / "onnx" / "ACASXU_run2a_1_1_batch_2000.onnx"


@pytest.mark.skipif(not _ACAS.exists(), reason=f"shared ACAS Xu network not found at {_ACAS}")
def test_it_decides_a_property_crown_splitting_does_not_close():
    """CROWN alone left this open after 700,000 boxes (116 s); escalated, it is decided."""
    from boundflow.frontend.onnx import load_onnx

    g = load_onnx(_ACAS)
    C = np.zeros((4, 5))
    C[np.arange(4), np.arange(4)], C[:, 4] = 1.0, -1.0            # y_i - y_4 > 0 refutes
    res = input_split(g, _PROP5_LO, _PROP5_HI, C, np.zeros(4), [(i, i + 1) for i in range(4)],
                      BabConfig(), deadline=time.monotonic() + 100)
    assert res.status == "unsat" and res.refined > 0


def test_bad_escalation_is_one_clear_error():
    from boundflow.errors import BoundFlowError

    with pytest.raises(BoundFlowError, match="escalation"):
        BabConfig(escalate="beta")
