"""Forward-mode linear bounds (:mod:`boundflow.domains.forward`): the intervals they give
contain the true values at sampled points and corners of the box, for every op they cover;
ops they do not cover are refused by name."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from boundflow.domains.concrete import RULES, evaluate
from boundflow.domains.forward import forward_bounds, supported
from boundflow.domains.interval import Interval
from boundflow.domains.traversal import graph_tensors, propagate
from boundflow.errors import UnsupportedOpError
from boundflow.ir import GraphBuilder
from tests.domains.cases import NEW_OP_BUILDERS


def _check(g, lo, hi, nodes, n=3000, seed=0):
    """Every node's bounds contain its values at random points and the corners."""
    t = graph_tensors(g, torch.float64)
    b = forward_bounds(g, Interval(lo, hi), t, nodes)
    d = lo[0].numel()
    gen = torch.Generator().manual_seed(seed)
    for k in range(lo.shape[0]):
        u = torch.rand((n, d), generator=gen, dtype=torch.float64)
        if d <= 10:
            u = torch.cat([u, torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)),
                                           dtype=torch.float64)])
        pts = (lo[k].reshape(1, -1) + u * (hi[k] - lo[k]).reshape(1, -1)).reshape(
            (-1,) + tuple(lo.shape[1:]))
        vals = propagate(g, RULES, pts, t, nodes, "evaluation")
        for nd in nodes:
            v = vals[nd].reshape(vals[nd].shape[0], -1)
            lb, ub = b[nd].lower[k].reshape(1, -1), b[nd].upper[k].reshape(1, -1)
            tol = 1e-9 * (1 + v.abs())
            assert (v >= lb - tol).all(), f"{nd}: below the lower bound"
            assert (v <= ub + tol).all(), f"{nd}: above the upper bound"
    return b


