"""The torch backend runs any PlanBundle: same bounds as the un-partitioned reference, sound,
with the storage plan's memory and the BoundCache."""

import random

import numpy as np
import pytest
import torch

from boundflow.api import BoundOptions, bound_spec, compute_bounds, verify
from boundflow.domains.driver import reference_bounds
from boundflow.domains.interval import Interval
from boundflow.domains.traversal import graph_tensors
from boundflow.backend.torch import TorchExecutor
from boundflow.domains.alpha import AlphaConfig
from boundflow.errors import BoundFlowError, ShapeError, SpecError
from boundflow.examples import EXAMPLES
from boundflow.ir.plan import PlanBundle
from boundflow.ir.spec import InputSpec, LinearSpec, margin_spec
from boundflow.ir.workload import Workload
from boundflow.planner import default, normalised, plan, space
from boundflow.runtime.cache import BoundCache
from tests.helpers import assert_contains, box_points, example_graph, true_outputs

ALPHA = AlphaConfig(iterations=2)
N_KNOBS = 50
N_ADOPT = 8      # of them also run without measure_memory (see _write's ADOPT_BYTES)


def _query(name, eps=0.02, batch=2, dtype=np.float64):
    ex, g = example_graph(name)
    x = InputSpec.linf(ex.inputs[:batch].astype(dtype), eps)
    n_out = int(np.prod(g.output_shape))
    return ex, g, x, margin_spec(np.arange(batch) % n_out, n_out)


@pytest.mark.parametrize("name", ["random_deep_mlp", "random_residual"])
def test_small_buffers_keep_their_tensors_and_the_slots_bounds(name, monkeypatch):
    """A small row-major buffer keeps the tensors its task made (no slot copy): the same
    bounds as written into slots; ``measure_memory`` still measures the planned slots."""
    import boundflow.backend.torch as torch_backend

    ex, g, x, C = _query(name, batch=3)
    for method in ("ibp", "crown-ibp", "crown"):
        w = Workload.of(g, batch=3, method=method, dtype="float64")
        bundle = plan(g, w, default(g, w))
        adopting = TorchExecutor(bundle, g)
        kept = adopting.run(x, C)
        assert not adopting._arena, method           # no buffer went to a slot
        measured = TorchExecutor(bundle, g)
        assert measured.run(x, C, measure_memory=True).stats["peak_bytes"] > 0
        assert measured._arena, method
        with monkeypatch.context() as m:
            m.setattr(torch_backend, "ADOPT_BYTES", 0)
            slots = TorchExecutor(bundle, g)
            written = slots.run(x, C)
            assert slots._arena, method
        for a, b in ((kept.lower, written.lower), (kept.upper, written.upper)):
            assert torch.equal(a, b), method
        for _ in range(2):                  # again: nothing of the last run leaks into it
            again = adopting.run(x, C)
            assert torch.equal(again.lower, kept.lower) and torch.equal(again.upper, kept.upper)
        pts = box_points(x.lower, x.upper, n=200)
        assert_contains(kept.lower, kept.upper, true_outputs(g, pts), C=C.C)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_random_plans_equal_the_reference_and_are_sound(name):
    ex, g, x, C = _query(name)
    w = Workload.of(g, batch=2, method="alpha-crown", dtype="float64")
    gn = normalised(g)[0]
    sp = space(g, w)
    rng = random.Random(7)
    references = {}
    pts = box_points(x.lower, x.upper, n=300)
    truth = true_outputs(g, pts)
    for i in range(N_KNOBS):
        knobs = sp.sample(rng)
        bundle = plan(g, w, knobs, alpha=ALPHA)
        assert PlanBundle.from_json(bundle.to_json()) == bundle
        out = TorchExecutor(bundle, g).run(x, C, measure_memory=True)
        assert out.stats["peak_bytes"] >= bundle.peak_bytes(2)      # every slot was written
        if i < N_ADOPT:   # small buffers keeping their own tensors: the slots' bounds exactly
            plain = TorchExecutor(bundle, g).run(x, C)
            assert torch.equal(plain.lower, out.lower) and torch.equal(plain.upper, out.upper), \
                f"knobs {knobs.to_json()}"
        dp, sparse = bundle.domain_plan.plan, bundle.domain_plan.sparse
        if (dp, sparse) not in references:     # the same neurons bounded: alpha amplifies ulps
            references[dp, sparse] = reference_bounds(
                gn, Interval(torch.as_tensor(x.lower), torch.as_tensor(x.upper)),
                graph_tensors(gn, torch.float64), torch.as_tensor(C.C), dp, alpha=ALPHA,
                sparse=sparse)
        ref = references[dp, sparse]
        # NHWC convolutions sum in another order (1-ulp differences); alpha-CROWN's optimiser
        # carries those into its slopes, so its bounds are compared at 1e-4 there
        # (relative to the largest bound)
        loose = dp.final == "alpha-crown" and "NHWC" in knobs.layouts
        for got, want in ((out.lower, ref.lower), (out.upper, ref.upper)):
            atol = 1e-4 * float(want.abs().max()) if loose else 1e-9
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4 if loose else 1e-6,
                                       atol=atol, err_msg=f"knobs {knobs.to_json()}")
        assert_contains(out.lower, out.upper, truth, C.C, what=f"plan {i} of {name}")


