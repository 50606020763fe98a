"""A steady C heap for bound computation: glibc's malloc told to keep freed memory for reuse.

Bound propagation allocates and frees the same multi-megabyte tensors on every call
(coefficients, relaxation slopes, their products). By default glibc serves a block above its
mmap threshold with a fresh ``mmap`` and returns it on free, and trims the top of the heap
once more than twice that threshold lies free there. The threshold itself moves with the
process's history of frees, so one process settles where those tensors come from reused
heap memory and another where every call maps fresh pages and faults each in, zero-filled:
measured here on ACAS Xu CROWN at 32 boxes, 0 against 6,500-7,300 page faults per call, 15
against 28-30 ms, in three processes started the same way. That is a plan's speed changing
by 2x with nothing but its process, which also misleads the tuner's measurements.

:func:`steady` fixes both thresholds (``M_MMAP_THRESHOLD`` at glibc's largest, 32 MiB;
``M_TRIM_THRESHOLD`` at twice that), so blocks below 32 MiB always come from the heap and up
to 64 MiB of free heap is kept. The cost: a process holds up to that much memory it freed.
``import boundflow`` applies it (so ``verify``, ``tune``'s measurement workers and the Python
API compute in the same heap); ``BOUNDFLOW_STEADY_HEAP=0`` leaves malloc alone. Elsewhere
than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3         # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 32 << 20                            # glibc's maximum on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD

applied = False        # whether this process's malloc was set by steady()


def steady() -> bool:
    """Fix glibc malloc's mmap and trim thresholds (see the module docstring); True when
    set, False where not glibc or ``BOUNDFLOW_STEADY_HEAP=0``. Idempotent."""
    global applied
    if applied:
        return True
    if os.environ.get("BOUNDFLOW_STEADY_HEAP", "1").strip() == "0" or \
            not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):       # musl: no such mallopt
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return applied
