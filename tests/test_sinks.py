"""ICSMonitor(log_to=...): the numbers reach a SummaryWriter's event file and callables."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit.sinks import as_sink, scalars


def _run(log_to, steps=4, views=("flatten",)):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = ics.ICSMonitor(
        model, torch.randn(32, 4), every=2, log_to=log_to, views=views, methods=("exact",)
    )
    monitor.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 4)).square().mean().backward()
        opt.step()
    return monitor.results()


def test_a_summary_writer_gets_every_number_under_ics_layer_quantity(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    df = _run(writer)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    measured = df[df.value.notna()]
    expected = {
        (f"ics/{r.layer}/{r.quantity}" if isinstance(r.layer, str) else f"ics/{r.quantity}")
        for r in measured.itertuples()
    }
    assert tags == expected
    assert {"ics/1/exact", "ics/1/U1", "ics/1/floor_exact", "ics/measure_time_s"} <= tags
    for r in measured.itertuples():
        if not isinstance(r.layer, str):
            continue
        events = {e.step: e.value for e in acc.Scalars(f"ics/{r.layer}/{r.quantity}")}
        assert events[r.step] == pytest.approx(r.value, rel=1e-6)  # stored as float32
    assert sorted(e.step for e in acc.Scalars("ics/1/exact")) == [0, 2]


def test_a_callable_gets_one_dict_per_measured_step():
    calls = []
    df = _run(lambda step, values: calls.append((step, dict(values))))
    assert [step for step, _ in calls] == [0, 2]
    for step, values in calls:
        rows = df[(df.step == step) & df.value.notna() & df.layer.notna()]
        assert {f"ics/{r.layer}/{r.quantity}": r.value for r in rows.itertuples()} == {
            k: v for k, v in values.items() if k != "ics/measure_time_s"
        }


def test_several_views_put_the_view_in_the_name_and_several_sinks_all_receive():
    a, b = [], []
    _run([lambda s, v: a.append(v), lambda s, v: b.append(v)], views=("flatten", "channel"))
    assert a == b and len(a) == 2
    assert "ics/1/flatten/exact" in a[0] and "ics/1/channel/per_coordinate" in a[0]


def test_a_failing_sink_warns_once_and_training_goes_on():
    def broken(step, values):
        raise OSError("disk full")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = _run(broken)
    messages = [str(w.message) for w in caught if issubclass(w.category, ics.ICSRuntimeWarning)]
    assert len(messages) == 1 and "disk full" in messages[0]
    assert sorted(df.step.unique()) == [0, 2]  # both steps measured all the same


def test_bad_sinks_are_refused_and_nan_values_left_out():
    with pytest.raises(ics.ICSTypeError, match="`log_to` must be a SummaryWriter"):
        as_sink(42)
    assert as_sink(None) is None and as_sink([]) is None
    rows = [
        {"step": 1, "layer": None, "view": None, "quantity": "skipped_step", "value": math.nan},
        {"step": 1, "layer": "a", "view": "pixel", "quantity": "L1", "value": 2.0},
    ]
    assert scalars(rows) == {1: {"ics/a/L1": 2.0}}
    assert scalars(rows, with_view=True) == {1: {"ics/a/pixel/L1": 2.0}}
