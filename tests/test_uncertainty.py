"""Probe-resampling intervals, the identity share, relative values and the bound terms.

References: closed forms (W1 of X ~ N(0, I_d) and cX is |1 - c| E||X||, with
E||X|| = sqrt(2) Gamma((d + 1)/2) / Gamma(d/2)), POT's emd2 on resampled rows, and
:func:`ics_toolkit.bounds` for the bound terms.
"""

import math

import numpy as np
import ot
import pytest
import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit import _vocab, diagnostics, uncertainty
from ics_toolkit.bound_terms import bound_terms
from ics_toolkit.bounding import NormState, _prepare
from ics_toolkit.shift import MeasureConfig


def mean_norm_gaussian(d):
    return math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))


def test_interval_covers_the_population_w1_at_its_level():
    d, n, c, seeds = 3, 60, 1.4, 300
    truth = abs(1 - c) * mean_norm_gaussian(d)
    hits = 0
    for seed in range(seeds):
        x = np.random.default_rng(seed).normal(size=(n, d))
        value, info = ics.wasserstein(x, c * x, ci=0.95, log=True, seed=seed, ci_resamples=300)
        assert info["identity_share"] == pytest.approx(1.0)  # Y = cX: the identity is optimal
        assert info["ci_how"] == "paired means"
        assert info["ci_low"] <= value <= info["ci_high"]
        hits += info["ci_low"] <= truth <= info["ci_high"]
    coverage = hits / seeds
    # binomial sd at 95 %: sqrt(.95 * .05 / 300) = 0.0126; the percentile bootstrap of a
    # mean of n = 60 undercovers slightly. A floor-like or twice-too-narrow interval fails.
    assert 0.90 <= coverage <= 0.985, coverage


def test_paired_interval_coverage_at_another_level_vectorized():
    # the same known case, every seed at once: 2000 samples of n = 40 distances
    d, n, c, level = 5, 40, 0.7, 0.8
    truth = abs(1 - c) * mean_norm_gaussian(d)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2000, n, d, generator=gen, dtype=torch.float64)
    dist = abs(1 - c) * torch.linalg.vector_norm(x, dim=2)
    hits = 0
    for i in range(dist.shape[0]):
        low, high = uncertainty.paired_interval(dist[i], level, 200, seed=i)
        hits += low <= truth <= high
    assert 0.75 <= hits / dist.shape[0] <= 0.85


def test_exact_interval_without_identity_plan_resolves_each_resample():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(24, 2)), rng.normal(size=(24, 2)) + 0.5
    value, info = ics.wasserstein(x, y, ci=0.9, log=True, seed=5)
    assert info["identity_share"] < 1
    assert info["ci_how"] == "exact solves"
    idx = uncertainty.bootstrap_indices(24, uncertainty.DEFAULT_SOLVES, 5).numpy()
    w = np.full(24, 1 / 24)
    ref = [ot.emd2(w, w, ot.dist(x[i], y[i], metric="euclidean")) for i in idx]
    q_lo, q_hi = np.quantile(ref, [0.05, 0.95])
    # the basic bootstrap interval: the resampled quantiles reflected about the estimate
    assert info["ci_low"] == pytest.approx(2 * value - q_hi, rel=1e-9)
    assert info["ci_high"] == pytest.approx(2 * value - q_lo, rel=1e-9)


def test_sliced_interval_resamples_the_public_estimator():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    y = x + rng.normal(size=(30, 4)) * 0.3 + 0.2
    idx = uncertainty.bootstrap_indices(30, 50, 7).numpy()
    for method in ("sliced", "max_sliced"):
        value, info = ics.wasserstein(
            x, y, method, ci=0.9, log=True, n_projections=8, seed=7, ci_resamples=50
        )
        assert info["ci_how"] == "projections"
        ref = [ics.wasserstein(x[i], y[i], method, n_projections=8, seed=7) for i in idx]
        q_lo, q_hi = np.quantile(ref, [0.05, 0.95])
        assert info["ci_low"] == pytest.approx(2 * value - q_hi, rel=1e-9)
        assert info["ci_high"] == pytest.approx(2 * value - q_lo, rel=1e-9)


def test_identity_share_of_a_small_translation_is_one():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 100, size=(40, 3))
    value, info = ics.wasserstein(x, x + 1e-3, log=True)
    assert info["identity_share"] == pytest.approx(1.0)
    assert value == pytest.approx(ics.wasserstein(x, x + 1e-3, "paired"))


