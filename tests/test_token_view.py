"""The token view (padding removed), the monitor's capture options and mixed selector lists.

Sequence models come from transformers configs (no download).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit.views import pixel, token, view

os.environ["HF_HUB_OFFLINE"] = "1"

N, T, VOCAB = 6, 10, 50


# ------------------------------------------------------------------ the view itself
def test_token_is_the_pixel_rows_of_the_real_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g)  # (N, T, C)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    rows = token(x, mask)
    expected = torch.cat([x[0, :3], x[1, :1], x[2]])
    assert torch.equal(rows, expected)
    assert torch.equal(token(x), pixel(x, channel_axis=-1))  # no mask: every position
    # channels-first (N, C, T): the same tokens
    assert torch.equal(token(x.transpose(1, 2), mask, channel_axis=1), expected)
    assert torch.equal(view(x, "token", (0, -1), mask=mask.bool()), expected)


def test_token_subsample_keeps_the_same_real_positions():
    x = torch.arange(4 * 8 * 2.0).reshape(4, 8, 2)
    mask = torch.zeros(4, 8, dtype=torch.long)
    mask[:, :5] = 1
    a = token(x, mask, max_samples=7, seed=3)
    b = token(x + 100, mask, max_samples=7, seed=3)
    assert a.shape == (7, 2) and torch.equal(a + 100, b)  # the same rows of both
    real = set(token(x, mask)[:, 0].tolist())
    assert set(a[:, 0].tolist()) <= real  # never a padded position


def test_token_errors_name_the_problem():
    x = torch.zeros(3, 5, 4)
    with pytest.raises(
        ics.ICSValueError, match=r"`mask` has shape \(3, 4\).*tokens of shape \(3, 5\)"
    ):
        token(x, torch.ones(3, 4))
    with pytest.raises(ics.ICSValueError, match="marks no token as real"):
        token(x, torch.zeros(3, 5))
    with pytest.raises(ics.ICSValueError, match="unknown token option"):
        view(x, "token", (0, -1), masks=None)


# ------------------------------------------------------------------ sequence models
def _gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=T,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2Model(cfg)


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=T,
    )
    return BertModel(cfg, add_pooling_layer=False)


def _probe(seed: int, pad_seed: int) -> dict[str, torch.Tensor]:
    """Right-padded sequences; the padded positions' ids come from ``pad_seed``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (N, T), generator=g)
    lengths = torch.tensor([10, 7, 4, 9, 3, 6])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    pads = torch.randint(1, VOCAB, (N, T), generator=torch.Generator().manual_seed(pad_seed))
    return {"input_ids": torch.where(mask.bool(), ids, pads), "attention_mask": mask}


def _measure(build, probe, views, **options):
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor = ics.ICSMonitor(
        model, probe, every=1, views=views, methods=("exact", "paired"), **options
    )
    monitor.attach(opt)
    batch = _probe(seed=11, pad_seed=12)  # the training batch: the same in every run
    opt.zero_grad()
    model(**batch).last_hidden_state.square().mean().backward()
    opt.step()
    df = monitor.results()
    return df[df.kind != "event"].set_index(["layer", "view", "quantity"]).value.sort_index()


@pytest.mark.slow
@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_padded_tokens_change_nothing_in_the_token_view(build):
    a, b = _probe(seed=1, pad_seed=2), _probe(seed=1, pad_seed=3)
    assert not torch.equal(a["input_ids"], b["input_ids"])
    token_a = _measure(build, a, ("token",))
    token_b = _measure(build, b, ("token",))
    assert len(token_a) > 0 and token_a.equals(token_b)  # bitwise the same numbers
    n = token_a.xs("exact", level="quantity")
    assert (n > 0).all()
    # control: the flatten view does see the padded positions
    flat_a = _measure(build, a, ("flatten",), token_mask=False)
    flat_b = _measure(build, b, ("flatten",), token_mask=False)
    assert not flat_a.equals(flat_b)


@pytest.mark.slow
def test_token_view_counts_real_tokens_and_takes_a_given_mask():
    probe = _probe(seed=1, pad_seed=2)
    real = int(probe["attention_mask"].sum())
    model = _gpt2()
    mon = ics.ICSMonitor(model, probe, views=("token",), every=1, methods=("exact",))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon.attach(opt)
    model(**probe).last_hidden_state.sum().backward()
    opt.step()
    df = mon.results()
    assert set(df[df.kind == "estimate"].n_samples) == {real}
    assert set(df[df.kind == "estimate"].dim) == {16}
    # a given mask wins over the probe's; a cap subsamples the real tokens
    first = torch.zeros(N, T, dtype=torch.bool)
    first[:, 0] = True
    mon = ics.ICSMonitor(model, probe, views=("token",), token_mask=first, max_pixel_samples=4)
    assert mon.config.token_mask.sum() == N


