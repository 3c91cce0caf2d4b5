"""The results table: typed columns, atomic parts, reading back a dead run, pivoting."""

import math

import pandas as pd
import pytest

import ics_toolkit as ics
from ics_toolkit.results import COLUMNS, ResultWriter


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
