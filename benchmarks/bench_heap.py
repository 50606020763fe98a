"""glibc malloc left alone against the steady heap (boundflow/heap.py), side by side.

    python benchmarks/bench_heap.py [--rounds 3] [--workloads acasxu@32:crown,...]
                                    [--out benchmarks/results/heap]

Whether a bound call's tensors come from reused heap memory or from fresh pages depends, under
glibc's default, on the process's history, so the comparison is between *processes*: each
round starts, for each setting in turn (``BOUNDFLOW_STEADY_HEAP=0``, then the default), a
fresh process per measurement:

* every instance of ``../shared/benchmarks/instances.csv`` decided in one process
  (``boundflow vnncomp``, its defaults: torch, every core): the solving time per instance;
* per workload (``example@batch:method``; ``acasxu`` and ``test_small`` as in
  ``bench_tune.py``), the default plan's whole call on the torch backend, one thread, timed
  for 3 s after 3 warm-up calls: median ms and minor page faults per call.

Prints medians over rounds and the ratio (malloc left alone / steady: > 1 means the steady
heap is faster), with the command and the machine's load; writes a CSV (``--out``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT.parent / "shared" / "benchmarks" / "instances.csv"
SETTINGS = (("glibc", "0"), ("steady", "1"))


def _child(spec: str) -> None:
    """Time one workload's default plan in this process; print JSON."""
    import resource
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_costmodel import _query
    from boundflow.measure import MeasureInput
    from boundflow.measure.builder import BuildResult
    from boundflow.measure.worker import Prepared
    from boundflow.search.space import TuneSpace

    torch.set_num_threads(1)
    q, _, w = _query(spec)
    space = TuneSpace(q.graph, w, "torch")
    p = Prepared(MeasureInput(space.bundle(space.default()), q.graph, q.lower, q.upper, q.C,
                              "torch"), BuildResult(None), "local")
    for _ in range(3):
        p.call()
    times, f0, t0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    while time.perf_counter() - t0 < 3.0 or len(times) < 5:
        t = time.perf_counter()
        p.call()
        times.append(time.perf_counter() - t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / len(times)
    print(json.dumps({"ms": statistics.median(times) * 1e3, "faults": faults}))


def _run(args: list[str], steady: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, BOUNDFLOW_STEADY_HEAP=steady, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {out.stderr[-2000:]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="acasxu@32:crown,acasxu@1:crown,"
                        "random_cnn@8:crown,random_residual@8:crown-ibp,digits_cnn@8:crown,"
                        "digits_mlp@8:crown")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/heap"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    load0 = os.getloadavg()[0]
    solve: dict = {}        # (instance, setting) -> [s]
    calls: dict = {}        # (workload, setting) -> [(ms, faults)]
    tmp = Path(tempfile.mkdtemp(prefix="bench_heap-"))
    for r in range(args.rounds):
        for name, steady in SETTINGS:
            table = tmp / f"{name}{r}.csv"
            _run(["-m", "boundflow.cli", "vnncomp", "--instances", str(INSTANCES), "--csv",
                  str(table), "-q"], steady)
            with open(table) as f:
                for row in csv.DictReader(f):
                    inst = f"{Path(row['onnx']).stem[:22]} {Path(row['vnnlib']).stem}"
                    solve.setdefault((inst, name), []).append(float(row["solve_s"]))
            for spec in args.workloads.split(","):
                got = json.loads(_run([__file__, "--child", spec], steady).stdout.splitlines()[-1])
                calls.setdefault((spec, name), []).append((got["ms"], got["faults"]))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    print("\n| instance | glibc solve s | steady solve s | glibc / steady |")
    print("|---|---:|---:|---:|")
    for inst in dict.fromkeys(k for k, _ in solve):
        g, s = (statistics.median(solve[(inst, n)]) for n, _ in SETTINGS)
        print(f"| {inst} | {g:.3f} | {s:.3f} | {g / s if s else float('nan'):.2f} |")
        rows.append(("vnncomp", inst, g * 1e3, s * 1e3, "", ""))
    tg, ts = (sum(statistics.median(solve[(i, n)]) for i in dict.fromkeys(k for k, _ in solve))
              for n, _ in SETTINGS)
    print(f"| all instances | {tg:.3f} | {ts:.3f} | {tg / ts:.2f} |")
    print("\n| workload (default plan, torch, 1 thread) | glibc ms | steady ms | glibc / steady "
          "| faults per call: glibc | steady |")
    print("|---|---:|---:|---:|---:|---:|")
    for spec in args.workloads.split(","):
        (gm, gf), (sm, sf) = ((statistics.median(x[0] for x in calls[(spec, n)]),
                               statistics.median(x[1] for x in calls[(spec, n)]))
                              for n, _ in SETTINGS)
        gr = ", ".join(f"{x[0]:.1f}" for x in calls[(spec, "glibc")])
        print(f"| {spec} | {gm:.2f} ({gr}) | {sm:.2f} | {gm / sm:.2f} | {gf:.0f} | {sf:.0f} |")
        rows.append(("call", spec, gm, sm, gf, sf))
    print(f"\ncommand: {command}\nload: {load0:.2f} before, {os.getloadavg()[0]:.2f} after")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "what", "glibc_ms", "steady_ms", "glibc_faults", "steady_faults"])
        w.writerows(rows)
    print(f"wrote {args.out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
