"""Tuning runs and claims: the budget, claims released with their measurement, dead runs (by
heartbeat, and at once by process on the same machine), and the schema 1 → 2 migration. Run
on SQLite in memory, an SQLite file and PostgreSQL, like the conformance suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from boundflow.db import SCHEMA_VERSION, Database
from boundflow.errors import BoundFlowError, DatabaseError
from boundflow.measure import MeasureResult
from tests.db.conftest import ROOT, sample_bundles
from tests.db.test_database import _result

MACHINE = "test-machine"


def _measured(bundle, machine=MACHINE, backend="torch"):
    return MeasureResult(bundle.key, backend, bundle.workload.target, median_s=1e-3,
                         mean_s=1e-3, std_s=0.0, times=(1e-3,), machine=machine)


def test_claims_share_a_budget_and_go_with_their_measurement(db_url):
    bundles, g = sample_bundles(6)
    w, keys = bundles[0].workload, [b.key for b in bundles]
    with Database(db_url) as db:
        a = db.start_run(w, "greedy", {}, g, backend="torch", machine=MACHINE)
        b = db.start_run(w, "greedy", {}, g, backend="torch", machine=MACHINE)
        other = db.start_run(w, "greedy", {}, g, backend="torch", machine="elsewhere")
        assert db.claim(a, keys[:2], budget=4) == keys[:2]
        # b cannot take a's plans; the budget counts a's claims
        assert db.claim(b, keys[:4], budget=4) == keys[2:4]
        assert db.claim(b, keys[4:], budget=4) == []
        # another machine is another scope: its own budget, the same plans
        assert db.claim(other, keys[:1], budget=4) == keys[:1]
        assert {(c.candidate_key, c.run_id) for c in db.claims(w)} == \
            {(keys[0], a), (keys[1], a), (keys[2], b), (keys[3], b), (keys[0], other)}
        # the measurement releases the claim in its transaction; the plan still counts
        db.add_measurement(bundles[0], _measured(bundles[0]), graph=g, run_id=a)
        assert keys[0] not in {c.candidate_key for c in db.claims(w) if c.run_id == a}
        assert db.claim(b, [keys[0], keys[4]], budget=4) == []
        assert db.claim(b, [keys[0], keys[4]], budget=5) == [keys[4]]
        assert db.claim(b, [keys[5]]) == [keys[5]]                # no budget
        # finishing releases what is left, in the same transaction
        db.finish_run(b, "finished", 3)
        assert {c.run_id for c in db.claims(w)} == {a, other}
        assert db.heartbeat(a) and not db.heartbeat(b)
        with pytest.raises(DatabaseError, match="is finished"):
            db.claim(b, keys[5:])
        with pytest.raises(BoundFlowError, match="not 'running'"):
            db.finish_run(a, "running", 1)
        db.finish_run(a, "failed", 1)
        db.finish_run(other, "finished", 0)
        assert db.claims() == [] and db.summary()["claims"] == 0
        assert [r.status for r in db.runs(w)] == ["failed", "finished", "finished"]
        assert db.runs(w)[0].backend == "torch" and db.runs(w)[0].machine == MACHINE
        with pytest.raises(BoundFlowError, match="heartbeat_timeout"):
            db.start_run(w, "greedy", {}, backend="torch", machine=MACHINE,
                         heartbeat_timeout=0)


def test_a_silent_run_is_dead_and_its_claims_go_to_others(db_url):
    bundles, g = sample_bundles(2)
    w, keys = bundles[0].workload, [b.key for b in bundles]
    with Database(db_url) as db:
        # this process is alive, so only the heartbeat can say the run is dead
        silent = db.start_run(w, "greedy", {}, g, backend="torch", machine=MACHINE,
                              heartbeat_timeout=0.5)
        live = db.start_run(w, "greedy", {}, g, backend="torch", machine=MACHINE)
        assert db.claim(silent, keys, budget=2) == keys
        assert db.claim(live, keys, budget=2) == []
        time.sleep(0.8)
        # read as dead at once; its claims no longer count
        assert [r.status for r in db.runs(w)] == ["dead", "running"]
        assert [c.run_id for c in db.claims(w)] == []
        assert db.summary()["runs"] == {"dead": 1, "running": 1}
        # the next claim marks it dead and hands its plans over
        assert db.claim(live, keys, budget=2) == keys
        assert [r.status for r in db.runs(w)] == ["dead", "running"]
        assert db.runs(w)[0].finished is not None
        # the dead run learns it must stop, and stays dead
        assert db.heartbeat(silent) is False
        with pytest.raises(DatabaseError, match="is dead"):
            db.claim(silent, keys)
        db.finish_run(silent, "finished", 0)
        assert db.runs(w)[0].status == "dead"
        assert db.reap_dead_runs() == []


def test_a_killed_run_is_dead_at_once_on_its_machine(shared_db_url, tmp_path):
    """A tuner process killed with SIGKILL: another process on the same machine sees its
    process gone, marks it dead and measures its plans, without waiting for the heartbeat."""
    bundles, g = sample_bundles(2)
    w, keys = bundles[0].workload, [b.key for b in bundles]
    Database(shared_db_url).close()
    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "tests.db.writer", shared_db_url, "--claim",
                          str(marker)], cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert p.poll() is None and time.monotonic() < deadline, "the claimer did not start"
        time.sleep(0.1)
    with Database(shared_db_url) as db:
        (run,) = db.runs(w)
        assert run.status == "running" and run.heartbeat_timeout == 600
        assert {c.candidate_key for c in db.claims(w)} == set(keys)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert [r.status for r in db.runs(w)] == ["dead"]        # 600 s heartbeat or not
        me = db.start_run(w, "greedy", {}, g, backend="torch", machine=MACHINE)
        assert db.claim(me, keys, budget=2) == keys
        assert db.reap_dead_runs() == []                        # the claim marked it
        assert [r.status for r in db.runs(w)] == ["dead", "running"]


def test_schema_1_database_is_migrated(shared_db_url):
    from sqlalchemy import create_engine, text

    (b,), g = sample_bundles(1)
    with Database(shared_db_url) as db:
        db.add_measurement(b, _result(b, 1e-3), graph=g)
        db.finish_run(db.start_run(b.workload, "beam", {"trials": 4}), "finished", 4)
        url = db.url
    engine = create_engine(url)                 # back to schema 1
    with engine.begin() as con:
        con.execute(text("drop table bf_claims"))
        for col in ("backend", "machine", "owner", "heartbeat_at", "heartbeat_timeout"):
            con.execute(text(f"alter table bf_tuning_runs drop column {col}"))
        con.execute(text("update bf_meta set value = '1' where key = 'schema_version'"))
    with Database(shared_db_url) as db:
        assert db.best(b.workload).candidate.key == b.key
        (run,) = db.runs()
        assert (run.status, run.n_trials, run.backend) == ("finished", 4, None)
        new = db.start_run(b.workload, "beam", {}, backend="relax", machine=MACHINE)
        assert db.claim(new, ["k"]) == ["k"]
    with engine.begin() as con:
        assert con.execute(text("select value from bf_meta where key = 'schema_version'")
                           ).scalar() == str(SCHEMA_VERSION)
    engine.dispose()
