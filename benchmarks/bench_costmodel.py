"""The shipped cost model on workloads it never saw: zero-shot ranking and warm-started tuning.

    python benchmarks/bench_costmodel.py --db costmodel.db
        [--held-out random_residual@8:crown-ibp,digits_cnn@1:crown,acasxu@32:crown]
        [--trials 48] [--strategy greedy] [--out benchmarks/results/costmodel_warm]

``--db`` is a training database (``tools/costmodel_dataset.py``). The ``--held-out``
workloads (``example@batch:method``; ``acasxu`` and ``test_small`` from ../shared/benchmarks
as in ``bench_tune.py``) are left out of a training set built from it, which stands in for
the shipped one. Then, per held-out workload, on the torch backend:

* **zero-shot**: the model ranks 2,000 sampled plans of the workload's space without
  measuring any; its top plan is measured beside the best plan the tunes below found, in
  one final runner pass (ratio: top plan time / best time; aim <= 1.2);
* **warm vs cold**: ``--trials`` measurements of ``--strategy`` with the model starting
  from the training set, and again cold (analytic, then the workload's own data), each in a
  fresh database: how many trials each needs to come within 5% of the best either found
  (aim: warm in at most a third of cold's).

Prints the leave-one-workload-out quality over the whole database first, then a table;
writes the best-so-far curves as CSV and PNG (``--out``), with the command and the load.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_tune import _example, _onnx  # noqa: E402
from boundflow.costmodel import pretrained  # noqa: E402
from boundflow.costmodel.inspect import held_out, training_set  # noqa: E402
from boundflow.db import Database  # noqa: E402
from boundflow.examples import EXAMPLES  # noqa: E402
from boundflow.ir.workload import Workload  # noqa: E402
from boundflow.measure import LocalRunner, MeasureConfig, MeasureInput  # noqa: E402
from boundflow.measure.result import BuildResult  # noqa: E402
from boundflow.search import Objective, Tuner  # noqa: E402
from boundflow.search.ranking import Ranker  # noqa: E402
from boundflow.search.space import TuneSpace  # noqa: E402


def _query(spec: str):
    name_batch, method = spec.split(":")
    name, batch = name_batch.split("@")
    q = _example(name, int(batch)) if name in EXAMPLES else _onnx(name, int(batch))
    w = Workload.of(q.graph, batch=int(q.lower.shape[0]), n_specs=int(q.C.shape[1]),
                    method=method)
    return q, method, w


def _to_5pct(curve, best):
    return next((n for n, v in curve if v <= best + math.log(1.05)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--held-out", default="random_residual@8:crown-ibp,digits_cnn@1:crown,"
                                              "acasxu@32:crown")
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--strategy", default="greedy")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/costmodel_warm"))
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    load0 = os.getloadavg()[0]
    held = [_query(s) for s in args.held_out.split(",")]
    with Database(args.db) as db:
        quality = held_out(db)
        X, Y, groups = training_set(db.records_for_training())
    print(f"training database {args.db}: {len(X)} measured plans of "
          f"{len(np.unique(groups))} workloads; leave one workload out:")
    for name, h in quality.items():
        print(f"  {name:<8} spearman {h['spearman']:.3f}  kendall {h['kendall']:.3f}  top-5 "
              f"recall {h['top_k_recall']:.2f}  relative-time MAPE {h['mape']:.2f}  "
              f"({h['groups']} workloads)")
    keep = ~np.isin(groups, [w.key for _, _, w in held])
    tmp = Path(tempfile.mkdtemp(prefix="bench_costmodel-"))
    pretrained.PATH = tmp / "train.json.gz"
    pretrained.save(pretrained.PATH, X[keep], {h: v[keep] for h, v in Y.items()},
                    groups[keep], {"bench": command})
    pretrained._CACHE.clear()
    print(f"training set without the held-out workloads: {int(keep.sum())} plans of "
          f"{len(np.unique(groups[keep]))} workloads (the shipped one is the same: "
          f"boundflow costmodel train --db {args.db} --exclude "
          f"{','.join(w.key[:16] for _, _, w in held)})")
    config = MeasureConfig(number=3, repeat=5, warmup=1, timeout_s=300, threads=1)
    rows, curves = [], []
    for q, method, w in held:
        runs = {}
        for mode in ("cold", "warm"):
            with Database(":memory:") as mem:
                tuner = Tuner(q.graph, q.lower, q.upper, q.C, method=method, db=mem,
                              strategy=args.strategy, backend="torch", config=config,
                              batch_size=4, seed=0, progress=False,
                              pretrained=mode == "warm")
                try:
                    t0 = time.monotonic()
                    report = tuner.tune(trials=args.trials)
                    runs[mode] = (report, time.monotonic() - t0)
                finally:
                    tuner.close()
        best = min(r.curve[-1][1] for r, _ in runs.values())
        # zero-shot: the warm model's top plan among sampled ones, unmeasured
        space = TuneSpace(q.graph, w, "torch")
        ranker = Ranker(q.graph, w)
        rng = random.Random(0)
        default = space.bundle(space.default())
        cands = {default.key: default}
        for _ in range(args.samples):
            b = space.bundle(space.sample(rng))
            cands.setdefault(b.key, b)
        bundles = list(cands.values())
        heads = ranker.predict(ranker.features([(b, "torch") for b in bundles]))
        objective = Objective.parse("time@width")   # the tuner's: as tight as the default
        value = objective.predicted(heads, float(heads["log_width"][0]))
        top = bundles[int(np.argmin(value))]
        best_bundle = min(runs.values(), key=lambda rt: rt[0].curve[-1][1])[0].best_bundle
        runner = LocalRunner(MeasureConfig(number=5, repeat=10, warmup=2, timeout_s=300,
                                           threads=1))
        try:
            res = runner.run([MeasureInput(b, q.graph, q.lower, q.upper, q.C, "torch")
                              for b in (top, best_bundle, default)], [BuildResult(None)] * 3)
        finally:
            runner.close()
        ratio = res[0].median_s / res[1].median_s if res[0].ok and res[1].ok else math.nan
        if res[0].ok and res[2].ok and res[0].mean_width > res[2].mean_width * 1.001:
            print(f"  ({q.name}: the zero-shot top plan is looser than the default: "
                  f"{res[0].mean_width:.4g} vs {res[2].mean_width:.4g})")
        name = f"{w.method} {q.name}"
        cold, warm = (_to_5pct(runs[m][0].curve, best) for m in ("cold", "warm"))
        rows.append((name, len(bundles), ratio, cold, warm, math.exp(best) * 1e3))
        for mode, (r, _) in runs.items():
            curves += [(name, mode, n, math.exp(v) * 1e3) for n, v in r.curve
                       if math.isfinite(v)]
        print(f"  {name}: zero-shot top plan {ratio:.2f}x the best found; to within 5%: cold "
              f"{cold}, warm {warm} trials", flush=True)
    print(f"\n| workload | sampled plans | zero-shot top / best | trials to 5%: cold | warm |")
    print("|---|---:|---:|---:|---:|")
    for name, n, ratio, cold, warm, _ in rows:
        print(f"| {name} | {n} | {ratio:.2f} | {cold or '-'} | {warm or '-'} |")
    print(f"\ncommand: {command}\nload: {load0:.2f} before, {os.getloadavg()[0]:.2f} after")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["workload", "mode", "trial", "best_ms"])
        writer.writerows(curves)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), squeeze=False)
    for ax, (name, *_rest) in zip(axes[0], rows):
        for mode, colour in (("cold", "tab:orange"), ("warm", "tab:blue")):
            pts = [(n, ms) for w_, m, n, ms in curves if w_ == name and m == mode]
            if pts:
                ax.step(*zip(*pts), where="post", label=mode, color=colour)
        ax.set_title(name)
        ax.set_xlabel("measured plans")
        ax.set_ylabel("best objective (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
