"""Compiled Relax modules, kept in memory and on disk.

A compile is keyed by the plan (its JSON hash, which covers the workload and every choice), the
target, the TVM version and ``KERNELS_VERSION``. The weights are parameters of the module, so
its code depends on no weight value; the key still holds the workload's weights hash (a
retrained model compiles anew), which keeps the names of a module's torch callbacks
(``callback_name``) apart between models of one structure. On disk an entry is ``<key>.so`` (``export_library``) plus ``<key>.json`` (the weight order
of ``main``), written to temporary names and renamed into place, so a reader never sees half a
file. An entry that fails to load is deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tvm


# Bumped whenever kernel generation or scheduling changes what a plan compiles to, so a
# module compiled by older code is never loaded for a plan it no longer matches.
KERNELS_VERSION = "kernels-12"     # 12: the auto column tile at least 16 wide (two AVX2 vectors)


def default_root() -> Path:
    from boundflow.backend.base import cache_root

    return cache_root() / "relax"


@dataclass
class Compiled:
    module: Any                  # a runtime module for relax.VirtualMachine
    weight_keys: list[str]
    n_kernels: int
    seconds: float               # compile, or load, time
    source: str                  # "built", "memory" or "disk"
    build_seconds: float = 0.0   # the compile time of the entry, wherever it was compiled


class CompileCache:
    """``get(key, build)`` returns a :class:`Compiled`: from memory, from disk, or by calling
    ``build() -> (executable, weight_keys, n_kernels)`` and storing the result."""

    def __init__(self, root: str | Path | None = None, disk: bool = True):
        self.root = Path(root) if root is not None else default_root()
        self.disk = disk
        self._memory: dict[str, Compiled] = {}
        self.stats = {"memory": 0, "disk": 0, "built": 0, "rebuilt_corrupt": 0}

    @staticmethod
    def key(plan_key: str, target: Any) -> str:
        text = json.dumps([plan_key, str(target), tvm.__version__, KERNELS_VERSION])
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def get(self, key: str, build: Callable[[], tuple[Any, list[str], int]]) -> Compiled:
        hit = self._memory.get(key)
        if hit is not None:
            self.stats["memory"] += 1
            return Compiled(hit.module, hit.weight_keys, hit.n_kernels, 0.0, "memory",
                            hit.build_seconds)
        if self.disk:
            loaded = self._load(key)
            if loaded is not None:
                self.stats["disk"] += 1
                self._memory[key] = loaded
                return loaded
        start = time.perf_counter()
        executable, weight_keys, n_kernels = build()
        seconds = time.perf_counter() - start
        if self.disk:
            self._store(key, executable, weight_keys, n_kernels, seconds)
        compiled = Compiled(executable, weight_keys, n_kernels, seconds, "built", seconds)
        self.stats["built"] += 1
        self._memory[key] = compiled
        return compiled

    def paths(self, key: str) -> tuple[Path, Path]:
        """The entry's module (``.so``) and metadata (``.json``) files."""
        return self.root / f"{key}.so", self.root / f"{key}.json"

    def _load(self, key: str) -> Compiled | None:
        lib, meta = self.paths(key)
        if not (lib.exists() and meta.exists()):
            return None
        start = time.perf_counter()
        try:
            info = json.loads(meta.read_text())
            module = tvm.runtime.load_module(str(lib))
            return Compiled(module, list(info["weight_keys"]), int(info["n_kernels"]),
                            time.perf_counter() - start, "disk",
                            float(info.get("compile_seconds", 0.0)))
        except Exception:                 # a truncated or foreign file: rebuild it
            self.stats["rebuilt_corrupt"] += 1
            for p in (lib, meta):
                p.unlink(missing_ok=True)
            return None

    def _store(self, key: str, executable: Any, weight_keys: list[str], n_kernels: int,
               seconds: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        lib, meta = self.paths(key)
        fd, tmp_lib = tempfile.mkstemp(suffix=".so", dir=self.root)
        os.close(fd)
        fd, tmp_meta = tempfile.mkstemp(suffix=".json", dir=self.root)
        with os.fdopen(fd, "w") as f:
            json.dump({"weight_keys": weight_keys, "n_kernels": n_kernels,
                       "compile_seconds": seconds}, f)
        try:
            executable.export_library(tmp_lib)
            os.replace(tmp_meta, meta)
            os.replace(tmp_lib, lib)
        finally:
            for p in (tmp_lib, tmp_meta):
                if os.path.exists(p):
                    os.unlink(p)
