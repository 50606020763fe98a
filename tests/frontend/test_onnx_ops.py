"""Hand-built ONNX graphs for the attribute and opset variants of MaxPool, AveragePool,
GlobalAveragePool, ReduceMean, ConvTranspose, Sigmoid, Tanh, LeakyRelu, Clip, Softmax, Slice,
Split, Gather, Pad, Squeeze and Unsqueeze: each converts into IR that computes what ONNX's
reference runtime computes; the forms BoundFlow does not take are refused on one line naming
the op and the node."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import boundflow as bf
from boundflow.frontend.onnx import from_onnx
from tests.frontend.evaluation import run_ir

INT_MAX = 2 ** 63 - 1
IMAGE = (3, 4, 6)


def _model(nodes, inits=(), opset=13, shape=IMAGE):
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", *shape])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ints(name, values, scalar=False):
    return helper.make_tensor(name, TensorProto.INT64, [] if scalar else [len(values)],
                              values)


def _floats(name, values, shape=None):
    arr = np.asarray(values, dtype=np.float32)
    return helper.make_tensor(name, TensorProto.FLOAT, list(arr.shape if shape is None
                                                           else shape), arr.reshape(-1))


def _weight(name, shape, seed=0):
    return _floats(name, np.random.default_rng(seed).standard_normal(shape) * 0.5)


N = helper.make_node

# name: (nodes, initializers, opset, per-sample input shape, IR ops expected)
CASES = {
    "Pad opset 10 attributes": (
        [N("Pad", ["X"], ["Y"], mode="constant", pads=[0, 0, 1, 0, 0, 0, 0, 2], value=0.5)],
        [], 10, IMAGE, ["pad"]),
    "Pad opset 13 inputs": (
        [N("Pad", ["X", "p", "v"], ["Y"])],
        [_ints("p", [0, 1, 0, 2, 0, 0, 1, 0]), _floats("v", -1.0, [])], 13, IMAGE, ["pad"]),
    "Pad opset 13 no value": (
        [N("Pad", ["X", "p", ""], ["Y"])], [_ints("p", [0, 0, 0, 1, 0, 0, 0, 1])], 13, IMAGE,
        ["pad"]),
    "Pad opset 18 negative axes": (
        [N("Pad", ["X", "p", "v", "a"], ["Y"])],
        [_ints("p", [1, 0, 2, 1]), _floats("v", 2.0, []), _ints("a", [-1, 2])], 18, IMAGE,
        ["pad"]),
    "Clip opset 6 attributes": ([N("Clip", ["X"], ["Y"], min=-0.5, max=0.5)], [], 6, IMAGE,
                                ["hardtanh"]),
    "Clip opset 6 min 0 is relu": ([N("Clip", ["X"], ["Y"], min=0.0)], [], 6, IMAGE, ["relu"]),
    "Clip opset 13 inputs": ([N("Clip", ["X", "lo", "hi"], ["Y"])],
                             [_floats("lo", -0.25, []), _floats("hi", 0.75, [])], 13, IMAGE,
                             ["hardtanh"]),
    "Clip opset 13 max only": ([N("Clip", ["X", "", "hi"], ["Y"])], [_floats("hi", 0.3, [])],
                               13, IMAGE, ["hardtanh"]),
    "Split opset 11 attribute": ([N("Split", ["X"], ["A", "Y"], axis=3, split=[2, 4])], [], 11,
                                 IMAGE, ["slice"]),
    "Split opset 13 input": ([N("Split", ["X", "s"], ["Y", "B"], axis=1)], [_ints("s", [1, 2])],
                             13, IMAGE, ["slice"]),
    "Split equal parts": ([N("Split", ["X"], ["A", "Y", "C"], axis=-1)], [], 13, IMAGE,
                          ["slice"]),
    "Split opset 18 num_outputs uneven": (
        [N("Split", ["X"], ["A", "Y"], axis=2, num_outputs=2)], [], 18, (3, 5, 6), ["slice"]),
    "Slice opset 9 attributes": ([N("Slice", ["X"], ["Y"], starts=[1], ends=[3], axes=[1])],
                                 [], 9, IMAGE, ["slice"]),
    "Slice negative axes, steps, INT_MAX": (
        [N("Slice", ["X", "s", "e", "a", "t"], ["Y"])],
        [_ints("s", [-5, 0]), _ints("e", [INT_MAX, -1]), _ints("a", [-1, 2]),
         _ints("t", [2, 1])], 13, IMAGE, ["slice"]),
    "Slice without axes keeps the batch": (
        [N("Slice", ["X", "s", "e"], ["Y"])],
        [_ints("s", [0, 0, -100]), _ints("e", [INT_MAX, 2, 100])], 13, IMAGE, ["slice"]),
    "Gather scalar drops the axis": ([N("Gather", ["X", "i"], ["Y"], axis=1)],
                                     [_ints("i", [2], scalar=True)], 13, IMAGE, ["gather"]),
    "Gather negative indices": ([N("Gather", ["X", "i"], ["Y"], axis=3)],
                                [_ints("i", [-1, 0, 0])], 13, IMAGE, ["gather"]),
    "Gather negative axis": ([N("Gather", ["X", "i"], ["Y"], axis=-2)], [_ints("i", [1])], 13,
                             IMAGE, ["gather"]),
    "Softmax opset 13 default axis": ([N("Softmax", ["X"], ["Y"])], [], 13, IMAGE,
                                      ["softmax"]),
    "Softmax opset 11 last axis": ([N("Softmax", ["X"], ["Y"], axis=3)], [], 11, IMAGE,
                                   ["softmax"]),
    "Softmax opset 11 trailing ones": ([N("Softmax", ["X"], ["Y"], axis=1)], [], 11, (5, 1, 1),
                                       ["softmax"]),
    "MaxPool default strides": ([N("MaxPool", ["X"], ["Y"], kernel_shape=[2, 2])], [], 13,
                                IMAGE, ["maxpool2d"]),
    "MaxPool VALID": ([N("MaxPool", ["X"], ["Y"], kernel_shape=[2, 3], strides=[2, 3],
                         auto_pad="VALID")], [], 13, IMAGE, ["maxpool2d"]),
    "MaxPool pads": ([N("MaxPool", ["X"], ["Y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])], [],
                     13, IMAGE, ["maxpool2d"]),
    "MaxPool ceil with the floor shape": (
        [N("MaxPool", ["X"], ["Y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)], [], 13,
        IMAGE, ["maxpool2d"]),
    "AveragePool default strides": ([N("AveragePool", ["X"], ["Y"], kernel_shape=[2, 2])], [],
                                    13, IMAGE, ["avgpool2d"]),
    "GlobalAveragePool": ([N("GlobalAveragePool", ["X"], ["Y"])], [], 13, IMAGE,
                          ["avgpool2d"]),
    "ReduceMean opset 13": ([N("ReduceMean", ["X"], ["Y"], axes=[2, 3], keepdims=0)], [], 13,
                            IMAGE, ["avgpool2d", "reshape"]),
    "ReduceMean opset 18": ([N("ReduceMean", ["X", "a"], ["Y"], keepdims=1)],
                            [_ints("a", [-1, -2])], 18, IMAGE, ["avgpool2d"]),
    "Sigmoid": ([N("Sigmoid", ["X"], ["Y"])], [], 13, IMAGE, ["sigmoid"]),
    "Tanh": ([N("Tanh", ["X"], ["Y"])], [], 13, IMAGE, ["tanh"]),
    "LeakyRelu default alpha": ([N("LeakyRelu", ["X"], ["Y"])], [], 13, IMAGE, ["leaky_relu"]),
    "ConvTranspose pads and output_padding": (
        [N("ConvTranspose", ["X", "W", "B"], ["Y"], strides=[2, 2], pads=[1, 1, 1, 1],
           output_padding=[1, 1])],
        [_weight("W", (3, 2, 3, 3)), _weight("B", (2,), 1)], 13, IMAGE, ["conv_transpose2d"]),
    "ConvTranspose groups and dilations": (
        [N("ConvTranspose", ["X", "W"], ["Y"], group=3, dilations=[2, 1], strides=[1, 2])],
        [_weight("W", (3, 2, 2, 3))], 13, IMAGE, ["conv_transpose2d"]),
    "ConvTranspose end pad below the begin pad": (
        [N("ConvTranspose", ["X", "W"], ["Y"], strides=[2, 2], pads=[1, 1, 0, 0])],
        [_weight("W", (3, 2, 3, 3))], 13, IMAGE, ["conv_transpose2d"]),
    "Squeeze and Unsqueeze": ([N("Unsqueeze", ["X", "a"], ["U"]), N("Squeeze", ["U", "a"], ["Y"])],
                              [_ints("a", [-2])], 13, IMAGE, ["reshape"]),
}


def _torch_conv_transpose(model, x):
    """ONNX's reference runtime cannot run a grouped ConvTranspose; torch computes it."""
    (node,), (w,) = model.graph.node, model.graph.initializer
    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x), torch.from_numpy(numpy_helper.to_array(w)),
        stride=tuple(at["strides"]), dilation=tuple(at["dilations"]), groups=at["group"]).numpy()


