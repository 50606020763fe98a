"""The tuning database's tables (SQLAlchemy 2.0 typed declarative models), in one module.

``meta`` holds the schema version and an application marker; a database without them is not a
BoundFlow database. Every other table is keyed by content (workload key, plan key), so records
from two machines merge by key: see ``Database.export_jsonl`` / ``import_jsonl``.

Schema 2 (over 1): tuning runs carry their measuring backend and machine, the process that runs
them and a heartbeat; ``bf_claims`` holds the plans a live run is measuring, one row per
(workload, plan, backend, target, machine). Claims are coordination state, not results: they
are not exported.

Schema 3 (over 2): a measurement keeps its kernel time beside the whole call (``kernel_s``); a
best plan keeps the comparison that made it best: the objective of the default verify path
measured in the same runner pass (``baseline_value``) and both whole-call times (``best_s``,
``baseline_s``), so verification can refuse a record that was not faster than the default.
"""

from __future__ import annotations

from sqlalchemy import JSON, Float, ForeignKey, Integer, LargeBinary, String, Text, \
    UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 3
RUN_STATUSES = ("running", "finished", "failed", "dead")
APP = "boundflow-tuning-db"


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "bf_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class WorkloadRow(Base):
    __tablename__ = "bf_workloads"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    target: Mapped[str] = mapped_column(String(256))
    weights_hash: Mapped[str] = mapped_column(String(64))
    workload: Mapped[dict] = mapped_column(JSON)          # Workload.to_dict()
    summary: Mapped[dict] = mapped_column(JSON)           # graph summary: ops, sizes
    created: Mapped[float] = mapped_column(Float)
    candidates: Mapped[list["CandidateRow"]] = relationship(back_populates="workload")


class CandidateRow(Base):
    __tablename__ = "bf_candidates"
    __table_args__ = (UniqueConstraint("workload_id", "key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workload_id: Mapped[int] = mapped_column(ForeignKey("bf_workloads.id"), index=True)
    key: Mapped[str] = mapped_column(String(64), index=True)   # PlanBundle.key
    knobs: Mapped[str] = mapped_column(Text)                   # Knobs JSON
    plan: Mapped[str] = mapped_column(Text)                    # PlanBundle JSON
    features: Mapped[list | None] = mapped_column(JSON, nullable=True)
    created: Mapped[float] = mapped_column(Float)
    workload: Mapped[WorkloadRow] = relationship(back_populates="candidates")
    measurements: Mapped[list["MeasurementRow"]] = relationship(back_populates="candidate")


class MeasurementRow(Base):
    __tablename__ = "bf_measurements"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("bf_candidates.id"), index=True)
    backend: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(256))
    error_kind: Mapped[str | None] = mapped_column(String(16), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    median_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    mean_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    std_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    times: Mapped[list] = mapped_column(JSON)
    peak_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    peak_source: Mapped[str | None] = mapped_column(String(16), nullable=True)
    mean_width: Mapped[float | None] = mapped_column(Float, nullable=True)
    verified_fraction: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_kernels: Mapped[int | None] = mapped_column(Integer, nullable=True)
    compile_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    kernel_s: Mapped[float | None] = mapped_column(Float, nullable=True)       # schema 3
    runner: Mapped[str] = mapped_column(String(128))
    machine: Mapped[str] = mapped_column(String(256))
    timestamp: Mapped[float] = mapped_column(Float, index=True)
    candidate: Mapped[CandidateRow] = relationship(back_populates="measurements")


class BestPlanRow(Base):
    __tablename__ = "bf_best_plans"
    workload_id: Mapped[int] = mapped_column(ForeignKey("bf_workloads.id"), primary_key=True)
    target: Mapped[str] = mapped_column(String(256), primary_key=True)
    objective: Mapped[str] = mapped_column(String(128), primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("bf_candidates.id"))
    backend: Mapped[str] = mapped_column(String(16))
    value: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    # schema 3: the default verify path in the same runner pass (None: never compared)
    baseline_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    best_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    baseline_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class CostModelRow(Base):
    __tablename__ = "bf_cost_models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    feature_version: Mapped[str] = mapped_column(String(64))
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    metrics: Mapped[dict] = mapped_column(JSON)
    created: Mapped[float] = mapped_column(Float)


class TuningRunRow(Base):
    __tablename__ = "bf_tuning_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workload_id: Mapped[int] = mapped_column(ForeignKey("bf_workloads.id"), index=True)
    strategy: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))        # one of RUN_STATUSES
    n_trials: Mapped[int] = mapped_column(Integer)
    started: Mapped[float] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)
    # schema 2: where the run measures, who runs it, and when it last said it is alive
    backend: Mapped[str | None] = mapped_column(String(16), nullable=True)
    machine: Mapped[str | None] = mapped_column(String(256), nullable=True)
    owner: Mapped[str | None] = mapped_column(String(256), nullable=True)   # liveness.process_id
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_timeout: Mapped[float | None] = mapped_column(Float, nullable=True)


class ClaimRow(Base):
    """A plan a live run is measuring: taken before the measurement, deleted in the transaction
    that writes it (or when the run finishes or is found dead)."""

    __tablename__ = "bf_claims"
    __table_args__ = (UniqueConstraint("workload_id", "candidate_key", "backend", "target",
                                       "machine"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workload_id: Mapped[int] = mapped_column(ForeignKey("bf_workloads.id"), index=True)
    candidate_key: Mapped[str] = mapped_column(String(64))    # PlanBundle.key
    backend: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(256))
    machine: Mapped[str] = mapped_column(String(256))
    run_id: Mapped[int] = mapped_column(ForeignKey("bf_tuning_runs.id"), index=True)
    created: Mapped[float] = mapped_column(Float)


# columns each schema added to the tables before it (the migrations add them; all nullable)
V2_COLUMNS = {"bf_tuning_runs": ("backend", "machine", "owner", "heartbeat_at",
                                 "heartbeat_timeout")}
V3_COLUMNS = {"bf_measurements": ("kernel_s",),
              "bf_best_plans": ("baseline_value", "best_s", "baseline_s")}
