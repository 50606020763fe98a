"""The tuning space, the strategies on a known score, the tuner loop (resume without
duplicates), and the tuned plan at verification time in another process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from boundflow.db import Database
from boundflow.errors import BoundFlowError
from boundflow.ir.workload import Workload
from boundflow.measure import MeasureConfig
from boundflow.search import Objective, ObjectiveError, Tuner, TuneSpace, make
from boundflow.search.lookup import tuned_plan
from tests.helpers import example_graph

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "boundflow", "examples", "data")


def _space(name="digits_cnn", backend="relax", method="crown"):
    _, g = example_graph(name)
    return TuneSpace(g, Workload.of(g, batch=2, method=method), backend)


def test_space_round_trips_assignments_and_plans():
    sp = _space()
    rng = random.Random(0)
    assert any(d.field == "schedule" for d in sp.decisions)
    assert not any(d.field == "schedule" for d in _space(backend="torch").decisions)
    d = sp.default()
    assert sp.describe(d) == "relax: the default plan"
    for _ in range(10):
        a = sp.sample(rng)
        b = sp.bundle(a)
        back = sp.assignment_of(b)
        assert back is not None and sp.bundle(back).key == b.key
        kinds = {t.name: t.kind for t in b.task_graph.tasks}
        groups = sp.schedules(a)
        for task, _, pairs in b.lowering_plan.tasks:         # schedules reach their tasks
            if kinds[task] == "forward":                     # no TIR kernel: no schedule
                assert pairs == ()
                continue
            group = "fwd" if kinds[task] in ("ibp", "layout") else "bwd"
            assert pairs == groups[group]
    with pytest.raises(BoundFlowError, match="not one of"):
        sp.check(("nope",) + d[1:])

def test_the_space_decides_no_domain_where_ibp_is_exact():
    """The first conv reads the box: IBP bounds it exactly and the planner runs no backward
    pass there whatever its knob says, so the knob is no decision (its choices would be the
    same code under other plan keys, measured again); the other pre-activations are."""
    from boundflow.ir.analysis import ibp_exact_nodes
    from boundflow.planner import normalised

    for backend in ("relax", "torch"):
        sp = _space(backend=backend)
        exact = ibp_exact_nodes(normalised(sp.graph)[0])
        pre = sp.base.preactivations
        fixed = [i for i, p in enumerate(pre) if p in exact]
        assert fixed and len(fixed) < len(pre)
        decided = {d.position for d in sp.decisions if d.field == "domains"}
        assert decided == set(range(len(pre))) - set(fixed)
        default = sp.bundle(sp.default())
        rng = random.Random(1)
        for _ in range(20):
            b = sp.bundle(sp.sample(rng))
            assert all(b.knobs.domains[i] == default.knobs.domains[i] for i in fixed)
            assert sp.bundle(sp.assignment_of(b)).key == b.key



@pytest.mark.parametrize("strategy", ["greedy", "beam", "cpsat"])
def test_strategies_find_the_optimum_of_a_known_score(strategy):
    """A separable score with one best choice per decision: the model-guided strategies
    propose its optimum first; random search does not."""
    sp = _space()
    rng = random.Random(5)
    target = sp.sample(rng)
    weights = [rng.uniform(0.5, 2.0) for _ in sp.decisions]

    def score(points):
        return np.array([sum(w * (v != t) for w, v, t in zip(weights, a, target))
                         for a in points], float)
    s = make(strategy, sp, seed=1, epsilon=0.0)
    (first, *_) = s.ask(3, score, set(), [sp.default()])
    assert score([first])[0] == score([target])[0] == 0.0
    rnd = make("random", sp, seed=1).ask(3, score, set(), [sp.default()])
    assert min(score(rnd)) > 0
    # measured candidates (plan, backend) are never proposed again
    seen = {sp.candidate(target)}
    assert all(sp.candidate(a) not in seen for a in s.ask(3, score, seen, [sp.default()]))


def test_cpsat_respects_a_memory_budget():
    sp = _space()
    d = sp.default()
    budget = sp.bundle(d).peak_bytes(2)

    def score(points):          # prefers the biggest memory: the budget must stop it
        return np.array([-float(sp.bundle(a).peak_bytes(2)) for a in points])
    s = make("cpsat", sp, seed=0, epsilon=0.0, memory_budget=budget)
    picks = s.ask(4, score, set(), [d])
    assert picks and all(sp.bundle(a).peak_bytes(2) <= budget for a in picks)


def test_objectives():
    assert Objective.parse("time@mem:1000").memory_budget == 1000
    assert Objective.parse("time@mem:1e6").name == "time@mem:1000000"
    assert Objective.parse("mix:1,0.5").name == "mix:1,0.5"
    assert Objective.parse("mix:0,2").memory_weight == 2
    assert Objective.parse(" time ").name == "time"
    with pytest.raises(BoundFlowError, match="objective"):
        Objective.parse("fastest")
    from boundflow.measure import MeasureResult
    ref = MeasureResult("a", "torch", "llvm", median_s=1.0, mean_width=2.0)
    looser = MeasureResult("b", "torch", "llvm", median_s=0.5, mean_width=3.0)
    assert Objective.parse("time@width").measured(looser, ref) == np.inf
    assert Objective.parse("time").measured(looser, ref) == pytest.approx(np.log(0.5))


@pytest.mark.parametrize("text", ["fastest", "", "time@", "time@mem:", "time@mem:0",
                                  "time@mem:-5", "time@mem:inf", "time@mem:nan", "time@mem:0.5",
                                  "time@mem:lots", "mix:nan,1", "mix:1,inf", "mix:-1,1",
                                  "mix:0,0", "mix:1", "mix:1,2,3", "mix:a,b", "TIME"])
def test_bad_objectives_fail_at_once_listing_the_valid_forms(text):
    with pytest.raises(ObjectiveError) as got:
        Objective.parse(text)
    msg = str(got.value)
    assert isinstance(got.value, BoundFlowError) and "\n" not in msg
    assert repr(text) in msg
    assert "time, time@width, time@mem:BYTES" in msg and "mix:A,B" in msg


def test_objectives_are_validated_when_made_and_looked_up(tmp_path):
    for bad in (dict(kind="fastest"), dict(kind="time@mem"), dict(kind="time@mem",
                memory_budget=0), dict(kind="mix", width_weight=float("nan"), memory_weight=1),
                dict(kind="mix"), dict(kind="time", width_weight=1.0),
                dict(kind="time", memory_budget=5)):
        with pytest.raises(ObjectiveError, match="valid forms"):
            Objective(**bad)
    # a tuner refuses a bad objective before measuring anything
    _, g = example_graph("digits_mlp")
    x = np.zeros((1,) + g.input_shape, np.float32)
    with Database(tmp_path / "t.db") as db:
        with pytest.raises(ObjectiveError):
            Tuner(g, x, x, None, method="ibp", db=db, backend="torch", objective="mix:nan,1",
                  progress=False)
        assert db.summary()["measurements"] == 0
        # verify --db with a typo fails instead of finding "no tuned plan"
        w = Workload.of(g, batch=1, method="ibp")
        with pytest.raises(ObjectiveError, match="fastest"):
            tuned_plan(db, w, "fastest")
        assert tuned_plan(db, w, "time@mem:1e3") is None


def _tune_cmd(db, trials, method="crown-ibp", backend="torch", batch_size=2):
    return [sys.executable, "-m", "boundflow.cli", "tune", "--model",
            os.path.join(DATA, "digits_mlp.pt2"), "--input", os.path.join(DATA, "digits_x.npy"),
            "--eps", "0.01", "--method", method, "--backend", backend, "--db", str(db),
            "--trials", str(trials), "--batch-size", str(batch_size), "--number", "2",
            "--repeat", "2",
            "--strategy", "greedy", "--no-progress"]


def test_tune_resumes_after_a_kill_without_duplicates(tmp_path):
    db_path = tmp_path / "tuning.db"
    env = dict(os.environ, PYTHONPATH=ROOT)
    # one plan per round, so the kill lands mid-run however fast the machine is
    p = subprocess.Popen(_tune_cmd(db_path, 12, batch_size=1), cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while True:                                  # kill once some plans are measured
        assert p.poll() is None, p.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "tune measured nothing in 300 s"
        if db_path.exists():
            with Database(db_path) as db:
                if db.summary()["measurements"] >= 2:
                    break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)            # the tuner and its workers
    p.wait()
    with Database(db_path) as db:
        first = db.summary()["measurements"]
        assert 2 <= first < 12
    out = subprocess.run(_tune_cmd(db_path, 12), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{12 - first} plans measured now, {first} before" in out.stdout
    with Database(db_path) as db:
        recs = db.records_for_training(include_failed=True)
        keys = [r.candidate.key for r in recs]
        assert len(keys) == len(set(keys)) == 12            # no plan measured twice
        runs = db.runs()
        # the killed run is dead: its process is gone (found at once on this machine)
        assert [r.status for r in runs] == ["dead", "finished"]
        assert db.claims() == []


def _sigint_default():
    """In a child about to exec: SIGINT as a terminal's process has it (a test run started in
    the background, as CI may, ignores SIGINT, and its children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_a_tune_with_one_line_and_records_no_failure(tmp_path):
    """Ctrl-C (SIGINT to the tune and its workers) while the default plan is measured: exit
    130, one line, no process left; the interrupt is recorded as no plan's failure (it was
    stored as the default's, which stopped every later tune of the workload), and the
    next tune runs."""
    db_path = tmp_path / "tuning.db"
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen(_tune_cmd(db_path, 12, batch_size=1), cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                         preexec_fn=_sigint_default)
    deadline = time.monotonic() + 300
    while True:                                  # as soon as the run has started
        assert p.poll() is None, p.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "tune started no run in 300 s"
        if db_path.exists():
            with Database(db_path) as db:
                if db.runs():
                    break
        time.sleep(0.02)
    time.sleep(0.3)
    os.killpg(p.pid, signal.SIGINT)
    try:
        _, err = p.communicate(timeout=60)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)     # anything left (there should be nothing)
            left = True
        except ProcessLookupError:
            left = False
    assert p.returncode == 130, err.decode()[-2000:]
    assert err.decode().strip() == "boundflow: interrupted (tune)"
    assert not left
    with Database(db_path) as db:
        recs = db.records_for_training(include_failed=True)
        assert all(r.measurement.result.ok for r in recs), \
            [r.measurement.result.error for r in recs]
        assert [r.status for r in db.runs()] == ["failed"] and db.claims() == []
    out = subprocess.run(_tune_cmd(db_path, 2), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]


