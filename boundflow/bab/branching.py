"""Which input dimension an input-split search bisects in each box.

Bisecting dimension ``d`` of a box of widths ``w`` halves ``w_d``; how much that lifts the
box's lower bound is estimated from a slope of the bounded row (the best-bounded row of the
box's worst disjunct, :meth:`~boundflow.bab.common.Disjuncts.closest_rows`) times ``w_d``:

- ``sensitivity``: the gradient of the row at the box centre (the model's slope there);
- ``coefficients``: the coefficients ``lA`` of CROWN's linear lower bound of the row in
  terms of the input, under the bounds the plan gave the box's ReLU inputs (the relaxed
  model's slope over the whole box: what alpha-beta-CROWN's ``sb`` input branching uses);
- ``combined`` (the default): the two added, each as its share of its sum over the box's
  dimensions (``|g| / sum |g| + |lA| / sum |lA|``), so neither outvotes the other by scale;
- ``widest``: the widest dimension.

Measured (``boundflow verify``'s search on ACAS Xu, this 2-core host, one run each; the
coefficients from an extra CROWN pass then, so domains are the fair measure), domains to
the verdict by rule, sensitivity / coefficients / combined:

==============  ===========  ============  ========
instance        sensitivity  coefficients  combined
==============  ===========  ============  ========
1_1 property 2  2,281        4,281         1,275
1_1 property 3  4,639        4,573         3,593
1_1 property 4  745          1,391         663
1_1 property 5  5,569        3,005         3,781
1_1 property 6  23,746       6,098         5,854
1_9 property 2  571          2,605         837
1_9 property 6  13,992       18,222        17,904
==============  ===========  ============  ========

Neither slope alone is best everywhere; their sum is the best or close to it on all but 1_9
property 6 (no VNN-COMP pairing). The gradient misses what the relaxation loses at the
unstable ReLUs; ``lA`` is flat where a ReLU is relaxed with slope 0. The coefficients need
the plan's ReLU-input bounds of the box, which the torch backend returns; under a plan of
another backend they are zero and ``combined`` is ``sensitivity``.
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


def _share(slope: torch.Tensor) -> torch.Tensor:
    """Each box's slopes over their sum (all zero where they sum to zero)."""
    return slope / slope.sum(1, keepdim=True).clamp_min(torch.finfo(slope.dtype).tiny)


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
        slope = grad.abs()
    if rule in NEEDS_COEFFICIENTS and coeffs is not None:
        slope = coeffs.abs() if slope is None else _share(slope) + _share(coeffs.abs())
    if slope is None:
        return width.argmax(1)
    score = torch.nan_to_num(slope * width, nan=0.0)
    flat = score.max(1).values <= 0
    dims = score.argmax(1)
    dims[flat] = width[flat].argmax(1)
    return dims


__all__ = ["NEEDS_COEFFICIENTS", "RULES", "coefficients", "split_dims"]
