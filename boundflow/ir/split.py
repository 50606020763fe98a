"""The ReLU split state of a batch of branch-and-bound domains, an input of a plan run.

Each domain fixes some unstable ReLUs to one side: ``+1`` (active: its input ``z >= 0``),
``-1`` (inactive: ``z <= 0``), ``0`` (free). A plan run under a split state bounds each domain
over its part of the box: after a task bounds a split ReLU's input, the active neurons' lower
bound is raised to 0 and the inactive ones' upper bound lowered to 0, and every later bound
(intermediate and final) starts from those. Every bound so computed holds on the domain's
part of the box. A domain whose constraints contradict the bounds (active where the upper
bound is below 0, say) is empty; its bounds are vacuous, kept finite. With
``beta_iterations`` the final bound also takes the split constraints as optimised
multipliers (beta-CROWN, :mod:`boundflow.domains.beta`); with a ``goal`` (the search's
thresholds and disjuncts) those steps stop once every domain of the batch is proven, and an
alpha-CROWN final bound drops each domain from its optimisation once it is proven (torch
backend; a split state with a goal and no split nodes carries just that, as input
splitting's alpha bounds do).

``reference[node]``: bounds of a split node known to hold on each domain (in branch-and-bound,
the parent domain's: a child's part of the box lies inside its parent's). Every bound the run
computes for the node is intersected with them, so a child's bounds are never looser than its
parent's. With ``reuse`` the run does not recompute the nodes it has references for at all:
the tasks whose every output is such a node take the references as their outputs (as a cache
hit), and only the rest (the final bound, and what it needs besides) runs. That is
alpha-beta-CROWN's fixed intermediate bounds: one backward pass per domain instead of one per
layer, at the price of the tightening a split would bring to the layers after it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Mapping

import torch

from boundflow.errors import BoundFlowError
from boundflow.ir.spec import proof_margin


@dataclass(frozen=True, eq=False)
class ReluSplit:
    """``signs[node]``: ``[batch, *shape]`` of -1 / 0 / +1 for the input node of a ReLU."""

    signs: Mapping[str, torch.Tensor]
    beta_iterations: int = 0        # beta-CROWN steps on the final bound (0: none)
    beta_lr: float = 0.05
    reference: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    reuse: bool = False             # take the reference bounds instead of recomputing them
    # the goal of the search: (thresholds [rows], each disjunct's (start, end) of rows); the
    # beta steps stop once every domain's lower bounds rule out every disjunct, and alpha's
    # optimisation drops each domain whose lower bounds do
    goal: tuple[torch.Tensor, tuple[tuple[int, int], ...]] | None = None

    def __post_init__(self):
        if not isinstance(self.beta_iterations, int) or self.beta_iterations < 0:
            raise BoundFlowError(f"beta_iterations must be an integer >= 0, got "
                                 f"{self.beta_iterations!r}")
        for node, s in self.signs.items():
            if not isinstance(s, torch.Tensor) or s.dim() < 1:
                raise BoundFlowError(f"the split state of {node!r} must be a batched tensor")
        for node, ref in (self.reference or {}).items():
            if (not isinstance(ref, tuple) or len(ref) != 2
                    or not all(isinstance(r, torch.Tensor) for r in ref)
                    or ref[0].shape != ref[1].shape):
                raise BoundFlowError(f"the reference bounds of {node!r} must be a (lower, "
                                     f"upper) pair of tensors of one shape")
        if self.reuse and not self.reference:
            raise BoundFlowError("reuse needs reference bounds")
        if self.goal is not None:
            thr, ranges = self.goal
            if (not isinstance(thr, torch.Tensor) or thr.dim() != 1 or not ranges
                    or any(not 0 <= a < b <= thr.shape[0] for a, b in ranges)):
                raise BoundFlowError("the goal must be (thresholds [rows], non-empty "
                                     "(start, end) row ranges within them)")

    def proven(self, lower: torch.Tensor) -> bool:
        """Whether ``lower`` ([domains, rows]) rules out every disjunct of the goal on every
        domain (some row of each above its threshold); False without a goal."""
        return self.goal is not None and bool(self.proven_rows(lower).all())

    def proven_rows(self, lower: torch.Tensor) -> torch.Tensor:
        """``[domains]``: whether ``lower`` rules out every disjunct of the goal on each
        domain (all False without a goal; a NaN bound proves nothing)."""
        done = torch.zeros(lower.shape[0], dtype=torch.bool, device=lower.device)
        if self.goal is None:
            return done
        thr, ranges = self.goal
        gap = proof_margin(lower, thr.to(lower.device, lower.dtype))
        done = ~done
        for a, b in ranges:
            done &= (gap[:, a:b] > 0).any(1)
        return done

    def part(self, samples: slice) -> "ReluSplit":
        """The split state of the batch's ``samples`` (a slice along the batch)."""
        ref = None if self.reference is None else {
            n: (lo[samples], hi[samples]) for n, (lo, hi) in self.reference.items()}
        return replace(self, signs={n: s[samples] for n, s in self.signs.items()},
                       reference=ref)

    def __repr__(self) -> str:                     # a stable key for bound caches
        h = hashlib.sha1()
        for node in sorted(self.signs):
            h.update(node.encode())
            h.update(self.signs[node].to(torch.int8).contiguous().numpy().tobytes())
        for node in sorted(self.reference or {}):
            h.update(b"ref:" + node.encode())
            for r in self.reference[node]:
                h.update(r.detach().cpu().contiguous().numpy().tobytes())
        if self.goal is not None:
            h.update(b"goal:" + self.goal[0].detach().cpu().double().numpy().tobytes()
                     + repr(tuple(self.goal[1])).encode())
        return (f"ReluSplit({h.hexdigest()[:16]}, beta={self.beta_iterations}@{self.beta_lr}"
                f"{', reuse' if self.reuse else ''})")

    def check(self, batch: int, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Every split node is one of ``shapes`` (the nodes a plan bounds), with ``batch``
        rows of its shape."""
        refs = {node: lo for node, (lo, _) in (self.reference or {}).items()}
        for what, tensors in (("the split state", self.signs), ("the reference bounds", refs)):
            for node, t in tensors.items():
                if node not in shapes:
                    raise BoundFlowError(f"{what}: {node!r} is not a node whose bounds this "
                                         f"plan computes")
                if tuple(t.shape) != (batch,) + tuple(shapes[node]):
                    raise BoundFlowError(f"{what} of {node!r}: shape {list(t.shape)}, not "
                                         f"{[batch, *shapes[node]]}")

    def tighten(self, node: str, lower: torch.Tensor, upper: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``node``'s bounds on each domain's part of the box: ``lower``/``upper`` (computed
        over it) intersected with the reference bounds, then the split constraints."""
        ref = (self.reference or {}).get(node)
        if ref is not None:
            lower = torch.maximum(lower, ref[0].to(lower.device, lower.dtype))
            upper = torch.minimum(upper, ref[1].to(upper.device, upper.dtype))
            upper = torch.maximum(upper, lower)     # disjoint: an empty domain, kept finite
        s = self.signs.get(node)
        if s is None:
            return lower, upper
        s = s.to(lower.device)
        zero = torch.zeros((), dtype=lower.dtype, device=lower.device)
        lower = torch.where(s > 0, torch.maximum(lower, zero), lower)
        upper = torch.where(s < 0, torch.minimum(upper, zero), upper)
        return lower, torch.maximum(upper, lower)   # an empty domain: vacuous, finite
