"""Figures of a results table: ICS versus step, heatmaps, variants compared, bounds versus d.

Every function takes the tidy results table (``ICSMonitor.results()``,
:func:`ics_toolkit.load_results`) or the dimension-sweep table, checks its columns
first, and returns a :class:`matplotlib.figure.Figure`. Nothing is shown and no global
state is changed: figures are built as ``matplotlib.figure.Figure`` objects (not
registered with pyplot, so notebooks display the returned figure once and scripts
need not close it), styling goes through :func:`matplotlib.style.context`, and
:func:`save_figure` writes PNG and SVG. Pass ``axes=`` to draw into your own axes.

Sketched layers (``ICSMonitor(sketch=k)``, view ``"sketch"``) are drawn with the flatten
view, by the rescaled ``exact_jl`` with its stated relative error band and the sketch's
lower bounds only (:func:`ics_toolkit.report.bound_band`).

Print and colour blindness: large fonts, the Okabe-Ito palette, and a distinct line
style and marker per series, so that figures survive greyscale.

matplotlib is imported inside the functions: ``import ics_toolkit`` never imports it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ics_toolkit import _checks, _vocab
from ics_toolkit.errors import ICSValueError
from ics_toolkit.report import (
    NORM_BOUNDS,
    _in_view,
    bound_band,
    check_columns,
    default_quantity,
    order_layers,
    order_runs,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "COLORS",
    "check_formats",
    "plot_batch_sweep",
    "plot_bounds_vs_dim",
    "plot_compare",
    "plot_heatmap",
    "plot_ics",
    "save_figure",
    "series_style",
]

#: Okabe-Ito colours (distinguishable with the common colour-vision deficiencies).
COLORS: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#000000",  # black
)
_LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")

#: Style sheet used while a figure is built and saved (fonts sized for print).
STYLE: dict[str, Any] = {
    "font.size": 12,
    "axes.titlesize": 12,
    "axes.labelsize": 12,
    "xtick.labelsize": 10.5,
    "ytick.labelsize": 10.5,
    "legend.fontsize": 11,
    "figure.titlesize": 14,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 2.0,
    "lines.markersize": 5.5,
    "legend.frameon": False,
}

_PANEL = (3.6, 2.8)  # inches per panel
_BOUND_LABELS = {
    "U3": "U3 (BatchNorm bound)",
    "U3_tight": "U3_tight (BatchNorm bound, measured moments)",
    "U4": "U4 (unitization bound)",
    "U5": "U5 (Unitization-layer bound)",
}
_YSCALES = ("log", "linear", "symlog")


def series_style(i: int) -> dict[str, Any]:
    """Colour, line style and marker of the ``i``-th series (cycling).

    Examples
    --------
    >>> series_style(0)["color"], series_style(1)["linestyle"], series_style(2)["marker"]
    ('#0072B2', '--', '^')
    """
    return {
        "color": COLORS[i % len(COLORS)],
        "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
        "marker": _MARKERS[i % len(_MARKERS)],
    }


def _style_context() -> Any:
    import matplotlib.style

    return matplotlib.style.context(STYLE)


def _new_figure(width: float, height: float, constrained: bool = True) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained" if constrained else None)


def _panels(
    n: int,
    *,
    ncols: int | None,
    axes: Any,
    sharex: bool = True,
    sharey: bool = False,
    panel: tuple[float, float] = _PANEL,
    grid: tuple[int, int] | None = None,
) -> tuple[Figure, list[Axes], bool]:
    """A figure with ``n`` panels, or the caller's axes; returns (figure, axes, created)."""
    if axes is not None:
        flat = list(np.ravel(np.asarray(axes, dtype=object)))
        if len(flat) < n or not all(hasattr(a, "plot") and hasattr(a, "figure") for a in flat):
            raise ICSValueError(
                f"`axes` must hold at least {n} matplotlib Axes (one per panel), got "
                f"{len(flat)} object(s)"
            )
        return flat[0].figure, flat[:n], False
    if grid is not None:
        nrows, ncols_ = grid
    else:
        ncols = _checks.positive_int(ncols, "ncols", allow_none=True)
        ncols_ = min(n, ncols or 3)
        nrows = math.ceil(n / ncols_)
    fig = _new_figure(panel[0] * ncols_ + 0.4, panel[1] * nrows + 0.9)
    grid_axes = fig.subplots(nrows, ncols_, sharex=sharex, sharey=sharey, squeeze=False)
    flat = list(grid_axes.ravel())
    for ax in flat[n:]:
        ax.remove()
    return fig, flat[:n], True


