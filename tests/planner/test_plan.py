"""The planner: search space, pass pipeline, plan verifier, PlanBundle JSON."""

import json
import random

import pytest

from boundflow.errors import BoundFlowError
from boundflow.examples import EXAMPLES
from boundflow.ir.knobs import Knobs
from boundflow.ir.plan import SCHEMA_VERSION, PlanBundle
from boundflow.ir.task_graph import PlanError
from boundflow.ir.workload import Workload
from boundflow.planner import PASSES, default, normalised, plan, space
from boundflow.planner import passes as passes_mod
from tests.helpers import example_graph

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_random_knobs_plan_verify_and_round_trip(name):
    _, g = example_graph(name)
    w = Workload.of(g, batch=2, method="alpha-crown")
    sp = space(g, w)
    rng = random.Random(0)
    for _ in range(20):
        knobs = sp.sample(rng)
        bundle = plan(g, w, knobs, verify=True)
        assert bundle.knobs == knobs
        again = PlanBundle.from_json(bundle.to_json())
        assert again == bundle and again.key == bundle.key


@pytest.mark.parametrize("method", METHODS)
def test_default_knobs_follow_the_method(method):
    _, g = example_graph("digits_cnn")
    w = Workload.of(g, method=method)
    k = default(g, w)
    inner, final = {"ibp": ("ibp", "ibp"), "crown-ibp": ("ibp", "crown"),
                    "crown": ("crown", "crown"), "alpha-crown": ("crown", "alpha-crown")}[method]
    assert set(k.domains) == {inner} and k.final == final
    bundle = plan(g, w, verify=True)
    assert bundle.domain_plan.final == final
    kinds = [t.kind for t in bundle.task_graph.tasks]
    assert kinds[0] == "input" and kinds[-1] == "final"
    assert ("crown" in kinds) == (inner == "crown")


def test_space_lists_decisions_and_rejects_bad_knobs():
    _, g = example_graph("random_residual")
    w = Workload.of(g, method="crown")
    sp = space(g, w)
    assert sp.size == 2 ** len(sp.fusible) * 2 ** len(sp.preactivations) * 2 \
        * 2 ** len(sp.regions) * 2 ** len(sp.affine) * 3 * 2 * 2     # lowering: 3 choices
    assert sp.finals == ("ibp", "crown")                 # nothing past the method's own
    k = default(g, w)
    with pytest.raises(BoundFlowError, match="knobs.partition has"):
        plan(g, w, k.replace(partition=k.partition[:-1]))
    with pytest.raises(BoundFlowError, match="alpha-crown"):
        plan(g, w, k.replace(final="alpha-crown"))
    with pytest.raises(BoundFlowError, match="unknown choices"):
        k.replace(layouts=("NCWH",) * len(k.layouts))
    with pytest.raises(BoundFlowError, match="does not have"):
        plan(g, w, k.replace(task_lowering=(("ibp:nowhere", "tir"),)))


def test_ibp_workload_has_no_crown_choices():
    _, g = example_graph("digits_mlp")
    sp = space(g, Workload.of(g, method="ibp"))
    assert sp.domain_choices == ("ibp",) and sp.finals == ("ibp",)


def test_knobs_json_and_hash():
    _, g = example_graph("random_cnn")
    k = default(g, Workload.of(g, method="crown"))
    assert Knobs.from_json(k.to_json()) == k and hash(k) == hash(Knobs.from_json(k.to_json()))
    assert k.replace(storage="none").key != k.key
    with pytest.raises(BoundFlowError, match="not valid JSON"):
        Knobs.from_json("{nope")
    with pytest.raises(BoundFlowError, match="unknown fields"):
        Knobs.from_json(json.dumps({"partition": [], "colour": "red"}))


def test_crown_preactivation_is_cut_out_of_its_fused_task():
    _, g = example_graph("digits_mlp")
    w = Workload.of(g, method="crown")
    bundle = plan(g, w, verify=True)                      # default: everything fusible fused
    for node in bundle.domain_plan.crown_nodes:
        producer = next(t for t in bundle.task_graph.tasks if node in t.outputs)
        assert producer.nodes[-1] == node
        crown = bundle.task_graph.task(f"crown:{node}")
        assert crown.inputs[0] == node
    # IBP-exact pre-activations (one affine map from the box) get no CROWN task
    first = space(g, w).preactivations[0]
    assert first not in bundle.domain_plan.crown_nodes


