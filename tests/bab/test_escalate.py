"""The input-split search's second bound (alpha-CROWN on the children the plan leaves open,
in the rounds that choose it once the search has run ``ESCALATE_AFTER_S``): sound on every
box it touches, never before its time, only on open boxes, never looser than the plan's,
chosen by the measured rate, given up cleanly when it fails, and it decides a property
CROWN's splitting does not close (ACAS Xu 1_1 property 5)."""

from __future__ import annotations

import argparse
import importlib
import logging
import time

import numpy as np
import pytest
import torch

import boundflow.bab.escalate as escalate
from boundflow.bab import BabConfig, input_split
from boundflow.bab.bounder import PlanBounder
from boundflow.bab.escalate import EXPLORE, Escalation
from boundflow.domains.alpha import AlphaConfig
from boundflow.domains.concrete import evaluate
from boundflow.errors import BoundFlowError
from tests.bab.test_input_split import BENCH, _Checked, _net, _truth


def _margins(thr):
    return lambda lb: (lb - torch.as_tensor(thr, dtype=lb.dtype)).max(1).values


def _boxes(n=48, d=3, seed=0):
    rng = np.random.default_rng(seed)
    lo = torch.from_numpy(rng.uniform(-1, 1, (n, d))).float()
    return lo, lo + torch.from_numpy(rng.uniform(0.01, 0.5, (n, d))).float()


C2 = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
THR = np.array([0.0, 0.0])


def test_it_tightens_only_the_open_boxes_to_the_better_bound_soundly():
    g = _net(3, n_in=3)
    crown = PlanBounder(g, C2, method="crown", batch=64)
    alpha = _Checked(PlanBounder(g, C2, method="alpha-crown", batch=64,
                                 alpha=AlphaConfig(iterations=1)), C2)
    esc = Escalation(alpha, _margins(THR), after=0.5)
    lo, hi = _boxes()
    lb = crown(lo, hi)
    assert not esc.active
    esc.timed(0.6)
    assert esc.active
    lb[:8] = 1e3                                                  # proven: left alone
    out = esc(lo, hi, lb)
    open_ = ~(_margins(THR)(lb) > 0)
    assert esc.refined == int(open_.sum()) == alpha.checked        # every open box, once
    assert torch.equal(out[~open_], lb[~open_]) and (out >= lb).all()
    assert (out[open_] > lb[open_]).any()                         # and it does tighten
    best = torch.maximum(lb[open_], alpha.inner(lo[open_], hi[open_]))
    assert torch.allclose(out[open_], best, atol=1e-5, rtol=1e-5)  # the better of the two
    pts = lo[8:, None] + torch.rand(40, 64, 3) * (hi - lo)[8:, None]
    cy = evaluate(g, pts.reshape(-1, 3).double()).reshape(40, 64, 3) @ torch.as_tensor(C2).T
    assert (cy >= out[8:, None].double() - 1e-5).all()           # sound on sampled points


def test_a_worse_or_nan_second_bound_never_loosens_the_first():
    lo, hi = _boxes(6)
    lb = -torch.arange(1.0, 13.0).reshape(6, 2)                   # all open
    worse = lb - 1.0
    worse[2] = float("nan")
    esc = Escalation(lambda a, b: worse.clone(), _margins(THR), after=0.0)
    assert torch.equal(esc(lo, hi, lb), lb) and esc.refined == 6


def test_a_failing_second_bound_ends_escalation_with_a_log_line(caplog):
    def broken(lo, hi):
        raise BoundFlowError("alpha-CROWN does not cover op 'magic'")
    esc = Escalation(broken, _margins(THR), after=0.0)
    lo, hi = _boxes(4)
    lb = -torch.ones(4, 2)
    with caplog.at_level(logging.WARNING, logger="boundflow.bab"):
        assert esc(lo, hi, lb) is lb
    assert esc.failed and not esc.active and "op 'magic'" in caplog.text
    assert esc.round(lo, hi, lb, time.perf_counter(), lambda a, b: torch.ones(4)) is lb


