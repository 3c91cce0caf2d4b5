"""Reports of sketched runs: the JL estimate with its error, lower bounds only, any view.

One seeded training run is measured by two monitors at once, one storing the layers
(the reference ICS) and one storing their sketches (``ICSMonitor(sketch=k)``), so both
see the same steps. The summary, the markdown report, the plots and the CLI of the
sketched table must report the rescaled ``exact_jl`` within the sketch's stated error
``jl_epsilon(n, k)`` of the reference, its lower bounds as lower bounds, and no upper
bound computed on the sketch as a bound of ICS (``docs/theory.md``, section 9).
"""

from __future__ import annotations

import math
import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit.cli import main
from ics_toolkit.plots import plot_compare, plot_heatmap, plot_ics
from ics_toolkit.report import _fmt, bound_band, summary, summary_markdown
from ics_toolkit.sketch import jl_epsilon

matplotlib.use("Agg")

N, K = 64, 64  # probe size and sketch width: eps = sqrt(ln(128) / 64) = 0.28
WIDTHS = {"1": 16 * 8 * 8, "5": 256}  # the two BatchNorm layers, both wider than K
UPPERS = ("U1", "U2")  # measured on the sketch, bounding only its W1 (paired is U1)


@pytest.fixture(scope="module")
def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reference, sketched) results of the same 3 SGD steps, every step measured."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 256),
        nn.BatchNorm1d(256),
    )
    probe = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    # float64 analysis: with float32 and 2 threads, L2 of layer 5 exceeds exact by 4e-5
    # relative at step 2 (a false alarm of the float32 check, outside this test's subject)
    full = ics.ICSMonitor(model, probe, every=1, precision="float64")
    sketched = ics.ICSMonitor(model, probe, every=1, sketch=K, precision="float64")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    full.attach(opt)
    sketched.attach(opt)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ics.ICSWarning)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 1, 8, 8, generator=g)).square().mean().backward()
            opt.step()
    return full.results(), sketched.results()


def test_the_run_is_sketched_as_intended(tables):
    full, sk = tables
    rows = sk[sk.kind != "event"]
    assert set(rows.view) == {"sketch"} and set(rows.dim) == {K}
    assert set(full[full.kind != "event"].view) == {"flatten"}
    assert {r: int(d) for r, d in full.groupby("layer").dim.first().items()} == WIDTHS


def test_the_sketched_summary_is_within_the_stated_error_of_the_true_ics(tables):
    full, sk = tables
    ref = summary(full).set_index("layer")
    got = summary(sk).set_index("layer")
    eps = jl_epsilon(N, K)
    for layer in WIDTHS:
        true, est = ref.loc[layer, "ics"], got.loc[layer, "ics"]
        assert got.loc[layer, "sketch_eps"] == pytest.approx(eps, rel=1e-12)
        assert abs(est - true) <= eps * true, (layer, est, true)
        # the sketch's own exact W1 (what was reported before) is far outside it
        raw = got.loc[layer, "mean_exact"]
        assert abs(raw - true) > eps * true, (layer, raw, true)
        # the floor is rescaled like ICS (a W1 between halves, kept by the same map)
        assert (
            abs(got.loc[layer, "floor"] - ref.loc[layer, "floor"]) <= eps * ref.loc[layer, "floor"]
        )
        # the relative ICS is scale-free: the rescaling cancels
        rel = "mean_relative_exact"
        assert abs(got.loc[layer, rel] - ref.loc[layer, rel]) <= 2 * eps * ref.loc[layer, rel]
    # step by step, too
    a = bound_band(full).set_index(["step", "layer"])
    b = bound_band(sk).set_index(["step", "layer"])
    assert set(b.index) == set(a.index)
    rel = (b["value"] / a.loc[b.index, "value"] - 1).abs()
    assert (rel <= eps).all(), rel.max()


def test_lower_bounds_of_the_sketch_are_reported_and_hold(tables):
    full, sk = tables
    a = bound_band(full).set_index(["step", "layer"])
    b = bound_band(sk).set_index(["step", "layer"])
    true = a.loc[b.index, "value"]
    assert b["best_lower"].notna().all()
    assert (b["best_lower"] <= true * (1 + 1e-6)).all()
    names = {"exact", "L1", "L2", "L3", "sliced", "max_sliced"}
    assert set(b["best_lower_name"]) <= names
    wide = ics.to_wide(sk[sk.kind != "event"]).set_index(["step", "layer"])
    lows = wide[[q for q in names if q in wide.columns]].max(axis=1)
    assert np.allclose(b["best_lower"], lows.loc[b.index])


