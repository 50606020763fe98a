"""The command line: a readable table or JSON, and one-line errors with a non-zero status."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import boundflow.examples as examples
from boundflow.cli import main

MODEL = str(examples.DATA / "digits_mlp.pt2")
INPUTS = str(examples.DATA / "digits_x.npy")


def test_verify_prints_a_table(capsys):
    assert main(["verify", "--model", MODEL, "--input", INPUTS, "--eps", "0.01"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["sample", "label", "spec", "lower", "upper", "verdict"]
    assert len(out) == 1 + 8 * 9 + 1
    assert out[-1].startswith("verified ") and "labels predicted" in out[-1]


def test_verify_json_with_labels(capsys):
    labels = examples.digits_samples()[1][:8]
    argv = ["verify", "--model", MODEL, "--input", INPUTS, "--eps", "0.01", "--json",
            "--label", *map(str, labels)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["labels"] == labels.tolist()
    assert len(result["verdicts"]) == 8 and len(result["lower"][0]) == 9
    assert all(v in ("verified", "unknown") for row in result["verdicts"] for v in row)


def test_single_input_without_batch_dimension(tmp_path, capsys):
    one = tmp_path / "one.npy"
    np.save(one, np.load(INPUTS)[0])
    assert main(["verify", "--model", MODEL, "--input", str(one), "--eps", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] == [True]


@pytest.mark.parametrize("argv, match", [
    (["--eps", "-1"], "argument --eps: '-1': need a finite number >= 0"),
    (["--eps", "nan"], "argument --eps: 'nan': need a finite number >= 0"),
    (["--eps", "inf"], "argument --eps: 'inf': need a finite number >= 0"),
    (["--eps", "0.1", "--label", "12"], "must lie in"),
    (["--eps", "0.1", "--method", "magic"], "method 'magic'"),
])
def test_errors_are_one_line(argv, match, capsys):
    assert main(["verify", "--model", MODEL, "--input", INPUTS, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("boundflow: error: ") and err.count("\n") == 1
    assert match in err


def test_wrong_input_shape_and_bad_files(tmp_path, capsys):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 5)))
    assert main(["verify", "--model", MODEL, "--input", str(wrong), "--eps", "0.1"]) == 2
    assert "holds shape [2, 5]" in capsys.readouterr().err
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["verify", "--model", MODEL, "--input", str(pickled), "--eps", "0.1"]) == 2
    assert "input file" in capsys.readouterr().err
    assert main(["verify", "--model", INPUTS, "--input", INPUTS, "--eps", "0.1"]) == 2
    assert "torch.export archive" in capsys.readouterr().err


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "boundflow.cli", "verify", "--model", MODEL,
                           "--input", INPUTS, "--eps", "0.005", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["verified"]) == 8


def test_verify_onnx_vnnlib_writes_the_result_file(tmp_path, capsys):
    from tests.conftest import shared_path

    base = shared_path("benchmarks", "vnncomp_test")
    out = tmp_path / "result.txt"
    argv = ["verify", "--onnx", str(base / "test_sat.onnx"), "--vnnlib",
            str(base / "test_prop.vnnlib"), "--timeout", "60", "--out", str(out),
            "--method", "crown"]
    assert main(argv) == 0
    text = out.read_text()
    assert text.startswith("sat\n((X_0 ") and "(Y_4 " in text
    assert capsys.readouterr().out == text
    argv[2], argv[4] = str(base / "test_unsat.onnx"), str(base / "test_prop.vnnlib")
    assert main(argv + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "unsat"
    assert out.read_text() == "unsat\n"


@pytest.mark.parametrize("argv, match", [
    (["--onnx", "x.onnx"], "give --onnx with --vnnlib"),
    (["--model", MODEL], "give --model with --input and --eps"),
    (["--onnx", INPUTS, "--vnnlib", INPUTS], "not a readable ONNX model"),
    (["--onnx", INPUTS, "--vnnlib", INPUTS, "--dtype", "float64"],   # it was ignored
     "--dtype does not go with --vnnlib"),
])
def test_verify_argument_errors(argv, match, capsys):
    assert main(["verify", *argv]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("method", ["crown-ibp", "crown", "alpha-crown"])
def test_verify_model_with_each_method_is_at_least_as_strong_as_ibp(method, capsys):
    base = ["verify", "--model", MODEL, "--input", INPUTS, "--eps", "0.02", "--json",
            "--alpha-iterations", "3"]
    assert main(base + ["--method", "ibp"]) == 0
    ibp = json.loads(capsys.readouterr().out)
    assert main(base + ["--method", method]) == 0
    tight = json.loads(capsys.readouterr().out)
    assert tight["method"] == method
    assert sum(tight["verified"]) >= sum(ibp["verified"])
    assert np.all(np.array(tight["lower"]) >= np.array(ibp["lower"]) - 1e-5)


CNN = str(examples.DATA / "digits_cnn.pt2")


def test_plan_writes_shows_and_verify_runs_it(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", CNN, "--method", "crown", "--batch", "8",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "crown:" in text and "planned peak" in text and f"wrote {out}" in text
    assert main(["plan", "--show", str(out)]) == 0
    shown = capsys.readouterr().out
    for part in ("task", "buffer", "domains:", "region NCHW", "storage: reuse"):
        assert part in shown
    assert main(["verify", "--model", CNN, "--input", INPUTS, "--eps", "0.01", "--json",
                 "--plan", str(out)]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert main(["verify", "--model", CNN, "--input", INPUTS, "--eps", "0.01", "--json",
                 "--method", "crown"]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert planned["method"] == "crown" and planned["verdicts"] == direct["verdicts"]
    np.testing.assert_allclose(planned["lower"], direct["lower"], rtol=1e-5, atol=1e-5)


def test_plan_with_knobs_file(tmp_path, capsys):
    from boundflow.frontend.pt2 import load_model
    from boundflow.ir.workload import Workload
    from boundflow.planner import default

    graph = load_model(CNN)
    knobs = default(graph, Workload.of(graph, method="crown-ibp"))
    knobs = knobs.replace(partition=tuple(False for _ in knobs.partition), storage="none")
    path = tmp_path / "knobs.json"
    path.write_text(knobs.to_json())
    assert main(["plan", "--model", CNN, "--method", "crown-ibp", "--knobs", str(path),
                 "--out", str(tmp_path / "p.json")]) == 0
    assert "no reuse" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["plan"], "give one model"),
    (["plan", "--show", "missing.json"], "missing.json: cannot read the plan file"),
    (["plan", "--model", CNN, "--method", "magic"], "method 'magic'"),
    (["plan", "--model", CNN, "--knobs", "missing.json"], "knobs file"),
    (["verify", "--model", CNN, "--input", INPUTS, "--eps", "0.1", "--plan", "nope.json"],
     "nope.json: cannot read the plan file"),
])
def test_plan_errors_are_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_verify_refuses_a_plan_from_another_schema_or_model(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", CNN, "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    d["schema_version"] = 99
    (tmp_path / "old.json").write_text(json.dumps(d))
    capsys.readouterr()
    argv = ["verify", "--model", CNN, "--input", INPUTS, "--eps", "0.1", "--plan"]
    assert main(argv + [str(tmp_path / "old.json")]) == 2
    assert "schema version 99" in capsys.readouterr().err
    assert main(["verify", "--model", MODEL, "--input", INPUTS, "--eps", "0.1",
                 "--plan", str(out)]) == 2
    assert "another structure" in capsys.readouterr().err
    assert main(argv + [str(out), "--method", "ibp"]) == 2
    assert "--plan fixes the method" in capsys.readouterr().err


def test_verify_refuses_a_plan_whose_workload_was_edited(tmp_path, capsys):
    """A plan file's workload is data too: a batch of 8.5, true or 1e30 (read as 8, 1 and a
    huge int before) and inputs of another shape than the model's (run before) are
    refused with one line."""
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", CNN, "--out", str(out)]) == 0
    capsys.readouterr()
    argv = ["verify", "--model", CNN, "--input", INPUTS, "--eps", "0.1", "--plan"]
    for field, value, why in (("batch", 8.5, "batch 8.5"), ("batch", True, "batch True"),
                              ("batch", 1e30, "batch 1e+30"), ("n_specs", -1, "n_specs"),
                              ("input_shape", [64], "inputs of shape [64]"),
                              ("input_shape", "64", "input_shape '64'")):
        d = json.loads(out.read_text())
        d["workload"][field] = value
        (tmp_path / "edited.json").write_text(json.dumps(d))
        assert main(argv + [str(tmp_path / "edited.json")]) == 2, field
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, (field, value, err)


def test_verify_reads_gzipped_instances(tmp_path, capsys):
    """VNN-COMP ships `.onnx.gz` and `.vnnlib.gz`; the counterexample is confirmed on the
    gzipped model too."""
    import gzip

    from tests.conftest import shared_path

    base = shared_path("benchmarks", "vnncomp_test")
    onnx, prop = tmp_path / "net.onnx.gz", tmp_path / "prop.vnnlib.gz"
    onnx.write_bytes(gzip.compress((base / "test_sat.onnx").read_bytes()))
    prop.write_bytes(gzip.compress((base / "test_prop.vnnlib").read_bytes()))
    assert main(["verify", "--onnx", str(onnx), "--vnnlib", str(prop), "--method", "crown"]) == 0
    assert capsys.readouterr().out.startswith("sat\n((X_0 ")


def _npy_header(path, shape):
    """A .npy file whose header declares ``shape`` (float32) but which holds 16 bytes."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        f.write(b"\0" * 16)


