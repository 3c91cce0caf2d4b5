"""The monitor never breaks or changes the user's training (issue #10).

A failure inside the monitor's own work (probe pass, analysis, gradient ICS, writer,
schedule) is caught: training completes every step with parameters, buffers and the
global RNGs bitwise equal to a run without the monitor, the failure is an ``error``
row, warned once per kind and counted. ``on_error="raise"`` propagates it. The
attached monitor lives until ``detach()``, ``attach`` is a context manager, the
GradScaler recipe works with ``attach()``, and measuring never touches the global
RNGs, not even on first use (POT's import) or when the probe comes from a DataLoader
with random transforms.
"""

import copy
import gc
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit import monitor as monitor_module

ROOT = Path(__file__).parent.parent


class Switch(nn.Module):
    """Identity that raises (or interrupts) in no-grad passes, i.e. the monitor's probe passes."""

    def __init__(self) -> None:
        super().__init__()
        self.error: BaseException | None = None

    def forward(self, x):
        if self.error is not None and not torch.is_grad_enabled():
            raise self.error
        return x


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 12),
        nn.BatchNorm1d(12),  # its running statistics move in a probe pass before Switch
        nn.ReLU(),
        nn.Dropout(0.2),  # consumes the global torch RNG in training
        Switch(),
        nn.Linear(12, 4),
        nn.LayerNorm(4),
    )


def batches(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g))
        for _ in range(steps)
    ]


def probe():
    g = torch.Generator().manual_seed(7)
    return torch.randn(24, 6, generator=g), torch.randint(0, 4, (24,), generator=g)


