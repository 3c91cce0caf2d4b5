"""U3 in both forms: the paper's (d' = max(d, m2)) and U3_tight (the measured moments).

docs/theory.md, section 3: ``U3_tight = max|g| sqrt(m2(x_hat) + m2(y_hat) - 2c)`` plus the
gamma- and beta-change terms bounds W1 for any rows x_hat, y_hat with outputs
``g * x_hat + b``; ``U3 - U3_tight = U3_eps = max|g| e / (sqrt(e + r^2) + r)`` with
``e = 2 d' - m2(x_hat) - m2(y_hat)``. Every term is checked against a closed form and in a
case where it alone is active, through the public API and the monitor's stored-values path.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ics_toolkit as ics
from ics_toolkit import _vocab, bounding
from ics_toolkit._norm_snapshot import norm_pair, norm_snapshot
from ics_toolkit.bound_terms import bound_terms
from ics_toolkit.bounding import RTOL, NormState, check_order
from ics_toolkit.views import view

U3_TERMS = _vocab.BOUND_TERMS["U3"]


def _hat(t, eps):
    """Train-mode BatchNorm's x_hat of (n, d) features (batch mean, biased variance)."""
    return (t - t.mean(0)) / torch.sqrt(t.var(0, unbiased=False) + eps)


def _issue_case(eps=1e-5, n=512, d=256, step=1e-3, seed=0):
    """Issue #15's layer: channel variances log-spaced 1e-7..1, eps 1e-5, a small step."""
    gen = torch.Generator().manual_seed(seed)
    var = torch.logspace(-7, 0, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * var.sqrt()
    y = x + step * var.sqrt() * torch.randn(n, d, generator=gen, dtype=torch.float64)
    bn = torch.nn.BatchNorm1d(d, eps=eps).double().train()
    with torch.no_grad():  # the layer's own outputs (gamma = 1, beta = 0)
        u, v = bn(x), bn(y)
    return x, y, u, v


def _paper_u3(x_hat, y_hat, g1, g2, b1, b2):
    """The paper's U3 from its definition: max|g| sqrt(2 d'(1 - rho)) + affine changes."""
    d = x_hat.shape[1]
    m2x, m2y = (float(t.square().sum(1).mean()) for t in (x_hat, y_hat))
    d_eff = max(d, m2x, m2y)
    rho = float((x_hat * y_hat).sum(1).mean()) / d_eff
    g = float(g1.abs().max())
    gamma = math.sqrt(float(((g1 - g2) * y_hat).square().sum(1).mean()))
    beta = float((b1 - b2).norm())
    return g * math.sqrt(2 * d_eff * (1 - rho)) + gamma + beta


def _tight_u3(x_hat, y_hat, g1, g2, b1, b2):
    """U3_tight from its definition: the RMS gap of the normalized values + affine changes."""
    g = float(g1.abs().max())
    rms = math.sqrt(float((x_hat - y_hat).square().sum(1).mean()))
    gamma = math.sqrt(float(((g1 - g2) * y_hat).square().sum(1).mean()))
    return g * rms + gamma + float((b1 - b2).norm())


# ---------------------------------------------------------------- the issue's case


def test_issue_case_u3_tight_is_u2_while_u3_is_eps():
    eps = 1e-5
    x, y, u, v = _issue_case(eps)
    b = ics.bounds(u, v, before=NormState(_hat(x, eps), eps=eps), after=NormState(_hat(y, eps)))
    exact = ics.wasserstein(u, v, "exact")
    # measured: exact 0.01348, U2 0.01349, U3_tight 0.01349, U3 12.13
    assert b["U3_tight"] == pytest.approx(b["U2"], rel=0.03)
    assert exact <= b["U3_tight"] * (1 + RTOL)
    assert exact <= b["U3"] and b["U3"] > 500 * b["U3_tight"]
    assert b["U3"] == pytest.approx(12.13, rel=0.01) and exact == pytest.approx(0.01348, rel=0.01)
    # the eps part is U3 but for the step: U3 - U3_tight
    xs, ys = _hat(x, eps), _hat(y, eps)
    ones, zeros = torch.ones(256, dtype=torch.float64), torch.zeros(256, dtype=torch.float64)
    assert b["U3"] == pytest.approx(_paper_u3(xs, ys, ones, ones, zeros, zeros), rel=1e-9)
    # e = sum_j eps / (var_j + eps) over both sides (train mode: m2 = sum_j var_j / (var_j + eps))
    var_x, var_y = x.var(0, unbiased=False), y.var(0, unbiased=False)
    e = float((eps / (var_x + eps)).sum() + (eps / (var_y + eps)).sum())
    r = math.sqrt(float((xs - ys).square().sum(1).mean()))
    assert b["U3"] - b["U3_tight"] == pytest.approx(e / (math.sqrt(e + r * r) + r), rel=1e-6)


def test_issue_case_through_the_monitors_stored_values_path():
    eps = 1e-5
    x, y, _, _ = _issue_case(eps)
    xs, ys = _hat(x, eps), _hat(y, eps)
    none = (None, None)
    for values, precise, rel in ((xs, True, 1e-10), (xs.float(), False, 1e-4)):
        other = ys if precise else ys.float()
        terms = bounding._u3_stored_terms(values, other, none, none, precise=precise)
        want = bound_terms(*_states(xs, ys))
        assert terms == pytest.approx([want[t] for t in U3_TERMS], rel=rel, abs=1e-12)
        assert bounding._u3_tight(terms) == pytest.approx(terms[0])  # no affine change


def _states(x_hat, y_hat, g=(None, None), b=(None, None), eps=0.0):
    """Prepared (float64) states of a BatchNorm pair, as the bound kernel gets them."""
    before = NormState(x_hat=x_hat, weight=g[0], bias=b[0], eps=eps)
    after = NormState(x_hat=y_hat, weight=g[1], bias=b[1], eps=eps)
    n, d = x_hat.shape
    return bounding._prepare(before, after, n, d, torch.zeros(1, dtype=torch.float64))


# ---------------------------------------------------------------- randomized validity


def _bn_step(seed: int, mode: str, eps: float):
    """A BatchNorm2d layer before and after a step: input, gamma, beta and statistics move.

    Channel variances span 1e-8..1 and channel 0 is dead (constant), as after a ReLU.
    Returns the outputs and the monitor's snapshots of both sides.
    """
    gen = torch.Generator().manual_seed(seed)
    n, channels, h = 12, 5, 3
    std = torch.logspace(-4, 0, channels, dtype=torch.float64)[
        torch.randperm(channels, generator=gen)
    ]
    std[0] = 0.0
    x = torch.randn(n, channels, h, h, generator=gen, dtype=torch.float64) * std.view(1, -1, 1, 1)
    step = 10.0 ** float(torch.empty(()).uniform_(-4, 0, generator=gen))
    y = x + step * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    layer = torch.nn.BatchNorm2d(channels, eps=eps).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
        layer.running_mean.copy_(0.1 * torch.randn(channels, generator=gen, dtype=torch.float64))
        layer.running_var.copy_(
            (std.square() + 1e-8) * torch.empty(channels).uniform_(0.5, 2, generator=gen)
        )
    moved = copy.deepcopy(layer)
    with torch.no_grad():  # the affine parameters (and running statistics) change too
        scale = float(torch.empty(()).uniform_(0, 0.3, generator=gen))
        moved.weight.add_(scale * torch.randn(channels, generator=gen, dtype=torch.float64))
        moved.bias.add_(scale * torch.randn(channels, generator=gen, dtype=torch.float64))
        moved.running_var.mul_(1.1)
    train = mode == "train"
    snaps = [norm_snapshot(m, t, training=train) for m, t in ((layer, x), (moved, y))]
    with torch.no_grad():
        outs = [m.train(train)(t) for m, t in ((layer, x), (moved, y))]
    return outs, snaps


@given(
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["train", "eval"]),
    eps=st.sampled_from([0.0, 1e-5, 1e-3]),
)
def test_u3_tight_bounds_w1_on_random_steps_in_every_mode_and_view(seed, mode, eps):
    if eps == 0.0 and mode == "train":
        eps = 1e-12  # a dead channel has zero variance: BatchNorm needs some eps
    (u, v), (a, b) = _bn_step(seed, mode, eps)
    for name, opts in (("flatten", {}), ("pixel", {}), ("pixel", {"max_samples": 40, "seed": 1})):
        sa, sb = norm_pair(a, b, name, opts)
        xu, xv = view(u, name, (0, 1), **opts), view(v, name, (0, 1), **opts)
        got = ics.bounds(
            xu,
            xv,
            before=NormState(x_hat=sa.x_hat, weight=sa.weight, bias=sa.bias, eps=eps),
            after=NormState(x_hat=sb.x_hat, weight=sb.weight, bias=sb.bias, eps=eps),
            n_projections=0,
        )
        exact = ics.wasserstein(xu, xv, "exact")
        scale = float(max(xu.abs().max(), xv.abs().max()))
        check = check_order(
            {"exact": exact, "U3_tight": got["U3_tight"], "U3": got["U3"]}, scale=scale
        )
        assert check.holds, (name, check.violations)
        assert got["U3_tight"] <= got["U3"]  # by construction, not within a tolerance
        args = (sa.x_hat, sb.x_hat, sa.weight, sb.weight, sa.bias, sb.bias)
        assert got["U3"] == pytest.approx(_paper_u3(*args), rel=1e-9, abs=1e-12)
        assert got["U3_tight"] == pytest.approx(_tight_u3(*args), rel=1e-9, abs=1e-12)
        terms = bound_terms(sa, sb)
        for bound in ("U3", "U3_tight"):
            total = sum(terms[t] for t in _vocab.BOUND_TERMS[bound])
            assert total == pytest.approx(got[bound], rel=1e-12, abs=1e-15)
        assert got["U3"] - got["U3_tight"] == pytest.approx(terms["U3_eps"], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("precise", [True, False])
def test_stored_values_path_equals_the_public_bounds(mode, precise):
    # the monitor's flatten path (float64 row blocks, or float32 row norms) against bounds()
    _, (a, b) = _bn_step(3, mode, 1e-5)
    sa, sb = norm_pair(a, b, "flatten", {})
    public = bounding._norm_bounds(sa, sb)
    dtype = torch.float64 if precise else torch.float32
    xa, xb = a.x_hat.to(dtype), b.x_hat.to(dtype)
    kept = xa.clone(), xb.clone()
    terms = bounding._u3_stored_terms(xa, xb, (a.weight, b.weight), (a.bias, b.bias), precise)
    assert torch.equal(xa, kept[0]) and torch.equal(xb, kept[1])  # inputs left as they were
    want = bound_terms(sa, sb)
    rel = 1e-10 if precise else _vocab.FLOAT32_ERROR
    for name, value in zip(U3_TERMS, terms, strict=True):
        limit = _vocab.FLOAT32_ERROR_U3 * public["U3"] if name == "U3_eps" and not precise else 0
        assert abs(value - want[name]) <= rel * want[name] + limit + 1e-12, name
    assert sum(terms) == pytest.approx(public["U3"], rel=1e-10 if precise else 1e-3)
    assert bounding._u3_tight(terms) == pytest.approx(public["U3_tight"], rel=rel)


# ---------------------------------------------------------------- each term alone


def _alone(term: str):
    """Rows where only ``term`` of U3_tight is active, and the exact W1 in closed form."""
    gen = torch.Generator().manual_seed(11)
    n, d = 16, 6
    x_hat = _hat(torch.randn(n, d, generator=gen, dtype=torch.float64), 0.0)
    y_hat, g1, b1 = x_hat.clone(), torch.full((d,), 2.0, dtype=torch.float64), torch.zeros(d)
    g2, b2 = g1.clone(), b1.clone()
    if term == "U3_core":  # gamma held and constant: u - v = 2 (x_hat - y_hat)
        y_hat = _hat(x_hat + 0.05 * torch.randn(n, d, generator=gen, dtype=torch.float64), 0.0)
    elif term == "U3_gamma":  # x_hat held: u - v = (g - g') x_hat
        g2 = g1 + torch.linspace(-0.5, 0.5, d, dtype=torch.float64)
    else:  # a translation: W1 = ||b - b'||
        b2 = b1 + torch.linspace(-1.0, 2.0, d, dtype=torch.float64)
    u, v = g1 * x_hat + b1, g2 * y_hat + b2
    return u, v, (x_hat, y_hat), (g1, g2), (b1, b2)


@pytest.mark.parametrize("term", ["U3_core", "U3_gamma", "U3_beta"])
def test_each_term_of_u3_tight_alone_bounds_the_exact_w1(term):
    u, v, (x_hat, y_hat), g, b = _alone(term)
    got = ics.bounds(
        u,
        v,
        before=NormState(x_hat=x_hat, weight=g[0], bias=b[0]),
        after=NormState(x_hat=y_hat, weight=g[1], bias=b[1]),
    )
    exact = ics.wasserstein(u, v, "exact")
    terms = bound_terms(*_states(x_hat, y_hat, g, b))
    assert terms[term] > 0.1 and exact > 0.1  # the term is active, and it carries W1
    others = [t for t in _vocab.BOUND_TERMS["U3_tight"] if t != term]
    assert all(terms[t] < 1e-12 for t in others)
    assert terms["U3_eps"] < 1e-6 * terms[term]  # eps = 0, train-mode moments: m2 = d
    assert exact <= got["U3_tight"] * (1 + RTOL)
    # the closed forms: the RMS paired distance (core, gamma) or the translation (beta)
    rms = math.sqrt(float((u - v).square().sum(1).mean()))
    assert got["U3_tight"] == pytest.approx(rms, rel=1e-12)
    if term == "U3_beta":
        assert exact == pytest.approx(got["U3_tight"], rel=1e-9)  # tight
    # and the monitor's path, both precisions
    for precise in (True, False):
        dtype = torch.float64 if precise else torch.float32
        stored = bounding._u3_stored_terms(
            x_hat.to(dtype).reshape(16, 6, 1), y_hat.to(dtype).reshape(16, 6, 1), g, b, precise
        )
        assert exact <= bounding._u3_tight(stored) * (1 + _vocab.FLOAT32_RTOL), precise
        assert bounding._u3_tight(stored) == pytest.approx(rms, rel=1e-6)


def test_the_eps_term_closed_form_in_train_mode():
    # train mode: m2 = sum_j var_j / (var_j + eps), so 2d - m2x - m2y = sum_j eps / (var_j + eps)
    # over both sides, and U3_eps = max|g| e / (sqrt(e + r^2) + r)
    gen = torch.Generator().manual_seed(2)
    n, d, eps = 64, 8, 1e-2
    std = torch.logspace(-2, 0.5, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * std
    y = x + 0.01 * torch.randn(n, d, generator=gen, dtype=torch.float64) * std
    xs, ys = _hat(x, eps), _hat(y, eps)
    g = torch.linspace(0.5, 3.0, d, dtype=torch.float64)
    terms = bound_terms(*_states(xs, ys, (g, g)))
    e = float((eps / (x.var(0, unbiased=False) + eps)).sum())
    e += float((eps / (y.var(0, unbiased=False) + eps)).sum())
    r = math.sqrt(float((xs - ys).square().sum(1).mean()))
    assert terms["U3_eps"] == pytest.approx(3.0 * e / (math.sqrt(e + r * r) + r), rel=1e-9)
    assert terms["U3_core"] == pytest.approx(3.0 * r, rel=1e-12)
    assert terms["U3_eps"] > 10 * terms["U3_core"]  # the premise: eps sets U3 here


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_the_eps_term_vanishes_without_eps_and_is_tiny_for_large_variances(eps):
    gen = torch.Generator().manual_seed(4)
    n, d = 64, 32
    x = 3.0 * torch.randn(n, d, generator=gen, dtype=torch.float64)  # variances ~ 9
    y = x + 0.1 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    terms = bound_terms(*_states(_hat(x, eps), _hat(y, eps)))
    bound = sum(terms.values())
    if eps == 0.0:  # m2 = d exactly, up to rounding
        assert terms["U3_eps"] <= 1e-6 * bound
    else:  # e = sum eps / (var + eps) ~ 2 * 32 * 1e-5 / 9: a small share of U3
        assert 0 < terms["U3_eps"] <= 1e-3 * bound


def test_eval_mode_eps_term_holds_the_gap_of_the_second_moments():
    # eval mode: m2(x_hat) = 1.5 d, m2(y_hat) = 0.5 d: d' = m2x and e = m2x - m2y = d
    gen = torch.Generator().manual_seed(6)
    n, d = 40, 10
    z = _hat(torch.randn(n, d, generator=gen, dtype=torch.float64), 0.0)
    x_hat, y_hat = math.sqrt(1.5) * z, math.sqrt(0.5) * z
    terms = bound_terms(*_states(x_hat, y_hat))
    r = math.sqrt(float((x_hat - y_hat).square().sum(1).mean()))
    e = 1.5 * d - 0.5 * d
    assert terms["U3_eps"] == pytest.approx(e / (math.sqrt(e + r * r) + r), rel=1e-9)


# ---------------------------------------------------------------- the monitor


def test_monitor_reports_u3_tight_rows_and_they_hold():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 3),
    )
    probe = torch.randn(24, 3, 8, 8, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = ics.ICSMonitor(
        model, probe, every=1, methods=("exact",), views=("flatten", "pixel"), max_pixel_samples=64
    )
    with monitor.attach(opt):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 3, 8, 8, generator=gen)).square().mean().backward()
            opt.step()
    df = monitor.results()
    bn = df[df.layer.isin(["1", "4"])]
    wide = bn.pivot_table(index=["step", "layer", "view"], columns="quantity", values="value")
    assert len(wide) == 3 * 2 * 2  # steps x layers x views
    assert wide[["U3", "U3_tight", *U3_TERMS]].notna().all().all()
    assert (wide["U3_tight"] <= wide["U3"]).all()
    assert (wide["exact"] <= wide["U3_tight"] * (1 + _vocab.FLOAT32_RTOL)).all()
    for bound in ("U3", "U3_tight"):
        total = wide[list(_vocab.BOUND_TERMS[bound])].sum(axis=1)
        np.testing.assert_allclose(total, wide[bound], rtol=1e-12)
    kinds = dict(zip(bn.quantity, bn.kind, strict=False))
    assert kinds["U3_tight"] == "upper" and kinds["U3_eps"] == "term"
    assert bn.bounds_hold.all()
    text = ics.report.summary_markdown(df)
    assert "U3_tight" in text and "U3 (paper) / ICS" in text


