"""A compiled verifier: a model bound to one query shape, planned, looked up and compiled once,
then called many times (what a loop over inputs, or branch-and-bound, wants).

>>> v = bf.compile(model, x[:1], batch=8, method="crown")          # plans (and compiles) once
>>> v.bounds(x, eps=0.01).lower                                      # runs the plan
>>> v.verify(x, eps=0.01, labels=y).verified

``compile`` looks the tuned plan up in ``db`` when given (and keeps the default plan when the
database has none, or has one no faster than the default); the plan then runs on the backend
it was tuned on. A call checks its inputs and runs the executor: nothing is planned, read or
compiled again. It bounds the model as it was when compiled (a torch module's graph is traced
then): after changing the module's weights or layers, compile again (``compute_bounds`` and
``verify`` notice such changes themselves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from boundflow.api import (BoundOptions, Bounds, VerifyResult, _finite, _linear_spec, as_graph,
                           default_plan, executor, input_spec, lookup_tuned)
from boundflow.backend import run_bounds
from boundflow.domains.alpha import AlphaConfig
from boundflow.errors import BoundFlowError, ShapeError, SpecError
from boundflow.ir.graph import Graph
from boundflow.ir.plan import PlanBundle
from boundflow.ir.spec import InputSpec, LinearSpec, margin_spec, proven
from boundflow.ir.workload import Workload


@dataclass(eq=False)
class Verifier:
    """``graph`` under ``plan`` on ``backend``; see the module docstring. Build it with
    :func:`compile`."""

    graph: Graph
    workload: Workload
    plan: PlanBundle
    backend: str
    tuned: Any = None               # the TunedPlan in use, when compiled with a database

    def __post_init__(self):
        self._executor = executor(self.plan, self.graph, self.backend, self.workload.target)
        self._n_out = math.prod(self.graph.output_shape)

    @property
    def method(self) -> str:
        return self.plan.workload.method

    def run(self, box: InputSpec, C: LinearSpec | None = None, upper: bool = True,
            split: Any = None) -> Bounds:
        """Bounds over a checked box (and spec): the call with nothing around it.
        ``upper=False`` (a caller that reads the lower bounds only): alpha-CROWN tightens
        the lower side only, and the upper bounds are never looser than CROWN's. ``split``:
        a branch-and-bound state (:class:`~boundflow.ir.split.ReluSplit`; its ``goal``
        lets alpha-CROWN stop optimising the domains it has proven, on the torch backend),
        passed on where the executor's ``run`` takes it."""
        return self.run_keeping(box, C, (), upper, split)[0]

    def run_keeping(self, box: InputSpec, C: LinearSpec | None, nodes: Sequence[str],
                    upper: bool = True, split: Any = None) -> tuple[Bounds, dict]:
        """:meth:`run`, and the bounds (Intervals) the run wrote for ``nodes``, by node:
        where the backend returns them (the torch backend's; empty from one that does not)."""
        options = {} if split is None else {"split": split}
        if nodes:
            options["keep"] = tuple(nodes)
        out = run_bounds(self._executor, box, C, upper, **options)
        stats = getattr(out, "stats", None)
        kept = stats.get("bounds", {}) if nodes and isinstance(stats, dict) else {}
        return _finite(Bounds(out.lower, out.upper)), kept

    def bounds(self, x: Any, eps: Any = None, C: Any = None,
               clip: tuple[float, float] | None = None) -> Bounds:
        """Bounds of the output (or of ``C·y``) over ``x`` (an :class:`InputSpec`, or centres
        with ``eps``, clipped to ``clip``)."""
        box = self._box(x, eps, clip)
        return self.run(box, self._spec(_linear_spec(C), box.batch))

    def verify(self, x: Any, eps: Any = None, labels: Sequence[int] | None = None,
               C: Any = None, threshold: Any = 0.0,
               clip: tuple[float, float] | None = None) -> VerifyResult:
        """Per-spec verdicts of ``C·y > threshold`` (by default the margin spec of
        ``labels``, which a compiled verifier needs: it does not run the model to guess
        them)."""
        box = self._box(x, eps, clip)
        if C is None:
            if labels is None:
                raise SpecError("give labels (the margin spec) or C to a compiled verifier")
            linear = margin_spec(np.repeat(labels, box.batch) if np.ndim(labels) == 0
                                 or len(labels) == 1 else labels, self._n_out)
            if np.any(np.asarray(threshold) != 0):
                linear = LinearSpec(linear.C, threshold)
        else:
            linear = _linear_spec(C, threshold)
            labels = None
        bounds = self.run(box, self._spec(linear, box.batch), upper=False)
        ok = proven(bounds.lower.detach().cpu().numpy(), linear.threshold)
        return VerifyResult(bounds, linear.threshold, np.where(ok, "verified", "unknown"),
                            None if labels is None else np.asarray(labels).reshape(-1),
                            self.method, self.tuned)

    def _box(self, x: Any, eps: Any, clip) -> InputSpec:
        box = input_spec(x, eps, clip)
        if box.sample_shape != self.graph.input_shape:
            raise ShapeError(f"input of shape {list(box.lower.shape)} does not fit the model, "
                             f"which takes [batch, {', '.join(map(str, self.graph.input_shape))}]")
        return box

    def _spec(self, C: LinearSpec | None, batch: int) -> LinearSpec | None:
        n = self.workload.n_specs
        if (C is None) != (n == 0) or (C is not None and C.n_specs != n):
            raise SpecError(f"this verifier was compiled for {n} specs per sample; give C of "
                            f"shape [batch, {n}, {self._n_out}]" if n else
                            "this verifier was compiled for raw output bounds (n_specs=0); "
                            "give no C")
        if C is not None:
            C.check(batch, self._n_out)
        return C


