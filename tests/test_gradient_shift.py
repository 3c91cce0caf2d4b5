"""Santurkar et al.'s gradient ICS against a direct reimplementation with model copies."""

import copy

import pytest
import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit.gradient_shift import weighted_layers


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def _step(model, x, y):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return before


def _reference(model, before, x, y, layer_index, seed=0):
    """G and G' by copying the model and loading parameters by hand, then .backward()."""
    names = [n for n, _ in model.named_parameters()]
    layer = f"{layer_index}."

    def grad(params):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(params[n])
        m.train()
        torch.manual_seed(seed)
        nn.functional.cross_entropy(m(x), y).backward()
        return dict(m.named_parameters())[f"{layer}weight"].grad.double().flatten()

    after = {n: p.detach() for n, p in model.named_parameters()}
    mixed = {n: (after[n] if int(n.split(".")[0]) < layer_index else before[n]) for n in names}
    return grad(before), grad(mixed)


def test_matches_a_direct_computation_and_leaves_the_model_alone():
    model = _net()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    before = _step(model, x, y)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    out = ics.gradient_ics(model, nn.functional.cross_entropy, x, y, before)
    assert torch.equal(rng, torch.get_rng_state())
    assert set(out) == {"0", "4", "6"} == set(weighted_layers(model))
    for idx in (0, 4, 6):
        g, g2 = _reference(model, before, x, y, idx)
        row = out[str(idx)]
        assert row["grad_ics_l2"] == pytest.approx(float((g - g2).norm()), rel=1e-5, abs=1e-7)
        cos = float(g @ g2 / (g.norm() * g2.norm()))
        assert row["grad_ics_cos"] == pytest.approx(cos, rel=1e-5)
        assert row["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-5)
    # the first layer has no predecessor: G' = G
    assert out["0"]["grad_ics_l2"] == 0.0 and out["0"]["grad_ics_cos"] == pytest.approx(1.0)
    assert out["4"]["grad_ics_l2"] > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_bad_layers_and_snapshots_are_named():
    model = _net()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ics.ICSValueError, match="layer '2' has no `weight`"):
        ics.gradient_ics(model, nn.functional.cross_entropy, x, y, before, layers=["2"])
    with pytest.raises(ics.ICSValueError, match="`params_before` lacks"):
        ics.gradient_ics(model, nn.functional.cross_entropy, x, y, {})
    with pytest.raises(ics.ICSValueError, match="`mode`"):
        ics.gradient_ics(model, nn.functional.cross_entropy, x, y, before, mode="test")