# ---------------------------------------------------------------- report and plots


def _bn_unit_table():
    """BatchNorm rows whose U3 is set by eps, Unitization rows with U5, two batch sizes."""
    rows = []
    for run in ("batch-8", "batch-64", "unit-8", "unit-64"):
        for step in (0, 1):
            vals = {"exact": 1.0, "scale": 10.0}
            if run.startswith("batch"):
                terms = {"U3_core": 1.5, "U3_eps": 40.0, "U3_gamma": 0.2, "U3_beta": 0.1}
                vals |= terms
                vals["U3"] = sum(terms.values())
                vals["U3_tight"] = vals["U3"] - terms["U3_eps"]
            else:
                vals["U5"] = 4.0
            rows += [
                {
                    "run": run,
                    "step": step,
                    "layer": "n1",
                    "view": "flatten",
                    "quantity": q,
                    "value": v,
                    "kind": _vocab.quantity_kind(q),
                }
                for q, v in vals.items()
            ]
    import pandas as pd

    design = pd.DataFrame(
        {
            "run": ["batch-8", "batch-64", "unit-8", "unit-64"],
            "variant": ["batch", "batch", "unitization", "unitization"],
            "seed": 0,
            "batch_size": [8, 64, 8, 64],
        }
    )
    return pd.DataFrame(rows), design


