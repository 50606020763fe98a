"""Bound tasks run chunk by chunk over the batch (boundflow.backend.chunks): the same bounds
as the whole batch, sound, under every method and a ReLU split state; chunks sized from
the task's coefficient working set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boundflow.backend import chunks
from boundflow.backend.torch import TorchExecutor, Value
from boundflow.domains.alpha import AlphaConfig
from boundflow.domains.traversal import graph_tensors
from boundflow.errors import BoundFlowError
from boundflow.examples import reference_architecture
from boundflow.api import as_graph
from boundflow.bab.relu_split import relu_inputs
from boundflow.ir.spec import InputSpec, margin_spec
from boundflow.ir.split import ReluSplit
from boundflow.ir.workload import Workload
from boundflow.planner import default, plan, space
from tests.helpers import assert_contains, box_points, example_graph, true_outputs

BATCH = 5


def _run(g, x, C, knobs, method, monkeypatch, per_chunk, split=None):
    """Bounds of a run whose bound tasks take ``per_chunk`` samples at a time (None: the
    rule), and how many task calls it made."""
    w = Workload.of(g, batch=x.batch, method=method, dtype="float64",
                    n_specs=0 if C is None else C.n_specs)
    bundle = plan(g, w, knobs(g, w), alpha=AlphaConfig(iterations=3))
    ex = TorchExecutor(bundle, g)
    calls = []
    inner = ex._bound_task

    def counted(t, *args, **kwargs):
        calls.append((t.name, args[2].lower.shape[0]))
        return inner(t, *args, **kwargs)
    monkeypatch.setattr(ex, "_bound_task", counted)
    if per_chunk is not None:
        monkeypatch.setattr(chunks, "samples_per_chunk", lambda *a, **k: per_chunk)
    out = ex.run(x, C, split=split)
    monkeypatch.undo()
    return out, calls


def _forward_knobs(g, w):
    """The default plan with every pre-activation bounded in forward mode."""
    sp = space(g, w)
    base = default(g, w)
    return sp.from_choices({("domains", i): "forward" for i in range(len(sp.preactivations))},
                           base)


@pytest.mark.parametrize("name,method,knobs,spec", [
    ("random_cnn", "crown", default, True), ("random_residual", "crown", default, True),
    ("random_mlp", "crown", default, True), ("random_residual", "crown-ibp", default, True),
    ("random_cnn", "alpha-crown", default, True), ("random_mlp", "crown", _forward_knobs, True),
    ("random_cnn", "crown", default, False)])
def test_chunked_tasks_give_the_whole_batchs_bounds_and_are_sound(name, method, knobs, spec,
                                                                  monkeypatch):
    """With a margin spec (folded into the last linear layer) and without one (the output's
    own bounds, no fold)."""
    ex, g = example_graph(name)
    lower = np.resize(ex.inputs, (BATCH,) + ex.inputs.shape[1:]).astype(np.float64)
    x = InputSpec.linf(lower + 0.01 * np.arange(BATCH).reshape((-1,) + (1,) * (lower.ndim - 1)),
                       0.03)
    n_out = int(np.prod(g.output_shape))
    C = margin_spec(np.arange(BATCH) % n_out, n_out) if spec else None
    whole, whole_calls = _run(g, x, C, knobs, method, monkeypatch, 10 ** 9)
    parts, part_calls = _run(g, x, C, knobs, method, monkeypatch, 2)
    assert {b for _, b in whole_calls} == {BATCH}
    # chunks of 2, 2, 1, except alpha-CROWN's final bound (its optimiser takes the batch)
    whole_batch = {n for n, _ in whole_calls if method == "alpha-crown" and n.startswith("final")}
    assert sorted(b for n, b in part_calls if n not in whole_batch) == \
        sorted([2, 2, 1] * (len(whole_calls) - len(whole_batch)))
    assert sorted(b for n, b in part_calls if n in whole_batch) == [BATCH] * len(whole_batch)
    tol = 1e-6 if method != "alpha-crown" else 1e-5
    np.testing.assert_allclose(parts.lower, whole.lower, rtol=0, atol=tol)
    np.testing.assert_allclose(parts.upper, whole.upper, rtol=0, atol=tol)
    pts = box_points(x.lower, x.upper, n=400)
    assert_contains(parts.lower, parts.upper, true_outputs(g, pts), C=None if C is None else C.C)


def test_a_split_state_is_cut_with_its_batch(monkeypatch):
    """Signs and reference bounds of a ReLU split are sliced with the samples; with
    beta-CROWN's batch-wide optimisation on the final bound (which a chunk without splits
    would skip) the bounds are the whole batch's."""
    ex, g = example_graph("random_mlp")
    lower = np.resize(ex.inputs, (BATCH,) + ex.inputs.shape[1:]).astype(np.float64)
    x = InputSpec.linf(lower, 0.05)
    C = margin_spec(np.arange(BATCH) % 5, 5)
    nodes = relu_inputs(g)
    gen = torch.Generator().manual_seed(0)
    w = Workload.of(g, batch=BATCH, method="crown", dtype="float64")
    shapes = TorchExecutor(plan(g, w, default(g, w)), g)._bounded_shapes()
    signs = {n: torch.randint(-1, 2, (BATCH,) + shapes[n], generator=gen) for n in nodes}
    for n in nodes:                 # samples 0 and 1 unsplit: a chunk of them has no split
        signs[n][:2] = 0
    ref = {n: (-torch.full((BATCH,) + shapes[n], 50.0, dtype=torch.float64),
               torch.full((BATCH,) + shapes[n], 50.0, dtype=torch.float64)) for n in nodes}
    split = ReluSplit(signs, beta_iterations=4, reference=ref)
    part = split.part(slice(1, 3))
    assert all(torch.equal(part.signs[n], signs[n][1:3]) for n in nodes)
    assert all(torch.equal(part.reference[n][0], ref[n][0][1:3]) for n in nodes)
    assert part.beta_iterations == 4
    whole, _ = _run(g, x, C, default, "crown", monkeypatch, 10 ** 9, split)
    parts, calls = _run(g, x, C, default, "crown", monkeypatch, 2, split)
    assert {b for n, b in calls if n != "final"} == {1, 2}
    assert [b for n, b in calls if n == "final"] == [BATCH]
    np.testing.assert_allclose(parts.lower, whole.lower, rtol=0, atol=1e-6)
    np.testing.assert_allclose(parts.upper, whole.upper, rtol=0, atol=1e-6)


