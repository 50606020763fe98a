"""The cuda target on a GPU: each CUDA schedule of the Relax backend against the torch backend
on the same GPU and a forward pass, in one run; every compiled plan checked against the torch
backend on the CPU and against sampled points of its input box.

    python benchmarks/bench_gpu.py [--rows random_cnn,random_residual,digits_mlp]
                                   [--methods ibp,crown-ibp,crown] [--batches 1,32,256]
                                   [--schedules dlight,bind128,tile] [--reps 30] [--csv F]
                                   [--jobs 8]

Per (model, method): the workload's default plan with every task lowered to TIR, compiled once
per CUDA schedule (``dlight``: TVM's default GPU rules, ``shared`` = 0; ``bind128``: every
stage's spatial loops over blocks of 128 threads; ``tile``: reductions tiled with their
inputs staged in shared memory, ``shared`` = 16, the default; see ``schedules.py``), one
compile serving every batch; ``--jobs`` processes compile them first into the compile
cache. Per batch: medians of ``--reps`` calls, interleaved, synchronised; ``fwd`` = a
forward pass of the model on the GPU, ``torch`` = ``TorchExecutor`` on the GPU (the plain path on this device), each schedule's time
and its ratio to torch (> 1: the compiled plan is slower). ``diff`` = the largest difference
from the torch backend on the CPU over the largest bound; ``sound`` = every sampled point
(200 per box, and the corners) within the bounds. Needs a CUDA device and TVM built with CUDA.
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boundflow.backend.relax.cache import CompileCache  # noqa: E402
from boundflow.backend.relax.executor import RelaxExecutor  # noqa: E402
from boundflow.backend.torch import TorchExecutor  # noqa: E402
from boundflow.examples import digits_module  # noqa: E402
from boundflow.ir.spec import InputSpec, margin_spec  # noqa: E402
from boundflow.ir.workload import Workload  # noqa: E402
from boundflow.planner import default, plan  # noqa: E402
from tests.helpers import box_points, example_graph, true_outputs  # noqa: E402

SCHEDULES = {"dlight": (("shared", 0),), "bind128": (("shared", 0), ("threads", 128)),
             "tile": (("shared", 16),)}


def _bundle(name, method, schedule, batch):
    """The graph and the default plan of (``name``, ``method``) for cuda, every task lowered
    to TIR with the schedule knobs ``SCHEDULES[schedule]``."""
    _, g = example_graph(name)
    w = Workload.of(g, batch=batch, method=method, target="cuda")
    k = default(g, w).replace(lowering="tir", task_lowering=())
    tasks = [t.name for t in plan(g, w, k).task_graph.tasks if t.kind != "input"]
    return g, plan(g, w, k.replace(schedule=tuple((t, SCHEDULES[schedule]) for t in tasks)))


def _prebuild(job) -> str:
    """Compile one (model, method, schedule) into the compile cache (a worker process)."""
    start = time.perf_counter()
    try:
        g, bundle = _bundle(*job)
        RelaxExecutor(bundle, g, target="cuda", cache=CompileCache())
    except Exception as e:                      # reported; the row fails again in the run
        return f"{job[0]} {job[1]} {job[2]}: FAILED {type(e).__name__}: {e}"[:300]
    return f"{job[0]} {job[1]} {job[2]}: {time.perf_counter() - start:.1f} s"


def _time(fn, reps):
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def _rows(name, args, names, batches, rows) -> bool:
    """Measure and check every (method, batch) of model ``name``; whether a check failed."""
    failed = False
    ex, g = example_graph(name)
    cache = CompileCache()        # the on-disk cache the workers compiled into
    model = digits_module(name) if name.startswith("digits") else copy.deepcopy(ex.model)
    module = model.to("cuda").eval()
    for method in args.methods.split(","):
        w = Workload.of(g, batch=batches[0], method=method, target="cuda")
        exes, compile_s = {}, {}
        for s in names:
            start = time.perf_counter()
            _, bundle = _bundle(name, method, s, batches[0])
            exes[s] = RelaxExecutor(bundle, g, target="cuda", cache=cache)
            compile_s[s] = time.perf_counter() - start
        ref_bundle = plan(g, w, default(g, w))
        tex_gpu = TorchExecutor(ref_bundle, g, device="cuda")
        tex_cpu = TorchExecutor(ref_bundle, g)
        for batch in batches:
            reps = np.resize(ex.inputs, (batch,) + ex.inputs.shape[1:]).astype(np.float32)
            x = InputSpec.linf(reps, 0.02)
            n_out = int(np.prod(g.output_shape))
            C = margin_spec(np.arange(batch) % n_out, n_out)
            centre = torch.as_tensor(reps, device="cuda")
            with torch.no_grad():
                fns = {"fwd": lambda: module(centre), "torch": lambda: tex_gpu.run(x, C)}
                for s in names:
                    fns[s] = (lambda e=exes[s]: e.run(x, C))
                times = {k: [] for k in fns}
                for k, fn in fns.items():           # warm-up
                    fn()
                for _ in range(3):                  # interleaved rounds
                    for k, fn in fns.items():
                        times[k] += _time(fn, max(1, args.reps // 3))
            ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            ref = tex_cpu.run(x, C)
            scale = max(1.0, float(ref.upper.abs().max()))
            pts = box_points(x.lower[:4], x.upper[:4], n=200)
            truth = np.einsum("bsk,bmk->bms", np.asarray(C.C[:4], np.float64),
                              true_outputs(g, pts))
            diff, sound = 0.0, True
            for s in names:
                out = exes[s].run(x, C)
                lo, hi = out.lower.cpu().double(), out.upper.cpu().double()
                diff = max(diff, float((lo - ref.lower.double()).abs().max()) / scale,
                           float((hi - ref.upper.double()).abs().max()) / scale)
                lo4, hi4 = lo[:4].numpy()[:, None], hi[:4].numpy()[:, None]
                slack = 1e-5 * (1.0 + np.maximum(np.abs(lo4), np.abs(hi4)))
                sound &= bool(((truth >= lo4 - slack) & (truth <= hi4 + slack)).all())
            failed |= not sound or diff > 1e-4
            print(f"{name:<16} {method:<9} {batch:>5} {ms['fwd']:>7.3f} {ms['torch']:>8.3f} "
                  + " ".join(f"{ms[s]:>11.3f} {ms[s] / ms['torch']:>6.2f}" for s in names)
                  + f" {diff:>8.1e} {'yes' if sound else 'NO':>5}", flush=True)
            rows.append({"model": name, "method": method, "batch": batch,
                         "fwd_ms": ms["fwd"], "torch_ms": ms["torch"],
                         **{f"{s}_ms": ms[s] for s in names},
                         **{f"{s}_load_s": compile_s[s] for s in names},
                         "diff": diff, "sound": sound,
                         "kernels": exes[names[0]].n_kernels})
        print("  load s (compile where not prebuilt): "
              + ", ".join(f"{s} {compile_s[s]:.1f}" for s in names), flush=True)
    return failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="random_cnn,random_residual,digits_mlp")
    p.add_argument("--methods", default="ibp,crown-ibp,crown")
    p.add_argument("--batches", default="1,32,256")
    p.add_argument("--schedules", default="dlight,bind128,tile")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--csv", default=None)
    p.add_argument("--jobs", type=int, default=8)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device visible to torch")
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    names = [s for s in args.schedules.split(",") if s]
    head = (f"{'model':<16} {'method':<9} {'batch':>5} {'fwd ms':>7} {'torch ms':>8} "
            + " ".join(f"{n + ' ms':>11} {'/torch':>6}" for n in names)
            + f" {'diff':>8} {'sound':>5}")
    print(head, flush=True)
    rows = []
    failed = False
    batches = [int(b) for b in args.batches.split(",")]
    jobs = [(name, method, s, batches[0]) for name in args.rows.split(",")
            for method in args.methods.split(",") for s in names]
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        start = time.perf_counter()
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            for line in pool.map(_prebuild, jobs):
                print(f"  compiled {line}", flush=True)
        print(f"  {len(jobs)} compiles in {time.perf_counter() - start:.0f} s", flush=True)
    for name in args.rows.split(","):
        try:
            failed |= _rows(name, args, names, batches, rows)
        except Exception as e:
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            failed = True
    if args.csv and rows:
        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