def _residual_net(seed):
    """conv -> relu -> (conv -> relu) + skip, sub/mul/div by constants (mixed signs),
    pad, avgpool, flatten, linear -> relu -> linear, and a difference of two nodes."""
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.standard_normal(s)               # noqa: E731
    b = GraphBuilder()
    x = b.input((1, 3, 3))
    conv = lambda h, c_out: b.add_node("conv2d", [h], params={  # noqa: E731
        "weight": w(c_out, b.shape(h)[0], 3, 3) * 0.5, "bias": w(c_out) * 0.1},
        attrs={"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1})
    h = b.add_node("relu", [conv(x, 2)])
    r = b.add_node("relu", [conv(h, 2)])
    h = b.add_node("add", [h, r])
    h = b.add_node("sub", [h], params={"other": w(2, 3, 3) * 0.2})
    h = b.add_node("mul", [h], params={"other": w(2, 1, 1)})
    h = b.add_node("div", [h], params={"other": np.array(2.0)})
    h = b.add_node("pad", [h], attrs={"pads": ((0, 0), (1, 0), (0, 1)), "value": 0.3})
    h = b.add_node("avgpool2d", [h], attrs={"kernel_size": (2, 2), "stride": (1, 1),
                                            "padding": (0, 0)})
    h = b.add_node("flatten", [h], attrs={"start_dim": 0, "end_dim": -1})
    a = b.add_node("relu", [b.add_node("linear", [h], params={"weight": w(6, 18) * 0.5,
                                                               "bias": w(6) * 0.1})])
    c = b.add_node("linear", [a], params={"weight": w(3, 6), "bias": w(3) * 0.1})
    d = b.add_node("linear", [h], params={"weight": w(3, 18) * 0.3, "bias": np.zeros(3)})
    return b.build(b.add_node("sub", [c, d]))


@pytest.mark.parametrize("seed", range(4))
def test_forward_bounds_hold_on_a_residual_net_with_every_covered_kind_of_op(seed):
    g = _residual_net(seed)
    assert supported(g)
    rng = np.random.default_rng(seed)
    lo = torch.from_numpy(rng.standard_normal((3, 1, 3, 3)) * 0.3)
    hi = lo + torch.from_numpy(rng.random((3, 1, 3, 3))) * 0.4
    hi[0] = lo[0]                                     # a point box: bounds exact there
    nodes = [n.name for n in g.nodes[1:]]
    b = _check(g, lo, hi, nodes, seed=seed)
    y = evaluate(g, lo[:1])
    assert torch.allclose(b[g.output].lower[0], y[0]) and \
        torch.allclose(b[g.output].upper[0], y[0])


@pytest.mark.parametrize("name", ["relu", "pad", "slice", "gather", "gather_drop",
                                  "conv_transpose2d"])
def test_forward_bounds_hold_for_each_covered_new_op(name):
    shape, build = NEW_OP_BUILDERS[name]
    rng = np.random.default_rng(3)
    b = GraphBuilder()
    x = b.input(shape)
    g = b.build(build(b, x, lambda *s: rng.standard_normal(s)))
    lo = torch.from_numpy(rng.standard_normal((2,) + shape))
    hi = lo + torch.from_numpy(rng.random((2,) + shape))
    _check(g, lo, hi, [g.output])


def test_the_first_affine_layer_is_exact_and_a_split_tightens():
    """Through one affine layer the forward bounds are the interval's image exactly; a
    ``tighten`` (a split state) that fixes a ReLU input's sign is applied before its
    relaxation."""
    rng = np.random.default_rng(0)
    b = GraphBuilder()
    x = b.input((4,))
    z = b.add_node("linear", [x], params={"weight": rng.standard_normal((5, 4)),
                                          "bias": rng.standard_normal(5)})
    g = b.build(b.add_node("linear", [b.add_node("relu", [z])],
                           params={"weight": rng.standard_normal((2, 5)), "bias": np.zeros(2)}))
    t = graph_tensors(g, torch.float64)
    lo, hi = -torch.ones(1, 4, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64)
    out = forward_bounds(g, Interval(lo, hi), t, [z, g.output])
    W, c = t[g.node(z).params["weight"]], t[g.node(z).params["bias"]]
    assert torch.allclose(out[z].upper[0], W.abs().sum(1) + c)
    assert torch.allclose(out[z].lower[0], -W.abs().sum(1) + c)
    dead = lambda node, l, u: (l, torch.minimum(u, torch.zeros_like(u)))  # noqa: E731
    off = forward_bounds(g, Interval(lo, hi), t, [g.output], tighten=dead)
    bias = t[g.nodes[-1].params["bias"]]
    assert torch.allclose(off[g.output].lower[0], bias) and \
        torch.allclose(off[g.output].upper[0], bias)


def test_an_op_forward_mode_does_not_cover_is_refused_by_name():
    b = GraphBuilder()
    x = b.input((3,))
    g = b.build(b.add_node("sigmoid", [x]))
    assert not supported(g)
    with pytest.raises(UnsupportedOpError, match="'sigmoid'"):
        forward_bounds(g, Interval(torch.zeros(1, 3), torch.ones(1, 3)),
                       graph_tensors(g, torch.float32), [g.output])


# --- forward mode as a planner domain ------------------------------------------------------

def _plan_of(g, domain, batch=3, method="crown"):
    from boundflow.ir.workload import Workload
    from boundflow.planner import default, plan

    w = Workload.of(g, batch=batch, method=method, n_specs=0, dtype="float64")
    k = default(g, w)
    return plan(g, w, k.replace(domains=tuple(domain for _ in k.domains)), verify=True)


def test_the_planner_offers_forward_mode_on_small_covered_inputs_only():
    from boundflow.ir.workload import Workload
    from boundflow.planner import space
    from tests.domains.cases import model
    from tests.helpers import example_graph

    def choices(g):
        return space(g, Workload.of(g, batch=2, method="crown")).domain_choices
    assert "forward" in choices(example_graph("random_mlp")[1])         # 20 inputs
    assert "forward" in choices(_residual_net(0))                        # 9, every op covered
    assert "forward" not in choices(example_graph("random_cnn")[1])      # 768 inputs
    assert "forward" not in choices(model("sigmoid_tanh"))               # sigmoid: uncovered
    g = _residual_net(0)
    assert "forward" not in space(g, Workload.of(g, batch=2, method="ibp")).domain_choices


def test_a_forward_domain_outside_the_space_is_refused_by_the_planner():
    from boundflow.errors import BoundFlowError
    from tests.domains.cases import model
    from tests.helpers import example_graph

    for g in (model("sigmoid_tanh"), example_graph("random_cnn")[1]):
        with pytest.raises(BoundFlowError, match="'forward' is not one of .* at most 64"):
            _plan_of(g, "forward")


@pytest.mark.parametrize("seed", range(3))
def test_a_plan_with_forward_domains_is_sound_never_looser_than_ibp_and_backends_agree(seed):
    """Each pre-activation marked forward gets a ``forward`` task whose interval lies inside
    its IBP one; the plan's bounds contain the true outputs at sampled points and corners,
    equal the un-partitioned reference, and the Relax backend (a torch callback for the
    forward task) gives the same bounds."""
    from boundflow.backend.torch import TorchExecutor
    from boundflow.domains.driver import reference_bounds
    from boundflow.ir.spec import InputSpec
    from boundflow.planner import normalised
    from tests.helpers import assert_contains, box_points, true_outputs

    g = _residual_net(seed)
    rng = np.random.default_rng(seed)
    lo = rng.standard_normal((3, 1, 3, 3)) * 0.3
    x = InputSpec(lo, lo + rng.random((3, 1, 3, 3)) * 0.4)
    fwd, ibp = _plan_of(g, "forward"), _plan_of(g, "ibp")
    kinds = [t.kind for t in fwd.task_graph.tasks]
    assert kinds.count("forward") >= 2 and "crown" not in kinds
    assert fwd.lowering_plan.lowering(next(t.name for t in fwd.task_graph.tasks
                                           if t.kind == "forward")) == "torch"
    keep = [n for n, d in fwd.domain_plan.intermediate]
    got = TorchExecutor(fwd, g).run(x, keep=keep)
    loose = TorchExecutor(ibp, g).run(x, keep=keep)
    for n in keep:
        a, b = got.stats["bounds"][n], loose.stats["bounds"][n]
        assert (a.lower >= b.lower - 1e-12).all() and (a.upper <= b.upper + 1e-12).all()
    assert (got.upper - got.lower).sum() < (loose.upper - loose.lower).sum()
    assert_contains(got.lower, got.upper, true_outputs(g, box_points(x.lower, x.upper, 2000)))
    gn = normalised(g)[0]
    ref = reference_bounds(gn, Interval(torch.as_tensor(x.lower), torch.as_tensor(x.upper)),
                           graph_tensors(gn, torch.float64), None, fwd.domain_plan.plan)
    np.testing.assert_allclose(got.lower.numpy(), ref.lower.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got.upper.numpy(), ref.upper.numpy(), rtol=1e-9, atol=1e-9)
