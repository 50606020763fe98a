"""The activation relaxation registry: ``{op name: Relaxation}`` (the contract is in
:mod:`boundflow.domains.relaxation`), and the piecewise-linear entries.

Every rule table reaches an activation through :func:`get`; adding one (GELU, ELU) is an
entry here, its frontend converters and one ``OpDef`` line with the ``activation`` trait.

Piecewise-linear entries, for input bounds ``[l, u]``:

- ``relu``: stable neurons exact; unstable ones (``l < 0 < u``) get the chord
  ``u(x - l)/(u - l)`` above and ``t·x`` below, ``t`` in [0, 1] (the parameter; adaptive:
  ``t = 1`` if ``u > -l`` else 0).
- ``leaky_relu`` (slope ``a`` in [0, 1] below zero): the chord above and ``s·x`` below with
  ``s = a + t·(1 - a)`` in [a, 1].
- ``hardtanh`` (ONNX Clip, ``min_val = a < max_val = b``, either may be infinite): constant
  or identity where ``[l, u]`` holds no kink; one kink is ReLU's case (shifted, or reflected
  at ``b``); with both kinks inside, the lower line passes through ``(a, a)`` with slope
  ``t_lo·(b - a)/(u - a)`` and the upper through ``(b, b)`` with slope
  ``t_up·(b - a)/(b - l)`` (each below / above the convex hull of the graph).

Convex entries:

- ``elu`` (``x`` above zero, ``alpha·(exp(x) - 1)`` below, ``alpha`` in (0, 1], so convex and
  increasing): the chord above; below, the tangent at ``d = l + t·(u - l)`` (any tangent of
  a convex function lies below it; at ``d = 0`` the slope ``alpha`` is a subgradient).
  Adaptive: the midpoint (the tangent of least area); zero / one: the ends.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

from boundflow.domains.relaxation import (LOWER_SLOPES, Lines, Relaxation, bounds_state,
                                          check_mode, monotone_interval)
from boundflow.domains.sshaped import SIGMOID, TANH
from boundflow.errors import UnsupportedOpError

Tensor = torch.Tensor


# --- relu ----------------------------------------------------------------------------------

def relu_relaxation(l: Tensor, u: Tensor):
    """Upper line (slope, intercept) and the unstable mask for pre-activation bounds [l, u]."""
    unstable = (l < 0) & (u > 0)
    width = torch.where(unstable, u - l, torch.ones_like(u))
    up_slope = torch.where(unstable, u / width, (l >= 0).to(u.dtype))
    up_bias = torch.where(unstable, -l * u / width, torch.zeros_like(u))
    return up_slope, up_bias, unstable


def default_lower_slope(l: Tensor, u: Tensor, mode: str) -> Tensor:
    """The lower slope of unstable neurons (stable ones are fixed separately)."""
    if mode == "adaptive":
        return (u > -l).to(u.dtype)
    if mode == "zero":
        return torch.zeros_like(u)
    if mode == "one":
        return torch.ones_like(u)
    check_mode(mode)
    raise AssertionError(mode)


def _relu_state(l: Tensor, u: Tensor, attrs: Mapping):
    """``(l, u, upper slope, upper bias, unstable, active)``: everything but the lower slope
    of unstable neurons is found once, so both sides (and every window of the patch form)
    share it, and the sides' lines differ only where their parameters do."""
    up_slope, up_bias, unstable = relu_relaxation(l, u)
    return (l, u, up_slope, up_bias, unstable.to(u.dtype), (l >= 0).to(u.dtype))


def _relu_lines(state, attrs: Mapping, params: tuple) -> Lines:
    l, u, up_slope, up_bias, unstable, active = state
    return Lines(torch.where(unstable > 0, params[0], active), None, up_slope, up_bias)


def _straddles_zero(l: Tensor, u: Tensor, attrs: Mapping) -> Tensor:
    return (l < 0) & (u > 0)


