"""PyTorch frontend: ``torch.export`` an ``nn.Module`` into an IR graph (saved programs are
read by ``frontend/pt2.py``).

The module is exported with a batch of two copies of the example, so the batch dimension can
be told apart from the others; the IR keeps per-sample shapes and serves every batch size.
Each ATen operator has one small converter: the affine core below, pooling / transposed
convolution / activations / softmax in ``torch_layers.py``, slicing / splitting / gathering /
padding in ``torch_index.py``. An operator without one, or a form of one BoundFlow does not
take (along the batch dimension, max pooling with dilation, padding in reflect mode, ...),
raises :class:`UnsupportedOpError` naming the operator, the module path and the node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx

from boundflow.errors import BoundFlowError, ModelLoadError, ShapeError, UnsupportedOpError
from boundflow.frontend import torch_index
from boundflow.frontend import torch_layers as layers
from boundflow.ir.graph import Graph, GraphBuilder, live_only
from boundflow.ir.normalize import normalize

TRACE_BATCH = 2


@dataclass(frozen=True)
class Var:
    """A traced value that depends on the input: the name of an IR node."""

    name: str
    shape: tuple[int, ...]  # per sample


class BatchDim:
    """The (possibly symbolic) batch size, as read by ``x.shape[0]`` inside a model."""


BATCH = BatchDim()


@dataclass(frozen=True)
class Refused:
    """An output BoundFlow does not compute (the indices of max pooling): exported programs
    read every output of an op, so this fails only when something uses it."""

    message: str


class _Converter:
    def __init__(self, program: torch.export.ExportedProgram):
        self.program = program
        self.env: dict[torch.fx.Node, Any] = {}
        self.builder: GraphBuilder | None = None
        self.batch = TRACE_BATCH
        self.fx_node: torch.fx.Node | None = None

    # -- helpers used by the converters ---------------------------------------------------
    def where(self) -> str:
        stack = self.fx_node.meta.get("nn_module_stack") if self.fx_node is not None else None
        if not stack:
            return f"node {self.fx_node.name!r}" if self.fx_node is not None else "the model"
        path, cls = list(stack.values())[-1]
        cls = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        return f"module {path or '<root>'!r} ({cls.rsplit('.', 1)[-1]}), node {self.fx_node.name!r}"

    def fail(self, what: str, error=UnsupportedOpError) -> BoundFlowError:
        return error(f"{what} at {self.where()}")

    def add(self, op: str, inputs: list[Var], **kw) -> Var:
        source = self.where()
        name = self.builder.add_node(op, [v.name for v in inputs], source=source,
                                     name=self.fx_node.name, **kw)
        return Var(name, self.builder.shape(name))

    def array(self, value: Any, role: str) -> np.ndarray:
        """A constant tensor (a weight) as a numpy array of the graph's dtype."""
        if isinstance(value, Var) or not isinstance(value, torch.Tensor):
            raise self.fail(f"{role} must be a constant tensor, not a value computed from the "
                            f"input")
        return value.detach().cpu().numpy().astype(self.builder.dtype)

    def const(self, value: Any, like: Var, role: str) -> np.ndarray:
        """A constant operand as an array broadcastable onto one sample of ``like``."""
        if isinstance(value, Var):
            raise self.fail(f"{role} must be a constant, not a value computed from the input")
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if arr.ndim > len(like.shape):
            if arr.ndim != len(like.shape) + 1 or arr.shape[0] != 1:
                raise self.fail(f"constant of shape {arr.shape} varies along the batch "
                                f"dimension", ShapeError)
            arr = arr[0]
        return arr.astype(self.builder.dtype)

    def sample_dim(self, dim: int, var: Var) -> int:
        """A full-tensor axis as a per-sample axis; the batch axis is refused."""
        full = len(var.shape) + 1
        if not -full <= dim < full:
            raise self.fail(f"axis {dim} is out of range", ShapeError)
        dim %= full
        if dim == 0:
            op = self.fx_node.target.name() if isinstance(
                getattr(self.fx_node, "target", None), torch._ops.OpOverload) else "an operation"
            raise self.fail(f"{op} across the batch dimension is not supported")
        return dim - 1

    # -- the walk ------------------------------------------------------------------------
    def run(self) -> Graph:
        sig = self.program.graph_signature
        consts = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
                  **sig.inputs_to_lifted_tensor_constants}
        tensors = {**self.program.state_dict, **self.program.constants}
        user_inputs = [n for n in self.program.graph.nodes
                       if n.op == "placeholder" and n.name not in consts]
        if len(user_inputs) != 1:
            raise UnsupportedOpError(f"the model takes {len(user_inputs)} inputs; BoundFlow "
                                     f"supports models of exactly one tensor input")
        for node in self.program.graph.nodes:
            self.fx_node = node
            if node.op == "placeholder":
                self.env[node] = (tensors[consts[node.name]] if node.name in consts
                                  else self._input(node))
            elif node.op == "call_function":
                self.env[node] = self._call(node)
            elif node.op == "output":
                return self._output(node)
            else:
                raise self.fail(f"fx node kind {node.op!r} is not supported")
        raise UnsupportedOpError("the exported program has no output")

    def _input(self, node: torch.fx.Node) -> Var:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            raise UnsupportedOpError("the model input must be a tensor with a batch dimension "
                                     "and at least one more")
        if val.dtype not in (torch.float32, torch.float64):
            raise UnsupportedOpError(f"the model input has dtype {val.dtype}; BoundFlow needs "
                                     f"float32 or float64")
        # a program exported with a dynamic batch has a symbolic first dimension
        self.batch = val.shape[0] if isinstance(val.shape[0], int) else None
        if not all(isinstance(s, int) for s in val.shape[1:]):
            raise UnsupportedOpError(f"the model input has dynamic dimensions other than the "
                                     f"batch: {tuple(val.shape)}")
        self.builder = GraphBuilder(str(val.dtype).replace("torch.", ""))
        name = self.builder.input(tuple(int(s) for s in val.shape[1:]), name=node.name)
        return Var(name, self.builder.shape(name))

    def _output(self, node: torch.fx.Node) -> Graph:
        outs = torch.utils._pytree.tree_leaves(node.args[0])
        if len(outs) == 1 and isinstance(self.env[outs[0]], Refused):
            raise UnsupportedOpError(self.env[outs[0]].message)
        if len(outs) != 1 or not isinstance(self.env[outs[0]], Var):
            raise UnsupportedOpError(f"the model must return one tensor computed from its "
                                     f"input; it returns {len(outs)} values")
        return normalize(live_only(self.builder.build(self.env[outs[0]].name)))

    def _call(self, node: torch.fx.Node) -> Any:
        target = node.target
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: self.env[n])
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        refused = [a for a in leaves if isinstance(a, Refused)]
        if refused:
            raise UnsupportedOpError(refused[0].message)
        is_var = any(isinstance(a, Var) for a in leaves)
        if not is_var:  # constant folding: nothing here depends on the input
            return target(*args, **kwargs)
        key = target.name() if isinstance(target, torch._ops.OpOverload) else getattr(
            target, "__name__", str(target))
        converter = CONVERTERS.get(key)
        if converter is None:
            raise self.fail(f"unsupported op {key!r}")
        return converter(self, _bind(target, args, kwargs))


