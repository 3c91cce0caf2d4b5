"""Summary tables of a results table: per variant and layer, what the ICS run showed.

The results table (:data:`ics_toolkit.results.COLUMNS`, one number per row) is
condensed in three steps:

- :func:`bound_band`: one row per (run, step, layer) with the ICS estimate, the best
  (largest) lower bound, the best (smallest) upper bound, the sampling floor and
  whether the bounds held; the plots draw this table.
- :func:`summary`: one row per (run, layer, view): mean ICS of every estimator,
  bound tightness, the fraction of measured steps whose bounds held, and the mean of
  every other quantity measured.
- :func:`summary_markdown`: the ``summary.md`` report, a table per variant (written
  by hand: no ``tabulate`` dependency).

:func:`fit_slopes` condenses the table of the dimension sweep (``sweep.csv``) into
log-log slopes against the width ``d``, per seed, with an interval over seeds.

Rows of sketched layers (view ``"sketch"``, ``ICSMonitor(sketch=k)``) are read as the
flatten view of their layer: the ICS estimate is the rescaled ``exact_jl`` with its
stated relative error ``sqrt(ln(2n) / k)``, the bounds computed on the sketch that are
lower bounds of the true W1 (its exact W1, L1..L3, ``sliced``, ``max_sliced``) are
reported as lower bounds, and its upper bounds (``paired``, U1, U2), which bound only
the sketch's W1, are never reported as bounds (``docs/theory.md``, section 9).

Importing this module imports pandas, never matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ics_toolkit import _vocab
from ics_toolkit.bounding import LOWER_BOUNDS, UPPER_BOUNDS
from ics_toolkit.errors import ICSValueError

__all__ = [
    "ESTIMATORS",
    "NORM_BOUNDS",
    "RUN_ORDER",
    "bound_band",
    "check_columns",
    "default_quantity",
    "fit_slopes",
    "markdown_table",
    "order_layers",
    "order_runs",
    "summary",
    "summary_markdown",
]

#: ICS estimators, in the order reports show them (``wasserstein`` methods).
ESTIMATORS: tuple[str, ...] = _vocab.ESTIMATORS

#: Normalization kinds, in the order reports and plots list variants; other run names
#: follow in order of appearance. A variant ``"unitization=1"`` sorts with its kind.
RUN_ORDER: tuple[str, ...] = ("batch", "unitization", "group", "layer", "none")

#: The normalization layers' own upper bounds (U3 BatchNorm in the paper's form, U3_tight
#: with the measured second moments, U4 unitized, U5 the authors' layer). The ``norm
#: bound`` of a row is the smallest present: U3_tight for BatchNorm, so that it is
#: compared with U5 (whose BatchNorm part has U3_tight's form) like with like.
NORM_BOUNDS: tuple[str, ...] = _vocab.NORM_BOUNDS

_REQUIRED = ("step", "layer", "view", "quantity", "value")

#: View of the rows of sketched layers, and their estimate of the true W1 (shift.py).
_SKETCH = "sketch"
_JL = _vocab.EXACT_JL
#: What a sketched row reports for a requested quantity: the JL estimate for the exact
#: W1; the sketch's own relative ICS, exact / scale, equal to the table's
#: ``relative_exact_jl`` (exact_jl / the JL-rescaled scale) since the rescaling
#: cancels. Other estimators
#: of the sketch are not estimates of the layer's (sliced W1 in R^k is not the sliced
#: W1 in R^d), so they are NaN.
_SKETCH_ESTIMATES = {
    "exact": _JL,
    _JL: _JL,
    _vocab.relative_name("exact"): _vocab.relative_name("exact"),
    _vocab.relative_name(_JL): _vocab.relative_name("exact"),
}


def check_columns(df: Any, required: Iterable[str], argument: str = "df") -> None:
    """Raise ICSValueError naming the columns of ``required`` that ``df`` lacks."""
    if not isinstance(df, pd.DataFrame):
        raise ICSValueError(
            f"`{argument}` must be a pandas DataFrame (the tidy results table), got "
            f"{type(df).__name__}"
        )
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ICSValueError(
            f"`{argument}` lacks the column(s) {missing}; pass the tidy results table "
            "(ICSMonitor.results() or ics_toolkit.load_results(...))"
        )


def _runs_column(df: pd.DataFrame) -> pd.Series:
    """The run label of every row; a missing ``run`` column or NA means ``""``."""
    if "run" not in df.columns:
        return pd.Series([""] * len(df), index=df.index, dtype="object")
    return df["run"].astype("object").where(df["run"].notna(), "")


def _kind_of(run: str) -> str:
    return run.split("=", 1)[0]


def order_runs(runs: Iterable[str]) -> list[str]:
    """Unique run names, known normalization kinds first (:data:`RUN_ORDER`).

    Examples
    --------
    >>> order_runs(["none", "run7", "unitization", "batch", "none"])
    ['batch', 'unitization', 'none', 'run7']
    """
    unique = list(dict.fromkeys(str(r) for r in runs))
    rank = {name: i for i, name in enumerate(RUN_ORDER)}

    def key(item: tuple[int, str]) -> tuple[int, int]:
        pos, name = item
        return (rank.get(_kind_of(name), len(RUN_ORDER)), pos)

    return [name for _, name in sorted(enumerate(unique), key=key)]


def order_layers(layers: Iterable[Any]) -> list[str]:
    """Unique layer names in order of first appearance (the model's order in a results table).

    Examples
    --------
    >>> order_layers(["features.1", "features.4", "features.11", "features.1"])
    ['features.1', 'features.4', 'features.11']
    """
    return [str(x) for x in dict.fromkeys(x for x in layers if not pd.isna(x))]


def _in_view(views: pd.Series, view: str | None) -> pd.Series:
    """Rows of ``view`` (all for None); ``"flatten"`` takes the sketched layers' rows too.

    A sketch is the flatten view of a wide layer, projected (:mod:`ics_toolkit.sketch`):
    a monitor stores each layer either way, so the two never describe the same layer.
    """
    if view is None:
        return pd.Series(True, index=views.index)
    wanted = (view, _SKETCH) if view == "flatten" else (view,)
    return views.isin(wanted).fillna(False).astype(bool)


def _rows_of(df: pd.DataFrame, view: str | None) -> pd.DataFrame:
    """Measurement rows (events dropped), optionally of one view, with a plain ``run``."""
    out = df.assign(run=_runs_column(df))
    keep = out["layer"].notna() & out["quantity"].notna()
    if view is not None:
        keep &= _in_view(out["view"], view)
    if "kind" in out.columns:
        keep &= (out["kind"] != "event").fillna(True).astype(bool)
    return out.loc[keep.astype(bool)]


def _wide(rows: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per ``keys`` group, one float column per quantity, in the table's order."""
    keys = list(keys)
    first = rows.drop_duplicates([*keys, "quantity"])
    wide = first.set_index([*keys, "quantity"])["value"].astype("float64").unstack("quantity")
    wide.columns = [str(c) for c in wide.columns]
    wide = wide.reset_index()
    # unstack sorts its index; restore the order of first appearance (the model's order)
    order = first.drop_duplicates(keys)[keys].reset_index(drop=True).reset_index(names="_order")
    wide = wide.merge(order, on=keys, how="left").sort_values("_order", kind="stable")
    return wide.drop(columns="_order").reset_index(drop=True)


def _pick(wide: pd.DataFrame, names: Sequence[str], how: str) -> tuple[pd.Series, pd.Series]:
    """Row-wise max (``how="max"``) or min of the columns ``names`` present, and its name."""
    present = [n for n in names if n in wide.columns]
    if not present:
        nan = pd.Series(np.nan, index=wide.index, dtype="float64")
        return nan, pd.Series(pd.NA, index=wide.index, dtype="object")
    block = wide[present].astype("float64")
    values = block.max(axis=1) if how == "max" else block.min(axis=1)
    filled = block.fillna(-np.inf if how == "max" else np.inf)
    names_ = filled.idxmax(axis=1) if how == "max" else filled.idxmin(axis=1)
    names_ = names_.astype("object").where(values.notna(), pd.NA)
    return values, names_


def default_quantity(rows: pd.DataFrame, quantity: str | None = None) -> str:
    """``quantity`` if given, else the first of :data:`ESTIMATORS` present in ``rows``."""
    present = set(rows["quantity"].dropna().astype(str))
    if quantity is not None:
        return quantity
    for q in ESTIMATORS:
        if q in present:
            return q
    raise ICSValueError(
        f"the results hold no ICS estimate ({', '.join(ESTIMATORS)}); quantities present: "
        f"{sorted(present)}"
    )


def bound_band(
    df: pd.DataFrame, *, quantity: str | None = "exact", view: str | None = "flatten"
) -> pd.DataFrame:
    """The ICS estimate with its best bounds, one row per (run, step, layer).

    Parameters
    ----------
    df : pandas.DataFrame
        The tidy results table (needs ``step``, ``layer``, ``view``, ``quantity``,
        ``value``; ``run`` and ``bounds_hold`` are used when present).
    quantity : str or None
        The ICS estimate shown (a :func:`ics_toolkit.wasserstein` method such as
        ``"exact"``); None picks the first of :data:`ESTIMATORS` present.
    view : str or None
        The view (``"flatten"``, ``"pixel"``, ``"channel"``); None keeps every view.
        ``"flatten"`` includes the rows of sketched layers (view ``"sketch"``).

    Returns
    -------
    pandas.DataFrame
        Columns ``run``, ``step``, ``layer``, ``view``, ``value`` (the estimate, in the
        unit of the layer's outputs), ``best_lower`` / ``best_lower_name`` (the
        largest of :data:`ics_toolkit.bounding.LOWER_BOUNDS` present: L1..L3,
        ``sliced``, ``max_sliced``; each <= the exact W1), ``best_upper`` /
        ``best_upper_name`` (the smallest of
        :data:`ics_toolkit.bounding.UPPER_BOUNDS` present: ``paired``, U1..U5; each
        >= the exact W1), ``norm_bound`` / ``norm_bound_name`` (the smallest of the
        normalization layer's own bounds :data:`NORM_BOUNDS` present), ``floor``
        (``floor_<quantity>``, NaN if not measured), ``resolution`` (the storage
        resolution, NaN if not measured) and ``below_resolution`` (the estimate is at
        or below it: unresolved, not a measured shift; NA without a resolution),
        ``bounds_hold`` (NA if not recorded), ``sketch_eps`` (NaN but on sketched
        rows). The estimate itself is not counted as its own bound. Rows are in the
        table's run, step and layer order.

        On a row of a sketched layer (view ``"sketch"``) the estimate of ``"exact"``
        is the rescaled ``exact_jl`` (of ``relative_exact``: the sketch's exact /
        scale, in which the rescaling cancels; of other quantities: NaN), with
        ``sketch_eps`` = ``sqrt(ln(2n) / k)``, the scale of its relative error
        (:func:`ics_toolkit.sketch.jl_epsilon`); ``best_lower`` counts the sketch's
        exact W1 with its lower bounds (all lower bounds of the true W1); the upper
        and normalization bounds are NaN (computed on the sketch, they bound its W1,
        not the layer's); the floor is rescaled like the estimate.

    Examples
    --------
    >>> rows = [("exact", 1.0), ("L1", 0.5), ("L3", 0.75), ("U1", 1.5), ("U3", 2.0)]
    >>> df = pd.DataFrame([{"step": 0, "layer": "bn", "view": "flatten", "quantity": q,
    ...                     "value": v} for q, v in rows])
    >>> band = bound_band(df)
    >>> row = band.iloc[0]
    >>> float(row.best_lower), row.best_lower_name, float(row.best_upper), row.best_upper_name
    (0.75, 'L3', 1.5, 'U1')
    """
    check_columns(df, _REQUIRED)
    rows = _rows_of(df, view)
    quantity = default_quantity(rows, quantity)
    keys = ["run", "step", "layer", "view"]
    if rows.empty:
        return pd.DataFrame(
            columns=[
                *keys,
                "value",
                "best_lower",
                "best_lower_name",
                "best_upper",
                "best_upper_name",
                "norm_bound",
                "norm_bound_name",
                "floor",
                "resolution",
                "below_resolution",
                "bounds_hold",
                "sketch_eps",
            ]
        )
    wide = _wide(rows, keys)
    out = wide[keys].copy()
    out["value"] = wide[quantity] if quantity in wide.columns else np.nan
    lows = [q for q in LOWER_BOUNDS if q != quantity]
    highs = [q for q in UPPER_BOUNDS if q != quantity]
    out["best_lower"], out["best_lower_name"] = _pick(wide, lows, "max")
    out["best_upper"], out["best_upper_name"] = _pick(wide, highs, "min")
    out["norm_bound"], out["norm_bound_name"] = _pick(wide, NORM_BOUNDS, "min")
    floor = f"floor_{quantity}"
    out["floor"] = wide[floor] if floor in wide.columns else np.nan
    out["resolution"], out["below_resolution"] = _resolved(out["value"], wide)
    if "bounds_hold" in rows.columns:
        hold = rows.groupby(keys, sort=False, dropna=False)["bounds_hold"].agg(
            lambda s: bool(s.dropna().all()) if s.notna().any() else pd.NA
        )
        out = out.merge(
            hold.rename("bounds_hold").reset_index(), on=keys, how="left", validate="one_to_one"
        )
    else:
        out["bounds_hold"] = pd.NA
    out["sketch_eps"] = np.nan
    sketched = (wide["view"] == _SKETCH).to_numpy()
    if sketched.any():
        _sketch_band(out, wide, rows, quantity, sketched)
    out["step"] = out["step"].astype("Int64")
    return out.reset_index(drop=True)


def _jl_epsilon(n: Any, k: Any) -> float:
    """:func:`ics_toolkit.sketch.jl_epsilon` (not imported: that module imports torch)."""
    if pd.isna(n) or pd.isna(k) or int(n) < 1 or int(k) < 1:
        return math.nan
    return math.sqrt(math.log(2 * int(n)) / int(k))


def _sketch_band(
    out: pd.DataFrame, wide: pd.DataFrame, rows: pd.DataFrame, quantity: str, sketched: Any
) -> None:
    """Read the rows of sketched layers as estimates of the true W1, in place.

    ``out`` and ``wide`` share their index; ``sketched`` marks the sketch rows.
    """
    at = out.index[sketched]
    source = _SKETCH_ESTIMATES.get(quantity)
    out.loc[at, "value"] = wide.loc[at, source] if source in wide.columns else np.nan
    # the sketch's exact W1 is a lower bound of the true W1 (a contraction), so it counts
    low, low_name = _pick(wide.loc[at], [*LOWER_BOUNDS, "exact"], "max")
    out.loc[at, "best_lower"], out.loc[at, "best_lower_name"] = low, low_name
    for col in ("best_upper", "norm_bound"):  # bounds of the sketch's W1 only
        out.loc[at, col] = np.nan
        out.loc[at, f"{col}_name"] = pd.NA
    floor: Any = np.nan
    if source == _JL and {"exact", _JL, "floor_exact"} <= set(wide.columns):
        ratio = (wide.loc[at, _JL] / wide.loc[at, "exact"]).astype("float64")  # sqrt(d'/k)
        floor = wide.loc[at, "floor_exact"] * ratio.where(np.isfinite(ratio))
    out.loc[at, "floor"] = floor
    if {"n_samples", "dim"} <= set(rows.columns):
        keys = ["run", "step", "layer", "view"]
        exact = (rows["view"] == _SKETCH) & (rows["quantity"] == "exact")
        sizes = rows.loc[exact, [*keys, "n_samples", "dim"]]
        sizes = out.loc[at, keys].merge(sizes.drop_duplicates(keys), on=keys, how="left")
        eps = [_jl_epsilon(n, k) for n, k in zip(sizes["n_samples"], sizes["dim"], strict=True)]
        out.loc[at, "sketch_eps"] = eps


def _resolved(value: pd.Series, wide: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """The storage resolution per row of ``wide`` and whether ``value`` is at or below it."""
    if _vocab.RESOLUTION not in wide.columns:
        nan = pd.Series(np.nan, index=wide.index, dtype="float64")
        return nan, pd.Series(pd.NA, index=wide.index, dtype="boolean")
    res = wide[_vocab.RESOLUTION].astype("float64")
    below = (value.astype("float64") <= res).astype("boolean")
    return res, below.where(res.notna() & value.notna(), pd.NA)


def summary(df: pd.DataFrame, *, quantity: str | None = None) -> pd.DataFrame:
    """Condense a results table: one row per run (variant), layer and view.

    Parameters
    ----------
    df : pandas.DataFrame
        The tidy results table (needs ``step``, ``layer``, ``view``, ``quantity``,
        ``value``; uses ``run``, ``dim`` and ``bounds_hold`` when present).
    quantity : str or None
        The ICS estimate that tightness and the floor comparison use; None picks the
        first of :data:`ESTIMATORS` present (``"exact"`` when measured).

    Returns
    -------
    pandas.DataFrame
        Index columns ``run``, ``layer``, ``view``; then

        - ``dim``: the dimension d of a sample; ``n_steps``: measured steps;
        - ``ics``: mean of ``quantity`` over the steps, ``ics_max``, ``ics_last``
          (at the last measured step); ``quantity`` names the estimator;
        - ``best_lower``, ``best_upper``: means of the per-step best bounds;
          ``best_lower_name``, ``best_upper_name``: the bound that was best most often;
        - ``upper_tightness``: mean of ``ics / best_upper`` (in [0, 1]; 1 means the
          upper bound equals the estimate), ``lower_tightness``: mean of
          ``best_lower / ics`` (in [0, 1]; 1 is tight). NaN where undefined;
        - ``norm_bound``, ``norm_bound_name``, ``norm_tightness``: the same for the
          normalization layer's own bound (the smallest of U3_tight, U3, U4 and U5
          present: U3_tight for BatchNorm; NaN for other layers);
        - ``floor``: mean sampling floor ``floor_<quantity>``; ``frac_above_floor``:
          share of steps whose ICS exceeds the floor;
        - ``resolution``: mean storage resolution; ``frac_below_resolution``: share of
          steps whose ICS is at or below it (unresolved: rounding of the stored outputs
          alone could produce it; NaN without a resolution row);
        - ``bounds_hold_frac``: share of measured steps whose bounds held (every lower
          bound <= exact <= every upper bound); ``n_violations``: steps that failed;
        - ``mean_<q>``: the mean over steps of every other quantity measured (each
          estimator, L1..L3, U1..U5, floors, moment drift, gradient ICS, ...);
        - ``sketch_eps``: on the rows of sketched layers (view ``"sketch"``), the
          stated relative error ``sqrt(ln(2n) / k)`` of ``ics``, there the rescaled
          ``exact_jl`` (see :func:`bound_band`); NaN on the other rows. There
          ``mean_<q>`` are the sketch's own quantities (``mean_exact``: its exact W1,
          a lower bound of ICS), and those of upper bounds (``paired``, U1, U2 and
          their relative values and intervals) are NaN: they bound the sketch's W1,
          not ICS.

    Examples
    --------
    >>> rows = [(s, q, v) for s in (0, 1) for q, v in (("exact", 1.0 + s), ("U1", 2.0 + s))]
    >>> df = pd.DataFrame([{"step": s, "layer": "bn", "view": "flatten", "quantity": q,
    ...                     "value": v} for s, q, v in rows])
    >>> row = summary(df).iloc[0]
    >>> float(row["ics"]), float(row["upper_tightness"]), int(row["n_steps"])
    (1.5, 0.5833333333333333, 2)
    """
    check_columns(df, _REQUIRED)
    rows = _rows_of(df, None)
    keys = ["run", "layer", "view"]
    if rows.empty:
        raise ICSValueError("`df` holds no measurement rows (only events, or nothing)")
    quantity = default_quantity(rows, quantity)
    band = bound_band(df, quantity=quantity, view=None)
    band["upper_ratio"] = band["value"] / band["best_upper"]
    band["lower_ratio"] = band["best_lower"] / band["value"]
    band["norm_ratio"] = band["value"] / band["norm_bound"]
    for col in ("upper_ratio", "lower_ratio", "norm_ratio"):
        band.loc[~np.isfinite(band[col].astype("float64")), col] = np.nan
    band["above_floor"] = (band["value"] > band["floor"]).where(band["floor"].notna())

    def mode(s: pd.Series) -> Any:
        s = s.dropna()
        return s.value_counts().index[0] if len(s) else pd.NA

    def last(s: pd.Series) -> float:
        s = s.dropna()
        return float(s.iloc[-1]) if len(s) else math.nan

    grouped = band.groupby(keys, sort=False, dropna=False)
    out = pd.DataFrame(
        {
            "quantity": quantity,
            "n_steps": grouped["step"].nunique(),
            "ics": grouped["value"].mean(),
            "ics_max": grouped["value"].max(),
            "ics_last": grouped["value"].agg(last),
            "best_lower": grouped["best_lower"].mean(),
            "best_lower_name": grouped["best_lower_name"].agg(mode),
            "best_upper": grouped["best_upper"].mean(),
            "best_upper_name": grouped["best_upper_name"].agg(mode),
            "upper_tightness": grouped["upper_ratio"].mean(),
            "lower_tightness": grouped["lower_ratio"].mean(),
            "norm_bound": grouped["norm_bound"].mean(),
            "norm_bound_name": grouped["norm_bound_name"].agg(mode),
            "norm_tightness": grouped["norm_ratio"].mean(),
            "floor": grouped["floor"].mean(),
            "frac_above_floor": grouped["above_floor"].agg(
                lambda s: float(s.dropna().astype(bool).mean()) if s.notna().any() else math.nan
            ),
            "resolution": grouped["resolution"].mean(),
            "frac_below_resolution": grouped["below_resolution"].agg(
                lambda s: float(s.dropna().astype(bool).mean()) if s.notna().any() else math.nan
            ),
            "bounds_hold_frac": grouped["bounds_hold"].agg(
                lambda s: float(s.dropna().astype(bool).mean()) if s.notna().any() else math.nan
            ),
            "n_violations": grouped["bounds_hold"].agg(
                lambda s: int((~s.dropna().astype(bool)).sum())
            ),
            "sketch_eps": grouped["sketch_eps"].mean(),
        }
    )
    if "dim" in rows.columns:
        dims = rows.groupby(keys, sort=False, dropna=False)["dim"].agg(
            lambda s: s.dropna().iloc[0] if s.notna().any() else pd.NA
        )
        out.insert(1, "dim", dims.reindex(out.index).astype("Int64"))
    means = rows.groupby([*keys, "quantity"], sort=False, dropna=False)["value"].mean().unstack()
    means.columns = [f"mean_{c}" for c in means.columns]
    out = out.join(means.reindex(out.index))
    out = out.reset_index()
    _drop_sketch_uppers(out)
    order = {r: i for i, r in enumerate(order_runs(out["run"]))}
    out = out.sort_values("run", key=lambda s: s.map(order), kind="stable")
    return out.reset_index(drop=True)


def _is_upper(column: str) -> bool:
    """Whether ``mean_<q>`` is the mean of an upper bound, its relative value or interval."""
    q = column.removeprefix("mean_").removeprefix("relative_")
    q = q.removesuffix("_ci_low").removesuffix("_ci_high")
    return q in UPPER_BOUNDS or _vocab.quantity_kind(q) == "upper"


def _drop_sketch_uppers(table: pd.DataFrame) -> None:
    """Blank, in place, the sketched rows' means of upper bounds (they bound the sketch only)."""
    sketched = table["view"] == _SKETCH
    if sketched.any():
        uppers = [c for c in table.columns if c.startswith("mean_") and _is_upper(c)]
        table.loc[sketched, uppers] = np.nan


# ---------------------------------------------------------------------- markdown
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "–"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.{digits}g}"
    return str(value)


def _pct(value: Any) -> str:
    if value is None or pd.isna(value):
        return "–"
    return f"{100.0 * float(value):.0f} %"


def markdown_table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None
) -> str:
    r"""A GitHub-flavoured markdown table; cells are formatted with 4 significant digits.

    Parameters
    ----------
    headers : sequence of str
        Column titles.
    rows : iterable of sequences
        Cell values (numbers, strings, None for an empty cell).
    align : str, optional
        One letter per column: ``l``, ``r`` or ``c`` (default: left for the first
        column, right for the others).

    Returns
    -------
    str
        The table, one line per row, ending without a newline.

    Examples
    --------
    >>> print(markdown_table(["layer", "ICS"], [["bn1", 0.123456], ["a|b", None]]))
    | layer | ICS |
    | :--- | ---: |
    | bn1 | 0.1235 |
    | a\|b | – |
    """
    headers = [str(h) for h in headers]
    align = align or ("l" + "r" * (len(headers) - 1))
    if len(align) != len(headers):
        raise ICSValueError(f"`align` needs one letter per column ({len(headers)}), got {align!r}")
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    if set(align) - set(marks):
        raise ICSValueError(f"`align` letters must be l, r or c, got {align!r}")

    def cell(v: Any) -> str:
        text = v if isinstance(v, str) else _fmt(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "| " + " | ".join(marks[a] for a in align) + " |",
    ]
    for row in rows:
        row = list(row)
        if len(row) != len(headers):
            raise ICSValueError(f"a row has {len(row)} cells, the header {len(headers)}")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def summary_markdown(
    df: pd.DataFrame,
    accuracies: Mapping[str, float | None] | None = None,
    *,
    quantity: str | None = None,
    view: str = "flatten",
    title: str = "ICS summary",
    notes: Sequence[str] = (),
    claims: Sequence[str] = (),
) -> str:
    """The ``summary.md`` report: an overview, then a table per variant.

    Parameters
    ----------
    df : pandas.DataFrame
        The tidy results table; ``run`` holds the variant (normalization) name.
    accuracies : mapping of str to float, optional
        Final test accuracy (in [0, 1]) per run; shown per variant.
    quantity : str or None
        The ICS estimate reported (default ``"exact"`` when measured).
    view : str
        The view reported (``"flatten"``: the paper's layer output; it includes the
        sketched layers of an ``ICSMonitor(sketch=k)`` run, reported by the rescaled
        ``exact_jl`` with its stated error and by their lower bounds only).
    title : str
        The level-1 heading.
    notes : sequence of str
        Extra lines printed under the heading (e.g. the command and settings).
    claims : sequence of str
        Markdown blocks placed after the overview (the main job's "Claims" section).

    Returns
    -------
    str
        Markdown text. The overview compares the variants by the *relative* ICS
        (``relative_<quantity>``: ICS divided by the RMS norm of the layer's outputs,
        where measured), as their outputs' scales differ by orders of magnitude. Per
        variant: final accuracy, then one row per layer with the relative and absolute
        ICS, its probe-resampling interval, the other estimators, the best bounds,
        tightness, how often exact = paired (``identity_share`` = 1), how far the
        normalization bound (U3_tight for BatchNorm) lies above ICS and its dominant
        term, the same for the paper's U3 with what sets it (eps, correlation or the
        affine change; where U3 was measured), and the share of steps whose bounds
        held; below it, the coupling and the sampling floor in words.

    Examples
    --------
    >>> rows = [("exact", 1.0), ("L3", 0.5), ("U1", 2.0)]
    >>> df = pd.DataFrame([{"run": "batch", "step": 0, "layer": "bn", "view": "flatten",
    ...                     "quantity": q, "value": v} for q, v in rows])
    >>> text = summary_markdown(df, {"batch": 0.9})
    >>> "## batch" in text and "90.0 %" in text
    True
    """
    table = summary(df, quantity=quantity)
    table = table[_in_view(table["view"], view)]
    if table.empty:
        views = sorted(set(_rows_of(df, None)["view"].dropna().astype(str)))
        raise ICSValueError(f"no rows with view={view!r} in `df`; views present: {views}")
    quantity = str(table["quantity"].iloc[0])
    accuracies = dict(accuracies or {})
    estimators = [
        q
        for q in ESTIMATORS
        if q != quantity and f"mean_{q}" in table and table[f"mean_{q}"].notna().any()
    ]

    out = [f"# {title}", ""]
    out += [*notes, ""] if notes else []
    rel = _vocab.relative_name(quantity)
    has_rel = f"mean_{rel}" in table and table[f"mean_{rel}"].notna().any()
    ci_low, ci_high = (f"mean_{c}" for c in _vocab.ci_names(quantity))
    out += [
        f"ICS of a layer at step t: the Wasserstein-1 distance between its outputs on a fixed "
        f"probe before and after the optimizer step t -> t+1 (estimator `{quantity}`, view "
        f"`{view}`; unit: the layer's output unit). Means are over the measured steps.",
        "",
        "- *relative ICS*: ICS divided by `scale`, the RMS norm sqrt(mean ||X_i||^2) of the "
        "layer's outputs at step t: unchanged when a layer's outputs are rescaled, so variants "
        "are compared by it (BatchNorm outputs have norm about sqrt(d), others can be far "
        "smaller or larger).",
        "- *95 % CI*: the mean limits of a paired bootstrap interval that resamples the probe "
        "inputs (the same ones at both steps; `ics_toolkit.uncertainty`).",
        "- *exact = paired*: share of steps whose optimal plan is the identity "
        "(`identity_share` = 1): the step moved every point less than the gaps between "
        "points, and the cheap `paired` distance (U1) is the exact W1.",
        "- *norm bound / ICS*: how many times the normalization layer's own bound exceeds "
        "ICS, and the term of the bound that dominates it (`ics_toolkit.bound_terms`).",
        "- *U3 (paper) / ICS*: the same for BatchNorm's U3 in the paper's form, "
        "sqrt(2d'(1 - rho)) with d' = max(d, m2(X), m2(Y)), and what sets it: `eps` (U3_eps, "
        "the part d' - (m2(X) + m2(Y))/2 that U3_tight does not have: channels with variance "
        "near or below eps), `correlation` (U3_core, the step's move of the normalized values; "
        "the sqrt(d) cap when the step decorrelates them) or `affine` (U3_gamma, U3_beta).",
        "- *exact / upper*: mean of ICS divided by the best (smallest) upper bound that step; "
        "*lower / exact*: the best (largest) lower bound divided by ICS. 1 = the bound is tight.",
        "- *norm bound*: the normalization layer's own bound (U3_tight BatchNorm, U4 unitized, "
        "U5 Unitization; the smallest measured), from its normalized values and parameters "
        "at both steps. U3_tight is U3 with the measured second moments of the normalized "
        "values, the form U5's BatchNorm part has: BatchNorm and Unitization are compared "
        "tight with tight; U1 (the "
        "paired distance) is usually tight because the same-input coupling is nearly optimal "
        "for small steps.",
        "- *bounds hold*: share of steps where every lower bound <= exact <= every upper bound "
        "(tolerance `ics_toolkit.bounding.RTOL`).",
        "- *unresolved*: an ICS at or below the storage resolution (`resolution`: how far "
        "rounding the stored outputs to the layer's, the capture's and the analysis' dtype "
        "can move W1) could be produced by that rounding alone; it is not shown as a "
        "measured shift.",
        "",
        "## Overview",
        "",
    ]
    runs = order_runs([*table["run"], *accuracies])  # a run may have no measured step
    overview = []
    for run in runs:
        part = table[table["run"] == run]
        overview.append(
            [
                run or "(unnamed)",
                _accuracy(accuracies, run),
                len(part),
                _overview_ics(part, f"mean_{rel}") if has_rel else None,
                _overview_ics(part, "ics"),
                part["norm_tightness"].mean(),
                _pct(part["bounds_hold_frac"].mean()),
            ]
        )
    out.append(
        markdown_table(
            [
                "variant",
                "final test accuracy",
                "layers",
                f"mean relative ICS ({quantity} / scale)",
                f"mean ICS ({quantity}, output units)",
                "mean exact / norm bound",
                "bounds hold",
            ],
            overview,
        )
    )
    for block in claims:
        out += ["", block]
    shares = _identity_shares(df, view)
    for run in runs:
        part = table[table["run"] == run]
        paper_u3 = "mean_U3" in part and part["mean_U3"].notna().any()
        out += ["", f"## {run or '(unnamed)'}", ""]
        steps = int(part["n_steps"].max()) if len(part) else 0
        out += [f"Final test accuracy: {_accuracy(accuracies, run)}. Measured steps: {steps}."]
        if part.empty:
            out.append("No step of this variant was measured (see the events in the results).")
            continue
        out.append("")
        headers = [
            "layer",
            "d",
            "relative ICS",
            f"ICS ({quantity})",
            "95 % CI",
            *estimators,
            "best lower",
            "best upper",
            "norm bound",
            "lower / exact",
            "exact / upper",
            "exact = paired",
            "norm bound / ICS",
            *(["U3 (paper) / ICS"] if paper_u3 else []),
            "bounds hold",
        ]
        body = []
        for _, r in part.iterrows():
            share = shares.get((run, r["layer"]))
            sketched = r["view"] == _SKETCH
            body.append(
                [
                    r["layer"],
                    f"k = {_fmt(r.get('dim'))} (sketch)" if sketched else r.get("dim", None),
                    _unresolved(r, r.get(f"mean_{rel}", None)),
                    _sketch_ics(r) if sketched else _unresolved(r, r["ics"]),
                    "–" if sketched else _interval(r.get(ci_low), r.get(ci_high)),
                    *[None if sketched else r[f"mean_{q}"] for q in estimators],
                    _named(r["best_lower"], r["best_lower_name"]),
                    _named(r["best_upper"], r["best_upper_name"]),
                    _named(r["norm_bound"], r["norm_bound_name"]),
                    r["lower_tightness"],
                    r["upper_tightness"],
                    _pct(share),
                    _looseness(r),
                    *([_looseness(r, "U3")] if paper_u3 else []),
                    _pct(r["bounds_hold_frac"]),
                ]
            )
        out.append(markdown_table(headers, body))
        out += ["", *_sketch_note(part), *_coupling_and_floor(part, shares, run)]
    return "\n".join(out) + "\n"


