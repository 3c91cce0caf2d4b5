"""preserved(): a block run on a model leaves buffers, flags, parameters and RNGs as they were."""

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ics_toolkit._state import ModelSnapshot, bitwise_equal, preserved
from ics_toolkit.errors import ICSUsageError, ICSValueError


def _rng_fingerprint():
    return (
        torch.get_rng_state().clone(),
        np.random.get_state()[1].copy(),  # noqa: NPY002
        random.getstate(),
    )


def _same_rng(a, b):
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))


def test_bitwise_equal_against_byte_comparison():
    a = torch.tensor([0.0, float("nan"), 1.5])
    for b in (a.clone(), torch.tensor([-0.0, float("nan"), 1.5]), torch.tensor([0.0, 1.0, 1.5])):
        expected = a.numpy().tobytes() == b.numpy().tobytes()
        assert bitwise_equal(a, b) == expected
    assert not bitwise_equal(a, a.double())
    assert not bitwise_equal(a, a[:2])
    assert bitwise_equal(torch.tensor([1, 2]), torch.tensor([1, 2]))


@pytest.mark.parametrize("mode", ["train", "eval", "keep"])
def test_buffers_flags_and_rngs_restored(mode):
    model = _bn_model()
    model[2].eval()  # mixed flags: each must come back individually
    bn = model[1]
    mean_ref = bn.running_mean  # a reference the user holds
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rng = _rng_fingerprint()
    with preserved(model, mode=mode):
        assert not torch.is_grad_enabled()
        if mode != "keep":
            assert all(m.training == (mode == "train") for m in model.modules())
        model(torch.randn(16, 3))  # consumes the RNG, updates running stats in train mode
        np.random.rand()  # noqa: NPY002
        random.random()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == flags
    assert _same_rng(rng, _rng_fingerprint())
    assert bn.running_mean is mean_ref
    assert torch.is_grad_enabled()


def test_train_mode_pass_really_changed_buffers_inside():
    model = _bn_model()
    with preserved(model, mode="train"):
        model(torch.randn(16, 3))
        assert int(model[1].num_batches_tracked) == 1
    assert int(model[1].num_batches_tracked) == 0


def test_unchanged_buffer_is_not_written():
    model = _bn_model()
    version = model[1].running_mean._version
    with preserved(model, mode="eval"):
        model(torch.randn(8, 3))
    assert model[1].running_mean._version == version


def test_rebound_and_added_buffers_are_undone():
    bn = nn.BatchNorm1d(2)
    original = bn.running_var
    with preserved(bn):
        bn.running_var = torch.full((2,), 7.0)  # rebinding, not in place
        bn.register_buffer("extra", torch.zeros(1))
    assert bn.running_var is original
    assert torch.equal(bn.running_var, torch.ones(2))
    assert "extra" not in bn._buffers


def test_exception_restores_and_propagates():
    model = _bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = _rng_fingerprint()
    with pytest.raises(KeyError, match="boom"), preserved(model, mode="train"):
        model(torch.randn(8, 3))
        raise KeyError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _same_rng(rng, _rng_fingerprint())


def test_parameter_changed_in_place_raises_or_is_restored():
    lin = nn.Linear(2, 2)
    weight = lin.weight.detach().clone()
    with pytest.raises(ICSUsageError, match=r"Linear\.weight.*copy_parameters=True"):
        with preserved(lin):
            lin.weight.add_(1.0)
    with preserved(lin, parameters=True):
        lin.weight.mul_(3.0)
    assert torch.equal(lin.weight, weight + 1.0)  # the first change could not be undone


def test_seed_gives_identical_dropout_masks_and_restores_rng():
    drop = nn.Dropout(0.5).train()
    x = torch.ones(64)
    rng = _rng_fingerprint()
    with preserved(drop, seed=3):
        a = drop(x)
    with preserved(drop, seed=3):
        b = drop(x)
    with preserved(drop, seed=4):
        c = drop(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert _same_rng(rng, _rng_fingerprint())


def test_grad_true_keeps_autograd():
    lin = nn.Linear(2, 1)
    with preserved(lin, grad=True):
        assert torch.is_grad_enabled()
        assert lin(torch.ones(3, 2)).requires_grad


def test_unknown_mode():
    with pytest.raises(ICSValueError, match="`mode` must be one of 'train', 'eval', 'keep'"):
        with preserved(nn.Linear(1, 1), mode="training"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (else nothing can init it)")
def test_does_not_initialise_cuda():
    # in a fresh interpreter: another test of this run may have initialised CUDA already
    code = """
import torch
from torch import nn
from ics_toolkit._state import RNGState, preserved
model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
with preserved(model, mode="train", seed=1):
    model(torch.randn(4, 3))
RNGState.capture().restore()
print(torch.cuda.is_initialized())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_snapshot_restore_reports_nothing_when_clean():
    model = _bn_model()
    snap = ModelSnapshot(model)
    assert snap.restore() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_restored():  # pragma: no cover - runs on GPU machines only
    model = _bn_model().cuda()
    states = torch.cuda.get_rng_state_all()
    with preserved(model, mode="train"):
        model(torch.randn(8, 3, device="cuda"))
    after = torch.cuda.get_rng_state_all()
    assert all(torch.equal(a, b) for a, b in zip(states, after, strict=True))
