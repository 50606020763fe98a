"""The command line of branch-and-bound: verify's BaB options, `boundflow vnncomp` over an
instances CSV, tune --vnnlib's argument checks, the VNN-COMP scripts, and the rule that
loads a tuned plan only once a search has run long enough to pay for it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from boundflow.cli import main
from tests.conftest import shared_path

ROOT = Path(__file__).resolve().parents[2]


def _acas(prop: int, net: str = "1_1"):
    base = shared_path("benchmarks", "acasxu")
    return (str(base / "onnx" / f"ACASXU_run2a_{net}_batch_2000.onnx"),
            str(base / "vnnlib" / f"prop_{prop}.vnnlib"))


def test_input_splitting_decides_what_one_bound_leaves_open(capsys):
    onnx, vnnlib = _acas(2)
    assert main(["verify", "--onnx", onnx, "--vnnlib", vnnlib, "--json", "--bab", "none",
                 "--method", "crown"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["status"] == "unknown" and alone["strategy"] == "none"
    assert main(["verify", "--onnx", onnx, "--vnnlib", vnnlib, "--json", "--timeout",
                 "116"]) == 0
    split = json.loads(capsys.readouterr().out)
    assert split["status"] == "unsat" and split["strategy"] == "input"
    assert split["domains"] > 1 and split["bound_calls"] >= 1


@pytest.mark.parametrize("argv, match", [
    (["--bab-batch", "0"], "--bab-batch"),
    (["--bab-batch", "1"], "batch must be an integer >= 2"),
    (["--bab-method", "magic"], "BaB method 'magic'"),
    (["--bab", "magic"], "--bab"),
    (["--bab-intermediate", "sometimes"], "--bab-intermediate"),
    (["--bab-screen", "backward"], "--bab-screen"),
    (["--bab-escalate", "beta"], "--bab-escalate"),
    (["--branching", "random"], "--branching"),
    (["--max-domains", "-3"], "--max-domains"),
])
def test_bad_bab_options_are_one_line(argv, match, capsys):
    onnx, vnnlib = _acas(1)
    assert main(["verify", "--onnx", onnx, "--vnnlib", vnnlib, *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_vnncomp_runs_a_whole_csv_in_one_process(tmp_path, capsys):
    base = shared_path("benchmarks")
    csv = tmp_path / "instances.csv"
    csv.write_text("vnncomp_test/test_sat.onnx,vnncomp_test/test_prop.vnnlib,60,sat\n"
                   "vnncomp_test/test_unsat.onnx,vnncomp_test/test_prop.vnnlib,60,unsat\n"
                   "acasxu/onnx/ACASXU_run2a_1_9_batch_2000.onnx,acasxu/vnnlib/prop_2.vnnlib,"
                   "116,unsat\n")
    results, table = tmp_path / "results", tmp_path / "rows.csv"
    assert main(["vnncomp", "--instances", str(csv), "--root", str(base), "--results",
                 str(results), "--csv", str(table)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 3 + 1 and out[-1].startswith("decided 3/3, wrong 0")
    assert "fixed cost per instance" in out[-1]
    files = sorted(p.name for p in results.iterdir())
    assert files == ["ACASXU_run2a_1_9_batch_2000__prop_2.txt", "test_sat__test_prop.txt",
                     "test_unsat__test_prop.txt"]
    assert (results / "test_sat__test_prop.txt").read_text().startswith("sat\n((X_0 ")
    rows = table.read_text().splitlines()
    assert rows[0].startswith("onnx,vnnlib,expected,status") and len(rows) == 4


def test_vnncomp_says_when_a_verdict_contradicts_the_csv(tmp_path, capsys):
    base = shared_path("benchmarks")
    csv = tmp_path / "instances.csv"
    csv.write_text("vnncomp_test/test_sat.onnx,vnncomp_test/test_prop.vnnlib,60,unsat\n")
    assert main(["vnncomp", "--instances", str(csv), "--root", str(base)]) == 1
    assert "WRONG" in capsys.readouterr().out


@pytest.mark.parametrize("text, match", [
    ("a.onnx,b.vnnlib\n", "expected onnx,vnnlib,timeout"),
    ("a.onnx,b.vnnlib,soon\n", "is not a number"),
    ("a.onnx,b.vnnlib,-4\n", "positive and finite"),
    ("a.onnx,b.vnnlib,nan\n", "positive and finite"),
    ("a.onnx,b.vnnlib,60,unsta\n", "expected verdict 'unsta'"),     # turned WRONG off
    ("", "lists no instances"),
])
def test_a_bad_instances_csv_is_one_line(tmp_path, capsys, text, match):
    csv = tmp_path / "instances.csv"
    csv.write_text(text)
    assert main(["vnncomp", "--instances", str(csv)]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_an_unreadable_instances_file_is_one_line(tmp_path, capsys):
    binary = tmp_path / "instances.csv"
    binary.write_bytes(b"\x00\xff\xfe,,\n")
    for path, why in ((binary, "the instances file is not UTF-8 text"),
                      (tmp_path / "missing.csv", "cannot read the instances file")):
        assert main(["vnncomp", "--instances", str(path)]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1


def test_a_bad_instance_is_said_and_the_others_are_decided(tmp_path, capsys):
    base = shared_path("benchmarks")
    csv = tmp_path / "instances.csv"
    csv.write_text("missing.onnx,missing.vnnlib,10\n"
                   "vnncomp_test/test_sat.onnx,vnncomp_test/test_prop.vnnlib,60,sat\n")
    results = tmp_path / "results"
    assert main(["vnncomp", "--instances", str(csv), "--root", str(base), "--results",
                 str(results)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert "error" in out[1] and "does not exist" in out[1]
    assert out[2].split()[3] == "sat" and "bad instances 1" in out[-1]
    assert (results / "missing__missing.txt").read_text() == "unknown\n"


@pytest.mark.parametrize("argv, match", [
    (["--vnnlib", "p.vnnlib", "--model", "m.pt2"], "--vnnlib tunes the branch-and-bound"),
    (["--vnnlib", "p.vnnlib"], "--vnnlib tunes the branch-and-bound"),
    (["--vnnlib", "boundflow/examples/data/digits_maxpool_cnn.vnnlib", "--onnx",
      "boundflow/examples/data/digits_maxpool_cnn.onnx", "--dtype", "float64"],
     "--dtype does not go with --vnnlib"),
    (["--vnnlib", "boundflow/examples/data/digits_maxpool_cnn.vnnlib", "--onnx",
      "boundflow/examples/data/digits_maxpool_cnn.onnx", "--bab", "relu", "--target",
      "llvm -mcpu=x86-64"], "tune it without --target"),
    (["--model", "boundflow/examples/data/digits_mlp.pt2", "--input", "x.npy", "--eps", "0.1",
      "--alpha-iterations", "5"], "give it with --vnnlib"),
])
def test_tune_vnnlib_argument_errors(tmp_path, argv, match, capsys):
    assert main(["tune", "--db", str(tmp_path / "t.db"), *argv]) == 2
    assert match in capsys.readouterr().err


def test_tune_vnnlib_of_a_relu_split_property_tunes_torch_plans(tmp_path, capsys):
    """ReLU splitting's split state is an input only the torch backend takes: tuning its
    workload on another backend alone is refused in one line (with torch among them, only
    torch is tuned)."""
    ex = "boundflow/examples/data/digits_maxpool_cnn"
    argv = ["tune", "--db", str(tmp_path / "t.db"), "--onnx", ex + ".onnx", "--vnnlib",
            ex + ".vnnlib", "--bab", "relu", "--backend", "relax", "--trials", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "only the torch backend takes" in err.splitlines()[-1]
    assert "Traceback" not in err


def test_the_vnncomp_scripts_write_the_result_file(tmp_path):
    """run_instance.sh writes the result file and records its pid; prepare_instance.sh
    stops only that process (a stale pid of some other program is left alone)."""
    import os
    import sys

    onnx, vnnlib = _acas(4, "1_9")
    scripts = ROOT / "tools" / "vnncomp"
    env = dict(os.environ, BOUNDFLOW_VNNCOMP_STATE=str(tmp_path / "state"),
               BOUNDFLOW_PYTHON=sys.executable)
    prep = subprocess.run([str(scripts / "prepare_instance.sh"), "v1", "acasxu", onnx, vnnlib],
                          capture_output=True, text=True, timeout=120, env=env)
    assert prep.returncode == 0, prep.stderr
    out = tmp_path / "result.txt"
    run = subprocess.run([str(scripts / "run_instance.sh"), "v1", "acasxu", onnx, vnnlib,
                          str(out), "116"], capture_output=True, text=True, timeout=200, env=env)
    assert run.returncode == 0, run.stderr
    assert out.read_text().startswith("sat\n((X_0 ")
    assert (tmp_path / "state" / "run.pid").exists()
    other = subprocess.Popen(["sleep", "30"])        # not ours: must survive
    (tmp_path / "state" / "run.pid").write_text(str(other.pid))
    bad = subprocess.run([str(scripts / "prepare_instance.sh"), "v1", "acasxu", vnnlib, onnx],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 1 and "boundflow:" in bad.stderr
    assert other.poll() is None
    other.kill()
    assert not (tmp_path / "state" / "run.pid").exists()


class _Fake:
    """A compiled verifier that counts its runs."""

    def __init__(self, tuned):
        self.tuned, self.backend = tuned, "fake"
        self.plan = type("P", (), {"workload": type("W", (), {"dtype": "float32"})()})()
        self.runs = 0

    def run(self, box, spec, upper=True):
        import torch

        self.runs += 1
        n = box.lower.shape[0]
        return type("B", (), {"lower": torch.zeros(n, spec.n_specs)})()


def test_a_tuned_plan_is_loaded_once_the_search_has_run_long_enough(monkeypatch):
    import torch

    from boundflow.bab import bounder

    default, tuned = _Fake(None), _Fake(object())
    tuned.plan = default.plan                         # the same workload
    looked_up = []

    def fake_verifier(graph, batch, rows, method, backend, db, objective, alpha=None,
                      target="llvm"):
        looked_up.append(db)
        return default if db is None else tuned
    monkeypatch.setattr(bounder, "_verifier", fake_verifier)
    graph = type("G", (), {"input_shape": (2,)})()
    C = np.ones((3, 4))
    b = bounder.PlanBounder(graph, C, method="crown", batch=4, db="t.db", switch_after=0.5)
    assert looked_up == [None]                        # nothing but the default plan yet
    lo = torch.zeros(6, 2)
    assert b(lo, lo).shape == (6, 3)
    assert default.runs == 2 and tuned.runs == 0
    b.seconds = 0.6                                   # the search has now run that long
    b(lo, lo)
    assert looked_up == [None, "t.db"] and tuned.runs == 2 and b.tuned
    b(lo, lo)
    assert looked_up == [None, "t.db"]                # looked up once
    eager = bounder.PlanBounder(graph, C, method="crown", batch=4, db="t.db", switch_after=0)
    assert eager.verifier is tuned


def test_a_corrupt_database_is_one_line_even_when_the_search_is_short(tmp_path, capsys):
    """The tuned plan is looked up only after 3 s of search; the database is still read,
    and refused, before the search starts."""
    onnx, vnnlib = _acas(1, "1_9")
    bad = tmp_path / "bad.db"
    bad.write_text("not a database")
    assert main(["verify", "--onnx", onnx, "--vnnlib", vnnlib, "--db", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not an SQLite database" in err and err.count("\n") == 1


def _cnn_property(tmp_path, boxes, rows=None) -> tuple[str, str]:
    """digits_maxpool_cnn and a robustness property around its digits: one input box per
    ``(digit index, eps)`` of ``boxes``, each with its nine disjuncts (the first ``rows[i]``
    of them for box ``i``, where ``rows`` is given)."""
    import torch

    from boundflow.domains.concrete import evaluate
    from boundflow.frontend.onnx import load_onnx

    onnx = str(ROOT / "boundflow/examples/data/digits_maxpool_cnn.onnx")
    g = load_onnx(onnx)
    xs = np.load(ROOT / "boundflow/examples/data/digits_x.npy").astype(np.float32)
    lines = [f"(declare-const X_{i} Real)" for i in range(64)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(10)]
    disjuncts = []
    for n, (k, eps) in enumerate(boxes):
        x = xs[k].reshape(-1).astype(np.float64)
        label = int(evaluate(g, torch.from_numpy(xs[k].reshape((1,) + g.input_shape))).argmax())
        box = " ".join(f"(>= X_{i} {float(v) - eps!r}) (<= X_{i} {float(v) + eps!r})"
                       for i, v in enumerate(x))
        disjuncts += [f"(and {box} (>= Y_{j} Y_{label}))" for j in range(10)
                      if j != label][:None if rows is None else rows[n]]
    path = tmp_path / "robust.vnnlib"
    path.write_text("\n".join(lines + [f"(assert (or {' '.join(disjuncts)}))"]) + "\n")
    return onnx, str(path)


def test_tune_vnnlib_tunes_the_rows_relu_splitting_bounds(tmp_path, monkeypatch):
    """The whole-box bound refutes some disjuncts before ReLU splitting starts, which then
    bounds the open ones' rows only: `tune --vnnlib` measures exactly those workloads (the
    rows, the batch, the method verify's searches look their plans up by), one per number
    of rows the searches bound: here the second and third boxes' (the first, a tiny one, is
    refuted whole), whose whole-box bounds leave different numbers of rows open."""
    import boundflow.cli as cli
    import boundflow.search as search
    import boundflow.vnncomp as vnncomp
    from boundflow.bab import BabResult

    onnx, vnnlib = _cnn_property(tmp_path, [(1, 0.001), (0, 0.08), (2, 0.08)])
    searched = []

    def fake_search(graph, lower, upper, C, thr, ranges, config, **kw):
        searched.append((C, ranges, config.batch, config.method))
        return BabResult("unsat", None, 0, 0, 0.0, 0, "proved by the test")
    monkeypatch.setattr(vnncomp, "relu_split", fake_search)
    bab = ["--bab", "relu", "--bab-batch", "16", "--bab-method", "crown"]
    assert main(["verify", "--onnx", onnx, "--vnnlib", vnnlib, "--json", *bab]) == 0
    assert len(searched) == 2
    for C, ranges, batch, method in searched:
        assert 0 < len(ranges) <= 9 and len(C) == len(ranges)
    assert len(searched[0][0]) < 9                          # some refuted, some open
    assert len({len(C) for C, *_ in searched}) == 2         # two workloads

    tuned, printed = [], []

    class FakeTuner:
        def __init__(self, graph, lower, upper, C, method, **kw):
            tuned.append((C, lower.shape[0], method))

        def tune(self, trials, seconds):
            return len(tuned)

        def close(self):
            pass
    monkeypatch.setattr(search, "Tuner", FakeTuner)
    monkeypatch.setattr(cli, "_print_tune", lambda report, tuner: printed.append(report))
    assert main(["tune", "--db", str(tmp_path / "t.db"), "--onnx", onnx, "--vnnlib", vnnlib,
                 "--backend", "torch", *bab]) == 0
    assert printed == [1, 2] and len(tuned) == 2
    for (tC, tbatch, tmethod), (C, _, batch, method) in zip(tuned, searched):
        assert (tbatch, tmethod) == (batch, method) == (16, "crown")
        assert tC.shape == (16,) + C.shape and np.array_equal(tC[0], C.astype(tC.dtype))


def test_tune_vnnlib_tunes_each_number_of_rows_once_in_the_time_given(tmp_path, monkeypatch,
                                                                     capsys):
    """Input splitting bounds every row of each box: boxes with as many rows share one
    workload (tuned once, on the first); boxes with other numbers of rows are tuned one
    after the other, sharing --seconds: those the budget does not reach are said in one
    line, and the command still ends with how to run what it tuned."""
    import time as clock

    import boundflow.cli as cli
    import boundflow.search as search

    tuned = []

    class FakeTuner:
        def __init__(self, graph, lower, upper, C, method, **kw):
            tuned.append((C.shape, lower.copy()))

        def tune(self, trials, seconds):
            clock.sleep(0.0 if seconds is None else 1.2)   # runs over (a baseline may)
            return len(tuned)

        def close(self):
            pass
    monkeypatch.setattr(search, "Tuner", FakeTuner)
    monkeypatch.setattr(cli, "_print_tune", lambda report, tuner: None)
    base = ["tune", "--db", str(tmp_path / "t.db"), "--onnx", None, "--vnnlib", None,
            "--backend", "torch", "--bab", "input", "--bab-batch", "4"]

    def tune(boxes, rows=None, *extra):
        base[4], base[6] = _cnn_property(tmp_path, boxes, rows)
        tuned.clear()
        capsys.readouterr()
        assert main(base + list(extra)) == 0
        return capsys.readouterr().out
    out = tune([(0, 0.01), (2, 0.01), (3, 0.01)])
    (shape, lower), = tuned                                # three boxes of nine rows
    assert shape == (4, 9, 10) and "run it with" in out
    xs = np.load(ROOT / "boundflow/examples/data/digits_x.npy")
    assert np.all(np.abs(lower.reshape(4, -1) - xs[0].reshape(1, -1)) <= 0.01 + 1e-6)
    out = tune([(0, 0.01), (2, 0.01), (3, 0.01)], [9, 2, 9])
    assert [s for s, _ in tuned] == [(4, 9, 10), (4, 2, 10)]
    out = tune([(0, 0.01), (2, 0.01), (3, 0.01)], [9, 2, 3], "--seconds", "1")
    assert len(tuned) == 1 and "run it with" in out.splitlines()[-1]
    assert "--seconds 1 spent: workload 2-3 of 3 not tuned" in out
    # no --bab-batch: input splitting's default here (4 cores: 2048), and the command to
    # verify names it, so a machine of other cores plans the workload tuned
    import importlib
    monkeypatch.setattr(importlib.import_module("boundflow.bab.config"), "machine_cores",
                        lambda: 4)
    del base[-2:]
    out = tune([(0, 0.01)])
    assert tuned[0][0][0] == 2048 and " --bab-batch 2048 " in out.splitlines()[-1]


def test_tune_vnnlib_of_a_property_the_whole_box_proves_is_one_line(tmp_path, capsys):
    """Nothing is left for ReLU splitting when one bound of the box refutes every disjunct:
    tuning its search is refused in one line, naming the bound."""
    ex = "boundflow/examples/data/digits_maxpool_cnn"
    assert main(["tune", "--db", str(tmp_path / "t.db"), "--onnx", ex + ".onnx", "--vnnlib",
                 ex + ".vnnlib", "--bab", "relu", "--backend", "torch", "--method",
                 "crown"]) == 2
    err = capsys.readouterr().err
    assert "whole-box crown bound refutes every disjunct" in err and err.count("\n") == 1


def test_a_timeout_between_whole_box_bounds_keeps_what_they_refuted(tmp_path, monkeypatch):
    """The time runs out after the first box's bound, which refuted all nine of its
    disjuncts: the timeout says so (9 of 27 refuted)."""
    import types

    import boundflow.vnncomp as vnncomp
    from boundflow.api import BoundOptions
    from boundflow.frontend.onnx import load_onnx
    from boundflow.frontend.vnnlib import load_vnnlib

    onnx, vnnlib = _cnn_property(tmp_path, [(1, 0.001), (0, 0.08), (2, 0.08)])
    clock = [0.0]
    monkeypatch.setattr(vnncomp, "time", types.SimpleNamespace(
        perf_counter=lambda: clock[0], monotonic=lambda: clock[0]))
    real = vnncomp.bound_spec

    def slow(*a, **k):
        clock[0] += 10.0
        return real(*a, **k)
    monkeypatch.setattr(vnncomp, "bound_spec", slow)
    res = vnncomp.check_property(load_onnx(onnx), load_vnnlib(vnnlib, 64, 10),
                                 BoundOptions("crown"), timeout=5, attack=None)
    assert (res.status, res.refuted, res.disjuncts) == ("timeout", 9, 27)


def test_a_fault_on_one_instance_spares_the_rest(tmp_path, monkeypatch):
    """An unexpected error while deciding one instance is that instance's ``error`` (its
    result file says unknown) and the run goes on to the next."""
    import boundflow.vnncomp as vnncomp
    from boundflow.api import BoundOptions

    real = vnncomp.check_property
    calls = []

    def flaky(graph, prop, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise IndexError("a bug of ours")
        return real(graph, prop, *args, **kwargs)

    monkeypatch.setattr(vnncomp, "check_property", flaky)
    rows = [("vnncomp_test/test_sat.onnx", "vnncomp_test/test_prop.vnnlib", 60.0, "sat")] * 2
    out = vnncomp.run_instances(rows, shared_path("benchmarks"), BoundOptions("crown"),
                                vnncomp.BabConfig(), results_dir=tmp_path)
    assert [r.result.status for r in out] == ["error", "sat"]
    assert "internal error: IndexError: a bug of ours" in out[0].result.notes[0]


def test_an_unusable_results_directory_is_refused_before_solving(tmp_path, capsys,
                                                                  monkeypatch):
    """--results naming a file, or a folder whose parent is missing, is one line and exit 2
    before any instance is solved (it was a FileExistsError after solving them all)."""
    import boundflow.vnncomp as vnncomp

    csv = tmp_path / "instances.csv"
    csv.write_text("vnncomp_test/test_sat.onnx,vnncomp_test/test_prop.vnnlib,60,sat\n")
    monkeypatch.setattr(vnncomp, "check_property", lambda *a, **k: 1 / 0)   # never reached
    a_file = tmp_path / "results.txt"
    a_file.write_text("")
    for results, match in ((a_file, "exists and is not a directory"),
                           (tmp_path / "no" / "such", "does not exist")):
        assert main(["vnncomp", "--instances", str(csv), "--root",
                     str(shared_path("benchmarks")), "--results", str(results)]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1


def test_the_cli_leaves_the_batch_to_the_search_unless_given():
    """``--bab-batch`` absent: the search's default for its strategy (see
    ``test_the_default_batch_grows_with_the_cores_for_input_splitting``); given: that."""
    from boundflow.cli import _bab_config, build_parser

    parse = build_parser().parse_args
    args = parse(["verify", "--onnx", "n.onnx", "--vnnlib", "p.vnnlib"])
    assert args.bab_batch is None and _bab_config(args).batch is None
    args = parse(["verify", "--onnx", "n.onnx", "--vnnlib", "p.vnnlib", "--bab-batch", "96"])
    assert _bab_config(args).batch == 96
    args = parse(["vnncomp", "--instances", "i.csv"])
    assert _bab_config(args).batch is None