def _unresolved(r: pd.Series, value: Any) -> Any:
    """An ICS cell: ``value``, or what the storage resolution leaves of it.

    ``"unresolved (<= 0.12)"`` when every measured step was at or below the resolution,
    the value with the share of such steps when some were, the value itself otherwise.
    """
    frac = r.get("frac_below_resolution")
    if frac is None or pd.isna(frac) or not frac > 0 or value is None or pd.isna(value):
        return value
    if frac >= 1:
        return f"unresolved (<= {_fmt(r['resolution'], 2)})"
    return f"{_fmt(value)} ({_pct(frac)} of steps unresolved)"


def _overview_ics(part: pd.DataFrame, column: str) -> Any:
    """A variant's mean ICS over its layers, saying how many were unresolved at every step."""
    value = part[column].mean()
    if "frac_below_resolution" not in part or pd.isna(value):
        return value
    unresolved = int((part["frac_below_resolution"] >= 1).sum())
    if not unresolved:
        return value
    if unresolved == len(part):
        return "unresolved (below storage resolution)"
    return f"{_fmt(value)} ({unresolved} of {len(part)} layers unresolved)"


def _interval(low: Any, high: Any) -> str:
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return "–"
    return f"[{_fmt(low, 3)}, {_fmt(high, 3)}]"


