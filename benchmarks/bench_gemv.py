"""Batched matrix-vector products (boundflow/domains/gemv.py) and the one-number radius of an
L∞ box (boundflow/backend/torch.py ``box_value``), side by side with what they replace.

    python benchmarks/bench_gemv.py [--threads 1] [--rounds 15] [--rows mlp@32:crown,...]
                                    [--out benchmarks/results/gemv]

1. Kernels: ``A [B, S, k] · v [B, k]`` on shapes CROWN's concretisation meets, as torch's
   batched product of ``v.unsqueeze(-1)`` (what BoundFlow ran before), as :func:`bgemv`, as one
   ``torch.mv`` per sample, and as a product and a sum; median µs.
2. End to end: the default plan on the torch path (``boundflow.compute_bounds``) for each row
   (``model@batch:method``, the models of ``bench_kernels.py``), in one process, in
   interleaved rounds, under four settings: the old column or ``bgemv`` in every
   concretisation, the box radius's product always made or skipped for an L∞ box. Median ms
   and ratios (old / new: > 1 means the new code is faster), with a forward pass of the model
   timed in the same rounds.

Prints tables with the command and the machine's load; writes ``--out``.csv / .txt.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402

import boundflow as bf  # noqa: E402
from boundflow.backend import torch as torch_backend  # noqa: E402
from boundflow.domains import backward, crown_conv, gemv, interval  # noqa: E402

SHAPES = [(2, 256, 784), (32, 9, 784), (32, 256, 784), (64, 32, 300), (14, 9, 3072),
          (8, 512, 3072), (1024, 5, 50), (1024, 64, 256), (1, 100, 3072)]
ROWS = "mlp@32:ibp,cnn@32:ibp,deep@32:ibp,mlp@1:ibp,mlp@32:crown-ibp,cnn@32:crown-ibp," \
       "mlp@32:crown,residual@32:crown,cnn@32:crown,cnn@1:crown,deep@32:crown"
_HOLDERS = (backward, crown_conv, interval)       # the modules that call bgemv


def _old_column(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.matmul(A, v.unsqueeze(-1)).squeeze(-1)


def _timed(fn, budget_s: float = 0.2) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    n = max(3, min(500, int(budget_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def kernels() -> list[dict]:
    out = []
    for B, S, k in SHAPES:
        gen = torch.Generator().manual_seed(0)
        A, v = torch.randn(B, S, k, generator=gen), torch.randn(B, k, generator=gen)
        row = {"B": B, "S": S, "k": k,
               "old_us": _timed(lambda: _old_column(A, v)),
               "bgemv_us": _timed(lambda: gemv.bgemv(A, v)),
               "mv_loop_us": _timed(lambda: torch.stack([torch.mv(A[b], v[b])
                                                         for b in range(B)])),
               "mul_sum_us": _timed(lambda: (A * v.unsqueeze(1)).sum(-1))}
        row["old_over_bgemv"] = row["old_us"] / row["bgemv_us"]
        out.append(row)
    return out


def _setting(column, radius: bool):
    for mod in _HOLDERS:
        mod.bgemv = column
    torch_backend.UNIFORM_MACS = (1 << 20) if radius else (1 << 62)


def end_to_end(rows: list[str], rounds: int) -> list[dict]:
    settings = {"old": (_old_column, False), "column": (gemv.bgemv, False),
                "radius": (_old_column, True), "new": (gemv.bgemv, True)}
    out = []
    for spec in rows:
        name, rest = spec.split("@")
        batch, method = rest.split(":")
        module, x, C, eps = bk.workload(name, int(batch))
        graph = bk.as_graph(module, torch.from_numpy(x[:1]))
        xt = torch.from_numpy(x)

        def forward():
            with torch.no_grad():
                module(xt)
        opts = dict(eps=eps, C=C, method=method, alpha=bk.ALPHA)
        fns = {"forward": forward}
        for key, (column, radius) in settings.items():
            def call(column=column, radius=radius):
                _setting(column, radius)
                bf.compute_bounds(graph, x, **opts)
            fns[key] = call
        slow = method == "crown" and name == "cnn" and batch == "32"
        ms = bk.interleaved(fns, max(3, rounds // 5) if slow else rounds)
        _setting(gemv.bgemv, True)
        r = {"row": spec, **{f"{k}_ms": v for k, v in ms.items()}}
        r["old_over_new"] = ms["old"] / ms["new"]
        r["new_x_fwd"] = ms["new"] / ms["forward"]
        r["old_x_fwd"] = ms["old"] / ms["forward"]
        out.append(r)
        print(f"  {spec}: old {ms['old']:.3f} ms, new {ms['new']:.3f} ms "
              f"({r['old_over_new']:.2f}x)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--rows", default=ROWS)
    ap.add_argument("--out", default=None, help="write OUT.csv and OUT.txt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"# python benchmarks/bench_gemv.py {shlex.join(sys.argv[1:])}",
             f"# {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
             f"{args.threads} thread(s); load average before {os.getloadavg()[0]:.2f}"]
    print("\n".join(lines), flush=True)
    ker = kernels()
    lines += ["", "kernels: A [B, S, k] · v [B, k], median µs (old: torch.matmul(A, "
              "v.unsqueeze(-1)))",
              f"{'B':>5} {'S':>4} {'k':>5} {'old':>9} {'bgemv':>9} {'mv loop':>9} "
              f"{'mul+sum':>9} {'old/bgemv':>10}"]
    for r in ker:
        lines.append(f"{r['B']:>5} {r['S']:>4} {r['k']:>5} {r['old_us']:>9.1f} "
                     f"{r['bgemv_us']:>9.1f} {r['mv_loop_us']:>9.1f} {r['mul_sum_us']:>9.1f} "
                     f"{r['old_over_bgemv']:>9.2f}x")
    print("\n".join(lines[-len(ker) - 2:]), flush=True)
    e2e = end_to_end(args.rows.split(","), args.rounds)
    lines += ["", "end to end, default plan on the torch path, median ms (old: column "
              "unsqueeze(-1) and the radius product always; column: bgemv only; radius: the "
              "one-number radius only; new: both)",
              f"{'row':<22} {'fwd':>8} {'old':>9} {'column':>9} {'radius':>9} {'new':>9} "
              f"{'old/new':>8} {'old xfwd':>9} {'new xfwd':>9}"]
    for r in e2e:
        lines.append(f"{r['row']:<22} {r['forward_ms']:>8.3f} {r['old_ms']:>9.3f} "
                     f"{r['column_ms']:>9.3f} {r['radius_ms']:>9.3f} {r['new_ms']:>9.3f} "
                     f"{r['old_over_new']:>7.2f}x {r['old_x_fwd']:>9.1f} {r['new_x_fwd']:>9.1f}")
    lines.append(f"load average after {os.getloadavg()[0]:.2f}")
    print("\n".join(lines[-len(e2e) - 3:]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".txt").write_text("\n".join(lines) + "\n")
        with open(args.out + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in e2e for k in r}))
            w.writeheader()
            w.writerows(e2e)
        with open(args.out + "_kernels.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ker[0]))
            w.writeheader()
            w.writerows(ker)
        print(f"wrote {args.out}.txt, {args.out}.csv, {args.out}_kernels.csv")


if __name__ == "__main__":
    main()
