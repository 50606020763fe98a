"""Issue 13, items 5-6: every bad input a user can give gets one line naming the problem and
exit status 2, before any work is done, and never a traceback or NaN printed as a bound."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import boundflow as bf
import boundflow.examples as examples
from boundflow.cli import main
from tests.conftest import shared_path

MODEL = str(examples.DATA / "digits_mlp.pt2")
INPUTS = str(examples.DATA / "digits_x.npy")
VERIFY = ["verify", "--model", MODEL, "--input", INPUTS, "--eps", "0.01"]
TUNE = ["tune", "--model", MODEL, "--input", INPUTS, "--eps", "0.01", "--db", "unused.db"]


def _one_line_error(capsys, match: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("boundflow: error: "), err
    assert err.count("\n") == 1, err
    assert match in err, err


def _vnn():
    base = shared_path("benchmarks", "vnncomp_test")
    return ["verify", "--onnx", str(base / "test_nano.onnx"), "--vnnlib",
            str(base / "test_nano.vnnlib")]


@pytest.mark.parametrize("argv, match", [
    (lambda tmp: [*_vnn(), "--out", str(tmp / "no" / "r.txt")], "does not exist"),
    (lambda tmp: ["plan", "--model", MODEL, "--out", str(tmp / "no" / "p.json")],
     "does not exist"),
    (lambda tmp: ["plan", "--model", MODEL, "--out", str(tmp)], "is a directory"),
    (lambda tmp: ["db", "export", "--db", str(tmp / "t.db"), "--file",
                  str(tmp / "no" / "x.jsonl")], "does not exist"),
    (lambda tmp: ["costmodel", "inspect", "--db", str(tmp / "t.db"), "--plot",
                  str(tmp / "no" / "fit.png")], "does not exist"),
    (lambda tmp: ["ablate", "--model", MODEL, "--input", INPUTS, "--eps", "0.01", "--out",
                  str(tmp / "file.txt")], "is not a directory"),
], ids=["verify-out", "plan-out", "plan-out-dir", "db-export", "costmodel-plot", "ablate-out"])
def test_output_paths_that_cannot_be_written(argv, match, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    assert main(argv(tmp_path)) == 2
    _one_line_error(capsys, match)


@pytest.mark.parametrize("objective, match", [
    ("time@mem:0", "objective"), ("time@mem:-5", "objective"), ("time@mem:inf", "objective"),
    ("mix:nan,1", "objective"), ("fastest", "objective"),
])
def test_bad_objectives_fail_before_any_work(objective, match, capsys):
    assert main([*TUNE, "--objective", objective]) == 2
    _one_line_error(capsys, match)
    assert main([*VERIFY, "--db", "unused.db", "--objective", objective]) == 2
    _one_line_error(capsys, match)


@pytest.mark.parametrize("argv, match", [
    ([*TUNE, "--batch-size", "0"], "argument --batch-size"),
    ([*TUNE, "--trials", "-1"], "argument --trials"),
    ([*TUNE, "--seconds", "nan"], "argument --seconds"),
    ([*TUNE, "--memory-limit", "0"], "argument --memory-limit"),
    ([*VERIFY, "--timeout", "0"], "argument --timeout"),
    ([*VERIFY, "--target", "rocm"], "target kind 'rocm'"),
    ([*VERIFY, "--target", '{"kind": "llvm", "mcpu": '], "not valid JSON"),
    ([*VERIFY, "--alpha-iterations", "-2"], "argument --alpha-iterations"),
    ([*VERIFY, "--clip", "0", "inf"], "argument --clip"),
    ([*VERIFY, "--out", "r.txt"], "--out writes a VNN-COMP result file"),
    (["verify", "--model", MODEL, "--input", INPUTS, "--eps", "1e30"], "too large"),
    (["tune"], "the following arguments are required"),
])
def test_bad_arguments_are_one_line(argv, match, capsys):
    assert main(argv) == 2
    _one_line_error(capsys, match)


@pytest.mark.parametrize("eps", ["1e30", "1e38"])
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_huge_eps_never_prints_nan_as_a_bound(eps, method, capsys):
    status = main(["verify", "--model", MODEL, "--input", INPUTS, "--eps", eps, "--json",
                   "--method", method])
    captured = capsys.readouterr()
    if status == 0:
        out = json.loads(captured.out)
        assert np.isfinite(out["lower"]).all() and np.isfinite(out["upper"]).all()
    else:
        assert status == 2 and captured.out == ""
        assert "too large" in captured.err and captured.err.count("\n") == 1


def test_api_checks(tmp_path):
    graph = bf.load_model(MODEL)
    x = np.load(INPUTS)
    with pytest.raises(bf.BoundFlowError, match="lr"):
        bf.AlphaConfig(lr=float("nan"))
    with pytest.raises(bf.BoundFlowError, match="lr"):
        bf.AlphaConfig(lr=float("inf"))
    with pytest.raises(bf.BoundFlowError, match="iterations"):
        bf.AlphaConfig(iterations=2.5)
    with pytest.raises(bf.SpecError, match="empty"):
        bf.compute_bounds(graph, x[:0], eps=0.01)
    with pytest.raises(bf.SpecError, match="overflow|NaN"):
        bf.compute_bounds(graph, x, eps=1e30, method="crown")


def test_targets_in_string_and_json_form_are_one_target():
    from boundflow.target import canonical_target, target_config

    a = canonical_target("llvm -mcpu=x86-64 -num-cores=2")
    b = canonical_target('{"kind": "llvm", "num-cores": 2, "mcpu": "x86-64"}')
    assert a == b == "llvm -mcpu=x86-64 -num-cores=2"
    assert target_config(a) == {"kind": "llvm", "mcpu": "x86-64", "num-cores": 2}
    assert canonical_target("llvm") == "llvm"
    graph = bf.load_model(MODEL)
    assert bf.Workload.of(graph, target='{"kind": "llvm"}').key == bf.Workload.of(graph).key


def test_the_relax_backend_takes_either_form_and_checks_C():
    pytest.importorskip("tvm")
    graph = bf.load_model(MODEL)
    x = np.load(INPUTS)[:2]
    labels = [0, 1]
    ref = bf.compute_bounds(graph, x, eps=0.01, method="ibp", C=bf.margin_spec(labels, 10))
    got = bf.compute_bounds(graph, x, eps=0.01, method="ibp", C=bf.margin_spec(labels, 10),
                            backend="relax", target='{"kind": "llvm", "mcpu": "x86-64"}')
    np.testing.assert_allclose(got.lower.numpy(), ref.lower.numpy(), rtol=1e-4, atol=1e-4)
    wrong = np.zeros((2, 9, 11))
    with pytest.raises(bf.SpecError, match="width 11"):
        bf.compute_bounds(graph, x, eps=0.01, method="ibp", C=wrong, backend="relax",
                          target="llvm -mcpu=x86-64")


@pytest.mark.parametrize("command", ["verify", "tune"])
def test_cuda_without_a_gpu_is_one_line(capfd, command):
    """One line on the process's stderr (capfd: TVM's C++ warnings go there too, as its
    probe of the GPU's arch did before the device was asked for)."""
    tvm = pytest.importorskip("tvm")
    if tvm.cuda().exist:
        pytest.skip("a CUDA device is present")
    args = [*VERIFY, "--backend", "relax", "--target", "cuda", "--method", "ibp"]
    if command == "tune":
        args = ["tune", *args[1:], "--trials", "1", "--db", ":memory:"]
    assert main(args) == 2
    _one_line_error(capfd, "no CUDA device")