def _subset(
    available: Sequence[str], wanted: Iterable[str] | str | None, argument: str
) -> list[str]:
    if wanted is None:
        return list(available)
    wanted = [wanted] if isinstance(wanted, str) else [str(w) for w in wanted]
    missing = [w for w in wanted if w not in available]
    if missing or not wanted:
        raise ICSValueError(
            f"`{argument}` {missing or wanted} not in the results; available: {list(available)}"
        )
    return wanted


def _band(df: pd.DataFrame, quantity: str, view: str) -> pd.DataFrame:
    """bound_band with an error that says what is there when nothing matches."""
    check_columns(df, ("step", "layer", "view", "quantity", "value"))
    band = bound_band(df, quantity=quantity, view=view)
    if band.empty or band["value"].isna().all():
        rows = df[df["layer"].notna()]
        present = rows[["view", "quantity"]].dropna().drop_duplicates()
        views = sorted(set(present["view"].astype(str)))
        in_view = sorted(set(present.loc[present["view"] == view, "quantity"].astype(str)))
        raise ICSValueError(
            f"no `{quantity}` values for view={view!r} in the results; views present: "
            f"{views}; quantities in that view: {in_view}. Pass quantity=... / view=..."
        )
    return band


def _set_yscale(ax: Axes, yscale: str, values: Iterable[float]) -> None:
    arr = np.asarray([v for v in values if v is not None], dtype="float64")
    positive = arr[np.isfinite(arr) & (arr > 0)]
    if yscale == "log" and positive.size:
        ax.set_yscale("log")
        ax.minorticks_off()  # dozens of minor ticks per panel make drawing slow, add little
    elif yscale == "symlog":
        ax.set_yscale("symlog", linthresh=float(positive.min()) if positive.size else 1.0)


def _legend(fig: Figure, axes: list[Axes], created: bool, ncols: int | None = None) -> None:
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    if not handles:
        return
    if created:
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            # about 2.6 inches per entry, so a long legend wraps instead of being cut
            ncols=ncols or max(1, min(len(labels), 5, int(fig.get_figwidth() / 2.6))),
        )
    else:
        axes[0].legend(handles, labels, loc="best")


def _label_axes(axes: list[Axes], ncols: int, xlabel: str, ylabel: str) -> None:
    n = len(axes)
    for i, ax in enumerate(axes):
        if i % ncols == 0:
            ax.set_ylabel(ylabel)
        if i >= n - ncols:
            ax.set_xlabel(xlabel)


