"""Figures: each plot function on small synthetic tables (Agg backend, nothing shown)."""

import subprocess
import sys

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from ics_toolkit.errors import ICSValueError
from ics_toolkit.plots import (
    plot_bounds_vs_dim,
    plot_compare,
    plot_heatmap,
    plot_ics,
    save_figure,
    series_style,
)

LAYERS = ["bn1", "bn2", "bn10"]
STEPS = [0, 10, 20, 30]
RUNS = ["none", "batch", "unitization"]  # deliberately not in display order


def _value(run, step, layer):
    return (1 + RUNS.index(run)) * (1 + LAYERS.index(layer)) / (1 + step / 10)


@pytest.fixture(scope="module")
def table():
    rows = []
    for run in RUNS:
        for step in STEPS:
            for layer in LAYERS:
                v = _value(run, step, layer)
                q = {"exact": v, "L1": 0.5 * v, "L3": 0.7 * v, "U1": 1.2 * v, "U2": 1.5 * v,
                     "sliced": 0.1 * v, "floor_exact": 5.0}  # fmt: skip
                if run == "batch":
                    q["U3"] = 3 * v
                for name, value in q.items():
                    rows.append(
                        {"run": run, "step": step, "layer": layer, "view": "flatten",
                         "quantity": name, "value": value, "bounds_hold": True}
                    )  # fmt: skip
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def sweep():
    rows = []
    for b in (8, 128):
        for seed in (0, 1):
            for d in (4, 16, 64):
                for variant, q, bound in (
                    ("batch", "U3", 2 * d**0.5),
                    ("unitization=1", "U4", 2.0),
                ):
                    for name, value in (("exact", (0.4 + 0.1 * seed) * bound), (q, bound)):
                        rows.append({"variant": variant, "dim": d, "batch_size": b, "seed": seed,
                                     "quantity": name, "value": value})  # fmt: skip
    return pd.DataFrame(rows)


def _lines(ax):
    return [ln for ln in ax.get_lines()]


def test_plot_ics_single_run(table):
    fig = plot_ics(table, run="batch", floor=True)  # the floor is drawn on request only
    assert isinstance(fig, Figure)
    assert len(fig.axes) == len(LAYERS)
    for ax, layer in zip(fig.axes, LAYERS, strict=True):
        assert ax.get_title() == layer
        lines = _lines(ax)
        labels = [ln.get_label() for ln in lines]
        assert labels == ["ICS (exact W1)", "U3 (BatchNorm bound)", "sampling floor"]
        # the ICS line is the table's exact values
        assert np.allclose(lines[0].get_ydata(), [_value("batch", s, layer) for s in STEPS])
        assert lines[2].get_linestyle() == "--"
        assert ax.get_yscale() == "log"
        band = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(band) == 1
        ys = band[0].get_paths()[0].vertices[:, 1]
        v = np.array([_value("batch", s, layer) for s in STEPS])
        assert ys.min() == pytest.approx((0.7 * v).min())  # best lower = L3
        assert ys.max() == pytest.approx((1.2 * v).max())  # best upper = U1


def test_plot_ics_grid_of_runs_and_layers(table):
    fig = plot_ics(table, layers=["bn10", "bn1"], floor=False)
    assert len(fig.axes) == len(RUNS) * 2
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["batch · bn10", "batch · bn1"]  # display order: batch first
    assert titles[-1] == "none · bn1"
    # without a floor and a norm bound ("none" has no U3) only the ICS line is left
    assert len(_lines(fig.axes[-1])) == 1


def test_plot_ics_single_run_table_without_run_column(table):
    one = table[table.run == "none"].drop(columns="run")
    fig = plot_ics(one, yscale="linear")
    assert len(fig.axes) == len(LAYERS)
    assert fig.axes[0].get_yscale() == "linear"


def test_plot_compare(table):
    fig = plot_compare(table, runs=["batch", "none"])
    assert len(fig.axes) == len(LAYERS)
    for ax in fig.axes:
        lines = _lines(ax)
        assert [ln.get_label() for ln in lines] == ["batch", "none"]
        # each variant has its own colour, line style and marker (greyscale-safe)
        assert lines[0].get_color() != lines[1].get_color()
        assert lines[0].get_linestyle() != lines[1].get_linestyle()
        assert lines[0].get_marker() != lines[1].get_marker()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["batch", "none"]


