"""IBP speed against a torch forward pass and auto_LiRPA's recorded times, in one table.

    python benchmarks/bench_ibp.py [--repeat 200]

Models are the fixed auto_LiRPA reference models (weights from ../shared/reference/alirpa when
present, else the same architectures with seed-0 initialisation), margin spec, eps = 8/255.
auto_LiRPA's times are the ranges recorded in ../shared/reference/alirpa/README.md on this kind
of machine (auto_LiRPA itself does not install beside torch 2.13).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import boundflow as bf
from boundflow.api import as_graph
from boundflow.examples import reference_architecture

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "alirpa"
ALIRPA_IBP_MS = {("mlp", 1): (4.0, 5.0), ("mlp", 32): (10.0, 10.0),
                 ("cnn", 1): (6.0, 7.0), ("cnn", 32): (16.0, 16.0)}


def model(name: str) -> nn.Module:
    m = reference_architecture(name)
    path = SHARED / f"{name}_weights.npz"
    if path.exists():
        w = np.load(path)
        m.load_state_dict({k: torch.from_numpy(w[k]) for k in w.files})
    return m.eval()


def median_seconds(fn, repeat: int) -> float:
    """Median wall-clock seconds of ``repeat`` calls after a few warm-up calls."""
    for _ in range(max(1, min(3, repeat // 10))):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_ms(fn, repeat: int) -> float:
    return 1e3 * median_seconds(fn, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeat} calls")
    header = (f"{'model':<5} {'B':>3} {'forward ms':>11} {'IBP ms':>8} {'IBP/fwd':>8} "
              f"{'API ms':>8} {'auto_LiRPA IBP ms':>18} {'speedup':>9}")
    print(header)
    print("-" * len(header))
    for name, shape in (("mlp", (784,)), ("cnn", (3, 32, 32))):
        m = model(name)
        for batch in (1, 32):
            x = torch.rand((batch,) + shape, generator=torch.Generator().manual_seed(1))
            C = bf.margin_spec(np.zeros(batch, dtype=int), 10).C
            graph = as_graph(m, x[:1])
            with torch.no_grad():
                fwd = median_ms(lambda: m(x), args.repeat)
            ibp = median_ms(lambda: bf.compute_bounds(graph, x.numpy(), eps=8 / 255, C=C),
                            args.repeat)
            api = median_ms(lambda: bf.compute_bounds(m, x.numpy(), eps=8 / 255, C=C),
                            args.repeat)
            lo, hi = ALIRPA_IBP_MS[(name, batch)]
            ref = (lo + hi) / 2
            print(f"{name:<5} {batch:>3} {fwd:>11.3f} {ibp:>8.3f} {ibp / fwd:>8.1f} "
                  f"{api:>8.3f} {f'{lo:g}-{hi:g}':>18} {ref / ibp:>8.1f}x")
    print("IBP ms: compute_bounds on the traced graph; API ms: on the nn.Module (cached trace)."
          "\nspeedup: auto_LiRPA's recorded midpoint / BoundFlow IBP.")


if __name__ == "__main__":
    main()
