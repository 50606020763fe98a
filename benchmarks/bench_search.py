"""Search efficiency: strategies against an exhaustively measured space.

    python benchmarks/bench_search.py [--model digits_mlp] [--method crown-ibp] [--batch 8]
                                      [--table search_table.db] [--out search_curve]

Every plan of the workload's tuning space on the torch backend (partition, domains, final,
forms, storage: 3,072 assignments for the digits MLP) is measured once with the local runner
and kept in ``--table`` (re-runs reuse it; its rows of plans the space no longer holds are
left out). Then each strategy (random, greedy, beam, cpsat;
cost model refitted every round, as in ``boundflow tune``) runs against that table: a proposal's
"measurement" is its row. The objective is the tuner's default (fastest plan at the default
plan's tightness). Prints, per strategy and seed, how many measurements it took to get within
5% of the best plan of the whole space (model-guided strategies stop there; random search
runs the whole budget), and writes the best-so-far curves as CSV and PNG.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import time
from pathlib import Path

import numpy as np
import torch

from boundflow.api import as_graph, query
from boundflow.db import Database
from boundflow.examples import load
from boundflow.measure import LocalRunner, MeasureConfig, MeasureInput, MeasureResult
from boundflow.search import Objective, Tuner, TuneSpace
from boundflow.ir.workload import Workload


class TableRunner:
    """A runner that answers from a table of measurements (plan key → result)."""

    name = "table"

    def __init__(self, table: dict[str, MeasureResult]):
        self.table = table

    def run(self, inputs, builds):
        return [self.table[i.key] for i in inputs]

    def close(self):
        pass


class NoBuilder:
    def build(self, inputs):
        from boundflow.measure import BuildResult
        return [BuildResult(None) for _ in inputs]

    def close(self):
        pass


def measure_space(space: TuneSpace, graph, lower, upper, C, path: Path, config) -> dict:
    """Every plan of ``space`` measured (reusing the rows already in ``path``)."""
    table: dict[str, MeasureResult] = {}
    with Database(path) as db:
        for r in db.records_for_training(space.workload, include_failed=True):
            table[r.candidate.key] = r.measurement.result
        bundles, keys = {}, set()
        for a in itertools.product(*(d.choices for d in space.decisions)):
            b = space.bundle(a)
            keys.add(b.key)
            if b.key not in table:
                bundles[b.key] = b
        table = {k: r for k, r in table.items() if k in keys}
        todo = list(bundles.values())
        print(f"space: {space.size} assignments, {len(table) + len(todo)} distinct plans, "
              f"{len(todo)} to measure", flush=True)
        runner = LocalRunner(config)
        start = time.monotonic()
        try:
            for i in range(0, len(todo), 64):
                part = todo[i:i + 64]
                inputs = [MeasureInput(b, graph, lower, upper, C, "torch") for b in part]
                builds = NoBuilder().build(inputs)
                for b, r in zip(part, runner.run(inputs, builds)):
                    db.add_measurement(b, r)
                    table[b.key] = r
                print(f"  measured {min(i + 64, len(todo))}/{len(todo)} "
                      f"({time.monotonic() - start:.0f} s)", flush=True)
        finally:
            runner.close()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_mlp")
    parser.add_argument("--method", default="crown-ibp")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--table", type=Path, default=Path("search_table.db"))
    parser.add_argument("--out", type=Path, default=Path("search_curve"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.25,
                        help="fraction of the space each strategy may measure")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ex = load(args.model)
    g = as_graph(ex.model, torch.as_tensor(ex.inputs[:1]).float())
    rows = np.arange(args.batch) % len(ex.inputs)
    g, spec, linear, _, _ = query(g, ex.inputs[rows].astype(np.float32), eps=0.01)
    w = Workload.of(g, batch=args.batch, n_specs=linear.n_specs, method=args.method,
                    bounds="lower")                  # the workload the tuner tunes: verify's
    space = TuneSpace(g, w, "torch")
    config = MeasureConfig(number=5, repeat=5, warmup=2, timeout_s=60)
    table = measure_space(space, g, spec.lower, spec.upper, linear.C, args.table, config)
    objective = Objective.parse("time@width")
    default_key = space.bundle(space.default()).key
    ref = table[default_key]
    values = {k: objective.measured(r, ref) for k, r in table.items()}
    best = min(values.values())
    n_plans = len(table)
    budget = int(args.budget * n_plans)
    print(f"{n_plans} plans; default {ref.median_s * 1e3:.3f} ms; best at equal tightness "
          f"{math.exp(best) * 1e3:.3f} ms ({ref.median_s / math.exp(best):.2f}x); "
          f"{sum(math.isfinite(v) for v in values.values())} plans as tight as the default; "
          f"budget {budget} measurements ({args.budget:.0%})")
    curves = []
    print(f"{'strategy':<8} {'seed':>4} {'to within 5%':>13} {'best at budget':>15}")
    for strategy in ("random", "greedy", "beam", "cpsat"):
        for seed in range(args.seeds):
            with Database(":memory:") as db:
                tuner = Tuner(g, spec.lower, spec.upper, linear.C, method=args.method, db=db,
                              strategy=strategy, backend="torch", seed=seed, batch_size=8,
                              builder=NoBuilder(), runner=TableRunner(table), progress=False)
                report = tuner.tune(trials=budget, stop=None if strategy == "random" else
                                    (lambda v: v <= best + math.log(1.05)))
            reached = next((n for n, v in report.curve if v <= best + math.log(1.05)), None)
            final = report.curve[-1][1]
            print(f"{strategy:<8} {seed:>4} {reached if reached else '-':>13} "
                  f"{math.exp(final) * 1e3:>12.3f} ms", flush=True)
            curves += [(strategy, seed, n, math.exp(v) * 1e3 if math.isfinite(v) else "")
                       for n, v in report.curve]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["strategy", "seed", "measurements", "best_ms"])
        writer.writerows(curves)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"random": "grey", "greedy": "tab:orange", "beam": "tab:blue", "cpsat": "tab:green"}
    for strategy in colours:
        for seed in range(args.seeds):
            pts = [(n, v) for s, sd, n, v in curves if s == strategy and sd == seed and v != ""]
            if pts:
                ax.step(*zip(*pts), where="post", color=colours[strategy], alpha=0.8,
                        label=strategy if seed == 0 else None)
    ax.axhline(math.exp(best) * 1e3 * 1.05, color="black", ls="--", lw=0.8,
               label="best of the space + 5%")
    ax.set_xlabel("plans measured")
    ax.set_ylabel("best time so far (ms), at the default's tightness")
    ax.set_title(f"{args.model} {args.method} batch {args.batch}: {n_plans} plans")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
