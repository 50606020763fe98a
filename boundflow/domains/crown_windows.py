"""The geometry of receptive-field windows, for CROWN's patch form
(:mod:`boundflow.domains.crown_conv`).

Bounding every neuron of a ``Cs x Ho x Wo`` start node, the coefficients on an upstream
``C x H x W`` map are non-zero only inside each start position's receptive field. A
:class:`Window` says where: the window of start position ``p = (ph, pw)`` covers rows
``ph·S - O ... ph·S - O + R - 1`` of the map (likewise columns), for a size ``R``, stride
``S`` and offset ``O`` per axis; coefficients are stored per position as ``[C, Rh, Rw]``
windows, and the entries that fall off the map stand for nothing (the walk zeroes them).

Windows grow through convolution-like ops (:meth:`Window.grown`), shift through a pad
(:meth:`Window.shifted`) and, where a node is read along several paths, are joined into the
smallest window holding all of them (:meth:`Window.joined`). Stride 0 marks the *whole-map*
form: every position's window is the map itself, i.e. dense coefficients kept in window
layout; it takes over where a window would span the whole map anyway, or where paths of
different stride meet. Maps become windows by :meth:`Window.unfold`, windows become whole
maps by :meth:`Window.to_whole`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Pair = tuple[int, int]


@dataclass(frozen=True)
class Window:
    """Where the windows of the ``out_hw`` start positions lie on a map (module docstring).
    Stride 0 is the *whole-map* form: every position's window is the same (the map itself,
    once :meth:`joined` has cut it), i.e. dense coefficients in window layout."""

    size: Pair
    stride: Pair
    offset: Pair
    out_hw: Pair
    # the start positions (flat in out_hw) of the rows when they are a subset of the neurons
    rows: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def whole(self, hw: Pair) -> "Window":
        """The whole-map window of an ``hw`` map, for the same rows."""
        return Window(tuple(hw), (0, 0), (0, 0), self.out_hw, self.rows)

    @property
    def is_whole(self) -> bool:
        return self.stride == (0, 0)

    def grown(self, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair = (1, 1)
              ) -> "Window":
        """The window on the input of a convolution-like op reading this one."""
        return Window(tuple((self.size[i] - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1
                            for i in (0, 1)),
                      tuple(self.stride[i] * stride[i] for i in (0, 1)),
                      tuple(self.offset[i] * stride[i] + padding[i] for i in (0, 1)),
                      self.out_hw, self.rows)

    def shifted(self, before: Pair) -> "Window":
        """The window on the input of a pad adding ``before`` rows and columns first."""
        return Window(self.size, self.stride,
                      tuple(self.offset[i] + before[i] for i in (0, 1)), self.out_hw, self.rows)

    def joined(self, other: "Window | None", hw: Pair) -> "Window":
        """The window of an ``hw`` map that readers leave windows ``self`` and ``other`` (or
        None) on: the smallest holding both where they step alike (the largest offset and
        the largest extent past the start position); else, or where that spans the whole
        map (a dense row is then no larger), the whole-map window."""
        win = self
        if other is not None:
            if self.stride != other.stride:
                return self.whole(hw)
            offset = tuple(max(self.offset[i], other.offset[i]) for i in (0, 1))
            end = tuple(max(self.size[i] - self.offset[i], other.size[i] - other.offset[i])
                        for i in (0, 1))
            win = Window(tuple(end[i] + offset[i] for i in (0, 1)), self.stride, offset,
                         self.out_hw, self.rows)
        if win.is_whole or all(win.size[i] >= hw[i] for i in (0, 1)):
            return self.whole(hw)
        return win

    def widths_to(self, target: "Window") -> list[int]:
        """``F.pad`` widths (left, right, top, bottom) that place this window in ``target``
        of the same stride (negative ones cut)."""
        before = [target.offset[i] - self.offset[i] for i in (0, 1)]
        after = [target.size[i] - self.size[i] - before[i] for i in (0, 1)]
        return [before[1], after[1], before[0], after[0]]

    def inside(self, hw: Pair) -> bool:
        """Whether every entry of every window lies on an ``hw`` map."""
        return all(self.offset[i] <= 0 and (self.out_hw[i] - 1) * self.stride[i]
                   + self.size[i] - self.offset[i] <= hw[i] for i in (0, 1))

    def to_whole(self, t: torch.Tensor, hw: Pair) -> torch.Tensor:
        """Coefficients ``[B', L', Cs, C, Rh, Rw]`` on these (strided) windows as whole-map
        ones ``[B', L, Cs, C, H, W]`` (``L``: the positions, or the rows): pixel ``q`` of
        position ``p`` is window entry ``q - (p·S - O)``, or zero outside the window."""
        H, W = hw
        dev = t.device

        def entry(axis, n):            # [positions, pixels]: window entry, or -1 if none
            r = torch.arange(n, device=dev)[None, :] - (
                torch.arange(self.out_hw[axis], device=dev)[:, None] * self.stride[axis]
                - self.offset[axis])
            return torch.where((r >= 0) & (r < self.size[axis]), r, -1)
        rh, rw = entry(0, H), entry(1, W)
        none = self.size[0] * self.size[1]                       # the appended zero entry
        index = torch.where((rh[:, None, :, None] >= 0) & (rw[None, :, None, :] >= 0),
                            rh[:, None, :, None] * self.size[1] + rw[None, :, None, :], none)
        index = index.reshape(-1, H * W)
        if self.rows is not None:
            index = index[self.rows]
        L = index.shape[0]
        src = F.pad(t.flatten(-2), (0, 1))                       # [B', L', Cs, C, R·R + 1]
        lead = (src.shape[0], L) + tuple(src.shape[2:4])
        out = src.expand(lead + (none + 1,)).gather(
            -1, index.reshape(1, L, 1, 1, H * W).expand(lead + (H * W,)))
        return out.reshape(lead + (H, W))

    def unfold(self, t: torch.Tensor) -> torch.Tensor:
        """A map ``[B, C, H, W]`` as windows ``[B, L, 1, C, Rh, Rw]`` (zero off the map;
        ``L``: the positions, or the rows; 1 for the whole-map form, alike for all)."""
        B, C, H, W = t.shape
        (rh, rw), (sh, sw), (oh, ow), (ho, wo) = self.size, self.stride, self.offset, self.out_hw
        if self.is_whole:
            t = F.pad(t, (ow, rw - W - ow, oh, rh - H - oh))
            return t.reshape(B, 1, 1, C, rh, rw)
        need_h, need_w = (ho - 1) * sh + rh, (wo - 1) * sw + rw
        t = F.pad(t, (ow, max(0, need_w - W - ow), oh, max(0, need_h - H - oh)))
        t = t[..., :need_h, :need_w]                  # exactly the area the windows cover
        # [B, L, C*rh*rw] in memory order: later products with window-layout coefficients
        # then run over contiguous memory
        cols = F.unfold(t, (rh, rw), stride=(sh, sw)).transpose(1, 2).contiguous()
        if self.rows is not None:                     # only the rows' windows (rows share
            cols = cols.index_select(1, self.rows)    # positions: unfold once, then pick)
        return cols.reshape(B, -1, 1, C, rh, rw)


def mask(shape, win: Window, like: torch.Tensor) -> torch.Tensor:
    """``[1, L, 1, C, Rh, Rw]``: 1 on the entries of windows that lie on a ``shape`` map."""
    return win.unfold(torch.ones((1,) + tuple(shape), dtype=like.dtype, device=like.device))


def start_window(shape, like: torch.Tensor, index: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, Window]:
    """The identity on a ``(C, H, W)`` node in window layout and its one-entry window: every
    neuron, ``[1, 1, C, C, 1, 1]`` (alike for every position); or the neurons ``index``
    (flat), ``[1, k, 1, C, 1, 1]`` with the rows' positions in the window."""
    C, H, W = shape
    if index is None:
        eye = torch.eye(C, dtype=like.dtype, device=like.device)
        return eye.reshape(1, 1, C, C, 1, 1), Window((1, 1), (1, 1), (0, 0), (H, W))
    pick = F.one_hot(index // (H * W), C).to(like.dtype)
    return pick.reshape(1, -1, 1, C, 1, 1), Window((1, 1), (1, 1), (0, 0), (H, W),
                                                   index % (H * W))