@pytest.mark.parametrize("command", ["verify", "tune"])
def test_torch_on_cuda_without_a_gpu_is_one_line(capfd, command):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    args = [*VERIFY, "--target", "cuda", "--method", "ibp"]
    if command == "tune":
        args = ["tune", *args[1:], "--backend", "torch", "--trials", "1", "--db", ":memory:"]
    assert main(args) == 2
    _one_line_error(capfd, "target cuda: torch sees no CUDA device")


def test_version_and_quiet(tmp_path, capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("boundflow ")
    from boundflow.db import Database

    Database(tmp_path / "none.db").close()          # empty: no tuned plan, no notice shown
    assert main([*VERIFY, "--method", "ibp", "--db", str(tmp_path / "none.db"), "--quiet",
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and json.loads(captured.out)["method"] == "ibp"


def test_a_closed_pipe_is_no_traceback():
    """`boundflow verify ... | head -1`: the reader goes away early."""
    proc = subprocess.Popen([sys.executable, "-m", "boundflow.cli", *VERIFY, "--method", "ibp"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_verify_threads(monkeypatch, capsys):
    """``--threads N`` bounds on N threads; 0 is refused in one line."""
    import os

    import torch

    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):    # restored after the test
        monkeypatch.setenv(name, os.environ.get(name, ""))
    before = torch.get_num_threads()
    try:
        assert main([*VERIFY, "--method", "ibp", "--threads", "1", "-q"]) == 0
        assert torch.get_num_threads() == 1 and os.environ["TVM_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    assert main([*VERIFY, "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
