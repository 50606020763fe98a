"""A caller that reads only the lower bounds (a verdict, branch-and-bound) runs with
``upper=False``: alpha-CROWN then optimises the lower side only. The lower bounds are the
same as when both sides are optimised, the upper bounds the best the lower side's slopes
gave (sound, never looser than CROWN's), and verdicts do not change. A registered backend
whose executor does not take ``upper`` still runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import boundflow as bf
from boundflow.backend.torch import TorchExecutor
from boundflow.domains import alpha as alpha_mod
from boundflow.domains.alpha import AlphaConfig
from boundflow.ir.spec import InputSpec, margin_spec
from boundflow.ir.workload import Workload
from boundflow.planner import default, plan
from boundflow.runtime.cache import BoundCache
from tests.helpers import assert_contains, box_points, example_graph, true_outputs


def _setup(name: str, batch: int = 3, eps: float = 0.03):
    ex, g = example_graph(name)
    x = np.resize(ex.inputs, (batch,) + ex.inputs.shape[1:]).astype(np.float32)
    box = InputSpec.linf(x, eps)
    labels = np.arange(batch) % g.output_shape[0]
    C = margin_spec(labels, g.output_shape[0])
    w = Workload.of(g, batch=batch, method="alpha-crown", n_specs=C.n_specs)
    bundle = plan(g, w, default(g, w), alpha=AlphaConfig(iterations=4))
    return ex, g, box, C, TorchExecutor(bundle, g)


def _sides(monkeypatch) -> list[float]:
    signs: list[float] = []
    inner = alpha_mod._optimise_side

    def counted(*args):
        signs.append(args[9])
        return inner(*args)
    monkeypatch.setattr(alpha_mod, "_optimise_side", counted)
    return signs


@pytest.mark.parametrize("name", ["random_cnn", "random_mlp", "random_residual"])
def test_lower_only_keeps_the_lower_bounds_and_gives_crowns_upper(name, monkeypatch):
    ex, g, box, C, exe = _setup(name)
    signs = _sides(monkeypatch)
    both = exe.run(box, C)
    assert signs == [-1.0, 1.0]
    signs.clear()
    low = exe.run(box, C, upper=False)
    assert signs == [-1.0]                                   # one side optimised
    np.testing.assert_allclose(low.lower, both.lower, rtol=0, atol=1e-6)
    w = Workload.of(g, batch=box.batch, method="crown", n_specs=C.n_specs)
    crown = TorchExecutor(plan(g, w, default(g, w)), g).run(box, C)
    assert bool((low.upper <= crown.upper + 1e-6).all())
    assert bool((low.upper > both.upper + 1e-6).any())       # alpha's own upper side is tighter
    assert_contains(low.lower, low.upper, true_outputs(g, box_points(box.lower, box.upper,
                                                                     n=500)), C.C, tol=1e-5)


def test_cached_bounds_of_one_side_never_answer_a_query_for_both(monkeypatch):
    ex, g, box, C, exe = _setup("random_mlp")
    cache = BoundCache()
    low = exe.run(box, C, upper=False, cache=cache, cache_bounds=True)
    both = exe.run(box, C, cache=cache, cache_bounds=True)
    assert bool((both.upper < low.upper - 1e-6).any())
    again = exe.run(box, C, upper=False, cache=cache, cache_bounds=True)
    assert again.stats["tasks_cached"] >= 1
    np.testing.assert_array_equal(again.upper, low.upper)


def test_verify_optimises_the_lower_side_only_and_keeps_its_verdicts(monkeypatch):
    ex, g = example_graph("random_cnn")
    x = ex.inputs[:2].astype(np.float32)
    opts = dict(eps=0.01, method="alpha-crown", alpha=AlphaConfig(iterations=4))
    full = bf.compute_bounds(g, x, C=margin_spec(np.array([0, 1]), g.output_shape[0]).C,
                             **opts)
    signs = _sides(monkeypatch)
    got = bf.verify(g, x, labels=[0, 1], **opts)
    assert signs == [-1.0]
    np.testing.assert_allclose(got.bounds.lower, full.lower, rtol=0, atol=1e-6)
    assert (got.verdicts == np.where(full.lower.numpy() > 0, "verified", "unknown")).all()
    signs.clear()
    v = bf.compile(g, x[:1], batch=2, n_specs=g.output_shape[0] - 1, method="alpha-crown",
                   alpha=AlphaConfig(iterations=4))
    res = v.verify(x, eps=0.01, labels=[0, 1])
    assert signs == [-1.0]
    np.testing.assert_allclose(res.bounds.lower, full.lower, rtol=0, atol=1e-6)


def test_a_backend_whose_run_takes_no_upper_still_bounds_and_verifies(monkeypatch):
    from boundflow.backend import base

    class Plain:
        """A registered backend's executor: ``run(box, C)`` and nothing else."""

        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def run(self, box, C=None):
            self.calls += 1
            return self.inner.run(box, C)

    made = []

    class Mine:
        name, targets, needs_build = "mine", ("llvm",), False

        def executor(self, bundle, graph, target="llvm", cache=None):
            made.append(Plain(TorchExecutor(bundle, graph)))
            return made[-1]

    monkeypatch.setitem(base._FACTORIES, "mine", Mine)
    monkeypatch.delitem(base._INSTANCES, "mine", raising=False)
    ex, g = example_graph("random_mlp")
    x = ex.inputs[:2].astype(np.float32)
    opts = dict(eps=0.01, method="alpha-crown", alpha=AlphaConfig(iterations=2))
    ref = bf.compute_bounds(g, x, **opts)
    got = bf.compute_bounds(g, x, backend="mine", **opts)
    np.testing.assert_allclose(got.lower, ref.lower, rtol=0, atol=1e-6)
    res = bf.verify(g, x, labels=[0, 1], backend="mine", **opts)
    assert sum(e.calls for e in made) == 2 and res.verdicts.shape == (2, g.output_shape[0] - 1)
    # a search's goal (a split state) is a speed hint: a run that cannot take it goes without
    from boundflow.ir.split import ReluSplit
    plain, before = made[0], made[0].calls           # compute_bounds's: no specs
    out = base.run_bounds(plain, InputSpec.linf(x, 0.01), None, False,
                          split=ReluSplit({}, goal=(torch.zeros(1), ((0, 1),))))
    np.testing.assert_allclose(out.lower, ref.lower, rtol=0, atol=1e-6)
    assert plain.calls == before + 1


