"""The default choices of the torch path against their alternatives: sparse intermediate bounds
(auto, the default, against every neuron and against IBP-unstable neurons only) for CROWN, and
alpha-CROWN's patch rule (``crown_conv.patches_pay``) against patches everywhere and dense.

    python benchmarks/bench_sparse.py [--rounds 10] [--rows mlp,cnn,deep,residual]
                                      [--methods crown,alpha-crown]

Rows as in ``bench_kernels.py`` (shared mlp and cnn at eps 8/255, their margin specs; ``deep``
and ``residual`` examples at eps 2/255; ``plain_cnn`` rides along), batch 1 and 32 for CROWN,
batch 1 for alpha-CROWN (10 iterations). One torch thread; each round times every variant of
a row once, in a random order per round; medians in ms. ``gap``: the largest difference of the
default's bounds from the reference variant's (every neuron; dense): float rounding only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import time

import torch

import boundflow as bf
from boundflow.api import as_graph
from boundflow.domains import alpha as alpha_mod, crown_conv
from bench_kernels import workload

ALPHA = bf.AlphaConfig(iterations=10)


@contextlib.contextmanager
def overhead(value):
    """alpha-CROWN's patch rule with ``PATCH_OVERHEAD = value`` (0: patches wherever
    covered; None: dense everywhere)."""
    saved = crown_conv.PATCH_OVERHEAD, alpha_mod.conv_chain
    if value is None:
        alpha_mod.conv_chain = lambda *args, **kwargs: None
    else:
        crown_conv.PATCH_OVERHEAD = value
    try:
        yield
    finally:
        crown_conv.PATCH_OVERHEAD, alpha_mod.conv_chain = saved


def shuffled(fns: dict, rounds: int) -> dict[str, float]:
    """Median ms of each function over interleaved rounds, after one warm-up each, in a
    random order per round (seeded): a slow variant leaves the caches and the allocator cold
    for whichever runs next, so no variant may always follow it."""
    for fn in fns.values():
        fn()
    order = random.Random(0)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k in order.sample(list(fns), len(fns)):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def variants(method: str) -> dict:
    """name -> (compute_bounds keywords, patch overhead); the first is the default."""
    if method == "crown":
        return {"auto": ({}, crown_conv.PATCH_OVERHEAD),
                "every": ({"sparse": False}, crown_conv.PATCH_OVERHEAD),
                "unstable": ({"sparse": True}, crown_conv.PATCH_OVERHEAD)}
    return {"rule": ({}, crown_conv.PATCH_OVERHEAD), "patches": ({}, 0), "dense": ({}, None)}


def row(name: str, batch: int, method: str, rounds: int) -> dict:
    module, x, C, eps = workload(name, batch)
    graph = as_graph(module, torch.from_numpy(x[:1]))

    def call(kwargs, value):
        def fn():
            with overhead(value):
                return bf.compute_bounds(graph, x, eps=eps, C=C, method=method, alpha=ALPHA,
                                         **kwargs)
        return fn
    fns = {k: call(*v) for k, v in variants(method).items()}
    names = list(fns)
    ref = "every" if method == "crown" else "dense"
    a, b = fns[names[0]](), fns[ref]()
    gap = float(max((a.lower - b.lower).abs().max(), (a.upper - b.upper).abs().max()))
    return {"name": name, "batch": batch, "method": method, "gap": gap,
            **shuffled(fns, rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rows", default="mlp,cnn,deep,residual,plain_cnn")
    parser.add_argument("--methods", default="crown,alpha-crown")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; load average before "
          f"{os.getloadavg()[0]:.2f}")
    for method in args.methods.split(","):
        for name in args.rows.split(","):
            for batch in (1, 32) if method == "crown" else (1,):
                slow = method == "alpha-crown" or (name == "cnn" and batch == 32)
                r = row(name, batch, method, max(3, args.rounds // 3) if slow else args.rounds)
                times = "  ".join(f"{k} {r[k]:9.2f}" for k in variants(method))
                first = list(variants(method))[0]
                ratios = "  ".join(f"{k}/{first} {r[k] / r[first]:5.2f}"
                                   for k in list(variants(method))[1:])
                print(f"{name:<9} {batch:>3} {method:<11} {times}  {ratios}  gap "
                      f"{r['gap']:.1e}", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