REFERENCE = {"ConvTranspose groups and dilations": _torch_conv_transpose}


def _x(shape, batch=3):
    return np.random.default_rng(2).standard_normal((batch, *shape)).astype(np.float32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_variant_computes_what_the_reference_runtime_computes(case):
    nodes, inits, opset, shape, ops = CASES[case]
    model = _model(nodes, inits, opset, shape)
    graph = from_onnx(model)
    assert set(ops) <= {n.op for n in graph.nodes}
    x = _x(shape)
    if case in REFERENCE:
        want = REFERENCE[case](model, x)
    else:
        (want,) = ReferenceEvaluator(model).run(["Y"], {"X": x})
    got = run_ir(graph, torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_conv_transpose_output_shape_sets_the_pads_as_the_specification_says():
    """output_shape (8, 12) of stride 2 and kernel 3 on 4 x 6: total padding 1 per axis, the
    begin pad the larger under NOTSET; torch's padding 1 with output_padding 1 crops the same
    (ONNX's reference runtime ignores output_shape here, so torch is the reference)."""
    w = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)
    model = _model([N("ConvTranspose", ["X", "W"], ["Y"], strides=[2, 2],
                      output_shape=[8, 12])], [_floats("W", w)])
    graph = from_onnx(model)
    assert graph.output_node.attrs["padding"] == (1, 1)
    assert graph.output_node.attrs["output_padding"] == (1, 1)
    x = torch.from_numpy(_x(IMAGE))
    want = torch.nn.functional.conv_transpose2d(x, torch.from_numpy(w), stride=2, padding=1,
                                                output_padding=1)
    assert want.shape[2:] == (8, 12)
    torch.testing.assert_close(run_ir(graph, x), want, rtol=1e-5, atol=1e-5)


def test_unused_split_outputs_leave_no_nodes():
    graph = from_onnx(_model(*CASES["Split equal parts"][:4]))
    assert [n.op for n in graph.nodes] == ["input", "slice"]


REFUSED = {   # name: (nodes, initializers, opset, error, message)
    "MaxPool partial window": ([N("MaxPool", ["X"], ["Y"], name="n", kernel_shape=[3, 3],
                                  strides=[2, 2], ceil_mode=1)], [], 13, bf.UnsupportedOpError,
                               r"MaxPool with ceil_mode=1 that adds a partial window"),
    "MaxPool dilations": ([N("MaxPool", ["X"], ["Y"], name="n", kernel_shape=[2, 2],
                             dilations=[2, 2])], [], 13, bf.UnsupportedOpError,
                          r"MaxPool with dilations \[2, 2\]"),
    "MaxPool storage_order": ([N("MaxPool", ["X"], ["Y"], name="n", kernel_shape=[2, 2],
                                 storage_order=1)], [], 13, bf.UnsupportedOpError,
                              r"MaxPool with storage_order=1"),
    "MaxPool Indices": ([N("MaxPool", ["X"], ["Y", "I"], name="n", kernel_shape=[2, 2])], [],
                        13, bf.UnsupportedOpError, r"MaxPool's second output \(the Indices\)"),
    "MaxPool SAME_UPPER": ([N("MaxPool", ["X"], ["Y"], name="n", kernel_shape=[2, 2],
                              auto_pad="SAME_UPPER")], [], 13, bf.UnsupportedOpError,
                           r"auto_pad='SAME_UPPER' is not supported"),
    "MaxPool asymmetric pads": ([N("MaxPool", ["X"], ["Y"], name="n", kernel_shape=[3, 3],
                                   pads=[1, 1, 0, 0])], [], 13, bf.UnsupportedOpError,
                                r"asymmetric pads \[1, 1, 0, 0\]"),
    "Pad reflect": ([N("Pad", ["X", "p"], ["Y"], name="n", mode="reflect")],
                    [_ints("p", [0, 0, 0, 1, 0, 0, 0, 1])], 13, bf.UnsupportedOpError,
                    r"Pad with mode='reflect'"),
    "Pad negative": ([N("Pad", ["X", "p"], ["Y"], name="n")],
                     [_ints("p", [0, 0, 0, -1, 0, 0, 0, 0])], 13, bf.UnsupportedOpError,
                     r"Pad with negative pads"),
    "Pad batch": ([N("Pad", ["X", "p"], ["Y"], name="n")],
                  [_ints("p", [1, 0, 0, 0, 0, 0, 0, 0])], 13, bf.UnsupportedOpError,
                  r"Pad along the batch axis"),
    "Slice negative step": ([N("Slice", ["X", "s", "e", "a", "t"], ["Y"], name="n")],
                            [_ints("s", [-1]), _ints("e", [-INT_MAX]), _ints("a", [3]),
                             _ints("t", [-1])], 13, bf.UnsupportedOpError,
                            r"Slice with step -1 on axis 3"),
    "Slice batch": ([N("Slice", ["X", "s", "e"], ["Y"], name="n")],
                    [_ints("s", [1]), _ints("e", [2])], 13, bf.UnsupportedOpError,
                    r"Slice 1:2:1 along the batch axis"),
    "Slice empty": ([N("Slice", ["X", "s", "e", "a"], ["Y"], name="n")],
                    [_ints("s", [3]), _ints("e", [1]), _ints("a", [1])], 13, bf.ShapeError,
                    r"Slice 3:1 of an axis of size 3 is empty"),
    "Gather batch": ([N("Gather", ["X", "i"], ["Y"], name="n")], [_ints("i", [0])], 13,
                     bf.UnsupportedOpError, r"Gather along the batch axis"),
    "Gather 2-D indices": ([N("Gather", ["X", "i"], ["Y"], name="n", axis=1)],
                           [helper.make_tensor("i", TensorProto.INT64, [2, 1], [0, 1])], 13,
                           bf.UnsupportedOpError, r"Gather with indices of shape \(2, 1\)"),
    "Softmax opset 11 flattening": ([N("Softmax", ["X"], ["Y"], name="n", axis=1)], [], 11,
                                    bf.UnsupportedOpError,
                                    r"Softmax \(opset 11\) with axis=1 normalises over the "
                                    r"flattened axes"),
    "Softmax batch": ([N("Softmax", ["X"], ["Y"], name="n", axis=0)], [], 13,
                      bf.UnsupportedOpError, r"Softmax along the batch axis"),
    "Clip empty range": ([N("Clip", ["X"], ["Y"], name="n", min=1.0, max=1.0)], [], 6,
                         bf.UnsupportedOpError, r"Clip to \[1.0, 1.0\]"),
    "LeakyRelu alpha": ([N("LeakyRelu", ["X"], ["Y"], name="n", alpha=2.0)], [], 13,
                        bf.UnsupportedOpError, r"LeakyRelu with alpha=2.0 outside \[0, 1\]"),
    "ReduceMean channels": ([N("ReduceMean", ["X"], ["Y"], name="n", axes=[1])], [], 13,
                            bf.UnsupportedOpError, r"ReduceMean over axes \[1\]"),
    "ConvTranspose end pad above the begin pad": (
        [N("ConvTranspose", ["X", "W"], ["Y"], name="n", strides=[2, 2], pads=[0, 0, 1, 1])],
        [_weight("W", (3, 2, 3, 3))], 13, bf.UnsupportedOpError,
        r"ConvTranspose pads \[0, 0, 1, 1\] with output_padding \[0, 0\] are not supported"),
    "BatchNormalization in training mode": (
        [N("BatchNormalization", ["X", "g", "b", "m", "v"], ["Y"], name="n", training_mode=1)],
        [_floats("g", [1.0] * 3), _floats("b", [0.0] * 3), _floats("m", [0.5] * 3),
         _floats("v", [2.0] * 3)], 15, bf.UnsupportedOpError,
        r"BatchNormalization in training mode \(training_mode=1\)"),
    "Dropout in training mode": (
        [N("Dropout", ["X", "r", "t"], ["Y"], name="n")],
        [_floats("r", 0.5, []), helper.make_tensor("t", TensorProto.BOOL, [], [True])], 13,
        bf.UnsupportedOpError, r"Dropout in training mode"),
    "Split sizes that do not add up": (
        [N("Split", ["X", "s"], ["Y", "B"], name="n", axis=1)], [_ints("s", [1, 1])], 13,
        bf.ShapeError, r"Split sizes \[1, 1\] do not cut an axis of size 3"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_forms_are_refused_on_one_line(case):
    nodes, inits, opset, error, match = REFUSED[case]
    with pytest.raises(error, match=match) as info:
        from_onnx(_model(nodes, inits, opset))
    message = str(info.value)
    assert "\n" not in message
    assert f"at node 'n' ({nodes[0].op_type})" in message


def test_inference_mode_dropout_and_batchnorm_convert():
    """training_mode given as 0 / False is inference: Dropout passes its input through and
    BatchNormalization uses the running statistics, as the reference runtime computes."""
    x = _x(IMAGE)
    model = _model([N("Dropout", ["X", "r", "t"], ["D"], name="d"),
                    N("BatchNormalization", ["D", "g", "b", "m", "v"], ["Y"], name="n",
                      training_mode=0)],
                   [_floats("r", 0.5, []), helper.make_tensor("t", TensorProto.BOOL, [], [False]),
                    _floats("g", [1.0, 2.0, 0.5]), _floats("b", [0.0, 1.0, -1.0]),
                    _floats("m", [0.5, 0.0, 1.0]), _floats("v", [2.0, 1.0, 4.0])], opset=15)
    want = ReferenceEvaluator(model).run(None, {"X": x})[0]
    got = run_ir(from_onnx(model), torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
