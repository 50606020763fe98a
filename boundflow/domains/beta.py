"""beta-CROWN's multipliers: split constraints in the backward bound.

A domain of ReLU-split branch-and-bound holds only where each split ReLU input ``z_i`` has
its sign ``s_i`` (``s_i·z_i >= 0``). For any ``beta >= 0`` the function
``c·f(x) - sum_i beta_i·s_i·z_i(x)`` is at most ``c·f(x)`` on the domain, so a lower bound of
it over the whole box bounds ``c·f`` on the domain from below: the backward walk adds
``-beta·s`` to the lower side's coefficients when it reaches ``z``. Every ``beta >= 0`` is
sound; gradient steps on ``beta`` raise the bound (Adam, projected onto ``beta >= 0``),
jointly with the activations' relaxation parameters of the final bound (alpha-CROWN's slopes,
each in [0, 1] where every value is sound), and the best bound seen per row is kept,
starting from the bound without multipliers. This is
what lets a split constraint cut the box: without it a neuron fixed active is the identity
over the whole box.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from boundflow.domains.adam import Adam
from boundflow.domains.alpha import _slopes
from boundflow.domains.backward import backward
from boundflow.domains.coeffs import BackwardContext
from boundflow.domains.crown_relaxed import MEMO_BYTES, LinesMemo
from boundflow.domains.interval import Interval
from boundflow.ir.graph import Graph

ALPHA_LR = 0.1       # the activations' relaxation parameters, optimised with the multipliers


def beta_lower(graph: Graph, A: torch.Tensor, x: Interval, tensors: Mapping[str, torch.Tensor],
               bounds: Mapping[str, Interval], lower_slope: str,
               signs: Mapping[str, torch.Tensor], start: torch.Tensor, iterations: int,
               lr: float, done: Callable[[torch.Tensor], bool] | None = None
               ) -> torch.Tensor:
    """The best lower bound of ``A·output`` (``A``: ``[B, S, *out]``) over each domain,
    from ``start`` (``[B, S]``, a bound already proven) and ``iterations`` steps on the
    multipliers of the split neurons in ``signs`` (node -> ``[B, *shape]`` of -1/0/+1);
    fewer where ``done(best)`` says the best bounds so far are all a caller needs."""
    split = {n: s.to(A.device, A.dtype) for n, s in signs.items() if bool((s != 0).any())}
    if not split or iterations <= 0 or (done is not None and done(start)):
        return start
    B, S = A.shape[:2]
    betas = {n: torch.zeros((B, S) + tuple(s.shape[1:]), dtype=A.dtype, device=A.device,
                            requires_grad=True)
             for n, s in split.items()}
    slopes_params: list[torch.Tensor] = []
    slopes = _slopes(graph, graph.output, S, bounds, lower_slope, slopes_params)
    opt = Adam([(list(betas.values()), lr), (slopes_params, ALPHA_LR)])
    best = start.clone()
    # the intervals are fixed: what depends on them alone is found once for every step
    ctx = BackwardContext(bounds, lower_slope, slopes, patches=False,
                          lines=LinesMemo(MEMO_BYTES))
    with torch.enable_grad():
        for _ in range(iterations):
            terms = {n: -b * split[n].unsqueeze(1) for n, b in betas.items()}
            res = backward(graph, graph.output, A, x, tensors, ctx._replace(lower_terms=terms))
            best = torch.maximum(best, res.lower.detach())
            if done is not None and done(best):
                return best
            opt.zero_grad()
            (-res.lower.sum()).backward()
            opt.step()
            with torch.no_grad():
                for b in betas.values():
                    b.clamp_(min=0)
                for p in slopes_params:
                    p.clamp_(0.0, 1.0)
        terms = {n: -b.detach() * split[n].unsqueeze(1) for n, b in betas.items()}
        res = backward(graph, graph.output, A, x, tensors, ctx._replace(lower_terms=terms))
    return torch.maximum(best, res.lower.detach())
