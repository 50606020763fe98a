"""The public entry points: ``compute_bounds`` and ``verify``.

Both take a model (an ``ir.Graph``, a ``torch.nn.Module`` or a ``torch.export``
``ExportedProgram``), an input region (an :class:`InputSpec`, or a batch of centres with
``eps``) and optionally a linear output spec ``C``; they check everything at the edge and
raise a :class:`BoundFlowError` subclass naming the problem.
"""

from __future__ import annotations

import math
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from boundflow.domains.alpha import AlphaConfig
from boundflow.domains.concrete import evaluate
from boundflow.domains.crown import LOWER_SLOPES
from boundflow.errors import BoundFlowError, ShapeError, SpecError
from boundflow.frontend.module_state import Snapshot, own_dtype
from boundflow.frontend.torch import from_exported, from_torch
from boundflow import backend as backends
from boundflow.ir.domain_plan import METHODS, DomainPlan
from boundflow.ir.plan import PlanBundle
from boundflow.ir.graph import Graph
from boundflow.ir.spec import InputSpec, LinearSpec, margin_spec, proven

log = logging.getLogger("boundflow")

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True, eq=False)
class Bounds:
    """Certified bounds: ``lower <= f <= upper`` for every input in the box, where ``f`` is the
    model output ``[batch, *out]`` or, with a spec, ``C·y`` of shape ``[batch, n_specs]``."""

    lower: torch.Tensor
    upper: torch.Tensor

    @property
    def width(self) -> torch.Tensor:
        return self.upper - self.lower


@dataclass(frozen=True, eq=False)
class VerifyResult:
    """Per-spec verdicts: ``verified`` where the lower bound of ``C·y`` exceeds the threshold,
    ``unknown`` otherwise (bound propagation alone never proves a property false)."""

    bounds: Bounds
    threshold: np.ndarray          # [batch, n_specs]
    verdicts: np.ndarray           # [batch, n_specs] of "verified" / "unknown"
    labels: np.ndarray | None      # [batch], when the spec is a margin spec
    method: str
    tuned: Any = None              # the TunedPlan used, when verify was given a db and found one

    @property
    def verified(self) -> np.ndarray:
        """Per sample: every spec verified."""
        return np.all(self.verdicts == "verified", axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "labels": None if self.labels is None else self.labels.tolist(),
            "verified": self.verified.tolist(),
            "verdicts": self.verdicts.tolist(),
            "lower": self.bounds.lower.tolist(),
            "upper": self.bounds.upper.tolist(),
            "threshold": self.threshold.tolist(),
        }


_TRACED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def as_graph(model: Any, sample: torch.Tensor | None = None) -> Graph:
    """The IR graph of ``model``. A module is traced on ``sample`` once and re-traced only
    when its input shape or dtype or the module changes: a submodule, a hook, a setting or a
    weight (:class:`~boundflow.frontend.module_state.Snapshot`)."""
    if isinstance(model, Graph):
        return model
    if isinstance(model, torch.export.ExportedProgram):
        return from_exported(model)
    if isinstance(model, torch.nn.Module):
        if sample is None:
            raise BoundFlowError("tracing a torch module needs an input to trace it on")
        return _traced(model, tuple(sample.shape[1:]), sample.dtype, lambda: sample)
    raise BoundFlowError(f"model must be a boundflow Graph, a torch.nn.Module or an "
                         f"ExportedProgram, got {type(model).__name__}")


def _traced(module: torch.nn.Module, sample_shape: tuple, dtype: torch.dtype | None,
            sample: Any) -> Graph:
    """The cached trace of ``module`` on samples of ``sample_shape`` and ``dtype`` (None:
    the module's own precision), traced anew on ``sample()`` (a ``[1, *sample_shape]``
    array or tensor) when there is none or the module changed since (see
    :class:`~boundflow.frontend.module_state.Snapshot`)."""
    cached = _TRACED.get(module)
    if cached is not None and cached[2].matches(module):
        if cached[0] == sample_shape and cached[1] == (dtype or cached[2].dtype):
            return cached[3]
    dtype = dtype or own_dtype(module)
    graph = from_torch(module, torch.as_tensor(sample()).to(dtype))
    _TRACED[module] = (sample_shape, dtype, Snapshot(module), graph)
    return graph