def _identity_shares(df: pd.DataFrame, view: str) -> dict[tuple[str, str], float]:
    """Per (run, layer): share of steps whose exact plan is the identity (sketches: none)."""
    rows = _rows_of(df, view)
    rows = rows[(rows["quantity"] == _vocab.IDENTITY_SHARE) & (rows["view"] != _SKETCH)]
    if rows.empty:
        return {}
    full = rows.assign(full=rows["value"] >= 1 - 1e-9)
    means = full.groupby(["run", "layer"], sort=False)["full"].mean()
    return {(str(k[0]), str(k[1])): float(v) for k, v in means.items()}


#: What each term of U3 says sets the bound (docs/theory.md, "Why the bounds are loose").
_U3_CAUSES = {"U3_core": "correlation", "U3_eps": "eps", "U3_gamma": "affine", "U3_beta": "affine"}


def _looseness(r: pd.Series, name: str | None = None) -> str:
    """``bound / ICS`` and the dominant term of the bound, e.g. ``"5.1 (U5_unit 97 %)"``.

    ``name`` is the bound (default: the row's norm bound, ``norm_bound_name``); U3's
    and U3_tight's dominant term is followed by what it stands for, e.g.
    ``"900 (U3_eps 100 %, eps)"``.
    """
    if name is None:
        name, bound = r.get("norm_bound_name"), r.get("norm_bound")
    else:
        bound = r.get(f"mean_{name}")
    ics = r.get("ics")
    if not isinstance(name, str) or bound is None or pd.isna(bound):
        return "–"
    if ics is None or pd.isna(ics) or not ics > 0:
        return "–"
    text = _fmt(float(bound) / float(ics), 3)
    terms = {t: r.get(f"mean_{t}") for t in _vocab.BOUND_TERMS.get(name, ())}
    terms = {t: float(v) for t, v in terms.items() if v is not None and not pd.isna(v)}
    total = sum(terms.values())
    if terms and total > 0:
        top = max(terms, key=lambda t: terms[t])
        text += f" ({top} {100 * terms[top] / total:.0f} %"
        text += f", {_U3_CAUSES[top]})" if top in _U3_CAUSES else ")"
    return text


