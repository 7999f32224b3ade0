"""Every NumPy building block against the ``torch.nn.functional`` op of the same name.

Agreement runs in float64 on both sides. Tolerance: the ops here are sums of at most a few
hundred products of entries of size <= ~10, so float64 rounding leaves differences below
~1e-13 absolute; ``rtol=1e-10`` plus ``atol=1e-12`` (for outputs that cancel to near 0) sit far
above that and far below any real mistake (a window one pixel off, a wrong divisor or a wrong
interpolation weight moves an output by more than 1e-3).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st

from refimpl import numpy_functional as nf
from tests.strategies import assert_close_report, nchw_shapes, normal, seeds, spread, to_torch

RTOL, ATOL = 1e-10, 1e-12


def check(actual: np.ndarray, expected: torch.Tensor, what: str) -> None:
    """NumPy float64 ``actual`` against torch's float64 ``expected``."""
    assert actual.dtype == np.float64, f"{what}: computed in {actual.dtype}, not float64"
    expected = expected.numpy()
    # -inf where a max-pooling window holds only padding: equal exactly, then left out
    infinite = ~np.isfinite(expected)
    if actual.shape == expected.shape and infinite.any():
        np.testing.assert_array_equal(actual[infinite], expected[infinite], err_msg=what)
        actual, expected = np.where(infinite, 0.0, actual), np.where(infinite, 0.0, expected)
    assert_close_report(actual, expected, rtol=RTOL, atol=ATOL, what=what)


def pairs(low: int, high: int) -> st.SearchStrategy[tuple[int, int]]:
    return st.tuples(st.integers(low, high), st.integers(low, high))


def int_or_pair(draw: st.DrawFn, pair: tuple[int, int]) -> int | tuple[int, int]:
    """``pair`` as torch accepts it: an int when both entries agree and the draw says so."""
    return pair[0] if pair[0] == pair[1] and draw(st.booleans()) else pair


# --------------------------------------------------------------------------------------------
# Elementwise ops and linear


@given(
    batch=st.lists(st.integers(1, 3), max_size=2),
    sizes=pairs(1, 8),
    bias=st.booleans(),
    seed=seeds,
)
def test_linear(batch, sizes, bias, seed):
    in_features, out_features = sizes
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*batch, in_features))
    w = rng.standard_normal((out_features, in_features))
    b = rng.standard_normal(out_features) if bias else None
    expected = F.linear(to_torch(x), to_torch(w), None if b is None else to_torch(b))
    check(nf.linear(x, w, b), expected, "linear")


ELEMENTWISE = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
@given(shape=nchw_shapes(max_c=8), scale=st.sampled_from([1.0, 10.0, 100.0]), seed=seeds)
def test_elementwise(name, shape, scale, seed):
    # scale 100 reaches the saturated tails of sigmoid and tanh
    x = normal(shape, seed, scale)
    check(getattr(nf, name)(x), ELEMENTWISE[name](to_torch(x)), name)


def test_sigmoid_saturates_without_warnings():
    x = np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0])
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        s = nf.sigmoid(x)
    assert s[0] == 0.0 and s[-1] == 1.0
    assert s[2] == 0.5  # exactly
    assert np.all(np.diff(s) >= 0)


def test_sigmoid_keeps_relative_precision_of_tiny_values():
    # sigmoid(-40) ~ 4.25e-18: 1 - sigmoid(40) would round it to 0. Relative comparison with
    # atol=0: both sides compute it to within a few ulps.
    x = np.array([-40.0, -100.0, -700.0])
    expected = torch.sigmoid(to_torch(x)).numpy()
    assert np.all(expected > 0)
    assert_close_report(nf.sigmoid(x), expected, rtol=1e-14, atol=0.0, what="sigmoid tail")


# --------------------------------------------------------------------------------------------
# softmax


