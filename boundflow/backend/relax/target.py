"""TVM targets and devices from BoundFlow's canonical target strings (``boundflow.target``)."""

from __future__ import annotations

from typing import Any

import tvm

from boundflow.target import TargetError, canonical_target, target_config


def tvm_target(target: Any) -> tvm.target.Target:
    """``target`` (a canonical or user-written target string, or a ``tvm.target.Target``) as a
    TVM 0.27 ``Target``, built from its JSON form; TVM's refusals become :class:`TargetError`.

    ``llvm`` without ``-mcpu`` means this machine's CPU (LLVM's name for it, e.g. ``znver4``),
    so kernels use its vector width, as eager PyTorch's libraries do by dispatching at run
    time; without it LLVM targets generic x86-64 (SSE2), a quarter of AVX-512's lanes. The
    compile cache keys on the resolved target, so a module is never run on another CPU kind.
    Name ``-mcpu`` to cross-compile."""
    if isinstance(target, tvm.target.Target):
        return target
    text = canonical_target(target)
    config = target_config(text)
    if config["kind"] == "llvm" and "mcpu" not in config:
        config["mcpu"] = host_cpu()
    try:
        return tvm.target.Target(config)
    except Exception as e:                     # TVM raises ValueError / TVMError variants
        raise TargetError(f"TVM does not accept target {text!r}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else e}") from None


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (``generic`` where LLVM does not know it)."""
    name = str(tvm.target.codegen.llvm_get_system_cpu())
    return name if tvm.target.codegen.llvm_is_valid_cpu(name, "") else "generic"


def vector_lanes(target: tvm.target.Target, dtype: str = "float32") -> int:
    """SIMD lanes of ``dtype`` on an llvm ``target`` (4 without AVX, 8 with AVX2, 16 with
    AVX-512); 4 where the CPU is not known."""
    bits = 32 if dtype == "float32" else 64
    try:
        feats = tvm.target.codegen.llvm_get_cpu_features(target)
        width = 512 if "avx512f" in feats else 256 if "avx2" in feats or "avx" in feats else 128
    except Exception:                           # not an x86 target or LLVM without features
        width = 128
    return max(2, width // bits)


def run_device(target: Any) -> Any:
    """The device a module built for ``target`` (a ``tvm.target.Target`` or what
    :func:`tvm_target` takes) runs on here; a :class:`TargetError` when this machine has none
    (a cuda module builds anywhere but runs only where a GPU is). Asked before the target is
    made, so that making it (TVM probes the GPU for its arch, warning when there is none)
    prints nothing beside the error."""
    if not isinstance(target, tvm.target.Target):
        if target_config(canonical_target(target))["kind"] == "cuda" and not tvm.cuda().exist:
            _missing("cuda")
        target = tvm_target(target)
    kind = target.kind.name
    if kind == "llvm":
        return tvm.cpu()
    device = tvm.cuda() if kind == "cuda" else None
    if device is None or not device.exist:
        _missing(kind)
    return device


def _missing(kind: str):
    raise TargetError(f"target {kind}: no {kind.upper()} device is visible on this machine "
                      f"(modules for it build here, but run only where one is; use "
                      f"--target llvm to run on the CPU)")