def test_rounds_try_each_mode_then_follow_the_faster_one_and_still_explore():
    calls = []
    esc = Escalation(lambda lo, hi: calls.append(len(lo)) or torch.full((len(lo), 2), 5.0),
                     _margins(THR), after=1.0)
    lo, hi = _boxes(4)
    lb, vol = -torch.ones(4, 2), (lambda a, b: torch.full((a.shape[0],), 0.25))
    assert esc.round(lo, hi, lb, time.perf_counter(), vol) is lb and not calls  # not yet
    esc.timed(1.0)
    assert torch.equal(esc.round(lo, hi, lb, time.perf_counter(), vol), lb)  # plan alone
    assert esc.rate[False] == 0.0 and not calls
    assert (esc.round(lo, hi, lb, time.perf_counter(), vol) > 0).all() and calls == [4]
    assert esc.rate[True] > 0                                      # closed all 4 boxes
    esc.rate[True], esc.rate[False] = 2.0, 1.0
    esc.time[True], esc.time[False] = 10.0, 5.0
    assert [esc.choose() for _ in range(3)] == [True] * 3          # the faster one runs
    esc.time[True], esc.time[False] = 10.0, 0.5                    # its rival starved
    assert esc.choose() is False
    esc.time[False] = 2 * EXPLORE * 12.0                           # its share had
    assert esc.choose() is True
    esc.rate[False] = 2.0
    assert esc.choose() is False                                   # a tie: the cheap one
    esc.rate[False], esc.time[True], esc.time[False] = 3.0, 4.0, 6.0
    assert esc.choose() is True                    # alpha's floor: half the time at least
    esc.time[True] = 6.0
    assert esc.choose() is False
    # a round that chose alpha with no open child is a round of the plan alone
    esc.rate[False], before = 0.5, esc.time[False]
    proven = torch.ones(4, 2)
    assert esc.round(lo, hi, proven, time.perf_counter(), vol) is proven
    assert calls == [4] and esc.time[False] > before


def test_no_round_is_escalated_past_the_deadline():
    """The refinement's time is estimated per open box: before any, from the plan's time per
    box; after one, from its own."""
    calls = []
    esc = Escalation(lambda lo, hi: calls.append(1) or torch.ones(len(lo), 2), _margins(THR),
                     after=0.0, deadline=time.monotonic() + 30)
    lo, hi = _boxes(4)
    vol = lambda a, b: torch.ones(a.shape[0])                        # noqa: E731
    esc.round(lo, hi, -torch.ones(4, 2), time.perf_counter(), vol)   # the plan alone first
    esc.timed(1.0, boxes=4)                          # 4 open boxes x 25 x 0.25 s: 25 s
    esc.round(lo, hi, -torch.ones(4, 2), time.perf_counter(), vol)
    assert calls == [1]
    esc.box_s = 10.0                                 # measured: 4 x 10 s, past the deadline
    esc.time[True] = esc.time[False] = 1.0           # no exploration due
    assert esc.rate[True] > esc.rate[False] == 0.0 and esc.choose()  # alpha is chosen
    esc.round(lo, hi, -torch.ones(4, 2), time.perf_counter(), vol)
    assert calls == [1]
    esc.time[True] = esc.time[False] = 1.0          # no exploration due
    one_open = torch.cat([-torch.ones(1, 2), torch.ones(3, 2)])    # 1 x 10 s: in time
    esc.round(lo, hi, one_open, time.perf_counter(), vol)
    assert calls == [1, 1]


def test_out_of_memory_ends_escalation_and_other_errors_surface():
    lo, hi = _boxes(2)

    def oom(lo, hi):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not "
                           "enough memory: you tried to allocate 10000000000000 bytes.")
    esc = Escalation(oom, _margins(THR), after=0.0)
    assert esc(lo, hi, -torch.ones(2, 2)) is not None and esc.failed

    def bug(lo, hi):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes"):
        Escalation(bug, _margins(THR), after=0.0)(lo, hi, -torch.ones(2, 2))


