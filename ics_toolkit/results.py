"""The tidy results table: its columns, incremental writing, and reading back.

One row is one number: ``value`` of ``quantity`` for ``layer`` seen through ``view``
at optimizer step ``step`` (the shift caused by the update from step t to t+1 is
filed under t). Plots and summaries are functions of this table only.

Results are written as they are measured, one part file per measured step, each
written to a temporary name and renamed into place, so a crash loses at most the
step in flight and a reader never sees half a part. Each part's name carries its
row count and checksum, so a part damaged later (truncated by a copy, a full disk,
a bad sector) is detected and skipped by :func:`load_results` with a warning.
:class:`ResultStore` is the monitor's store: rows go to disk as they come, and the
table is read back incrementally.
"""

from __future__ import annotations

import io
import os
import re
import uuid
import warnings
import zlib
from array import array
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from ics_toolkit import _vocab
from ics_toolkit._io import atomic_write
from ics_toolkit.errors import ICSRuntimeWarning, ICSValueError

__all__ = ["COLUMNS", "KINDS", "ResultStore", "ResultWriter", "load_results", "to_wide"]

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
    "below_resolution": "boolean",  # value <= the group's storage resolution (distances)
    "warning": "object",
}

#: Values of the ``kind`` column.
KINDS = _vocab.KINDS

#: Names of result parts. Parts written by :class:`ResultWriter` carry an integrity
#: mark, ``part-<run>-<index>-r<rows>-c<crc32>.<format>``: the number of rows and the
#: CRC-32 of the file's bytes, so a truncated or altered part is detected when read.
#: Parts without the mark (written by version 0.1.0) are read as they are.
_PART = re.compile(
    r"^part-(?P<run>.+)-(?P<index>\d{6,})(?:-r(?P<rows>\d+)-c(?P<crc>[0-9a-f]{8}))?"
    r"\.(?P<format>csv|parquet)$"
)

#: Text columns, read back as text (a layer named "1" must not come back as 1.0).
_TEXT = {c: str for c, t in COLUMNS.items() if t == "object"}


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """A DataFrame with some of COLUMNS to one with every column, typed and in order."""
    unknown = sorted(set(df.columns) - set(COLUMNS))
    if unknown:
        raise ICSValueError(f"result rows have unknown columns {unknown}; known: {list(COLUMNS)}")
    out = {}
    for name, dtype in COLUMNS.items():
        if name not in df.columns:
            out[name] = pd.Series([None] * len(df), index=df.index, dtype=dtype)
        elif dtype == "object":
            col = df[name].astype(object)
            out[name] = col.where(col.notna(), None)
        else:
            out[name] = df[name].astype(dtype)
    return pd.DataFrame(out, index=df.index)


