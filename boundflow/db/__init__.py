"""The tuning database (see ``database.py``; tables in ``models.py``; how concurrent tuning runs
share a workload in ``runs.py``)."""

from boundflow.db.database import BestPlanRecord, CandidateRecord, ClaimRecord, CostModelRecord, Database, \
    MeasurementRecord, TuningRecord, TuningRunRecord, WorkloadRecord, graph_summary
from boundflow.db.liveness import DEFAULT_HEARTBEAT_TIMEOUT
from boundflow.db.models import RUN_STATUSES, SCHEMA_VERSION

__all__ = ["Database", "WorkloadRecord", "CandidateRecord", "MeasurementRecord", "TuningRecord",
           "BestPlanRecord",
           "CostModelRecord", "TuningRunRecord", "ClaimRecord", "graph_summary",
           "SCHEMA_VERSION", "RUN_STATUSES", "DEFAULT_HEARTBEAT_TIMEOUT"]
