"""The formulas behind the float32 analysis, each against a direct computation.

tests/test_precision.py compares a float32 run with a float64 run of the same code; a
mistake both precisions share, or one in a branch that training run never takes, passes
there. Here each piece (the cost matrix, the U3 sums, the float64 fallback, the interval
from the cost matrix, L3 >= L1) meets a reference computed another way: ``torch.cdist``
in float64, POT-backed :func:`ics_toolkit.wasserstein`, :func:`ics_toolkit.bounds`,
closed forms, on small constructed inputs where that piece alone decides the number.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ics_toolkit as ics
from ics_toolkit import _sliced, _vocab, bounding, diagnostics, distances, shift, uncertainty
from ics_toolkit._norm_snapshot import batchnorm_hat, norm_pair
from ics_toolkit.errors import SolverError


def _linear_capture(n: int = 40, d: int = 64) -> shift.StepCapture:
    """A capture of a Linear layer's (n, d) output, whose tensors the tests replace."""
    model = torch.nn.Sequential(torch.nn.Linear(6, d))
    gen = torch.Generator().manual_seed(0)
    return ics.ICSMonitor(model, torch.randn(n, 6, generator=gen), layers=["0"])._capture()


def _measure(x: torch.Tensor, y: torch.Tensor, **config) -> dict[str, float]:
    """measure_step's values for the flatten view of one layer with outputs x -> y."""
    cap = _linear_capture(*x.shape)
    before = shift.StepCapture({"0": x}, cap.info)
    after = shift.StepCapture({"0": y}, cap.info)
    rows = shift.measure_step(0, before, after, shift.MeasureConfig(**config))
    return {r["quantity"]: r["value"] for r in rows if r.get("view") == "flatten"}


@pytest.mark.parametrize("step", [0.05, 0.1, 0.2])
def test_float32_cost_matrix_is_accurate_where_rows_nearly_coincide(step):
    # ||x_i - y_i||^2 is 1e-3..1e-2 of ||x_i||^2 + ||y_i||^2: the float32 expansion would
    # lose ~1e-4 there; the float32 threshold (0.1) recomputes those entries from the
    # differences, so every entry is within ~1e-7 of the float64 distance
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 64, generator=gen)
    y = x + step * torch.randn(48, 64, generator=gen)
    cost = distances._euclidean_cost(x, y)
    assert cost.dtype == torch.float32
    exact = torch.cdist(x.double(), y.double(), compute_mode="donot_use_mm_for_euclid_dist")
    assert float(((cost.double() - exact).abs() / exact).max()) < 1e-6


def _small_step_pair(d: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, d, generator=gen) * 2 + 0.5
    return x, x + 1e-3 * torch.randn(40, d, generator=gen)  # every diagonal entry "near"


