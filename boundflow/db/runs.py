"""Tuning runs and their claims, as steps inside one of ``Database``'s transactions.

Several tuners may work on one workload at once (processes on one machine, or machines sharing
a PostgreSQL database). They coordinate through two tables:

* ``bf_tuning_runs``: each run with its backend, machine, process and heartbeat. A run that
  says ``running`` but whose process is gone or whose heartbeat is older than its
  ``heartbeat_timeout`` is *dead* (``liveness.is_dead``); readers report it so at once, and
  the next claim (or ``Database.reap_dead_runs``) marks it ``dead`` and drops its claims.
* ``bf_claims``: a plan a live run is measuring, unique per (workload, plan, backend, target,
  machine). A run takes claims before measuring, against the trial budget; the transaction
  that writes a plan's measurement deletes its claim.

The *scope* of a budget is (workload, backend, machine): the workload key holds the target,
and timings of one machine say nothing about another, so each machine tunes its own budget.
A plan *counts* in a scope when it has a measurement there or a claim there.

Nothing here commits: every function runs inside the caller's transaction.
"""

from __future__ import annotations

import time
from typing import Iterable

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from boundflow.db.liveness import is_dead
from boundflow.db.models import CandidateRow, ClaimRow, MeasurementRow, TuningRunRow, \
    WorkloadRow


def run_is_dead(row: TuningRunRow, now: float) -> bool:
    return is_dead(row.status, row.heartbeat_at, row.started, row.heartbeat_timeout, row.owner,
                   now)


def reap(s: Session, now: float | None = None) -> list[int]:
    """Mark every dead run ``dead`` and delete its claims; the ids marked."""
    now = time.time() if now is None else now
    marked = []
    for r in s.scalars(select(TuningRunRow).where(TuningRunRow.status == "running")).all():
        if not run_is_dead(r, now):
            continue
        # only if it is still as seen: a heartbeat committed meanwhile keeps it alive
        beat = TuningRunRow.heartbeat_at
        same = beat.is_(None) if r.heartbeat_at is None else beat == r.heartbeat_at
        done = s.execute(update(TuningRunRow)
                         .where(TuningRunRow.id == r.id, TuningRunRow.status == "running", same)
                         .values(status="dead", finished=now)
                         .execution_options(synchronize_session=False))
        if done.rowcount:
            s.execute(delete(ClaimRow).where(ClaimRow.run_id == r.id))
            marked.append(r.id)
    s.expire_all()
    return marked


def lock_workload(s: Session, wrow: WorkloadRow) -> None:
    """Serialise the claimers of one workload: a row lock on PostgreSQL (held to the end of
    the transaction); SQLite's ``BEGIN IMMEDIATE`` already admits one writer at a time."""
    s.execute(select(WorkloadRow.id).where(WorkloadRow.id == wrow.id).with_for_update())


def counted(s: Session, wrow: WorkloadRow, backend: str, machine: str
            ) -> tuple[set[str], set[str]]:
    """(measured, claimed) plan keys of the scope. Claims are read first: a measurement that
    commits between the two reads moves its plan from claimed to measured, so the plan is
    seen in both rather than in neither (PostgreSQL's read-committed statements each see the
    latest commits)."""
    claimed = set(s.scalars(select(ClaimRow.candidate_key).where(
        ClaimRow.workload_id == wrow.id, ClaimRow.backend == backend,
        ClaimRow.target == wrow.target, ClaimRow.machine == machine)))
    measured = set(s.scalars(select(CandidateRow.key).distinct()
                             .join(MeasurementRow, MeasurementRow.candidate_id == CandidateRow.id)
                             .where(CandidateRow.workload_id == wrow.id,
                                    MeasurementRow.backend == backend,
                                    MeasurementRow.target == wrow.target,
                                    MeasurementRow.machine == machine)))
    return measured, claimed


def take(s: Session, run: TuningRunRow, wrow: WorkloadRow, keys: Iterable,
         budget: int | None, now: float, backends: Iterable[str] | None = None) -> list:
    """Claim for ``run`` each of ``keys`` (in order) that is neither measured nor claimed in
    its scope, while the scopes of ``backends`` (default: the run's backend) count fewer than
    ``budget`` (plan, backend) candidates together; the keys claimed. A key is a plan key
    (on the run's backend) or a ``(plan key, backend)`` pair."""
    lock_workload(s, wrow)
    scopes = list(dict.fromkeys(backends or (run.backend,)))
    taken = {b: set().union(*counted(s, wrow, b, run.machine)) for b in scopes}
    used = sum(len(v) for v in taken.values())
    out: list = []
    for key in dict.fromkeys(keys):
        plan, backend = (key, run.backend) if isinstance(key, str) else tuple(key)
        if backend not in taken:
            taken[backend] = set().union(*counted(s, wrow, backend, run.machine))
        if plan in taken[backend]:
            continue
        if budget is not None and used >= budget:
            break
        s.add(ClaimRow(workload_id=wrow.id, candidate_key=plan, backend=backend,
                       target=wrow.target, machine=run.machine, run_id=run.id, created=now))
        taken[backend].add(plan)
        used += backend in scopes
        out.append(key)
    s.flush()            # a concurrent claim of the same plan fails here, on the unique key
    return out


def release_measured(s: Session, wrow: WorkloadRow, key: str, backend: str, target: str,
                     machine: str, run_id: int | None) -> None:
    """Delete the claim a measurement settles: the plan's claim in the measurement's scope,
    and any claim ``run_id`` holds on the plan."""
    match = ClaimRow.machine == machine
    if run_id is not None:
        match = or_(match, ClaimRow.run_id == run_id)
    s.execute(delete(ClaimRow).where(ClaimRow.workload_id == wrow.id,
                                     ClaimRow.candidate_key == key, ClaimRow.backend == backend,
                                     ClaimRow.target == target, match))


def release_run(s: Session, run_id: int) -> None:
    s.execute(delete(ClaimRow).where(ClaimRow.run_id == run_id))