def _sketch_ics(r: pd.Series) -> str:
    """A sketched layer's ICS cell: the JL estimate and its stated relative error."""
    eps = r.get("sketch_eps")
    error = f" ± {100 * float(eps):.0f} %" if eps is not None and not pd.isna(eps) else ""
    return f"{_fmt(r['ics'])}{error} (exact_jl)"


def _sketch_note(part: pd.DataFrame) -> list[str]:
    """What the rows of sketched layers report, in words (nothing without them)."""
    sketched = part[part["view"] == _SKETCH]
    if sketched.empty:
        return []
    names = ", ".join(str(x) for x in sketched["layer"])
    return [
        f"Sketched layers ({names}; `ICSMonitor(sketch=k)`, docs/theory.md section 9): ICS is "
        "`exact_jl`, the exact W1 of the k-dimensional sketch times sqrt(d'/k), an estimate "
        "of the true W1 within a relative error of order sqrt(ln(2n)/k) (the ± shown). The "
        "sketch's exact W1, L1..L3, sliced and max_sliced are lower bounds of the true W1 "
        "(the sketch is a contraction) and count as lower bounds; its upper bounds (paired, "
        "U1, U2) bound only the sketch's W1 and are not shown; the other estimators, the "
        "interval and the coupling share are the sketch's and are not shown either. The "
        "floor is rescaled like ICS.",
    ]


