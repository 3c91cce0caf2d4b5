"""Tests of the Earth Mover engine, each against an independent reference.

References: scipy.stats.wasserstein_distance (1-D), POT's ot.emd2 on
ot.dist(metric="euclidean") (exact), POT's sliced functions given the same directions,
closed forms (a translation by m moves every point by ||m||), and the estimator order
of the theory spec.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
import warnings

import numpy as np
import ot
import pytest
import scipy.spatial.distance as ssd
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import ics_toolkit as ics
from ics_toolkit import _sliced
from ics_toolkit.distances import (
    DEFAULT_MEMORY_LIMIT,
    METHODS,
    ORDER_RTOL,
    columnwise_w1,
    default_num_iter_max,
    projected_w1,
    random_directions,
    sampling_floor,
    wasserstein,
    wasserstein_many,
)
from ics_toolkit.errors import ICSTypeError, ICSValueError, SolverError

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def sample(n, d, *, seed=0, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def pot_exact(x, y):
    """The independent reference: POT emd2 on POT's Euclidean cost, uniform weights."""
    x, y = np.atleast_2d(x.T).T, np.atleast_2d(y.T).T
    a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
    value, log = ot.emd2(a, b, ot.dist(x, y, metric="euclidean"), numItermax=10**8, log=True)
    assert log["result_code"] == 1
    return float(value)


def assert_le(lo, hi, scale):
    """lo <= hi in the sense documented with ORDER_RTOL."""
    assert lo <= hi + ORDER_RTOL * (abs(hi) + scale), (lo, hi)


# ----------------------------------------------------------- 1-D and per-coordinate
@pytest.mark.parametrize(("n", "m"), [(7, 7), (5, 9), (13, 4), (2, 3)])
def test_per_coordinate_equals_scipy_column_by_column(n, m):
    x, y = sample(n, 6, seed=1), sample(m, 6, seed=2, shift=0.4)
    got = wasserstein(x, y, "per_coordinate")
    want = [scipy.stats.wasserstein_distance(x[:, k], y[:, k]) for k in range(6)]
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (6,)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", ["exact", "sliced", "max_sliced"])
@pytest.mark.parametrize(("n", "m"), [(11, 11), (6, 17)])
def test_one_dimensional_methods_equal_scipy(method, n, m):
    # in 1-D the only unit directions are +1 and -1: sliced = max_sliced = exact
    x, y = sample(n, 1, seed=3)[:, 0], sample(m, 1, seed=4, shift=1.5)[:, 0]
    want = scipy.stats.wasserstein_distance(x, y)
    assert wasserstein(x, y, method, n_projections=5) == pytest.approx(want, rel=1e-12)


def test_exact_1d_sorted_path_equals_emd2():
    x, y = sample(40, 1, seed=5), sample(31, 1, seed=6, shift=-0.7)
    value, info = wasserstein(x, y, "exact", log=True)
    assert info["solver"] == "sorted_1d"
    assert value == pytest.approx(pot_exact(x, y), rel=1e-12)


