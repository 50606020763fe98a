"""The operator set of the IR: arity, parameters, attributes and shape inference per op.

Shapes in the IR are *per-sample*: they leave out the leading batch dimension that every
tensor carries, so one graph serves every batch size. An op's facts live here as data (one
:class:`OpDef` per op); the mathematics of each bound method lives in ``boundflow.domains``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from boundflow.errors import ShapeError, UnsupportedOpError

Shape = tuple[int, ...]
InferFn = Callable[[Mapping, Sequence[Shape], Mapping[str, Shape]], Shape]


@dataclass(frozen=True)
class OpDef:
    """What the IR knows about one operator.

    ``arity`` is (min, max) node inputs (max ``None`` = any number); ``params`` and
    ``optional_params`` are the roles of constant arrays the op reads from ``Graph.params``;
    ``infer`` maps (attrs, input shapes, param shapes) to the output shape or raises
    :class:`ShapeError`; ``linear`` says the op is affine in its node inputs (so interval rules
    may use centre/radius form).
    """

    name: str
    arity: tuple[int, int | None]
    infer: InferFn
    params: tuple[str, ...] = ()
    optional_params: tuple[str, ...] = ()
    linear: bool = False


_REGISTRY: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    _REGISTRY[op.name] = op
    return op


def get(name: str) -> OpDef:
    """The definition of op ``name``; an unknown name raises, listing the ops there are."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedOpError(
            f"IR op {name!r} does not exist; the ops are: {', '.join(sorted(_REGISTRY))}"
        ) from None


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


# ---------------------------------------------------------------------------------------------
# shape inference, one function per op


def _same(attrs, ins, ps) -> Shape:
    return ins[0]


def _elementwise(attrs, ins, ps) -> Shape:
    """Two node inputs of one shape, or one node input and a constant broadcast onto it."""
    shape = ins[0]
    if len(ins) == 2:
        if "other" in ps:
            raise ShapeError("takes a second node or an 'other' constant, not both")
        if ins[1] != shape:
            raise ShapeError(f"operands have shapes {shape} and {ins[1]}; they must be equal")
        return shape
    if "other" not in ps:
        raise ShapeError("needs a second operand: another node or an 'other' constant")
    if not _broadcasts_onto(ps["other"], shape):
        raise ShapeError(f"constant of shape {ps['other']} does not broadcast onto {shape}")
    return shape


def _broadcasts_onto(small: Shape, big: Shape) -> bool:
    if len(small) > len(big):
        return False
    return all(s in (1, b) for s, b in zip(reversed(small), reversed(big)))


def _linear(attrs, ins, ps) -> Shape:
    (x,) = ins
    w = ps["weight"]
    if len(w) != 2:
        raise ShapeError(f"weight must be 2-D (out, in), got shape {w}")
    if not x or x[-1] != w[1]:
        raise ShapeError(f"input of shape {x} does not end in the weight's in-features {w[1]}")
    if "bias" in ps and ps["bias"] != (w[0],):
        raise ShapeError(f"bias of shape {ps['bias']} does not match {w[0]} out-features")
    return x[:-1] + (w[0],)


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _pair(attrs, key: str) -> tuple[int, int]:
    v = attrs[key]
    if len(v) != 2 or any(int(i) != i for i in v):
        raise ShapeError(f"attribute {key}={v!r} must be a pair of integers")
    return int(v[0]), int(v[1])


def _conv2d(attrs, ins, ps) -> Shape:
    (x,) = ins
    w = ps["weight"]
    groups = int(attrs["groups"])
    stride, padding, dilation = (_pair(attrs, k) for k in ("stride", "padding", "dilation"))
    if len(x) != 3:
        raise ShapeError(f"input must be (C, H, W) per sample, got {x}")
    if len(w) != 4:
        raise ShapeError(f"weight must be (out, in/groups, kh, kw), got {w}")
    if groups < 1 or x[0] % groups or w[0] % groups or x[0] // groups != w[1]:
        raise ShapeError(f"{x[0]} input channels, weight {w} and groups={groups} do not fit")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ShapeError(f"stride {stride}, padding {padding}, dilation {dilation} are invalid")
    if "bias" in ps and ps["bias"] != (w[0],):
        raise ShapeError(f"bias of shape {ps['bias']} does not match {w[0]} output channels")
    h, wd = (_conv_out(x[i + 1], w[i + 2], stride[i], padding[i], dilation[i]) for i in (0, 1))
    if h < 1 or wd < 1:
        raise ShapeError(f"kernel {w[2:]} does not fit the padded input {x[1:]}")
    return (w[0], h, wd)


