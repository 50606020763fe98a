"""Adam for the relaxation parameters of alpha-CROWN and the multipliers of beta-CROWN.

The same update as ``torch.optim.Adam(..., fused=True)`` (betas 0.9 / 0.999, eps 1e-8, no
weight decay; the same fused kernel, so the same numbers: ``tests/domains/test_adam.py``),
without ``torch.optim``'s ``Optimizer``: its constructor imports ``torch._dynamo`` on first
use, which took 1.1-1.7 s of this 2-core host's time in the first alpha-CROWN or
beta-CROWN bound of every process (the first refinement of an input-split search's
escalation: 1.54 s where the next ones took 0.43 s). A parameter with no gradient after a
backward pass is left alone in that step, as ``torch.optim`` does.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


class Adam:
    """``groups``: (parameters, step size) pairs; :meth:`decay` scales every step size
    (``ExponentialLR``'s ``gamma``)."""

    def __init__(self, groups: Sequence[tuple[Sequence[torch.Tensor], float]]):
        self.groups = [(list(params), float(lr)) for params, lr in groups]
        self._state: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def zero_grad(self) -> None:
        for params, _ in self.groups:
            for p in params:
                p.grad = None

    def decay(self, gamma: float) -> None:
        self.groups = [(params, lr * gamma) for params, lr in self.groups]

    def take(self, moved: Mapping[torch.Tensor, tuple[torch.Tensor, int]],
             keep: torch.Tensor) -> None:
        """Go on with each parameter ``p`` of ``moved`` replaced by ``moved[p] = (q,
        axis)`` or ``(q, axis, index)``, ``q`` being ``p``'s entries ``index`` (default
        ``keep``) along ``axis``: its moments are taken the same way, so ``q`` takes the
        steps those entries of ``p`` would have taken."""
        state = dict(self._state)
        for p, (q, axis, *index) in moved.items():
            rows = index[0] if index else keep
            old = state.pop(id(p), None)
            if old is not None:
                state[id(q)] = (old[0].index_select(axis, rows),
                                old[1].index_select(axis, rows), old[2])
        self._state = state
        self.groups = [([moved[p][0] if p in moved else p for p in params], lr)
                       for params, lr in self.groups]

    @torch.no_grad()
    def step(self) -> None:
        """One step of every parameter with a gradient (one fused call per group: a group's
        tensors share one device and dtype, as alpha's and beta's do)."""
        for params, lr in self.groups:
            live = [p for p in params if p.grad is not None]
            if not live:
                continue
            states = [self._init(p) for p in live]
            steps = [s[2] for s in states]
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(live, [p.grad for p in live], [s[0] for s in states],
                               [s[1] for s in states], [], steps, amsgrad=False, lr=lr,
                               beta1=BETA1, beta2=BETA2, weight_decay=0.0, eps=EPS,
                               maximize=False, grad_scale=None, found_inf=None)

    def _init(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        state = self._state.get(id(p))
        if state is None:
            # the step counter a float32 scalar on the parameter's device, as fused Adam's
            state = (torch.zeros_like(p, memory_format=torch.preserve_format),
                     torch.zeros_like(p, memory_format=torch.preserve_format),
                     torch.zeros((), dtype=torch.float32, device=p.device))
            self._state[id(p)] = state
        return state


__all__ = ["Adam"]