def train(model, steps, monitor=None, how="attach"):
    """A loop that also uses Python's random and numpy's global RNG; returns the final RNGs."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if monitor is not None and how in ("attach", "both"):
        monitor.attach(opt)
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)  # noqa: NPY002
    for x, y in batches(steps):
        opt.zero_grad()
        scale = 1.0 + random.random() + float(np.random.rand())  # noqa: NPY002
        (scale * nn.functional.cross_entropy(model(x), y)).backward()
        if monitor is not None and how in ("step", "both"):  # both: the hooks defer
            with monitor.step():
                opt.step()
        else:
            opt.step()
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()  # noqa: NPY002


def assert_same_run(plain, watched, rng_plain, rng_watched):
    a, b = plain.state_dict(), watched.state_dict()
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"the monitor changed the training run: {changed}"
    assert all(m.training for m in watched.modules())
    assert torch.equal(rng_plain[0], rng_watched[0]), "torch RNG differs"
    assert np.array_equal(rng_plain[1], rng_watched[1]), "numpy RNG differs"
    assert rng_plain[2] == rng_watched[2], "Python random differs"


STEPS = 6


@pytest.fixture(scope="module")
def reference():
    model = make_model()
    rng = train(model, STEPS)
    return model, rng


def _probe_fails(monitor, model, tmp_path):
    model[4].error = RuntimeError("probe pass exploded")


def _schedule_fails(monitor, model, tmp_path):
    def schedule(step):
        if step % 2 == 1:
            raise ZeroDivisionError("schedule exploded")
        return True

    monitor.schedule = schedule


def _writer_fails(monitor, model, tmp_path):
    # as root chmod does not stop writes: replace the results folder with a file instead
    shutil.rmtree(tmp_path / "ics")
    (tmp_path / "ics").write_text("not a folder")


def _analysis_fails(monitor, model, tmp_path):
    def measure_step(*args, **kwargs):
        raise ValueError("analysis exploded")

    monitor_module.measure_step = measure_step  # restored by the monkeypatch fixture


def _gradient_fails(monitor, model, tmp_path):
    def loss_fn(out, target):
        raise ArithmeticError("loss exploded")

    monitor.loss_fn = loss_fn


FAILURES = {
    "probe": (_probe_fails, "a probe pass: RuntimeError", "probe pass exploded"),
    "schedule": (_schedule_fails, "the schedule: ZeroDivisionError", "schedule exploded"),
    "writer": (_writer_fails, "writing results: NotADirectoryError", "directory"),
    "analysis": (_analysis_fails, "the analysis: ValueError", "analysis exploded"),
    "gradient": (_gradient_fails, "the gradient ICS: ArithmeticError", "loss exploded"),
}


def build(tmp_path, **kwargs):
    x, y = probe()
    model = make_model()
    kwargs.setdefault("every", 1)
    monitor = ics.ICSMonitor(
        model,
        x,
        methods=("exact", "sliced"),
        gradient=True,
        loss_fn=nn.functional.cross_entropy,
        targets=y,
        path=tmp_path / "ics",
        run="r",
        **kwargs,
    )
    return model, monitor


@pytest.mark.parametrize("how", ["attach", "step", "both"])
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failing_monitor_leaves_training_bitwise_unchanged(
    failure, how, reference, tmp_path, monkeypatch
):
    monkeypatch.setattr(monitor_module, "measure_step", monitor_module.measure_step)
    inject, kind, text = FAILURES[failure]
    model, monitor = build(tmp_path)
    inject(monitor, model, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rng = train(model, STEPS, monitor, how=how)
    assert_same_run(reference[0], model, reference[1], rng)
    assert monitor.step_count == STEPS
    # one warning for the kind, pointing at the user's line, however often it failed
    ours = [w for w in caught if issubclass(w.category, ics.ICSRuntimeWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert Path(ours[0].filename).name == "test_failsafe.py"
    assert text in str(ours[0].message) and "counted" in str(ours[0].message)
    df = monitor.results()
    errors = df[df.quantity == "error"]
    assert (errors.kind == "event").all() and errors.warning.str.contains(text).all()
    [(name, count)] = monitor.errors.items()
    assert name.startswith(kind) and count == len(errors) >= STEPS // 2
    assert sorted(errors.value) == list(range(1, count + 1))  # the running count per kind
    assert f"errors={count}" in repr(monitor)
    if failure != "writer":
        on_disk = ics.load_results(tmp_path / "ics")
        assert (on_disk.quantity == "error").sum() == count


class EveryOther:
    """A schedule object whose call raises on odd steps."""

    def __call__(self, step):
        if step % 2:
            raise LookupError(f"no entry for step {step}")
        return True


def test_a_schedule_object_that_raises_is_named_as_the_schedule(tmp_path):
    model, monitor = build(tmp_path)
    monitor.schedule = EveryOther()
    with pytest.warns(ics.ICSRuntimeWarning, match="the schedule failed before the optimizer"):
        train(model, 4, monitor, how="both")
    assert monitor.errors == {"the schedule: LookupError": 2}
    df = monitor.results()
    assert not (df.quantity == "aborted").any() and monitor.update_count == 2


def test_a_failure_at_every_step_is_counted_with_bounded_rows():
    from ics_toolkit import _failsafe

    def schedule(step):
        raise LookupError(f"no entry for step {step}")

    monitor = ics.ICSMonitor(make_model(), probe()[0], every=1, methods=("paired",))
    monitor.schedule = schedule
    count = _failsafe.ROW_LIMIT + 2 * _failsafe.ROW_EVERY + 5
    with pytest.warns(ics.ICSRuntimeWarning, match="no entry for step 0") as record:
        for _ in range(count):
            with monitor.step():
                pass
    assert len(record) == 1 and monitor.step_count == count
    assert monitor.errors == {"the schedule: LookupError": count}
    values = monitor.results().query("quantity == 'error'").value.tolist()
    every = _failsafe.ROW_EVERY
    assert values == [*range(1, _failsafe.ROW_LIMIT + 1), *range(2 * every, count + 1, every)]


def test_the_other_steps_are_still_measured_after_a_failure(tmp_path):
    model, monitor = build(tmp_path)
    _schedule_fails(monitor, model, tmp_path)
    with pytest.warns(ics.ICSRuntimeWarning, match="schedule exploded"):
        train(model, STEPS, monitor)
    df = monitor.results()
    assert sorted(df[df.quantity == "exact"].step.unique()) == [0, 2, 4]
    assert sorted(df[df.quantity == "error"].step) == [1, 3, 5]
    assert monitor.update_count == 3


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_on_error_raise_propagates(failure, tmp_path, monkeypatch):
    monkeypatch.setattr(monitor_module, "measure_step", monitor_module.measure_step)
    inject, _, text = FAILURES[failure]
    model, monitor = build(tmp_path, on_error="raise")
    assert monitor.on_error == "raise"
    inject(monitor, model, tmp_path)
    with pytest.raises(Exception, match=text):
        train(model, STEPS, monitor)
    assert monitor.errors == {}


def test_on_error_is_checked():
    with pytest.raises(ics.ICSValueError, match=r"`on_error` must be 'warn'.*or 'raise'"):
        ics.ICSMonitor(make_model(), probe()[0], on_error="ignore")


def test_two_kinds_of_failure_warn_once_each(tmp_path):
    model, monitor = build(tmp_path, every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.attach(opt)
    x, y = batches(1)[0]
    with pytest.warns(ics.ICSRuntimeWarning) as record:
        for error in [RuntimeError("a"), RuntimeError("b"), KeyError("c"), RuntimeError("d")]:
            model[4].error = error
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert len(record) == 2
    assert monitor.errors == {"a probe pass: RuntimeError": 3, "a probe pass: KeyError": 1}
    model[4].error = None
    opt.step()  # the monitor recovers
    assert monitor.update_count == 1


def test_the_optimizer_steps_exactly_once_when_the_pre_hook_fails(tmp_path):
    model, monitor = build(tmp_path)
    plain = copy.deepcopy(model)
    x, y = batches(1)[0]
    for m in (model, plain):
        torch.manual_seed(0)  # the same dropout mask
        nn.functional.cross_entropy(m(x), y).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.attach(opt)
    steps = []
    opt.register_step_post_hook(lambda *a: steps.append(1))
    model[4].error = RuntimeError("before")
    with pytest.warns(ics.ICSRuntimeWarning, match="before the optimizer step"):
        opt.step()
    torch.optim.SGD(plain.parameters(), lr=0.1).step()
    assert len(steps) == 1 and monitor.step_count == 1
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters(), strict=True)
    )
    assert not all(
        torch.equal(p, q)
        for p, q in zip(model.parameters(), make_model().parameters(), strict=True)
    )


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_interrupts_propagate_after_restoring_state(interrupt, tmp_path):
    model, monitor = build(tmp_path)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.attach(opt)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    model[4].error = interrupt()
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    rng = torch.get_rng_state(), random.getstate()
    with pytest.raises(interrupt):
        opt.step()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in buffers.items())
    assert torch.equal(rng[0], torch.get_rng_state()) and rng[1] == random.getstate()
    assert all(m.training for m in model.modules()) and monitor.errors == {}
    model[4].error = None
    opt.step()  # the monitor is usable again after the interrupt was handled
    assert monitor.update_count == 1


def test_the_construction_checks_are_side_effect_free():
    model = make_model()
    x, y = probe()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()  # noqa: NPY002
    ics.ICSMonitor(model, x, gradient=True, loss_fn=nn.functional.cross_entropy, targets=y)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert torch.equal(rng[0], torch.get_rng_state())
    assert np.array_equal(rng[1], np.random.get_state()[1]) and rng[2] == random.getstate()  # noqa: NPY002


# ------------------------------------------------------------------ lifetime and attach


def test_an_attached_monitor_without_a_reference_keeps_measuring(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = weakref.ref(
        ics.ICSMonitor(model, probe()[0], every=1, path=tmp_path, run="gc").attach(opt)
    )
    gc.collect()
    assert ref() is not None
    for x, y in batches(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    df = ics.load_results(tmp_path)
    assert sorted(df[df.quantity == "exact"].step.unique()) == [0, 1, 2]
    ref().detach()
    gc.collect()
    assert ref() is None  # detached: nothing holds it any more


def test_attach_is_a_context_manager_and_a_plain_call(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = ics.ICSMonitor(model, probe()[0], every=1)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    with monitor.attach(opt) as entered:
        assert entered is monitor and monitor.attached is True
        assert len(opt._optimizer_step_pre_hooks) == len(opt._optimizer_step_post_hooks) == 1
        opt.step()
    assert monitor.attached is False and monitor.step_count == 1
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    with pytest.raises(ZeroDivisionError):
        with monitor.attach(opt):
            _ = 1 / 0
    assert monitor.attached is False
    monitor.attach(opt)  # a plain call stays attached
    opt.step()
    assert monitor.attached is True and monitor.step_count == 2
    monitor.detach()


def test_optimizer_with_hooks_stays_picklable_and_deep_copyable(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monitor = ics.ICSMonitor(model, probe()[0], every=1).attach(opt)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    clone = copy.deepcopy(opt)
    loaded = pickle.loads(pickle.dumps(opt))
    torch.save({"model": model, "opt": opt}, tmp_path / "ckpt.pt")
    torch.load(tmp_path / "ckpt.pt", weights_only=False)
    for other in (clone, loaded):
        assert other.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
        for hook in [
            *other._optimizer_step_pre_hooks.values(),
            *other._optimizer_step_post_hooks.values(),
        ]:
            assert hook.monitor is None  # inert copies: they never step the monitor
        other.step()
    assert monitor.step_count == 1


# ------------------------------------------------------------------ GradScaler / AMP


def scaler_loop(model, monitor, attach, steps=4, inf_at=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if attach:
        monitor.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for i, (x, y) in enumerate(batches(steps)):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if i == inf_at:
            loss = loss * float("inf")  # inf gradients: the scaler skips this step
        scaler.scale(loss).backward()
        if monitor is None:
            scaler.step(opt)
        else:
            with monitor.step():
                scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("attach", [False, True])
def test_gradscaler_recipe_with_and_without_attach(attach):
    plain = make_model()
    scaler_loop(plain, None, attach=False)
    model = make_model()
    monitor = ics.ICSMonitor(model, probe()[0], every=1, methods=("paired",))
    passes = []
    run = monitor.recorder.run
    monitor.recorder.run = lambda x: passes.append(1) or run(x)
    with pytest.warns(ics.ICSRuntimeWarning, match="changed no parameter") as record:
        scaler_loop(model, monitor, attach=attach)
    assert len(record) == 1  # only the skipped step warns: no error, no usage error
    a, b = plain.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    df = monitor.results()
    events = df[(df.kind == "event") & (df.quantity != "measure_time_s")]
    assert events.quantity.tolist() == ["skipped_step"] and events.step.tolist() == [2]
    assert sorted(df[df.quantity == "paired"].step.unique()) == [0, 1, 3]
    assert monitor.step_count == 4 and monitor.update_count == 3 and monitor.errors == {}
    # probe passes: before 0, after 0 (reused before 1), after 1 (reused before the
    # skipped step 2, which needs no pass after it), before 3, after 3
    assert len(passes) == 5


# ------------------------------------------------------------------ global RNGs


def test_first_measured_step_imports_pot_without_touching_the_rngs():
    script = textwrap.dedent(
        """
        import random, sys
        import numpy as np, torch
        from torch import nn
        import ics_toolkit as ics
        assert "ot" not in sys.modules, "POT imported too early"
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))
        monitor = ics.ICSMonitor(model, torch.randn(16, 3), every=1, methods=("exact",))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor.attach(opt)
        model(torch.randn(8, 3)).sum().backward()
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        opt.step()
        assert "ot" in sys.modules and monitor.update_count == 1
        assert random.getstate() == states[0], "Python random changed"
        after = np.random.get_state()
        assert np.array_equal(after[1], states[1][1]) and after[2:] == states[1][2:], "numpy"
        assert torch.equal(torch.get_rng_state(), states[2]), "torch"
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


class Augmented(torch.utils.data.Dataset):
    """A dataset whose transform draws from all three global RNGs."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(50, 6, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        noise = torch.randn(6) + float(np.random.rand()) + random.random()  # noqa: NPY002
        return self.x[i] + 0.1 * noise, i % 4


def test_probe_from_a_dataloader_with_random_transforms_touches_no_global_rng():
    loader = torch.utils.data.DataLoader(Augmented(), batch_size=8, shuffle=True)
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)  # noqa: NPY002
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()  # noqa: NPY002
    first = ics.ICSMonitor(make_model(), loader, probe_size=20, seed=3)
    torch.manual_seed(11)  # make_model seeded torch: put the state back where the test set it
    assert np.array_equal(states[1], np.random.get_state()[1])  # noqa: NPY002
    assert states[2] == random.getstate()
    model = make_model()
    torch.set_rng_state(states[0])
    again = ics.ICSMonitor(model, loader, probe_size=20, seed=3)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert torch.equal(first.probe, again.probe)  # the transforms drew seeded: reproducible
    other = ics.ICSMonitor(model, loader, probe_size=20, seed=4)
    assert not torch.equal(first.probe, other.probe)
