"""The results table: typed columns, atomic parts, reading back a dead run, pivoting."""

import math

import pandas as pd
import pytest

import ics_toolkit as ics
from ics_toolkit.results import COLUMNS, ResultWriter


def _has_pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def _rows(step, layers=("bn1", "2")):
    return [
        {"step": step, "layer": layer, "view": "flatten", "quantity": q, "value": v, "kind": k}
        for layer in layers
        for q, v, k in (("exact", 1.0 + step, "estimate"), ("U1", 2.0 + step, "upper"))
    ]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_parts_round_trip_with_types(tmp_path, fmt):
    w = ResultWriter(tmp_path, format=fmt, run="r1")
    w.write(_rows(0))
    w.write(_rows(10))
    df = ics.load_results(tmp_path)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == 8
    assert df["step"].dtype == "Int64" and df["value"].dtype == "float64"
    assert set(df["run"]) == {"r1"}
    pick = (df.step == 10) & (df.layer == "2") & (df.quantity == "U1")  # "2" stays text
    assert df.loc[pick, "value"].item() == 12.0


def test_a_dead_run_keeps_every_finished_part(tmp_path):
    w = ResultWriter(tmp_path, run="dead")
    w.write(_rows(0))
    w.write(_rows(1))
    # a crash while writing the third part leaves only its temporary file behind
    (tmp_path / ".part-dead-000002.csv.tmp").write_text("step,layer\n2,bn")
    df = ics.load_results(tmp_path)
    assert sorted(df["step"].unique()) == [0, 1]


def test_two_runs_share_a_folder_without_overwriting(tmp_path):
    ResultWriter(tmp_path, run="a").write(_rows(0))
    ResultWriter(tmp_path, run="b").write(_rows(0))
    df = ics.load_results(tmp_path)
    assert sorted(df["run"].unique()) == ["a", "b"] and len(df) == 8


def test_single_file_and_missing_columns_are_filled(tmp_path):
    f = tmp_path / "results.csv"
    pd.DataFrame([{"step": 3, "layer": "x", "quantity": "exact", "value": 0.5}]).to_csv(f)
    with pytest.raises(ics.ICSValueError, match="unknown columns"):
        ics.load_results(f)  # the index column "Unnamed: 0" is not ours
    pd.DataFrame([{"step": 3, "layer": "x", "quantity": "exact", "value": 0.5}]).to_csv(
        f, index=False
    )
    df = ics.load_results(f)
    assert df["step"].tolist() == [3] and pd.isna(df["seed"].item())


def test_to_wide_one_column_per_quantity():
    from ics_toolkit.results import _frame

    df = _frame(_rows(0) + _rows(5))
    wide = ics.to_wide(df)
    assert {"exact", "U1"} <= set(wide.columns)
    assert len(wide) == 4
    row = wide[(wide.step == 5) & (wide.layer == "bn1")]
    assert row["U1"].item() == 7.0 and math.isnan(row["run"].astype(float).item())


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ics.ICSValueError, match="`format`"):
        ResultWriter(tmp_path, format="json")
    with pytest.raises(ics.ICSValueError, match="`run`"):
        ResultWriter(tmp_path, run="a/b")
    with pytest.raises(ics.ICSValueError, match="does not exist"):
        ics.load_results(tmp_path / "nope")
    with pytest.raises(ics.ICSValueError, match="no result parts"):
        ics.load_results(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ics.ICSValueError, match="is a file"):
        ResultWriter(tmp_path / "file.txt")
    with pytest.raises(ics.ICSValueError, match="lacks the columns"):
        ics.to_wide(pd.DataFrame({"a": [1]}))


# ------------------------------------------------------------------ unreadable parts


def _three_parts(folder, fmt="csv"):
    w = ResultWriter(folder, format=fmt, run="r")
    return [w.write(_rows(step)) for step in (0, 1, 2)]


def _truncate_mid_line(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 7])  # inside the last row: it still parses


def _truncate_at_a_row(p):
    lines = p.read_bytes().splitlines(keepends=True)
    p.write_bytes(b"".join(lines[:-1]))  # whole rows missing, a valid smaller CSV


def _garbage(p):
    p.write_bytes(b"\x00\xff\xfe binary \x00\x9c" * 40)


def _empty(p):
    p.write_bytes(b"")


def _wrong_columns(p):
    p.write_text("colour,size\nred,3\n")


