"""Build the cost model's training set: random legal plans of many workloads, measured.

    python tools/costmodel_dataset.py --db costmodel.db [--plans 16] [--methods crown-ibp,crown]
                                      [--batches 1,8] [--backends torch] [--only NAME,...]
                                      [--seconds S]

Workloads: every example of ``boundflow.examples`` (margin specs of the predicted classes,
eps 0.01) x ``--methods`` x ``--batches``, and from ``../shared/benchmarks`` the ACAS Xu
network 1_1 (its ``prop_1`` box cut into a grid of sub-boxes: 32 for batch 1, 4^5 for
larger ones, as input splitting bounds boxes in bulk) and VNN-COMP's ``test_small``, at the
same batches. Each workload is tuned by :class:`boundflow.search.Tuner` with the ``random``
strategy up to ``--plans`` measured plans (the default plan is always the first), so the
database holds what ``boundflow tune`` would record: every plan's features, its
measurement, and failures with their error. Re-running with a larger ``--plans`` (or other
``--backends``) adds to the database; plans already measured are not measured again. Progress
is one line per workload; at the end, a line per workload count and the command to fit and
inspect a model on it (``boundflow costmodel inspect --db ...``).

``--refeature`` measures nothing: it brings the stored features of the same workloads up to
this BoundFlow's feature version (``Ranker.refeature``: each plan re-planned from its knobs),
so a new feature version does not need the measurements taken again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_tune import _example, _onnx  # noqa: E402
from boundflow.db import Database  # noqa: E402
from boundflow.examples import EXAMPLES  # noqa: E402
from boundflow.measure import MeasureConfig  # noqa: E402
from boundflow.search import Tuner  # noqa: E402


def workloads(methods, batches, only=None):
    names = list(EXAMPLES) + ["acasxu", "test_small"]
    for name in names:
        if only and name not in only:
            continue
        for method in methods:
            for batch in batches:
                yield name, method, (32 if batch == 1 else 4 ** 5) if name == "acasxu" \
                    else batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--plans", type=int, default=16)
    parser.add_argument("--methods", default="crown-ibp,crown")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--backends", default="torch")
    parser.add_argument("--only", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refeature", action="store_true",
                        help="only recompute the stored features of these workloads")
    parser.add_argument("--seconds", type=float, default=None,
                        help="a budget per workload (the tuner's, kept inside a round)")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    config = MeasureConfig(number=3, repeat=3, warmup=1, timeout_s=120, threads=1)
    todo = list(workloads(args.methods.split(","), [int(b) for b in args.batches.split(",")],
                          only))
    start = time.monotonic()
    print(f"{len(todo)} workloads x {args.plans} plans on {args.backends}, load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    with Database(args.db) as db:
        for i, (name, method, batch) in enumerate(todo):
            q = _example(name, batch) if name in EXAMPLES else _onnx(name, batch)
            tuner = Tuner(q.graph, q.lower, q.upper, q.C, method=method, db=db,
                          strategy="random", backend=tuple(args.backends.split(",")),
                          config=config, batch_size=8, seed=args.seed, progress=False)
            if args.refeature:
                n = tuner.ranker.refeature(db)
                tuner.close()
                print(f"[{i + 1}/{len(todo)}] {name} {method} batch {batch}: {n} plans "
                      f"refeatured", flush=True)
                continue
            try:
                report = tuner.tune(trials=args.plans, seconds=args.seconds)
            finally:
                tuner.close()
            print(f"[{i + 1}/{len(todo)}] {name} {method} batch {batch}: "
                  f"{report.measured_now} measured now, {report.measured_before} before, "
                  f"{time.monotonic() - start:.0f} s", flush=True)
    print(f"done in {time.monotonic() - start:.0f} s; inspect with: boundflow costmodel "
          f"inspect --db {args.db}")


if __name__ == "__main__":
    main()
