"""Where a search's plans run (``BabConfig.target``): input splitting's bound calls, its
escalation's included, run on the configured target; ReLU splitting says it runs on the CPU;
``verify --onnx --vnnlib --target`` reaches the search, or is one line where this machine
cannot run it; and on a GPU a search decides as on the CPU."""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from boundflow.bab import BabConfig, input_split, relu_split
from boundflow.bab.bounder import ForwardScreen, PlanBounder
from boundflow.cli import main
from boundflow.errors import BoundFlowError
from boundflow.target import canonical_target
from tests.bab.test_escalate import _escalating_search, random_escalated_search
from tests.bab.test_input_split import _net, _truth

DATA = Path(__file__).resolve().parents[2] / "boundflow" / "examples" / "data"
OTHER_CPU = "llvm -mcpu=x86-64"              # a target other than the default, on the CPU


def test_the_config_keeps_a_canonical_target_and_refuses_a_bad_one():
    assert BabConfig().target == canonical_target("llvm")
    assert BabConfig(target='{"kind": "llvm", "mcpu": "x86-64"}').target == \
        canonical_target(OTHER_CPU)
    for bad in ("vulkan", "", "llvm -mcpu=$(reboot)", 3):
        with pytest.raises(BoundFlowError, match="target"):
            BabConfig(target=bad)


def test_every_plan_of_an_input_split_search_runs_on_its_target(monkeypatch):
    """The search's plan and the escalation's alpha-CROWN plan are both workloads of the
    configured target (here a second CPU target: the torch backend runs it on the CPU)."""
    split_module = importlib.import_module("boundflow.bab.input_split")
    made = []

    def spy(*args, **kwargs):
        bounder = PlanBounder(*args, **kwargs)
        made.append((kwargs["method"], bounder.verifier.plan.workload.target))
        return bounder
    monkeypatch.setattr(split_module, "PlanBounder", spy)
    g, lo, hi, C, thr = _escalating_search(monkeypatch)
    res = input_split(g, lo, hi, C, thr, [(0, 1)], BabConfig(batch=64, target=OTHER_CPU),
                      deadline=time.monotonic() + 60)
    assert res.status == "unsat" and res.refined > 0
    assert {m for m, _ in made} == {"crown", "alpha-crown"}
    assert {t for _, t in made} == {canonical_target(OTHER_CPU)}


def test_the_forward_screen_runs_on_the_searchs_target(monkeypatch):
    split_module = importlib.import_module("boundflow.bab.input_split")
    made = []

    class Spy(ForwardScreen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.verifier.plan.workload.target)
    monkeypatch.setattr(split_module, "ForwardScreen", Spy)
    g, lo, hi, C, thr = _escalating_search(monkeypatch)
    res = input_split(g, lo, hi, C, thr, [(0, 1)],
                      BabConfig(batch=64, screen="forward", target=OTHER_CPU),
                      deadline=time.monotonic() + 60)
    assert res.status == "unsat" and made == [canonical_target(OTHER_CPU)]


def test_vnncomp_passes_its_backend_and_target_to_every_bound(monkeypatch, tmp_path, capsys):
    """The whole-box bound runs on ``--backend`` and ``--target``, the search on both."""
    vnncomp = importlib.import_module("boundflow.vnncomp")
    seen = []

    def spy(graph, prop, options, **kwargs):
        seen.append((options.backend, options.target, kwargs["bab"].backend,
                     kwargs["bab"].target))
        raise BoundFlowError("spied")
    monkeypatch.setattr(vnncomp, "check_property", spy)
    args = _property_args()
    csv = tmp_path / "instances.csv"
    csv.write_text(f"{args[2]},{args[4]},60\n")
    main(["vnncomp", "--instances", str(csv), "--backend", "relax", "--target", OTHER_CPU])
    assert seen == [("relax", canonical_target(OTHER_CPU), "relax",
                     canonical_target(OTHER_CPU))]
    assert "spied" in capsys.readouterr().out


def test_relu_splitting_says_its_plans_run_on_the_cpu(caplog):
    g = _net(0, n_in=3)
    lo, hi = -np.ones(3), np.ones(3)
    C = np.array([[1.0, -1.0, 0.0]])
    with caplog.at_level(logging.WARNING, logger="boundflow.bab"):
        res = relu_split(g, lo, hi, C, np.array([-50.0]), [(0, 1)],
                         BabConfig(strategy="relu", batch=8, target="cuda"),
                         deadline=time.monotonic() + 30)
    assert res.status == "unsat"
    assert "ReLU splitting runs its plans on the CPU" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="boundflow.bab"):
        relu_split(g, lo, hi, C, np.array([-50.0]), [(0, 1)],
                   BabConfig(strategy="relu", batch=8), deadline=time.monotonic() + 30)
    assert "on the CPU" not in caplog.text


def _property_args(*extra):
    return ["verify", "--onnx", str(DATA / "digits_tanh_mlp.onnx"), "--vnnlib",
            str(DATA / "digits_tanh_mlp.vnnlib"), *extra]


@pytest.mark.parametrize("command", ["verify", "vnncomp"])
def test_a_property_refuses_a_gpu_it_does_not_have(command, capfd, tmp_path):
    """Before, ``verify`` ignored ``--target`` here and ran the search on the CPU unasked,
    and ``vnncomp`` failed every instance on its own line."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    args = _property_args("--target", "cuda")
    if command == "vnncomp":
        csv = tmp_path / "instances.csv"
        csv.write_text(f"{args[2]},{args[4]},60\n{args[2]},{args[4]},60\n")
        args = ["vnncomp", "--instances", str(csv), "--target", "cuda"]
    assert main(args) == 2
    err = capfd.readouterr().err
    assert err.startswith("boundflow: error: ") and err.count("\n") == 1, err
    assert "target cuda: torch sees no CUDA device" in err


def test_verify_of_a_property_passes_its_target_to_the_search(monkeypatch, capsys):
    seen = []
    vnncomp = importlib.import_module("boundflow.vnncomp")
    real = vnncomp.check_property

    def spy(graph, prop, options, **kwargs):
        seen.append((options.target, kwargs["bab"].target))
        return real(graph, prop, options, **kwargs)
    monkeypatch.setattr(vnncomp, "check_property", spy)
    assert main(_property_args("--target", OTHER_CPU, "--method", "crown")) == 0
    assert seen == [(canonical_target(OTHER_CPU), canonical_target(OTHER_CPU))]
    assert capsys.readouterr().out.strip() in ("unsat", "sat", "unknown")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("seed", range(4))
def test_on_a_gpu_an_escalated_search_is_sound_and_decides_as_on_the_cpu(seed, monkeypatch):
    """The plan and the escalation's alpha-CROWN on the GPU: every batch of either bound
    holds on sampled points and corners of its boxes, never wrong (dense sampling), the
    same verdict as the CPU's search."""
    g, (lo, hi), C, thr, _, refiner, gpu = random_escalated_search(seed, monkeypatch, "cuda")
    cpu = random_escalated_search(seed, monkeypatch)[-1]
    if _truth(g, lo, hi, C, thr, [(0, 1)]):
        assert gpu.status != "unsat", "unsat where a counterexample exists"
    assert gpu.status == cpu.status and gpu.status in ("unsat", "sat")
    assert gpu.refined == refiner.checked and (gpu.domains == 1 or gpu.refined > 0)
