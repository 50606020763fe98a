"""The activation relaxation registry: every entry's lines hold on dense grids of many
intervals (points, straddling zero, one-sided, very wide) for every mode and random
parameters; interval images; tiny exact cases; no NaN anywhere (values or gradients)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boundflow.domains import activations
from boundflow.domains.activations import (ACTIVATIONS, LOWER_SLOPES, default_lower_slope,
                                           relu_relaxation)
from boundflow.domains.relaxation import split_params
from boundflow.errors import BoundFlowError, UnsupportedOpError
from boundflow.ir import ops

# every entry with the attributes it is tested under
ENTRIES = [
    ("relu", {}),
    ("leaky_relu", {"negative_slope": 0.1}),
    ("leaky_relu", {"negative_slope": 0.0}),
    ("leaky_relu", {"negative_slope": 1.0}),
    ("hardtanh", {"min_val": -1.0, "max_val": 1.0}),
    ("hardtanh", {"min_val": 0.5, "max_val": 3.0}),
    ("hardtanh", {"min_val": -math.inf, "max_val": 0.7}),
    ("hardtanh", {"min_val": -0.3, "max_val": math.inf}),
    ("sigmoid", {}),
    ("tanh", {}),
    ("elu", {"alpha": 1.0}),
    ("elu", {"alpha": 0.3}),
]
IDS = [f"{op}-{'-'.join(str(v) for v in attrs.values())}" for op, attrs in ENTRIES]


def _intervals(dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Many (l, u): points (zero, negative, positive, huge), straddling zero, one-sided,
    narrow, very wide, and around the hardtanh kinks; random ones of every scale."""
    rng = np.random.default_rng(0)
    fixed = [(0.0, 0.0), (-2.0, -2.0), (3.0, 3.0), (-1.0, 2.0), (-3.0, -0.5), (0.5, 4.0),
             (-1e-7, 1e-7), (-50.0, 60.0), (-1e3, 1e3), (-1e4, -1e3), (1e3, 1e4),
             (-1.0, 1.0), (-1.0, 0.0), (0.0, 1.0), (0.7, 0.7), (-0.3, 0.7), (0.5, 3.0),
             (-20.0, 0.01), (-0.01, 20.0), (1e-9, 2e-9)]
    centre = rng.standard_normal(400) * np.repeat([0.1, 1.0, 5.0, 50.0], 100)
    width = np.abs(rng.standard_normal(400)) * np.tile([0.0, 0.01, 0.5, 3.0, 30.0], 80)
    lo = np.concatenate([[a for a, _ in fixed], centre - width / 2])
    hi = np.concatenate([[b for _, b in fixed], centre + width / 2])
    return torch.tensor(lo, dtype=dtype), torch.tensor(hi, dtype=dtype)


def _grid(l, u, steps):
    """Points ``l + s·(u - l)`` for the steps ``s``, with the ends exactly ``l`` and ``u``."""
    x = l[:, None] + steps * (u - l)[:, None]
    x[:, 0], x[:, -1] = l, u
    return x


def _params(relaxation, state, attrs, mode_or_seed, dtype):
    if isinstance(mode_or_seed, str):
        return relaxation.default_params(state, attrs, mode_or_seed)
    gen = torch.Generator().manual_seed(mode_or_seed)
    shape = state[0].shape
    t = torch.rand((relaxation.n_params,) + shape, generator=gen, dtype=dtype)
    if mode_or_seed == 1:
        t = (t > 0.5).to(dtype)                  # the ends of the range, 0 and 1
    return tuple(t.unbind(0))


def test_every_activation_op_has_an_entry():
    assert set(ACTIVATIONS) == set(ops.having("activation"))
    with pytest.raises(UnsupportedOpError, match="relaxations are"):
        activations.get("gelu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op, attrs", ENTRIES, ids=IDS)
def test_lines_hold_on_dense_grids(op, attrs, dtype):
    relaxation = activations.get(op)
    l, u = _intervals(dtype)
    grid = torch.linspace(0, 1, 257, dtype=torch.float64)
    x = _grid(l.double(), u.double(), grid)                                   # [N, 257]
    fx = relaxation.fn(x, attrs)
    state = relaxation.prepare(l, u, attrs)
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    for how in (*LOWER_SLOPES, 0, 1, 2, 3):
        lines = relaxation.lines(state, attrs, _params(relaxation, state, attrs, how, dtype))
        for t in lines:
            assert t is None or bool(torch.isfinite(t).all()), (op, how)
        lo_b = 0.0 if lines.lower_bias is None else lines.lower_bias.double()[:, None]
        up_b = 0.0 if lines.upper_bias is None else lines.upper_bias.double()[:, None]
        below = lines.lower_slope.double()[:, None] * x + lo_b
        above = lines.upper_slope.double()[:, None] * x + up_b
        scale = tol * (1 + x.abs() + fx.abs())
        bad_lo = (below > fx + scale).any(1)
        bad_up = (above < fx - scale).any(1)
        assert not bad_lo.any(), (op, how, l[bad_lo][:3], u[bad_lo][:3])
        assert not bad_up.any(), (op, how, l[bad_up][:3], u[bad_up][:3])
        # at a point the lines are exact
        point = l == u
        assert torch.allclose(below[point, 0], fx[point, 0], rtol=tol, atol=tol)
        assert torch.allclose(above[point, 0], fx[point, 0], rtol=tol, atol=tol)


