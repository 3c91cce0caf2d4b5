"""The shared training loop, evaluate(), and the progress bar."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from ics_toolkit import ICSRuntimeWarning, ICSTypeError, ICSValueError
from ics_toolkit._progress import ProgressBar, auto_enabled
from ics_toolkit.data import flip_and_shift, make_blobs
from ics_toolkit.models import MLP, SmallCNN
from ics_toolkit.train import TrainResult, evaluate, lr_at, train


@pytest.fixture(scope="module")
def blobs():
    return make_blobs(256, 128, num_classes=3, dim=6, separation=4.0, seed=0)


def _mlp(seed: int = 0) -> MLP:
    return MLP(6, 3, hidden=(16, 16), seed=seed)


def test_trains_and_reports(blobs):
    result = train(_mlp(), blobs, steps=60, batch_size=32, progress=False)
    assert isinstance(result, TrainResult)
    assert len(result.losses) == len(result.accuracies) == len(result.lrs) == 60
    assert result.steps == 60 and not result.diverged and result.wall_time > 0
    assert np.mean(result.losses[-10:]) < 0.5 * np.mean(result.losses[:10])
    assert result.test_accuracy > 0.9
    frame = result.to_frame()
    assert list(frame.columns) == ["step", "loss", "accuracy", "lr"] and len(frame) == 60


def test_schedule_follows_milestones(blobs):
    result = train(
        _mlp(), blobs, steps=20, lr=0.1, milestones=(0.25, 0.5), lr_decay=0.2, progress=False
    )
    expected = [0.1] * 5 + [0.1 * 0.2] * 5 + [0.1 * 0.04] * 10
    np.testing.assert_allclose(result.lrs, expected, rtol=1e-12)
    assert lr_at(0, 10, (), 0.1) == 1.0


def test_same_seed_same_run_and_global_rng_untouched(blobs):
    state = torch.get_rng_state()
    a = train(_mlp(), blobs, steps=15, batch_size=16, seed=5, progress=False)
    b = train(_mlp(), blobs, steps=15, batch_size=16, seed=5, progress=False)
    c = train(_mlp(), blobs, steps=15, batch_size=16, seed=6, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.losses == b.losses and a.losses != c.losses


def test_global_seed_is_set_only_on_request(blobs):
    torch.manual_seed(0)
    train(_mlp(), blobs, steps=2, global_seed=7, progress=False)
    after = torch.get_rng_state()
    torch.manual_seed(7)
    assert torch.equal(after, torch.get_rng_state())  # seeded, then untouched by the loop


def test_matches_hand_written_full_batch_gradient_descent(blobs):
    """Full batch, no momentum, no decay, no schedule: plain gradient descent."""
    model = _mlp(1)
    ref = copy.deepcopy(model)
    n = len(blobs.y_train)
    result = train(
        model,
        blobs,
        steps=5,
        batch_size=n,
        lr=0.1,
        momentum=0.0,
        weight_decay=0.0,
        milestones=(),
        progress=False,
    )
    x, y = blobs.x_train, blobs.y_train
    losses = []
    for _ in range(5):
        ref.zero_grad()
        loss = nn.functional.cross_entropy(ref(x), y)  # batch order is irrelevant here
        losses.append(float(loss.detach()))
        loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.1 * p.grad
    np.testing.assert_allclose(result.losses, losses, rtol=1e-5)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_optimizer_callbacks_and_step_hooks(blobs):
    seen = {}
    steps_done = []

    def on_optimizer(opt):
        seen["opt"] = opt
        seen["group"] = dict(opt.param_groups[0])
        opt.register_step_post_hook(lambda *a, **k: steps_done.append(1))

    calls = []
    train(
        _mlp(),
        blobs,
        steps=7,
        on_optimizer=on_optimizer,
        on_step=lambda s, loss: calls.append((s, loss)),
        progress=False,
    )
    group = seen["group"]
    assert isinstance(seen["opt"], torch.optim.SGD)
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 5e-4)
    assert len(steps_done) == 7 and [s for s, _ in calls] == list(range(7))
    assert all(math.isfinite(v) for _, v in calls)


def test_custom_optimizer_is_used_and_scheduled(blobs):
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    result = train(model, blobs, steps=8, optimizer=opt, milestones=(0.5,), progress=False)
    assert result.lrs == [0.01] * 4 + [0.001] * 4
    assert opt.state  # Adam's moments exist: it was the optimizer that stepped


def test_augment_gets_a_device_generator():
    data = make_blobs(32, 8, dim=4, num_classes=2)
    x = data.x_train.reshape(32, 1, 2, 2)
    seen = []

    def augment(batch, gen):
        seen.append((batch.shape, gen.device.type))
        return flip_and_shift(batch, gen, pad=1)

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    train(model, (x, data.y_train), steps=3, batch_size=8, augment=augment, progress=False)
    assert seen == [(torch.Size([8, 1, 2, 2]), "cpu")] * 3


def test_divergence_stops_with_a_warning(blobs):
    model = nn.Sequential(nn.Linear(6, 3))
    with pytest.warns(ICSRuntimeWarning, match="training stopped at step .* the loss is"):
        result = train(model, blobs, steps=50, lr=1e30, momentum=0.0, progress=False)
    assert result.diverged and result.steps < 50 and math.isnan(result.test_accuracy)


def test_flags_restored_and_numpy_tuple_input():
    data = make_blobs(40, 10, dim=4, num_classes=2)
    model = MLP(4, 2, hidden=(8,))
    model.eval()
    model.features[1].train()
    result = train(
        model,
        (data.x_train.numpy(), data.y_train.numpy()),
        steps=3,
        batch_size=100,  # capped at the 40 training samples
        progress=False,
    )
    assert result.test_accuracy is None
    assert not model.training and model.features[1].training and not model.features[0].training


def test_evaluate_matches_numpy_and_has_no_side_effects():
    model = SmallCNN(1, 4, width=4, seed=0)
    x = torch.randn(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model(x)  # non-trivial running statistics
    y = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = evaluate(model, x, y.numpy(), batch_size=7)
    assert model.training  # restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        pred = model(x).numpy().argmax(1)
    assert acc == pytest.approx(float(np.mean(pred == y.numpy())))


@pytest.mark.parametrize(
    ("kwargs", "err", "msg"),
    [
        ({"steps": 0}, ICSValueError, "`steps` must be a positive int"),
        ({"steps": 2, "batch_size": 0}, ICSValueError, "`batch_size` must be a positive int"),
        ({"steps": 2, "milestones": (0.5, 0.2)}, ICSValueError, "`milestones` must be increasing"),
        ({"steps": 2, "milestones": (1.5,)}, ICSValueError, "`milestones` must be increasing"),
        (
            {"steps": 2, "optimizer": "sgd"},
            ICSTypeError,
            "`optimizer` must be a torch.optim.Optimizer",
        ),
    ],
)
def test_argument_errors(blobs, kwargs, err, msg):
    with pytest.raises(err, match=msg):
        train(_mlp(), blobs, **kwargs, progress=False)


def test_data_errors():
    model = nn.Linear(2, 2)
    with pytest.raises(ICSTypeError, match=r"`data` must be an ics_toolkit\.data\.Dataset"):
        train(model, "data", steps=1)
    with pytest.raises(ICSValueError, match="`train` inputs must be"):
        train(model, (torch.zeros(4, 2), torch.zeros(3, dtype=torch.long)), steps=1)
    with pytest.raises(ICSTypeError, match="`train` labels must be integers"):
        train(model, (torch.zeros(4, 2), torch.zeros(4)), steps=1)
    with pytest.raises(ICSTypeError, match=r"`model` must be a torch\.nn\.Module"):
        train(lambda x: x, (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), steps=1)


# ----------------------------------------------------------------------------------------
# progress bar
# ----------------------------------------------------------------------------------------
def test_progress_bar_renders_when_forced():
    buf = io.StringIO()
    with ProgressBar(4, "fit", enabled=True, file=buf, min_interval=0.0, width=8) as bar:
        for i in range(4):
            bar.update(1, loss=1.0 / (i + 1), acc=0.5)
    text = buf.getvalue()
    last = text.split("\r")[-1]
    assert last.startswith("fit |########| 4/4 [") and "loss=0.25 acc=0.5" in last
    assert text.endswith("\n") and text.count("\r") == 5  # 4 updates + the final draw


def test_progress_bar_off_when_not_a_tty_or_disabled(monkeypatch):
    buf = io.StringIO()  # not a terminal
    bar = ProgressBar(3, file=buf)
    bar.update(3)
    bar.close()
    assert buf.getvalue() == "" and not auto_enabled(buf)

    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    assert auto_enabled(FakeTTY())
    monkeypatch.setenv("ICS_TOOLKIT_PROGRESS", "0")
    assert not auto_enabled(FakeTTY())
    silent = FakeTTY()
    ProgressBar(2, file=silent, enabled=False).update(2)
    assert silent.getvalue() == ""


def test_train_progress_goes_to_stderr(blobs, capsys):
    train(_mlp(), blobs, steps=3, progress=True, desc="demo")
    err = capsys.readouterr().err
    assert "demo |" in err and "3/3" in err and "loss=" in err and "acc=" in err
    train(_mlp(), blobs, steps=3, progress=False)
    assert capsys.readouterr().err == ""