def _bind(target: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments by schema name, defaults filled in."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return {"args": args, **kwargs}
    bound = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


# ---------------------------------------------------------------------------------------------
# one converter per ATen operator: (converter, bound arguments) -> Var


def _linear(c: _Converter, a: dict) -> Var:
    x = a["input"]
    params = {"weight": c.array(a["weight"], "the weight")}
    if a["bias"] is not None:
        params["bias"] = c.array(a["bias"], "the bias")
    return c.add("linear", [x], params=params)


def _conv(c: _Converter, a: dict) -> Var:
    x = a["input"]
    if a.get("transposed"):
        return layers.conv_transpose(c, a)
    if isinstance(a["padding"], str):
        raise c.fail(f"conv2d with padding={a['padding']!r} (give integer padding)")
    params = {"weight": c.array(a["weight"], "the weight")}
    if params["weight"].ndim != 4:
        raise c.fail(f"unsupported op 'convolution' with a {params['weight'].ndim - 2}-D kernel")
    if a["bias"] is not None:
        params["bias"] = c.array(a["bias"], "the bias")
    pair = lambda v: tuple(v) * 2 if len(v) == 1 else tuple(v)  # noqa: E731
    if any(a.get("output_padding") or ()):
        raise c.fail("convolution with output_padding is not supported")
    attrs = {"stride": pair(a["stride"]), "padding": pair(a["padding"]),
             "dilation": pair(a["dilation"]), "groups": int(a["groups"])}
    return c.add("conv2d", [x], params=params, attrs=attrs)


def _relu(c: _Converter, a: dict) -> Var:
    return c.add("relu", [a["self"]])


def _binary(op: str) -> Callable[[_Converter, dict], Var]:
    def convert(c: _Converter, a: dict) -> Var:
        x, y = a["self"], a["other"]
        alpha = a.get("alpha", 1) or 1
        if op in ("add", "sub") and alpha != 1:
            if not isinstance(y, Var):
                y = y * alpha
            else:
                y = c.add("mul", [y], params={"other": np.asarray(alpha, c.builder.dtype)})
        if isinstance(x, Var) and isinstance(y, Var):
            if op in ("mul", "div"):
                raise c.fail(f"unsupported op '{op}' of two input-dependent tensors "
                             f"(only {op} by a constant is supported)")
            if x.shape != y.shape:
                raise c.fail(f"'{op}' of shapes {x.shape} and {y.shape}: broadcasting between "
                             f"two input-dependent tensors is not supported")
            return c.add(op, [x, y])
        if isinstance(x, Var):
            return c.add(op, [x], params={"other": c.const(y, x, "the second operand")})
        # constant on the left: c + y, c * y commute; c - y = -(y) + c; c / y is not affine
        if op == "div":
            raise c.fail("unsupported op 'div' with the input-dependent value as divisor")
        if op == "sub":
            neg = c.add("mul", [y], params={"other": np.asarray(-1.0, c.builder.dtype)})
            return c.add("add", [neg], params={"other": c.const(x, y, "the first operand")})
        return c.add(op, [y], params={"other": c.const(x, y, "the first operand")})
    return convert


def _rsub(c: _Converter, a: dict) -> Var:  # other - alpha * self
    scaled = c.add("mul", [a["self"]], params={"other": np.asarray(-(a["alpha"] or 1),
                                                                    c.builder.dtype)})
    return c.add("add", [scaled], params={"other": c.const(a["other"], scaled, "the operand")})


def _batchnorm(c: _Converter, a: dict) -> Var:
    x = a["input"]
    if a.get("training"):
        raise c.fail("batch norm in training mode (call model.eval() first)")
    channels = x.shape[0]
    get = lambda key, fill: (np.full(channels, fill, c.builder.dtype) if a[key] is None  # noqa
                             else c.array(a[key], key))
    params = {"mean": get("running_mean", 0.0), "var": get("running_var", 1.0),
              "weight": get("weight", 1.0), "bias": get("bias", 0.0)}
    return c.add("batchnorm", [x], params=params, attrs={"eps": float(a["eps"])})


def _batchnorm_no_training(c: _Converter, a: dict) -> tuple:
    a = dict(a, running_mean=a["running_mean"], running_var=a["running_var"], training=False)
    return (_batchnorm(c, a), None, None)


def _getitem(c: _Converter, a: dict) -> Var:
    seq, index = a["args"]
    value = seq[index]
    message = f"unsupported use of output {index} of a multi-output op at {c.where()}"
    if value is None:
        return Refused(message)
    if not isinstance(value, Var):
        raise UnsupportedOpError(message)
    return value


def _flatten(c: _Converter, a: dict) -> Var:
    x = a["self"]
    full = len(x.shape) + 1
    start, end = a["start_dim"] % full, a["end_dim"] % full
    if start == 0:
        raise c.fail("flatten across the batch dimension (use start_dim=1)")
    return c.add("flatten", [x], attrs={"start_dim": start - 1, "end_dim": end - 1})


def _reshape(c: _Converter, a: dict) -> Var:
    x = a["self"]
    shape = list(a["size"] if "size" in a else a["shape"])
    if any(isinstance(s, Var) or (not isinstance(s, (int, BatchDim))) for s in shape):
        raise c.fail(f"reshape to a shape computed from the input ({shape})")
    numel = math.prod(x.shape)
    rest = shape[1:]
    is_batch = bool(shape) and (shape[0] is BATCH or (c.batch is not None and shape[0] == c.batch))
    if any(s is BATCH for s in rest) or not shape:
        pass
    elif (is_batch or shape[0] == -1) and -1 not in rest and math.prod(rest) == numel:
        return c.add("reshape", [x], attrs={"shape": tuple(rest)})
    elif is_batch and rest.count(-1) == 1:
        return c.add("reshape", [x], attrs={"shape": tuple(rest)})
    shown = ["batch" if s is BATCH else s for s in shape]
    raise c.fail(f"reshape to {shown} mixes the batch dimension with others (traced with "
                 f"batch {c.batch or 'symbolic'}); keep the batch dimension first")


def _sym_size(c: _Converter, a: dict) -> Any:
    x = a["self"]
    dim = a["dim"] % (len(x.shape) + 1)
    return BATCH if dim == 0 else x.shape[dim - 1]


def _permute(c: _Converter, a: dict) -> Var:
    x = a["self"]
    full = len(x.shape) + 1
    dims = [d % full for d in a["dims"]]
    if dims[0] != 0:
        raise c.fail(f"permute {list(a['dims'])} moves the batch dimension")
    return c.add("permute", [x], attrs={"dims": tuple(d - 1 for d in dims[1:])})


def _transpose(c: _Converter, a: dict) -> Var:
    x = a["self"]
    d0, d1 = c.sample_dim(a["dim0"], x), c.sample_dim(a["dim1"], x)
    dims = list(range(len(x.shape)))
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return c.add("permute", [x], attrs={"dims": tuple(dims)})


def _avgpool(c: _Converter, a: dict) -> Var:
    x = a["self"]
    pair = lambda v: (tuple(v) * 2 if len(v) == 1 else tuple(v))  # noqa: E731
    kernel = pair(a["kernel_size"])
    stride = pair(a["stride"]) if a["stride"] else kernel
    padding = pair(a["padding"])
    if a["divisor_override"] is not None:
        raise c.fail("avg_pool2d with divisor_override is not supported")
    if any(padding) and not a["count_include_pad"]:
        raise c.fail("avg_pool2d with padding and count_include_pad=False is not supported")
    attrs = {"kernel_size": kernel, "stride": stride, "padding": padding}
    out = c.add("avgpool2d", [x], attrs=attrs)
    layers.check_ceil_mode(c, a, x, out, kernel, stride, padding, "avg_pool2d")
    return out


def _cat(c: _Converter, a: dict) -> Var:
    parts = list(a["tensors"])
    if not all(isinstance(p, Var) for p in parts):
        raise c.fail("concatenation of constants with input-dependent tensors is not supported")
    return c.add("concat", parts, attrs={"axis": c.sample_dim(a["dim"], parts[0])})


def _identity(c: _Converter, a: dict) -> Var:
    return a.get("self", a.get("input"))


def _dropout(c: _Converter, a: dict) -> Var:
    if a["train"]:
        raise c.fail("dropout in training mode (call model.eval() first)")
    return a["input"]


CONVERTERS: dict[str, Callable[[_Converter, dict], Any]] = {
    "aten::linear": _linear,
    "aten::conv2d": _conv,
    "aten::convolution": _conv,
    "aten::relu": _relu,
    "aten::relu_": _relu,
    "aten::add.Tensor": _binary("add"),
    "aten::sub.Tensor": _binary("sub"),
    "aten::mul.Tensor": _binary("mul"),
    "aten::div.Tensor": _binary("div"),
    "aten::add.Scalar": _binary("add"),
    "aten::sub.Scalar": _binary("sub"),
    "aten::mul.Scalar": _binary("mul"),
    "aten::div.Scalar": _binary("div"),
    "aten::rsub.Scalar": _rsub,
    "aten::rsub.Tensor": _rsub,
    "aten::batch_norm": _batchnorm,
    "aten::_native_batch_norm_legit_no_training": _batchnorm_no_training,
    "getitem": _getitem,
    "aten::flatten.using_ints": _flatten,
    "aten::view": _reshape,
    "aten::reshape": _reshape,
    "aten::_unsafe_view": _reshape,
    "aten::permute": _permute,
    "aten::sym_size.int": _sym_size,
    "aten::transpose.int": _transpose,
    "aten::avg_pool2d": _avgpool,
    "aten::cat": _cat,
    "aten::dropout": _dropout,
    "aten::clone": _identity,
    "aten::contiguous": _identity,
    "aten::alias": _identity,
    "aten::detach": _identity,
    **layers.CONVERTERS,
    **torch_index.CONVERTERS,
}


def from_exported(program: torch.export.ExportedProgram) -> Graph:
    """Convert an ``ExportedProgram`` of one tensor input and one tensor output to a Graph."""
    return _Converter(program).run()


def from_torch(module: torch.nn.Module, example: torch.Tensor) -> Graph:
    """Export ``module`` (in eval mode) on ``example`` (batch first) and convert it.

    The module's training flag is restored afterwards. Raises :class:`UnsupportedOpError`
    naming the op and module path for anything outside the IR's operator set.
    """
    if not isinstance(module, torch.nn.Module):
        raise BoundFlowError(f"expected a torch.nn.Module, got {type(module).__name__}")
    example = torch.as_tensor(example)
    if example.dim() < 2:
        raise ShapeError(f"the example input of shape {tuple(example.shape)} needs a batch "
                         f"dimension first")
    trace_input = example[:1].expand(TRACE_BATCH, *example.shape[1:]).clone()
    was_training = module.training
    _set_training(module, False)
    try:
        program = torch.export.export(module, (trace_input,), strict=False)
    except BoundFlowError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"torch.export could not trace the model on an input of shape "
                             f"{tuple(trace_input.shape)}: {first}") from e
    finally:
        _set_training(module, was_training)
    return from_exported(program)


def _set_training(module: torch.nn.Module, mode: bool) -> None:
    try:
        module.train(mode)
    except NotImplementedError:  # e.g. ExportedProgram.module(): fixed in inference form
        pass
