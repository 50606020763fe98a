"""Op facts as data: the traits every pass asks about, and the shapes of the new ops
(checked against torch where torch has the op)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from boundflow.errors import ShapeError
from boundflow.ir import infer_shape, ops
from boundflow.ir.analysis import ibp_exact_nodes, preactivations
from tests.helpers import example_graph


def test_traits_are_consistent():
    assert ops.having("activation") <= ops.having("relaxed") & ops.having("elementwise")
    assert ops.having("weighted") <= ops.having("mixing") <= ops.having("linear")
    assert ops.having("view") <= ops.having("linear")
    assert not ops.having("relaxed") & ops.having("linear")
    assert {"relu", "sigmoid", "tanh", "leaky_relu", "hardtanh"} <= ops.having("activation")
    assert {"maxpool2d", "softmax"} <= ops.having("relaxed") - ops.having("activation")
    with pytest.raises(ValueError, match="not an op trait"):
        ops.having("fast")
    assert ops.has("conv2d", "spatial") and not ops.has("linear", "spatial")


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "random_residual"])
def test_analysis_on_relu_models(name):
    _, g = example_graph(name)
    relu_inputs = {n.inputs[0] for n in g.nodes if n.op == "relu"}
    assert set(preactivations(g)) == relu_inputs
    first = next(n for n in g.nodes if ops.has(n.op, "mixing"))
    assert first.name in ibp_exact_nodes(g)
    assert not relu_inputs - {first.name} & ibp_exact_nodes(g)


def _torch_shape(fn, x):
    return tuple(fn(torch.zeros((1,) + x)).shape[1:])


@pytest.mark.parametrize("attrs, fn", [
    ({"kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0)},
     lambda t: F.max_pool2d(t, 2, 2)),
    ({"kernel_size": (3, 3), "stride": (2, 1), "padding": (1, 1)},
     lambda t: F.max_pool2d(t, 3, (2, 1), 1)),
])
def test_maxpool_shape(attrs, fn):
    x = (3, 7, 6)
    assert infer_shape("maxpool2d", attrs, [x], {}) == _torch_shape(fn, x)


def test_pad_slice_gather_shapes():
    x = (3, 5, 4)
    pads = {"pads": ((0, 0), (1, 2), (3, 0)), "value": 0.0}
    assert infer_shape("pad", pads, [x], {}) == _torch_shape(
        lambda t: F.pad(t, (3, 0, 1, 2)), x)
    assert infer_shape("slice", {"axis": 1, "start": 1, "end": 5, "step": 2}, [x], {}) == \
        _torch_shape(lambda t: t[:, :, 1:5:2], x)
    assert infer_shape("gather", {"axis": 0, "indices": (2, 0), "keepdim": True}, [x], {}) == \
        (2, 5, 4)
    assert infer_shape("gather", {"axis": 2, "indices": (1,), "keepdim": False}, [x], {}) == \
        (3, 5)
    for bad in ({"pads": ((0, 0), (-1, 0), (0, 0)), "value": 0.0},
                {"pads": ((0, 0), (0, 0)), "value": 0.0},
                {"pads": ((0, 0), (0, 0), (0, 0)), "value": float("nan")}):
        with pytest.raises(ShapeError):
            infer_shape("pad", bad, [x], {})
    for bad in ({"axis": 3, "start": 0, "end": 1, "step": 1},
                {"axis": 0, "start": 2, "end": 2, "step": 1},
                {"axis": 0, "start": 0, "end": 4, "step": 1},
                {"axis": 0, "start": 0, "end": 2, "step": 0}):
        with pytest.raises(ShapeError):
            infer_shape("slice", bad, [x], {})
    with pytest.raises(ShapeError, match="exactly one index"):
        infer_shape("gather", {"axis": 0, "indices": (0, 1), "keepdim": False}, [x], {})
    with pytest.raises(ShapeError, match="not in range"):
        infer_shape("gather", {"axis": 0, "indices": (3,), "keepdim": True}, [x], {})


@pytest.mark.parametrize("stride, padding, out_pad, dilation, groups", [
    ((1, 1), (0, 0), (0, 0), (1, 1), 1), ((2, 2), (1, 1), (1, 1), (1, 1), 1),
    ((2, 1), (0, 1), (1, 0), (1, 2), 2)])
def test_conv_transpose_shape(stride, padding, out_pad, dilation, groups):
    x, w = (4, 5, 6), (4, 3, 3, 2)
    attrs = {"stride": stride, "padding": padding, "output_padding": out_pad,
             "dilation": dilation, "groups": groups}
    weight = torch.zeros(w)
    want = _torch_shape(lambda t: F.conv_transpose2d(t, weight, None, stride, padding, out_pad,
                                                     groups, dilation), x)
    assert infer_shape("conv_transpose2d", attrs, [x], {"weight": w}) == want
    with pytest.raises(ShapeError, match="bias"):
        infer_shape("conv_transpose2d", attrs, [x], {"weight": w, "bias": (5,)})


def test_activation_attributes_are_checked():
    assert infer_shape("leaky_relu", {"negative_slope": 0.1}, [(4,)], {}) == (4,)
    with pytest.raises(ShapeError, match="negative_slope"):
        infer_shape("leaky_relu", {"negative_slope": 1.5}, [(4,)], {})
    assert infer_shape("hardtanh", {"min_val": 0.0, "max_val": float("inf")}, [(4,)], {}) == (4,)
    with pytest.raises(ShapeError, match="min < max"):
        infer_shape("hardtanh", {"min_val": 1.0, "max_val": 1.0}, [(4,)], {})
    with pytest.raises(ShapeError, match="per-sample axis"):
        infer_shape("softmax", {"axis": 1}, [(4,)], {})