def test_identity_share_of_a_derangement_of_separated_points_is_zero():
    x = np.arange(12, dtype=float)[:, None] * np.array([[10.0, 3.0]])
    y = np.roll(x, 1, axis=0)  # a cyclic shift moves every point to another's place
    value, info = ics.wasserstein(x, y, log=True)
    assert info["identity_share"] == pytest.approx(0.0, abs=1e-12)
    assert value == pytest.approx(0.0, abs=1e-12)
    # the 1-D path (sorting) reports the same share
    _, info1 = ics.wasserstein(x[:, :1], y[:, :1], log=True)
    assert info1["solver"] == "sorted_1d" and info1["identity_share"] == 0.0


def test_relative_values_do_not_change_when_outputs_are_rescaled():
    rng = np.random.default_rng(2)
    x = torch.as_tensor(rng.normal(size=(50, 8)))
    y = x + 0.05 * torch.as_tensor(rng.normal(size=(50, 8)))
    config = MeasureConfig(methods=("exact", "paired"))

    def rel(a, b):
        rows = []
        logs = {}
        for m in ("exact", "paired"):
            v, log = ics.wasserstein(a, b, m, log=True)
            rows.append({"quantity": m, "value": v, "kind": "estimate"})
            logs[m] = log
        out = diagnostics.step_rows(a, b, rows, logs, config)
        return {r["quantity"]: r["value"] for r in [*rows, *out]}

    base, scaled = rel(x, y), rel(37.0 * x, 37.0 * y)
    assert base["scale"] == pytest.approx(float(x.square().sum(1).mean().sqrt()))
    assert scaled["scale"] == pytest.approx(37.0 * base["scale"])
    names = [q for q in base if _vocab.quantity_kind(q) == "relative"]
    assert "relative_exact" in names and "relative_exact_ci_high" in names
    for q in names:
        assert scaled[q] == pytest.approx(base[q], rel=1e-9)
    assert base["exact_ci_low"] <= base["exact"] * (1 + 1e-12) <= base["exact_ci_high"] * (1 + 1e-9)


def _states(form, rng, n=30, d=6):
    x_hat = torch.as_tensor(rng.normal(size=(n, d)))
    y_hat = x_hat + 0.2 * torch.as_tensor(rng.normal(size=(n, d)))
    common = {"k": 2.0, "eps": 1e-5, "form": form}
    alpha = (rng.uniform(0.1, 0.9, size=d), rng.uniform(0.1, 0.9, size=d))
    before = NormState(
        x_hat=x_hat,
        weight=rng.uniform(0.5, 2, size=d),
        bias=rng.normal(size=d),
        alpha=alpha[0] if form != "batchnorm" else None,
        **common,
    )
    after = NormState(
        x_hat=y_hat,
        weight=rng.uniform(0.5, 2, size=d),
        bias=rng.normal(size=d),
        alpha=alpha[1] if form != "batchnorm" else None,
        **common,
    )
    return before, after


@pytest.mark.parametrize(
    ("form", "bound"), [("batchnorm", "U3"), ("batchnorm", "U3_tight"), ("embedded", "U5")]
)
def test_bound_terms_add_up_to_the_bound(form, bound):
    rng = np.random.default_rng(4)
    before, after = _states(form, rng)
    x = torch.as_tensor(rng.normal(size=(30, 6)))
    y = torch.as_tensor(rng.normal(size=(30, 6)))
    value = ics.bounds(x, y, before=before, after=after)[bound]
    a, b = _prepare(before, after, 30, 6, x.double())
    terms = bound_terms(a, b)
    assert set(_vocab.BOUND_TERMS[bound]) <= set(terms)
    assert all(t >= 0 for t in terms.values())
    total = sum(terms[t] for t in _vocab.BOUND_TERMS[bound])
    assert total == pytest.approx(value, rel=1e-12)


def test_u3_core_and_eps_terms_are_the_tight_and_the_paper_core():
    rng = np.random.default_rng(5)
    before, after = _states("batchnorm", rng)
    a, b = _prepare(before, after, 30, 6, torch.zeros(1, dtype=torch.float64))
    x_hat, y_hat = a.x_hat.numpy(), b.x_hat.numpy()
    d_eff = max(6.0, (x_hat**2).sum(1).mean(), (y_hat**2).sum(1).mean())
    rho = (x_hat * y_hat).sum(1).mean() / d_eff
    g = np.abs(before.weight).max()
    terms = bound_terms(a, b)
    # U3_core: max|gamma| times the RMS gap; with U3_eps: the paper's sqrt(2 d'(1 - rho))
    rms = math.sqrt(((x_hat - y_hat) ** 2).sum(1).mean())
    assert terms["U3_core"] == pytest.approx(g * rms, rel=1e-12)
    paper = g * math.sqrt(2 * d_eff * (1 - rho))
    assert terms["U3_core"] + terms["U3_eps"] == pytest.approx(paper, rel=1e-12)
    assert terms["U3_eps"] > 0.1 * paper  # the premise: the eps part is not negligible here


