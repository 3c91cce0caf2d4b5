"""The ICS monitor: lifecycle, schedules, results, bounds end to end, and no side effects."""

import copy
import pickle
import warnings

import pandas as pd
import pytest
import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit.nn import Unitization


def small_cnn(norm="batch", dropout=0.0, seed=0):
    torch.manual_seed(seed)

    def norm_layer(c):
        return nn.BatchNorm2d(c) if norm == "batch" else Unitization(c)

    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        norm_layer(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, stride=2),
        norm_layer(6),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
        nn.BatchNorm1d(3),
    )


def data(n=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()
    return x, y


def train(model, steps, monitor=None, lr=0.1, explicit=False, seed=3):
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if monitor is not None and not explicit:
        monitor.attach(opt)
    torch.manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        if explicit:
            with monitor.step():
                opt.step()
        else:
            opt.step()
    return opt


# ------------------------------------------------------------------ end to end


@pytest.mark.parametrize("norm", ["batch", "unitization"])
def test_every_row_of_a_short_training_run_satisfies_the_bounds(norm):
    model = small_cnn(norm)
    if norm == "unitization":
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, Unitization):
                    m.alpha.fill_(0.5)
    probe = data(64, seed=9)[0]
    monitor = ics.ICSMonitor(model, probe, every=4, views=("flatten", "pixel", "channel"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ics.ICSWarning)  # a violated bound would raise
        train(model, 24, monitor)
    df = monitor.results()
    measured = df[df.kind != "event"]
    assert sorted(measured.step.unique()) == [0, 4, 8, 12, 16, 20]
    assert measured.bounds_hold.all()
    assert monitor.update_count == 6 and monitor.step_count == 24
    conv_norms = {"1", "4"}
    bound = "U3" if norm == "batch" else "U5"
    got = set(df[(df.quantity == bound) & (df.view == "flatten")].layer)
    assert conv_norms <= got
    assert "U3" in set(df[df.layer == "9"].quantity)  # the BatchNorm1d head
    wide = ics.to_wide(measured[measured.view != "channel"])
    assert (wide.exact > 0).all()
    assert (wide.exact <= wide.U1 * (1 + 1e-6)).all()
    assert (wide.sliced <= wide.max_sliced).all()
    assert (wide.L3 >= wide.max_sliced).all() and (wide.L3 >= wide.L1 * (1 - 1e-9)).all()
    for q in ("floor_exact", "drift_var", "drift_m4"):
        assert wide[q].notna().all()
    chan = measured[measured.view == "channel"]
    assert {"per_coordinate", "per_coordinate_max", "floor_per_coordinate"} <= set(chan.quantity)


def test_unitization_at_alpha_one_reports_u4_and_it_holds():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 16), Unitization(16, alpha_init=1.0, learn_alpha=False), nn.Linear(16, 2)
    )
    monitor = ics.ICSMonitor(model, torch.randn(48, 5), every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor.attach(opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(32, 5)).square().sum().backward()
        opt.step()
    w = ics.to_wide(monitor.results().query("kind != 'event'"))
    assert w.U4.notna().all() and (w.exact <= w.U4).all()
    gamma = model[1].weight.detach().abs().max().item()
    assert w.U4.max() <= 2 * 1.0 * 16 * 2 * gamma + 1  # k (max|g a| + max|g' a'|) + shift


def test_where_both_measures_inputs_too():
    model = small_cnn()
    monitor = ics.ICSMonitor(model, data(32)[0], every=1, where="both", methods=("paired",))
    train(model, 1, monitor)
    layers = set(monitor.results().layer.dropna())
    assert {"1", "1:input", "4", "4:input"} <= layers


def test_gradient_ics_rows_need_targets():
    model = small_cnn()
    x, y = data(32)
    with pytest.raises(ics.ICSValueError, match="needs `loss_fn` and targets"):
        ics.ICSMonitor(model, x, gradient=True)
    monitor = ics.ICSMonitor(
        model, x, every=2, gradient=True, loss_fn=nn.functional.cross_entropy, targets=y
    )
    train(model, 3, monitor)
    g = monitor.results().query("kind == 'gradient'")
    assert set(g.quantity) == {"grad_ics_l2", "grad_ics_cos", "grad_norm"}
    assert set(g.layer) == {"0", "3", "8"} and set(g.step) == {0, 2}
    first = g[(g.layer == "0") & (g.quantity == "grad_ics_l2")]
    assert (first.value == 0).all()  # nothing precedes the first layer


# ------------------------------------------------------------------ never change the run


@pytest.mark.parametrize("explicit", [False, True])
def test_training_with_the_monitor_is_bitwise_identical(explicit):
    plain = small_cnn(dropout=0.3)
    watched = copy.deepcopy(plain)
    train(plain, 12)
    monitor = ics.ICSMonitor(
        watched,
        data(64, seed=5)[0],
        every=3,
        views=("flatten", "pixel"),
        gradient=True,
        loss_fn=nn.functional.cross_entropy,
        targets=data(64, seed=5)[1],
    )
    train(watched, 12, monitor, explicit=explicit)
    assert monitor.update_count == 4
    a, b = plain.state_dict(), watched.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "the monitor changed the training run"


def test_probe_from_a_dataloader_does_not_touch_the_global_rng():
    x, y = data(100)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), shuffle=True)
    model = small_cnn()
    state = torch.get_rng_state()
    monitor = ics.ICSMonitor(model, loader, probe_size=40, seed=2)
    assert torch.equal(state, torch.get_rng_state())
    assert monitor.probe.shape == (40, 1, 8, 8) and monitor.targets.shape == (40,)
    again = ics.ICSMonitor(small_cnn(), loader, probe_size=40, seed=2)
    assert torch.equal(monitor.probe, again.probe)