def test_plot_heatmap(table):
    fig = plot_heatmap(table)
    assert len(fig.axes) == len(RUNS) + 1  # + the colour bar
    images = [im for ax in fig.axes for im in ax.get_images() if isinstance(im, AxesImage)]
    assert len(images) == len(RUNS)
    first = images[0].get_array()  # batch (display order), rows = layers in model order
    ref = np.array([[_value("batch", s, layer) for s in STEPS] for layer in LAYERS])
    assert np.allclose(np.ma.getdata(first), ref)
    norms = {id(im.norm) for im in images}
    assert len(norms) == 1  # one shared colour scale
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == LAYERS


def test_plot_bounds_vs_dim(sweep):
    fig = plot_bounds_vs_dim(sweep)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        lines = _lines(ax)
        assert len(lines) == 2 * 2 + 1  # (W1, bound) per batch size + the sqrt(d) reference
        ref = lines[-1]
        x, y = np.asarray(ref.get_xdata()), np.asarray(ref.get_ydata())
        assert np.allclose(y / np.sqrt(x), y[0] / np.sqrt(x[0]))  # c sqrt(d)
        # the W1 line is the mean over seeds, and the seeds' range is shaded
        w1 = lines[0]
        assert np.allclose(w1.get_ydata(), 0.45 * np.asarray(ax.get_lines()[1].get_ydata()))
        assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2
    assert "U3" in fig.axes[0].get_title() and "U4" in fig.axes[1].get_title()
    assert [ln.get_label() for ln in _lines(fig.axes[0])][::2][:2] == ["batch 8", "batch 128"]
    fig = plot_bounds_vs_dim(sweep, batch_sizes=[128])
    assert len(_lines(fig.axes[0])) == 3


def test_plot_bounds_vs_dim_draws_tight_forms_of_a_bound(sweep):
    tight = sweep[sweep.quantity == "U3"].assign(quantity="U3_tight", value=lambda t: t.value / 2)
    fig = plot_bounds_vs_dim(pd.concat([sweep, tight]), batch_sizes=[8])
    lines = _lines(fig.axes[0])
    assert [ln.get_linestyle() for ln in lines[:3]] == ["-", "--", "-."]
    assert "U3_tight dash-dot" in fig.axes[0].get_title()
    assert len(_lines(fig.axes[1])) == 3  # unitization has no tight form here


def test_draw_into_given_axes(table):
    own = Figure()
    axes = own.subplots(1, 3)
    fig = plot_compare(table, axes=axes)
    assert fig is own and len(_lines(axes[2])) == len(RUNS)
    with pytest.raises(ICSValueError, match="at least 3 matplotlib Axes"):
        plot_compare(table, axes=axes[:2])


@pytest.mark.parametrize(
    "func", [plot_ics, plot_compare, plot_heatmap], ids=["ics", "compare", "heatmap"]
)
def test_missing_columns_and_values_raise(table, func):
    with pytest.raises(ICSValueError, match=r"lacks the column\(s\) \['layer'\]"):
        func(table.drop(columns="layer"))
    with pytest.raises(ICSValueError, match=r"no `paired` values for view='flatten'.*'exact'"):
        func(table, quantity="paired")
    with pytest.raises(ICSValueError, match=r"no `exact` values for view='pixel'"):
        func(table, view="pixel")


def test_bad_selections_raise(table, sweep):
    with pytest.raises(ICSValueError, match=r"`run` \['nope'\] not in the results"):
        plot_ics(table, run="nope")
    with pytest.raises(ICSValueError, match=r"`layers` \['bn9'\] not in the results"):
        plot_compare(table, layers=["bn9"])
    with pytest.raises(ICSValueError, match="`yscale` must be one of"):
        plot_ics(table, yscale="loglog")
    with pytest.raises(ICSValueError, match=r"`sweep_df` lacks the column\(s\) \['dim'\]"):
        plot_bounds_vs_dim(sweep.drop(columns="dim"))
    with pytest.raises(ICSValueError, match=r"`batch_sizes` \[2\] not in the table"):
        plot_bounds_vs_dim(sweep, batch_sizes=[2])


