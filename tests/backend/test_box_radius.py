"""An L∞ box's radius is one number per sample (boundflow.backend.torch.box_value): the
torch executor then skips the radius product of the weighted ops that read the box. The
bounds equal those of the full product and contain sampled outputs; any other box takes
the full product."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import boundflow as bf
from boundflow.api import as_graph
from boundflow.backend import torch as torch_backend
from boundflow.backend.torch import TorchExecutor, box_value, box_weighted_macs
from boundflow.domains.interval import Interval
from boundflow.ir.normalize import normalised
from boundflow.ir.spec import InputSpec
from tests.helpers import assert_contains, box_points, counted_calls, true_outputs


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 4)).eval()


def _cnn():
    """Padding and stride: the border outputs' responses to ones differ from the middle's."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(64, 3)).eval()


def _bounds(model, x, eps, method, monkeypatch, on: bool):
    """Bounds with the one-number radius allowed (``on``) or never, and how many weighted
    ops took it."""
    taken = counted_calls(monkeypatch, torch_backend, "_uniform_radius")
    monkeypatch.setattr(torch_backend, "UNIFORM_MACS", 0 if on else 1 << 62)
    monkeypatch.setattr(torch_backend, "UNIFORM_MACS_PER_ELEMENT", 0)
    b = bf.compute_bounds(model, x, eps=eps, method=method)
    monkeypatch.undo()
    return b, len(taken)


@pytest.mark.parametrize("make,shape", [(_mlp, (3, 4, 4)), (_cnn, (3, 8, 8))])
@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_one_number_radius_equals_the_product_and_is_sound(make, shape, method, monkeypatch):
    model = make()
    x = np.random.default_rng(2).random((4,) + shape).astype(np.float32)
    eps = 0.05
    fast, n_fast = _bounds(model, x, eps, method, monkeypatch, on=True)
    full, n_full = _bounds(model, x, eps, method, monkeypatch, on=False)
    assert n_fast >= 1 and n_full == 0
    np.testing.assert_allclose(fast.lower, full.lower, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast.upper, full.upper, rtol=1e-5, atol=1e-5)
    pts = box_points(x - eps, x + eps, n=2000)
    assert_contains(fast.lower, fast.upper, true_outputs(model, pts), tol=1e-5)


def test_a_box_of_unequal_widths_takes_the_product(monkeypatch):
    model = _cnn()
    x = np.random.default_rng(3).random((4, 3, 8, 8)).astype(np.float32)
    eps = np.full_like(x, 0.05)
    eps[:, 0] = 0.02                                   # one channel narrower
    spec = InputSpec.linf(x, eps)
    got, n = _bounds(model, spec, None, "ibp", monkeypatch, on=True)
    assert n == 0
    pts = box_points(spec.lower, spec.upper, n=2000)
    assert_contains(got.lower, got.upper, true_outputs(model, pts), tol=1e-5)


def test_box_value_holds_the_box():
    """Where each sample's half-widths agree to float rounding, the radius is their
    largest, stored once per sample (stride 0); the box only grows."""
    gen = np.random.default_rng(4)
    centre = torch.as_tensor(gen.random((3, 2, 5, 5)), dtype=torch.float32)
    eps = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1, 1)
    box = Interval(centre - eps, centre + eps)
    v = box_value(box)
    assert v.form == "cr" and v.b.stride()[1:] == (0, 0, 0)
    lo, hi = v.interval()
    assert bool((lo <= box.lower).all()) and bool((hi >= box.upper).all())
    torch.testing.assert_close(v.b[:, 0, 0, 0], eps.flatten(), rtol=1e-6, atol=0)
    uneven = Interval(box.lower, box.upper + torch.linspace(0, 1e-3, 50).view(1, 2, 5, 5))
    assert box_value(uneven).form == "lu"
    one = Interval(torch.zeros(3, 1), torch.ones(3, 1))           # one element: no gain
    assert box_value(one).form == "lu"


def test_the_check_is_made_where_the_products_are_worth_it():
    g = normalised(as_graph(_mlp(), torch.zeros(1, 3, 4, 4)))[0]
    assert box_weighted_macs(g) == 48 * 32
    g = normalised(as_graph(_cnn(), torch.zeros(1, 3, 8, 8)))[0]
    assert box_weighted_macs(g) == 4 * 4 * 4 * 3 * 3 * 3
    relu_first = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Flatten(),
                                     torch.nn.Linear(4, 2)).eval()
    assert box_weighted_macs(normalised(as_graph(relu_first, torch.zeros(1, 4)))[0]) == 0


def test_widths_that_differ_past_rounding_keep_the_product_in_any_dtype(monkeypatch):
    """float64 half-widths 9e-7 apart (relative) are not one number; float32 ``x ± 2/255``
    around [0, 1] inputs, apart only by rounding, are."""
    model = _mlp().double()
    x = np.random.default_rng(5).random((2, 3, 4, 4))
    eps = 0.01 * (1 + 9e-7 * np.random.default_rng(6).random(x.shape))
    got, n = _bounds(model, InputSpec.linf(x, eps), None, "ibp", monkeypatch, on=True)
    assert n == 0
    _, n = _bounds(model, x, 0.01, "ibp", monkeypatch, on=True)            # an L∞ ball
    assert n == 1
    x32 = x.astype(np.float32)
    _, n = _bounds(_mlp(), x32, 2 / 255, "ibp", monkeypatch, on=True)
    assert n == 1


def test_the_check_is_made_for_enough_products_per_input_element():
    """The shared MLP's first layer (784 -> 256: 256 multiply-adds per input element) at a
    batch of 8 is worth the check; a batch of 1, or a conv of 64 per element, is not."""
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256)).eval()
    ex = TorchExecutor(*_plan(mlp, (1, 28, 28)))
    assert ex._uniform_pays(8) and not ex._uniform_pays(1)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, stride=2, padding=1),
                               torch.nn.Flatten()).eval()
    assert not TorchExecutor(*_plan(conv, (3, 32, 32)))._uniform_pays(64)


def _plan(model, shape):
    from boundflow.ir.workload import Workload
    from boundflow.planner import plan

    g = as_graph(model, torch.zeros((1,) + shape))
    return plan(g, Workload.of(g, batch=1, method="ibp")), g
