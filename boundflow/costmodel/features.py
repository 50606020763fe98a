"""Features of a (workload, PlanBundle, backend): a fixed-length vector with documented names.

Every candidate of every workload maps to the same ``FEATURE_NAMES``, so one model learns
across workloads. A candidate is a plan *on a backend*: the vector is the plan's own features
(``PLAN_FEATURE_NAMES``, what the database stores with the plan, since one plan may be
measured on several backends) followed by the backend's (``BACKEND_FEATURE_NAMES``), joined by
:func:`with_backend`, which also clears what the backend ignores (kernels, callbacks, the
lowering share, Relax fusion and schedules mean nothing to a backend that tunes no schedules). Work is counted analytically from the normalised graph:

* FLOPs per sample of each op (linear ``2·in·out``, conv ``2·out·Cin/groups·kh·kw``,
  transposed conv ``2·in·Cout/groups·kh·kw``, every other op ``size``); an IBP task does about twice its ops' FLOPs (two bounds, or centre and
  radius); a CROWN task bounding node ``v`` carries a ``size(v)``-row coefficient matrix back
  through every affine ancestor (``size(v) × Σ FLOPs``); a final CROWN task does the same with
  ``n_specs`` rows, alpha-CROWN times its iterations (forward and backward);
* bytes: every buffer a task reads or writes (two halves of an interval), per sample;
* the plan's shape: tasks by kind, kernels (TIR tasks), torch callbacks, layout conversions,
  fused fraction, NHWC and centre/radius fractions, storage reuse, planned bytes, Relax fusion,
  the lowering share (``tir_fraction``: tasks lowered to TIR kernels over all tasks);
* schedule knobs (llvm's, and cuda's ``threads`` and ``shared``: features-v5), averaged over
  the forward (ibp, layout) and backward (crown, final) tasks;
* per task, pooled into the plan vector (features-v4), so that what the largest tasks do
  counts more than what the many small ones do: the graph's op kinds by trait (weighted,
  activation, windows without weights, other relaxed ops such as maxpool, merges of two
  branches) and its depth in weighted ops
  (CROWN's cost grows with it); per task its fused-op count (mean, max), its FLOPs by
  lowering (summed over TIR kernels and over torch ops), its share of the plan's FLOPs by
  kind, the forward-mode tasks (``2·n_in`` times the FLOPs behind their node), its arithmetic intensity ``log2(FLOPs / bytes)`` (FLOP-weighted mean and the largest
  task's), and the FLOP-weighted means of its lowering to TIR, its NHWC layout and its
  schedule knobs (``w_*``, over the TIR tasks);
* the backend: whether it compiles (``backend_compiled``), and the share of tasks that run as
  torch ops there (``torch_fraction``: all of them on the torch backend, the callbacks on
  Relax).

Sizes enter as ``log2(1 + x)``. ``task_work`` gives the per-task FLOPs and bytes the analytic
model and the inspection tool use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from boundflow.backend.relax.coverage import lowers_to_tir
from boundflow.ir import ops
from boundflow.ir.graph import Graph
from boundflow.ir.plan import PlanBundle

FEATURE_VERSION = "features-v5"
_METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
_FINALS = ("ibp", "crown", "alpha-crown")
_SCHEDULE = ("inline", "parallel", "vectorize", "tile", "tile_rows", "cache_write", "unroll",
             "threads", "shared")
_WEIGHTED = ops.having("weighted")      # linear, conv2d, conv_transpose2d: CROWN's work

PLAN_FEATURE_NAMES: tuple[str, ...] = (
    "log_batch", "n_specs", "log_input_size", "float64", "target_cuda",
    *(f"method_{m}" for m in _METHODS),
    "n_tasks", "n_ibp_tasks", "n_crown_tasks", "n_layout_tasks", "n_kernels", "n_callbacks",
    *(f"final_{m}" for m in _FINALS),
    "log_flops", "log_flops_ibp", "log_flops_crown", "log_flops_final",
    "log_flops_batch", "log_bytes", "log_bytes_batch", "log_planned_bytes",
    "log_max_task_flops", "fused_fraction", "nhwc_fraction", "cr_fraction", "storage_reuse",
    "fuse_passes", "tir_fraction", "alpha_iterations",
    *(f"fwd_{k}" for k in _SCHEDULE), *(f"bwd_{k}" for k in _SCHEDULE),
    # per task, pooled (features-v4)
    "ops_weighted", "ops_activation", "ops_window", "ops_relaxed_other", "ops_merge",
    "depth_weighted", "task_nodes_mean", "task_nodes_max", "log_flops_tir",
    "log_flops_torch", "share_flops_ibp", "share_flops_crown", "share_flops_final",
    "n_forward_tasks", "share_flops_forward",
    "intensity_w", "intensity_top", "w_tir", "w_nhwc", *(f"w_{k}" for k in _SCHEDULE),
)
BACKEND_FEATURE_NAMES: tuple[str, ...] = ("backend_compiled", "torch_fraction")
FEATURE_NAMES: tuple[str, ...] = PLAN_FEATURE_NAMES + BACKEND_FEATURE_NAMES
N_PLAN_FEATURES = len(PLAN_FEATURE_NAMES)
N_FEATURES = len(FEATURE_NAMES)
# plan features that only a backend tuning lowering and schedules reads
_COMPILED_ONLY = tuple(i for i, n in enumerate(PLAN_FEATURE_NAMES)
                       if n in ("n_kernels", "n_callbacks", "tir_fraction", "fuse_passes",
                                "log_flops_tir", "log_flops_torch", "w_tir")
                       or n.startswith(("fwd_", "bwd_", "w_")) and n != "w_nhwc")


def _log(x: float) -> float:
    return math.log2(1.0 + max(0.0, float(x)))


@lru_cache(maxsize=64)
def _graph_work(graph: Graph) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
    """Per node: FLOPs per sample, output size, and Σ FLOPs of its affine ancestors
    (itself included)."""
    flops, size, back = {}, {}, {}
    for n in graph.nodes:
        size[n.name] = math.prod(n.shape)
        if n.op == "linear":
            f = 2.0 * math.prod(graph.node(n.inputs[0]).shape) * size[n.name]
        elif n.op == "conv2d":
            w = graph.params[f"{n.name}.weight"]
            f = 2.0 * size[n.name] * math.prod(w.shape[1:])
        elif n.op == "conv_transpose2d":        # each input element scatters a weight slice
            w = graph.params[n.params["weight"]]
            f = 2.0 * math.prod(graph.node(n.inputs[0]).shape) * math.prod(w.shape[1:])
        elif n.op == "input":
            f = 0.0
        else:
            f = float(size[n.name])
        flops[n.name] = f
    for n in graph.nodes:
        back[n.name] = (flops[n.name] if n.op in _WEIGHTED else 0.0) + \
            max((back[i] for i in n.inputs if i in back), default=0.0)
    # a max over inputs keeps residual branches from double counting the shared trunk
    return flops, size, back


@lru_cache(maxsize=64)
def _graph_kinds(graph: Graph) -> tuple[float, ...]:
    """Op kinds by trait (log counts) and the depth in weighted ops of ``graph``."""
    count = {"weighted": 0, "activation": 0, "window": 0, "relaxed": 0, "merge": 0}
    depth: dict[str, int] = {}
    for n in graph.nodes:
        d = ops.get(n.op)
        count["weighted"] += d.weighted
        count["activation"] += d.activation
        count["window"] += d.spatial and not d.weighted
        count["relaxed"] += d.relaxed and not d.activation
        count["merge"] += len(n.inputs) > 1
        depth[n.name] = int(d.weighted) + max((depth[i] for i in n.inputs if i in depth),
                                              default=0)
    return (*(_log(v) for v in count.values()), float(max(depth.values(), default=0)))


@dataclass(frozen=True)
class TaskWork:
    task: str
    kind: str
    flops: float           # per sample
    bytes: float           # per sample
    lowering: str


def task_work(bundle: PlanBundle, graph: Graph) -> list[TaskWork]:
    """Analytic work of every task of ``bundle`` on the normalised ``graph``."""
    flops, size, back = _graph_work(graph)
    buffers = {b.name: b for b in bundle.task_graph.buffers}
    n_specs = max(1, bundle.workload.n_specs)
    n_in = math.prod(bundle.workload.input_shape)
    alpha_iters = dict(bundle.domain_plan.alpha).get("iterations", 20)
    out = []
    for t in bundle.task_graph.tasks:
        if t.kind == "input":
            continue
        nbytes = 2.0 * 4 * sum(math.prod(buffers[b].shape) for b in (*t.inputs, *t.outputs)
                               if b in buffers)
        if t.kind in ("ibp", "layout"):
            f = 2.0 * sum(flops.get(n, 0.0) for n in t.nodes)
        elif t.kind == "crown":
            f = sum(size.get(n, 0) * back.get(n, 0.0) for n in t.nodes)
        elif t.kind == "forward":      # two linear forms of n_in columns to the node
            f = 2.0 * n_in * sum(back.get(n, 0.0) for n in t.nodes)
        else:
            method = t.attr("method")
            tail = sum(back.get(n, 0.0) for n in t.nodes) or max(back.values(), default=0.0)
            if method == "ibp":
                f = 2.0 * sum(flops.get(n, 0.0) for n in t.nodes)
            else:
                f = n_specs * tail * (2 * alpha_iters if method == "alpha-crown" else 1)
        out.append(TaskWork(t.name, t.kind, f, nbytes,
                            bundle.lowering_plan.lowering(t.name)))
    return out


def _number(v) -> float:
    """A schedule knob's value; "auto" (the rule's choice) as -1."""
    return -1.0 if isinstance(v, str) else float(v or 0)


def _effective_schedules(bundle: PlanBundle) -> dict[str, dict]:
    """Per task lowered to TIR by the plan, its schedule knobs with the backend's defaults
    filled in (checked once, read by the grouped and the pooled features)."""
    from boundflow.backend.relax.schedule_space import check

    target = bundle.workload.target
    return {t: check(dict(s), target) for t, low, s in bundle.lowering_plan.tasks
            if low == "tir"}


def _pooled(bundle: PlanBundle, graph: Graph, work: list[TaskWork], tir: dict[str, bool],
            schedules: dict[str, dict]) -> list[float]:
    """The per-task features, pooled (the ``ops_*`` ... ``w_*`` names)."""
    tasks = {t.name: t for t in bundle.task_graph.tasks}
    nhwc = {n for nodes, lay in bundle.layout_plan.regions if lay == "NHWC" for n in nodes}
    sizes = [len(tasks[t.task].nodes) for t in work] or [0]
    total = sum(t.flops for t in work)
    weight = np.array([t.flops for t in work]) / total if total > 0 else \
        np.full(len(work), 1.0 / max(1, len(work)))
    share = {k: sum(t.flops for t in work if t.kind in kinds) / total if total > 0 else 0.0
             for k, kinds in (("ibp", ("ibp", "layout")), ("crown", ("crown",)),
                              ("final", ("final",)), ("forward", ("forward",)))}
    intensity = np.array([math.log2((1.0 + t.flops) / (1.0 + t.bytes)) for t in work])
    top = int(np.argmax([t.flops for t in work])) if work else 0
    is_tir = np.array([float(tir[t.task]) for t in work])
    is_nhwc = np.array([float(any(n in nhwc for n in tasks[t.task].nodes)) for t in work])
    knobs = np.zeros(len(_SCHEDULE))
    w_tir = float(weight @ is_tir) if work else 0.0
    if w_tir > 0:
        for wt, t, on in zip(weight, work, is_tir):
            if on:
                s = schedules[t.task]
                knobs += wt / w_tir * np.array([_number(s.get(k, 0)) for k in _SCHEDULE])
    return [
        *_graph_kinds(graph), float(np.mean(sizes)), float(max(sizes)),
        _log(sum(t.flops for t, on in zip(work, is_tir) if on)),
        _log(sum(t.flops for t, on in zip(work, is_tir) if not on)),
        share["ibp"], share["crown"], share["final"],
        float(sum(t.kind == "forward" for t in work)), share["forward"],
        float(weight @ intensity) if work else 0.0, float(intensity[top]) if work else 0.0,
        w_tir, float(weight @ is_nhwc) if work else 0.0, *knobs,
    ]


def _schedule_means(bundle: PlanBundle, schedules: dict[str, dict], kinds: tuple[str, ...]
                    ) -> list[float]:
    """The effective schedule knobs (``schedules``) of the TIR tasks of ``kinds``, averaged;
    zeros when there are none."""
    kind_of = {t.name: t.kind for t in bundle.task_graph.tasks}
    rows = [s for t, s in schedules.items() if kind_of.get(t) in kinds]
    if not rows:
        return [0.0] * len(_SCHEDULE)
    return [float(np.mean([_number(r.get(k, 0)) for r in rows])) for k in _SCHEDULE]


def features(bundle: PlanBundle, graph: Graph, backend: str = "torch") -> np.ndarray:
    """The feature vector (``FEATURE_NAMES``) of ``bundle`` on its normalised ``graph``, run
    on ``backend``."""
    return with_backend(plan_features(bundle, graph), backend)


def with_backend(plan_vector, backend: str) -> np.ndarray:
    """``plan_vector`` (``PLAN_FEATURE_NAMES``, or a matrix of them) on ``backend``: the full
    ``FEATURE_NAMES`` vector."""
    from boundflow.backend import create

    b = create(backend)
    X = np.array(plan_vector, np.float64, ndmin=2)
    if X.shape[1] != N_PLAN_FEATURES:
        raise ValueError(f"plan features have {N_PLAN_FEATURES} entries, not {X.shape[1]}")
    if not b.tunes_schedules:
        X[:, list(_COMPILED_ONLY)] = 0.0
    tir = X[:, PLAN_FEATURE_NAMES.index("tir_fraction")]
    extra = np.stack([np.full(len(X), float(b.needs_build)), 1.0 - tir], axis=1)
    out = np.concatenate([X, extra], axis=1)
    return out[0] if np.ndim(plan_vector) == 1 else out


def plan_features(bundle: PlanBundle, graph: Graph) -> np.ndarray:
    """The plan's own features (``PLAN_FEATURE_NAMES``) on its normalised ``graph``: what the
    database stores with a candidate."""
    w, k = bundle.workload, bundle.knobs
    work = task_work(bundle, graph)
    kinds = [t.kind for t in work]
    by_kind = {kind: sum(t.flops for t in work if t.kind == kind)
               for kind in ("ibp", "layout", "crown", "final")}
    total = sum(t.flops for t in work)
    nbytes = sum(t.bytes for t in work)
    # what the Relax backend compiles (``lowers_to_tir`` imports no TVM)
    tir = {t.name: lowers_to_tir(bundle, t, graph) for t in bundle.task_graph.tasks
           if t.kind != "input"}
    n_tir = sum(tir.values())
    regions = bundle.layout_plan.regions
    schedules = _effective_schedules(bundle)
    vec = [
        _log(w.batch), float(w.n_specs), _log(math.prod(w.input_shape)),
        float(w.dtype == "float64"), float(w.target.startswith("cuda")),
        *(float(w.method == m) for m in _METHODS),
        float(len(work)), float(kinds.count("ibp")), float(kinds.count("crown")),
        float(kinds.count("layout")), float(n_tir), float(len(work) - n_tir),
        *(float(bundle.domain_plan.final == m) for m in _FINALS),
        _log(total), _log(by_kind["ibp"] + by_kind["layout"]), _log(by_kind["crown"]),
        _log(by_kind["final"]), _log(total * w.batch), _log(nbytes), _log(nbytes * w.batch),
        _log(bundle.storage_plan.planned_bytes),
        _log(max((t.flops for t in work), default=0.0)),
        float(np.mean(k.partition)) if k.partition else 1.0,
        float(np.mean([lay == "NHWC" for _, lay in regions])) if regions else 0.0,
        float(np.mean([f == "cr" for f in k.forms])) if k.forms else 0.0,
        float(bundle.storage_plan.reuse), float(k.fuse_passes),
        n_tir / max(1, len(work)),
        float(dict(bundle.domain_plan.alpha).get("iterations", 0)
              if bundle.domain_plan.final == "alpha-crown" else 0),
        *_schedule_means(bundle, schedules, ("ibp", "layout")),
        *_schedule_means(bundle, schedules, ("crown", "final")),
        *_pooled(bundle, graph, work, tir, schedules),
    ]
    out = np.asarray(vec, np.float64)
    assert out.shape == (N_PLAN_FEATURES,)
    return out
