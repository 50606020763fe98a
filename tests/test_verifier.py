"""The compiled verifier: planned, looked up and compiled once; each call only runs the plan.
`compute_bounds` / `verify` in a loop neither re-plan nor re-read the database."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import boundflow as bf
import boundflow.examples as examples


@pytest.fixture(scope="module")
def graph():
    return bf.load_model(examples.DATA / "digits_mlp.pt2")


@pytest.fixture(scope="module")
def x():
    return np.load(examples.DATA / "digits_x.npy")[:4]


def test_a_compiled_verifier_runs_without_planning_again(graph, x, monkeypatch):
    import boundflow.planner as planner

    v = bf.compile(graph, batch=4, method="crown")
    monkeypatch.setattr(planner, "plan", lambda *a, **k: pytest.fail("re-planned"))
    C = bf.margin_spec([0, 1, 2, 3], 10)
    got = v.bounds(x, eps=0.02, C=C)
    want = bf.compute_bounds(graph, x, eps=0.02, C=C, method="crown")
    assert torch.equal(got.lower, want.lower) and torch.equal(got.upper, want.upper)
    result = v.verify(x, eps=0.02, labels=[0, 1, 2, 3])
    assert result.method == "crown" and result.verdicts.shape == (4, 9)
    assert torch.equal(result.bounds.lower, want.lower)


def test_a_compiled_verifier_sound_on_sampled_points(graph, x):
    from tests.helpers import box_points, true_outputs

    v = bf.compile(graph, batch=4, n_specs=0, method="crown-ibp")
    box = bf.InputSpec.linf(x, 0.05)
    b = v.bounds(box)
    pts = box_points(box.lower, box.upper, n=500)
    y = true_outputs(graph, pts)                                 # [batch, m, 10]
    lo, hi = b.lower.numpy()[:, None], b.upper.numpy()[:, None]
    assert np.all(y >= lo - 1e-5) and np.all(y <= hi + 1e-5)


def test_a_compiled_verifier_checks_its_queries(graph, x):
    v = bf.compile(graph, batch=4, method="ibp")
    with pytest.raises(bf.SpecError, match="9 specs"):
        v.bounds(x, eps=0.01)
    with pytest.raises(bf.SpecError, match="labels"):
        v.verify(x, eps=0.01)
    with pytest.raises(bf.ShapeError, match="does not fit"):
        v.bounds(np.zeros((4, 3)), eps=0.01, C=bf.margin_spec([0] * 4, 10))
    with pytest.raises(bf.BoundFlowError, match="batch"):
        bf.compile(graph, batch=0)


def test_a_loop_of_verify_calls_reads_the_database_once(graph, x, tmp_path, monkeypatch):
    import boundflow.search.lookup as lookup

    calls = []
    real = lookup.tuned_plan

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(lookup, "tuned_plan", counted)
    from boundflow.db import Database

    db = str(tmp_path / "empty.db")
    Database(db).close()                 # an empty database (a reader never makes one)
    for _ in range(3):
        bf.verify(graph, x, eps=0.01, method="ibp", db=db)
    v = bf.compile(graph, batch=4, method="ibp", db=db)
    assert len(calls) == 1 and v.tuned is None
