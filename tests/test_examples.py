"""Every bundled example: IBP bounds contain the true outputs at 10,000 sampled points, and
equal the independent float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import boundflow as bf
import boundflow.examples as examples
from boundflow.api import as_graph
from tests.helpers import assert_contains, box_points, true_outputs
from tests.reference import reference_ibp


@pytest.fixture(scope="module", params=sorted(examples.EXAMPLES))
def example(request):
    ex = examples.load(request.param)
    graph = as_graph(ex.model, torch.from_numpy(ex.inputs[:1]))
    return ex, graph


@pytest.mark.parametrize("spec", ["logits", "margin"])
def test_example_sound_by_sampling(example, spec):
    ex, graph = example
    x = ex.inputs[:2].astype(np.float64)
    eps = 0.02
    n_out = graph.output_shape[-1]
    labels = ex.labels[:2] if ex.labels is not None else np.array([0, 1])
    C = bf.margin_spec(labels, n_out).C if spec == "margin" else None
    for dtype, tol in (("float64", 1e-9), ("float32", 1e-5)):
        out = bf.compute_bounds(graph, x, eps=eps, C=C, dtype=dtype)
        values = true_outputs(graph, box_points(x - eps, x + eps))
        assert_contains(out.lower, out.upper, values, C=C, tol=tol, what=f"{ex.name} {dtype}")


def test_example_matches_reference(example):
    ex, graph = example
    x = ex.inputs[:3].astype(np.float64)
    labels = ex.labels[:3] if ex.labels is not None else np.array([0, 1, 2])
    C = bf.margin_spec(labels, graph.output_shape[-1]).C
    for spec in (None, C):
        out = bf.compute_bounds(graph, x, eps=0.01, C=spec, dtype="float64")
        lo, hi = reference_ibp(graph, x - 0.01, x + 0.01, spec)
        np.testing.assert_allclose(out.lower.numpy(), lo, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(out.upper.numpy(), hi, rtol=1e-5, atol=1e-9)


def test_spec_folding_is_never_looser_than_applying_c_after(example):
    ex, graph = example
    x = ex.inputs[:2]
    n_out = graph.output_shape[-1]
    C = bf.margin_spec([0, 1], n_out).C
    folded = bf.compute_bounds(graph, x, eps=0.02, C=C, dtype="float64")
    y = bf.compute_bounds(graph, x, eps=0.02, dtype="float64")
    pos, neg = np.maximum(C, 0), np.minimum(C, 0)
    lo, hi = y.lower.numpy(), y.upper.numpy()
    after_lo = np.einsum("bsk,bk->bs", pos, lo) + np.einsum("bsk,bk->bs", neg, hi)
    assert np.all(folded.lower.numpy() >= after_lo - 1e-9)