def plot_ics(
    df: pd.DataFrame,
    *,
    quantity: str = "exact",
    view: str = "flatten",
    layers: Sequence[str] | str | None = None,
    run: str | None = None,
    floor: bool = False,
    norm_bound: bool = True,
    yscale: str = "log",
    ncols: int | None = None,
    axes: Any = None,
) -> Figure:
    """ICS versus step, one panel per layer, inside the band of the theory's bounds.

    Each panel shows the ICS estimate ``quantity`` (the W1 between the layer's outputs
    before and after step t, in the unit of the outputs) against the optimizer step,
    the band between the best lower bound (the largest of L1..L3, ``sliced`` and
    ``max_sliced`` present; each <= the exact W1) and the best upper bound (the
    smallest of ``paired`` and U1..U5 present; each >= the exact W1) lightly shaded,
    the probe-resampling 95 % interval of the estimate (``<quantity>_ci_low`` /
    ``_ci_high``, where measured) as a darker band, dotted, the normalization
    layer's own bound (the smallest measured: U3_tight BatchNorm, U4 unitized, U5
    Unitization; U3 for tables without U3_tight) where measured and,
    on request, the sampling floor ``floor_<quantity>`` dashed (the resolution of
    population-level statements, not an error bar of ICS; see docs/theory.md).
    A sketched layer's panel shows ``exact_jl`` for ``"exact"`` with the band of its
    stated relative error ``sqrt(ln(2n) / k)`` instead of the interval, and no upper
    bound (those computed on the sketch do not bound the layer's W1).

    Estimates at or below the storage resolution (``resolution`` rows,
    ``below_resolution``) are not drawn as shift: they appear as hollow grey markers,
    with the resolution dash-dotted, in the panels that have any.

    Parameters
    ----------
    df : pandas.DataFrame
        The tidy results table (columns ``step``, ``layer``, ``view``, ``quantity``,
        ``value``; ``run`` when several runs share it).
    quantity : str
        The estimate drawn (``"exact"``, ``"sliced"``, ``"max_sliced"``, ...).
    view : str
        The view drawn (``"flatten"``: one sample per probe input; sketched layers
        included).
    layers : str or sequence of str, optional
        Layers to draw, in this order (default: every layer, in model order).
    run : str, optional
        The run to draw. By default a table with one run gives one panel per layer; a
        table with several runs gives a grid, one row per run (variant) and one
        column per layer, sharing the y axis.
    floor, norm_bound : bool
        Draw the sampling floor (off by default); draw the normalization layer's bound.
    yscale : {"log", "linear", "symlog"}
        Scale of the y axis (log by default: ICS, bounds and floors differ by orders
        of magnitude).
    ncols : int, optional
        Panels per row for a single run (default: up to 3).
    axes : Axes or array of Axes, optional
        Draw into these (one per panel) instead of a new figure.

    Returns
    -------
    matplotlib.figure.Figure
        One axes per panel (per layer, times runs for a grid).

    Raises
    ------
    ICSValueError
        A required column is missing, or the table has no ``quantity`` for ``view``,
        or ``run`` / ``layers`` name something absent.
    """
    _checks.choice(yscale, "yscale", _YSCALES)
    band = _band(df, quantity, view)
    band = _with_ci(band, df, quantity, view)
    runs = order_runs(band["run"])
    runs = _subset(runs, run, "run") if run is not None else runs
    layer_names = _subset(order_layers(band["layer"]), layers, "layers")
    multi = len(runs) > 1
    n = len(runs) * len(layer_names)
    with _style_context():
        if multi:
            fig, axs, created = _panels(
                n,
                ncols=None,
                axes=axes,
                sharey=True,
                grid=(len(runs), len(layer_names)),
                panel=(3.0, 2.5),
            )
            cols = len(layer_names)
        else:
            fig, axs, created = _panels(n, ncols=ncols, axes=axes)
            cols = min(n, ncols or 3) if created else n
        i = 0
        for r_i, run_name in enumerate(runs):
            style = series_style(r_i)
            for layer in layer_names:
                ax = axs[i]
                i += 1
                part = band[(band["run"] == run_name) & (band["layer"] == layer)]
                part = part.sort_values("step")
                steps = part["step"].to_numpy(dtype="float64")
                values = part["value"].to_numpy(dtype="float64")
                low = part["best_lower"].to_numpy(dtype="float64")
                high = part["best_upper"].to_numpy(dtype="float64")
                ok = np.isfinite(low) & np.isfinite(high)
                plotted = [*values, *high[ok], *low[ok]]
                if ok.any():
                    ax.fill_between(
                        steps,
                        low,
                        high,
                        where=ok,
                        color=style["color"],
                        alpha=0.2,
                        linewidth=0,
                        label="bounds: best lower to best upper",
                    )
                below = part["below_resolution"].fillna(False).to_numpy(dtype=bool)
                ax.plot(
                    steps,
                    np.where(below, np.nan, values),  # unresolved steps are not a shift
                    color=style["color"],
                    linestyle="-",
                    marker=style["marker"],
                    markevery=max(1, len(steps) // 12),
                    label=_ics_label(part, quantity),
                )
                if below.any():
                    plotted += list(_draw_unresolved(ax, part, steps, below))
                _draw_ci(ax, part, steps, style["color"])
                plotted += _draw_sketch_error(ax, part, steps, values, style["color"])
                only_low = np.isfinite(low) & ~np.isfinite(high)
                if only_low.any():  # a sketch: its lower bounds hold, its upper ones do not
                    ax.plot(
                        steps[only_low],
                        low[only_low],
                        color=style["color"],
                        linestyle="-.",
                        linewidth=1.2,
                        label="best lower bound",
                    )
                    plotted += list(low[only_low])
                if norm_bound and part["norm_bound"].notna().any():
                    name = part["norm_bound_name"].dropna().mode().iloc[0]
                    nb = part["norm_bound"].to_numpy(dtype="float64")
                    ax.plot(
                        steps,
                        nb,
                        color=style["color"],
                        linestyle=":",
                        linewidth=1.6,
                        label=_BOUND_LABELS.get(name, f"{name} (normalization bound)"),
                    )
                    plotted += list(nb)
                if floor and part["floor"].notna().any():
                    fl = part["floor"].to_numpy(dtype="float64")
                    ax.plot(
                        steps,
                        fl,
                        color="0.35",
                        linestyle="--",
                        linewidth=1.4,
                        label="sampling floor",
                    )
                    plotted += list(fl)
                _set_yscale(ax, yscale, plotted)
                ax.set_title(f"{run_name} · {layer}" if multi and run_name else layer)
        _label_axes(axs, cols, "optimizer step", f"W1 ({view})")
        if created:
            where = f", run {runs[0]}" if len(runs) == 1 and runs[0] else ""
            fig.suptitle(f"Internal covariate shift per layer ({quantity} W1{where})")
        _legend(fig, axs, created)
    return fig


def plot_compare(
    df: pd.DataFrame,
    *,
    quantity: str | None = None,
    view: str = "flatten",
    runs: Sequence[str] | str | None = None,
    layers: Sequence[str] | str | None = None,
    yscale: str = "log",
    ncols: int | None = None,
    axes: Any = None,
) -> Figure:
    """Normalization variants side by side: per layer, every run's ICS on the same axes.

    Parameters
    ----------
    df : pandas.DataFrame
        The tidy results table; ``run`` holds the variant (``"batch"``,
        ``"unitization"``, ``"none"``, ...).
    quantity : str, optional
        The quantity drawn. Default: ``relative_<q>`` for the first estimator ``q``
        present (``exact`` when measured): ICS divided by the RMS norm of the layer's
        outputs, so variants whose outputs differ in scale compare; else ``q`` itself
        (W1 in the unit of the outputs). The
        probe-resampling 95 % interval is drawn as a band where measured.
    view : str
        The view drawn.
    runs : str or sequence of str, optional
        Variants to draw (default: all; BatchNorm, Unitization, ..., none first).
    layers : str or sequence of str, optional
        Layers to draw (default: all, in model order).
    yscale : {"log", "linear", "symlog"}
        Scale of the y axis.
    ncols : int, optional
        Panels per row (default: up to 3).
    axes : Axes or array of Axes, optional
        Draw into these (one per layer).

    Returns
    -------
    matplotlib.figure.Figure
        One axes per layer, one line per variant (colour, line style and marker each).

    Raises
    ------
    ICSValueError
        A required column is missing, nothing matches ``quantity`` / ``view``, or
        ``runs`` / ``layers`` name something absent.
    """
    _checks.choice(yscale, "yscale", _YSCALES)
    if quantity is None:
        check_columns(df, ("step", "layer", "view", "quantity", "value"))
        base = default_quantity(df)
        relative = _vocab.relative_name(base)
        quantity = relative if (df["quantity"] == relative).any() else base
    band = _with_ci(_band(df, quantity, view), df, quantity, view)
    run_names = _subset(order_runs(band["run"]), runs, "runs")
    layer_names = _subset(order_layers(band["layer"]), layers, "layers")
    with _style_context():
        fig, axs, created = _panels(len(layer_names), ncols=ncols, axes=axes)
        cols = min(len(layer_names), ncols or 3) if created else len(layer_names)
        for ax, layer in zip(axs, layer_names, strict=True):
            plotted: list[float] = []
            for r_i, run_name in enumerate(run_names):
                part = band[(band["run"] == run_name) & (band["layer"] == layer)]
                part = part.sort_values("step")
                values = part["value"].to_numpy(dtype="float64")
                style = series_style(r_i)
                ax.plot(
                    part["step"].to_numpy(dtype="float64"),
                    values,
                    markevery=max(1, len(values) // 12),
                    label=run_name or "(unnamed)",
                    **style,
                )
                _draw_ci(ax, part, part["step"].to_numpy(dtype="float64"), style["color"])
                plotted += list(values)
            _set_yscale(ax, yscale, plotted)
            ax.set_title(layer)
        relative = quantity.startswith("relative_")
        base = quantity.removeprefix("relative_")
        ylabel = f"ICS / RMS output norm ({base})" if relative else f"ICS: {quantity} W1"
        _label_axes(axs, cols, "optimizer step", ylabel)
        if created:
            what = f"relative {base} W1: W1 / RMS output norm" if relative else f"{quantity} W1"
            fig.suptitle(f"ICS by normalization variant ({what}, {view} view; band: 95 % CI)")
        _legend(fig, axs, created)
    return fig


def _with_ci(band: pd.DataFrame, df: pd.DataFrame, quantity: str, view: str) -> pd.DataFrame:
    """``band`` with ``ci_low`` / ``ci_high`` columns (NaN where not measured)."""
    names = _vocab.ci_names(quantity)
    if quantity.startswith("relative_"):
        base = _vocab.ci_names(quantity.removeprefix("relative_"))
        names = (_vocab.relative_name(base[0]), _vocab.relative_name(base[1]))
    rows = df[df["quantity"].isin(names) & _in_view(df["view"], view)]
    if not quantity.startswith("relative_"):
        # the interval of the sketch's exact W1, not of the rescaled estimate drawn
        rows = rows[rows["view"] != "sketch"]
    band = band.copy()
    if rows.empty:
        band["ci_low"] = band["ci_high"] = np.nan
        return band
    rows = rows.assign(run=rows["run"].astype("object").where(rows["run"].notna(), ""))
    wide = rows.pivot_table(
        index=["run", "step", "layer"], columns="quantity", values="value", aggfunc="first"
    )
    wide = wide.rename(columns={names[0]: "ci_low", names[1]: "ci_high"}).reset_index()
    for col in ("ci_low", "ci_high"):
        if col not in wide:
            wide[col] = np.nan
    wide["step"] = wide["step"].astype("Int64")
    keys = ["run", "step", "layer"]
    return band.merge(wide[[*keys, "ci_low", "ci_high"]], on=keys, how="left")


def _ics_label(part: pd.DataFrame, quantity: str) -> str:
    """Legend label of the estimate; a sketched layer's is its JL estimate."""
    if (part["view"] == "sketch").any() and not quantity.startswith("relative_"):
        return "ICS (exact_jl, sketch)"
    return f"ICS ({quantity} W1)"


def _draw_sketch_error(
    ax: Axes, part: pd.DataFrame, steps: np.ndarray, values: np.ndarray, color: Any
) -> list[float]:
    """The band value * (1 +- eps) of a sketched layer's estimate; the values drawn."""
    if "sketch_eps" not in part or not part["sketch_eps"].notna().any():
        return []
    eps = part["sketch_eps"].to_numpy(dtype="float64")
    low, high = values * (1 - eps), values * (1 + eps)
    ok = np.isfinite(low) & np.isfinite(high)
    ax.fill_between(
        steps,
        low,
        high,
        where=ok,
        color=color,
        alpha=0.3,
        linewidth=0,
        hatch="//",
        label="sketch: JL error",
    )
    return [*low[ok], *high[ok]]


def _draw_unresolved(
    ax: Axes, part: pd.DataFrame, steps: np.ndarray, below: np.ndarray
) -> np.ndarray:
    """Estimates at or below the storage resolution: hollow grey markers under its line.

    Returns the resolution values drawn (for the y limits).
    """
    values = part["value"].to_numpy(dtype="float64")
    res = part["resolution"].to_numpy(dtype="float64")
    ax.plot(steps, res, color="0.45", linestyle="-.", linewidth=1.2, label="storage resolution")
    ax.plot(
        steps[below],
        values[below],
        linestyle="none",
        marker="o",
        markerfacecolor="none",
        markeredgecolor="0.45",
        label="below storage resolution (unresolved)",
    )
    return res


def _draw_ci(ax: Axes, part: pd.DataFrame, steps: np.ndarray, color: Any) -> None:
    if "ci_low" not in part or not part["ci_low"].notna().any():
        return
    low = part["ci_low"].to_numpy(dtype="float64")
    high = part["ci_high"].to_numpy(dtype="float64")
    ok = np.isfinite(low) & np.isfinite(high)
    ax.fill_between(
        steps, low, high, where=ok, color=color, alpha=0.45, linewidth=0, label="95 % CI"
    )


def plot_batch_sweep(
    df: pd.DataFrame, design: pd.DataFrame, *, view: str = "flatten", level: float = 0.95
) -> Figure:
    """ICS and the normalization bounds against the training batch size (the noise sweep).

    Parameters
    ----------
    df : pandas.DataFrame
        The results table of the main job (``run``, ``quantity``, ``value``, ``scale``
        rows for the relative values).
    design : pandas.DataFrame
        ``run``, ``variant``, ``seed``, ``batch_size`` per run.
    view : str
        The view drawn.
    level : float
        Level of the Student-t error bars over seeds.

    Returns
    -------
    matplotlib.figure.Figure
        Two panels against the batch size (log axis): the relative ICS (mean over the
        layers and steps of ``relative_exact``) per variant, and the relative
        normalization bound (U3_tight / scale for BatchNorm, U5 / scale for
        Unitization: tight with tight, as U5's BatchNorm part has U3_tight's form; U3
        for tables without U3_tight), each the mean over seeds with its interval.
    """
    from ics_toolkit.uncertainty import t_interval

    rows = df[_in_view(df["view"], view) & df["layer"].notna()]
    per_run: dict[str, dict[str, float]] = {}
    for run, part in rows.groupby("run", sort=False):
        wide = part.pivot_table(index=["layer", "step"], columns="quantity", values="value")
        if "scale" not in wide:
            continue
        out = {}
        for q in ("exact", "U3", "U3_tight", "U5"):
            if q in wide:
                out[q] = float((wide[q] / wide["scale"]).mean())
        if "U3_tight" in out:  # compare BatchNorm with U5 tight with tight
            out.pop("U3", None)
        per_run[str(run)] = out
    variants = [v for v in order_runs(design["variant"]) if (design["variant"] == v).any()]
    sizes = sorted(design["batch_size"].astype(int).unique())
    with _style_context():
        fig, axs, _ = _panels(2, ncols=2, axes=None, sharex=False, panel=(5.2, 3.6))
        plotted: list[float] = []
        for v_i, variant in enumerate(variants):
            style = series_style(v_i)
            for ax, quantities in zip(axs, (("exact",), ("U3", "U3_tight", "U5")), strict=True):
                xs, ys, errs = [], [], []
                for b in sizes:
                    runs = design[(design["variant"] == variant) & (design["batch_size"] == b)]
                    vals = [
                        per_run.get(r, {}).get(q, math.nan) for r in runs["run"] for q in quantities
                    ]
                    vals = [x for x in vals if math.isfinite(x)]
                    if not vals:
                        continue
                    mean, low, high = t_interval(vals, level)
                    xs.append(b)
                    ys.append(mean)
                    errs.append((mean - low, high - mean) if math.isfinite(low) else (0.0, 0.0))
                if xs:
                    err = np.asarray(errs).T
                    ax.errorbar(xs, ys, yerr=err, capsize=3, label=variant, **style)
                    plotted += ys
        axs[0].set_title("relative ICS: exact W1 / scale")
        axs[1].set_title("relative bound: U3_tight (BatchNorm), U5 (Unitization)")
        for ax in axs:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(b) for b in sizes])
            ax.set_yscale("log")
            ax.minorticks_off()
            ax.set_xlabel("training batch size (smaller: noisier)")
        axs[0].set_ylabel(f"mean over layers, steps ({level:.0%} CI, seeds)")
        fig.suptitle("ICS and its bounds versus batch size (the noise sweep)")
        _legend(fig, axs, True)
    return fig


