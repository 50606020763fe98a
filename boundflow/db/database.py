"""The tuning database: workloads, candidates, measurements, best plans, cost models and
tuning runs, behind a small API that returns frozen records.

``Database(url)`` takes any SQLAlchemy URL (``postgresql+psycopg://...`` for a shared one) or a
file path (SQLite; WAL journal, 30 s busy timeout, writes in ``BEGIN IMMEDIATE`` transactions
so concurrent writers queue instead of failing with "database is locked"); ``":memory:"`` is a
private in-memory database. A database with none of our tables is initialised; one with tables
but not ours, a corrupt file or another schema version raises :class:`DatabaseError`.

A measurement is written with its workload and candidate in one transaction, so a writer killed
mid-way leaves nothing half-written. The best plan per (workload, target, objective) is kept up
to date as measurements arrive (objective ``time``: the smallest median run time).
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, TypeVar

from sqlalchemy import create_engine, event, func, inspect, select
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from boundflow.db.models import APP, SCHEMA_VERSION, Base, BestPlanRow, CandidateRow, \
    CostModelRow, MeasurementRow, Meta, TuningRunRow, WorkloadRow
from boundflow.errors import BoundFlowError, DatabaseError
from boundflow.ir.graph import Graph
from boundflow.ir.plan import PlanBundle
from boundflow.ir.workload import Workload
from boundflow.measure.result import MeasureResult

T = TypeVar("T")
OBJECTIVE_TIME = "time"
_RESULT_FIELDS = ("backend", "target", "error_kind", "error", "median_s", "mean_s", "std_s",
                  "peak_bytes", "peak_source", "mean_width", "verified_fraction", "n_kernels",
                  "compile_seconds", "runner", "machine", "timestamp")


@dataclass(frozen=True)
class WorkloadRecord:
    key: str
    target: str
    weights_hash: str
    workload: Workload
    summary: dict


@dataclass(frozen=True)
class CandidateRecord:
    workload_key: str
    key: str                       # PlanBundle.key
    knobs: str                     # Knobs JSON
    plan: str                      # PlanBundle JSON
    features: tuple[float, ...] | None

    def bundle(self) -> PlanBundle:
        return PlanBundle.from_json(self.plan)


@dataclass(frozen=True)
class MeasurementRecord:
    id: int
    workload_key: str
    candidate_key: str
    result: MeasureResult


@dataclass(frozen=True)
class TuningRecord:
    """A candidate with one of its measurements."""

    workload: WorkloadRecord
    candidate: CandidateRecord
    measurement: MeasurementRecord


@dataclass(frozen=True)
class CostModelRecord:
    id: int
    name: str
    feature_version: str
    blob: bytes
    metrics: dict
    created: float


@dataclass(frozen=True)
class TuningRunRecord:
    id: int
    workload_key: str
    strategy: str
    config: dict
    status: str
    n_trials: int
    started: float
    finished: float | None


def graph_summary(graph: Graph) -> dict:
    """What a person reading the database wants to know about the model."""
    ops: dict[str, int] = {}
    for n in graph.nodes:
        ops[n.op] = ops.get(n.op, 0) + 1
    return {"nodes": len(graph.nodes), "ops": dict(sorted(ops.items())),
            "input_shape": list(graph.input_shape), "output_shape": list(graph.output_shape),
            "params": int(sum(p.size for p in graph.params.values()))}


def _url(url: str | Path | None) -> str:
    if url is None:
        raise DatabaseError("no database given (a file path or an SQLAlchemy URL)")
    text = str(url)
    if text == ":memory:":
        return "sqlite://"
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def _is_busy(e: BaseException) -> bool:
    text = str(getattr(e, "orig", e)).lower()
    return any(s in text for s in ("database is locked", "database is busy", "deadlock",
                                   "could not serialize", "busy"))


class Database:
    """See the module docstring. Every method runs in its own transaction."""

    def __init__(self, url: str | Path | None, *, echo: bool = False):
        self.url = _url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        try:
            if self.url == "sqlite://":
                engine = create_engine(self.url, echo=echo, poolclass=StaticPool,
                                       connect_args={"check_same_thread": False})
            elif self.is_sqlite:
                path = Path(self.url.removeprefix("sqlite:///"))
                if not path.parent.exists():
                    raise DatabaseError(f"no directory {path.parent} for database {path.name}")
                engine = create_engine(self.url, echo=echo,
                                       connect_args={"timeout": 30, "check_same_thread": False})
            else:
                engine = create_engine(self.url, echo=echo, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError, ValueError) as e:
            raise DatabaseError(f"cannot open database {self.shown()}: {e}") from None
        if self.is_sqlite:
            self._sqlite_events(engine)
        self.engine = engine
        self._writer = engine.execution_options(bf_write=True)
        with self._guard("open"):
            self._open()

    def shown(self) -> str:
        """The URL without a password."""
        try:
            from sqlalchemy.engine import make_url
            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:                 # noqa: BLE001 - only for messages
            return "<database>"

    @staticmethod
    def _sqlite_events(engine) -> None:
        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None        # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout = 30000")
            cur.execute("PRAGMA foreign_keys = ON")
            if engine.url.database not in (None, "", ":memory:"):
                cur.execute("PRAGMA journal_mode = WAL")
                cur.execute("PRAGMA synchronous = NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            write = conn.get_execution_options().get("bf_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except BoundFlowError:
            raise
        except SQLAlchemyError as e:
            orig = getattr(e, "orig", None) or e
            text = str(orig).splitlines()[0] if str(orig) else type(orig).__name__
            if "not a database" in text or "malformed" in text:
                raise DatabaseError(f"{self.shown()} is corrupt or not an SQLite database "
                                    f"({text})") from None
            raise DatabaseError(f"database {self.shown()}: {what} failed: {text}") from None

    def _session(self, write: bool = False) -> Session:
        return Session(self._writer if write else self.engine, expire_on_commit=False)

    def _tx(self, what: str, fn: Callable[[Session], T]) -> T:
        """``fn(session)`` in one write transaction, committed when it returns, rolled back
        when it raises; re-run while another writer holds the database (SQLite's busy
        timeout covers most waits; this covers the rest, and PostgreSQL's serialisation
        failures); re-run, a few times, when a concurrent writer inserted the same workload or
        candidate first (a unique-key conflict: the re-run finds the row)."""
        delay, deadline, conflicts = 0.05, time.monotonic() + 120, 0
        with self._guard(what):
            while True:
                try:
                    with self._session(write=True) as s, s.begin():
                        return fn(s)
                except OperationalError as e:
                    if not _is_busy(e) or time.monotonic() > deadline:
                        raise
                except IntegrityError:
                    conflicts += 1
                    if conflicts > 3:
                        raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 1.0)

    # -- schema ------------------------------------------------------------------------------
    def _open(self) -> None:
        tables = set(inspect(self.engine).get_table_names())
        ours = set(Base.metadata.tables)
        if not tables or (tables & ours and "bf_meta" not in tables and tables <= ours):
            self._create()
            return
        if "bf_meta" not in tables:
            raise DatabaseError(f"{self.shown()} is not a BoundFlow tuning database (it has "
                                f"tables {sorted(tables)[:5]})")
        with self._session() as s:
            meta = {m.key: m.value for m in s.scalars(select(Meta))}
        if meta.get("app") != APP:
            raise DatabaseError(f"{self.shown()} is not a BoundFlow tuning database")
        version = meta.get("schema_version")
        if version != str(SCHEMA_VERSION):
            raise DatabaseError(f"{self.shown()} has tuning-database schema version {version}; "
                                f"this BoundFlow reads version {SCHEMA_VERSION}")
        missing = ours - tables
        if missing:
            raise DatabaseError(f"{self.shown()} lacks tables {sorted(missing)}")

    def _create(self) -> None:
        for attempt in range(5):
            try:
                def create(s: Session) -> None:
                    Base.metadata.create_all(s.connection(), checkfirst=True)
                    for key, value in (("app", APP), ("schema_version", str(SCHEMA_VERSION))):
                        if s.get(Meta, key) is None:
                            s.add(Meta(key=key, value=value))
                self._tx("create", create)
                return
            except (DatabaseError, SQLAlchemyError):
                if attempt == 4:          # another process created it concurrently: re-check
                    raise
                time.sleep(0.1 * (attempt + 1))
                if "bf_meta" in set(inspect(self.engine).get_table_names()):
                    with self._session() as s:
                        if s.get(Meta, "schema_version") is not None:
                            return

    # -- records -----------------------------------------------------------------------------
    @staticmethod
    def _workload_record(row: WorkloadRow) -> WorkloadRecord:
        return WorkloadRecord(row.key, row.target, row.weights_hash,
                              Workload.from_dict(row.workload), dict(row.summary))

    @staticmethod
    def _candidate_record(row: CandidateRow, workload_key: str) -> CandidateRecord:
        feats = None if row.features is None else tuple(float(f) for f in row.features)
        return CandidateRecord(workload_key, row.key, row.knobs, row.plan, feats)

    @staticmethod
    def _measurement_record(row: MeasurementRow, workload_key: str, cand_key: str
                            ) -> MeasurementRecord:
        result = MeasureResult(cand_key, times=tuple(row.times or ()),
                               **{f: getattr(row, f) for f in _RESULT_FIELDS})
        return MeasurementRecord(row.id, workload_key, cand_key, result)

    def _tuning_record(self, m: MeasurementRow) -> TuningRecord:
        c, w = m.candidate, m.candidate.workload
        return TuningRecord(self._workload_record(w), self._candidate_record(c, w.key),
                            self._measurement_record(m, w.key, c.key))

    @staticmethod
    def _get_workload(s: Session, workload: Workload, graph: Graph | None) -> WorkloadRow:
        row = s.scalar(select(WorkloadRow).where(WorkloadRow.key == workload.key))
        if row is None:
            row = WorkloadRow(key=workload.key, target=workload.target,
                              weights_hash=workload.weights_hash, workload=workload.to_dict(),
                              summary=graph_summary(graph) if graph is not None else {},
                              created=time.time())
            s.add(row)
            s.flush()
        elif graph is not None and not row.summary:
            row.summary = graph_summary(graph)
        return row

    @staticmethod
    def _get_candidate(s: Session, wrow: WorkloadRow, bundle: PlanBundle,
                       features: Any = None) -> CandidateRow:
        row = s.scalar(select(CandidateRow).where(CandidateRow.workload_id == wrow.id,
                                                  CandidateRow.key == bundle.key))
        feats = None if features is None else [float(f) for f in features]
        if row is None:
            row = CandidateRow(workload_id=wrow.id, key=bundle.key,
                               knobs=bundle.knobs.to_json(), plan=bundle.to_json(),
                               features=feats, created=time.time())
            s.add(row)
            s.flush()
        elif feats is not None:
            row.features = feats
        return row

    # -- writing -----------------------------------------------------------------------------
    def add_workload(self, workload: Workload, graph: Graph | None = None) -> WorkloadRecord:
        return self._tx("add_workload", lambda s: self._workload_record(
            self._get_workload(s, workload, graph)))

    def add_candidate(self, bundle: PlanBundle, features: Any = None,
                      graph: Graph | None = None) -> CandidateRecord:
        def add(s: Session) -> CandidateRecord:
            wrow = self._get_workload(s, bundle.workload, graph)
            return self._candidate_record(self._get_candidate(s, wrow, bundle, features),
                                          wrow.key)
        return self._tx("add_candidate", add)

    def add_measurement(self, bundle: PlanBundle, result: MeasureResult, features: Any = None,
                        graph: Graph | None = None) -> MeasurementRecord:
        """Record ``result`` for ``bundle`` (creating its workload and candidate) in one
        transaction, and update the workload's best plan for the time objective."""
        if result.candidate != bundle.key:
            raise BoundFlowError(f"result of candidate {result.candidate} given for plan "
                                 f"{bundle.key}")
        def add(s: Session) -> MeasurementRecord:
            wrow = self._get_workload(s, bundle.workload, graph)
            crow = self._get_candidate(s, wrow, bundle, features)
            m = MeasurementRow(candidate_id=crow.id, times=list(result.times),
                               **{f: getattr(result, f) for f in _RESULT_FIELDS})
            s.add(m)
            s.flush()
            if result.ok and result.median_s is not None:
                self._offer_best(s, wrow, crow, result.target, OBJECTIVE_TIME, result.backend,
                                 result.median_s)
            return self._measurement_record(m, wrow.key, crow.key)
        return self._tx("add_measurement", add)

    @staticmethod
    def _offer_best(s: Session, wrow: WorkloadRow, crow: CandidateRow, target: str,
                    objective: str, backend: str, value: float) -> None:
        best = s.get(BestPlanRow, (wrow.id, target, objective))
        if best is None:
            s.add(BestPlanRow(workload_id=wrow.id, target=target, objective=objective,
                              candidate_id=crow.id, backend=backend, value=value,
                              updated=time.time()))
        elif value < best.value:
            best.candidate_id, best.backend, best.value = crow.id, backend, value
            best.updated = time.time()

    def set_best(self, bundle: PlanBundle, objective: str, backend: str, value: float) -> None:
        """Offer ``bundle`` as best for ``objective`` (smaller ``value`` wins)."""
        def offer(s: Session) -> None:
            wrow = self._get_workload(s, bundle.workload, None)
            crow = self._get_candidate(s, wrow, bundle)
            self._offer_best(s, wrow, crow, bundle.workload.target, objective, backend, value)
        self._tx("set_best", offer)

    # -- reading -----------------------------------------------------------------------------
    def workloads(self) -> list[WorkloadRecord]:
        with self._guard("workloads"), self._session() as s:
            return [self._workload_record(r) for r in
                    s.scalars(select(WorkloadRow).order_by(WorkloadRow.id))]

    def workload(self, key: str) -> WorkloadRecord | None:
        with self._guard("workload"), self._session() as s:
            row = s.scalar(select(WorkloadRow).where(WorkloadRow.key == key))
            return None if row is None else self._workload_record(row)

    def candidates(self, workload: Workload | str) -> list[CandidateRecord]:
        key = workload if isinstance(workload, str) else workload.key
        with self._guard("candidates"), self._session() as s:
            rows = s.scalars(select(CandidateRow).join(WorkloadRow)
                             .where(WorkloadRow.key == key).order_by(CandidateRow.id))
            return [self._candidate_record(r, key) for r in rows]

    def has_measurement(self, bundle: PlanBundle, backend: str | None = None) -> bool:
        with self._guard("has_measurement"), self._session() as s:
            q = (select(func.count(MeasurementRow.id)).join(CandidateRow).join(WorkloadRow)
                 .where(WorkloadRow.key == bundle.workload.key, CandidateRow.key == bundle.key))
            if backend is not None:
                q = q.where(MeasurementRow.backend == backend)
            return bool(s.scalar(q))

    def best(self, workload: Workload, target: str | None = None,
             objective: str = OBJECTIVE_TIME) -> TuningRecord | None:
        """The best candidate for ``workload`` on ``target`` (default: the workload's) under
        ``objective``, with its best measurement; None when nothing was measured."""
        target = target or workload.target
        with self._guard("best"), self._session() as s:
            row = s.scalar(select(BestPlanRow).join(WorkloadRow)
                           .where(WorkloadRow.key == workload.key, BestPlanRow.target == target,
                                  BestPlanRow.objective == objective))
            if row is None:
                return None
            m = s.scalar(select(MeasurementRow)
                         .where(MeasurementRow.candidate_id == row.candidate_id,
                                MeasurementRow.backend == row.backend,
                                MeasurementRow.error_kind.is_(None))
                         .order_by(MeasurementRow.median_s).limit(1))
            return None if m is None else self._tuning_record(m)

    def top_k(self, workload: Workload, k: int = 5, backend: str | None = None
              ) -> list[TuningRecord]:
        """The ``k`` fastest measured candidates of ``workload`` (each candidate once, by its
        fastest measurement)."""
        with self._guard("top_k"), self._session() as s:
            q = (select(MeasurementRow).join(CandidateRow).join(WorkloadRow)
                 .where(WorkloadRow.key == workload.key, MeasurementRow.error_kind.is_(None))
                 .order_by(MeasurementRow.median_s))
            if backend is not None:
                q = q.where(MeasurementRow.backend == backend)
            out, seen = [], set()
            for m in s.scalars(q):
                if m.candidate_id in seen:
                    continue
                seen.add(m.candidate_id)
                out.append(self._tuning_record(m))
                if len(out) == k:
                    break
            return out

    def records_for_training(self, workload: Workload | str | None = None,
                             include_failed: bool = False) -> list[TuningRecord]:
        """Every measurement (of one workload, or all), with its candidate and workload."""
        with self._guard("records_for_training"), self._session() as s:
            q = select(MeasurementRow).join(CandidateRow).join(WorkloadRow)
            if workload is not None:
                key = workload if isinstance(workload, str) else workload.key
                q = q.where(WorkloadRow.key == key)
            if not include_failed:
                q = q.where(MeasurementRow.error_kind.is_(None))
            return [self._tuning_record(m) for m in s.scalars(q.order_by(MeasurementRow.id))]

    def summary(self) -> dict:
        """Counts of every table and failures by error kind."""
        with self._guard("summary"), self._session() as s:
            counts = {name: int(s.scalar(select(func.count()).select_from(model)))
                      for name, model in (("workloads", WorkloadRow),
                                          ("candidates", CandidateRow),
                                          ("measurements", MeasurementRow),
                                          ("best_plans", BestPlanRow),
                                          ("cost_models", CostModelRow),
                                          ("tuning_runs", TuningRunRow))}
            failures = dict(s.execute(select(MeasurementRow.error_kind, func.count())
                                      .where(MeasurementRow.error_kind.is_not(None))
                                      .group_by(MeasurementRow.error_kind)).all())
            return {**counts, "failures": {str(k): int(v) for k, v in sorted(failures.items())}}

    # -- cost models and runs ----------------------------------------------------------------
    def save_cost_model(self, name: str, blob: bytes, feature_version: str,
                        metrics: dict | None = None) -> int:
        def save(s: Session) -> int:
            row = CostModelRow(name=name, feature_version=feature_version, blob=bytes(blob),
                               metrics=dict(metrics or {}), created=time.time())
            s.add(row)
            s.flush()
            return row.id
        return self._tx("save_cost_model", save)

    def load_cost_model(self, name: str) -> CostModelRecord | None:
        """The newest cost model saved under ``name``."""
        with self._guard("load_cost_model"), self._session() as s:
            row = s.scalar(select(CostModelRow).where(CostModelRow.name == name)
                           .order_by(CostModelRow.id.desc()).limit(1))
            return None if row is None else CostModelRecord(
                row.id, row.name, row.feature_version, bytes(row.blob), dict(row.metrics),
                row.created)

    def start_run(self, workload: Workload, strategy: str, config: dict,
                  graph: Graph | None = None) -> int:
        def start(s: Session) -> int:
            wrow = self._get_workload(s, workload, graph)
            row = TuningRunRow(workload_id=wrow.id, strategy=strategy, config=dict(config),
                               status="running", n_trials=0, started=time.time())
            s.add(row)
            s.flush()
            return row.id
        return self._tx("start_run", start)

    def finish_run(self, run_id: int, status: str, n_trials: int) -> None:
        def finish(s: Session) -> None:
            row = s.get(TuningRunRow, run_id)
            if row is None:
                raise DatabaseError(f"no tuning run {run_id}")
            row.status, row.n_trials, row.finished = status, int(n_trials), time.time()
        self._tx("finish_run", finish)

    def runs(self, workload: Workload | None = None) -> list[TuningRunRecord]:
        with self._guard("runs"), self._session() as s:
            q = select(TuningRunRow, WorkloadRow.key).join(WorkloadRow)
            if workload is not None:
                q = q.where(WorkloadRow.key == workload.key)
            return [TuningRunRecord(r.id, key, r.strategy, dict(r.config), r.status,
                                    r.n_trials, r.started, r.finished)
                    for r, key in s.execute(q.order_by(TuningRunRow.id)).all()]

    # -- moving records between machines -----------------------------------------------------
    def export_jsonl(self, out: IO[str], workload: str | None = None) -> int:
        """Write every measurement (of one workload key, or all) as one JSON line with its
        workload and candidate; returns the number of lines."""
        n = 0
        for rec in self.records_for_training(workload, include_failed=True):
            line = {"format": APP, "schema_version": SCHEMA_VERSION,
                    "workload": {"key": rec.workload.key, "workload": rec.workload.workload
                                 .to_dict(), "summary": rec.workload.summary},
                    "candidate": {"key": rec.candidate.key, "plan": rec.candidate.plan,
                                  "features": rec.candidate.features},
                    "measurement": rec.measurement.result.to_dict()}
            out.write(json.dumps(line, sort_keys=True) + "\n")
            n += 1
        return n

    def import_jsonl(self, lines: IO[str]) -> dict[str, int]:
        """Add the measurements of an export (skipping ones already here: same candidate,
        machine and timestamp); a malformed line raises before anything is written."""
        parsed = []
        for i, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                d = json.loads(text)
                if d.get("format") != APP:
                    raise BoundFlowError("not a BoundFlow export line")
                if d.get("schema_version") != SCHEMA_VERSION:
                    raise BoundFlowError(f"schema version {d.get('schema_version')}, this "
                                         f"BoundFlow reads {SCHEMA_VERSION}")
                bundle = PlanBundle.from_json(d["candidate"]["plan"])
                result = MeasureResult.from_dict(d["measurement"])
                summary = d["workload"].get("summary") or {}
                feats = d["candidate"].get("features")
            except (BoundFlowError, KeyError, TypeError, ValueError) as e:
                raise DatabaseError(f"line {i} of the import: {e}") from None
            parsed.append((bundle, result, summary, feats))

        def add_all(s: Session) -> dict[str, int]:
            added = skipped = 0
            for bundle, result, summary, feats in parsed:
                wrow = self._get_workload(s, bundle.workload, None)
                if summary and not wrow.summary:
                    wrow.summary = summary
                crow = self._get_candidate(s, wrow, bundle, feats)
                dup = s.scalar(select(func.count(MeasurementRow.id)).where(
                    MeasurementRow.candidate_id == crow.id,
                    MeasurementRow.machine == result.machine,
                    MeasurementRow.timestamp == result.timestamp,
                    MeasurementRow.backend == result.backend))
                if dup:
                    skipped += 1
                    continue
                s.add(MeasurementRow(candidate_id=crow.id, times=list(result.times),
                                     **{f: getattr(result, f) for f in _RESULT_FIELDS}))
                if result.ok and result.median_s is not None:
                    s.flush()
                    self._offer_best(s, wrow, crow, result.target, OBJECTIVE_TIME,
                                     result.backend, result.median_s)
                added += 1
            return {"added": added, "skipped": skipped}
        return self._tx("import", add_all)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