@pytest.mark.parametrize("name", ["digits_cnn", "random_residual", "random_nhwc"])
def test_float32_plans_match_the_api(name):
    ex, g, x, C = _query(name, dtype=np.float32)
    for method in ("ibp", "crown-ibp", "crown"):
        w = Workload.of(g, batch=2, method=method)
        out = TorchExecutor(plan(g, w), g).run(x, C)
        ref = compute_bounds(g, x, C=C, method=method)
        torch.testing.assert_close(out.lower, ref.lower, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.upper, ref.upper, rtol=1e-5, atol=1e-5)


def test_channels_last_plan_gives_the_original_models_bounds():
    ex, g, x, C = _query("random_nhwc")
    w = Workload.of(g, batch=2, method="crown", dtype="float64")
    nhwc = plan(g, w)
    assert nhwc.layout_plan.regions[0][1] == "NHWC"
    nchw = plan(g, w, nhwc.knobs.replace(layouts=("NCHW",)))
    ref = compute_bounds(g, x, C=C, method="crown", dtype="float64")      # original graph
    for bundle in (nhwc, nchw):
        out = TorchExecutor(bundle, g).run(x, C, measure_memory=True)
        np.testing.assert_allclose(out.lower.numpy(), ref.lower.numpy(), rtol=1e-9)
        np.testing.assert_allclose(out.upper.numpy(), ref.upper.numpy(), rtol=1e-9)


def test_nhwc_buffers_are_channels_last_in_memory():
    ex, g, x, C = _query("random_nhwc", dtype=np.float32)
    bundle = plan(g, Workload.of(g, batch=2, method="crown"))
    exe = TorchExecutor(bundle, g)
    buf = next(b for b in bundle.task_graph.buffers if b.node == "conv2d")
    lower, _ = exe._slot_view(buf, 2)
    assert lower.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["random_cnn", "random_residual"])
def test_storage_reuse_lowers_measured_peak_and_keeps_bounds(name):
    ex, g, x, C = _query(name, batch=4, dtype=np.float32)
    w = Workload.of(g, batch=4, method="ibp")
    k = default(g, w)
    unfused = k.replace(partition=tuple(False for _ in k.partition))
    runs = {}
    for storage in ("reuse", "none"):
        bundle = plan(g, w, unfused.replace(storage=storage))
        runs[storage] = TorchExecutor(bundle, g).run(x, C, measure_memory=True)
    assert runs["reuse"].stats["peak_bytes"] < 0.75 * runs["none"].stats["peak_bytes"]
    assert torch.equal(runs["reuse"].lower, runs["none"].lower)
    assert torch.equal(runs["reuse"].upper, runs["none"].upper)


