"""ReLU-split branch-and-bound: a plan run under a split state bounds each domain's part of
the box (sampled points that meet the split constraints lie inside), verdicts are never
wrong, and the search proves what one CROWN bound cannot."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import boundflow as bf
from boundflow.bab import BabConfig, relu_split
from boundflow.bab.bounder import _verifier
from boundflow.bab.relu_split import relu_inputs
from boundflow.domains.concrete import RULES, evaluate
from boundflow.domains.traversal import graph_tensors, propagate
from boundflow.errors import BoundFlowError
from boundflow.ir.spec import InputSpec, LinearSpec
from boundflow.ir.split import ReluSplit
from tests.bab.test_input_split import _net, _truth
from tests.helpers import example_graph, robustness_vnnlib


def _pre(graph, pts, nodes):
    """The ReLU inputs at the points."""
    tensors = graph_tensors(graph, torch.float64)
    return propagate(graph, RULES, pts, tensors, nodes + [graph.output], "evaluation")


@pytest.mark.parametrize("beta", [0, 15])
@pytest.mark.parametrize("seed", range(4))
def test_bounds_under_a_split_state_hold_on_each_domains_part_of_the_box(seed, beta):
    """Also with beta-CROWN's multipliers (``beta`` steps), which must raise some domain's
    bound above the one without them."""
    g = _net(seed, n_in=3, hidden=10)
    nodes = relu_inputs(g)
    C = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    lo, hi = -np.ones(3), np.ones(3)
    v = _verifier(g, 8, 2, "crown", "torch", None, "time@width")
    # 8 domains: random signs on 4 neurons of each layer
    rng = np.random.default_rng(seed)
    signs = {}
    for nd in nodes:
        s = np.zeros((8, 10), np.int8)
        for d in range(8):
            idx = rng.choice(10, 4, replace=False)
            s[d, idx] = rng.choice([-1, 1], 4)
        signs[nd] = torch.from_numpy(s)
    box = InputSpec.box(np.tile(lo, (8, 1)).astype(np.float32),
                        np.tile(hi, (8, 1)).astype(np.float32))
    spec = LinearSpec(np.tile(C, (8, 1, 1)).astype(np.float32))
    out = v._executor.run(box, spec, split=ReluSplit(signs, beta_iterations=beta), keep=nodes)
    if beta:
        plain = v._executor.run(box, spec, split=ReluSplit(signs))
        assert (out.lower >= plain.lower).all() and (out.lower > plain.lower + 1e-4).any()
    pts = torch.from_numpy(lo + np.random.default_rng(0).random((40000, 3)) * (hi - lo))
    vals = _pre(g, pts, nodes)
    cy = vals[g.output] @ torch.from_numpy(C).T
    checked = 0
    for d in range(8):
        inside = torch.ones(pts.shape[0], dtype=torch.bool)
        for nd in nodes:
            s = signs[nd][d].to(torch.float64)
            z = vals[nd]
            inside &= ((s > 0) & (z < 0)).sum(1).eq(0) & ((s < 0) & (z > 0)).sum(1).eq(0)
        if inside.any():
            checked += 1
            assert (cy[inside] >= out.lower[d].double() - 1e-5).all()
            for nd in nodes:
                iv = out.stats["bounds"][nd]
                z = vals[nd][inside]
                assert (z >= iv.lower[d].double() - 1e-5).all()
                assert (z <= iv.upper[d].double() + 1e-5).all()
    assert checked >= 1
    # (no "never looser than the unsplit bound": a ReLU fixed active is the identity, and
    # its input is still concretised over the whole box; the search keeps the parent's
    # bound where it is better)


def _inside(vals, nodes, signs, d):
    """The sampled points on domain ``d``'s part of the box."""
    inside = torch.ones(next(iter(vals.values())).shape[0], dtype=torch.bool)
    for nd in nodes:
        s, z = signs[nd][d], vals[nd]
        inside &= ((s > 0) & (z < 0)).sum(1).eq(0) & ((s < 0) & (z > 0)).sum(1).eq(0)
    return inside


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_a_child_starts_from_its_parents_bounds(seed, reuse):
    """Children bounded with their parent's bounds as references: refined, every ReLU
    input's bounds lie inside the parent's (never looser); reused, they are the parent's
    with the new split applied and fewer tasks run. Either way the bounds contain every
    sampled point of the child's part of the box."""
    g = _net(seed, n_in=3, hidden=10)
    nodes = relu_inputs(g)
    C = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    lo, hi = -np.ones(3), np.ones(3)
    v = _verifier(g, 4, 2, "crown", "torch", None, "time@width")
    box = InputSpec.box(np.tile(lo, (4, 1)).astype(np.float32),
                        np.tile(hi, (4, 1)).astype(np.float32))
    spec = LinearSpec(np.tile(C, (4, 1, 1)).astype(np.float32))
    zero = {nd: torch.zeros(4, 10, dtype=torch.int8) for nd in nodes}
    parent = v._executor.run(box, spec, split=ReluSplit(zero), keep=nodes)
    ref = {nd: (parent.stats["bounds"][nd].lower, parent.stats["bounds"][nd].upper)
           for nd in nodes}
    # each child fixes one unstable neuron of the last layer (children 0/1) or the first
    # (2/3), one side each
    signs = {nd: z.clone() for nd, z in zero.items()}
    for d, (nd, side) in enumerate([(nodes[-1], 1), (nodes[-1], -1), (nodes[0], 1),
                                    (nodes[0], -1)]):
        l0, u0 = ref[nd][0][d], ref[nd][1][d]
        unstable = torch.nonzero((l0 < 0) & (u0 > 0))[:, 0]
        if len(unstable):
            signs[nd][d, unstable[0]] = side
    child = v._executor.run(box, spec, split=ReluSplit(signs, reference=ref, reuse=reuse),
                            keep=nodes)
    for nd in nodes:
        iv = child.stats["bounds"][nd]
        assert (iv.lower >= ref[nd][0]).all() and (iv.upper <= ref[nd][1]).all()
        if reuse:
            want = ReluSplit(signs).tighten(nd, *ref[nd])
            assert torch.equal(iv.lower, want[0]) and torch.equal(iv.upper, want[1])
    if reuse:
        assert child.stats["tasks_run"] < parent.stats["tasks_run"]
    pts = torch.from_numpy(lo + np.random.default_rng(seed).random((40000, 3)) * (hi - lo))
    vals = _pre(g, pts, nodes)
    cy = vals[g.output] @ torch.from_numpy(C).T
    checked = 0
    for d in range(4):
        inside = _inside(vals, nodes, signs, d)
        if not inside.any():
            continue
        checked += 1
        assert (cy[inside] >= child.lower[d].double() - 1e-5).all()
        for nd in nodes:
            iv, z = child.stats["bounds"][nd], vals[nd][inside]
            assert (z >= iv.lower[d].double() - 1e-5).all()
            assert (z <= iv.upper[d].double() + 1e-5).all()
    assert checked >= 2


