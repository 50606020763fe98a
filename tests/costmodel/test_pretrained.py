"""The shipped training set: ``boundflow costmodel train`` writes it from a database, it
reads back as written, a damaged or foreign one is refused (the tuner then starts cold), and
a tuner's ranker starts from it and keeps it beside the database's records when it refits."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from boundflow.cli import main
from boundflow.costmodel import pretrained
from boundflow.costmodel.inspect import training_set
from boundflow.db import Database
from boundflow.errors import BoundFlowError
from boundflow.ir.workload import Workload
from boundflow.search.ranking import Ranker
from tests.costmodel.test_inspect import _synthetic_db
from tests.helpers import example_graph


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.setattr(pretrained, "_CACHE", {})


def test_train_writes_the_training_set_it_reads_back(tmp_path, capsys):
    db = _synthetic_db(tmp_path / "syn.db", n_workloads=3, n_plans=12)
    out = tmp_path / "set.json.gz"
    assert main(["costmodel", "train", "--db", str(db), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "36 measured plans of 3 workloads" in printed and "leave one workload out" in printed
    data = pretrained.read(out)
    with Database(db) as d:
        X, Y, groups = training_set(d.records_for_training())
    np.testing.assert_allclose(data.X, X, atol=1e-6)
    np.testing.assert_allclose(data.Y["log_time"], Y["log_time"], atol=1e-6)
    assert list(data.groups) == list(groups) and data.n_workloads == 3
    assert data.about["records"] == 36 and "xgboost" in data.about["held_out"]


def test_train_leaves_out_the_workloads_it_is_told_to(tmp_path, capsys):
    db = _synthetic_db(tmp_path / "syn.db", n_workloads=3, n_plans=12)
    with Database(db) as d:
        keys = sorted({r.workload.key for r in d.records_for_training()})
    out = tmp_path / "set.json.gz"
    assert main(["costmodel", "train", "--db", str(db), "--out", str(out), "--exclude",
                 keys[0][:10]]) == 0
    data = pretrained.read(out)
    assert data.n_workloads == 2 and keys[0] not in set(data.groups)
    assert data.about["excluded"] == [keys[0][:10]]
    assert main(["costmodel", "train", "--db", str(db), "--out", str(out), "--exclude",
                 "nosuchkey"]) == 2
    assert "names no workload" in capsys.readouterr().err


def test_train_needs_several_workloads(tmp_path, capsys):
    db = _synthetic_db(tmp_path / "one.db", n_workloads=1, n_plans=10)
    assert main(["costmodel", "train", "--db", str(db), "--out",
                 str(tmp_path / "x.json.gz")]) == 2
    err = capsys.readouterr().err
    assert "1 workload(s)" in err and err.count("\n") == 1


@pytest.mark.parametrize("damage, match", [
    (lambda doc: b"not gzip at all", "not a cost-model training set"),
    (lambda doc: gzip.compress(b"[1, 2]"), "not a cost-model training set"),
    (lambda doc: gzip.compress(json.dumps(dict(doc, feature_version="v0")).encode()),
     "rebuild it"),
    (lambda doc: gzip.compress(json.dumps(dict(doc, X=[[1.0, 2.0]])).encode()), "malformed"),
    (lambda doc: gzip.compress(json.dumps(dict(doc, groups=doc["groups"][:1])).encode()),
     "malformed"),
])
def test_a_damaged_or_foreign_training_set_is_refused(tmp_path, damage, match, monkeypatch,
                                                      capsys):
    db = _synthetic_db(tmp_path / "syn.db", n_workloads=2, n_plans=8)
    good = tmp_path / "good.json.gz"
    assert main(["costmodel", "train", "--db", str(db), "--out", str(good)]) == 0
    doc = json.loads(gzip.decompress(good.read_bytes()))
    bad = tmp_path / "bad.json.gz"
    bad.write_bytes(damage(doc))
    with pytest.raises(BoundFlowError, match=match):
        pretrained.read(bad)
    monkeypatch.setattr(pretrained, "PATH", bad)           # the tuner starts cold, said once
    capsys.readouterr()
    assert pretrained.training_set() is None and pretrained.model() is None
    assert pretrained.training_set() is None                # said once
    assert capsys.readouterr().err.count("the shipped cost model is not used") == 1


def test_the_ranker_starts_from_the_shipped_set_and_keeps_it_when_it_refits(tmp_path,
                                                                         monkeypatch):
    db = _synthetic_db(tmp_path / "syn.db", n_workloads=3, n_plans=12)
    out = tmp_path / "set.json.gz"
    assert main(["costmodel", "train", "--db", str(db), "--out", str(out)]) == 0
    monkeypatch.setattr(pretrained, "PATH", out)
    _, g = example_graph("digits_cnn")
    w = Workload.of(g, batch=7, method="crown")           # not among the shipped ones
    ranker = Ranker(g, w)
    assert ranker.model is pretrained.model() and ranker.model.models
    assert Ranker(g, w, use_pretrained=False).model is not pretrained.model()
    with Database(tmp_path / "fresh.db") as fresh:
        assert ranker.refit(fresh) == {}                   # nothing measured here yet
        src = Database(db)
        rec = src.records_for_training()[0]
        fresh.add_measurement(rec.candidate.bundle(), rec.measurement.result,
                              features=np.asarray(rec.candidate.features), graph=g)
        src.close()
        metrics = ranker.refit(fresh)
    assert metrics["n_train"] == 1 + 36                    # the record and the shipped set
    assert ranker.model is not pretrained.model()          # its own model, refitted


def test_a_ranker_brings_its_workloads_stale_features_up_to_this_version(tmp_path):
    """A database written by an older BoundFlow (another feature version) keeps training the
    workload's model: the ranker re-plans each candidate from its stored knobs and stores this
    version's features; a candidate whose knobs do not give its stored plan is left alone."""
    import random
    from boundflow.costmodel.features import N_PLAN_FEATURES, plan_features
    from boundflow.measure import MeasureResult
    from boundflow.planner import normalised, plan, space

    _, g = example_graph("random_nhwc")          # normalising changes it: plan the model
    w = Workload.of(g, batch=2, method="crown")
    sp, rng = space(g, w), random.Random(0)
    bundles = {b.key: b for b in (plan(g, w, sp.sample(rng)) for _ in range(6))}
    with Database(tmp_path / "old.db") as db:
        for b in bundles.values():
            db.add_measurement(b, MeasureResult(b.key, "torch", "llvm", median_s=1e-3,
                                                mean_width=1.0, peak_bytes=100),
                               features=[1.0, 2.0, 3.0], graph=g)         # an older version
        ranker = Ranker(g, w, use_pretrained=False)
        assert ranker.refit(db)["n_train"] == len(bundles)
        gn = normalised(g)[0]
        for c in db.candidates(w):
            assert len(c.features) == N_PLAN_FEATURES
            np.testing.assert_allclose(c.features, plan_features(bundles[c.key], gn))
        assert ranker.refeature(db) == 0                 # nothing stale is left
