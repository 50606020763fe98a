"""What a traced graph of a torch module depends on, to tell when a cached trace is stale.

A graph traced from a module bakes in its layers, weights and settings. A cache that hands
out that graph after the module changed would bound another network: unsound bounds. A
:class:`Snapshot`, taken when the module is traced, says whether the module is still the
one traced. It walks the module as its ``forward`` may see it: every submodule (registered,
or held in a plain attribute, list, tuple or dict), and in each module every attribute but
the bookkeeping ``nn.Module`` itself keeps:

* numbers, strings, dtypes, sizes: by type and value;
* tensors (parameters, buffers, plain attributes): by contents, bit for bit, against copies
  taken then (an in-place write through ``.data`` bumps no version counter, and freed memory
  can come back at the same address, so neither is evidence);
* lists, tuples and dicts: by length, keys and each element, a few levels deep;
* modules, functions and any other object: by identity (held weakly, so the cache that
  holds the snapshot never keeps a module alive), and modules also by class;
* forward hooks (the module's and the global ones) by their handles' ids.

Anything that differs means a new trace. The check reads every weight once per call
(memory speed) and holds one copy of the weights beside the graph.
"""

from __future__ import annotations

import ctypes
import types
import weakref
from typing import Any

import numpy as np
import torch
from torch.nn.modules import module as _module

_BY_VALUE = (bool, int, float, complex, str, bytes, type(None), np.generic, torch.dtype,
             torch.device)
_DEPTH = 4                      # containers nested deeper are compared by identity
# what nn.Module keeps for itself (the training flag too: a module is traced in eval mode)
_BOOKKEEPING = frozenset(torch.nn.Module().__dict__)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_INTS = "tuple of ints"         # the tag of a tuple of plain ints, compared whole
_OWN: dict[tuple, tuple] = {}   # a module's attribute names -> those not bookkeeping
_OWN_MAX = 4096                 # entries kept at most (then it starts again)


def own_dtype(root: torch.nn.Module) -> torch.dtype:
    """The module's float precision: its first floating parameter's, else its first floating
    buffer's, else float32."""
    for group in (root.parameters(), root.buffers()):
        for t in group:
            if t.is_floating_point():
                return t.dtype
    return torch.float32


def _collect(root: torch.nn.Module) -> tuple[list, list, list]:
    """What a trace of ``root`` depends on: ``(values, tensors, objects)``, the facts
    compared by ``==``, by contents and by identity. The root itself is no object (the
    cache holding the snapshot is keyed on it)."""
    values: list = [tuple(_module._global_forward_hooks),
                    tuple(_module._global_forward_pre_hooks)]
    tensors: list = []
    objects: list = []
    seen = {id(root)}
    stack = [root]
    while stack:
        m = stack.pop()
        d = m.__dict__
        params, buffers, children = m._parameters, m._buffers, m._modules
        keys = tuple(d)
        values.append((type(m), keys, tuple(m._forward_hooks),
                       tuple(m._forward_pre_hooks), tuple(params), tuple(buffers),
                       tuple(children)))
        tensors += params.values()
        tensors += buffers.values()
        found: list = []
        own = _OWN.get(keys)
        if own is None:
            if len(_OWN) >= _OWN_MAX:         # modules that name attributes as they run
                _OWN.clear()
            own = _OWN[keys] = tuple(k for k in keys if k not in _BOOKKEEPING)
        for k in own:
            _value(d[k], values, tensors, objects, found, _DEPTH)
        for c in children.values():
            if c is not None:
                found.append(c)
                objects.append(c)
        for c in reversed(found):
            if id(c) not in seen:
                seen.add(id(c))
                stack.append(c)
    return values, tensors, objects


_PLAIN = frozenset((bool, int, float, str, type(None)))     # exact types: the common case


def _value(v: Any, values: list, tensors: list, objects: list, found: list, depth: int
           ) -> None:
    tv = type(v)
    if tv in _PLAIN:
        values.append((tv, v))
    elif tv is tuple and all(type(e) is int for e in v):     # a layer's sizes, strides...
        values.append((_INTS, v))
    elif isinstance(v, torch.Tensor):
        values.append(torch.Tensor)
        tensors.append(v)
    elif isinstance(v, _BY_VALUE):
        values.append((type(v), v))
    elif type(v) is np.ndarray:
        values.append((np.ndarray, v.dtype.str, v.shape, v.tobytes()))
    elif isinstance(v, torch.nn.Module):
        values.append(torch.nn.Module)
        found.append(v)
        objects.append(v)
    elif depth and type(v) in (list, tuple, torch.Size):
        values.append((type(v), len(v)))
        for e in v:
            _value(e, values, tensors, objects, found, depth - 1)
    elif depth and type(v) is dict:
        values.append((dict, tuple(v)))
        for e in v.values():
            _value(e, values, tensors, objects, found, depth - 1)
    else:
        values.append(object)
        objects.append(v)


