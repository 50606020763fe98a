"""Four tuner processes on one workload and one database (SQLite file, PostgreSQL): they share
the trial budget and measure no plan twice, and every run finishes."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time

from boundflow.db import Database
from tests.db.conftest import ROOT
from tests.db.tuner import TRIALS

N_TUNERS = 4


def test_four_tuners_share_the_budget_and_measure_no_plan_twice(shared_db_url, tmp_path):
    Database(shared_db_url).close()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-m", "tests.db.tuner", shared_db_url,
                               str(tmp_path / f"ready{i}"), str(go), str(tmp_path / f"out{i}")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(N_TUNERS)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(N_TUNERS)):
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the tuners did not load in 300 s"
        time.sleep(0.05)
    go.write_text("go")                        # all at once
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    reports = [json.loads((tmp_path / f"out{i}").read_text()) for i in range(N_TUNERS)]
    with Database(shared_db_url) as db:
        recs = db.records_for_training(include_failed=True)
        scopes = collections.Counter((r.candidate.key, r.measurement.result.backend,
                                      r.measurement.result.target,
                                      r.measurement.result.machine) for r in recs)
        repeated = sum(n - 1 for n in scopes.values())
        plans = len({r.candidate.key for r in recs})
        runs = db.runs()
        print(f"\n{db.shown().split(':')[0]}: {N_TUNERS} tuners, {TRIALS} trials: {plans} plans "
              f"measured, {repeated} repeated measurements; per run (now, before, by others): "
              f"{[(r['now'], r['before'], r['others']) for r in reports]}")
        assert repeated == 0
        assert plans == TRIALS                            # the budget holds exactly
        assert [r.status for r in runs] == ["finished"] * N_TUNERS
        assert db.claims() == [] and db.summary()["claims"] == 0
    assert sum(r["now"] for r in reports) == TRIALS
    for r in reports:       # each saw every plan: its own, those before it, those of others
        assert r["now"] + r["before"] + r["others"] == TRIALS
    # each run holds the plan that won its own side-by-side challenges (timed by that run, so
    # runs may differ), and confirms the one fastest in its own side-by-side pass of its
    # finalists, plans of the shared database (none: every challenger lost to the default)
    keys = {r.candidate.key for r in recs}
    for r in reports:
        assert set(r["finalists"]) <= keys
        assert r["best"] in r["finalists"] or not r["finalists"]
