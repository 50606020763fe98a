"""Plans read from files and databases are data: a tampered plan is refused before it runs.

The tampered plan of issue 13 puts every buffer of the storage plan into slot 0, so buffers
that are live at the same time overwrite each other; run as given, it printed lower bounds up
to 18.4 above the true outputs and "verified" 8/8. Each test here fails without the check.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import boundflow as bf
import boundflow.examples as examples
from boundflow.cli import main
from boundflow.ir.plan import PlanBundle
from boundflow.ir.task_graph import PlanError
from boundflow.frontend.pt2 import load_model
from boundflow.planner import check_plan, plan

MODEL = str(examples.DATA / "digits_mlp.pt2")
INPUTS = str(examples.DATA / "digits_x.npy")


@pytest.fixture(scope="module")
def graph():
    return load_model(MODEL)


def _one_slot(bundle: PlanBundle) -> str:
    """The plan with every buffer in slot 0 (grown to fit the largest)."""
    d = json.loads(bundle.to_json())
    sp = d["storage_plan"]
    sp["assignment"] = [[b, 0] for b, _ in sp["assignment"]]
    sp["slots"] = [max(sp["slots"])]
    sp["planned_bytes"] = sp["slots"][0]
    return json.dumps(d)


@pytest.fixture(scope="module")
def tampered(graph):
    work = bf.Workload.of(graph, batch=8, method="crown")
    return PlanBundle.from_json(_one_slot(plan(graph, work)))


def test_the_planner_accepts_its_own_plans(graph):
    for method in ("ibp", "crown-ibp", "crown", "alpha-crown"):
        bundle = plan(graph, bf.Workload.of(graph, batch=8, method=method))
        again = PlanBundle.from_json(bundle.to_json())
        assert check_plan(graph, again) is again


def test_a_tampered_storage_plan_is_refused(graph, tampered):
    with pytest.raises(PlanError, match="storage_plan"):
        check_plan(graph, tampered)
    with pytest.raises(bf.BoundFlowError, match="not the plan its knobs give"):
        bf.verify(graph, np.load(INPUTS), eps=0.01, plan=tampered)


def test_edited_knobs_settings_and_workloads_are_refused(graph):
    bundle = plan(graph, bf.Workload.of(graph, batch=8, method="crown"))
    d = json.loads(bundle.to_json())
    d["domain_plan"]["lower_slope"] = "two"
    with pytest.raises(PlanError, match="lower slope"):
        check_plan(graph, PlanBundle.from_json(json.dumps(d)))
    d = json.loads(bundle.to_json())
    d["cache_plan"]["entries"] = d["cache_plan"]["entries"][::-1]
    with pytest.raises(PlanError):
        check_plan(graph, PlanBundle.from_json(json.dumps(d)))


def test_cli_refuses_a_tampered_plan_file(tmp_path, tampered, capsys):
    path = tmp_path / "p.json"
    path.write_text(tampered.to_json())
    assert main(["verify", "--model", MODEL, "--input", INPUTS, "--eps", "0.01",
                 "--plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("boundflow: error: ") and err.count("\n") == 1
    assert "storage_plan" in err


def _default_bounds(graph, out):
    x = np.load(INPUTS)
    labels = np.asarray(out["labels"])
    return bf.compute_bounds(graph, x, eps=0.01, method="crown", C=bf.margin_spec(labels, 10))


def test_a_tampered_plan_written_into_a_shared_database_is_not_run(graph, tampered, tmp_path,
                                                                  capsys):
    """Another party writes a best-plan record (compared with the default path, so lookup
    returns it) whose plan was edited: `verify --db` refuses it and runs the default plan."""
    from boundflow.db import Database

    db = str(tmp_path / "shared.db")
    with Database(db) as d:
        d.set_best(tampered, "time@width", "torch", 1e-5, baseline_value=1e-3, best_s=1e-5,
                   baseline_s=1e-3)
    assert main(["verify", "--model", MODEL, "--input", INPUTS, "--eps", "0.01",
                 "--method", "crown", "--db", db, "--json"]) == 0
    captured = capsys.readouterr()
    assert "refused" in captured.err and "storage_plan" in captured.err
    out = json.loads(captured.out)
    np.testing.assert_array_equal(np.asarray(out["lower"], np.float32),
                                  _default_bounds(graph, out).lower.numpy())


def test_a_tampered_plan_imported_into_a_database_is_not_run(graph, tampered, tmp_path,
                                                            capsys):
    """`db import` of a record whose plan was edited: `verify --db` does not run it."""
    from boundflow.db import Database
    from boundflow.measure.result import MeasureResult

    db = str(tmp_path / "t.db")
    good = plan(graph, bf.Workload.of(graph, batch=8, method="crown"))
    result = MeasureResult(good.key, "torch", "llvm", median_s=1e-4, times=(1e-4,),
                           mean_width=1.0)
    with Database(db) as d:
        d.add_measurement(good, result, graph=graph)
        d.set_best(good, "time@width", "torch", 1e-4, baseline_value=1e-3, best_s=1e-4,
                   baseline_s=1e-3)
    dump = tmp_path / "runs.jsonl"
    assert main(["db", "export", "--db", db, "--file", str(dump)]) == 0
    text = dump.read_text()
    bad = text.replace(json.dumps(good.to_json())[1:-1], json.dumps(tampered.to_json())[1:-1])
    assert bad != text, "the plan was not found in the export"
    dump.write_text(bad)
    other = str(tmp_path / "other.db")
    assert main(["db", "import", "--db", other, "--file", str(dump)]) == 0
    capsys.readouterr()
    assert main(["verify", "--model", MODEL, "--input", INPUTS, "--eps", "0.01",
                 "--method", "crown", "--db", other, "--json"]) == 0
    captured = capsys.readouterr()
    assert "using the default plan" in captured.err
    out = json.loads(captured.out)
    np.testing.assert_array_equal(np.asarray(out["lower"], np.float32),
                                  _default_bounds(graph, out).lower.numpy())
