"""Every term of the bounds, one at a time: cases where that term alone is active.

For each term of U3 (core, gamma change, beta change), U4 (the radius before, the radius
after, the shift change) and U5 (unit, bn, alpha, gamma, beta), for the pixel view's
per-image norm ``s``, for the sampling floor's disjoint halves and for the standard
error of ``sliced``: a constructed case where the term is the only one that is not
zero (or, where that cannot be, the others are known), the bound compared with the
exact W1 (POT's ``emd2``, independent of the code under test) and with its closed
form. Dropping or altering any one term makes a test here fail (the mutants are
listed in the commit that added this file).

Normalized values are columns of a Sylvester-Hadamard matrix without its first column:
every entry is +-1 and every column has mean 0 and mean square 1, exactly, so the
correlation, second moments and norms of the closed forms are exact integers.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import ot
import pytest
import torch
from scipy.linalg import hadamard

from ics_toolkit import bounds, sampling_floor, wasserstein
from ics_toolkit._norm_snapshot import norm_pair, norm_snapshot
from ics_toolkit._vocab import FLOAT32_ERROR_U3
from ics_toolkit.bound_terms import bound_terms
from ics_toolkit.bounding import NormState, _prepare, _u3_stored_terms
from ics_toolkit.distances import _half_index, random_directions
from ics_toolkit.nn import Unitization
from ics_toolkit.shift import MeasureConfig, _floor_row
from ics_toolkit.views import pixel

N = 16  # rows of the Hadamard matrix
C, P = 3, 4  # channels and positions of the BatchNorm cases: d = 12
D = C * P
REL = 1e-12


def emd(x, y) -> float:
    """Exact W1 with POT (float64 Euclidean cost, uniform weights)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    cost = ot.dist(x, y, metric="euclidean")
    return float(ot.emd2(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), cost))


def hat(d: int = D) -> np.ndarray:
    """(16, d) normalized values: +-1 entries, columns of mean 0 and mean square 1."""
    assert d < N
    return hadamard(N).astype(np.float64)[:, 1 : d + 1]


def per_coordinate(v: np.ndarray) -> np.ndarray:
    """A per-channel (C,) parameter repeated over the P positions (flatten layout)."""
    return np.repeat(v, P)


