"""A tuned plan is used only where it pays off end to end: from the command line (one call per
process) a compiled plan's saving must exceed the backend's start-up."""

from __future__ import annotations

import json

import numpy as np
import pytest

import boundflow as bf
import boundflow.examples as examples
from boundflow import api
from boundflow.backend.base import RelaxBackend, import_seconds
from boundflow.cli import main
from boundflow.planner import plan

MODEL = str(examples.DATA / "digits_mlp.pt2")
INPUTS = str(examples.DATA / "digits_x.npy")


@pytest.fixture
def tuned_db(tmp_path):
    """A database whose best record is a relax plan measured 2x faster than the default."""
    from boundflow.db import Database

    graph = bf.load_model(MODEL)
    bundle = plan(graph, bf.Workload.of(graph, batch=8, method="ibp"))
    db = str(tmp_path / "t.db")
    with Database(db) as d:
        d.set_best(bundle, "time@width", "relax", 1e-3, baseline_value=2e-3, best_s=1e-3,
                   baseline_s=2e-3)
    api._LOOKUPS.clear()
    return db


def test_one_query_from_the_command_line_keeps_the_default_path(tuned_db, monkeypatch,
                                                                capsys):
    monkeypatch.setattr(RelaxBackend, "start_seconds", lambda self: 2.0)
    assert main(["verify", "--model", MODEL, "--input", INPUTS, "--eps", "0.01", "--method",
                 "ibp", "--db", tuned_db, "--json"]) == 0
    captured = capsys.readouterr()
    assert "starting the relax backend costs about 2.0 s" in captured.err
    assert "tuned" not in json.loads(captured.out)


def test_many_calls_or_a_started_backend_use_the_tuned_plan(tuned_db, monkeypatch):
    graph = bf.load_model(MODEL)
    work = bf.Workload.of(graph, batch=8, method="ibp")
    monkeypatch.setattr(RelaxBackend, "start_seconds", lambda self: 2.0)
    assert api.lookup_tuned(graph, work, tuned_db, "time@width", calls=1) is None
    assert api.lookup_tuned(graph, work, tuned_db, "time@width", calls=10_000) is not None
    assert api.lookup_tuned(graph, work, tuned_db, "time@width") is not None
    monkeypatch.setattr(RelaxBackend, "start_seconds", lambda self: 0.0)
    assert api.lookup_tuned(graph, work, tuned_db, "time@width", calls=1) is not None


def test_import_seconds_is_measured_once_and_zero_once_imported(tmp_path, monkeypatch):
    monkeypatch.setenv("BOUNDFLOW_CACHE", str(tmp_path))
    assert import_seconds("json") == 0.0                        # this process has it
    first = import_seconds("json", here=False)
    assert first > 0 and (tmp_path / "start" / "json.json").exists()
    assert import_seconds("json", here=False) == first           # read back, not re-measured
