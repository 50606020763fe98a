"""Builder and runners: real measurements on both backends, failures recorded per candidate
(a segfault, a hang past the timeout, an exception) while the rest of the batch is measured,
and the RPC runner over a tracker and two servers on loopback."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import functools
import time

import numpy as np
import pytest

from boundflow.ir.spec import margin_spec
from boundflow.ir.workload import Workload
from boundflow.measure import LocalBuilder, LocalRunner, MeasureConfig, MeasureInput, \
    RPCRunner, measure
from boundflow.measure.worker import measure_local
from boundflow.planner import default, plan
from tests.helpers import example_graph

CONFIG = MeasureConfig(number=2, repeat=3, warmup=1, timeout_s=20)


def _inputs(method="ibp", backend="relax", n=1, name="digits_mlp"):
    ex, g = example_graph(name)
    x = ex.inputs[:2].astype(np.float32)
    n_out = int(np.prod(g.output_shape))
    C = margin_spec(np.arange(2) % n_out, n_out).C
    w = Workload.of(g, batch=2, method=method)
    k = default(g, w)
    bundles = [plan(g, w, k)]
    if n > 1:                                    # other plans: unfuse one edge at a time
        for i in range(len(k.partition)):
            part = list(k.partition)
            part[i] = False
            bundles.append(plan(g, w, k.replace(partition=tuple(part))))
    return [MeasureInput(b, g, x - 0.01, x + 0.01, C, backend) for b in bundles[:n]]


def test_local_measurement_of_both_backends(tmp_path):
    relax, torch_ = _inputs(backend="relax")[0], _inputs(backend="torch")[0]
    builder, runner = LocalBuilder(tmp_path), LocalRunner(CONFIG)
    try:
        r, t = measure([relax, torch_], builder, runner)
        # the final comparison of a tuning run: both in one worker, interleaved
        both = runner.compare([torch_, relax], builder.build([torch_, relax]))
    finally:
        builder.close()
        runner.close()
    for res in (r, t, *both):
        assert res.ok, res.error
        assert res.median_s > 0 and len(res.times) == CONFIG.repeat
        assert res.mean_width > 0 and 0 <= res.verified_fraction <= 1
        assert res.peak_bytes > 0 and res.n_kernels >= 1
    # the whole call (host box in, bounds out) is what objectives use; the kernels beside it
    assert 0 < r.kernel_s and t.kernel_s == t.median_s
    assert [x.backend for x in both] == ["torch", "relax"]
    assert (r.backend, r.peak_source, t.peak_source) == ("relax", "planned", "measured")
    assert r.compile_seconds > 0 and t.compile_seconds == 0
    assert r.mean_width == pytest.approx(t.mean_width, rel=1e-5)      # same plan, same bounds
    # the artifact is in the compile cache: a runner in a new process loads, never compiles
    assert list(tmp_path.glob("*.so"))


def _misbehave(behaviour, inp, build, config):
    """A measurement function that fails as ``behaviour[inp.key]`` says."""
    what = behaviour.get(inp.key)
    if what == "segfault":
        os.write(2, f"worker {inp.key}: about to crash\n".encode())
        ctypes.string_at(0)
    elif what == "hang":
        time.sleep(600)
    elif what == "raise":
        raise RuntimeError("candidate exploded")
    elif what == "memory":
        np.ones(2**31, np.float64)                # 16 GiB, past the 1 GiB the test allows
    return measure_local(inp, build, config)


def test_runner_isolates_crashes_hangs_and_exceptions():
    inputs = _inputs(backend="torch", n=5, name="digits_cnn")
    assert len({i.key for i in inputs}) == 5
    behaviour = {inputs[0].key: "segfault", inputs[1].key: "hang", inputs[3].key: "raise",
                 inputs[4].key: "memory"}
    runner = LocalRunner(MeasureConfig(number=1, repeat=2, timeout_s=10, memory_limit_mb=1024),
                         f_run=functools.partial(_misbehave, behaviour))
    builder = LocalBuilder()
    try:
        results = measure(inputs, builder, runner)
    finally:
        runner.close()
    kinds = [r.error_kind for r in results]
    assert kinds == ["crash", "timeout", None, "run", "memory"], [r.error for r in results]
    assert "exploded" in results[3].error and "10 s" in results[1].error
    # what a worker prints goes to the workers' log, which a crash's error names
    from boundflow.measure.pool import worker_log

    assert str(worker_log()) in results[0].error
    assert f"worker {inputs[0].key}: about to crash" in worker_log().read_text()
    assert results[2].median_s > 0
    # the pool is healthy afterwards
    again = runner.run([inputs[2]], builder.build([inputs[2]]))
    assert again[0].ok
    runner.close()


def test_build_failures_are_results(tmp_path, monkeypatch):
    inp = _inputs(backend="relax")[0]
    builder = LocalBuilder(tmp_path / "not-a-dir-file")
    (tmp_path / "not-a-dir-file").write_text("a file where the cache directory should be")
    try:
        (b,) = builder.build([inp])
    finally:
        builder.close()
    assert b.error_kind == "build" and b.artifact is None
    (res,) = LocalRunner(CONFIG).run([inp], [b])
    assert res.error_kind == "build" and not res.ok


@pytest.fixture(scope="module")
def rpc_tracker():
    """A tracker and two servers on 127.0.0.1 under key ``bf-test``."""
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9390, silent=True)
    servers = [Server(host="127.0.0.1", port=9400, port_end=9600, key="bf-test",
                      tracker_addr=("127.0.0.1", tracker.port), silent=True) for _ in range(2)]
    from tvm import rpc

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:               # until both servers have registered
        queue = rpc.connect_tracker("127.0.0.1", tracker.port).summary()["queue_info"]
        if queue.get("bf-test", {}).get("free", 0) == 2:
            break
        time.sleep(0.2)
    yield ("127.0.0.1", tracker.port)
    for s in servers:
        s.terminate()
    tracker.terminate()


def test_rpc_runner_on_loopback(tmp_path, rpc_tracker):
    ibp, alpha = _inputs("ibp")[0], _inputs("alpha-crown")[0]
    builder = LocalBuilder(tmp_path)
    local, remote = LocalRunner(CONFIG), RPCRunner(rpc_tracker, "bf-test", CONFIG, n_workers=2)
    try:
        builds = builder.build([ibp, alpha])
        (loc,) = local.run([ibp], builds[:1])
        rem, rem_alpha = remote.run([ibp, alpha], builds)
    finally:
        for x in (builder, local, remote):
            x.close()
    assert loc.ok and rem.ok, (loc.error, rem.error)
    assert rem.runner == "rpc:bf-test" and len(rem.times) == CONFIG.repeat
    assert rem.mean_width == pytest.approx(loc.mean_width, rel=1e-6)
    assert rem.verified_fraction == loc.verified_fraction
    # alpha-CROWN's optimiser runs as a torch callback: not measurable remotely, recorded so
    assert rem_alpha.error_kind == "unsupported" and "torch callbacks" in rem_alpha.error


def test_out_of_memory_is_recognised_whatever_raises_it():
    import torch

    from boundflow.measure.pool import failure
    from boundflow.measure.worker import guarded, out_of_memory

    ooms = [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
            RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                         "allocate memory: you tried to allocate 26214400 bytes"),
            RuntimeError("CUDA error: out of memory"), RuntimeError("std::bad_alloc")]
    assert all(out_of_memory(e) for e in ooms)
    assert not any(out_of_memory(e) for e in (RuntimeError("shape mismatch"), ValueError("x"),
                                              RuntimeError("could not create a primitive")))
    assert out_of_memory(RuntimeError("could not create a primitive"), capped=True)

    def raises(e):
        raise e
    for e in ooms:                                   # leaves the worker as kind "memory"
        with pytest.raises(MemoryError) as got:
            guarded(raises, None, e)
        kind, text = failure(got.value, 10)
        assert kind == "memory" and text.startswith("out of memory: ")
    with pytest.raises(MemoryError, match="the cap is 64 MiB"):
        guarded(raises, 64, ooms[2])
    with pytest.raises(Exception) as got:
        guarded(raises, None, RuntimeError("shape mismatch"))
    assert failure(got.value, 10)[0] == "run"
    # the pool sends a traceback as the message: the record keeps its last line
    tb = "Traceback (most recent call last):\n  File x\nMemoryError: RuntimeError: no room\n"
    assert failure(MemoryError(tb), 10) == ("memory", "out of memory: RuntimeError: no room")


def test_a_candidate_over_the_memory_cap_is_recorded_as_memory():
    """A real plan (CROWN on the digits CNN, batch 64: its backward pass allocates tens of MB)
    under a 4 MiB cap fails with kind memory; under a roomy cap it is measured."""
    ex, g = example_graph("digits_cnn")
    x = np.repeat(ex.inputs[:1].astype(np.float32), 64, axis=0)
    n_out = int(np.prod(g.output_shape))
    w = Workload.of(g, batch=64, method="crown")
    inp = MeasureInput(plan(g, w, default(g, w)), g, x - 0.01, x + 0.01,
                       margin_spec(np.arange(64) % n_out, n_out).C, "torch")
    results = []
    for cap in (4, 2048):
        runner = LocalRunner(MeasureConfig(number=1, repeat=1, warmup=0, timeout_s=60,
                                           memory_limit_mb=cap))
        try:
            results += measure([inp], LocalBuilder(), runner)
        finally:
            runner.close()
    tight, roomy = results
    assert tight.error_kind == "memory", tight.error
    assert "4 MiB" in tight.error and "\n" not in tight.error
    assert roomy.ok, roomy.error


@pytest.mark.parametrize("bad", [dict(memory_limit_mb=0), dict(memory_limit_mb=-5),
                                 dict(memory_limit_mb=1.5), dict(memory_limit_mb=True),
                                 dict(memory_limit_mb="64"), dict(number=0), dict(repeat=2.0),
                                 dict(warmup=-1), dict(timeout_s=0),
                                 dict(timeout_s=float("inf")), dict(timeout_s=float("nan")),
                                 dict(threads=0), dict(threads=1.5), dict(max_seconds=0),
                                 dict(max_seconds=float("inf"))])
def test_measure_config_names_the_bad_field(bad):
    from boundflow.errors import MeasureError

    (name,) = bad
    with pytest.raises(MeasureError, match=f"MeasureConfig.{name}"):
        MeasureConfig(**bad)
    assert MeasureConfig(memory_limit_mb=64).memory_limit_mb == 64


def test_a_slow_candidate_is_timed_with_fewer_calls_to_fit_max_seconds():
    c = MeasureConfig(number=3, repeat=5, warmup=1, max_seconds=2.0)
    assert c.fitted(0.01) == c                               # 16 calls of 10 ms fit
    slow = c.fitted(0.25)                                    # 8 calls fit: 1 per timing
    assert (slow.number, slow.repeat, slow.warmup) == (1, 5, 1)
    both = c.fitted(0.25, kernels=True)          # calls and kernels, and TVM's warm-up call
    assert (both.number, both.repeat, both.warmup) == (1, 3, 1)
    assert c.fitted(10.0).repeat == 1                         # one timed call at least
    # the timeout's share cuts the same way (2 s: 80% of a 4 s timeout, 1.2 s of it spent)
    assert MeasureConfig(number=3, repeat=5, warmup=1, timeout_s=4.0).fitted(0.25, spent=1.2) \
        == dataclasses.replace(slow, max_seconds=None, timeout_s=4.0)


def test_without_max_seconds_a_slow_candidate_fits_what_is_left_of_the_timeout():
    """80% of ``timeout_s`` for the whole measurement, its load and first call (``spent``)
    included: a plan of many seconds a call is timed with fewer calls instead of killed at
    the timeout, and one whose protocol fits is timed in full."""
    from boundflow.measure.worker import TIMEOUT_SHARE

    assert TIMEOUT_SHARE == 0.8
    calls = lambda m: (m.number, m.repeat, m.warmup)                # noqa: E731
    c = MeasureConfig()                                        # 1 + 3 x 5 calls, 120 s
    assert c.fitted(5.0, spent=6.0) == c                       # 80 s of calls fit in 90
    assert calls(c.fitted(27.8, spent=30.0)) == (1, 2, 0)      # 66 s left: 2 calls
    assert calls(c.fitted(10.0)) == (1, 5, 1)                  # 96 s: 9 calls
    assert calls(c.fitted(27.8, spent=100.0)) == (1, 1, 0)     # nothing left: one call
    # compiled: each timing's kernels as well, and the one call TVM warms up with
    assert calls(c.fitted(20.0, kernels=True)) == (1, 1, 1)    # 4 calls: 3 after TVM's
    assert MeasureConfig(timeout_s=600).fitted(10.0) == MeasureConfig(timeout_s=600)
    # max_seconds still cuts further, and never beyond the timeout's share
    assert calls(MeasureConfig(max_seconds=1e6).fitted(10.0)) == calls(c.fitted(10.0))
    assert calls(MeasureConfig(max_seconds=20.0).fitted(10.0)) == (1, 2, 0)


def test_a_compile_past_the_callers_time_is_cut_and_the_builder_goes_on(tmp_path):
    """``build(..., seconds=)``: a compile still running then comes back ``cut`` (its worker
    killed; nothing cached), and the next build compiles in a fresh worker."""
    inp = _inputs(backend="relax", method="crown")[0]
    builder = LocalBuilder(tmp_path)
    try:
        cut = builder.build([inp], seconds=0.01)[0]      # a worker alone takes longer to start
        assert cut.cut and cut.error_kind == "timeout" and cut.artifact is None
        assert "time budget" in cut.error and not list(tmp_path.glob("*.so"))
        done = builder.build([inp])[0]
        assert done.error is None and not done.cut and list(tmp_path.glob("*.so"))
        torch_ = _inputs(backend="torch")[0]                # nothing to compile: never cut
        assert not builder.build([torch_], seconds=0.0)[0].cut
    finally:
        builder.close()


def test_pool_close_finishes_a_shutdown_that_tvm_leaves_locked():
    """TVM's ``shutdown`` can raise with its lock held (``PopenWorker.kill`` races the pool
    thread after Ctrl-C); the pool thread then waited on that lock and the interpreter's exit
    hung. ``close`` releases it, shuts the thread pool down and kills what runs."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from boundflow.measure.pool import Pool, failure

    class _Racy:
        def __init__(self):
            self._lock = threading.Lock()
            self._worker_map = {}
            self._threadpool = ThreadPoolExecutor(1)
            self._shutdown = False

        def shutdown(self, wait=True):
            self._lock.acquire()
            raise AttributeError("'NoneType' object has no attribute 'kill'")

    pool = Pool()
    racy = pool._executor = _Racy()
    pool.close()
    assert not racy._lock.locked() and racy._shutdown and racy._threadpool._shutdown
    assert pool._executor is None
    pool.close()                                 # closing twice is nothing
    # an interrupt is no failure of a plan: raised again, never recorded
    for interrupt in (KeyboardInterrupt(), SystemExit(1)):
        with pytest.raises(type(interrupt)):
            failure(interrupt, 10.0)
    assert failure(RuntimeError("boom"), 10.0)[0] == "run"
