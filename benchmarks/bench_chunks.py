"""Bound tasks over the whole batch against chunks sized to the cache
(boundflow/backend/chunks.py), side by side in one run.

    python benchmarks/bench_chunks.py [--rounds 3] [--rows cnn@32:crown,...] [--no-vnncomp]
                                      [--threads 1] [--out benchmarks/results/chunks]

Part 1, per row (``model@batch:method``; models as in ``bench_kernels.py``: the shared
auto_LiRPA ``mlp`` and ``cnn`` with their inputs and eps, the ``deep``, ``residual`` and
``plain_cnn`` examples): the default plan on the torch path (``--threads``, default one)
with its bound tasks over the whole batch (``BOUNDFLOW_CHUNK_BYTES=0``, what every earlier
version ran) and in chunks of each budget (1, 2, 4 MiB; 2 MiB is the default). Speed
depends on the process's heap history, so each measurement is a fresh process (warm-up,
then calls for 2 s; median ms, minor page faults per call, a forward pass's ms); in each
round every setting once, each round starting with the next setting; medians over rounds.
``whole / chunked`` > 1: the default rule is faster. ``aL x`` is the implied speedup over
auto_LiRPA (``alirpa_over_forward / (ms / forward_ms)``, shared models at batch 1 and 32,
one thread). The bounds under every setting must agree (``gap``, in this process).

Part 2: every instance of ``../shared/benchmarks/instances.csv`` decided by ``boundflow
vnncomp`` (its defaults: torch, every core) in a fresh process per setting and round, the
settings' order alternating: the solving time per instance, total."""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import boundflow as bf
from boundflow.api import as_graph
from bench_kernels import ALPHA, alirpa_ratios, workload

ROOT = Path(__file__).resolve().parents[1]
INSTANCES = ROOT.parent / "shared" / "benchmarks" / "instances.csv"
BUDGETS = {"whole": 0, "1M": 1 << 20, "2M": 2 << 20, "4M": 4 << 20}
DEFAULT = "2M"
ROWS = ("cnn@32:crown,cnn@32:crown-ibp,cnn@32:ibp,mlp@32:crown,mlp@32:crown-ibp,"
        "residual@32:crown,residual@32:crown-ibp,plain_cnn@32:crown,deep@32:crown,"
        "cnn@1:crown,residual@8:alpha-crown,deep@1024:crown,deep@1024:crown-ibp,"
        "residual@256:crown-ibp")


def _set(budget: int) -> None:
    os.environ["BOUNDFLOW_CHUNK_BYTES"] = str(budget)


def _parse(spec: str):
    name, rest = spec.split("@")
    batch, method = rest.split(":")
    module, x, C, eps = workload(name, int(batch))
    graph = as_graph(module, torch.from_numpy(x[:1]))
    return name, method, module, x, C, eps, graph


def _child(spec: str) -> None:
    """One row under this process's ``BOUNDFLOW_CHUNK_BYTES``: after warm-up calls, calls for
    at least 2 s (3 or more); prints the median ms, minor page faults per call and the
    forward pass's median ms as JSON."""
    _, method, module, x, C, eps, graph = _parse(spec)
    xt = torch.from_numpy(x)

    def call():
        bf.compute_bounds(graph, x, eps=eps, C=C, method=method, alpha=ALPHA)
    call()
    call()
    fwd = []
    for _ in range(20):
        t0 = time.perf_counter()
        with torch.no_grad():
            module(xt)
        fwd.append(time.perf_counter() - t0)
    times, f0, t0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    while time.perf_counter() - t0 < 2.0 or len(times) < 3:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / len(times)
    print(json.dumps({"ms": 1e3 * statistics.median(times), "faults": faults,
                      "forward_ms": 1e3 * statistics.median(fwd)}))


def _gap(spec: str) -> float:
    """The largest difference between the bounds of the whole batch and of each budget."""
    _, method, _, x, C, eps, graph = _parse(spec)
    outs = []
    for budget in BUDGETS.values():
        _set(budget)
        outs.append(bf.compute_bounds(graph, x, eps=eps, C=C, method=method, alpha=ALPHA))
    os.environ.pop("BOUNDFLOW_CHUNK_BYTES", None)
    return max(float(max((o.lower - outs[0].lower).abs().max(),
                         (o.upper - outs[0].upper).abs().max())) for o in outs)