def compile(model: Any, sample: Any = None, *, batch: int = 1, n_specs: int | None = None,
            method: str = "crown", dtype: str | None = None, db: Any = None,
            objective: str = "time@width", backend: str = "torch", target: str = "llvm",
            lower_slope: str = "adaptive", alpha: AlphaConfig | None = None,
            sparse: bool | None = None, bounds: str | None = None) -> Verifier:
    """A :class:`Verifier` of ``model`` (a Graph, an ExportedProgram, or an ``nn.Module``
    traced at ``sample``) for queries of ``batch`` samples and ``n_specs`` specs each (default:
    a margin spec, one row per other class; 0 for raw output bounds) by ``method``.

    With ``db`` (a tuning database's path, URL or :class:`~boundflow.db.Database`) the plan
    ``boundflow tune`` recorded for this workload under ``objective`` runs, on the backend it
    was tuned on; otherwise (or when the database has no plan faster than the default path)
    the default plan runs on ``backend``. ``bounds``: the query the plan is looked up for,
    ``"lower"`` (:meth:`Verifier.verify`'s, the one ``boundflow tune`` tunes for; the default
    with specs) or ``"both"`` (:meth:`Verifier.run` reading both sides; the default for raw
    output bounds, ``n_specs=0``); either plan runs either query.
    """
    import torch

    if sample is not None and not isinstance(sample, torch.Tensor):
        sample = torch.as_tensor(np.asarray(sample, dtype=np.float32))
    graph = as_graph(model, sample)
    if not isinstance(batch, int) or batch < 1:
        raise BoundFlowError(f"batch must be an integer >= 1, got {batch!r}")
    options = BoundOptions(method, None, lower_slope, alpha, sparse, backend, target)
    work = Workload.of(graph, batch=batch, n_specs=n_specs, method=method, dtype=dtype,
                       target=target,
                       bounds=("both" if n_specs == 0 else "lower") if bounds is None else bounds)
    tuned = lookup_tuned(graph, work, db, objective) if db is not None else None
    if tuned is not None:
        return Verifier(graph, work, tuned.bundle, tuned.backend, tuned)
    return Verifier(graph, work, default_plan(graph, work, options), backend)
