"""The theory's bounds: closed forms, tight cases, and the order on random data."""

import math

import numpy as np
import ot
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ics_toolkit as ics
from ics_toolkit.bounding import RTOL, NormState, check_order


def exact_w1(x, y):
    """Independent reference: POT's network simplex on a Euclidean cost, float64."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y))
    # pairwise differences, not ot.dist's |x|^2 + |y|^2 - 2<x, y>, which loses ~1e-8
    # absolute accuracy when points nearly coincide
    cost = np.linalg.norm(x[:, None, :] - y[None, :, :], axis=2)
    value, log = ot.emd2(a, b, cost, log=True)
    assert log["result_code"] == 1
    return float(value)


def batchnorm_normalize(raw, eps=0.0):
    """x_hat of train-mode BatchNorm on (n, d) features: batch mean, biased variance."""
    return (raw - raw.mean(0)) / np.sqrt(raw.var(0) + eps)


# ---------------------------------------------------------------- closed forms


def test_translation_is_measured_exactly_by_l1_u1_u2():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4))
    shift = np.array([1.0, -2.0, 0.5, 2.0])
    b = ics.bounds(x, x + shift)
    norm = float(np.linalg.norm(shift))
    assert exact_w1(x, x + shift) == pytest.approx(norm, rel=1e-9)
    for name in ("L1", "L3", "U1", "U2"):
        assert b[name] == pytest.approx(norm, rel=1e-9), name


def test_l2_is_the_gap_of_mean_norms_and_tight_for_radial_scaling():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit sphere
    y = 3.0 * x  # every point moves radially by 2
    b = ics.bounds(x, y)
    assert b["L2"] == pytest.approx(2.0, rel=1e-12)
    assert exact_w1(x, y) == pytest.approx(2.0, rel=1e-9)  # the radial coupling is optimal


def test_u2_is_root_mean_square_of_paired_distances():
    x = np.array([[0.0, 0.0], [0.0, 0.0]])
    y = np.array([[3.0, 4.0], [0.0, 1.0]])
    b = ics.bounds(x, y)
    assert b["U1"] == pytest.approx(3.0)
    assert b["U2"] == pytest.approx(math.sqrt((25 + 1) / 2))


def test_u4_is_two_alpha_and_reached_by_antipodal_outputs():
    d, alpha = 5, 0.7
    p = np.zeros(d)
    p[0] = 1.0
    x = np.tile(alpha * p, (8, 1))  # unitized outputs: norm |alpha| k with k = 1
    y = -x
    st_ = NormState(x_hat=None, alpha=alpha, k=1.0, form="unitization")
    b = ics.bounds(x, y, before=st_, after=st_)
    assert b["U4"] == pytest.approx(2 * alpha, rel=1e-12)
    assert exact_w1(x, y) == pytest.approx(2 * alpha, rel=1e-9)


def test_u4_scales_with_k_and_gains_the_shift_change():
    x = np.array([[2.0, 0.0], [0.0, 2.0]])
    before = NormState(x_hat=None, alpha=0.5, k=4.0, form="unitization")
    after = NormState(x_hat=None, alpha=0.5, k=4.0, bias=[0.0, 1.0], form="unitization")
    b = ics.bounds(x, x + np.array([0.0, 1.0]), before=before, after=after)
    assert b["U4"] == pytest.approx(2 * 0.5 * 4.0 + 1.0)


def test_u4_refuses_samples_that_are_not_unitized():
    x = np.array([[3.0, 0.0], [0.0, 1.0]])
    st_ = NormState(x_hat=None, alpha=1.0, k=1.0, form="unitization")
    with pytest.raises(ics.ICSValueError, match="not unitized"):
        ics.bounds(x, -x, before=st_, after=st_)


def test_u3_is_two_sqrt_d_for_opposite_normalized_outputs():
    # rows of equal norm sqrt(d), zero mean and unit variance per coordinate
    d = 4
    x_hat = np.array([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    y_hat = -x_hat[:, ::-1]
    gamma = np.array([0.5, -2.0, 1.0, 1.0])
    b = ics.bounds(
        x_hat * gamma,
        y_hat * gamma,
        before=NormState(x_hat=x_hat, weight=gamma),
        after=NormState(x_hat=y_hat, weight=gamma),
    )
    assert b["U3"] == pytest.approx(2.0 * 2.0 * math.sqrt(d))  # max|gamma| * 2 sqrt(d)
    assert b["U1"] <= b["U3"] * (1 + RTOL)


def test_u3_matches_the_formula_with_affine_changes():
    rng = np.random.default_rng(3)
    n, d = 30, 6
    x_hat = batchnorm_normalize(rng.normal(size=(n, d)))
    y_hat = batchnorm_normalize(rng.normal(size=(n, d)) + x_hat)
    g1, g2 = rng.normal(size=d), rng.normal(size=d)
    b1, b2 = rng.normal(size=d), rng.normal(size=d)
    u, v = g1 * x_hat + b1, g2 * y_hat + b2
    got = ics.bounds(
        u,
        v,
        before=NormState(x_hat=x_hat, weight=g1, bias=b1),
        after=NormState(x_hat=y_hat, weight=g2, bias=b2),
    )["U3"]
    d_eff = max(d, (x_hat**2).sum(1).mean(), (y_hat**2).sum(1).mean())
    rho = (x_hat * y_hat).sum(1).mean() / d_eff
    want = (
        np.abs(g1).max() * np.sqrt(2 * d_eff * (1 - rho))
        + np.sqrt((((g1 - g2) * y_hat) ** 2).sum(1).mean())
        + np.linalg.norm(b1 - b2)
    )
    assert got == pytest.approx(want, rel=1e-12)
    assert exact_w1(u, v) <= got


def test_u5_with_alpha_zero_is_the_batchnorm_rms_gap():
    rng = np.random.default_rng(4)
    x_hat = batchnorm_normalize(rng.normal(size=(20, 3)))
    y_hat = batchnorm_normalize(rng.normal(size=(20, 3)))
    st_x = NormState(x_hat=x_hat, alpha=0.0, form="embedded")
    st_y = NormState(x_hat=y_hat, alpha=0.0, form="embedded")
    b = ics.bounds(x_hat, y_hat, before=st_x, after=st_y)
    assert b["U5"] == pytest.approx(b["U2"], rel=1e-12)
    assert "U4" not in b


def test_u5_with_alpha_one_is_two_k_and_reports_u4():
    rng = np.random.default_rng(5)
    k = 2.0
    x_hat = batchnorm_normalize(rng.normal(size=(20, 3)))
    y_hat = batchnorm_normalize(rng.normal(size=(20, 3)))

    def out(z):
        return z / np.linalg.norm(z, axis=1, keepdims=True) * k  # alpha = 1, eps = 0

    st_x = NormState(x_hat=x_hat, alpha=1.0, k=k, form="embedded")
    st_y = NormState(x_hat=y_hat, alpha=1.0, k=k, form="embedded")
    b = ics.bounds(out(x_hat), out(y_hat), before=st_x, after=st_y)
    assert b["U5"] == pytest.approx(2 * k, rel=1e-12)
    assert b["U4"] == pytest.approx(2 * k, rel=1e-12)


# ---------------------------------------------------------------- the order on random data


def _layer_output(x_hat, form, gamma, beta, alpha, k, eps):
    if form == "batchnorm":
        return gamma * x_hat + beta
    s = np.sqrt((x_hat**2).sum(1, keepdims=True) / k**2 + eps)
    if form == "unitization":
        return gamma * alpha * x_hat / s + beta
    return gamma * x_hat * (alpha / s + 1 - alpha) + beta


@given(
    n=st.integers(2, 12),
    d=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    form=st.sampled_from(["batchnorm", "unitization", "embedded"]),
    noise=st.floats(0.0, 3.0),
    change=st.floats(0.0, 1.0),
    k=st.sampled_from([1.0, 4.0]),
    eps=st.sampled_from([0.0, 1e-5]),
)
def test_bound_order_never_fails(n, d, seed, form, noise, change, k, eps):
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, size=d)
    x_hat = batchnorm_normalize(raw, eps)
    y_hat = batchnorm_normalize(raw + noise * rng.normal(size=(n, d)), eps)
    g1 = rng.normal(size=d)
    b1 = rng.normal(size=d)
    a1 = rng.uniform(-0.5, 1.5, size=d)
    g2 = g1 + change * rng.normal(size=d)
    b2 = b1 + change * rng.normal(size=d)
    a2 = a1 + change * rng.normal(size=d)
    x = _layer_output(x_hat, form, g1, b1, a1, k, eps)
    y = _layer_output(y_hat, form, g2, b2, a2, k, eps)
    before = NormState(x_hat=x_hat, weight=g1, bias=b1, alpha=a1, k=k, eps=eps, form=form)
    after = NormState(x_hat=y_hat, weight=g2, bias=b2, alpha=a2, k=k, eps=eps, form=form)
    values = ics.bounds(x, y, before=before, after=after, n_projections=16, seed=seed)
    values["exact"] = exact_w1(x, y)
    values["sliced"] = ics.wasserstein(x, y, "sliced", n_projections=16, seed=seed)
    values["max_sliced"] = ics.wasserstein(x, y, "max_sliced", n_projections=16, seed=seed)
    scale = float(max(np.abs(x).max(), np.abs(y).max()))
    check = check_order(values, scale=scale)
    assert check.holds, check.violations
    # L3 tries the directions of max_sliced and the mean gap, and more
    assert check_order({"max_sliced": values["max_sliced"], "U1": values["L3"]}, scale=scale).holds
    assert check_order({"L1": values["L1"], "U1": values["L3"]}, scale=scale).holds


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(16, 3)), rng.normal(size=(16, 3))
    assert ics.bounds(x, y) == ics.bounds(torch.from_numpy(x), torch.from_numpy(y))


def test_unpaired_samples_give_only_lower_bounds():
    rng = np.random.default_rng(7)
    b = ics.bounds(rng.normal(size=(10, 2)), rng.normal(size=(7, 2)))
    assert set(b) == {"L1", "L2", "L3"}


# ---------------------------------------------------------------- checks and errors


def test_check_order_reports_each_violation():
    check = check_order({"exact": 1.0, "L2": 1.5, "U1": 0.5, "U2": 2.0})
    assert not check.holds
    assert check.violations == ("L2 = 1.5 > exact = 1", "exact = 1 > U1 = 0.5")


def test_check_order_tolerates_float32_rounding_only():
    assert check_order({"exact": 1.0, "L3": 1.0 + 0.5 * RTOL}).holds
    assert not check_order({"exact": 1.0, "L3": 1.0 + 10 * RTOL}).holds


def test_check_order_without_exact_compares_lower_with_upper():
    assert not check_order({"L1": 2.0, "U1": 1.0}).holds
    assert check_order({"L1": 1.0, "U1": 2.0, "sliced": 0.5, "max_sliced": 0.7}).holds
    assert not check_order({"sliced": 0.8, "max_sliced": 0.7}).holds


def test_parameter_of_wrong_length_names_the_argument():
    x = np.ones((4, 3)) + np.arange(4)[:, None]
    with pytest.raises(ics.ICSValueError, match=r"`before.weight` must have d = 3"):
        ics.bounds(x, x, before=NormState(x, weight=[1.0, 2.0]), after=NormState(x))


def test_missing_alpha_and_half_states_are_refused():
    x = np.ones((4, 3)) + np.arange(4)[:, None]
    with pytest.raises(ics.ICSValueError, match=r"`before.alpha` is required"):
        ics.bounds(x, x, before=NormState(x, form="embedded"), after=NormState(x))
    with pytest.raises(ics.ICSValueError, match="both `before` and `after`"):
        ics.bounds(x, x, before=NormState(x))
    with pytest.raises(ics.ICSValueError, match="differ"):
        ics.bounds(x, x, before=NormState(x), after=NormState(x, alpha=1.0, form="embedded"))


def test_samples_are_checked_like_the_engine():
    with pytest.raises(ics.ICSValueError, match="`x` contains"):
        ics.bounds(np.array([[np.nan], [1.0]]), np.ones((2, 1)))
    with pytest.raises(ics.ICSValueError, match="same number of columns"):
        ics.bounds(np.ones((3, 2)), np.ones((3, 3)))


def test_moment_drift_sees_what_batchnorm_leaves_free():
    from ics_toolkit.moments import moment_drift

    rng = np.random.default_rng(8)
    x = batchnorm_normalize(rng.normal(size=(4000, 1)))
    y = np.where(np.arange(4000) % 2 == 0, 1.0, -1.0)[:, None]  # same mean and variance
    drift = moment_drift(x, y)
    assert drift["drift_mean"] < 1e-12 and drift["drift_var"] < 1e-12
    assert drift["drift_m4"] == pytest.approx(2.0, abs=0.5)  # fourth moment 3 -> 1


@pytest.mark.parametrize("shape", [((30, 5), (30, 5)), ((20, 7), (33, 7)), ((9, 1), (4, 1))])
def test_moment_drift_is_each_formula(shape):
    from ics_toolkit.moments import moment_drift

    rng = np.random.default_rng(len(shape[1]) + shape[0][0])
    x = rng.normal(size=shape[0]) * rng.uniform(0.5, 2, size=shape[0][1]) + 1.0
    y = rng.standard_t(4, size=shape[1]) * 1.5 - 0.5  # other variances and fourth moments

    def moments(s):
        mu = s.mean(axis=0)
        return mu, ((s - mu) ** 2).mean(axis=0), ((s - mu) ** 4).mean(axis=0)

    (mx, vx, kx), (my, vy, ky) = moments(x), moments(y)
    norms_x, norms_y = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    drift = moment_drift(x, y)
    assert drift["drift_mean"] == pytest.approx(np.linalg.norm(mx - my), rel=1e-12)
    assert drift["drift_var"] == pytest.approx(np.linalg.norm(vx - vy), rel=1e-12)
    assert drift["drift_m4"] == pytest.approx(np.linalg.norm(kx - ky), rel=1e-12)
    # the biased variances of the row norms, and their difference (not their sum)
    expected = abs(norms_x.var() - norms_y.var())
    assert drift["drift_norm_var"] == pytest.approx(expected, rel=1e-10)
    assert moment_drift(x, x) == {k: 0.0 for k in drift}


def test_the_axis_search_reaches_a_column_its_upper_values_rank_last():
    # 600 columns shuffled within themselves (W1 0, large mean |x - y|) rank first by the
    # search's upper values; the one column that moved (W1 1, upper value 1) ranks after
    # them, beyond the first chunks: the search must still measure it
    from ics_toolkit import _sliced, bounding

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 800, generator=gen, dtype=torch.float64)
    x[:, :600] *= 10
    y = x.clone()
    y[:, :600] = x[torch.randperm(64, generator=gen), :600]
    y[:, 700] += 1.0
    upper = bounding._differences(x, y).column_abs_gap
    assert int((upper > upper[700]).sum()) >= 2 * bounding._AXIS_CHUNK  # ranked late
    every = float(_sliced.coordinate_group([x], [y], torch.float64)[0].max())
    assert every == pytest.approx(1.0, rel=1e-12)
    assert bounding._best_axis(x, y, 0.0) == every