def test_columnwise_w1_equals_scipy():
    a, b = sample(9, 4, seed=7), sample(14, 4, seed=8)
    got = columnwise_w1(a, torch.from_numpy(b))
    assert isinstance(got, torch.Tensor) and got.shape == (4,)
    want = [scipy.stats.wasserstein_distance(a[:, k], b[:, k]) for k in range(4)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_projected_w1_equals_scipy_on_the_projections():
    x, y = sample(12, 5, seed=9), sample(8, 5, seed=10, shift=0.3)
    dirs = random_directions(5, 7, seed=3)
    got = projected_w1(x, y, dirs)
    p, q = x @ dirs.numpy(), y @ dirs.numpy()
    want = [scipy.stats.wasserstein_distance(p[:, k], q[:, k]) for k in range(7)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


@pytest.mark.parametrize(("n", "m"), [(30, 30), (25, 41)])
def test_quantile_kernel_equals_scipy_on_ties(n, m):
    # many ties and equal values across samples: the merged-quantile bookkeeping
    rng = np.random.default_rng(11)
    a, b = rng.integers(0, 4, size=(n, 3)), rng.integers(0, 4, size=(m, 3))
    got = _sliced.w1_sorted(
        torch.sort(torch.from_numpy(a.T).double()).values,
        torch.sort(torch.from_numpy(b.T).double()).values,
    )
    want = [scipy.stats.wasserstein_distance(a[:, k], b[:, k]) for k in range(3)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


# ------------------------------------------------------------------ exact and paired
@pytest.mark.parametrize(("n", "m", "d"), [(20, 20, 3), (17, 29, 5), (40, 12, 64)])
def test_exact_equals_independent_pot_call(n, m, d):
    x, y = sample(n, d, seed=12), sample(m, d, seed=13, shift=0.2)
    value, info = wasserstein(x, y, "exact", log=True)
    assert info["status"] == "optimal" and info["result_code"] == 1
    assert value == pytest.approx(pot_exact(x, y), rel=1e-9)


@pytest.mark.parametrize("d", [1, 3, 50])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_translation_gives_the_norm_of_the_shift(d, scale):
    x = sample(25, d, seed=14)
    shift = scale * np.random.default_rng(15).normal(size=d)
    norm = float(np.linalg.norm(shift))
    assert wasserstein(x, x + shift, "exact") == pytest.approx(norm, rel=1e-12)
    assert wasserstein(x, x + shift, "paired") == pytest.approx(norm, rel=1e-12)


def test_paired_equals_mean_row_distance_from_scipy():
    x, y = sample(15, 4, seed=16), sample(15, 4, seed=17)
    want = np.mean([ssd.euclidean(a, b) for a, b in zip(x, y, strict=True)])
    assert wasserstein(x, y, "paired") == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------ sliced family
@pytest.mark.parametrize(("n", "m"), [(20, 20), (16, 23)])
def test_sliced_equals_pot_with_the_same_directions(n, m):
    x, y = sample(n, 6, seed=18), sample(m, 6, seed=19, shift=0.5)
    dirs = random_directions(6, 50, seed=7).numpy()
    got = wasserstein(x, y, "sliced", n_projections=50, seed=7)
    want = ot.sliced_wasserstein_distance(x, y, projections=dirs, p=1)
    assert got == pytest.approx(float(want), rel=1e-12)
    got = wasserstein(x, y, "max_sliced", n_projections=50, seed=7)
    want = ot.max_sliced_wasserstein_distance(x, y, projections=dirs, p=1)
    assert got == pytest.approx(float(want), rel=1e-12)


def test_sliced_log_per_direction_and_max():
    x, y = sample(10, 3, seed=20), sample(12, 3, seed=21)
    mean, log = wasserstein(x, y, "sliced", n_projections=9, seed=2, log=True)
    best, mlog = wasserstein(x, y, "max_sliced", n_projections=9, seed=2, log=True)
    per = log["per_direction"]
    assert per.shape == (9,) and log["p"] == 1 and log["n_projections"] == 9
    np.testing.assert_allclose(per, projected_w1(x, y, random_directions(3, 9, seed=2)).numpy())
    assert mean == pytest.approx(per.mean(), rel=1e-14)
    assert best == per.max() == per[mlog["argmax"]]


def test_sliced_std_error_matches_the_spread_over_seeds():
    x, y = sample(60, 10, seed=22), sample(60, 10, seed=23, shift=0.3)
    values, errors = [], []
    for seed in range(60):
        v, log = wasserstein(x, y, "sliced", n_projections=16, seed=seed, log=True)
        values.append(v)
        errors.append(log["std_error"])
    ratio = np.std(values, ddof=1) / np.mean(errors)
    assert 0.6 < ratio < 1.6, ratio


def test_random_directions_are_unit_seeded_and_private():
    state = torch.get_rng_state()
    a = random_directions(7, 11, seed=5)
    assert a.shape == (7, 11) and a.dtype == torch.float64
    np.testing.assert_allclose(a.norm(dim=0).numpy(), 1.0, rtol=1e-14)
    assert torch.equal(a, random_directions(7, 11, seed=5))
    assert not torch.equal(a, random_directions(7, 11, seed=6))
    f32 = random_directions(7, 11, seed=5, dtype=torch.float32)
    assert f32.dtype == torch.float32 and torch.equal(f32, a.float())
    assert torch.equal(torch.get_rng_state(), state)


def test_dtype_option_float32_is_close_to_float64():
    x, y = sample(30, 8, seed=24), sample(30, 8, seed=25)
    v64, log64 = wasserstein(x, y, "sliced", log=True)
    v32, log32 = wasserstein(x, y, "sliced", log=True, dtype=torch.float32)
    assert (log64["dtype"], log32["dtype"]) == ("float64", "float32")
    assert v32 == pytest.approx(v64, rel=1e-5)
    kept = wasserstein(x.astype(np.float32), y.astype(np.float32), "sliced", dtype=None)
    assert kept == pytest.approx(v32, rel=1e-12)


# -------------------------------------------------------------------------- order
@st.composite
def sample_pairs(draw):
    d = draw(st.integers(1, 4))
    n = draw(st.integers(2, 8))
    m = n if draw(st.booleans()) else draw(st.integers(2, 8))
    elements = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
    x = draw(arrays(np.float64, (n, d), elements=elements))
    y = draw(arrays(np.float64, (m, d), elements=elements))
    return x, y, draw(st.integers(0, 2**31))


@given(sample_pairs())
def test_estimator_order_holds(data):
    x, y, seed = data
    scale = float(max(np.abs(x).max(), np.abs(y).max()))
    sliced = wasserstein(x, y, "sliced", n_projections=16, seed=seed)
    max_sliced = wasserstein(x, y, "max_sliced", n_projections=16, seed=seed)
    exact = wasserstein(x, y, "exact")
    assert sliced >= 0.0
    assert_le(sliced, max_sliced, scale)
    assert_le(max_sliced, exact, scale)
    for per_axis in wasserstein(x, y, "per_coordinate"):  # each axis is a projection
        assert_le(per_axis, exact, scale)
    if len(x) == len(y):
        assert_le(exact, wasserstein(x, y, "paired"), scale)


# ----------------------------------------------------------------------- sinkhorn
# (the certified estimator's accuracy on ICS-like pairs: tests/test_sinkhorn.py)
def test_sinkhorn_is_scale_free():
    x, y = sample(12, 2, seed=28), sample(10, 2, seed=29)
    v1, log = wasserstein(x, y, "sinkhorn", log=True)
    assert log["diameter"] == pytest.approx(ssd.cdist(x, y).max(), rel=1e-12)
    assert wasserstein(7 * x, 7 * y, "sinkhorn") == pytest.approx(7 * v1, rel=1e-9)


def test_sinkhorn_failure_raises_or_is_flagged():
    x, y = sample(20, 3, seed=30), sample(20, 3, seed=31)
    with pytest.raises(SolverError, match=r"only known to lie in \[") as err:
        wasserstein(x, y, "sinkhorn", numItermax=2)
    assert err.value.status == "max_iter_reached"
    value, log = wasserstein(x, y, "sinkhorn", numItermax=2, on_failure="flag", log=True)
    assert log["status"] == "max_iter_reached" and value == err.value.value
    assert log["lower"] == value <= pot_exact(x, y) <= log["upper"]


# ------------------------------------------------------------ solver failure, memory
def test_exact_raises_solver_error_when_numitermax_is_tiny():
    x, y = sample(30, 3, seed=32), sample(30, 3, seed=33, shift=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SolverError, match="stopped before optimality") as err:
            wasserstein(x, y, "exact", numItermax=3)
    assert err.value.status == "max_iter_reached" and math.isfinite(err.value.value)
    assert isinstance(err.value, RuntimeError)
    assert not caught  # POT's once-per-location warning is replaced by the error
    value, log = wasserstein(x, y, "exact", numItermax=3, on_failure="flag", log=True)
    assert log["status"] == "max_iter_reached" and log["result_code"] == 3
    assert value == err.value.value
    with pytest.raises(ICSValueError, match="needs log=True"):
        wasserstein(x, y, "exact", on_failure="flag")


@pytest.mark.slow
def test_default_numitermax_succeeds_where_pots_default_fails():
    x, y = sample(2048, 64, seed=0), sample(2048, 64, seed=1, shift=0.5)
    a = np.full(2048, 1 / 2048)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, log = ot.emd2(a, a, ot.dist(x, y, metric="euclidean"), log=True)
    assert log["result_code"] == 3  # POT's default numItermax=100000 is too small here
    value, info = wasserstein(x, y, "exact", log=True)
    assert info["status"] == "optimal" and info["numItermax"] == default_num_iter_max(2048, 2048)
    assert value <= wasserstein(x, y, "paired")


@pytest.mark.parametrize("method", ["exact", "sinkhorn"])
def test_memory_refusal_names_the_alternatives(method):
    x, y = sample(10, 2), sample(12, 2)
    with pytest.raises(ICSValueError, match=r"memory_limit") as err:
        wasserstein(x, y, method, memory_limit=1000)
    for alternative in ("'sliced'", "'max_sliced'", "'sinkhorn'", "subsampling"):
        assert alternative in str(err.value)
    # the default limit refuses n = m = 10000 (41 bytes per cell measured) before
    # allocating anything
    big = np.zeros((10_000, 2))
    assert 10_000**2 * 41 > DEFAULT_MEMORY_LIMIT
    with pytest.raises(ICSValueError, match=r"10000 x 10000 samples needs about"):
        wasserstein(big, big, method)


# ---------------------------------------------------- numpy / torch, seeds, RNG state
@pytest.mark.parametrize("method", METHODS)
def test_numpy_and_torch_inputs_give_identical_results(method):
    x, y = sample(14, 3, seed=34), sample(14, 3, seed=35)
    from_numpy = wasserstein(x, y, method)
    from_torch = wasserstein(torch.from_numpy(x), torch.from_numpy(y), method)
    mixed = wasserstein(x, torch.from_numpy(y), method)
    np.testing.assert_array_equal(from_numpy, from_torch)
    np.testing.assert_array_equal(from_numpy, mixed)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    np.testing.assert_array_equal(
        wasserstein(x32, y32, method),
        wasserstein(torch.from_numpy(x32), torch.from_numpy(y32), method),
    )


def test_integer_and_bool_inputs_are_cast():
    xi = np.array([[0, 1], [2, 3], [4, 4]])
    yi = np.array([[1, 1], [0, 5], [3, 2]])
    for method in METHODS:
        np.testing.assert_array_equal(
            wasserstein(xi, yi, method), wasserstein(xi.astype(float), yi.astype(float), method)
        )
    xb = np.array([[True, False], [False, False], [True, True]])
    assert wasserstein(xb, xb, "exact") == 0.0


@pytest.mark.parametrize("method", ["sliced", "max_sliced"])
def test_seed_reproducibility_and_independence_from_the_global_rng(method):
    x, y = sample(20, 5, seed=36), sample(25, 5, seed=37)
    torch.manual_seed(1)
    first = wasserstein(x, y, method, seed=3)
    torch.manual_seed(2)
    np.random.seed(2)  # noqa: NPY002 - the legacy global RNG is what must stay untouched
    assert wasserstein(x, y, method, seed=3) == first
    assert wasserstein(x, y, method, seed=4) != first


def test_measuring_leaves_every_global_rng_untouched():
    x, y = sample(12, 3, seed=38), sample(12, 3, seed=39)
    before = (torch.get_rng_state(), np.random.get_state(), random.getstate())  # noqa: NPY002
    for method in METHODS:
        wasserstein(x, y, method)
        sampling_floor(x, method)
    wasserstein_many([(x, y), (y, x)], "sliced")
    random_directions(3, 4, seed=1)
    after = (torch.get_rng_state(), np.random.get_state(), random.getstate())  # noqa: NPY002
    assert torch.equal(before[0], after[0])
    assert before[1][0] == after[1][0] and np.array_equal(before[1][1], after[1][1])
    assert before[2] == after[2]


# ------------------------------------------------------------------ wasserstein_many
def _layers():
    rng = np.random.default_rng(40)
    shapes = [(16, 16, 8), (16, 16, 8), (16, 11, 8), (9, 9, 3), (16, 16, 8), (9, 9, 3), (5, 7, 1)]
    return {
        f"l{i}": (rng.normal(size=(n, d)), rng.normal(size=(m, d)) + 0.2)
        for i, (n, m, d) in enumerate(shapes)
    }


@pytest.mark.parametrize("method", METHODS)
def test_wasserstein_many_equals_a_loop(method):
    layers = _layers()
    if method == "paired":
        layers = {k: v for k, v in layers.items() if len(v[0]) == len(v[1])}
    got = wasserstein_many(layers, method, n_projections=20, seed=9)
    assert list(got) == list(layers)
    for name, (x, y) in layers.items():
        want = wasserstein(x, y, method, n_projections=20, seed=9)
        np.testing.assert_allclose(got[name], want, rtol=1e-12, atol=0)
    as_list = wasserstein_many(list(layers.values()), method, n_projections=20, seed=9)
    assert isinstance(as_list, list)
    np.testing.assert_allclose(np.hstack(as_list), np.hstack(list(got.values())), rtol=1e-12)


def test_wasserstein_many_logs_and_chunking(monkeypatch):
    layers = list(_layers().values())
    values, logs = wasserstein_many(layers, "sliced", n_projections=6, log=True)
    assert len(logs) == len(layers) and all(lg["n_projections"] == 6 for lg in logs)
    monkeypatch.setattr(_sliced, "BATCH_BYTES", 1)  # one pair per kernel call
    chunked = wasserstein_many(layers, "sliced", n_projections=6)
    np.testing.assert_allclose(chunked, values, rtol=1e-12)
    assert wasserstein_many([], "sliced") == [] and wasserstein_many({}, "exact") == {}


def test_wasserstein_many_names_the_bad_pair():
    good = sample(6, 2)
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ICSValueError, match=r"`pairs\['b'\]\[1\]` contains 1 NaN"):
        wasserstein_many({"a": (good, good), "b": (good, bad)}, "sliced")
    with pytest.raises(ICSValueError, match=r"`pairs\[1\]\[0\]` contains 1 NaN"):
        wasserstein_many([(good, good), (bad, good)], "exact")
    with pytest.raises(ICSTypeError, match=r"`pairs\[0\]` must be an \(x, y\) pair"):
        wasserstein_many([(good,)], "sliced")
    with pytest.raises(ICSTypeError, match="`pairs` must be a sequence"):
        wasserstein_many(torch.zeros(3, 2), "sliced")


# ----------------------------------------------------------------- sampling floor
def test_sampling_floor():
    x = sample(200, 2, seed=41)
    floor, log = sampling_floor(x, "exact", seed=3, log=True)
    assert log["half_size"] == 100 and log["n"] == log["m"] == 100
    assert floor == sampling_floor(torch.from_numpy(x), "exact", seed=3)
    assert floor != sampling_floor(x, "exact", seed=4)
    assert 0 < floor < wasserstein(x, x + 1.0, "exact")
    assert sampling_floor(np.ones((9, 3)), "exact") == 0.0
    big = sample(4000, 2, seed=42)
    assert sampling_floor(big, "sliced") < sampling_floor(big[:40], "sliced")
    with pytest.raises(ICSValueError, match=r"`x` has 3 samples; .* at least 4"):
        sampling_floor(sample(3, 2))
    assert sampling_floor(sample(4, 2), "exact") > 0  # 4 is enough: two halves of 2
    # the documented defaults: seed 0, and 128 directions for the sliced floors
    assert sampling_floor(x) == sampling_floor(x, "exact", seed=0) != floor
    assert sampling_floor(x, "sliced") == sampling_floor(x, "sliced", n_projections=128)
    assert sampling_floor(x, "sliced") != sampling_floor(x, "sliced", n_projections=129)


# -------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("which", "bad"), [("x", np.nan), ("y", np.inf), ("y", -np.inf)])
def test_nan_or_inf_is_refused_naming_the_argument(method, which, bad):
    x, y = sample(6, 3, seed=43), sample(6, 3, seed=44)
    (x if which == "x" else y)[4, 1] = bad
    with pytest.raises(ICSValueError, match=f"`{which}` contains 1 NaN or Inf"):
        wasserstein(x, y, method)


def test_finite_samples_whose_distances_overflow_their_dtype_are_rescaled():
    # float32 samples near float32's largest value: their squares and sums overflow
    # float32, so the engine computes at a power-of-two scale (tests/test_extreme_scales.py)
    x = np.full((4, 4), 3e38, dtype=np.float32)
    y = np.zeros((4, 4), dtype=np.float32)
    one = wasserstein(np.ones((4, 4), np.float32), y, "sliced", dtype=None)
    value = wasserstein(x, y, "sliced", dtype=None)
    assert value == pytest.approx(float(np.float32(3e38)) * one, rel=1e-6)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros((3, 2, 2)), np.zeros((3, 2)), r"`x` must have shape \(n, d\) or \(n,\)"),
        (np.zeros((4, 3)), np.zeros((4, 2)), "same number of columns d"),
        (np.zeros((4, 3)), np.zeros(3), "same number of columns d"),  # no broadcasting
        (np.zeros((4, 3)), np.zeros((1, 3)), "`y` has 1 sample"),
        (np.zeros((0, 3)), np.zeros((4, 3)), "`x` is empty"),
        (np.zeros((4, 3)), np.zeros((4, 0)), "`y` is empty"),
    ],
)
@pytest.mark.parametrize("method", ["exact", "sliced", "per_coordinate", "paired"])
def test_bad_shapes_are_refused_naming_the_argument(x, y, match, method):
    with pytest.raises(ICSValueError, match=match):
        wasserstein(x, y, method)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(
        ICSValueError, match=r"`method` must be one of 'exact', 'paired'.*'slice'"
    ) as err:
        wasserstein(np.zeros((3, 2)), np.zeros((3, 2)), "slice")
    assert "did you mean 'sliced'" in str(err.value)
    with pytest.raises(ValueError, match="per_coordinate"):
        wasserstein_many([], "emd")


