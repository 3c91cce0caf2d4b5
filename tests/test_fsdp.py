"""The monitor on FSDP2 (``fully_shard``) models: 2 CPU processes (gloo), bounded in time.

The scenarios run in spawned processes joined with a deadline (a process alive at the
deadline is killed and the test fails, so a deadlock cannot hang the suite). Workers
write what they saw to a file; the assertions run in the test process.
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
from ics_toolkit._state import bitwise_equal

WORLD = 2
DEADLINE_S = 120.0
PROBE_N = 16
STEPS = 4
EVERY = 2
LAYERS = (nn.Linear, nn.LayerNorm)


# ------------------------------------------------------------------ worker side
def _plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


def _sharded(nested: bool) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _plain()
    if nested:  # the linears are groups of their own, the root holds the LayerNorm
        fully_shard(model[0])
        fully_shard(model[3])
    fully_shard(model)
    return model


def _probe() -> torch.Tensor:
    return torch.randn(PROBE_N, 6, generator=torch.Generator().manual_seed(5))


def _batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(8, 6, generator=g) for _ in range(STEPS)]


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank must call this (full_tensor all-gathers)."""
    return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}


def _train(rank: int, monitor_options: dict | None, nested: bool) -> dict:
    model = _sharded(nested)
    params = list(model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    monitor = None
    if monitor_options is not None:
        monitor = ics.ICSMonitor(
            model, layers=LAYERS, every=EVERY, methods=("exact", "paired"), **monitor_options
        )
        monitor.attach(opt)
    losses, states, kinds = [], {}, []
    for step, x in enumerate(_batches(rank)):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        losses.append(loss.detach().clone())
        if step % EVERY == 0:
            before = _full_state(model)
        opt.step()
        if step % EVERY == 0:
            states[step] = (before, _full_state(model))
        # the parameters on the modules are the optimizer's DTensor shards, unreplaced
        now = list(model.parameters())
        assert all(a is b for a, b in zip(now, params, strict=True))
        kinds.append(sorted({type(p).__name__ for p in now}))
    out = {
        "losses": torch.stack(losses),
        "final": _full_state(model),
        "local": [p.to_local().clone() for p in model.parameters()],
        "kinds": kinds,
        "states": states,
    }
    if monitor is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["rows"] = monitor.results()
        out["steps"] = monitor.step_count
    return out


def _default_mode(rank: int) -> dict:
    base = _train(rank, None, nested=True)
    watched = _train(rank, {"probe": _probe()}, nested=True)
    return {"base": base, "watched": watched}


def _gather_mode(rank: int) -> dict:
    from ics_toolkit.distributed import shard

    base = _train(rank, None, nested=False)
    watched = _train(rank, {"probe": shard(_probe()), "gather": True}, nested=False)
    return {"base": base, "watched": watched}


def _refusals(rank: int) -> dict:
    """Wrappers the monitor cannot measure are refused when it is built."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    errors = {}
    mesh = init_device_mesh("cpu", (WORLD,))
    tp = _plain()
    tp[0].weight = nn.Parameter(distribute_tensor(tp[0].weight.detach(), mesh, [Shard(0)]))
    try:
        ics.ICSMonitor(tp, _probe(), layers=LAYERS)
    except ics.ICSError as err:
        errors["tensor_parallel"] = (type(err).__name__, str(err))
    from torch.distributed.fsdp import FullyShardedDataParallel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1's deprecation notice
        fsdp1 = FullyShardedDataParallel(_plain(), device_id=torch.device("cpu"))
    try:
        ics.ICSMonitor(fsdp1, _probe(), layers=LAYERS)
    except ics.ICSError as err:
        errors["fsdp1"] = (type(err).__name__, str(err))
    try:
        ics.ICSMonitor(_sharded(True), _probe(), gradient=True, loss_fn=lambda o, t: o.sum())
    except ics.ICSError as err:
        errors["gradient"] = (type(err).__name__, str(err))
    return errors


def _batchnorm(rank: int) -> dict:
    """A BatchNorm layer: every estimator and the bounds but its own U3 (sharded affine)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = ics.ICSMonitor(model, _probe(), every=1)
    monitor.attach(opt)
    for x in _batches(rank)[:2]:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"rows": monitor.results()}


