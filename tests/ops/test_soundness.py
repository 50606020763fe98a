"""Every op of issue 15, in a small model, under every method, on both backends and in
float32 and float64: 10,000 points sampled inside the input box (and its corners where the
input is small) have outputs inside the bounds; the backends agree; the tightness order
alpha-crown ⊆ crown ⊆ crown-ibp ⊆ ibp holds.

The Relax cases compile one module per (model, method, dtype); the on-disk compile cache
keeps a second run cheap."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import boundflow as bf
from boundflow.domains.alpha import AlphaConfig
from boundflow.domains.concrete import evaluate
from tests.ops.models import MODELS

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
EPS = 0.1
N_SAMPLES = 10_000
ALPHA = AlphaConfig(iterations=8)


def _points(x: np.ndarray, eps: float, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points per sample of the box ``x ± eps`` ([n, batch, *in]), corners first when
    the input has at most 10 dimensions."""
    rng = np.random.default_rng(seed)
    lo, hi = x - eps, x + eps
    pts = rng.uniform(lo, hi, (n,) + x.shape)
    dims = x[0].size
    if dims <= 10:
        corners = np.array(list(itertools.product((0.0, 1.0), repeat=dims)))
        c = corners.reshape((len(corners), 1) + x.shape[1:])
        pts[: len(corners)] = lo + c * (hi - lo)
    return pts


def _outputs(graph, pts: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    flat = torch.as_tensor(pts.reshape((-1,) + pts.shape[2:]), dtype=dtype)
    out = evaluate(graph, flat).detach().numpy()
    return out.reshape(pts.shape[:2] + out.shape[1:])


def _bounds(name, method, backend, dtype):
    graph, x = MODELS[name](dtype)
    kw = {"alpha": ALPHA} if method == "alpha-crown" else {}
    b = bf.compute_bounds(graph, x.astype(dtype), eps=EPS, method=method, backend=backend,
                          dtype=dtype, **kw)
    return graph, x, np.asarray(b.lower, np.float64), np.asarray(b.upper, np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_sampled_points_lie_inside_on_torch(name, method, dtype):
    graph, x, lo, hi = _bounds(name, method, "torch", dtype)
    assert np.isfinite(lo).all() and np.isfinite(hi).all()
    out = _outputs(graph, _points(x.astype(dtype), EPS, N_SAMPLES),
                   {"float32": torch.float32, "float64": torch.float64}[dtype])
    tol = 1e-5 if dtype == "float32" else 1e-10
    scale = 1 + np.abs(out).max()
    assert (out >= lo - tol * scale).all(), f"{(lo - out).max():.3g} below the lower bound"
    assert (out <= hi + tol * scale).all(), f"{(out - hi).max():.3g} above the upper bound"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tightness_order(name):
    """alpha-crown ⊆ crown and crown-ibp ⊆ ibp hold per bound by construction (alpha starts
    from CROWN's slopes and keeps its best; CROWN-IBP is intersected with IBP). crown ⊆
    crown-ibp is not a theorem once a relaxation's lines move with its input bounds (a
    tighter interval moves sigmoid's tangent points and ELU's tangent, and the adaptive
    slope of ReLU and LeakyReLU flips with the sign of ``u + l``): it is checked on average
    width everywhere, and per bound where the only activation is ReLU."""
    b = {}
    for method in METHODS:
        _, _, lo, hi = _bounds(name, method, "torch", "float64")
        b[method] = (lo, hi)

    def inside(tight, loose):
        (lo_t, hi_t), (lo_l, hi_l) = b[tight], b[loose]
        return (lo_t >= lo_l - 1e-9).all() and (hi_t <= hi_l + 1e-9).all()

    def width(m):
        return float(np.mean(b[m][1] - b[m][0]))

    assert inside("alpha-crown", "crown") and inside("crown-ibp", "ibp")
    assert inside("crown", "ibp")
    assert width("crown") <= width("crown-ibp") + 1e-9
    graph, _ = MODELS[name]("float64")
    moving = {"sigmoid", "tanh", "elu", "hardtanh", "leaky_relu"} & {n.op for n in graph.nodes}
    if not moving:
        assert inside("crown", "crown-ibp")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_relax_agrees_with_torch_and_is_sound(name, method, dtype):
    graph, x, lo, hi = _bounds(name, method, "relax", dtype)
    _, _, lo_t, hi_t = _bounds(name, method, "torch", dtype)
    rtol = 1e-4 if dtype == "float32" else 1e-9
    if method == "alpha-crown":
        rtol = max(rtol, 1e-3)   # slopes are optimised by gradient steps on both: the same
    scale = 1 + np.abs(lo_t).max() + np.abs(hi_t).max()
    np.testing.assert_allclose(lo, lo_t, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(hi, hi_t, rtol=rtol, atol=rtol * scale)
    out = _outputs(graph, _points(x.astype(dtype), EPS, N_SAMPLES, seed=1),
                   {"float32": torch.float32, "float64": torch.float64}[dtype])
    tol = (1e-5 if dtype == "float32" else 1e-10) * (1 + np.abs(out).max())
    assert (out >= lo - tol).all() and (out <= hi + tol).all()
