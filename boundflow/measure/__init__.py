"""Building and measuring candidate plans, isolated in worker processes (see ``runner.py``)."""

from boundflow.measure.builder import LocalBuilder
from boundflow.measure.result import BuildResult, MeasureInput, MeasureResult
from boundflow.measure.runner import LocalRunner, RPCRunner, measure
from boundflow.measure.worker import MeasureConfig

__all__ = ["LocalBuilder", "BuildResult", "MeasureInput", "MeasureResult", "LocalRunner",
           "RPCRunner", "measure", "MeasureConfig"]
