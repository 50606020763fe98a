"""CROWN, CROWN-IBP and alpha-CROWN: exact small cases, soundness by sampling for every op,
every example and random per-layer domain mixes, and the tightness order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import boundflow as bf
import boundflow.examples as examples
from boundflow.api import as_graph
from boundflow.ir import DomainPlan, GraphBuilder, preactivations
from tests.domains.test_interval import OP_BUILDERS
from tests.helpers import assert_contains, box_points, true_outputs

METHODS = ["ibp", "crown-ibp", "crown", "alpha-crown"]
FAST_ALPHA = bf.AlphaConfig(iterations=5)


def _relu_minus_half():
    """y = relu(x) - x/2 on x in [-1, 2]: true range [0, 1]."""
    b = GraphBuilder("float64")
    x = b.input((1,))
    y = b.add_node("add", [b.add_node("relu", [x]), b.add_node("mul", [x],
                                                                  params={"other": -0.5})])
    return b.build(y)


def test_crown_by_hand():
    g = _relu_minus_half()
    box = bf.InputSpec.box([[-1.0]], [[2.0]])
    ibp = bf.compute_bounds(g, box, method="ibp")
    assert ibp.lower.item() == -1.0 and ibp.upper.item() == 2.5
    # upper: chord 2/3 x + 2/3 minus x/2 peaks at x = 2 -> 1; lower: slope 1 (u > -l) -> x/2
    out = bf.compute_bounds(g, box, method="crown")
    assert out.lower.item() == pytest.approx(-0.5) and out.upper.item() == pytest.approx(1.0)
    zero = bf.compute_bounds(g, box, method="crown", lower_slope="zero")
    assert zero.lower.item() == pytest.approx(-1.0)
    # the best lower slope is 1/2, which gives the exact lower bound 0
    alpha = bf.compute_bounds(g, box, method="alpha-crown", alpha=bf.AlphaConfig(iterations=40))
    assert -0.05 < alpha.lower.item() <= 1e-12 and alpha.upper.item() == pytest.approx(1.0)


def _op_network(name: str, dtype: str = "float64"):
    """An op inside a ReLU network: x -> relu(x - c) -> op -> relu -> linear."""
    shape, build = OP_BUILDERS[name]
    rng = np.random.default_rng(7)
    w = lambda *s: rng.standard_normal(s)  # noqa: E731
    b = GraphBuilder(dtype)
    x = b.input(shape)
    h = b.add_node("relu", [b.add_node("sub", [x], params={"other": w(*shape) * 0.3})])
    h = b.add_node("relu", [build(b, h, w)])
    h = b.add_node("flatten", [h], attrs={"start_dim": 0, "end_dim": -1})
    return b.build(b.add_node("linear", [h], params={"weight": w(3, b.shape(h)[0]),
                                                     "bias": w(3)}))


@pytest.mark.parametrize("method", METHODS[1:])
@pytest.mark.parametrize("case", sorted(OP_BUILDERS))
def test_every_op_sound_by_sampling(case, method):
    g = _op_network(case)
    rng = np.random.default_rng(3)
    centre = rng.standard_normal((2,) + g.input_shape)
    lower, upper = centre - 0.6, centre + 0.6
    out = bf.compute_bounds(g, bf.InputSpec.box(lower, upper), method=method, alpha=FAST_ALPHA)
    assert_contains(out.lower, out.upper, true_outputs(g, box_points(lower, upper)),
                    what=f"{method} on {case}")
    ibp = bf.compute_bounds(g, bf.InputSpec.box(lower, upper), method="ibp")
    assert torch.all(out.lower >= ibp.lower - 1e-9) and torch.all(out.upper <= ibp.upper + 1e-9)


def test_without_relus_crown_is_exact_for_affine_graphs():
    b = GraphBuilder("float64")
    x = b.input((2, 4, 4))
    h = b.add_node("conv2d", [x], params={"weight": np.random.default_rng(0).standard_normal(
        (3, 2, 3, 3))}, attrs={"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1),
                               "groups": 1})
    h = b.add_node("flatten", [b.add_node("avgpool2d", [h], attrs={
        "kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0)})],
        attrs={"start_dim": 0, "end_dim": -1})
    g = b.build(b.add_node("linear", [h], params={"weight": np.ones((1, 12))}))
    lower, upper = -np.ones((1, 2, 4, 4)), np.ones((1, 2, 4, 4))
    out = bf.compute_bounds(g, bf.InputSpec.box(lower, upper), method="crown")
    # an affine map of a box attains its bounds at corners: check against the exact value
    A = torch.autograd.functional.jacobian(
        lambda t: bf.domains.concrete.evaluate(g, t), torch.zeros(1, 2, 4, 4, dtype=torch.float64))
    A = A.reshape(-1).numpy()
    c = true_outputs(g, np.zeros((1, 1, 2, 4, 4)))[0, 0, 0]
    assert out.upper.item() == pytest.approx(c + np.abs(A).sum())
    assert out.lower.item() == pytest.approx(c - np.abs(A).sum())


@pytest.fixture(scope="module", params=sorted(examples.EXAMPLES))
def example(request):
    ex = examples.load(request.param)
    graph = as_graph(ex.model, torch.from_numpy(ex.inputs[:1]))
    labels = ex.labels[:2] if ex.labels is not None else np.array([0, 1])
    return ex, graph, bf.margin_spec(labels, graph.output_shape[-1]).C


@pytest.mark.parametrize("method", METHODS[1:])
def test_every_example_sound_by_sampling(example, method):
    ex, graph, C = example
    x = ex.inputs[:2].astype(np.float64)
    eps = 0.03
    values = true_outputs(graph, box_points(x - eps, x + eps))
    for spec in (None, C):
        out = bf.compute_bounds(graph, x, eps=eps, C=spec, method=method, dtype="float64",
                                alpha=FAST_ALPHA)
        assert_contains(out.lower, out.upper, values, C=spec, what=f"{method} {ex.name}")


def test_tightness_order_on_every_example(example):
    ex, graph, C = example
    x = ex.inputs[:2]
    out = {m: bf.compute_bounds(graph, x, eps=0.03, C=C, method=m, dtype="float64",
                                alpha=FAST_ALPHA) for m in METHODS}
    tol = 1e-7
    for tight, loose in [("alpha-crown", "crown"), ("crown", "crown-ibp"), ("crown-ibp", "ibp")]:
        assert torch.all(out[tight].lower >= out[loose].lower - tol), (tight, loose)
        assert torch.all(out[tight].upper <= out[loose].upper + tol), (tight, loose)
    assert torch.any(out["crown"].width < out["ibp"].width - 1e-6)


def _mix(graph, crown_set, final="crown"):
    return DomainPlan(tuple((p, "crown" if p in crown_set else "ibp")
                            for p in preactivations(graph)), final)


def test_more_crown_layers_are_never_looser_and_mixes_are_sound(example):
    ex, graph, C = example
    x = ex.inputs[:2].astype(np.float64)
    eps = 0.03
    values = true_outputs(graph, box_points(x - eps, x + eps))
    pre = list(preactivations(graph))
    rng = np.random.default_rng(0)
    for trial in range(3):
        order = list(rng.permutation(pre))
        for final in ("ibp", "crown"):
            previous = None
            for k in range(len(order) + 1):          # add crown layers one at a time
                plan = _mix(graph, set(order[:k]), final)
                out = bf.compute_bounds(graph, x, eps=eps, C=C, domains=plan, dtype="float64")
                assert_contains(out.lower, out.upper, values, C=C, what=f"mix {plan}")
                if previous is not None:
                    assert torch.all(out.lower >= previous.lower - 1e-7), plan
                    assert torch.all(out.upper <= previous.upper + 1e-7), plan
                previous = out


def test_domain_plan_is_an_explicit_argument(example):
    ex, graph, C = example
    pre = preactivations(graph)
    x = ex.inputs[:1]
    as_mapping = bf.compute_bounds(graph, x, eps=0.02, method="crown",
                                   domains={p: "crown" for p in pre})
    as_method = bf.compute_bounds(graph, x, eps=0.02, method="crown")
    torch.testing.assert_close(as_mapping.lower, as_method.lower)
    plan = DomainPlan.for_method(graph, "crown-ibp")
    assert DomainPlan.from_json(plan.to_json()) == plan
    with pytest.raises(bf.BoundFlowError, match="missing"):
        bf.compute_bounds(graph, x, eps=0.02, domains={})
    with pytest.raises(bf.BoundFlowError, match="unknown"):
        bf.compute_bounds(graph, x, eps=0.02, domains={**{p: "ibp" for p in pre}, "zz": "ibp"})
    with pytest.raises(bf.BoundFlowError, match="domain 'magic'"):
        bf.compute_bounds(graph, x, eps=0.02, domains={p: "magic" for p in pre})


def test_lower_slope_choices_are_all_sound():
    ex = examples.load("random_mlp")
    graph = as_graph(ex.model, torch.from_numpy(ex.inputs[:1]))
    x = ex.inputs[:2].astype(np.float64)
    values = true_outputs(graph, box_points(x - 0.05, x + 0.05))
    for slope in ("adaptive", "zero", "one"):
        out = bf.compute_bounds(graph, x, eps=0.05, method="crown", lower_slope=slope,
                                dtype="float64")
        assert_contains(out.lower, out.upper, values, what=slope)
    with pytest.raises(bf.BoundFlowError, match="lower_slope"):
        bf.compute_bounds(graph, x, eps=0.05, method="crown", lower_slope="half")


def test_each_layer_is_bounded_once_per_method(monkeypatch, example):
    import importlib

    crown_mod = importlib.import_module("boundflow.domains.crown")
    walk = importlib.import_module("boundflow.domains.backward")
    ex, graph, C = example
    starts = []
    real = walk.backward

    def counting(graph_, start, *args, **kwargs):
        starts.append(start)
        return real(graph_, start, *args, **kwargs)

    real_patches = crown_mod.crown_conv_rows

    def counting_patches(graph_, chain, *args, **kwargs):
        starts.append(chain[0].name)
        return real_patches(graph_, chain, *args, **kwargs)

    monkeypatch.setattr(walk, "backward", counting)
    monkeypatch.setattr(crown_mod, "crown_conv_rows", counting_patches)
    bf.compute_bounds(graph, ex.inputs[:1], eps=0.02, C=C[:1], method="crown")
    exact = crown_mod.ibp_exact_nodes(graph)
    expected = [p for p in preactivations(graph) if p not in exact] + [graph.output]
    # chunking may split one start into several calls, never repeat a start after another
    assert [s for i, s in enumerate(starts) if i == 0 or starts[i - 1] != s] == expected


def test_spec_is_folded_into_the_backward_start(example):
    ex, graph, C = example
    x = ex.inputs[:2]
    folded = bf.compute_bounds(graph, x, eps=0.02, C=C, method="crown", dtype="float64")
    y = bf.compute_bounds(graph, x, eps=0.02, method="crown", dtype="float64")
    pos, neg = np.maximum(C, 0), np.minimum(C, 0)
    after = np.einsum("bsk,bk->bs", pos, y.lower.numpy()) + \
        np.einsum("bsk,bk->bs", neg, y.upper.numpy())
    assert np.all(folded.lower.numpy() >= after - 1e-9)
    assert np.any(folded.lower.numpy() > after + 1e-6)


def test_sparse_option_is_sound_and_between_ibp_and_full_crown(example):
    ex, graph, C = example
    x = ex.inputs[:2].astype(np.float64)
    values = true_outputs(graph, box_points(x - 0.03, x + 0.03, n=2000))
    sparse = bf.compute_bounds(graph, x, eps=0.03, C=C, method="crown", sparse=True,
                               dtype="float64")
    ibp = bf.compute_bounds(graph, x, eps=0.03, C=C, method="ibp", dtype="float64")
    assert_contains(sparse.lower, sparse.upper, values, C=C, what="sparse crown")
    assert torch.all(sparse.lower >= ibp.lower - 1e-9)


def _conv_chain_graph(seed, k, stride, pad, first_k=(3, 3)):
    rng = np.random.default_rng(seed)
    b = GraphBuilder("float64")
    x = b.input((2, 9, 8))
    h = b.add_node("sub", [x], params={"other": rng.standard_normal((2, 1, 1)) * 0.1})
    h = b.add_node("conv2d", [h], params={"weight": rng.standard_normal((4, 2) + first_k),
                                          "bias": rng.standard_normal(4)},
                   attrs={"stride": (1, 2), "padding": (1, 0), "dilation": (1, 1), "groups": 1})
    h = b.add_node("batchnorm", [h], params={"mean": rng.standard_normal(4) * 0.1,
                                             "var": rng.random(4) + 0.5,
                                             "weight": rng.standard_normal(4),
                                             "bias": rng.standard_normal(4)}, attrs={"eps": 1e-5})
    h = b.add_node("relu", [b.add_node("mul", [h], params={"other": np.array(1.5)})])
    h = b.add_node("conv2d", [h], params={"weight": rng.standard_normal((3, 4) + k),
                                          "bias": rng.standard_normal(3)},
                   attrs={"stride": stride, "padding": pad, "dilation": (1, 1), "groups": 1})
    h = b.add_node("relu", [h])
    h = b.add_node("flatten", [h], attrs={"start_dim": 0, "end_dim": -1})
    return b.build(b.add_node("linear", [h], params={"weight": rng.standard_normal(
        (2, b.shape(h)[0]))}))


def _reference(g, x, eps, method, patches, alpha=None):
    from boundflow.domains.driver import reference_bounds
    from boundflow.domains.interval import Interval

    box = Interval(torch.as_tensor(x - eps), torch.as_tensor(x + eps))
    return reference_bounds(g, box, bf.domains.traversal.graph_tensors(g, torch.float64), None,
                            DomainPlan.for_method(g, method), alpha=alpha, patches=patches)


@pytest.mark.parametrize("k, stride, pad", [((3, 3), (1, 1), (1, 1)), ((4, 2), (2, 1), (2, 0)),
                                            ((2, 3), (2, 2), (0, 1)), ((5, 5), (3, 3), (2, 2))])
def test_patch_coefficients_equal_dense_ones(k, stride, pad):
    import importlib

    crown_mod = importlib.import_module("boundflow.domains.crown")
    g = _conv_chain_graph(0, k, stride, pad)
    conv = [n.name for n in g.nodes if n.op == "conv2d"][-1]
    assert crown_mod.conv_chain(g, conv, bf.domains.traversal.graph_tensors(
        g, torch.float64)) is not None
    x = np.random.default_rng(1).standard_normal((3,) + g.input_shape)
    out = {patches: _reference(g, x, 0.3, "crown", patches) for patches in (False, True)}
    torch.testing.assert_close(out[True].lower, out[False].lower, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[True].upper, out[False].upper, rtol=1e-10, atol=1e-10)
    engine = bf.compute_bounds(g, x, eps=0.3, method="crown", dtype="float64")
    torch.testing.assert_close(engine.lower, out[True].lower, rtol=1e-9, atol=1e-9)
    values = true_outputs(g, box_points(x - 0.3, x + 0.3, n=3000))
    assert_contains(out[True].lower, out[True].upper, values)


def test_alpha_with_patch_slopes_equals_dense_slopes(monkeypatch):
    monkeypatch.setattr("boundflow.domains.crown_conv.PATCH_OVERHEAD", 0)   # always patches
    g = _conv_chain_graph(3, (3, 3), (2, 2), (1, 1))
    x = np.random.default_rng(2).standard_normal((2,) + g.input_shape)
    out = {patches: _reference(g, x, 0.3, "alpha-crown", patches, bf.AlphaConfig(iterations=5))
           for patches in (False, True)}
    torch.testing.assert_close(out[True].lower, out[False].lower, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[True].upper, out[False].upper, rtol=1e-6, atol=1e-6)
    crown = bf.compute_bounds(g, x, eps=0.3, method="crown", dtype="float64")
    assert torch.all(out[True].lower >= crown.lower - 1e-9)
    assert torch.any(out[True].lower > crown.lower + 1e-6)


@pytest.mark.parametrize("cin,k,s,p,d,H", [(1, 3, 2, 0, 1, 8), (3, 4, 2, 1, 1, 9),
                                          (3, 3, 3, 2, 2, 11), (4, 4, 2, 2, 1, 8)])
def test_strided_conv_adjoint_onto_few_channels(cin, k, s, p, d, H):
    """The scatter-add path of the adjoint convolution (strided, few input channels) is the
    adjoint: <conv(x), t> = <x, conv_t(t)>, and equals ATen's transposed convolution."""
    import torch.nn.functional as F

    from boundflow.domains import crown_rules

    assert cin <= crown_rules.SCATTER_CHANNELS           # the path under test
    gen = torch.Generator().manual_seed(cin * 100 + H)
    w = torch.randn(6, cin, k, k, dtype=torch.float64, generator=gen)
    ho = (H + 2 * p - d * (k - 1) - 1) // s + 1
    t = torch.randn(2, 3, 6, ho, ho, dtype=torch.float64, generator=gen)
    x = torch.randn(6, cin, H, H, dtype=torch.float64, generator=gen)
    got = crown_rules.conv_t(t, w, (cin, H, H), (s, s), (p, p), (d, d), 1)
    lhs = (F.conv2d(x, w, None, s, p, d).reshape(2, 3, 6, ho, ho) * t).sum()
    assert float((x.reshape(2, 3, cin, H, H) * got).sum()) == pytest.approx(float(lhs), rel=1e-10)
    op = crown_rules._output_padding((H, H), (ho, ho), (k, k), (s, s), (p, p), (d, d))
    aten = F.conv_transpose2d(t.reshape(6, 6, ho, ho), w, None, s, p, op, 1, d)
    torch.testing.assert_close(got.reshape(aten.shape), aten, rtol=0, atol=1e-10)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_alpha_crown_where_no_slope_reaches_the_bound(activation):
    """An activation feeding the output's softmax directly leaves alpha-CROWN nothing to
    optimise on the final bound: it returns CROWN's bounds (sound), never a torch error."""
    rng = np.random.default_rng(0)
    b = GraphBuilder("float64")
    h = b.add_node("linear", [b.input((4,))], params={"weight": rng.standard_normal((3, 4)),
                                                       "bias": rng.standard_normal(3)})
    g = b.build(b.add_node("softmax", [b.add_node(activation, [h])], attrs={"axis": 0}))
    centre = rng.standard_normal((1, 4))
    box = bf.InputSpec.box(centre - 0.5, centre + 0.5)
    alpha = bf.compute_bounds(g, box, method="alpha-crown", alpha=bf.AlphaConfig(iterations=5))
    crown = bf.compute_bounds(g, box, method="crown")
    assert torch.all(alpha.lower >= crown.lower - 1e-12)
    assert torch.all(alpha.upper <= crown.upper + 1e-12)
    assert_contains(alpha.lower, alpha.upper,
                    true_outputs(g, box_points(centre - 0.5, centre + 0.5)), what="alpha-CROWN")
