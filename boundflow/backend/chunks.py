"""How many samples a bound task takes at once on a CPU: the batch split so each chunk's
coefficients stay in cache.

A backward (CROWN) pass keeps, per sample, a coefficient row for every neuron it bounds on
every map it passes; a forward-mode pass, a column per input element. On a CPU these
tensors and the temporaries of each rule (positive and negative parts, products) are
re-read by every op of the walk, so once a batch's working set leaves the cache the same
arithmetic runs 2-3x slower per sample (CROWN on the shared CNN, one thread, AMD EPYC Zen
4: 28 ms a sample at batch 1, 67 ms at batch 32), and past glibc's 32 MiB mmap ceiling its
tensors are faulted in afresh every call (there: 718,000 page faults a call).

:func:`samples_per_chunk` sizes a chunk so its largest coefficient tensor takes about
``BUDGET_BYTES`` (2 MiB; ``BOUNDFLOW_CHUNK_BYTES`` overrides it, 0 never splits): of 1-8 MiB
the best compromise over the bundled examples and the shared models at batch 32 and 1024
(``benchmarks/bench_chunks.py``). The estimate comes from shapes, once per task (a patch-form
walk's largest window, else the dense walk's widest map, per row; a final bound's specs),
times, for a CROWN pre-activation, the rows sparse CROWN will bound under the interval the
task starts from (:func:`crown_rows`, counted per call, and only where bounding every row
would not fit the batch in one chunk). Small tasks get chunks of hundreds of samples, so a
batch of a few dozen stays whole. Never split: IBP; alpha-CROWN's final bound (its optimiser
per chunk cost more than the cache saved); a final bound under beta-CROWN's split
multipliers (its optimisation is batch-wide); a batch of one; a GPU, which wants the whole
batch. Everything else gives the whole batch's bounds, sample by sample (sparse CROWN picks
its rows per chunk: equal up to float rounding).
"""

from __future__ import annotations

import math
import os
from typing import Mapping

import torch

from boundflow.domains.crown import needed
from boundflow.domains.crown_conv import conv_chain, window_elements
from boundflow.domains.crown_relaxed import inexact
from boundflow.domains.interval import Interval
from boundflow.errors import BoundFlowError
from boundflow.ir.graph import Graph, ancestors
from boundflow.ir.task_graph import Task

BUDGET_BYTES = 2 << 20


def _widest(graph: Graph, node: str) -> int:
    """The most elements per sample of ``node`` or any node it depends on (the input too)."""
    need = ancestors(graph, [node])
    return max(math.prod(n.shape) for n in graph.nodes if n.name in need)


def row_elements(graph: Graph, node: str, tensors: Mapping[str, torch.Tensor]) -> int:
    """Coefficient elements per row of a backward pass from ``node`` (per sample): the
    patch walk's largest window where the patch form covers ``node``, else the widest map
    of the dense walk."""
    chain = conv_chain(graph, node, tensors)
    return window_elements(graph, chain, tensors) if chain is not None \
        else _widest(graph, node)


def coefficient_elements(graph: Graph, task: Task, tensors: Mapping[str, torch.Tensor],
                         n_specs: int) -> int:
    """The estimated largest coefficient tensor of ``task``, in elements per sample, for a
    ``crown`` task *per row* (times the rows it bounds, known at run time:
    :func:`crown_rows`); 0 for a task that never splits its batch."""
    if task.kind == "crown":
        return row_elements(graph, task.nodes[0], tensors)
    if task.kind == "forward":
        return math.prod(graph.input_shape) * _widest(graph, task.nodes[0])
    if task.kind != "final" or task.attr("method") != "crown":
        return 0                            # IBP; alpha-CROWN: per chunk, its optimiser's
    out = graph.output_node                 # steps cost more than the cache saves
    return (n_specs or math.prod(out.shape)) * _widest(graph, out.name)


def crown_rows(graph: Graph, node: str, bound: Interval, sparse: bool | None) -> int:
    """The most rows one sample's backward pass from ``node`` bounds under ``bound`` (its
    interval so far): every neuron, or with sparse CROWN (``None``: the needed ones,
    ``True``: the inexactly relaxed ones) those it picks."""
    if sparse is False or bound.lower.numel() == 0:
        return math.prod(bound.lower.shape[1:])
    mask = needed(graph, node, bound) if sparse is None else inexact(graph, node, bound)
    return int(mask.flatten(1).sum(1).max())


def budget_bytes() -> int:
    """``BOUNDFLOW_CHUNK_BYTES`` where set (0: never split a batch), else ``BUDGET_BYTES``."""
    raw = os.environ.get("BOUNDFLOW_CHUNK_BYTES")
    if raw is None:
        return BUDGET_BYTES
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise BoundFlowError(f"BOUNDFLOW_CHUNK_BYTES must be a whole number of bytes (0: never "
                             f"split a batch), got {raw!r}")
    return value or 1 << 62


def samples_per_chunk(elements: int, itemsize: int, budget: int | None = None) -> int:
    """Samples per chunk for a task of ``elements`` coefficient elements per sample."""
    budget = budget_bytes() if budget is None else budget
    return max(1, budget // max(1, elements * itemsize))


__all__ = ["BUDGET_BYTES", "budget_bytes", "coefficient_elements", "crown_rows", "row_elements",
           "samples_per_chunk"]
