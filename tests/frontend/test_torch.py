"""The torch frontend: traced graphs compute what the module computes; bad models are named."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import boundflow.examples as examples
from boundflow.domains.concrete import evaluate
from boundflow.errors import ModelLoadError, ShapeError, UnsupportedOpError
from boundflow.frontend import from_exported, from_torch, load_exported, load_model


@pytest.mark.parametrize("name", sorted(examples.EXAMPLES))
@pytest.mark.parametrize("batch", [1, 5])
def test_graph_computes_what_the_module_computes(name, batch):
    ex = examples.load(name)
    x = torch.from_numpy(np.repeat(ex.inputs, 2, axis=0)[:batch])
    graph = ex.model if not isinstance(ex.model, nn.Module) else from_torch(ex.model, x)
    if isinstance(ex.model, nn.Module):
        with torch.no_grad():
            expected = ex.model(x)
    else:
        expected = load_exported(examples.DATA / f"{name}.pt2").module()(x)
    torch.testing.assert_close(evaluate(graph, x), expected.detach(), rtol=1e-5, atol=1e-5)


def test_ops_of_the_residual_example_are_all_converted():
    ex = examples.random_residual()
    ops = {n.op for n in from_torch(ex.model, torch.from_numpy(ex.inputs)).nodes}
    assert {"conv2d", "relu", "add", "concat", "avgpool2d", "permute", "reshape", "mul",
            "sub", "linear"} <= ops
    assert "batchnorm" not in ops          # folded into the conv before it


def test_normalisation_constants_become_sub_and_div():
    ex = examples.random_cnn()
    ops = [n.op for n in from_torch(ex.model, torch.from_numpy(ex.inputs)).nodes]
    assert ops[:3] == ["input", "sub", "div"]


class Custom(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.body = body

    def forward(self, x):
        return self.body(self.fc(x))


class Square(nn.Module):
    def forward(self, x):
        return x * x


@pytest.mark.parametrize("body, match", [
    (nn.GELU(), r"unsupported op 'aten::gelu' at module 'body' \(GELU\)"),
    (nn.Sequential(nn.SiLU()), r"'aten::silu' at module 'body.0' \(SiLU\)"),
    (Square(), r"'mul' of two input-dependent tensors .* at module 'body' \(Square\)"),
    (nn.Softmax(dim=0), "across the batch dimension|unsupported op"),
])
def test_unsupported_ops_name_the_op_and_the_module(body, match):
    with pytest.raises(UnsupportedOpError, match=match):
        from_torch(Custom(body), torch.zeros(2, 4))


def test_batch_mixing_reshape_is_refused():
    class Mix(nn.Module):
        def forward(self, x):
            return x.reshape(-1)

    with pytest.raises(UnsupportedOpError, match="batch dimension"):
        from_torch(Mix(), torch.zeros(3, 4))


def test_tracing_restores_training_mode_and_needs_a_batch():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model.train()
    graph = from_torch(model, torch.zeros(1, 3))
    assert model.training
    assert [n.op for n in graph.nodes] == ["input", "linear"]
    with pytest.raises(ShapeError, match="batch dimension"):
        from_torch(model, torch.zeros(3))


def test_float64_models_give_float64_graphs():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    graph = from_torch(model, torch.zeros(1, 3, dtype=torch.float64))
    assert graph.dtype == "float64"
    assert graph.params[graph.output_node.params["weight"]].dtype == np.float64


def test_saved_program_round_trip(tmp_path):
    ex = examples.random_cnn()
    x = torch.from_numpy(ex.inputs[:2])
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(ex.model, (x,)), path)
    direct, loaded = from_torch(ex.model, x), load_model(path)
    assert direct.structural_hash() == loaded.structural_hash()
    assert direct.weights_hash() == loaded.weights_hash()
    assert from_exported(load_exported(path)).structural_hash() == direct.structural_hash()


class Payload:
    """Unpickling this writes a file: the test checks that it never runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_refuses_pickled_entries_and_never_runs_them(tmp_path):
    good = tmp_path / "good.pt2"
    model = nn.Sequential(nn.Linear(3, 2))
    torch.export.save(torch.export.export(model, (torch.zeros(2, 3),)), good)
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                for meta in cfg["config"].values():
                    meta["use_pickle"] = True
                data = json.dumps(cfg).encode()
            elif "/data/weights/weight_" in item.filename:
                import io
                import pickle
                buf = io.BytesIO()
                pickle.dump(Payload(str(marker)), buf)
                data = buf.getvalue()
            dst.writestr(item, data)
    with pytest.raises(ModelLoadError, match="pickled object"):
        load_model(bad)
    assert not marker.exists()


@pytest.mark.parametrize("content, match", [
    (b"not a zip at all", "not a readable torch.export archive"),
    (None, "cannot read the model file: No such file"),
])
def test_bad_model_files(tmp_path, content, match):
    path = tmp_path / "m.pt2"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=match):
        load_model(path)


def test_a_plain_zip_is_not_a_program(tmp_path):
    path = tmp_path / "m.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(ModelLoadError, match="not a torch.export archive"):
        load_model(path)


def test_an_onnx_file_given_as_a_program_names_the_onnx_loader(tmp_path):
    path = tmp_path / "net.onnx"
    path.write_bytes(b"\x08\x07\x12\x04test")          # protobuf bytes, not a zip
    with pytest.raises(ModelLoadError, match="an ONNX model loads with .*load_onnx"):
        load_model(path)