def _as_numpy(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as e:
        raise SpecError(f"{what} could not be read as an array: {e}") from None


def input_spec(x: Any, eps: Any = None, clip: tuple[float, float] | None = None) -> InputSpec:
    """An :class:`InputSpec` from either an InputSpec or a batch of centres plus ``eps``."""
    if isinstance(x, InputSpec):
        if eps is not None or clip is not None:
            raise SpecError("give either an InputSpec or x with eps/clip, not both")
        return x
    if x is None:
        raise SpecError("no input given: pass x (a batch of inputs) with eps, or an InputSpec")
    if eps is None:
        raise SpecError("eps is required when x is a tensor (or pass an InputSpec)")
    return InputSpec.linf(_as_numpy(x, "x"), _as_numpy(eps, "eps"), clip)


def _check_input(graph: Graph, spec: InputSpec) -> None:
    if spec.sample_shape != graph.input_shape:
        raise ShapeError(f"input of shape {list(spec.lower.shape)} does not fit the model, "
                         f"which takes [batch, {', '.join(map(str, graph.input_shape))}]")


def _linear_spec(C: Any, threshold: Any = 0.0) -> LinearSpec | None:
    if C is None:
        return None
    if isinstance(C, LinearSpec):
        return C
    if type(threshold) not in (float, int):          # one plain number goes as it is
        threshold = _as_numpy(threshold, "threshold")
    return LinearSpec(_as_numpy(C, "C"), threshold)


def _resolve(model, x, eps, clip, dtype) -> tuple[Graph, InputSpec, torch.dtype]:
    spec = input_spec(x, eps, clip)
    if dtype is not None and dtype not in _DTYPES:
        raise BoundFlowError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    if isinstance(model, torch.nn.Module):  # trace in the module's own precision
        graph = _traced(model, spec.sample_shape, None,
                        lambda: (spec.lower[:1] + spec.upper[:1]) / 2)
    else:
        graph = as_graph(model)
    _check_input(graph, spec)
    return graph, spec, _DTYPES[dtype or graph.dtype]


@dataclass(frozen=True)
class BoundOptions:
    """How to bound: ``method`` (``ibp``, ``crown-ibp``, ``crown``, ``alpha-crown``) or an
    explicit per-layer ``domains`` plan, the ReLU ``lower_slope`` rule, alpha settings, and
    ``sparse``, which neurons of a CROWN-bounded layer get a backward pass: ``None``
    (default, auto) each sample's neurons whose tighter bound can change a result (ReLU:
    all but the stable inactive ones), where that is faster than all of them; the bounds
    are those of ``False`` (every neuron). ``True``: each sample's IBP-unstable neurons
    only (faster still; stable neurons keep IBP intervals, so IBP downstream may be looser
    than with every neuron)."""

    method: str = "ibp"
    domains: DomainPlan | Mapping[str, str] | None = None
    lower_slope: str = "adaptive"
    alpha: AlphaConfig | None = None
    sparse: bool | None = None
    backend: str = "torch"
    target: str = "llvm"

    def __post_init__(self):
        backends.create(self.backend)                # names the valid ones if not
        if self.method not in METHODS:
            raise BoundFlowError(f"method {self.method!r} is not one of {sorted(METHODS)}")
        if self.lower_slope not in LOWER_SLOPES:
            raise BoundFlowError(f"lower_slope {self.lower_slope!r} is not one of "
                                 f"{LOWER_SLOPES}")
        if not (self.sparse is None or isinstance(self.sparse, bool)):
            raise BoundFlowError(f"sparse must be None (auto), True or False, got "
                                 f"{self.sparse!r}")

    def plan(self, graph: Graph) -> DomainPlan:
        if isinstance(self.domains, DomainPlan):
            return self.domains.check(graph)
        if self.domains is not None:
            return DomainPlan.from_mapping(graph, self.domains, METHODS[self.method][1])
        return DomainPlan.for_method(graph, self.method)


_EXECUTORS: "weakref.WeakKeyDictionary[Graph, dict]" = weakref.WeakKeyDictionary()


def executor(plan: PlanBundle, graph: Graph, backend: str = "torch", target: str = "llvm"):
    """The executor of ``plan`` bound to ``graph`` on ``backend``, built once per (graph,
    plan, backend, target); relax modules also go through the on-disk compile cache."""
    if not isinstance(plan, PlanBundle):
        raise BoundFlowError(f"plan must be a PlanBundle, got {type(plan).__name__}")
    per_graph = _EXECUTORS.setdefault(graph, {})
    key = (plan.key, backend, str(target))
    if key not in per_graph:
        trusted = _TRUSTED.setdefault(graph, set())
        if plan.key not in trusted:
            from boundflow.planner import check_plan

            check_plan(graph, plan)      # a plan from a file or a database is data, not code
            trusted.add(plan.key)
        per_graph[key] = backends.create(backend).executor(plan, graph, target)
    return per_graph[key]


def _workload(graph: Graph, spec: InputSpec, C: LinearSpec | None, options: BoundOptions,
              dtype: torch.dtype):
    from boundflow.ir.workload import Workload

    dname = {v: k for k, v in _DTYPES.items()}[dtype]
    method = options.method
    if options.domains is not None:          # the narrowest method whose space holds them
        plan = options.plan(graph)
        inner = any(d == "crown" for _, d in plan.intermediate)
        method = {"alpha-crown": "alpha-crown", "crown": "crown" if inner else "crown-ibp"
                  }.get(plan.final, "crown-ibp" if inner else "ibp")
    return Workload.of(graph, batch=spec.batch, n_specs=0 if C is None else C.n_specs,
                       method=method, dtype=dname, target=options.target)


_DEFAULT_PLANS: "weakref.WeakKeyDictionary[Graph, dict]" = weakref.WeakKeyDictionary()


def default_plan(graph: Graph, workload, options: BoundOptions) -> PlanBundle:
    """The plan a query runs when none is given: the planner's default knobs for
    ``workload``, with the per-layer domains of ``options`` when it has them; made once per
    (graph, workload, settings)."""
    from boundflow.planner import default, plan as make_plan, space

    per_graph = _DEFAULT_PLANS.setdefault(graph, {})
    domains = options.plan(graph) if options.domains is not None else None
    key = (workload.key, options.lower_slope, options.alpha, options.sparse, domains)
    if key not in per_graph:
        knobs = default(graph, workload)
        if domains is not None:
            knobs = knobs.replace(domains=_positional(graph, workload, domains, space),
                                  final=domains.final)
        bundle = make_plan(graph, workload, knobs, lower_slope=options.lower_slope,
                           alpha=options.alpha, sparse=options.sparse)
        _TRUSTED.setdefault(graph, set()).add(bundle.key)
        per_graph[key] = bundle
    return per_graph[key]


def _positional(graph: Graph, workload, domains: DomainPlan, space) -> tuple[str, ...]:
    """A per-node domain plan as the knobs' per-pre-activation choices (the planner numbers
    the pre-activations of the normalised graph; normalising keeps the ReLUs and their
    order, so the i-th pre-activation is the same neuron layer in both graphs)."""
    ours = [d for _, d in domains.intermediate]
    theirs = space(graph, workload).preactivations
    if len(ours) != len(theirs):
        raise BoundFlowError(f"the domain plan names {len(ours)} pre-activations, the "
                             f"normalised model has {len(theirs)}")
    return tuple(ours)


# per graph, the keys of the plans this process's planner made for it, or checked against
# it (a plan names the graph's nodes: one made for a graph of the same structure and
# weights but other node names is checked again)
_TRUSTED: "weakref.WeakKeyDictionary[Graph, set[str]]" = weakref.WeakKeyDictionary()


def bound_spec(graph: Graph, spec: InputSpec, C: LinearSpec | None, options: BoundOptions,
               dtype: torch.dtype, plan: PlanBundle | None = None, upper: bool = True
               ) -> Bounds:
    """Bounds of ``graph`` (or ``C·graph``) over ``spec``: the checked-input core of
    :func:`compute_bounds`, for callers that already hold a Graph and validated specs.
    Every bound runs a plan on ``options.backend``: ``plan`` (with its own domains and
    dtype), or the default plan of the workload. ``upper=False`` (a verdict): alpha-CROWN
    tightens the lower bound only; the upper bound is never looser than CROWN's."""
    if C is not None:
        C.check(spec.batch, math.prod(graph.output_shape))
    if plan is None:
        # the query's shape and options name its executor: no hashing on the hot path
        fast = _FAST.setdefault(graph, {})
        key = (spec.batch, 0 if C is None else C.n_specs, dtype, _options_key(options))
        exe = fast.get(key)
        if exe is None:
            plan = default_plan(graph, _workload(graph, spec, C, options, dtype), options)
            exe = fast[key] = executor(plan, graph, options.backend, options.target)
    else:
        exe = executor(plan, graph, options.backend, options.target)
    out = backends.run_bounds(exe, spec, C, upper)
    return _finite(Bounds(out.lower.detach(), out.upper.detach()))


_FAST: "weakref.WeakKeyDictionary[Graph, dict]" = weakref.WeakKeyDictionary()


def _options_key(options: BoundOptions) -> tuple:
    d = options.domains
    if d is not None and not isinstance(d, DomainPlan):
        d = tuple(sorted(dict(d).items()))
    return (options.method, d, options.lower_slope, options.alpha, options.sparse,
            options.backend, options.target)


# per graph (a tuned plan is checked against the graph it runs on), the lookups made
_LOOKUPS: "weakref.WeakKeyDictionary[Graph, dict[tuple, Any]]" = weakref.WeakKeyDictionary()


def lookup_tuned(graph: Graph, workload, db: Any, objective: str, calls: int | None = None):
    """The tuned plan of ``workload`` in ``db`` under ``objective`` (a
    :class:`~boundflow.search.lookup.TunedPlan`), checked against ``graph``; None after a
    one-line notice when there is none, or it is refused. Looked up once per process for a
    (database, workload, objective): a loop of calls reads the database once.

    ``calls``: how many calls this process will make with it (``verify`` from the command
    line: one). A plan whose backend this process has not started yet is then used only if
    its saving over those calls exceeds the backend's start-up (e.g. importing TVM): the
    speed a user sees is the whole run, not the kernel."""
    from boundflow.search.lookup import describe_missing, tuned_plan

    where = getattr(db, "url", None) or str(db)
    key = (where, workload.key, workload.weights_hash, objective)
    lookups = _LOOKUPS.setdefault(graph, {})
    if key not in lookups:
        tuned = tuned_plan(db, workload, objective)
        if tuned is None:
            log.warning(describe_missing(db, workload, objective))
        else:
            tuned = _checked(graph, tuned, db)
        lookups[key] = tuned
    tuned = lookups[key]
    if tuned is not None and calls is not None and not _pays_off(tuned, calls):
        return None
    return tuned


def _pays_off(tuned, calls: int) -> bool:
    start = backends.create(tuned.backend).start_seconds()
    if start <= 0:
        return True
    saving = (tuned.default_s - tuned.median_s) * calls \
        if tuned.default_s and tuned.median_s else 0.0
    if saving > start:
        return True
    log.warning(f"the tuned plan ({tuned.backend}) saves {saving * 1e3:.3g} ms over {calls} "
                f"call(s), and starting the {tuned.backend} backend costs about {start:.1f} s "
                f"here: using the default path, faster end to end (tuned plans pay off in a "
                f"process that makes many calls, e.g. bf.compile(..., db=...))")
    return False


def _checked(graph: Graph, tuned, db):
    """``tuned`` if its plan is one the planner makes for ``graph`` (see
    :func:`boundflow.planner.check_plan`), else None after a one-line notice: a shared
    database is written by others, and a plan read from it is data, not code."""
    from boundflow.planner import check_plan
    from boundflow.ir.task_graph import PlanError

    try:
        check_plan(graph, tuned.bundle)
    except PlanError as e:
        log.warning(f"the tuned plan in {getattr(db, 'url', db)} is refused, using the "
                    f"default plan: {e}")
        return None
    return tuned


def _finite(bounds: Bounds) -> Bounds:
    """``bounds`` when every entry is finite; else a :class:`SpecError` saying why: a bound
    that overflowed (or became NaN) is no bound a caller can act on."""
    lo, hi = bounds.lower, bounds.upper
    if math.isfinite(float(lo.sum()) - float(hi.sum())):       # the cheap test first
        return bounds
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        nan = bool(torch.isnan(lo).any() or torch.isnan(hi).any())
        raise SpecError(f"the bounds {'are NaN' if nan else 'overflow to infinity'} in "
                        f"{lo.dtype}: the input box (eps or its range) is too large for this "
                        f"model in this precision; use a smaller box or dtype float64")
    return bounds


def compute_bounds(model: Any, x: Any = None, *, eps: Any = None, C: Any = None,
                   method: str = "ibp", domains: DomainPlan | Mapping[str, str] | None = None,
                   lower_slope: str = "adaptive", alpha: AlphaConfig | None = None,
                   sparse: bool | None = None, clip: tuple[float, float] | None = None,
                   dtype: str | None = None, plan: PlanBundle | None = None,
                   backend: str = "torch", target: str = "llvm") -> Bounds:
    """Certified bounds of ``model``'s output (or of ``C·output``) over an input region.

    ``x`` is an :class:`InputSpec`, or a batch of centres (``[batch, *in]``) for the L∞ ball
    of radius ``eps``, clipped to ``clip`` when given. ``C`` is ``[batch, n_specs, n_out]`` or a
    :class:`LinearSpec`. ``method`` is ``ibp``, ``crown-ibp``, ``crown`` or ``alpha-crown``;
    ``domains`` overrides it per layer: a :class:`DomainPlan`, or a mapping from every
    pre-activation node to ``ibp`` / ``crown`` (the final domain then comes from ``method``).
    ``dtype`` ("float32" / "float64") defaults to the model's. See :class:`BoundOptions`
    for ``lower_slope``, ``alpha`` and ``sparse``. ``plan`` (a PlanBundle from
    :func:`boundflow.planner.plan`) runs that plan instead; it fixes domains and dtype.
    ``backend`` "torch" (default) or "relax" (TVM, compiled for ``target``: "llvm" or "cuda";
    interval plans only for now) runs the plan, or the workload's default plan.
    """
    options = BoundOptions(method, domains, lower_slope, alpha, sparse, backend, target)
    graph, spec, torch_dtype = _resolve(model, x, eps, clip, dtype)
    return bound_spec(graph, spec, _linear_spec(C), options, torch_dtype, plan)


def query(model: Any, x: Any = None, *, eps: Any = None, labels: Sequence[int] | None = None,
          C: Any = None, threshold: Any = 0.0, clip: tuple[float, float] | None = None,
          dtype: str | None = None) -> tuple[Graph, InputSpec, LinearSpec, np.ndarray | None,
                                             torch.dtype]:
    """The checked query of :func:`verify`: graph, input box, spec (the margin spec of
    ``labels``, or of the predicted classes, unless ``C`` is given), labels, dtype."""
    graph, spec, torch_dtype = _resolve(model, x, eps, clip, dtype)
    n_out = math.prod(graph.output_shape)
    if C is not None and labels is not None:
        raise SpecError("give either labels (margin spec) or C, not both")
    if C is None:
        if labels is None:
            centre = torch.as_tensor(spec.center).to(torch_dtype)
            labels = evaluate(graph, centre).flatten(1).argmax(1).numpy()
        labels = _as_numpy(labels, "labels").reshape(-1)
        if len(labels) == 1 and spec.batch > 1:
            labels = np.repeat(labels, spec.batch)
        if len(labels) != spec.batch:
            raise SpecError(f"{len(labels)} labels for a batch of {spec.batch} inputs")
        linear = margin_spec(labels, n_out)
        if np.any(np.asarray(threshold) != 0):
            linear = LinearSpec(linear.C, _as_numpy(threshold, "threshold"))
    else:
        linear = _linear_spec(C, threshold)
        labels = None
    return graph, spec, linear, labels, torch_dtype


def verify(model: Any, x: Any = None, *, eps: Any = None, labels: Sequence[int] | None = None,
           C: Any = None, threshold: Any = 0.0, method: str = "ibp",
           domains: DomainPlan | Mapping[str, str] | None = None,
           lower_slope: str = "adaptive", alpha: AlphaConfig | None = None,
           sparse: bool | None = None, clip: tuple[float, float] | None = None,
           dtype: str | None = None, plan: PlanBundle | None = None,
           backend: str = "torch", target: str = "llvm", db: Any = None,
           objective: str = "time@width", calls: int | None = None) -> VerifyResult:
    """Try to prove ``C·y > threshold`` for every input in the region, per spec.

    Without ``C``, the margin spec of ``labels`` is used (``y[label] > y[j]`` for every other
    class ``j``); without labels either, each sample's predicted class at the box centre.
    ``plan`` runs a PlanBundle (see :func:`compute_bounds`). ``db`` (a tuning database: path,
    URL or :class:`~boundflow.db.Database`) looks up the plan ``boundflow tune`` recorded for
    this workload under ``objective`` and runs it on the backend it was tuned on; without one,
    a one-line notice goes to stderr and the default plan runs. ``calls``: how many calls
    this process makes with the workload, when known (see :func:`lookup_tuned`).
    The verdicts read the lower bounds only, so alpha-CROWN optimises the lower side only
    (and the plan looked up is the one tuned for that query, ``bounds="lower"``):
    the result's upper bounds are sound but looser than :func:`compute_bounds`' (the best
    the lower side's slopes gave, never looser than CROWN's).
    """
    options = BoundOptions(method, domains, lower_slope, alpha, sparse, backend, target)
    graph, spec, linear, labels, torch_dtype = query(model, x, eps=eps, labels=labels, C=C,
                                                     threshold=threshold, clip=clip,
                                                     dtype=dtype)
    tuned = None
    if db is not None and plan is None:
        from boundflow.ir.workload import Workload

        dname = {v: k for k, v in _DTYPES.items()}[torch_dtype]
        work = Workload.of(graph, batch=spec.batch, n_specs=linear.n_specs, method=method,
                           dtype=dname, target=target, bounds="lower")
        tuned = lookup_tuned(graph, work, db, objective, calls)
        if tuned is not None:
            plan = tuned.bundle
            options = BoundOptions(method, domains, lower_slope, alpha, sparse, tuned.backend,
                                   target)
    # the verdicts read the lower bounds only: alpha-CROWN need not tighten the upper ones
    bounds = bound_spec(graph, spec, linear, options, torch_dtype, plan, upper=False)
    if plan is not None:
        method = plan.workload.method
    ok = proven(bounds.lower.detach().cpu().numpy(), linear.threshold)
    verdicts = np.where(ok, "verified", "unknown")
    return VerifyResult(bounds, linear.threshold, verdicts,
                        None if labels is None else np.asarray(labels), method, tuned)
