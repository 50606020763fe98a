"""Relaxations of S-shaped activations (sigmoid, tanh): increasing, convex below 0, concave
above, point-symmetric about ``(0, c)`` (``f(-x) = 2c - f(x)``), with ``f'`` even and
decreasing in ``|x|``. The choice is CROWN's (Zhang et al. 2018), as auto_LiRPA's
sigmoid/tanh bounds make it, with the tangent points as alpha-CROWN's parameters.

Upper line on ``[l, u]``:

- ``u <= 0`` (convex there): the chord through ``(l, f(l))`` and ``(u, f(u))``;
- ``l >= 0`` (concave): the tangent at ``d = l + t·(u - l)``, any ``t`` in [0, 1] (default
  the midpoint, ``t = 1/2``);
- ``l < 0 < u``: a tangent at ``d > 0`` lies above ``f`` on ``[l, ∞)`` exactly when it passes
  above ``(l, f(l))``, i.e. when ``d >= d_l``, where the tangent at ``d_l`` passes through
  ``(l, f(l))`` (``f(d) + f'(d)(l - d) - f(l)`` increases with ``d > 0``, so ``d_l`` is found
  by bisection, keeping the end of the bracket where the line is above). If ``u <= d_l``
  the chord is above ``f`` on ``[l, u]`` and is used; otherwise the tangent at
  ``d = d_l + t·(u - d_l)`` (default ``t = 0``: the line through ``(l, f(l))``).

The lower line is the upper line of the reflection: by the symmetry,
``f(y) <= k·y + b`` on ``[-u, -l]`` gives ``f(x) >= k·x + 2c - b`` on ``[l, u]``.

``l == u`` gives the tangent at that point (exact there). The lower-slope modes do not apply
to smooth functions: every mode gives the default tangent points above.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from boundflow.domains.relaxation import Lines, Relaxation, State, check_mode

Tensor = torch.Tensor
BISECTION_STEPS = 48


def _sigmoid_slope(x: Tensor) -> Tensor:
    # s(x)·s(-x): no cancellation where s(x) is near 1
    return torch.sigmoid(x) * torch.sigmoid(-x)


def _tanh_slope(x: Tensor) -> Tensor:
    return 4 * torch.sigmoid(2 * x) * torch.sigmoid(-2 * x)


class SShaped:
    """The relaxation of one S-shaped function ``f`` with derivative ``df`` and centre value
    ``c = f(0)``."""

    def __init__(self, name: str, f: Callable[[Tensor], Tensor], df: Callable[[Tensor], Tensor],
                 centre: float):
        self.name, self.f, self.df, self.c = name, f, df, centre

    def _gap(self, d: Tensor, p: Tensor) -> Tensor:
        """How far the tangent at ``d`` passes above ``(p, f(p))``."""
        return self.f(d) + self.df(d) * (p - d) - self.f(p)

    def _upper_state(self, l: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(start, chord)`` of the upper line on ``[l, u]``: the tangent points are
        ``[start, u]``; ``chord`` (1.0 / 0.0) where the chord is used instead."""
        with torch.no_grad():
            l, u = l.detach(), u.detach()
            crossing = (l < 0) & (u > 0)
            chord = (u <= 0) | (crossing & (self._gap(u, l) <= 0))
            search = crossing & ~chord
            p = torch.where(search, l, -torch.ones_like(l))
            lo = torch.zeros_like(u)
            hi = torch.where(search, u, torch.ones_like(u))
            for _ in range(BISECTION_STEPS):       # invariant: gap(hi) >= 0
                mid = (lo + hi) / 2
                above = self._gap(mid, p) >= 0
                hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
            start = torch.where(search, hi, torch.where(l >= 0, l, u))
            return start, chord.to(u.dtype)

    def prepare(self, l: Tensor, u: Tensor, attrs: Mapping) -> State:
        up_start, up_chord = self._upper_state(l, u)
        lo_start, lo_chord = self._upper_state(-u, -l)      # of the reflection
        return (l, u, up_start, up_chord, lo_start, lo_chord)

    def _upper(self, l: Tensor, u: Tensor, start: Tensor, chord: Tensor, t: Tensor
               ) -> tuple[Tensor, Tensor]:
        fl, fu = self.f(l), self.f(u)
        wide = u > l
        width = torch.where(wide, u - l, torch.ones_like(u))
        k_chord = torch.where(wide, (fu - fl) / width, self.df(l))
        b_chord = fl - k_chord * l
        d = start + t * (u - start)
        k_tan = self.df(d)
        b_tan = self.f(d) - k_tan * d
        use_chord = chord > 0
        return torch.where(use_chord, k_chord, k_tan), torch.where(use_chord, b_chord, b_tan)

    def lines(self, state: State, attrs: Mapping, params: tuple) -> Lines:
        l, u, up_start, up_chord, lo_start, lo_chord = state
        t_lo, t_up = params
        k_up, b_up = self._upper(l, u, up_start, up_chord, t_up)
        k_lo, b_lo = self._upper(-u, -l, lo_start, lo_chord, t_lo)
        return Lines(k_lo, 2 * self.c - b_lo, k_up, b_up)

    def default_params(self, state: State, attrs: Mapping, mode: str) -> tuple:
        check_mode(mode)
        l, u = state[0], state[1]
        half = torch.full_like(u, 0.5)
        zero = torch.zeros_like(u)
        # the midpoint tangent where one curvature holds, the tangent through the far end
        # point where [l, u] crosses 0
        return torch.where(u <= 0, half, zero), torch.where(l >= 0, half, zero)

    def relaxation(self) -> Relaxation:
        f = self.f
        return Relaxation(
            self.name, fn=lambda x, attrs: f(x),
            interval=lambda l, u, attrs: (f(l), f(u)),
            prepare=self.prepare, lines=self.lines, default_params=self.default_params,
            inexact=lambda l, u, attrs: u > l, n_params=2)


SIGMOID = SShaped("sigmoid", torch.sigmoid, _sigmoid_slope, 0.5).relaxation()
TANH = SShaped("tanh", torch.tanh, _tanh_slope, 0.0).relaxation()
