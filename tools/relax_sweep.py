"""Random legal plans with TIR lowering on the Relax backend against the torch backend.

    python tools/relax_sweep.py [--plans 30] [--models digits_mlp,...] [--methods ibp,...]

Prints, per (model, method), how many plans ran, the largest difference of the bounds relative
to the largest bound, kernel counts and compile seconds. Slow: every plan is a TVM compile.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from boundflow.api import as_graph
from boundflow.backend.relax.executor import RelaxExecutor
from boundflow.backend.torch import TorchExecutor
from boundflow.domains.alpha import AlphaConfig
from boundflow.examples import EXAMPLES, load
from boundflow.ir.spec import InputSpec, margin_spec
from boundflow.ir.workload import Workload
from boundflow.planner import plan, space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=30)
    parser.add_argument("--models", default=",".join(EXAMPLES))
    parser.add_argument("--methods", default="ibp,crown-ibp,crown,alpha-crown")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{'model':<16} {'method':<12} {'plans':>5} {'max rel diff':>12} {'kernels':>9} "
          f"{'compile s':>10}")
    for name in args.models.split(","):
        ex = load(name)
        g = as_graph(ex.model, torch.as_tensor(ex.inputs[:1]).float())
        x = InputSpec.linf(ex.inputs[:3].astype(np.float32), 0.02)
        n_out = int(np.prod(g.output_shape))
        C = margin_spec(np.arange(3) % n_out, n_out)
        for method in args.methods.split(","):
            w = Workload.of(g, batch=3, method=method)
            sp = space(g, w)
            rng = random.Random(args.seed)
            worst, kernels, seconds = 0.0, [], []
            for _ in range(args.plans):
                knobs = sp.sample(rng).replace(lowering="tir")
                bundle = plan(g, w, knobs, alpha=AlphaConfig(iterations=3))
                start = time.perf_counter()
                exe = RelaxExecutor(bundle, g)
                seconds.append(time.perf_counter() - start)
                kernels.append(exe.n_kernels)
                out, ref = exe.run(x, C), TorchExecutor(bundle, g).run(x, C)
                scale = max(1.0, float(ref.upper.abs().max()))
                worst = max(worst, float((out.lower - ref.lower).abs().max()) / scale,
                            float((out.upper - ref.upper).abs().max()) / scale)
            print(f"{name:<16} {method:<12} {args.plans:>5} {worst:>12.2e} "
                  f"{min(kernels):>4}-{max(kernels):<4} {np.median(seconds):>10.2f}", flush=True)


if __name__ == "__main__":
    main()