_SCENARIOS = {f.__name__: f for f in (_default_mode, _gather_mode, _refusals, _batchnorm)}


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    report: dict = {}
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
        )
        for name, fn in _SCENARIOS.items():
            try:
                report[name] = fn(rank)
            except BaseException:
                report[name] = {"error": traceback.format_exc()}
                raise
    except BaseException:
        report.setdefault("error", traceback.format_exc())
    finally:
        with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(report, f)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ------------------------------------------------------------------ test side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, port, str(tmp)), daemon=True) for r in range(WORLD)
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
    out = []
    for r in range(WORLD):
        path = tmp / f"rank{r}.pkl"
        assert path.exists(), f"rank {r} exited with code {procs[r].exitcode} without a report"
        rep = pickle.loads(path.read_bytes())
        assert "error" not in rep, f"rank {r} failed:\n{rep['error']}"
        for name, res in rep.items():
            assert "error" not in res, f"rank {r}, {name} failed:\n{res['error']}"
        out.append(rep)
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)


def _check_against_reference(got: dict, n_samples: int) -> None:
    """The measured W1 equals one process's plain capture of the unsharded model."""
    df = got["rows"]
    est = df[df.kind == "estimate"]
    assert set(est.n_samples) == {n_samples}
    assert sorted(est.step.unique()) == list(range(0, STEPS, EVERY))
    checked = 0
    for step, (before, after) in got["states"].items():
        net = _plain()
        net.load_state_dict(before)
        x = ics.capture(net, _probe(), layers=LAYERS)
        net.load_state_dict(after)
        y = ics.capture(net, _probe(), layers=LAYERS)
        for layer in x:
            row = est[(est.step == step) & (est.layer == layer)]
            exact = row[row.quantity == "exact"].value.item()
            ref = ics.wasserstein(x[layer].double(), y[layer].double())
            assert exact == pytest.approx(ref, rel=1e-5, abs=1e-9)
            assert ref > 0
            checked += 1
    assert checked == (STEPS // EVERY) * 3


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["_default_mode", "_gather_mode"])
def test_fsdp2_training_is_bitwise_unchanged_by_the_monitor(reports, scenario):
    for rank, rep in enumerate(reports):
        base, watched = rep[scenario]["base"], rep[scenario]["watched"]
        assert bitwise_equal(base["losses"], watched["losses"]), f"rank {rank}"
        assert _same(base["final"], watched["final"]), f"rank {rank}"
        for a, b in zip(base["local"], watched["local"], strict=True):
            assert bitwise_equal(a, b)
        assert watched["kinds"] == [["DTensor"]] * STEPS  # never out of DTensor form
        assert watched["steps"] == STEPS
        # the run did train (a monitor that froze it would also be "unchanged")
        assert not torch.equal(base["losses"][0], base["losses"][-1])


@pytest.mark.slow
def test_fsdp2_default_mode_measures_the_probe_on_the_measuring_rank(reports):
    _check_against_reference(reports[0]["_default_mode"]["watched"], PROBE_N)
    assert reports[1]["_default_mode"]["watched"]["rows"].empty  # the other rank keeps none


@pytest.mark.slow
def test_fsdp2_gather_mode_measures_every_shard(reports):
    _check_against_reference(reports[0]["_gather_mode"]["watched"], PROBE_N)


@pytest.mark.slow
def test_unknown_sharding_is_refused_at_construction(reports):
    for rep in reports:
        errors = rep["_refusals"]
        kind, message = errors["tensor_parallel"]
        assert kind == "ICSTypeError" and "'0.weight' is a DTensor not managed by" in message
        kind, message = errors["fsdp1"]
        assert kind == "ICSTypeError" and "FSDP1's FullyShardedDataParallel" in message
        assert "fully_shard instead" in message
        kind, message = errors["gradient"]
        assert kind == "ICSValueError" and "gradient=True" in message and "fully_shard" in message


@pytest.mark.slow
def test_fsdp2_batchnorm_layers_get_every_bound_but_their_own(reports):
    df = reports[0]["_batchnorm"]["rows"]
    quantities = set(df[df.layer == "1"].quantity)
    assert {"exact", "L1", "L2", "L3", "U1", "U2"} <= quantities
    assert "U3" not in quantities
    assert df[df.kind != "event"].bounds_hold.all()
    assert sorted(df[df.kind == "estimate"].step.unique()) == [0, 1]


def test_a_deepspeed_engine_is_refused_by_name():
    class DeepSpeedEngine(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))

        def forward(self, x):
            return self.module(x)

    with pytest.raises(ics.ICSTypeError, match=r"DeepSpeed engine.*engine\.module"):
        ics.ICSMonitor(DeepSpeedEngine(), torch.randn(4, 3))


def test_a_plain_model_is_not_fsdp():
    from ics_toolkit import fsdp

    model = _plain()
    assert fsdp.check_wrappers(model) is False
    with fsdp.resharded(model):
        pass
    assert fsdp.local(model[0].weight) is model[0].weight
