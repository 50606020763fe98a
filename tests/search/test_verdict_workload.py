"""A verdict reads lower bounds only, and alpha-CROWN then optimises one side (about half the
work): so the workload ``boundflow tune`` tunes, and the call it measures, are the ones
``verify``, ``Verifier.verify`` and branch-and-bound make (``Workload.bounds == "lower"``),
and those look their plans up under that workload. Methods whose work does not depend on it
share one workload either way, and its key is the one records had before the field."""

from __future__ import annotations

import hashlib
import json

import pytest

import boundflow as bf
from boundflow.api import verify
from boundflow.db import Database
from boundflow.errors import BoundFlowError
from boundflow.ir.plan import PlanBundle
from boundflow.ir.workload import Workload
from boundflow.measure import BuildResult, MeasureConfig, MeasureInput
from boundflow.measure.worker import measure_local
from boundflow.planner import default, plan
from boundflow.search import Tuner
from boundflow.search.lookup import tuned_plan
from tests.backend.test_lower_only import _sides
from tests.search.test_baseline import FINAL, NoBuilder, Scripted, digits  # noqa: F401


def _legacy_key(w: Workload) -> str:
    """The key as releases before ``bounds`` computed it."""
    d = {"graph_hash": w.graph_hash, "input_shape": list(w.input_shape), "batch": w.batch,
         "n_specs": w.n_specs, "method": w.method, "dtype": w.dtype, "target": w.target}
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()[:32]


def test_bounds_splits_only_the_workloads_whose_work_it_changes(digits):
    g = digits[0]
    for method in ("ibp", "crown-ibp", "crown"):
        low = Workload.of(g, batch=2, method=method, bounds="lower")
        both = Workload.of(g, batch=2, method=method)
        assert low.bounds == both.bounds == "both" and low.upper
        assert low.key == both.key == _legacy_key(both)
    low = Workload.of(g, batch=2, method="alpha-crown", bounds="lower")
    both = Workload.of(g, batch=2, method="alpha-crown")
    assert low.bounds == "lower" and not low.upper and both.upper
    assert both.key == _legacy_key(both) and "bounds" not in both.to_dict()
    assert low.key != both.key
    # records round-trip, old records (no field) read as "both"
    assert Workload.from_dict(low.to_dict()) == low
    legacy = {k: v for k, v in low.to_dict().items() if k != "bounds"}
    assert Workload.from_dict(legacy) == both
    # a plan made for the verdict's workload keeps it through its JSON
    bundle = plan(g, low, default(g, low))
    again = PlanBundle.from_json(bundle.to_json())
    assert again.workload == low and again.key == bundle.key
    # a database row or plan file is untrusted: a bad value is one clear error
    for bad in ("upper", "", 5, None):
        with pytest.raises(BoundFlowError, match="bounds"):
            Workload.from_dict({**low.to_dict(), "bounds": bad})
    with pytest.raises(BoundFlowError, match="bounds"):
        Workload.of(g, method="alpha-crown", bounds="sideways")


def test_the_tuner_measures_the_call_verify_makes(digits, monkeypatch):
    """With specs the tuner's workload is the verdict's, and each measured call optimises
    the lower side only, as ``verify`` does; a tuner asked for both sides measures both."""
    g, spec, linear, _ = digits
    signs = _sides(monkeypatch)
    config = MeasureConfig(number=1, repeat=2, warmup=1)
    with Database(":memory:") as db:
        for bounds, want in ((None, {-1.0}), ("both", {-1.0, 1.0})):
            tuner = Tuner(g, spec.lower, spec.upper, linear.C, method="alpha-crown", db=db,
                          backend="torch", progress=False, bounds=bounds)
            assert tuner.workload.bounds == ("lower" if bounds is None else "both")
            signs.clear()
            inp = MeasureInput(tuner.baseline_bundle, g, spec.lower, spec.upper, linear.C,
                               "torch")
            r = measure_local(inp, BuildResult(None), config)
            assert r.ok and signs and set(signs) == want
            tuner.close()
        raw = Tuner(g, spec.lower, spec.upper, None, method="alpha-crown", db=db,
                    backend="torch", progress=False)
        assert raw.workload.bounds == "both"        # raw output bounds read both sides
        raw.close()


def test_verify_and_the_verifier_find_the_plan_tuned_for_them(digits):
    g, spec, linear, x = digits
    with Database(":memory:") as db:
        tuner = Tuner(g, spec.lower, spec.upper, linear.C, method="alpha-crown", db=db,
                      backend="torch", progress=False, strategy="greedy", batch_size=2,
                      builder=NoBuilder(), final_config=FINAL)
        tuner.runner = Scripted(tuner.baseline, default_ms=1.0, search_ms=0.5, final_ms=0.5,
                                final_config=FINAL)
        report = tuner.tune(trials=3)
        tuner.close()
        assert not report.kept_default and report.workload.bounds == "lower"
        assert tuned_plan(db, report.workload) is not None
        both = Workload.of(g, batch=2, n_specs=linear.n_specs, method="alpha-crown")
        assert tuned_plan(db, both) is None         # tuned for verdicts, not for both sides
        result = verify(g, x, eps=0.01, method="alpha-crown", db=db)
        assert result.tuned is not None and result.tuned.bundle.key == report.best_bundle.key
        v = bf.compile(g, batch=2, method="alpha-crown", db=db)
        assert v.tuned is not None and v.tuned.bundle.key == report.best_bundle.key
        assert bf.compile(g, batch=2, method="alpha-crown", db=db, bounds="both").tuned is None


def test_a_plan_tuned_for_both_sides_is_named_on_a_miss_and_bounds_survive_export(digits):
    """A database tuned before the field (alpha-crown verdicts tuned for both sides): verify
    runs the default path and says why; a lower-bounds workload's records keep their side
    through export and import."""
    import io

    from boundflow.search.lookup import describe_missing

    g, spec, linear, x = digits
    with Database(":memory:") as db:
        tuner = Tuner(g, spec.lower, spec.upper, linear.C, method="alpha-crown", db=db,
                      backend="torch", progress=False, strategy="greedy", batch_size=2,
                      builder=NoBuilder(), final_config=FINAL, bounds="both")
        tuner.runner = Scripted(tuner.baseline, default_ms=1.0, search_ms=0.5, final_ms=0.5,
                                final_config=FINAL)
        tuner.tune(trials=2)
        tuner.close()
        low = Workload.of(g, batch=2, n_specs=linear.n_specs, method="alpha-crown",
                          bounds="lower")
        assert tuned_plan(db, low) is None
        assert "tuned for both sides" in describe_missing(db, low, "time@width")
        # and a lower-bounds workload's records through export and import
        tuner = Tuner(g, spec.lower, spec.upper, linear.C, method="alpha-crown", db=db,
                      backend="torch", progress=False, strategy="greedy", batch_size=2,
                      builder=NoBuilder(), final_config=FINAL)
        tuner.runner = Scripted(tuner.baseline, default_ms=1.0, search_ms=0.5, final_ms=0.5,
                                final_config=FINAL)
        tuner.tune(trials=2)
        tuner.close()
        assert tuned_plan(db, low) is not None
        buf = io.StringIO()
        db.export_jsonl(buf)
    with Database(":memory:") as fresh:
        fresh.import_jsonl(io.StringIO(buf.getvalue()))
        sides = sorted(w.workload.bounds for w in fresh.workloads())
        assert sides == ["both", "lower"]
        # filed under the lower-bounds workload (an import offers the "time" record only)
        assert fresh.best_plan(low, objective="time") is not None