@pytest.mark.parametrize("make, argv, match", [
    (lambda p: p.write_bytes(b""), [], "not a readable .npy array"),
    (lambda p: _npy_header(p, (100000, 100000, 1000)), [], "more than the file holds"),
    (lambda p: np.save(p, np.load(INPUTS)), ["--threads", "1000000"], "--threads 1000000"),
    (lambda p: p.write_text("[" * 100_000 + "]" * 100_000), ["--plan-file"], "nested too deeply"),
])
def test_hostile_files_and_arguments_are_one_line(tmp_path, capsys, make, argv, match):
    """An empty .npy, a header declaring 36 TiB, a thread count torch crashes on, a plan
    file nested 100,000 deep: one line and exit 2 (they were tracebacks and a segfault)."""
    path = tmp_path / "x.npy"
    make(path)
    if argv == ["--plan-file"]:
        argv = ["--plan", str(path)]
        path = tmp_path / "in.npy"
        np.save(path, np.load(INPUTS))
    assert main(["verify", "--model", MODEL, "--input", str(path), "--eps", "0.01", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("boundflow: error: ") and match in err[-1]
    assert all("Traceback" not in line for line in err)


def test_tune_refuses_a_box_whose_default_bounds_overflow(tmp_path, capsys):
    """eps 1e30: the default plan's bounds are inf; tune says so on one line (it was a
    TypeError while printing its table) and its run is recorded as failed."""
    from boundflow.db import Database

    db = str(tmp_path / "t.db")
    assert main(["tune", "--model", MODEL, "--input", INPUTS, "--eps", "1e30", "--db", db,
                 "--trials", "2", "--backend", "torch", "--no-progress", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("boundflow: error: ") and "not finite" in err[-1]
    with Database(db) as d:
        assert [r.status for r in d.runs()] == ["failed"]


@pytest.mark.parametrize("argv, match", [
    (["--bab-method", "foo"], "BaB method 'foo'"),
    (["--objective", "time@mem:-5"], "time@mem"),
])
def test_options_a_query_does_not_use_are_still_checked(argv, match, capsys):
    """verify --model ignores the branch-and-bound and tuning options; a bad value there is
    still a typo to report, not to accept (they exited 0)."""
    assert main(["verify", "--model", MODEL, "--input", INPUTS, "--eps", "0.01", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("boundflow: error: ") and match in err[-1]
