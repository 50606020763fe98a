"""Reading ``.pt2`` programs saved with ``torch.export.save`` without running code from the file.

``torch.export.load`` does more than read a graph and tensors: it unpickles some entries (and
calls ``torch.load(weights_only=False)`` on others), and it ``dlopen``s any AOTInductor
library found under ``data/aotinductor/`` -- which runs that library's constructors before
any error can be raised. A model file from elsewhere must never run code, so the archive is
checked before any torch loader sees it:

* the file is read into memory once; the checks and the load both use those bytes, so the
  file cannot be swapped in between;
* every zip entry must be one that ``torch.export.save`` writes for a plain exported program
  (a closed allow-list, :data:`ALLOWED_ENTRIES`); anything else -- AOTInductor libraries and
  their metadata, ``extra/`` files, native code, pickles, legacy ``torch.save`` archives --
  is refused, as are directories, symlinks, compressed or encrypted entries, duplicate
  names, names with ``..`` or absolute paths, and absurd sizes or entry counts;
* torch's own zip reader must list exactly the entries checked here (no parser tricks);
* the tensor manifests must reference plain tensor files only (no pickled objects);
* any ``torch.load`` the loader still makes runs with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
import zipfile
from pathlib import Path
from unittest import mock

import torch

from boundflow.errors import BoundFlowError, ModelLoadError
from boundflow.frontend.torch import from_exported
from boundflow.ir.graph import Graph

_INDEX = r"(?:0|[1-9][0-9]{0,8})"

#: The entries (relative to the archive's single root folder) that ``torch.export.save``
#: writes for one ExportedProgram, found by saving MLPs, CNNs with BatchNorm and buffers
#: (persistent and not), programs with lifted tensor constants, programs without
#: parameters and programs with a dynamic batch dimension under torch 2.13 and listing
#: their zip entries. The program is always stored under the model name ``model``.
ALLOWED_ENTRIES: dict[str, str] = {
    "archive_format": r"archive_format",
    "archive_version": r"archive_version",
    "byteorder": r"byteorder",
    "zip format version": r"\.data/version",
    "serialization id": r"\.data/serialization_id",
    "program": r"models/model\.json",
    "sample inputs": r"data/sample_inputs/model\.pt",
    "weights manifest": r"data/weights/model_weights_config\.json",
    "weight": rf"data/weights/weight_{_INDEX}",
    "constants manifest": r"data/constants/model_constants_config\.json",
    "tensor constant": rf"data/constants/tensor_{_INDEX}",
}
_ALLOWED = re.compile("|".join(f"(?:{p})" for p in ALLOWED_ENTRIES.values()))

#: Entries every archive written by ``torch.export.save`` has.
REQUIRED_ENTRIES = ("archive_format", "archive_version", "models/model.json",
                    "data/sample_inputs/model.pt", "data/weights/model_weights_config.json",
                    "data/constants/model_constants_config.json")

_SMALL_ENTRIES = {"archive_format", "archive_version", "byteorder", ".data/version",
                  ".data/serialization_id"}
_SMALL_LIMIT = 256                       # bytes for the small bookkeeping entries
_JSON_LIMIT = 512 << 20                  # bytes for the program and the manifests
MAX_ARCHIVE_BYTES = 8 << 30              # the whole .pt2 file
MAX_ENTRIES = 100_000

_NATIVE_SUFFIXES = (".so", ".dll", ".dylib", ".pyd", ".cpp", ".cc", ".c", ".h", ".o",
                    ".a", ".lib", ".cubin", ".ptx", ".fatbin", ".hsaco", ".spv")
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin")
_BAD_ROOT = re.compile(r"[/\\:\x00-\x1f\x7f]")


def _refuse(path: Path, entry: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: refusing archive entry {entry!r} ({why}); not a "
                          f"torch.export archive of the kind torch.export.save writes for "
                          f"a plain exported program")


def _why_not_allowed(rel: str) -> str:
    low = rel.lower()
    if low.startswith("data/aotinductor/"):
        return "AOTInductor compiled code or its metadata; loading it runs native code"
    if low.endswith(_NATIVE_SUFFIXES):
        return "native code"
    if low.startswith("extra/"):
        return "extra files are not part of a plain exported program"
    if low.endswith(_PICKLE_SUFFIXES) or "data.pkl" in low:
        return "a pickle; BoundFlow loads plain tensors only"
    if low.startswith(("data/executorch/", "data/mtia", "xl_model_weights/")):
        return "backend artifacts are not part of a plain exported program"
    if low.startswith("models/"):
        return "only the program named 'model' that torch.export.save writes is read"
    return "not an entry torch.export.save writes"


def _check_entries(path: Path, infos: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """Check every entry against the allow-list; map the relative names to their infos."""
    if not infos:
        raise ModelLoadError(f"{path}: not a torch.export archive (the zip file is empty)")
    if len(infos) > MAX_ENTRIES:
        raise ModelLoadError(f"{path}: refusing an archive of {len(infos)} entries "
                             f"(at most {MAX_ENTRIES})")
    root = infos[0].orig_filename.split("/", 1)[0]
    entries: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = info.orig_filename
        if name != info.filename or "\\" in name or "\x00" in name:
            raise _refuse(path, name, "malformed name")
        if name.startswith("/") or re.match(r"[A-Za-z]:", name):
            raise _refuse(path, name, "absolute path")
        if info.is_dir():
            raise _refuse(path, name, "a directory entry")
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise _refuse(path, name, "a path with '..', '.' or empty parts")
        if len(parts) < 2 or parts[0] != root or _BAD_ROOT.search(root):
            raise _refuse(path, name, "outside the archive's single root folder")
        rel = name[len(root) + 1:]
        mode = info.external_attr >> 16
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise _refuse(path, name, "a symlink or other special file"
                          if stat.S_ISLNK(mode) else "a special file")
        if info.flag_bits & 0x1:
            raise _refuse(path, name, "encrypted")
        if rel in entries:
            raise _refuse(path, name, "duplicate name")
        if not _ALLOWED.fullmatch(rel):
            raise _refuse(path, name, _why_not_allowed(rel))
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise _refuse(path, name, "compressed; torch.export.save stores entries as-is")
        limit = (_SMALL_LIMIT if rel in _SMALL_ENTRIES
                 else _JSON_LIMIT if rel.endswith(".json") else MAX_ARCHIVE_BYTES)
        total += info.file_size
        if info.file_size > limit or total > MAX_ARCHIVE_BYTES:
            raise _refuse(path, name, f"absurd size ({info.file_size} bytes)")
        entries[rel] = info
    return entries


def _numel(sizes) -> int | None:
    try:
        return math.prod(int(s["as_int"]) for s in sizes)
    except (TypeError, KeyError, ValueError):
        return None


def _check_manifest(path: Path, z: zipfile.ZipFile, root: str,
                    entries: dict[str, zipfile.ZipInfo], folder: str, prefix: str) -> None:
    """Every manifest item must be a plain tensor stored in an allowed entry."""
    manifest = f"{folder}/model_{folder.split('/')[-1]}_config.json"
    config = json.loads(z.read(f"{root}/{manifest}"))
    items = config.get("config") if isinstance(config, dict) else None
    if not isinstance(items, dict):
        raise ModelLoadError(f"{path}: {manifest} is not a tensor manifest")
    for fqn, meta in items.items():
        if not isinstance(meta, dict):
            raise ModelLoadError(f"{path}: {manifest}: entry {fqn!r} is malformed")
        name = meta.get("path_name")
        if meta.get("use_pickle") or not isinstance(name, str) or not name.startswith(
                ("weight_", "tensor_")):
            raise ModelLoadError(f"{path}: entry {fqn!r} is stored as a pickled object; "
                                 f"BoundFlow loads plain tensors only")
        rel = f"{folder}/{name}"
        if not re.fullmatch(rf"{prefix}{_INDEX}", name) or rel not in entries:
            raise ModelLoadError(f"{path}: entry {fqn!r} refers to {f'{root}/{rel}'!r}, "
                                 f"which is not a tensor file of the archive")
        tensor_meta = meta.get("tensor_meta")
        numel = _numel(tensor_meta.get("sizes")) if isinstance(tensor_meta, dict) else None
        if entries[rel].file_size == 0 and numel != 0:
            raise ModelLoadError(f"{path}: entry {fqn!r} declares a non-empty tensor stored "
                                 f"in the empty file {f'{root}/{rel}'!r}")


def _check_archive(path: Path, data: bytes) -> None:
    """Refuse an archive with anything but what a plain ``torch.export.save`` writes."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            entries = _check_entries(path, infos)
            root = infos[0].filename.split("/", 1)[0]
            missing = [e for e in REQUIRED_ENTRIES if e not in entries]
            if missing or z.read(f"{root}/archive_format") != b"pt2":
                raise ModelLoadError(
                    f"{path}: not a torch.export archive of the current format "
                    f"({'missing ' + root + '/' + missing[0] if missing else 'wrong format tag'}"
                    f"; save it with torch.export.save)")
            _check_manifest(path, z, root, entries, "data/weights", "weight_")
            _check_manifest(path, z, root, entries, "data/constants", "tensor_")
    except BoundFlowError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, ValueError, OSError,
            EOFError, RuntimeError, NotImplementedError) as e:
        hint = ("; an ONNX model loads with boundflow.frontend.onnx.load_onnx (--onnx on the "
                "command line)") if str(path).lower().endswith((".onnx", ".onnx.gz")) else ""
        raise ModelLoadError(f"{path}: not a readable torch.export archive ({e}){hint}") \
            from None

    # torch reads the archive with its own zip reader: it must see exactly these entries
    try:
        from torch.export.pt2_archive import PT2ArchiveReader

        torch_entries = PT2ArchiveReader(io.BytesIO(data)).get_file_names()
    except Exception as e:  # noqa: BLE001 - any failure of torch's reader means unreadable
        raise ModelLoadError(f"{path}: not a readable torch.export archive ({e})") from None
    if len(torch_entries) != len(entries) or set(torch_entries) != set(entries):
        odd = sorted(set(torch_entries) ^ set(entries)) or ["(a duplicate)"]
        raise _refuse(path, odd[0], "torch's zip reader and the check disagree on the "
                                    "archive's entries")


