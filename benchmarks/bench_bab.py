"""Branch-and-bound on the default plan and on a tuned plan, side by side in one run.

    python benchmarks/bench_bab.py --db tuned.db [--onnx ...] [--vnnlib ...] [--rounds 3]

First ``boundflow tune --onnx ONNX --vnnlib VNNLIB --db tuned.db`` records a plan for the
search's bound workload (``--bab-batch`` sub-boxes by ``--bab-method``). Then each round runs
the same input-split search twice, on the default plan (torch, what ``verify`` runs without
``--db``) and on the tuned one (``verify --db``), interleaved; medians. Reported: the plan's
set-up (look-up, import of its backend, compile or load; paid once per process), the search
to a verdict, the time in bound calls, domains bounded and domains per second. The verdict
and domain count must agree (the plans bound the same domains to the same tightness, the
objective time@width keeps it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from boundflow.bab import BabConfig, input_split
from boundflow.bab.bounder import PlanBounder
from boundflow.frontend.onnx import load_onnx
from boundflow.frontend.vnnlib import load_vnnlib

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "acasxu"


class _Timed:
    """A bounder that adds up its own time."""

    def __init__(self, inner: PlanBounder):
        self.inner, self.dtype, self.seconds = inner, inner.dtype, 0.0

    @property
    def calls(self) -> int:
        return self.inner.calls

    def __call__(self, lo, hi):
        t0 = time.perf_counter()
        out = self.inner(lo, hi)
        self.seconds += time.perf_counter() - t0
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path,
                        default=BENCH / "onnx" / "ACASXU_run2a_1_1_batch_2000.onnx")
    parser.add_argument("--vnnlib", type=Path, default=BENCH / "vnnlib" / "prop_3.vnnlib")
    parser.add_argument("--db", required=True, help="the database `boundflow tune --vnnlib` "
                        "wrote")
    parser.add_argument("--bab-batch", type=int, default=1024)
    parser.add_argument("--bab-method", default="crown")
    parser.add_argument("--branching", default="combined",
                        help="combined (default), sensitivity, coefficients or widest (a "
                        "much longer search)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per search (it then ends in timeout)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    graph = load_onnx(args.onnx)
    prop = load_vnnlib(args.vnnlib, int(np.prod(graph.input_shape)),
                       int(np.prod(graph.output_shape)))
    box, spec, ranges = [g for g in prop.groups() if g[1] is not None][0]
    config = BabConfig(batch=args.bab_batch, method=args.bab_method,
                       branching=args.branching)
    setup, rows = {}, {"default": [], "tuned": []}
    bounders = {}
    for name, db in (("default", None), ("tuned", args.db)):
        t0 = time.perf_counter()
        bounders[name] = PlanBounder(graph, spec.C[0], method=config.method,
                                     batch=config.batch, db=db, switch_after=0)
        setup[name] = time.perf_counter() - t0
    if not bounders["tuned"].tuned:
        raise SystemExit(f"{args.db} holds no tuned plan for this workload: run boundflow tune "
                         f"--onnx {args.onnx} --vnnlib {args.vnnlib} --db {args.db} first")
    for _ in range(args.rounds):
        for name in ("default", "tuned"):
            b = _Timed(bounders[name])
            calls0 = bounders[name].calls
            deadline = None if args.timeout is None else time.monotonic() + args.timeout
            res = input_split(graph, box.lower[0], box.upper[0], spec.C[0], spec.threshold[0],
                              ranges, config, bounder=b, deadline=deadline)
            rows[name].append((res.status, res.seconds, b.seconds, res.domains,
                               bounders[name].calls - calls0))
    load = os.getloadavg()[0]
    print(f"{args.onnx.name} {args.vnnlib.name}: input-split BaB ({config.branching} "
          f"branching), {config.method}, batch "
          f"{config.batch}, {args.threads} thread(s), median of {args.rounds} rounds, load "
          f"{load:.2f}")
    header = (f"{'plan':<8} {'backend':<7} {'setup s':>8} {'verdict':>8} {'search s':>9} "
              f"{'bound s':>8} {'domains':>8} {'calls':>6} {'dom/s':>8} {'setup+search':>13}")
    print(header)
    print("-" * len(header))
    out = {}
    for name in ("default", "tuned"):
        r = rows[name]
        search = statistics.median(x[1] for x in r)
        bound = statistics.median(x[2] for x in r)
        domains = statistics.median(x[3] for x in r)
        out[name] = search
        print(f"{name:<8} {bounders[name].verifier.backend:<7} {setup[name]:>8.2f} "
              f"{r[0][0]:>8} {search:>9.2f} {bound:>8.2f} {domains:>8.0f} {r[0][4]:>6} "
              f"{domains / search:>8.0f} {setup[name] + search:>13.2f}")
    verdicts = {x[0] for r in rows.values() for x in r}
    rate = {k: statistics.median(x[3] / x[1] for x in rows[k]) for k in rows}
    print(f"search speedup tuned/default {out['default'] / out['tuned']:.2f}x, domains/s "
          f"{rate['tuned'] / rate['default']:.2f}x; verdicts {sorted(verdicts)}")


if __name__ == "__main__":
    main()