def _coupling_and_floor(
    part: pd.DataFrame, shares: Mapping[tuple[str, str], float], run: str
) -> list[str]:
    """The coupling, the sampling floor and the storage resolution of one variant, in words."""
    lines = []
    if "frac_below_resolution" in part and (part["frac_below_resolution"] > 0).any():
        low = part[part["frac_below_resolution"] > 0]
        lines.append(
            "Below storage resolution: "
            + ", ".join(
                f"{layer} ({_pct(f)} of steps, resolution {_fmt(res, 3)})"
                for layer, f, res in zip(
                    low["layer"], low["frac_below_resolution"], low["resolution"], strict=True
                )
            )
            + ". There the ICS is at or below what rounding the stored outputs can move W1 "
            "(`resolution`, docs/theory.md section 5.1): unresolved, not a measured shift. A "
            "wider `capture_dtype` resolves it where the layer itself computes in that width."
        )
    values = [shares[(run, layer)] for layer in part["layer"] if (run, layer) in shares]
    if values:
        lo, hi = min(values), max(values)
        lines.append(
            f"Coupling: exact = paired (the optimal plan is the identity) in {100 * lo:.0f} to "
            f"{100 * hi:.0f} % of the measured steps per layer. There the step moved every "
            "probe point by less than the gaps between points, the same-input coupling is "
            "optimal, and `paired` (U1, one pass over the rows) is the exact W1: use it as the "
            "matching, cheap estimator for such layers."
        )
    if "floor" in part and part["floor"].notna().any():
        lines.append(
            "Sampling floor (mean per layer: "
            + ", ".join(
                f"{layer} {_fmt(v, 3)}"
                for layer, v in zip(part["layer"], part["floor"], strict=True)
                if not pd.isna(v)
            )
            + "): W1 between two random halves of the probe at one step. It is the resolution "
            "of statements about the population of inputs (two independent draws of the same "
            "distribution are this far apart), not an error bar of ICS, which compares the "
            "same inputs at both steps; the 95 % CI above is the uncertainty of ICS."
        )
    return lines


