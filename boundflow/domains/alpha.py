"""alpha-CROWN: the relaxation parameters of activations optimised by gradient steps.

Every (activation, start node) pair gets its own parameters per bounded neuron and per side
(one set to raise lower bounds, one to lower upper bounds), initialised from the CROWN choice
and kept in [0, 1], where every value gives sound lines (ReLU: its lower slope; see
:mod:`boundflow.domains.relaxation`), so every iterate is sound. The lower and the upper
bound are optimised separately, each with parameters of its own. A start node is the output
(one row per spec) or a pre-activation the plan bounds by ``crown`` (one row per neuron still
inexactly relaxed after CROWN; where the patch form covers the start and pays for those rows,
``crown_conv.patches_pay``, with parameters in the window layout of ``crown_conv``). Each
iteration re-derives those intermediate bounds with their own parameters, intersected with
the CROWN bounds they started from, then bounds the output.
The intersection passes its gradient straight through to the re-derived rows: a plain
``max`` with a fixed bound gives rows that start no tighter than it no gradient (half at
ties), and their parameters would never move (which also made results depend on float noise
in the start). The loss is the sum of the output bounds being tightened; Adam with an
exponentially decaying step; the best bound seen per element is kept, so the result is never
looser than CROWN's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

import torch

from boundflow.domains import activations
from boundflow.domains.adam import Adam
from boundflow.domains.backward import backward, masked_index, tighten_rows
from boundflow.domains.coeffs import BackwardContext
from boundflow.domains.crown import crown_node, crown_nodes
from boundflow.domains.crown_conv import (PatchSlopes, conv_chain, crown_conv_rows,
                                          patches_pay)
from boundflow.domains.crown_relaxed import MEMO_BYTES, LinesMemo, inexact
from boundflow.domains.interval import RULES as IBP_RULES, Interval
from boundflow.domains.relaxation import stack_params
from boundflow.domains.traversal import ancestors, apply_rule
from boundflow.errors import BoundFlowError
from boundflow.ir.analysis import preactivations
from boundflow.ir.domain_plan import DomainPlan
from boundflow.ir.graph import Graph


@dataclass(frozen=True)
class AlphaConfig:
    """Optimisation settings: ``iterations`` Adam steps of size ``lr``, decayed by ``decay``
    per step; ``intermediate`` also optimises the slopes behind intermediate bounds."""

    iterations: int = 20
    lr: float = 0.5
    decay: float = 0.98
    intermediate: bool = True

    def __post_init__(self):
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = (isinstance(self.iterations, int) and not isinstance(self.iterations, bool)
              and 0 <= self.iterations <= 100_000 and number(self.lr) and self.lr > 0
              and number(self.decay) and 0 < self.decay <= 1
              and isinstance(self.intermediate, bool))
        if not ok:
            raise BoundFlowError(f"alpha settings {self} are invalid: need an integer "
                                 f"0 <= iterations <= 100000, a finite lr > 0, a finite "
                                 f"0 < decay <= 1 and intermediate True or False")


def _slopes(graph: Graph, start: str, rows: int, bounds: Mapping[str, Interval], mode: str,
            params: list) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Learnable (lower-side, upper-side) parameters ``[B, rows, *shape]`` (stacked on a
    leading axis where an activation has several per neuron) for each activation that
    ``start`` depends on."""
    need = ancestors(graph, [start])
    slopes = {}
    for node in graph.nodes:
        if node.op not in activations.ACTIVATIONS or node.name not in need \
                or node.name == start:
            continue
        relaxation = activations.get(node.op)
        if relaxation.n_params == 0:
            continue
        pre = bounds[node.inputs[0]]
        state = relaxation.prepare(pre.lower, pre.upper, node.attrs)
        init = stack_params(tuple(
            t.unsqueeze(1).expand((-1, rows) + tuple(t.shape[1:]))
            for t in relaxation.default_params(state, node.attrs, mode)))
        pair = (init.clone().requires_grad_(True), init.clone().requires_grad_(True))
        slopes[node.name] = pair
        params.extend(pair)
    return slopes


