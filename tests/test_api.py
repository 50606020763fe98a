"""The public API: compute_bounds and verify accept every model form, and bad input gets a
clear BoundFlowError."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import boundflow as bf
import boundflow.examples as examples
from boundflow.api import as_graph
from tests.helpers import box_points, true_outputs


@pytest.fixture(scope="module")
def mlp():
    return examples.load("digits_mlp")


def test_public_surface():
    for name in ("compute_bounds", "verify", "Bounds", "InputSpec", "LinearSpec", "margin_spec",
                 "BoundFlowError", "from_torch", "load_model", "Graph", "GraphBuilder"):
        assert hasattr(bf, name)
    for err in (bf.GraphError, bf.ShapeError, bf.SpecError, bf.UnsupportedOpError,
                bf.ModelLoadError):
        assert issubclass(err, bf.BoundFlowError)


def test_every_model_form_gives_the_same_bounds(mlp, tmp_path):
    x = mlp.inputs[:3]
    spec = bf.InputSpec.linf(x, 0.01)
    from_graph = bf.compute_bounds(mlp.model, spec)
    program = bf.frontend.load_exported(examples.DATA / "digits_mlp.pt2")
    from_program = bf.compute_bounds(program, x, eps=0.01)
    from_module = bf.compute_bounds(program.module(), x, eps=0.01)
    for out in (from_program, from_module):
        torch.testing.assert_close(out.lower, from_graph.lower)
        torch.testing.assert_close(out.upper, from_graph.upper)
    assert from_graph.lower.shape == (3, 10)
    assert torch.all(from_graph.width >= 0)


def test_same_input_same_bounds(mlp):
    a = bf.compute_bounds(mlp.model, mlp.inputs[:4], eps=0.03)
    b = bf.compute_bounds(mlp.model, mlp.inputs[:4], eps=0.03)
    assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper)


def test_bounds_grow_with_eps_and_clip_tightens(mlp):
    x = mlp.inputs[:2]
    small = bf.compute_bounds(mlp.model, x, eps=0.01)
    big = bf.compute_bounds(mlp.model, x, eps=0.05)
    clipped = bf.compute_bounds(mlp.model, x, eps=0.05, clip=(0.0, 1.0))
    assert torch.all(big.lower <= small.lower) and torch.all(big.upper >= small.upper)
    assert torch.all(clipped.width <= big.width + 1e-6)


def test_module_is_retraced_when_its_weights_change():
    model = nn.Sequential(nn.Linear(3, 2))
    x = np.zeros((1, 3), np.float32)
    g1 = as_graph(model, torch.from_numpy(x))
    assert as_graph(model, torch.from_numpy(x)) is g1          # cached
    first = bf.compute_bounds(model, x, eps=0.1)
    with torch.no_grad():
        model[0].weight.mul_(2)
    assert as_graph(model, torch.from_numpy(x)) is not g1
    second = bf.compute_bounds(model, x, eps=0.1)
    torch.testing.assert_close(second.width, 2 * first.width)


def test_module_is_retraced_when_a_layer_or_a_tensor_is_replaced():
    """A cached trace of a module whose layer was swapped would bound another network:
    replacing a weightless layer, reassigning a parameter or writing a buffer re-traces,
    and the bounds hold for the module as it is now."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    x = np.zeros((1, 3), np.float32)
    sample = torch.from_numpy(x)
    g = as_graph(model, sample)

    def check_sound():
        bounds = bf.compute_bounds(model, x, eps=1.0)
        values = true_outputs(model, box_points(x - 1.0, x + 1.0, n=2000))
        assert np.all(values >= bounds.lower.numpy()[:, None] - 1e-5)
        assert np.all(values <= bounds.upper.numpy()[:, None] + 1e-5)

    check_sound()
    model[1] = nn.Tanh()                                      # no weights of its own
    assert as_graph(model, sample) is not g
    g = as_graph(model, sample)
    check_sound()
    model[3].weight = nn.Parameter(3 * model[3].weight.detach())
    assert as_graph(model, sample) is not g
    g = as_graph(model, sample)
    check_sound()
    with torch.no_grad():
        model[2].running_var.mul_(0.01)                       # a buffer, in place
    assert as_graph(model, sample) is not g
    g = as_graph(model, sample)
    check_sound()
    assert as_graph(model, sample) is g
    assert as_graph(model, sample.double()) is not g          # another dtype traces anew


def test_verify_margin_verdicts_are_sound(mlp):
    x, labels = mlp.inputs[:8], mlp.labels[:8]
    eps = 0.01
    result = bf.verify(mlp.model, x, eps=eps, labels=labels)
    assert result.verdicts.shape == (8, 9)
    assert set(np.unique(result.verdicts)) <= {"verified", "unknown"}
    assert result.verified.any()
    values = true_outputs(mlp.model, box_points(x.astype(np.float64) - eps, x + eps, n=2000))
    margins = np.einsum("bsk,bmk->bms", bf.margin_spec(labels, 10).C, values)
    proven = result.verdicts == "verified"
    assert np.all(margins.min(axis=1)[proven] > 0)
    lower = result.bounds.lower.numpy()
    assert np.all(lower[proven] > 0) and np.all(lower[~proven] <= 0)
    d = result.to_dict()
    assert d["labels"] == labels.tolist() and len(d["verdicts"]) == 8


