"""A cheap falsifier: random sampling then projected sign-gradient steps (PGD) in a box.

It looks for an input at which every constraint ``C·y <= threshold`` of a disjunct holds
(the unsafe region of a VNN-LIB property). Only a point whose float64 output satisfies them
all is returned; callers may re-check it on the original model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from boundflow.domains.concrete import evaluate
from boundflow.ir.graph import Graph


@dataclass(frozen=True)
class AttackConfig:
    samples: int = 2000
    restarts: int = 8
    steps: int = 50
    seed: int = 0


def _violation(graph: Graph, x: torch.Tensor, C: torch.Tensor, thr: torch.Tensor
               ) -> torch.Tensor:
    """max_j (C_j·y - thr_j) per point: <= 0 means every unsafe constraint holds."""
    y = evaluate(graph, x).flatten(1)
    if C.shape[0] == 0:
        return torch.full((x.shape[0],), -1.0, dtype=x.dtype)
    return (y @ C.T - thr).max(1).values


def find_counterexample(graph: Graph, lower: np.ndarray, upper: np.ndarray, C: np.ndarray,
                        threshold: np.ndarray, config: AttackConfig = AttackConfig()
                        ) -> np.ndarray | None:
    """A point of the box ``[lower, upper]`` (shape ``[*in]``) whose output satisfies
    ``C·y <= threshold`` row-wise, or None."""
    gen = torch.Generator().manual_seed(config.seed)
    lo = torch.as_tensor(lower, dtype=torch.float64).reshape((1,) + graph.input_shape)
    hi = torch.as_tensor(upper, dtype=torch.float64).reshape((1,) + graph.input_shape)
    Ct = torch.as_tensor(C, dtype=torch.float64)
    thr = torch.as_tensor(threshold, dtype=torch.float64)
    u = torch.rand((config.samples,) + graph.input_shape, generator=gen, dtype=torch.float64)
    points = torch.cat([(lo + hi) / 2, lo, hi, lo + u * (hi - lo)])
    with torch.no_grad():
        v = _violation(graph, points, Ct, thr)
    if (v <= 0).any():
        return points[int(v.argmin())].numpy()
    x = points[v.argsort()[: config.restarts]].clone()
    step = (hi - lo) / 10
    for i in range(config.steps):
        x.requires_grad_(True)
        v = _violation(graph, x, Ct, thr)
        if (v <= 0).any():
            return x[int(v.argmin())].detach().numpy()
        (g,) = torch.autograd.grad(v.sum(), x)
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x - step * g.sign() * (0.9 ** i), lo), hi)
    with torch.no_grad():
        v = _violation(graph, x, Ct, thr)
    return x[int(v.argmin())].numpy() if (v <= 0).any() else None