@pytest.mark.parametrize("intermediate", ["refine", "reuse"])
@pytest.mark.parametrize("seed", range(8))
def test_relu_split_verdicts_are_never_wrong(seed, intermediate):
    g = _net(seed, n_in=2, hidden=12)
    lo, hi = np.array([-1.0, -0.5]), np.array([0.5, 1.0])
    C = np.array([[1.0, -1.0, 0.0]] + ([[0.0, 1.0, -1.0]] if seed % 2 else []))
    rng = np.random.default_rng(100 + seed)
    y = evaluate(g, torch.from_numpy(lo + rng.random((4000, 2)) * (hi - lo))).numpy() @ C.T
    thr = np.quantile(y, 0.002 if seed % 3 else 0.0, axis=0) - (0.05 if seed % 3 else -0.02)
    ranges = [(0, 1), (1, 2)] if seed % 2 else [(0, 1)]
    res = relu_split(g, lo, hi, C, thr, ranges,
                     BabConfig(batch=32, strategy="relu", intermediate=intermediate),
                     deadline=time.monotonic() + 60)
    if _truth(g, lo, hi, C, thr, ranges):
        assert res.status != "unsat", "unsat where a counterexample exists"
    if res.status == "sat":
        x = res.counterexample
        yx = evaluate(g, torch.from_numpy(x[None])).numpy()[0]
        assert np.all(x >= lo) and np.all(x <= hi)
        assert any(np.all(C[a:b] @ yx <= thr[a:b]) for a, b in ranges)


