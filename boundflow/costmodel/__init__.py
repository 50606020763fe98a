"""Cost models of plans: features, the analytic baseline, XGBoost, ranking metrics."""

from boundflow.costmodel.features import FEATURE_NAMES, FEATURE_VERSION, features, task_work
from boundflow.costmodel.metrics import evaluate, kendall, spearman, top_k_recall
from boundflow.costmodel.model import HEADS, AnalyticModel, XGBCostModel, targets

__all__ = ["FEATURE_NAMES", "FEATURE_VERSION", "features", "task_work", "evaluate", "kendall",
           "spearman", "top_k_recall", "HEADS", "AnalyticModel", "XGBCostModel", "targets"]
