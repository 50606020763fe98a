"""The ablation harness: the planner's passes and knobs turned on and off, measured.

Every configuration starts from the workload's default plan and changes one thing (or, from a
config file, several). Toggles and what their configurations change:

* ``partition``: every fusible edge unfused (one task per op) vs the default (all fused);
* ``fusion``: Relax's own FuseOps/FuseTIR over the task kernels on vs off;
* ``domain``: every pre-activation by IBP, every pre-activation by CROWN, final IBP;
* ``layout``: every conv region NCHW, every conv region NHWC;
* ``forms``: every affine interval as lower/upper, every one as centre/radius;
* ``storage``: buffer reuse off (a slot per buffer);
* ``cache``: a repeated identical query through the bound cache (``cache_bounds``), and
  intermediate-bound reuse (``reuse_ibp``; torch backend);
* ``lowering``: every task a torch callback instead of a TIR kernel;
* ``schedule``: register tiling with local accumulators and vectorisation; parallel off;
  loop unrolling off.

Ratios are against the baseline on the same backend. On a backend other than the default one
of ``verify`` (torch), a ``baseline-torch`` row is added: the default path of ``verify``, the
reference a tuned plan must beat (and the baseline of the configurations that run there, such
as ``reuse_ibp``). Whether a toggle means anything on a backend is the backend's to say
(``boundflow.backend.create(name).tunes_schedules``). Every configuration is built and measured by the
measurement harness (worker processes); a
configuration that fails to plan, build or run is a row with its error. ``run`` returns the
rows; ``write_csv`` and ``plot`` write them (bars per configuration; time vs width with the
Pareto front).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from boundflow.backend import create
from boundflow.errors import BoundFlowError
from boundflow.ir.graph import Graph
from boundflow.ir.knobs import Knobs
from boundflow.ir.workload import Workload
from boundflow.search.space import DEFAULT_BACKEND

COMPILED_ONLY = ("fusion", "lowering", "schedule")   # toggles of a backend that tunes code
TOGGLES = ("partition", "fusion", "domain", "layout", "forms", "storage", "cache", "lowering",
           "schedule")
COLUMNS = ("config", "toggle", "setting", "backend", "median_ms", "std_ms", "peak_bytes",
           "peak_source", "mean_width", "verified_fraction", "n_kernels", "compile_s",
           "time_vs_baseline", "peak_vs_baseline", "width_vs_baseline", "error")


@dataclass(frozen=True)
class Config:
    """One configuration: knobs changed from the default (by field), schedule pairs for every
    TIR task, executor run options, and the backend it runs on."""

    name: str
    toggle: str
    setting: str
    changes: tuple[tuple[str, Any], ...] = ()
    schedule: tuple[tuple[str, Any], ...] = ()
    run_options: tuple[tuple[str, Any], ...] = ()
    backend: str | None = None          # None: the harness's backend

    def knobs(self, default: Knobs) -> Knobs:
        k = default
        for name, value in self.changes:
            current = getattr(k, name)
            if isinstance(current, tuple) and not isinstance(value, (tuple, list)):
                value = tuple(value for _ in current)
            elif isinstance(value, list):
                value = tuple(value)
            k = k.replace(**{name: value})
        return k


def configurations(toggles: Sequence[str], backend: str = "relax") -> list[Config]:
    """The baseline and, per toggle, its configurations (see the module docstring)."""
    unknown = [t for t in toggles if t not in TOGGLES]
    if unknown:
        raise BoundFlowError(f"unknown toggles {unknown}; choose from {', '.join(TOGGLES)}")
    out = [Config("baseline", "baseline", "default plan")]
    for t in toggles:
        if t == "partition":
            out.append(Config("partition=off", t, "nothing fused", (("partition", False),)))
        elif t == "fusion":
            out.append(Config("fusion=on", t, "Relax FuseOps/FuseTIR", (("fuse_passes", True),)))
        elif t == "domain":
            out += [Config("domain=ibp", t, "all pre-activations IBP", (("domains", "ibp"),)),
                    Config("domain=crown", t, "all pre-activations CROWN",
                           (("domains", "crown"),)),
                    Config("final=ibp", t, "final IBP", (("final", "ibp"),))]
        elif t == "layout":
            out += [Config("layout=NCHW", t, "every region NCHW", (("layouts", "NCHW"),)),
                    Config("layout=NHWC", t, "every region NHWC", (("layouts", "NHWC"),))]
        elif t == "forms":
            out += [Config("forms=lu", t, "lower/upper", (("forms", "lu"),)),
                    Config("forms=cr", t, "centre/radius", (("forms", "cr"),))]
        elif t == "storage":
            out.append(Config("storage=none", t, "a slot per buffer", (("storage", "none"),)))
        elif t == "cache":
            out += [Config("cache=bounds", t, "repeated query, cache_bounds",
                           run_options=(("cache_bounds", True),)),
                    Config("cache=reuse_ibp", t, "repeated query, reuse_ibp (torch executor)",
                           run_options=(("reuse_ibp", True),), backend=DEFAULT_BACKEND)]
        elif t == "lowering":
            out.append(Config("lowering=torch", t, "every task a torch callback",
                              (("lowering", "torch"),)))
        elif t == "schedule":
            out += [Config("schedule=tiled", t, "tile 4, local accumulators, vectorise 4",
                           schedule=(("cache_write", True), ("tile", 4), ("vectorize", 4))),
                    Config("schedule=serial", t, "parallel off", schedule=(("parallel", False),)),
                    Config("schedule=no-unroll", t, "unroll off", schedule=(("unroll", 0),))]
    if not create(backend).tunes_schedules:     # lowering, fusion, schedules mean nothing
        out = [c for c in out if c.toggle not in COMPILED_ONLY]
    others = dict.fromkeys(c.backend for c in out if c.backend not in (None, backend))
    if backend != DEFAULT_BACKEND:
        others = {DEFAULT_BACKEND: None, **others}
    for i, b in enumerate(others, 1):           # the default path, and their own baselines
        out.insert(i, Config(f"baseline-{b}", "baseline", f"default plan, {b} backend"
                             + (" (the default path of verify)" if b == DEFAULT_BACKEND
                                else ""), backend=b))
    return out


def read_config(path: str | Path) -> list[Config]:
    """Configurations from a JSON file: ``[{"name": ..., "changes": {"storage": "none"},
    "schedule": {"tile": 4}, "run_options": {...}, "backend": "torch"}, ...]``; a baseline
    is added first."""
    from boundflow.frontend.files import read_text

    text = read_text(path, BoundFlowError, "ablation config")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise BoundFlowError(f"ablation config {path}: {e}") from None
    if not isinstance(items, list):
        raise BoundFlowError(f"ablation config {path}: a JSON list of configurations")
    out = [Config("baseline", "baseline", "default plan")]
    for i, d in enumerate(items):
        if not isinstance(d, dict) or "name" not in d:
            raise BoundFlowError(f"ablation config {path}: entry {i} needs a name")
        out.append(Config(str(d["name"]), "config", str(d.get("setting", "")),
                          tuple(dict(d.get("changes", {})).items()),
                          tuple(sorted(dict(d.get("schedule", {})).items())),
                          tuple(dict(d.get("run_options", {})).items()), d.get("backend")))
    return out


def run(graph: Graph, lower: np.ndarray, upper: np.ndarray, C: np.ndarray | None, *,
        method: str, configs: Sequence[Config], backend: str = "relax", target: str = "llvm",
        config=None, builder=None, runner=None, progress: bool = True) -> list[dict[str, Any]]:
    """Measure every configuration; one row (``COLUMNS``) each, failures included."""
    from boundflow.measure import LocalBuilder, LocalRunner, MeasureConfig, MeasureInput
    from boundflow.planner import default, plan

    config = config or MeasureConfig(number=5, repeat=5, warmup=2)
    n_specs = 0 if C is None else int(np.asarray(C).shape[1])
    w = Workload.of(graph, batch=int(np.asarray(lower).shape[0]), n_specs=n_specs,
                    method=method, target=target, bounds="lower" if n_specs else "both")
    base = default(graph, w)          # the default plan, as verify plans it
    inputs, rows, planned = [], [], []
    for c in configs:
        row = {"config": c.name, "toggle": c.toggle, "setting": c.setting,
               "backend": c.backend or backend, "error": ""}
        rows.append(row)
        try:
            k = c.knobs(base)
            if c.schedule:
                tasks = plan(graph, w, k).task_graph.tasks
                k = k.replace(schedule=tuple((t.name, c.schedule) for t in tasks
                                             if t.kind != "input"))
            bundle = plan(graph, w, k)
            inputs.append(MeasureInput(bundle, graph, lower, upper, C, c.backend or backend,
                                       c.run_options))
            planned.append(row)
        except BoundFlowError as e:
            row["error"] = f"plan: {e}"
    builder = builder or LocalBuilder(timeout_s=config.timeout_s)
    runner = runner or LocalRunner(config)
    bar = _bar(progress, len(inputs))
    try:
        for i in range(0, len(inputs), 4):          # in small batches, for progress
            part = inputs[i:i + 4]
            results = runner.run(part, builder.build(part))
            for row, r in zip(planned[i:i + 4], results):
                if not r.ok:
                    row["error"] = f"{r.error_kind}: {r.error}"
                    continue
                row.update(median_ms=r.median_s * 1e3, std_ms=(r.std_s or 0) * 1e3,
                           peak_bytes=r.peak_bytes, peak_source=r.peak_source,
                           mean_width=r.mean_width, verified_fraction=r.verified_fraction,
                           n_kernels=r.n_kernels, compile_s=r.compile_seconds)
            if bar is not None:
                bar.update(bar.task_ids[0], advance=len(part))
    finally:
        if bar is not None:
            bar.stop()
        for part in (builder, runner):
            part.close()
    baselines = {r["backend"]: r for r in reversed(rows) if r["toggle"] == "baseline"}
    for row in rows:              # against the baseline on the same backend
        base_row = baselines.get(row["backend"], rows[0])
        for col, ref in (("time_vs_baseline", "median_ms"), ("peak_vs_baseline", "peak_bytes"),
                         ("width_vs_baseline", "mean_width")):
            a, b = row.get(ref), base_row.get(ref)
            row[col] = a / b if a is not None and b else None
        for col in COLUMNS:
            row.setdefault(col, None)
    return rows


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    bar = Progress(TextColumn("ablation"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
    bar.add_task("configs", total=total)
    bar.start()
    return bar


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (lower is better)."""
    out = []
    for i, (t, w) in enumerate(points):
        if not any((t2 <= t and w2 <= w) and (t2 < t or w2 < w)
                   for j, (t2, w2) in enumerate(points) if j != i):
            out.append(i)
    return out


def plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Bars of time and peak memory per configuration, and time vs width with the Pareto
    front, in one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r["error"] and r.get("median_ms") is not None]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 5.2))
    names = [r["config"] for r in ok]
    colours = ["tab:grey" if r["toggle"] == "baseline" else "tab:blue" for r in ok]
    a1.barh(names, [r["median_ms"] for r in ok], xerr=[r["std_ms"] or 0 for r in ok],
            color=colours)
    a1.set_xlabel("median time per query (ms)")
    a1.invert_yaxis()
    a2.barh(names, [(r["peak_bytes"] or 0) / 1024 for r in ok], color=colours)
    a2.set_xlabel("peak KiB (measured on torch, planned on relax)")
    a2.invert_yaxis()
    a2.set_yticklabels([])
    pts = [(r["median_ms"], r["mean_width"]) for r in ok if r["mean_width"] is not None]
    labelled = [r for r in ok if r["mean_width"] is not None]
    a3.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue")
    for r, (t, w) in zip(labelled, pts):
        a3.annotate(r["config"], (t, w), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((pts[i] for i in pareto(pts)))
    if front:
        a3.plot(*zip(*front), color="tab:red", lw=1, label="Pareto front")
        a3.legend()
    a3.set_xscale("log")
    a3.set_xlabel("median time (ms, log)")
    a3.set_ylabel("mean bound width (lower is tighter)")
    failed = [r["config"] for r in rows if r["error"]]
    fig.suptitle(title + (f"   (failed: {', '.join(failed)})" if failed else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def effects(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per configuration: its change against the baseline."""
    out = []
    for r in rows[1:]:
        if r["toggle"] == "baseline":
            continue
        if r["error"]:
            out.append(f"{r['config']}: failed ({r['error'][:80]})")
            continue
        parts = []
        for col, what in (("time_vs_baseline", "time"), ("peak_vs_baseline", "peak memory"),
                          ("width_vs_baseline", "width")):
            v = r.get(col)
            if v is not None and math.isfinite(v):
                parts.append(f"{what} x{v:.2f}")
        base_k = next((b.get("n_kernels") for b in rows if b["toggle"] == "baseline"
                       and b["backend"] == r["backend"]), None)
        if r.get("n_kernels") is not None and base_k is not None:
            parts.append(f"kernels {base_k}->{r['n_kernels']}")
        out.append(f"{r['config']}: " + ", ".join(parts))
    return out
