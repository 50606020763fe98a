"""The patch form of CROWN beyond single-input conv chains (issue 16): residual add/sub of two
nodes, avgpool2d, constant pad, maxpool2d, paths of different stride and the whole-map form.

In float64 the patch form must give the dense form's bounds to 1e-10 (CROWN and alpha-CROWN);
the bounds must hold at 10,000 sampled points per sample. Also tiny exact cases of the window
geometry (:mod:`boundflow.domains.crown_windows`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import boundflow as bf
from boundflow.domains import crown_conv
from boundflow.domains.crown import intermediate_bounds
from boundflow.domains.crown_windows import Window
from boundflow.domains.driver import reference_bounds
from boundflow.domains.interval import Interval
from boundflow.domains.traversal import graph_tensors
from boundflow.ir import DomainPlan, GraphBuilder, preactivations
from tests.helpers import assert_contains, box_points, example_graph, true_outputs

ALPHA = bf.AlphaConfig(iterations=5)
TOL = 1e-10


# --- graphs --------------------------------------------------------------------------------

def _conv(b, x, c_out, k, stride=1, pad=0, dilation=1, groups=1, rng=None):
    c_in = b.shape(x)[0]
    return b.add_node("conv2d", [x], params={
        "weight": rng.standard_normal((c_out, c_in // groups, k, k)) * 0.4,
        "bias": rng.standard_normal(c_out) * 0.1},
        attrs={"stride": (stride, stride), "padding": (pad, pad),
               "dilation": (dilation, dilation), "groups": groups})


def _head(b, h, rng, n_out=3):
    h = b.add_node("flatten", [h], attrs={"start_dim": 0, "end_dim": -1})
    return b.build(b.add_node("linear", [h], params={
        "weight": rng.standard_normal((n_out, b.shape(h)[0])) * 0.3,
        "bias": rng.standard_normal(n_out) * 0.1}))


def residual_projection(seed=0):
    """A stem, a residual block whose main path has a stride-2 conv and whose skip path is
    a padded 2x2 stride-2 projection conv (windows of different sizes and offsets, not
    centred alike, meet at the stem's relu), then a block whose skip is subtracted."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("float64")
    h = b.add_node("relu", [_conv(b, b.input((2, 13, 13)), 3, 3, pad=1, rng=rng)])
    main = _conv(b, h, 4, 3, stride=2, pad=1, rng=rng)
    main = b.add_node("batchnorm", [main], params={
        "mean": rng.standard_normal(4) * 0.1, "var": rng.random(4) + 0.5,
        "weight": rng.standard_normal(4), "bias": rng.standard_normal(4) * 0.1},
        attrs={"eps": 1e-5})
    main = _conv(b, b.add_node("relu", [main]), 4, 3, pad=1, rng=rng)
    skip = b.add_node("pad", [h], attrs={"pads": ((0, 0), (1, 0), (1, 0)), "value": 0.25})
    skip = _conv(b, skip, 4, 2, stride=2, rng=rng)
    h = b.add_node("relu", [b.add_node("add", [main, skip])])
    inner = _conv(b, b.add_node("relu", [_conv(b, h, 4, 3, pad=2, dilation=2, rng=rng)]), 4, 3,
                  pad=1, rng=rng)
    h = b.add_node("relu", [b.add_node("sub", [h, inner])])
    return _head(b, _conv(b, h, 2, 3, rng=rng), rng)


def conv_avgpool_conv(seed=1):
    rng = np.random.default_rng(seed)
    b = GraphBuilder("float64")
    h = b.add_node("relu", [_conv(b, b.input((2, 10, 10)), 4, 3, pad=1, rng=rng)])
    h = b.add_node("avgpool2d", [h], attrs={"kernel_size": (2, 2), "stride": (2, 2),
                                            "padding": (0, 0)})
    h = b.add_node("relu", [_conv(b, h, 4, 3, pad=1, groups=2, rng=rng)])
    h = b.add_node("avgpool2d", [h], attrs={"kernel_size": (3, 3), "stride": (2, 2),
                                            "padding": (1, 1)})
    h = b.add_node("relu", [_conv(b, h, 3, 2, rng=rng)])
    return _head(b, h, rng)


def pad_conv_relu_conv(seed=2):
    rng = np.random.default_rng(seed)
    b = GraphBuilder("float64")
    h = b.add_node("pad", [b.input((2, 7, 6))], attrs={"pads": ((0, 0), (1, 2), (2, 0)),
                                                       "value": 0.7})
    h = b.add_node("relu", [_conv(b, h, 4, 3, stride=2, rng=rng)])
    h = b.add_node("pad", [h], attrs={"pads": ((0, 0), (1, 1), (0, 1)), "value": -0.3})
    h = b.add_node("relu", [_conv(b, h, 3, 3, rng=rng)])
    return _head(b, h, rng)


def conv_maxpool_conv(seed=3):
    rng = np.random.default_rng(seed)
    b = GraphBuilder("float64")
    h = b.add_node("relu", [_conv(b, b.input((2, 9, 9)), 4, 3, pad=1, rng=rng)])
    h = b.add_node("maxpool2d", [h], attrs={"kernel_size": (3, 3), "stride": (2, 2),
                                            "padding": (1, 1)})
    h = b.add_node("relu", [_conv(b, h, 4, 3, pad=1, rng=rng)])
    h = b.add_node("maxpool2d", [h], attrs={"kernel_size": (2, 2), "stride": (1, 1),
                                            "padding": (0, 0)})
    h = b.add_node("relu", [_conv(b, h, 3, 2, rng=rng)])
    return _head(b, h, rng)


def strides_differ(seed=4):
    """Two paths of different total stride into one add (1x1 stride 2 and 5x5 stride 1 on
    an 8x8 map): their windows cannot be joined, so the input is walked whole-map."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("float64")
    x = b.add_node("relu", [_conv(b, b.input((2, 8, 8)), 3, 1, rng=rng)])
    h = b.add_node("add", [_conv(b, x, 3, 1, stride=2, rng=rng), _conv(b, x, 3, 5, rng=rng)])
    h = b.add_node("relu", [h])
    h = b.add_node("concat", [b.add_node("relu", [_conv(b, h, 2, 3, pad=1, rng=rng)]), h],
                   attrs={"axis": 0})
    return _head(b, _conv(b, h, 2, 2, rng=rng), rng)


def affine_between_convs(seed=5):
    """Convolutions with only affine ops between them (a per-channel batchnorm, a per-element
    constant): window entries off the map must be zeroed, no relaxation does it."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("float64")
    h = _conv(b, b.input((2, 7, 7)), 3, 3, pad=1, rng=rng)
    h = b.add_node("batchnorm", [h], params={
        "mean": rng.standard_normal(3) * 0.1, "var": rng.random(3) + 0.5,
        "weight": rng.standard_normal(3), "bias": rng.standard_normal(3)}, attrs={"eps": 1e-5})
    h = b.add_node("add", [h], params={"other": rng.standard_normal((3, 7, 7))})
    h = b.add_node("relu", [_conv(b, h, 3, 3, stride=2, pad=1, rng=rng)])
    h = b.add_node("mul", [h], params={"other": rng.standard_normal((1, 4, 1)) + 2.0})
    return _head(b, b.add_node("relu", [_conv(b, h, 2, 2, pad=1, rng=rng)]), rng)


GRAPHS = {"residual_projection": residual_projection, "conv_avgpool_conv": conv_avgpool_conv,
          "affine_between_convs": affine_between_convs,
          "pad_conv_relu_conv": pad_conv_relu_conv, "conv_maxpool_conv": conv_maxpool_conv,
          "strides_differ": strides_differ}


def _graph_and_box(name, eps=0.3, batch=2):
    if name == "random_residual":
        ex, g = example_graph(name)
        x = ex.inputs[:batch].astype(np.float64)
        eps = 0.05
    else:
        g = GRAPHS[name]()
        x = np.random.default_rng(7).standard_normal((batch,) + g.input_shape)
    return g, x - eps, x + eps


def _bounds(g, lower, upper, method, patches):
    box = Interval(torch.as_tensor(lower), torch.as_tensor(upper))
    return reference_bounds(g, box, graph_tensors(g, torch.float64), None,
                            DomainPlan.for_method(g, method), alpha=ALPHA, patches=patches)


def _starts(g):
    tensors = graph_tensors(g, torch.float64)
    return {p: crown_conv.conv_chain(g, p, tensors) is not None for p in preactivations(g)
            if len(g.node(p).shape) == 3}


# --- patch form == dense form, and sound ---------------------------------------------------

ALL = ["random_residual"] + list(GRAPHS)


@pytest.mark.parametrize("name", ALL)
def test_every_spatial_start_is_covered(name):
    g, _, _ = _graph_and_box(name)
    starts = _starts(g)
    assert starts and all(starts.values()), starts


@pytest.mark.parametrize("name", ALL)
def test_crown_patches_equal_dense_and_are_sound(name):
    g, lower, upper = _graph_and_box(name)
    out = {p: _bounds(g, lower, upper, "crown", p) for p in (False, True)}
    torch.testing.assert_close(out[True].lower, out[False].lower, rtol=TOL, atol=TOL)
    torch.testing.assert_close(out[True].upper, out[False].upper, rtol=TOL, atol=TOL)
    values = true_outputs(g, box_points(lower, upper))
    assert_contains(out[True].lower, out[True].upper, values, what=f"crown {name}")
    ibp = _bounds(g, lower, upper, "ibp", True)
    assert torch.all(out[True].upper - out[True].lower <= ibp.upper - ibp.lower + 1e-9)


@pytest.fixture(params=["always", "rule"])
def alpha_patches(request, monkeypatch):
    """alpha-CROWN's starts in patch form wherever covered, or where ``patches_pay``."""
    if request.param == "always":
        monkeypatch.setattr(crown_conv, "PATCH_OVERHEAD", 0)
    return request.param


@pytest.mark.parametrize("name", ["random_residual", "residual_projection", "conv_maxpool_conv",
                                  "pad_conv_relu_conv"])
def test_alpha_patches_equal_dense_and_are_sound(name, alpha_patches):
    g, lower, upper = _graph_and_box(name, batch=1)
    out = {p: _bounds(g, lower, upper, "alpha-crown", p) for p in (False, True)}
    torch.testing.assert_close(out[True].lower, out[False].lower, rtol=TOL, atol=TOL)
    torch.testing.assert_close(out[True].upper, out[False].upper, rtol=TOL, atol=TOL)
    values = true_outputs(g, box_points(lower, upper))
    assert_contains(out[True].lower, out[True].upper, values, what=f"alpha-crown {name}")
    crown = _bounds(g, lower, upper, "crown", True)
    assert torch.all(out[True].lower >= crown.lower - 1e-9)


def test_the_engine_takes_the_patch_form(monkeypatch):
    """compute_bounds reaches the patch walk for the residual example's starts, and gives the
    reference's bounds."""
    g, lower, upper = _graph_and_box("random_residual")
    seen = []
    real = crown_conv.crown_conv_rows

    def counting(graph, chain, *args, **kwargs):
        seen.append(chain[0].name)
        return real(graph, chain, *args, **kwargs)
    monkeypatch.setattr("boundflow.domains.crown.crown_conv_rows", counting)
    x = (lower + upper) / 2
    out = bf.compute_bounds(g, x, eps=0.05, method="crown", dtype="float64")
    assert {"add", "conv2d_4"} <= set(seen)
    ref = _bounds(g, lower, upper, "crown", False)
    torch.testing.assert_close(out.lower, ref.lower, rtol=1e-9, atol=1e-9)


def test_rows_of_a_subset_equal_those_of_every_neuron():
    g, lower, upper = _graph_and_box("residual_projection")
    tensors = graph_tensors(g, torch.float64)
    box = Interval(torch.as_tensor(lower), torch.as_tensor(upper))
    bounds = intermediate_bounds(g, box, tensors, DomainPlan.for_method(g, "crown"))
    start = [n.name for n in g.nodes if n.op == "add"][0]
    chain = crown_conv.conv_chain(g, start, tensors)
    full = crown_conv.crown_conv_rows(g, chain, bounds[start], box, tensors, bounds, "adaptive")
    index = torch.tensor([0, 5, 17, 60, 149])
    some = crown_conv.crown_conv_rows(g, chain, bounds[start], box, tensors, bounds,
                                      "adaptive", index=index)
    torch.testing.assert_close(some.lower, full.lower[:, index], rtol=TOL, atol=TOL)
    torch.testing.assert_close(some.upper, full.upper[:, index], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", ALL)
def test_rows_of_every_neuron_in_any_order_equal_the_full_walk(name):
    """Selected rows more than the start's channels start alike through the position-free
    nodes next to the start (convs, residual adds, whole-map joins) and are picked later."""
    g, lower, upper = _graph_and_box(name)
    tensors = graph_tensors(g, torch.float64)
    box = Interval(torch.as_tensor(lower), torch.as_tensor(upper))
    bounds = intermediate_bounds(g, box, tensors, DomainPlan.for_method(g, "crown"))
    for start in _starts(g):
        chain = crown_conv.conv_chain(g, start, tensors)
        full = crown_conv.crown_conv_rows(g, chain, bounds[start], box, tensors, bounds,
                                          "adaptive")
        index = torch.randperm(full.lower.shape[1], generator=torch.Generator().manual_seed(0))
        rows = crown_conv.crown_conv_rows(g, chain, bounds[start], box, tensors, bounds,
                                          "adaptive", index=index)
        torch.testing.assert_close(rows.lower, full.lower[:, index], rtol=TOL, atol=TOL)
        torch.testing.assert_close(rows.upper, full.upper[:, index], rtol=TOL, atol=TOL)


def test_alpha_takes_patches_where_they_pay():
    g, _, _ = _graph_and_box("random_residual")
    tensors = graph_tensors(g, torch.float64)
    chains = [crown_conv.conv_chain(g, s, tensors) for s in _starts(g)]
    assert not any(crown_conv.patches_pay(g, c, 1, 1, tensors) for c in chains)
    big = [crown_conv.patches_pay(g, c, 10_000, 32, tensors) for c in chains]
    assert all(big), big
    rng = np.random.default_rng(0)                   # windows as large as the maps: no gain
    b = GraphBuilder("float64")
    h = b.add_node("relu", [_conv(b, b.input((2, 3, 3)), 3, 3, rng=rng)])
    start = _conv(b, h, 2, 1, rng=rng)
    whole = _head(b, b.add_node("relu", [start]), rng)
    wt = graph_tensors(whole, torch.float64)
    chain = crown_conv.conv_chain(whole, start, wt)
    assert chain is not None and not crown_conv.patches_pay(whole, chain, 10_000, 32, wt)


# --- coverage ------------------------------------------------------------------------------

def test_uncovered_shapes_fall_back_to_dense():
    rng = np.random.default_rng(0)
    b = GraphBuilder("float64")
    h = b.add_node("pad", [b.input((2, 5, 5))], attrs={"pads": ((1, 0), (0, 0), (0, 0)),
                                                       "value": 0.0})
    channel_pad = _conv(b, h, 2, 3, rng=rng)
    g = _head(b, b.add_node("relu", [channel_pad]), rng)
    assert crown_conv.conv_chain(g, channel_pad, graph_tensors(g, torch.float64)) is None
    b = GraphBuilder("float64")
    h = b.add_node("reshape", [b.input((50,))], attrs={"shape": (2, 5, 5)})
    after_reshape = _conv(b, h, 2, 3, rng=rng)
    g = _head(b, b.add_node("relu", [after_reshape]), rng)
    assert crown_conv.conv_chain(g, after_reshape, graph_tensors(g, torch.float64)) is None
    lower = rng.standard_normal((1, 50))
    out = {p: _bounds(g, lower, lower + 0.5, "crown", p) for p in (False, True)}
    torch.testing.assert_close(out[True].lower, out[False].lower, rtol=0, atol=0)


# --- window geometry: tiny exact cases -----------------------------------------------------

def test_joined_windows_hold_both_at_their_offsets():
    hw, out = (9, 9), (5, 5)
    main = Window((7, 7), (2, 2), (3, 3), out)         # 3x3 s2 p1 after a 3x3 s1 p1
    skip = Window((1, 1), (2, 2), (0, 0), out)         # 1x1 s2 projection
    both = main.joined(skip, hw)
    assert both == Window((7, 7), (2, 2), (3, 3), out)
    assert skip.widths_to(both) == [3, 3, 3, 3]
    assert Window((2, 2), (2, 2), (1, 1), out).widths_to(both) == [2, 3, 2, 3]
    assert Window((3, 3), (1, 1), (1, 1), out).joined(
        Window((2, 4), (1, 1), (0, 2), out), hw) == Window((3, 4), (1, 1), (1, 2), out)
    assert main.joined(Window((1, 1), (1, 1), (0, 0), out), hw).is_whole     # strides differ
    assert Window((9, 11), (2, 2), (4, 5), out).joined(None, hw).is_whole    # spans the map


def test_whole_maps_are_the_adjoint_of_unfolding():
    """<t, unfold(m)> = <to_whole(t), m> for every geometry: both place window entry r of
    position p at pixel p·S - O + r."""
    gen = torch.Generator().manual_seed(0)
    for size, stride, offset in (((3, 3), (1, 1), (1, 1)), ((5, 4), (2, 3), (2, 0)),
                                 ((7, 7), (2, 2), (3, 3)), ((2, 2), (1, 1), (-1, 0))):
        win = Window(size, stride, offset, (3, 4))
        m = torch.randn(1, 2, 6, 7, dtype=torch.float64, generator=gen)
        t = torch.randn((1, 12, 1, 2) + size, dtype=torch.float64, generator=gen)
        lhs = (t * win.unfold(m)).sum()
        rhs = (win.to_whole(t, (6, 7)) * m.unsqueeze(1)).sum()
        torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
        rows = torch.tensor([0, 7, 11])
        picked = Window(size, stride, offset, (3, 4), rows)
        torch.testing.assert_close(picked.unfold(m), win.unfold(m)[:, rows])