def test_a_nan_plan_bound_takes_the_second_bound():
    lo, hi = _boxes(3)
    lb = torch.tensor([[float("nan"), -1.0], [-1.0, -1.0], [-2.0, -3.0]])
    esc = Escalation(lambda a, b: torch.full((len(a), 2), -0.5), _margins(THR), after=0.0)
    out = esc(lo, hi, lb)
    assert torch.equal(out, torch.tensor([[-0.5, -0.5], [-0.5, -0.5], [-0.5, -0.5]]))


def random_escalated_search(seed, monkeypatch, target="llvm"):
    """A random net's search escalating every round from the start, its bounds checked on
    sampled points and corners of every batch: ``(graph, box, C, thr, bounder, refiner,
    result)``, the plans run on ``target``."""
    monkeypatch.setattr(escalate, "ESCALATE_AFTER_S", 0.0)
    monkeypatch.setattr(Escalation, "choose", lambda self: True)
    g = _net(seed)
    lo, hi = np.array([-1.0, -0.5]), np.array([0.5, 1.0])
    C = np.array([[1.0, -1.0, 0.0]])
    rng = np.random.default_rng(100 + seed)
    y = evaluate(g, torch.from_numpy(lo + rng.random((4000, 2)) * (hi - lo))).numpy() @ C.T
    thr = np.quantile(y, 0.002, axis=0) - (0.05 if seed % 2 else -0.02)
    bounder = _Checked(PlanBounder(g, C, method="crown", batch=64, target=target), C)
    # with the search's goal: alpha drops the boxes it proves from its optimisation
    refiner = _Checked(PlanBounder(g, C, method="alpha-crown", batch=64,
                                   alpha=AlphaConfig(iterations=3), target=target,
                                   goal=(torch.as_tensor(thr), ((0, 1),))), C)
    res = input_split(g, lo, hi, C, thr, [(0, 1)], BabConfig(batch=64, max_domains=20_000),
                      bounder=bounder, refiner=refiner, deadline=time.monotonic() + 60)
    return g, (lo, hi), C, thr, bounder, refiner, res


@pytest.mark.parametrize("seed", range(6))
def test_escalated_searches_are_sound_and_never_wrong(seed, monkeypatch):
    """Escalating every round from the start: every batch of either bound holds on sampled
    points and corners of its boxes, and the verdict agrees with dense sampling."""
    g, (lo, hi), C, thr, bounder, refiner, res = random_escalated_search(seed, monkeypatch)
    if _truth(g, lo, hi, C, thr, [(0, 1)]):
        assert res.status != "unsat", "unsat where a counterexample exists"
    assert res.status in ("unsat", "sat")
    assert res.refined == refiner.checked
    if res.domains > 1:
        assert res.refined > 0
    assert res.bound_calls == bounder.calls + refiner.inner.calls


def _escalating_search(monkeypatch):
    """A net, box, spec row and threshold (just below the sampled minimum: unsat, needs
    splitting), with escalation from the first round on."""
    monkeypatch.setattr(escalate, "ESCALATE_AFTER_S", 0.0)
    monkeypatch.setattr(Escalation, "choose", lambda self: True)
    g = _net(1)
    lo, hi = np.array([-1.0, -0.5]), np.array([0.5, 1.0])
    C = np.array([[1.0, -1.0, 0.0]])
    y = evaluate(g, torch.from_numpy(lo + np.random.default_rng(1).random((4000, 2))
                                     * (hi - lo))).numpy() @ C.T
    return g, lo, hi, C, y.min(0) - 0.05


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_the_searchs_alpha_bounds_carry_its_goal(method, monkeypatch):
    """Every alpha-CROWN bound of a search (the escalation's, or the search's own) is
    given the search's goal, so its optimisation drops the boxes it proves."""
    split_module = importlib.import_module("boundflow.bab.input_split")
    made = []

    def spy(*args, **kwargs):
        made.append((kwargs["method"], kwargs.get("goal")))
        return PlanBounder(*args, **kwargs)
    monkeypatch.setattr(split_module, "PlanBounder", spy)
    g, lo, hi, C, thr = _escalating_search(monkeypatch)
    res = input_split(g, lo, hi, C, thr, [(0, 1)], BabConfig(batch=64, method=method),
                      deadline=time.monotonic() + 60)
    assert res.status == "unsat" and (res.refined > 0 or method == "alpha-crown")
    alphas = [goal for m, goal in made if m == "alpha-crown"]
    assert alphas and all(goal is not None and list(goal[1]) == [(0, 1)]
                          and abs(float(goal[0][0]) - float(thr[0])) < 1e-6 for goal in alphas)
    assert all(goal is None for m, goal in made if m != "alpha-crown")


