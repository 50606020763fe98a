"""The steady heap (boundflow/heap.py): after ``import boundflow``, tensors freed and
allocated again come from reused heap memory, not freshly faulted-in pages; the opt-out
leaves glibc's malloc alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# three 8 MiB blocks written and freed, again and again (as a bound call does with its
# tensors; raw malloc, as torch's CPU allocator calls it). glibc by default maps them fresh,
# or, once its threshold has moved, trims them off the heap when freed: every round faults
# their pages in again (6,112 faults a round here). The steady heap keeps them.
_PATTERN = """
import ctypes, resource
import boundflow
libc = ctypes.CDLL(None)
libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                                ctypes.c_size_t]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 8 << 20
def step():
    blocks = []
    for _ in range(3):
        p = ctypes.c_void_p()
        assert libc.posix_memalign(ctypes.byref(p), 64, size) == 0
        libc.memset(p, 1, size)
        blocks.append(p)
    for p in blocks:
        libc.free(p)
for _ in range(10):         # the heap settles (grows to hold them, with Python's own)
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(boundflow.heap.applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20)
"""


def _faults(**env):
    out = subprocess.run([sys.executable, "-c", _PATTERN], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT, **env))
    assert out.returncode == 0, out.stderr[-2000:]
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_tensors_come_back_from_the_heap_without_page_faults():
    import ctypes

    if not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):
        pytest.skip("not glibc")
    applied, faults = _faults()
    assert applied and faults < 8, faults
    applied, faults = _faults(BOUNDFLOW_STEADY_HEAP="0")
    assert not applied and faults > 1000, faults           # the opt-out: glibc's own way


def test_steady_is_idempotent_and_honours_the_opt_out(monkeypatch):
    from boundflow import heap

    monkeypatch.setattr(heap, "applied", False)
    monkeypatch.setenv("BOUNDFLOW_STEADY_HEAP", "0")
    assert heap.steady() is False and heap.applied is False
    monkeypatch.delenv("BOUNDFLOW_STEADY_HEAP")
    first = heap.steady()
    assert heap.steady() is first and heap.applied is first
