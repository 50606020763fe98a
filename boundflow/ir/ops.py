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
    :class:`ShapeError`. The traits are what passes ask about an op, so that no pass keeps its
    own list of op names:

    - ``linear``: affine in its node inputs (interval rules may use centre/radius form; CROWN
      passes coefficients through it exactly);
    - ``elementwise``: output element ``i`` reads only element ``i`` of each input (up to a
      per-channel constant), so it keeps any layout and shape;
    - ``view``: moves or reinterprets data without arithmetic (flatten, reshape, permute);
    - ``weighted``: an affine reduction with a weight tensor (its interval may be kept as
      centre/radius; the cost model counts its flops);
    - ``mixing``: affine, and one output element sums several input elements (so a second
      mixing op after it makes IBP inexact);
    - ``spatial``: reads (C, H, W) per sample with a window over H and W (a layout choice);
    - ``row_major``: reads its input's elements in row-major order (a layout change before it
      is a real transpose);
    - ``activation``: an elementwise nonlinearity bounded through the activation relaxation
      registry (``boundflow.domains.activations``);
    - ``relaxed``: nonlinear, and its CROWN rule reads its input's interval (every
      activation, and maxpool2d, softmax): the planner bounds the input of each.
    """

    name: str
    arity: tuple[int, int | None]
    infer: InferFn
    params: tuple[str, ...] = ()
    optional_params: tuple[str, ...] = ()
    linear: bool = False
    elementwise: bool = False
    view: bool = False
    weighted: bool = False
    mixing: bool = False
    spatial: bool = False
    row_major: bool = False
    activation: bool = False
    relaxed: bool = False

    def __post_init__(self):
        if self.activation and not (self.elementwise and self.relaxed):
            raise ValueError(f"activation op {self.name!r} must be elementwise and relaxed")
        if self.weighted and not self.mixing:
            raise ValueError(f"weighted op {self.name!r} must be mixing")


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


def having(trait: str) -> frozenset[str]:
    """The names of the ops with ``trait`` set (e.g. ``having("activation")``)."""
    if trait not in _TRAITS:
        raise ValueError(f"{trait!r} is not an op trait; the traits are {_TRAITS}")
    return frozenset(n for n, op in _REGISTRY.items() if getattr(op, trait))


def has(op_name: str, trait: str) -> bool:
    """Whether op ``op_name`` has ``trait``; an unknown op raises."""
    return bool(getattr(get(op_name), trait))


_TRAITS = ("linear", "elementwise", "view", "weighted", "mixing", "spatial", "row_major",
           "activation", "relaxed")


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


def _window(attrs, ins, ps) -> Shape:
    """Output shape of a (C, H, W) window op (avg or max pooling), no dilation."""
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


def _axis(attrs, x: Shape, key: str = "axis") -> int:
    axis = attrs[key]
    if isinstance(axis, bool) or int(axis) != axis or not 0 <= int(axis) < len(x):
        raise ShapeError(f"{key}={axis!r} is not a per-sample axis of shape {x} "
                         f"(0..{len(x) - 1}; the batch axis is not one)")
    return int(axis)


def _pad(attrs, ins, ps) -> Shape:
    """``pads``: one (before, after) pair of non-negative ints per per-sample axis; ``value``:
    the constant written into the border."""
    (x,) = ins
    pads = attrs["pads"]
    if len(pads) != len(x) or any(len(p) != 2 or min(p) < 0 or any(int(v) != v for v in p)
                                  for p in pads):
        raise ShapeError(f"pads {pads!r} must be one (before, after) pair of non-negative "
                         f"integers per axis of {x}")
    if not math.isfinite(float(attrs["value"])):
        raise ShapeError(f"pad value {attrs['value']!r} must be finite")
    return tuple(d + int(b) + int(a) for d, (b, a) in zip(x, pads))


def _slice(attrs, ins, ps) -> Shape:
    """Elements ``start:end:step`` of per-sample ``axis`` (0 <= start < end <= size)."""
    (x,) = ins
    axis = _axis(attrs, x)
    start, end, step = (attrs[k] for k in ("start", "end", "step"))
    if any(isinstance(v, bool) or int(v) != v for v in (start, end, step)) or step < 1 \
            or not 0 <= start < end <= x[axis]:
        raise ShapeError(f"slice {start}:{end}:{step} does not fit axis {axis} of size "
                         f"{x[axis]}")
    return x[:axis] + (len(range(start, end, step)),) + x[axis + 1:]


def _gather(attrs, ins, ps) -> Shape:
    """Elements ``indices`` (constants) of per-sample ``axis``; with ``keepdim`` False one
    index and the axis dropped (ONNX Gather with a scalar index)."""
    (x,) = ins
    axis = _axis(attrs, x)
    idx = tuple(attrs["indices"])
    if not idx or any(isinstance(i, bool) or int(i) != i or not 0 <= i < x[axis] for i in idx):
        raise ShapeError(f"indices {idx} are not in range for axis {axis} of size {x[axis]}")
    if not attrs["keepdim"]:
        if len(idx) != 1:
            raise ShapeError(f"dropping axis {axis} needs exactly one index, got {idx}")
        return x[:axis] + x[axis + 1:]
    return x[:axis] + (len(idx),) + x[axis + 1:]


def _softmax(attrs, ins, ps) -> Shape:
    (x,) = ins
    _axis(attrs, x)
    return x


def _leaky_relu(attrs, ins, ps) -> Shape:
    a = float(attrs["negative_slope"])
    if not 0.0 <= a <= 1.0:
        raise ShapeError(f"negative_slope {a} must be in [0, 1]")
    return ins[0]


def _elu(attrs, ins, ps) -> Shape:
    a = float(attrs["alpha"])
    if not 0.0 < a <= 1.0:
        raise ShapeError(f"alpha {a} must be in (0, 1] (where ELU is convex)")
    return ins[0]


def _hardtanh(attrs, ins, ps) -> Shape:
    lo, hi = float(attrs["min_val"]), float(attrs["max_val"])
    if math.isnan(lo) or math.isnan(hi) or not lo < hi:
        raise ShapeError(f"clip range [{lo}, {hi}] must have min < max")
    return ins[0]


def _conv_transpose2d(attrs, ins, ps) -> Shape:
    (x,) = ins
    w = ps["weight"]
    groups = int(attrs["groups"])
    stride, padding, dilation, out_pad = (_pair(attrs, k) for k in (
        "stride", "padding", "dilation", "output_padding"))
    if len(x) != 3:
        raise ShapeError(f"input must be (C, H, W) per sample, got {x}")
    if len(w) != 4:
        raise ShapeError(f"weight must be (in, out/groups, kh, kw), got {w}")
    if groups < 1 or x[0] != w[0] or w[0] % groups:
        raise ShapeError(f"{x[0]} input channels, weight {w} and groups={groups} do not fit")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0 or min(out_pad) < 0 or any(
            out_pad[i] >= max(stride[i], dilation[i]) for i in (0, 1)):
        raise ShapeError(f"stride {stride}, padding {padding}, dilation {dilation}, "
                         f"output_padding {out_pad} are invalid")
    c_out = w[1] * groups
    if "bias" in ps and ps["bias"] != (c_out,):
        raise ShapeError(f"bias of shape {ps['bias']} does not match {c_out} output channels")
    h, wd = ((x[i + 1] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (w[i + 2] - 1)
             + out_pad[i] + 1 for i in (0, 1))
    if h < 1 or wd < 1:
        raise ShapeError(f"output of shape {(c_out, h, wd)} is empty")
    return (c_out, h, wd)


register(OpDef("input", (0, 0), _input))
register(OpDef("linear", (1, 1), _linear, ("weight",), ("bias",), linear=True, weighted=True,
               mixing=True, row_major=True))
register(OpDef("conv2d", (1, 1), _conv2d, ("weight",), ("bias",), linear=True, weighted=True,
               mixing=True, spatial=True))
register(OpDef("conv_transpose2d", (1, 1), _conv_transpose2d, ("weight",), ("bias",),
               linear=True, weighted=True, mixing=True))
register(OpDef("relu", (1, 1), _same, elementwise=True, activation=True, relaxed=True))
register(OpDef("leaky_relu", (1, 1), _leaky_relu, elementwise=True, activation=True,
               relaxed=True))
register(OpDef("hardtanh", (1, 1), _hardtanh, elementwise=True, activation=True, relaxed=True))
register(OpDef("sigmoid", (1, 1), _same, elementwise=True, activation=True, relaxed=True))
register(OpDef("tanh", (1, 1), _same, elementwise=True, activation=True, relaxed=True))
register(OpDef("elu", (1, 1), _elu, elementwise=True, activation=True, relaxed=True))
# add/sub: two nodes of one shape, or a node and an 'other' constant; mul/div by a constant only.
register(OpDef("add", (1, 2), _elementwise, (), ("other",), linear=True, elementwise=True))
register(OpDef("sub", (1, 2), _elementwise, (), ("other",), linear=True, elementwise=True))
register(OpDef("mul", (1, 1), _elementwise, ("other",), linear=True, elementwise=True))
register(OpDef("div", (1, 1), _elementwise, ("other",), linear=True, elementwise=True))
register(OpDef("batchnorm", (1, 1), _batchnorm, ("mean", "var", "weight", "bias"), linear=True,
               elementwise=True))
register(OpDef("flatten", (1, 1), _flatten, linear=True, view=True, row_major=True))
register(OpDef("reshape", (1, 1), _reshape, linear=True, view=True, row_major=True))
register(OpDef("permute", (1, 1), _permute, linear=True, view=True))
register(OpDef("avgpool2d", (1, 1), _window, linear=True, mixing=True, spatial=True))
register(OpDef("maxpool2d", (1, 1), _window, relaxed=True))
register(OpDef("pad", (1, 1), _pad, linear=True))
register(OpDef("slice", (1, 1), _slice, linear=True))
register(OpDef("gather", (1, 1), _gather, linear=True))
register(OpDef("softmax", (1, 1), _softmax, relaxed=True))
register(OpDef("identity", (1, 1), _same, linear=True, elementwise=True, view=True))
register(OpDef("concat", (1, None), _concat, linear=True))