def test_different_devices_are_refused():
    cpu = torch.zeros(4, 2)
    meta = torch.empty(4, 2, device="meta")
    for method in ("exact", "sliced"):
        with pytest.raises(ICSValueError, match="`x` is on cpu but `y` is on meta; move both"):
            wasserstein(cpu, meta, method)


def test_paired_needs_equal_sizes():
    with pytest.raises(ICSValueError, match="same number of samples, got 5 and 6"):
        wasserstein(np.zeros((5, 2)), np.zeros((6, 2)), "paired")


def test_non_numeric_input_is_a_type_error():
    with pytest.raises(ICSTypeError, match="`y` must be a numpy array or torch tensor of numbers"):
        wasserstein(np.zeros((3, 2)), [["a", "b"], ["c", "d"]], "sliced")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"method": "sliced", "foo": 1},
            ICSTypeError,
            r"unknown option\(s\) 'foo' for method='sliced'",
        ),
        (
            {"method": "paired", "reg": 0.1},
            ICSTypeError,
            r"unknown option\(s\) 'reg'.*valid options",
        ),
        ({"method": "sliced", "n_projections": 0}, ICSValueError, "`n_projections` must be >= 1"),
        (
            {"method": "sliced", "n_projections": 2.5},
            ICSTypeError,
            "`n_projections` must be an integer",
        ),
        (
            {"method": "sliced", "seed": -1},
            ICSValueError,
            r"`seed` must be an int in \[0, 2\*\*63\)",
        ),
        ({"method": "sliced", "seed": True}, ICSTypeError, r"`seed` must be an int in \[0"),
        ({"method": "sliced", "dtype": torch.int32}, ICSTypeError, "`dtype` must be a floating"),
        ({"method": "sinkhorn", "reg": 0}, ICSValueError, "`reg` must be a positive number"),
        ({"method": "sinkhorn", "rtol": -1}, ICSValueError, "`rtol` must be a positive number"),
        ({"method": "sinkhorn", "scaling": 1.5}, ICSValueError, "`scaling` .* must be below 1"),
        ({"method": "exact", "numItermax": 0}, ICSValueError, "`numItermax` must be >= 1"),
        ({"method": "exact", "on_failure": "ignore"}, ICSValueError, "`on_failure` must be"),
        ({"method": "exact", "memory_limit": -1}, ICSValueError, "`memory_limit` must be"),
        ({"method": "exact", "log": "yes"}, ICSTypeError, "`log` must be True or False"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        wasserstein(np.zeros((3, 2)), np.ones((3, 2)), **kwargs)


def test_helper_argument_errors():
    x = np.zeros((4, 3))
    with pytest.raises(ICSValueError, match="`directions` has 2 rows but the samples have d = 3"):
        projected_w1(x, x, torch.ones(2, 5, dtype=torch.float64))
    with pytest.raises(ICSTypeError, match=r"`directions` must be a torch\.Tensor"):
        projected_w1(x, x, np.ones((3, 5)))
    with pytest.raises(ICSValueError, match="`a` contains 1 NaN"):
        columnwise_w1(np.array([[np.nan], [1.0]]), np.zeros((3, 1)))
    with pytest.raises(ICSValueError, match="`d` must be >= 1"):
        random_directions(0, 3, seed=0)


# ------------------------------------------------------------------ import, devices
def test_importing_the_engine_does_not_import_pot_or_touch_cuda():
    code = (
        "import sys, torch, ics_toolkit.distances\n"
        "print('ot' in sys.modules, 'matplotlib' in sys.modules, torch.cuda.is_initialized())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False False"


def test_public_names_are_reachable_from_the_package():
    assert ics.wasserstein is wasserstein and ics.sampling_floor is sampling_floor
    assert ics.wasserstein_many is wasserstein_many


@CUDA
def test_cuda_results_stay_on_device_and_agree_with_cpu():
    x, y = sample(64, 16, seed=45), sample(50, 16, seed=46)
    xc, yc = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    dirs = random_directions(16, 32, seed=1, device="cuda")
    assert dirs.device.type == "cuda"
    assert torch.equal(dirs, random_directions(16, 32, seed=1, device="cuda"))
    got = wasserstein(xc, yc, "sliced", n_projections=32, seed=1)
    want = ot.sliced_wasserstein_distance(x, y, projections=dirs.cpu().numpy(), p=1)
    assert got == pytest.approx(float(want), rel=1e-10)
    np.testing.assert_allclose(
        wasserstein(xc, yc, "per_coordinate"), wasserstein(x, y, "per_coordinate"), rtol=1e-12
    )
    assert wasserstein(xc, yc, "exact") == pytest.approx(pot_exact(x, y), rel=1e-9)
    assert wasserstein(x, yc, "paired" if len(x) == len(y) else "sliced") > 0  # numpy follows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_in_place_cpu_sort_equals_torch_sort(dtype):
    rng = np.random.default_rng(47)
    values = torch.from_numpy(rng.integers(-5, 5, size=(3, 4, 50)).astype(np.float64))
    values = (values + torch.from_numpy(rng.normal(size=(3, 4, 50))).round(decimals=1)).to(dtype)
    want = torch.sort(values, dim=-1).values
    assert torch.equal(_sliced.sort_last_(values.clone()), want)


@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("step", [1e-9, 1e-3, 1.0])
def test_fast_cost_matrix_is_accurate_for_nearly_equal_points(offset, step):
    # the GEMM expansion cancels when x_i ~ y_j (a small training step): those entries
    # must be recomputed from differences
    from ics_toolkit.distances import _euclidean_cost

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 300, generator=g, dtype=torch.float64) + offset
    y = x + step * torch.randn(40, 300, generator=g, dtype=torch.float64)
    direct = torch.linalg.vector_norm(x[:, None, :] - y[None, :, :], dim=2)
    fast = _euclidean_cost(x, y)
    assert torch.allclose(fast, direct, rtol=1e-10, atol=0.0)
