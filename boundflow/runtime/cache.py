"""BoundCache: bounds computed once, found again.

A verifier asks many questions about one box (one property per class, the same box after a
branch-and-bound split, the same query again). Intermediate bounds depend only on the box
(and the split state), so later queries can start from them; final bounds depend on the spec
too. The plan's cache plan says which tasks' outputs are worth keeping (``persistent``: the
ones CROWN and final tasks read) and what their keys hold; ``run`` entries never outlive a run.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from boundflow.errors import BoundFlowError

SCOPES = ("run", "persistent")


@dataclass(frozen=True)
class CacheKey:
    """``plan`` names the plan and weights; ``spec`` is empty for intermediate bounds."""

    plan: str
    task: str
    domain: str
    spec: str = ""
    box: str = ""
    split: str = ""
    layout: str = ""


def array_hash(*arrays: Any) -> str:
    """A short content hash of arrays or tensors (shape, dtype and values)."""
    h = hashlib.sha1()
    for a in arrays:
        if a is None:
            h.update(b"none;")
            continue
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _detached(value: Any) -> Any:
    """A private copy: cached values must not share memory a later run overwrites."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_detached(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


class BoundCache:
    """A bounded LRU map from :class:`CacheKey` to tensors, with statistics. ``run``-scope
    entries are dropped by :meth:`end_run`; ``persistent`` ones stay until evicted."""

    def __init__(self, capacity_bytes: int = 1 << 30):
        if capacity_bytes < 0:
            raise BoundFlowError(f"cache capacity {capacity_bytes} must be >= 0")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[CacheKey, tuple[Any, str, int]] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = self.puts = self.evictions = 0

    def get(self, key: CacheKey) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: CacheKey, value: Any, scope: str = "persistent") -> None:
        if scope not in SCOPES:
            raise BoundFlowError(f"cache scope {scope!r} is not one of {SCOPES}")
        value = _detached(value)
        size = _nbytes(value)
        if size > self.capacity_bytes:
            return
        self._drop(key)
        self._entries[key] = (value, scope, size)
        self._bytes += size
        self.puts += 1
        while self._bytes > self.capacity_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[2]

    def end_run(self) -> None:
        for key in [k for k, (_, scope, _) in self._entries.items() if scope == "run"]:
            self._drop(key)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "puts": self.puts,
                "evictions": self.evictions, "entries": len(self._entries),
                "bytes": self._bytes}

    def __len__(self) -> int:
        return len(self._entries)
