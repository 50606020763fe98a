"""alpha-CROWN for a verdict (the lower bounds only) against both sides, side by side.

    python benchmarks/bench_lower_only.py [--rounds 5] [--threads 1]
                                          [--rows cnn@1,mlp@1,residual@1,deep@1,mlp@32,
                                                  acasxu@32]

``verify`` (and branch-and-bound) read only the lower bounds of ``C·y``; since this change
alpha-CROWN then optimises the lower side only, where it used to optimise both (what
``compute_bounds`` still does). Per row (``model@batch``: the models of ``bench_kernels.py``
and their margin specs; ``acasxu``: ACAS Xu 1_1 with property 1's box cut into ``batch``
sub-boxes, as in ``bench_tune.py``; alpha-CROWN with bench_kernels' settings), in one
process, in
interleaved rounds after a warm-up: ``boundflow.verify`` (lower side) and
``boundflow.compute_bounds`` (both sides, the old verify's work), with a forward pass.
Prints median ms, the ratio (both / lower: > 1 means verify got faster), whether the lower
bounds agree, and the command and the machine's load.

``--tune N`` (with ``--tune-row``, default ``deep@8``) also tunes that row's workload twice,
``N`` trials each on the torch backend in a fresh in-memory database: as ``boundflow tune``
does now (``bounds="lower"``: candidates timed making verify's call) and as it did before
(``bounds="both"``). Printed: the tune's wall seconds and the default plan's time as the
tuner measured it, to set beside the verify and both-sides times of the table.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402
import bench_tune  # noqa: E402

import boundflow as bf  # noqa: E402
from boundflow.domains.concrete import evaluate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="cnn@1,mlp@1,residual@1,deep@1,mlp@32,acasxu@32")
    ap.add_argument("--tune", type=int, default=0, help="trials of each tune (0: none)")
    ap.add_argument("--tune-row", default="deep@8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# python benchmarks/bench_lower_only.py {shlex.join(sys.argv[1:])}\n"
          f"# {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {args.threads} "
          f"thread(s), alpha {bk.ALPHA}; load average before {os.getloadavg()[0]:.2f}")
    print(f"{'row':<12} {'fwd ms':>8} {'both ms':>10} {'verify ms':>10} {'both/verify':>12} "
          f"{'lower gap':>10}")
    for spec in args.rows.split(","):
        name, batch = spec.split("@")
        if name == "acasxu":
            q = bench_tune.make(spec)
            graph, C, module = q.graph, q.C, None
            x, xt = bf.InputSpec.box(q.lower, q.upper), torch.from_numpy(q.lower)
            opts = dict(C=C, method="alpha-crown", alpha=bk.ALPHA)
        else:
            module, x, C, eps = bk.workload(name, int(batch))
            graph = bk.as_graph(module, torch.from_numpy(x[:1]))
            xt = torch.from_numpy(x)
            opts = dict(eps=eps, C=C, method="alpha-crown", alpha=bk.ALPHA)

        def forward():
            with torch.no_grad():
                module(xt) if module is not None else evaluate(graph, xt)
        fns = {"forward": forward, "both": lambda: bf.compute_bounds(graph, x, **opts),
               "verify": lambda: bf.verify(graph, x, **opts)}
        ms = bk.interleaved(fns, args.rounds)
        gap = float(np.abs(bf.verify(graph, x, **opts).bounds.lower.numpy()
                           - bf.compute_bounds(graph, x, **opts).lower.numpy()).max())
        print(f"{spec:<12} {ms['forward']:>8.3f} {ms['both']:>10.1f} {ms['verify']:>10.1f} "
              f"{ms['both'] / ms['verify']:>11.2f}x {gap:>10.1e}", flush=True)
    if args.tune:
        tune_both_ways(args.tune_row, args.tune, args.threads)
    print(f"load average after {os.getloadavg()[0]:.2f}")


def tune_both_ways(spec: str, trials: int, threads: int) -> None:
    """Tune ``spec``'s alpha-CROWN workload for the verdict's query and for both sides."""
    from boundflow.db import Database
    from boundflow.measure import MeasureConfig
    from boundflow.search import Tuner

    name, batch = spec.split("@")
    module, x, C, eps = bk.workload(name, int(batch))
    graph = bk.as_graph(module, torch.from_numpy(x[:1]))
    box = bf.InputSpec.linf(np.asarray(x, np.float32), eps)
    config = MeasureConfig(number=1, repeat=3, warmup=1, threads=threads)
    print(f"\ntune {spec} alpha-crown, {trials} trials, torch backend, {threads} thread(s)")
    print(f"{'tuned for':<10} {'tune s':>8} {'default ms (as measured)':>25} {'best ms':>9}")
    for bounds in ("lower", "both"):
        with Database(":memory:") as db:
            start = time.perf_counter()
            tuner = Tuner(graph, box.lower, box.upper, C, method="alpha-crown", db=db,
                          backend="torch", config=config, progress=False, bounds=bounds)
            try:
                report = tuner.tune(trials)
            finally:
                tuner.close()
            print(f"{bounds:<10} {time.perf_counter() - start:>8.1f} "
                  f"{report.default.median_s * 1e3:>25.1f} {report.best.median_s * 1e3:>9.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
