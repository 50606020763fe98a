"""What a cost model learned, from a tuning database: held-out ranking quality against the
analytic baseline (leave one workload out when there are two or more; with one, ``k``-fold
within it), feature importances, the dataset behind it."""

from __future__ import annotations

from typing import Any

import numpy as np

from boundflow.costmodel.features import N_FEATURES, N_PLAN_FEATURES, with_backend
from boundflow.costmodel.metrics import evaluate
from boundflow.costmodel.model import HEADS, MIN_SAMPLES, REL_HEAD, AnalyticModel, \
    XGBCostModel, relative, targets
from boundflow.costmodel.select import out_of_fold


def training_set(records) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Features (the candidate's plan features on the backend it was measured on), targets
    and workload key of every successful record that has plan features of this version."""
    recs = [r for r in records if r.measurement.result.ok and r.candidate.features is not None
            and len(r.candidate.features) == N_PLAN_FEATURES]
    if not recs:
        return np.zeros((0, N_FEATURES)), {h: np.zeros(0) for h in HEADS}, np.zeros(0, str)
    X = np.array([with_backend(r.candidate.features, r.measurement.result.backend)
                  for r in recs], np.float64)
    Y = {h: np.array([targets(r.measurement.result)[h] for r in recs]) for h in HEADS}
    groups = np.array([r.workload.key for r in recs])
    return X, Y, groups


def split_name(db, folds: int = 5) -> str:
    """How :func:`held_out` splits this database's data."""
    _, _, groups = training_set(db.records_for_training())
    return "leave one workload out" if len(np.unique(groups)) >= 2 else \
        f"{folds}-fold within the workload"


def held_out(db, k: int = 5, seed: int = 0, folds: int = 5) -> dict[str, dict[str, Any]]:
    """Leave one workload out: for each workload with at least 3 measured plans, an XGBoost
    model trained on every other workload predicts its plans' times relative to the
    workload's median plan (the head the tuner ranks by); ranking metrics within each
    held-out workload (Spearman, Kendall, top-``k`` recall) are averaged, and MAPE is that of
    the relative time (prediction and measurement each over their workload's median). The
    analytic model is scored the same way on the same points. With one workload,
    ``folds``-fold within it (each fold predicted by a model trained on the others; MAPE of
    the absolute time). Empty when no workload has 3 measured plans (or, with one workload,
    too few to train on)."""
    X, Y, groups = training_set(db.records_for_training())
    keys, counts = np.unique(groups, return_counts=True)
    held = [key for key, n in zip(keys, counts) if n >= 3]
    if not held:
        return {}
    if len(keys) < 2:
        return _within(X, Y, groups, k, seed, folds)
    pred_x, pred_a, true, grp = [], [], [], []
    analytic = AnalyticModel()
    for key in held:
        test = groups == key
        train = ~test & np.isfinite(Y["log_time"])
        if train.sum() < MIN_SAMPLES:
            continue
        model = XGBCostModel(seed=seed).fit(X[train], {h: v[train] for h, v in Y.items()},
                                            groups[train])
        own = np.full(int(test.sum()), key)
        pred_x.append(relative(model.predict(X[test])[REL_HEAD], own))
        pred_a.append(relative(analytic.predict(X[test])["log_time"], own))
        true.append(relative(Y["log_time"][test], own))
        grp += [key] * int(test.sum())
    if not true:
        return {}
    true_all = np.concatenate(true)
    return {"xgboost": evaluate(np.concatenate(pred_x), true_all, np.array(grp), k),
            "analytic": evaluate(np.concatenate(pred_a), true_all, np.array(grp), k)}


def _within(X, Y, groups, k: int, seed: int, folds: int) -> dict[str, dict[str, Any]]:
    """``folds``-fold held-out predictions within one workload's points."""
    y = Y["log_time"]
    ok = np.isfinite(y)
    X, y, groups = X[ok], y[ok], groups[ok]
    if len(y) < max(MIN_SAMPLES, 3):
        return {}
    pred = out_of_fold(X, y, np.zeros((0, X.shape[1])), np.zeros(0), folds, seed, rounds=300)
    fine = np.isfinite(pred)
    if fine.sum() < 3:
        return {}
    return {"xgboost": evaluate(pred[fine], y[fine], groups[fine], k),
            "analytic": evaluate(AnalyticModel().predict(X[fine])["log_time"], y[fine],
                                 groups[fine], k)}


def knobs_summary(bundle) -> str:
    """A plan's choices, readable without the model: what is fused, which domains, layouts,
    forms, lowering, storage, fusion passes, schedules."""
    k = bundle.knobs
    parts = []
    if k.partition:
        parts.append(f"fused {sum(k.partition)}/{len(k.partition)} edges")
    if k.domains:
        parts.append("pre-activations " + ", ".join(f"{d}×{k.domains.count(d)}"
                                                    for d in sorted(set(k.domains))))
    parts.append(f"final {k.final}")
    if k.layouts:
        parts.append("layouts " + "/".join(k.layouts))
    if k.forms:
        parts.append(f"centre/radius {k.forms.count('cr')}/{len(k.forms)}")
    parts += [f"lowering {k.lowering}", f"storage {k.storage}",
              f"Relax fusion {'on' if k.fuse_passes else 'off'}"]
    scheds = sorted({s for _, _, s in bundle.lowering_plan.tasks if s})
    if scheds:
        parts.append("schedules " + "; ".join(",".join(f"{a}={b}" for a, b in s)
                                              for s in scheds))
    return ", ".join(parts)


def report(db, workload: str | None = None, model_name: str | None = None) -> dict[str, Any]:
    """Everything ``boundflow costmodel inspect`` shows, as plain data."""
    from boundflow.search.tuner import COST_MODEL

    summary = db.summary()
    out: dict[str, Any] = {"summary": summary, "held_out": {}, "importance": {},
                           "model": None, "workloads": []}
    stored = db.load_cost_model(model_name or COST_MODEL)
    if stored is not None:
        out["model"] = {"name": stored.name, "feature_version": stored.feature_version,
                        "metrics": stored.metrics, "created": stored.created}
        try:
            model = XGBCostModel.load(stored.blob)
            out["importance"] = {h: model.importance(h) for h in HEADS if h in model.models}
        except Exception as e:                  # noqa: BLE001 - shown, not fatal
            out["model"]["error"] = str(e)
    out["held_out"] = held_out(db)
    out["held_out_split"] = split_name(db)
    for w in db.workloads():
        if workload and not w.key.startswith(workload):
            continue
        entry = {"key": w.key, "method": w.workload.method, "batch": w.workload.batch,
                 "target": w.target, "ops": w.summary.get("ops", {}), "best": {}}
        for objective in ("time@width", "time"):
            best = db.best(w.workload, objective=objective)
            if best is not None:
                m = best.measurement.result
                rec = db.best_plan(w.workload, objective=objective)
                entry["best"][objective] = {
                    "plan": best.candidate.key, "backend": m.backend, "median_ms": m.median_s * 1e3,
                    "mean_width": m.mean_width, "knobs": knobs_summary(best.candidate.bundle()),
                    # against the default verify path measured in the same runner pass
                    "speedup_vs_default": None if rec is None else rec.speedup,
                    "default_ms": None if rec is None or rec.baseline_s is None
                    else rec.baseline_s * 1e3}
        out["workloads"].append(entry)
    return out


def plot(db, path, model_name: str | None = None) -> str:
    """Predicted vs measured log time and the residuals, as a PNG: held-out predictions
    (leave one workload out) where there are two workloads or more, else 5-fold within the
    workload (said in the title). Returns what was plotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X, Y, groups = training_set(db.records_for_training())
    if len(X) == 0:
        raise ValueError("no measurements with features to plot")
    keys = np.unique(groups)
    pred, what = {}, ""
    scale, unit = 1e3, "time (ms)"
    if len(keys) >= 2:             # relative time: each over its workload's median plan
        px = np.full(len(X), np.nan)
        pa = relative(AnalyticModel().predict(X)["log_time"], groups)
        true = relative(Y["log_time"], groups)
        for key in keys:
            test = groups == key
            train = ~test & np.isfinite(Y["log_time"])
            if train.sum() >= MIN_SAMPLES:
                model = XGBCostModel().fit(X[train], {h: v[train] for h, v in Y.items()},
                                           groups[train])
                px[test] = relative(model.predict(X[test])[REL_HEAD], groups[test])
        pred = {"xgboost (held out)": px, "analytic": pa}
        what = "held out by workload"
        scale, unit = 1.0, "time over the workload's median plan"
    else:
        true = Y["log_time"]
        px = np.full(len(X), np.nan)
        ok = np.isfinite(true)
        if ok.sum() >= MIN_SAMPLES:
            px[ok] = out_of_fold(X[ok], true[ok], np.zeros((0, X.shape[1])), np.zeros(0), 5)
        pred = {"xgboost (held out)": px, "analytic": AnalyticModel().predict(X)["log_time"]}
        what = "held out 5-fold within the one workload"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5))
    lo, hi = np.nanmin(true), np.nanmax(true)
    for (name, p), colour in zip(pred.items(), ("tab:blue", "tab:orange")):
        ok = np.isfinite(p)
        a1.scatter(np.exp(true[ok]) * scale, np.exp(p[ok]) * scale, s=12, alpha=0.6,
                   label=name, color=colour)
        a2.hist(p[ok] - true[ok], bins=30, alpha=0.5, label=name, color=colour)
    a1.plot([np.exp(lo) * scale, np.exp(hi) * scale], [np.exp(lo) * scale, np.exp(hi) * scale],
            color="black", lw=0.8, label="prediction = measurement")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel(f"measured {unit}")
    a1.set_ylabel(f"predicted {unit}")
    a1.legend()
    a2.set_xlabel("residual: log predicted - log measured")
    a2.set_ylabel("plans")
    a2.legend()
    fig.suptitle(f"cost model: {len(X)} measured plans, {len(keys)} workloads ({what})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return what
