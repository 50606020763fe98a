"""``boundflow costmodel inspect``: metrics that recover a known relation, clear messages on
an empty database or one without a model, the plot."""

from __future__ import annotations

import random

import numpy as np

from boundflow.cli import main
from boundflow.costmodel import PLAN_FEATURE_NAMES
from boundflow.costmodel.inspect import held_out, report
from boundflow.db import Database
from boundflow.ir.workload import Workload
from boundflow.measure import MeasureResult
from boundflow.planner import plan, space
from tests.helpers import example_graph

IDX = {k: i for i, k in enumerate(PLAN_FEATURE_NAMES)}


def _synthetic_db(path, n_workloads=3, n_plans=40):
    """Workloads whose measured time is a known function of the stored features (a
    candidate stores its plan's features; the backend's join them when read)."""
    _, g = example_graph("digits_cnn")
    rng = np.random.default_rng(0)
    with Database(path) as db:
        for wi in range(n_workloads):
            w = Workload.of(g, batch=wi + 1, method="crown")
            sp, prng = space(g, w), random.Random(wi)
            seen = set()
            while len(seen) < n_plans:
                b = plan(g, w, sp.sample(prng))
                if b.key in seen:
                    continue
                seen.add(b.key)
                f = rng.uniform(0, 1, len(PLAN_FEATURE_NAMES))
                f[IDX["log_flops_batch"]] = rng.uniform(10, 30)
                f[IDX["n_kernels"]] = rng.integers(1, 12)
                t = np.exp(0.7 * f[IDX["log_flops_batch"]] + 0.4 * f[IDX["n_kernels"]] - 25)
                db.add_measurement(b, MeasureResult(b.key, "relax", "llvm", median_s=float(t),
                                                    mean_width=1.0, peak_bytes=100),
                                   features=f, graph=g)
    return path


def test_held_out_metrics_recover_a_known_relation(tmp_path):
    with Database(_synthetic_db(tmp_path / "syn.db")) as db:
        m = held_out(db)
    assert m["xgboost"]["spearman"] > 0.9 and m["xgboost"]["groups"] == 3
    assert m["xgboost"]["spearman"] > m["analytic"]["spearman"]
    assert 0 <= m["xgboost"]["top_k_recall"] <= 1


def test_held_out_quality_with_one_workload_is_k_fold_within_it(tmp_path):
    with Database(_synthetic_db(tmp_path / "one.db", n_workloads=1)) as db:
        m = held_out(db)
        rep = report(db)
    assert m["xgboost"]["spearman"] > 0.8 and m["xgboost"]["groups"] == 1
    assert m["xgboost"]["n"] == 40 and "analytic" in m
    assert rep["held_out_split"] == "5-fold within the workload"


def test_inspect_cli_messages_and_plot(tmp_path, capsys):
    empty = tmp_path / "empty.db"
    Database(empty).close()
    assert main(["costmodel", "inspect", "--db", str(empty), "--plot",
                 str(tmp_path / "e.png")]) == 0
    out = capsys.readouterr().out
    assert "no measurements yet" in out and "no cost model stored" in out
    assert "nothing to plot" in out and not (tmp_path / "e.png").exists()
    syn = _synthetic_db(tmp_path / "syn.db")
    assert main(["costmodel", "inspect", "--db", str(syn), "--plot",
                 str(tmp_path / "fit.png")]) == 0
    out = capsys.readouterr().out
    assert "3 workloads, 120 candidates, 120 measurements" in out
    assert "no cost model stored" in out and "held-out quality" in out
    assert (tmp_path / "fit.png").stat().st_size > 10_000
    with Database(syn) as db:
        rep = report(db)
    assert len(rep["workloads"]) == 3 and all("time" in w["best"] for w in rep["workloads"])
    assert "fused" in rep["workloads"][0]["best"]["time"]["knobs"]
