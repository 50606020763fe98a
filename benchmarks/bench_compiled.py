"""The compiled verifier's per-call overhead, beside the executor alone, `compute_bounds` and
a forward pass.

    python benchmarks/bench_compiled.py [--repeat 200] [--threads 1]

For the digits MLP and CNN at batch 1 (and 32), IBP and CROWN: ``bf.compile`` once, then in
interleaved rounds (medians): ``v.bounds(x, eps=...)`` (the user's call: box and spec built
and checked, plan run, bounds checked finite), ``executor.run(box, C)`` on a prebuilt box (the
plan alone: the "kernel" of the torch backend), ``bf.compute_bounds`` (the uncompiled API,
caches warm) and a plain forward pass of the model. Overhead = call - executor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

import boundflow as bf
import boundflow.examples as examples
from boundflow.domains.concrete import evaluate
from boundflow.ir.spec import InputSpec


def _time(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = np.load(examples.DATA / "digits_x.npy")
    rows = []
    for name in ("digits_mlp", "digits_cnn"):
        graph = bf.load_model(examples.DATA / f"{name}.pt2")
        for batch in (1, 32):
            x = np.resize(data, (batch,) + data.shape[1:]).astype(np.float32)
            labels = np.arange(batch) % 10
            C = bf.margin_spec(labels, 10)
            for method in ("ibp", "crown"):
                v = bf.compile(graph, batch=batch, method=method)
                box = InputSpec.linf(x, 0.01)
                exe = v._executor
                xt = torch.as_tensor(x)
                fns = {
                    "call": lambda: v.bounds(x, eps=0.01, C=C),
                    "executor": lambda: exe.run(box, C),
                    "compute_bounds": lambda: bf.compute_bounds(graph, x, eps=0.01, C=C,
                                                                method=method),
                    "forward": lambda: evaluate(v.graph, xt),
                }
                times = {k: [] for k in fns}
                for _ in range(args.rounds):
                    for k, fn in fns.items():
                        times[k].append(_time(fn, args.repeat))
                med = {k: statistics.median(t) for k, t in times.items()}
                rows.append((name, batch, method, med))
    load = os.getloadavg()
    print(f"{args.threads} thread(s); load average {load[0]:.2f}; medians of {args.rounds} "
          f"rounds x {args.repeat} calls; `python benchmarks/bench_compiled.py`")
    print("| model | batch | method | v.bounds µs | executor µs | overhead µs | "
          "compute_bounds µs | forward µs | call / forward |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, batch, method, m in rows:
        print(f"| {name} | {batch} | {method} | {m['call'] * 1e6:.1f} | "
              f"{m['executor'] * 1e6:.1f} | {(m['call'] - m['executor']) * 1e6:.1f} | "
              f"{m['compute_bounds'] * 1e6:.1f} | {m['forward'] * 1e6:.1f} | "
              f"{m['call'] / m['forward']:.1f} |")


if __name__ == "__main__":
    main()
