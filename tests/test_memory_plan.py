"""The memory plan: predicted peak per layer, adapting to a (simulated) small budget, refusing.

Budgets are simulated (a few MiB, or a share of a patched "available memory"): no test
allocates more than a few MiB.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pandas as pd
import pytest
import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit import memory_plan as mp
from ics_toolkit._layerwise import measure_layerwise
from ics_toolkit.errors import ICSMemoryError, ICSTypeError, ICSValueError, ICSWarning
from ics_toolkit.shift import measure_step


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),  # "1": 8 x 16 x 16 = 2048 per input, the widest
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),  # "4": 16 x 8 x 8 = 1024
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(1024, 64),
        nn.LayerNorm(64),  # "8": 64, narrower than the plan's sketch
        nn.Linear(64, 10),
    )


PROBE = torch.Generator().manual_seed(1)
X = torch.randn(32, 3, 16, 16, generator=PROBE)
BATCH = torch.randn(16, 3, 16, 16, generator=PROBE)


def _quiet(**kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = ics.ICSMonitor(kw.pop("model"), X, every=1, **kw)
    return mon, [str(w.message) for w in caught if issubclass(w.category, ICSWarning)]


def _one_step(model: nn.Module, **kw) -> tuple[pd.DataFrame, ics.ICSMonitor, list[str]]:
    mon, said = _quiet(model=model, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mon.attach(opt):
        opt.zero_grad()
        model(BATCH).square().mean().backward()
        opt.step()
    return mon.results(), mon, said


def _values(df: pd.DataFrame) -> pd.Series:
    df = df[df.kind != "event"]
    return df.set_index(["layer", "view", "quantity"]).value.sort_index()


def test_the_plan_shows_the_peak_per_layer_against_the_available_memory():
    mon, said = _quiet(model=_model())
    plan = mon.memory_plan()
    assert said == [] and plan.fits and not plan.adapted
    assert plan.table.layer.tolist() == ["1", "4", "8"]
    # the table is the one memory_per_layer() shows, plus the plan's column
    per_layer = mon.memory_per_layer()
    pd.testing.assert_frame_equal(plan.table.drop(columns="sketched_by_plan"), per_layer)
    assert not plan.table.sketched_by_plan.any()
    # the peak: everything held and analysed at once, the largest working set, the pass
    t = plan.table
    forward = mp.FORWARD_COPIES * 32 * 2048 * 4
    assert plan.forward_bytes == forward
    directions = (2048 + 1024 + 64) * 128 * 8  # float64 directions of each width
    assert plan.directions_bytes == directions
    expected = t.bytes_held.sum() + t.bytes_analysis.sum() + t.bytes_working.max()
    expected += forward + directions
    assert plan.peak == plan.peak_unplanned == expected
    # the budget is the documented share of what is available on the host
    assert plan.share == mp.DEFAULT_BUDGET and plan.where == "host"
    assert plan.budget == int(mp.DEFAULT_BUDGET * plan.available)
    assert "nothing to adapt" in plan.summary()


def test_available_memory_is_positive_and_at_most_the_total():
    total = None
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    avail = mp.available_memory()
    assert 0 < avail <= total


def test_just_over_budget_the_analysis_runs_one_layer_at_a_time_with_the_same_results():
    model = _model()
    reference, _, said = _one_step(copy.deepcopy(model), memory_budget=None)
    assert said == []
    peak = _quiet(model=copy.deepcopy(model))[0].memory_plan().peak_unplanned
    df, mon, said = _one_step(copy.deepcopy(model), memory_budget=peak - 1)
    plan = mon.memory_plan()
    assert plan.layerwise and not plan.sketched and not plan.offload and plan.fits
    assert plan.peak < plan.peak_unplanned
    t = plan.table  # one layer's float64 set at a time
    extra = plan.forward_bytes + plan.directions_bytes
    assert plan.peak == t.bytes_held.sum() + (t.bytes_analysis + t.bytes_working).max() + extra
    assert len(said) == 1 and "one layer at a time" in said[0]
    pd.testing.assert_series_equal(_values(df), _values(reference))


def test_a_smaller_budget_sketches_the_widest_layer_and_says_which():
    model = _model()
    reference, _, _ = _one_step(copy.deepcopy(model), memory_budget=None)
    budget = 6 << 20  # one layer at a time is not enough (9.7 MiB), sketching "1" is (5.4)
    df, mon, said = _one_step(copy.deepcopy(model), memory_budget=budget)
    plan = mon.memory_plan()
    assert plan.sketched == ("1",) and plan.sketch == mp.PLAN_SKETCH and plan.fits
    assert plan.peak <= budget < plan.peak_unplanned
    assert len(said) == 1
    assert "k=256" in said[0] and "['1']" in said[0] and "predicted peak now" in said[0]
    # the rows say which values come from a sketch
    views = df[df.kind != "event"].groupby("layer").view.unique().map(list).to_dict()
    assert views == {"1": ["sketch"], "4": ["flatten"], "8": ["flatten"]}
    sketched = df[df.layer == "1"]
    assert set(sketched.dim.dropna()) == {mp.PLAN_SKETCH}
    assert "exact_jl" in set(sketched.quantity)
    assert not {"U3", "drift_mean"} & set(sketched.quantity)  # no full values there
    # the other layers are measured exactly as without a plan
    kept = reference[reference.layer != "1"]
    pd.testing.assert_series_equal(_values(df[df.layer != "1"]), _values(kept))
    # what a capture holds is what the plan predicted
    cap = mon._capture()
    row = plan.table.set_index("layer").loc["1"]
    assert tuple(cap.tensors["1"].shape) == row.stored_shape == (32, mp.PLAN_SKETCH)
    assert "1" not in cap.norms and "4" in cap.norms and "1:input" not in cap.tensors
    assert cap.sketched == {"1": 2048}
    held = sum(t.numel() * t.element_size() for t in cap.tensors.values())
    held += sum(s.x_hat.numel() * s.x_hat.element_size() for s in cap.norms.values())
    assert 2 * (held + plan.table.bytes_cache.sum()) == plan.table.bytes_held.sum()


def test_a_share_of_a_simulated_small_memory_adapts_too(monkeypatch):
    monkeypatch.setattr(mp, "available_memory", lambda device=None: 8 << 20)  # 8 MiB
    mon, said = _quiet(model=_model(), memory_budget=0.4)
    plan = mon.memory_plan()
    assert plan.available == 8 << 20 and plan.budget == int(0.4 * (8 << 20))
    assert plan.adapted and plan.fits and len(said) == 1
    assert "40% of 8.0 MiB available on the host" in said[0]


def test_when_nothing_fits_it_refuses_at_construction_with_the_numbers_and_options():
    with pytest.raises(ICSMemoryError, match="does not fit in memory") as info:
        ics.ICSMonitor(_model(), X, memory_budget=200_000)
    msg = str(info.value)
    assert re.search(r"peak at [\d.]+ MiB, and still at [\d.]+ (MiB|KiB)", msg)
    assert "budget of 195.3 KiB" in msg
    assert "one layer at a time, every wide layer sketched to k=256" in msg
    assert "Widest layers (held + analysed): 1 " in msg
    for option in ("smaller probe (n = 32 now", "fewer layers", "memory_budget=None"):
        assert option in msg
    assert isinstance(info.value, MemoryError)  # also caught as the builtin


def test_a_plan_that_cannot_sketch_other_views_says_so():
    with pytest.raises(ICSMemoryError, match=r"views=\('flatten',\), so that the plan can"):
        ics.ICSMonitor(_model(), X, views=("flatten", "channel"), memory_budget=400_000)


def test_with_a_user_sketch_the_plan_only_checks_and_names_a_smaller_sketch():
    mon, said = _quiet(model=_model(), sketch=64)
    plan = mon.memory_plan()
    assert plan.user_sketch and plan.sketch == 64 and plan.sketched == () and said == []
    with pytest.raises(ICSMemoryError, match=r"a smaller `sketch` \(k = 64 now\)"):
        ics.ICSMonitor(_model(), X, sketch=64, memory_budget=100_000)


def test_no_budget_means_no_plan_adapts_even_when_tiny_memory(monkeypatch):
    monkeypatch.setattr(mp, "available_memory", lambda device=None: 1)
    mon, said = _quiet(model=_model(), memory_budget=None)
    plan = mon.memory_plan()
    assert said == [] and not plan.adapted and plan.share is None


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0.0, ICSValueError, r"share of the available memory in \(0, 1\]"),
        (1.5, ICSValueError, r"share of the available memory in \(0, 1\]"),
        (math.nan, ICSValueError, "share"),
        (0, ICSValueError, "number of bytes >= 1"),
        (True, ICSTypeError, "`memory_budget` must be"),
        ("half", ICSTypeError, "`memory_budget` must be"),
    ],
)
def test_bad_budgets_are_refused_with_the_argument_named(value, error, match):
    with pytest.raises(error, match=match):
        ics.ICSMonitor(_model(), X, memory_budget=value)


def test_layerwise_rows_equal_the_fused_rows_on_hand_made_captures():
    mon, _ = _quiet(model=_model())
    before = mon._capture()
    model = mon.model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    after = mon._capture()
    keys = list(before.tensors)
    fused = measure_step(3, before, after, mon.config, keys)
    one = measure_layerwise(3, before, after, mon.config, keys, torch.device("cpu"))

    def strip(rows):
        return sorted(
            (r["layer"], r["view"], r["quantity"], r["value"], r.get("bounds_hold")) for r in rows
        )

    assert strip(one) == strip(fused)


def test_host_offload_keeps_one_pair_on_the_device_and_the_rest_on_the_host():
    rows = [
        {"bytes_held": 100, "bytes_analysis": 40, "bytes_working": 30, "bytes_source": 10},
        {"bytes_held": 60, "bytes_analysis": 20, "bytes_working": 90, "bytes_source": 25},
    ]
    forward = mp.FORWARD_COPIES * 25
    assert mp._peaks(rows, False, False) == (160 + 60 + 90 + forward, 0, forward)
    assert mp._peaks(rows, True, False) == (160 + 110 + forward, 0, forward)
    # offloaded: the device holds the largest pair and one layer's analysis
    assert mp._peaks(rows, True, True) == (100 + 110 + forward, 160, forward)
    # the host holds the page-locked blocks (bytes_host) when the rows say them
    rows[0]["bytes_host"], rows[1]["bytes_host"] = 256, 128
    assert mp._peaks(rows, True, True) == (100 + 110 + forward, 384, forward)
    assert mp._peaks(rows, True, False)[1] == 0  # nothing on the host without offload


def test_with_the_analysis_worker_the_plan_counts_one_capture_more():
    plain = _quiet(model=_model(), memory_budget=None)[0].memory_plan()
    threaded = _quiet(model=_model(), memory_budget=None, worker=True)[0].memory_plan()
    held = int(plain.table["bytes_held"].sum())
    assert plain.table.equals(threaded.table)
    # the step analysed in the background holds its two captures while a third is stored
    assert threaded.peak - plain.peak == held // 2 > 0
    rows = [{"bytes_held": 100, "bytes_analysis": 0, "bytes_working": 0, "bytes_source": 0}]
    rows[0]["bytes_host"] = 128
    host = mp._peaks(rows, True, True, worker=True)[1]
    assert host == 192 and isinstance(host, int)  # bytes, not a float
    assert mp._peaks(rows, False, False, worker=True)[0] == 150
    # no measured row (nothing to hold): every choice predicts nothing but the directions
    for layerwise, offload in ((False, False), (True, False), (True, True)):
        assert mp._peaks([], layerwise, offload, 8, worker=True) == (8, 0, 0)


def test_pinned_blocks_are_the_next_power_of_two():
    assert [mp.pinned_bytes(b) for b in (0, 1, 2, 3, 4096, 4097)] == [0, 1, 2, 4, 4096, 8192]
    assert mp.pinned_bytes(64 * 256 * 56 * 56 * 4) == 2**28  # ResNet-50's widest capture


def _cuda_rows(budget):
    """Two measured steps of ``_model()`` on the GPU under ``budget``: rows, monitor, warnings."""
    model = _model().cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = ics.ICSMonitor(model, X.cuda(), every=1, memory_budget=budget, worker=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    carried = []
    with mon.attach(opt):
        for _ in range(2):
            opt.zero_grad()
            model(BATCH.cuda()).square().mean().backward()
            opt.step()
            held = mon._carry[1].tensors.values()
            carried.append({t.device.type + (" pinned" * t.is_pinned()) for t in held})
    said = [str(w.message) for w in caught if issubclass(w.category, ICSWarning)]
    rows = mon.results().query("kind != 'event'")
    return rows.set_index(["step", "layer", "view", "quantity"]).sort_index(), mon, said, carried


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_plan_that_offloads_keeps_captures_on_the_host_with_the_same_rows(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # same trajectories
    reference, mon, _, carried = _cuda_rows(None)
    assert carried == [{"cuda"}, {"cuda"}]
    peak0 = mon.memory_plan().peak_unplanned
    # the largest budget that makes the plan offload without sketching (a GPU only)
    for share in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ICSWarning)
            trial = ics.ICSMonitor(
                _model().cuda(), X.cuda(), memory_budget=int(share * peak0), worker=False
            )
        if trial.memory_plan().offload:
            break
    budget = int(share * peak0)
    rows, mon, said, carried = _cuda_rows(budget)
    plan = mon.memory_plan()
    assert plan.offload and plan.layerwise and not plan.sketched and plan.peak <= budget
    assert plan.where == "cuda:0" and plan.host_peak > 0
    assert len(said) == 1 and "captures are kept in host memory" in said[0]
    # what waits for the next step waits on the host, page-locked (fast both ways)
    assert carried == [{"cpu pinned"}, {"cpu pinned"}]
    # the host's share: both sides' stored tensors, each a power-of-two pinned block
    table = plan.table
    own = [math.prod(s) * 4 for s in table["stored_shape"]]
    extra = [b - o for b, o in zip(table["bytes_per_capture"], own, strict=True)]
    blocks = [mp.pinned_bytes(o) + mp.pinned_bytes(e) for o, e in zip(own, extra, strict=True)]
    assert any(e > 0 for e in extra)  # BatchNorm layers store their normalized values too
    assert plan.host_peak == 2 * sum(blocks) >= 2 * sum(table["bytes_per_capture"])
    # the analysis itself still runs on the GPU, one layer's pair at a time: same numbers
    assert rows.index.equals(reference.index) and len(rows) > 50
    torch.testing.assert_close(
        torch.tensor(rows["value"].to_numpy(float)),
        torch.tensor(reference["value"].to_numpy(float)),
        rtol=1e-5,
        atol=1e-12,
        equal_nan=True,
    )
    assert rows["bounds_hold"].equals(reference["bounds_hold"])


def test_with_a_worker_no_more_captures_are_alive_than_the_plan_counts(monkeypatch):
    import time
    import weakref

    from ics_toolkit import monitor as monitor_module

    model = _model()
    # measured steps 1-3, 5-7: runs of reused passes, and fresh "before" passes after a gap
    mon, _ = _quiet(model=model, memory_budget=None, worker=True)
    mon.schedule = lambda s: s % 4 != 0
    taken, most = [], [0]  # weak references: a capture counts while anything holds it
    capture = mon._capture

    def counted():
        new = capture()
        taken.append(weakref.ref(new))
        most[0] = max(most[0], sum(ref() is not None for ref in taken))
        return new

    measure = monitor_module.measure_step

    def slow(*args, **kwargs):  # each analysis still runs when the next probe passes do
        time.sleep(0.2)
        return measure(*args, **kwargs)

    monkeypatch.setattr(mon, "_capture", counted)
    monkeypatch.setattr(monitor_module, "measure_step", slow)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mon.attach(opt):
        for _ in range(8):
            opt.zero_grad()
            model(BATCH).square().mean().backward()
            opt.step()
    rows = mon.results()
    assert sorted(rows.step.unique()) == [1, 2, 3, 5, 6, 7] and not rows.kind.eq("event").all()
    assert "error" not in set(rows.quantity)
    # the analysed step's two captures and the one being stored (see memory_plan._peaks)
    assert most[0] == 3
