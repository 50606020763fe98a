"""Features, the analytic and XGBoost cost models, and the ranking metrics."""

from __future__ import annotations

import random

import numpy as np
import pytest

from boundflow.costmodel import FEATURE_NAMES, FEATURE_VERSION, AnalyticModel, XGBCostModel, evaluate, \
    features, kendall, spearman, top_k_recall
from boundflow.costmodel.model import MODEL_VERSION
from boundflow.errors import BoundFlowError
from boundflow.examples import EXAMPLES
from boundflow.ir.workload import Workload
from boundflow.planner import default, normalised, plan, space
from tests.helpers import example_graph


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_features_have_fixed_length_and_follow_the_plan(name):
    _, g = example_graph(name)
    gn = normalised(g)[0]
    for method in ("ibp", "crown"):
        w = Workload.of(g, batch=4, method=method)
        sp, rng = space(g, w), random.Random(0)
        vecs = [features(plan(g, w, sp.sample(rng)), gn) for _ in range(5)]
        assert all(v.shape == (len(FEATURE_NAMES),) and np.isfinite(v).all() for v in vecs)
        k = default(g, w)
        fused = dict(zip(FEATURE_NAMES, features(plan(g, w, k), gn)))
        unfused = dict(zip(FEATURE_NAMES, features(plan(g, w, k.replace(
            partition=tuple(False for _ in k.partition))), gn)))
        if k.partition:
            assert unfused["n_tasks"] > fused["n_tasks"]
        assert fused["log_flops"] > 0 and fused[f"method_{method}"] == 1.0
    w32 = Workload.of(g, batch=32, method="ibp")
    f1 = dict(zip(FEATURE_NAMES, features(plan(g, Workload.of(g, batch=1, method="ibp")), gn)))
    f32 = dict(zip(FEATURE_NAMES, features(plan(g, w32), gn)))
    assert f32["log_flops_batch"] > f1["log_flops_batch"]


