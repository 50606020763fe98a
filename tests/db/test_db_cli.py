"""``boundflow db show|export|import``."""

from __future__ import annotations

from pathlib import Path

from boundflow.cli import main
from boundflow.db import Database
from tests.db.conftest import sample_bundles
from tests.db.test_database import _result


def test_db_show_export_import(tmp_path, capsys):
    bundles, g = sample_bundles(3)
    src, dst = tmp_path / "a.db", tmp_path / "b.db"
    with Database(src) as db:
        for i, b in enumerate(bundles):
            db.add_measurement(b, _result(b, 1e-3 * (i + 1)), graph=g)
    assert main(["db", "show", "--db", str(src)]) == 0
    out = capsys.readouterr().out
    assert "1 workloads, 3 candidates, 3 measurements" in out
    assert f"fastest measured: {bundles[0].key[:12]}" in out and "crown batch 2" in out
    assert main(["db", "export", "--db", str(src), "--file", str(tmp_path / "x.jsonl")]) == 0
    assert main(["db", "import", "--db", str(dst), "--file", str(tmp_path / "x.jsonl")]) == 0
    assert "imported 3 measurements (0 already there)" in capsys.readouterr().out
    with Database(dst) as db:
        assert db.best(bundles[0].workload).candidate.key == bundles[0].key
    (tmp_path / "bad.db").write_bytes(b"\0garbage" * 100)
    assert main(["db", "show", "--db", str(tmp_path / "bad.db")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("boundflow: error:") and err.count("\n") == 1
    assert main(["db", "import", "--db", str(dst), "--file", str(tmp_path / "none")]) == 2


def test_rows_another_writer_garbled_are_one_line(tmp_path, capsys):
    """A shared database is written by others: text where a number belongs, a best plan
    whose candidate row is gone, workload JSON that is not JSON. Each read names the
    malformed row on one line, exit 2 (they were TypeError, AttributeError and
    JSONDecodeError tracebacks)."""
    import sqlite3

    bundles, g = sample_bundles(2)
    good = tmp_path / "good.db"
    with Database(good) as db:
        for i, b in enumerate(bundles):
            db.add_measurement(b, _result(b, 1e-3 * (i + 1)), graph=g)
        db.set_best(bundles[0], "time@width", "relax", 1e-3, baseline_value=2e-3, best_s=1e-3,
                    baseline_s=2e-3)
    assert main(["db", "show", "--db", str(good)]) == 0
    capsys.readouterr()
    for sql in ("UPDATE bf_best_plans SET best_s = 'nan'",
                "UPDATE bf_best_plans SET candidate_id = 999999",
                "UPDATE bf_workloads SET workload = '{\"graph_hash\": '"):
        bad = tmp_path / "bad.db"
        bad.write_bytes(good.read_bytes())
        with sqlite3.connect(bad) as con:
            con.execute(sql)
        assert main(["db", "show", "--db", str(bad)]) == 2, sql
        err = capsys.readouterr().err
        assert err.startswith("boundflow: error:") and err.count("\n") == 1, sql
        assert "malformed row" in err, sql


def test_an_import_of_implausible_measurements_changes_nothing(tmp_path, capsys):
    """An export line whose measurement no runner could have written (a negative median, no
    times, a NaN width) is refused with its line number and nothing is imported (a -5 ms
    'fastest' plan was imported before)."""
    import json

    bundles, g = sample_bundles(1)
    src, dst = tmp_path / "a.db", tmp_path / "b.db"
    with Database(src) as db:
        db.add_measurement(bundles[0], _result(bundles[0], 1e-3), graph=g)
    export = tmp_path / "x.jsonl"
    assert main(["db", "export", "--db", str(src), "--file", str(export)]) == 0
    capsys.readouterr()
    line = json.loads(export.read_text().splitlines()[0])
    bads = [dict(line, measurement={**line["measurement"], **change})
            for change in ({"median_s": -5.0}, {"times": []}, {"mean_width": float("nan")},
                           {"backend": "evil"})]      # one broke every later tune and inspect
    bads += [[1, 2, 3], "a string", 42, None, {k: v for k, v in line.items() if k != "candidate"},
             dict(line, workload=[1])]
    for bad in bads:
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
        assert main(["db", "import", "--db", str(dst), "--file",
                     str(tmp_path / "bad.jsonl")]) == 2, bad
        err = capsys.readouterr().err
        assert "line 1 of the import" in err and err.count("\n") == 1, (bad, err)
    with Database(dst) as db:
        assert db.summary()["measurements"] == 0


def test_readers_never_create_a_database(tmp_path, capsys):
    """verify --db, db show and costmodel inspect on a path with no database say so and leave
    no file behind (each created an empty 96 KiB database and went on)."""
    from tests.test_cli import INPUTS, MODEL

    missing = tmp_path / "nosuch.db"
    for argv in (["verify", "--model", MODEL, "--input", INPUTS, "--eps", "0.01", "--db",
                  str(missing)],
                 ["db", "show", "--db", str(missing)],
                 ["costmodel", "inspect", "--db", str(missing)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert f"no database at {missing}" in err[-1], argv
        assert not missing.exists(), argv
    empty = tmp_path / "empty.db"                  # it was given a schema, 98 KB
    empty.write_bytes(b"")
    for argv in (["db", "show", "--db", str(empty)],
                 ["costmodel", "inspect", "--db", str(empty)]):
        assert main(argv) == 2, argv
        assert "the file is empty" in capsys.readouterr().err, argv
        assert empty.stat().st_size == 0, argv


_ONNX = Path(__file__).resolve().parents[2] / "boundflow" / "examples" / "data" / \
    "digits_tanh_mlp.onnx"


def test_a_device_pipe_or_directory_given_as_a_file_is_refused(tmp_path, capsys):
    """Every file a command reads must be a regular file: /dev/zero was read until memory
    ran out (23 GB), a FIFO with no writer blocked for ever, a directory gave a traceback
    in some commands. One line each, exit 2, nothing read."""
    import os

    from tests.test_cli import INPUTS, MODEL

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    vnnlib = tmp_path / "p.vnnlib"
    vnnlib.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"
                      "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= Y_0 0))\n")
    for bad in ("/dev/zero", str(tmp_path)):
        for argv in (["plan", "--show", bad],
                     ["verify", "--plan", bad, "--model", MODEL, "--input", INPUTS,
                      "--eps", "0.01"],
                     ["verify", "--model", bad, "--input", INPUTS, "--eps", "0.01"],
                     ["verify", "--model", MODEL, "--input", bad, "--eps", "0.01"],
                     ["verify", "--onnx", bad, "--vnnlib", str(vnnlib)],
                     ["verify", "--onnx", str(_ONNX), "--vnnlib", bad],
                     ["vnncomp", "--instances", bad, "--results", str(tmp_path / "r")],
                     ["db", "import", "--db", str(tmp_path / "i.db"), "--file", bad],
                     ["ablate", "--model", MODEL, "--input", INPUTS, "--eps", "0.01",
                      "--config", bad, "--out", str(tmp_path / "ab")]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and bad in err[0] and (
                "not a regular file" in err[0] or "is a directory" in err[0]), (argv, err)
    # a FIFO: refused where the reader must seek (model, property, inputs); a plan, knobs,
    # configuration or CSV file may come from a pipe (``<(...)``), and one with no writer
    # reads as empty at once, where it blocked for ever
    for argv, why in ((["verify", "--model", str(fifo), "--input", INPUTS, "--eps", "0.01"],
                       "not a regular file"),
                      (["verify", "--model", MODEL, "--input", str(fifo), "--eps", "0.01"],
                       "not a regular file"),
                      (["verify", "--onnx", str(fifo), "--vnnlib", str(vnnlib)],
                       "not a regular file"),
                      (["plan", "--show", str(fifo)], "not a plan JSON"),
                      (["vnncomp", "--instances", str(fifo)], "lists no instances")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], (argv, err)
    assert main(["db", "import", "--db", str(tmp_path / "i.db"), "--file", str(fifo)]) == 0
    assert "imported 0 measurements" in capsys.readouterr().out
    assert main(["db", "show", "--db", "/dev/zero"]) == 2
    assert "not a database file" in capsys.readouterr().err


def test_a_plan_and_an_import_are_read_from_a_pipe(tmp_path, capsys):
    """``--plan <(...)`` and ``db import --file <(...)`` read what a writer sends."""
    import os
    import threading

    from tests.test_cli import INPUTS, MODEL

    plan = tmp_path / "plan.json"
    assert main(["plan", "--model", MODEL, "--out", str(plan)]) == 0
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "w") as f:
            f.write(plan.read_text())
    t = threading.Thread(target=write)
    t.start()
    capsys.readouterr()
    assert main(["verify", "--model", MODEL, "--input", INPUTS, "--eps", "0.01",
                 "--plan", str(fifo)]) == 0
    t.join(timeout=30)
    assert "verified" in capsys.readouterr().out


def test_a_row_of_a_backend_this_boundflow_lacks_is_left_out_of_training(tmp_path, capsys):
    """A shared database holds a measurement of a backend this BoundFlow does not have (a
    newer BoundFlow's, or a bad writer's): `costmodel inspect` (and every tune's refit) failed
    on it for good; now it is left out of the training records."""
    import sqlite3

    bundles, g = sample_bundles(3)
    path = tmp_path / "shared.db"
    with Database(path) as db:
        for i, b in enumerate(bundles):
            db.add_measurement(b, _result(b, 1e-3 * (i + 1)), graph=g)
    con = sqlite3.connect(path)
    with con:
        con.execute("UPDATE bf_measurements SET backend = 'evil' WHERE id = "
                    "(SELECT MIN(id) FROM bf_measurements)")
    con.close()
    with Database(path) as db:
        recs = db.records_for_training()
    assert len(recs) == 2 and "evil" not in {r.measurement.result.backend for r in recs}
    assert main(["costmodel", "inspect", "--db", str(path)]) == 0
    out = tmp_path / "all.jsonl"                  # a backup keeps it
    assert main(["db", "export", "--db", str(path), "--file", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3