def plot_heatmap(
    df: pd.DataFrame,
    *,
    quantity: str = "exact",
    view: str = "flatten",
    runs: Sequence[str] | str | None = None,
    layers: Sequence[str] | str | None = None,
    log: bool = True,
    cmap: str = "cividis",
    axes: Any = None,
) -> Figure:
    """Layer-by-step heatmap of ICS, one panel per normalization variant, one colour scale.

    Parameters
    ----------
    df : pandas.DataFrame
        The tidy results table; ``run`` holds the variant.
    quantity : str
        The ICS estimate shown (W1, in the unit of the layer's outputs).
    view : str
        The view shown.
    runs : str or sequence of str, optional
        Variants to show (default: all).
    layers : str or sequence of str, optional
        Layers (rows, in model order by default).
    log : bool
        Logarithmic colour scale (shared by all panels, so colours compare across
        variants); falls back to linear when no value is positive.
    cmap : str
        A matplotlib colormap; the default ``cividis`` is readable with colour-vision
        deficiencies and in greyscale. Missing values are light grey.
    axes : Axes or array of Axes, optional
        Draw into these (one per variant); the colour bar takes space from them.

    Returns
    -------
    matplotlib.figure.Figure
        One axes per variant plus one for the colour bar.

    Raises
    ------
    ICSValueError
        A required column is missing, or nothing matches ``quantity`` / ``view`` /
        ``runs`` / ``layers``.
    """
    import matplotlib
    from matplotlib.colors import LogNorm, Normalize

    band = _band(df, quantity, view)
    run_names = _subset(order_runs(band["run"]), runs, "runs")
    layer_names = _subset(order_layers(band["layer"]), layers, "layers")
    band = band[band["run"].isin(run_names) & band["layer"].isin(layer_names)]
    values = band["value"].to_numpy(dtype="float64")
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if log and positive.size:
        norm: Normalize = LogNorm(vmin=float(positive.min()), vmax=float(positive.max()))
    else:
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="0.88")
    height = max(2.6, 0.42 * len(layer_names) + 1.4)
    with _style_context():
        fig, axs, created = _panels(
            len(run_names),
            ncols=None,
            axes=axes,
            sharex=False,
            sharey=True,
            grid=(1, len(run_names)) if axes is None else None,
            panel=(3.8, height),
        )
        image = None
        for ax, run_name in zip(axs, run_names, strict=True):
            part = band[band["run"] == run_name]
            matrix = part.pivot_table(
                index="layer", columns="step", values="value", aggfunc="first", dropna=False
            )
            matrix = matrix.reindex(index=layer_names)
            steps = [int(s) for s in matrix.columns]
            image = ax.imshow(
                np.ma.masked_invalid(matrix.to_numpy(dtype="float64")),
                aspect="auto",
                interpolation="nearest",
                cmap=colormap,
                norm=norm,
            )
            ticks = np.unique(np.linspace(0, max(len(steps) - 1, 0), min(len(steps), 6)).round())
            ax.set_xticks(ticks.astype(int), [str(steps[int(t)]) for t in ticks] if steps else [])
            ax.set_yticks(range(len(layer_names)), layer_names)
            ax.grid(False)
            ax.set_title(run_name or "(unnamed)")
            ax.set_xlabel("optimizer step")
        if image is not None:
            fig.colorbar(image, ax=axs, label=f"ICS: {quantity} W1", shrink=0.95)
        if created:
            fig.suptitle(f"ICS per layer and step ({view} view)")
    return fig