@st.composite
def softmax_cases(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    return shape, dim


@given(case=softmax_cases(), scale=st.sampled_from([1.0, 30.0, 1e3]), seed=seeds)
def test_softmax(case, scale, seed):
    shape, dim = case
    x = normal(shape, seed, scale)
    y = nf.softmax(x, dim)
    check(y, F.softmax(to_torch(x), dim=dim), f"softmax dim={dim}")
    np.testing.assert_allclose(y.sum(axis=dim), 1.0, rtol=1e-12)


def test_softmax_of_huge_logits_is_finite():
    x = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, -1e4]])
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise"):
        warnings.simplefilter("error")
        y = nf.softmax(x, dim=1)
    np.testing.assert_array_equal(y, [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    check(y, F.softmax(to_torch(x), dim=1), "softmax 1e4")


# --------------------------------------------------------------------------------------------
# conv2d


@st.composite
def conv_cases(draw):
    """Shapes and options of a convolution whose output is not empty; C <= 8."""
    groups = draw(st.integers(1, 4))
    c_in = groups * draw(st.integers(1, 8 // groups))
    c_out = groups * draw(st.integers(1, 8 // groups))
    kh, kw = draw(pairs(1, 4))
    dilation = draw(pairs(1, 3))
    padding = draw(st.one_of(st.sampled_from(["same", "valid"]), pairs(0, 2)))
    stride = (1, 1) if padding == "same" else draw(pairs(1, 3))
    pad = (0, 0) if isinstance(padding, str) else padding
    # the smallest input the dilated kernel fits in ("same" pads it to fit any input)
    low = [
        1 if padding == "same" else max(1, d * (k - 1) + 1 - 2 * p)
        for k, d, p in zip((kh, kw), dilation, pad, strict=True)
    ]
    h, w = draw(st.integers(low[0], max(low[0], 17))), draw(st.integers(low[1], max(low[1], 17)))
    return {
        "x": (draw(st.integers(1, 3)), c_in, h, w),
        "weight": (c_out, c_in // groups, kh, kw),
        "bias": draw(st.booleans()),
        "options": {
            "stride": int_or_pair(draw, stride),
            "padding": padding if isinstance(padding, str) else int_or_pair(draw, padding),
            "dilation": int_or_pair(draw, dilation),
            "groups": groups,
        },
    }


# torch warns that "same" with an even kernel copies the input; nothing to act on here
@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
@given(case=conv_cases(), seed=seeds)
@example(  # "same" with an even kernel: the extra zero goes bottom / right, as torch
    case={
        "x": (1, 2, 5, 4),
        "weight": (2, 2, 2, 4),
        "bias": False,
        "options": {"stride": 1, "padding": "same", "dilation": (1, 1), "groups": 1},
    },
    seed=1,
)
def test_conv2d(case, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case["x"])
    w = rng.standard_normal(case["weight"])
    b = rng.standard_normal(case["weight"][0]) if case["bias"] else None
    expected = F.conv2d(
        to_torch(x), to_torch(w), None if b is None else to_torch(b), **case["options"]
    )
    check(nf.conv2d(x, w, b, **case["options"]), expected, f"conv2d {case['options']}")


def test_conv2d_1x1_literal():
    # A 1x1 convolution mixes channels per pixel: y[o] = sum_c W[o, c] x[c] + b[o].
    x = np.array([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # (1, 2, 1, 2)
    w = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]).reshape(3, 2, 1, 1)
    b = np.array([0.0, 0.0, 10.0])
    expected = np.array([[[[1.0, 2.0]], [[3.0, 4.0]], [[8.0, 8.0]]]])
    np.testing.assert_array_equal(nf.conv2d(x, w, b), expected)


def test_conv2d_3x3_padding_literal():
    # A 3x3 box filter over a 3x3 image of ones with one zero of padding counts each
    # output pixel's neighbours inside the image: 4 at a corner, 6 on an edge, 9 at the centre.
    y = nf.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)), padding=1)
    np.testing.assert_array_equal(y[0, 0], [[4, 6, 4], [6, 9, 6], [4, 6, 4]])


CONV_ERRORS = {
    "rank": (np.ones((2, 3)), np.ones((1, 3, 1, 1)), {}),
    "channels": (np.ones((1, 3, 4, 4)), np.ones((1, 2, 1, 1)), {}),
    "groups": (np.ones((1, 4, 4, 4)), np.ones((3, 2, 1, 1)), {"groups": 2}),
    "kernel larger than input": (np.ones((1, 1, 2, 2)), np.ones((1, 1, 3, 3)), {}),
    "same with stride": (
        np.ones((1, 1, 5, 5)),
        np.ones((1, 1, 3, 3)),
        {"padding": "same", "stride": 2},
    ),
    "bad padding string": (np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)), {"padding": "full"}),
}


@pytest.mark.parametrize("name", sorted(CONV_ERRORS))
def test_conv2d_rejects_what_torch_rejects(name):
    x, w, options = CONV_ERRORS[name]
    with pytest.raises((RuntimeError, ValueError)):
        F.conv2d(to_torch(x), to_torch(w), **options)
    with pytest.raises(ValueError):
        nf.conv2d(x, w, **options)


# --------------------------------------------------------------------------------------------
# batch_norm


@given(
    shape=st.one_of(
        st.tuples(st.integers(1, 8), st.integers(1, 8)),  # (N, C)
        st.tuples(st.integers(1, 3), st.integers(1, 8), st.integers(1, 9)),  # (N, C, L)
        nchw_shapes(max_c=8),
    ),
    training=st.booleans(),
    affine=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-3]),
    seed=seeds,
)
def test_batch_norm(shape, training, affine, eps, seed):
    # Training needs at least two values per channel (torch raises otherwise, tested below).
    assume(not training or math.prod(shape) // shape[1] >= 2)
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.standard_normal(shape) * 2 + 0.5
    # Random running statistics, so that eval mode is not the identity.
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    weight, bias = (rng.standard_normal(c), rng.standard_normal(c)) if affine else (None, None)
    torch_mean, torch_var = to_torch(mean), to_torch(var)  # torch updates these in training
    expected = F.batch_norm(
        to_torch(x),
        torch_mean,
        torch_var,
        None if weight is None else to_torch(weight),
        None if bias is None else to_torch(bias),
        training=training,
        eps=eps,
    )
    mean_before, var_before = mean.copy(), var.copy()
    y = nf.batch_norm(x, mean, var, weight, bias, training=training, eps=eps)
    check(y, expected, f"batch_norm training={training}")
    # pure: the running statistics are read, never written
    np.testing.assert_array_equal(mean, mean_before)
    np.testing.assert_array_equal(var, var_before)


def test_batch_norm_training_literal():
    # One channel, N*H*W = 2 values {1, 3}: batch mean 2, biased variance 1.
    x = np.array([1.0, 3.0]).reshape(2, 1, 1, 1)
    y = nf.batch_norm(x, None, None, training=True, eps=1e-5)
    expected = np.array([-1.0, 1.0]) / math.sqrt(1.0 + 1e-5)
    np.testing.assert_allclose(y.ravel(), expected, rtol=1e-15)
    check(y, F.batch_norm(to_torch(x), None, None, training=True, eps=1e-5), "batch_norm")


def test_batch_norm_eval_literal():
    # (x - running_mean) / sqrt(running_var + eps) * weight + bias, per channel
    x = np.array([[3.0, 3.0]])
    y = nf.batch_norm(x, np.array([1.0, 5.0]), np.array([4.0, 1.0]), np.array([2.0, 1.0]),
                      np.array([0.0, 10.0]), eps=0.0)  # fmt: skip
    np.testing.assert_array_equal(y, [[2.0, 8.0]])


def test_batch_norm_training_needs_two_values_per_channel():
    x = np.ones((1, 3, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value"):
        F.batch_norm(to_torch(x), None, None, training=True)
    with pytest.raises(ValueError, match="more than 1 value"):
        nf.batch_norm(x, None, None, training=True)


def test_batch_norm_eval_needs_running_statistics():
    with pytest.raises(ValueError, match="running"):
        nf.batch_norm(np.ones((2, 3)), None, None)


# --------------------------------------------------------------------------------------------
# max_pool2d and avg_pool2d


@st.composite
def pool_cases(draw, dilated: bool):
    """Shapes and options of a pooling whose output is not empty (padding <= kernel / 2)."""
    kernel = draw(pairs(1, 4))
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    dilation = draw(pairs(1, 3)) if dilated else (1, 1)
    low = [
        max(1, d * (k - 1) + 1 - 2 * p) for k, d, p in zip(kernel, dilation, padding, strict=True)
    ]
    h, w = draw(st.integers(low[0], max(low[0], 17))), draw(st.integers(low[1], max(low[1], 17)))
    stride = draw(st.one_of(st.none(), pairs(1, 3)))
    options = {
        "kernel_size": int_or_pair(draw, kernel),
        "stride": None if stride is None else int_or_pair(draw, stride),
        "padding": int_or_pair(draw, padding),
    }
    if dilated:
        options["dilation"] = int_or_pair(draw, dilation)
    return (draw(st.integers(1, 3)), draw(st.integers(1, 4)), h, w), options


@pytest.mark.parametrize("ceil_mode", [False, True])
@given(case=pool_cases(dilated=True), seed=seeds)
@example(  # a dilated window whose taps all land in the padding: -inf, like torch
    case=((1, 1, 1, 1), {"kernel_size": 2, "stride": 1, "padding": 1, "dilation": 2}), seed=0
)
def test_max_pool2d(ceil_mode, case, seed):
    shape, options = case
    x = spread(shape, seed)  # tie-free: the maximum is unique
    expected = F.max_pool2d(to_torch(x), ceil_mode=ceil_mode, **options)
    check(nf.max_pool2d(x, ceil_mode=ceil_mode, **options), expected, f"max_pool2d {options}")


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("count_include_pad", [True, False])
@given(
    case=pool_cases(dilated=False),
    divisor_override=st.one_of(st.none(), st.integers(1, 9)),
    seed=seeds,
)
def test_avg_pool2d(ceil_mode, count_include_pad, case, divisor_override, seed):
    shape, options = case
    x = normal(shape, seed)
    kwargs = dict(
        options,
        ceil_mode=ceil_mode,
        count_include_pad=count_include_pad,
        divisor_override=divisor_override,
    )
    check(nf.avg_pool2d(x, **kwargs), F.avg_pool2d(to_torch(x), **kwargs), f"avg_pool2d {kwargs}")


def test_avg_pool2d_corner_literal():
    # 3x3 windows, stride 1, one zero of padding: the top-left window holds x[0:2, 0:2]
    # = {1, 2, 4, 5} (sum 12) and five zeros of padding.
    x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    without_pad = nf.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    with_pad = nf.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
    assert without_pad[0, 0, 0, 0] == 12.0 / 4
    assert with_pad[0, 0, 0, 0] == 12.0 / 9
    assert without_pad[0, 0, 1, 1] == with_pad[0, 0, 1, 1] == 5.0  # the centre sees no padding


def test_avg_pool2d_ceil_mode_window_past_the_padding_literal():
    # H = W = 4, kernel 3, stride 2, padding 1, ceil_mode: 3 windows per axis starting at -1,
    # 1 and 3. The last one spans 3..5 but input plus padding ends at 4, so torch counts it as
    # 2 wide (rows 3, 4), of which 1 is inside the input.
    x = np.ones((1, 1, 4, 4))
    options = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    for count_include_pad, corner in ((True, 1.0 / 4), (False, 1.0)):
        y = nf.avg_pool2d(x, count_include_pad=count_include_pad, **options)
        assert y.shape == (1, 1, 3, 3)
        assert y[0, 0, 2, 2] == corner
        check(y, F.avg_pool2d(to_torch(x), count_include_pad=count_include_pad, **options), "")


def test_ceil_mode_drops_a_window_starting_in_the_right_padding():
    # H = 3, kernel 2, stride 2, padding 1: ceil((3 + 2 - 2) / 2) + 1 = 3 windows would start at
    # -1, 1 and 3; the last starts in the right padding, so there are 2.
    x = normal((1, 1, 3, 3), 0)
    y = nf.max_pool2d(x, 2, stride=2, padding=1, ceil_mode=True)
    assert y.shape == (1, 1, 2, 2)
    check(y, F.max_pool2d(to_torch(x), 2, stride=2, padding=1, ceil_mode=True), "max_pool2d")


POOL_ERRORS = {
    "padding above half the kernel": (np.ones((1, 1, 5, 5)), dict(kernel_size=3, padding=2)),
    "window larger than input": (np.ones((1, 1, 2, 2)), dict(kernel_size=3)),
    "rank": (np.ones((5, 5)), dict(kernel_size=2)),
}


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("name", sorted(POOL_ERRORS))
def test_pool_rejects_what_torch_rejects(op, name):
    x, options = POOL_ERRORS[name]
    with pytest.raises((RuntimeError, ValueError, IndexError)):  # torch's error types vary
        getattr(F, op)(to_torch(x), **options)
    with pytest.raises(ValueError):
        getattr(nf, op)(x, **options)


# --------------------------------------------------------------------------------------------
# adaptive_avg_pool2d and adaptive_max_pool2d

output_sizes = st.one_of(
    st.integers(1, 20),
    st.tuples(st.integers(1, 20), st.integers(1, 20)),
    st.tuples(st.none() | st.integers(1, 20), st.none() | st.integers(1, 20)),
)


@pytest.mark.parametrize("op", ["adaptive_avg_pool2d", "adaptive_max_pool2d"])
@given(shape=nchw_shapes(max_c=8), output_size=output_sizes, seed=seeds)
@example(shape=(1, 1, 5, 7), output_size=(3, 4), seed=0)  # overlapping bins
@example(shape=(1, 1, 2, 3), output_size=(5, None), seed=0)  # output larger than input
def test_adaptive_pool2d(op, shape, output_size, seed):
    x = spread(shape, seed)
    expected = getattr(F, op)(to_torch(x), output_size)
    check(getattr(nf, op)(x, output_size), expected, f"{op} {output_size}")


def test_adaptive_pool2d_bins_literal():
    # 5 -> 3 bins: [floor(5i/3), ceil(5(i+1)/3)) = [0, 2), [1, 4), [3, 5); bins overlap.
    x = np.arange(5.0).reshape(1, 1, 1, 5)
    np.testing.assert_array_equal(nf.adaptive_avg_pool2d(x, (1, 3)).ravel(), [0.5, 2.0, 3.5])
    np.testing.assert_array_equal(nf.adaptive_max_pool2d(x, (1, 3)).ravel(), [1.0, 3.0, 4.0])
    # 2 -> 3 bins: [0, 1), [0, 2), [1, 2)
    x = np.array([1.0, 5.0]).reshape(1, 1, 1, 2)
    np.testing.assert_array_equal(nf.adaptive_avg_pool2d(x, (1, 3)).ravel(), [1.0, 3.0, 5.0])


# --------------------------------------------------------------------------------------------
# interpolate

MODES = [("nearest", None), ("bilinear", False), ("bilinear", True), ("bilinear", None)]

# Output sizes up to 70 so that both of torch's kernels run: H_out + W_out <= 128 and above.
resize = st.one_of(
    st.fixed_dictionaries({"size": st.one_of(st.integers(1, 70), pairs(1, 70))}),
    st.fixed_dictionaries(
        {
            "scale_factor": st.one_of(
                st.sampled_from([0.5, 2.0, 3.0, 1 / 3, 1.5, 1.2]),
                st.floats(0.1, 4.5),
                st.tuples(st.floats(0.1, 4.5), st.floats(0.1, 4.5)),
            )
        }
    ),
)


@pytest.mark.parametrize(("mode", "align_corners"), MODES)
@given(shape=nchw_shapes(max_c=4), resize=resize, seed=seeds)
@example(shape=(1, 1, 2, 1), resize={"size": (82, 1)}, seed=0)  # float32 index quirk
@example(shape=(1, 1, 3, 127), resize={"scale_factor": (1.2, 1.0)}, seed=0)  # large output
@example(shape=(1, 1, 3, 1), resize={"scale_factor": 1.2}, seed=0)  # same size, scale 1.2
# Source coordinates a hair below an integer, which torch's float32 floor rounds up:
# 49 * (3 / 147) in float64 (generic kernel); 3.5 / s - 0.5 = 1 - 1e-9 (bilinear).
@example(shape=(1, 1, 3, 1), resize={"size": (147, 1)}, seed=0)
@example(shape=(1, 1, 3, 1), resize={"scale_factor": (2.333333334888889, 1.0)}, seed=0)
def test_interpolate(mode, align_corners, shape, resize, seed):
    if "scale_factor" in resize:
        sf = resize["scale_factor"]
        sf = sf if isinstance(sf, tuple) else (sf, sf)
        assume(all(int(n * s) >= 1 for n, s in zip(shape[2:], sf, strict=True)))
    x = normal(shape, seed)
    expected = F.interpolate(to_torch(x), mode=mode, align_corners=align_corners, **resize)
    y = nf.interpolate(x, mode=mode, align_corners=align_corners, **resize)
    check(y, expected, f"interpolate {mode} align_corners={align_corners} {resize}")


def test_interpolate_literals():
    x = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    np.testing.assert_array_equal(
        nf.interpolate(x, scale_factor=2)[0, 0],
        [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]],
    )
    line = np.array([0.0, 1.0]).reshape(1, 1, 1, 2)
    # align_corners=True: the end points stay put, 0 and 1 at output 0 and 2
    y = nf.interpolate(line, size=(1, 3), mode="bilinear", align_corners=True)
    np.testing.assert_allclose(y.ravel(), [0.0, 0.5, 1.0], rtol=0, atol=1e-15)
    # align_corners=False: source (i + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25
    y = nf.interpolate(line, size=(1, 4), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(y.ravel(), [0.0, 0.25, 0.75, 1.0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("align_corners", [False, True])
@given(
    shape=nchw_shapes(max_c=2, max_hw=9),
    size=pairs(1, 20),
    where=st.tuples(st.floats(0, 1, exclude_max=True), st.floats(0, 1, exclude_max=True)),
    seed=seeds,
)
@example(shape=(1, 1, 5, 5), size=(9, 9), where=(0.2, 0.2), seed=0)  # weights of exactly 0
@example(shape=(1, 1, 5, 5), size=(5, 9), where=(0.2, 0.2), seed=0)  # one axis kept as is
def test_bilinear_keeps_a_nan_local(align_corners, shape, size, where, seed):
    """A NaN pixel reaches only the outputs whose 2 x 2 stencil holds it: the same NaN mask
    as torch's, and the same values elsewhere (a dense matrix product would spread it over
    every output of its rows and columns through 0 * NaN)."""
    x = normal(shape, seed)
    i, j = int(where[0] * shape[2]), int(where[1] * shape[3])
    x[0, 0, i, j] = np.nan
    expected = F.interpolate(to_torch(x), size=size, mode="bilinear", align_corners=align_corners)
    y = nf.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    nan = np.isnan(expected.numpy())
    np.testing.assert_array_equal(np.isnan(y), nan, err_msg="NaN masks differ")
    check(np.where(nan, 0.0, y), torch.from_numpy(np.where(nan, 0.0, expected.numpy())), "finite")


def test_interpolate_nearest_small_output_quirk():
    # For outputs with H_out + W_out <= 128 torch computes 41 * (2 / 82) in float32, which
    # rounds below 1: output row 41 reads input row 0, not 1. Above 128 it reads row 1.
    x = np.array([0.0, 1.0]).reshape(1, 1, 2, 1)
    assert nf.interpolate(x, size=(82, 1))[0, 0, 41, 0] == 0.0
    assert nf.interpolate(x, size=(82, 47))[0, 0, 41, 0] == 1.0
    for size in ((82, 1), (82, 47)):
        check(nf.interpolate(x, size=size), F.interpolate(to_torch(x), size=size), f"{size}")


INTERPOLATE_ERRORS = {
    "size and scale_factor": (4, dict(size=3, scale_factor=2.0)),
    "neither": (4, {}),
    "align_corners with nearest": (4, dict(size=3, align_corners=True)),
    "unknown mode": (4, dict(size=3, mode="bicubic-ish")),
    "empty output": (4, dict(scale_factor=0.1)),
    "not an image": (3, dict(size=3, mode="bilinear")),
}


@pytest.mark.parametrize("name", sorted(INTERPOLATE_ERRORS))
def test_interpolate_rejects_what_torch_rejects(name):
    ndim, options = INTERPOLATE_ERRORS[name]
    x = np.ones((1, 1, 4, 4)[-ndim:])
    with pytest.raises((RuntimeError, ValueError, NotImplementedError)):
        F.interpolate(to_torch(x), **options)
    with pytest.raises(ValueError):
        nf.interpolate(x, **options)


# --------------------------------------------------------------------------------------------
# Across the module: unbatched input, dtype, rank

IMAGE_OPS: dict[str, tuple[Callable, Callable]] = {
    "conv2d": (
        lambda x: nf.conv2d(x, np.full((2, 3, 3, 3), 0.5, x.dtype), padding=1),
        lambda t: F.conv2d(t, torch.full((2, 3, 3, 3), 0.5, dtype=t.dtype), padding=1),
    ),
    "max_pool2d": (lambda x: nf.max_pool2d(x, 2), lambda t: F.max_pool2d(t, 2)),
    "avg_pool2d": (lambda x: nf.avg_pool2d(x, 3, 2, 1), lambda t: F.avg_pool2d(t, 3, 2, 1)),
    "adaptive_avg_pool2d": (
        lambda x: nf.adaptive_avg_pool2d(x, (2, 3)),
        lambda t: F.adaptive_avg_pool2d(t, (2, 3)),
    ),
    "adaptive_max_pool2d": (
        lambda x: nf.adaptive_max_pool2d(x, (2, 3)),
        lambda t: F.adaptive_max_pool2d(t, (2, 3)),
    ),
}


@pytest.mark.parametrize("name", sorted(IMAGE_OPS))
def test_unbatched_input_like_torch(name):
    ours, theirs = IMAGE_OPS[name]
    x = spread((3, 5, 6), 0)  # (C, H, W)
    y = ours(x)
    assert y.ndim == 3
    check(y, theirs(to_torch(x)), f"{name} unbatched")


DTYPE_OPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    **{name: ops[0] for name, ops in IMAGE_OPS.items()},
    "batch_norm": lambda x: nf.batch_norm(x, None, None, training=True),
    "softmax": lambda x: nf.softmax(x, 1),
    "interpolate nearest": lambda x: nf.interpolate(x, scale_factor=1.5),
    "interpolate bilinear": lambda x: nf.interpolate(x, size=(7, 3), mode="bilinear"),
    "sigmoid": nf.sigmoid,
    "relu": nf.relu,
}


@pytest.mark.parametrize("name", sorted(DTYPE_OPS))
def test_computes_in_the_input_dtype(name):
    x = spread((2, 3, 5, 6), 1).astype(np.float32)
    assert DTYPE_OPS[name](x).dtype == np.float32


RANK_OPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    **{name: ops[0] for name, ops in IMAGE_OPS.items()},
    "interpolate": lambda x: nf.interpolate(x, size=2),
    "batch_norm": lambda x: nf.batch_norm(x, None, None, training=True),
}


@pytest.mark.parametrize("name", sorted(RANK_OPS))
def test_wrong_rank_is_a_value_error(name):
    x = np.ones(5) if name == "batch_norm" else np.ones((1, 1, 3, 5, 6))
    with pytest.raises(ValueError, match="shape"):
        RANK_OPS[name](x)
