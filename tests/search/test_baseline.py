"""The tuner's baseline is the default path of ``verify`` (the default plan on the torch
backend): a point of the space, measured first, re-measured with the best plan in the final
pass; a record that was not faster than it is never used; ``seconds`` holds."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from boundflow.api import BoundOptions, default_plan, query, verify
from boundflow.db import Database
from boundflow.measure import BuildResult, MeasureConfig, MeasureResult
from boundflow.search import Tuner, TuneSpace
from boundflow.search.lookup import describe_missing, lookup, tuned_plan
from boundflow.search.space import DEFAULT_BACKEND
from tests.helpers import example_graph


class Scripted:
    """A runner that answers at once, as if measured on this machine: the baseline takes
    ``default_ms``; every other candidate ``search_ms`` (a little more for each later one)
    in the search and ``final_ms`` in the final passes (``compare``). Given
    ``final_config``, only passes under it are final ones: the search's side-by-side
    challenges (under another config) see ``search_ms``. Equal widths."""

    def __init__(self, baseline, default_ms, search_ms, final_ms, final_config=None):
        self.baseline, self.ms = baseline, (default_ms, search_ms, final_ms)
        self.final_config, self.n = final_config, 0

    def _result(self, inp, ms):
        s = ms * 1e-3
        return MeasureResult(inp.key, inp.backend, inp.target, median_s=s, mean_s=s,
                             std_s=0.0, times=(s,), kernel_s=s, mean_width=1.0,
                             peak_bytes=1024)

    def _is_base(self, inp):
        return (inp.key, inp.backend) == self.baseline

    def run(self, inputs, builds):
        out = []
        for i in inputs:
            self.n += 1
            out.append(self._result(i, self.ms[0] if self._is_base(i)
                                    else self.ms[1] * (1 + 0.01 * self.n)))
        return out

    def compare(self, inputs, builds, config=None):
        if self.final_config is not None and config is not self.final_config:
            return [self._result(i, self.ms[0] if self._is_base(i) else self.ms[1])
                    for i in inputs]
        final = self.ms[2]
        if isinstance(final, list):           # one time per final pass, in order
            final = final.pop(0) if len(final) > 1 else final[0]
        return [self._result(i, self.ms[0] if self._is_base(i) else final)
                for i in inputs]

    def close(self):
        pass


class NoBuilder:
    def build(self, inputs):
        return [BuildResult(None) for _ in inputs]

    def close(self):
        pass


@pytest.fixture(scope="module")
def digits():
    _, g = example_graph("digits_mlp")
    x = np.load("boundflow/examples/data/digits_x.npy").astype(np.float32)[:2]
    g, spec, linear, _, _ = query(g, x, eps=0.01)
    return g, spec, linear, x


FINAL = MeasureConfig(number=1, repeat=3, warmup=0)     # the final passes' protocol


def _tuner(db, digits, **kw):
    g, spec, linear, _ = digits
    kw.setdefault("builder", NoBuilder())
    kw.setdefault("final_config", FINAL)
    kw.setdefault("batch_size", 2)
    return Tuner(g, spec.lower, spec.upper, linear.C, method="crown-ibp", db=db,
                 strategy="greedy", progress=False, **kw)


def test_the_default_verify_path_is_a_candidate_and_measured_first(digits):
    g, spec, linear, _ = digits
    with Database(":memory:") as db:
        tuner = _tuner(db, digits)          # both backends, the default verify backend first
        tuner.runner = Scripted(tuner.baseline, 1.0, 2.0, 2.0, FINAL)
        verify_plan = default_plan(g, tuner.workload, BoundOptions("crown-ibp"))
        assert tuner.backends == ("torch", "relax") and BoundOptions().backend == "torch"
        assert DEFAULT_BACKEND == BoundOptions().backend
        assert tuner.baseline == (verify_plan.key, "torch")
        assert tuner.space.candidate(tuner.space.default()) == tuner.baseline
        report = tuner.tune(trials=4)
        first = db.records_for_training(include_failed=True)[0]
        assert (first.candidate.key, first.measurement.result.backend) == tuner.baseline
        # nothing beat it: the report says so, and verify will run the default path
        assert report.kept_default and report.best_bundle.key == verify_plan.key
        assert report.speedup == pytest.approx(1.0)
        assert "default path" in report.best_description
    # the default path is a point of every space that searches the torch backend
    sp = TuneSpace(g, tuner.workload, "torch")
    assert sp.bundle(sp.default()).key == verify_plan.key


def test_a_record_slower_than_the_default_is_not_used(digits, caplog):
    """The search saw a plan at half the default's time (noise, say); measured with the
    default in the final pass it is slower: the default path is recorded as the best, and
    verify runs it. A record slower than the default, or faster only within the margin, or
    never compared with it, is refused."""
    import math

    g, spec, linear, x = digits
    with Database(":memory:") as db:
        tuner = _tuner(db, digits, backend="torch")
        tuner.runner = Scripted(tuner.baseline, default_ms=1.0, search_ms=0.5, final_ms=1.5,
                                final_config=FINAL)
        # before the final pass, the measurements alone made a best plan for "time": never
        # compared with the default path, it is refused
        report = tuner.tune(trials=3)
        got = lookup(db, report.workload, "time")
        assert got.tuned is None and "never measured against the default path" in got.reason
        assert report.kept_default and report.best_bundle.key != tuner.baseline[0]
        assert report.search_best.median_s < report.search_default.median_s
        assert report.speedup == pytest.approx(1 / 1.5)
        assert tuned_plan(db, report.workload) is None
        why = describe_missing(db, report.workload, "time@width")
        assert "no plan faster than the default path" in why
        with caplog.at_level(logging.WARNING, logger="boundflow"):
            result = verify(g, x, eps=0.01, method="crown-ibp", db=db)
        assert result.tuned is None
        assert any("no plan faster than the default path" in r.message for r in caplog.records)
        # records compared with the default path: slower, then 1% faster (within the
        # margin), then 10% faster: only the last is used

        def offer(ms):
            db.set_best(report.best_bundle, "time", "torch", math.log(ms * 1e-3),
                        baseline_value=math.log(1e-3), best_s=ms * 1e-3, baseline_s=1e-3)
            return lookup(db, report.workload, "time")
        got = offer(1.5)
        assert got.tuned is None and "1.500 ms against 1.000 ms" in got.reason
        assert "not faster than the default path" in got.reason
        assert offer(0.99).tuned is None
        found = offer(0.9).tuned
        assert found is not None and found.speedup == pytest.approx(1 / 0.9)
        assert found.bundle.key == report.best_bundle.key and found.backend == "torch"


def test_a_win_in_one_final_pass_alone_is_not_enough(digits):
    """The plan is 20% faster than the default in the first final pass, no faster in the
    second (a tie that one pass read as a win): the default path stays. Winning both passes
    hands the plan over, recorded with the pass least favourable to it."""
    with Database(":memory:") as db:
        tuner = _tuner(db, digits, backend="torch")
        tuner.runner = Scripted(tuner.baseline, 1.0, 0.5, [0.8, 1.0], FINAL)
        report = tuner.tune(trials=3)
        assert report.kept_default and report.speedup == pytest.approx(1.0)
        assert tuned_plan(db, report.workload) is None
    with Database(":memory:") as db:
        tuner = _tuner(db, digits, backend="torch")
        tuner.runner = Scripted(tuner.baseline, 1.0, 0.5, [0.8, 0.9], FINAL)
        report = tuner.tune(trials=3)
        assert not report.kept_default and report.speedup == pytest.approx(1 / 0.9)
        found = lookup(db, report.workload, "time@width").tuned
        assert found is not None and found.speedup == pytest.approx(1 / 0.9)


class _Clock:
    """The tuner's clock, advanced by the fakes below, never by the host: the budget test
    does not depend on how long a compile takes on the machine running it."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.now += s