def _frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows (dicts with any subset of COLUMNS) to a DataFrame with every column typed."""
    return _typed(pd.DataFrame(list(rows)))


def _empty() -> pd.DataFrame:
    return _typed(pd.DataFrame({name: [] for name in COLUMNS}))


def _encode(df: pd.DataFrame, format: str) -> bytes:
    if format == "csv":
        return df.to_csv(index=False).encode("utf-8")
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    return buffer.getvalue()


class _Unreadable(Exception):
    """A part or table that cannot be read back (the message says why)."""


def _read_table(f: Path) -> pd.DataFrame:
    """Read one results file (a part, results.csv, results.parquet), typed; checks its mark.

    Raises :class:`_Unreadable` for any file that does not hold a complete results table.
    """
    if f.suffix not in (".csv", ".parquet"):
        raise _Unreadable("expected a .csv or .parquet file")
    try:
        data = f.read_bytes()
    except OSError as err:
        raise _Unreadable(f"{type(err).__name__}: {err.strerror or err}") from None
    if not data:
        raise _Unreadable("the file is empty")
    mark = _PART.match(f.name)
    if mark is not None and mark["crc"] is not None:
        crc = zlib.crc32(data)
        if crc != int(mark["crc"], 16):
            raise _Unreadable(
                f"its content does not match its integrity mark (CRC-32 {crc:08x}, name says "
                f"{mark['crc']}; {len(data)} bytes): the file was truncated or altered"
            )
    try:
        if f.suffix == ".parquet":
            df = pd.read_parquet(io.BytesIO(data))
        else:
            df = pd.read_csv(io.BytesIO(data), dtype=_TEXT)
        df = _typed(df)
    except ICSValueError as err:
        raise _Unreadable(str(err)) from None
    except Exception as err:  # pandas / pyarrow parse errors, bad encodings, bad types
        raise _Unreadable(f"{type(err).__name__}: {' '.join(str(err).split())}") from None
    if mark is not None and mark["rows"] is not None and len(df) != int(mark["rows"]):
        raise _Unreadable(f"it holds {len(df)} rows, its name says {mark['rows']}")
    return df


def _read_or_skip(f: Path, strict: bool) -> pd.DataFrame | None:
    """:func:`_read_table`, with an unreadable file skipped (warning) or raised (strict)."""
    try:
        return _read_table(f)
    except _Unreadable as err:
        if strict:
            raise ICSValueError(f"result file {str(f)!r} is unreadable: {err}") from None
        warnings.warn(
            f"skipped the unreadable result part {str(f)!r}: {err} (load_results(..., "
            "strict=True), or ics-toolkit plot --strict, raises instead)",
            ICSRuntimeWarning,
            stacklevel=3,
        )
        return None


def _read_many(files: Iterable[Path], strict: bool, chunk: int = 256) -> list[pd.DataFrame]:
    """Read parts (skipping or raising on unreadable ones), concatenated ``chunk`` at a time.

    Joining as it goes keeps one small DataFrame per part from piling up: the memory
    a long run's read-back needs stays near the size of the table itself.
    """
    done: list[pd.DataFrame] = []
    batch: list[pd.DataFrame] = []
    for f in files:
        df = _read_or_skip(f, strict)
        if df is not None:
            batch.append(df)
        if len(batch) >= chunk:
            done.append(_concat(batch))
            batch = []
    if batch:
        done.append(_concat(batch))
    return done


def _sort(df: pd.DataFrame) -> pd.DataFrame:
    df = df.sort_values(["run", "step"], kind="stable", na_position="first")
    return df.reset_index(drop=True)


def _concat(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return _empty()
    if len(frames) == 1:
        return frames[0]
    return pd.concat(frames, ignore_index=True)  # typed alike: dtypes are kept


class ResultWriter:
    """Append result rows to a folder, one atomically written part file per call.

    Each part is written to a temporary name and renamed into place, so a reader
    never sees half a part, and carries an integrity mark in its name (its rows and
    the CRC-32 of its bytes; see :func:`load_results`).

    Parameters
    ----------
    path : str or Path
        Folder to write into (created if missing). Parts of earlier runs in it are
        kept; each writer names its parts after its own ``run`` and numbers them
        after the highest part of that ``run`` already there, so nothing is
        overwritten.
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
        taken = [
            int(m["index"]) + 1
            for m in map(_PART.match, _names(self.path))
            if m and m["run"] == self.run
        ]
        self._count = max(taken, default=0)

    def write(self, rows: Sequence[Mapping[str, Any]]) -> Path | None:
        """Write ``rows`` as the next part; returns its path (None for no rows).

        Rows without a ``run`` entry are filed under this writer's ``run``.
        """
        if not rows:
            return None
        df = _frame({"run": self.run, **row} for row in rows)
        data = _encode(df, self.format)
        name = f"part-{self.run}-{self._count:06d}-r{len(df)}-c{zlib.crc32(data):08x}.{self.format}"
        final = atomic_write(self.path / name, data)
        self._count += 1
        return final


def _names(folder: Path) -> list[str]:
    return [f.name for f in folder.iterdir()]


