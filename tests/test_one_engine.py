"""One engine (issue 14): every bound a user computes is a plan run by a backend; the final
step of each method has one implementation, shared by the executor and the reference walk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import boundflow as bf
import boundflow.examples as examples
from boundflow.api import default_plan, BoundOptions
from boundflow.backend.torch import TorchExecutor
from boundflow.ir.spec import InputSpec

METHODS = ["ibp", "crown-ibp", "crown", "alpha-crown"]


@pytest.fixture(scope="module")
def query():
    graph = bf.load_model(examples.DATA / "digits_cnn.pt2")
    x = np.load(examples.DATA / "digits_x.npy")[:3]
    return graph, x, bf.margin_spec([0, 1, 2], 10)


@pytest.mark.parametrize("method", METHODS)
def test_the_unplanned_path_is_the_default_plan_bit_for_bit(query, method):
    graph, x, C = query
    alpha = bf.AlphaConfig(iterations=3)
    got = bf.compute_bounds(graph, x, eps=0.02, C=C, method=method, alpha=alpha)
    work = bf.Workload.of(graph, batch=3, n_specs=9, method=method)
    from boundflow.planner import plan

    bundle = plan(graph, work, alpha=alpha)
    want = TorchExecutor(bundle, graph).run(InputSpec.linf(x, 0.02), C)
    assert torch.equal(got.lower, want.lower) and torch.equal(got.upper, want.upper)
    assert default_plan(graph, work, BoundOptions(method, alpha=alpha)).key == bundle.key


def test_no_bound_bypasses_the_plan(query, monkeypatch):
    """The reference walk is for tests only: a user's call never reaches it, and every
    final bound goes through the one ``final_bounds``."""
    import boundflow.backend.torch as torch_backend
    import boundflow.domains.driver as driver

    graph, x, C = query

    def forbidden(*a, **k):
        raise AssertionError("the un-planned reference ran")
    monkeypatch.setattr(driver, "reference_bounds", forbidden)
    monkeypatch.setattr(driver, "intermediate_bounds", forbidden)
    calls = []
    real = torch_backend.final_bounds

    def counted(*a, **k):
        calls.append(a[6])                                # the method
        return real(*a, **k)
    monkeypatch.setattr(torch_backend, "final_bounds", counted)
    for method in METHODS:
        bf.compute_bounds(graph, x, eps=0.01, C=C, method=method,
                          alpha=bf.AlphaConfig(iterations=2))
        bf.verify(graph, x, eps=0.01, method=method, alpha=bf.AlphaConfig(iterations=2))
    assert calls == [m for m in ["ibp", "crown", "crown", "alpha-crown"] for _ in range(2)]


def test_per_layer_domains_and_sparse_run_as_plans(query):
    graph, x, C = query
    pre = bf.preactivations(graph)
    mixed = {p: "crown" if i == len(pre) - 1 else "ibp" for i, p in enumerate(pre)}
    got = bf.compute_bounds(graph, x, eps=0.02, C=C, method="crown", domains=mixed)
    crown = bf.compute_bounds(graph, x, eps=0.02, C=C, method="crown")
    cibp = bf.compute_bounds(graph, x, eps=0.02, C=C, method="crown-ibp")
    assert torch.all(got.lower >= cibp.lower - 1e-5) and torch.all(got.lower <= crown.lower + 1e-5)
    sparse = bf.compute_bounds(graph, x, eps=0.02, C=C, method="crown", sparse=True)
    assert torch.all(sparse.lower >= cibp.lower - 1e-5)
