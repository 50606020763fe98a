"""The bundled examples of max pooling, sigmoid and tanh (``examples.MORE_EXAMPLES``): each
loads from its ``.pt2`` program and its ``.onnx`` file into the same IR, which computes what the
torch model computes on the bundled digits; its VNN-LIB property is the one the generator
writes; and ``boundflow verify`` answers on it both ways."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import boundflow.examples as examples
from boundflow.examples.generate import PROPERTY_EPS, vnnlib_property
from boundflow.frontend.onnx import load_onnx
from boundflow.frontend.vnnlib import load_vnnlib
from tests.conftest import ROOT
from tests.frontend.evaluation import missing_rules, run_ir

NAMES = sorted(examples.MORE_EXAMPLES)
MAX_BYTES = 200 * 1024


def _graphs(name):
    return examples.load(name).model, load_onnx(examples.DATA / f"{name}.onnx")


@pytest.mark.parametrize("name", NAMES)
def test_both_files_give_one_graph_that_computes_the_model(name):
    from_pt2, from_onnx = _graphs(name)
    assert [n.op for n in from_pt2.nodes] == [n.op for n in from_onnx.nodes]
    assert from_pt2.weights_hash() == from_onnx.weights_hash()
    x, labels = examples.digits_samples()
    with torch.no_grad():
        want = examples.digits_module(name)(torch.from_numpy(x))
    for graph in (from_pt2, from_onnx):
        torch.testing.assert_close(run_ir(graph, torch.from_numpy(x)), want, rtol=1e-5,
                                   atol=1e-5)
    assert (want.argmax(1).numpy() == labels).mean() >= 0.95


@pytest.mark.parametrize("name", NAMES)
def test_the_property_is_the_generators_and_the_files_are_small(name):
    for kind in ("pt2", "onnx", "vnnlib"):
        assert (examples.DATA / f"{name}.{kind}").stat().st_size < MAX_BYTES
    x, labels = examples.digits_samples()
    with torch.no_grad():
        right = examples.digits_module(name)(torch.from_numpy(x)).argmax(1).numpy() == labels
    i = int(np.argmax(right))
    text = (examples.DATA / f"{name}.vnnlib").read_text()
    title = text.splitlines()[0][2:]
    eps = PROPERTY_EPS[name]
    assert text == vnnlib_property(x[i], int(labels[i]), eps, 10, title)
    prop = load_vnnlib(examples.DATA / f"{name}.vnnlib", 64, 10)
    assert len(prop.disjuncts) == 9
    box = prop.disjuncts[0]
    assert np.all(box.lower <= x[i].reshape(-1)) and np.all(x[i].reshape(-1) <= box.upper)
    assert np.all(box.upper - box.lower <= 2 * eps + 1e-12)


def _verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "boundflow.cli", "verify", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def _need_bound_rules(graph) -> None:
    from boundflow.domains import interval

    missing = sorted(set(missing_rules(graph)) | ({n.op for n in graph.nodes if n.op != "input"}
                                                   - set(interval.RULES)))
    if missing:
        pytest.skip(f"the domains have no rules for {missing} yet")


@pytest.mark.parametrize("name", NAMES)
def test_verify_on_the_torch_program(name):
    _need_bound_rules(examples.load(name).model)
    data = examples.DATA
    done = _verify("--model", str(data / f"{name}.pt2"), "--input", str(data / "digits_x.npy"),
                   "--eps", "0.01", "--method", "crown")
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("verified ") and "samples (method crown" in last


@pytest.mark.parametrize("name", NAMES)
def test_verify_on_the_onnx_model_and_property(name):
    _need_bound_rules(examples.load(name).model)
    data = examples.DATA
    done = _verify("--onnx", str(data / f"{name}.onnx"), "--vnnlib",
                   str(data / f"{name}.vnnlib"), "--method", "crown")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[0] == "unsat", done.stdout + done.stderr