def test_token_mask_is_checked_against_the_layers_at_construction():
    model = _bert()
    probe = _probe(seed=1, pad_seed=2)
    with pytest.raises(ics.ICSValueError, match=r"layer 'encoder' produced shape"):
        ics.ICSMonitor(
            model,
            probe,
            layers=["encoder", "norm"],
            views=("token",),
            output_select=lambda out: out.last_hidden_state[:, 0],
        )
    with pytest.raises(ics.ICSTypeError, match="`token_mask` must be None"):
        ics.ICSMonitor(model, probe, views=("token",), token_mask="yes")
    with pytest.raises(ics.ICSValueError, match="no token as real"):
        ics.ICSMonitor(model, probe, views=("token",), token_mask=torch.zeros(N, T))
    with pytest.raises(ics.ICSValueError, match="token_mask=True takes the mask"):
        ics.ICSMonitor(model, probe["input_ids"], views=("token",), token_mask=True)


# ------------------------------------------------------------------ capture options
def test_monitor_passes_axes_output_select_and_transform_to_the_capture():
    class TimeFirst(nn.Module):  # (T, N, C) output, like a sequence-first RNN
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 5)

        def forward(self, x):
            return {"seq": self.proj(x).transpose(0, 1), "other": torch.zeros(1)}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = TimeFirst()
            self.norm = nn.LayerNorm(5)

        def forward(self, x):
            return self.norm(self.enc(x)["seq"])

    torch.manual_seed(0)
    x = torch.randn(8, 4, 3)  # (N, T, C) in, (T, N, C) out

    def run(**options):
        torch.manual_seed(0)
        net = Net()
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        mon = ics.ICSMonitor(
            net,
            x,
            layers=["enc", "norm"],
            every=1,
            methods=("exact",),
            floor=False,
            bounds=False,
            moments=False,
            **options,
        )
        mon.attach(opt)
        net(x).square().mean().backward()
        opt.step()
        df = mon.results()
        return df[df.quantity == "exact"].set_index("layer")

    base = run(axes={"enc": (1, -1), "norm": (1, -1)}, output_select={"enc": "seq"})
    assert base.n_samples.tolist() == [8, 8]  # the batch axis 1 was used
    doubled = run(
        axes={"enc": (1, -1), "norm": (1, -1)},
        output_select={"enc": "seq"},
        transform=lambda key, t: 2 * t,
    )
    # W1 is positively homogeneous: doubling both samples doubles it
    assert doubled.value.tolist() == pytest.approx((2 * base.value).tolist(), rel=1e-6)
    with pytest.raises(ics.ICSValueError, match="cannot be combined with `transform`"):
        ics.ICSMonitor(Net(), x, sketch=4, transform=lambda k, t: t)


# ------------------------------------------------------------------ selector lists
def test_selector_lists_mix_kinds_globs_and_types():
    model = _gpt2()
    names = ics.Recorder(model, ["norm", "h.*.attn"]).names
    assert names == ["h.0.ln_1", "h.0.attn", "h.0.ln_2", "h.1.ln_1", "h.1.attn", "h.1.ln_2", "ln_f"]
    assert ics.Recorder(model, [nn.LayerNorm, "h.0.mlp"]).names == [
        "h.0.ln_1",
        "h.0.ln_2",
        "h.0.mlp",
        "h.1.ln_1",
        "h.1.ln_2",
        "ln_f",
    ]
    with pytest.raises(ics.ICSValueError, match=r"the glob '\*\.atn' matches no module"):
        ics.Recorder(model, ["norm", "*.atn"])
    with pytest.raises(ics.ICSValueError, match=r"the entry BatchNorm1d matches no module"):
        ics.Recorder(model, ["norm", nn.BatchNorm1d])
    plain = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    with pytest.raises(ics.ICSValueError, match=r"the entry 'norm' matches no module"):
        ics.Recorder(plain, ["norm", "0"])


def test_memory_prediction_counts_the_real_tokens():
    model = _gpt2()
    probe = _probe(seed=1, pad_seed=2)
    real = int(probe["attention_mask"].sum())
    mon = ics.ICSMonitor(model, probe, views=("token",), layers="h.0.ln_1")
    table = mon.memory_per_layer()
    assert table.bytes_analysis.tolist() == [2 * real * 16 * 8]  # both sides, float64
    capped = ics.ICSMonitor(model, probe, views=("token",), layers="h.0.ln_1", max_pixel_samples=5)
    assert capped.memory_per_layer().bytes_analysis.tolist() == [2 * 5 * 16 * 8]
