"""Summary tables: bound_band, summary, summary_markdown, markdown_table, fit_slopes."""

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit.bounding import LOWER_BOUNDS, RTOL, UPPER_BOUNDS
from ics_toolkit.errors import ICSValueError
from ics_toolkit.report import (
    bound_band,
    fit_slopes,
    markdown_table,
    order_layers,
    order_runs,
    summary,
    summary_markdown,
)

LAYERS = ["features.1", "features.4", "features.11"]  # model order, not sorted order


def _table(runs=("batch", "none"), steps=(0, 5, 10), seed=0):
    """A hand-made tidy table; values are random but consistent with the bound order."""
    rng = np.random.default_rng(seed)
    rows = []
    for run in runs:
        for step in steps:
            for layer in LAYERS:
                exact = float(rng.uniform(0.5, 2.0))
                vals = {
                    "exact": exact,
                    "sliced": exact * 0.1,
                    "max_sliced": exact * 0.2,
                    "L1": exact * float(rng.uniform(0.3, 0.9)),
                    "L2": exact * 0.05,
                    "L3": exact * float(rng.uniform(0.3, 0.9)),
                    "U1": exact * float(rng.uniform(1.0, 1.2)),
                    "U2": exact * 1.3,
                    "floor_exact": float(rng.uniform(0.5, 3.0)),
                    "drift_var": float(rng.uniform()),
                }
                if run == "batch":
                    vals["U3"] = exact * float(rng.uniform(1.1, 3.0))
                for q, v in vals.items():
                    rows.append(
                        {
                            "run": run,
                            "step": step,
                            "layer": layer,
                            "view": "flatten",
                            "quantity": q,
                            "value": v,
                            "kind": "floor" if q.startswith("floor") else "estimate",
                            "dim": 64,
                            "bounds_hold": not (run == "none" and step == 5 and layer == LAYERS[0]),
                        }
                    )
        rows.append({"run": run, "step": 0, "quantity": "measure_time_s", "value": 0.1,
                     "kind": "event"})  # fmt: skip
    return pd.DataFrame(rows)


def test_bound_band_matches_a_hand_computation():
    df = _table()
    band = bound_band(df)
    assert len(band) == 2 * 3 * len(LAYERS)  # events dropped
    assert order_layers(band["layer"]) == LAYERS
    for _, row in band.iterrows():
        sel = df[(df.run == row.run) & (df.step == row.step) & (df.layer == row.layer)]
        vals = dict(zip(sel.quantity, sel.value, strict=True))
        lows = {q: v for q, v in vals.items() if q in LOWER_BOUNDS}
        highs = {q: v for q, v in vals.items() if q in UPPER_BOUNDS}
        assert row.value == vals["exact"]
        assert row.best_lower == max(lows.values())
        assert row.best_lower_name == max(lows, key=lows.get)
        assert row.best_upper == min(highs.values())
        assert row.best_upper_name == min(highs, key=highs.get)
        assert row.floor == vals["floor_exact"]
        assert (row.norm_bound == vals["U3"]) if "U3" in vals else math.isnan(row.norm_bound)
        assert bool(row.bounds_hold) == bool(sel.bounds_hold.all())


def test_bound_band_excludes_the_estimate_itself():
    df = _table(runs=("batch",), steps=(0,))
    band = bound_band(df, quantity="max_sliced")
    # max_sliced is a lower bound of W1 but must not be its own best lower bound
    assert "max_sliced" not in set(band.best_lower_name)
    assert np.allclose(band.value, df[df.quantity == "max_sliced"].value)


