"""TVM targets and devices from BoundFlow's canonical target strings (``boundflow.target``)."""

from __future__ import annotations

from typing import Any

import tvm

from boundflow.target import TargetError, canonical_target, target_config


def tvm_target(target: Any) -> tvm.target.Target:
    """``target`` (a canonical or user-written target string, or a ``tvm.target.Target``) as a
    TVM 0.27 ``Target``, built from its JSON form; TVM's refusals become :class:`TargetError`."""
    if isinstance(target, tvm.target.Target):
        return target
    text = canonical_target(target)
    try:
        return tvm.target.Target(target_config(text))
    except Exception as e:                     # TVM raises ValueError / TVMError variants
        raise TargetError(f"TVM does not accept target {text!r}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else e}") from None


def run_device(target: tvm.target.Target) -> Any:
    """The device a module built for ``target`` runs on here; a :class:`TargetError` when this
    machine has none (a cuda module builds anywhere but runs only where a GPU is)."""
    kind = target.kind.name
    if kind == "llvm":
        return tvm.cpu()
    device = tvm.cuda() if kind == "cuda" else None
    if device is None or not device.exist:
        raise TargetError(f"target {kind}: no {kind.upper()} device is visible on this machine "
                          f"(modules for it build here, but run only where one is; use "
                          f"--target llvm to run on the CPU)")
    return device
