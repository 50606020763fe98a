"""Batched matrix-vector products: ``A[b] · v[b]`` for every sample ``b``.

CROWN concretises its coefficients over the input box with them (``lA·mid − |lA|·rad``), the
patch form per window, and IBP's last layer under a spec. torch runs them as a batched matrix
product with one column, and how fast depends on the column's strides: a column made by
``v.unsqueeze(-1)`` (strides ``(k, 1, 1)``) takes a path 5-10x slower on CPU than the same
column as a transposed row (``v.unsqueeze(-2).transpose(-1, -2)``, strides ``(k, 1, k)``),
which is also faster than one ``torch.mv`` per sample or a product and a sum
(``python benchmarks/bench_gemv.py`` prints the table). :func:`bgemv` builds the fast column,
and two cases get fewer, larger products:

* a matrix shared by the batch (``A``'s leading dims all 1): one matrix product, ``v·Aᵀ``;
* a vector shared along ``A``'s leading dims past the batch (a patch form whose windows all
  meet one box): those dims join ``A``'s rows.

Each output element is the same sum of the same products whichever way: only the order of
the additions differs (float rounding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bgemv(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``A [*lead_A, S, k]`` times ``v [*lead_v, k]``: ``[*lead, S]``, where ``lead`` is the
    broadcast of the two leading shapes (of one length)."""
    if A.dim() == 3 and v.dim() == 2 and A.shape[0] == v.shape[0] and A.shape[2] == v.shape[1]:
        return torch.bmm(A, v.unsqueeze(-2).transpose(-1, -2)).squeeze(-1)   # the common case
    if A.dim() != v.dim() + 1 or A.shape[-1] != v.shape[-1]:
        raise ValueError(f"bgemv: A {tuple(A.shape)} and v {tuple(v.shape)} do not match")
    S, k = A.shape[-2:]
    if math.prod(A.shape[:-2]) == 1 and math.prod(v.shape[:-1]) > 1:
        return F.linear(v, A.reshape(S, k))
    if A.dim() > 3 and all(d == 1 for d in v.shape[1:-1]):
        out = bgemv(A.reshape(A.shape[0], -1, k), v.reshape(v.shape[0], k))
        lead = torch.broadcast_shapes(A.shape[:-2], v.shape[:-1])
        return out.reshape((out.shape[0],) + tuple(A.shape[1:-1])).expand(lead + (S,))
    return torch.matmul(A, v.unsqueeze(-2).transpose(-1, -2)).squeeze(-1)


__all__ = ["bgemv"]
