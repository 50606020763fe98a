"""CROWN for spatial pre-activations with local ("patch") coefficients.

Bounding every neuron ``(c, i, j)`` of a ``C x H x W`` node by a backward pass needs, at each
upstream feature map, coefficients that are non-zero only inside the receptive field of
pixel ``(i, j)``. The dense walk (:mod:`boundflow.domains.backward`) stores them as full
``[rows, C, H, W]`` maps; here each row keeps only its window ``[C, Rh, Rw]`` of each map
(geometry: :mod:`boundflow.domains.crown_windows`; per-op rules:
:mod:`boundflow.domains.crown_patches`). This module plans and drives the walk.

The walk is the dense walk's, over window coefficients. It starts with the identity at the
start node (a window of one entry per neuron), visits the start's ancestors in reverse
topological order, and processes a node only after every reader has contributed. Where
readers leave a node windows of different geometry (a residual block: the skip path and the
convolutions of the main path, with different sizes and offsets), each contribution is
zero-padded at its offset into the smallest window holding them all (the largest offset and
the largest extent past the start position, :meth:`Window.joined`) and they are summed.
Where that window would span the whole map, or paths of different stride meet, the node and
everything upstream of it is walked in the whole-map form (dense coefficients in window
layout, stride 0): windows grow with every convolution and are not worth keeping once they
are as large as the map. Before a node's rule runs, window entries that lie off its map are
zeroed (zero padding or positions past the border: they stand for nothing). At the input the
windows are concretised against the box, unfolded alike.

:func:`conv_chain` says whether a start is covered: every ancestor (a DAG, not only a chain)
is a ``(C, H, W)`` node the window rules take (conv2d, avgpool2d, maxpool2d, spatial
constant pad, activations, per-element affine ops, add/sub of two nodes, concat along
channels; :func:`crown_patches.covers`). Anything else upstream (a flatten, linear,
reshape, permute, slice, softmax, conv_transpose2d, a pad or concat on the channel axis)
makes the start fall back to the dense walk: never wrong, only slower.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Mapping

import torch
import torch.nn.functional as F

from boundflow.domains.coeffs import Coeffs, same
from boundflow.domains.crown_patches import (PatchContext, PatchSlopes, RULES, covers,
                                             input_windows)
from boundflow.domains.crown_windows import Window, mask, start_window
from boundflow.domains.gemv import bgemv
from boundflow.domains.interval import Interval
from boundflow.ir.graph import Graph, Node, ancestors


def _order(graph: Graph, start: str) -> list[Node]:
    """``start`` and its ancestors in reverse topological order (``start`` first)."""
    need = ancestors(graph, [start])
    return [n for n in reversed(graph.nodes) if n.name in need]


def _windows(graph: Graph, order: list[Node], tensors: Mapping[str, torch.Tensor]
             ) -> dict[str, Window] | None:
    """Each node's window (joined over its readers), or None where a node is not covered."""
    shapes = {n.name: n.shape for n in graph.nodes}
    start = order[0]
    windows = {start.name: Window((1, 1), (1, 1), (0, 0), tuple(start.shape[1:]))}
    for node in order:
        if node.op == "input":
            return windows if len(node.shape) == 3 else None
        if not covers(node, shapes, tensors):
            return None
        for name, win in zip(node.inputs, input_windows(node, windows[node.name], tensors)):
            windows[name] = win.joined(windows.get(name), tuple(shapes[name][1:]))
    return None                                      # the start does not reach the input


def conv_chain(graph: Graph, start: str, tensors: Mapping[str, torch.Tensor]
               ) -> list[Node] | None:
    """The nodes from ``start`` back to (not including) the input, in reverse topological
    order with ``start`` first, or None if the patch form does not cover ``start`` (module
    docstring)."""
    node = graph.node(start)
    if node.op == "input" or len(node.shape) != 3:
        return None
    order = _order(graph, start)
    if _windows(graph, order, tensors) is None:
        return None
    return [n for n in order if n.op != "input"]


