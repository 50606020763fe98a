"""ONNX frontend: an ONNX model of one input and one output into an IR graph.

Operators: Gemm, MatMul, Add, Sub, Mul, Div, Conv, ConvTranspose, Relu, LeakyRelu, Elu, Sigmoid,
Tanh, Clip, Softmax, Flatten, Reshape, Transpose, BatchNormalization, Constant, Identity,
AveragePool, MaxPool, GlobalAveragePool, ReduceMean (over H and W), Concat, Slice, Split,
Gather, Pad, Squeeze, Unsqueeze (plus Dropout / Cast-free no-ops that verification models
carry); the new ones are in ``onnx_layers.py`` and ``onnx_index.py``. A model input of rank
>= 2 has its batch first; a rank-1 input (common in tiny VNN-COMP models) is one unbatched
sample. Constant subgraphs are folded with numpy (the shape arithmetic exporters write for
``F.pad`` and ``chunk`` among them). Anything else raises :class:`UnsupportedOpError` naming op
and node, and so does a supported op in a form BoundFlow does not take (along the batch axis,
MaxPool with dilations, Pad in reflect mode, Slice with a negative step, ...).

Malformed models raise a :class:`BoundFlowError` naming the node: an input no initializer,
graph input or earlier node defines, a wrong number of inputs, a missing required attribute,
a Reshape target that does not fit, an opset of the default domain newer than the installed
``onnx`` package knows, an op of another domain. Files may be gzip-compressed (``.onnx.gz``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from boundflow.errors import (BoundFlowError, GraphError, ModelLoadError, ShapeError,
                              UnsupportedOpError)
from boundflow.frontend import onnx_index as index
from boundflow.frontend import onnx_layers as layers
from boundflow.frontend.files import read_bytes
from boundflow.ir.graph import Graph, GraphBuilder
from boundflow.ir.normalize import normalize


@dataclass(frozen=True)
class Var:
    name: str
    shape: tuple[int, ...]  # per sample


class _Converter:
    def __init__(self, model):
        self.model = model
        self.env: dict[str, Any] = {}
        self.builder: GraphBuilder | None = None
        self.batched = True
        self.node = None
        self.opset = max([imp.version for imp in model.opset_import
                          if imp.domain in ("", "ai.onnx")] or [1])
        self._used: set[str] | None = None

    # helpers ---------------------------------------------------------------------------
    def where(self) -> str:
        return f"node {self.node.name or '<unnamed>'!r} ({self.node.op_type})"

    def fail(self, what: str, error=UnsupportedOpError) -> BoundFlowError:
        return error(f"{what} at {self.where()}")

    def add(self, op: str, inputs: list[Var], **kw) -> Var:
        name = self.builder.add_node(op, [v.name for v in inputs], source=self.where(),
                                     name=self.node.name or self.node.output[0], **kw)
        return Var(name, self.builder.shape(name))

    def const(self, value: Any, what: str) -> np.ndarray:
        if isinstance(value, Var):
            raise self.fail(f"{what} must be a constant, not a value computed from the input")
        return np.asarray(value, dtype=self.builder.dtype)

    def array(self, value: Any, what: str) -> np.ndarray:
        """A constant as it is (index arguments keep their integer type)."""
        if isinstance(value, Var):
            raise self.fail(f"{what} must be a constant, not a value computed from the input")
        return np.asarray(value)

    def full_shape(self, var: Var) -> tuple[int, ...]:
        """The shape ONNX sees: the per-sample shape behind a batch of 1 when batched."""
        return ((1,) if self.batched else ()) + var.shape

    def used_names(self) -> set[str]:
        """The values some node or the graph output reads."""
        if self._used is None:
            graph = self.model.graph
            self._used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        return self._used

    def operand(self, value: Any, like: Var) -> np.ndarray:
        """A constant broadcast onto one sample of ``like`` (a leading batch axis of 1 dropped)."""
        arr = self.const(value, "the constant operand")
        rank = len(like.shape) + (1 if self.batched else 0)
        if arr.ndim == rank and self.batched:
            if arr.shape[0] != 1:
                raise self.fail(f"constant of shape {arr.shape} varies along the batch", ShapeError)
            arr = arr[0]
        return arr

    def axis(self, axis: int, var: Var) -> int:
        full = len(var.shape) + (1 if self.batched else 0)
        if not -full <= axis < full:
            raise self.fail(f"axis {axis} is out of range for a tensor of rank {full}",
                            ShapeError)
        axis = axis % full
        if not self.batched:
            return axis
        if axis == 0:
            raise self.fail(f"{self.node.op_type} along the batch axis is not supported")
        return axis - 1

    # walk ------------------------------------------------------------------------------
    def run(self) -> Graph:
        import onnx.numpy_helper as nh

        check_opsets(self.model)
        graph = self.model.graph
        for init in graph.initializer:
            try:
                self.env[init.name] = nh.to_array(init)
            except Exception as e:      # onnx raises several kinds on a malformed tensor
                raise GraphError(f"initializer {init.name!r} cannot be read: "
                                 f"{_first_line(e)}") from None
        inputs = [i for i in graph.input if i.name not in self.env]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise UnsupportedOpError(f"the model has {len(inputs)} inputs and "
                                     f"{len(graph.output)} outputs; BoundFlow needs one of each")
        self._input(inputs[0])
        for node in graph.node:
            self.node = node
            self._call(node)
        name = graph.output[0].name
        if name not in self.env:
            raise GraphError(f"the model output {name!r} is not produced by any node")
        out = self.env[name]
        if not isinstance(out, Var):
            raise UnsupportedOpError("the model output does not depend on its input")
        return normalize(self.builder.build(out.name))

    def _input(self, value_info) -> None:
        import onnx

        t = value_info.type.tensor_type
        dtype = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.DOUBLE: "float64"}.get(
            t.elem_type)
        if dtype is None:
            raise UnsupportedOpError(f"model input {value_info.name!r} has element type "
                                     f"{t.elem_type}; BoundFlow needs float or double")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if not dims:
            raise UnsupportedOpError(f"model input {value_info.name!r} is a scalar")
        self.batched = len(dims) >= 2
        sample = dims[1:] if self.batched else dims
        if any(d is None or d < 1 for d in sample):
            raise UnsupportedOpError(f"model input {value_info.name!r} has dynamic dimensions "
                                     f"{dims} beyond the batch")
        self.builder = GraphBuilder(dtype)
        name = self.builder.input(tuple(sample), name=value_info.name)
        self.env[value_info.name] = Var(name, tuple(sample))

    def _call(self, node) -> None:
        """Convert (or fold) one node into ``env``; malformed nodes raise a
        :class:`BoundFlowError` naming the node."""
        self._check_node(node)
        args = [self.env[i] if i else None for i in node.input]
        try:
            attrs = _Attrs(self.where(), node.attribute)
            if node.op_type != "Constant" and not any(isinstance(a, Var) for a in args):
                fn = FOLD.get(node.op_type)
                if fn is None:
                    raise self.fail(f"unsupported op {node.op_type!r} (on constants)")
            else:
                fn = CONVERTERS.get(node.op_type)
                if fn is None:
                    raise self.fail(f"unsupported op {node.op_type!r}")
            outs = fn(self, args, attrs)
        except (ValueError, IndexError, KeyError, TypeError, ArithmeticError) as e:
            # numpy and onnx on malformed constants: bad broadcasts, axes, indices
            raise self.fail(f"cannot convert: {_first_line(e)}", GraphError) from None
        outs = outs if isinstance(outs, tuple) else (outs,)
        for name, value in zip(node.output, outs):
            self.env[name] = value

    def _check_node(self, node) -> None:
        """The node's domain, arity, inputs defined and outputs not yet defined."""
        if node.domain not in ("", "ai.onnx"):
            opsets = {imp.domain: imp.version for imp in self.model.opset_import}
            version = opsets.get(node.domain, "not imported")
            raise self.fail(f"op {node.op_type!r} of domain {node.domain!r} (opset {version}) "
                            f"is not supported; BoundFlow converts ops of the default ONNX "
                            f"domain only")
        lo, hi = _ARITY.get(node.op_type, (0, None))
        n = len(node.input)
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else f"{lo} to {hi}" if hi is not None else f">= {lo}"
            raise self.fail(f"{node.op_type} takes {want} inputs, got {n}", GraphError)
        if not all(node.input[:lo]):
            raise self.fail(f"a required input of {node.op_type} is empty: "
                            f"{list(node.input)}", GraphError)
        missing = [i for i in node.input if i and i not in self.env]
        if missing:
            raise self.fail(f"input {missing[0]!r} is not defined by an initializer, the "
                            f"graph input or an earlier node (are the nodes in topological "
                            f"order?)", GraphError)
        if not node.output:
            raise self.fail("the node has no outputs", GraphError)
        defined = [o for o in node.output if o and o in self.env]
        if defined:
            raise self.fail(f"output {defined[0]!r} is already defined (ONNX names each "
                            f"value once)", GraphError)


