"""``ics-toolkit run`` and ``plot`` when things go wrong: kill -9, Ctrl-C, damaged parts,
an output folder that holds an earlier run. Nothing prints a traceback, and what a dead
run leaves behind is readable and loses at most the step in flight."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

import ics_toolkit as ics
from ics_toolkit.cli import main

ROOT = Path(__file__).parent.parent
STEPS = 8
NORMS = ["batch", "none"]
# a small, fast run: every step measured, so each step writes one part
TINY = [
    "--model", "mlp", "--dataset", "blobs", "--steps", str(STEPS), "--every", "1",
    "--probe-size", "16", "--batch-size", "16", "--width", "8", "--methods", "paired,sliced",
    "--norms", ",".join(NORMS), "--no-progress", "--seeds", "1", "--sweep-batch-sizes", "16",
]  # fmt: skip


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(["run", "--out", str(out), *TINY]) == 0
    return out


def test_plot_skips_a_damaged_part_with_one_warning_line(finished_run, tmp_path, capsys):
    parts = tmp_path / "parts"
    parts.mkdir()
    for p in sorted((finished_run / "parts").iterdir()):
        (parts / p.name).write_bytes(p.read_bytes())
    damaged = sorted(parts.iterdir())[3]
    damaged.write_bytes(damaged.read_bytes()[:-40])  # truncated, still parses
    capsys.readouterr()
    assert main(["plot", str(parts), "--out", str(tmp_path / "figs"), "--formats", "png"]) == 0
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert line.startswith("ics-toolkit: warning: skipped the unreadable result part")
    assert damaged.name in line
    assert (tmp_path / "figs" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    rc = main(["plot", str(parts), "--out", str(tmp_path / "f2"), "--strict"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 1 and line.startswith("ics-toolkit: error: result file") and damaged.name in line
    assert not (tmp_path / "f2").exists()


def test_plot_refuses_tables_it_cannot_read_in_one_line(tmp_path, capsys):
    garbage = tmp_path / "results.csv"
    garbage.write_bytes(b"\x00\xff\xfe\x00 not a table \x9c\x00" * 50)
    sweep = tmp_path / "sweep.csv"
    sweep.write_text("variant,dim,noise\nbatch,4,0.0\n")  # no quantity / value
    for argv, pattern in [
        (["plot", str(garbage), "--out", str(tmp_path / "o")], r"results\.csv"),
        (["plot", str(sweep), "--out", str(tmp_path / "o")], r"lacks the column\(s\)"),
    ]:
        assert main(argv) == 1, argv
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith("ics-toolkit: error: ")
        assert pd.Series([line]).str.contains(pattern).item(), line


def test_run_refuses_an_earlier_run_and_overwrite_replaces_it(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"experiment": "main", "norms": ["group"]}))
    (out / "parts").mkdir()
    (out / "parts" / "part-group-000000.csv").write_text("run,step\ngroup,0\n")
    (out / "parts" / ".part-group-000001-r2-c12345678.csv.tmp").write_text("run,st")
    (out / ".summary.md.tmp").write_text("# half")
    (out / "keep.txt").write_text("not ours")
    capsys.readouterr()
    assert main(["run", "--out", str(out), *TINY]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "holds an earlier run" in line and "--overwrite" in line
    assert (out / "parts" / "part-group-000000.csv").is_file()  # refused: nothing touched
    assert main(["run", "--out", str(out), *TINY, "--overwrite"]) == 0
    assert set(ics.load_results(out / "parts").run) == set(NORMS)  # no "group" mixed in
    assert not list(out.rglob("*.tmp"))
    assert (out / "keep.txt").read_text() == "not ours"
    capsys.readouterr()
    assert main(["plot", str(out), "--out", str(tmp_path / "figs"), "--formats", "svg"]) == 0
    assert capsys.readouterr().err == ""


def test_an_interrupted_run_keeps_its_settings_curves_and_finished_variants(
    tmp_path, monkeypatch, capsys
):
    import ics_toolkit.train as train_module

    real = train_module.train
    calls = []

    def train_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        on_step = kwargs["on_step"]

        def step(i, loss):
            on_step(i, loss)
            if len(calls) == 2 and i == 3:
                raise KeyboardInterrupt

        return real(*args, **{**kwargs, "on_step": step})

    monkeypatch.setattr(train_module, "train", train_then_ctrl_c)
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *TINY]) == 130
    assert "interrupted" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "interrupted" and config["finished"] == ["batch"]
    assert config["steps"] == STEPS and config["norms"] == NORMS
    assert set(config["accuracies"]) == {"batch"}
    training = pd.read_csv(out / "training.csv")
    assert training[training.run == "batch"].step.tolist() == list(range(STEPS))
    assert training[training.run == "none"].step.tolist() == [0, 1, 2, 3]
    assert training.notna().all().all()
    summary = (out / "summary.md").read_text()
    assert "\n## batch\n" in summary and "\n## none\n" not in summary
    assert "1 of 2 runs finished" in summary
    table = ics.load_results(out / "parts")
    assert sorted(table[table.run == "none"].step.unique()) == [0, 1, 2, 3]
    assert not (out / "results.csv").exists()  # written only by a finished run
    assert not list(out.rglob("*.tmp"))


def _kill_at_random(out: Path, rng: random.Random) -> int:
    """Start ``ics-toolkit run``, kill -9 it after a random number of parts; returns it."""
    target = rng.randint(1, len(NORMS) * STEPS - 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ICS_TOOLKIT_PROGRESS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ics_toolkit", "run", "--out", str(out), *TINY],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    try:
        parts = out / "parts"
        while time.monotonic() < deadline and proc.poll() is None:
            n = (
                sum(1 for p in parts.iterdir() if p.name.startswith("part-"))
                if parts.is_dir()
                else 0
            )
            if n >= target:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))  # anywhere within the next step
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return target


@pytest.mark.slow
def test_kill_9_at_random_points_loses_at_most_the_step_in_flight(tmp_path, capsys):
    rng = random.Random(20240611)
    for attempt in range(4):
        out = tmp_path / f"killed{attempt}"
        _kill_at_random(out, rng)
        config = json.loads((out / "config.json").read_text())  # written first, whole
        assert config["experiment"] == "main" and config["norms"] == NORMS
        raw = (out / "training.csv").read_bytes()
        assert raw.endswith(b"\n")  # whole lines only
        training = pd.read_csv(out / "training.csv")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no part is damaged
            table = ics.load_results(out / "parts")
        trained = {r: g.step.tolist() for r, g in training.groupby("run")}
        measured = {r: sorted(g.step.dropna().unique()) for r, g in table.groupby("run")}
        for i, run in enumerate(NORMS):
            t, m = trained.get(run, []), measured.get(run, [])
            assert t == list(range(len(t))) and m == list(range(len(m))), (attempt, run)
            # the part of step k is written inside optimizer.step, its training line after
            assert len(m) - len(t) in (0, 1), (attempt, run, len(m), len(t))
            started_next = i + 1 < len(NORMS) and (
                NORMS[i + 1] in trained or NORMS[i + 1] in measured
            )
            if started_next:  # a finished variant is complete, and its summary was written
                assert len(t) == STEPS and len(m) == STEPS
                assert run in config["finished"] and run in config["accuracies"]
                assert f"\n## {run}\n" in (out / "summary.md").read_text()
        if config["status"] == "complete":
            continue  # the kill came after the end: nothing was lost
        assert config["status"] == "running"
        capsys.readouterr()
        figs = tmp_path / f"figs{attempt}"
        assert main(["plot", str(out), "--out", str(figs), "--formats", "png"]) == 0
        assert capsys.readouterr().err == ""
        assert (figs / "ics_vs_step.png").read_bytes()[:4] == b"\x89PNG"
    # the last folder: a re-run is refused, --overwrite replaces it and clears the debris
    assert main(["run", "--out", str(out), *TINY]) == 1
    assert "holds an earlier run" in _one_error_line(capsys.readouterr().err)
    assert main(["run", "--out", str(out), *TINY, "--norms", "none", "--overwrite"]) == 0
    assert set(ics.load_results(out / "parts").run) == {"none"}
    assert set(pd.read_csv(out / "training.csv").run) == {"none"}
    assert not list(out.rglob("*.tmp"))
