"""The tuner's cost model: XGBoost fitted on the tuning database, with the analytic model
ranking instead wherever XGBoost ranks the workload's own measured plans worse (held out, see
:mod:`boundflow.costmodel.select`).

Features are a plan's own (stored with the candidate in the database, so one model learns
across workloads) joined with the backend it runs on (``costmodel.features.with_backend``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from boundflow.costmodel.features import FEATURE_VERSION, N_PLAN_FEATURES, plan_features, \
    with_backend
from boundflow.costmodel.model import HEADS, XGBCostModel, targets
from boundflow.costmodel import pretrained
from boundflow.costmodel.select import Choice, Chosen, choose
from boundflow.errors import BoundFlowError
from boundflow.ir.graph import Graph
from boundflow.ir.knobs import Knobs
from boundflow.ir.plan import PlanBundle
from boundflow.ir.workload import Workload

COST_MODEL = "xgb-cost-model"
MAX_OTHER = 400          # records of other workloads a refit trains on (the newest)
MAX_SHIPPED = 256        # rows of the shipped training set a refit trains on (a fixed sample)
MAX_CHOOSE_REST = 192    # other rows beside the workload's own when choosing the model


class Ranker:
    """``features`` / ``predict`` / ``refit`` for one workload (``graph``: its model, as
    planned; features are computed on the normalised graph, ``self.graph``). ``choice`` says
    which model ranks the time head, and on what evidence."""

    def __init__(self, graph: Graph, workload: Workload, seed: int = 0,
                 n_estimators: int = 120, learning_rate: float = 0.15,
                 use_pretrained: bool = True):
        from boundflow.planner import normalised

        self.source, self.graph = graph, normalised(graph)[0]
        self.workload, self.seed = workload, seed
        self._fresh = lambda: XGBCostModel(seed=seed, n_estimators=n_estimators,  # noqa: E731
                                           learning_rate=learning_rate)
        self.model = self._fresh()
        self.choice = Choice("xgboost")
        # the shipped training set (pretrained.py): the model starts from it, and every
        # refit trains on it beside the database's records (transfer, not replacement)
        self.shipped = pretrained.training_set() if use_pretrained else None
        # a refit trains on a fixed sample of it, so that a round's refit stays cheap (the
        # model the ranker starts from was fitted on all of it)
        self._shipped_rows = None if self.shipped is None else np.sort(
            np.random.default_rng(seed).permutation(len(self.shipped.X))[:MAX_SHIPPED])
        self._shared = False              # the model is the shipped one, shared: never refit
        if self.shipped is not None and (shipped := pretrained.model()) is not None:
            self.model, self._shared = shipped, True
        self._plan_features: dict[str, np.ndarray] = {}
        self._own_seen = -1
        self._refeatured = False

    def plan_features(self, bundle: PlanBundle) -> np.ndarray:
        hit = self._plan_features.get(bundle.key)
        if hit is None:
            if len(self._plan_features) > 20000:
                self._plan_features.clear()
            hit = self._plan_features[bundle.key] = plan_features(bundle, self.graph)
        return hit

    def features(self, candidates: Sequence[tuple[PlanBundle, str]]) -> np.ndarray:
        """Full feature vectors of (plan, backend) candidates."""
        return np.stack([with_backend(self.plan_features(b), backend)
                         for b, backend in candidates])

    def predict(self, X) -> dict[str, np.ndarray]:
        return Chosen(self.model, self.choice).predict(X)

    def refeature(self, db) -> int:
        """Give this workload's candidates whose stored features are missing or of another
        feature version (an older BoundFlow wrote them) this version's, written back to the
        database; returns how many. Each plan is re-planned from its stored knobs (never
        read as a plan) and skipped where that does not give the stored plan key."""
        from boundflow.planner import plan

        done = 0
        for c in db.candidates(self.workload):
            if c.features is not None and len(c.features) == N_PLAN_FEATURES:
                continue
            try:
                bundle = plan(self.source, self.workload, Knobs.from_json(c.knobs))
            except BoundFlowError:
                continue
            if bundle.key == c.key:
                db.add_candidate(bundle, self.plan_features(bundle))
                done += 1
        return done

    def refit(self, db) -> dict:
        """Fit on this workload's records and the newest ``MAX_OTHER`` of the others that
        have plan features of this version; saved into the database. Then, when the workload
        has new measured plans, choose the model that ranks them better (held out). The
        workload's own records of an older feature version are brought up to this one
        first (``refeature``), once per ranker."""
        if not self._refeatured:
            self._refeatured = True
            self.refeature(db)
        records = [r for r in db.records_for_training()
                   if r.candidate.features is not None
                   and len(r.candidate.features) == N_PLAN_FEATURES]
        own = [r for r in records if r.workload.key == self.workload.key]
        other = [r for r in records if r.workload.key != self.workload.key][-MAX_OTHER:]
        if not own and not other:
            return {}
        if self._shared:                         # refit a model of its own
            self.model, self._shared = self._fresh(), False

        def matrix(recs):
            if not recs:
                return np.zeros((0, N_PLAN_FEATURES + 2)), {h: np.zeros(0) for h in HEADS}
            X = np.stack([with_backend(r.candidate.features, r.measurement.result.backend)
                          for r in recs])
            Y = {h: np.array([targets(r.measurement.result)[h] for r in recs]) for h in HEADS}
            return X, Y
        Xo, Yo = matrix(own)
        Xr, Yr = matrix(other)
        gr = np.array([r.workload.key for r in other], str)
        if self.shipped is not None:
            rows = self._shipped_rows[self.shipped.groups[self._shipped_rows]
                                      != self.workload.key]
            Xr = np.concatenate([Xr, self.shipped.X[rows]])
            Yr = {h: np.concatenate([Yr[h], self.shipped.Y[h][rows]]) for h in HEADS}
            gr = np.concatenate([gr, np.char.add("shipped:", self.shipped.groups[rows])])
        X = np.concatenate([Xo, Xr])
        groups = np.concatenate([np.array([self.workload.key] * len(own), str), gr])
        self.model.fit(X, {h: np.concatenate([Yo[h], Yr[h]]) for h in HEADS}, groups)
        metrics = {"n_train": len(X), "heads": sorted(self.model.models)}
        db.save_cost_model(COST_MODEL, self.model.save(), FEATURE_VERSION, metrics)
        if len(own) != self._own_seen:
            self._own_seen = len(own)
            few = np.random.default_rng(self.seed).permutation(len(Xr))[:MAX_CHOOSE_REST]
            self.choice = choose(Xo, Yo["log_time"], Xr[few], Yr["log_time"][few], folds=4,
                                 seed=self.seed, groups_rest=gr[few])
        metrics["ranking"] = self.choice.model
        return metrics