def test_no_upper_bound_of_the_sketch_is_reported_as_a_bound(tables):
    _, sk = tables
    band = bound_band(sk)
    assert band["best_upper"].isna().all() and band["best_upper_name"].isna().all()
    assert band["norm_bound"].isna().all()
    s = summary(sk)
    assert s["best_upper"].isna().all() and s["upper_tightness"].isna().all()
    for q in UPPERS:
        assert s[f"mean_{q}"].isna().all(), q
    # they were measured (on the sketch), so leaving them out is a choice, not an absence
    wide = ics.to_wide(sk[sk.kind != "event"])
    assert wide[list(UPPERS)].notna().all().all()
    text = summary_markdown(sk)
    layer_rows = [line for line in text.splitlines() if line.startswith(("| 1 |", "| 5 |"))]
    assert len(layer_rows) == 2
    header = next(line for line in text.splitlines() if line.startswith("| layer |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    for line in layer_rows:
        row = dict(zip(cells, [c.strip() for c in line.strip("|").split("|")], strict=True))
        assert row["best upper"] == "–" and row["exact / upper"] == "–"
        assert row["norm bound"] == "–" and row["95 % CI"] == "–"
        assert "exact_jl" in row["ICS (exact)"] and "±" in row["ICS (exact)"]
        for q in (*UPPERS, "paired", "U3", "U4", "U5"):  # no cell names an upper bound
            assert f"({q})" not in line, (line, q)


def test_summary_markdown_works_without_view_on_a_sketched_run(tables):
    full, sk = tables
    text = summary_markdown(sk)
    assert text == summary_markdown(sk, view="sketch").replace("view `sketch`", "view `flatten`")
    assert "Sketched layers (1, 5;" in text
    for layer in WIDTHS:
        est = summary(sk).set_index("layer").loc[layer, "ics"]
        assert f"| {layer} | k = {K} (sketch) | " in text
        assert f"{_fmt(est)} ± {100 * jl_epsilon(N, K):.0f} % (exact_jl)" in text
    # a table holding both (some layers stored whole) reports each layer once
    mixed = pd.concat([sk[sk.layer == "1"], full[full.layer == "5"]], ignore_index=True)
    rows = [line for line in summary_markdown(mixed).splitlines() if line.startswith("| 5 |")]
    assert len(rows) == 1 and "(sketch)" not in rows[0]


def test_plots_draw_the_jl_estimate_and_no_upper_bound(tables):
    _, sk = tables
    band = bound_band(sk)
    fig = plot_ics(sk, layers="1")
    (ax,) = fig.axes
    labels = ax.get_legend_handles_labels()[1]
    assert "ICS (exact_jl, sketch)" in labels and "best lower bound" in labels
    assert "sketch: JL error" in labels
    assert "bounds: best lower to best upper" not in labels
    line = next(x for x in ax.get_lines() if x.get_label() == "ICS (exact_jl, sketch)")
    expected = band[band.layer == "1"].sort_values("step")["value"].to_numpy(dtype=float)
    assert np.allclose(line.get_ydata(), expected)
    assert len(plot_compare(sk).axes) == len(WIDTHS)
    assert len(plot_heatmap(sk).axes) == 2  # one variant + the colour bar
    assert len(plot_ics(sk, floor=True).axes) == len(WIDTHS)


def test_the_cli_plots_a_sketched_table(tables, tmp_path, capsys):
    _, sk = tables
    path = tmp_path / "results.csv"
    sk.to_csv(path, index=False)
    assert main(["plot", str(path), "--out", str(tmp_path / "fig"), "--formats", "png"]) == 0
    out = capsys.readouterr().out
    for name in ("ics_vs_step", "heatmap", "bn_vs_unitization"):
        assert (tmp_path / "fig" / f"{name}.png").is_file() and name in out


def test_the_report_and_the_sketch_module_state_the_same_error():
    from ics_toolkit.report import _jl_epsilon

    for n, k in ((8, 1), (64, 64), (256, 256), (1000, 17)):
        assert _jl_epsilon(n, k) == pytest.approx(jl_epsilon(n, k), rel=1e-15)
    assert math.isnan(_jl_epsilon(pd.NA, 4))


def test_the_layer_choice_of_the_figures_counts_sketched_layers():
    from ics_toolkit.experiments import _some_layers

    views = ["flatten", "sketch", "sketch", "flatten", "channel"]
    df = pd.DataFrame({"layer": ["a", "b", "c", "d", "e"], "view": views})
    # "flatten" stands for the sketched layers too (a wide layer is stored either way)
    assert _some_layers(df, "flatten", 4) is None  # 4 layers: every one fits
    assert _some_layers(df, "flatten", 2) == ["a", "d"]
    assert _some_layers(df, "flatten", 3) == ["a", "c", "d"]  # evenly spaced: 0, 2, 3
