"""Which model ranks a workload's plans: XGBoost or the analytic baseline, decided on the
workload's own measurements, held out.

The tuner's search needs a *ranking* of the plans of one workload. XGBoost learns it from the
database; the analytic model needs no data. Early in a run, or on a workload unlike anything
in the database, XGBoost can rank worse than the analytic model, and then it would steer the
search away from the plans worth measuring. :func:`choose` measures both on the workload's own
points: ``k``-fold, each fold predicted by an XGBoost model trained on every other record
(other workloads and the other folds), Spearman correlation of the held-out predictions with
the measured times against the analytic model's on the same points. :class:`Chosen` then
answers with the better model's time head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from boundflow.costmodel.metrics import spearman
from boundflow.costmodel.model import HEADS, REL_HEAD, REL_WIDTH, AnalyticModel, \
    XGBCostModel

MIN_OWN = 6          # fewer measured plans of the workload than this: nothing to judge on


@dataclass(frozen=True)
class Choice:
    """The model chosen for ranking (``xgboost`` or ``analytic``), with the held-out Spearman
    correlations it was chosen on (NaN when not computed) and the points they used."""

    model: str
    xgboost_spearman: float = math.nan
    analytic_spearman: float = math.nan
    n: int = 0
    folds: int = 0

    def describe(self) -> str:
        if not self.n:
            return f"{self.model} (too few measured plans of the workload to compare)"
        return (f"{self.model} (held-out Spearman over {self.n} plans, {self.folds}-fold: "
                f"xgboost {self.xgboost_spearman:.3f}, analytic {self.analytic_spearman:.3f})")


_OWN = "\0own"          # the group of the workload's own points


def out_of_fold(X_own: np.ndarray, y_own: np.ndarray, X_rest: np.ndarray, y_rest: np.ndarray,
                folds: int = 5, seed: int = 0, rounds: int = 100,
                groups_rest: np.ndarray | None = None) -> np.ndarray:
    """XGBoost's held-out log-time predictions of the ``X_own`` points: each fold predicted
    by a model trained on ``X_rest`` and the other folds (NaN where a fold had too little
    training data). With ``groups_rest`` (the workloads of the ``X_rest`` points) the
    predictions are the relative-time head's (for ranking within the workload)."""
    n = len(X_own)
    folds = max(2, min(folds, n))
    order = np.random.default_rng(seed).permutation(n)
    pred = np.full(n, np.nan)
    head = REL_HEAD if groups_rest is not None else "log_time"
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(np.arange(n), test)
        X = np.concatenate([X_rest, X_own[train]])
        y = np.concatenate([y_rest, y_own[train]])
        ok = np.isfinite(y)
        nan = np.full(int(ok.sum()), np.nan)
        groups = None if groups_rest is None else np.concatenate(
            [np.asarray(groups_rest).astype(str), np.full(len(train), _OWN)])[ok]
        model = XGBCostModel(seed=seed, n_estimators=rounds).fit(
            X[ok], {"log_time": y[ok], **{h: nan for h in HEADS if h != "log_time"}}, groups)
        if head in model.models:
            pred[test] = model.predict(X_own[test])[head]
    return pred


def choose(X_own: np.ndarray, y_own: np.ndarray, X_rest: np.ndarray | None = None,
           y_rest: np.ndarray | None = None, folds: int = 5, seed: int = 0,
           default: str = "xgboost", groups_rest: np.ndarray | None = None) -> Choice:
    """The model that ranks the workload's measured plans (``X_own``, log times ``y_own``)
    better, held out (see the module docstring); ``default`` when there are fewer than
    ``MIN_OWN`` of them. A tie, or an XGBoost ranking that could not be computed, goes to
    the analytic model (it needs no data to be right)."""
    X_own, y_own = np.asarray(X_own, np.float64), np.asarray(y_own, np.float64)
    keep = np.isfinite(y_own)
    X_own, y_own = X_own[keep], y_own[keep]
    if len(y_own) < MIN_OWN:
        return Choice(default)
    n_feat = X_own.shape[1]
    X_rest = np.zeros((0, n_feat)) if X_rest is None else np.asarray(X_rest, np.float64)
    y_rest = np.zeros(0) if y_rest is None else np.asarray(y_rest, np.float64)
    k = max(2, min(folds, len(y_own)))
    if groups_rest is not None and len(groups_rest) != len(y_rest):
        groups_rest = None
    pred = out_of_fold(X_own, y_own, X_rest, y_rest, k, seed,
                       groups_rest=None if groups_rest is None else np.asarray(groups_rest))
    ok = np.isfinite(pred)
    s_xgb = spearman(pred[ok], y_own[ok]) if ok.sum() >= 3 else math.nan
    s_ana = spearman(AnalyticModel().predict(X_own)["log_time"], y_own)
    better = "xgboost" if math.isfinite(s_xgb) and (not math.isfinite(s_ana) or s_xgb > s_ana) \
        else "analytic"
    return Choice(better, float(s_xgb), float(s_ana), int(len(y_own)), k)


class Chosen:
    """A cost model that predicts every head with ``model`` except the time head, which comes
    from the analytic model when ``choice`` says so."""

    def __init__(self, model: XGBCostModel, choice: Choice):
        self.model, self.choice = model, choice
        self.analytic = AnalyticModel()

    @property
    def name(self) -> str:
        return self.choice.model

    def predict(self, X) -> dict[str, np.ndarray]:
        """The heads, for ranking the plans of one workload: ``log_time`` is the analytic
        model's when it was chosen, else the relative-time head where fitted (its offset
        from the absolute time is the same for every plan of a workload); ``log_width`` is
        the relative-width head where fitted (compared with the default plan's prediction
        by the same head)."""
        heads = self.model.predict(X)
        if REL_WIDTH in heads:                  # tightness against the default, likewise
            heads = dict(heads, log_width=heads[REL_WIDTH])
        if self.choice.model == "analytic":
            heads = dict(heads, log_time=self.analytic.predict(X)["log_time"])
        elif REL_HEAD in heads:
            heads = dict(heads, log_time=heads[REL_HEAD])
        return heads
