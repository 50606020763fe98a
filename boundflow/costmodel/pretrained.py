"""The cost model shipped with BoundFlow: a training set the project measured, and the model
fitted on it, so that a fresh tuning database does not start cold.

``data/pretrained.json.gz`` holds the training set (every record's feature vector, its
measured heads and its workload) with how it was made (the command, the machine, the
date). The model is that set fitted deterministically (:class:`XGBCostModel`, seed 0), once
per process on first use: shipping the data rather than the boosters keeps the file small
(the trees of four heads are several MB of JSON) and lets the tuner refit on the shipped
data and a workload's own measurements together (transfer, not replacement).

Rebuild both with ``python tools/costmodel_dataset.py --db train.db`` and
``boundflow costmodel train --db train.db`` (which writes this file). The file is data read
with ``json`` only; one whose feature or model version differs from this BoundFlow's is
ignored with a log line (the tuner then starts from the analytic model, as before).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from boundflow.costmodel.features import FEATURE_VERSION, N_FEATURES
from boundflow.costmodel.model import HEADS, MODEL_VERSION, XGBCostModel
from boundflow.errors import BoundFlowError

log = logging.getLogger("boundflow.costmodel")

PATH = Path(__file__).with_name("data") / "pretrained.json.gz"
MAX_BYTES = 64 << 20          # a larger file is refused unread


@dataclass(frozen=True)
class TrainingSet:
    X: np.ndarray                  # [n, N_FEATURES]
    Y: dict[str, np.ndarray]       # per head, [n] (NaN where unknown)
    groups: np.ndarray             # [n] workload keys
    about: dict                    # how it was made

    @property
    def n_workloads(self) -> int:
        return len(np.unique(self.groups))


def save(path: Path, X: np.ndarray, Y: dict[str, np.ndarray], groups: np.ndarray,
         about: dict) -> None:
    """Write a training set (gzip JSON)."""
    doc = {"feature_version": FEATURE_VERSION, "model_version": MODEL_VERSION,
           "about": about, "X": np.round(np.asarray(X, np.float64), 6).tolist(),
           "Y": {h: [None if not math.isfinite(v) else round(float(v), 6) for v in Y[h]]
                 for h in HEADS},
           "groups": [str(g) for g in groups]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(doc, f, separators=(",", ":"))
    tmp.replace(path)


def read(path: Path = PATH) -> TrainingSet:
    """The training set at ``path``; :class:`BoundFlowError` naming what is wrong."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise BoundFlowError(f"{path}: larger than {MAX_BYTES >> 20} MiB")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BoundFlowError(f"{path}: not a cost-model training set ({e})") from None
    if not isinstance(doc, dict):
        raise BoundFlowError(f"{path}: not a cost-model training set")
    if doc.get("feature_version") != FEATURE_VERSION or \
            doc.get("model_version") != MODEL_VERSION:
        raise BoundFlowError(f"{path}: made for features {doc.get('feature_version')!r}, "
                             f"model {doc.get('model_version')!r}; this BoundFlow has "
                             f"{FEATURE_VERSION!r}, {MODEL_VERSION}: rebuild it")
    try:
        X = np.asarray(doc["X"], np.float64).reshape(-1, N_FEATURES)
        Y = {h: np.asarray([math.nan if v is None else float(v) for v in doc["Y"][h]],
                           np.float64) for h in HEADS}
        groups = np.asarray([str(g) for g in doc["groups"]])
    except (KeyError, TypeError, ValueError) as e:
        raise BoundFlowError(f"{path}: malformed training set ({e})") from None
    if any(len(v) != len(X) for v in Y.values()) or len(groups) != len(X) or \
            not np.isfinite(X).all():
        raise BoundFlowError(f"{path}: malformed training set (lengths or values)")
    return TrainingSet(X, Y, groups, dict(doc.get("about") or {}))


_CACHE: dict[str, object] = {}


def training_set() -> TrainingSet | None:
    """The shipped training set, or None (absent, or of another version: said once)."""
    if "data" not in _CACHE:
        data = None
        if PATH.exists():
            try:
                data = read(PATH)
            except BoundFlowError as e:
                log.warning("the shipped cost model is not used: %s", e)
        _CACHE["data"] = data
    return _CACHE["data"]           # type: ignore[return-value]


def model() -> XGBCostModel | None:
    """The shipped model (fitted on first use), or None."""
    if "model" not in _CACHE:
        data = training_set()
        _CACHE["model"] = None if data is None else \
            XGBCostModel(seed=0, n_estimators=120, learning_rate=0.15).fit(
                data.X, data.Y, data.groups)
    return _CACHE["model"]          # type: ignore[return-value]
