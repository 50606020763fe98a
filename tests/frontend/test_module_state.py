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
from tests.helpers import box_points


class Shift(nn.Module):
    """A layer that reads what ``nn.Module`` does not register: a plain tensor attribute, a
    private setting, a function, a numpy scalar, a list of settings and a layer in a list."""

    def __init__(self):
        super().__init__()
        self.offset = torch.full((4,), 0.1)
        self._scale = 1.0
        self.act = torch.relu
        self.gain = np.float32(1.0)
        self.signs = [1.0, 1.0, 1.0, 1.0]
        self.extra = [nn.Linear(4, 4)]

    def forward(self, x):
        y = self.act(self.extra[0](x) - self.offset) * (self._scale * float(self.gain))
        return y * torch.tensor(self.signs)


class Shift2(Shift):
    def forward(self, x):
        return super().forward(x) + 1.0


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
    "a private setting changed": lambda m: setattr(m[2], "_scale", 3.0),
    "a function attribute swapped": lambda m: setattr(m[2], "act", torch.tanh),
    "a numpy setting changed": lambda m: setattr(m[2], "gain", np.float32(2.0)),
    "a list setting written in place": lambda m: m[2].signs.__setitem__(slice(None), [-1.] * 4),
    "a layer in a plain list written": lambda m: m[2].extra[0].weight.mul_(3),
    "a class reassigned": lambda m: setattr(m[2], "__class__", Shift2),
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
    points = box_points(x - 0.5, x + 0.5, n=2000)
    with torch.no_grad():          # in the module's own float32: it holds unregistered state
        values = model(torch.from_numpy(points.reshape(-1, 3)).float()).reshape(2, -1, 2)
    values = values.numpy()
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


def test_a_nan_weight_keeps_its_trace():
    """NaN compares unequal to itself: the check compares bits, so a module holding a NaN
    it never uses is not traced again on every call."""
    model = _model()
    model[2].unused = torch.tensor([float("nan"), 1.0])
    sample = torch.zeros(1, 3)
    assert as_graph(model, sample) is as_graph(model, sample)


def test_the_cache_keeps_no_module_alive():
    """The snapshot holds modules, overrides and hooks weakly: a module that refers to
    itself (a child pointing at its parent, a forward override closing over it) is freed
    once the caller drops it."""
    import gc
    import weakref

    model = _model()
    model[2].__dict__["parent"] = model          # a plain reference, not a child
    model.forward = lambda x: nn.Sequential.forward(model, x)
    bf.compute_bounds(model, np.zeros((1, 3), np.float32), eps=0.1)
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_weights_compare_byte_for_byte(monkeypatch):
    """Dense CPU weights are compared by ``memcmp`` (the fast path; counted here): a change
    of one bit anywhere in a weight, its first element or its last, is a change; a tensor
    attribute that is a strided view (``torch.equal``'s path) still counts."""
    from boundflow.frontend import module_state

    if module_state._MEMCMP is None:
        pytest.skip("no C library memcmp here: torch.equal compares")
    calls, memcmp = [], module_state._MEMCMP

    def counting(a, b, n):
        calls.append(n)
        return memcmp(a, b, n)

    monkeypatch.setattr(module_state, "_MEMCMP", counting)
    for index in (0, -1):
        model = _model()
        snap = Snapshot(model)
        assert snap.matches(model)
        w = model[5].weight.data.view(-1)
        bits = w.view(torch.int32)
        bits[index] ^= 1                                  # one bit of one float
        assert not snap.matches(model)
        bits[index] ^= 1
        assert snap.matches(model)
    assert 4 * 2 * 4 in calls                             # Linear(4, 2)'s weight, whole
    model = _model()
    model[2].offset = torch.zeros(4, 2)[:, 0]             # not contiguous
    snap = Snapshot(model)
    assert snap.matches(model)
    with torch.no_grad():
        model[2].offset[3] = 1.0
    assert not snap.matches(model)
    model = _model()                                      # -0.0 == 0.0, other bits:
    with torch.no_grad():                                 # a trace again, never stale
        model[5].bias[0] = 0.0
    snap = Snapshot(model)
    with torch.no_grad():
        model[5].bias[0] = -0.0
    assert not snap.matches(model)


def test_a_size_setting_changed_is_a_change():
    """A layer's sizes (tuples of ints, compared whole): another padding or stride is
    another network, and a trace of it again gives that network's bounds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten()).eval()
    x = np.random.default_rng(0).normal(size=(1, 1, 4, 4)).astype(np.float32)
    snap = Snapshot(model)
    before = bf.compute_bounds(model, x, eps=0.1)
    model[0].padding = (0, 0)
    assert not snap.matches(model)
    after = bf.compute_bounds(model, x, eps=0.1)
    assert after.lower.shape[1] == 2 * 2 * 2 != before.lower.shape[1]
    model[0].padding = (1, 1)
    model[0].stride = (2, 2)
    assert not snap.matches(model)
    model[0].stride = (1, 1)
    assert snap.matches(model)


def _holder(**tensors) -> nn.Module:
    m = nn.Linear(2, 2)
    for k, v in tensors.items():
        setattr(m, k, v)
    return m


@pytest.mark.parametrize("case", ["negative view", "conjugate view", "quantized scale",
                                  "zero tensor", "wrapper subclass"])
def test_tensors_whose_bytes_are_not_their_values_are_compared_by_value(case):
    """Byte-for-byte comparison reads memory; a negative or conjugate view shares its
    original's bytes, a quantized tensor keeps its scale elsewhere, and a zero tensor or a
    subclass wrapping others has no bytes at all (address 0: ``memcmp`` would crash). Each
    is compared by value: a change is a change, and nothing crashes."""
    torch.manual_seed(0)
    w = torch.randn(3)
    if case == "negative view":
        before, after = w.clone(), torch._neg_view(w.clone())   # the same bytes, negated
    elif case == "conjugate view":
        z = torch.complex(w, torch.randn(3))
        before, after = z.clone(), z.conj()
    elif case == "quantized scale":
        before = torch.quantize_per_tensor(w, 0.1, 0, torch.qint8)
        after = torch._make_per_tensor_quantized_tensor(before.int_repr(), 0.2, 0)
    elif case == "zero tensor":
        before, after = torch._efficientzerotensor(3), torch.ones(3)
    else:
        from torch.testing._internal.two_tensor import TwoTensor
        before = TwoTensor(w.clone(), w.clone())
        after = TwoTensor(w + 1, w + 1)
    model = _holder(extra=before)
    snap = Snapshot(model)
    assert snap.matches(model)                                  # and no crash
    model.extra = after
    assert not snap.matches(model)


def test_the_attribute_name_cache_stays_bounded(monkeypatch):
    """Modules that name attributes as they run would grow the cache of their attribute
    names without end: it starts again past its limit, and checks stay right."""
    from boundflow.frontend import module_state

    monkeypatch.setattr(module_state, "_OWN_MAX", 8)
    model = _model()
    snap = Snapshot(model)
    for i in range(40):
        setattr(model[2], f"step_{i}", i)                 # a new set of names each time
        assert not snap.matches(model)
        snap = Snapshot(model)
        assert snap.matches(model)
    assert len(module_state._OWN) <= 8