def _weak(o: Any) -> Any:
    """A reference to ``o`` that does not keep it alive where Python allows one; called, it
    gives ``o`` back (None once it is gone)."""
    if isinstance(o, types.MethodType):
        return _WeakMethod(o)
    try:
        return weakref.ref(o)
    except TypeError:                        # builtins, ints...: held (they hold nothing)
        return lambda: o


class _WeakMethod:
    """A bound method held weakly: its object and function (``weakref.WeakMethod`` without
    its callback, which can fire during interpreter shutdown)."""
    __slots__ = ("obj", "func")

    def __init__(self, m: types.MethodType):
        self.obj, self.func = _weak(m.__self__), _weak(m.__func__)

    def __call__(self) -> Any:
        obj, func = self.obj(), self.func()
        return None if obj is None or func is None else types.MethodType(func, obj)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` as integers of its element size, where it is a float tensor: equal bits compare
    equal (NaN too)."""
    if t.is_floating_point() and t.element_size() in _INT_OF_SIZE:
        return t.view(_INT_OF_SIZE[t.element_size()])
    return t


class Snapshot:
    """The state of ``root`` that a trace of it depends on (see the module docstring)."""

    def __init__(self, root: torch.nn.Module):
        self.dtype = own_dtype(root)
        values, tensors, objects = _collect(root)
        self._values = values
        self._copies = [None if t is None else _Kept(t) for t in tensors]
        self._objects = [_weak(o) for o in objects]

    def matches(self, root: torch.nn.Module) -> bool:
        """Whether ``root`` is still the module this snapshot was taken of."""
        values, tensors, objects = _collect(root)
        if values != self._values or len(objects) != len(self._objects) \
                or len(tensors) != len(self._copies):
            return False
        for ref, o in zip(self._objects, objects):
            if not _is(ref(), o):
                return False
        for t, c in zip(tensors, self._copies):
            if t is None or c is None:
                if t is not c:
                    return False
            elif not _same(t, c):
                return False
        return True


def _is(kept: Any, now: Any) -> bool:
    if isinstance(now, types.MethodType):      # a fresh bound method object per lookup
        return kept is not None and kept.__self__ is now.__self__ \
            and kept.__func__ is now.__func__
    return kept is now


def _libc_memcmp() -> Any:
    """The C library's ``memcmp`` (None where ctypes cannot find it: ``torch.equal`` then)."""
    try:
        fn = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_MEMCMP = _libc_memcmp()


# tensors whose values are their bytes in memory, as ``memcmp`` reads them: plain dense
# tensors (not a subclass wrapping others, whose ``data_ptr`` may be 0; not a conjugate or
# negative view, whose bytes are the other tensor's; not quantized, whose scale is elsewhere)
_PLAIN_TENSORS = frozenset(t for t in (torch.Tensor, torch.nn.Parameter,
                                       getattr(torch.nn, "Buffer", None)) if t is not None)


def _bytes_are_values(t: torch.Tensor) -> bool:
    return (type(t) in _PLAIN_TENSORS and t.layout == torch.strided and t.is_cpu
            and not (t.is_conj() or t.is_neg() or t.is_quantized or t.is_nested)
            and t.is_contiguous() and (t.numel() == 0 or t.data_ptr() != 0))


class _Kept:
    """A copy of a tensor a trace read, with what comparing against it needs: its dtype,
    shape, byte size and, where its bytes are its values (:func:`_bytes_are_values`) and
    the C library's ``memcmp`` is at hand, its address."""
    __slots__ = ("copy", "dtype", "shape", "nbytes", "ptr")

    def __init__(self, t: torch.Tensor):
        self.copy = c = t.detach().clone(memory_format=torch.contiguous_format) \
            if t.layout == torch.strided else t.detach().clone()
        self.dtype, self.shape = c.dtype, c.shape
        self.nbytes = c.numel() * c.element_size()
        self.ptr = c.data_ptr() if _bytes_are_values(c) and c.numel() else None


def _same(t: torch.Tensor, kept: _Kept) -> bool:
    """Equal dtype, shape and values (NaN where the copy has the same NaN bits).

    A dense CPU tensor is compared with its dense copy byte for byte by ``memcmp``: 5-7x
    faster than ``torch.equal`` (one compare per weight per call of a cached trace; the
    shared MLP's 1 MiB of weights took 0.2 ms that way, its forward pass 0.4). Bits that
    differ are a change even where the values are equal (-0.0 against 0.0): a trace again,
    never a stale one."""
    if t.dtype != kept.dtype or t.shape != kept.shape:
        return False
    if kept.ptr is not None and _MEMCMP is not None and _bytes_are_values(t):
        return _MEMCMP(t.data_ptr(), kept.ptr, kept.nbytes) == 0
    copy = kept.copy
    try:
        return torch.equal(t, copy) or torch.equal(_bits(t.detach()), _bits(copy))
    except (TypeError, RuntimeError):          # another device, a layout equal cannot read
        return False
