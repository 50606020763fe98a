"""A cached trace of a torch module is used only while the module is the one traced: every
way of changing a layer, a hook, a setting or a weight makes the next call trace again, so
its bounds are those of the module as it is now (sound), never the old network's."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import boundflow as bf
from boundflow.api import as_graph
from boundflow.frontend.module_state import Snapshot
from tests.helpers import box_points, true_outputs


class Shift(nn.Module):
    """A layer whose constant is a plain tensor attribute (not a buffer)."""

    def __init__(self):
        super().__init__()
        self.offset = torch.full((4,), 0.1)

    def forward(self, x):
        return x - self.offset


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.1), Shift(), nn.BatchNorm1d(4),
                          nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _scale_output(module, inputs, output):
    return 10 * output


CHANGES = {
    "a weightless layer replaced": lambda m: m.__setitem__(4, nn.Tanh()),
    "a parameter reassigned": lambda m: setattr(m[5], "weight", nn.Parameter(3 * m[5].weight)),
    "a weight written in place": lambda m: m[5].weight.detach().mul_(3),
    "a weight written through .data": lambda m: m[5].weight.data.mul_(3),
    "a weight's .data replaced": lambda m: setattr(m[5].weight, "data", m[5].weight.data * 3),
    "a buffer written in place": lambda m: m[3].running_var.mul_(0.01),
    "a tensor attribute written": lambda m: m[2].offset.add_(2.0),
    "a tensor attribute reassigned": lambda m: setattr(m[2], "offset", torch.full((4,), -2.)),
    "a setting changed": lambda m: setattr(m[1], "negative_slope", 0.9),
    "a forward hook added": lambda m: m[0].register_forward_hook(_scale_output),
    "a forward overridden": lambda m: setattr(m[2], "forward", lambda x: 3 * x),
    "a layer appended": lambda m: m.append(nn.Linear(2, 2)),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_module_is_traced_again(change):
    model = _model()
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    sample = torch.from_numpy(x[:1])
    before = bf.compute_bounds(model, x, eps=0.5)
    graph = as_graph(model, sample)
    assert as_graph(model, sample) is graph                       # unchanged: cached
    with torch.no_grad():
        CHANGES[change](model)
    assert as_graph(model, sample) is not graph
    after = bf.compute_bounds(model, x, eps=0.5)
    fresh = bf.compute_bounds(copy.deepcopy(model), x, eps=0.5)  # never traced before
    torch.testing.assert_close(after.lower, fresh.lower)
    torch.testing.assert_close(after.upper, fresh.upper)
    assert not torch.equal(after.lower, before.lower)             # the change mattered
    values = true_outputs(model, box_points(x - 0.5, x + 0.5, n=2000))
    assert np.all(values >= after.lower.numpy()[:, None] - 1e-4)
    assert np.all(values <= after.upper.numpy()[:, None] + 1e-4)


def test_a_snapshot_matches_until_the_module_changes():
    model = _model()
    snap = Snapshot(model)
    assert snap.matches(model) and snap.matches(model)
    assert snap.dtype == torch.float32
    assert not snap.matches(_model())                 # equal weights, other layer objects
    model.train()                                     # traced in eval mode either way
    assert snap.matches(model)
    with torch.no_grad():
        model[0].bias[0] += 1e-6
    assert not snap.matches(model)


def test_a_global_forward_hook_counts():
    model = _model()
    snap = Snapshot(model)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        assert not snap.matches(model)
    finally:
        handle.remove()
    assert snap.matches(model)