def test_relu_splitting_proves_what_one_crown_bound_cannot():
    _, g = example_graph("digits_mlp")
    x = np.load("boundflow/examples/data/digits_x.npy").astype(np.float32)
    proven = 0
    for i in range(8):
        xi = x[i:i + 1]
        label = int(evaluate(g, torch.from_numpy(xi)).argmax())
        C = bf.margin_spec(np.array([label]), 10).C
        crown = bf.compute_bounds(g, xi, eps=0.08, C=C, method="crown").lower[0].numpy()
        rows = [j for j in range(9) if crown[j] <= 0]
        if not rows or len(rows) > 3:
            continue
        Co = C[0][rows]
        res = relu_split(g, (xi - 0.08).reshape(-1), (xi + 0.08).reshape(-1), Co,
                         np.zeros(len(rows)), [(k, k + 1) for k in range(len(rows))],
                         BabConfig(batch=128), deadline=time.monotonic() + 60)
        assert res.status in ("unsat", "sat", "unknown")
        proven += res.status == "unsat"
    assert proven >= 2


def test_a_bad_split_state_is_refused():
    g = _net(0)
    v = _verifier(g, 2, 1, "crown", "torch", None, "time@width")
    box = InputSpec.box(np.zeros((2, 2), np.float32), np.ones((2, 2), np.float32))
    spec = LinearSpec(np.ones((2, 1, 3), np.float32))
    with pytest.raises(BoundFlowError, match="split state: 'nope' is not a node"):
        v._executor.run(box, spec, split=ReluSplit({"nope": torch.zeros(2, 12)}))
    node = relu_inputs(g)[0]
    with pytest.raises(BoundFlowError, match="split state of .*: shape"):
        v._executor.run(box, spec, split=ReluSplit({node: torch.zeros(3, 12)}))
    with pytest.raises(BoundFlowError, match="batched tensor"):
        ReluSplit({node: 1})
    z = torch.zeros(2, 12)
    with pytest.raises(BoundFlowError, match="reference bounds of .*: shape"):
        v._executor.run(box, spec, split=ReluSplit({node: z}, reference={node: (z[:1], z[:1])}))
    with pytest.raises(BoundFlowError, match="reference bounds: 'nope' is not a node"):
        v._executor.run(box, spec, split=ReluSplit({node: z}, reference={"nope": (z, z)}))
    with pytest.raises(BoundFlowError, match="pair of tensors"):
        ReluSplit({node: z}, reference={node: (z, z[:1])})
    with pytest.raises(BoundFlowError, match="reuse needs"):
        ReluSplit({node: z}, reuse=True)
    with pytest.raises(BoundFlowError, match="intermediate-bounds rule"):
        BabConfig(intermediate="sometimes")


def test_check_property_splits_relus_for_a_high_dimensional_input():
    """A digits robustness property (64 inputs) that one CROWN bound leaves open is decided
    by ReLU splitting, which ``auto`` picks for inputs of that size."""
    from boundflow.api import BoundOptions
    from boundflow.frontend.vnnlib import parse_vnnlib
    from boundflow.vnncomp import check_property

    _, g = example_graph("digits_mlp")
    x = np.load("boundflow/examples/data/digits_x.npy").astype(np.float32)[3]
    label = int(evaluate(g, torch.from_numpy(x[None])).argmax())
    prop = parse_vnnlib(robustness_vnnlib(x, 0.08, label, 10), x.size, 10)
    alone = check_property(g, prop, BoundOptions("crown"), bab=None)
    assert alone.status == "unknown" and alone.refuted < 9
    res = check_property(g, prop, BoundOptions("crown"), timeout=60)
    assert res.status == "unsat" and res.strategy == "relu" and res.domains > 0


