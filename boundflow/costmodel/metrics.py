"""Ranking metrics of a cost model against measurements (numpy only)."""

from __future__ import annotations

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):
        same = x == v
        if same.sum() > 1:
            ranks[same] = ranks[same].mean()
    return ranks


def spearman(pred, true) -> float:
    """Spearman rank correlation (NaN with fewer than 3 points or a constant side)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if len(pred) < 3:
        return float("nan")
    a, b = _ranks(pred), _ranks(true)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def kendall(pred, true) -> float:
    """Kendall's tau-b."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    n = len(pred)
    if n < 3:
        return float("nan")
    dp = np.sign(pred[:, None] - pred[None, :])
    dt = np.sign(true[:, None] - true[None, :])
    iu = np.triu_indices(n, 1)
    dp, dt = dp[iu], dt[iu]
    denom = np.sqrt((dp != 0).sum() * (dt != 0).sum())
    return float((dp * dt).sum() / denom) if denom else float("nan")


def top_k_recall(pred, true, k: int = 5) -> float:
    """Of the ``k`` truly fastest (smallest ``true``), the fraction among the ``k`` predicted
    fastest."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    k = min(k, len(true))
    if k == 0:
        return float("nan")
    return len(set(np.argsort(pred)[:k]) & set(np.argsort(true)[:k])) / k


def mape(pred_log, true_log) -> float:
    """Mean absolute percentage error of times predicted in log space."""
    p, t = np.exp(np.asarray(pred_log, np.float64)), np.exp(np.asarray(true_log, np.float64))
    return float(np.mean(np.abs(p - t) / t))


def evaluate(pred_log_time, true_log_time, groups=None, k: int = 5) -> dict[str, float]:
    """Spearman, Kendall and top-k recall within each group (a workload: ranking plans of one
    workload is what search needs), averaged over groups with at least 3 points; MAPE over
    all."""
    pred, true = np.asarray(pred_log_time), np.asarray(true_log_time)
    groups = np.zeros(len(pred), int) if groups is None else np.asarray(groups)
    per = {"spearman": [], "kendall": [], "top_k_recall": []}
    for g in np.unique(groups):
        m = groups == g
        if m.sum() < 3:
            continue
        per["spearman"].append(spearman(pred[m], true[m]))
        per["kendall"].append(kendall(pred[m], true[m]))
        per["top_k_recall"].append(top_k_recall(pred[m], true[m], k))
    out = {name: float(np.nanmean(v)) if v and not np.all(np.isnan(v)) else float("nan")
           for name, v in per.items()}
    out["mape"] = mape(pred, true) if len(pred) else float("nan")
    out["n"] = int(len(pred))
    out["groups"] = int(len(np.unique(groups)))
    return out