def test_metrics():
    x = np.arange(10.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert kendall(x, x) == pytest.approx(1.0) and kendall(x, -x) == pytest.approx(-1.0)
    assert top_k_recall(x, x, 3) == 1.0 and top_k_recall(x, -x, 3) == 0.0
    m = evaluate(x, x, groups=np.repeat([0, 1], 5), k=2)
    assert m["spearman"] == pytest.approx(1.0) and m["top_k_recall"] == 1.0
    assert (m["groups"], m["n"]) == (2, 10)


def _synthetic(n, seed):
    """Feature vectors with a known time relation: log time = flops + 0.5·n_kernels."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, (n, len(FEATURE_NAMES)))
    idx = {k: i for i, k in enumerate(FEATURE_NAMES)}
    X[:, idx["log_flops_batch"]] = rng.uniform(10, 30, n)
    X[:, idx["n_kernels"]] = rng.integers(1, 12, n)
    y = 0.7 * X[:, idx["log_flops_batch"]] + 0.5 * X[:, idx["n_kernels"]] - 20
    return X, {"log_time": y, "log_width": np.full(n, np.nan), "log_mem": X[:, 0]}


def test_xgboost_recovers_a_known_relation_and_round_trips():
    X, Y = _synthetic(300, 0)
    Xt, Yt = _synthetic(100, 1)
    model = XGBCostModel().fit(X, Y)
    m = evaluate(model.predict(Xt)["log_time"], Yt["log_time"])
    assert m["spearman"] > 0.9
    imp = model.importance()
    # (the analytic prediction, an input too, is itself mostly FLOPs)
    assert set(list(imp)[:2]) <= {"log_flops_batch", "n_kernels", "analytic_log_time"}
    again = XGBCostModel.load(model.save())
    np.testing.assert_allclose(again.predict(Xt)["log_time"], model.predict(Xt)["log_time"])
    assert "log_width" not in model.models          # too few targets: the analytic head answers
    np.testing.assert_allclose(model.predict(Xt)["log_width"],
                               AnalyticModel().predict(Xt)["log_width"])
    more = XGBCostModel().fit(X[:100], {h: v[:100] for h, v in Y.items()})
    more.update(X[100:], {h: v[100:] for h, v in Y.items()})
    assert more.n_samples == 300
    with pytest.raises(BoundFlowError, match="retrain"):      # (the version, not its number)
        XGBCostModel.load(model.save().replace(FEATURE_VERSION.encode(), b"features-v0"))
    with pytest.raises(BoundFlowError, match="entries"):
        model.predict(np.zeros((2, 3)))


def _workloads(n_groups, per, seed):
    """Plans of ``n_groups`` workloads: a plan effect the features carry (0.5·n_kernels)
    on top of a per-workload scale no feature tells apart from FLOPs noise."""
    rng = np.random.default_rng(seed)
    idx = {k: i for i, k in enumerate(FEATURE_NAMES)}
    X = rng.uniform(0, 1, (n_groups * per, len(FEATURE_NAMES)))
    groups = np.repeat([f"w{seed}-{g}" for g in range(n_groups)], per)
    scale = np.repeat(rng.uniform(-8, 8, n_groups), per)
    X[:, idx["n_kernels"]] = rng.integers(1, 12, len(X))
    X[:, idx["log_flops_batch"]] = 20 + scale + rng.normal(0, 3, len(X))
    y = scale + 0.5 * X[:, idx["n_kernels"]]
    width = -scale + 0.3 * (X[:, idx["n_kernels"]] > 6)
    return X, {"log_time": y, "log_width": width, "log_mem": np.full(len(X), np.nan)}, groups


def test_the_relative_head_ranks_the_plans_of_an_unseen_workload():
    """Trained with each record's workload, the relative-time head learns the plan effect
    without the workload's scale, and ranks a workload it never saw nearly perfectly; it
    round-trips with its groups, and ``Chosen`` ranks by it."""
    from boundflow.costmodel.model import REL_HEAD, REL_WIDTH, relative
    from boundflow.costmodel.select import Choice, Chosen

    X, Y, groups = _workloads(12, 20, 0)
    Xt, Yt, gt = _workloads(3, 20, 1)
    model = XGBCostModel().fit(X, Y, groups)
    pred = model.predict(Xt)
    rel = evaluate(pred[REL_HEAD], Yt["log_time"], gt)
    assert rel["spearman"] > 0.9 and rel["top_k_recall"] >= 0.6
    r = relative(Yt["log_time"], gt)
    for g in np.unique(gt):
        assert np.median(r[gt == g]) == pytest.approx(0.0)
    again = XGBCostModel.load(model.save())
    assert list(again.groups) == list(groups)
    np.testing.assert_allclose(again.predict(Xt)[REL_HEAD], pred[REL_HEAD])
    ranked = Chosen(model, Choice("xgboost")).predict(Xt)
    np.testing.assert_allclose(ranked["log_time"], pred[REL_HEAD])
    np.testing.assert_allclose(ranked["log_width"], pred[REL_WIDTH])
    # the relative width separates the looser plans of an unseen workload from the others
    loose = Xt[:, FEATURE_NAMES.index("n_kernels")] > 6
    assert pred[REL_WIDTH][loose].min() > pred[REL_WIDTH][~loose].max()
    assert REL_HEAD not in XGBCostModel().fit(X, Y).predict(Xt)    # no groups, no head
    with pytest.raises(BoundFlowError, match="groups for"):
        XGBCostModel().fit(X, Y, groups[:5])


def test_a_model_saved_by_an_older_version_is_refused():
    X, Y = _synthetic(50, 0)
    blob = XGBCostModel().fit(X, Y).save().replace(f'"model_version": {MODEL_VERSION}'.encode(),
                                                   f'"model_version": {MODEL_VERSION - 1}'.encode())
    assert blob != XGBCostModel().fit(X, Y).save()
    with pytest.raises(BoundFlowError, match="retrain"):
        XGBCostModel.load(blob)


def _named(bundle, graph, backend="torch"):
    return dict(zip(FEATURE_NAMES, features(bundle, normalised(graph)[0], backend)))


def test_pooled_task_features_see_the_graph_and_weight_tasks_by_flops():
    """features-v4: op kinds and depth of the graph, per-task FLOPs by lowering and kind,
    and the schedule of the tasks that do the work, not the average task's."""
    _, mlp = example_graph("random_deep_mlp")
    _, res = example_graph("random_residual")
    fm = _named(plan(mlp, Workload.of(mlp, batch=4, method="crown")), mlp)
    fr = _named(plan(res, Workload.of(res, batch=4, method="crown")), res)
    n_linear = sum(n.op == "linear" for n in normalised(mlp)[0].nodes)
    assert fm["depth_weighted"] == n_linear and fm["ops_merge"] == 0 and fm["ops_window"] == 0
    assert fr["ops_merge"] > 0 and fr["ops_window"] > 0        # the residual add, avgpool
    for f in (fm, fr):
        shares = f["share_flops_ibp"] + f["share_flops_crown"] + f["share_flops_final"] + \
            f["share_flops_forward"]
        assert abs(shares - 1.0) < 1e-9 and f["task_nodes_max"] >= f["task_nodes_mean"] >= 1
    assert fm["share_flops_crown"] > 0.5            # CROWN's backward walks dominate

    # on Relax, the schedule of the task with most FLOPs decides w_*; the torch backend,
    # which tunes no schedules, sees none of it
    w = Workload.of(mlp, batch=4, method="ibp")
    k = default(mlp, w).replace(lowering="tir")
    b = plan(mlp, w, k)
    gn = normalised(mlp)[0]
    from boundflow.costmodel import task_work
    work = sorted(task_work(b, gn), key=lambda t: t.flops)
    big, small = work[-1].task, work[0].task
    def unrolled(task, u):
        return plan(mlp, w, k.replace(schedule=((task, (("unroll", u),)),)))
    on_big = _named(unrolled(big, 0), mlp, "relax")         # the default unrolls 64
    on_small = _named(unrolled(small, 0), mlp, "relax")
    assert on_big["w_unroll"] < 32 < on_small["w_unroll"]
    assert on_big["log_flops_tir"] > 0 and on_big["w_tir"] == pytest.approx(1.0)
    assert _named(unrolled(small, 0), mlp, "torch")["w_unroll"] == 0.0


def test_cuda_schedule_knobs_are_features():
    """features-v5: the cuda schedule knobs (``threads``, ``shared``) reach the vector, with
    their defaults filled in, so a model can learn what staging in shared memory does."""
    _, g = example_graph("random_cnn")
    w = Workload.of(g, batch=4, method="crown-ibp", target="cuda")
    k = default(g, w).replace(lowering="tir", task_lowering=())
    tasks = [t.name for t in plan(g, w, k).task_graph.tasks if t.kind != "input"]
    def every(knobs):
        return _named(plan(g, w, k.replace(schedule=tuple((t, knobs) for t in tasks))), g,
                      "relax")
    staged, dlight = every((("shared", 32),)), every((("shared", 0),))
    assert staged["w_shared"] == pytest.approx(32) and dlight["w_shared"] == 0.0
    assert every(())["w_shared"] == pytest.approx(16)          # the default
    assert every((("shared", 0), ("threads", 256)))["w_threads"] == pytest.approx(256)