def test_the_queue_memory_bound_ends_a_search():
    """A ReLU-split domain holds a sign per neuron: past ``queue_mb`` the search answers
    unknown, naming the limit, rather than grow."""
    _, g = example_graph("digits_maxpool_cnn")
    x = np.load("boundflow/examples/data/digits_x.npy").astype(np.float32)[0]
    label = int(evaluate(g, torch.from_numpy(x[None])).argmax())
    C = bf.margin_spec(np.array([label]), 10).C[0]
    res = relu_split(g, x.reshape(-1) - 0.3, x.reshape(-1) + 0.3, C, np.zeros(9),
                     [(k, k + 1) for k in range(9)],
                     BabConfig(batch=64, queue_mb=2, beta_iterations=0, attack_every=0),
                     deadline=time.monotonic() + 120)
    assert res.status in ("unknown", "sat") and (res.status == "sat" or
                                                 "queue_mb" in res.reason)


@pytest.mark.parametrize("backend", ["torch", "relax"])
def test_relu_splitting_runs_the_tuned_plan_when_it_can_take_a_split(backend, monkeypatch,
                                                                    caplog):
    """With a database, the plan tuned for the bound workload runs if it is a torch plan;
    a plan tuned on another backend takes no split state, so the default plan runs, said
    in a log line."""
    import boundflow.api as api
    from boundflow.search.lookup import TunedPlan
    from boundflow.backend.torch import TorchExecutor

    g = _net(1, n_in=2, hidden=12)
    default = _verifier(g, 16, 1, "crown", "torch", None, "time@width")
    from boundflow.api import BoundOptions, default_plan
    # a plan of the same workload the default is not (dense intermediate bounds)
    other = default_plan(g, default.workload, BoundOptions("crown", sparse=not
                                                           default._executor.sparse))
    assert other.key != default.plan.key
    tuned = TunedPlan(other, backend, "time@width", 1e-3, 0.0, 2e-3)
    monkeypatch.setattr(api, "lookup_tuned", lambda graph, work, db, objective: tuned)
    runs = []
    real_run = TorchExecutor.run

    def counting(self, *a, **k):
        runs.append(self is default._executor)
        return real_run(self, *a, **k)
    monkeypatch.setattr(TorchExecutor, "run", counting)
    lo, hi = np.array([-1.0, -0.5]), np.array([0.5, 1.0])
    with caplog.at_level("INFO", logger="boundflow.bab"):
        res = relu_split(g, lo, hi, np.array([[1.0, -1.0, 0.0]]), np.array([-50.0]),
                         [(0, 1)], BabConfig(batch=16), db="tuned.db")
    assert res.status == "unsat" and runs
    if backend == "torch":
        assert not any(runs) and "runs the tuned plan" in caplog.text
    else:
        assert all(runs) and "takes no ReLU split state" in caplog.text


