"""What a traced graph of a torch module depends on, to tell when a cached trace is stale.

A graph traced from a module bakes in its layers, weights and settings. A cache that hands
out that graph after the module changed would bound another network: unsound bounds. A
:class:`Snapshot`, taken when the module is traced, says whether the module is still the
one traced: the same submodules (the objects: a swapped ReLU changes it), the same forward
hooks and instance ``forward`` overrides, the same public settings (e.g. a LeakyReLU's
``negative_slope``), and parameters, buffers and tensor attributes of the same contents
(compared to copies taken then: an in-place write through ``.data`` bumps no version
counter, and freed memory can come back at the same address, so neither is evidence).

The check reads every weight once per call (memory speed; a few µs on a small model) and
holds one copy of the weights beside the graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules import module as _module

_SIMPLE = (bool, int, float, str, type(None))


def _settings(m: torch.nn.Module) -> tuple[tuple[str, ...], tuple, tuple[str, ...]]:
    """The module's public plain settings (names and values) and tensor attributes (names)."""
    names, values, tensors = [], [], []
    for k, v in m.__dict__.items():
        if k.startswith("_") or k == "training":     # traced in eval mode whatever the flag
            continue
        if isinstance(v, torch.Tensor):
            tensors.append(k)
        elif isinstance(v, _SIMPLE) or (type(v) is tuple and all(isinstance(e, _SIMPLE)
                                                                   for e in v)):
            names.append(k)
            values.append(v)
    return tuple(names), tuple(values), tuple(tensors)


def _walk(root: torch.nn.Module) -> list[torch.nn.Module]:
    out, stack = [], [root]
    while stack:
        m = stack.pop()
        out.append(m)
        if m._modules:
            stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    return out


def _hooks(m: torch.nn.Module) -> tuple:
    return (m.__dict__.get("forward"), tuple(m._forward_hooks), tuple(m._forward_pre_hooks))


def _global_hooks() -> tuple:
    return tuple(_module._global_forward_hooks), tuple(_module._global_forward_pre_hooks)


def _tensors(m: torch.nn.Module, attrs: tuple[str, ...]) -> list[torch.Tensor | None]:
    return [*m._parameters.values(), *m._buffers.values(), *(m.__dict__.get(k) for k in attrs)]


def own_dtype(root: torch.nn.Module) -> torch.dtype:
    """The module's float precision: its first floating parameter's, else its first floating
    buffer's, else float32."""
    for group in (root.parameters(), root.buffers()):
        for t in group:
            if t.is_floating_point():
                return t.dtype
    return torch.float32


class Snapshot:
    """The state of ``root`` that a trace of it depends on (see the module docstring)."""

    def __init__(self, root: torch.nn.Module):
        modules = _walk(root)
        self.dtype = own_dtype(root)
        # the root by position only: the cache holding this snapshot is keyed weakly on it
        self._modules = (None, *modules[1:])
        self._global = _global_hooks()
        self._records = []            # per module: its hooks, settings and tensor attributes
        self._copies = []             # every tensor's copy, in walk order
        for m in modules:
            names, values, attrs = _settings(m)
            self._records.append((_hooks(m), names, values, attrs))
            self._copies += [None if t is None else t.detach().clone()
                             for t in _tensors(m, attrs)]

    def matches(self, root: torch.nn.Module) -> bool:
        """Whether ``root`` is still the module this snapshot was taken of."""
        modules = _walk(root)
        if len(modules) != len(self._modules) or self._global != _global_hooks():
            return False
        copies, n = self._copies, 0
        for m, kept, (hooks, names, values, attrs) in zip(modules, self._modules,
                                                          self._records):
            if kept is not None and m is not kept:
                return False
            d = m.__dict__
            if (m._forward_hooks or m._forward_pre_hooks or "forward" in d or hooks[0]
                    or hooks[1] or hooks[2]) and _hooks(m) != hooks:
                return False
            if names and tuple(d.get(k, _MISSING) for k in names) != values:
                return False
            for group in (m._parameters.values(), m._buffers.values(),
                          (d.get(k) for k in attrs)):
                for t in group:
                    if n == len(copies) or not _same(t, copies[n]):
                        return False
                    n += 1
        return n == len(copies)


_MISSING = object()


def _same(t: Any, copy: torch.Tensor | None) -> bool:
    if t is None or copy is None:
        return t is None and copy is None
    try:
        return t.dtype == copy.dtype and torch.equal(t, copy)
    except (AttributeError, TypeError, RuntimeError):   # not a tensor; another device
        return False
