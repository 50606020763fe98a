"""Input boxes and linear output specs validate themselves."""

import numpy as np
import pytest

from boundflow.errors import SpecError
from boundflow.ir import InputSpec, LinearSpec, margin_spec


def test_linf_box_and_clip():
    x = np.array([[0.0, 0.5, 1.0]])
    s = InputSpec.linf(x, 0.1)
    np.testing.assert_allclose(s.lower, x - 0.1)
    np.testing.assert_allclose(s.upper, x + 0.1)
    c = InputSpec.linf(x, 0.1, clip=(0.0, 1.0))
    np.testing.assert_allclose(c.lower, [[0.0, 0.4, 0.9]])
    np.testing.assert_allclose(c.upper, [[0.1, 0.6, 1.0]])
    assert s.batch == 1 and s.sample_shape == (3,)
    per_feature = InputSpec.linf(x, np.array([0.0, 0.1, 0.2]))
    np.testing.assert_allclose(per_feature.upper - per_feature.lower, [[0.0, 0.2, 0.4]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps", [0.1, 0, np.float32(0.1), np.array(0.25), 1, True])
def test_linf_fast_path_is_the_checked_box(dtype, eps):
    """One radius for a float batch takes a one-pass check; its box is the checked path's
    (to the rounding of the centre's precision), in the centre's dtype, never inverted."""
    x = np.random.default_rng(0).normal(size=(4, 3, 2)).astype(dtype)
    fast, checked = InputSpec.linf(x, eps), InputSpec._checked_linf(x, eps, None)
    for a, b in ((fast.lower, checked.lower), (fast.upper, checked.upper)):
        assert a.dtype == dtype and a.shape == x.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=4 * np.finfo(dtype).eps)
    assert np.all(fast.lower <= x) and np.all(x <= fast.upper)


@pytest.mark.parametrize("make, match", [
    (lambda: InputSpec.linf(np.zeros((1, 3)), -0.1), "eps must be >= 0"),
    (lambda: InputSpec.box(np.ones((1, 3)), np.zeros((1, 3))), r"lower > upper at index \(0, 0\)"),
    (lambda: InputSpec.box(np.zeros((1, 3)), np.ones((1, 4))), "shape"),
    (lambda: InputSpec.linf(np.array([[0.0, np.nan]]), 0.1), "NaN"),
    (lambda: InputSpec.linf(np.array([[0.0, np.inf]]), 0.1), "NaN or inf"),
    (lambda: InputSpec.linf(np.zeros((1, 3)), np.nan), "eps contains NaN"),
    (lambda: InputSpec.linf(np.zeros((1, 3)), np.zeros(4)), "broadcast"),
    (lambda: InputSpec.linf(np.zeros(3), 0.1), "batch dimension"),
    (lambda: InputSpec.linf(np.full((1, 2), 2.0), 0.1, clip=(0, 1)), "outside the clip"),
    (lambda: InputSpec.linf(np.array([["a"]]), 0.1), "numbers"),
    (lambda: InputSpec.linf(np.zeros((1, 3), np.float32), np.float32("nan")), "eps contains"),
    (lambda: InputSpec.linf(np.zeros((1, 3), np.float32), np.inf), "eps contains NaN or inf"),
    (lambda: InputSpec.linf(np.full((1, 3), 3e38, np.float32), 1e38), "NaN or inf"),
    (lambda: InputSpec.linf(np.zeros((0, 3), np.float32), 0.1), "empty"),
    (lambda: InputSpec.linf(np.zeros((1, 3), np.float32), np.array(-0.1)), "eps must be >= 0"),
])
def test_bad_input_boxes_are_named(make, match):
    with pytest.raises(SpecError, match=match):
        make()


def test_margin_spec_is_label_minus_each_other_class():
    spec = margin_spec([2, 0], 4)
    assert spec.C.shape == (2, 3, 4)
    np.testing.assert_array_equal(spec.C[0], [[-1, 0, 1, 0], [0, -1, 1, 0], [0, 0, 1, -1]])
    np.testing.assert_array_equal(spec.C[1], [[1, -1, 0, 0], [1, 0, -1, 0], [1, 0, 0, -1]])
    np.testing.assert_array_equal(spec.threshold, np.zeros((2, 3)))
    with pytest.raises(SpecError, match="must lie in"):
        margin_spec([4], 4)


def test_linear_spec_checks_width_batch_and_threshold():
    spec = LinearSpec(np.ones((2, 3, 5)), threshold=[1.0, 2.0, 3.0])
    assert spec.threshold.shape == (2, 3) and spec.n_specs == 3
    spec.check(2, 5)
    with pytest.raises(SpecError, match="width 5 but the model has 10 outputs"):
        spec.check(2, 10)
    with pytest.raises(SpecError, match="batch 2"):
        spec.check(3, 5)
    with pytest.raises(SpecError, match=r"\[batch, n_specs, n_out\]"):
        LinearSpec(np.ones((3, 5)))
    with pytest.raises(SpecError, match="threshold"):
        LinearSpec(np.ones((2, 3, 5)), threshold=np.ones(4))
    with pytest.raises(SpecError, match="NaN"):
        LinearSpec(np.full((1, 1, 2), np.nan))


def test_a_plain_number_threshold_is_the_same_as_its_array():
    C = np.ones((3, 2, 4), np.float32)
    for t in (0.0, 0, -2, 1.5, 10**6):
        fast, slow = LinearSpec(C, t), LinearSpec(C, np.asarray(t))
        assert fast.threshold.dtype == slow.threshold.dtype == np.float64
        assert fast.threshold.shape == (3, 2) and np.array_equal(fast.threshold, slow.threshold)
        fast.threshold[0, 0] = 99.0                  # its own array, not a shared one
        assert LinearSpec(C, t).threshold[0, 0] == t
    for bad in (float("inf"), float("-inf"), float("nan"), 10**400):
        with pytest.raises(SpecError, match="threshold"):
            LinearSpec(C, bad)
