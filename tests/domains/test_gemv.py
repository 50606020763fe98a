"""Batched matrix-vector products (boundflow.domains.gemv): every shape CROWN's
concretisation, the patch form and IBP's spec layer give equals the plain sum of products,
values and gradients."""

from __future__ import annotations

import pytest
import torch

from boundflow.domains.gemv import bgemv


def _reference(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (A * v.unsqueeze(-2)).sum(-1)


@pytest.mark.parametrize("a_shape,v_shape", [
    ((5, 7, 11), (5, 11)),            # one matrix per sample
    ((1, 7, 11), (5, 11)),            # a matrix shared by the batch: one product
    ((5, 7, 11), (1, 11)),            # one vector for every matrix
    ((1, 7, 11), (1, 11)),            # a batch of one
    ((5, 1, 11), (5, 11)),            # one row (a selected neuron)
    ((3, 4, 2, 6), (3, 4, 6)),        # patch windows, each its own piece of the box
    ((3, 4, 2, 6), (3, 1, 6)),        # patch windows of the whole map: one vector each
    ((1, 4, 2, 6), (3, 4, 6)),        # windows alike for the batch
    ((1, 4, 2, 6), (3, 1, 6)),
    ((3, 1, 2, 6), (3, 4, 6)),        # broadcast the other way: the plain product
    ((40, 300, 400), (40, 400)),      # large enough for a blocked kernel
])
def test_bgemv_equals_the_sum_of_products(a_shape, v_shape):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(a_shape, generator=gen, dtype=torch.float64)
    v = torch.randn(v_shape, generator=gen, dtype=torch.float64)
    out = bgemv(A, v)
    ref = _reference(A, v)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_bgemv_reads_strided_operands():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(6, 9, 5, generator=gen).transpose(1, 2)          # [6, 5, 9], strided
    v = torch.randn(9, 6, generator=gen).t()                          # [6, 9], strided
    torch.testing.assert_close(bgemv(A, v), _reference(A, v), rtol=1e-5, atol=1e-5)
    e = torch.randn(1, 9, generator=gen).expand(6, 9)                 # stride 0
    torch.testing.assert_close(bgemv(A, e), _reference(A, e), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("a_shape,v_shape", [((4, 3, 8), (4, 8)), ((1, 3, 8), (4, 8)),
                                             ((2, 3, 2, 8), (2, 1, 8))])
def test_bgemv_gradients_equal_the_sum_of_products(a_shape, v_shape):
    """alpha-CROWN differentiates through the concretisation."""
    gen = torch.Generator().manual_seed(2)
    A0 = torch.randn(a_shape, generator=gen, dtype=torch.float64)
    v0 = torch.randn(v_shape, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (bgemv, _reference):
        A, v = A0.clone().requires_grad_(), v0.clone().requires_grad_()
        (fn(A, v) ** 2).sum().backward()
        grads.append((A.grad, v.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bgemv_refuses_mismatched_operands():
    with pytest.raises(ValueError, match="do not match"):
        bgemv(torch.zeros(2, 3, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="do not match"):
        bgemv(torch.zeros(2, 3, 4), torch.zeros(2, 2, 2, 4))


@pytest.mark.parametrize("t_shape, c_shape", [
    ((3, 4, 5), (5,)),                    # a bias shared by the batch: one product
    ((3, 4, 2, 3, 3), (2, 3, 3)),
    ((3, 4, 5), (3, 1, 5)),               # one vector per sample (a relaxation's intercepts)
    ((1, 4, 5), (3, 1, 5)),               # coefficients shared by the batch
    ((3, 4, 5), (1, 1, 5)),               # intercepts shared by the batch
    ((3, 4, 2, 3, 3), (3, 1, 2, 3, 3)),
    ((3, 4, 5), (3, 4, 5)),               # per row (alpha's lines): product and sum
    ((3, 4, 2, 3, 3), (2, 1, 1)),         # per channel: product and sum
    ((3, 4, 5), (1, 5)),
])
def test_dot_trailing_is_the_product_summed(t_shape, c_shape):
    """``dot_trailing(t, c)`` is ``sum_trailing(t * c)`` whichever path it takes, gradients
    included (alpha-CROWN's lines carry them)."""
    from boundflow.domains.coeffs import dot_trailing, sum_trailing

    g = torch.Generator().manual_seed(sum(t_shape) + sum(c_shape))
    t = torch.randn(t_shape, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(c_shape, generator=g, dtype=torch.float64, requires_grad=True)
    want = sum_trailing(t * c)
    got = dot_trailing(t, c)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    gw = torch.autograd.grad(want.sum(), (t, c))
    gg = torch.autograd.grad(got.sum(), (t, c))
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b)
