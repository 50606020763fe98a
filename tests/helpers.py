"""Shared test utilities: sampling points in a box and checking bounds contain the truth."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from boundflow.domains.concrete import evaluate
from boundflow.ir.graph import Graph

N_SAMPLES = 10_000


def box_points(lower: np.ndarray, upper: np.ndarray, n: int = N_SAMPLES, seed: int = 0
               ) -> np.ndarray:
    """``n`` points per sample of the box (uniform, plus every corner where the per-sample
    dimension is at most 10, plus the two extreme corners): shape [batch, m, *in]."""
    gen = np.random.default_rng(seed)
    lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    batch, shape = lower.shape[0], lower.shape[1:]
    dim = math.prod(shape)
    u = gen.random((batch, n) + shape)
    pts = [lower[:, None] + u * (upper - lower)[:, None], lower[:, None], upper[:, None]]
    if dim <= 10:
        corners = np.array(list(itertools.product([0.0, 1.0], repeat=dim))).reshape(
            (1, -1) + shape)
        pts.append(lower[:, None] + corners * (upper - lower)[:, None])
    return np.concatenate(pts, axis=1)


def true_outputs(model, points: np.ndarray) -> np.ndarray:
    """Outputs at ``points`` [batch, m, *in], flattened per point: [batch, m, n_out], float64."""
    batch, m = points.shape[:2]
    flat = torch.from_numpy(points.reshape((batch * m,) + points.shape[2:]))
    with torch.no_grad():
        if isinstance(model, Graph):
            y = evaluate(model, flat)
        else:
            y = _module_float64(model)(flat)
    return y.reshape(batch, m, -1).numpy()


def _module_float64(module):
    import copy

    return copy.deepcopy(module).double().eval()


def assert_contains(lower, upper, values, C=None, tol=1e-9, what="bounds"):
    """Every value (or C·value) lies in [lower - tol·scale, upper + tol·scale]."""
    lower = np.asarray(lower.detach().cpu() if hasattr(lower, "detach") else lower, np.float64)
    upper = np.asarray(upper.detach().cpu() if hasattr(upper, "detach") else upper, np.float64)
    if C is not None:
        values = np.einsum("bsk,bmk->bms", np.asarray(C, np.float64), values)
    lower = lower.reshape(lower.shape[0], 1, -1)
    upper = upper.reshape(upper.shape[0], 1, -1)
    scale = 1.0 + np.maximum(np.abs(lower), np.abs(upper))
    below = values < lower - tol * scale
    above = values > upper + tol * scale
    assert not below.any() and not above.any(), (
        f"{what} unsound: {int(below.sum())} values below the lower bound, "
        f"{int(above.sum())} above the upper bound; worst excess "
        f"{max((lower - values).max(), (values - upper).max()):.3g}")


_GRAPHS: dict = {}


def example_graph(name: str):
    """A bundled example and its IR graph, built once per test session."""
    if name not in _GRAPHS:
        from boundflow.api import as_graph
        from boundflow.examples import load

        ex = load(name)
        _GRAPHS[name] = ex, as_graph(ex.model, torch.as_tensor(ex.inputs[:1]).float())
    return _GRAPHS[name]


def counted_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so each call appends its arguments to the returned list."""
    calls: list = []
    inner = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return inner(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


def robustness_vnnlib(x: np.ndarray, eps: float, label: int, n_out: int) -> str:
    """A VNN-LIB robustness property: the L-infinity ``eps`` box around ``x``, unsafe where
    some other output reaches output ``label`` (one disjunct per other class)."""
    lines = [f"(declare-const X_{i} Real)" for i in range(x.size)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    for i, v in enumerate(x.reshape(-1).astype(np.float64)):
        lines += [f"(assert (>= X_{i} {float(v) - eps!r}))",
                  f"(assert (<= X_{i} {float(v) + eps!r}))"]
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(n_out) if j != label)
    return "\n".join(lines + [f"(assert (or {others}))"]) + "\n"
