"""The Relax backend beside the torch backend and a torch forward pass, in one table.

    python benchmarks/bench_relax.py [--repeat 30] [--threads 1]

For the digits MLP and CNN and the random CNN, at batch 1 and 32, IBP and CROWN-IBP: compile
seconds and kernel count of the default plan, its run time, the best of a small hand sweep of
schedule knobs (each applied to every task; the winner is printed), the torch backend on the
same plan, and a torch forward pass.
Times are medians of ``repeat`` calls of ``run`` (input conversion included).
"""

from __future__ import annotations

import argparse
import itertools
import os

import numpy as np
import torch

from boundflow.api import as_graph
from boundflow.backend.relax.executor import RelaxExecutor
from boundflow.backend.torch import TorchExecutor
from boundflow.examples import digits_module, load
from boundflow.ir.spec import InputSpec, margin_spec
from boundflow.ir.workload import Workload
from boundflow.planner import default, plan

from bench_ibp import median_seconds

MODELS = ("digits_mlp", "digits_cnn", "random_cnn")
SWEEP = [dict(zip(("parallel", "vectorize", "unroll"), v))
         for v in itertools.product((True, False), (0, 8), (0, 64))] + [
    dict(tile=t, vectorize=v, cache_write=c)
    for t, v, c in ((4, 4, True), (8, 8, False), (8, 8, True), (16, 16, False), (4, 0, False))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    print(f"torch {torch.__version__}, {args.threads} thread(s); times in ms")
    print(f"{'model':<11} {'B':>3} {'method':<9} {'compile s':>9} {'kernels':>7} "
          f"{'relax':>8} {'swept':>8} {'torch be':>8} {'forward':>8} {'relax/torch':>11} "
          f"{'swept/fwd':>9}  best sweep")
    for name in MODELS:
        ex = load(name)
        g = as_graph(ex.model, torch.as_tensor(ex.inputs[:1]).float())
        module = ex.model if isinstance(ex.model, torch.nn.Module) else digits_module(name)
        n_out = int(np.prod(g.output_shape))
        for batch in (1, 32):
            rows = np.arange(batch) % len(ex.inputs)
            x = InputSpec.linf(ex.inputs[rows].astype(np.float32), 0.01)
            C = margin_spec(np.arange(batch) % n_out, n_out)
            xt = torch.as_tensor(x.center)
            with torch.no_grad():
                t_fwd = median_seconds(lambda: module(xt), args.repeat)
            for method in ("ibp", "crown-ibp"):
                w = Workload.of(g, batch=batch, method=method)
                k = default(g, w)
                bundle = plan(g, w, k)
                exe = RelaxExecutor(bundle, g)
                t_relax = median_seconds(lambda: exe.run(x, C), args.repeat)
                tasks = [t.name for t in bundle.task_graph.tasks if t.kind != "input"]
                best, winner = t_relax, "default"
                for knobs in SWEEP:
                    pairs = tuple(sorted(knobs.items()))
                    swept = RelaxExecutor(plan(g, w, k.replace(
                        schedule=tuple((t, pairs) for t in tasks))), g)
                    t_swept = median_seconds(lambda: swept.run(x, C), args.repeat)
                    if t_swept < best:
                        best, winner = t_swept, ",".join(f"{a}={b}" for a, b in pairs)
                torch_exe = TorchExecutor(bundle, g)
                t_torch = median_seconds(lambda: torch_exe.run(x, C), args.repeat)
                print(f"{name:<11} {batch:>3} {method:<9} {exe.compile_seconds:>9.2f} "
                      f"{exe.n_kernels:>7} {t_relax * 1e3:>8.3f} {best * 1e3:>8.3f} "
                      f"{t_torch * 1e3:>8.3f} {t_fwd * 1e3:>8.3f} {best / t_torch:>11.2f} "
                      f"{best / t_fwd:>9.1f}  {winner}", flush=True)


if __name__ == "__main__":
    main()