def test_chunks_follow_the_working_set():
    """The shared CNN's conv pre-activation (2048 neurons, windows of 16x4x4 and 3x10x10)
    goes in chunks of at most 2 samples where every neuron is bounded, whole where sparse
    CROWN needs none; every task of a small MLP takes a batch of 64 whole; IBP never
    chunks."""
    cnn = as_graph(reference_architecture("cnn"), torch.zeros(1, 3, 32, 32))
    w = Workload.of(cnn, batch=32, method="crown", n_specs=9)
    ex = TorchExecutor(plan(cnn, w, default(cnn, w)), cnn)
    tensors = graph_tensors(ex.graph, torch.float32)
    task = next(t for t in ex.tasks if t.kind == "crown" and ex.nodes[t.nodes[0]].op == "conv2d")
    assert chunks.coefficient_elements(ex.graph, task, tensors, 9) == 3 * 10 * 10
    shape = (32,) + ex.nodes[task.nodes[0]].shape
    unstable = Value("lu", -torch.ones(shape), torch.ones(shape))
    dead = Value("lu", -torch.ones(shape), -0.5 * torch.ones(shape))
    assert chunks.crown_rows(ex.graph, task.nodes[0], unstable.interval(), None) == 2048
    assert ex._chunk(task, tensors, 32, unstable) <= 2
    assert ex._chunk(task, tensors, 32, dead) >= 32
    assert ex._chunk(task, tensors, 1, unstable) >= 1
    _, mlp = example_graph("random_deep_mlp")
    w = Workload.of(mlp, batch=64, method="crown", n_specs=4)
    ex = TorchExecutor(plan(mlp, w, default(mlp, w)), mlp)
    tensors = graph_tensors(ex.graph, torch.float32)
    for t in ex.tasks:
        if t.kind in ("crown", "final"):
            shape = (64,) + ex.nodes[t.nodes[0]].shape
            bound = Value("lu", -torch.ones(shape), torch.ones(shape))
            assert ex._chunk(t, tensors, 64, bound if t.kind == "crown" else None) >= 64
    w = Workload.of(cnn, batch=32, method="ibp", n_specs=9)
    ex = TorchExecutor(plan(cnn, w, default(cnn, w)), cnn)
    tensors = graph_tensors(ex.graph, torch.float32)
    assert all(ex._chunk(t, tensors, 32) >= 1 << 20 for t in ex.tasks if t.kind == "final")


def test_the_environments_budget_sizes_the_chunks(monkeypatch):
    """``BOUNDFLOW_CHUNK_BYTES=1``: one sample per chunk; ``0``: the whole batch."""
    ex, g = example_graph("random_cnn")
    x = InputSpec.linf(np.resize(ex.inputs, (3,) + ex.inputs.shape[1:]).astype(np.float64),
                       0.03)
    C = margin_spec(np.arange(3), 10)
    sizes = {}
    for raw in ("1", "0"):
        monkeypatch.setenv("BOUNDFLOW_CHUNK_BYTES", raw)
        _, calls = _run(g, x, C, default, "crown", monkeypatch, None)
        sizes[raw] = {b for _, b in calls}
    assert sizes == {"1": {1}, "0": {3}}


@pytest.mark.parametrize("raw,want", [("0", 1 << 62), ("1048576", 1 << 20), (" 4096 ", 4096)])
def test_the_budget_comes_from_the_environment(raw, want, monkeypatch):
    monkeypatch.setenv("BOUNDFLOW_CHUNK_BYTES", raw)
    assert chunks.budget_bytes() == want


@pytest.mark.parametrize("raw", ["-1", "2M", "", "1e6"])
def test_a_bad_budget_is_named(raw, monkeypatch):
    monkeypatch.setenv("BOUNDFLOW_CHUNK_BYTES", raw)
    with pytest.raises(BoundFlowError, match="BOUNDFLOW_CHUNK_BYTES must be a whole number"):
        chunks.budget_bytes()


def test_the_cli_names_a_bad_budget_on_one_line(monkeypatch, capsys):
    from boundflow import examples
    from boundflow.cli import main
    monkeypatch.setenv("BOUNDFLOW_CHUNK_BYTES", "lots")
    assert main(["verify", "--model", str(examples.DATA / "digits_mlp.pt2"), "--input",
                 str(examples.DATA / "digits_x.npy"), "--eps", "0.01",
                 "--method", "crown"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "BOUNDFLOW_CHUNK_BYTES must be a whole number" in err[0]
