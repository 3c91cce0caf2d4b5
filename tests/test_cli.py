"""The ``ics-toolkit`` command line end to end: run --quick, plot, sweep-dim, bad options."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import ics_toolkit as ics
from ics_toolkit.cli import main
from ics_toolkit.report import fit_slopes

# the base runs (first seed, base batch) of the quick main job; the others carry -s / -b
VARIANTS = {"batch", "unitization", "unitization=1", "none"}
PLOTS = ("ics_vs_step", "heatmap", "bn_vs_unitization", "batch_sweep")


def _has_pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def _check_run_folder(out: Path) -> pd.DataFrame:
    """Every promised file exists, and the results reload with every variant."""
    for name in ("results.csv", "summary.md", "training.csv", "config.json"):
        assert (out / name).is_file(), name
    if _has_pyarrow():
        assert (out / "results.parquet").is_file()
    for plot in PLOTS:
        png, svg = out / f"{plot}.png", out / f"{plot}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
        assert b"<svg" in svg.read_bytes()[:2000], plot
    table = ics.load_results(out / "results.csv")
    config = json.loads((out / "config.json").read_text())
    assert set(table.run) == {d["run"] for d in config["design"]}
    assert VARIANTS <= set(table.run)
    layers = {run: set(g.layer.dropna()) for run, g in table.groupby("run")}
    assert layers["batch"] == layers["unitization"] == layers["none"] and layers["batch"]
    assert table[table.quantity == "exact"].value.notna().all()
    text = (out / "summary.md").read_text()
    for variant in VARIANTS:
        assert f"\n## {variant}\n" in text
    assert "Final test accuracy: " in text
    return table


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    return out


@pytest.mark.slow
def test_run_quick_in_process(quick_run, capsys):
    rc = main(["run", "--quick", "--out", str(quick_run), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    _check_run_folder(quick_run)
    # it prints the summary and where the outputs went
    assert "## Overview" in captured.out
    assert str(quick_run / "results.csv") in captured.out
    assert f"results in {quick_run}" in captured.out


@pytest.mark.slow
def test_run_quick_as_python_m_subprocess(quick_run, tmp_path):
    out = tmp_path / "sub"
    env = {**os.environ, "ICS_TOOLKIT_PROGRESS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "ics_toolkit", "run", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[4/12] none:" in proc.stderr  # one progress line per run
    assert "[12/12] unitization=1-b16-s1:" in proc.stderr
    table = _check_run_folder(out)
    # the same seed gives the same measurements as the in-process run, up to float32
    # rounding of the activations (two processes may order float sums differently)
    if (quick_run / "results.csv").is_file():
        first = ics.load_results(quick_run / "results.csv")
        keys = ["run", "step", "layer"]
        a = first[first.quantity == "exact"].set_index(keys).value.sort_index()
        b = table[table.quantity == "exact"].set_index(keys).value.sort_index()
        assert a.index.equals(b.index)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(a.max()))


@pytest.mark.slow
def test_plot_redraws_from_saved_results(quick_run, tmp_path, capsys):
    if not (quick_run / "results.csv").is_file():
        assert main(["run", "--quick", "--out", str(quick_run), "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "figs"
    assert main(["plot", str(quick_run / "parts"), "--out", str(out), "--formats", "png"]) == 0
    for plot in PLOTS:
        assert (out / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
    assert str(out / "heatmap.png") in capsys.readouterr().out


def test_plot_finds_the_tables_in_a_run_folder(tmp_path):
    from ics_toolkit.cli import _collect

    run = tmp_path / "run"
    (run / "parts").mkdir(parents=True)
    (run / "parts" / "part-batch-000000.csv").write_text("run,step\n")
    assert _collect([str(run)]) == ([run / "parts"], [])
    (run / "results.csv").write_text("run,step,layer\n")
    (run / "sweep.csv").write_text("variant,dim,noise,quantity,value\n")
    assert _collect([str(run)]) == ([run / "results.csv"], [run / "sweep.csv"])
    assert _collect([str(run / "sweep.csv"), str(run / "parts")]) == (
        [run / "parts"],
        [run / "sweep.csv"],
    )


def test_sweep_dim_quick_trains_and_reports_slopes_with_intervals(tmp_path, capsys):
    out = tmp_path / "sweep"
    t0 = time.perf_counter()
    assert main(["sweep-dim", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert time.perf_counter() - t0 < 60  # seconds on one core; generous for shared machines
    printed = capsys.readouterr().out
    assert "# ICS and its bounds versus width d (trained networks)" in printed
    for name in ("sweep.csv", "sweep_summary.md", "bounds_vs_dim.png", "bounds_vs_dim.svg",
                 "config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert any((out / "sweep_parts").iterdir())
    t = pd.read_csv(out / "sweep.csv")
    assert t.bounds_hold.all()
    assert sorted(t.dim.unique()) == [16, 64] and sorted(t.seed.unique()) == [0, 1]
    # the slopes come from the table, with an interval over the two seeds
    slopes = fit_slopes(t[t.quantity.isin(["exact", "U3", "U4", "U5"])])
    assert len(slopes) == 2 * (2 + 2 + 3)  # batch sizes x (batch: exact, U3; alpha 0: exact,
    # U5; alpha 1: exact, U4, U5)
    assert (slopes.n_seeds == 2).all() and (slopes.low < slopes.high).all()
    summary = (out / "sweep_summary.md").read_text()
    for r in slopes.itertuples():
        assert f"| {r.variant} | {r.batch_size} | {r.quantity} | {r.slope + 0.0:.3f} | " in summary
    # plot re-draws the sweep from its table
    again = tmp_path / "again"
    assert main(["plot", str(out / "sweep.csv"), "--out", str(again)]) == 0
    assert (again / "bounds_vs_dim.svg").is_file()
    # and from the folder: sweep_parts/ is not taken for a main run's parts
    assert main(["plot", str(out), "--out", str(tmp_path / "folder")]) == 0
    assert sorted(f.name for f in (tmp_path / "folder").iterdir()) == [
        "bounds_vs_dim.png",
        "bounds_vs_dim.svg",
    ]


def test_sweep_dim_options_reach_the_experiment(tmp_path, capsys):
    out = tmp_path / "opts"
    args = ["sweep-dim", "--out", str(out), "--dims", "16,32", "--batch-sizes", "8",
            "--norms", "batch,unitization=1", "--seeds", "1", "--steps", "3", "--every", "1",
            "--probe-size", "16", "--lr", "0.01", "--seed", "4", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dims"] == [16, 32] and config["batch_sizes"] == [8]
    assert config["norms"] == ["batch", "unitization=1"] and config["seeds"] == [4]
    assert (config["steps"], config["every"], config["probe_size"]) == (3, 1, 16)
    assert config["lr"] == 0.01
    t = pd.read_csv(out / "sweep.csv")
    assert set(t.variant) == {"batch", "unitization=1"} and set(t.seed) == {4}
    assert (t[t.quantity == "exact"].n_steps == 3).all()


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ics-toolkit {ics.__version__}"


def _bad_cases(tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "out")
    prior = tmp_path / "prior"  # the folder of an earlier run
    (prior / "parts").mkdir(parents=True)
    (prior / "config.json").write_text('{"experiment": "main"}')
    cases = [
        (["run", "--out", out, "--model", "vgg"], 2, r"argument --model: invalid choice: 'vgg'"),
        (["run", "--out", str(afile)], 1, r"--out '.*a_file' is a file; pass a folder"),
        (["run", "--out", out, "--methods", "exact,emd"], 1, r"--methods: unknown method"),
        (
            ["run", "--out", out, "--dataset", "cifar10", "--data-root", str(empty)],
            1,
            r"cifar10: no complete dataset under `root`.*Nothing is downloaded",
        ),
        (["run", "--out", out, "--norms", "batch,bn"], 1, r"--norms: unknown normalization 'bn'"),
        (["run", "--out", out, "--steps", "0"], 2, r"argument --steps: expected a positive"),
        (["run", "--out", out, "--every", "log:x"], 1, r"`every`='log:x'"),
        (["run", "--out", out, "--dataset", "blobs"], 1, r"model 'cnn' needs image inputs"),
        (["run"], 2, r"the following arguments are required: --out"),
        ([], 2, r"the following arguments are required: COMMAND"),
        (["plot", str(tmp_path / "nothing"), "--out", out], 1, r"RESULTS .* does not exist"),
        (["plot", str(empty), "--out", out], 1, r"holds no results.csv, sweep.csv"),
        (["sweep-dim", "--out", out, "--dims", "4,x"], 2, r"argument --dims: expected a comma"),
        (["sweep-dim", "--out", out, "--probe-size", "2"], 1, r"`probe_size` must be at least 4"),
        (["sweep-dim", "--out", out, "--dims", "16,0"], 1, r"`dims` entries must be a positive"),
        (
            ["sweep-dim", "--out", out, "--norms", "batch,bn"],
            1,
            r"--norms: unknown normalization 'bn'",
        ),
        (["run", "--out", out, "--seed", "-1"], 2, r"argument --seed: expected an integer from 0"),
        (["sweep-dim", "--out", out, "--seed", "2**40"], 2, r"argument --seed: expected an"),
        (
            ["plot", str(empty), "--out", out, "--formats", "png,bmpx"],
            1,
            r"--formats: matplotlib cannot write the format 'bmpx'; choose from .*png",
        ),
        (["run", "--out", out, "--lr", "nan"], 1, r"`lr` must be a positive number, got nan"),
        (
            ["run", "--out", str(prior)],
            1,
            r"holds an earlier run \(config\.json\); pass --overwrite",
        ),
        (["sweep-dim", "--out", str(prior)], 1, r"holds a run of `ics-toolkit run`"),
    ]
    if not torch.cuda.is_available():
        cases.append((["run", "--out", out, "--device", "cuda"], 1, r"--device 'cuda' asks for"))
    if not torch.backends.mps.is_available():
        cases.append((["run", "--out", out, "--device", "mps"], 1, r"--device 'mps' asks for"))
    return cases


def test_bad_options_print_one_line_and_exit_nonzero(tmp_path, capsys):
    import re

    for argv, code, pattern in _bad_cases(tmp_path):
        rc = main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert rc == code, (argv, captured.err)
        assert len(lines) == 1, (argv, captured.err)
        assert lines[0].startswith("ics-toolkit: error: "), argv
        assert re.search(pattern, lines[0]), (argv, lines[0])
        assert "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()  # no bad option left an output folder behind


def test_bad_option_in_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ics_toolkit", "run", "--out", str(tmp_path), "--norms", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "ics-toolkit: error: --norms: unknown normalization 'x'; choose from batch, "
        "unitization, group, layer, none, or unitization=ALPHA (initial alpha, e.g. "
        "unitization=1)"
    ]