def _accuracy(accuracies: Mapping[str, float | None], run: str) -> str:
    value = accuracies.get(run)
    if value is None:
        return "not measured"
    if math.isnan(float(value)):
        return "diverged"
    return f"{100.0 * float(value):.1f} %"


def _named(value: Any, name: Any) -> str:
    if value is None or pd.isna(value):
        return "–"
    return f"{_fmt(value)} ({name})" if isinstance(name, str) else _fmt(value)


# ---------------------------------------------------------------------- the sweep
def fit_slopes(sweep_df: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """Log-log slopes of a dimension-sweep table against d, per seed, with an interval.

    For every group (``variant``, the noise column ``batch_size`` or ``noise`` where
    the table has one, ``quantity``) and every seed, the least-squares slope of
    log(value) against log(d), fitted to the seed's mean value at each width (only
    positive, finite values; at least two widths). The slope reported is the mean over
    seeds, with the Student-t interval of the per-seed slopes
    (:func:`ics_toolkit.uncertainty.t_interval`). A table without a ``seed`` column is
    one seed: its slope has no interval.

    Parameters
    ----------
    sweep_df : pandas.DataFrame
        The table of :func:`ics_toolkit.experiments.sweep_dim` (columns ``variant``,
        ``dim``, ``quantity``, ``value``; ``batch_size`` / ``noise``, ``seed`` if any).
    level : float
        Level of the interval over seeds.

    Returns
    -------
    pandas.DataFrame
        Columns ``variant``, the noise column(s), ``quantity``, ``slope`` (0.5 means
        growth like sqrt(d), 0 flat in d), ``low``, ``high`` (NaN with fewer than two
        seeds), ``n_seeds``, ``per_seed`` (``"seed: slope"`` joined by commas) and
        ``n_dims`` (the most widths a seed's fit used).

    Examples
    --------
    >>> d = [16, 64, 256]
    >>> df = pd.DataFrame({"variant": "batch", "batch_size": 8, "quantity": "U3",
    ...                    "seed": [0, 0, 0, 1, 1, 1], "dim": d + d,
    ...                    "value": [2.0 * x**0.5 for x in d] + [3.0 * x**0.5 for x in d]})
    >>> out = fit_slopes(df)
    >>> round(float(out["slope"].iloc[0]), 6), int(out["n_seeds"].iloc[0])
    (0.5, 2)
    """
    from ics_toolkit.uncertainty import t_interval

    check_columns(sweep_df, ("variant", "dim", "quantity", "value"), "sweep_df")
    levels = [c for c in ("batch_size", "noise") if c in sweep_df.columns]
    keys = ["variant", *levels, "quantity"]
    df = sweep_df.copy()
    df["value"] = df["value"].astype("float64")
    if "seed" not in df.columns:
        df["seed"] = 0
    records = []
    for group, g in df.groupby(keys, sort=False):
        per_seed: dict[Any, float] = {}
        n_dims = 0
        for s, rows in g.groupby("seed", sort=True):
            rows = rows[(rows["value"] > 0) & np.isfinite(rows["value"])]
            means = rows.groupby("dim")["value"].mean()
            if len(means) < 2:
                continue
            x = np.log(means.index.to_numpy(dtype="float64"))
            per_seed[s] = float(np.polyfit(x, np.log(means.to_numpy()), 1)[0])
            n_dims = max(n_dims, len(means))
        if not per_seed:
            continue
        mean, low, high = t_interval(per_seed.values(), level)
        records.append(
            {
                **dict(zip(keys, group, strict=True)),
                "slope": mean,
                "low": low,
                "high": high,
                "n_seeds": len(per_seed),
                "per_seed": ", ".join(f"{s}: {v:.3f}" for s, v in per_seed.items()),
                "n_dims": n_dims,
            }
        )
    columns = [*keys, "slope", "low", "high", "n_seeds", "per_seed", "n_dims"]
    return pd.DataFrame.from_records(records, columns=columns)