class _SlowBuilder:
    """Compiles cost ``compile_s`` of the clock for the searched backend, nothing for the
    torch baseline; a compile given less than that is cut (``BuildResult.cut``), as
    ``LocalBuilder`` stops a worker (tests/measure)."""

    def __init__(self, clock, compile_s):
        self.clock, self.compile_s, self.given = clock, compile_s, []

    def build(self, inputs, seconds=None):
        self.given.append(seconds)
        cost = sum(self.compile_s for i in inputs if i.backend != "torch")
        if seconds is not None and cost > seconds:
            self.clock.now += seconds
            return [BuildResult(None, error_kind="timeout", cut=True) for _ in inputs]
        self.clock.now += cost
        return [BuildResult(None) for _ in inputs]

    def close(self):
        pass


class _TimedRunner(Scripted):
    """``Scripted``, each measurement costing ``run_s`` of the clock (the baseline's first
    one ``first_s``: a cold start)."""

    def __init__(self, clock, run_s, first_s, *a, **kw):
        super().__init__(*a, **kw)
        self.clock, self.run_s, self.first_s = clock, run_s, first_s

    def run(self, inputs, builds, config=None):
        self.clock.now += (self.first_s if self.n == 0 else self.run_s) * len(inputs)
        return super().run(inputs, builds)

    def compare(self, inputs, builds, config=None):
        self.clock.now += self.run_s * len(inputs)
        return super().compare(inputs, builds, config)