DAMAGES = {
    "empty": _empty,
    "truncated in a row": _truncate_mid_line,
    "truncated at a row": _truncate_at_a_row,
    "garbage": _garbage,
    "other columns": _wrong_columns,
}


def _unmarked(parts):
    """The parts renamed as version 0.1.0 named them (no row count, no checksum)."""
    old = [p.with_name(f"part-r-{i:06d}.csv") for i, p in enumerate(parts)]
    for p, o in zip(parts, old, strict=True):
        p.rename(o)
    return old


@pytest.mark.parametrize(
    ("damage", "marked"),
    [(d, True) for d in DAMAGES] + [("empty", False), ("garbage", False), ("other columns", False)],
)
def test_an_unreadable_part_is_skipped_with_a_warning_naming_it(tmp_path, damage, marked):
    parts = _three_parts(tmp_path)
    if not marked:
        parts = _unmarked(parts)
    DAMAGES[damage](parts[1])
    with pytest.warns(ics.ICSRuntimeWarning, match=rf"unreadable result part .*{parts[1].name}"):
        df = ics.load_results(tmp_path)
    assert sorted(df.step.unique()) == [0, 2]  # the damaged step is gone, nothing else
    assert len(df) == 8
    with pytest.raises(ics.ICSValueError, match=rf"result file .*{parts[1].name}.* is unreadable"):
        ics.load_results(tmp_path, strict=True)


def test_the_integrity_mark_catches_what_parsing_cannot(tmp_path):
    parts = _three_parts(tmp_path)
    _truncate_at_a_row(parts[2])
    # the damaged file is still a valid CSV with one row fewer
    assert len(pd.read_csv(parts[2])) == 3
    with pytest.warns(ics.ICSRuntimeWarning, match="truncated or altered"):
        ics.load_results(tmp_path)
    # an altered byte of the same length is caught too
    _three_parts(tmp_path / "b")
    p = sorted((tmp_path / "b").iterdir())[0]
    data = bytearray(p.read_bytes())
    data[data.index(b"1.0")] = ord("7")
    p.write_bytes(bytes(data))
    with pytest.raises(ics.ICSValueError, match="does not match its integrity mark"):
        ics.load_results(tmp_path / "b", strict=True)


def test_parts_carry_their_row_count_and_old_parts_without_it_still_read(tmp_path):
    import re
    import zlib

    (part,) = [ResultWriter(tmp_path, run="new").write(_rows(0, layers=("a", "b", "c")))]
    m = re.fullmatch(r"part-new-000000-r(\d+)-c([0-9a-f]{8})\.csv", part.name)
    assert m is not None and int(m[1]) == 6 == len(pd.read_csv(part))
    assert int(m[2], 16) == zlib.crc32(part.read_bytes())
    # a part of version 0.1.0 (no mark) is read as it is
    pd.DataFrame(_rows(5)).assign(run="old").to_csv(tmp_path / "part-old-000000.csv", index=False)
    df = ics.load_results(tmp_path)
    assert set(df.run) == {"new", "old"} and len(df) == 10


@pytest.mark.skipif(not _has_pyarrow(), reason="needs pyarrow (ics-toolkit[parquet])")
def test_a_truncated_parquet_part_is_skipped(tmp_path):
    parts = _three_parts(tmp_path, fmt="parquet")
    _truncate_mid_line(parts[0])
    with pytest.warns(ics.ICSRuntimeWarning, match=parts[0].name):
        df = ics.load_results(tmp_path)
    assert sorted(df.step.unique()) == [1, 2]


def test_nothing_readable_or_a_bad_single_file_is_an_error_naming_it(tmp_path):
    parts = _three_parts(tmp_path)
    for p in parts:
        _empty(p)
    with (
        pytest.warns(ics.ICSRuntimeWarning),
        pytest.raises(ics.ICSValueError, match=r"none of the 3 result part\(s\)"),
    ):
        ics.load_results(tmp_path)
    single = tmp_path / "results.csv"
    _garbage(single)
    with pytest.raises(ics.ICSValueError, match=r"result file .*results\.csv' is unreadable"):
        ics.load_results(single)


def test_a_writer_numbers_on_after_the_parts_of_its_run(tmp_path):
    first = ResultWriter(tmp_path, run="r").write(_rows(0))
    second = ResultWriter(tmp_path, run="r").write(_rows(1))  # a restarted run, same label
    assert first.name.startswith("part-r-000000-") and second.name.startswith("part-r-000001-")
    assert sorted(ics.load_results(tmp_path).step.unique()) == [0, 1]