def outputs_bn(x_hat: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    return x_hat * per_coordinate(g) + per_coordinate(b)


def u3_everywhere(x_hat, y_hat, g1, g2, b1, b2) -> dict[str, dict[str, float]]:
    """U3 and its terms from every implementation: bounds(), bound_terms, the monitor's."""
    before = NormState(x_hat=x_hat, weight=per_coordinate(g1), bias=per_coordinate(b1))
    after = NormState(x_hat=y_hat, weight=per_coordinate(g2), bias=per_coordinate(b2))
    x, y = outputs_bn(x_hat, g1, b1), outputs_bn(y_hat, g2, b2)
    out = {"bounds": {"U3": bounds(x, y, before=before, after=after)["U3"]}}
    a, b = _prepare(before, after, N, D, torch.zeros(1, dtype=torch.float64))
    # "U3_core" below is the paper's core max|gamma| sqrt(2 d' (1 - rho)): the library
    # splits it into the tight core and the eps part (U3_core + U3_eps), tested in
    # tests/test_u3_tight.py; their sum is checked here
    terms = dict(bound_terms(a, b))
    terms["U3_core"] = terms["U3_core"] + terms.pop("U3_eps")
    out["bound_terms"] = terms
    xa = torch.as_tensor(x_hat).reshape(N, C, P)
    xb = torch.as_tensor(y_hat).reshape(N, C, P)
    params = [torch.as_tensor(v) for v in (g1, g2, b1, b2)]
    for precise, dtype in ((True, torch.float64), (False, torch.float32)):
        terms = _u3_stored_terms(
            xa.to(dtype), xb.to(dtype), (params[0], params[1]), (params[2], params[3]), precise
        )
        core, eps, gamma, beta = terms
        out[f"stored_{dtype}"] = {"U3_core": core + eps, "U3_gamma": gamma, "U3_beta": beta}
    return out


def check_u3(x_hat, y_hat, g1, g2, b1, b2, expected: dict[str, float], exact: float) -> None:
    """Every implementation gives the expected terms, their sum is U3 and U3 >= exact."""
    total = sum(expected.values())
    assert total >= exact * (1 - 1e-12)
    # the float32 path's core amplifies float32 rounding of the stored values to about
    # FLOAT32_ERROR_U3 of its scale max|gamma| sqrt(d) (ics_toolkit._vocab)
    core_scale = max(np.abs(g1).max(), np.abs(g2).max()) * math.sqrt(D)
    for where, got in u3_everywhere(x_hat, y_hat, g1, g2, b1, b2).items():
        low = "float32" in where
        # in float64 the eps part sqrt(2 d' - m2(X) - m2(Y)) takes the square root of
        # the rounding of the second moments (~1e-16 d): ~1e-8 sqrt(d) absolute
        rel, atol = (1e-6, FLOAT32_ERROR_U3 * core_scale) if low else (REL, 1e-7 * core_scale)
        if "U3" in got:
            assert got["U3"] == pytest.approx(total, rel=rel, abs=atol), where
            continue
        for term, value in expected.items():
            assert got[term] == pytest.approx(value, rel=rel, abs=atol), (where, term)


# ------------------------------------------------------------------------------ U3
def test_u3_core_alone_is_max_gamma_sqrt_2_d_prime_1_minus_rho():
    x_hat = hat()
    g = np.array([0.5, 2.0, 1.0])  # max|gamma| = 2 multiplies the core
    b = np.array([0.3, -0.2, 0.1])
    # a cyclic shift of the rows: the same distribution (exact W1 = 0), correlation c
    y_hat = np.roll(x_hat, 1, axis=0)
    c = float((x_hat * y_hat).sum(1).mean())
    assert c < D  # so the core is not zero
    expected = {"U3_core": 2.0 * math.sqrt(2 * (D - c)), "U3_gamma": 0.0, "U3_beta": 0.0}
    exact = emd(outputs_bn(x_hat, g, b), outputs_bn(y_hat, g, b))
    assert exact == pytest.approx(0.0, abs=1e-6)  # POT's solver stops at ~1e-7
    check_u3(x_hat, y_hat, g, g, b, b, expected, exact)
    # opposite values: rho = -1, the core is 2 sqrt(d) max|gamma|, and W1 > 0
    expected = {"U3_core": 2.0 * 2.0 * math.sqrt(D), "U3_gamma": 0.0, "U3_beta": 0.0}
    exact = emd(outputs_bn(x_hat, g, b), outputs_bn(-x_hat, g, b))
    assert exact > 1.0
    check_u3(x_hat, -x_hat, g, g, b, b, expected, exact)


def test_u3_gamma_alone_is_the_rms_of_the_scale_change():
    x_hat = hat()
    g1, g2 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    b = np.array([0.3, -0.2, 0.1])
    # sqrt(sum_k (g_k - g'_k)^2 mean_i y_ik^2), every column of mean square 1
    closed = math.sqrt(P * float(((g1 - g2) ** 2).sum()))
    x, y = outputs_bn(x_hat, g1, b), outputs_bn(x_hat, g2, b)
    u2 = math.sqrt(float(((x - y) ** 2).sum(1).mean()))
    assert closed == pytest.approx(u2, rel=REL)  # here the term is the paired rms gap
    exact = emd(x, y)
    assert 0.1 < exact <= closed
    expected = {"U3_core": 0.0, "U3_gamma": closed, "U3_beta": 0.0}
    check_u3(x_hat, x_hat, g1, g2, b, b, expected, exact)


def test_u3_beta_alone_is_the_shift_and_tight():
    x_hat = hat()
    g = np.array([1.0, 2.0, 0.5])
    b1, b2 = np.array([0.3, -0.2, 0.1]), np.array([0.0, 0.5, 0.1])
    closed = math.sqrt(P * float(((b1 - b2) ** 2).sum()))  # every position of a channel
    exact = emd(outputs_bn(x_hat, g, b1), outputs_bn(x_hat, g, b2))
    assert exact == pytest.approx(closed, rel=1e-9)  # a translation: W1 = U3
    expected = {"U3_core": 0.0, "U3_gamma": 0.0, "U3_beta": closed}
    check_u3(x_hat, x_hat, g, g, b1, b2, expected, exact)


def test_u3_from_stored_values_leaves_them_unchanged():
    """The float64 path once squared the after-step values in place (a view of them)."""
    xa = torch.as_tensor(hat()).reshape(N, C, P).clone()
    xb = torch.roll(xa, 1, dims=0)
    kept = xb.clone()
    first = _u3_stored_terms(xa, xb, (None, None), (None, None), precise=True)
    assert torch.equal(xb, kept)
    assert _u3_stored_terms(xa, xb, (None, None), (None, None), precise=True) == first


def test_u3_of_consecutive_measured_steps_with_float64_captures():
    """With the after-step capture reused as the next step's before, U3 is unchanged."""
    import ics_toolkit as ics

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32)).double()
    probe = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    options = {"every": 1, "precision": "float64", "capture_dtype": torch.float64}
    reused = ics.ICSMonitor(model, probe, **options)
    fresh = ics.ICSMonitor(model, probe, reuse_probe=False, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    reused.attach(opt)
    fresh.attach(opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 8, dtype=torch.float64, generator=g)).square().mean().backward()
        opt.step()
    a, b = (
        m.results().query("quantity == 'U3_core'").set_index("step")["value"]
        for m in (reused, fresh)
    )
    assert len(a) == 3 and np.allclose(a, b, rtol=1e-12)
    assert (a < 1.0).all()  # small steps: the core stays far below sqrt(2 d) = 8