def test_beta_steps_stop_once_the_batch_is_proven(monkeypatch):
    """With the search's goal, beta-CROWN stops stepping once every domain's lower bounds
    rule out every disjunct (none at all where CROWN's bound already does); without it, or
    short of it, every step runs. The goal is part of the split state's cache key."""
    import boundflow.domains.beta as beta
    from tests.helpers import counted_calls

    g = _net(3)
    v = _verifier(g, 4, 2, "crown", "torch", None, "time@width")
    node = relu_inputs(g)[0]
    box = InputSpec.box(np.full((4, 2), -1.0, np.float32), np.ones((4, 2), np.float32))
    spec = LinearSpec(np.tile(np.array([[[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]]]), (4, 1, 1)))
    signs = torch.zeros(4, 12, dtype=torch.int8)
    signs[:, :2] = 1

    def steps(goal):
        passes = counted_calls(monkeypatch, beta, "backward")
        out = v._executor.run(box, spec, upper=False, split=ReluSplit(
            {node: signs}, beta_iterations=5, goal=goal))
        monkeypatch.undo()
        return len(passes), out.lower
    ranges = ((0, 1), (1, 2))
    n_none, lower = steps(None)
    n_easy, _ = steps((torch.full((2,), -1e6), ranges))
    n_hard, hard = steps((torch.full((2,), 1e6), ranges))
    assert n_none == n_hard == 6 and n_easy == 0          # 5 steps and the last bound
    torch.testing.assert_close(hard, lower, rtol=0, atol=0)
    a = ReluSplit({node: signs}, goal=(torch.zeros(2), ranges))
    b = ReluSplit({node: signs}, goal=(torch.ones(2), ranges))
    assert repr(a) != repr(b) != repr(ReluSplit({node: signs}))
    with pytest.raises(BoundFlowError, match="goal"):
        ReluSplit({node: signs}, goal=(torch.zeros(2), ((0, 3),)))


@pytest.mark.parametrize("seed", range(4))
def test_relu_split_with_alpha_crown_is_never_wrong(seed):
    """alpha-CROWN bound calls under the search's goal (proven domains leave alpha's
    optimisation): verdicts as with CROWN's, never unsat where a counterexample exists."""
    g = _net(seed, n_in=2, hidden=12)
    lo, hi = np.array([-1.0, -0.5]), np.array([0.5, 1.0])
    C = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    rng = np.random.default_rng(200 + seed)
    y = evaluate(g, torch.from_numpy(lo + rng.random((4000, 2)) * (hi - lo))).numpy() @ C.T
    thr = np.quantile(y, 0.002, axis=0) - (0.05 if seed % 2 else -0.02)
    ranges = [(0, 1), (1, 2)]
    res = relu_split(g, lo, hi, C, thr, ranges,
                     BabConfig(batch=32, strategy="relu", method="alpha-crown"),
                     deadline=time.monotonic() + 60)
    assert res.status in ("sat", "unsat")
    if _truth(g, lo, hi, C, thr, ranges):
        assert res.status == "sat"
    if res.status == "sat":
        x = res.counterexample
        yx = evaluate(g, torch.from_numpy(x[None])).numpy()[0]
        assert any(np.all(C[a:b] @ yx <= thr[a:b]) for a, b in ranges)


@pytest.mark.parametrize("kind", ["batchnorm", "identity"])
def test_relu_splitting_runs_on_a_model_the_planner_rewrites(kind):
    """BatchNorm folded, an identity dropped: the plan's graph names its ReLU inputs
    otherwise than the model does, and the split state must use its names. The verdict is
    right and the search really splits."""
    from tests.bab.test_branching import _rewritten_net

    g = _rewritten_net(kind)
    lo, hi = -np.ones(3), np.ones(3)
    C = np.array([[1.0, -1.0, 0.0]])
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 41)] * 3), -1).reshape(-1, 3)
    low = (evaluate(g, torch.from_numpy(grid)).numpy() @ C.T).min(0)
    crown = bf.compute_bounds(g, np.zeros((1, 3), np.float32), eps=1.0, C=C[None],
                              method="crown").lower[0].numpy()
    thr = (crown + low) / 2                     # holds, but one CROWN bound cannot tell
    assert (crown < thr).all()
    res = relu_split(g, lo, hi, C, thr, [(0, 1)], BabConfig(batch=32, strategy="relu"),
                     deadline=time.monotonic() + 60)
    assert res.status == "unsat" and res.domains > 1
    res = relu_split(g, lo, hi, C, low + 0.05, [(0, 1)], BabConfig(batch=32, strategy="relu"),
                     deadline=time.monotonic() + 60)
    assert res.status == "sat"