def _sweep_bounds(variant_rows: pd.DataFrame) -> list[str]:
    """A variant's bounds drawn: its first normalization bound (U1 if none), tight forms."""
    present = set(variant_rows["quantity"].astype(str))
    first = [next((q for q in (*NORM_BOUNDS, "U1") if q in present), None)]
    tight = sorted(q for q in present if q.endswith("_tight"))
    return [q for q in first if q is not None] + [q for q in tight if q not in first]


def _seed_band(rows: pd.DataFrame) -> pd.DataFrame:
    """Per width: the mean over seeds of each seed's mean value, and the seeds' range."""
    per_seed = rows.groupby(["dim", "seed"])["value"].mean()
    return per_seed.groupby("dim").agg(["mean", "min", "max"])


def plot_bounds_vs_dim(
    sweep_df: pd.DataFrame,
    *,
    batch_sizes: Sequence[int] | None = None,
    measured: str = "exact",
    axes: Any = None,
) -> Figure:
    """Measured ICS and the normalization bounds against the width d, log-log.

    One panel per variant (BatchNorm, Unitization at alpha 0 and 1, ...), sharing the y
    axis: per training batch size (colour), the measured W1 (solid) and the variant's
    bound (dashed: U3 for BatchNorm, U4 for Unitization with alpha = 1, else U5;
    tight forms such as ``U3_tight`` dash-dotted), each the mean over seeds with the
    seeds' range shaded, and a dotted ``c * sqrt(d)`` reference line fitted to the
    first variant's bound. Slopes with intervals: :func:`ics_toolkit.report.fit_slopes`.

    Parameters
    ----------
    sweep_df : pandas.DataFrame
        The table written by :func:`ics_toolkit.experiments.sweep_dim` (columns
        ``variant``, ``dim``, ``quantity``, ``value``; ``batch_size`` and ``seed`` if
        several).
    batch_sizes : sequence of int, optional
        Batch sizes to draw (default: all).
    measured : str
        The quantity drawn as the measured W1.
    axes : Axes or array of Axes, optional
        Draw into these (one per variant).

    Returns
    -------
    matplotlib.figure.Figure
        One axes per variant, a line per batch size and quantity, and the reference.

    Raises
    ------
    ICSValueError
        A required column is missing, the table holds no ``measured`` values, or a
        batch size asked for is not in it.
    """
    check_columns(sweep_df, ("variant", "dim", "quantity", "value"), "sweep_df")
    df = sweep_df.copy()
    for column in ("batch_size", "seed"):
        if column not in df.columns:
            df[column] = 0
    df["variant"] = df["variant"].astype(str)
    df["quantity"] = df["quantity"].astype(str)
    df["value"] = df["value"].astype("float64")
    if not (df["quantity"] == measured).any():
        raise ICSValueError(
            f"`sweep_df` has no {measured!r} rows; quantities present: "
            f"{sorted(set(df['quantity']))}"
        )
    levels = sorted(set(df["batch_size"]))
    if batch_sizes is not None:
        missing = [b for b in batch_sizes if b not in levels]
        if missing:
            raise ICSValueError(f"`batch_sizes` {missing} not in the table; present: {levels}")
        levels = list(batch_sizes)
    labelled = "batch_size" in sweep_df.columns
    variants = order_runs(df["variant"])
    # the sqrt(d) reference: c = median of bound / sqrt(d) of the first variant with a bound
    ref_c = None
    for v in variants:
        rows = df[df["variant"] == v]
        names = _sweep_bounds(rows)
        if names:
            b = rows[(rows["quantity"] == names[0]) & rows["batch_size"].isin(levels)]
            b = b[b["value"] > 0]
            if len(b):
                ref_c = float(np.median(b["value"] / np.sqrt(b["dim"].astype(float))))
                break
    dims = np.array(sorted(set(df["dim"].astype(float))))
    with _style_context():
        fig, axs, created = _panels(
            len(variants), ncols=None, axes=axes, sharey=True, grid=(1, len(variants))
        )
        for ax, v in zip(axs, variants, strict=True):
            rows = df[df["variant"] == v]
            names = _sweep_bounds(rows)
            styles = [
                (measured, "-"),
                *((q, "--" if i == 0 else "-.") for i, q in enumerate(names)),
            ]
            for i, level in enumerate(levels):
                st = series_style(i)
                at = rows[rows["batch_size"] == level]
                for name, ls in styles:
                    line = _seed_band(at[at["quantity"] == name])
                    if line.empty:
                        continue
                    x = line.index.to_numpy(dtype="float64")
                    ax.plot(
                        x,
                        line["mean"].to_numpy(),
                        color=st["color"],
                        marker=st["marker"],
                        linestyle=ls,
                        label=(f"batch {level}" if labelled else measured)
                        if ls == "-"
                        else "_nolegend_",
                    )
                    if (line["max"] > line["min"]).any():
                        ax.fill_between(
                            x, line["min"], line["max"], color=st["color"], alpha=0.12, lw=0
                        )
            if ref_c is not None and dims.size:
                ax.plot(
                    dims,
                    ref_c * np.sqrt(dims),
                    color="0.2",
                    linestyle=":",
                    linewidth=1.6,
                    label="c·√d reference",
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            if dims.size:
                ticks = dims if dims.size <= 7 else dims[:: math.ceil(dims.size / 7)]
                ax.set_xticks(ticks, [f"{int(t)}" for t in ticks])
                ax.minorticks_off()
            said = [f"{measured} solid", *(f"{q} {'dashed' if i == 0 else 'dash-dot'}"
                                           for i, q in enumerate(names))]  # fmt: skip
            ax.set_title(f"{v}\n{', '.join(said)}", fontsize="medium")
            ax.set_xlabel("width d")
        axs[0].set_ylabel("W1 and its bounds")
        if created:
            fig.suptitle(
                "ICS and its bounds versus width d (mean over seeds, band: the seeds' range)"
            )
        _legend(fig, axs, created, ncols=min(len(levels) + 1, 5))
    return fig


def check_formats(formats: Sequence[str], argument: str = "`formats`") -> tuple[str, ...]:
    """Check figure formats against what matplotlib can write; returns them lower-cased.

    Parameters
    ----------
    formats : sequence of str
        File formats such as ``("png", "svg")`` (a leading dot is accepted).
    argument : str
        How an error message names the option.

    Returns
    -------
    tuple of str
        The formats, without dots, lower-cased, each once.

    Raises
    ------
    ICSValueError
        A format matplotlib cannot write (the message lists those it can), or a
        value that is not a string.

    Examples
    --------
    >>> check_formats(["PNG", ".svg"])
    ('png', 'svg')
    """
    from matplotlib.backend_bases import FigureCanvasBase

    if isinstance(formats, str):
        formats = [formats]
    supported = FigureCanvasBase.get_supported_filetypes()
    out = []
    for fmt in formats:
        name = fmt.strip().lstrip(".").lower() if isinstance(fmt, str) else None
        if name not in supported:
            raise ICSValueError(
                f"{argument}: matplotlib cannot write the format {fmt!r}; choose from "
                f"{', '.join(sorted(supported))}"
            )
        out.append(name)
    return tuple(dict.fromkeys(out))


def save_figure(
    fig: Figure,
    path: str | os.PathLike[str],
    *,
    formats: Sequence[str] = ("png", "svg"),
    dpi: int = 100,
) -> list[Path]:
    """Write ``fig`` once per format: ``path`` with each suffix (parents created).

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        The figure.
    path : str or Path
        Target path; a suffix among ``formats`` is replaced, any other kept as part of
        the name.
    formats : sequence of str
        File formats, e.g. ``("png", "svg")``, ``("pdf",)``.
    dpi : int
        Resolution of raster formats.

    Returns
    -------
    list of Path
        The files written.
    """
    if not formats:
        raise ICSValueError("`formats` is empty; pass e.g. ('png', 'svg')")
    formats = check_formats(formats)
    p = Path(path)
    if p.suffix.lstrip(".").lower() in {f.lower() for f in formats}:
        p = p.with_suffix("")
    if p.exists() and p.is_dir():
        raise ICSValueError(f"`path` {str(p)!r} is a folder; pass a file name stem")
    p.parent.mkdir(parents=True, exist_ok=True)
    out = []
    engine = fig.get_layout_engine()
    try:
        with _style_context():
            for i, fmt in enumerate(formats):
                target = p.parent / f"{p.name}.{fmt}"
                fig.savefig(target, format=fmt, dpi=dpi)
                out.append(target)
                if i == 0 and engine is not None and len(formats) > 1:
                    # the layout (constrained: several extra draws) is in figure
                    # fractions, the same for every format: computed once, kept
                    fig.set_layout_engine("none")
    finally:
        if engine is not None and fig.get_layout_engine() is not engine:
            fig.set_layout_engine(engine)
    return out
