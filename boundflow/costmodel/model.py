"""Cost models: predict, for feature vectors (``features.py``), three heads: ``log_time``
(log seconds of one run), ``log_width`` (log mean bound width) and ``log_mem`` (log peak
bytes). Lower is better for all three.

``AnalyticModel`` needs no data: time from FLOPs (at a torch rate for the share of tasks that
run as torch ops, a lower one for plain TIR kernels), bytes, and per-task overheads (a torch
op's dispatch, a kernel launch, a callback across the VM, the compiled call) with fixed
machine constants, width from the final method and the CROWN tasks, memory from the
planned bytes. It is the cold-start fallback and the baseline the learned model must beat.
``XGBCostModel`` fits one XGBoost regressor per head on measured records, keeps its data so
``update`` refits on old and new together, and serialises (``save``/``load``) with its feature
version, so a model trained on other features is refused rather than misread. Two things make
it transfer to workloads it never saw:

* the analytic model's log-time prediction is one more input (``analytic_log_time``): the
  trees refine a physically sensible estimate instead of rediscovering FLOPs from scratch;
* given each record's workload (``groups``), two more heads, ``log_rel_time`` and
  ``log_rel_width``, learn time and mean width *relative to the workload's median plan*
  (``log_time - median``). Ranking the plans of one workload, and telling which are as
  tight as its default, needs nothing else, and the targets no longer carry the workload's
  scale, which an unseen workload's features extrapolate badly (the absolute head predicted
  a cluster of 0.05-0.3 ms plans at about 1 ms; the absolute width head took plans with an
  IBP final bound for as tight as the default on unseen workloads). The tuner ranks by
  them; the absolute heads stay for the objectives that need them.
"""

from __future__ import annotations

import json
import math
from typing import Mapping

import numpy as np

from boundflow.costmodel.features import FEATURE_NAMES, FEATURE_VERSION, N_FEATURES
from boundflow.errors import BoundFlowError
from boundflow.measure.result import MeasureResult

HEADS = ("log_time", "log_width", "log_mem")
REL_HEAD = "log_rel_time"      # log time over the workload's median plan (fitted with groups)
REL_WIDTH = "log_rel_width"    # log mean width over the workload's median plan (likewise)
_RELATIVE = {REL_HEAD: "log_time", REL_WIDTH: "log_width"}
MODEL_VERSION = 2              # 2: the analytic prediction as an input, the relative head
_IDX = {n: i for i, n in enumerate(FEATURE_NAMES)}
MIN_SAMPLES = 8        # fewer measured records than this: the analytic model answers
_INPUT_NAMES = (*FEATURE_NAMES, "analytic_log_time")
_XGB_NAMES = [f"f{i}" for i in range(len(_INPUT_NAMES))]   # importance keys map back by index