def _axis_pair(d: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Column 0 spreads out 4x about its mean, the others barely move: a coordinate
    axis, not the mean gap or a random direction, gives L3."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, d, generator=gen)
    y = x + 0.01 * torch.randn(40, d, generator=gen)
    y[:, 0] = x[:, 0].mean() + 4 * (x[:, 0] - x[:, 0].mean())
    return x, y


@pytest.mark.parametrize("pair", [_small_step_pair, _axis_pair])
def test_float64_measure_step_equals_the_public_functions(pair):
    # the measured step reuses row norms, row differences (the cost matrix's diagonal,
    # U1/U2's distances, L3's per-column upper values) and keeps the cost matrix: none
    # of it may change a number of the float64 reference
    x, y = pair()
    config = {"methods": ("exact",), "precision": "float64"}
    got = _measure(x, y, **config)
    xd, yd = x.double(), y.double()
    assert got["exact"] == pytest.approx(ics.wasserstein(xd, yd, "exact"), rel=1e-12)
    n_proj = shift.MeasureConfig().n_projections
    reference = ics.bounds(xd, yd, n_projections=n_proj, seed=0)
    for q in ("L1", "L2", "L3", "U1", "U2"):
        assert got[q] == pytest.approx(reference[q], rel=1e-12), q
    # the unit of the relative values: the rms row norm of the sample before the step
    assert got[_vocab.SCALE] == pytest.approx(float(xd.square().sum(1).mean().sqrt()), rel=1e-12)
    # the cost matrix is kept for the monitor's intervals only, never in a user's log
    _, log = ics.wasserstein(xd, yd, "exact", log=True)
    assert "cost_matrix" not in log


def test_axis_pair_is_decided_by_the_coordinate_axis():
    # the premise of the test above: without the axis search L3 would be much lower
    x, y = (t.double() for t in _axis_pair())
    with_axes = ics.bounds(x, y, n_projections=128, seed=0)["L3"]
    without = ics.bounds(x, y, n_projections=128, seed=0, coordinate_axes=False)["L3"]
    assert with_axes > 1.5 * without


def test_float32_l3_is_never_below_l1():
    # y = x + c: the mean-gap direction's W1 is |c| = L1 exactly; in float32 the
    # projected sorting rounds it below L1 about one time in three, and L3 contains it
    cap = _linear_capture(64, 32)
    config = shift.MeasureConfig(methods=("exact",), precision="float32")
    below = 0
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(64, 32, generator=gen)
        y = x + 0.3 * torch.randn(32, generator=gen)
        rows = shift.measure_step(
            0, shift.StepCapture({"0": x}, cap.info), shift.StepCapture({"0": y}, cap.info), config
        )
        v = {r["quantity"]: r["value"] for r in rows}
        assert v["L3"] >= v["L1"], seed
        assert v["L3"] == pytest.approx(v["L1"], rel=1e-5)  # a translation: L3 = L1 = |c|
        gap = x.mean(0) - y.mean(0)
        along_gap = _sliced.projected_group([x], [y], (gap / gap.norm()).unsqueeze(0))[0]
        below += float(along_gap.max()) < v["L1"]
    assert below  # one of the seeds does round below (else this tests nothing)


def _u3_direct(xa, xb, weights, biases):
    """U3's terms (core, eps, gamma, beta) from the definitions, in float64 on the flat values."""
    n, channels = xa.shape[:2]
    a, b = xa.double().reshape(n, -1), xb.double().reshape(n, -1)
    d = a.shape[1]
    m2x, m2y = float(a.square().sum(1).mean()), float(b.square().sum(1).mean())
    d_eff = max(d, m2x, m2y)
    c = float((a * b).sum(1).mean())
    wa, wb = (w.double() for w in weights)
    ba, bb = (v.double() for v in biases)
    g = float(wa.abs().max())
    tight = g * math.sqrt(float((a - b).square().sum(1).mean()))  # the measured moments
    paper = g * math.sqrt(2 * (d_eff - c))  # sqrt(2 d'(1 - rho))
    # mean_i ||(g - g') * y_hat_i||^2, y_hat_i over (C, *spatial)
    per_value = (wa - wb).view(1, channels, *([1] * (xb.dim() - 2))) * xb.double()
    scale_change = math.sqrt(float(per_value.reshape(n, -1).square().sum(1).mean()))
    shift_change = math.sqrt((d // channels) * float((ba - bb).square().sum()))
    return tight, paper - tight, scale_change, shift_change


def test_float32_u3_terms_equal_the_direct_formula_when_second_moments_differ():
    # eval-mode-like normalized values: mean ||x_hat_i||^2 above d on one side and below
    # it on the other (d' = that side's, not d), per-channel spreads that differ between the two
    # sides, and gamma / beta changes: every input of the formula matters
    gen = torch.Generator().manual_seed(0)
    n, channels, h = 32, 4, 3
    spread_a = torch.tensor([1.3, 0.7, 1.1, 0.9]).view(1, channels, 1, 1)
    spread_b = torch.tensor([0.2, 1.5, 0.6, 1.0]).view(1, channels, 1, 1)
    xa = torch.randn(n, channels, h, h, generator=gen) * spread_a
    xb = 0.8 * xa + 0.5 * torch.randn(n, channels, h, h, generator=gen) * spread_b
    weights = (torch.tensor([1.0, 2.0, 0.5, 1.5]), torch.tensor([1.2, 1.0, 0.9, 1.1]))
    biases = (torch.zeros(channels), torch.tensor([0.1, 0.0, -0.2, 0.0]))
    d = channels * h * h
    m2 = [float(t.reshape(n, -1).square().sum(1).mean()) for t in (xa, xb)]
    assert m2[0] > d * 1.05 and m2[1] < d * 0.95  # the premise
    # and the reverse step, where d' = m2y
    for a, b, w, beta in ((xa, xb, weights, biases), (xb, xa, weights[::-1], biases[::-1])):
        direct = _u3_direct(a, b, w, beta)
        precise = bounding._u3_stored_terms(a, b, w, beta, precise=True)
        fast = bounding._u3_stored_terms(a, b, w, beta, precise=False)
        assert precise == pytest.approx(direct, rel=1e-12)
        assert fast == pytest.approx(direct, rel=1e-6)  # float32 row norms: ~1e-7


def test_float32_u3_eps_term_of_a_wide_layer_is_accurate():
    # a wide BatchNorm layer (64 channels of 56 x 56, ResNet-50's first stage) in train
    # mode: mean ||x_hat_i||^2 is d (1 - ~1e-6), so U3's eps part 2 d' - m2x - m2y is a
    # difference of near-equal sums: the float32 norms it is summed from must be of
    # short pieces (16 values); of whole rows or whole channels they are not enough
    gen = torch.Generator().manual_seed(1)
    n, channels, side = 16, 64, 56

    def normalized(x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        return ((x - mean) / torch.sqrt(var + 1e-5)).float()

    x = torch.randn(n, channels, side, side, generator=gen, dtype=torch.float64) * 3 + 1
    xa = normalized(x)
    xb = normalized(x + 0.01 * torch.randn(x.shape, generator=gen, dtype=torch.float64))
    none = (None, None)
    precise = bounding._u3_stored_terms(xa, xb, none, none, precise=True)
    fast = bounding._u3_stored_terms(xa, xb, none, none, precise=False)
    assert precise[1] > 0
    assert fast[1] == pytest.approx(precise[1], rel=1e-3)  # the eps term, of itself
    assert fast[0] == pytest.approx(precise[0], rel=1e-5)  # the core: float32 row norms

    def eps_part_from(piece: int) -> float:  # float32 norms of pieces of `piece` values
        def m2(t: torch.Tensor) -> float:
            norms = torch.linalg.vector_norm(t.reshape(n, -1, piece), dim=2)
            return float(norms.double().square().sum()) / n

        gap = float((xa.double() - xb.double()).square().sum()) / n
        return bounding._u3_split(m2(xa), m2(xb), gap, channels * side * side)[1]

    error = {p: abs(eps_part_from(p) / precise[1] - 1) for p in (16, side * side, xa[0].numel())}
    assert error[16] < 1e-3 < error[side * side] < error[xa[0].numel()]  # pieces, channel, row
    assert error[xa[0].numel()] > 0.5  # one norm per row: the eps part more than half off


def _bn_steps(precision: str) -> tuple[shift.StepCapture, shift.StepCapture]:
    from ics_toolkit.models import SmallCNN

    model = SmallCNN(3, 10, width=4, norm="batch", seed=0)
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(16, 3, 8, 8, generator=gen)
    monitor = ics.ICSMonitor(model, probe, precision=precision)
    before = monitor._capture()
    with torch.no_grad():  # a step: every BatchNorm's gamma and beta move
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return before, monitor._capture()


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_measured_u3_equals_the_float64_formula_on_the_same_snapshots(precision):
    # float64 is the reference the float32 error is stated against: its U3 must be the
    # float64 formula to rounding; float32's within FLOAT32_ERROR_U3 of it
    before, after = _bn_steps(precision)
    config = shift.MeasureConfig(methods=("exact",), precision=precision)
    rows = shift.measure_step(0, before, after, config)
    rel = 1e-10 if precision == "float64" else _vocab.FLOAT32_ERROR_U3
    for key, a in before.norms.items():
        got = next(r["value"] for r in rows if r["layer"] == key and r["quantity"] == "U3")
        reference = bounding._u3(*norm_pair(a, after.norms[key], "flatten", {}))
        assert got == pytest.approx(reference, rel=rel), key


def test_float32_safe_row_norm_range():
    # documented range (measure_step's Notes): the largest row norm of both sides within
    # [1e-15, 1e15] and finite, else float64
    def safe(x_norms, y_norms):
        return shift._float32_safe(torch.tensor(x_norms), torch.tensor(y_norms))

    assert safe([1e-14, 0.0], [0.0, 0.0]) and safe([1e14, 1.0], [1.0, 1.0])
    assert safe([1e-10], [1e-12]) and safe([1e10], [1e12])  # ordinary scales stay float32
    assert not safe([1e-16, 0.0], [1e-17, 0.0])  # all tiny: squares underflow
    assert not safe([0.0], [0.0])  # a layer of zeros
    assert not safe([1.0, 1.0], [1.0, 1e16])  # one large row, on the after side
    assert not safe([1e16, 1.0], [1.0, 1.0])  # ... or on the before side
    assert not safe([1.0], [math.inf]) and not safe([math.nan], [1.0])


@pytest.mark.parametrize("scales", [(1e-20, 1e-20), (1.0, 1e17), (1e17, 1.0)])
def test_layers_float32_cannot_square_give_the_float64_numbers(scales):
    # tiny outputs (squares in float32's subnormal range) and one side large: analysed
    # in float64, so the float32 analysis gives the float64 numbers (in float32 they
    # would be off by 100 % or infinite)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=gen)
    y = 1.01 * x + 0.1 * torch.randn(40, 8, generator=gen)
    x, y = scales[0] * x, scales[1] * y
    f32 = _measure(x, y, methods=("exact", "sliced"), precision="float32")
    f64 = _measure(x, y, methods=("exact", "sliced"), precision="float64")
    assert f64["exact"] > 0
    for quantity, value in f64.items():
        if isinstance(value, float) and math.isfinite(value):
            assert f32[quantity] == pytest.approx(value, rel=1e-12), quantity


def test_paired_means_come_from_the_cost_diagonal_not_the_nearest_point():
    # a translation larger than the spacing of the points: the identity plan is optimal
    # but most rows' nearest point after the step is another row's
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(48, 2, generator=gen, dtype=torch.float64)
    y = x + torch.tensor([0.3, 0.0], dtype=torch.float64)
    config = shift.MeasureConfig(methods=("exact",))
    value, log = distances._kernel("exact", x, y, config.options["exact"], 0, 0, keep_cost=True)
    assert log["identity_share"] >= 1 - uncertainty.IDENTITY_TOL
    cost = log["cost_matrix"]
    assert (cost.argmin(axis=1) != np.arange(48)).mean() > 0.5  # the premise
    got = uncertainty.interval(
        "exact", x, y, {**log, "value": value}, diagnostics._solver(config), 0.95, 400, 0
    )
    want = uncertainty.paired_interval((x - y).norm(dim=1), 0.95, 400, 0)
    assert got[2] == "paired means"
    assert got[:2] == pytest.approx(want, rel=1e-12)


def test_a_resample_the_solver_cannot_finish_gives_no_interval():
    # resamples solved on the cost matrix's submatrices must fail like solves on the
    # samples do: an unfinished network simplex is not a W1, so no interval
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(30, 3, generator=gen, dtype=torch.float64) + 1.0
    config = shift.MeasureConfig(methods=("exact",), method_options={"exact": {"numItermax": 3}})
    cost = distances._euclidean_cost(x, y).numpy()
    with pytest.raises(SolverError, match="stopped before optimality"):
        diagnostics._cost_solver(config)(cost)
    with pytest.raises(SolverError, match="stopped before optimality"):
        distances._solve_cost(cost, {"numItermax": 3, "on_failure": "raise"})
    logs = {"exact": {"identity_share": 0.0, "cost_matrix": cost}}
    estimate = {"quantity": "exact", "value": 1.0, "kind": "estimate"}
    out = diagnostics.step_rows(x, y, [estimate], logs, config)
    limits = [r for r in out if r["kind"] == "interval"]
    assert len(limits) == 2
    for row in limits:
        assert math.isnan(row["value"]) and "no interval" in row["warning"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_batchnorm_hat_keeps_the_storage_dtype(dtype):
    # the float32 analysis' fused kernel: statistics in float32, the values stored in
    # the capture's dtype like the reference path's
    bn = torch.nn.BatchNorm2d(3).eval()
    bn.running_mean.fill_(0.2)
    bn.running_var.fill_(1.5)
    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    for training in (True, False):
        fast = batchnorm_hat(bn, x, training=training, fast=True)
        plain = batchnorm_hat(bn, x, training=training)
        assert fast.dtype == plain.dtype == dtype
        torch.testing.assert_close(fast.float(), plain.float(), rtol=1e-2, atol=1e-2)
