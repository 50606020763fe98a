"""The planner's effects, measured in one run: storage reuse, the bound cache, plan overhead.

    python benchmarks/bench_planner.py [--batch 8] [--repeat 30]

1. Storage: measured peak bytes of the torch executor with buffer reuse and without (every
   buffer its own slot), for the default (fused) and the unfused partition; bounds compared.
2. Cache: one query run cold, then the same query again (cache_bounds: a hit), then another
   spec on the same box (reuse_ibp: intermediate bounds from the cache), against no cache.
3. Overhead: the planner's time per plan, the executor's run time against the direct
   (un-planned) bound computation and a torch forward pass of the model.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from boundflow.api import BoundOptions, as_graph, bound_spec
from boundflow.backend.torch import TorchExecutor
from boundflow.examples import digits_module, load
from boundflow.ir.spec import InputSpec, margin_spec
from boundflow.ir.workload import Workload
from boundflow.planner import default, plan
from boundflow.runtime.cache import BoundCache

from bench_ibp import median_seconds

MODELS = ("digits_cnn", "random_cnn", "random_residual", "random_nhwc")


def query(name: str, batch: int, eps: float = 0.01):
    ex = load(name)
    g = as_graph(ex.model, torch.as_tensor(ex.inputs[:1]).float())
    x = ex.inputs[np.arange(batch) % len(ex.inputs)].astype(np.float32)
    n_out = int(np.prod(g.output_shape))
    return ex, g, InputSpec.linf(x, eps), margin_spec(np.arange(batch) % n_out, n_out)


def storage_table(batch: int) -> None:
    print(f"\n1. storage plan: measured peak bytes at batch {batch} (planned in brackets)")
    print(f"{'model':<16} {'method':<10} {'partition':<9} {'reuse':>18} {'no reuse':>18} "
          f"{'saving':>7}  bounds")
    for name in MODELS:
        _, g, x, C = query(name, batch)
        for method in ("ibp", "crown"):
            w = Workload.of(g, batch=batch, method=method)
            k = default(g, w)
            for part, knobs in (("default", k), ("unfused", k.replace(
                    partition=tuple(False for _ in k.partition)))):
                runs = {}
                for storage in ("reuse", "none"):
                    bundle = plan(g, w, knobs.replace(storage=storage))
                    out = TorchExecutor(bundle, g).run(x, C, measure_memory=True)
                    runs[storage] = (out, bundle.peak_bytes(batch))
                (r, pr), (n, pn) = runs["reuse"], runs["none"]
                same = torch.equal(r.lower, n.lower) and torch.equal(r.upper, n.upper)
                saving = 1 - r.stats["peak_bytes"] / n.stats["peak_bytes"]
                print(f"{name:<16} {method:<10} {part:<9} "
                      f"{r.stats['peak_bytes']:>9} ({pr:>6}) {n.stats['peak_bytes']:>9} "
                      f"({pn:>6}) {saving:>7.0%}  {'equal' if same else 'DIFFER'}")


def cache_table(batch: int, repeat: int) -> None:
    print(f"\n2. bound cache at batch {batch}: median ms per query "
          f"(speed-up against no cache)")
    print(f"{'model':<16} {'method':<12} {'no cache':>9} {'same query':>16} "
          f"{'other spec':>16}  hits/query")
    for name in MODELS:
        _, g, x, C = query(name, batch)
        n_out = int(np.prod(g.output_shape))
        other = margin_spec((np.arange(batch) + 1) % n_out, n_out)
        for method in ("crown", "alpha-crown"):
            exe = TorchExecutor(plan(g, Workload.of(g, batch=batch, method=method)), g)
            reps = max(3, repeat // (10 if method == "alpha-crown" else 1))
            cold = median_seconds(lambda: exe.run(x, C), reps)
            cache = BoundCache()
            exe.run(x, C, reuse_ibp=True, cache_bounds=True, cache=cache)
            before = cache.stats()["hits"]
            warm = median_seconds(lambda: exe.run(x, C, cache_bounds=True, cache=cache), reps)
            hits = (cache.stats()["hits"] - before) / (reps + max(1, min(3, reps // 10)))

            def partial():
                cache.clear()                   # only intermediate bounds survive
                exe.run(x, C, reuse_ibp=True, cache=cache)
                t0 = time.perf_counter()
                exe.run(x, other, reuse_ibp=True, cache=cache)
                return time.perf_counter() - t0
            part = sorted(partial() for _ in range(reps))[reps // 2]
            print(f"{name:<16} {method:<12} {cold * 1e3:>9.2f} {warm * 1e3:>8.3f} "
                  f"({cold / warm:>5.0f}x) {part * 1e3:>8.2f} ({cold / part:>5.1f}x)  {hits:.1f}")


def overhead_table(batch: int, repeat: int) -> None:
    print(f"\n3. overhead at batch {batch}: median ms")
    print(f"{'model':<16} {'method':<10} {'plan()':>8} {'executor':>9} {'direct':>8} "
          f"{'exec/direct':>11} {'forward':>8} {'exec/fwd':>9}")
    for name in MODELS:
        ex, g, x, C = query(name, batch)
        xt = torch.as_tensor(x.center)
        module = ex.model if isinstance(ex.model, torch.nn.Module) else digits_module(name)
        for method in ("ibp", "crown"):
            w = Workload.of(g, batch=batch, method=method)
            t_plan = median_seconds(lambda: plan(g, w), max(3, repeat // 5))
            exe = TorchExecutor(plan(g, w), g)
            t_exec = median_seconds(lambda: exe.run(x, C), repeat)
            opts = BoundOptions(method)
            t_direct = median_seconds(lambda: bound_spec(g, x, C, opts, torch.float32), repeat)
            with torch.no_grad():
                t_fwd = median_seconds(lambda: module(xt), repeat)
            print(f"{name:<16} {method:<10} {t_plan * 1e3:>8.2f} {t_exec * 1e3:>9.3f} "
                  f"{t_direct * 1e3:>8.3f} {t_exec / t_direct:>11.2f} {t_fwd * 1e3:>8.3f} "
                  f"{t_exec / t_fwd:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tables", default="123", help="which tables to print (default 123)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if "1" in args.tables:
        storage_table(args.batch)
    if "2" in args.tables:
        cache_table(args.batch, args.repeat)
    if "3" in args.tables:
        overhead_table(args.batch, args.repeat)


if __name__ == "__main__":
    main()
