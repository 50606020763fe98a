"""The tuning database: workloads, candidates, measurements, best plans, cost models, tuning
runs and their claims, behind a small API that returns frozen records.

``Database(url)`` takes any SQLAlchemy URL (``postgresql+psycopg://...`` for a shared one) or a
file path (SQLite; WAL journal, 30 s busy timeout, writes in ``BEGIN IMMEDIATE`` transactions
so concurrent writers queue instead of failing with "database is locked"); ``":memory:"`` is a
private in-memory database. A database with none of our tables is initialised; one of an older
schema version is migrated in place, one version at a time (each one transaction: 1 → 2 adds
nullable columns and the claims table, 2 → 3 nullable columns); one with tables but not ours,
a corrupt file or another schema version raises :class:`DatabaseError`.

The storage contract is in :class:`Database`'s docstring; how concurrent tuners share a
workload is in ``runs.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence, TypeVar

from sqlalchemy import create_engine, event, func, inspect, select, text
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from boundflow.db import runs as coord
from boundflow.db.liveness import DEFAULT_HEARTBEAT_TIMEOUT, process_id
from boundflow.db.models import APP, RUN_STATUSES, SCHEMA_VERSION, V2_COLUMNS, V3_COLUMNS, \
    Base, \
    BestPlanRow, CandidateRow, ClaimRow, CostModelRow, MeasurementRow, Meta, TuningRunRow, \
    WorkloadRow
from boundflow.errors import BoundFlowError, DatabaseError
from boundflow.ir.graph import Graph
from boundflow.ir.plan import PlanBundle
from boundflow.ir.workload import Workload
from boundflow.measure.result import MeasureResult

T = TypeVar("T")
OBJECTIVE_TIME = "time"
# the export line format: 2 adds the measurement's kernel_s; 3 workloads' ``bounds`` (older
# readers would file a lower-bounds workload's measurements under the both-sides one)
EXPORT_VERSION = 3
_IMPORTS = (1, 2, 3)        # export versions this BoundFlow reads
_RESULT_FIELDS = ("backend", "target", "error_kind", "error", "median_s", "mean_s", "std_s",
                  "peak_bytes", "peak_source", "mean_width", "verified_fraction", "n_kernels",
                  "compile_seconds", "kernel_s", "runner", "machine", "timestamp")


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
class BestPlanRecord:
    """The best plan of a workload under an objective, with the comparison that made it best:
    ``value`` is its objective; ``baseline_value`` the objective of the default verify path
    measured in the same runner pass (None when it was never compared with it: recorded from
    measurements alone, or by an older BoundFlow); ``best_s`` and ``baseline_s`` the two
    whole-call times of that pass."""

    workload_key: str
    target: str
    objective: str
    candidate: CandidateRecord
    backend: str
    value: float
    updated: float
    baseline_value: float | None = None
    best_s: float | None = None
    baseline_s: float | None = None

    @property
    def compared(self) -> bool:
        return self.baseline_value is not None

    @property
    def speedup(self) -> float | None:
        """The default path's time over this plan's, measured together (None if never)."""
        if self.best_s and self.baseline_s:
            return self.baseline_s / self.best_s
        return None


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
    """A tuning run. ``status`` is ``running``, ``finished``, ``failed`` or ``dead`` (a run
    recorded as running whose process is gone or whose heartbeat is older than
    ``heartbeat_timeout`` reads as dead, whether or not it was marked so yet)."""

    id: int
    workload_key: str
    strategy: str
    config: dict
    status: str
    n_trials: int
    started: float
    finished: float | None
    backend: str | None = None
    machine: str | None = None
    heartbeat_at: float | None = None
    heartbeat_timeout: float | None = None


@dataclass(frozen=True)
class ClaimRecord:
    """A plan a live run is measuring in the scope (workload, backend, target, machine)."""

    workload_key: str
    candidate_key: str
    backend: str
    target: str
    machine: str
    run_id: int
    created: float


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


def _plausible(r: MeasureResult) -> None:
    """A ValueError unless an imported measurement could have come from a runner: a backend
    this BoundFlow has; a successful one has positive finite times with its median among
    them, and a finite width (an export is data another machine wrote)."""
    from boundflow import backend as registry

    if r.backend not in registry.names():
        raise ValueError(f"backend {r.backend!r} is not one of {', '.join(registry.names())}")
    if not r.ok:
        return
    times = [_number(t) for t in r.times]
    if not times or min(times) <= 0:
        raise ValueError("a measurement without positive times")
    if not min(times) <= _number(r.median_s) <= max(times):
        raise ValueError(f"median_s {r.median_s!r} is not among its times")
    if (_number(r.mean_width, True) or 0.0) < 0:
        raise ValueError(f"mean_width {r.mean_width!r} is negative")


def _number(value: Any, optional: bool = False) -> float | None:
    """A number column as read: a finite float (SQLite keeps whatever another writer stored
    in it: text, NaN); else a ValueError (a malformed row, see ``Database._guard``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ValueError(f"{value!r} where a finite number belongs")
    return float(value)


class Database:
    """The tuning database. The storage contract:

    * **Atomic.** Every method is one transaction: it happens wholly or not at all, and a
      writer killed mid-way leaves nothing behind. A measurement is written with its workload,
      its candidate, the best-plan update and the release of its claim in one transaction;
      ``claim`` checks the budget and takes its claims in one transaction, serialised per
      workload (SQLite: one writer at a time; PostgreSQL: a lock on the workload's row), so
      concurrent tuners never claim the same plan nor together pass the budget. A transaction
      that meets a busy database, a serialisation failure or a unique-key race is re-run.
    * **Immutable.** Workloads, candidates (plans), measurements and saved cost models are
      never changed once written (a candidate's features may be filled in later), only added
      to; the same plan measured again is a second measurement. Best plans change only to a
      better value. Tuning runs change status once, from ``running`` to ``finished``,
      ``failed`` or ``dead``; claims live only while their plan is being measured.
    * **Records.** Rows leave as frozen records; nothing returned is tied to a session.
    * **Threads and processes.** A ``Database`` may be used from several threads (a session
      per call; ``":memory:"``, one private connection, from one thread at a time) and any
      number of processes may open the same file or URL.
    * **Errors.** Every failure of the store is a :class:`DatabaseError` naming the database
      (without its password) and the operation.
    """

    def __init__(self, url: str | Path | None, *, echo: bool = False, existing: bool = False):
        self.url = _url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        self.is_private = self.url == "sqlite://"        # in memory: no other process sees it
        try:
            if self.url == "sqlite://":
                engine = create_engine(self.url, echo=echo, poolclass=StaticPool,
                                       connect_args={"check_same_thread": False})
            elif self.is_sqlite:
                path = Path(self.url.removeprefix("sqlite:///"))
                if not path.parent.exists():
                    raise DatabaseError(f"no directory {path.parent} for database {path.name}")
                if existing and not path.exists():     # a reader: never create one
                    raise DatabaseError(f"no database at {path} (`boundflow tune --db` makes "
                                        f"one)")
                if path.exists() and not path.is_file():
                    raise DatabaseError(f"{path} is not a database file (a directory, "
                                        f"device or pipe)")
                if existing and path.is_file() and path.stat().st_size == 0:
                    raise DatabaseError(f"no database at {path}: the file is empty "
                                        f"(`boundflow tune --db` makes one)")
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
        except (ValueError, TypeError, AttributeError, KeyError, RecursionError,
                UnicodeDecodeError) as e:
            # a row this code did not write: text where a number belongs, a dangling id,
            # JSON that is not what it should be (a shared database is written by others)
            text = str(e).splitlines()[0][:200] if str(e) else ""
            raise DatabaseError(f"database {self.shown()}: {what}: a malformed row "
                                f"({type(e).__name__}{': ' + text if text else ''})") from None

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
        if version in ("1", "2"):
            self._migrate(version)
            version = str(SCHEMA_VERSION)
            tables = set(inspect(self.engine).get_table_names())
        if version != str(SCHEMA_VERSION):
            raise DatabaseError(f"{self.shown()} has tuning-database schema version {version}; "
                                f"this BoundFlow reads version {SCHEMA_VERSION}")
        missing = ours - tables
        if missing:
            raise DatabaseError(f"{self.shown()} lacks tables {sorted(missing)}")

    def _migrate(self, version: str) -> None:
        """Schema ``version`` → ... → the current one, each step one transaction: 1 → 2 the
        runs' new (nullable) columns and the claims table; 2 → 3 the measurements' kernel time
        and the best plans' comparison with the default path (nullable). Whoever migrates
        first wins; the others find the next version inside their transaction and change
        nothing."""
        steps = {"1": ("2", V2_COLUMNS, True), "2": ("3", V3_COLUMNS, False)}
        while version in steps:
            new, columns, claims = steps[version]

            def migrate(s: Session, old=version, new=new, columns=columns, claims=claims):
                row = s.scalar(select(Meta).where(Meta.key == "schema_version")
                               .with_for_update())
                if row is None or row.value != old:
                    return
                conn = s.connection()
                prep = conn.dialect.identifier_preparer
                for table, names in columns.items():
                    have = {c["name"] for c in inspect(conn).get_columns(table)}
                    for name in names:
                        if name in have:
                            continue
                        col = Base.metadata.tables[table].c[name]
                        kind = col.type.compile(dialect=conn.dialect)
                        conn.execute(text(f"ALTER TABLE {prep.quote(table)} ADD COLUMN "
                                          f"{prep.quote(name)} {kind}"))
                if claims:
                    ClaimRow.__table__.create(conn, checkfirst=True)
                row.value = new
            self._tx(f"migrate to schema {new}", migrate)
            version = new

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
                        graph: Graph | None = None, *, run_id: int | None = None
                        ) -> MeasurementRecord:
        """Record ``result`` for ``bundle`` (creating its workload and candidate) in one
        transaction, update the workload's best plan for the time objective, and release the
        plan's claim in the result's scope (backend, target, machine) and any claim of
        ``run_id`` on it; with ``run_id``, the write is also that run's heartbeat."""
        if result.candidate != bundle.key:
            raise BoundFlowError(f"result of candidate {result.candidate} given for plan "
                                 f"{bundle.key}")
        def add(s: Session) -> MeasurementRecord:
            if run_id is not None:              # run row, then claims: one lock order
                self._beat(s, run_id, time.time())
            wrow = self._get_workload(s, bundle.workload, graph)
            crow = self._get_candidate(s, wrow, bundle, features)
            m = MeasurementRow(candidate_id=crow.id, times=list(result.times),
                               **{f: getattr(result, f) for f in _RESULT_FIELDS})
            s.add(m)
            s.flush()
            coord.release_measured(s, wrow, bundle.key, result.backend, result.target,
                                   result.machine, run_id)
            if result.ok and result.median_s is not None:
                self._offer_best(s, wrow, crow, result.target, OBJECTIVE_TIME, result.backend,
                                 result.median_s)
            return self._measurement_record(m, wrow.key, crow.key)
        return self._tx("add_measurement", add)

    @staticmethod
    def _offer_best(s: Session, wrow: WorkloadRow, crow: CandidateRow, target: str,
                    objective: str, backend: str, value: float,
                    compared: tuple[float, float, float] | None = None) -> None:
        """Offer a best plan. ``compared``: (baseline_value, best_s, baseline_s) of a runner
        pass that measured the default verify path with it. A compared offer beats an
        uncompared record; two compared ones are ranked by their advantage over the default
        (``value - baseline_value``), two uncompared ones by ``value``."""
        best = s.get(BestPlanRow, (wrow.id, target, objective))
        if best is None:
            best = BestPlanRow(workload_id=wrow.id, target=target, objective=objective)
            s.add(best)
        elif compared is None:
            if best.baseline_value is not None or value >= best.value:
                return
        elif best.baseline_value is not None and \
                value - compared[0] >= best.value - best.baseline_value:
            return
        best.candidate_id, best.backend, best.value = crow.id, backend, value
        best.baseline_value, best.best_s, best.baseline_s = compared or (None, None, None)
        best.updated = time.time()

    def set_best(self, bundle: PlanBundle, objective: str, backend: str, value: float, *,
                 baseline_value: float | None = None, best_s: float | None = None,
                 baseline_s: float | None = None) -> None:
        """Offer ``bundle`` on ``backend`` as best for ``objective`` (see ``_offer_best``: the
        smaller ``value``, or, with ``baseline_value``, the larger advantage over the default
        verify path measured in the same runner pass, whose whole-call time was
        ``baseline_s`` against this plan's ``best_s``)."""
        compared = None if baseline_value is None else (float(baseline_value), best_s,
                                                         baseline_s)

        def offer(s: Session) -> None:
            wrow = self._get_workload(s, bundle.workload, None)
            crow = self._get_candidate(s, wrow, bundle)
            self._offer_best(s, wrow, crow, bundle.workload.target, objective, backend, value,
                             compared)
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

    def candidates(self, workload: Workload | str, keys: Sequence[str] | None = None
                   ) -> list[CandidateRecord]:
        """The candidates of ``workload`` (only those with plan keys in ``keys``, if given),
        oldest first."""
        key = workload if isinstance(workload, str) else workload.key
        with self._guard("candidates"), self._session() as s:
            q = select(CandidateRow).join(WorkloadRow).where(WorkloadRow.key == key)
            if keys is not None:
                q = q.where(CandidateRow.key.in_(list(keys)))
            return [self._candidate_record(r, key) for r in s.scalars(q.order_by(CandidateRow.id))]

    def has_measurement(self, bundle: PlanBundle, backend: str | None = None) -> bool:
        with self._guard("has_measurement"), self._session() as s:
            q = (select(func.count(MeasurementRow.id)).join(CandidateRow).join(WorkloadRow)
                 .where(WorkloadRow.key == bundle.workload.key, CandidateRow.key == bundle.key))
            if backend is not None:
                q = q.where(MeasurementRow.backend == backend)
            return bool(s.scalar(q))

    @staticmethod
    def _best_row(s: Session, workload: Workload, target: str, objective: str):
        return s.scalar(select(BestPlanRow).join(WorkloadRow)
                        .where(WorkloadRow.key == workload.key, BestPlanRow.target == target,
                               BestPlanRow.objective == objective))

    def best(self, workload: Workload, target: str | None = None,
             objective: str = OBJECTIVE_TIME) -> TuningRecord | None:
        """The best candidate for ``workload`` on ``target`` (default: the workload's) under
        ``objective``, with its best measurement; None when nothing was measured."""
        target = target or workload.target
        with self._guard("best"), self._session() as s:
            row = self._best_row(s, workload, target, objective)
            if row is None:
                return None
            m = s.scalar(select(MeasurementRow)
                         .where(MeasurementRow.candidate_id == row.candidate_id,
                                MeasurementRow.backend == row.backend,
                                MeasurementRow.error_kind.is_(None))
                         .order_by(MeasurementRow.median_s).limit(1))
            return None if m is None else self._tuning_record(m)

    def best_plan(self, workload: Workload, target: str | None = None,
                  objective: str = OBJECTIVE_TIME) -> BestPlanRecord | None:
        """The best-plan record of ``workload`` on ``target`` (default: the workload's) under
        ``objective``, with its comparison against the default path; None when none."""
        target = target or workload.target
        with self._guard("best_plan"), self._session() as s:
            row = self._best_row(s, workload, target, objective)
            if row is None:
                return None
            crow = s.get(CandidateRow, row.candidate_id)
            if crow is None:                  # another writer's row points at nothing
                raise ValueError(f"a best-plan row names candidate {row.candidate_id!r}, "
                                 f"which is not in the database")
            return BestPlanRecord(workload.key, row.target, row.objective,
                                  self._candidate_record(crow, workload.key), row.backend,
                                  _number(row.value), _number(row.updated),
                                  _number(row.baseline_value, True), _number(row.best_s, True),
                                  _number(row.baseline_s, True))

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
                             include_failed: bool = False, every_backend: bool = False
                             ) -> list[TuningRecord]:
        """Every measurement (of one workload, or all), with its candidate and workload;
        not those of a backend this BoundFlow lacks (a newer one's, or a bad writer's, in a
        shared database: they could not be featured or run here) unless ``every_backend``
        (an export keeps them)."""
        from boundflow import backend as registry

        with self._guard("records_for_training"), self._session() as s:
            q = select(MeasurementRow).join(CandidateRow).join(WorkloadRow)
            if workload is not None:
                key = workload if isinstance(workload, str) else workload.key
                q = q.where(WorkloadRow.key == key)
            if not include_failed:
                q = q.where(MeasurementRow.error_kind.is_(None))
            if not every_backend:
                q = q.where(MeasurementRow.backend.in_(registry.names()))
            return [self._tuning_record(m) for m in s.scalars(q.order_by(MeasurementRow.id))]

    def summary(self) -> dict:
        """Counts of every table, failures by error kind and runs by status (``runs``, with
        dead runs read as dead)."""
        with self._guard("summary"), self._session() as s:
            counts = {name: int(s.scalar(select(func.count()).select_from(model)))
                      for name, model in (("workloads", WorkloadRow),
                                          ("candidates", CandidateRow),
                                          ("measurements", MeasurementRow),
                                          ("best_plans", BestPlanRow),
                                          ("cost_models", CostModelRow),
                                          ("tuning_runs", TuningRunRow),
                                          ("claims", ClaimRow))}
            failures = dict(s.execute(select(MeasurementRow.error_kind, func.count())
                                      .where(MeasurementRow.error_kind.is_not(None))
                                      .group_by(MeasurementRow.error_kind)).all())
            now, by_status = time.time(), {}
            for r in s.scalars(select(TuningRunRow)):
                status = "dead" if coord.run_is_dead(r, now) else r.status
                by_status[status] = by_status.get(status, 0) + 1
            return {**counts, "failures": {str(k): int(v) for k, v in sorted(failures.items())},
                    "runs": dict(sorted(by_status.items()))}

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
                  graph: Graph | None = None, *, backend: str | None = None,
                  machine: str | None = None,
                  heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT) -> int:
        """A new ``running`` run of ``workload``, measuring on ``backend`` and ``machine``
        (the scope its claims take, see ``claim``), owned by this process. It is dead once it
        goes ``heartbeat_timeout`` seconds without a heartbeat (``heartbeat``, ``claim`` or
        ``add_measurement(run_id=...)``), or at once when its process is seen gone."""
        if not (isinstance(heartbeat_timeout, (int, float)) and
                math.isfinite(heartbeat_timeout) and heartbeat_timeout > 0):
            raise BoundFlowError(f"heartbeat_timeout must be a number of seconds > 0, not "
                                 f"{heartbeat_timeout!r}")

        def start(s: Session) -> int:
            wrow = self._get_workload(s, workload, graph)
            now = time.time()
            row = TuningRunRow(workload_id=wrow.id, strategy=strategy, config=dict(config),
                               status="running", n_trials=0, started=now, backend=backend,
                               machine=machine, owner=process_id(), heartbeat_at=now,
                               heartbeat_timeout=float(heartbeat_timeout))
            s.add(row)
            s.flush()
            return row.id
        return self._tx("start_run", start)

    @staticmethod
    def _beat(s: Session, run_id: int, now: float) -> TuningRunRow:
        row = s.get(TuningRunRow, run_id)
        if row is None:
            raise DatabaseError(f"no tuning run {run_id}")
        if row.status == "running":
            row.heartbeat_at = now
        return row

    def heartbeat(self, run_id: int) -> bool:
        """Say that run ``run_id`` is alive; False when it is no longer running (it finished,
        or it was found dead and its claims were handed back: it should stop)."""
        return self._tx("heartbeat",
                        lambda s: self._beat(s, run_id, time.time()).status == "running")

    def claim(self, run_id: int, keys: Sequence[str | tuple[str, str]],
              budget: int | None = None, backends: Sequence[str] | None = None) -> list:
        """Claim plans (``PlanBundle.key``) of the run's workload for run ``run_id`` in its
        scope (workload, backend, target, machine), atomically: first every dead run is
        marked ``dead`` and its claims released; then each key, in order, that is neither
        measured nor claimed in the scope is claimed while the scope counts fewer than
        ``budget`` plans (measured or claimed; None: no budget). Returns the keys claimed: the
        run measures those and no others. The claim is also the run's heartbeat. Raises
        :class:`DatabaseError` when the run is not running (found dead: it must stop).

        A run that searches several backends claims ``(plan key, backend)`` pairs, each in
        its backend's scope, and names them all in ``backends``: the budget then counts the
        (plan, backend) candidates of every one of those scopes together. Plain keys claim on
        the run's own backend."""
        def take(s: Session) -> list[str]:
            now = time.time()
            coord.reap(s, now)
            run = self._beat(s, run_id, now)
            if run.status != "running":
                raise DatabaseError(f"tuning run {run_id} is {run.status}: it may claim no "
                                    f"plans (a run silent for longer than its heartbeat "
                                    f"timeout is dead, and its plans go to other runs)")
            if run.backend is None or run.machine is None:
                raise DatabaseError(f"tuning run {run_id} was started without a backend and "
                                    f"machine: it has no scope to claim plans in")
            wrow = s.get(WorkloadRow, run.workload_id)
            return coord.take(s, run, wrow, keys, budget, now, backends)
        return self._tx("claim", take)

    def reap_dead_runs(self) -> list[int]:
        """Mark every dead run ``dead`` and release its claims; the ids marked."""
        return self._tx("reap_dead_runs", lambda s: coord.reap(s))

    def finish_run(self, run_id: int, status: str, n_trials: int) -> None:
        """End run ``run_id`` with ``status`` (``finished`` or ``failed``) and release its
        claims, in one transaction. A run already marked ``dead`` keeps that status."""
        if status not in RUN_STATUSES or status == "running":
            raise BoundFlowError(f"a run ends finished, failed or dead, not {status!r}")

        def finish(s: Session) -> None:
            row = s.get(TuningRunRow, run_id)
            if row is None:
                raise DatabaseError(f"no tuning run {run_id}")
            if row.status != "dead":
                row.status = status
            row.n_trials, row.finished = int(n_trials), time.time()
            coord.release_run(s, run_id)
        self._tx("finish_run", finish)

    def runs(self, workload: Workload | None = None) -> list[TuningRunRecord]:
        """The tuning runs (of one workload, or all), oldest first; see
        :class:`TuningRunRecord` for what ``status`` says."""
        with self._guard("runs"), self._session() as s:
            q = select(TuningRunRow, WorkloadRow.key).join(WorkloadRow)
            if workload is not None:
                q = q.where(WorkloadRow.key == workload.key)
            now = time.time()
            return [TuningRunRecord(r.id, key, r.strategy, dict(r.config),
                                    "dead" if coord.run_is_dead(r, now) else r.status,
                                    r.n_trials, r.started, r.finished, r.backend, r.machine,
                                    r.heartbeat_at, r.heartbeat_timeout)
                    for r, key in s.execute(q.order_by(TuningRunRow.id)).all()]

    def claims(self, workload: Workload | str | None = None) -> list[ClaimRecord]:
        """The claims of live runs (of one workload, or all), oldest first."""
        with self._guard("claims"), self._session() as s:
            q = (select(ClaimRow, WorkloadRow.key, TuningRunRow)
                 .join(WorkloadRow, WorkloadRow.id == ClaimRow.workload_id)
                 .join(TuningRunRow, TuningRunRow.id == ClaimRow.run_id))
            if workload is not None:
                q = q.where(WorkloadRow.key == (workload if isinstance(workload, str)
                                                else workload.key))
            now = time.time()
            return [ClaimRecord(key, c.candidate_key, c.backend, c.target,
                                c.machine, c.run_id, c.created)
                    for c, key, run in s.execute(q.order_by(ClaimRow.id)).all()
                    if run.status == "running" and not coord.run_is_dead(run, now)]

    # -- moving records between machines -----------------------------------------------------
    def export_jsonl(self, out: IO[str], workload: str | None = None) -> int:
        """Write every measurement (of one workload key, or all) as one JSON line with its
        workload and candidate; returns the number of lines."""
        n = 0
        for rec in self.records_for_training(workload, include_failed=True,
                                             every_backend=True):
            line = {"format": APP, "schema_version": EXPORT_VERSION,
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
                if not isinstance(d, dict) or d.get("format") != APP:
                    raise BoundFlowError("not a BoundFlow export line")
                if d.get("schema_version") not in _IMPORTS:
                    raise BoundFlowError(f"export format version {d.get('schema_version')}, "
                                         f"this BoundFlow reads {' and '.join(map(str, _IMPORTS))}")
                bundle = PlanBundle.from_json(d["candidate"]["plan"])
                result = MeasureResult.from_dict(d["measurement"])
                _plausible(result)
                summary = d["workload"].get("summary") or {}
                feats = d["candidate"].get("features")
            except KeyError as e:
                raise DatabaseError(f"line {i} of the import lacks the field {e}") from None
            except (BoundFlowError, AttributeError, TypeError, ValueError) as e:
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
