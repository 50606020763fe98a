"""The tuner ranks a workload's plans with XGBoost or the analytic model, whichever ranks the
workload's own measured plans better, held out (k-fold)."""

from __future__ import annotations

import numpy as np

from boundflow.costmodel import FEATURE_NAMES, AnalyticModel, Chosen, XGBCostModel, choose
from boundflow.costmodel.select import MIN_OWN

IDX = {k: i for i, k in enumerate(FEATURE_NAMES)}


def _points(n, seed):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, (n, len(FEATURE_NAMES)))
    X[:, IDX["log_flops_batch"]] = rng.uniform(10, 30, n)
    X[:, IDX["n_kernels"]] = rng.integers(1, 12, n)
    return X


def test_analytic_is_chosen_where_xgboost_ranks_the_workload_worse():
    """The workload's times follow the analytic model exactly; the other workloads in the
    database teach XGBoost the opposite relation: held out, XGBoost ranks the workload's
    plans backwards, so the analytic model ranks them."""
    own, rest = _points(24, 0), _points(200, 1)
    y_own = AnalyticModel().predict(own)["log_time"]
    y_rest = -AnalyticModel().predict(rest)["log_time"]
    c = choose(own, y_own, rest, y_rest, folds=4)
    assert c.model == "analytic" and c.n == 24 and c.folds == 4
    assert c.analytic_spearman > 0.99 and c.xgboost_spearman < c.analytic_spearman
    # and the tuner's predictions then rank time with it (other heads stay XGBoost's)
    model = XGBCostModel(n_estimators=20).fit(rest, {"log_time": y_rest,
                                                     "log_width": rest[:, 0],
                                                     "log_mem": rest[:, 1]})
    heads = Chosen(model, c).predict(own)
    np.testing.assert_allclose(heads["log_time"], y_own)
    np.testing.assert_allclose(heads["log_width"], model.predict(own)["log_width"])


def test_xgboost_is_chosen_where_it_ranks_better_and_too_little_data_keeps_the_default():
    """Times that depend on what the analytic model ignores (storage reuse, the NHWC
    fraction): XGBoost learns them from the workload's own other folds."""
    own = _points(60, 2)
    y = 3.0 * own[:, IDX["storage_reuse"]] - 2.0 * own[:, IDX["nhwc_fraction"]]
    c = choose(own, y, folds=4)
    assert c.model == "xgboost" and c.xgboost_spearman > 0.8 > c.analytic_spearman
    few = choose(own[:MIN_OWN - 1], y[:MIN_OWN - 1])
    assert few.model == "xgboost" and few.n == 0 and "too few" in few.describe()