def test_no_global_matplotlib_state_is_changed(table):
    import matplotlib.pyplot as plt

    before = dict(matplotlib.rcParams)
    backend = matplotlib.get_backend()
    plot_ics(table)
    plot_heatmap(table)
    assert dict(matplotlib.rcParams) == before
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == []  # figures are not registered with pyplot


def test_save_figure_writes_png_and_svg(tmp_path, table):
    fig = plot_compare(table)
    files = save_figure(fig, tmp_path / "sub" / "cmp.png")
    assert [f.name for f in files] == ["cmp.png", "cmp.svg"]
    assert files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in files[1].read_bytes()[:2000]
    with pytest.raises(ICSValueError, match="`formats` is empty"):
        save_figure(fig, tmp_path / "x", formats=())


def test_save_figure_lays_out_once_and_keeps_the_figure_layout(tmp_path, table, monkeypatch):
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    calls = []
    execute = ConstrainedLayoutEngine.execute

    def counted(self, fig):
        calls.append(fig)
        return execute(self, fig)

    monkeypatch.setattr(ConstrainedLayoutEngine, "execute", counted)
    fig = plot_compare(table)
    engine = fig.get_layout_engine()
    assert isinstance(engine, ConstrainedLayoutEngine)
    save_figure(fig, tmp_path / "cmp", formats=("png", "svg", "pdf"))
    assert len(calls) == 1  # the PNG's layout serves the SVG and the PDF
    assert fig.get_layout_engine() is engine  # the caller's figure lays out as before
    calls.clear()
    save_figure(fig, tmp_path / "again", formats=("png",))
    assert len(calls) == 1
    calls.clear()
    save_figure(fig, tmp_path / "pair", formats=("png", "svg"))
    assert len(calls) == 1  # two formats: the SVG takes the PNG's layout too
    # a figure without a layout engine is saved as it is and keeps none
    plain = Figure()
    plain.subplots().plot([0, 1])
    save_figure(plain, tmp_path / "plain", formats=("png", "svg"))
    assert plain.get_layout_engine() is None
    assert (tmp_path / "plain.svg").exists()
    # parents are created, and PNGs are drawn at 100 dpi unless told otherwise
    (png,) = save_figure(plain, tmp_path / "a" / "b" / "deep", formats=("png",))
    width = int.from_bytes(png.read_bytes()[16:20], "big")  # the PNG header's width field
    assert width == round(plain.get_figwidth() * 100)
    (png,) = save_figure(plain, tmp_path / "a" / "b" / "sharp", formats=("png",), dpi=50)
    # a folder is no file name stem; a file of that name without a suffix is no obstacle
    with pytest.raises(ICSValueError, match="is a folder; pass a file name stem"):
        save_figure(plain, tmp_path / "a", formats=("png",))
    (tmp_path / "stem").write_text("not a figure")
    assert save_figure(plain, tmp_path / "stem", formats=("png",)) == [tmp_path / "stem.png"]
    assert int.from_bytes(png.read_bytes()[16:20], "big") == round(plain.get_figwidth() * 50)
    # a failing format still gives the figure its layout engine back
    savefig = Figure.savefig

    def svg_fails(self, target, **kw):
        if kw.get("format") == "svg":
            raise OSError("disk full")
        return savefig(self, target, **kw)

    monkeypatch.setattr(Figure, "savefig", svg_fails)
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, tmp_path / "fails", formats=("png", "svg"))
    assert fig.get_layout_engine() is engine


def test_series_styles_differ_in_colour_line_and_marker():
    styles = [series_style(i) for i in range(6)]
    for key in ("color", "linestyle", "marker"):
        assert len({str(s[key]) for s in styles}) == 6


def test_importing_plots_does_not_import_matplotlib():
    code = (
        "import sys, ics_toolkit, ics_toolkit.plots, ics_toolkit.report, ics_toolkit.cli, "
        "ics_toolkit.experiments; print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
