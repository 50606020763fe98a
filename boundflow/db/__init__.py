"""The tuning database (see ``database.py``; tables in ``models.py``)."""

from boundflow.db.database import CandidateRecord, CostModelRecord, Database, \
    MeasurementRecord, TuningRecord, TuningRunRecord, WorkloadRecord, graph_summary
from boundflow.db.models import SCHEMA_VERSION

__all__ = ["Database", "WorkloadRecord", "CandidateRecord", "MeasurementRecord", "TuningRecord",
           "CostModelRecord", "TuningRunRecord", "graph_summary", "SCHEMA_VERSION"]
