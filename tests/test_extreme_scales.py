"""Inputs at extreme scales: the right value or a clear error, never a silently wrong one.

Every comparison is relative with ``abs=0``: pytest.approx's default absolute
tolerance (1e-12) would let 0 pass for a value of 1e-160.

W1 and every length the engine returns are positively homogeneous: scaling both samples
by s scales them by s. So on a pair of 64 x 8 samples scaled by s = 1e-300 .. 1e300 each
estimator and bound must equal s times its value at s = 1 (to float64 rounding). Before
the power-of-two rescaling (ics_toolkit._scaling): s = 1e-160 gave the exact W1 0.25 %
off and L1 34 % off, s = 1e-300 exact, paired and L1 100 % off, s = 1e200 bounds of inf,
and POT's absolute tolerance made the exact W1 of samples at 1e-20 11 % off.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import ics_toolkit as ics
from ics_toolkit import bounds, sampling_floor, shift, wasserstein, wasserstein_many
from ics_toolkit.bounding import check_order
from ics_toolkit.distances import columnwise_w1, projected_w1, random_directions
from ics_toolkit.moments import moment_drift

SCALES = [1e-300, 1e-200, 1e-160, 1e-100, 1e-20, 1.0, 1e20, 1e100, 1e150, 1e200, 1e300]
METHODS = ["exact", "paired", "sliced", "max_sliced", "sinkhorn"]


@pytest.fixture(scope="module")
def pair():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    return x, x + 0.3 * torch.randn(64, 8, generator=gen, dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(pair):
    x, y = pair
    out = {m: wasserstein(x, y, m) for m in METHODS}
    out["per_coordinate"] = wasserstein(x, y, "per_coordinate")
    out["floor"] = sampling_floor(x, "exact")
    out.update(bounds(x, y))
    return out


@pytest.mark.parametrize("s", SCALES)
def test_every_estimator_is_homogeneous(pair, reference, s):
    x, y = pair
    for m in METHODS:
        assert wasserstein(s * x, s * y, m) == pytest.approx(s * reference[m], rel=1e-12, abs=0), m
    coords = wasserstein(s * x, s * y, "per_coordinate")
    np.testing.assert_allclose(coords, s * reference["per_coordinate"], rtol=1e-12)
    assert sampling_floor(s * x, "exact") == pytest.approx(s * reference["floor"], rel=1e-12, abs=0)


@pytest.mark.parametrize("s", SCALES)
def test_every_sample_bound_is_homogeneous(pair, reference, s):
    x, y = pair
    b = bounds(s * x, s * y)
    for q in ("L1", "L2", "L3", "U1", "U2"):
        assert b[q] == pytest.approx(s * reference[q], rel=1e-12, abs=0), q


def test_logs_and_intervals_are_in_the_samples_units(pair):
    x, y = pair
    s = 1e-200
    v1, log1 = wasserstein(x, y, "sliced", log=True, ci=0.9)
    vs, logs = wasserstein(s * x, s * y, "sliced", log=True, ci=0.9)
    assert vs == pytest.approx(s * v1, rel=1e-12, abs=0)
    np.testing.assert_allclose(logs["per_direction"], s * log1["per_direction"], rtol=1e-12)
    for key in ("std_error", "ci_low", "ci_high"):
        assert logs[key] == pytest.approx(s * log1[key], rel=1e-12, abs=0), key
    _, log_1 = wasserstein(x, y, "exact", log=True, ci=0.9)
    _, log_s = wasserstein(s * x, s * y, "exact", log=True, ci=0.9)
    for key in ("ci_low", "ci_high"):
        assert log_s[key] == pytest.approx(s * log_1[key], rel=1e-12, abs=0), key
    _, sk = wasserstein(1e250 * x, 1e250 * y, "sinkhorn", log=True)
    assert (
        sk["lower"] <= 1e250 * wasserstein(x, y, "exact") * (1 + 1e-12) <= sk["upper"] * (1 + 1e-9)
    )
    many = wasserstein_many([(s * x, s * y), (x, y)], "sliced")
    assert many[0] == pytest.approx(s * many[1], rel=1e-12, abs=0)


def test_float32_samples_at_extreme_float32_scales(pair):
    x, y = (t.float() for t in pair)
    for s in (1e-30, 1e30):
        xs, ys = x * s, y * s  # float32 values
        for m in ("exact", "paired", "sliced"):
            want = (
                s * wasserstein(x, y, m, dtype=None) if m != "exact" else s * wasserstein(x, y, m)
            )
            got = wasserstein(xs, ys, m, dtype=None) if m != "exact" else wasserstein(xs, ys, m)
            assert got == pytest.approx(want, rel=1e-5, abs=0), (s, m)


def test_a_distance_float64_cannot_hold_is_an_error():
    x = np.full((4, 3), 1.5e308)
    y = -x
    with pytest.raises(ics.ICSValueError, match="above the largest float64 number"):
        wasserstein(x, y, "paired")
    with pytest.raises(ics.ICSValueError, match="above the largest float64 number"):
        bounds(x, y)


class Scale(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _run(factor: float, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), Scale(factor), torch.nn.Linear(16, 2)
    ).double()
    with torch.no_grad():  # the last layer undoes the factor, and is not trained (its
        model[3].weight.div_(factor)  # step would scale too): the same training run
    model[3].requires_grad_(False)
    x = torch.randn(48, 6, dtype=torch.float64)
    target = torch.randint(0, 2, (48,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = ics.ICSMonitor(model, x[:32], layers=["2"], every=1, **options).attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ics.ICSWarning)
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
    monitor.detach()
    return monitor.results().query("kind != 'event'")


F64 = {"capture_dtype": torch.float64, "precision": "float64"}


@pytest.mark.parametrize("factor", [1e-200, 1e-40, 1e40, 1e200])
def test_the_monitor_measures_a_layer_at_an_extreme_scale(factor):
    # a float64 layer whose outputs float64 holds but whose squares (1e+-200) or whose
    # fourth moments' squares (1e+-40: drift_m4 was 0 and inf) it does not
    ref, got = _run(1.0, **F64), _run(factor, **F64)
    key = ["step", "layer", "view", "quantity"]
    both = ref.merge(got, on=key, suffixes=("_1", "_s"))
    assert len(both) == len(ref) > 20
    powers = {"drift_var": 2, "drift_norm_var": 2, "drift_m4": 4, "identity_share": 0}
    # the resolution: a relative part (none here: a float64 layer stored and analysed in
    # float64 rounds nowhere) plus float64's absolute subnormal term, which does not scale
    res = both[both.quantity == "resolution"]
    assert len(res) == 2 and res.value_s.tolist() == res.value_1.tolist()
    both = both[both.quantity != "resolution"]
    checked = 0
    for row in both.itertuples():
        if not np.isfinite(row.value_1) or row.kind_1 in ("relative",):
            continue
        power = powers.get(row.quantity, 1)
        with np.errstate(over="ignore", under="ignore"):
            want = row.value_1 * np.float64(factor) ** power
        if not np.isfinite(want) or (want == 0 and row.value_1 != 0):
            # a variance of outputs at 1e-200 is 1e-400: not a float64, so NaN, said why
            assert np.isnan(row.value_s), row.quantity
            continue
        assert row.value_s == pytest.approx(want, rel=1e-9, abs=1e-300), row.quantity
        checked += 1
    assert checked > 20
    assert got.bounds_hold.dropna().all()


def test_outputs_the_capture_dtype_cannot_hold_are_flagged_not_measured():
    # float32 storage (the default) flushes 1e-200 to 0: the rows say it is unresolved
    got = _run(1e-200)
    exact = got[got.quantity == "exact"]
    assert len(exact) == 2 and (exact.value == 0).all()
    assert exact.below_resolution.all()


# ------------------------------------------------------- one power of two per column
def _columns_apart(pair, big, small):
    x, y = pair
    factor = torch.tensor([big] + [small] * (x.shape[1] - 1), dtype=torch.float64)
    return x * factor, y * factor, factor.numpy()


@pytest.mark.parametrize(("big", "small"), [(1e250, 1e-100), (1e200, 1e-310)])
def test_per_coordinate_measures_each_column_at_its_own_scale(pair, reference, big, small):
    # one common power of two flushed the small columns to 0 (per_coordinate 100 % off)
    xs, ys, factor = _columns_apart(pair, big, small)
    want = reference["per_coordinate"] * factor
    rtol = 1e-12 if small > 1e-300 else 1e-2  # 1e-310 is subnormal: ~3 digits stored
    np.testing.assert_allclose(wasserstein(xs, ys, "per_coordinate"), want, rtol=rtol)
    many = wasserstein_many({"a": (xs, ys)}, "per_coordinate")["a"]
    np.testing.assert_allclose(many, want, rtol=rtol)
    np.testing.assert_allclose(columnwise_w1(xs, ys).numpy(), want, rtol=rtol)
    floor = sampling_floor(xs, "per_coordinate")
    np.testing.assert_allclose(floor, sampling_floor(pair[0], "per_coordinate") * factor, rtol=rtol)


def test_per_coordinate_of_float32_columns_apart(pair):
    # float32 samples computed in float64 need no rescaling: scaling them in float32
    # by the largest column's power of two flushed the 1e-30 columns
    xs, ys, _ = _columns_apart(pair, 1e20, 1e-30)
    x32, y32 = xs.float(), ys.float()
    want = wasserstein(x32.double(), y32.double(), "per_coordinate")
    np.testing.assert_allclose(wasserstein(x32, y32, "per_coordinate"), want, rtol=1e-12)
    got = wasserstein(x32, y32, "per_coordinate", dtype=None)  # computed in float32
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ---------------------------------------------------- the dtype the engine computes in
@pytest.mark.parametrize("s", [1e-6, 1e4])
def test_float16_computation_is_rescaled(pair, s):
    # float16 is subnormal below 6e-5 (per_coordinate was 30 % off at 1e-6) and its
    # projections overflow 65504 (an error at 1e4): computed near 1 instead
    x, y = ((t * s).half() for t in pair)
    for m in ("paired", "sliced", "per_coordinate"):
        want = np.asarray(wasserstein(x.double(), y.double(), m))
        got = np.asarray(wasserstein(x, y, m, dtype=None))
        np.testing.assert_allclose(got, want, rtol=3e-3, err_msg=m)


def test_float64_samples_computed_in_float32_are_scaled_before_the_cast(pair):
    # inside float64's safe range but not float32's: per_coordinate was 0 at 1e-50, and
    # 1e50 was "`x` contains NaN or Inf" (its float32 copy did)
    x, y = pair
    for s in (1e-50, 1e-20, 1e20, 1e50):
        for m in ("paired", "sliced", "max_sliced", "per_coordinate"):
            want = s * np.asarray(wasserstein(x, y, m))
            got = np.asarray(wasserstein(s * x, s * y, m, dtype=torch.float32))
            np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{m} {s}")


# ------------------------------------------------------------ near float64's largest
def test_samples_near_the_largest_float64(pair):
    x, y = pair
    s = 5e307  # row differences, projections and 1-D sums overflow; W1 does not
    dirs = random_directions(8, 16, seed=0)
    np.testing.assert_allclose(
        projected_w1(s * x, s * y, dirs).numpy(), s * projected_w1(x, y, dirs).numpy(), rtol=1e-12
    )
    np.testing.assert_allclose(
        columnwise_w1(s * x, s * y).numpy(), s * columnwise_w1(x, y).numpy(), rtol=1e-12
    )
    # the sinkhorn log's diameter (> 1.8e308) is not asked for: the value is returned
    assert wasserstein(s * x, s * y, "sinkhorn") == pytest.approx(
        s * wasserstein(x, y, "sinkhorn"), rel=1e-12, abs=0
    )
    with pytest.raises(ics.ICSValueError, match=r"log entry 'diameter'.*above the largest"):
        wasserstein(s * x, s * y, "sinkhorn", log=True)


def test_subnormal_samples(pair):
    # 1e-310 and 1e-320 are subnormal: what they hold is measured exactly (the reference
    # is the same stored values times 2^1100, every product exact)
    x, y = pair
    up = 2.0**550
    for s in (1e-310, 1e-320):
        xs, ys = x * s, y * s
        xk, yk = xs * up * up, ys * up * up
        for m in ("exact", "paired", "sliced", "per_coordinate"):
            want = np.asarray(wasserstein(xk, yk, m)) / up / up
            np.testing.assert_allclose(wasserstein(xs, ys, m), want, rtol=1e-12, err_msg=m)
        got, want = bounds(xs, ys), bounds(xk, yk)
        for q in ("L1", "L2", "L3", "U1", "U2"):
            assert got[q] == pytest.approx(want[q] / up / up, rel=1e-12, abs=0), q


# --------------------------------------------------------------------- the order check
def test_the_order_check_at_tiny_scales_sees_a_violation():
    # ATOL * max(scale, 1) gave samples at 1e-200 a slack of 1e-12: nothing could fail
    s = 1e-200
    assert not check_order({"L1": 2 * s, "exact": s}, scale=10 * s).holds
    assert not check_order({"exact": s, "U1": 0.5 * s}, scale=10 * s).holds
    assert check_order({"L1": 0.5 * s, "exact": s, "U1": s}, scale=10 * s).holds
    assert not check_order({"L1": 2e200, "exact": 1e200}, scale=1e201).holds


# ------------------------------------------------------------------------ moment drift
@pytest.mark.parametrize("s", [1e-70, 1e-40, 1e40, 1e70])
def test_moment_drift_is_homogeneous(pair, s):
    # drift_m4 was 0 at 1e-40 and inf at 1e40 (its norm squared the fourth moments)
    x, y = pair
    ref, got = moment_drift(x, y), moment_drift(s * x, s * y)
    for q, power in {"drift_mean": 1, "drift_var": 2, "drift_m4": 4, "drift_norm_var": 2}.items():
        assert got[q] == pytest.approx(ref[q] * s**power, rel=1e-12, abs=0), q


def test_a_drift_float64_cannot_hold_is_nan_and_said(pair):
    x, y = pair
    with pytest.warns(ics.ICSRuntimeWarning, match=r"drift_m4 .*below the smallest float64"):
        got = moment_drift(1e-100 * x, 1e-100 * y)
    assert np.isnan(got["drift_m4"])
    assert got["drift_var"] == pytest.approx(
        moment_drift(x, y)["drift_var"] * 1e-200, rel=1e-12, abs=0
    )


# ----------------------------------------------------------- the monitor in float32
POWERS = {"drift_var": 2, "drift_norm_var": 2, "drift_m4": 4, "identity_share": 0}


@pytest.mark.parametrize("factor", [1e-30, 1e-12, 1e-5, 1e8, 1e12, 1e30])
def test_the_float32_monitor_measures_a_layer_at_any_float32_scale(factor):
    # the default analysis (float32): drift_m4 was 0 from 1e-5 down, inf from 1e8 up,
    # drift_var 0 / inf at 1e-12 / 1e12, without a word
    ref, got = _run(1.0, capture_dtype=torch.float32), _run(factor, capture_dtype=torch.float32)
    both = ref.merge(got, on=["step", "layer", "view", "quantity"], suffixes=("_1", "_s"))
    assert len(both) == len(ref) > 20
    both = both[(both.kind_1 != "relative") & (both.quantity != "resolution")]
    assert np.isfinite(both.value_s).all()
    for row in both.itertuples():
        want = row.value_1 * np.float64(factor) ** POWERS.get(row.quantity, 1)
        # the layer's float32 product by the factor rounds (1e-7 relative per value)
        assert row.value_s == pytest.approx(want, rel=1e-4, abs=0), row.quantity
    assert got.bounds_hold.dropna().all() and not got.below_resolution.dropna().any()


def test_outputs_above_the_capture_dtype_are_said_to_be(caplog):
    # a float64 layer at 1e200 stored in float32 is inf: the warning says why
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), Scale(1e200)).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = ics.ICSMonitor(model, x, layers=["1"], every=1).attach(opt)
    with pytest.warns(ics.ICSWarning, match=r"exceed the largest torch.float32.*capture_dtype"):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    monitor.detach()


# ------------------------------------------------------ a violation at a tiny scale
@pytest.mark.parametrize("view", ["flatten", "pixel"])
def test_the_monitor_sees_a_violation_at_a_tiny_scale(monkeypatch, view):
    # U1 halved (a wrong bound) must be flagged at 1e-200 too: the check's absolute
    # slack was 1e-12 (ATOL * max(scale, 1), and the rescaled pixel view's scale ~1)
    def wrong(*args, **kwargs):
        out = bounds_kernel(*args, **kwargs)
        out["U1"] *= 0.5
        return out

    bounds_kernel = shift._bounds
    monkeypatch.setattr(shift, "_bounds", wrong)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), Scale(1e-200)).double()
    x = torch.randn(12, 2, 4, 4, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = ics.ICSMonitor(model, x, layers=["1"], every=1, views=(view,), **F64).attach(opt)
    with pytest.warns(ics.ICSWarning, match="a bound is violated: exact = .* > U1"):
        opt.zero_grad()
        (model(x) / 1e-200).sin().sum().backward()  # a gradient of order 1
        opt.step()
    monitor.detach()
    rows = monitor.results()
    assert not rows[rows.quantity == "exact"].bounds_hold.any()