@pytest.mark.parametrize("config", [BabConfig(batch=64, escalate="none"),
                                    BabConfig(batch=64, method="alpha-crown")])
def test_none_and_alpha_crown_searches_never_escalate(config, monkeypatch):
    g, lo, hi, C, thr = _escalating_search(monkeypatch)
    res = input_split(g, lo, hi, C, thr, [(0, 1)], config, deadline=time.monotonic() + 60)
    assert res.status == "unsat" and res.domains > 3 and res.refined == 0
    on = input_split(g, lo, hi, C, thr, [(0, 1)], BabConfig(batch=64),
                     deadline=time.monotonic() + 60)
    assert on.status == "unsat" and on.refined > 0                 # the same search escalates


def test_the_cli_option_reaches_the_search():
    from boundflow.cli import _bab_config

    args = argparse.Namespace(bab="auto", bab_batch=64, branching="sensitivity",
                              max_domains=10, bab_method="crown", queue_mb=64,
                              bab_escalate="none")
    assert _bab_config(args).escalate == "none"
    args.bab_escalate = "alpha"
    assert _bab_config(args).escalate == "alpha"


# ACAS Xu property 5 (VNN-COMP's prop_5.vnnlib: the normalised input box, and "strong right
# is not minimal": y_i <= y_4 for some i < 4), on the shared network 1_1, where it holds
_PROP5_LO = np.array([-0.324274257, 0.031830989, -0.499999896, -0.5, -0.5])
_PROP5_HI = np.array([-0.321785085, 0.063661977, -0.499204121, -0.227272727, -0.166666667])
_ACAS = BENCH / "acasxu" / "onnx" / "ACASXU_run2a_1_1_batch_2000.onnx"


@pytest.mark.skipif(not _ACAS.exists(), reason=f"shared ACAS Xu network not found at {_ACAS}")
def test_it_decides_a_property_crown_splitting_does_not_close(tmp_path, capsys):
    """CROWN alone left this open after 700,000 boxes (116 s); ``verify`` escalated decides
    it, and says how many boxes were bounded again."""
    import json

    from boundflow.cli import main

    names = "".join(f"(declare-const X_{i} Real)\n(declare-const Y_{i} Real)\n"
                    for i in range(5))
    box = "".join(f"(assert (>= X_{i} {float(lo)!r}))\n(assert (<= X_{i} {float(hi)!r}))\n"
                  for i, (lo, hi) in enumerate(zip(_PROP5_LO, _PROP5_HI)))
    unsafe = "(assert (or " + " ".join(f"(<= Y_{i} Y_4)" for i in range(4)) + "))\n"
    vnnlib = tmp_path / "prop_5.vnnlib"
    vnnlib.write_text(names + box + unsafe)
    assert main(["verify", "--onnx", str(_ACAS), "--vnnlib", str(vnnlib), "--json",
                 "--timeout", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "unsat" and out["strategy"] == "input"
    assert 0 < out["refined"] < out["domains"]


def test_bad_escalation_is_one_clear_error():
    with pytest.raises(BoundFlowError, match="escalation"):
        BabConfig(escalate="beta")
