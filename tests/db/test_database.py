"""The tuning database: one conformance suite run on SQLite in memory, an SQLite file and a
real PostgreSQL server; concurrency across processes; crash safety; bad databases."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from boundflow.db import SCHEMA_VERSION, Database
from boundflow.errors import BoundFlowError, DatabaseError
from boundflow.measure import MeasureResult
from tests.db.conftest import ROOT, sample_bundles


def _result(bundle, median, backend="relax", **kw):
    return MeasureResult(bundle.key, backend, bundle.workload.target, median_s=median,
                         mean_s=median, std_s=0.0, times=(median,), mean_width=1.5,
                         verified_fraction=0.5, n_kernels=3, compile_seconds=0.2,
                         peak_bytes=1024, peak_source="planned", **kw)


def test_conformance(db_url):
    bundles, g = sample_bundles(4)
    w = bundles[0].workload
    with Database(db_url) as db:
        assert db.summary()["measurements"] == 0 and db.best(w) is None
        rec = db.add_workload(w, g)
        assert rec.key == w.key and rec.workload == w and rec.summary["ops"]
        for b, t in zip(bundles, (3e-3, 1e-3, 2e-3)):
            db.add_measurement(b, _result(b, t), features=[1.0, 2.0], graph=g)
        failed = MeasureResult.failed(bundles[3].key, "relax", "llvm", "crash", "worker died")
        db.add_measurement(bundles[3], failed)
        # the best plan and the top k follow the fastest median; failures are never best
        best = db.best(w)
        assert best.candidate.key == bundles[1].key
        assert best.measurement.result.median_s == pytest.approx(1e-3)
        assert best.candidate.bundle().to_json() == bundles[1].to_json()
        assert best.candidate.features == (1.0, 2.0)
        assert [r.candidate.key for r in db.top_k(w, 2)] == [bundles[1].key, bundles[2].key]
        db.add_measurement(bundles[0], _result(bundles[0], 5e-4))      # faster now
        assert db.best(w).candidate.key == bundles[0].key
        db.add_measurement(bundles[2], _result(bundles[2], 9e-3))      # slower: no change
        assert db.best(w).candidate.key == bundles[0].key
        assert len(db.top_k(w, 10)) == 3                          # each candidate once
        assert db.best(w, target="cuda") is None
        # measurements round-trip every field
        got = {r.measurement.result.median_s: r.measurement.result
               for r in db.records_for_training(w)}
        want = _result(bundles[1], 1e-3)
        assert got[1e-3].to_dict() | {"timestamp": 0, "machine": ""} == \
            want.to_dict() | {"timestamp": 0, "machine": ""}
        assert len(db.records_for_training()) == 5
        assert len(db.records_for_training(w, include_failed=True)) == 6
        assert db.has_measurement(bundles[3]) and not db.has_measurement(bundles[3], "torch")
        s = db.summary()
        assert (s["workloads"], s["candidates"], s["measurements"]) == (1, 4, 6)
        assert s["failures"] == {"crash": 1}
        assert [c.key for c in db.candidates(w)] == [b.key for b in bundles]
        # cost models: the newest under a name; tuning runs
        db.save_cost_model("xgb", b"one", "f1", {"spearman": 0.5})
        db.save_cost_model("xgb", b"two", "f1", {"spearman": 0.9})
        m = db.load_cost_model("xgb")
        assert (m.blob, m.metrics["spearman"]) == (b"two", 0.9)
        assert db.load_cost_model("none") is None
        run = db.start_run(w, "beam", {"trials": 8})
        db.finish_run(run, "finished", 8)
        (r,) = db.runs(w)
        assert (r.status, r.n_trials, r.config) == ("finished", 8, {"trials": 8})
        with pytest.raises(DatabaseError, match="no tuning run"):
            db.finish_run(run + 100, "finished", 1)
        with pytest.raises(BoundFlowError, match="given for plan"):
            db.add_measurement(bundles[0], _result(bundles[1], 1.0))
        # export / import: into a fresh SQLite database, and again (nothing added)
        buf = io.StringIO()
        assert db.export_jsonl(buf) == 6
    with Database(":memory:") as other:
        assert other.import_jsonl(io.StringIO(buf.getvalue())) == {"added": 6, "skipped": 0}
        assert other.import_jsonl(io.StringIO(buf.getvalue())) == {"added": 0, "skipped": 6}
        assert other.best(w).candidate.key == bundles[0].key
        assert other.summary()["failures"] == {"crash": 1}
        with pytest.raises(DatabaseError, match="line 1"):
            other.import_jsonl(io.StringIO('{"format": "other"}\n'))


def test_reopen_keeps_records(tmp_path):
    (b,), g = sample_bundles(1)
    path = tmp_path / "t.db"
    with Database(path) as db:
        db.add_measurement(b, _result(b, 1e-3), graph=g)
    with Database(path) as db:
        assert db.best(b.workload).candidate.key == b.key


def _run_writers(url: str, n_writers: int, n: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.db.writer", url, str(i), str(n)],
                              cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
             for i in range(n_writers)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-2000:]


def test_concurrent_writers_lose_nothing(shared_db_url):
    Database(shared_db_url).close()                 # created once, then 4 writers at once
    _run_writers(shared_db_url, 4, 200)
    with Database(shared_db_url) as db:
        s = db.summary()
        assert (s["measurements"], s["candidates"], s["workloads"]) == (800, 5, 1)
        recs = db.records_for_training()
        per_writer = {}
        for r in recs:
            per_writer.setdefault(r.measurement.result.machine, set()).add(
                r.measurement.result.timestamp)
        assert {k: len(v) for k, v in per_writer.items()} == {f"writer{i}": 200
                                                              for i in range(4)}


def test_writer_killed_mid_transaction_leaves_no_partial_candidate(shared_db_url, tmp_path):
    marker = tmp_path / "marker"
    with Database(shared_db_url) as db:
        (b,), g = sample_bundles(1)
        db.add_measurement(b, _result(b, 1e-3), graph=g)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "tests.db.writer", shared_db_url, "--hang",
                          str(marker)], cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert p.poll() is None and time.monotonic() < deadline, "the writer did not start"
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with Database(shared_db_url) as db:                # readable, the open transaction gone
        s = db.summary()
        assert (s["candidates"], s["measurements"]) == (1, 1)
        db.add_measurement(b, _result(b, 2e-3))            # and writable
        assert db.summary()["measurements"] == 2


def test_bad_databases_raise_clear_errors(tmp_path):
    (b,), g = sample_bundles(1)
    good = tmp_path / "good.db"
    with Database(good) as db:
        for i in range(30):
            db.add_measurement(b, _result(b, 1e-3 * (i + 1)), graph=g)
    # truncated: half the file
    truncated = tmp_path / "truncated.db"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    # garbage
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database at all" * 200)
    for path in (truncated, garbage):
        with pytest.raises(DatabaseError):
            with Database(path) as db:
                db.summary()
                db.records_for_training()
    # someone else's SQLite database
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("create table users (id integer primary key, name text)")
    con.commit()
    con.close()
    with pytest.raises(DatabaseError, match="not a BoundFlow tuning database"):
        Database(foreign)
    # another schema version
    con = sqlite3.connect(good)
    con.execute("update bf_meta set value = '999' where key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(DatabaseError, match=f"schema version 999.*reads version {SCHEMA_VERSION}"):
        Database(good)
    with pytest.raises(DatabaseError, match="no directory"):
        Database(tmp_path / "missing" / "t.db")
    with pytest.raises(DatabaseError, match="cannot open"):
        Database("nosuchdialect://x")


def test_measure_result_json_round_trip():
    r = MeasureResult("abc", "relax", "llvm", median_s=1.0, mean_s=1.5, std_s=0.1,
                      times=(1.0, 2.0), peak_bytes=12, mean_width=0.5)
    assert MeasureResult.from_json(r.to_json()) == r
    f = MeasureResult.failed("abc", "torch", "llvm", "timeout", "slow")
    assert MeasureResult.from_json(f.to_json()) == f and not f.ok
    with pytest.raises(BoundFlowError, match="error kind"):
        MeasureResult("abc", "relax", "llvm", error_kind="oops")
    with pytest.raises(BoundFlowError, match="unknown fields"):
        MeasureResult.from_dict({"candidate": "a", "backend": "relax", "target": "llvm",
                                 "bogus": 1})