def optimise(graph: Graph, plan: DomainPlan, A: torch.Tensor, x: Interval,
             tensors: Mapping[str, torch.Tensor], bounds: Mapping[str, Interval],
             lower_slope: str, config: AlphaConfig | None, start: Interval,
             patches: bool = True, upper: bool = True,
             done: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Interval:
    """Tighten ``start`` (the CROWN bounds of ``A·output`` given ``bounds``) by optimising
    the activations' relaxation parameters, the lower and the upper bound each with
    parameters of their own; ``patches`` keeps conv-chain starts in window layout.
    ``upper=False`` (a verdict reads only the lower bound) optimises the lower side only,
    half the work: the upper bound is the best the lower side's slopes gave on the way (its
    first step is CROWN's), never looser than CROWN's, rarely as tight as alpha's.

    ``done(lower) -> [B]`` (a search's goal, e.g. every disjunct ruled out): the samples
    whose lower bounds so far are all the caller needs. They leave the lower side's
    optimisation: it stops when every sample is done, and where a share ``SHRINK`` of
    those still optimised are done and no slope is in window layout, it goes on with the
    rest alone (their slopes and Adam's moments sliced out, so each remaining sample takes
    the same steps as in the full batch: the samples of a batch are independent). A done
    sample's bound is the best it had then, which is what the caller needed. Measured
    (ACAS Xu 1_1, the input-split search's escalation, 8 steps): of the boxes alpha proved,
    most were proven after its first step (property 5: 278 of 335), the rest spread over
    the steps up to the last (property 6)."""
    config = config or AlphaConfig()
    # only pre-activation intervals are kept fixed: every other node's re-bounded interval
    # lies inside its first one already, and intersecting at ties would halve gradients
    pre = set(preactivations(graph))
    bounds = {k: v for k, v in bounds.items() if k in pre}
    lower = _optimise_side(graph, plan, A, x, tensors, bounds, lower_slope, config, start, -1.0,
                           patches, done)
    if not upper:
        return lower
    high = _optimise_side(graph, plan, A, x, tensors, bounds, lower_slope, config, start, 1.0,
                          patches)
    return Interval(lower.lower, high.upper)


def _optimise_side(graph, plan, A, x, tensors, bounds, lower_slope, config, start,
                   sign: float, patches: bool, done=None) -> Interval:
    """Minimise ``sign * sum(bound)``: ``-1`` raises the lower bound, ``+1`` lowers the upper
    (``done``: :func:`optimise`'s, lower side only)."""
    params: list[torch.Tensor] = []
    tighten = crown_nodes(graph, plan) if config.intermediate else set()
    starts = {}                      # pre-activation -> (inexact index, slopes[, conv chain])
    for node in graph.nodes:
        if node.name not in tighten:
            continue
        index = masked_index(inexact(graph, node.name, bounds[node.name]))
        if not index.numel():
            continue
        chain = conv_chain(graph, node.name, tensors) if patches else None
        if chain is not None and not patches_pay(graph, chain, index.numel(),
                                                 x.lower.shape[0], tensors):
            chain = None             # too few rows for the patch form to pay
        if chain is not None:        # slopes in window layout (made lazily)
            starts[node.name] = (index, PatchSlopes(), chain)
        else:
            mask = inexact(graph, node.name, bounds[node.name]).flatten(1)
            pairs = int(mask.sum())
            if pairs <= PAIRS_FRACTION * mask.shape[0] * index.numel():
                # each sample's own inexact neurons, one row each
                sample, neuron = mask.nonzero(as_tuple=True)
                starts[node.name] = _Rows(sample, neuron, _slopes(
                    graph, node.name, 1, _gather(bounds, sample), lower_slope, params))
            else:                    # the batch's inexact neurons, the same rows for all
                starts[node.name] = (index, _slopes(graph, node.name, index.numel(), bounds,
                                                    lower_slope, params))
    final = _slopes(graph, graph.output, A.shape[1], bounds, lower_slope, params)
    best_lo, best_hi = start.lower.detach().clone(), start.upper.detach().clone()
    windowed = [entry[1] for entry in starts.values() if isinstance(entry, tuple)
                and len(entry) == 3 and isinstance(entry[1], PatchSlopes)]
    if not (params or windowed) or config.iterations == 0:
        return Interval(best_lo, best_hi)
    opt = None
    live = None                      # the samples still optimised (None: all)
    # what depends on fixed intervals alone (relaxation states, maxpool's windows), found
    # once for every step (an interval the step recomputes is new, or carries gradients)
    memo = LinesMemo(MEMO_BYTES)
    with torch.enable_grad():
        for step in range(config.iterations + 1):
            current = _rebound(graph, x, tensors, bounds, starts, lower_slope) if starts \
                else bounds
            out = backward(graph, graph.output, A, x, tensors,
                           BackwardContext(current, lower_slope, final, lines=memo))
            if live is None:
                best_lo = torch.maximum(best_lo, out.lower.detach())
                best_hi = torch.minimum(best_hi, out.upper.detach())
            else:
                best_lo[live] = torch.maximum(best_lo[live], out.lower.detach())
                best_hi[live] = torch.minimum(best_hi[live], out.upper.detach())
            if step == config.iterations:
                break
            finished = None
            if done is not None and sign < 0:
                finished = done(best_lo if live is None else best_lo[live])
                if bool(finished.all()):
                    break
            if opt is None:          # the first pass made the window-layout slopes
                params.extend(p for slopes in windowed for p in slopes.params)
                if not params:
                    break
                # fused: one kernel per step, not ~10 passes per slope tensor (4-6x)
                opt = Adam([(params, config.lr)])
            loss = sign * (out.upper if sign > 0 else out.lower).sum()
            if not loss.requires_grad:   # no slope reaches this side's bound (e.g. a relu
                break                    # feeding a softmax, relaxed without slopes): CROWN's
            opt.zero_grad()
            loss.backward()
            opt.step()
            opt.decay(config.decay)
            with torch.no_grad():
                for p in params:
                    p.clamp_(0.0, 1.0)
            if finished is not None and not windowed and \
                    int(finished.sum()) >= SHRINK * finished.numel():
                keep = (~finished).nonzero().flatten()
                before = x.lower.shape[0]
                live = keep if live is None else live[keep]
                if A.shape[0] == x.lower.shape[0]:
                    A = A[keep]              # (else one row broadcast over the batch)
                x = Interval(x.lower[keep], x.upper[keep])
                bounds = _gather(bounds, keep)
                moved = {}
                final = _take_slopes(graph, final, keep, moved)
                starts = {k: v.take(graph, keep, before, moved) if isinstance(v, _Rows)
                          else (v[0], _take_slopes(graph, v[1], keep, moved))
                          for k, v in starts.items()}
                params = [entry[0] for entry in moved.values()]
                opt.take(moved, keep)
                memo = LinesMemo(MEMO_BYTES)
    return Interval(best_lo, best_hi)


SHRINK = 0.25     # the share of done samples at which alpha goes on with the rest alone
# a dense start re-bounds each sample's own inexact neurons (:class:`_Rows`) where they are
# at most this share of the batch times the union of them; else the union, for every sample
# (one start matrix for the batch: cheaper per row, and all there is at batch 1)
PAIRS_FRACTION = 0.5


def _take_slopes(graph: Graph, slopes, keep: torch.Tensor, moved: dict):
    """``slopes`` (:func:`_slopes`'s) of the samples ``keep``: new leaf tensors, each
    recorded in ``moved`` under the one it replaces, with its batch axis and ``keep``."""
    out = {}
    for name, pair in slopes.items():
        # stacked parameters (several per neuron) have the batch on axis 1
        axis = 0 if activations.get(graph.node(name).op).n_params == 1 else 1
        new = []
        for p in pair:
            q = p.detach().index_select(axis, keep).requires_grad_(True)
            moved[p] = (q, axis, keep)
            new.append(q)
        out[name] = tuple(new)
    return out


def _gather(bounds: Mapping[str, Interval], sample: torch.Tensor) -> dict[str, Interval]:
    """``bounds`` of the samples ``sample`` (one entry per row, repeats allowed)."""
    return {k: Interval(v.lower.index_select(0, sample), v.upper.index_select(0, sample))
            for k, v in bounds.items()}


class _Rows(NamedTuple):
    """The neurons a dense start re-bounds: one backward row per (sample, neuron) pair,
    ``sample[r]``'s neuron ``neuron[r]`` (flat index), each with its own slopes (``[R, 1,
    *shape]``, :func:`_slopes` of the gathered bounds). Only each sample's own inexact
    neurons: the batch's union of them can be many more rows. The same bounds as the union's
    in exact arithmetic (a neuron exact in a sample changes nothing there): to 1e-10 in
    float64; in float32 Adam's normalised steps can amplify the products' different rounding
    (differences up to 1e-4, both ways, on small random nets). Measured (one thread; these
    ACAS Xu bounds equal to 1e-9): 512 small ACAS Xu boxes (union 22-41 of a layer's 50
    neurons, 5-10 per box), 8 steps: 2.3x faster; a 613-box escalation round of 1_9 property
    6 (union 23-50, 8-25 per box): 6.5-6.9 s against 7.1-8.4, autograd's backward half of it
    either way; end to end on 12 ACAS Xu searches no faster (30.2 against 30.4 s)."""

    sample: torch.Tensor
    neuron: torch.Tensor
    slopes: dict

    def bound(self, graph: Graph, name: str, iv: Interval, x: Interval, tensors,
              current: Mapping[str, Interval], lower_slope: str) -> Interval:
        """``iv`` (node ``name``'s interval, ``[B, *shape]``) with the rows' neurons
        tightened by CROWN under the slopes, the gradient passed straight through."""
        s, n = self.sample, self.neuron
        if not s.numel():
            return iv
        shape = tuple(iv.lower.shape[1:])
        A = torch.zeros(s.numel(), 1, math.prod(shape), dtype=iv.lower.dtype,
                        device=iv.lower.device)
        A[torch.arange(s.numel(), device=s.device), 0, n] = 1.0
        need = ancestors(graph, [name])
        ctx = BackwardContext(_gather({k: v for k, v in current.items() if k in need}, s),
                              lower_slope, self.slopes)
        rows = backward(graph, name, A.reshape((s.numel(), 1) + shape),
                        Interval(x.lower.index_select(0, s), x.upper.index_select(0, s)),
                        tensors, ctx)
        lo, hi = iv.lower.flatten(1), iv.upper.flatten(1)
        row_lo, row_hi = rows.lower[:, 0], rows.upper[:, 0]
        new_lo = torch.maximum(lo[s, n], row_lo)
        new_hi = torch.minimum(hi[s, n], row_hi)
        new_lo = row_lo + (new_lo - row_lo).detach()          # straight through
        new_hi = row_hi + (new_hi - row_hi).detach()
        return Interval(lo.index_put((s, n), new_lo).reshape(iv.lower.shape),
                        hi.index_put((s, n), new_hi).reshape(iv.upper.shape))

    def take(self, graph: Graph, keep: torch.Tensor, before: int, moved: dict) -> "_Rows":
        """The rows of the samples ``keep`` (of ``before``), renumbered, their slopes new
        leaves recorded in ``moved`` (:func:`_take_slopes`)."""
        pos = torch.full((before,), -1, dtype=torch.long, device=keep.device)
        pos[keep] = torch.arange(keep.numel(), device=keep.device)
        rows = (pos[self.sample] >= 0).nonzero().flatten()
        return _Rows(pos[self.sample[rows]], self.neuron[rows],
                     _take_slopes(graph, self.slopes, rows, moved))


def _rebound(graph: Graph, x: Interval, tensors, fixed: Mapping[str, Interval], starts,
             lower_slope: str) -> dict[str, Interval]:
    """Every node's interval again: IBP from the optimised pre-activation bounds, each
    intersected with its fixed bound; optimised pre-activations by CROWN with their slopes.
    ``starts`` maps a pre-activation to ``(index, slopes)`` (dense rows, the same for every
    sample), :class:`_Rows` (dense rows, each sample's own) or ``(index, PatchSlopes,
    chain)`` (rows in window layout, :mod:`crown_conv`)."""
    current: dict[str, Interval] = {}
    for node in graph.nodes:
        if node.op == "input":
            current[node.name] = x
            continue
        iv = apply_rule(IBP_RULES, node, tensors, [current[i] for i in node.inputs], "IBP")
        ref = fixed.get(node.name)     # pre-activations only
        if ref is not None:
            # the fixed bound's value where tighter, the gradient always to the IBP one: a
            # plain max splits its gradient at ties and drops it a rounding error away, so the
            # step would depend on float noise (the fixed bound is often this same IBP value)
            lo = torch.maximum(iv.lower, ref.lower)
            hi = torch.minimum(iv.upper, ref.upper)
            iv = Interval(iv.lower + (lo - iv.lower).detach(), iv.upper + (hi - iv.upper).detach())
        entry = starts.get(node.name)
        if isinstance(entry, _Rows):
            iv = entry.bound(graph, node.name, iv, x, tensors, current, lower_slope)
        elif entry is not None and len(entry) == 3:
            index, slopes, chain = entry
            rows = crown_conv_rows(graph, chain, iv, x, tensors, current, lower_slope, slopes,
                                   index)
            iv = tighten_rows(iv, index, rows, straight_through=True)
        elif entry is not None:
            index, slopes = entry
            iv = crown_node(graph, node.name, iv, x, tensors,
                            BackwardContext(current, lower_slope, slopes), index)
        current[node.name] = iv
    return current
