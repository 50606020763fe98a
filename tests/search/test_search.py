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
from boundflow.search import Objective, Tuner, TuneSpace, make
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
    assert sp.describe(d) == "(the default plan)"
    for _ in range(10):
        a = sp.sample(rng)
        b = sp.bundle(a)
        back = sp.assignment_of(b)
        assert back is not None and sp.bundle(back).key == b.key
        kinds = {t.name: t.kind for t in b.task_graph.tasks}
        groups = sp.schedules(a)
        for task, _, pairs in b.lowering_plan.tasks:         # schedules reach their tasks
            group = "fwd" if kinds[task] in ("ibp", "layout") else "bwd"
            assert pairs == groups[group]
    with pytest.raises(BoundFlowError, match="not one of"):
        sp.check(("nope",) + d[1:])


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
    # measured plans are never proposed again
    seen = {sp.bundle(target).key}
    assert all(sp.bundle(a).key not in seen for a in s.ask(3, score, seen, [sp.default()]))


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
    assert Objective.parse("mix:1,0.5").name == "mix:1,0.5"
    with pytest.raises(BoundFlowError, match="objective"):
        Objective.parse("fastest")
    from boundflow.measure import MeasureResult
    ref = MeasureResult("a", "torch", "llvm", median_s=1.0, mean_width=2.0)
    looser = MeasureResult("b", "torch", "llvm", median_s=0.5, mean_width=3.0)
    assert Objective.parse("time@width").measured(looser, ref) == np.inf
    assert Objective.parse("time").measured(looser, ref) == pytest.approx(np.log(0.5))


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
        assert [r.status for r in runs] == ["running", "finished"]   # the killed run stays so


def test_tuned_plan_is_used_by_verify_in_another_process(tmp_path):
    ex, g = example_graph("digits_mlp")
    x = np.load(os.path.join(DATA, "digits_x.npy")).astype(np.float32)
    from boundflow.api import query

    g, spec, linear, _, _ = query(g, x, eps=0.01)
    db_path = tmp_path / "tuning.db"
    with Database(db_path) as db:
        tuner = Tuner(g, spec.lower, spec.upper, linear.C, method="crown-ibp", db=db,
                      strategy="beam", backend="torch", progress=False, batch_size=2,
                      config=MeasureConfig(number=1, repeat=2, timeout_s=60))
        try:
            report = tuner.tune(trials=3)
        finally:
            tuner.close()
        assert report.measured_now == 3 and report.best.ok
        found = tuned_plan(db, report.workload)
        assert found is not None and found.bundle.key == report.best_bundle.key
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