def test_cache_hits_on_a_repeated_query_and_misses_on_a_new_box_or_split():
    ex, g, x, C = _query("random_cnn", dtype=np.float32)
    exe = TorchExecutor(plan(g, Workload.of(g, batch=2, method="crown")), g)
    cache = BoundCache()
    fresh = exe.run(x, C)
    first = exe.run(x, C, reuse_ibp=True, cache_bounds=True, cache=cache)
    assert first.stats["tasks_cached"] == 0 and cache.stats()["hits"] == 0
    again = exe.run(x, C, reuse_ibp=True, cache_bounds=True, cache=cache)
    assert again.stats["tasks_run"] == 0 and again.stats["tasks_cached"] == 1
    assert cache.stats()["hits"] == 1
    assert torch.equal(again.lower, fresh.lower) and torch.equal(again.upper, fresh.upper)
    # another spec on the same box: intermediate bounds come from the cache
    other = margin_spec([3, 4], int(np.prod(g.output_shape)))
    part = exe.run(x, other, reuse_ibp=True, cache_bounds=True, cache=cache)
    assert part.stats["tasks_run"] == 1 and part.stats["tasks_cached"] >= 1
    torch.testing.assert_close(part.lower, exe.run(x, other).lower, rtol=0, atol=0)
    hits = cache.stats()["hits"]
    wider = InputSpec.linf(x.center, 0.03)
    miss = exe.run(wider, C, reuse_ibp=True, cache_bounds=True, cache=cache)
    assert miss.stats["tasks_cached"] == 0 and cache.stats()["hits"] == hits
    split = exe.run(x, C, reuse_ibp=True, cache_bounds=True, cache=cache, split=("relu", 3))
    assert split.stats["tasks_cached"] == 0 and cache.stats()["hits"] == hits


def test_cache_is_bounded_and_private():
    cache = BoundCache(capacity_bytes=100)
    from boundflow.runtime.cache import CacheKey
    t = torch.zeros(10)
    cache.put(CacheKey("p", "a", "ibp"), {"x": t})
    t += 1                                               # the cache kept its own copy
    assert cache.get(CacheKey("p", "a", "ibp"))["x"].sum() == 0
    cache.put(CacheKey("p", "b", "ibp"), {"x": torch.zeros(20)})
    assert cache.stats()["evictions"] == 1 and cache.get(CacheKey("p", "a", "ibp")) is None
    with pytest.raises(BoundFlowError, match="scope"):
        cache.put(CacheKey("p", "c", "ibp"), 1, scope="forever")


def test_run_rejects_bad_queries():
    ex, g, x, C = _query("digits_mlp", dtype=np.float32)
    exe = TorchExecutor(plan(g, Workload.of(g, method="crown")), g)
    with pytest.raises(SpecError, match="pass C"):
        exe.run(x)
    with pytest.raises(SpecError, match="specs"):
        exe.run(x, LinearSpec(np.ones((2, 3, 10), np.float32)))
    with pytest.raises(ShapeError, match="does not fit"):
        exe.run(InputSpec.linf(np.zeros((2, 3, 3), np.float32), 0.1), C)
    with pytest.raises(BoundFlowError, match="BoundCache"):
        exe.run(x, C, reuse_ibp=True)
    _, other = example_graph("random_mlp")
    with pytest.raises(BoundFlowError, match="another structure"):
        TorchExecutor(plan(g, Workload.of(g)), other)


def test_api_runs_a_plan():
    ex, g, x, C = _query("digits_cnn", dtype=np.float32)
    bundle = plan(g, Workload.of(g, batch=2, method="crown"))
    via_plan = verify(g, x, plan=bundle)
    direct = verify(g, x, method="crown")
    torch.testing.assert_close(via_plan.bounds.lower, direct.bounds.lower, rtol=1e-5, atol=1e-5)
    assert via_plan.method == "crown"
    assert (via_plan.verdicts == direct.verdicts).all()


@pytest.mark.parametrize("name, method", [("random_residual", "crown"),
                                          ("random_residual", "alpha-crown"),
                                          ("random_deep_mlp", "ibp"),      # the joint product
                                          ("random_deep_mlp", "crown")])   # the lines memo
def test_cuda_torch_backend_matches_the_cpu_and_is_sound(name, method):
    """``target="cuda"`` runs the plan with torch on the GPU: the CPU's bounds, sound."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ex, g = example_graph(name)
    x = InputSpec.linf(np.resize(ex.inputs, (3,) + ex.inputs.shape[1:]).astype(np.float32),
                       0.02)
    C = margin_spec(np.arange(3) % g.output_shape[0], g.output_shape[0])
    opts = dict(method=method, alpha=ALPHA)
    cpu = compute_bounds(g, x, C=C.C, **opts)
    gpu = compute_bounds(g, x, C=C.C, target="cuda", **opts)
    assert gpu.lower.device.type == "cpu"
    np.testing.assert_allclose(gpu.lower, cpu.lower, rtol=0, atol=1e-4)
    np.testing.assert_allclose(gpu.upper, cpu.upper, rtol=0, atol=1e-4)
    pts = box_points(x.lower, x.upper, n=2000)
    assert_contains(gpu.lower, gpu.upper, true_outputs(g, pts), C=C.C, tol=1e-5)