# ------------------------------------------------------------------ schedules and skipped steps


@pytest.mark.parametrize(
    ("every", "steps"), [(5, [0, 5, 10]), ([1, 7], [1, 7]), ("log:11:4", [0, 1, 4, 11])]
)
def test_schedules_pick_the_measured_steps(every, steps):
    model = small_cnn()
    monitor = ics.ICSMonitor(model, data(32)[0], every=every, methods=("paired",), floor=False)
    train(model, 12, monitor)
    assert sorted(monitor.results().step.unique()) == steps


def test_a_skipped_step_is_recorded_as_such_not_as_zero_shift():
    model = small_cnn()
    x, y = data(32)
    monitor = ics.ICSMonitor(model, x, every=1, methods=("paired",))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y) * float("inf")  # inf gradients
    scaler.scale(loss).backward()
    with pytest.warns(ics.ICSRuntimeWarning, match="changed no parameter"):
        with monitor.step():
            scaler.step(opt)  # skipped: found inf
    scaler.update()
    # an accumulation micro-step: no optimizer step at all between the calls
    with pytest.warns(ics.ICSRuntimeWarning, match="changed no parameter"):
        monitor.before_step()
        monitor.after_step()
    df = monitor.results()
    assert df.quantity.tolist() == ["skipped_step", "skipped_step"]
    assert df.step.tolist() == [0, 1] and df.value.isna().all()


# ------------------------------------------------------------------ results on disk


def test_results_are_appended_and_survive_a_crash(tmp_path):
    model = small_cnn()
    monitor = ics.ICSMonitor(model, data(32)[0], every=2, path=tmp_path, run="crash")
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.attach(opt)
    with pytest.raises(RuntimeError, match="out of memory"):
        for step in range(10):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
            opt.step()
            if step == 4:
                raise RuntimeError("simulated: CUDA out of memory")
    on_disk = ics.load_results(tmp_path)
    assert sorted(on_disk.step.unique()) == [0, 2, 4]
    mem = monitor.results()
    pd.testing.assert_frame_equal(
        on_disk.reset_index(drop=True), mem.reset_index(drop=True), check_dtype=False
    )
    parts = sorted(p.name for p in tmp_path.iterdir())
    assert [p[: len("part-crash-000000")] for p in parts] == [
        f"part-crash-{i:06d}" for i in range(3)
    ]


def test_results_warn_when_empty_and_cache_until_the_next_step():
    model = small_cnn()
    monitor = ics.ICSMonitor(model, data(32)[0], every=1, methods=("paired",))
    with pytest.warns(ics.ICSWarning, match="no step measured yet"):
        assert monitor.results().empty
    train(model, 1, monitor)
    first = monitor.results()
    assert monitor._store._table is not None
    train_more = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.detach()
    monitor.attach(train_more)
    model(data(8)[0]).sum().backward()
    train_more.step()
    assert len(monitor.results()) > len(first)
    monitor.reset()
    assert monitor.step_count == 0 and len(monitor._store) == 0