@pytest.mark.parametrize("op, attrs", ENTRIES, ids=IDS)
def test_interval_image_is_tight_and_inexact_marks_where_lines_are_loose(op, attrs):
    relaxation = activations.get(op)
    l, u = _intervals(torch.float64)
    lo, hi = relaxation.interval(l, u, attrs)
    x = _grid(l, u, torch.linspace(0, 1, 101, dtype=torch.float64))
    fx = relaxation.fn(x, attrs)
    assert torch.all(lo <= fx.min(1).values + 1e-15) and torch.all(hi >= fx.max(1).values - 1e-15)
    assert torch.equal(lo, fx[:, 0]) and torch.equal(hi, fx[:, -1])       # monotone, attained
    exact = ~relaxation.inexact(l, u, attrs)
    state = relaxation.prepare(l, u, attrs)
    lines = relaxation.lines(state, attrs, relaxation.default_params(state, attrs, "adaptive"))
    below = lines.lower_slope[:, None] * x + (0 if lines.lower_bias is None else
                                              lines.lower_bias[:, None])
    above = lines.upper_slope[:, None] * x + (0 if lines.upper_bias is None else
                                              lines.upper_bias[:, None])
    gap = (above - below).abs().max(1).values
    assert torch.all(gap[exact] <= 1e-9 * (1 + fx[exact].abs().max(1).values))


def test_sigmoid_and_tanh_intervals_by_hand():
    sig = activations.get("sigmoid")
    lo, hi = sig.interval(torch.tensor([0.0, -1.0], dtype=torch.float64),
                          torch.tensor([0.0, 2.0], dtype=torch.float64), {})
    assert lo.tolist() == [0.5, 1 / (1 + math.exp(1.0))]
    assert hi.tolist() == [0.5, 1 / (1 + math.exp(-2.0))]
    lo, hi = activations.get("tanh").interval(torch.tensor([-1.0]), torch.tensor([0.5]), {})
    assert lo.item() == pytest.approx(math.tanh(-1.0)) and hi.item() == pytest.approx(
        math.tanh(0.5))


def test_hardtanh_by_hand_with_infinite_kinks():
    clip = activations.get("hardtanh")
    attrs = {"min_val": -math.inf, "max_val": 1.0}
    l, u = torch.tensor([-5.0, 0.0, 2.0]), torch.tensor([-1.0, 3.0, 4.0])
    lo, hi = clip.interval(l, u, attrs)
    assert lo.tolist() == [-5.0, 0.0, 1.0] and hi.tolist() == [-1.0, 1.0, 1.0]
    lines = clip.default_lines(l, u, attrs, "adaptive")
    # identity, the kink at 1 inside [0, 3] (chord (0,0)-(3,1) below), the constant 1
    assert lines.lower_slope.tolist() == pytest.approx([1.0, 1 / 3, 0.0])
    assert lines.lower_bias.tolist() == pytest.approx([0.0, 0.0, 1.0])
    # adaptive above: 1 - 0 < 3 - 1, so the flat line y = 1 (area 1/2, the identity's is 2)
    assert lines.upper_slope.tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert lines.upper_bias.tolist() == pytest.approx([0.0, 1.0, 1.0])
    one = clip.default_lines(l, u, attrs, "one")
    assert one.upper_slope[1].item() == 1.0 and one.upper_bias[1].item() == 0.0


def test_leaky_relu_lines_by_hand():
    leaky = activations.get("leaky_relu")
    attrs = {"negative_slope": 0.1}
    l, u = torch.tensor([-2.0, -3.0]), torch.tensor([2.0, 1.0])
    lines = leaky.default_lines(l, u, attrs, "adaptive")
    # chord through (-2, -0.2) and (2, 2): slope 0.55, intercept 0.9
    assert lines.upper_slope[0].item() == pytest.approx(0.55)
    assert lines.upper_bias[0].item() == pytest.approx(0.9)
    # adaptive: u > -l is False for both (2 > 2 no, 1 > 3 no): the slope a
    assert lines.lower_slope.tolist() == pytest.approx([0.1, 0.1])
    one = leaky.default_lines(l, u, attrs, "one")
    assert one.lower_slope.tolist() == [1.0, 1.0]


def test_relu_entry_is_the_relu_relaxation():
    l, u = _intervals(torch.float64)
    relu = activations.get("relu")
    up_slope, up_bias, unstable = relu_relaxation(l, u)
    for mode in LOWER_SLOPES:
        lines = relu.default_lines(l, u, {}, mode)
        assert torch.equal(lines.upper_slope, up_slope) and torch.equal(lines.upper_bias, up_bias)
        assert lines.lower_bias is None
        expected = torch.where(unstable, default_lower_slope(l, u, mode), (l >= 0).double())
        assert torch.equal(lines.lower_slope, expected)
    with pytest.raises(BoundFlowError, match="lower slope 'half'"):
        relu.default_lines(l, u, {}, "half")


@pytest.mark.parametrize("op, attrs", ENTRIES, ids=IDS)
def test_gradients_through_lines_are_finite(op, attrs):
    relaxation = activations.get(op)
    l, u = _intervals(torch.float64)
    l, u = l.clone().requires_grad_(True), u.clone().requires_grad_(True)
    state = relaxation.prepare(l, u, attrs)
    params = tuple(t.detach().clone().requires_grad_(True)
                   for t in relaxation.default_params(state, attrs, "adaptive"))
    lines = relaxation.lines(state, attrs, params)
    total = sum(t.sum() for t in lines if t is not None)
    total.backward()
    for g in (l.grad, u.grad, *(p.grad for p in params)):
        assert g is None or bool(torch.isfinite(g).all()), op


def test_split_params_keeps_relu_slopes_as_one_tensor():
    t = torch.zeros(2, 3)
    assert split_params(t, 1)[0] is t
    assert [p.shape for p in split_params(torch.zeros(2, 4, 3), 2)] == [(4, 3), (4, 3)]
    assert split_params(None, 2) == ()
