"""monitor.state_dict() / load_state_dict(): a resumed run continues the monitored run."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch
from torch import nn

import ics_toolkit as ics

STEPS, EVERY, CHECKPOINT = 7, 2, 3  # the checkpoint is taken after step 3 (4 steps done)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _batch(step: int) -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(step))


PROBE = torch.randn(32, 4, generator=torch.Generator().manual_seed(99))


def _monitor(model, path):
    return ics.ICSMonitor(model, PROBE, every=EVERY, path=path, methods=("exact",))


def _train(model, opt, steps):
    for step in steps:
        opt.zero_grad()
        model(_batch(step)).square().mean().backward()
        opt.step()


def _values(df: pd.DataFrame) -> pd.DataFrame:
    keep = df[df.kind != "event"]
    return keep.sort_values(["step", "layer", "quantity"])[["step", "layer", "quantity", "value"]]


def test_a_resumed_run_continues_schedule_run_id_and_results_folder(tmp_path):
    # the reference: one uninterrupted run
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = _monitor(model, tmp_path / "ref")
    ref.attach(opt)
    _train(model, opt, range(STEPS))
    reference = _values(ref.results())

    # the interrupted run: a checkpoint after step 3, then it goes on to step 4 and dies
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = _monitor(model, tmp_path / "run")
    first.attach(opt)
    _train(model, opt, range(CHECKPOINT + 1))
    checkpoint = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "opt": opt.state_dict(),
        "ics": first.state_dict(),
    }
    _train(model, opt, [CHECKPOINT + 1])  # measures step 4, then the process dies
    assert sorted(ics.load_results(tmp_path / "run").step.unique()) == [0, 2, 4]

    # the resumed run: a new process rebuilds everything and loads the checkpoint
    model = _model()
    model.load_state_dict(checkpoint["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.load_state_dict(checkpoint["opt"])
    second = _monitor(model, tmp_path / "run")
    second.load_state_dict(checkpoint["ics"])
    assert second.step_count == CHECKPOINT + 1 and second.update_count == 2
    assert second.run == first.run
    second.attach(opt)
    _train(model, opt, range(CHECKPOINT + 1, STEPS))

    resumed = second.results()
    assert set(resumed.run) == {first.run}
    assert sorted(resumed.step.unique()) == [0, 2, 4, 6]
    pd.testing.assert_frame_equal(
        _values(resumed).reset_index(drop=True), reference.reset_index(drop=True)
    )
    on_disk = ics.load_results(tmp_path / "run")
    pd.testing.assert_frame_equal(
        _values(on_disk).reset_index(drop=True), reference.reset_index(drop=True)
    )
    # part names carry an integrity mark (-r<rows>-c<crc32>) after the index
    names = sorted(re.sub(r"-r\d+-c[0-9a-f]{8}", "", p.name) for p in (tmp_path / "run").iterdir())
    run = first.run
    assert names == [f"part-{run}-{i:06d}.csv" for i in range(4)] + [
        f"superseded-part-{run}-000002.csv"
    ]


def test_state_is_checked():
    model = _model()
    monitor = ics.ICSMonitor(model, PROBE, every=1)
    with pytest.raises(ics.ICSTypeError, match="not an ICSMonitor state"):
        monitor.load_state_dict({"step_count": 3})
    other = ics.ICSMonitor(model, PROBE, layers=nn.Linear).state_dict()
    with pytest.raises(ics.ICSValueError, match=r"measured layers \['0', '3'\]"):
        monitor.load_state_dict(other)
    monitor.before_step()
    with pytest.raises(ics.ICSUsageError, match="inside an open step"):
        monitor.state_dict()
    with pytest.raises(ics.ICSUsageError, match="inside an open step"):
        monitor.load_state_dict(other)
    monitor.abort_step()
    assert monitor.state_dict()["step_count"] == 0  # an aborted step is not counted


def test_the_state_survives_torch_save_with_weights_only_and_json(tmp_path):
    import json

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = ics.ICSMonitor(model, PROBE, every=1)
    monitor.attach(opt)
    _train(model, opt, range(2))
    state = monitor.state_dict()
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    back = json.loads(json.dumps(state))
    for copy in (loaded, back):
        fresh = ics.ICSMonitor(model, PROBE, every=1)
        fresh.load_state_dict(copy)
        pd.testing.assert_frame_equal(fresh.results(), monitor.results())
