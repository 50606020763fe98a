"""ATen converters that select or pad elements: slice, narrow, split / chunk / unbind, select,
index_select, indexing with a constant index tensor, and constant padding. Each becomes
``slice`` / ``gather`` / ``pad`` IR nodes on per-sample axes; anything along the batch axis is
refused, except a slice that keeps the whole batch.

The converters take ``(converter, bound arguments)`` like those of ``frontend/torch.py``, which
lists them in its table.
"""

from __future__ import annotations

from typing import Any

import torch

from boundflow.errors import ShapeError

INT_BIG = 2 ** 31 - 1      # an end at or past this keeps everything ("to the end")


def _int(c, value: Any, what: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int):
        raise c.fail(f"{what} must be a constant integer, got {value!r}")
    return value


def _slice_node(c, x, axis: int, start: int, end: int, step: int):
    """Python's slice ``start:end:step`` of per-sample ``axis`` (negative positions count from
    the end, both clamped to the axis); the whole axis gives ``x`` back."""
    size = x.shape[axis]
    start, end = (v + size if v < 0 else v for v in (start, end))
    start, end = min(max(start, 0), size), min(max(end, 0), size)
    if start >= end:
        raise c.fail(f"slice {start}:{end} of an axis of size {size} is empty", ShapeError)
    if (start, end, step) == (0, size, 1):
        return x
    return c.add("slice", [x], attrs={"axis": axis, "start": start, "end": end, "step": step})


def _is_batch(c, dim: int, x) -> bool:
    return dim % (len(x.shape) + 1) == 0


def slice_(c, a: dict):
    x = a["self"]
    start = 0 if a["start"] is None else _int(c, a["start"], "the slice start")
    end = INT_BIG if a["end"] is None else a["end"]
    step = _int(c, a["step"], "the slice step")
    if step < 1:
        raise c.fail(f"slice with step {step} is not supported")
    if _is_batch(c, a["dim"], x):
        # the end of a slice over the whole batch may be the (symbolic) batch size
        if start == 0 and step == 1 and (not isinstance(end, int) or end >= INT_BIG
                                         or (c.batch is not None and end >= c.batch)):
            return x
        shown = "" if isinstance(end, int) and end >= INT_BIG else end
        raise c.fail(f"slice {start}:{shown}:{step} across the batch dimension is not supported")
    end = _int(c, end, "the slice end")
    return _slice_node(c, x, c.sample_dim(a["dim"], x), start, end, step)


def narrow(c, a: dict):
    x = a["self"]
    axis = c.sample_dim(a["dim"], x)
    start = _int(c, a["start"], "the narrow start")
    start = start + x.shape[axis] if start < 0 else start
    return _slice_node(c, x, axis, start, start + _int(c, a["length"], "the length"), 1)


def _parts(c, x, axis: int, sizes: list[int]) -> list:
    """The consecutive slices of ``sizes`` along ``axis`` (the frontend drops the ones the
    model never reads)."""
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [_slice_node(c, x, axis, b, e, 1) for b, e in zip(bounds, bounds[1:])]


def split(c, a: dict) -> list:
    x = a["self"]
    axis = c.sample_dim(a["dim"], x)
    size = x.shape[axis]
    if "split_sizes" in a:
        sizes = [_int(c, s, "a split size") for s in a["split_sizes"]]
    else:
        part = _int(c, a["split_size"], "the split size")
        if part < 1:
            raise c.fail(f"split into parts of size {part}", ShapeError)
        sizes = [min(part, size - i) for i in range(0, size, part)]
    if sum(sizes) != size or min(sizes) < 1:
        raise c.fail(f"split sizes {sizes} do not cut an axis of size {size}", ShapeError)
    return _parts(c, x, axis, sizes)