def test_tuned_plan_is_used_by_verify_in_another_process(tmp_path):
    """A record that beat the default path in the final pass is what ``verify --db`` runs.
    (The runner is scripted so the tuned plan is faster for sure: three real measurements
    of near-equal torch plans may rank either way, and a slower record is refused, see
    tests/search/test_baseline.py.)"""
    ex, g = example_graph("digits_mlp")
    x = np.load(os.path.join(DATA, "digits_x.npy")).astype(np.float32)
    from boundflow.api import query
    from tests.search.test_baseline import Scripted

    g, spec, linear, _, _ = query(g, x, eps=0.01)
    db_path = tmp_path / "tuning.db"
    with Database(db_path) as db:
        tuner = Tuner(g, spec.lower, spec.upper, linear.C, method="crown-ibp", db=db,
                      strategy="beam", backend="torch", progress=False, batch_size=2,
                      builder=_NoBuilder())
        tuner.runner = Scripted(tuner.baseline, default_ms=2.0, search_ms=1.0, final_ms=1.0)
        try:
            report = tuner.tune(trials=3)
        finally:
            tuner.close()
        assert report.measured_now == 3 and report.best.ok and not report.kept_default
        assert report.speedup == pytest.approx(2.0, rel=0.05)
        found = tuned_plan(db, report.workload)
        assert found is not None and found.bundle.key == report.best_bundle.key
        assert found.speedup == pytest.approx(report.speedup)
    verify = [sys.executable, "-m", "boundflow.cli", "verify", "--model",
              os.path.join(DATA, "digits_mlp.pt2"), "--input", os.path.join(DATA, "digits_x.npy"),
              "--eps", "0.01", "--db", str(db_path), "--json"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run(verify + ["--method", "crown-ibp"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["tuned"]["plan"] == report.best_bundle.key and got["tuned"]["backend"] == "torch"
    assert "no tuned plan" not in out.stderr
    # no record for another method: the default plan, with a one-line notice
    out = subprocess.run(verify + ["--method", "ibp"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    notice = [line for line in out.stderr.splitlines() if "no tuned plan" in line]
    assert len(notice) == 1 and "using the default plan" in notice[0]
    assert "tuned" not in json.loads(out.stdout)


def _slow_measure(db_path, inp, build, config):
    """Measures after sleeping past the tuner's heartbeat timeout, then checks (from this
    worker process) that the run still reads as running: the heartbeat thread kept it."""
    from boundflow.measure.worker import measure_local

    time.sleep(2.5)
    with Database(db_path) as db:
        status = db.runs()[-1].status
    if status != "running":
        raise RuntimeError(f"the tuning run reads {status} while measuring")
    return measure_local(inp, build, config)


def _digits_query(n=2):
    _, g = example_graph("digits_mlp")
    x = np.load(os.path.join(DATA, "digits_x.npy")).astype(np.float32)[:n]
    from boundflow.api import query

    g, spec, linear, _, _ = query(g, x, eps=0.01)
    return g, spec, linear


def test_a_slow_candidate_does_not_make_its_run_dead(tmp_path):
    import functools

    from boundflow.measure import LocalRunner

    g, spec, linear = _digits_query()
    db_path = tmp_path / "tuning.db"
    config = MeasureConfig(number=1, repeat=1, warmup=0, timeout_s=60)
    with Database(db_path) as db:
        tuner = Tuner(g, spec.lower, spec.upper, linear.C, method="ibp", db=db,
                      strategy="random", backend="torch", progress=False, batch_size=1,
                      config=config, heartbeat_timeout=1.0,
                      runner=LocalRunner(config, f_run=functools.partial(_slow_measure,
                                                                         str(db_path))))
        try:
            report = tuner.tune(trials=2)
        finally:
            tuner.close()
        assert report.best.ok and report.default.ok, report.default.error
        assert [r.status for r in db.runs()] == ["finished"]


def test_a_tuner_takes_over_the_plans_of_a_dead_run(tmp_path):
    """Another run claimed the default plan and went silent: the tuner waits for it, finds it
    dead once its heartbeat is stale, and measures the plan itself."""
    g, spec, linear = _digits_query()
    with Database(tmp_path / "tuning.db") as db:
        tuner = Tuner(g, spec.lower, spec.upper, linear.C, method="ibp", db=db,
                      strategy="random", backend="torch", progress=False, batch_size=1,
                      config=MeasureConfig(number=1, repeat=1, warmup=0, timeout_s=60))
        default_key = tuner.space.bundle(tuner.space.default()).key
        silent = db.start_run(tuner.workload, "random", {}, backend="torch",
                              machine=tuner.machine, heartbeat_timeout=1.5)
        assert db.claim(silent, [default_key]) == [default_key]
        try:
            start = time.monotonic()
            report = tuner.tune(trials=2)
        finally:
            tuner.close()
        assert time.monotonic() - start > 1.0            # it waited for the heartbeat
        assert report.measured_now == 2 and report.default.ok
        assert [r.status for r in db.runs()] == ["dead", "finished"]
        keys = [r.candidate.key for r in db.records_for_training(include_failed=True)]
        assert keys.count(default_key) == 1 and len(keys) == 2
        assert db.claims() == []


class _ElsewhereRunner:
    """Answers at once, as if measured on another machine (a table of old measurements)."""

    def run(self, inputs, builds):
        from boundflow.measure import MeasureResult

        return [MeasureResult(i.key, i.backend, i.target, median_s=1e-3 * (1 + n),
                              mean_s=1e-3, std_s=0.0, times=(1e-3,), mean_width=1.0,
                              peak_bytes=1024, machine="elsewhere")
                for n, i in enumerate(inputs)]

    def close(self):
        pass


class _NoBuilder:
    def build(self, inputs):
        from boundflow.measure import BuildResult

        return [BuildResult(None) for _ in inputs]

    def close(self):
        pass


def test_a_runner_recording_another_machine_still_stops_at_the_budget():
    g, spec, linear = _digits_query()
    with Database(":memory:") as db:
        tuner = Tuner(g, spec.lower, spec.upper, linear.C, method="crown-ibp", db=db,
                      strategy="greedy", backend="torch", progress=False, batch_size=2,
                      objective="time", builder=_NoBuilder(), runner=_ElsewhereRunner())
        report = tuner.tune(trials=5)
        keys = [r.candidate.key for r in db.records_for_training(include_failed=True)]
        assert report.measured_now == 5 and len(keys) == len(set(keys)) == 5
        assert db.claims() == [] and [r.status for r in db.runs()] == ["finished"]


def _scripted(db, g, spec, linear, runner):
    """A random-strategy tuner of the digits MLP's CROWN-IBP workload (objective time) that
    builds nothing and measures with ``runner``."""
    return Tuner(g, spec.lower, spec.upper, linear.C, method="crown-ibp", db=db,
                 strategy="random", backend="torch", progress=False, batch_size=2,
                 objective="time", builder=_NoBuilder(), runner=runner)


class _CuttingBuilder:
    """Builds nothing; its ``n``-th call comes back cut, as a compile past the tuner's time
    would. Records the seconds each call was given."""

    def __init__(self, n):
        self.n, self.given = n, []

    def build(self, inputs, seconds=None):
        from boundflow.measure import BuildResult

        self.given.append(seconds)
        cut = len(self.given) == self.n
        return [BuildResult(None, error_kind="timeout" if cut else None, cut=cut)
                for _ in inputs]

    def close(self):
        pass


def test_a_compile_cut_by_the_time_budget_ends_the_tune_and_records_nothing():
    g, spec, linear = _digits_query()
    builder = _CuttingBuilder(n=3)
    with Database(":memory:") as db:
        tuner = Tuner(g, spec.lower, spec.upper, linear.C, method="crown-ibp", db=db,
                      strategy="random", backend="torch", progress=False, batch_size=2,
                      objective="time", builder=builder, runner=_ElsewhereRunner())
        report = tuner.tune(trials=10, seconds=600)
        # the default plan is measured whatever the budget; the others within what is left
        assert len(builder.given) == 3 and builder.given[0] is None
        assert all(0 < s <= 600 for s in builder.given[1:])
        assert report.measured_now == 2                     # the cut one is not a trial
        assert len(db.records_for_training(tuner.workload, include_failed=True)) == 2
        assert db.claims(tuner.workload) == [] and db.runs()[-1].status == "finished"


class _LuckyRunner:
    """In the search, the first candidate after the default plan is measured far faster
    than it is (a lucky moment); side by side (``compare``) every plan runs at its true
    speed, and the second candidate is the fastest."""

    def __init__(self):
        self.order = []

    def _result(self, i, t):
        from boundflow.measure import MeasureResult
        from boundflow.measure.result import machine

        return MeasureResult(i.key, i.backend, i.target, median_s=t, mean_s=t, std_s=0.0,
                             times=(t,) * 5, mean_width=1.0, peak_bytes=1024,
                             machine=machine())

    def _rank(self, key):
        if key not in self.order:
            self.order.append(key)
        return self.order.index(key)

    def run(self, inputs, builds, config=None):
        return [self._result(i, {0: 2e-3, 1: 1e-4}.get(self._rank(i.key), 1.5e-3))
                for i in inputs]

    def compare(self, inputs, builds, config=None):
        return [self._result(i, {0: 2e-3, 1: 3e-3, 2: 1e-3}.get(self._rank(i.key), 1.5e-3))
                for i in inputs]

    def close(self):
        pass


def test_the_plan_confirmed_is_the_fastest_finalist_side_by_side_not_the_luckiest():
    g, spec, linear = _digits_query()
    runner = _LuckyRunner()
    with Database(":memory:") as db:
        tuner = _scripted(db, g, spec, linear, runner)
        report = tuner.tune(trials=6)
    lucky, fastest = runner.order[1], runner.order[2]
    assert report.best_bundle.key == fastest and not report.kept_default
    assert report.search_best.median_s == 1.5e-3         # its own search measurement
    assert report.best.median_s == 1e-3 and report.default.median_s == 2e-3
    assert lucky != fastest


def test_the_search_holds_the_plan_that_wins_side_by_side_not_the_luckiest():
    """The lucky plan's single measurement beats the default's twenty times over; timed side
    by side it loses, so the search never holds it (nor climbs from it): it holds the default
    until the truly faster plan wins its challenge, and the report says when."""
    g, spec, linear = _digits_query()
    runner = _LuckyRunner()
    with Database(":memory:") as db:
        tuner = _scripted(db, g, spec, linear, runner)
        seen = set()
        real = tuner._incumbents

        def spy(history, by_cand):
            got = real(history, by_cand)
            seen.update(tuner.space.candidate(a)[0] for a in got)
            return got
        tuner._incumbents = spy
        report = tuner.tune(trials=6)
    base, lucky, fastest = runner.order[:3]
    assert report.held == ((1, base, "torch"), (3, fastest, "torch"))
    assert report.challenges == 2                        # the lucky one, then the fastest
    assert lucky not in seen                  # never among the incumbents the strategy sees
    assert tuner._lost == {(lucky, "torch"), (base, "torch")}
    assert lucky not in report.finalists and report.finalists[0] == fastest


def test_without_side_by_side_timing_the_best_measurement_is_held():
    """A runner that cannot time plans together (no ``compare``): no challenge, the best
    single measurement is held (each plan here is measured faster than the one before)."""
    from boundflow.measure import MeasureResult
    from boundflow.measure.result import machine

    class Faster:
        def __init__(self):
            self.n = 0

        def run(self, inputs, builds, config=None):
            self.n += 1
            t = 1e-3 / self.n
            return [MeasureResult(i.key, i.backend, i.target, median_s=t, mean_s=t, std_s=0.0,
                                  times=(t,), mean_width=1.0, peak_bytes=1024,
                                  machine=machine()) for i in inputs]

        def close(self):
            pass
    g, spec, linear = _digits_query()
    with Database(":memory:") as db:
        tuner = _scripted(db, g, spec, linear, Faster())
        report = tuner.tune(trials=3)
    assert report.challenges == 0
    assert [n for n, _, _ in report.held] == [1, 2, 3]


class _TieRunner(_LuckyRunner):
    """Every plan is measured at a quarter of the default's time in the search; side by
    side, each is 1% faster than the default (a tie within the noise)."""

    def run(self, inputs, builds, config=None):
        return [self._result(i, 2e-3 if self._rank(i.key) == 0 else 5e-4) for i in inputs]

    def compare(self, inputs, builds, config=None):
        return [self._result(i, 2e-3 if self._rank(i.key) == 0 else 1.98e-3) for i in inputs]


def test_a_tie_side_by_side_does_not_move_the_incumbent():
    """A challenger must win as a tuned plan must beat the default path: 1% faster in the
    side-by-side pass is within the noise, so the search keeps the default."""
    g, spec, linear = _digits_query()
    with Database(":memory:") as db:
        tuner = _scripted(db, g, spec, linear, _TieRunner())
        report = tuner.tune(trials=4)
    assert report.challenges == 3 and len(report.held) == 1      # each one lost
    assert report.kept_default


def test_another_runs_plan_that_does_not_re_plan_is_never_run():
    """A shared database holds a plan measured 100x faster than anything, by another run, on
    this machine; its storage plan was edited (every buffer in one slot: unsound if run).
    The tuner never times it, in a challenge or the final pass, and never reports it."""
    from boundflow.measure import MeasureResult
    from boundflow.measure.result import machine
    from boundflow.planner import plan
    from tests.planner.test_trust import _one_slot

    g, spec, linear = _digits_query()
    runner = _LuckyRunner()
    seen = set()
    real_run, real_compare = runner.run, runner.compare

    def run(inputs, builds, config=None):
        seen.update(i.key for i in inputs)
        return real_run(inputs, builds, config)

    def compare(inputs, builds, config=None):
        seen.update(i.key for i in inputs)
        return real_compare(inputs, builds, config)
    runner.run, runner.compare = run, compare
    with Database(":memory:") as db:
        tuner = _scripted(db, g, spec, linear, runner)
        from boundflow.ir.plan import PlanBundle

        bad = PlanBundle.from_json(_one_slot(plan(g, tuner.workload)))
        assert bad.key != tuner.baseline[0]
        db.add_measurement(bad, MeasureResult(bad.key, "torch", "llvm", median_s=1e-5,
                                              mean_s=1e-5, std_s=0.0, times=(1e-5,) * 5,
                                              mean_width=1.0, peak_bytes=1024,
                                              machine=machine()))
        report = tuner.tune(trials=5)
    assert bad.key not in seen and (bad.key, "torch") in tuner._unmapped
    assert report.best_bundle.key != bad.key and bad.key not in report.finalists
    assert all(k != bad.key for _, k, _ in report.held)


def test_an_older_boundflows_twin_plan_is_learnt_and_not_measured_again():
    """A database holds a plan an older BoundFlow measured, whose knobs put CROWN on the
    first layer (IBP bounds it exactly: the same code as this space's plan with the default
    domain there, under another key). The tuner maps it to that twin, and when its strategy
    proposes the twin, it is not measured again in the search. A stored plan its knobs do
    not give is no twin."""
    from boundflow.measure import MeasureResult
    from boundflow.measure.result import machine
    from boundflow.planner import normalised, plan
    from boundflow.ir.analysis import ibp_exact_nodes
    from boundflow.ir.plan import PlanBundle
    from tests.planner.test_trust import _one_slot

    g, spec, linear = _digits_query()
    runner = _SlowerRunner()
    searched = []
    real_run = runner.run

    def run(inputs, builds, config=None):
        searched.extend(i.key for i in inputs)
        return real_run(inputs, builds, config)
    runner.run = run
    with Database(":memory:") as db:
        tuner = _scripted(db, g, spec, linear, runner)
        sp, rng = tuner.space, random.Random(3)
        a = next(a for a in (sp.sample(rng) for _ in range(100))
                 if sp.bundle(a).key != tuner.baseline[0])
        mine = sp.bundle(a)
        exact = ibp_exact_nodes(normalised(g)[0])
        k = mine.knobs
        domains = tuple("crown" if p in exact else d
                        for p, d in zip(sp.base.preactivations, k.domains))
        old = plan(g, tuner.workload, k.replace(domains=domains))
        assert old.key != mine.key and domains != k.domains
        assert sp.assignment_of(old) == a
        edited = PlanBundle.from_json(_one_slot(old))     # not what its knobs give
        assert sp.assignment_of(edited) is None
        db.add_measurement(old, MeasureResult(old.key, "torch", "llvm", median_s=2e-3,
                                              mean_s=2e-3, std_s=0.0, times=(2e-3,) * 5,
                                              mean_width=1.0, peak_bytes=1024,
                                              machine=machine()))
        # a strategy that wants the twin (every strategy skips what it is told is seen)
        tuner.strategy.propose = lambda n, score, seen, incumbents: \
            [a] if sp.candidate(a) not in seen else []
        tuner.tune(trials=4)
    assert (old.key, "torch") not in tuner._unmapped
    assert mine.key not in searched and len(searched) >= 2


class _SlowerRunner(_LuckyRunner):
    """Every plan but the default (the first measured) takes twice its time, in the search
    and side by side."""

    def run(self, inputs, builds, config=None):
        return [self._result(i, 1e-3 if self._rank(i.key) == 0 else 2e-3) for i in inputs]

    compare = run


def test_a_relax_only_search_with_nothing_faster_keeps_the_default_without_final_passes():
    """Searching Relax alone, the baseline (the torch default path) is not a point of the
    space; nothing beats it, so it is the search's best: no finalists, no final passes."""
    g, spec, linear = _digits_query()
    runner = _SlowerRunner()
    passes = []
    real = runner.compare

    def compare(inputs, builds, config=None):
        passes.append(len(inputs))
        return real(inputs, builds, config)
    runner.compare = compare
    with Database(":memory:") as db:
        tuner = Tuner(g, spec.lower, spec.upper, linear.C, method="crown-ibp", db=db,
                      strategy="random", backend="relax", progress=False, batch_size=2,
                      objective="time", builder=_NoBuilder(), runner=runner)
        assert tuner.baseline[1] == "torch" and tuner.backends == ("relax",)
        report = tuner.tune(trials=4)
    assert report.kept_default and report.finalists == () and passes == []
    assert report.best_bundle.key == tuner.baseline[0]


class _FlakyDefaultRunner(_LuckyRunner):
    """Its first measurement (the default plan's) fails, as one cut short by Ctrl-C in an
    earlier version did; every later one runs."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def run(self, inputs, builds, config=None):
        from boundflow.measure import MeasureResult

        self.calls += 1
        if self.calls == 1:
            return [MeasureResult.failed(i.key, i.backend, i.target, "run", "KeyboardInterrupt")
                    for i in inputs]
        return super().run(inputs, builds, config)


def test_a_default_plan_failure_recorded_before_is_measured_again_once():
    """A tune that found the default plan's only measurement failed (an earlier run's) measures
    it again instead of stopping every later tune of the workload on it; one that fails
    again still stops, with the error."""
    g, spec, linear = _digits_query()
    runner = _FlakyDefaultRunner()
    with Database(":memory:") as db:
        with pytest.raises(BoundFlowError, match="default plan failed.*KeyboardInterrupt"):
            _scripted(db, g, spec, linear, runner).tune(trials=3)
        report = _scripted(db, g, spec, linear, runner).tune(trials=3)
        assert report.default.ok and report.measured_now >= 1
        rows = db.records_for_training(report.default_bundle.workload, include_failed=True)
        base = [r for r in rows if r.candidate.key == report.default_bundle.key]
        assert [r.measurement.result.ok for r in base] == [False, True]

    class _Broken(_LuckyRunner):
        def run(self, inputs, builds, config=None):
            from boundflow.measure import MeasureResult

            return [MeasureResult.failed(i.key, i.backend, i.target, "run", "broken")
                    for i in inputs]
    broken = _Broken()
    with Database(":memory:") as db:
        for _ in range(2):                   # measured once per tune, then the error
            with pytest.raises(BoundFlowError, match="default plan failed.*broken"):
                _scripted(db, g, spec, linear, broken).tune(trials=3)
        workload = _scripted(db, g, spec, linear, broken).workload
        assert len(db.records_for_training(workload, include_failed=True)) == 2


def test_cpsat_leaves_ctrl_c_to_python():
    """After CP-SAT has solved, SIGINT is still Python's KeyboardInterrupt (CP-SAT's own
    handler killed the process outright: no message, its tuning run left running)."""
    code = ("import os, signal, time\n"
            "from tests.search.test_search import _space\n"
            "from boundflow.search import make\n"
            "import numpy as np\n"
            "sp = _space()\n"
            "s = make('cpsat', sp, seed=0, epsilon=0.0)\n"
            "s.ask(2, lambda pts: np.zeros(len(pts)), set(), [sp.default()])\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(5)\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted in python')\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, timeout=120, preexec_fn=_sigint_default)
    assert out.returncode == 0 and "interrupted in python" in out.stdout, out.stderr[-2000:]


def test_a_tune_measures_the_seeds_the_model_likes_first(tmp_path):
    """After the default, a tune measures the seeds (the default on the other backends, the
    schedule presets) in the order the model scores them, best first; where it scores them
    the same, in the space's order. On Relax a preset is often the best plan of a short
    tune: a warm model that knows which reaches it in the first batch."""
    ex, g = example_graph("digits_mlp")
    x = np.load(os.path.join(DATA, "digits_x.npy")).astype(np.float32)
    from boundflow.api import query

    g, spec, linear, _, _ = query(g, x, eps=0.01)
    with Database(tmp_path / "t.db") as db:
        def first_batch(score, n=4):
            tuner = Tuner(g, spec.lower, spec.upper, linear.C, method="crown-ibp", db=db,
                          backend="torch,relax", progress=False, batch_size=n)
            try:
                if score is not None:
                    tuner.score = score
                return tuner.space.seeds(), tuner._propose(n, {}, {}, set())
            finally:
                tuner.close()
        seeds, batch = first_batch(lambda pool: np.zeros(len(pool)))    # all the same
        assert len(seeds) >= 3 and batch[:3] == [batch[0]] + seeds[:2]
        assert batch[0][0] == "torch" and seeds[0][0] == "relax"        # default first
        # a model that likes the last seed best, then the one before it
        rank = {a: i for i, a in enumerate(seeds)}
        _, batch = first_batch(lambda pool: np.array([-rank.get(a, -1.0) for a in pool]))
        assert batch[1:3] == [seeds[-1], seeds[-2]]
        # and one that likes a plan of the rest of the space better still: it goes first
        # (the global pick), then the seeds
        far = lambda a: sum(u != v for u, v in zip(a, seeds[0]))   # noqa: E731
        liked = lambda pool: np.array(                              # noqa: E731
            [-rank[a] if a in rank else 1.0 - 100.0 * (far(a) >= 4) for a in pool])
        _, batch = first_batch(liked)
        assert batch[1] not in rank and far(batch[1]) >= 4
        assert batch[2:4] == [seeds[-1], seeds[-2]]
        # ... but not better than the seeds the model likes more: after them
        between = 1.5 - len(seeds)             # the last seed's score is 1 - len(seeds)
        _, batch = first_batch(lambda pool: np.array(
            [-rank[a] if a in rank else between if far(a) >= 4 else 1.0 for a in pool]))
        assert batch[1] == seeds[-1] and batch[2] not in rank and far(batch[2]) >= 4
        assert batch[3] == seeds[-2]
        # a batch of two has no slot for it: the seeds
        _, batch = first_batch(liked, n=2)
        assert batch[1] == seeds[-1]
