"""Random legal plans with TIR lowering on the Relax backend against the torch backend.

    python tools/relax_sweep.py [--plans 30] [--models digits_mlp,...] [--methods ibp,...]
                                [--target llvm|cuda]

Each plan: random planner knobs (partition, domains, layouts, forms, storage, fuse passes) with
``tir`` lowering and random schedule knobs per task. Prints, per (model, method), how many plans
ran, how many met ``|relax - torch| <= rtol·|torch| + atol`` elementwise in float32 (1e-5 and
1e-6; alpha-CROWN plans compare at 1e-4 of the largest bound since the slope optimiser amplifies
1-ulp differences), the largest difference relative to the largest bound, and, for the plans
that missed the float32 criterion, the largest elementwise relative difference of the same plan
run in float64 (a bound near zero that is a difference of large terms carries the float32
rounding of those terms, so two summation orders can differ by more than 1e-5 of it; float64
shows whether anything but rounding differs). Then whether ``--points`` sampled points (and the
box corners) lie inside every plan's bounds, kernel counts and compile seconds. With
``--target cuda`` (a GPU machine) the schedule knobs are drawn from the CUDA space and the plans
run on the GPU, against the torch backend on the CPU. Slow: every plan is a TVM compile.
Exits non-zero when a plan is unsound, or differs in float64 by more than 1e-9.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boundflow.api import as_graph  # noqa: E402
from boundflow.backend.relax import schedules  # noqa: E402
from boundflow.backend.relax.executor import RelaxExecutor  # noqa: E402
from boundflow.backend.torch import TorchExecutor  # noqa: E402
from boundflow.domains.alpha import AlphaConfig  # noqa: E402
from boundflow.examples import EXAMPLES, load  # noqa: E402
from boundflow.ir.spec import InputSpec, margin_spec  # noqa: E402
from boundflow.ir.workload import Workload  # noqa: E402
from boundflow.planner import plan, space  # noqa: E402
from tests.helpers import box_points, true_outputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=30)
    parser.add_argument("--models", default=",".join(EXAMPLES))
    parser.add_argument("--methods", default="ibp,crown-ibp,crown,alpha-crown")
    parser.add_argument("--points", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", default="llvm", choices=("llvm", "cuda"))
    args = parser.parse_args()
    print(f"{'model':<16} {'method':<12} {'plans':>5} {'within tol':>10} {'max rel diff':>12} "
          f"{'others f64':>10} {'sound':>5} {'kernels':>9} {'compile s':>10}", flush=True)
    failed = False
    for name in args.models.split(","):
        ex = load(name)
        g = as_graph(ex.model, torch.as_tensor(ex.inputs[:1]).float())
        x = InputSpec.linf(ex.inputs[:3].astype(np.float32), 0.02)
        x64 = InputSpec.linf(ex.inputs[:3].astype(np.float64), 0.02)
        n_out = int(np.prod(g.output_shape))
        C = margin_spec(np.arange(3) % n_out, n_out)
        truth = np.einsum("bsk,bmk->bms", np.asarray(C.C, np.float64),
                          true_outputs(g, box_points(x.lower, x.upper, n=args.points)))
        for method in args.methods.split(","):
            w = Workload.of(g, batch=3, method=method, target=args.target)
            sp = space(g, w)
            rng = random.Random(args.seed)
            worst, within, sound, kernels, seconds = 0.0, 0, True, [], []
            f64 = 0.0
            for _ in range(args.plans):
                knobs = sp.sample(rng).replace(lowering="tir")
                tasks = [t.name for t in plan(g, w, knobs).task_graph.tasks if t.kind != "input"]
                knobs = knobs.replace(schedule=tuple((t, schedules.sample(rng, args.target))
                                                     for t in tasks))
                bundle = plan(g, w, knobs, alpha=AlphaConfig(iterations=3))
                start = time.perf_counter()
                exe = RelaxExecutor(bundle, g, target=args.target)
                seconds.append(time.perf_counter() - start)
                kernels.append(exe.n_kernels)
                out, ref = exe.run(x, C), TorchExecutor(bundle, g).run(x, C)
                scale = max(1.0, float(ref.upper.abs().max()))
                rtol, atol = (1e-5, 1e-6) if method != "alpha-crown" else (0.0, 1e-4 * scale)
                ok = all(bool(((o - r).abs() <= rtol * r.abs() + atol).all())
                         for o, r in ((out.lower, ref.lower), (out.upper, ref.upper)))
                within += ok
                if not ok:
                    w64 = Workload.of(g, batch=3, method=method, dtype="float64",
                                      target=args.target)
                    b64 = plan(g, w64, knobs, alpha=AlphaConfig(iterations=3))
                    o64 = RelaxExecutor(b64, g, target=args.target).run(x64, C)
                    r64 = TorchExecutor(b64, g).run(x64, C)
                    f64 = max(f64, *(float(((o - r).abs() / (r.abs() + 1e-12)).max())
                                     for o, r in ((o64.lower, r64.lower), (o64.upper, r64.upper))))
                worst = max(worst, float((out.lower - ref.lower).abs().max()) / scale,
                            float((out.upper - ref.upper).abs().max()) / scale)
                lo = out.lower.double().numpy()[:, None]
                hi = out.upper.double().numpy()[:, None]
                slack = 1e-5 * (1.0 + np.maximum(np.abs(lo), np.abs(hi)))
                sound &= bool(((truth >= lo - slack) & (truth <= hi + slack)).all())
            failed |= f64 > 1e-9 or not sound
            print(f"{name:<16} {method:<12} {args.plans:>5} {within:>10} {worst:>12.2e} "
                  f"{f64 if within < args.plans else float('nan'):>10.1e} "
                  f"{'yes' if sound else 'NO':>5} {min(kernels):>4}-{max(kernels):<4} "
                  f"{np.median(seconds):>10.2f}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
