"""The contract of an activation relaxation: what every bound method needs to know about one
elementwise nonlinearity ``f``.

An entry is data (a frozen :class:`Relaxation` of small pure functions), registered by op name
in :mod:`boundflow.domains.activations`; the IBP, CROWN, patch and alpha-CROWN rules read it
and never test an op's name. Every function is elementwise over tensors of one shape (or
broadcastable ones), works in float32 and float64, and gives finite results wherever
``l <= u`` are finite, including ``l == u`` (a point: the lines are then exact there).

Linear bounds are ``lower_slope·x + lower_bias <= f(x) <= upper_slope·x + upper_bias`` for
every ``x`` in ``[l, u]``; a bias of ``None`` means zero (and costs nothing).

The lines may depend on *parameters*: ``n_params`` tensors with values in [0, 1] (one value
per neuron each), which alpha-CROWN optimises by projected gradient steps (clamping to
[0, 1] keeps every iterate sound). How a parameter maps to a line is the entry's business:
ReLU's one parameter is its lower slope, LeakyReLU's ``t`` gives the lower slope
``a + t·(1 - a)``, sigmoid's two choose tangent points inside their sound ranges. Where the
relaxation is exact (a stable neuron) the lines ignore the parameters.

``lines`` reads a *state*: a tuple of tensors of the shape of ``l`` whose first two are ``l``
and ``u``, made once by ``prepare`` (it holds what is costly to find, such as the tangent
point ranges of S-shaped functions). Since the state is elementwise it can be rearranged
like any map (the patch form unfolds it into receptive-field windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

import torch

from boundflow.errors import BoundFlowError

Tensor = torch.Tensor
# how default parameters are chosen (what they have always meant for ReLU's lower slope):
# "adaptive" picks, per neuron, the line of smaller area between it and f; "zero" the flat
# lines (ReLU: slope 0); "one" the lines of slope one (ReLU: the identity)
LOWER_SLOPES = ("adaptive", "zero", "one")


class Lines(NamedTuple):
    """Elementwise linear bounds of ``f`` on ``[l, u]`` (a bias of None is zero)."""

    lower_slope: Tensor
    lower_bias: Tensor | None
    upper_slope: Tensor
    upper_bias: Tensor | None


State = tuple  # (l, u, *extra elementwise tensors)


@dataclass(frozen=True)
class Relaxation:
    """One activation's facts and relaxation (see the module docstring for the contract).

    - ``fn(x, attrs)``: the concrete function;
    - ``interval(l, u, attrs) -> (lo, hi)``: its image of ``[l, u]``, tight;
    - ``prepare(l, u, attrs) -> state``: elementwise tensors ``(l, u, ...)`` the lines read;
    - ``lines(state, attrs, params) -> Lines``: sound linear bounds on ``[l, u]``; ``params``
      is a tuple of ``n_params`` tensors in [0, 1], broadcastable against the state;
    - ``default_params(state, attrs, mode) -> params``: the parameters of each lower-slope
      mode (``LOWER_SLOPES``), which CROWN uses and alpha-CROWN starts from;
    - ``inexact(l, u, attrs) -> mask``: where the lines are not exact (the neurons whose
      bounds matter: ReLU's unstable ones);
    - ``monotone``: nondecreasing (its interval is ``[f(l), f(u)]``).
    """

    name: str
    fn: Callable[[Tensor, Mapping], Tensor]
    interval: Callable[[Tensor, Tensor, Mapping], tuple[Tensor, Tensor]]
    prepare: Callable[[Tensor, Tensor, Mapping], State]
    lines: Callable[[State, Mapping, tuple], Lines]
    default_params: Callable[[State, Mapping, str], tuple]
    inexact: Callable[[Tensor, Tensor, Mapping], Tensor]
    n_params: int
    monotone: bool = True

    def default_lines(self, l: Tensor, u: Tensor, attrs: Mapping, mode: str) -> Lines:
        """The lines of ``mode`` on ``[l, u]`` (CROWN's choice)."""
        state = self.prepare(l, u, attrs)
        return self.lines(state, attrs, self.default_params(state, attrs, mode))


def check_mode(mode: str) -> None:
    if mode not in LOWER_SLOPES:
        raise BoundFlowError(f"lower slope {mode!r} is not one of {LOWER_SLOPES}")


def monotone_interval(fn: Callable[[Tensor, Mapping], Tensor]):
    """The interval image of a nondecreasing ``fn``: ``[fn(l), fn(u)]``."""
    def interval(l: Tensor, u: Tensor, attrs: Mapping) -> tuple[Tensor, Tensor]:
        return fn(l, attrs), fn(u, attrs)
    return interval


def bounds_state(l: Tensor, u: Tensor, attrs: Mapping) -> State:
    """The state of an entry whose lines need nothing but ``l`` and ``u``."""
    return (l, u)


def split_params(t: Tensor | None, n: int) -> tuple:
    """One side's learned parameters as the tuple ``lines`` takes: a tensor for one
    parameter per neuron (ReLU: its slopes, as they have always been stored), else ``n``
    tensors stacked on a leading axis."""
    if n == 0 or t is None:
        return ()
    return (t,) if n == 1 else tuple(t.unbind(0))


def stack_params(params: tuple) -> Tensor:
    """The inverse of :func:`split_params`."""
    return params[0] if len(params) == 1 else torch.stack(params, 0)
