"""The tuning database's tables (SQLAlchemy 2.0 typed declarative models), in one module.

``meta`` holds the schema version and an application marker; a database without them is not a
BoundFlow database. Every other table is keyed by content (workload key, plan key), so records
from two machines merge by key: see ``Database.export_jsonl`` / ``import_jsonl``.
"""

from __future__ import annotations

from sqlalchemy import JSON, Float, ForeignKey, Integer, LargeBinary, String, Text, \
    UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 1
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
    status: Mapped[str] = mapped_column(String(16))        # running, finished, failed
    n_trials: Mapped[int] = mapped_column(Integer)
    started: Mapped[float] = mapped_column(Float)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)
