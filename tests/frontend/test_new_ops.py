"""Max pooling, global pooling, padding, slicing, gathering, softmax, the smooth and clipped
activations and transposed convolution: each tiny module converts through the torch frontend
(its exported program, and the same program decomposed to core ATen) and through ONNX (as
``torch.onnx.export`` writes it, at a new and an old opset) into IR ops that compute what the
module computes. Forms BoundFlow does not take are refused on one line naming the op."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from boundflow.errors import BoundFlowError, UnsupportedOpError
from boundflow.frontend import from_exported, from_torch
from boundflow.frontend.onnx import from_onnx
from tests.frontend.evaluation import run_ir

SHAPE = (3, 4, 6)           # per sample: (C, H, W)


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _convt(*args, **kw):
    torch.manual_seed(0)
    return nn.ConvTranspose2d(*args, **kw)


# name: (module, IR ops the torch frontend must produce (besides input))
CASES = {
    "maxpool": (nn.MaxPool2d(2), ["maxpool2d"]),
    "maxpool_3x3_pad": (nn.MaxPool2d(3, stride=1, padding=1), ["maxpool2d"]),
    "maxpool_rect": (nn.MaxPool2d((2, 3), stride=(2, 1)), ["maxpool2d"]),
    "maxpool_ceil_same_shape": (nn.MaxPool2d(2, ceil_mode=True), ["maxpool2d"]),
    "maxpool_indices_unused": (Fn(lambda x: F.max_pool2d(x, 2, return_indices=True)[0]),
                               ["maxpool2d"]),
    "global_avgpool": (nn.AdaptiveAvgPool2d(1), ["avgpool2d"]),
    "adaptive_avgpool_2x3": (nn.AdaptiveAvgPool2d((2, 3)), ["avgpool2d"]),
    "mean_hw": (Fn(lambda x: x.mean((2, 3))), ["avgpool2d", "reshape"]),
    "mean_hw_keepdim": (Fn(lambda x: x.mean((-1, -2), keepdim=True)), ["avgpool2d"]),
    "sigmoid": (nn.Sigmoid(), ["sigmoid"]),
    "tanh": (nn.Tanh(), ["tanh"]),
    "leaky_relu": (nn.LeakyReLU(0.2), ["leaky_relu"]),
    "elu": (nn.ELU(0.7), ["elu"]),
    "hardtanh": (nn.Hardtanh(-0.5, 0.75), ["hardtanh"]),
    "relu6": (nn.ReLU6(), ["hardtanh"]),
    "clamp_min": (Fn(lambda x: x.clamp(min=0.1)), ["hardtanh"]),
    "clamp_max": (Fn(lambda x: torch.clamp(x, max=-0.2)), ["hardtanh"]),
    "clamp_0_is_relu": (Fn(lambda x: x.clamp(min=0)), ["relu"]),
    "pad_hw": (Fn(lambda x: F.pad(x, (1, 1, 2, 0), value=0.5)), ["pad"]),
    "pad_w_zero": (Fn(lambda x: F.pad(x, (0, 2))), ["pad"]),
    "pad_channels": (nn.ConstantPad3d((0, 0, 0, 0, 1, 2), -1.0), ["pad"]),
    "softmax_channels": (nn.Softmax(dim=1), ["softmax"]),
    "softmax_last": (Fn(lambda x: torch.softmax(x, -1)), ["softmax"]),
    "slice_channels": (Fn(lambda x: x[:, 1:3]), ["slice"]),
    "slice_step": (Fn(lambda x: x[:, :, :, 1::2]), ["slice"]),
    "slice_negative": (Fn(lambda x: x[:, :, -3:-1]), ["slice"]),
    "narrow": (Fn(lambda x: x.narrow(3, 1, 4)), ["slice"]),
    "split": (Fn(lambda x: torch.split(x, 2, dim=3)[1]), ["slice"]),
    "split_sizes": (Fn(lambda x: torch.split(x, [1, 3, 2], dim=-1)[2]), ["slice"]),
    "chunk": (Fn(lambda x: sum(torch.chunk(x, 3, dim=1))), ["slice", "add"]),
    "select": (Fn(lambda x: x[:, 1] - x[:, -1]), ["gather", "sub"]),
    "index_list": (Fn(lambda x: x[:, [2, 0]]), ["gather"]),
    "index_select": (Fn(lambda x: torch.index_select(x, 3, torch.tensor([5, 1, 1]))),
                     ["gather"]),
    "unbind": (Fn(lambda x: x.unbind(1)[2]), ["gather"]),
    "squeeze_unsqueeze": (Fn(lambda x: x[:, :1].squeeze(1).unsqueeze(-1)),
                          ["slice", "reshape", "reshape"]),
    "conv_transpose": (_convt(3, 2, 3, stride=2, padding=1, output_padding=1),
                       ["conv_transpose2d"]),
    "conv_transpose_groups": (_convt(3, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=3,
                                     dilation=(1, 2)), ["conv_transpose2d"]),
}

ONNX_OPSETS = (17, 11)


def _x(batch: int = 5) -> torch.Tensor:
    return torch.randn((batch,) + SHAPE, generator=torch.Generator().manual_seed(1))


def _expected(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(x.clone())


def _ops(graph) -> list[str]:
    return [n.op for n in graph.nodes][1:]


NEW_OPS = {"maxpool2d", "avgpool2d", "sigmoid", "tanh", "leaky_relu", "elu", "hardtanh", "relu",
           "pad",
           "softmax", "slice", "gather", "conv_transpose2d"}
# another exporter may write an op of the torch frontend as another (unbind as split+squeeze)
SAME_AS = {"gather": {"gather", "slice"}}


def _covers(graph, ops: list[str]) -> bool:
    got = set(_ops(graph))
    return all(SAME_AS.get(op, {op}) & got for op in NEW_OPS & set(ops))


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_frontend_converts_and_computes_the_module(name):
    module, ops = CASES[name]
    x = _x()
    graph = from_torch(module, x)
    assert _ops(graph) == ops or set(_ops(graph)) == set(ops)
    torch.testing.assert_close(run_ir(graph, x), _expected(module, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_core_aten_decomposition_converts_the_same(name):
    module, ops = CASES[name]
    x = _x()
    program = torch.export.export(module.eval(), (x[:2].clone(),)).run_decompositions()
    graph = from_exported(program)
    assert _covers(graph, ops), _ops(graph)
    torch.testing.assert_close(run_ir(graph, x), _expected(module, x), rtol=1e-5, atol=1e-5)


def export_onnx(module: nn.Module, x: torch.Tensor, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x[:1].clone(),), buf, dynamo=False,
                          opset_version=opset, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("opset", ONNX_OPSETS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_export_converts_and_computes_the_module(name, opset):
    module, ops = CASES[name]
    x = _x()
    graph = from_onnx(export_onnx(module, x, opset))
    assert _covers(graph, ops), _ops(graph)
    torch.testing.assert_close(run_ir(graph, x), _expected(module, x), rtol=1e-5, atol=1e-5)


def test_unused_split_parts_leave_no_nodes():
    graph = from_torch(Fn(lambda x: torch.split(x, 1, dim=1)[1]), _x())
    assert _ops(graph) == ["slice"]
    assert graph.output_node.attrs == {"axis": 0, "start": 1, "end": 2, "step": 1}


def test_a_slice_over_the_whole_batch_is_no_node():
    graph = from_torch(Fn(lambda x: torch.sigmoid(x[0:])), _x())
    assert _ops(graph) == ["sigmoid"]


class Log(nn.Module):
    def forward(self, x):
        return F.log_softmax(x, 1)


class Indices(nn.Module):
    def forward(self, x):
        y, i = F.max_pool2d(x, 2, return_indices=True)
        return y + i.float()


REFUSED = {
    "maxpool dilation": (nn.MaxPool2d(2, dilation=2), r"max_pool2d with dilation \[2, 2\]"),
    "maxpool partial window": (nn.MaxPool2d(3, stride=2, ceil_mode=True),
                               r"max_pool2d with ceil_mode=True that adds a partial window"),
    "maxpool indices": (Indices(), r"output 1 of a multi-output op"),
    "leaky slope": (nn.LeakyReLU(2.0), r"leaky_relu with negative_slope=2.0 outside \[0, 1\]"),
    "elu alpha": (nn.ELU(1.5), r"elu with alpha=1.5 outside \(0, 1\]"),
    "selu": (nn.SELU(), r"unsupported op 'aten::selu'"),
    "clamp empty": (Fn(lambda x: x.clamp(0.5, 0.5)), r"clamp to \[0.5, 0.5\]"),
    "clamp by a tensor": (Fn(lambda x: x.clamp(min=torch.zeros(4, 6))), r"clamp with a min "
                                                                        r"tensor of shape"),
    "pad reflect": (Fn(lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect")), r"'reflect'|reflection"),
    "pad cropping": (Fn(lambda x: F.pad(x, (-1, 0))), r"negative pads \[-1, 0\]"),
    "pad batch": (Fn(lambda x: F.pad(x, (0, 0, 0, 0, 0, 0, 1, 0))), r"pads the batch"),
    "softmax batch": (nn.Softmax(dim=0), r"across the batch dimension"),
    "log_softmax": (Log(), r"unsupported op 'aten::_?log_softmax"),
    "slice batch": (Fn(lambda x: x[1:]), r"slice 1:.* across the batch dimension"),
    "mask index": (Fn(lambda x: x[:, torch.tensor([True, False, True])]),
                   r"constant 0-D or 1-D integer tensor"),
    "two index tensors": (Fn(lambda x: x[:, [0, 1], [1, 2]]), r"2 index tensors"),
    "adaptive not dividing": (nn.AdaptiveAvgPool2d((3, 4)), r"adaptive_avg_pool2d .* to "
                                                            r"\[3, 4\] is not supported"),
    "mean over channels": (Fn(lambda x: x.mean(1)), r"mean over dims \[1\]"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_forms_are_refused_on_one_line(case):
    module, match = REFUSED[case]
    with pytest.raises(UnsupportedOpError, match=match) as info:
        from_torch(module, _x(2))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, BoundFlowError)


def test_conv_transpose_keeps_torch_weight_layout():
    module = CASES["conv_transpose_groups"][0]
    graph = from_torch(module, _x())
    node = graph.output_node
    np.testing.assert_array_equal(graph.params[node.params["weight"]],
                                  module.weight.detach().numpy())
    assert node.attrs["stride"] == (2, 1) and node.attrs["dilation"] == (1, 2)
    assert node.attrs["groups"] == 3 and node.attrs["output_padding"] == (0, 0)
