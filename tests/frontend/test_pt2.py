"""Loading .pt2 files never runs code from the file: only what torch.export.save writes is read.

``torch.export.load`` dlopens AOTInductor libraries planted under ``data/aotinductor/`` (their
constructors run before any error), unpickles some entries and reads ``extra/`` files; the
loader must refuse all of that before any torch loader sees the archive, and still load every
program torch.export.save writes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import boundflow.examples as examples
import boundflow.frontend.pt2 as pt2
from boundflow.cli import main
from boundflow.domains.concrete import evaluate
from boundflow.errors import ModelLoadError
from boundflow.frontend.pt2 import load_exported, load_model

MARKER_ENV = "BOUNDFLOW_TEST_PT2_MARKER"

_CONSTRUCTOR_C = r"""
#include <stdio.h>
#include <stdlib.h>
/* Runs when the library is dlopen'ed: the test checks that this never happens. */
__attribute__((constructor)) static void boundflow_test_payload(void) {
    const char *path = getenv("%s");
    if (path == NULL) return;
    FILE *f = fopen(path, "w");
    if (f != NULL) { fputs("native code ran\n", f); fclose(f); }
}
""" % MARKER_ENV


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class CNN(nn.Module):
    """Conv + BatchNorm (running stats, num_batches_tracked), a persistent and a
    non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("mean", torch.tensor(0.25))
        self.register_buffer("scale", torch.full((1, 3, 1, 1), 2.0), persistent=False)
        self.fc = nn.Linear(3 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x - self.mean)) * self.scale).flatten(1))


class WithConstant(nn.Module):
    """A plain tensor attribute becomes a lifted tensor constant (data/constants/tensor_N)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.offset = torch.tensor([0.5, -1.0, 2.0])

    def forward(self, x):
        return self.fc(x) + self.offset


def _export(model: nn.Module, x: torch.Tensor, path: Path, dynamic: bool = False) -> Path:
    model.eval()
    for p in model.parameters():
        p.data.normal_()    # deterministic enough under the session seed, never all zero
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic else None
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=shapes), path)
    return path


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A program saved by torch.export.save: the base that the bad archives are built on."""
    torch.manual_seed(0)
    return _export(MLP(), torch.zeros(2, 4), tmp_path_factory.mktemp("pt2") / "mlp.pt2")