RELU = Relaxation(
    "relu", fn=lambda x, attrs: torch.relu(x),
    interval=monotone_interval(lambda x, attrs: torch.relu(x)),
    prepare=_relu_state, lines=_relu_lines,
    default_params=lambda state, attrs, mode: (default_lower_slope(state[0], state[1], mode),),
    inexact=_straddles_zero, n_params=1)


# --- leaky_relu ----------------------------------------------------------------------------

def _leaky(x: Tensor, attrs: Mapping) -> Tensor:
    return F.leaky_relu(x, float(attrs["negative_slope"]))


def _leaky_lines(state, attrs: Mapping, params: tuple) -> Lines:
    l, u = state
    a = float(attrs["negative_slope"])
    unstable = (l < 0) & (u > 0)
    stable_slope = torch.where(l >= 0, torch.ones_like(u), torch.full_like(u, a))
    width = torch.where(unstable, u - l, torch.ones_like(u))
    # the chord through (l, a·l) and (u, u)
    up_slope = torch.where(unstable, (u - a * l) / width, stable_slope)
    up_bias = torch.where(unstable, -(1 - a) * l * u / width, torch.zeros_like(u))
    lower = torch.where(unstable, a + params[0] * (1 - a), stable_slope)
    return Lines(lower, None, up_slope, up_bias)


LEAKY_RELU = Relaxation(
    "leaky_relu", fn=_leaky, interval=monotone_interval(_leaky), prepare=bounds_state,
    lines=_leaky_lines,
    default_params=lambda state, attrs, mode: (default_lower_slope(state[0], state[1], mode),),
    inexact=_straddles_zero, n_params=1)


# --- hardtanh ------------------------------------------------------------------------------

def _clip(x: Tensor, attrs: Mapping) -> Tensor:
    return torch.clamp(x, float(attrs["min_val"]), float(attrs["max_val"]))


def _kinks(attrs: Mapping) -> tuple[float, float, float, float]:
    """(a, b) and finite stand-ins for them, used only where the kink is inside [l, u] (so
    is finite); elsewhere they keep unused branches, and their gradients, free of inf."""
    a, b = float(attrs["min_val"]), float(attrs["max_val"])
    return a, b, (a if math.isfinite(a) else 0.0), (b if math.isfinite(b) else 0.0)


def _hardtanh_lines(state, attrs: Mapping, params: tuple) -> Lines:
    l, u = state
    t_lo, t_up = params
    a, b, af, bf = _kinks(attrs)
    one, zero = torch.ones_like(u), torch.zeros_like(u)
    low_kink, high_kink = (l < a) & (u > a), (l < b) & (u > b)
    width = torch.where(u > l, u - l, one)
    # no kink inside: a constant (below a, above b) or the identity
    flat = (u <= a) | (l >= b)
    k_flat = torch.where(flat, zero, one)
    b_flat = torch.where(u <= a, zero + af, torch.where(l >= b, zero + bf, zero))
    # the kink at a alone (ReLU shifted to (a, a)): chord (l, a)-(u, u) above, a + t(x - a) below
    chord_a = torch.where(low_kink & ~high_kink, (u - af) / width, zero)
    # the kink at b alone (ReLU reflected at (b, b)): chord (l, l)-(u, b) below, b + t(x - b) above
    chord_b = torch.where(high_kink & ~low_kink, (bf - l) / width, zero)
    # both kinks: lines through (a, a) below and (b, b) above, slopes up to the hull's
    both = low_kink & high_kink
    hull_lo = torch.where(both, (bf - af) / torch.where(both, u - af, one), zero)
    hull_up = torch.where(both, (bf - af) / torch.where(both, bf - l, one), zero)
    lo_slope = torch.where(both, t_lo * hull_lo, torch.where(
        low_kink, t_lo, torch.where(high_kink, chord_b, k_flat)))
    lo_bias = torch.where(low_kink, af - lo_slope * af, torch.where(
        high_kink, l - chord_b * l, b_flat))
    up_slope = torch.where(both, t_up * hull_up, torch.where(
        low_kink, chord_a, torch.where(high_kink, t_up, k_flat)))
    up_bias = torch.where(high_kink, bf - up_slope * bf, torch.where(
        low_kink, af - chord_a * l, b_flat))
    return Lines(lo_slope, lo_bias, up_slope, up_bias)


