"""Cost models of plans: features, the analytic baseline, XGBoost, ranking metrics, and the
choice between the two models on a workload's own data."""

from boundflow.costmodel.features import BACKEND_FEATURE_NAMES, FEATURE_NAMES, \
    FEATURE_VERSION, PLAN_FEATURE_NAMES, features, plan_features, task_work, with_backend
from boundflow.costmodel.metrics import evaluate, kendall, spearman, top_k_recall
from boundflow.costmodel.model import HEADS, AnalyticModel, XGBCostModel, targets
from boundflow.costmodel.select import Choice, Chosen, choose

__all__ = ["FEATURE_NAMES", "PLAN_FEATURE_NAMES", "BACKEND_FEATURE_NAMES", "FEATURE_VERSION",
           "features", "plan_features", "with_backend", "task_work", "evaluate", "kendall",
           "spearman", "top_k_recall", "HEADS", "AnalyticModel", "XGBCostModel", "targets",
           "Choice", "Chosen", "choose"]