def test_summary_means_and_tightness_match_pandas_reference():
    df = _table()
    s = summary(df)
    assert list(s.run.unique()) == ["batch", "none"]
    assert list(s[s.run == "batch"].layer) == LAYERS
    for _, row in s.iterrows():
        sel = df[(df.run == row.run) & (df.layer == row.layer)]
        wide = sel.pivot_table(index="step", columns="quantity", values="value")
        ups = wide[[c for c in wide.columns if c in UPPER_BOUNDS]].min(axis=1)
        lows = wide[[c for c in wide.columns if c in LOWER_BOUNDS]].max(axis=1)
        assert row.n_steps == 3 and row.dim == 64
        assert row.ics == pytest.approx(wide["exact"].mean())
        assert row.ics_max == pytest.approx(wide["exact"].max())
        assert row.ics_last == pytest.approx(wide["exact"].loc[10])
        assert row.upper_tightness == pytest.approx((wide["exact"] / ups).mean())
        assert row.lower_tightness == pytest.approx((lows / wide["exact"]).mean())
        assert row.frac_above_floor == pytest.approx((wide["exact"] > wide["floor_exact"]).mean())
        assert row.mean_drift_var == pytest.approx(wide["drift_var"].mean())
        if row.run == "batch":
            assert row.norm_tightness == pytest.approx((wide["exact"] / wide["U3"]).mean())
        else:
            assert math.isnan(row.norm_tightness)
    bad = s[(s.run == "none") & (s.layer == LAYERS[0])].iloc[0]
    assert bad.bounds_hold_frac == pytest.approx(2 / 3) and bad.n_violations == 1


