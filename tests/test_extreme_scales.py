"""Inputs at extreme scales: the right value or a clear error, never a silently wrong one.

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
from ics_toolkit import bounds, sampling_floor, wasserstein, wasserstein_many

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
        assert wasserstein(s * x, s * y, m) == pytest.approx(s * reference[m], rel=1e-12), m
    coords = wasserstein(s * x, s * y, "per_coordinate")
    np.testing.assert_allclose(coords, s * reference["per_coordinate"], rtol=1e-12)
    assert sampling_floor(s * x, "exact") == pytest.approx(s * reference["floor"], rel=1e-12)


@pytest.mark.parametrize("s", SCALES)
def test_every_sample_bound_is_homogeneous(pair, reference, s):
    x, y = pair
    b = bounds(s * x, s * y)
    for q in ("L1", "L2", "L3", "U1", "U2"):
        assert b[q] == pytest.approx(s * reference[q], rel=1e-12), q


def test_logs_and_intervals_are_in_the_samples_units(pair):
    x, y = pair
    s = 1e-200
    v1, log1 = wasserstein(x, y, "sliced", log=True, ci=0.9)
    vs, logs = wasserstein(s * x, s * y, "sliced", log=True, ci=0.9)
    assert vs == pytest.approx(s * v1, rel=1e-12)
    np.testing.assert_allclose(logs["per_direction"], s * log1["per_direction"], rtol=1e-12)
    for key in ("std_error", "ci_low", "ci_high"):
        assert logs[key] == pytest.approx(s * log1[key], rel=1e-12), key
    _, log_1 = wasserstein(x, y, "exact", log=True, ci=0.9)
    _, log_s = wasserstein(s * x, s * y, "exact", log=True, ci=0.9)
    for key in ("ci_low", "ci_high"):
        assert log_s[key] == pytest.approx(s * log_1[key], rel=1e-12), key
    _, sk = wasserstein(1e250 * x, 1e250 * y, "sinkhorn", log=True)
    assert (
        sk["lower"] <= 1e250 * wasserstein(x, y, "exact") * (1 + 1e-12) <= sk["upper"] * (1 + 1e-9)
    )
    many = wasserstein_many([(s * x, s * y), (x, y)], "sliced")
    assert many[0] == pytest.approx(s * many[1], rel=1e-12)


def test_float32_samples_at_extreme_float32_scales(pair):
    x, y = (t.float() for t in pair)
    for s in (1e-30, 1e30):
        xs, ys = x * s, y * s  # float32 values
        for m in ("exact", "paired", "sliced"):
            want = (
                s * wasserstein(x, y, m, dtype=None) if m != "exact" else s * wasserstein(x, y, m)
            )
            got = wasserstein(xs, ys, m, dtype=None) if m != "exact" else wasserstein(xs, ys, m)
            assert got == pytest.approx(want, rel=1e-5), (s, m)


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


@pytest.mark.parametrize("factor", [1e-200, 1e200])
def test_the_monitor_measures_a_layer_at_an_extreme_scale(factor):
    # a float64 layer whose outputs float64 holds but whose squares it does not
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