def relative(log_time: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``log_time`` minus the median of its group's finite values (NaN stays NaN)."""
    y, groups = np.asarray(log_time, np.float64), np.asarray(groups)
    out = np.full(len(y), np.nan)
    for g in np.unique(groups):
        m = groups == g
        fin = m & np.isfinite(y)
        if fin.any():
            out[m] = y[m] - np.median(y[fin])
    return out


def _as_matrix(X) -> np.ndarray:
    X = np.asarray(X, np.float64)
    if X.ndim == 1:
        X = X[None]
    if X.shape[1] != N_FEATURES:
        raise BoundFlowError(f"feature vectors have {X.shape[1]} entries; this BoundFlow's "
                             f"features ({FEATURE_VERSION}) have {N_FEATURES}")
    return X


def targets(result: MeasureResult) -> dict[str, float]:
    """The heads' training targets of one measurement (NaN where unknown)."""
    def log(v):
        return math.log(v) if v is not None and v > 0 and math.isfinite(v) else math.nan
    return {"log_time": log(result.median_s), "log_width": log(result.mean_width),
            "log_mem": log(result.peak_bytes)}


class AnalyticModel:
    """FLOPs + bytes + overheads; no fitting."""

    name = "analytic"
    FLOPS_PER_S = 2e9           # plain TIR kernels
    TORCH_FLOPS_PER_S = 1e10    # torch ops (BLAS, oneDNN)
    BYTES_PER_S = 4e9
    KERNEL_S = 4e-6
    CALLBACK_S = 1.5e-4
    TORCH_TASK_S = 6e-5         # a task's torch ops dispatched from Python
    CALL_S = 3e-5               # entering compiled code (VM call, argument conversion)

    def predict(self, X) -> dict[str, np.ndarray]:
        X = _as_matrix(X)

        def un(col):
            return np.exp2(X[:, _IDX[col]]) - 1.0
        torch_share = X[:, _IDX["torch_fraction"]]
        compiled = X[:, _IDX["backend_compiled"]]
        rate = 1.0 / ((1.0 - torch_share) / self.FLOPS_PER_S
                      + torch_share / self.TORCH_FLOPS_PER_S)
        torch_tasks = np.where(compiled > 0, 0.0, X[:, _IDX["n_tasks"]])
        time = (un("log_flops_batch") / rate + un("log_bytes_batch") / self.BYTES_PER_S
                + X[:, _IDX["n_kernels"]] * self.KERNEL_S
                + X[:, _IDX["n_callbacks"]] * self.CALLBACK_S
                + torch_tasks * self.TORCH_TASK_S + compiled * self.CALL_S)
        width = (-1.0 * X[:, _IDX["final_crown"]] - 1.5 * X[:, _IDX["final_alpha-crown"]]
                 - 0.05 * X[:, _IDX["n_crown_tasks"]] - 0.03 * X[:, _IDX["n_forward_tasks"]])
        mem = np.log(1.0 + un("log_planned_bytes") * np.exp2(X[:, _IDX["log_batch"]]))
        return {"log_time": np.log(np.maximum(time, 1e-9)), "log_width": width, "log_mem": mem}


class XGBCostModel:
    """One XGBoost booster per head (see the module docstring)."""

    name = "xgboost"

    def __init__(self, seed: int = 0, n_estimators: int = 300, max_depth: int = 5,
                 learning_rate: float = 0.08):
        self.rounds = n_estimators
        self.params = dict(objective="reg:squarederror", max_depth=max_depth, eta=learning_rate,
                           subsample=0.9, colsample_bytree=0.9, min_child_weight=1.0,
                           seed=seed, nthread=1, tree_method="hist", verbosity=0)
        self.models: dict = {}
        self.X = np.zeros((0, N_FEATURES))
        self.Y = {h: np.zeros(0) for h in HEADS}
        self.groups: np.ndarray | None = None
        self.fallback = AnalyticModel()

    @property
    def n_samples(self) -> int:
        return len(self.X)

    def _inputs(self, X: np.ndarray) -> np.ndarray:
        """The model's inputs: the features and the analytic model's log-time prediction."""
        return np.column_stack([X, self.fallback.predict(X)["log_time"]])

    def fit(self, X, Y: Mapping[str, np.ndarray], groups=None) -> "XGBCostModel":
        """Fit every head on ``X`` and its targets (rows with a NaN target are left out of
        that head); replaces earlier data. ``groups``: each row's workload, which adds the
        relative-time head."""
        self.X = _as_matrix(X)
        self.Y = {h: np.asarray(Y[h], np.float64) for h in HEADS}
        self.groups = None if groups is None else np.asarray(groups).astype(str)
        if self.groups is not None and len(self.groups) != len(self.X):
            raise BoundFlowError(f"{len(self.groups)} groups for {len(self.X)} rows")
        import xgboost as xgb

        inputs = self._inputs(self.X)
        self.models = {}
        targets = dict(self.Y)
        if self.groups is not None:
            for rel, head in _RELATIVE.items():
                targets[rel] = relative(self.Y[head], self.groups)
        for h, y in targets.items():
            ok = np.isfinite(y)
            if ok.sum() < MIN_SAMPLES:
                continue
            data = xgb.DMatrix(inputs[ok], label=y[ok], feature_names=_XGB_NAMES)
            self.models[h] = xgb.train(self.params, data, num_boost_round=self.rounds)
        return self

    def update(self, X, Y: Mapping[str, np.ndarray], groups=None) -> "XGBCostModel":
        """Refit on the data seen so far plus ``X``, ``Y`` (with ``groups`` when the model
        was fitted with them)."""
        X = _as_matrix(X)
        both = None
        if self.groups is not None and groups is not None:
            both = np.concatenate([self.groups, np.asarray(groups).astype(str)])
        return self.fit(np.concatenate([self.X, X]),
                        {h: np.concatenate([self.Y[h], np.asarray(Y[h], np.float64)])
                         for h in HEADS}, both)

    def predict(self, X) -> dict[str, np.ndarray]:
        """Every head (the analytic model's where a head is not fitted); ``log_rel_time``
        only when fitted."""
        X = _as_matrix(X)
        base = self.fallback.predict(X)
        if not self.models:
            return base
        import xgboost as xgb

        data = xgb.DMatrix(self._inputs(X), feature_names=_XGB_NAMES)
        out = {h: (self.models[h].predict(data).astype(np.float64) if h in self.models
                   else base[h]) for h in HEADS}
        for rel in _RELATIVE:
            if rel in self.models:
                out[rel] = self.models[rel].predict(data).astype(np.float64)
        return out

    def importance(self, head: str = "log_time") -> dict[str, float]:
        """Gain per feature name of one head (empty before it is fitted)."""
        m = self.models.get(head)
        if m is None:
            return {}
        gain = m.get_score(importance_type="gain")
        return dict(sorted(((_INPUT_NAMES[int(k[1:])], float(v)) for k, v in gain.items()),
                           key=lambda kv: -kv[1]))

    def save(self) -> bytes:
        heads = {}
        for h, m in self.models.items():
            heads[h] = bytes(m.save_raw("json")).decode()
        return json.dumps({"feature_version": FEATURE_VERSION, "params": self.params,
                           "rounds": self.rounds, "model_version": MODEL_VERSION,
                           "groups": None if self.groups is None else self.groups.tolist(),
                           "heads": heads, "X": self.X.tolist(),
                           "Y": {h: [None if not math.isfinite(v) else v for v in self.Y[h]]
                                 for h in HEADS}}).encode()

    @classmethod
    def load(cls, blob: bytes) -> "XGBCostModel":
        import xgboost as xgb

        try:
            d = json.loads(bytes(blob).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BoundFlowError(f"not a saved cost model: {e}") from None
        if d.get("feature_version") != FEATURE_VERSION:
            raise BoundFlowError(f"the cost model was trained on {d.get('feature_version')!r}; "
                                 f"this BoundFlow computes {FEATURE_VERSION!r}: retrain it")
        if d.get("model_version") != MODEL_VERSION:
            raise BoundFlowError(f"the cost model is of version {d.get('model_version', 1)}; "
                                 f"this BoundFlow's is {MODEL_VERSION}: retrain it")
        model = cls()
        model.params, model.rounds = d["params"], int(d.get("rounds", model.rounds))
        groups = d.get("groups")
        model.groups = None if groups is None else np.asarray(groups, str)
        model.X = np.asarray(d["X"], np.float64).reshape(-1, N_FEATURES)
        model.Y = {h: np.asarray([math.nan if v is None else v for v in d["Y"][h]], np.float64)
                   for h in HEADS}
        for h, raw in d["heads"].items():
            booster = xgb.Booster()
            booster.load_model(bytearray(raw.encode()))
            model.models[h] = booster
        return model