def _hardtanh_defaults(state, attrs: Mapping, mode: str) -> tuple:
    l, u = state
    if mode == "adaptive":
        # the line of smaller area: through a kink with the steeper slope where more of [l, u]
        # lies on the sloped side of it (ReLU's u > -l, at a and reflected at b)
        _, _, af, bf = _kinks(attrs)
        return (u - af > af - l).to(u.dtype), (bf - l > u - bf).to(u.dtype)
    t = default_lower_slope(l, u, mode)
    return t, t


def _hardtanh_inexact(l: Tensor, u: Tensor, attrs: Mapping) -> Tensor:
    a, b = float(attrs["min_val"]), float(attrs["max_val"])
    return ((l < a) & (u > a)) | ((l < b) & (u > b))


HARDTANH = Relaxation(
    "hardtanh", fn=_clip, interval=monotone_interval(_clip), prepare=bounds_state,
    lines=_hardtanh_lines, default_params=_hardtanh_defaults, inexact=_hardtanh_inexact,
    n_params=2)


# --- elu ------------------------------------------------------------------------------------

def _elu(x: Tensor, attrs: Mapping) -> Tensor:
    return F.elu(x, float(attrs["alpha"]))


def _elu_slope(d: Tensor, attrs: Mapping) -> Tensor:
    """A subgradient of ELU at ``d`` (its derivative away from 0)."""
    return torch.where(d > 0, torch.ones_like(d),
                       float(attrs["alpha"]) * torch.exp(torch.clamp(d, max=0.0)))


def _elu_lines(state, attrs: Mapping, params: tuple) -> Lines:
    l, u = state
    fl, fu = _elu(l, attrs), _elu(u, attrs)
    point = u <= l
    width = torch.where(point, torch.ones_like(u), u - l)
    # the chord; at a point, the steepest subgradient there (a line through it, exact)
    up_slope = torch.where(point, _elu_slope(u, attrs), (fu - fl) / width)
    d = l + params[0] * (u - l)
    lo_slope = _elu_slope(d, attrs)
    return Lines(lo_slope, _elu(d, attrs) - lo_slope * d, up_slope, fl - up_slope * l)


def _convex_defaults(state, attrs: Mapping, mode: str) -> tuple:
    check_mode(mode)
    t = {"adaptive": 0.5, "zero": 0.0, "one": 1.0}[mode]
    return (torch.full_like(state[0], t),)


ELU = Relaxation(
    "elu", fn=_elu, interval=monotone_interval(_elu), prepare=bounds_state, lines=_elu_lines,
    default_params=_convex_defaults, inexact=lambda l, u, attrs: (l < 0) & (u > l), n_params=1)


# --- the registry --------------------------------------------------------------------------

ACTIVATIONS: dict[str, Relaxation] = {r.name: r for r in (RELU, LEAKY_RELU, HARDTANH, SIGMOID,
                                                         TANH, ELU)}


def get(op: str) -> Relaxation:
    """The relaxation of activation ``op``; an unknown one raises, listing those there are."""
    try:
        return ACTIVATIONS[op]
    except KeyError:
        raise UnsupportedOpError(f"activation {op!r} has no relaxation; the relaxations are "
                                 f"{sorted(ACTIVATIONS)}") from None


__all__ = ["ACTIVATIONS", "LOWER_SLOPES", "Lines", "Relaxation", "default_lower_slope", "get",
           "relu_relaxation"]