class ResultStore:
    """The result rows of one run: appended as they are measured, read as one table.

    With a ``path``, every :meth:`append` writes its rows as one part file
    (:class:`ResultWriter`) and keeps none of them in memory; :meth:`frame` reads
    the parts written since its last call and appends them to the table it built
    before, so asking for the table every step costs the new rows only (plus one
    copy of the table returned). Rows whose write failed (a full disk) stay in
    memory, are part of :meth:`frame`, and are written with the next append.
    Without a ``path`` the rows stay in memory, typed into the table incrementally.

    Parameters
    ----------
    path : str or Path, optional
        Folder of the parts (see :class:`ResultWriter`); None keeps rows in memory.
    format : {"csv", "parquet"}
        Format of the parts.
    run : str, optional
        Label of the run (``run`` column). With a path, default a random id;
        without, rows keep their own ``run`` entry or None.

    Examples
    --------
    >>> store = ResultStore(run="demo")
    >>> store.append([{"step": 0, "layer": "bn1", "quantity": "exact", "value": 0.5}])
    >>> store.append([{"step": 1, "layer": "bn1", "quantity": "exact", "value": 0.25}])
    >>> store.frame()[["run", "step", "value"]].values.tolist()
    [['demo', 0, 0.5], ['demo', 1, 0.25]]
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        format: Literal["csv", "parquet"] = "csv",
        run: str | None = None,
    ) -> None:
        self.writer = ResultWriter(path, format=format, run=run) if path is not None else None
        self.run: str = self.writer.run if self.writer is not None else (run or "")
        self._pending: list[dict[str, Any]] = []  # rows not yet in a part / in the table
        # parts written and not yet read into the table: their marks, 8 bytes each
        # (rows << 32 | crc), numbered on from self._first; names are rebuilt from them
        self._unread = array("Q")
        self._first = 0
        self._table: pd.DataFrame | None = None  # everything read / typed so far
        self._count = 0
        self._adopted: list[Path] = []  # parts of a resumed run, read at the next frame()

    def __len__(self) -> int:
        """Rows appended since construction or the last :meth:`clear`."""
        return self._count

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Add result rows (dicts with columns of :data:`COLUMNS`).

        With a path they are written as one part now; if the write raises (its error
        propagates), the rows are kept and written with the next append.
        """
        rows = [{"run": self.run or None, **row} for row in rows]
        if not rows:
            return
        self._pending.extend(rows)
        self._count += len(rows)
        if self.writer is not None:
            part = self.writer.write(self._pending)
            self._pending = []
            mark = _PART.match(part.name) if part is not None else None
            if mark is not None:
                if not self._unread:
                    self._first = int(mark["index"])
                self._unread.append(int(mark["rows"]) << 32 | int(mark["crc"], 16))

    def frame(self) -> pd.DataFrame:
        """The whole table (a new DataFrame, :data:`COLUMNS`), in the order appended.

        Parts written since the last call are read (an unreadable part is skipped
        with an :class:`~ics_toolkit.errors.ICSRuntimeWarning`); earlier ones are not
        read again.
        """
        new = _read_many(self._adopted + self._unread_parts(), strict=False)
        self._unread, self._adopted = array("Q"), []
        if self.writer is None and self._pending:
            new.append(_frame(self._pending))
            self._pending = []
        if new:
            self._table = _concat([self._table if self._table is not None else _empty(), *new])
        table = self._table if self._table is not None else _empty()
        if self._pending:  # rows of a failed write
            return _concat([table, _frame(self._pending)]).copy()
        return table.copy()

    def _unread_parts(self) -> list[Path]:
        w = self.writer
        if w is None:
            return []
        return [
            w.path
            / f"part-{w.run}-{self._first + i:06d}-r{m >> 32}-c{m & 0xFFFFFFFF:08x}.{w.format}"
            for i, m in enumerate(self._unread)
        ]

    def clear(self) -> None:
        """Forget every row (part files on disk are kept; new parts are numbered on)."""
        self._pending, self._unread, self._table, self._adopted = [], array("Q"), None, []
        self._count = 0

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to go on (see :meth:`resume`), in plain Python values.

        With a path: the run and the number of parts written (the rows are on disk).
        Without: the run and the rows themselves.
        """
        if self.writer is not None:
            return {"run": self.run, "parts": int(self.writer._count), "rows": []}
        rows = [
            {k: _plain(v) for k, v in row.items() if not _missing(v)}
            for row in self.frame().to_dict("records")
        ]
        return {"run": self.run, "parts": None, "rows": rows}

    def resume(self, state: Mapping[str, Any]) -> None:
        """Continue the run that :meth:`state` described, in place of this store's rows.

        With a path, parts of that run numbered at or past the saved count were written
        after the checkpoint, for steps the resumed run measures again: they are renamed
        ``superseded-part-...`` (kept, no longer read by :func:`load_results`); the
        earlier parts are read into the table and new parts are numbered after them.
        """
        self.clear()
        run = state.get("run") or self.run
        self.run = run
        if self.writer is not None:
            self.writer.run = run
            parts = int(state.get("parts") or 0)
            for name in sorted(_names(self.writer.path)):
                mark = _PART.match(name)
                if not mark or mark["run"] != run:
                    continue
                path = self.writer.path / name
                if int(mark["index"]) >= parts:
                    path.rename(path.with_name("superseded-" + name))
                else:
                    self._adopted.append(path)
                    self._count += int(mark["rows"]) if mark["rows"] else 0
            self.writer._count = parts
        self.append(dict(row) for row in state.get("rows", ()))


def _missing(value: Any) -> bool:
    return value is None or (not isinstance(value, str | bytes) and bool(pd.isna(value)))


def _plain(value: Any) -> Any:
    """A table value as a plain Python scalar (numpy scalars unwrapped) for a checkpoint."""
    return value.item() if hasattr(value, "item") else value


def load_results(path: str | os.PathLike[str], *, strict: bool = False) -> pd.DataFrame:
    """Read results written by a monitor, including those of a run that died.

    Parameters
    ----------
    path : str or Path
        A results folder (all ``part-*.csv`` / ``part-*.parquet`` files in it are
        read; unfinished temporary parts are ignored) or a single CSV or Parquet file
        such as the ``results.csv`` written by ``ics-toolkit run``.
    strict : bool
        What to do with a part that cannot be read (empty, corrupt, or truncated:
        parts written by :class:`ResultWriter` carry their row count and checksum in
        their name, so a truncated one is detected; older parts without the mark are
        checked only for being parseable): False skips it with an
        :class:`~ics_toolkit.errors.ICSRuntimeWarning` naming the file, True raises
        :class:`~ics_toolkit.errors.ICSValueError` naming it. A single file that
        cannot be read always raises.

    Returns
    -------
    pandas.DataFrame
        The tidy table with the columns of :data:`COLUMNS`, typed, ordered by run
        and step.

    Raises
    ------
    ICSValueError
        ``path`` does not exist, holds no (readable) part, or is an unreadable file.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if _PART.match(f.name) and f.is_file())
        if not files:
            raise ICSValueError(f"no result parts (part-*.csv or part-*.parquet) in {str(p)!r}")
        frames = _read_many(files, strict)
        if not frames:
            raise ICSValueError(
                f"none of the {len(files)} result part(s) in {str(p)!r} could be read"
            )
    elif p.is_file():
        frames = [_read_or_skip(p, strict=True)]  # type: ignore[list-item]
    else:
        raise ICSValueError(f"`path` {str(p)!r} does not exist")
    return _sort(_concat(frames))


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