def test_summary_of_a_real_monitor_run_respects_the_theory():
    """On real measurements: exact <= best upper and best lower <= exact (tightness <= 1)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        x = torch.randn(64, 6)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        mon = ics.ICSMonitor(model, x[:32], every=1, run="bn")
        mon.attach(opt)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        mon.detach()
    df = mon.results()
    s = summary(df).iloc[0]
    exact = df[(df.quantity == "exact")].value
    assert s.ics == pytest.approx(exact.mean())
    assert s.upper_tightness <= 1 + RTOL
    assert s.lower_tightness <= 1 + RTOL
    # BatchNorm's norm bound is the tight form (the smallest), the paper's U3 beside it
    assert s.norm_bound_name == "U3_tight" and s.norm_tightness <= 1 + RTOL
    assert s.norm_bound == pytest.approx(s.mean_U3_tight) and s.mean_U3_tight <= s.mean_U3
    assert s.bounds_hold_frac == 1.0 and s.n_steps == 3


def test_summary_picks_the_first_estimator_present():
    df = _table(runs=("batch",))
    s = summary(df[df.quantity != "exact"])
    assert set(s.quantity) == {"max_sliced"}


def test_missing_columns_are_named():
    with pytest.raises(ICSValueError, match=r"lacks the column\(s\) \['layer', 'view'\]"):
        summary(pd.DataFrame({"step": [0], "quantity": ["exact"], "value": [1.0]}))
    with pytest.raises(ICSValueError, match="must be a pandas DataFrame"):
        bound_band({"step": [0]})
    with pytest.raises(ICSValueError, match="no measurement rows"):
        summary(_table().iloc[0:0])


def _tables(text):
    """Markdown tables of ``text`` as lists of cell lists (header first)."""
    blocks, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            cur.append(cells)
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return blocks


def test_summary_markdown_has_a_table_per_variant_and_well_formed_rows():
    df = _table()
    text = summary_markdown(df, {"batch": 0.987, "none": float("nan")}, notes=["settings line"])
    assert text.startswith("# ICS summary\n") and "settings line" in text
    assert "## batch" in text and "## none" in text
    assert "Final test accuracy: 98.7 %" in text and "Final test accuracy: diverged" in text
    tables = _tables(text)
    assert len(tables) == 3  # overview + one per variant
    for t in tables:
        assert all(len(r) == len(t[0]) for r in t)  # every row has the header's cell count
    overview = tables[0]
    assert [r[0] for r in overview[2:]] == ["batch", "none"]
    batch = tables[1]
    assert [r[0] for r in batch[2:]] == LAYERS
    # the ICS column shows the mean exact value with 4 significant digits
    ref = df[(df.run == "batch") & (df.layer == LAYERS[1]) & (df.quantity == "exact")].value.mean()
    assert batch[3][batch[0].index("ICS (exact)")] == f"{ref:.4g}"
    assert "(U3)" in batch[3][batch[0].index("norm bound")]


def test_summary_markdown_unknown_view():
    with pytest.raises(ICSValueError, match=r"no rows with view='pixel'.*\['flatten'\]"):
        summary_markdown(_table(), view="pixel")


def test_markdown_table_escapes_and_checks():
    text = markdown_table(["a", "b"], [["x|y", 1.23456789], ["z", None]], align="lc")
    lines = text.splitlines()
    assert lines[1] == "| :--- | :---: |"
    assert lines[2] == "| x\\|y | 1.235 |"
    assert lines[3] == "| z | – |"
    with pytest.raises(ICSValueError, match="one letter per column"):
        markdown_table(["a", "b"], [], align="l")
    with pytest.raises(ICSValueError, match="letters must be l, r or c"):
        markdown_table(["a"], [], align="x")
    with pytest.raises(ICSValueError, match="a row has 1 cells, the header 2"):
        markdown_table(["a", "b"], [[1]])


def test_fit_slopes_recovers_power_laws():
    d = np.array([4, 16, 64, 256])
    rows = [
        {"variant": "batch", "noise": 0.1, "quantity": "U3", "dim": x, "value": 3.0 * x**0.5}
        for x in d
    ] + [{"variant": "unitization", "noise": 0.1, "quantity": "U4", "dim": x, "value": 2.0}
         for x in d]  # fmt: skip
    out = fit_slopes(pd.DataFrame(rows)).set_index("variant")
    assert out.loc["batch", "slope"] == pytest.approx(0.5)
    assert out.loc["unitization", "slope"] == pytest.approx(0.0, abs=1e-12)
    assert (out.n_dims == 4).all() and (out.n_seeds == 1).all()
    assert out[["low", "high"]].isna().all().all()  # one seed: no interval


def test_fit_slopes_per_seed_with_a_student_t_interval():
    """Seeds with known slopes 0.4, 0.5, 0.65: the mean and the t interval of those three."""
    from scipy import stats

    d = np.array([16, 64, 256, 1024, 4096])
    known = {0: 0.4, 1: 0.5, 2: 0.65}
    rows = []
    for seed, k in known.items():
        for b, c in ((8, 1.0), (128, 0.1)):
            for x in d:
                # two rows per width and seed (e.g. two measured layers): their mean is fitted
                for f in (0.5, 1.5):
                    rows.append({"variant": "batch", "batch_size": b, "seed": seed,
                                 "quantity": "exact", "dim": x, "value": f * c * x**k})  # fmt: skip
    rows.append(
        {
            "variant": "batch",
            "batch_size": 8,
            "seed": 0,
            "quantity": "exact",
            "dim": 32,
            "value": 0.0,
        }
    )  # fmt: skip  (not positive: left out of the fit)
    out = fit_slopes(pd.DataFrame(rows), level=0.9)
    assert list(out.columns) == [
        "variant", "batch_size", "quantity", "slope", "low", "high", "n_seeds", "per_seed",
        "n_dims",
    ]  # fmt: skip
    assert len(out) == 2 and (out.n_seeds == 3).all() and (out.n_dims == 5).all()
    v = np.array(list(known.values()))
    half = stats.t.ppf(0.95, 2) * v.std(ddof=1) / np.sqrt(3)
    for r in out.itertuples():
        assert r.slope == pytest.approx(v.mean())
        assert (r.low, r.high) == pytest.approx((v.mean() - half, v.mean() + half))
        assert r.per_seed == "0: 0.400, 1: 0.500, 2: 0.650"
    one = fit_slopes(pd.DataFrame(rows)[lambda t: t.dim == 64])
    assert one.empty  # a single width gives no slope


def test_order_runs_puts_known_kinds_first():
    assert order_runs(["none", "x", "unitization=1", "batch", "unitization"]) == [
        "batch",
        "unitization=1",
        "unitization",
        "none",
        "x",
    ]


def test_summary_markdown_lists_a_variant_without_measurements():
    text = summary_markdown(_table(runs=("batch",)), {"batch": 0.5, "lost": float("nan")})
    overview = _tables(text)[0]
    assert overview[-1][:3] == ["lost", "diverged", "0"]
    assert "## lost" in text and "No step of this variant was measured" in text
