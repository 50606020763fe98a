"""ONNX frontend: an ONNX model of one input and one output into an IR graph.

Operators: Gemm, MatMul, Add, Sub, Mul, Div, Conv, Relu, Flatten, Reshape, Transpose,
BatchNormalization, Constant, Identity, AveragePool, Concat (plus Dropout / Cast-free no-ops
that verification models carry). A model input of rank >= 2 has its batch first; a rank-1
input (common in tiny VNN-COMP models) is one unbatched sample. Constant subgraphs are
folded with numpy. Anything else raises :class:`UnsupportedOpError` naming op and node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from boundflow.errors import BoundFlowError, ModelLoadError, ShapeError, UnsupportedOpError
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
        axis = axis % full
        if not self.batched:
            return axis
        if axis == 0:
            raise self.fail("an operation along the batch axis is not supported")
        return axis - 1

    # walk ------------------------------------------------------------------------------
    def run(self) -> Graph:
        import onnx.numpy_helper as nh

        graph = self.model.graph
        for init in graph.initializer:
            self.env[init.name] = nh.to_array(init)
        inputs = [i for i in graph.input if i.name not in self.env]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise UnsupportedOpError(f"the model has {len(inputs)} inputs and "
                                     f"{len(graph.output)} outputs; BoundFlow needs one of each")
        self._input(inputs[0])
        for node in graph.node:
            self.node = node
            self._call(node)
        out = self.env.get(graph.output[0].name)
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
        import onnx.helper

        args = [self.env[i] if i else None for i in node.input]
        if any(i and i not in self.env for i in node.input):
            missing = [i for i in node.input if i and i not in self.env]
            raise self.fail(f"inputs {missing} are not defined", ModelLoadError)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Constant" and not any(isinstance(a, Var) for a in args):
            folded = FOLD.get(node.op_type)
            if folded is None:
                raise self.fail(f"unsupported op {node.op_type!r} (on constants)")
            outs = folded(args, attrs)
        else:
            converter = CONVERTERS.get(node.op_type)
            if converter is None:
                raise self.fail(f"unsupported op {node.op_type!r}")
            outs = converter(self, args, attrs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for name, value in zip(node.output, outs):
            self.env[name] = value


# --- converters: (converter, inputs, attributes) -> Var ---------------------------------

def _gemm(c: _Converter, a, at) -> Var:
    x, w = a[0], a[1]
    if at.get("transA", 0):
        raise c.fail("Gemm with transA=1 is not supported")
    w = c.const(w, "the Gemm weight") * at.get("alpha", 1.0)
    weight = w if at.get("transB", 0) else w.T
    params = {"weight": weight}
    if len(a) > 2 and a[2] is not None:
        params["bias"] = np.broadcast_to(c.const(a[2], "the Gemm bias") * at.get("beta", 1.0),
                                         (weight.shape[0],))
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


def _symmetric_pads(c: _Converter, at) -> tuple[int, int]:
    if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise c.fail(f"auto_pad={at['auto_pad']!r} is not supported (give explicit pads)")
    pads = list(at.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        raise c.fail(f"asymmetric pads {pads} are not supported")
    return pads[0], pads[1]


def _conv(c: _Converter, a, at) -> Var:
    x = a[0]
    w = c.const(a[1], "the Conv weight")
    if w.ndim != 4:
        raise c.fail(f"Conv with a {w.ndim - 2}-D kernel is not supported")
    params = {"weight": w}
    if len(a) > 2 and a[2] is not None:
        params["bias"] = c.const(a[2], "the Conv bias")
    attrs = {"stride": tuple(at.get("strides", [1, 1])), "padding": _symmetric_pads(c, at),
             "dilation": tuple(at.get("dilations", [1, 1])), "groups": int(at.get("group", 1))}
    return c.add("conv2d", [x], params=params, attrs=attrs)


def _flatten(c: _Converter, a, at) -> Var:
    x = a[0]
    axis = at.get("axis", 1)
    if not c.batched or axis != 1:
        raise c.fail(f"Flatten with axis={axis} on a {'batched' if c.batched else 'unbatched'} "
                     f"input is not supported (axis=1 on a batched input is)")
    return c.add("flatten", [x], attrs={"start_dim": 0, "end_dim": -1})


def _reshape(c: _Converter, a, at) -> Var:
    x, shape = a[0], [int(s) for s in c.const(a[1], "the target shape").astype(np.int64)]
    full = ([1] if c.batched else []) + list(x.shape)
    if at.get("allowzero", 0):
        raise c.fail("Reshape with allowzero=1 is not supported")
    shape = [full[i] if s == 0 and i < len(full) else s for i, s in enumerate(shape)]
    if not c.batched:
        return c.add("reshape", [x], attrs={"shape": tuple(shape)})
    if shape and shape[0] in (1, -1) and -1 not in shape[1:] and \
            int(np.prod(shape[1:])) == int(np.prod(x.shape)):
        return c.add("reshape", [x], attrs={"shape": tuple(shape[1:])})
    if shape and shape[0] == 1 and shape[1:].count(-1) == 1:
        return c.add("reshape", [x], attrs={"shape": tuple(shape[1:])})
    raise c.fail(f"Reshape to {shape} does not keep the batch axis first")


def _transpose(c: _Converter, a, at) -> Var:
    x = a[0]
    n = len(x.shape) + (1 if c.batched else 0)
    perm = list(at.get("perm", list(range(n))[::-1]))
    if c.batched:
        if perm[0] != 0:
            raise c.fail(f"Transpose perm={perm} moves the batch axis")
        perm = [p - 1 for p in perm[1:]]
    return c.add("permute", [x], attrs={"dims": tuple(perm)})


def _batchnorm(c: _Converter, a, at) -> Var:
    x = a[0]
    scale, bias, mean, var = (c.const(v, n) for v, n in zip(a[1:5], ("scale", "B", "mean",
                                                                        "var")))
    return c.add("batchnorm", [x], params={"weight": scale, "bias": bias, "mean": mean,
                                           "var": var}, attrs={"eps": float(at.get("epsilon",
                                                                                   1e-5))})


def _avgpool(c: _Converter, a, at) -> Var:
    x = a[0]
    pads = _symmetric_pads(c, at)
    if any(pads) and not at.get("count_include_pad", 0):
        raise c.fail("AveragePool with padding and count_include_pad=0 is not supported")
    if at.get("ceil_mode", 0):
        raise c.fail("AveragePool with ceil_mode=1 is not supported")
    kernel = tuple(at["kernel_shape"])
    attrs = {"kernel_size": kernel, "stride": tuple(at.get("strides", kernel)), "padding": pads}
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
    "Identity": lambda c, a, at: a[0], "Dropout": lambda c, a, at: a[0],
    "AveragePool": _avgpool, "Concat": _concat,
}

# constant folding with numpy, for ops whose inputs are all constants
FOLD: dict[str, Callable] = {
    "Add": lambda a, at: np.add(a[0], a[1]), "Sub": lambda a, at: np.subtract(a[0], a[1]),
    "Mul": lambda a, at: np.multiply(a[0], a[1]), "Div": lambda a, at: np.divide(a[0], a[1]),
    "MatMul": lambda a, at: np.matmul(a[0], a[1]), "Identity": lambda a, at: a[0],
    "Reshape": lambda a, at: np.reshape(a[0], [int(s) for s in a[1]]),
    "Transpose": lambda a, at: np.transpose(a[0], at.get("perm")),
    "Concat": lambda a, at: np.concatenate(a, axis=int(at["axis"])),
    "Flatten": lambda a, at: np.reshape(a[0], (int(np.prod(a[0].shape[:at.get("axis", 1)])),
                                               -1)),
    "Gather": lambda a, at: np.take(a[0], np.asarray(a[1], dtype=np.int64),
                                    axis=at.get("axis", 0)),
    "Unsqueeze": lambda a, at: np.expand_dims(a[0], tuple(
        int(v) for v in (a[1] if len(a) > 1 else at["axes"]))),
    "Squeeze": lambda a, at: np.squeeze(a[0], tuple(
        int(v) for v in (a[1] if len(a) > 1 else at["axes"]))),
    "Cast": lambda a, at: np.asarray(a[0]),
}


def load_onnx(path: str | Path) -> Graph:
    """Read an ONNX file into a Graph; a file that is not ONNX raises :class:`ModelLoadError`."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{path} is not a readable ONNX model: {first}") from None
    if not model.graph.node:
        raise ModelLoadError(f"{path} is not an ONNX model with a graph (no nodes)")
    return from_onnx(model)


def from_onnx(model) -> Graph:
    """Convert an in-memory ``onnx.ModelProto``."""
    return _Converter(model).run()