def _batchnorm(attrs, ins, ps) -> Shape:
    (x,) = ins
    for role in ("mean", "var", "weight", "bias"):
        if ps[role] != (x[0],):
            raise ShapeError(f"{role} of shape {ps[role]} does not match {x[0]} channels")
    if float(attrs["eps"]) < 0:
        raise ShapeError(f"eps={attrs['eps']} must be >= 0")
    return x


def _flatten(attrs, ins, ps) -> Shape:
    (x,) = ins
    start, end = int(attrs["start_dim"]), int(attrs["end_dim"])
    start, end = start % max(len(x), 1), end % max(len(x), 1)
    if not x:
        return (1,)
    if start > end:
        raise ShapeError(f"start_dim {start} is after end_dim {end} for shape {x}")
    return x[:start] + (math.prod(x[start : end + 1]),) + x[end + 1 :]


def _reshape(attrs, ins, ps) -> Shape:
    (x,) = ins
    shape = tuple(int(s) for s in attrs["shape"])
    if shape.count(-1) > 1 or any(s < -1 or s == 0 for s in shape):
        raise ShapeError(f"target shape {shape} is invalid")
    known = math.prod(s for s in shape if s != -1)
    total = math.prod(x)
    if -1 in shape:
        if total % known:
            raise ShapeError(f"cannot reshape {x} ({total} elements) to {shape}")
        shape = tuple(total // known if s == -1 else s for s in shape)
    if math.prod(shape) != total:
        raise ShapeError(f"cannot reshape {x} ({total} elements) to {shape}")
    return shape


def _permute(attrs, ins, ps) -> Shape:
    (x,) = ins
    dims = tuple(int(d) for d in attrs["dims"])
    if sorted(dims) != list(range(len(x))):
        raise ShapeError(f"dims {dims} are not a permutation of the {len(x)} per-sample axes")
    return tuple(x[d] for d in dims)


def _avgpool2d(attrs, ins, ps) -> Shape:
    (x,) = ins
    k, s, p = (_pair(attrs, key) for key in ("kernel_size", "stride", "padding"))
    if len(x) != 3:
        raise ShapeError(f"input must be (C, H, W) per sample, got {x}")
    if min(k) < 1 or min(s) < 1 or min(p) < 0 or p[0] * 2 > k[0] or p[1] * 2 > k[1]:
        raise ShapeError(f"kernel {k}, stride {s}, padding {p} are invalid")
    h, w = (_conv_out(x[i + 1], k[i], s[i], p[i], 1) for i in (0, 1))
    if h < 1 or w < 1:
        raise ShapeError(f"kernel {k} does not fit the padded input {x[1:]}")
    return (x[0], h, w)


def _concat(attrs, ins, ps) -> Shape:
    axis = int(attrs["axis"])
    first = ins[0]
    if not -len(first) <= axis < len(first):
        raise ShapeError(f"axis {axis} is out of range for shape {first}")
    axis %= len(first)
    for other in ins[1:]:
        if len(other) != len(first) or any(
            a != b for i, (a, b) in enumerate(zip(first, other)) if i != axis
        ):
            raise ShapeError(f"shapes {first} and {other} differ outside axis {axis}")
    return first[:axis] + (sum(s[axis] for s in ins),) + first[axis + 1 :]


def _input(attrs, ins, ps) -> Shape:
    return tuple(int(s) for s in attrs["shape"])


register(OpDef("input", (0, 0), _input))
register(OpDef("linear", (1, 1), _linear, ("weight",), ("bias",), linear=True))
register(OpDef("conv2d", (1, 1), _conv2d, ("weight",), ("bias",), linear=True))
register(OpDef("relu", (1, 1), _same))
# add/sub: two nodes of one shape, or a node and an 'other' constant; mul/div by a constant only.
register(OpDef("add", (1, 2), _elementwise, (), ("other",), linear=True))
register(OpDef("sub", (1, 2), _elementwise, (), ("other",), linear=True))
register(OpDef("mul", (1, 1), _elementwise, ("other",), linear=True))
register(OpDef("div", (1, 1), _elementwise, ("other",), linear=True))
register(OpDef("batchnorm", (1, 1), _batchnorm, ("mean", "var", "weight", "bias"), linear=True))
register(OpDef("flatten", (1, 1), _flatten, linear=True))
register(OpDef("reshape", (1, 1), _reshape, linear=True))
register(OpDef("permute", (1, 1), _permute, linear=True))
register(OpDef("avgpool2d", (1, 1), _avgpool2d, linear=True))
register(OpDef("identity", (1, 1), _same, linear=True))
register(OpDef("concat", (1, None), _concat, linear=True))
