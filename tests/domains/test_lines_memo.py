"""One run's backward passes share the activations' default lines
(``crown_relaxed.default_lines`` with the run's memo): each activation's lines are found once
per interval instead of once per pass that crosses it. The bounds are the same numbers; a
new interval of a node (another task's tighter bound, a split) is never answered from the
memo; intervals that carry gradients are never kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import boundflow as bf
from boundflow.domains import crown_patches, crown_relaxed
from boundflow.domains.crown_relaxed import default_lines
from boundflow.domains.interval import Interval
from boundflow.ir.graph import Node
from tests.helpers import assert_contains, box_points, example_graph, true_outputs


def _run(name: str, method: str, monkeypatch, memo: bool, batch: int = 3, eps: float = 0.05,
         backend: str = "torch", lowering: str | None = None):
    """Bounds with the memo on or off, and how many times lines were found; ``lowering``:
    every task of the default plan lowered so (else the default's own choices)."""
    ex, g = example_graph(name)
    x = np.resize(ex.inputs, (batch,) + ex.inputs.shape[1:]).astype(np.float32)
    bundle = None
    if lowering is not None:
        from boundflow.ir.workload import Workload
        from boundflow.planner import default, plan

        w = Workload.of(g, batch=batch, method=method, n_specs=0)
        bundle = plan(g, w, default(g, w).replace(lowering=lowering, task_lowering=()))
    found = []
    inner = crown_relaxed.activations.get

    def counted(op):
        found.append(op)
        return inner(op)
    real = crown_relaxed.default_lines

    def lines(node, pre, mode, memo_):
        return real(node, pre, mode, memo_ if memo else None)
    with monkeypatch.context() as m:
        m.setattr(crown_relaxed, "default_lines", lines)
        m.setattr(crown_patches, "default_lines", lines)
        m.setattr(crown_relaxed.activations, "get", counted)
        b = bf.compute_bounds(g, x, eps=eps, method=method, backend=backend, plan=bundle)
    return b, len(found), g, x


@pytest.mark.parametrize("name", ["random_deep_mlp", "random_mlp", "random_cnn",
                                  "random_residual"])
@pytest.mark.parametrize("method", ["crown", "crown-ibp", "alpha-crown"])
def test_memo_gives_the_same_bounds_and_finds_fewer_lines(name, method, monkeypatch):
    on, n_on, g, x = _run(name, method, monkeypatch, True)
    off, n_off, _, _ = _run(name, method, monkeypatch, False)
    torch.testing.assert_close(on.lower, off.lower, rtol=0, atol=0)
    torch.testing.assert_close(on.upper, off.upper, rtol=0, atol=0)
    assert n_on <= n_off
    if method == "crown":                        # every pass crosses the ReLUs below it
        assert n_on < n_off
    pts = box_points(x - 0.05, x + 0.05, n=300)
    assert_contains(on.lower, on.upper, true_outputs(g, pts), tol=1e-5)


def _node() -> Node:
    return Node("r", "relu", ("x",), {}, (4,))


def test_a_node_is_answered_only_for_the_same_interval():
    memo: dict = {}
    lo = torch.tensor([[-1.0, 0.5, -2.0, -1.0]])
    hi = torch.tensor([[1.0, 1.0, -1.0, 3.0]])
    first = default_lines(_node(), Interval(lo, hi), "adaptive", memo)
    assert default_lines(_node(), Interval(lo, hi), "adaptive", memo) is first
    # the same values in other tensors (a new bound of the node): found again
    again = default_lines(_node(), Interval(lo.clone(), hi.clone()), "adaptive", memo)
    assert again is not first
    torch.testing.assert_close(again.lower_slope, first.lower_slope)
    # a tighter interval replaces the entry; another slope mode is not answered by it
    tight = default_lines(_node(), Interval(lo.clamp(min=0), hi), "adaptive", memo)
    assert bool((tight.lower_slope[0, 0] == 1.0)) and memo["r"][0] is not lo
    zero = default_lines(_node(), Interval(lo, hi), "zero", memo)
    assert float(zero.lower_slope[0, 3]) == 0.0 and memo["r"][2] == "zero"
    # an optimiser's interval carries gradients: never kept
    memo.clear()
    g_lo = lo.clone().requires_grad_()
    default_lines(_node(), Interval(g_lo, hi), "adaptive", memo)
    assert memo == {}


def test_the_memo_keeps_no_more_than_its_budget():
    from boundflow.domains.crown_relaxed import LinesMemo

    lo = torch.tensor([[-1.0, 0.5, -2.0, -1.0]])
    hi = torch.tensor([[1.0, 1.0, -1.0, 3.0]])
    one = default_lines(_node(), Interval(lo, hi), "adaptive", None)
    size = sum(t.numel() * t.element_size() for t in one if t is not None)
    none = LinesMemo(size - 1)
    default_lines(_node(), Interval(lo, hi), "adaptive", none)
    assert len(none) == 0 and none.room == size - 1
    memo = LinesMemo(size)
    first = default_lines(_node(), Interval(lo, hi), "adaptive", memo)
    assert memo.room == 0 and default_lines(_node(), Interval(lo, hi), "adaptive", memo) is first
    # a new interval of the same node replaces the entry within the same budget
    default_lines(_node(), Interval(lo.clone(), hi), "adaptive", memo)
    assert memo.room == 0 and memo["r"][0] is not lo
    # a run keeps what fits: a budget of nothing changes no bound and keeps nothing
    ex, g = example_graph("random_deep_mlp")
    x = np.resize(ex.inputs, (2,) + ex.inputs.shape[1:]).astype(np.float32)
    from boundflow.backend import torch as tb
    full = bf.compute_bounds(g, x, eps=0.05, method="crown")
    old = tb.LINES_MEMO_BYTES
    try:
        tb.LINES_MEMO_BYTES = 0
        capped = bf.compute_bounds(g, x, eps=0.05, method="crown")
    finally:
        tb.LINES_MEMO_BYTES = old
    torch.testing.assert_close(full.lower, capped.lower, rtol=0, atol=0)


def test_no_memo_outlives_a_run(monkeypatch):
    """The executor makes one memo per run: nothing it keeps holds the lines after the
    run."""
    import gc
    import weakref

    seen = []
    real = crown_relaxed.default_lines

    def spy(node, pre, mode, memo):
        out = real(node, pre, mode, memo)
        if memo is not None:
            seen.append(weakref.ref(out.lower_slope))
        return out
    monkeypatch.setattr(crown_relaxed, "default_lines", spy)
    ex, g = example_graph("random_deep_mlp")
    x = np.resize(ex.inputs, (2,) + ex.inputs.shape[1:]).astype(np.float32)
    bf.compute_bounds(g, x, eps=0.05, method="crown")
    gc.collect()
    assert seen and all(r() is None for r in seen)


def test_measured_peak_counts_the_memo(monkeypatch):
    """The memo's lines are memory the run holds: the measured peak includes them."""
    from boundflow.backend.torch import TorchExecutor
    from boundflow.ir.spec import InputSpec
    from boundflow.ir.workload import Workload
    from boundflow.planner import default, plan

    ex, g = example_graph("random_deep_mlp")
    x = np.resize(ex.inputs, (16,) + ex.inputs.shape[1:]).astype(np.float32)
    w = Workload.of(g, batch=16, method="crown", n_specs=0)
    exe = TorchExecutor(plan(g, w, default(g, w)), g)
    box = InputSpec.linf(x, 0.05)
    with_memo = exe.run(box, None, measure_memory=True).stats["peak_bytes"]
    real = crown_relaxed.default_lines
    monkeypatch.setattr(crown_relaxed, "default_lines",
                        lambda node, pre, mode, memo: real(node, pre, mode, None))
    without = exe.run(box, None, measure_memory=True).stats["peak_bytes"]
    assert with_memo > without


def test_the_relax_backends_callbacks_share_one_memo_per_run(monkeypatch):
    """The residual example's CROWN tasks run as torch callbacks of the Relax module (lowered
    so: by default its crown tasks are TIR window kernels): they share the run's memo (each VM
    tensor viewed once per run, by its handle), give the same bounds as without it and as the
    torch backend, and no view or memo outlives a call."""
    on, n_on, g, x = _run("random_residual", "crown", monkeypatch, True, backend="relax",
                          lowering="torch")
    off, n_off, _, _ = _run("random_residual", "crown", monkeypatch, False, backend="relax",
                            lowering="torch")
    torch.testing.assert_close(on.lower, off.lower, rtol=0, atol=0)
    torch.testing.assert_close(on.upper, off.upper, rtol=0, atol=0)
    assert n_on < n_off
    eager = bf.compute_bounds(g, x, eps=0.05, method="crown")
    torch.testing.assert_close(on.lower, eager.lower, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(on.upper, eager.upper, rtol=1e-5, atol=1e-5)
    pts = box_points(x - 0.05, x + 0.05, n=300)
    assert_contains(on.lower, on.upper, true_outputs(g, pts), tol=1e-5)

    v = bf.compile(g, batch=x.shape[0], n_specs=0, method="crown", backend="relax")
    exe = v._executor
    assert exe._first is not None                     # the plan has callbacks
    spec = bf.InputSpec.box(x - 0.05, x + 0.05)
    first = exe.run(spec)
    assert exe._views == {} and exe._lines is None
    # the VM's function called bare, as a time_evaluator does: each call starts afresh
    args = [exe._tensor(a) for a in (spec.lower, spec.upper)]
    sizes = []
    for _ in range(3):
        lo, hi = exe.vm["main"](*args, *exe.weights)
        sizes.append(len(exe._views))
        torch.testing.assert_close(torch.from_dlpack(lo), first.lower, rtol=0, atol=0)
        torch.testing.assert_close(torch.from_dlpack(hi), first.upper, rtol=0, atol=0)
    assert sizes[0] > 0 and len(set(sizes)) == 1
    assert len(exe.time_calls(spec, number=2, repeat=3)) == 3      # the tuner's kernel timer
    assert exe._views == {} and exe._lines is None


def _optimised(monkeypatch, memo: bool, beta: bool, steps: int = 6):
    """The maxpool CNN's alpha-CROWN bounds (or one beta-CROWN run under a split state)
    with an optimiser's memo on or off, and how often maxpool's windows were found."""
    import boundflow.domains.crown_relaxed as cr
    from boundflow.bab.relu_split import relu_inputs
    from boundflow.ir.split import ReluSplit
    from tests.helpers import counted_calls

    ex, g = example_graph("digits_maxpool_cnn")
    x = np.resize(ex.inputs, (4,) + ex.inputs.shape[1:]).astype(np.float32)
    with monkeypatch.context() as m:
        if not memo:
            for module in (cr, crown_patches):
                m.setattr(module, "memoised", lambda memo_, key, pre, tag, compute: compute())
        found = counted_calls(m, cr, "maxpool_relaxation")
        C = bf.margin_spec(np.zeros(4, int), 10).C
        if not beta:
            b = bf.compute_bounds(g, x, eps=0.05, C=C, method="alpha-crown",
                                  alpha=bf.AlphaConfig(iterations=steps,
                                                       intermediate=False))
            return (b.lower, b.upper), len(found), g, x
        v = bf.compile(g, batch=4, n_specs=9, method="crown")
        node = relu_inputs(g)[-1]
        shape = v._executor._bounded_shapes()[node]
        signs = torch.zeros((4,) + tuple(shape), dtype=torch.int8)
        signs.view(4, -1)[:, :3] = torch.tensor([1, -1, 1], dtype=torch.int8)
        out = v._executor.run(bf.InputSpec.box(x - 0.05, x + 0.05), bf.LinearSpec(C),
                              split=ReluSplit({node: signs}, beta_iterations=steps),
                              upper=False)
        return (out.lower,), len(found), g, x


@pytest.mark.parametrize("beta", [False, True])
def test_an_optimisers_steps_find_what_depends_on_fixed_intervals_once(monkeypatch, beta):
    """beta-CROWN's steps, and alpha-CROWN's without intermediate optimisation, relax the
    same (fixed) intervals every step: maxpool's windows and the activations' states are
    found once for them all (alpha's re-bounded intervals are new each step, and found
    again), with the same bounds as finding them every step; sound on sampled points."""
    on, n_on, g, x = _optimised(monkeypatch, True, beta)
    off, n_off, _, _ = _optimised(monkeypatch, False, beta)
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert 0 < n_on < n_off
    # more steps find nothing more with the memo, and more every step without it
    assert _optimised(monkeypatch, True, beta, steps=12)[1] == n_on
    assert _optimised(monkeypatch, False, beta, steps=12)[1] > n_off
    if not beta:
        C = bf.margin_spec(np.zeros(4, int), 10).C
        y = np.einsum("bsk,bmk->bms", C, true_outputs(g, box_points(x - 0.05, x + 0.05,
                                                                     n=200)).reshape(4, -1, 10))
        assert np.all(on[0].numpy()[:, None] <= y + 1e-4)
        assert np.all(on[1].numpy()[:, None] >= y - 1e-4)


@pytest.mark.parametrize("name", ["random_deep_mlp", "random_residual"])
def test_a_batch_bounded_in_parts_shares_each_parts_lines(name, monkeypatch):
    """Cache-sized chunks: each part of the batch is the same slices from task to task, so
    its lines are found once per part (``PartMemo``), not once per pass; the same bounds."""
    from boundflow.backend import torch as torch_backend

    monkeypatch.setenv("BOUNDFLOW_CHUNK_BYTES", "3000")        # a few samples a part
    parts = []
    real = torch_backend.PartMemo

    def counted(parent, suffix):
        parts.append(suffix)
        return real(parent, suffix)
    monkeypatch.setattr(torch_backend, "PartMemo", counted)
    on, n_on, g, x = _run(name, "crown", monkeypatch, True, batch=8)
    assert len(set(parts)) > 1                                    # it ran in parts
    off, n_off, _, _ = _run(name, "crown", monkeypatch, False, batch=8)
    torch.testing.assert_close(on.lower, off.lower, rtol=0, atol=0)
    torch.testing.assert_close(on.upper, off.upper, rtol=0, atol=0)
    assert n_on < n_off
    pts = box_points(x - 0.05, x + 0.05, n=300)
    assert_contains(on.lower, on.upper, true_outputs(g, pts), tol=1e-5)
