"""The default path of ``verify`` vs the tuned plan, end to end, measured together.

    python benchmarks/bench_tune.py [--seconds 45] [--trials 400] [--method crown-ibp]
                                    [--strategy greedy] [--threads 1] [--db PATH]
                                    [--only digits_mlp@1,acasxu@1024]

Workloads: the digits MLP and CNN, the deep MLP and the residual net of ``boundflow.examples``
(margin specs of the predicted classes, eps 0.01) at batch 1 and 32; from
``../shared/benchmarks``, the ACAS Xu network 1_1 at batch 1024 (the input box of its
``prop_1.vnnlib`` split into a 4^5 grid of sub-boxes, its output constraint as ``C``) and
VNN-COMP's ``test_small`` at batch 1 and 32 (its box, split into 32 intervals).

Each workload is tuned by :class:`boundflow.search.Tuner` for the same wall-clock budget
(``--seconds``; both backends; the default path of ``verify`` is the first candidate and the
baseline). Then one runner times, for every workload in turn, the default path (the default
plan on the torch backend, as ``verify`` without ``--db`` runs it) and what ``verify --db``
runs (the record :func:`boundflow.search.lookup.lookup` returns, or the default path when the
record was not faster than it: speedup 1.00 by construction), interleaved in one worker:
whole calls, host box and ``C`` in, bounds out. Prints a markdown table (times, speedup,
widths, the tuned backend and what the tuner reported), the median speedup, the command and
the load average. ``--threads`` sets torch's and TVM's threads in the measuring workers
(both paths alike; on a small shared machine one thread keeps torch's thread team from
stalling).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from boundflow.api import BoundOptions, as_graph, default_plan, query
from boundflow.db import Database
from boundflow.examples import load
from boundflow.measure import LocalBuilder, LocalRunner, MeasureConfig, MeasureInput
from boundflow.search import Tuner
from boundflow.search.lookup import lookup

SHARED = Path(os.environ.get("BOUNDFLOW_SHARED", Path(__file__).resolve().parents[2] / "shared"))
BENCH = SHARED / "benchmarks"
EXAMPLES = ("digits_mlp", "digits_cnn", "random_deep_mlp", "random_residual")
WORKLOADS = tuple(f"{m}@{b}" for m in EXAMPLES for b in (1, 32)) + \
    ("acasxu@1024", "test_small@1", "test_small@32")


@dataclass
class Query:
    name: str
    graph: object
    lower: np.ndarray
    upper: np.ndarray
    C: np.ndarray


def _example(name: str, batch: int) -> Query:
    ex = load(name)
    g0 = as_graph(ex.model, torch.as_tensor(ex.inputs[:1]).float())
    x = ex.inputs[np.arange(batch) % len(ex.inputs)].astype(np.float32)
    g, spec, linear, _, _ = query(g0, x, eps=0.01)
    return Query(f"{name}@{batch}", g, spec.lower, spec.upper, linear.C)


def _split(lo: np.ndarray, hi: np.ndarray, per_dim: int, dims: list[int]):
    """The box [lo, hi] cut into a grid of ``per_dim`` pieces along each of ``dims``."""
    edges = {d: np.linspace(lo[d], hi[d], per_dim + 1) for d in dims}
    lows, highs = [], []
    for cell in itertools.product(range(per_dim), repeat=len(dims)):
        a, b = lo.copy(), hi.copy()
        for d, i in zip(dims, cell):
            a[d], b[d] = edges[d][i], edges[d][i + 1]
        lows.append(a)
        highs.append(b)
    return np.stack(lows), np.stack(highs)


def _onnx(name: str, batch: int) -> Query:
    from boundflow.frontend.onnx import load_onnx
    from boundflow.frontend.vnnlib import load_vnnlib

    if name == "acasxu":
        model = BENCH / "acasxu/onnx/ACASXU_run2a_1_1_batch_2000.onnx"
        prop = BENCH / "acasxu/vnnlib/prop_1.vnnlib"
    else:
        model, prop = BENCH / f"vnncomp_test/{name}.onnx", BENCH / f"vnncomp_test/{name}.vnnlib"
    g = load_onnx(model)
    n_in = int(np.prod(g.input_shape))
    (box, spec, _), *_ = load_vnnlib(prop, n_in).groups()
    lo, hi = box.lower[0].reshape(-1), box.upper[0].reshape(-1)
    per_dim = round(batch ** (1 / n_in)) if n_in > 1 else batch
    lows, highs = _split(lo, hi, per_dim, list(range(n_in)))
    if len(lows) != batch:
        raise SystemExit(f"{name}: cannot split {n_in} inputs into {batch} boxes")
    shape = (batch, *g.input_shape)
    C = np.repeat(spec.C, batch, axis=0)
    return Query(f"{name}@{batch}", g, lows.reshape(shape).astype(np.float32),
                 highs.reshape(shape).astype(np.float32), C.astype(np.float32))


def make(workload: str) -> Query:
    name, batch = workload.split("@")
    return _example(name, int(batch)) if name in EXAMPLES else _onnx(name, int(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(WORKLOADS))
    parser.add_argument("--method", default="crown-ibp")
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--strategy", default="greedy")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--db", help="tuning database (default: a new one in a temp dir)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_tune-"))
    db_path = args.db or str(tmp / "bench_tune.db")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    load_before = os.getloadavg()
    config = MeasureConfig(number=3, repeat=5, warmup=1, timeout_s=300, threads=args.threads)
    final = MeasureConfig(number=5, repeat=10, warmup=2, timeout_s=300, threads=args.threads)
    rows, start = [], time.monotonic()
    with Database(db_path) as db:
        for workload in args.only.split(","):
            q = make(workload)
            tuner = Tuner(q.graph, q.lower, q.upper, q.C, method=args.method, db=db,
                          strategy=args.strategy, config=config, final_config=final,
                          batch_size=8, progress=False,
                          builder=LocalBuilder(tmp / "cache", timeout_s=300))
            try:
                report = tuner.tune(trials=args.trials, seconds=args.seconds)
            finally:
                tuner.close()
            found = lookup(db, report.workload, report.objective)
            first = report.first_measurement_s
            print(f"{q.name}: {report.measured_now} plans in {report.seconds:.1f} s (first "
                  f"after {first if first is None else round(first, 1)} s); tuner: "
                  f"{report.speedup or float('nan'):.2f}x, {report.best_description[:90]}; "
                  f"ranked by {report.cost_model.split(' (')[0]}", flush=True)
            rows.append((q, report, found.tuned))
        tune_s = time.monotonic() - start
        # one runner pass: the default path and what verify --db runs, per workload
        builder, runner = LocalBuilder(tmp / "cache", timeout_s=300), LocalRunner(final)
        results = []
        try:
            for q, report, tuned in rows:
                base = default_plan(q.graph, report.workload, BoundOptions(args.method))
                pair = [MeasureInput(base, q.graph, q.lower, q.upper, q.C, "torch")]
                if tuned is not None:
                    pair.append(MeasureInput(tuned.bundle, q.graph, q.lower, q.upper, q.C,
                                             tuned.backend))
                results.append(runner.compare(pair, builder.build(pair)))
        finally:
            builder.close()
            runner.close()
    _table(args, rows, results, command, load_before, tune_s)


def _table(args, rows, results, command, load_before, tune_s) -> None:
    print("\n| workload | method | batch | default ms | tuned ms | speedup | width default | "
          "width tuned | tuned backend | plans | tuner said |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
    speedups = []
    for (q, report, tuned), res in zip(rows, results):
        d = res[0]
        t = res[1] if len(res) > 1 else d
        if not (d.ok and t.ok):
            print(f"| {q.name} | {args.method} | {report.workload.batch} | failed: "
                  f"{(d.error or t.error or '')[:80]} |")
            continue
        s = d.median_s / t.median_s if tuned is not None else 1.0
        speedups.append(s)
        said = "default kept" if report.kept_default else f"{report.speedup:.2f}x"
        backend = tuned.backend if tuned is not None else "(default path)"
        print(f"| {q.name.split('@')[0]} | {args.method} | {report.workload.batch} | "
              f"{d.median_s * 1e3:.3f} | {t.median_s * 1e3:.3f} | {s:.2f}x | "
              f"{d.mean_width:.5g} | {t.mean_width:.5g} | {backend} | "
              f"{report.measured_now} | {said} |")
    if speedups:
        print(f"\nmedian speedup {np.median(speedups):.2f}x, min {min(speedups):.2f}x over "
              f"{len(speedups)} workloads ({args.seconds:g} s of tuning each, strategy "
              f"{args.strategy}, objective {rows[0][1].objective}; tuning took {tune_s:.0f} s "
              f"in all)")
    print(f"command: {command}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in load_before)}; after: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"{args.threads} thread(s) per measuring worker")


if __name__ == "__main__":
    main()