# ------------------------------------------------------------------ atomic writes


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    from ics_toolkit._io import atomic_write

    target = tmp_path / "table.csv"
    atomic_write(target, "a,b\n1,2\n")

    def half_then_fail(tmp):
        tmp.write_text("a,b\n3")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]  # no .tmp left
    atomic_write(target, b"x")
    assert target.read_bytes() == b"x"


# ------------------------------------------------------------------ the result store


def _count_reads(monkeypatch):
    import ics_toolkit.results as results

    seen = []
    real = results._read_table

    def counting(f):
        seen.append(f.name)
        return real(f)

    monkeypatch.setattr(results, "_read_table", counting)
    return seen


def test_store_with_a_path_keeps_no_rows_and_reads_each_part_once(tmp_path, monkeypatch):
    from ics_toolkit.results import ResultStore

    reads = _count_reads(monkeypatch)
    store = ResultStore(tmp_path, run="s")
    for step in range(5):
        store.append(_rows(step))
        assert store._pending == [] and store._table is None  # nothing kept in memory
    assert len(store) == 20 and reads == []
    first = store.frame()
    assert len(reads) == 5
    store.append(_rows(5))
    second = store.frame()
    assert len(reads) == 6  # the new part only
    assert store.frame().equals(second) and len(reads) == 6
    pd.testing.assert_frame_equal(second.iloc[: len(first)], first)
    on_disk = ics.load_results(tmp_path)
    pd.testing.assert_frame_equal(second, on_disk)
    assert list(second.columns) == list(COLUMNS) and set(second.run) == {"s"}
    second.loc[0, "value"] = -1.0  # a copy: the store's table is not changed
    assert store.frame().loc[0, "value"] == 1.0


def test_store_keeps_rows_whose_write_failed_and_writes_them_next_time(tmp_path, monkeypatch):
    from ics_toolkit.results import ResultStore

    store = ResultStore(tmp_path, run="s")
    store.append(_rows(0))
    real = store.writer.write
    monkeypatch.setattr(
        store.writer,
        "write",
        lambda rows: (_ for _ in ()).throw(OSError(28, "No space left on device")),
    )
    with pytest.raises(OSError, match="No space left"):
        store.append(_rows(1))
    assert sorted(store.frame().step.unique()) == [0, 1]  # in memory until written
    monkeypatch.setattr(store.writer, "write", real)
    store.append(_rows(2))
    assert store._pending == []
    assert sorted(ics.load_results(tmp_path).step.unique()) == [0, 1, 2]
    assert len(store.frame()) == len(ics.load_results(tmp_path)) == 12


def test_store_in_memory_types_each_row_once(monkeypatch):
    import ics_toolkit.results as results
    from ics_toolkit.results import ResultStore

    typed = []
    real = results._frame

    def counting(rows):
        rows = list(rows)
        typed.append(len(rows))
        return real(rows)

    monkeypatch.setattr(results, "_frame", counting)
    store = ResultStore()
    frames = []
    for step in range(4):
        store.append(_rows(step))
        frames.append(store.frame())
    assert sum(typed) == 16  # each row typed once, not once per frame() call
    assert [len(f) for f in frames] == [4, 8, 12, 16]
    expected = results._typed(pd.DataFrame([r for s in range(4) for r in _rows(s)]))
    pd.testing.assert_frame_equal(frames[-1], expected)
    store.clear()
    assert len(store) == 0 and store.frame().empty


def test_monitor_results_read_each_part_once_and_match_the_disk(tmp_path, monkeypatch):
    import torch
    from torch import nn

    reads = _count_reads(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    monitor = ics.ICSMonitor(model, x[:32], every=1, methods=("paired",), path=tmp_path, run="m")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.attach(opt)
    sizes = []
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sizes.append(len(monitor.results()))
    monitor.detach()
    assert len(reads) == 4  # one part per measured step, each read once
    assert sizes[0] > 0 and sizes == [sizes[0] * (i + 1) for i in range(4)]
    assert monitor._store._pending == []  # no row is kept in memory besides the table read
    pd.testing.assert_frame_equal(monitor.results(), ics.load_results(tmp_path))
    monitor.reset()
    with pytest.warns(ics.ICSWarning, match="no step measured yet"):
        assert monitor.results().empty
    assert len(list(tmp_path.iterdir())) == 4  # files on disk are kept
