"""Reading ``.pt2`` programs saved with ``torch.export.save`` without unpickling objects.

``torch.export.load`` falls back to ``pickle`` for some entries (and to
``torch.load(weights_only=False)`` for others); a model file from elsewhere must never run
code. The archive's tensor manifests are checked first, and any ``torch.load`` the loader
still makes runs with ``weights_only=True``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from unittest import mock

import torch

from boundflow.errors import BoundFlowError, ModelLoadError
from boundflow.frontend.torch import from_exported
from boundflow.ir.graph import Graph


def _check_archive(path: Path) -> None:
    """Refuse a .pt2 archive whose loading would unpickle anything but plain tensors."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            configs = [n for n in names if n.endswith("_config.json")
                       and "/data/" in n and ("weights" in n or "constants" in n)]
            if not any(n.endswith("/archive_format") for n in names) or not configs:
                raise ModelLoadError(f"{path}: not a torch.export archive of the current "
                                     f"format (save it with torch.export.save)")
            for name in configs:
                for fqn, meta in json.loads(z.read(name))["config"].items():
                    if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(
                            ("weight_", "tensor_")):
                        raise ModelLoadError(f"{path}: entry {fqn!r} is stored as a pickled "
                                             f"object; BoundFlow loads plain tensors only")
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise ModelLoadError(f"{path}: not a readable torch.export archive ({e})") from None


def _weights_only_load(f, *args, **kwargs):
    kwargs["weights_only"] = True
    return _TORCH_LOAD(f, *args, **kwargs)


_TORCH_LOAD = torch.load


def load_exported(path: str | Path) -> torch.export.ExportedProgram:
    """Load a program saved with ``torch.export.save`` without unpickling arbitrary objects.

    The archive's tensor manifests are checked first; any remaining ``torch.load`` inside
    the loader runs with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    _check_archive(path)
    try:
        with mock.patch.object(torch, "load", _weights_only_load):
            return torch.export.load(str(path))
    except BoundFlowError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{path}: could not load the exported program: {e}") from None


def load_model(path: str | Path) -> Graph:
    """Read a ``.pt2`` file saved with ``torch.export.save`` into a Graph."""
    return from_exported(load_exported(path))
