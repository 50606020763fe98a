"""Concrete evaluation of a graph at points: the function whose bounds the other domains compute.

Kept apart from the bound rules (and written without them) so that tests can check bounds
against true outputs, and so ``verify`` can find the predicted class of an IR graph. An
activation's function is its registry entry's ``fn`` (:mod:`boundflow.domains.activations`),
so that adding one is one entry; its relaxations are not used here.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from boundflow.domains import activations
from boundflow.domains.traversal import graph_tensors, propagate
from boundflow.ir.graph import Graph, Node


def _batchnorm(n: Node, p: dict, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, p["mean"], p["var"], p["weight"], p["bias"], False, 0.0,
                        n.attrs["eps"])


def _end(n: Node) -> int:
    end = n.attrs["end_dim"]
    return end + 1 if end >= 0 else end


def _pads(n: Node) -> list[int]:
    return [int(v) for pair in reversed(n.attrs["pads"]) for v in pair]


def _slice(n: Node, p: dict, x: torch.Tensor) -> torch.Tensor:
    a = n.attrs
    return x[(slice(None),) * (a["axis"] + 1) + (slice(a["start"], a["end"], a["step"]),)]


def _gather(n: Node, p: dict, x: torch.Tensor) -> torch.Tensor:
    axis = n.attrs["axis"] + 1
    index = torch.tensor([int(i) for i in n.attrs["indices"]], dtype=torch.long,
                         device=x.device)
    out = x.index_select(axis, index)
    return out if n.attrs["keepdim"] else out.squeeze(axis)


def _activation(relaxation: activations.Relaxation) -> Callable[..., torch.Tensor]:
    return lambda n, p, x: relaxation.fn(x, n.attrs)


RULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": lambda n, p, x: F.linear(x, p["weight"], p.get("bias")),
    "conv2d": lambda n, p, x: F.conv2d(x, p["weight"], p.get("bias"), n.attrs["stride"],
                                       n.attrs["padding"], n.attrs["dilation"],
                                       n.attrs["groups"]),
    "conv_transpose2d": lambda n, p, x: F.conv_transpose2d(
        x, p["weight"], p.get("bias"), n.attrs["stride"], n.attrs["padding"],
        n.attrs["output_padding"], n.attrs["groups"], n.attrs["dilation"]),
    "add": lambda n, p, x, y=None: x + (p["other"] if y is None else y),
    "sub": lambda n, p, x, y=None: x - (p["other"] if y is None else y),
    "mul": lambda n, p, x: x * p["other"],
    "div": lambda n, p, x: x / p["other"],
    "batchnorm": _batchnorm,
    "flatten": lambda n, p, x: x.flatten(n.attrs["start_dim"] + 1, _end(n)),
    "reshape": lambda n, p, x: x.reshape((x.shape[0],) + tuple(n.attrs["shape"])),
    "permute": lambda n, p, x: x.permute(0, *(d + 1 for d in n.attrs["dims"])),
    "avgpool2d": lambda n, p, x: F.avg_pool2d(x, n.attrs["kernel_size"], n.attrs["stride"],
                                              n.attrs["padding"], count_include_pad=True),
    "identity": lambda n, p, x: x,
    "concat": lambda n, p, *xs: torch.cat(xs, n.attrs["axis"] + 1),
    "maxpool2d": lambda n, p, x: F.max_pool2d(x, n.attrs["kernel_size"], n.attrs["stride"],
                                              n.attrs["padding"]),
    "pad": lambda n, p, x: F.pad(x, _pads(n), value=float(n.attrs["value"])),
    "slice": _slice,
    "gather": _gather,
    "softmax": lambda n, p, x: torch.softmax(x, n.attrs["axis"] + 1),
    **{op: _activation(r) for op, r in activations.ACTIVATIONS.items()},
}


def evaluate(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """The graph's output at the batch of points ``x`` (computed in ``x``'s dtype)."""
    tensors = graph_tensors(graph, x.dtype, x.device)
    out = graph.output
    return propagate(graph, RULES, x, tensors, [out], "evaluation")[out]