def _root(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        return z.namelist()[0].split("/")[0]


def _rebuild(src: Path, dst: Path, add=(), drop=lambda name: False, compression=None) -> Path:
    """Copy src's entries to dst (minus ``drop``), then write ``add``: (ZipInfo|name, data)."""
    with zipfile.ZipFile(src) as s, zipfile.ZipFile(dst, "w") as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")          # duplicate names are written on purpose
        for info in s.infolist():
            if not drop(info.filename):
                data = s.read(info.filename)
                if compression is not None:
                    info.compress_type = compression
                d.writestr(info, data)
        for name, data in add:
            d.writestr(name, data)
    return dst


def _compile_library(tmp_path: Path) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc/cc) to build the planted shared library")
    src, lib = tmp_path / "payload.c", tmp_path / "payload.so"
    src.write_text(_CONSTRUCTOR_C)
    proc = subprocess.run([gcc, "-shared", "-fPIC", "-o", str(lib), str(src)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"could not build a shared library with {gcc}: {proc.stderr.strip()}")
    return lib


def _plant_aoti(genuine: Path, lib: Path, dst: Path) -> Path:
    """The genuine program plus an AOTInductor library and its metadata, as AOTI packages
    lay them out (<root>/data/aotinductor/<model name>/)."""
    root = _root(genuine)
    metadata = {"AOTI_DEVICE_KEY": "cpu", "AOTI_PLATFORM": sys.platform}
    return _rebuild(genuine, dst, add=[
        (f"{root}/data/aotinductor/model/x.wrapper.so", lib.read_bytes()),
        (f"{root}/data/aotinductor/model/x.wrapper_metadata.json", json.dumps(metadata)),
    ])


@pytest.fixture
def planted(genuine, tmp_path, monkeypatch):
    lib = _compile_library(tmp_path)
    evil = _plant_aoti(genuine, lib, tmp_path / "evil.pt2")
    marker = tmp_path / "native-code-ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    return evil, marker


def test_the_planted_library_runs_under_a_plain_torch_export_load(planted):
    """Control: without the checks, loading the planted archive runs its native code (in a
    child process, so the library never enters this one)."""
    evil, marker = planted
    proc = subprocess.run([sys.executable, "-c", "import sys, torch\ntry:\n"
                           "    torch.export.load(sys.argv[1])\nexcept Exception:\n    pass\n",
                           str(evil)], capture_output=True, text=True, env=os.environ.copy(),
                          timeout=300)
    if not marker.exists():
        pytest.skip(f"this torch ({torch.__version__}) does not dlopen AOTInductor libraries "
                    f"in torch.export.load; the guard tests below still run "
                    f"({proc.stderr.strip()[-300:]})")
    assert marker.read_text() == "native code ran\n"


def test_a_planted_aotinductor_library_is_refused_before_it_is_loaded(planted):
    evil, marker = planted
    with pytest.raises(ModelLoadError) as info:
        load_model(evil)
    message = str(info.value)
    assert str(evil) in message
    assert "data/aotinductor/model/x.wrapper.so" in message
    with pytest.raises(ModelLoadError, match="aotinductor"):
        load_exported(evil)
    assert not marker.exists()


def test_the_cli_refuses_a_planted_library_with_exit_code_2(planted, tmp_path, capsys):
    evil, marker = planted
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 4), dtype=np.float32))
    assert main(["verify", "--model", str(evil), "--input", str(x), "--eps", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "data/aotinductor/model/x.wrapper.so" in err and str(evil) in err
    assert not marker.exists()


def test_aotinductor_metadata_alone_is_refused(genuine, tmp_path):
    root = _root(genuine)
    bad = _rebuild(genuine, tmp_path / "m.pt2", add=[
        (f"{root}/data/aotinductor/model/x.wrapper_metadata.json", "{}")])
    with pytest.raises(ModelLoadError, match="x.wrapper_metadata.json"):
        load_model(bad)


@pytest.mark.parametrize("entry, why", [
    ("extra/module_info.json", "extra files"),
    ("extra/notes.txt", "extra files"),
    ("data/weights/weight_9.so", "native code"),
    ("lib/helper.dll", "native code"),
    ("lib/helper.dylib", "native code"),
    ("data/aotinductor/model/x.cpp", "AOTInductor"),
    ("models/x.cpp", "native code"),
    ("data.pkl", "pickle"),
    ("data/weights/model.pt", "pickle"),          # the legacy pickled weights
    ("data/constants/model.pt", "pickle"),        # the legacy pickled constants
    ("data/constants/custom_obj_0", "not an entry"),
    ("data/constants/opaque_obj_0", "not an entry"),
    ("models/second.json", "only the program named 'model'"),
    ("data/executorch/program.pte", "backend artifacts"),
    ("xl_model_weights/model_param_config", "backend artifacts"),
    ("version", "not an entry"),
])
def test_entries_a_plain_program_does_not_have_are_refused(genuine, tmp_path, entry, why):
    root = _root(genuine)
    bad = _rebuild(genuine, tmp_path / "m.pt2", add=[(f"{root}/{entry}", b"\x00")])
    with pytest.raises(ModelLoadError, match=why) as info:
        load_model(bad)
    assert f"{root}/{entry}" in str(info.value) and str(bad) in str(info.value)


def test_extra_files_written_by_torch_export_save_are_refused(tmp_path):
    path = tmp_path / "m.pt2"
    program = torch.export.export(MLP(), (torch.zeros(2, 4),))
    torch.export.save(program, path, extra_files={"note.txt": "hello"})
    with pytest.raises(ModelLoadError, match="extra/note.txt"):
        load_model(path)


def test_a_legacy_torch_save_archive_is_refused(tmp_path):
    path = tmp_path / "m.pt2"
    torch.save(MLP().state_dict(), path)
    with pytest.raises(ModelLoadError, match=r"refusing archive entry '[^']*data\.pkl'.*pickle"):
        load_model(path)
    whole = tmp_path / "module.pt2"
    torch.save(MLP(), whole)
    with pytest.raises(ModelLoadError, match="data.pkl"):
        load_model(whole)


@pytest.mark.parametrize("name, why", [
    ("{root}/../{root}/data/weights/weight_0", r"'\.\.'"),
    ("{root}/data/../data/weights/weight_9", r"'\.\.'"),
    ("../../evil.so", r"'\.\.'"),
    ("{root}/./archive_format", r"'\.\.'"),
    ("{root}//data/weights/weight_9", "empty parts"),
    ("/tmp/{root}/data/weights/weight_9", "absolute path"),
    ("C:/{root}/data/weights/weight_9", "absolute path"),
    ("other/data/weights/weight_0", "single root folder"),
    ("loose.json", "single root folder"),
    ("{root}\\data\\weights\\weight_9", "malformed name"),
    ("{root}/data/weights/", "a directory entry"),
])
def test_path_tricks_are_refused(genuine, tmp_path, name, why):
    name = name.format(root=_root(genuine))
    bad = _rebuild(genuine, tmp_path / "m.pt2", add=[(name, b"")])
    with pytest.raises(ModelLoadError, match=why) as info:
        load_model(bad)
    assert repr(name) in str(info.value)


def test_duplicate_names_are_refused(genuine, tmp_path):
    name = f"{_root(genuine)}/data/weights/weight_0"
    bad = _rebuild(genuine, tmp_path / "m.pt2", add=[(name, b"\x00" * 128)])
    with pytest.raises(ModelLoadError, match="duplicate name"):
        load_model(bad)


def test_symlink_entries_are_refused(genuine, tmp_path):
    name = f"{_root(genuine)}/data/weights/weight_0"
    link = zipfile.ZipInfo(name)
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    bad = _rebuild(genuine, tmp_path / "m.pt2", drop=lambda n: n == name,
                   add=[(link, b"/etc/passwd")])
    with pytest.raises(ModelLoadError, match="symlink") as info:
        load_model(bad)
    assert repr(name) in str(info.value)


def test_compressed_entries_are_refused(genuine, tmp_path):
    bad = _rebuild(genuine, tmp_path / "m.pt2", compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(ModelLoadError, match="compressed"):
        load_model(bad)


def test_absurd_sizes_and_entry_counts_are_refused(genuine, tmp_path, monkeypatch):
    root = _root(genuine)
    big = _rebuild(genuine, tmp_path / "big.pt2", drop=lambda n: n.endswith("/byteorder"),
                   add=[(f"{root}/byteorder", b"little" * 100)])
    with pytest.raises(ModelLoadError, match="absurd size"):
        load_model(big)
    many = _rebuild(genuine, tmp_path / "many.pt2",
                    add=[(f"{root}/data/weights/weight_{i}", b"") for i in range(100, 140)])
    monkeypatch.setattr(pt2, "MAX_ENTRIES", 32)
    with pytest.raises(ModelLoadError, match="entries"):
        load_model(many)
    monkeypatch.setattr(pt2, "MAX_ARCHIVE_BYTES", 1024)
    with pytest.raises(ModelLoadError, match="refusing a .*-byte model file"):
        load_model(genuine)


def test_manifests_may_only_name_tensor_files_of_the_archive(genuine, tmp_path):
    root = _root(genuine)
    config_name = f"{root}/data/weights/model_weights_config.json"
    with zipfile.ZipFile(genuine) as z:
        config = json.loads(z.read(config_name))
    first = next(iter(config["config"]))
    for path_name in ["weight_0/../../aotinductor/model/x.wrapper.so", "weight_77",
                      "tensor_0"]:
        config["config"][first]["path_name"] = path_name
        bad = _rebuild(genuine, tmp_path / "m.pt2", drop=lambda n: n == config_name,
                       add=[(config_name, json.dumps(config))])
        with pytest.raises(ModelLoadError, match=f"{first!r} refers to"):
            load_model(bad)


def test_an_empty_tensor_file_cannot_declare_a_huge_tensor(genuine, tmp_path):
    root = _root(genuine)
    config_name = f"{root}/data/weights/model_weights_config.json"
    with zipfile.ZipFile(genuine) as z:
        config = json.loads(z.read(config_name))
    fqn, meta = next(iter(config["config"].items()))
    meta["tensor_meta"]["sizes"] = [{"as_int": 1 << 20}, {"as_int": 1 << 20}]
    weight = f"{root}/data/weights/{meta['path_name']}"
    bad = _rebuild(genuine, tmp_path / "m.pt2", drop=lambda n: n in (config_name, weight),
                   add=[(config_name, json.dumps(config)), (weight, b"")])
    with pytest.raises(ModelLoadError, match="non-empty tensor"):
        load_model(bad)


def test_torch_must_see_the_entries_that_were_checked(genuine, monkeypatch):
    """A zip that Python's zipfile and torch's reader list differently is refused."""
    from torch.export.pt2_archive import PT2ArchiveReader

    listed = PT2ArchiveReader.get_file_names
    monkeypatch.setattr(PT2ArchiveReader, "get_file_names",
                        lambda self: listed(self) + ["data/aotinductor/model/x.wrapper.so"])
    with pytest.raises(ModelLoadError, match="disagree") as info:
        load_model(genuine)
    assert "x.wrapper.so" in str(info.value)


def test_the_loader_reads_the_checked_bytes_not_the_file_again(genuine, tmp_path, monkeypatch):
    """Swapping the file between the check and the load changes nothing."""
    path = tmp_path / "m.pt2"
    shutil.copy(genuine, path)
    seen = []
    real = torch.export.load

    def load(f, *args, **kwargs):
        seen.append(f)
        path.write_bytes(b"swapped")
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch.export, "load", load)
    load_model(path)
    assert len(seen) == 1 and isinstance(seen[0], io.BytesIO)


# --- what torch.export.save writes still loads --------------------------------------------

@pytest.mark.parametrize("path", sorted(examples.DATA.glob("*.pt2")), ids=lambda p: p.name)
def test_every_example_program_loads(path):
    graph = load_model(path)
    x = torch.from_numpy(np.load(examples.DATA / "digits_x.npy")[:3])
    expected = load_exported(path).module()(x)
    torch.testing.assert_close(evaluate(graph, x), expected.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, shape, dynamic", [
    (MLP, (2, 4), False),
    (CNN, (2, 1, 8, 8), False),
    (WithConstant, (2, 4), False),
    (MLP, (2, 4), True),
    (CNN, (2, 1, 8, 8), True),
], ids=["mlp", "cnn-batchnorm", "constant", "mlp-dynamic-batch", "cnn-dynamic-batch"])
def test_freshly_saved_programs_load(tmp_path, make, shape, dynamic):
    torch.manual_seed(0)
    model = make().eval()
    path = _export(model, torch.zeros(shape), tmp_path / "saved model-ü.pt2", dynamic)
    with zipfile.ZipFile(path) as z:
        rels = [n.split("/", 1)[1] for n in z.namelist()]
    assert all(pt2._ALLOWED.fullmatch(r) for r in rels)
    graph = load_model(path)
    batch = 5 if dynamic else shape[0]
    x = torch.randn(batch, *shape[1:])
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(evaluate(graph, x), expected, rtol=1e-5, atol=1e-5)


def test_a_genuine_program_passes_the_cli(genuine, tmp_path):
    """The exit code 2 above comes from the refusal: the same program without the planted
    library verifies."""
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 4), dtype=np.float32))
    assert main(["verify", "--model", str(genuine), "--input", str(x), "--eps", "0.01"]) != 2
