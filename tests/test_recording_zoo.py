"""capture() on a zoo of architectures: keys, values against manual forwards, no side effects."""

import copy
import dataclasses
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ics_toolkit as ics
from ics_toolkit.recording import Recorder

TOL = 1e-12  # float64 model and float64 storage: manual and hooked forwards agree to rounding


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _bn_train(x, bn, axes):
    """BatchNorm with the batch's own (biased) statistics, written out."""
    mean = x.mean(dim=axes, keepdim=True)
    var = x.var(dim=axes, unbiased=False, keepdim=True)
    shape = [1] * x.ndim
    shape[1] = -1
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def _bn_eval(x, bn):
    shape = [1] * x.ndim
    shape[1] = -1
    mean, var = bn.running_mean.view(shape), bn.running_var.view(shape)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def _scramble_stats(model, seed=1):
    """Give every norm layer non-trivial affine parameters and running statistics."""
    g = _gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(5)
    return model


# ------------------------------------------------------------------ the zoo
def mlp_bn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.BatchNorm1d(3)
    ).double()


def cnn_bn_gn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
    ).double()


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(Block(4), Block(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.layer1(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        h = self.body(x)
        return {"ids": h.argmax(1), "logits": self.norm(h), "hidden": h}


@dataclasses.dataclass
class Output:
    mask: torch.Tensor
    pooled: torch.Tensor
    hidden: torch.Tensor


class DataclassOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        h = self.lin(x)
        return Output(mask=h > 0, pooled=h.mean(1), hidden=h)


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.inner(x)["hidden"]))


class Twice(nn.Module):
    """A block used twice in one forward."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.mid = nn.Tanh()

    def forward(self, x):
        return self.block(self.mid(self.block(x)))


class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 16)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):
        return self.bn(self.drop(self.lin(x)))


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mlp_batchnorm1d_values(mode):
    model = _scramble_stats(mlp_bn())
    x = _randn(32, 5)
    out = ics.capture(model, x, mode=mode, dtype=torch.float64)
    assert list(out) == ["1", "4"]
    h1 = F.linear(x, model[0].weight, model[0].bias)
    ref1 = _bn_train(h1, model[1], 0) if mode == "train" else _bn_eval(h1, model[1])
    torch.testing.assert_close(out["1"], ref1, rtol=TOL, atol=TOL)
    h2 = F.linear(torch.relu(ref1), model[3].weight, model[3].bias)
    ref2 = _bn_train(h2, model[4], 0) if mode == "train" else _bn_eval(h2, model[4])
    torch.testing.assert_close(out["4"], ref2, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cnn_batchnorm2d_and_groupnorm_values(mode):
    model = _scramble_stats(cnn_bn_gn())
    x = _randn(6, 3, 7, 7)
    rec = Recorder(model, mode=mode, dtype=torch.float64)
    out = rec.run(x)
    assert list(out) == ["1", "4"]
    c1 = F.conv2d(x, model[0].weight, model[0].bias, padding=1)
    bn = model[1]
    ref1 = _bn_train(c1, bn, (0, 2, 3)) if mode == "train" else _bn_eval(c1, bn)
    torch.testing.assert_close(out["1"], ref1, rtol=TOL, atol=TOL)
    c2 = F.conv2d(torch.relu(ref1), model[3].weight, model[3].bias, stride=2)
    gn = model[4]
    groups = c2.reshape(6, 4, -1)  # GroupNorm: per sample and group, in both modes
    normed = (groups - groups.mean(-1, keepdim=True)) / torch.sqrt(
        groups.var(-1, unbiased=False, keepdim=True) + gn.eps
    )
    ref2 = normed.reshape(c2.shape) * gn.weight.view(1, -1, 1, 1) + gn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out["4"], ref2, rtol=TOL, atol=TOL)
    assert rec.info["4"].module_type == "GroupNorm"
    assert (rec.info["4"].batch_axis, rec.info["4"].channel_axis) == (0, 1)
    assert rec.info["1"].module is model[1]


def test_residual_network_values_and_glob():
    model = _scramble_stats(ResNet().double())
    x = _randn(4, 3, 6, 6)
    out = ics.capture(model, x, layers="layer1.*.bn?", dtype=torch.float64)
    assert list(out) == ["layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2"]
    # manual forward with the batch's own statistics
    h = F.conv2d(x, model.stem.weight, model.stem.bias, padding=1)
    for i, block in enumerate(model.layer1):
        a = _bn_train(F.conv2d(h, block.conv1.weight, padding=1), block.bn1, (0, 2, 3))
        b = _bn_train(F.conv2d(torch.relu(a), block.conv2.weight, padding=1), block.bn2, (0, 2, 3))
        torch.testing.assert_close(out[f"layer1.{i}.bn1"], a, rtol=TOL, atol=TOL)
        torch.testing.assert_close(out[f"layer1.{i}.bn2"], b, rtol=TOL, atol=TOL)
        h = torch.relu(h + b)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer_kwargs_and_tuple(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first).double()
    x = _randn(4, 5, 8) if batch_first else _randn(5, 4, 8)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[:, -1] = True
    rec = Recorder(layer, mode="eval", dtype=torch.float64)
    by_kwargs = rec.run({"src": x, "src_key_padding_mask": mask})
    assert list(by_kwargs) == ["norm1", "norm2"]
    info = rec.info["norm2"]
    assert (info.batch_axis, info.channel_axis) == ((0, 2) if batch_first else (1, 2))
    by_tuple = rec.run((x, None, mask))
    with torch.no_grad():
        expected = copy.deepcopy(layer).eval()(x, src_key_padding_mask=mask)
    for out in (by_kwargs, by_tuple):  # post-norm layer: norm2's output is the layer's output
        torch.testing.assert_close(out["norm2"], expected, rtol=1e-10, atol=1e-10)
    # the kwargs input is found for where="input" too
    inputs = ics.capture(layer, {"src": x}, layers=["<root>"], where="input", dtype=torch.float64)
    assert torch.equal(inputs["<root>:input"], x)


def test_lstm_tuple_output_and_output_select():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(3, 4, num_layers=2)).double()
    x = _randn(7, 5, 3)  # (T, N, C), batch_first=False
    with torch.no_grad():
        seq, (h, c) = copy.deepcopy(model[0])(x)
    rec = Recorder(model, layers=nn.LSTM, dtype=torch.float64)
    out = rec.run(x)
    torch.testing.assert_close(out["0"], seq, rtol=TOL, atol=TOL)  # first floating tensor
    assert (rec.info["0"].batch_axis, rec.info["0"].channel_axis) == (1, 2)
    picked = ics.capture(model, x, layers=nn.LSTM, output_select=1, dtype=torch.float64)
    torch.testing.assert_close(picked["0"], h, rtol=TOL, atol=TOL)  # first tensor of (h, c)
    by_fn = ics.capture(
        model, x, layers=nn.LSTM, output_select=lambda o: o[1][1], dtype=torch.float64
    )
    torch.testing.assert_close(by_fn["0"], c, rtol=TOL, atol=TOL)


def test_dict_and_dataclass_outputs():
    torch.manual_seed(0)
    model = Wrapper(DictOut()).double()
    x = _randn(6, 4)
    h = F.linear(x, model.inner.body.weight, model.inner.body.bias)
    out = ics.capture(model, x, layers=["inner"], dtype=torch.float64)
    ln = F.layer_norm(h, (6,), model.inner.norm.weight, model.inner.norm.bias)
    torch.testing.assert_close(out["inner"], ln, rtol=TOL, atol=TOL)  # "ids" is not floating
    out = ics.capture(model, x, layers=["inner"], output_select="hidden", dtype=torch.float64)
    torch.testing.assert_close(out["inner"], h, rtol=TOL, atol=TOL)
    per_layer = ics.capture(
        model, x, layers=["inner", "inner.norm"], output_select={"inner": 2}, dtype=torch.float64
    )
    torch.testing.assert_close(per_layer["inner"], h, rtol=TOL, atol=TOL)
    torch.testing.assert_close(per_layer["inner.norm"], ln, rtol=TOL, atol=TOL)

    dc = DataclassOut().double()
    hd = F.linear(x, dc.lin.weight, dc.lin.bias)
    first = ics.capture(dc, x, layers=["<root>"], dtype=torch.float64)
    torch.testing.assert_close(first["<root>"], hd.mean(1), rtol=TOL, atol=TOL)  # mask is bool
    named = ics.capture(dc, x, layers=["<root>"], output_select="hidden", dtype=torch.float64)
    torch.testing.assert_close(named["<root>"], hd, rtol=TOL, atol=TOL)


def test_block_used_twice_records_each_call():
    torch.manual_seed(0)
    model = Twice().double()
    x = _randn(8, 4)
    rec = Recorder(model, layers=["block", "block.1"], where="both", dtype=torch.float64)
    out = rec.run(x)
    assert list(out) == [
        "block:input",
        "block.1:input",
        "block.1",
        "block",
        "block#2:input",
        "block.1#2:input",
        "block.1#2",
        "block#2",
    ]
    lin, bn = model.block
    first = _bn_train(F.linear(x, lin.weight, lin.bias), bn, 0)
    second = _bn_train(F.linear(torch.tanh(first), lin.weight, lin.bias), bn, 0)
    torch.testing.assert_close(out["block"], first, rtol=TOL, atol=TOL)
    torch.testing.assert_close(out["block#2"], second, rtol=TOL, atol=TOL)
    torch.testing.assert_close(out["block#2:input"], torch.tanh(first), rtol=TOL, atol=TOL)
    assert torch.equal(out["block"], out["block.1"])
    assert (rec.info["block#2"].call, rec.info["block#2:input"].site) == (2, "input")
    frame = rec.dry_run(x)
    assert frame.loc[frame.name == "block", "calls"].tolist() == [2, 2]


def test_inplace_relu_after_captured_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).double()
    x = _randn(5, 2, 6, 6)
    out = ics.capture(model, x, dtype=torch.float64)
    ref = _bn_train(F.conv2d(x, model[0].weight, model[0].bias), model[1], (0, 2, 3))
    torch.testing.assert_close(out["1"], ref, rtol=TOL, atol=TOL)
    assert bool((out["1"] < 0).any())


def test_dropout_model_rng_and_seed():
    torch.manual_seed(0)
    model = WithDropout()
    x = torch.randn(16, 4, generator=_gen())
    a = ics.capture(model, x, layers=["drop", "bn"])
    b = ics.capture(model, x, layers=["drop", "bn"])
    # the RNG is restored after each pass, so back-to-back passes see the same masks
    assert torch.equal(a["drop"], b["drop"])
    assert bool((a["drop"] == 0).any())
    s1 = ics.capture(model, x, layers=["drop"], seed=5)
    torch.rand(3)  # the training run moves the RNG between passes
    s2 = ics.capture(model, x, layers=["drop"], seed=5)
    assert torch.equal(s1["drop"], s2["drop"])
    ev = ics.capture(model, x, layers=["drop", "lin"], mode="eval")
    assert torch.equal(ev["drop"], ev["lin"])  # no dropout in eval mode


# ------------------------------------------------------------------ no side effects
def _zoo():
    torch.manual_seed(0)
    return [
        (mlp_bn(), _randn(8, 5), "norm"),
        (cnn_bn_gn(), _randn(4, 3, 7, 7), "norm"),
        (ResNet().double(), _randn(4, 3, 6, 6), "norm"),
        (
            nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).double(),
            {"src": _randn(4, 5, 8)},
            "norm",
        ),
        (nn.Sequential(nn.LSTM(3, 4)).double(), (_randn(7, 5, 3),), nn.LSTM),
        (Wrapper(DictOut()).double(), _randn(6, 4), "all"),
        (Twice().double(), _randn(8, 4), "norm"),
        (WithDropout().double(), _randn(8, 4), "all"),
    ]


def _rng():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()  # noqa: NPY002


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_state_dict_flags_and_rngs_bitwise_identical(mode):
    for model, x, layers in _zoo():
        model.train()
        model.get_submodule(next(iter(dict(model.named_children())))).eval()  # mixed flags
        before = {k: v.clone() for k, v in model.state_dict().items()}
        flags = [m.training for m in model.modules()]
        torch_rng, np_rng, py_rng = _rng()
        out = ics.capture(model, x, layers=layers, mode=mode)
        assert out
        after = model.state_dict()
        assert before.keys() == after.keys()
        for key in before:
            assert torch.equal(before[key], after[key]), (type(model).__name__, key)
        assert [m.training for m in model.modules()] == flags
        t2, n2, p2 = _rng()
        assert torch.equal(torch_rng, t2)
        assert np.array_equal(np_rng, n2)
        assert py_rng == p2
        assert all(not v.requires_grad and v.grad_fn is None for v in out.values())


def _train(capture_every_step):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe = torch.randn(16, 4, generator=_gen(3))
    for step in range(3):
        x = torch.randn(8, 4)
        if capture_every_step:
            ics.capture(model, probe, mode="train")
            ics.capture(model, probe, mode="eval")
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert step >= 0
    return model.state_dict(), torch.get_rng_state()


def test_training_step_after_capture_is_unchanged():
    plain, rng_plain = _train(False)
    measured, rng_measured = _train(True)
    for key in plain:
        assert torch.equal(plain[key], measured[key]), key
    assert torch.equal(rng_plain, rng_measured)
