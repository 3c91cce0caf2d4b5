"""The monitor under DistributedDataParallel: 2 CPU processes (gloo), bounded in time.

Every scenario runs in spawned processes joined with a deadline: a process still
alive at the deadline is killed and the test fails, so a deadlock can never hang the
suite. Workers write what they saw to files; the assertions run in the test process.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import time
import traceback
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import ics_toolkit as ics
from ics_toolkit.distributed import DistContext, context, shard

WORLD = 2
DEADLINE_S = 60.0  # per spawned session; the sessions take a few seconds each
PROBE_N = 24
STEPS = 6
EVERY = 2
TIMEOUT_S = 1.0  # gather_timeout of the scenario where a rank never arrives

# ------------------------------------------------------------------ worker side


def _model(norm: str) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.BatchNorm1d(16) if norm == "batch" else nn.LayerNorm(16)
    return nn.Sequential(nn.Linear(6, 16), layer, nn.ReLU(), nn.Linear(16, 3), nn.LayerNorm(3))


def _full_probe() -> torch.Tensor:
    return torch.randn(PROBE_N, 6, generator=torch.Generator().manual_seed(5))


def _batches(rank: int):
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    return [torch.randn(8, 6, generator=g) for _ in range(STEPS)]


_COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "recv",
    "reduce",
    "scatter",
    "send",
)


@contextlib.contextmanager
def _no_collectives(calls: list[str]):
    """Record (and refuse) every torch.distributed collective made inside the block."""
    import torch.distributed as dist

    saved = {name: getattr(dist, name) for name in _COLLECTIVES}

    def refuse(name):
        def fn(*args, **kwargs):
            calls.append(name)
            raise RuntimeError(f"collective {name} called inside the monitor")

        return fn

    for name in _COLLECTIVES:
        setattr(dist, name, refuse(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _rank_only(rank: int, out: str) -> dict:
    """Rank 1 measures (configurable rank); rank 0 must make no collective call."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_model("batch"))
    monitor = ics.ICSMonitor(
        model, _full_probe(), every=EVERY, rank=1, path=os.path.join(out, "parts"), run="r"
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    monitor.attach(opt)
    calls: list[str] = []
    for x in _batches(rank):
        opt.zero_grad()
        model(x).square().mean().backward()
        if rank == 0:
            with _no_collectives(calls):  # SGD itself makes none: all would be the monitor's
                opt.step()
        else:
            opt.step()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        df = monitor.results()
    return {
        "rows": df,
        "calls": calls,
        "steps": monitor.step_count,
        "measured": monitor.update_count,
        "names": monitor.recorder.names,
    }


def _gather(rank: int, out: str) -> dict:
    """Every rank captures its shard; rank 0 measures the whole probe.

    Rank 0 also keeps copies of the parameters around each measured step, to compute
    the reference (one process, whole probe, plain capture + POT) afterwards.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = _model("layer")
    model = DDP(net)
    probe = shard(_full_probe())
    monitor = ics.ICSMonitor(
        model,
        probe,
        layers=(nn.Linear, nn.LayerNorm),
        every=EVERY,
        gather=True,
        methods=("exact", "paired"),
        floor=False,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    states = {}
    for step, x in enumerate(_batches(rank)):
        opt.zero_grad()
        model(x).square().mean().backward()
        if step % EVERY == 0:
            states[step] = {k: v.clone() for k, v in net.state_dict().items()}
        with monitor.step():
            opt.step()
        if step % EVERY == 0:
            states[step] = (states[step], {k: v.clone() for k, v in net.state_dict().items()})
    result = {"shard": int(probe.shape[0]), "steps": monitor.step_count}
    if rank == 0:
        result["rows"] = monitor.results()
        result["states"] = states
    return result


def _raise_inside(rank: int, out: str) -> dict:
    """Rank 1's training step raises inside monitor.step() at step 2; both carry on."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_model("layer"))
    monitor = ics.ICSMonitor(model, shard(_full_probe()), every=EVERY, gather=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    caught = []
    for step, x in enumerate(_batches(rank)):
        opt.zero_grad()
        model(x).square().mean().backward()
        try:
            with monitor.step():
                if rank == 1 and step == 2:
                    raise KeyError("simulated failure in the user's step")
                opt.step()
        except KeyError as err:
            caught.append(str(err))
    result = {"caught": caught, "steps": monitor.step_count}
    if rank == 0:
        result["rows"] = monitor.results()
    return result


def _capture_fails(rank: int, out: str) -> dict:
    """Rank 1's probe pass after step 1 raises (e.g. out of memory); nobody hangs."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_model("layer"))
    monitor = ics.ICSMonitor(model, shard(_full_probe()), every=1, gather=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    monitor.attach(opt)
    capture, calls = monitor._capture, []

    def flaky():
        calls.append(1)
        if rank == 1 and len(calls) == 4:  # steps 0 and 1 before, step 1 after
            raise RuntimeError("simulated: CUDA out of memory in the probe pass")
        return capture()

    monitor._capture = flaky
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in _batches(rank)[:3]:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    result = {"warnings": [str(w.message) for w in caught], "steps": monitor.step_count}
    if rank == 0:
        result["rows"] = monitor.results()
    return result


def _mismatch(rank: int, out: str) -> dict:
    """The ranks store different dtypes: every rank gets the same error, nobody hangs."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_model("layer"))
    dtype = torch.float16 if rank == 1 else torch.float32
    monitor = ics.ICSMonitor(  # on_error="raise": the error itself is what is checked
        model, shard(_full_probe()), every=1, gather=True, capture_dtype=dtype, on_error="raise"
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    model(_batches(rank)[0]).square().mean().backward()
    try:
        with monitor.step():
            opt.step()
    except ics.ICSValueError as err:
        return {"error_message": str(err)}
    return {"error_message": None}


def _rank_dies(rank: int, out: str) -> dict:
    """Rank 1 stops calling the optimizer (its loop ends early); rank 0 must not hang."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_model("layer"))
    monitor = ics.ICSMonitor(
        model, shard(_full_probe()), every=1, gather=True, gather_timeout=TIMEOUT_S
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    monitor.attach(opt)
    for step, x in enumerate(_batches(rank)[:2]):
        opt.zero_grad()
        model(x).square().mean().backward()
        if rank == 1 and step == 1:
            # e.g. an exception the user caught, ending this rank's loop before the
            # step: rank 0 waits for it in the monitor's gather of step 1, and must
            # give up after gather_timeout while this rank is still alive
            time.sleep(2.5 * TIMEOUT_S)
            break
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
    result = {"steps": monitor.step_count}
    if rank == 0:
        result["rows"] = monitor.results()
        result["warnings"] = [str(w.message) for w in caught]
    return result


_SCENARIOS = {
    f.__name__: f
    for f in (_rank_only, _gather, _raise_inside, _capture_fails, _mismatch, _rank_dies)
}


def _worker(rank: int, port: int, names: list[str], out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    report: dict = {}
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
        )
        for name in names:
            try:
                start = time.perf_counter()
                report[name] = _SCENARIOS[name](rank, os.path.join(out, name))
                report[name]["seconds"] = time.perf_counter() - start
            except BaseException:
                report[name] = {"error": traceback.format_exc()}
                raise
    except BaseException:
        report.setdefault("error", traceback.format_exc())
    finally:
        with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(report, f)
        if "_rank_dies" not in names:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


# ------------------------------------------------------------------ test side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(names: list[str], tmp_path) -> list[dict]:
    """Run the scenarios in WORLD processes; kill them and fail at the deadline."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, port, names, str(tmp_path)), daemon=True)
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert not hung, f"rank(s) {hung} still running after {DEADLINE_S} s: a deadlock"
    reports = []
    for r in range(WORLD):
        path = tmp_path / f"rank{r}.pkl"
        assert path.exists(), f"rank {r} exited with code {procs[r].exitcode} without a report"
        reports.append(pickle.loads(path.read_bytes()))
    return reports


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One spawned pair of processes runs every scenario, in order, in one process group.

    The scenario where a rank never arrives comes last: it leaves the group broken.
    """
    tmp = tmp_path_factory.mktemp("ddp")
    for name in _SCENARIOS:
        (tmp / name).mkdir()
    start = time.monotonic()
    reports = _spawn(list(_SCENARIOS), tmp)
    assert time.monotonic() - start < DEADLINE_S
    for r, rep in enumerate(reports):
        assert "error" not in rep, f"rank {r} failed:\n{rep.get('error')}"
        for name, res in rep.items():
            assert "error" not in res, f"rank {r}, {name} failed:\n{res['error']}"
    return tmp, reports


@pytest.mark.slow
def test_rank_only_mode_measures_on_the_chosen_rank_and_the_others_stay_silent(session):
    tmp, reports = session
    silent, measuring = reports[0]["_rank_only"], reports[1]["_rank_only"]
    assert silent["calls"] == [], "the non-measuring rank made a collective call"
    assert silent["rows"].empty and silent["measured"] == 0 and silent["steps"] == STEPS
    df = measuring["rows"]
    assert measuring["measured"] == STEPS // EVERY
    assert sorted(df.step.unique()) == list(range(0, STEPS, EVERY))
    assert set(df.layer.dropna()) == {"1", "4"}  # no "module." prefix
    assert measuring["names"] == ["1", "4"]
    assert df[df.kind != "event"].bounds_hold.all()
    assert "U3" in set(df[df.layer == "1"].quantity)  # BatchNorm1d: its bound too
    parts = sorted(p.name for p in (tmp / "_rank_only" / "parts").iterdir())
    assert [p[: len("part-r-000000")] for p in parts] == [
        f"part-r-{i:06d}" for i in range(STEPS // EVERY)
    ]
    on_disk = ics.load_results(tmp / "_rank_only" / "parts")
    assert len(on_disk) == len(df)  # written by the measuring rank only, once


@pytest.mark.slow
def test_gather_mode_measures_the_whole_probe_as_one_process_would(session):
    from ics_toolkit import capture, wasserstein

    _, reports = session
    assert [r["_gather"]["shard"] for r in reports] == [PROBE_N // 2, PROBE_N // 2]
    assert [r["_gather"]["steps"] for r in reports] == [STEPS, STEPS]
    got = reports[0]["_gather"]
    df = got["rows"]
    est = df[df.kind == "estimate"]
    assert set(est.n_samples) == {PROBE_N}  # both shards
    # reference: one process, whole probe, plain capture at the saved parameters, POT
    layers = (nn.Linear, nn.LayerNorm)
    checked = 0
    for step, (before, after) in got["states"].items():
        net = _model("layer")
        net.load_state_dict(before)
        x = capture(net, _full_probe(), layers=layers)
        net.load_state_dict(after)
        y = capture(net, _full_probe(), layers=layers)
        for layer in x:
            row = est[(est.step == step) & (est.layer == layer)]
            exact = row[row.quantity == "exact"].value.item()
            paired = row[row.quantity == "paired"].value.item()
            ref_x, ref_y = x[layer].double(), y[layer].double()
            assert exact == pytest.approx(wasserstein(ref_x, ref_y), rel=1e-5, abs=1e-9)
            assert paired == pytest.approx(wasserstein(ref_x, ref_y, "paired"), rel=1e-5)
            checked += 1
    assert checked == (STEPS // EVERY) * 4


@pytest.mark.slow
def test_a_rank_raising_inside_its_step_does_not_block_the_others(session):
    _, reports = session
    r0, r1 = reports[0]["_raise_inside"], reports[1]["_raise_inside"]
    assert len(r1["caught"]) == 1 and "simulated failure" in r1["caught"][0]
    assert r0["caught"] == []
    assert r0["steps"] == r1["steps"] == STEPS
    df = r0["rows"]
    aborted = df[df.quantity == "aborted"]
    assert aborted.step.tolist() == [2]
    assert "rank 1 aborted its step" in aborted.warning.item()
    # the exchange stayed in step: the later scheduled step was measured
    assert sorted(df[df.kind == "estimate"].step.unique()) == [0, 4]


@pytest.mark.slow
def test_a_rank_whose_probe_pass_fails_is_reported_and_nobody_waits(session):
    _, (r0, r1) = session
    r0, r1 = r0["_capture_fails"], r1["_capture_fails"]
    assert r0["steps"] == r1["steps"] == 3
    assert any("out of memory" in w and "training goes on" in w for w in r1["warnings"])
    df = r0["rows"]
    aborted = df[df.quantity == "aborted"]
    assert aborted.step.tolist() == [1]
    assert "rank 1 failed to capture the probe" in aborted.warning.item()
    assert sorted(df[df.kind == "estimate"].step.unique()) == [0, 2]


@pytest.mark.slow
def test_ranks_that_capture_different_layouts_all_get_the_same_error(session):
    _, reports = session
    messages = [r["_mismatch"]["error_message"] for r in reports]
    assert messages[0] == messages[1] and "different layers, sample shapes or dtypes" in messages[0]


@pytest.mark.slow
def test_a_rank_that_stops_calling_the_optimizer_is_timed_out_not_waited_for(session):
    _, (r0, r1) = session
    got = r0["_rank_dies"]
    failed = got["rows"][got["rows"].quantity == "gather_failed"]
    assert failed.step.tolist() == [1]
    assert "timed out" in failed.warning.item()
    assert any("stops gathering" in w for w in got["warnings"])
    assert got["steps"] == 2 and r1["_rank_dies"]["steps"] == 1


# ------------------------------------------------------------------ single process


def test_without_a_process_group_the_process_measures():
    ctx = context(rank=3, gather=True)
    assert ctx == DistContext(world_size=1, rank=0, measuring_rank=3, gather=True)
    assert ctx.measures and not ctx.exchanges and ctx.captures


def test_shard_splits_contiguously_and_gathers_back():
    x = torch.arange(11).reshape(11, 1)
    parts = [shard((x, {"m": x}), r, 3) for r in range(3)]
    assert [p[0].shape[0] for p in parts] == [4, 4, 3]
    assert torch.equal(torch.cat([p[1]["m"] for p in parts]), x)
    assert shard(x).shape == x.shape  # one process: the whole probe


def test_distributed_options_are_checked():
    model = _model("batch")
    probe = _full_probe()
    with pytest.raises(ics.ICSValueError, match="`rank` must be a non-negative int"):
        ics.ICSMonitor(model, probe, rank=-1)
    with pytest.raises(ics.ICSTypeError, match="`gather` must be a bool"):
        ics.ICSMonitor(model, probe, gather="yes")
    with pytest.raises(ics.ICSValueError, match="`gather_timeout` must be a positive"):
        ics.ICSMonitor(model, probe, gather_timeout=0)
    with pytest.raises(ics.ICSUsageError, match=r"no torch\.distributed process group"):
        ics.ICSMonitor(model, probe, group=object())
    with pytest.raises(ics.ICSValueError, match="fewer than the 4 ranks"):
        shard(torch.zeros(3, 2), 0, 4)
    with pytest.raises(ics.ICSValueError, match=r"not in 0\.\.1"):
        shard(torch.zeros(3, 2), 2, 2)
