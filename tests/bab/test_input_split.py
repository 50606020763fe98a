"""Input-split branch-and-bound: every batch's bounds hold on sampled points of each sub-box,
verdicts are never wrong (small random nets whose truth dense sampling decides, and the
shared VNN-COMP instances), counterexamples are checked, and bad settings are refused."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
import torch

from boundflow.bab import BabConfig, choose_strategy, input_split
from boundflow.bab.bounder import PlanBounder, float_box
from boundflow.bab.branching import NEEDS_COEFFICIENTS
from boundflow.domains.concrete import evaluate
from boundflow.errors import BoundFlowError
from boundflow.ir import GraphBuilder
from boundflow.ir.analysis import preactivations
from tests.conftest import SHARED

BENCH = SHARED / "benchmarks"


def _net(seed: int, n_in: int = 2, hidden: int = 12, n_out: int = 3):
    rng = np.random.default_rng(seed)
    b = GraphBuilder()
    h = b.input((n_in,))
    for width in (hidden, hidden):
        h = b.add_node("linear", [h], params={"weight": rng.standard_normal((width, b.shape(h)[0]))
                                              * 0.8, "bias": rng.standard_normal(width) * 0.3})
        h = b.add_node("relu", [h])
    h = b.add_node("linear", [h], params={"weight": rng.standard_normal((n_out, hidden)) * 0.6,
                                          "bias": np.zeros(n_out)})
    return b.build(h)


class _Checked:
    """A bounder that checks, on every call, that sampled points (and the corners) of each
    box have ``C·y`` at or above the lower bound returned."""

    def __init__(self, inner: PlanBounder, C: np.ndarray):
        self.inner, self.C = inner, torch.as_tensor(C, dtype=torch.float64)
        self.dtype, self.checked = inner.dtype, 0

    @property
    def calls(self):
        return self.inner.calls

    @property
    def kept(self):
        return self.inner.kept

    def __call__(self, lo, hi):
        lb = self.inner(lo, hi)
        n, d = lo.shape
        u = torch.rand((n, 64, d), generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        corners = torch.tensor(np.array(np.meshgrid(*[[0.0, 1.0]] * d)).reshape(d, -1).T)
        u = torch.cat([u, corners.expand(n, -1, -1)], 1)
        pts = lo.double()[:, None] + u * (hi - lo).double()[:, None]
        y = evaluate(self.inner.graph, pts.reshape(-1, d)).reshape(n, -1, self.C.shape[1])
        cy = y @ self.C.T                                          # [n, m, rows]
        assert (cy >= lb.double()[:, None] - 1e-5 * (1 + cy.abs())).all(), "bound unsound"
        self.checked += n
        return lb


def _truth(graph, lo, hi, C, thr, ranges, n=200_000) -> bool:
    """Whether dense sampling (plus a grid) finds a point of the box violating the
    property (True: sat for sure)."""
    rng = np.random.default_rng(0)
    pts = lo + rng.random((n, len(lo))) * (hi - lo)
    grid = np.stack(np.meshgrid(*[np.linspace(a, b, 150) for a, b in zip(lo, hi)]), -1)
    pts = np.concatenate([pts, grid.reshape(-1, len(lo))])
    y = evaluate(graph, torch.from_numpy(pts)).numpy()
    ok = (y @ C.T) <= thr
    return any(bool(ok[:, a:b].all(1).any()) for a, b in ranges)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("branching, screen", [("combined", "none"), ("coefficients", "none"),
                                               ("sensitivity", "none"), ("widest", "none"),
                                               ("widest", "forward")])
def test_verdicts_are_never_wrong_and_every_batch_is_sound(seed, branching, screen):
    """A random property "y_0 - y_1 <= t" (and, for odd seeds, a second disjunct) on a small
    random net: BaB never says unsat where sampling finds a violation, any counterexample
    violates the property in float64 inside the box, and every batch's bounds contain
    sampled points of each sub-box."""
    g = _net(seed)
    lo, hi = np.array([-1.0, -0.5]), np.array([0.5, 1.0])
    rng = np.random.default_rng(100 + seed)
    C = np.array([[1.0, -1.0, 0.0]] + ([[0.0, 1.0, -1.0]] if seed % 2 else []))
    pts = lo + rng.random((4000, 2)) * (hi - lo)
    y = evaluate(g, torch.from_numpy(pts)).numpy()
    # thresholds near the sampled minimum: some properties hold, some barely fail
    thr = np.quantile(y @ C.T, 0.002 if seed % 3 else 0.0, axis=0) - (0.05 if seed % 3 else -0.02)
    ranges = [(0, 1), (1, 2)] if seed % 2 else [(0, 1)]
    config = BabConfig(batch=64, branching=branching, max_domains=20_000, screen=screen)
    keep = preactivations(g) if branching in NEEDS_COEFFICIENTS else ()
    bounder = _Checked(PlanBounder(g, C, method="crown", batch=64, keep=keep), C)
    res = input_split(g, lo, hi, C, thr, ranges, config, bounder=bounder,
                      deadline=time.monotonic() + 60)
    sat = _truth(g, lo, hi, C, thr, ranges)
    assert res.status in ("unsat", "sat", "timeout", "unknown")
    if sat:
        assert res.status != "unsat", "unsat where a counterexample exists"
    if res.status == "sat":
        x = res.counterexample
        assert np.all(x >= lo) and np.all(x <= hi)
        yx = evaluate(g, torch.from_numpy(x[None])).numpy()[0]
        assert any(np.all(C[a:b] @ yx <= thr[a:b]) for a, b in ranges)
    if keep and res.domains > 1:                 # the coefficients came with the bounds
        assert bounder.kept is not None and set(bounder.kept) == set(keep)
    if screen == "none":
        assert bounder.checked >= res.domains > 0
        assert res.bound_calls == bounder.calls >= 1
    else:                      # the screen bounds every box, the plan the ones it left
        assert res.bound_calls > bounder.calls >= 1


@pytest.mark.parametrize("seed", range(4))
def test_the_forward_screen_bounds_hold_on_every_box(seed):
    """The screen's bounds (forward-mode intermediate bounds, the plan's final bound)
    contain sampled points and corners of each box, wide and small."""
    from boundflow.bab.bounder import ForwardScreen

    g = _net(seed, n_in=3)
    C = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    assert ForwardScreen.usable(g, "crown") and not ForwardScreen.usable(g, "ibp")
    screen = ForwardScreen(g, C, method="crown", batch=16, dtype=torch.float32)
    checked = _Checked(screen, C)
    rng = np.random.default_rng(seed)
    for width in (1.0, 1 / 64):
        lo = torch.from_numpy(rng.uniform(-1, 1, (40, 3)) - width / 2).float()
        checked(lo, lo + width)
    assert checked.checked == 80 and screen.calls == 6


def test_the_search_decides_both_kinds_on_random_nets():
    """Across the seeds both verdicts occur (the test above is not vacuous)."""
    seen = set()
    for seed in range(6):
        g = _net(seed)
        lo, hi = np.array([-1.0, -0.5]), np.array([0.5, 1.0])
        C = np.array([[1.0, -1.0, 0.0]])
        y = evaluate(g, torch.from_numpy(lo + np.random.default_rng(seed).random((4000, 2))
                                         * (hi - lo))).numpy() @ C.T
        for thr in (y.min(0) - 0.05, np.quantile(y, 0.05, axis=0)):
            res = input_split(g, lo, hi, C, thr, [(0, 1)], BabConfig(batch=64),
                              deadline=time.monotonic() + 60)
            seen.add(res.status)
    assert {"sat", "unsat"} <= seen


def test_boxes_are_rounded_outward_to_the_bound_precision():
    lo64 = np.array([0.1, 0.679857769, -0.3, 1.0])
    hi64 = np.array([0.2, 0.679857769, -0.1, 1.0])
    lo, hi = float_box(lo64, hi64, torch.float32)
    assert (lo.double().numpy() <= lo64).all() and (hi.double().numpy() >= hi64).all()
    assert lo[3] == hi[3] == 1.0                          # exact values stay exact
    assert (hi.double() - lo.double() - torch.from_numpy(hi64 - lo64)).max() < 1e-6


def test_the_queue_limit_and_the_deadline_end_the_search():
    g = _net(5, hidden=24)
    lo, hi = np.array([-1.0, -0.5]), np.array([0.5, 1.0])
    C = np.array([[1.0, -1.0, 0.0]])
    grid = np.stack(np.meshgrid(*[np.linspace(a, b, 400) for a, b in zip(lo, hi)]), -1)
    y = evaluate(g, torch.from_numpy(grid.reshape(-1, 2))).numpy() @ C.T
    thr = y.min(0) - 1e-3                        # holds or barely fails: a deep search
    # (the gradient's branching alone: a deeper search here than the default rule's)
    full = input_split(g, lo, hi, C, thr, [(0, 1)],
                       BabConfig(batch=4, attack_every=0, branching="sensitivity"))
    assert full.max_queue > 6
    res = input_split(g, lo, hi, C, thr, [(0, 1)], BabConfig(batch=4, max_domains=4,
                                                             attack_every=0,
                                                             branching="sensitivity"))
    assert res.max_queue <= 4 + 4
    assert res.status == "sat" or (res.status == "unknown" and "max_domains" in res.reason)
    res = input_split(g, lo, hi, C, thr, [(0, 1)], BabConfig(batch=4), deadline=0.0)
    assert res.status in ("timeout", "sat") and res.bound_calls == 1


@pytest.mark.parametrize("bad", [dict(strategy="relu-ish"), dict(method="magic"), dict(branching="random"),
                                 dict(batch=1), dict(batch=2.5), dict(max_domains=True),
                                 dict(attack_every=-1)])
def test_bad_settings_are_one_clear_error(bad):
    with pytest.raises(BoundFlowError):
        BabConfig(**bad)


def test_auto_splits_inputs_only_where_they_are_few():
    assert choose_strategy(BabConfig(), 5) == "input"
    assert choose_strategy(BabConfig(), 784) == "relu"
    assert choose_strategy(BabConfig(), 784, has_relu=False) == "none"
    assert choose_strategy(BabConfig(strategy="input"), 784) == "input"
    assert choose_strategy(BabConfig(strategy="none"), 5) == "none"


def _instances():
    path = BENCH / "instances.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return [tuple(r.values()) for r in csv.DictReader(f)]


@pytest.mark.skipif(not (BENCH / "instances.csv").exists(),
                    reason=f"shared test data not found at {BENCH} (set BOUNDFLOW_SHARED)")
@pytest.mark.parametrize("onnx, vnnlib, timeout, expected", _instances())
def test_every_shared_instance_is_decided_right(onnx, vnnlib, timeout, expected):
    from boundflow.frontend.onnx import load_onnx
    from boundflow.frontend.vnnlib import load_vnnlib
    from boundflow.vnncomp import check_property, onnx_runner

    g = load_onnx(BENCH / onnx)
    prop = load_vnnlib(BENCH / vnnlib, int(np.prod(g.input_shape)), int(np.prod(g.output_shape)))
    res = check_property(g, prop, timeout=float(timeout), confirm=onnx_runner(BENCH / onnx))
    assert res.status == expected
    if expected == "sat":
        x, y = res.counterexample
        assert any(np.all(d.C @ y <= d.threshold) and np.all(x >= d.lower - 1e-12)
                   and np.all(x <= d.upper + 1e-12) for d in prop.disjuncts)


def test_the_default_batch_grows_with_the_cores_for_input_splitting(monkeypatch):
    """Without a batch, input splitting bounds 512 boxes a core per plan run, 1024 to 8192;
    ReLU splitting 1024; a given batch is kept. The searches plan the batch resolved."""
    import importlib

    from boundflow.bab import relu_split
    config = importlib.import_module("boundflow.bab.config")
    split_mod = importlib.import_module("boundflow.bab.input_split")   # the package's
    relu_mod = importlib.import_module("boundflow.bab.relu_split")     # names are functions
    from boundflow.bab.config import default_batch

    assert [default_batch("input", c) for c in (1, 2, 3, 4, 8, 16, 64)] == \
        [1024, 1024, 1536, 2048, 4096, 8192, 8192]
    assert default_batch("relu", 64) == 1024
    monkeypatch.setattr(config, "machine_cores", lambda: 4)
    assert BabConfig().batch is None
    assert BabConfig().batch_for("input") == 2048 and BabConfig().batch_for("relu") == 1024
    assert BabConfig(batch=64).batch_for("input") == 64 == BabConfig(batch=64).batch_for("relu")
    planned = []

    class Recorded(PlanBounder):
        def __init__(self, *a, batch, **kw):
            planned.append(("input", batch))
            super().__init__(*a, batch=batch, **kw)
    monkeypatch.setattr(split_mod, "PlanBounder", Recorded)
    real_plan = relu_mod._plan

    def recorded_plan(graph, batch, *a):
        planned.append(("relu", batch))
        return real_plan(graph, batch, *a)
    monkeypatch.setattr(relu_mod, "_plan", recorded_plan)
    g = _net(0)
    lo, hi = np.array([-1.0, -0.5]), np.array([0.5, 1.0])
    C, thr = np.array([[1.0, -1.0, 0.0]]), np.array([-100.0])      # holds: proven at once
    assert input_split(g, lo, hi, C, thr, [(0, 1)], BabConfig(escalate="none")).status == "unsat"
    assert relu_split(g, lo, hi, C, thr, [(0, 1)], BabConfig()).status == "unsat"
    assert planned == [("input", 2048), ("relu", 1024)]


def test_the_cores_are_capped_by_a_cgroup_quota(monkeypatch):
    """A container's CPU quota (cgroup v2 ``cpu.max``) caps the cores the default batch is
    scaled by; an unknown strategy has no default."""
    import builtins
    import importlib
    import io

    config = importlib.import_module("boundflow.bab.config")
    real_open = builtins.open
    quota = {"text": "200000 100000\n"}

    def fake_open(path, *a, **kw):
        if str(path) == "/sys/fs/cgroup/cpu.max":
            return io.StringIO(quota["text"])
        return real_open(path, *a, **kw)
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: set(range(64)),
                        raising=False)
    assert config.machine_cores() == 2
    quota["text"] = "max 100000\n"
    assert config.machine_cores() == 64
    quota["text"] = "50000 100000\n"                         # half a core: one
    assert config.machine_cores() == 1
    quota["text"] = "garbage"
    assert config.machine_cores() == 64
    with pytest.raises(BoundFlowError, match="no default batch"):
        config.default_batch("none")
