"""ONNX converters that select, pad or reshape elements: Slice, Split, Gather, Pad, Squeeze and
Unsqueeze (and Slice folded on constants). Each reads its index arguments as constants (from
attributes in old opsets, from inputs in new ones), applies ONNX's clamping rules, and becomes
``slice`` / ``gather`` / ``pad`` / ``reshape`` IR nodes on per-sample axes; anything along
the batch axis is refused, except a Slice that keeps the whole batch.

The converters take ``(converter, inputs, attributes)`` like those of ``frontend/onnx.py``,
which lists them in its tables.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from boundflow.errors import ShapeError

INT_BIG = 2 ** 31 - 1      # an end at or past this keeps everything ("to the end")


def ints(c, value: Any, what: str) -> list[int]:
    """A constant 0-D or 1-D tensor of whole numbers (folded shape arithmetic may leave them
    as floats) as a list of ints; anything else raises naming the node."""
    arr = c.array(value, what)
    if arr.ndim > 1 or arr.dtype.kind not in "iuf" or not np.all(np.mod(arr, 1) == 0):
        raise c.fail(f"{what} must be a 0-D or 1-D tensor of whole numbers, got "
                     f"{arr.tolist() if arr.size <= 8 else arr.dtype} of shape {arr.shape}",
                     ShapeError)
    return [int(v) for v in arr.reshape(-1)]


def _input(a: list, i: int) -> Any:
    """Optional input ``i`` (None where absent or given as the empty name)."""
    return a[i] if len(a) > i else None


def full_axis(c, axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise c.fail(f"axis {axis} is out of range for a tensor of rank {rank}", ShapeError)
    return axis % rank


def _clamp_range(start: int, end: int, size: int) -> tuple[int, int]:
    """ONNX Slice's rule for a positive step: negative positions count from the end, then
    both are clamped to [0, size]."""
    start, end = (v + size if v < 0 else v for v in (start, end))
    return min(max(start, 0), size), min(max(end, 0), size)


# --- Slice ----------------------------------------------------------------------------------

def _slice_args(c, a, at) -> tuple[list[int], list[int], list[int] | None, list[int] | None]:
    if c.opset < 10:
        return (list(at["starts"]), list(at["ends"]),
                list(at["axes"]) if "axes" in at else None, None)
    axes, steps = _input(a, 3), _input(a, 4)
    return (ints(c, a[1], "the Slice starts"), ints(c, a[2], "the Slice ends"),
            None if axes is None else ints(c, axes, "the Slice axes"),
            None if steps is None else ints(c, steps, "the Slice steps"))


def slice_(c, a, at):
    x = a[0]
    starts, ends, axes, steps = _slice_args(c, a, at)
    rank = len(c.full_shape(x))
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise c.fail(f"Slice starts {starts}, ends {ends}, axes {axes} and steps {steps} "
                     f"differ in length", ShapeError)
    axes = [full_axis(c, ax, rank) for ax in axes]
    if len(set(axes)) != len(axes):
        raise c.fail(f"Slice axes {axes} repeat an axis", ShapeError)
    for ax, start, end, step in sorted(zip(axes, starts, ends, steps)):
        if step < 1:
            raise c.fail(f"Slice with step {step} on axis {ax} is not supported (only "
                         f"positive steps)")
        if c.batched and ax == 0:
            if start == 0 and end >= INT_BIG and step == 1:
                continue            # keeps the whole batch
            raise c.fail(f"Slice {start}:{end}:{step} along the batch axis is not supported")
        x = _add_slice(c, x, c.axis(ax, x), start, end, step)
    return x


def _add_slice(c, x, axis: int, start: int, end: int, step: int):
    size = x.shape[axis]
    start, end = _clamp_range(start, end, size)
    if start >= end:
        raise c.fail(f"Slice {start}:{end} of an axis of size {size} is empty", ShapeError)
    if (start, end, step) == (0, size, 1):
        return x
    return c.add("slice", [x], attrs={"axis": axis, "start": start, "end": end, "step": step})


def fold_slice(c, a, at) -> np.ndarray:
    """Slice of a constant, with ONNX's semantics for every step sign (numpy's slices clamp
    the same way)."""
    data = np.asarray(a[0])
    starts, ends, axes, steps = _slice_args(c, a, at)
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * data.ndim
    for ax, start, end, step in zip(axes, starts, ends, steps):
        if step == 0:
            raise c.fail("Slice with step 0", ShapeError)
        size = data.shape[ax]
        if step < 0:
            # ONNX clamps a negative step's start to [0, size-1] and its end to [-1, size-1];
            # numpy would read a far negative start as "empty" and an end before the first
            # element as counting from the end
            start = max(start, -size)
            end = None if end < -size else end
        index[ax] = slice(start, end, step)
    return data[tuple(index)]


# --- Split ----------------------------------------------------------------------------------

def _split_sizes(c, a, at, size: int, n_out: int) -> list[int]:
    given = at.get("split") if c.opset < 13 else _input(a, 1)
    if given is not None:
        return ints(c, given, "the Split sizes")
    n = int(at.get("num_outputs", n_out))
    if n != n_out:
        raise c.fail(f"Split into num_outputs={n} parts has {n_out} outputs", ShapeError)
    if "num_outputs" in at:          # opset 18: ceil-sized parts, the last one smaller
        part = -(-size // n)
        return [min(part, size - i * part) for i in range(n)]
    if size % n:
        raise c.fail(f"Split of an axis of size {size} into {n} equal parts", ShapeError)
    return [size // n] * n


def split(c, a, at) -> tuple:
    x = a[0]
    axis = c.axis(int(at.get("axis", 0)), x)
    outputs = list(c.node.output)
    sizes = _split_sizes(c, a, at, x.shape[axis], len(outputs))
    if len(sizes) != len(outputs) or sum(sizes) != x.shape[axis] or min(sizes) < 1:
        raise c.fail(f"Split sizes {sizes} do not cut an axis of size {x.shape[axis]} into "
                     f"{len(outputs)} non-empty parts", ShapeError)
    used = c.used_names()
    parts, start = [], 0
    for name, n in zip(outputs, sizes):
        parts.append(_add_slice(c, x, axis, start, start + n, 1) if name in used else None)
        start += n
    return tuple(parts)


# --- Gather, Pad ----------------------------------------------------------------------------

def gather(c, a, at):
    x, idx = a
    axis = c.axis(int(at.get("axis", 0)), x)
    arr = c.array(idx, "the Gather indices")
    if arr.ndim > 1:
        raise c.fail(f"Gather with indices of shape {arr.shape} is not supported (a scalar "
                     f"or a 1-D list of indices is)")
    size = x.shape[axis]
    indices = [v + size if v < 0 else v for v in ints(c, arr, "the Gather indices")]
    if not indices or any(not 0 <= v < size for v in indices):
        raise c.fail(f"Gather indices {arr.tolist()} are out of range for an axis of size "
                     f"{size}", ShapeError)
    return c.add("gather", [x], attrs={"axis": axis, "indices": tuple(indices),
                                       "keepdim": arr.ndim == 1})


def pad(c, a, at):
    x = a[0]
    mode = at.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode != "constant":
        raise c.fail(f"Pad with mode={mode!r} is not supported (only 'constant')")
    rank = len(c.full_shape(x))
    if c.opset < 11:
        pads, value, axes = list(at["pads"]), at.get("value", 0.0), None
    else:
        pads = ints(c, a[1], "the Pad pads")
        value = 0.0 if _input(a, 2) is None else c.const(a[2], "the Pad value")
        axes = None if _input(a, 3) is None else ints(c, a[3], "the Pad axes")
    axes = list(range(rank)) if axes is None else [full_axis(c, ax, rank) for ax in axes]
    if len(pads) != 2 * len(axes):
        raise c.fail(f"Pad pads {pads} must hold a begin and an end for each of {len(axes)} "
                     f"axes", ShapeError)
    value = np.asarray(value)
    if value.size != 1:
        raise c.fail(f"the Pad value must be a scalar, got shape {value.shape}", ShapeError)
    per_axis = {ax: (pads[i], pads[i + len(axes)]) for i, ax in enumerate(axes)}
    if any(min(p) < 0 for p in per_axis.values()):
        raise c.fail(f"Pad with negative pads {pads} (cropping) is not supported")
    offset = 1 if c.batched else 0
    if offset and per_axis.get(0, (0, 0)) != (0, 0):
        raise c.fail(f"Pad along the batch axis ({per_axis[0]}) is not supported")
    pairs = tuple(per_axis.get(ax, (0, 0)) for ax in range(offset, rank))
    if not any(b or e for b, e in pairs):
        return x
    return c.add("pad", [x], attrs={"pads": pairs, "value": float(value.reshape(()))})


# --- Squeeze, Unsqueeze (reshapes that drop or add axes of size 1) ----------------------------

def _axes_of(c, a, at, required: bool) -> list[int] | None:
    given = a[1] if len(a) > 1 and a[1] is not None else at.get("axes")
    if given is None and required:
        raise c.fail("Unsqueeze needs axes", ShapeError)
    return None if given is None else ints(c, given, f"the {c.node.op_type} axes")


def squeeze(c, a, at):
    x = a[0]
    shape = c.full_shape(x)
    axes = _axes_of(c, a, at, False)
    if axes is None:
        axes = [i for i, s in enumerate(shape) if s == 1 and not (c.batched and i == 0)]
    axes = {full_axis(c, ax, len(shape)) for ax in axes}
    if c.batched and 0 in axes:
        raise c.fail("Squeeze of the batch axis is not supported")
    if any(shape[ax] != 1 for ax in axes):
        raise c.fail(f"Squeeze of axes {sorted(axes)} of shape {list(shape)}: an axis is not "
                     f"of size 1", ShapeError)
    out = tuple(s for i, s in enumerate(shape) if i not in axes)[1 if c.batched else 0:]
    if not out:
        raise c.fail("Squeeze to a scalar per sample is not supported")
    return x if out == x.shape else c.add("reshape", [x], attrs={"shape": out})


def unsqueeze(c, a, at):
    x = a[0]
    rank = len(c.full_shape(x))
    given = _axes_of(c, a, at, True)
    axes = sorted(full_axis(c, ax, rank + len(given)) for ax in given)
    if c.batched and 0 in axes:
        raise c.fail("Unsqueeze before the batch axis is not supported")
    shape = list(c.full_shape(x))
    for ax in axes:
        shape.insert(ax, 1)
    return c.add("reshape", [x], attrs={"shape": tuple(shape[1 if c.batched else 0:])})