@pytest.mark.parametrize("first_s", [0.5, 5.0])
def test_seconds_are_honoured_mid_round_with_the_default_first(digits, monkeypatch, first_s):
    """A budget far smaller than one round of 64, every searched plan a 3 s compile: the run
    stops inside the round, within the budget, the progress bar moving with every plan, the
    default verify path (torch) measured first, compiles given only what is left; a slow
    first measurement (5 s, as once under CI) still leaves room for searched plans."""
    import boundflow.search.final as final_module
    import boundflow.search.tuner as tuner_module

    clock = _Clock()
    for module in (tuner_module, final_module):
        monkeypatch.setattr(module, "time", clock)
    updates = []

    class Recorder:
        def __init__(self, enabled, total, done, workload, is_time=True):
            updates.append(done)

        def update(self, done, best, reference):
            updates.append(done)

        def close(self):
            pass
    monkeypatch.setattr(tuner_module, "Progress", Recorder)
    seconds, batch = 25.0, 64
    builder = _SlowBuilder(clock, compile_s=3.0)
    with Database(":memory:") as db:
        tuner = _tuner(db, digits, builder=builder, batch_size=batch, backend="relax")
        tuner.runner = _TimedRunner(clock, 0.2, first_s, tuner.baseline, 1.0, 2.0, 2.0, FINAL)
        start = clock.now
        report = tuner.tune(trials=500, seconds=seconds)
        took = clock.now - start
        recs = db.records_for_training(include_failed=True)
    # within the budget, and not before the next plan (a compile and a run) would not fit
    assert seconds - (3.0 + 0.2) - 1e-6 <= took <= seconds + 1e-6, took
    assert 2 <= report.measured_now < batch + 1           # stopped inside the first round
    assert report.first_measurement_s == pytest.approx(first_s)
    assert (recs[0].candidate.key, recs[0].measurement.result.backend) == tuner.baseline
    assert [r.measurement.result.backend for r in recs[1:]] == ["relax"] * (len(recs) - 1)
    assert all(s is not None and 0 <= s <= seconds for s in builder.given[1:])
    # one update per measured plan (after the bar starts with what was there)
    assert set(range(1, report.measured_now + 1)) <= set(updates)


def test_progress_bar_calls_its_ratio_unconfirmed():
    """The bar's ratio to the default path is of single search measurements; it says so (the
    report's ratio is the side-by-side one)."""
    import math

    from boundflow.ir.workload import Workload
    from boundflow.search.session import Progress

    _, g = example_graph("digits_mlp")
    bar = Progress(True, 4, 0, Workload.of(g, batch=2, method="ibp"))
    try:
        bar.update(1, math.log(0.002), MeasureResult("k", "torch", "llvm", median_s=0.004))
        assert bar.bar.tasks[0].fields["best"] == "best 2.000 ms (2.00x the default, unconfirmed)"
    finally:
        bar.close()