# ------------------------------------------------------------------------------ U4
def unitized(rng, n: int, d: int, k: float, scale: np.ndarray, shift: np.ndarray):
    """Outputs scale * k * u_i + shift with u_i uniform on the unit sphere."""
    u = rng.normal(size=(n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return scale * k * u + shift


@pytest.mark.parametrize("side", ["before", "after"])
def test_u4_radius_of_each_side_alone(side):
    rng = np.random.default_rng(3)
    n, d, k = 24, 5, 3.0
    g = np.array([2.0, 1.0, 1.0, 0.5, 1.0])  # max|gamma alpha| = 2 * 0.75
    b = np.full(d, 0.25)
    moving = unitized(rng, n, d, k, g * 0.75, b)
    still = np.tile(b, (n, 1))  # alpha = 0: every output is the shift
    states = [
        NormState(x_hat=None, weight=g, bias=b, alpha=0.75, k=k, form="unitization"),
        NormState(x_hat=None, weight=g, bias=b, alpha=0.0, k=k, form="unitization"),
    ]
    if side == "after":
        moving, still, states = still, moving, states[::-1]
    u4 = bounds(moving, still, before=states[0], after=states[1])["U4"]
    closed = k * 2.0 * 0.75
    exact = emd(moving, still)  # the mean distance to the point b
    assert exact == pytest.approx(np.linalg.norm(moving - still, axis=1).mean(), rel=1e-9)
    assert 0.5 * closed < exact <= u4
    assert u4 == pytest.approx(closed, rel=REL)


def test_u4_shift_alone_is_the_translation():
    n, k = 8, 2.0
    b1, b2 = np.array([0.0, 1.0, 2.0]), np.array([3.0, 1.0, -2.0])
    x, y = np.tile(b1, (n, 1)), np.tile(b2, (n, 1))
    before = NormState(x_hat=None, bias=b1, alpha=0.0, k=k, form="unitization")
    after = NormState(x_hat=None, bias=b2, alpha=0.0, k=k, form="unitization")
    u4 = bounds(x, y, before=before, after=after)["U4"]
    assert u4 == pytest.approx(5.0, rel=REL) and emd(x, y) == pytest.approx(5.0, rel=1e-9)


def test_u4_with_both_radii_and_the_shift_adds_them():
    rng = np.random.default_rng(4)
    n, d, k = 24, 4, 2.0
    b1, b2 = np.zeros(d), np.array([0.0, 0.0, 3.0, 4.0])
    x = unitized(rng, n, d, k, 0.5, b1)
    y = unitized(rng, n, d, k, 0.25, b2)
    before = NormState(x_hat=None, bias=b1, alpha=0.5, k=k, form="unitization")
    after = NormState(x_hat=None, bias=b2, alpha=0.25, k=k, form="unitization")
    u4 = bounds(x, y, before=before, after=after)["U4"]
    assert u4 == pytest.approx(k * 0.5 + k * 0.25 + 5.0, rel=REL)
    assert emd(x, y) <= u4


# ------------------------------------------------------------------------------ U5
def outputs_u5(x_hat, g, b, alpha, k, eps=0.0):
    s = np.sqrt((x_hat**2).sum(1, keepdims=True) / k**2 + eps)
    return g * x_hat * (alpha / s + 1 - alpha) + b


def u5_case(x_hat, y_hat, g1, g2, b1, b2, a1, a2, k):
    """(U5 from bounds(), its terms, the exact W1) of the authors' layer at two steps."""
    x, y = outputs_u5(x_hat, g1, b1, a1, k), outputs_u5(y_hat, g2, b2, a2, k)
    before = NormState(x_hat=x_hat, weight=g1, bias=b1, alpha=a1, k=k, form="embedded")
    after = NormState(x_hat=y_hat, weight=g2, bias=b2, alpha=a2, k=k, form="embedded")
    u5 = bounds(x, y, before=before, after=after)["U5"]
    a, b = _prepare(before, after, x.shape[0], x.shape[1], torch.zeros(1, dtype=torch.float64))
    return u5, bound_terms(a, b), emd(x, y)


def check_u5(got, expected: dict[str, float]) -> None:
    u5, terms, exact = got
    total = sum(expected.values())
    assert exact <= total * (1 + 1e-12)
    assert u5 == pytest.approx(total, rel=REL)
    for term, value in expected.items():
        assert terms[term] == pytest.approx(value, rel=REL, abs=1e-12), term


ZERO = {"U5_unit": 0.0, "U5_bn": 0.0, "U5_alpha": 0.0, "U5_gamma": 0.0, "U5_beta": 0.0}


def test_u5_unit_alone_is_two_k_max_gamma():
    d, k = 6, 4.0
    x_hat = hat(d)
    g = np.array([1.0, 1.5, 1.0, 1.0, 0.5, 1.0])
    b = np.full(d, 0.2)
    got = u5_case(x_hat, -x_hat, g, g, b, b, 1.0, 1.0, k)  # alpha = 1: 1 - alpha = 0
    check_u5(got, {**ZERO, "U5_unit": 2 * k * 1.5})
    assert got[2] > 0.5 * 2 * k  # antipodal unitized outputs: W1 of the order of the bound


def test_u5_bn_alone_is_max_gamma_times_the_rms_gap_and_tight():
    d = 6
    x_hat = hat(d)
    g = np.array([3.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    b = np.full(d, -0.1)
    t = np.zeros(d)
    t[0] = 0.5  # the gap lies on the coordinate of the largest |gamma|
    got = u5_case(x_hat, x_hat + t, g, g, b, b, 0.0, 0.0, 2.0)
    check_u5(got, {**ZERO, "U5_bn": 3.0 * 0.5})
    assert got[2] == pytest.approx(1.5, rel=1e-9)  # a translation by gamma * t


def test_u5_bn_term_carries_one_minus_alpha():
    d, k = 6, 2.0
    x_hat = hat(d)
    g, b = np.full(d, 2.0), np.zeros(d)
    t = np.full(d, 0.1)
    rms_gap = float(np.linalg.norm(t))
    got = u5_case(x_hat, x_hat + t, g, g, b, b, 0.25, 0.25, k)
    check_u5(got, {**ZERO, "U5_unit": 2.0 * 2 * k * 0.25, "U5_bn": 2.0 * 0.75 * rms_gap})


def test_u5_alpha_alone_is_the_alpha_change_times_k_plus_rms_norm():
    d, k = 6, 4.0
    x_hat = hat(d)  # rows of norm sqrt(6)
    g = np.array([1.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    b = np.full(d, 0.3)
    a2 = 0.5  # alpha 0 -> 0.5: the unitized share appears
    got = u5_case(x_hat, x_hat, g, g, b, b, 0.0, a2, k)
    check_u5(got, {**ZERO, "U5_alpha": 2.0 * a2 * (k + math.sqrt(d))})
    # the outputs are rescaled around b by 1 + a2 (k / sqrt(d) - 1): W1 > 0
    assert got[2] > 0.1


def test_u5_gamma_alone_is_the_rms_of_the_scale_change():
    d = 6
    x_hat = hat(d)
    g1 = np.array([1.0, 2.0, 0.5, 1.0, 1.0, 1.0])
    g2 = np.array([1.5, 1.0, 0.5, 1.0, 1.0, 2.0])
    b = np.full(d, 0.3)
    got = u5_case(x_hat, x_hat, g1, g2, b, b, 0.0, 0.0, 2.0)
    closed = float(np.linalg.norm(g1 - g2))  # columns of mean square 1
    check_u5(got, {**ZERO, "U5_gamma": closed})
    assert 0.1 < got[2] <= closed


def test_u5_gamma_term_uses_the_unitized_values_after_the_step():
    d, k = 6, 4.0
    x_hat = hat(d)
    g1 = np.full(d, 1.0)
    g2 = np.array([1.5, 1.0, 0.5, 1.0, 1.0, 2.0])
    b = np.zeros(d)
    got = u5_case(x_hat, x_hat, g1, g2, b, b, 1.0, 1.0, k)
    # A'_i = y_hat_i / s'_i = k y_hat_i / sqrt(d)
    gamma = k / math.sqrt(d) * float(np.linalg.norm(g1 - g2))
    check_u5(got, {**ZERO, "U5_unit": 2 * k * 1.0, "U5_gamma": gamma})


def test_u5_beta_alone_is_the_shift_and_tight():
    d = 6
    x_hat = hat(d)
    g = np.full(d, 1.5)
    b1, b2 = np.full(d, 0.3), np.array([0.3, 0.3, 1.3, 0.3, 0.3, 0.3])
    got = u5_case(x_hat, x_hat, g, g, b1, b2, 0.0, 0.0, 2.0)
    check_u5(got, {**ZERO, "U5_beta": 1.0})
    assert got[2] == pytest.approx(1.0, rel=1e-9)


# ------------------------------------------------------- the pixel view's per-image s
@pytest.mark.parametrize("max_samples", [None, 40])
def test_pixel_view_divides_each_row_by_its_images_norm(max_samples):
    """U5's gamma term in the pixel view: each row is divided by s of its whole image."""
    torch.manual_seed(0)
    n, c, h, w = 6, 3, 2, 4
    layer = Unitization(c, alpha_init=1.0).double()  # k = P = 8 (the authors' norm)
    x = torch.randn(n, c, h, w, dtype=torch.float64) * 2 + 1
    delta = 0.5
    snaps, outs = [], []
    for step in range(2):
        with torch.no_grad():
            layer.weight.fill_(1.0 + delta * step)  # only gamma changes
            outs.append(layer(x))
        snaps.append(norm_snapshot(layer, x, training=True))
    opts = {} if max_samples is None else {"max_samples": max_samples, "seed": 5}
    a, b = norm_pair(snaps[0], snaps[1], "pixel", opts)
    terms = bound_terms(a, b)
    # the closed form, from an independent x_hat and per-image s
    xn = x.numpy()
    mean = xn.mean(axis=(0, 2, 3), keepdims=True)
    var = xn.var(axis=(0, 2, 3), keepdims=True)
    x_hat = (xn - mean) / np.sqrt(var + layer.eps)
    k = float(h * w)
    s = np.sqrt((x_hat**2).sum(axis=(1, 2, 3)) / k**2 + layer.eps)  # one per image
    unit = torch.as_tensor(x_hat / s[:, None, None, None])
    rows = pixel(unit, **opts).numpy()  # the rows the view keeps, each over its image's s
    closed = delta * math.sqrt(float((rows**2).sum(1).mean()))
    assert terms["U5_gamma"] == pytest.approx(closed, rel=1e-9)
    # per pixel row, ||row / s_row|| would be k for every row: far larger
    assert closed < 0.5 * delta * k
    # the gap of the outputs is exactly the gamma part: the term is their rms gap >= W1
    px, py = (pixel(o, **opts).numpy() for o in outs)
    rms = math.sqrt(float(((px - py) ** 2).sum(1).mean()))
    assert terms["U5_gamma"] == pytest.approx(rms, rel=1e-9)
    assert emd(px, py) <= terms["U5_gamma"] * (1 + 1e-9)
    assert terms["U5_bn"] == 0.0 and terms["U5_alpha"] == 0.0 and terms["U5_beta"] == 0.0


# --------------------------------------------------------- the floor's disjoint halves
@pytest.mark.parametrize("n", [8, 9, 30])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_floor_halves_are_disjoint(n, seed):
    """Equidistant points (the rows of I_n): disjoint halves are sqrt(2) apart, exactly.

    A shared sample would be matched with itself at cost 0: W1 = sqrt(2) (1 - shared / h).
    """
    x = np.eye(n)
    assert sampling_floor(x, "exact", seed=seed) == pytest.approx(math.sqrt(2), rel=1e-12)
    row = _floor_row(torch.eye(n, dtype=torch.float64), "exact", MeasureConfig(seed=seed))
    assert row["value"] == pytest.approx(math.sqrt(2), rel=1e-12)
    first, second = _half_index(n, seed, torch.device("cpu"))
    assert len(first) == len(second) == n // 2
    assert not set(first.tolist()) & set(second.tolist())
    assert emd(x[first.numpy()], x[second.numpy()]) == pytest.approx(math.sqrt(2), rel=1e-12)


# ------------------------------------------------------ the sliced standard error
@pytest.mark.parametrize("n_projections", [2, 3, 16])
def test_sliced_standard_error_is_the_sample_deviation_over_sqrt_l(n_projections):
    """A translation by t: each direction's 1-D W1 is |<theta, t>| (closed form)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 5))
    t = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    value, log = wasserstein(x, x + t, "sliced", n_projections=n_projections, seed=4, log=True)
    theta = random_directions(5, n_projections, seed=4).numpy()
    per = np.abs(t @ theta)  # directions are the columns (d, L)
    assert np.allclose(log["per_direction"], per, rtol=1e-9)
    assert value == pytest.approx(per.mean(), rel=1e-9)
    assert value <= emd(x, x + t) * (1 + 1e-9)  # sliced is a lower bound of W1
    sample_sd = statistics.stdev(per.tolist())  # ddof = 1
    assert log["std_error"] == pytest.approx(sample_sd / math.sqrt(n_projections), rel=1e-9)
    if n_projections == 2:  # ddof 1: |a - b| / sqrt(2) / sqrt(2) = |a - b| / 2
        assert log["std_error"] == pytest.approx(abs(per[0] - per[1]) / 2, rel=1e-9)