class _Attrs(dict):
    """A node's attributes by name; reading a missing one with ``[]`` (a required
    attribute) raises :class:`GraphError` naming the node, ``get`` gives a default."""

    def __init__(self, where: str, attributes) -> None:
        import onnx.helper

        super().__init__((a.name, onnx.helper.get_attribute_value(a)) for a in attributes)
        self.where = where

    def __missing__(self, key: str):
        raise GraphError(f"the required attribute {key!r} is missing at {self.where}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# inputs per op (lowest, highest; None: any number); the first ``lowest`` are required
_ARITY: dict[str, tuple[int, int | None]] = {
    "Gemm": (2, 3), "MatMul": (2, 2), "Add": (2, 2), "Sub": (2, 2), "Mul": (2, 2),
    "Div": (2, 2), "Conv": (2, 3), "Relu": (1, 1), "Flatten": (1, 1), "Reshape": (2, 2),
    "Transpose": (1, 1), "BatchNormalization": (5, 5), "Constant": (0, 0), "Identity": (1, 1),
    "Dropout": (1, 3), "AveragePool": (1, 1), "Concat": (1, None), "Shape": (1, 1),
    "Gather": (2, 2), "Unsqueeze": (1, 2), "Squeeze": (1, 2), "Cast": (1, 1),
    "MaxPool": (1, 1), "GlobalAveragePool": (1, 1), "ReduceMean": (1, 2),
    "ConvTranspose": (2, 3), "Sigmoid": (1, 1), "Tanh": (1, 1), "LeakyRelu": (1, 1), "Elu": (1, 1),
    "Clip": (1, 3), "Softmax": (1, 1), "Slice": (1, 5), "Split": (1, 2), "Pad": (1, 4),
    "ConstantOfShape": (1, 1),
}


# --- converters: (converter, inputs, attributes) -> Var ---------------------------------

def _gemm(c: _Converter, a, at) -> Var:
    x, w = a[0], a[1]
    if at.get("transA", 0):
        raise c.fail("Gemm with transA=1 is not supported")
    w = c.const(w, "the Gemm weight") * at.get("alpha", 1.0)
    if w.ndim != 2:
        raise c.fail(f"the Gemm weight has shape {w.shape}; it must be a matrix", ShapeError)
    weight = w if at.get("transB", 0) else w.T
    params = {"weight": weight}
    if len(a) > 2 and a[2] is not None:
        bias = c.const(a[2], "the Gemm bias") * at.get("beta", 1.0)
        if bias.size not in (1, weight.shape[0]) or bias.ndim > 2:
            raise c.fail(f"the Gemm bias of shape {bias.shape} does not broadcast onto "
                         f"{weight.shape[0]} outputs", ShapeError)
        params["bias"] = np.broadcast_to(bias.reshape(-1), (weight.shape[0],))
    return c.add("linear", [x], params=params)


def _matmul(c: _Converter, a, at) -> Var:
    x, w = a
    if not isinstance(x, Var):     # W @ x: a matrix times an unbatched vector
        if c.batched or not isinstance(w, Var) or len(w.shape) != 1:
            raise c.fail("MatMul with the input-dependent operand on the right is only "
                         "supported for an unbatched vector")
        m = c.const(x, "the MatMul weight")
        return c.add("linear", [w], params={"weight": m})
    w = c.const(w, "the MatMul weight")
    if w.ndim != 2:
        raise c.fail(f"MatMul by a constant of rank {w.ndim} (only matrices) is not supported")
    return c.add("linear", [x], params={"weight": w.T})


def _binary(op: str) -> Callable:
    def convert(c: _Converter, a, at) -> Var:
        x, y = a
        if isinstance(x, Var) and isinstance(y, Var):
            if op in ("mul", "div"):
                raise c.fail(f"'{op}' of two input-dependent tensors is not supported")
            return c.add(op, [x, y])
        if isinstance(x, Var):
            return c.add(op, [x], params={"other": c.operand(y, x)})
        if op == "div":
            raise c.fail("division by an input-dependent value is not supported")
        if op == "sub":
            neg = c.add("mul", [y], params={"other": np.asarray(-1.0, c.builder.dtype)})
            return c.add("add", [neg], params={"other": c.operand(x, y)})
        return c.add(op, [y], params={"other": c.operand(x, y)})
    return convert


def _conv(c: _Converter, a, at) -> Var:
    x = a[0]
    w = c.const(a[1], "the Conv weight")
    if w.ndim != 4:
        raise c.fail(f"Conv with a {w.ndim - 2}-D kernel is not supported")
    params = {"weight": w}
    if len(a) > 2 and a[2] is not None:
        params["bias"] = c.const(a[2], "the Conv bias")
    attrs = {"stride": tuple(at.get("strides", [1, 1])),
             "padding": layers.symmetric_pads(c, at),
             "dilation": tuple(at.get("dilations", [1, 1])), "groups": int(at.get("group", 1))}
    return c.add("conv2d", [x], params=params, attrs=attrs)


def _flatten(c: _Converter, a, at) -> Var:
    x = a[0]
    axis = at.get("axis", 1)
    if not c.batched or axis != 1:
        raise c.fail(f"Flatten with axis={axis} on a {'batched' if c.batched else 'unbatched'} "
                     f"input is not supported (axis=1 on a batched input is)")
    return c.add("flatten", [x], attrs={"start_dim": 0, "end_dim": -1})


def _reshape_target(c: _Converter, value: Any, full: list[int], allowzero: bool
                    ) -> list[int]:
    """The target shape of a Reshape of a tensor of shape ``full``, its zeros replaced by
    the dimension they copy (unless ``allowzero``), a -1 kept. The target must be a 1-D
    constant of whole numbers (folded shape arithmetic may leave them as floats) with at most
    one -1 and no other negative entry that fits the elements of ``full``; anything else
    raises :class:`ShapeError` naming the node."""
    if isinstance(value, Var):
        raise c.fail("the Reshape shape must be a constant, not a value computed from the "
                     "input")
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.dtype.kind not in "iuf" or not np.all(np.mod(arr, 1) == 0):
        raise c.fail(f"the Reshape shape must be a 1-D tensor of whole numbers, got "
                     f"{arr.tolist() if arr.size <= 8 else arr.dtype} of shape {arr.shape}",
                     ShapeError)
    shape = [int(s) for s in arr]
    if any(s < -1 for s in shape) or shape.count(-1) > 1 or (allowzero and 0 in shape
                                                              and -1 in shape):
        raise c.fail(f"Reshape to {shape} is invalid: give at most one -1 and no other "
                     f"negative size", ShapeError)
    if not allowzero:
        if any(s == 0 and i >= len(full) for i, s in enumerate(shape)):
            raise c.fail(f"Reshape to {shape} copies (0) a dimension that the input of "
                         f"shape {full} does not have", ShapeError)
        shape = [full[i] if s == 0 else s for i, s in enumerate(shape)]
    total, known = int(np.prod(full)), int(np.prod([s for s in shape if s != -1]))
    fits = (known > 0 and total % known == 0) if -1 in shape else known == total
    if not fits:
        raise c.fail(f"Reshape to {shape} does not fit the {total} elements of shape "
                     f"{full}", ShapeError)
    return shape


def _reshape(c: _Converter, a, at) -> Var:
    x = a[0]
    if at.get("allowzero", 0):
        raise c.fail("Reshape with allowzero=1 is not supported")
    full = ([1] if c.batched else []) + list(x.shape)
    shape = _reshape_target(c, a[1], full, False)
    if not c.batched:
        return c.add("reshape", [x], attrs={"shape": tuple(shape)})
    rest = int(np.prod([s for s in shape[1:] if s != -1]))
    batch = shape[0] if shape and shape[0] != -1 else int(np.prod(x.shape)) // rest
    if not shape or batch != 1:
        raise c.fail(f"Reshape to {shape} does not keep the batch axis first")
    return c.add("reshape", [x], attrs={"shape": tuple(shape[1:])})


def _transpose(c: _Converter, a, at) -> Var:
    x = a[0]
    n = len(x.shape) + (1 if c.batched else 0)
    perm = [int(p) for p in at.get("perm", list(range(n))[::-1])]
    if sorted(perm) != list(range(n)):
        raise c.fail(f"Transpose perm={perm} is not a permutation of the {n} axes",
                     ShapeError)
    if c.batched:
        if perm[0] != 0:
            raise c.fail(f"Transpose perm={perm} moves the batch axis")
        perm = [p - 1 for p in perm[1:]]
    return c.add("permute", [x], attrs={"dims": tuple(perm)})


def _inference(c: _Converter, a, at, op: str) -> None:
    """Refuse ``op`` in training mode: BatchNormalization's ``training_mode`` attribute
    (batch statistics), Dropout's ``training_mode`` input (random masks)."""
    mode = at.get("training_mode", 0) if op == "BatchNormalization" else \
        (a[2] if len(a) > 2 else None)
    if isinstance(mode, Var):
        raise c.fail(f"{op} whose training_mode is computed from the input is not supported "
                     f"(export the model in inference mode)")
    if mode is not None and bool(np.any(np.asarray(mode))):
        raise c.fail(f"{op} in training mode (training_mode=1) is not supported: export the "
                     f"model in inference mode (model.eval())")


def _dropout(c: _Converter, a, at):
    _inference(c, a, at, "Dropout")
    return a[0]


def _batchnorm(c: _Converter, a, at) -> Var:
    _inference(c, a, at, "BatchNormalization")
    x = a[0]
    scale, bias, mean, var = (c.const(v, n) for v, n in zip(a[1:5], ("scale", "B", "mean",
                                                                        "var")))
    return c.add("batchnorm", [x], params={"weight": scale, "bias": bias, "mean": mean,
                                           "var": var}, attrs={"eps": float(at.get("epsilon",
                                                                                   1e-5))})


def _avgpool(c: _Converter, a, at) -> Var:
    x = a[0]
    kernel = layers.kernel_2d(c, at, "AveragePool")
    pads = layers.symmetric_pads(c, at)
    if any(pads) and not at.get("count_include_pad", 0):
        raise c.fail("AveragePool with padding and count_include_pad=0 is not supported")
    if any(d != 1 for d in at.get("dilations", [1, 1])):
        raise c.fail(f"AveragePool with dilations {list(at['dilations'])} is not supported")
    stride = tuple(int(s) for s in at.get("strides", [1, 1]))   # ONNX's default: 1
    layers.check_ceil_mode(c, at, x, kernel, stride, pads, "AveragePool")
    attrs = {"kernel_size": kernel, "stride": stride, "padding": pads}
    return c.add("avgpool2d", [x], attrs=attrs)


def _concat(c: _Converter, a, at) -> Var:
    if not all(isinstance(v, Var) for v in a):
        raise c.fail("Concat of constants with input-dependent tensors is not supported")
    return c.add("concat", list(a), attrs={"axis": c.axis(int(at["axis"]), a[0])})


def _constant(c: _Converter, a, at) -> np.ndarray:
    import onnx.numpy_helper as nh

    if "value" in at:
        return nh.to_array(at["value"])
    for key in ("value_float", "value_int"):
        if key in at:
            return np.asarray(at[key])
    for key in ("value_floats", "value_ints"):
        if key in at:
            return np.asarray(list(at[key]))
    raise c.fail(f"Constant with attributes {sorted(at)} is not supported")


def _shape(c: _Converter, a, at) -> np.ndarray:
    """Shape of an input-dependent tensor: known statically (the batch taken as 1)."""
    full = ([1] if c.batched else []) + list(a[0].shape)
    return np.asarray(full, dtype=np.int64)[at.get("start", 0):at.get("end", None)]


CONVERTERS: dict[str, Callable] = {
    "Shape": _shape,
    "Gemm": _gemm, "MatMul": _matmul, "Add": _binary("add"), "Sub": _binary("sub"),
    "Mul": _binary("mul"), "Div": _binary("div"), "Conv": _conv,
    "Relu": lambda c, a, at: c.add("relu", [a[0]]), "Flatten": _flatten, "Reshape": _reshape,
    "Transpose": _transpose, "BatchNormalization": _batchnorm, "Constant": _constant,
    "Identity": lambda c, a, at: a[0], "Dropout": _dropout,
    "AveragePool": _avgpool, "Concat": _concat,
    "MaxPool": layers.maxpool, "GlobalAveragePool": layers.global_avgpool,
    "ReduceMean": layers.reduce_mean, "ConvTranspose": layers.conv_transpose,
    "Sigmoid": lambda c, a, at: c.add("sigmoid", [a[0]]),
    "Tanh": lambda c, a, at: c.add("tanh", [a[0]]),
    "LeakyRelu": layers.leaky_relu, "Elu": layers.elu, "Clip": layers.clip, "Softmax": layers.softmax,
    "Slice": index.slice_, "Split": index.split, "Gather": index.gather, "Pad": index.pad,
    "Squeeze": index.squeeze, "Unsqueeze": index.unsqueeze,
}

def _shape_of(value: np.ndarray, at) -> np.ndarray:
    return np.asarray(np.shape(value), dtype=np.int64)[at.get("start", 0):at.get("end", None)]


def _axes(a, at, required: bool) -> tuple[int, ...] | None:
    """Squeeze / Unsqueeze axes: the second input (opset 13) or the ``axes`` attribute."""
    axes = a[1] if len(a) > 1 and a[1] is not None else at["axes"] if required \
        else at.get("axes")
    return None if axes is None else tuple(int(v) for v in np.asarray(axes).reshape(-1))


def _numpy_dtype(onnx_type: int) -> np.dtype:
    import onnx.helper

    return onnx.helper.tensor_dtype_to_np_dtype(onnx_type)


def _fold_div(x, y) -> np.ndarray:
    """ONNX's Div: integers divide truncating toward zero (shape arithmetic), floats as usual."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind in "iu" and y.dtype.kind in "iu":
        q = np.abs(x) // np.abs(y)
        return (np.sign(x) * np.sign(y) * q).astype(x.dtype)
    return np.divide(x, y)


def _constant_of_shape(c: _Converter, a, at) -> np.ndarray:
    import onnx.numpy_helper as nh

    fill = nh.to_array(at["value"]).reshape(-1) if "value" in at else np.zeros(1, np.float32)
    shape = index.ints(c, a[0], "the ConstantOfShape shape")
    if min(shape, default=0) < 0 or int(np.prod(shape)) > 1 << 24:
        raise c.fail(f"ConstantOfShape of shape {shape} is not supported", ShapeError)
    return np.full(shape, fill[0], dtype=fill.dtype)


def _fold_reshape(c: _Converter, a, at) -> np.ndarray:
    allowzero = bool(at.get("allowzero", 0))
    return np.reshape(a[0], _reshape_target(c, a[1], list(np.shape(a[0])), allowzero))


# constant folding with numpy, for ops whose inputs are all constants: (converter, inputs,
# attributes) -> array; numpy's errors on malformed constants become GraphError in _call
FOLD: dict[str, Callable] = {
    "Add": lambda c, a, at: np.add(a[0], a[1]),
    "Sub": lambda c, a, at: np.subtract(a[0], a[1]),
    "Mul": lambda c, a, at: np.multiply(a[0], a[1]),
    "Div": lambda c, a, at: _fold_div(a[0], a[1]),
    "MatMul": lambda c, a, at: np.matmul(a[0], a[1]),
    "Relu": lambda c, a, at: np.maximum(a[0], 0),
    "Identity": lambda c, a, at: a[0], "Dropout": _dropout,
    "Reshape": _fold_reshape,
    "Shape": lambda c, a, at: _shape_of(a[0], at),
    "Transpose": lambda c, a, at: np.transpose(a[0], at.get("perm")),
    "Concat": lambda c, a, at: np.concatenate(a, axis=int(at["axis"])),
    "Flatten": lambda c, a, at: np.reshape(
        a[0], (int(np.prod(np.shape(a[0])[:at.get("axis", 1)])), -1)),
    "Gather": lambda c, a, at: np.take(a[0], np.asarray(a[1], dtype=np.int64),
                                       axis=at.get("axis", 0)),
    "Unsqueeze": lambda c, a, at: np.expand_dims(a[0], _axes(a, at, required=True)),
    "Squeeze": lambda c, a, at: np.squeeze(a[0], _axes(a, at, required=False)),
    "Cast": lambda c, a, at: np.asarray(a[0]).astype(_numpy_dtype(at["to"])),
    "Slice": index.fold_slice,
    "ConstantOfShape": lambda c, a, at: _constant_of_shape(c, a, at),
}


def check_opsets(model) -> None:
    """Refuse a model whose IR version or default-domain opset is newer than the installed
    ``onnx`` package knows (its operators' meaning is then unknown): :class:`ModelLoadError`
    naming the version and the fix."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > newest:
            raise ModelLoadError(f"the model imports ONNX opset {imp.version}, newer than "
                                 f"opset {newest}, the newest the installed onnx "
                                 f"{onnx.__version__} knows; export it with opset <= {newest}")
    if model.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(f"the model has ONNX IR version {model.ir_version}, newer than "
                             f"{onnx.IR_VERSION}, the newest the installed onnx "
                             f"{onnx.__version__} reads; export it with an older IR version")


def read_model(path: str | Path):
    """The ``onnx.ModelProto`` in an ONNX file, plain or gzip-compressed, with its external
    data loaded (from the file's folder); anything unreadable raises
    :class:`ModelLoadError` naming the path."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"ONNX file {path} does not exist")
    data = read_bytes(path, ModelLoadError, "ONNX model")
    try:
        model = onnx.load_model_from_string(data)
        load_external_data_for_model(model, str(path.parent))
    except Exception as e:          # protobuf's DecodeError, onnx's errors on external data
        raise ModelLoadError(f"{path} is not a readable ONNX model: {_first_line(e)}") from None
    return model


def load_onnx(path: str | Path) -> Graph:
    """Read an ONNX file (plain or ``.onnx.gz``) into a Graph. A file that is not ONNX
    raises :class:`ModelLoadError`; a model BoundFlow cannot convert raises another
    :class:`BoundFlowError` naming the node."""
    import onnx

    path = Path(path)
    model = read_model(path)
    try:
        check_opsets(model)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:
        raise ModelLoadError(f"{path} is not a readable ONNX model: {_first_line(e)}") from None
    if not model.graph.node:
        raise ModelLoadError(f"{path} is not an ONNX model with a graph (no nodes)")
    return from_onnx(model)


def from_onnx(model) -> Graph:
    """Convert an in-memory ``onnx.ModelProto`` (see the module docstring for what raises)."""
    return _Converter(model).run()