def test_verify_defaults_to_the_predicted_label(mlp):
    x = mlp.inputs[:4]
    predicted = bf.compute_bounds(mlp.model, x, eps=0.0).lower.argmax(1).numpy()
    result = bf.verify(mlp.model, x, eps=0.0)
    np.testing.assert_array_equal(result.labels, predicted)
    assert result.verified.all()     # a point box around a prediction without ties is proven


def test_verify_with_custom_spec_and_threshold(mlp):
    x = mlp.inputs[:1]
    C = np.zeros((1, 1, 10))
    C[0, 0, mlp.labels[0]] = 1.0
    out = bf.compute_bounds(mlp.model, x, eps=0.01, C=C)
    low = float(out.lower[0, 0])
    assert bf.verify(mlp.model, x, eps=0.01, C=C, threshold=low - 1).verdicts[0, 0] == "verified"
    assert bf.verify(mlp.model, x, eps=0.01, C=C, threshold=low + 1).verdicts[0, 0] == "unknown"
    assert bf.verify(mlp.model, x, eps=0.01, C=C).labels is None


def test_nan_weights_in_a_module_are_named():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(bf.GraphError, match=r"module '2' \(Linear\).*NaN or inf"):
        bf.compute_bounds(model, np.zeros((1, 3), np.float32), eps=0.1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=np.zeros((1, 1, 8, 8)), eps=-0.1), bf.SpecError, "eps must be >= 0"),
    (dict(x=np.zeros((1, 1, 8, 8))), bf.SpecError, "eps is required"),
    (dict(x=np.zeros((1, 64)), eps=0.1), bf.ShapeError, r"\[batch, 1, 8, 8\]"),
    (dict(x=np.full((1, 1, 8, 8), np.nan), eps=0.1), bf.SpecError, "NaN"),
    (dict(x=np.full((1, 1, 8, 8), np.inf), eps=0.1), bf.SpecError, "NaN or inf"),
    (dict(x=bf.InputSpec.box(np.zeros((1, 1, 8, 8)), np.ones((1, 1, 8, 8))), eps=0.1),
     bf.SpecError, "not both"),
    (dict(x=np.zeros((1, 1, 8, 8)), eps=0.1, C=np.ones((1, 3, 7))), bf.SpecError,
     "width 7 but the model has 10 outputs"),
    (dict(x=np.zeros((2, 1, 8, 8)), eps=0.1, C=np.ones((1, 3, 10))), bf.SpecError, "batch"),
    (dict(x=np.zeros((1, 1, 8, 8)), eps=0.1, method="magic"), bf.BoundFlowError,
     "method 'magic' is not one of"),
    (dict(x=np.zeros((1, 1, 8, 8)), eps=0.1, dtype="float16"), bf.BoundFlowError, "dtype"),
])
def test_bad_input_is_a_named_error(mlp, kwargs, error, match):
    with pytest.raises(error, match=match):
        bf.compute_bounds(mlp.model, **kwargs)


def test_lower_above_upper_is_named():
    with pytest.raises(bf.SpecError, match="lower > upper"):
        bf.InputSpec.box(np.ones((1, 3)), np.zeros((1, 3)))


def test_bad_model_and_labels(mlp):
    with pytest.raises(bf.BoundFlowError, match="model must be"):
        bf.compute_bounds("model.pt2", np.zeros((1, 3)), eps=0.1)
    with pytest.raises(bf.SpecError, match="3 labels for a batch of 2"):
        bf.verify(mlp.model, mlp.inputs[:2], eps=0.1, labels=[1, 2, 3])
    with pytest.raises(bf.SpecError, match="must lie in"):
        bf.verify(mlp.model, mlp.inputs[:1], eps=0.1, labels=[10])
    with pytest.raises(bf.SpecError, match="not both"):
        bf.verify(mlp.model, mlp.inputs[:1], eps=0.1, labels=[1], C=np.ones((1, 1, 10)))


def test_a_plan_made_for_one_graph_is_checked_on_another():
    """Plans name a graph's nodes: a plan this process made for one graph, run on another
    of the same structure and weights but other node names, is refused with a PlanError
    (it is checked for that graph), never trusted by its key alone."""
    from boundflow.ir.graph import GraphBuilder
    from boundflow.ir.task_graph import PlanError
    from boundflow.planner import plan

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))

    def build(first, second):
        b = GraphBuilder()
        x = b.input((4,))
        a = b.add_node("linear", [x], params={"weight": w1, "bias": np.zeros(6)}, name=first)
        c = b.add_node("linear", [x], params={"weight": w2, "bias": np.zeros(6)}, name=second)
        return b.build(b.add_node("sub", [b.add_node("relu", [a], name="r"), c], name="s"))

    a, b = build("p", "q"), build("q", "p")
    x = np.zeros((1, 4), np.float32)
    for method in ("ibp", "crown"):
        made = plan(a, bf.Workload.of(a, batch=1, n_specs=0, method=method))
        bf.compute_bounds(a, x, eps=0.5, method=method, plan=made)
        with pytest.raises(PlanError, match="not the plan its knobs give"):
            bf.compute_bounds(b, x, eps=0.5, method=method, plan=made)
        assert torch.all(bf.compute_bounds(b, x, eps=0.5, method=method).width >= 0)