# ------------------------------------------------------------------ bad input


def test_probe_that_does_not_fit_or_is_too_small():
    model = small_cnn()
    with pytest.raises(ics.ICSValueError, match="does not fit the model"):
        ics.ICSMonitor(model, torch.randn(8, 3, 8, 8))
    with pytest.raises(ics.ICSValueError, match="at least 2"):
        ics.ICSMonitor(model, torch.randn(1, 1, 8, 8))


def test_attach_errors_and_warnings():
    model = small_cnn()
    monitor = ics.ICSMonitor(model, data(16)[0])
    with pytest.raises(ics.ICSValueError, match="does not own any parameter"):
        monitor.attach(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.attach(opt)
    with pytest.warns(ics.ICSWarning, match="already attached to this optimizer"):
        monitor.attach(opt)
    with pytest.raises(ics.ICSUsageError, match="another optimizer"):
        monitor.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    monitor.detach()
    with pytest.warns(ics.ICSWarning, match="not attached"):
        monitor.detach()
    with pytest.raises(ics.ICSUsageError, match="without before_step"):
        monitor.after_step()
    monitor.before_step()
    with pytest.raises(ics.ICSUsageError, match="twice"):
        monitor.before_step()


def test_unknown_options_are_named():
    model = small_cnn()
    x = data(16)[0]
    with pytest.raises(ics.ICSValueError, match="unknown method"):
        ics.ICSMonitor(model, x, methods=("exakt",))
    with pytest.raises(ics.ICSValueError, match="unknown view"):
        ics.ICSMonitor(model, x, views=("pixels",))
    with pytest.raises(ics.ICSValueError, match="`where`"):
        ics.ICSMonitor(model, x, where="inside")
    with pytest.raises(ics.ICSValueError, match="`every`"):
        ics.ICSMonitor(model, x, every=0)


class _Blowup(nn.Module):
    """Produces NaN once its `armed` flag is set (a layer going non-finite mid-training)."""

    armed = False

    def forward(self, x):
        return x * float("nan") if self.armed else x


def test_a_nan_layer_is_recorded_and_the_others_keep_being_measured():
    torch.manual_seed(0)
    blow = _Blowup()
    model = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), blow, nn.Linear(6, 3), nn.LayerNorm(3)
    )
    monitor = ics.ICSMonitor(model, torch.randn(32, 4), every=1, methods=("exact",))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.attach(opt)
    blow.armed = True
    opt.zero_grad()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    with pytest.warns(ics.ICSWarning, match=r"step 0: layer '4' produced NaN"):
        opt.step()
    df = monitor.results()
    event = df[df.quantity == "nonfinite"]
    assert event.layer.tolist() == ["4"] and "step 0" in event.warning.item()
    assert not df[(df.layer == "1") & (df.quantity == "exact")].empty


def test_the_users_exception_wins_and_no_hook_is_left_behind():
    model = small_cnn()
    monitor = ics.ICSMonitor(model, data(16)[0], every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with monitor.step():
            raise Boom("user code failed")
    assert monitor.results().quantity.tolist() == ["aborted"]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # attached: a step whose optimizer raises inside step() is aborted at the next step
    monitor.attach(opt)

    def failing_closure():
        raise Boom("closure failed")

    with pytest.raises(Boom):
        opt.step(failing_closure)
    model(data(8)[0]).sum().backward()
    opt.step()
    assert monitor.results().quantity.iloc[1] == "aborted"
    assert all(not m._forward_hooks for m in model.modules())


def test_monitor_and_model_stay_picklable(tmp_path):
    model = small_cnn()
    monitor = ics.ICSMonitor(model, data(16)[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.attach(opt)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    x = data(8)[0]
    assert torch.equal(loaded.eval()(x), model.eval()(x))
    # the optimizer's step hooks are small objects that pickle to inert copies
    hooks = [*opt._optimizer_step_pre_hooks.values(), *opt._optimizer_step_post_hooks.values()]
    assert len(hooks) == 2
    for hook in hooks:
        clone = pickle.loads(pickle.dumps(hook))
        assert clone(opt, (), {}) is None
    assert monitor.step_count == 0  # the inert copies did not step the monitor
    assert "ICSMonitor(" in repr(monitor) and "attached" in repr(monitor)