def test_a_verdicts_plan_and_its_both_sides_twin_share_one_compiled_module():
    """The plans of a lower-bounds workload and of its both-sides twin differ in key (their
    timings differ) but compile to one module (the side is an argument of each call): the
    second Relax executor finds the first's module, and each answers its own query as the
    torch backend does."""
    ex, g, box, C, _ = _setup("random_mlp")
    lower = bf.compile(g, batch=3, method="alpha-crown", backend="relax", bounds="lower",
                       alpha=AlphaConfig(iterations=4))
    both = bf.compile(g, batch=3, method="alpha-crown", backend="relax", bounds="both",
                      alpha=AlphaConfig(iterations=4))
    a, b = lower._executor, both._executor
    assert a.bundle.key != b.bundle.key and a.bundle.compile_key == b.bundle.compile_key
    assert b.compile_source == "memory"             # the first's module, in this process
    eager = bf.compile(g, batch=3, method="alpha-crown", bounds="both",
                       alpha=AlphaConfig(iterations=4))._executor
    for exe_, upper in ((a, False), (b, True), (a, True), (b, False)):
        got, ref = exe_.run(box, C, upper=upper), eager.run(box, C, upper=upper)
        np.testing.assert_allclose(got.lower, ref.lower, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.upper, ref.upper, rtol=1e-5, atol=1e-5)