def test_summary_shows_u3_tight_as_the_norm_bound_and_what_sets_the_papers_u3():
    df, _ = _bn_unit_table()
    table = ics.report.summary(df)
    bn = table[table.run == "batch-8"].iloc[0]
    assert bn.norm_bound_name == "U3_tight" and bn.norm_bound == pytest.approx(1.8)
    text = ics.report.summary_markdown(df)
    lines = [line for line in text.splitlines() if line.startswith("| n1 |")]
    header = next(line for line in text.splitlines() if line.startswith("| layer |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    row = [c.strip() for c in lines[0].strip("|").split("|")]
    assert row[cells.index("norm bound")] == "1.8 (U3_tight)"
    assert row[cells.index("norm bound / ICS")] == "1.8 (U3_core 83 %, correlation)"
    assert row[cells.index("U3 (paper) / ICS")] == "41.8 (U3_eps 96 %, eps)"


def test_batch_sweep_plot_compares_u3_tight_with_u5():
    import matplotlib

    matplotlib.use("Agg")
    from ics_toolkit.plots import plot_batch_sweep

    df, design = _bn_unit_table()
    fig = plot_batch_sweep(df, design)
    bound_panel = fig.axes[1]
    assert "U3_tight" in bound_panel.get_title()
    ys = sorted(float(y) for c in bound_panel.containers for y in c.lines[0].get_ydata())
    # relative bounds: U5 / scale = 0.4 and U3_tight / scale = 0.18 (not U3 / scale = 4.18)
    assert ys == pytest.approx([0.18, 0.18, 0.4, 0.4])


def test_the_order_check_includes_u3_tight():
    assert "U3_tight" in bounding.UPPER_BOUNDS and "U3_tight" in _vocab.NORM_BOUNDS
    assert check_order({"exact": 1.0, "U3_tight": 1.0 - 1e-7, "U3": 5.0}).holds  # tolerance
    bad = check_order({"exact": 1.0, "U3_tight": 0.99, "U3": 5.0})
    assert bad.violations == ("exact = 1 > U3_tight = 0.99",)
