"""What CROWN's backward rules exchange: coefficient pairs and the context they read.

A backward rule is ``rule(node, params, coeffs, ctx) -> ([coeffs per input], lb_add,
ub_add)``: it maps the coefficients of ``node``'s output to those of its inputs and returns
the constant terms its relaxation adds to the lower and upper bounds (``[B, S]`` tensors, or
0.0). The rule tables are :mod:`boundflow.domains.crown_rules` (affine and view ops) and
:mod:`boundflow.domains.crown_relaxed` (relaxed ops); the walk is
:mod:`boundflow.domains.backward`.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch

from boundflow.domains.gemv import bgemv
from boundflow.domains.interval import Interval


class Coeffs(NamedTuple):
    """Coefficients of the lower and upper linear bounds, ``[B, S, *shape]`` each (``B`` may
    be 1 while they are the same for every sample; the two may be one tensor until the first
    relaxation separates them)."""

    lA: torch.Tensor
    uA: torch.Tensor


class BackwardContext(NamedTuple):
    """What rules read besides the coefficients: intervals of the nodes bounded so far (a
    relaxed op reads its input's; nothing else is needed), the lower-slope mode of the
    activation relaxations, learned relaxation parameters (alpha-CROWN: per activation node,
    a (lower-side, upper-side) pair; for ReLU its lower slopes ``[B, S, *shape]``, for
    entries with several parameters per neuron those stacked on a leading axis), every node's
    per-sample shape (filled in from the graph by the walk), whether conv
    pre-activations may be bounded in patch form (:mod:`boundflow.domains.crown_conv`), and
    terms added to the lower side's coefficients at given nodes (beta-CROWN), and ``lines``:
    a memo of the activations' default lines that the backward passes of one run share
    (see :func:`boundflow.domains.crown_relaxed.default_lines`; None: none kept)."""

    bounds: Mapping[str, Interval]
    lower_slope: str
    alphas: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None
    shapes: Mapping[str, tuple[int, ...]] | None = None
    patches: bool = True
    # beta-CROWN: per node, a term added to the lower side's coefficients when the walk
    # reaches it (``-beta·sign`` of split ReLU inputs; see :mod:`boundflow.domains.beta`)
    lower_terms: Mapping[str, torch.Tensor] | None = None
    lines: dict | None = None


def sum_trailing(t: torch.Tensor) -> torch.Tensor:
    """Sum over every axis after ``[B, S]``."""
    return t.flatten(2).sum(-1)


def same(a: Coeffs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Coeffs:
    """``fn`` on both sides; once where they are still one tensor (before any relaxation)."""
    if a.lA is a.uA:
        out = fn(a.lA)
        return Coeffs(out, out)
    return Coeffs(fn(a.lA), fn(a.uA))


def dot_trailing(t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``sum_trailing(t * c)`` for ``t`` ``[B, S, *shape]`` and ``c`` broadcastable to it,
    as a matrix-vector product where ``c`` is one vector per sample (``[*shape]``, or
    ``[B or 1, 1, *shape]``: a bias, a relaxation's intercepts), with no ``[B, S, *shape]``
    product in between (ACAS Xu CROWN at 1,024 boxes: these terms took a tenth of the
    call); else the product and the sum. The same terms, added in another order."""
    shape = tuple(t.shape[2:])
    if c.dtype != t.dtype:                    # a product would promote; a matmul refuses
        return sum_trailing(t * c)
    if tuple(c.shape) == shape:
        return t.flatten(2) @ c.reshape(-1)
    if c.dim() == t.dim() and c.shape[1] == 1 and tuple(c.shape[2:]) == shape:
        return bgemv(t.flatten(2), c.flatten(2)[:, 0])
    return sum_trailing(t * c)


def const_term(a: Coeffs, c: torch.Tensor, sign: float = 1.0):
    """The constant terms ``sign·sum(A·c)`` of both sides (computed once while shared)."""
    low = sign * dot_trailing(a.lA, c)
    return low, (low if a.lA is a.uA else sign * dot_trailing(a.uA, c))
