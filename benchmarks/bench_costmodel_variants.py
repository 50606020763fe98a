"""Which time model ranks unseen workloads best: leave one workload out over a database.

    python benchmarks/bench_costmodel_variants.py --db train.db

Variants, each scored by the Spearman correlation of its predictions with the measured times
of a held-out workload's plans (mean, median and worst over the workloads) and top-5 recall:
the analytic model; XGBoost on absolute log time (the model before issue 18); on the time
relative to the workload's median plan; with the analytic prediction as an input; as a
residual over the analytic model; a pairwise ranking objective (XGBoost ``rank:pairwise``,
the workloads as queries). ``costmodel/model.py`` uses the relative target with the analytic
input. Prints a table; reported, never asserted.
"""

from __future__ import annotations

import argparse

import numpy as np

from boundflow.costmodel.inspect import training_set
from boundflow.costmodel.metrics import spearman
from boundflow.costmodel.model import AnalyticModel, relative
from boundflow.db import Database

PARAMS = dict(objective="reg:squarederror", max_depth=5, eta=0.08, subsample=0.9,
              colsample_bytree=0.9, seed=0, nthread=1, tree_method="hist", verbosity=0)


def _fit_predict(X_train, y_train, X_test, objective=None, qid=None, rounds=300):
    import xgboost as xgb

    params = dict(PARAMS, **({"objective": objective} if objective else {}))
    if qid is not None:
        order = np.argsort(qid, kind="stable")
        data = xgb.DMatrix(X_train[order], label=y_train[order], qid=qid[order])
    else:
        data = xgb.DMatrix(X_train, label=y_train)
    return xgb.train(params, data, num_boost_round=rounds).predict(xgb.DMatrix(X_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    args = parser.parse_args()
    with Database(args.db) as db:
        X, Y, groups = training_set(db.records_for_training())
    y = Y["log_time"]
    ok = np.isfinite(y)
    X, y, groups = X[ok], y[ok], groups[ok]
    keys = np.unique(groups)
    ana = AnalyticModel().predict(X)["log_time"]
    rel, ana_rel = relative(y, groups), relative(ana, groups)
    qid = np.unique(groups, return_inverse=True)[1]
    Xa = np.column_stack([X, ana])
    variants = {
        "analytic": lambda tr, te: ana[te],
        "xgboost, absolute time": lambda tr, te: _fit_predict(X[tr], y[tr], X[te]),
        "xgboost, relative time": lambda tr, te: _fit_predict(X[tr], rel[tr], X[te]),
        "xgboost, relative + analytic input": lambda tr, te: _fit_predict(Xa[tr], rel[tr],
                                                                          Xa[te]),
        "xgboost, residual over analytic": lambda tr, te: ana_rel[te] + _fit_predict(
            Xa[tr], (rel - ana_rel)[tr], Xa[te]),
        "xgboost, pairwise + analytic input": lambda tr, te: -_fit_predict(
            Xa[tr], -rel[tr], Xa[te], "rank:pairwise", qid[tr]),
    }
    print(f"{args.db}: {len(X)} measured plans of {len(keys)} workloads, leave one out")
    print(f"| variant | Spearman mean | median | worst | top-5 recall |")
    print("|---|---:|---:|---:|---:|")
    for name, predict in variants.items():
        sp, top = [], []
        for k in keys:
            te = groups == k
            if te.sum() < 4:
                continue
            pred = predict(~te, te)
            sp.append(spearman(pred, y[te]))
            top.append(len(set(np.argsort(y[te])[:5]) & set(np.argsort(pred)[:5])) / 5)
        print(f"| {name} | {np.nanmean(sp):.3f} | {np.nanmedian(sp):.3f} | "
              f"{np.nanmin(sp):.3f} | {np.mean(top):.2f} |")


if __name__ == "__main__":
    main()
