"""Is a tuning run still alive? Its heartbeat, and, on the same machine, its process.

A run records the process that runs it as ``process_id()``: ``BOOT/PIDNS/PID/START`` (the
kernel's boot id, the PID namespace, the process id and its start time in clock ticks, all from
``/proc``), so a reader in the same PID namespace of the same boot can tell for certain that
the process is gone (or that its PID now belongs to another process) without waiting for the
heartbeat to go stale. Anywhere else (another machine or container, no ``/proc``) only the
heartbeat speaks: a run whose last heartbeat is older than its own ``heartbeat_timeout`` is
dead. Clocks of machines sharing a database are assumed to agree to well within the timeout.
"""

from __future__ import annotations

import functools
import os

DEFAULT_HEARTBEAT_TIMEOUT = 60.0       # seconds a run may go without a heartbeat


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _stat(pid: int | str) -> tuple[str, str] | None:
    """(state, start time) of a process from ``/proc/PID/stat``, or None."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()       # fields 3.. (the name may hold spaces)
    return (fields[0], fields[19]) if len(fields) > 19 else None


@functools.lru_cache(maxsize=1)
def _namespace() -> str | None:
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return None if not boot else f"{boot.strip()}/{pidns}"


def process_id() -> str | None:
    """This process, as ``BOOT/PIDNS/PID/START`` (None where ``/proc`` cannot tell)."""
    ns, me = _namespace(), _stat("self")
    return None if ns is None or me is None else f"{ns}/{os.getpid()}/{me[1]}"


def process_alive(owner: str | None) -> bool | None:
    """Whether the process ``owner`` (a :func:`process_id`) still runs: True or False when
    it is of this machine's boot and PID namespace, None when this process cannot tell."""
    ns = _namespace()
    if not owner or ns is None or not owner.startswith(ns + "/"):
        return None
    try:
        pid, start = owner[len(ns) + 1:].split("/")
    except ValueError:
        return None
    stat = _stat(pid)
    # gone, a zombie, or the PID reused by a process that started later
    return stat is not None and stat[0] not in ("Z", "X", "x") and stat[1] == start


def is_dead(status: str, heartbeat_at: float | None, started: float,
            heartbeat_timeout: float | None, owner: str | None, now: float) -> bool:
    """Whether a run recorded as ``status`` is dead at ``now``: it says it is running, but its
    process is gone or its heartbeat is older than its timeout."""
    if status != "running":
        return False
    if process_alive(owner) is False:
        return True
    last = heartbeat_at if heartbeat_at is not None else started
    timeout = heartbeat_timeout if heartbeat_timeout is not None else DEFAULT_HEARTBEAT_TIMEOUT
    return now - last > timeout