# the patch walk's extra fixed cost per node of a chain, in coefficient elements the dense
# walk handles beyond it (fitted on the examples' alpha-CROWN starts, one thread)
PATCH_OVERHEAD = 20_000


def patches_pay(graph: Graph, chain: list[Node], rows: int, batch: int,
                tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether bounding ``rows`` selected neurons of ``chain[0]`` for ``batch`` samples in
    patch form is expected to beat the dense walk: where the coefficient elements it saves
    (each row's windows instead of whole maps, over the chain and the input) reach
    ``PATCH_OVERHEAD`` per node of the chain. Few rows, or windows nearly as large as their
    maps, go dense: the patch walk runs more (small) operations per node."""
    windows = _windows(graph, list(chain) + [graph.nodes[0]], tensors)
    shapes = {n.name: n.shape for n in graph.nodes}
    saved = sum(math.prod(shapes[n]) - shapes[n][0] * w.size[0] * w.size[1]
                for n, w in windows.items() if n != chain[0].name)
    return batch * rows * saved >= PATCH_OVERHEAD * len(chain)


def window_elements(graph: Graph, chain: list[Node], tensors: Mapping[str, torch.Tensor]
                    ) -> int:
    """The most coefficient elements one row of ``chain[0]`` holds on any map of the walk
    (the input's included): its largest window, ``C x Rh x Rw``."""
    windows = _windows(graph, list(chain) + [graph.nodes[0]], tensors)
    shapes = {n.name: n.shape for n in graph.nodes}
    return max(shapes[n][0] * w.size[0] * w.size[1] for n, w in windows.items())


def _add(a: Coeffs | None, b: Coeffs) -> Coeffs:
    if a is None:
        return b
    if a.lA is a.uA and b.lA is b.uA:
        total = a.lA + b.lA
        return Coeffs(total, total)
    return Coeffs(a.lA + b.lA, a.uA + b.uA)


def _placed(a: Coeffs, win: Window, target: Window, hw) -> Coeffs:
    """Coefficients on windows ``win`` as coefficients on the node's windows ``target``:
    zero-padded (or cut) into them, or written out on the whole map."""
    if win == target:
        return a
    if target.is_whole and not win.is_whole:
        return same(a, lambda t: win.to_whole(t, hw))
    widths = win.widths_to(target)
    return same(a, lambda t: F.pad(t, widths))


def _position_free(node: Node, win: Window, hw) -> bool:
    """Whether ``node``'s window rule reads neither the rows' positions nor any interval
    (conv2d, avgpool2d, add/sub of two nodes, on windows inside the map): coefficients of
    selected rows may pass it still alike for every position, one row per start channel."""
    two = node.op in ("add", "sub") and len(node.inputs) == 2
    return (node.op in ("conv2d", "avgpool2d") or two) and win.inside(hw)


def _picked(t, channel: torch.Tensor | None):
    """Alike coefficients ``[B', 1, Cs, ...]`` or constants ``[B', 1, Cs]`` as those of
    the selected rows, whose start channels are ``channel``: ``[B', k, 1, ...]``."""
    if channel is None or not torch.is_tensor(t):
        return t
    return t.index_select(2, channel).transpose(1, 2)


def _merged(prev, new, channel):
    """Two pending ``(coeffs, alike)`` contributions summed; in row form unless both are
    alike."""
    if prev is None:
        return new
    if prev[1] != new[1]:
        prev, new = [(same(c, lambda t: _picked(t, channel)) if al else c, False)
                     for c, al in (prev, new)]
    return _add(prev[0], new[0]), prev[1]


def crown_conv_rows(graph: Graph, chain: list[Node], bound: Interval, x: Interval,
                    tensors: Mapping[str, torch.Tensor], bounds: Mapping[str, Interval],
                    lower_slope: str, alphas: PatchSlopes | None = None,
                    index: torch.Tensor | None = None, lines: dict | None = None) -> Interval:
    """CROWN bounds ``[B, k]`` of the neurons ``index`` (flat; default every one, in flat
    order) of ``chain[0]`` (the start; ``chain`` is what :func:`conv_chain` returned); with
    ``alphas``, the activations' relaxation parameters come from there (alpha-CROWN);
    ``lines``: the run's memo of default lines (``BackwardContext.lines``).
    Selected rows more than the start's channels start alike (the identity per channel)
    through the :func:`_position_free` nodes next to the start, and are picked out of it
    before the first other node (the same numbers, without one product per row there)."""
    order = list(chain) + [graph.nodes[0]]
    start = chain[0]
    B, (Cs, H, W) = x.lower.shape[0], start.shape
    A, first_win = start_window(start.shape, x.lower, index)
    channel = None
    if index is not None and index.numel() > Cs:
        channel, A = index // (H * W), start_window(start.shape, x.lower)[0]
    windows = {name: replace(w, rows=first_win.rows)
               for name, w in _windows(graph, order, tensors).items()}
    shapes = {n.name: n.shape for n in graph.nodes}
    ctx = PatchContext(bounds, lower_slope, alphas, shapes, lines)
    pending = {start.name: (Coeffs(A, A), channel is not None)}
    consts = {False: [0.0, 0.0], True: [0.0, 0.0]}     # lb, ub [B', L', Cs] per form
    for node in chain:
        (a, alike), win = pending.pop(node.name), windows[node.name]
        if alike and not _position_free(node, win, tuple(node.shape[1:])):
            a, alike = same(a, lambda t: _picked(t, channel)), False
        if not win.inside(tuple(node.shape[1:])):
            on_map = mask(node.shape, win, x.lower)
            a = same(a, lambda t: t * on_map)
        params = {role: tensors[key] for role, key in node.params.items()}
        ins, dl, du = RULES[node.op](node, params, a, win, ctx)
        consts[alike] = [consts[alike][0] + dl, consts[alike][1] + du]
        for name, coeffs, w in zip(node.inputs, ins, input_windows(node, win, tensors)):
            here = alike and not (windows[name].is_whole and not w.is_whole)
            if alike and not here:
                coeffs = same(coeffs, lambda t: _picked(t, channel))
            coeffs = _placed(coeffs, w, windows[name], tuple(shapes[name][1:]))
            pending[name] = _merged(pending.get(name), (coeffs, here), channel)
    first = order[-1]
    a, alike = pending.pop(first.name)
    out = _concretize(same(a, lambda t: _picked(t, channel)) if alike else a,
                      windows[first.name], x)
    lb = consts[False][0] + _picked(consts[True][0], channel)
    ub = consts[False][1] + _picked(consts[True][1], channel)
    if index is not None:                            # [B, k, 1]
        return Interval((out.lower + lb).reshape(B, -1), (out.upper + ub).reshape(B, -1))
    flat = lambda t: t.expand(B, H * W, Cs).transpose(1, 2).reshape(B, Cs * H * W)  # noqa
    return Interval(flat(out.lower + lb), flat(out.upper + ub))


def _concretize(a: Coeffs, win: Window, x: Interval) -> Interval:
    """``lA·x`` minimised and ``uA·x`` maximised over the box per window row, ``[B, L,
    Cs]``. Off-map window entries meet zero centre and radius."""
    mid = win.unfold((x.upper + x.lower) / 2).flatten(3).squeeze(-2)          # [B, L, K]
    rad = win.unfold((x.upper - x.lower) / 2).flatten(3).squeeze(-2)
    lA = a.lA.flatten(3)                                                      # [B', L', Cs, K]
    lc, lr = bgemv(lA, mid), bgemv(lA.abs(), rad)
    if a.uA is a.lA:                                                          # one map
        return Interval(lc - lr, lc + lr)
    uA = a.uA.flatten(3)
    return Interval(lc - lr, bgemv(uA, mid) + bgemv(uA.abs(), rad))


__all__ = ["PATCH_OVERHEAD", "PatchSlopes", "conv_chain", "crown_conv_rows", "patches_pay",
           "window_elements"]