def calls(spec: str, rounds: int, ratios: dict, threads: int) -> dict:
    """One row: per round, a fresh process per setting (whole batch first)."""
    got: dict[str, list[dict]] = {k: [] for k in BUDGETS}
    keys = list(BUDGETS)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:     # each round starts later
            budget = BUDGETS[key]
            env = dict(os.environ, PYTHONPATH=str(ROOT), BOUNDFLOW_CHUNK_BYTES=str(budget))
            out = subprocess.run([sys.executable, __file__, "--child", spec, "--threads",
                                  str(threads)], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                raise SystemExit(f"{spec} failed: {out.stderr[-2000:]}")
            got[key].append(json.loads(out.stdout.splitlines()[-1]))
    ms = {k: statistics.median(r["ms"] for r in v) for k, v in got.items()}
    fwd = statistics.median(r["forward_ms"] for v in got.values() for r in v)
    name, batch = spec.split("@")[0], int(spec.split("@")[1].split(":")[0])
    method = spec.split(":")[1]
    row = {"row": spec, "forward_ms": fwd, "gap": _gap(spec),
           **{f"{k}_ms": v for k, v in ms.items()},
           **{f"{k}_faults": statistics.median(r["faults"] for r in v) for k, v in got.items()}}
    ref = ratios.get((name, batch, method)) if threads == 1 else None   # measured on one
    if ref is not None:
        row["alirpa_x_fwd"] = ref
        row["whole_vs_alirpa"] = ref / (ms["whole"] / fwd)
        row["chunked_vs_alirpa"] = ref / (ms[DEFAULT] / fwd)
    return row


def vnncomp(rounds: int) -> dict:
    """Solving seconds per instance and setting (whole, default)."""
    solve: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_chunks-"))
    for r in range(rounds):
        for key, budget in (("whole", "0"), (DEFAULT, None))[::1 if r % 2 == 0 else -1]:
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            env.pop("BOUNDFLOW_CHUNK_BYTES", None)
            if budget is not None:
                env["BOUNDFLOW_CHUNK_BYTES"] = budget
            table = tmp / f"{key}{r}.csv"
            out = subprocess.run([sys.executable, "-m", "boundflow.cli", "vnncomp", "--instances",
                                  str(INSTANCES), "--csv", str(table), "-q"], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                raise SystemExit(f"vnncomp failed: {out.stderr[-2000:]}")
            with open(table) as f:
                for row in csv.DictReader(f):
                    inst = f"{Path(row['onnx']).stem[:22]} {Path(row['vnnlib']).stem}"
                    solve.setdefault(inst, {}).setdefault(key, []).append(
                        (float(row["solve_s"]), row["status"]))
        print(f"vnncomp round {r + 1}/{rounds} done", flush=True)
    return solve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", default=ROWS)
    parser.add_argument("--no-vnncomp", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/chunks"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        _child(args.child)
        return
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    torch.set_num_threads(args.threads)
    ratios = alirpa_ratios()
    load0 = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} thread(s); load average before {load0:.2f}")
    head = (f"{'row':<22} {'fwd ms':>7} {'whole ms':>9} " +
            " ".join(f"{k + ' ms':>9}" for k in BUDGETS if k != "whole") +
            f" {'whole/chunked':>13} {'chunked xfwd':>12} {'aL x whole':>10} "
            f"{'aL x chunked':>12} {'faults whole':>12} {'chunked':>7} {'gap':>8}")
    print(head)
    print("-" * len(head))
    rows = []
    for spec in args.rows.split(","):
        r = calls(spec, args.rounds, ratios, args.threads)
        r["whole_over_chunked"] = r["whole_ms"] / r[f"{DEFAULT}_ms"]
        rows.append(r)
        aw, ac = r.get("whole_vs_alirpa"), r.get("chunked_vs_alirpa")
        print(f"{spec:<22} {r['forward_ms']:>7.3f} {r['whole_ms']:>9.1f} " +
              " ".join(f"{r[k + '_ms']:>9.1f}" for k in BUDGETS if k != "whole") +
              f" {r['whole_over_chunked']:>12.2f}x"
              f" {r[DEFAULT + '_ms'] / r['forward_ms']:>12.1f}"
              f" {'-' if aw is None else f'{aw:.2f}x':>10}"
              f" {'-' if ac is None else f'{ac:.2f}x':>12}"
              f" {r['whole_faults']:>12.0f} {r[DEFAULT + '_faults']:>7.0f} {r['gap']:>8.1e}",
              flush=True)
    os.environ.pop("BOUNDFLOW_CHUNK_BYTES", None)
    if not args.no_vnncomp and INSTANCES.exists():
        solve = vnncomp(args.rounds)
        print("\n| instance | verdict | whole-batch solve s | chunked solve s | whole / chunked |")
        print("|---|---|---:|---:|---:|")
        tw = tc = 0.0
        for inst, by in solve.items():
            w = statistics.median(s for s, _ in by["whole"])
            c = statistics.median(s for s, _ in by[DEFAULT])
            verdicts = {v for runs in by.values() for _, v in runs}
            tw, tc = tw + w, tc + c
            print(f"| {inst} | {'/'.join(sorted(verdicts))} | {w:.3f} | {c:.3f} | "
                  f"{w / c if c else float('nan'):.2f} |")
            rows.append({"row": "vnncomp " + inst, "whole_ms": w * 1e3, f"{DEFAULT}_ms": c * 1e3,
                         "whole_over_chunked": w / c if c else None})
        print(f"| all instances | | {tw:.3f} | {tc:.3f} | {tw / tc:.2f} |")
    print(f"\ncommand: {command}\nload: {load0:.2f} before, {os.getloadavg()[0]:.2f} after")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
