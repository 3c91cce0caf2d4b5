"""The tidy results table: its columns, incremental writing, and reading back.

One row is one number: ``value`` of ``quantity`` for ``layer`` seen through ``view``
at optimizer step ``step`` (the shift caused by the update from step t to t+1 is
filed under t). Plots and summaries are functions of this table only.

Results are written as they are measured, one part file per measured step, each
written to a temporary name and renamed into place, so a crash loses at most the
step in flight and a reader never sees half a part.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from ics_toolkit import _vocab
from ics_toolkit.errors import ICSValueError

__all__ = ["COLUMNS", "KINDS", "ResultWriter", "load_results", "to_wide"]

#: Columns of the results table, in order, with their pandas dtypes. Text columns are
#: plain ``object`` columns (missing = None), so ``df[df.layer == "bn1"]`` and
#: ``df.quantity.isin([...])`` give ordinary boolean masks on every pandas version.
COLUMNS: dict[str, str] = {
    "run": "object",  # one monitor's results (several runs can share a folder)
    "step": "Int64",  # the optimizer step t whose update t -> t+1 was measured
    "layer": "object",  # capture key: module name as named_modules() spells it (+ "#k")
    "view": "object",  # flatten | pixel | channel | param; NA for step-level events
    "quantity": "object",  # a wasserstein method, a bound (U1..U5, L1..L3), floor_*, drift_*
    "value": "float64",
    "kind": "object",  # estimate | lower | upper | floor | drift | gradient | event
    "n_samples": "Int64",  # samples per distribution
    "dim": "Int64",  # dimension d of a sample
    "n_projections": "Int64",  # random directions (sliced, max_sliced, L3)
    "seed": "Int64",
    "solver_status": "object",  # optimal | max_iter_reached | ... (exact, sinkhorn)
    "wall_time_s": "float64",  # seconds spent computing this value
    "bounds_hold": "boolean",  # lower bounds <= exact <= upper bounds for this row's group
    "violations": "object",  # the failed inequalities of the group, "; "-separated
    "warning": "object",
}

#: Values of the ``kind`` column.
KINDS = _vocab.KINDS

_PART = re.compile(r"^part-.+\.(csv|parquet)$")


def _frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows (dicts with any subset of COLUMNS) to a DataFrame with every column typed."""
    df = pd.DataFrame(list(rows))
    unknown = sorted(set(df.columns) - set(COLUMNS))
    if unknown:
        raise ICSValueError(f"result rows have unknown columns {unknown}; known: {list(COLUMNS)}")
    for name, dtype in COLUMNS.items():
        if name not in df.columns:
            df[name] = pd.Series([None] * len(df), index=df.index, dtype=dtype)
        elif dtype == "object":
            col = df[name].astype(object)
            df[name] = col.where(col.notna(), None)
        else:
            df[name] = df[name].astype(dtype)
    return df[list(COLUMNS)]


class ResultWriter:
    """Append result rows to a folder, one atomically written part file per call.

    Parameters
    ----------
    path : str or Path
        Folder to write into (created if missing). Parts of earlier runs in it are
        kept; each writer names its parts after its own ``run``.
    format : {"csv", "parquet"}
        File format of the parts (parquet needs pyarrow: ``pip install
        "ics-toolkit[parquet]"``).
    run : str, optional
        Label of this run (default: a short random id).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        format: Literal["csv", "parquet"] = "csv",
        run: str | None = None,
    ) -> None:
        if format not in ("csv", "parquet"):
            raise ICSValueError(f"`format` must be 'csv' or 'parquet', got {format!r}")
        if format == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ICSValueError(
                    "format='parquet' needs pyarrow: pip install 'ics-toolkit[parquet]', "
                    "or use format='csv'"
                ) from None
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ICSValueError(f"`path` {str(self.path)!r} is a file; pass a folder for the parts")
        self.path.mkdir(parents=True, exist_ok=True)
        self.format = format
        self.run = run if run is not None else uuid.uuid4().hex[:8]
        if not re.fullmatch(r"[A-Za-z0-9_.=-]+", self.run):
            raise ICSValueError(
                f"`run` {self.run!r} may hold only letters, digits and _ . = - "
                "(it becomes part of file names)"
            )
        self._count = 0

    def write(self, rows: Sequence[Mapping[str, Any]]) -> Path | None:
        """Write ``rows`` as the next part; returns its path (None for no rows).

        Rows without a ``run`` entry are filed under this writer's ``run``.
        """
        if not rows:
            return None
        df = _frame({"run": self.run, **row} for row in rows)
        name = f"part-{self.run}-{self._count:06d}.{self.format}"
        final = self.path / name
        tmp = self.path / f".{name}.tmp"
        if self.format == "csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)
        os.replace(tmp, final)  # atomic: readers see the whole part or none
        self._count += 1
        return final


def load_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read results written by a monitor, including those of a run that died.

    Parameters
    ----------
    path : str or Path
        A results folder (all ``part-*.csv`` / ``part-*.parquet`` files in it are
        read; unfinished temporary parts are ignored) or a single CSV or Parquet file
        such as the ``results.csv`` written by ``ics-toolkit run``.

    Returns
    -------
    pandas.DataFrame
        The tidy table with the columns of :data:`COLUMNS`, typed, ordered by run
        and step.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if _PART.match(f.name))
        if not files:
            raise ICSValueError(f"no result parts (part-*.csv or part-*.parquet) in {str(p)!r}")
    elif p.is_file():
        files = [p]
    else:
        raise ICSValueError(f"`path` {str(p)!r} does not exist")
    frames = []
    for f in files:
        if f.suffix == ".parquet":
            frames.append(pd.read_parquet(f))
        elif f.suffix == ".csv":
            # text columns stay text: a layer named "1" must not come back as 1.0
            text = {c: str for c, t in COLUMNS.items() if t == "object"}
            frames.append(pd.read_csv(f, dtype=text))
        else:
            raise ICSValueError(f"cannot read {str(f)!r}: expected a .csv or .parquet file")
    df = _frame(pd.concat(frames, ignore_index=True).to_dict("records"))
    df = df.sort_values(["run", "step"], kind="stable", na_position="first")
    return df.reset_index(drop=True)


def to_wide(
    df: pd.DataFrame,
    index: Sequence[str] = ("run", "step", "layer", "view"),
    columns: str = "quantity",
) -> pd.DataFrame:
    """Pivot the tidy table to one row per (run, step, layer, view), one column per quantity.

    Parameters
    ----------
    df : pandas.DataFrame
        The tidy table (from ``ICSMonitor.results()`` or :func:`load_results`).
    index : sequence of str
        Columns that identify a row of the wide table.
    columns : str
        Column whose values become the new columns.

    Returns
    -------
    pandas.DataFrame
        Values of ``value``; a missing combination is NaN.
    """
    missing = [c for c in (*index, columns, "value") if c not in df.columns]
    if missing:
        raise ICSValueError(f"`df` lacks the columns {missing}; pass the tidy results table")
    keys = [*index, columns]
    wide = df.groupby(keys, dropna=False, sort=False)["value"].first().unstack(columns)
    wide.columns.name = None
    return wide.reset_index()
