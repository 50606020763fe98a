"""ReLU-split branch-and-bound against one bound, on robustness properties of a bundled model.

    python benchmarks/bench_relu_bab.py [--model digits_mlp] [--eps 0.08,0.1] [--samples 16]
                                        [--timeout 20] [--variants plain,beta,beta-reuse]

Per sample and eps, the property "the predicted class stays the largest output" over the L∞
ball: proven by one CROWN bound, or by each ReLU-split BaB variant (the rows CROWN leaves
open; each search its own timeout), or refuted by the falsifier. Variants: ``plain`` (no
multipliers, intermediate bounds refined per domain), ``beta`` (beta-CROWN's multipliers,
refined), ``beta-reuse`` (multipliers, the parent's intermediate bounds reused). Prints, per
eps, how many samples each decides (CROWN's count included) and the searches' median time
and domains per second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

import boundflow as bf
from boundflow.bab import BabConfig, relu_split
from boundflow.domains.concrete import evaluate
from boundflow.examples import DATA, load
from boundflow.api import as_graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_mlp")
    parser.add_argument("--eps", default="0.08,0.1")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="plain,beta,beta-reuse")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ex = load(args.model)
    x_all = np.load(DATA / "digits_x.npy").astype(np.float32)[:args.samples]
    graph = as_graph(ex.model, torch.from_numpy(x_all[:1]))
    print(f"{args.model}, {len(x_all)} samples, {args.threads} thread(s), timeout "
          f"{args.timeout:g} s per search, load {os.getloadavg()[0]:.2f}")
    variants = {"plain": BabConfig(batch=256, beta_iterations=0),
                "beta": BabConfig(batch=256, beta_iterations=20),
                "beta-reuse": BabConfig(batch=256, beta_iterations=20, intermediate="reuse")}
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(variants))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(variants)}")
    header = f"{'eps':>6} {'crown':>6} {'sat':>4} " + " ".join(
        f"{n + ' ok':>{max(8, len(n) + 3)}} {'s':>6} {'dom/s':>7}" for n in names)
    print(header)
    print("-" * len(header))
    for eps in (float(e) for e in args.eps.split(",")):
        counts = {"crown": 0, "sat": 0, **{n: 0 for n in names}}
        times = {n: [] for n in names}
        rates = {n: [] for n in names}
        for x in x_all:
            label = int(evaluate(graph, torch.from_numpy(x[None])).argmax())
            C = bf.margin_spec(np.array([label]), 10).C
            lower = bf.compute_bounds(graph, x[None], eps=eps, C=C,
                                      method="crown").lower[0].numpy()
            rows = [j for j in range(9) if lower[j] <= 0]
            if not rows:
                counts["crown"] += 1
                for n in names:
                    counts[n] += 1
                continue
            for n in names:
                t0 = time.perf_counter()
                res = relu_split(graph, (x - eps).reshape(-1), (x + eps).reshape(-1),
                                 C[0][rows], np.zeros(len(rows)),
                                 [(k, k + 1) for k in range(len(rows))], variants[n],
                                 deadline=time.monotonic() + args.timeout)
                if res.status == "sat":
                    counts["sat"] += 1
                    break
                counts[n] += res.status == "unsat"
                times[n].append(time.perf_counter() - t0)
                rates[n].append(res.domains_per_second)
        med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
        rate = {k: statistics.median(v) if v else float("nan") for k, v in rates.items()}
        print(f"{eps:>6g} {counts['crown']:>6} {counts['sat']:>4} " + " ".join(
            f"{counts[n]:>{max(8, len(n) + 3)}} {med[n]:>6.2f} {rate[n]:>7.0f}" for n in names))

if __name__ == "__main__":
    main()