def test_ci_argument_errors():
    x = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(ics.ICSValueError, match=r"pass log=True"):
        ics.wasserstein(x, x + 1, ci=0.95)
    with pytest.raises(ics.ICSValueError, match=r"`ci` must be a confidence level"):
        ics.wasserstein(x, x + 1, ci=1.5, log=True)
    with pytest.raises(ics.ICSValueError, match=r"not 'per_coordinate'"):
        ics.wasserstein(x, x + 1, "per_coordinate", ci=0.95, log=True)
    with pytest.raises(ics.ICSValueError, match=r"paired rows"):
        ics.wasserstein(x, x[:7], ci=0.95, log=True)
    with pytest.raises(ics.ICSValueError, match=r"`ci_resamples` must be >= 10"):
        ics.wasserstein(x, x + 1, ci=0.95, log=True, ci_resamples=3)


def test_monitor_skips_costly_exact_intervals_with_a_warning():
    n = diagnostics.MAX_SOLVED_N + 1
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = [{"quantity": "exact", "value": 1.0, "kind": "estimate"}]
    out = diagnostics.step_rows(x, x + 1, rows, {"exact": {"identity_share": 0.5}}, MeasureConfig())
    limits = [r for r in out if r["kind"] == "interval"]
    assert [r["quantity"] for r in limits] == ["exact_ci_low", "exact_ci_high"]
    assert all(math.isnan(r["value"]) and "no interval" in r["warning"] for r in limits)
    assert {r["quantity"] for r in out} >= {"scale", "identity_share", "relative_exact"}


def test_the_monitors_bound_terms_add_up_to_its_bounds():
    # BatchNorm's flatten view takes U3 from the stored normalized values, Unitization's
    # U5 from the prepared states: both paths must report terms that sum to the bound
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), ics.nn.Unitization2d(4, alpha_init=0.5)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = ics.ICSMonitor(model, torch.randn(16, 3, 8, 8), every=1, methods=("exact",))
    with monitor.attach(opt):
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(8, 3, 8, 8)).square().mean().backward()
            opt.step()
    df = monitor.results()
    for bound in ("U3", "U3_tight", "U5"):
        names = _vocab.BOUND_TERMS[bound]
        rows = df[df.quantity.isin([bound, *names])]
        assert not rows.empty
        for _, group in rows.groupby(["step", "layer"]):
            values = dict(zip(group.quantity, group.value, strict=True))
            assert set(values) == {bound, *names}
            terms = sum(values[q] for q in names)
            assert terms == pytest.approx(values[bound], rel=1e-12)


@pytest.mark.parametrize("identity", [True, False])
def test_interval_from_the_exact_cost_matrix_equals_the_one_from_the_samples(identity):
    # the monitor's path: paired means from the cost matrix's diagonal, resamples solved
    # on its submatrices, instead of passes over the samples and one GEMM per resample
    from ics_toolkit import diagnostics, distances, shift

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(48, 20, generator=gen, dtype=torch.float64)
    noise = torch.randn(48, 20, generator=gen, dtype=torch.float64)
    y = x + 0.01 * noise if identity else noise
    config = shift.MeasureConfig(methods=("exact",))
    value, log = distances._kernel("exact", x, y, config.options["exact"], 0, 0, keep_cost=True)
    assert (log["identity_share"] >= 1 - uncertainty.IDENTITY_TOL) == identity
    plain = {k: v for k, v in log.items() if k != "cost_matrix"}
    args = ("exact", x, y)
    tail = (diagnostics._solver(config), 0.95, 400, 0)
    old = uncertainty.interval(*args, plain, *tail)
    new = uncertainty.interval(
        *args, {**log, "value": value}, *tail, cost_solve=diagnostics._cost_solver(config)
    )
    assert new[2] == old[2] == ("paired means" if identity else "exact solves")
    assert new[0] == pytest.approx(old[0], rel=1e-9) and new[1] == pytest.approx(old[1], rel=1e-9)
    assert new[0] < new[1]
