"""CROWN and alpha-CROWN with patch (receptive-field window) coefficients against the same
calls forced to dense coefficients, beside a torch forward pass of the model.

    python benchmarks/bench_patches.py [--rounds 7] [--alpha-rounds 3]

Models: the bundled ``random_residual`` (residual block, dilated conv, concat, avgpool) and
``digits_cnn`` examples, their inputs repeated to the batch, L-inf ball eps = 8/255, output
bounds (no spec), float32, one thread. alpha-CROWN runs 10 iterations, batch 1 only. Each
round times every configuration of a row once, in turn (interleaved); the table holds medians.
"Dense" replaces the patch-form planner (``conv_chain``, in ``boundflow.domains.crown`` and
``boundflow.domains.alpha``) with one that declines every start, which is what
``patches=False`` does in ``reference_bounds``. Both forms give the same bounds (the
``max |diff|`` column: float32 rounding only).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import numpy as np
import torch

import boundflow as bf
from boundflow.domains import alpha as alpha_mod, crown as crown_mod
from boundflow.examples import digits_module, load

EPS = 8 / 255
ALPHA = bf.AlphaConfig(iterations=10)
ROWS = [("random_residual", 1, "crown"), ("random_residual", 32, "crown"),
        ("random_residual", 1, "alpha-crown"), ("digits_cnn", 1, "crown"),
        ("digits_cnn", 32, "crown"), ("digits_cnn", 1, "alpha-crown")]


@contextlib.contextmanager
def dense_only():
    """Every start bounded with dense coefficients while inside."""
    saved = crown_mod.conv_chain, alpha_mod.conv_chain
    crown_mod.conv_chain = alpha_mod.conv_chain = lambda *args, **kwargs: None
    try:
        yield
    finally:
        crown_mod.conv_chain, alpha_mod.conv_chain = saved


def _setup(name: str, batch: int):
    ex = load(name)
    x = np.resize(ex.inputs, (batch,) + ex.inputs.shape[1:]).astype(np.float32)
    module = digits_module(name) if name.startswith("digits") else ex.model
    return ex.model, module.eval(), x


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def row(name: str, batch: int, method: str, rounds: int) -> dict:
    model, module, x = _setup(name, batch)
    xt = torch.from_numpy(x)

    def bound():
        return bf.compute_bounds(model, x, eps=EPS, method=method, alpha=ALPHA)

    def dense():
        with dense_only():
            return bound()

    def forward():
        with torch.no_grad():
            module(xt)
    patched, plain = bound(), dense()                      # warm-up, and the bounds
    diff = max(float((patched.lower - plain.lower).abs().max()),
               float((patched.upper - plain.upper).abs().max()))
    times = {"patches": [], "dense": [], "forward": []}
    for _ in range(rounds):
        for key, fn in (("patches", bound), ("dense", dense), ("forward", forward)):
            times[key].append(_timed(fn))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"model": name, "batch": batch, "method": method, "diff": diff, **med}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds for CROWN rows")
    parser.add_argument("--alpha-rounds", type=int, default=3, help="rounds for alpha rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    results = [row(n, b, m, args.alpha_rounds if m == "alpha-crown" else args.rounds)
               for n, b, m in ROWS]
    load_after = os.getloadavg()
    print(f"`python benchmarks/{os.path.basename(sys.argv[0])} "
          f"{' '.join(sys.argv[1:])}`".replace(" `", "`"))
    print(f"torch {torch.__version__}, 1 thread, eps {EPS:.4f}, float32; load average "
          f"{' / '.join(f'{v:.2f}' for v in load_before)} before, "
          f"{' / '.join(f'{v:.2f}' for v in load_after)} after (1 / 5 / 15 min)\n")
    print("| model | B | method | patches ms | dense ms | dense / patches | forward ms "
          "| patches / forward | dense / forward | max \\|diff\\| |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['batch']} | {r['method']} | {r['patches']:.2f} | "
              f"{r['dense']:.2f} | {r['dense'] / r['patches']:.2f}x | {r['forward']:.3f} | "
              f"{r['patches'] / r['forward']:.0f} | {r['dense'] / r['forward']:.0f} | "
              f"{r['diff']:.1e} |")


if __name__ == "__main__":
    main()