def test_verifier_names_the_failing_pass(monkeypatch):
    _, g = example_graph("digits_mlp")

    def broken_liveness(ctx):
        ctx = passes_mod.liveness(ctx)
        tg = ctx.task_graph
        return ctx.but(task_graph=tg.replace(tasks=tg.tasks[:1] + tg.tasks[2:]))

    broken_liveness.__name__ = "liveness"
    monkeypatch.setattr("boundflow.planner.PASSES",
                        tuple(broken_liveness if p is passes_mod.liveness else p for p in PASSES))
    with pytest.raises(PlanError, match="after pass 'liveness'"):
        plan(g, Workload.of(g, method="crown"), verify=True)


def test_plan_json_from_another_schema_version_is_refused():
    _, g = example_graph("digits_mlp")
    d = json.loads(plan(g, Workload.of(g)).to_json())
    d["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(BoundFlowError, match=f"schema version {SCHEMA_VERSION + 1}"):
        PlanBundle.from_json(json.dumps(d))
    with pytest.raises(BoundFlowError, match="not a plan JSON"):
        PlanBundle.from_json("[1, 2")
    with pytest.raises(BoundFlowError, match="no schema_version"):
        PlanBundle.from_json("{}")
    del d["task_graph"]
    d["schema_version"] = SCHEMA_VERSION
    with pytest.raises(BoundFlowError, match="task_graph"):
        PlanBundle.from_json(json.dumps(d))


def test_plan_for_another_model_is_refused():
    _, g = example_graph("digits_mlp")
    _, other = example_graph("random_mlp")
    with pytest.raises(BoundFlowError, match="another structure"):
        plan(other, Workload.of(g))


def test_storage_plan_reuses_and_never_overlaps():
    _, g = example_graph("random_residual")
    w = Workload.of(g, method="crown")
    k = default(g, w)
    unfused = k.replace(partition=tuple(False for _ in k.partition))
    reuse = plan(g, w, unfused, verify=True).storage_plan
    none = plan(g, w, unfused.replace(storage="none"), verify=True).storage_plan
    assert reuse.planned_bytes < 0.75 * none.planned_bytes
    assert none.planned_bytes == none.unshared_bytes and not none.inplace
    assert reuse.inplace                                   # relu over its dying input


def test_layout_plan_for_a_channels_last_model():
    _, g = example_graph("random_nhwc")
    w = Workload.of(g, method="crown")
    bundle = plan(g, w, verify=True)
    lp = bundle.layout_plan
    gn = normalised(g)[0]
    ops = [n.op for n in gn.nodes]
    assert ops.count("permute") == 1                      # of four: pair cancelled, one folded
    assert any("removed permute" in r for r in lp.rewrites)
    assert any("folded permute" in r for r in lp.rewrites)
    (region, layout), = lp.regions
    assert layout == "NHWC"                               # default: the permute in is free
    assert [n.name for n in gn.nodes if n.op == "permute"] == list(
        v for v in lp.views if gn.node(v).op == "permute")
    nchw = plan(g, w, bundle.knobs.replace(layouts=("NCHW",)), verify=True)
    assert not [v for v in nchw.layout_plan.views if gn.node(v).op == "permute"]


def test_layout_conversion_is_inserted_where_a_region_reads_the_input():
    _, g = example_graph("random_cnn")
    w = Workload.of(g, method="ibp")
    k = default(g, w)
    k = k.replace(partition=tuple(False for _ in k.partition), layouts=("NHWC",) * len(k.layouts))
    bundle = plan(g, w, k, verify=True)
    convs = [t for t in bundle.task_graph.tasks if t.kind == "layout"]
    assert convs and bundle.layout_plan.conversions == tuple(t.outputs[0] for t in convs)
    flat = next(t for t in bundle.task_graph.tasks if any(
        normalised(g)[0].node(n).op == "flatten" for n in t.nodes))
    assert all(bundle.task_graph.buffer(b).identity_layout for b in flat.inputs)
