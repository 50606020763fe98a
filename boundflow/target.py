"""Compilation targets as plain data: one canonical string per target.

Users write targets the way TVM always took them (``"llvm -mcpu=x86-64"``) or the way TVM
0.27 wants them (``'{"kind": "llvm", "mcpu": "x86-64"}'``); both become the canonical string
``"llvm -mcpu=x86-64"`` (attributes sorted), which is what workload keys and the tuning
database hold. :func:`target_config` turns it back into the dict TVM 0.27's ``Target``
takes. Pure data: no TVM here.
"""

from __future__ import annotations

import json
import re
from typing import Any

from boundflow.errors import BoundFlowError

TARGETS = ("llvm", "cuda")

_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")
_VALUE = re.compile(r"^[A-Za-z0-9_.+,:-]+$")


class TargetError(BoundFlowError):
    """A target that is not one BoundFlow compiles for, or is written wrongly."""


def canonical_target(text: Any) -> str:
    """The canonical form of a target given as ``"kind -key=value ..."`` or as a JSON object
    ``{"kind": ..., "key": value, ...}``; raises :class:`TargetError` naming the problem."""
    if not isinstance(text, str) or not text.strip():
        raise TargetError(f"target must be a non-empty string, got {text!r}")
    text = text.strip()
    if text.startswith("{"):
        kind, attrs = _from_json(text)
    else:
        kind, attrs = _from_flags(text)
    if kind not in TARGETS:
        raise TargetError(f"target kind {kind!r} is not one of {', '.join(TARGETS)}")
    for key, value in attrs.items():
        if not _KEY.match(key) or not _VALUE.match(value):
            raise TargetError(f"target {text!r}: attribute {key}={value!r} is not a plain "
                              f"name=value pair")
    return " ".join([kind] + [f"-{k}={attrs[k]}" for k in sorted(attrs)])


def target_kind(target: str) -> str:
    """``"llvm"`` or ``"cuda"`` of a canonical target."""
    return canonical_target(target).split()[0]


def target_config(target: str) -> dict[str, Any]:
    """The dict TVM 0.27's ``tvm.target.Target`` takes for a canonical target (integers as
    integers; ``keys`` and other comma lists as lists)."""
    kind, *flags = canonical_target(target).split()
    config: dict[str, Any] = {"kind": kind}
    for flag in flags:
        key, value = flag[1:].split("=", 1)
        config[key] = int(value) if value.isdigit() else value.split(",") if "," in value \
            else value
    return config


def _from_json(text: str) -> tuple[str, dict[str, str]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TargetError(f"target {text!r} is not valid JSON: {e.msg}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        raise TargetError(f"target {text!r}: a JSON target is an object with a \"kind\"")
    attrs = {}
    for key, value in obj.items():
        if key == "kind":
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, list)):
            raise TargetError(f"target {text!r}: attribute {key!r} must be a string, an "
                              f"integer or a list of them")
        if isinstance(value, list):
            if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
                raise TargetError(f"target {text!r}: attribute {key!r} lists non-strings")
            value = ",".join(map(str, value))
        attrs[str(key)] = str(value)
    return obj["kind"], attrs


def _from_flags(text: str) -> tuple[str, dict[str, str]]:
    kind, *flags = text.split()
    attrs = {}
    for flag in flags:
        if not flag.startswith("-") or "=" not in flag:
            raise TargetError(f"target {text!r}: {flag!r} is not of the form -key=value")
        key, value = flag.lstrip("-").split("=", 1)
        attrs[key] = value
    return kind, attrs
