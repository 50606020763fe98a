"""Tuned plan vs default plan, measured side by side in one run.

    python benchmarks/bench_tune.py [--trials 20] [--db bench_tune.db] [--strategy cpsat]
                                    [--models digits_mlp,random_deep_mlp,digits_cnn,random_residual]

For the MLP, the deep MLP, the CNN and the residual example at batch 1 and 32 (CROWN-IBP,
margin specs, eps 0.01, Relax backend on llvm): ``boundflow tune``'s loop with ``--trials``
plans per workload (resumable: the database keeps them), then the default plan and the tuned
plan re-measured together by one runner (warm-up, 10 × 10 runs), with the bound width and the
fraction of samples verified each reaches. The median speedup is printed last. Then the cost
model's held-out quality over the workloads in the database (leave one workload out) against
the analytic baseline.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from boundflow.api import as_graph, query
from boundflow.costmodel.inspect import held_out
from boundflow.db import Database
from boundflow.examples import load
from boundflow.measure import LocalBuilder, LocalRunner, MeasureConfig, MeasureInput
from boundflow.search import Tuner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_mlp,random_deep_mlp,digits_cnn,"
                                            "random_residual")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--method", default="crown-ibp")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--strategy", default="cpsat")
    parser.add_argument("--db", default="bench_tune.db")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    config = MeasureConfig(number=5, repeat=5, warmup=2, timeout_s=300)
    with Database(args.db) as db:
        for name in args.models.split(","):
            ex = load(name)
            g0 = as_graph(ex.model, torch.as_tensor(ex.inputs[:1]).float())
            for batch in (int(b) for b in args.batches.split(",")):
                idx = np.arange(batch) % len(ex.inputs)
                g, spec, linear, _, _ = query(g0, ex.inputs[idx].astype(np.float32), eps=0.01)
                tuner = Tuner(g, spec.lower, spec.upper, linear.C, method=args.method, db=db,
                              strategy=args.strategy, config=config, batch_size=4)
                try:
                    report = tuner.tune(trials=args.trials)
                finally:
                    tuner.close()
                rows.append((name, batch, g, spec, linear, report))
        final = MeasureConfig(number=10, repeat=10, warmup=3, timeout_s=300)
        builder, runner = LocalBuilder(), LocalRunner(final)
        inputs = []
        for name, batch, g, spec, linear, report in rows:
            default = report.default_bundle
            inputs += [MeasureInput(b, g, spec.lower, spec.upper, linear.C, "relax")
                       for b in (default, report.best_bundle)]
        try:
            results = runner.run(inputs, builder.build(inputs))
        finally:
            builder.close()
            runner.close()
        print(f"\n{'workload':<24} {'B':>3} {'default ms':>11} {'tuned ms':>9} {'speedup':>8} "
              f"{'width def':>10} {'width tuned':>11} {'verified':>9} {'kernels':>8}")
        speedups = []
        for i, (name, batch, _, _, _, report) in enumerate(rows):
            d, t = results[2 * i], results[2 * i + 1]
            if not (d.ok and t.ok):
                print(f"{name:<24} {batch:>3} failed: {d.error or t.error}")
                continue
            s = d.median_s / t.median_s
            speedups.append(s)
            print(f"{name:<24} {batch:>3} {d.median_s * 1e3:>11.3f} {t.median_s * 1e3:>9.3f} "
                  f"{s:>7.2f}x {d.mean_width:>10.5g} {t.mean_width:>11.5g} "
                  f"{d.verified_fraction:>4.2f}/{t.verified_fraction:<4.2f} "
                  f"{d.n_kernels:>3}/{t.n_kernels:<4}")
        if speedups:
            print(f"median speedup {np.median(speedups):.2f}x over {len(speedups)} workloads "
                  f"({args.trials} trials each, strategy {args.strategy})")
        m = held_out(db)
        if m:
            print("\ncost model, leave one workload out (ranking plans of the held-out workload):")
            print(f"{'model':<10} {'spearman':>9} {'kendall':>8} {'top-5 recall':>13} "
                  f"{'MAPE':>8}")
            for model_name, metrics in m.items():
                print(f"{model_name:<10} {metrics['spearman']:>9.3f} {metrics['kendall']:>8.3f} "
                      f"{metrics['top_k_recall']:>13.2f} {metrics['mape']:>8.2f}")


if __name__ == "__main__":
    main()
