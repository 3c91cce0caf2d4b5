"""Reference models, the norm factory, and BatchNorm -> Unitization swaps that train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ics_toolkit import ICSTypeError, ICSValueError
from ics_toolkit.data import make_blobs, make_shapes
from ics_toolkit.models import (
    MLP,
    SmallCNN,
    cifar_resnet,
    count_norm_layers,
    make_norm,
    resnet20,
    resnet56,
    resnet110,
    seeded,
)
from ics_toolkit.nn import Unitization, Unitization1d, Unitization2d, Unitization3d, replace_norm
from ics_toolkit.train import train


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------
# the norm factory
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("norm", "dims", "cls"),
    [
        ("batch", 1, nn.BatchNorm1d),
        ("batch", 2, nn.BatchNorm2d),
        ("batch", 3, nn.BatchNorm3d),
        ("unitization", 1, Unitization1d),
        ("unitization", 2, Unitization2d),
        ("unitization", 3, Unitization3d),
        ("group", 2, nn.GroupNorm),
        ("layer", 1, nn.LayerNorm),
        ("layer", 2, nn.GroupNorm),
        ("none", 2, nn.Identity),
    ],
)
def test_make_norm_kinds(norm, dims, cls):
    layer = make_norm(norm, 48, dims)
    assert type(layer) is cls
    if norm == "group":
        assert layer.num_groups == 24  # largest divisor of 48 that is <= 32
    if norm == "layer" and dims == 2:
        assert layer.num_groups == 1


def test_make_norm_callable_and_errors():
    layer = make_norm(lambda c, d: Unitization(c, alpha_init=0.5 * d), 3, 2)
    assert float(layer.alpha.detach()[0]) == 1.0
    with pytest.raises(ICSValueError, match=r"`norm` must be one of \('batch', 'unitization'"):
        make_norm("instance", 3, 2)
    with pytest.raises(ICSTypeError, match="`norm` must be a name in"):
        make_norm(3, 3, 2)
    with pytest.raises(ICSTypeError, match="the `norm` callable returned int"):
        make_norm(lambda c, d: 0, 3, 2)
    with pytest.raises(ICSValueError, match="`dims` must be 1, 2 or 3"):
        make_norm("batch", 3, 4)
    with pytest.raises(ICSValueError, match="`norm` must be one of"):
        MLP(4, 2, norm="bn")


# ----------------------------------------------------------------------------------------
# shapes, sizes and layouts
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("builder", "expected"),
    # He et al. (2016), Table 6: 0.27M, 0.85M and 1.7M parameters
    [(resnet20, 0.27e6), (resnet56, 0.85e6), (resnet110, 1.7e6)],
)
def test_resnet_parameter_counts_match_the_paper(builder, expected):
    model = builder()
    assert abs(_n_params(model) - expected) / expected < 0.02
    n = (model.depth - 2) // 6
    assert count_norm_layers(model) == 6 * n + 1


def test_model_outputs_and_norm_counts():
    x8 = torch.randn(3, 1, 8, 8)
    x32 = torch.randn(2, 3, 32, 32)
    assert MLP(64, 10, seed=0)(x8).shape == (3, 10)
    assert count_norm_layers(MLP(64, 10, hidden=(8, 8))) == 2
    assert SmallCNN(1, 10, width=4)(x8).shape == (3, 10)
    assert SmallCNN(3, 100, width=4)(x32).shape == (2, 100)
    assert count_norm_layers(SmallCNN(1, 10)) == 6
    for preact in (False, True):
        model = resnet20(preact=preact, width=4, num_classes=7)
        assert model(x32).shape == (2, 7)
        assert count_norm_layers(model) == 19


def test_layouts_use_the_expected_blocks():
    post = cifar_resnet(8, width=4)
    pre = cifar_resnet(8, width=4, preact=True)
    # post-activation: option-A shortcuts (no parameters); pre-activation: 1x1 projections
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in post.modules())
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in pre.modules()) == 2
    assert pre.final_norm is not None and post.final_norm is None


def test_bias_only_without_a_mean_removing_norm():
    assert SmallCNN(1, 10, norm="batch").features[0].bias is None
    assert SmallCNN(1, 10, norm="unitization").features[0].bias is None
    assert SmallCNN(1, 10, norm="none").features[0].bias is not None
    assert MLP(4, 2, norm="layer").features[1].bias is not None


def test_seeded_models_are_reproducible_and_leave_the_global_rng():
    state = torch.get_rng_state()
    a, b = SmallCNN(1, 10, width=4, seed=3), SmallCNN(1, 10, width=4, seed=3)
    c = SmallCNN(1, 10, width=4, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.features[0].weight, c.features[0].weight)
    with seeded(None):
        torch.rand(1)
    assert not torch.equal(torch.get_rng_state(), state)  # seed=None uses the global RNG


@pytest.mark.parametrize(
    ("call", "msg"),
    [
        (lambda: cifar_resnet(21), r"`depth` must be 6n \+ 2 with n >= 1"),
        (lambda: cifar_resnet(2), r"`depth` must be 6n \+ 2"),
        (lambda: MLP(0, 2), "`in_features` must be a positive int"),
        (lambda: MLP(4, 2, hidden=(3, 0)), "`hidden` must be positive ints"),
        (lambda: SmallCNN(1, 10, width=0), "`width` must be a positive int"),
        (lambda: MLP(4, 2)(torch.zeros(2, 5)), "MLP expects 4 features per sample"),
        (
            lambda: SmallCNN(1, 10)(torch.zeros(2, 3, 8, 8)),
            r"SmallCNN expects input of shape \(N, 1, H, W\)",
        ),
        (
            lambda: resnet20()(torch.zeros(2, 1, 8, 8)),
            r"CifarResNet expects input of shape \(N, 3, H, W\)",
        ),
    ],
)
def test_model_errors(call, msg):
    with pytest.raises(ICSValueError, match=msg):
        call()


# ----------------------------------------------------------------------------------------
# swapping BatchNorm for Unitization: + C parameters per layer, same function, trains
# ----------------------------------------------------------------------------------------
def _digits_like(size: int, channels: int, n: int = 64):
    data = make_shapes(n, 8, size=max(size, 8), seed=0)
    x = data.x_train
    if size < 8:
        x = x[:, :, :size, :size]
    return x.repeat(1, channels, 1, 1), data.y_train


SWAP_CASES = {
    "mlp": (lambda: MLP(16, 4, hidden=(32, 32), seed=0), "blobs"),
    "cnn": (lambda: SmallCNN(1, 8, width=8, seed=0), 8),
    "resnet20": (lambda: resnet20(num_classes=8, width=4, seed=0), 8),
    "resnet20-preact": (lambda: resnet20(num_classes=8, width=4, preact=True, seed=0), 8),
}


@pytest.mark.parametrize("case", list(SWAP_CASES))
def test_swap_to_unitization_keeps_function_and_trains(case):
    build, data_kind = SWAP_CASES[case]
    model = build().double()
    if data_kind == "blobs":
        data = make_blobs(64, 16, num_classes=4, dim=16, separation=2.0, seed=0)
        x, y = data.x_train.double(), data.y_train
    else:
        x, y = _digits_like(data_kind, 1 if case == "cnn" else 3)
        x = x.double()
    bn_channels = sum(
        m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )
    n_before = _n_params(model)
    model.train()
    y_bn = model(x[:16])
    report = replace_norm(model, "unitization")
    assert report["num_features"].sum() == bn_channels
    assert _n_params(model) == n_before + bn_channels
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model.train()
    torch.testing.assert_close(model(x[:16]), y_bn, rtol=1e-9, atol=1e-9)

    result = train(
        model.float(),
        (x.float(), y),
        steps=50,
        batch_size=16,
        lr=0.05,
        milestones=(),
        seed=0,
        progress=False,
    )
    assert result.steps == 50 and not result.diverged
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    alphas = [m.alpha for m in model.modules() if isinstance(m, Unitization)]
    assert any(float(a.detach().abs().max()) > 0 for a in alphas)  # alpha is trained