def _weights_only_load(f, *args, **kwargs):
    kwargs["weights_only"] = True
    return _TORCH_LOAD(f, *args, **kwargs)


_TORCH_LOAD = torch.load


def _read(path: Path) -> bytes:
    from boundflow.frontend.files import regular_file

    regular_file(path, ModelLoadError, "model file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_ARCHIVE_BYTES:
                raise ModelLoadError(f"{path}: refusing a {size}-byte model file "
                                     f"(at most {MAX_ARCHIVE_BYTES})")
            data = f.read(size + 1)         # not the cap: read(n) reserves n bytes first
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the model file ({e})") from None
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ModelLoadError(f"{path}: refusing a model file over {MAX_ARCHIVE_BYTES} bytes")
    return data


def load_exported(path: str | Path) -> torch.export.ExportedProgram:
    """Load a program saved with ``torch.export.save`` without running code from the file.

    The archive's entries are checked against a closed allow-list and its tensor manifests
    against pickles before any torch loader sees it; the load then reads the same bytes,
    and any ``torch.load`` inside the loader runs with ``weights_only=True``.
    """
    path = Path(path)
    data = _read(path)
    _check_archive(path, data)
    try:
        with mock.patch.object(torch, "load", _weights_only_load):
            return torch.export.load(io.BytesIO(data))
    except BoundFlowError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{path}: could not load the exported program: {e}") from None


def load_model(path: str | Path) -> Graph:
    """Read a ``.pt2`` file saved with ``torch.export.save`` into a Graph."""
    return from_exported(load_exported(path))
