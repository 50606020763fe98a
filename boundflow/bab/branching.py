"""Which input dimension an input-split search bisects in each box.

Bisecting dimension ``d`` of a box of widths ``w`` halves ``w_d``; how much that lifts the
box's lower bound is estimated from a slope of the bounded row (the best-bounded row of the
box's worst disjunct, :meth:`~boundflow.bab.common.Disjuncts.closest_rows`) times ``w_d``:

- ``sensitivity``: the gradient of the row at the box centre (the model's slope there);
- ``coefficients``: the coefficients ``lA`` of CROWN's linear lower bound of the row in
  terms of the input, under the bounds the plan gave the box's ReLU inputs (the relaxed
  model's slope over the whole box: what alpha-beta-CROWN's ``sb`` input branching uses);
- ``combined`` (the default): the geometric mean of the two, each as its share of its sum
  over the box's dimensions (``sqrt(|g| / sum |g| * |lA| / sum |lA|)``): a dimension
  scores only where both slopes see it (the widest dimension where they share none); where
  the coefficients are all zero (a plan that does not keep the bounds they need, or a
  constant bound) the gradient's share alone;
- ``widest``: the widest dimension.

Measured: ``boundflow vnncomp`` on 12 ACAS Xu instances (nets 1_1 and 1_9, properties 1-6;
5 and 6 from VNN-COMP, not in ../shared), this 2-core host, two runs of each rule
alternating, seconds to the verdict (both runs) and domains (12/12 decided, 0 wrong; all 12
in 41.6 s by the gradient, 28.1 s combined, mean of the two runs):

==============  ===========  =========  ===========  =========
instance        sensitivity  domains    sum of       domains
                                        shares
==============  ===========  =========  ===========  =========
1_1 property 1  0.41 / 0.53  105        0.40 / 0.39  63
1_1 property 2  0.90 / 1.30  2,281      0.59 / 0.43  521
1_1 property 3  2.92 / 1.70  3,799      1.77 / 1.37  3,289
1_1 property 4  0.33 / 0.55  745        0.50 / 0.50  649
1_1 property 5  3.90 / 5.59  6,141      2.16 / 1.68  2,829
1_1 property 6  19.4 / 18.7  24,980     3.75 / 3.19  5,070
1_9 property 2  0.38 / 0.37  571        0.50 / 0.45  667
1_9 property 6  12.3 / 13.7  13,992     18.3 / 19.8  17,852
==============  ===========  =========  ===========  =========

(1_9 properties 1, 3, 4 and 5 take 0.01-0.15 s either way.) That ``combined`` added the
two shares. Their geometric mean (2026-11-29, the same 12 in one ``boundflow vnncomp`` run
per rule, two runs alternating, load 1.2-1.7; total 15.4 / 15.4 s -> 14.8 / 13.1 s):

==============  ===========  =========  =============  ===========
instance        sum          domains    geometric      domains
==============  ===========  =========  =============  ===========
1_1 property 2  0.36 / 0.34  521        0.38 / 0.37    613
1_1 property 3  0.83 / 0.81  3,817      0.93 / 0.89    4,135
1_1 property 4  0.29 / 0.29  649        0.33 / 0.31    747
1_1 property 5  1.41 / 1.43  7,129      1.50 / 1.48    6,105
1_1 property 6  1.78 / 1.75  5,704      2.15 / 1.93    6,274
1_9 property 2  0.34 / 0.33  667        0.29 / 0.28    539
1_9 property 6  9.98 / 10.05 19,410     8.79 / 7.40    17,232
==============  ===========  =========  =============  ===========

It is slower on 1_1 properties 3, 4 and 6 (by 0.04-0.4 s) and lets the search do without
alpha-CROWN where the sum could not: with ``--bab-escalate none`` 1_9 property 6 took 5.9 s
(22,444 domains) where the sum timed out at 40 s (and at 116 s the session before); 1_1
properties 3, 5, 6 then took 1.05 / 1.70 / 2.25 s against 0.88 / 1.63 / 1.84. In a box
where the two slopes share no dimension the widest one was better than their sum (1_9
property 6: 14,106 domains against 19,036). Earlier, one run each with the
coefficients from an extra CROWN pass, ``coefficients`` alone needed 4,281 / 4,573 / 1,391
/ 3,005 / 6,098 / 2,605 / 18,222 domains on 1_1 properties 2-6 and 1_9 properties 2 and 6,
and a plain sum of the two slopes (not shares) 1,275 / 3,593 / 663 / 3,781 / 5,854 / 837 /
17,904: the shares were as good or better on each. Neither slope alone is best everywhere;
the sum of their shares was the best or close to it on all but 1_9 property 6 (no VNN-COMP
pairing), where the search was 1.5x slower than the gradient's; their geometric mean
(above) is faster there than either. The gradient misses what the relaxation loses at
the unstable ReLUs; ``lA`` is flat where a ReLU is relaxed with slope 0. The coefficients
need the plan's ReLU-input bounds of the box, which the torch backend returns; under a plan
of another backend they are zero and ``combined`` is ``sensitivity``.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

import torch

from boundflow.domains.backward import linear_bounds
from boundflow.domains.coeffs import BackwardContext
from boundflow.domains.interval import Interval
from boundflow.errors import BoundFlowError
from boundflow.ir.graph import Graph

log = logging.getLogger("boundflow.bab")

RULES = ("combined", "sensitivity", "coefficients", "widest")
NEEDS_COEFFICIENTS = ("combined", "coefficients")


def coefficients(graph: Graph, tensors: Mapping[str, torch.Tensor],
                 bounds: Mapping[str, Interval], rows: torch.Tensor) -> torch.Tensor | None:
    """``[N, n_in]``: per box, the coefficients of CROWN's linear lower bound of its row
    ``rows[i]`` (``[N, n_out]``, a row of the spec's ``C``) in terms of the input, relaxing at
    ``bounds`` (the box's ReLU inputs' intervals, by node). None where the backward walk
    cannot be made from them (a node's bounds missing, an op with no rule)."""
    n = rows.shape[0]
    A = rows.reshape((n, 1) + tuple(graph.output_node.shape))
    try:
        with torch.no_grad():
            a, _, _ = linear_bounds(graph, graph.output, A, tensors,
                                    BackwardContext(bounds, "adaptive", None))
    except (KeyError, BoundFlowError) as e:
        log.debug("bab: no coefficients for branching (%s)", e)
        return None
    if a is None:
        return rows.new_zeros(n, math.prod(graph.input_shape))   # a constant: no slope
    lA = a.lA.reshape(a.lA.shape[0], -1).expand(n, -1)
    return torch.nan_to_num(lA, nan=0.0, posinf=0.0, neginf=0.0)


def _finite(slope: torch.Tensor) -> torch.Tensor:
    """``slope`` with a NaN or infinite entry as no slope (0): it carries no ranking."""
    return torch.nan_to_num(slope, nan=0.0, posinf=0.0, neginf=0.0)


def _share(slope: torch.Tensor) -> torch.Tensor:
    """Each box's slopes over their sum (all zero where they sum to zero)."""
    return slope / slope.sum(1, keepdim=True).clamp_min(torch.finfo(slope.dtype).tiny)


def _agreed(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The geometric mean of the gradient's and the coefficients' shares, ``sqrt(g * c)``
    (zero where either slope is: the widest dimension where that is every one, as in a box
    whose gradient vanishes, its centre where the row is flat); the gradient's share alone
    in a box whose coefficients are all zero (not known, or a constant bound). Taking the
    coefficients' share where the gradient vanishes instead lost: ACAS Xu 1_9 property 6
    without alpha-CROWN ran past 60 s where the widest dimension took 8.4 s."""
    out = g.sqrt() * c.sqrt()                     # (g * c underflows sooner)
    return torch.where((c.max(1).values <= 0)[:, None], g, out)


def split_dims(rule: str, lo: torch.Tensor, hi: torch.Tensor, grad: torch.Tensor | None,
               coeffs: torch.Tensor | None) -> torch.Tensor:
    """``[N]``: the dimension to bisect in each box ``[lo, hi]`` (``[N, n_in]``) by ``rule``
    (module docstring), from the row's gradient at the centre ``grad`` and its CROWN
    coefficients ``coeffs`` (``[N, n_in]`` each, or None: not known). A box where the
    rule's slopes all vanish gets its widest dimension."""
    width = hi - lo
    if rule == "widest":
        return width.argmax(1)
    slope = None
    if rule in ("sensitivity", "combined") and grad is not None:
        slope = _finite(grad.abs())
    if rule in NEEDS_COEFFICIENTS and coeffs is not None:
        slope = _finite(coeffs.abs()) if slope is None else \
            _agreed(_share(slope), _share(_finite(coeffs.abs())))
    if slope is None:
        return width.argmax(1)
    score = torch.nan_to_num(slope * width, nan=0.0)
    flat = score.max(1).values <= 0
    dims = score.argmax(1)
    dims[flat] = width[flat].argmax(1)
    return dims


__all__ = ["NEEDS_COEFFICIENTS", "RULES", "coefficients", "split_dims"]