def chunk(c, a: dict) -> list:
    x = a["self"]
    chunks = _int(c, a["chunks"], "the number of chunks")
    if chunks < 1:
        raise c.fail(f"chunk into {chunks} parts", ShapeError)
    size = x.shape[c.sample_dim(a["dim"], x)]
    return split(c, {"self": x, "dim": a["dim"], "split_size": -(-size // chunks)})


def unbind(c, a: dict) -> list:
    x = a["self"]
    axis = c.sample_dim(a["dim"], x)
    return [_gather(c, x, axis, [i], False) for i in range(x.shape[axis])]


def squeeze(c, a: dict):
    """Dropping axes of size 1 (all of them, or the given ones) is a reshape; the batch axis
    stays."""
    x = a["self"]
    given = a.get("dim", a.get("dims"))
    if given is None:
        axes = [i for i, s in enumerate(x.shape) if s == 1]
    else:
        given = [given] if isinstance(given, int) else list(given)
        if any(_is_batch(c, d, x) for d in given):
            raise c.fail("squeeze of the batch dimension is not supported")
        axes = [i for i in (c.sample_dim(d, x) for d in given) if x.shape[i] == 1]
    shape = tuple(s for i, s in enumerate(x.shape) if i not in axes)
    if shape == x.shape:
        return x
    if not shape:
        raise c.fail("squeeze to a scalar per sample is not supported")
    return c.add("reshape", [x], attrs={"shape": shape})


def unsqueeze(c, a: dict):
    x = a["self"]
    full = len(x.shape) + 2           # the rank after the new axis
    dim = a["dim"] % full if -full <= a["dim"] < full else None
    if dim is None or dim == 0:
        raise c.fail(f"unsqueeze at dim {a['dim']} is not supported (only after the batch "
                     f"dimension)")
    shape = x.shape[:dim - 1] + (1,) + x.shape[dim - 1:]
    return c.add("reshape", [x], attrs={"shape": shape})


def _gather(c, x, axis: int, indices: list[int], keepdim: bool):
    size = x.shape[axis]
    idx = [i + size if i < 0 else i for i in indices]
    if not idx or any(not 0 <= i < size for i in idx):
        raise c.fail(f"indices {indices} are out of range for an axis of size {size}",
                     ShapeError)
    return c.add("gather", [x], attrs={"axis": axis, "indices": tuple(idx),
                                       "keepdim": keepdim})


def select(c, a: dict):
    x = a["self"]
    return _gather(c, x, c.sample_dim(a["dim"], x), [_int(c, a["index"], "the index")], False)


def _index_list(c, index: Any, what: str) -> tuple[list[int], bool]:
    """A constant integer index tensor as (indices, whether it is 1-D)."""
    if not isinstance(index, torch.Tensor) or index.dtype in (torch.bool, torch.uint8) \
            or index.is_floating_point() or index.dim() > 1:
        shown = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
        raise c.fail(f"{what} must be a constant 0-D or 1-D integer tensor, got {shown} "
                     f"(masks and input-dependent indices are not supported)")
    return [int(i) for i in index.reshape(-1).tolist()], index.dim() == 1


def index_select(c, a: dict):
    x = a["self"]
    indices, _ = _index_list(c, a["index"], "the index_select index")
    return _gather(c, x, c.sample_dim(a["dim"], x), indices, True)


def index(c, a: dict):
    """``x[:, idx]``-style indexing: one constant index tensor, every other position ``:``."""
    x = a["self"]
    given = [(i, t) for i, t in enumerate(a["indices"]) if t is not None]
    if len(given) != 1:
        raise c.fail(f"indexing with {len(given)} index tensors is not supported (one "
                     f"constant index tensor on one axis is)")
    (dim, t), = given
    indices, one_d = _index_list(c, t, "the index")
    return _gather(c, x, c.sample_dim(dim, x), indices, one_d)


def pad(c, a: dict):
    """``F.pad`` in constant mode: (before, after) pairs from the last axis backwards."""
    x = a["self"]
    mode = a.get("mode", "constant")
    if mode != "constant":
        raise c.fail(f"pad with mode={mode!r} is not supported (only 'constant')")
    flat = [_int(c, p, "a pad") for p in a["pad"]]
    value = a.get("value")
    value = 0.0 if value is None else float(value)
    if len(flat) % 2 or len(flat) // 2 > len(x.shape) + 1:
        raise c.fail(f"pad {flat} does not fit a tensor of rank {len(x.shape) + 1}",
                     ShapeError)
    if len(flat) // 2 > len(x.shape) and any(flat[2 * len(x.shape):]):
        raise c.fail(f"pad {flat} pads the batch dimension, which is not supported")
    if min(flat, default=0) < 0:
        raise c.fail(f"pad with negative pads {flat} (cropping) is not supported")
    pairs = [(0, 0)] * len(x.shape)
    for i in range(min(len(flat) // 2, len(x.shape))):
        pairs[len(x.shape) - 1 - i] = (flat[2 * i], flat[2 * i + 1])
    if not any(b or e for b, e in pairs):
        return x
    return c.add("pad", [x], attrs={"pads": tuple(pairs), "value": value})


def constant_pad_nd(c, a: dict):
    return pad(c, {"self": a["self"], "pad": a["pad"], "mode": "constant",
                   "value": a["value"]})


CONVERTERS = {
    "aten::slice.Tensor": slice_,
    "aten::narrow": narrow,
    "aten::split.Tensor": split,
    "aten::split_with_sizes": split,
    "aten::chunk": chunk,
    "aten::unbind.int": unbind,
    "aten::squeeze": squeeze,
    "aten::squeeze.dim": squeeze,
    "aten::squeeze.dims": squeeze,
    "aten::unsqueeze": unsqueeze,
    "aten::select.int": select,
    "aten::index_select": index_select,
    "aten::index.Tensor": index,
    "aten::pad": pad,
    "aten::constant_pad_nd": constant_pad_nd,
}
