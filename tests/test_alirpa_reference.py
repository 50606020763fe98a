"""IBP agrees with auto_LiRPA's recorded bounds on the fixed models in ../shared/reference."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import boundflow as bf
import boundflow.examples as examples
from tests.conftest import shared_path


def _model(name: str) -> nn.Module:
    model = examples.reference_architecture(name)
    weights = np.load(shared_path("reference", "alirpa", f"{name}_weights.npz"))
    model.load_state_dict({k: torch.from_numpy(weights[k]) for k in weights.files})
    return model.eval()


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def reference(request):
    name = request.param
    base = shared_path("reference", "alirpa")
    return (name, _model(name), np.load(base / f"{name}_inputs.npz"),
            np.load(base / f"{name}_bounds.npz"))


SLOW = os.environ.get("BOUNDFLOW_SLOW") == "1"
NAMES = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}


def _run(reference, method, batch, eps_tag, spec):
    name, model, inputs, bounds = reference
    eps = 0.01 if eps_tag == "0.01" else 8 / 255
    C = inputs["C"][:batch] if spec == "margin" else None
    key = f"{NAMES[method]}|eps={eps_tag}|B={batch}|{spec}|"
    if key + "lb" not in bounds:
        pytest.skip(f"auto_LiRPA recorded no {key}")
    alpha = bf.AlphaConfig(iterations=20)
    out = bf.compute_bounds(model, inputs["x"][:batch], eps=eps, C=C, method=method,
                            alpha=alpha)
    return out, bounds[key + "lb"], bounds[key + "ub"]


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("eps_tag", ["0.01", "8_255"])
@pytest.mark.parametrize("spec", ["logits", "margin"])
def test_bounds_match_auto_lirpa(reference, method, batch, eps_tag, spec):
    out, lb, ub = _run(reference, method, batch, eps_tag, spec)
    np.testing.assert_allclose(out.lower.numpy(), lb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.upper.numpy(), ub, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("eps_tag", ["0.01", "8_255"])
@pytest.mark.parametrize("spec", ["logits", "margin"])
def test_alpha_crown_at_least_as_tight_as_auto_lirpa(reference, batch, eps_tag, spec):
    if reference[0] == "cnn" and batch == 32 and not SLOW:
        pytest.skip("cnn alpha-CROWN at batch 32 takes minutes; set BOUNDFLOW_SLOW=1")
    out, lb, ub = _run(reference, "alpha-crown", batch, eps_tag, spec)
    lower, upper = out.lower.numpy(), out.upper.numpy()
    # alpha-CROWN is an optimisation: tighter on average than auto_LiRPA's, and no entry
    # more than 1e-4 (relative to 1 + |bound|) looser than its
    assert (upper - lower).mean() <= (ub - lb).mean()
    tol = 1e-4 * (1 + np.abs(lb))
    assert np.all(lower >= lb - tol), (lower - lb).min()
    assert np.all(upper <= ub + tol), (ub - upper).min()


def test_float64_ibp_is_within_float32_noise_of_auto_lirpa(reference):
    name, model, inputs, bounds = reference
    out = bf.compute_bounds(model.double(), inputs["x"][:1].astype(np.float64), eps=0.01,
                            C=inputs["C"][:1])
    assert out.lower.dtype == torch.float64
    np.testing.assert_allclose(out.lower.numpy(), bounds["IBP|eps=0.01|B=1|margin|lb"],
                               rtol=1e-5, atol=1e-5)
    model.float()
