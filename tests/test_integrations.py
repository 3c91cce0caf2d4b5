"""The Lightning callback and the Hugging Face TrainerCallback, with the real packages.

Tiny models, a few optimizer steps on the CPU, models from configs (no download).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pandas as pd
import pytest
import torch
from torch import nn

import ics_toolkit as ics

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def test_importing_the_package_imports_no_framework():
    code = (
        "import sys, ics_toolkit, ics_toolkit.integrations\n"
        "from ics_toolkit import ICSMonitor, capture\n"
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', "
        "'tensorboard', 'accelerate', 'torch.distributed.fsdp', 'torch.utils.tensorboard') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ Lightning
def _lightning_module():
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


def _loader():
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=g), torch.arange(64) % 2)
    return torch.utils.data.DataLoader(
        data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1)
    )


def _fit(tmp_path, callbacks, max_steps=4, ckpt_path=None, checkpoint=False, accumulate=1):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    module = _lightning_module()
    extra = []
    if checkpoint:
        from lightning.pytorch.callbacks import ModelCheckpoint

        extra.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="logs", version=0),
        callbacks=[*callbacks, *extra],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoint,
        log_every_n_steps=1,
        accumulate_grad_batches=accumulate,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers etc.
        trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.slow
def test_lightning_callback_measures_logs_and_leaves_training_unchanged(tmp_path):
    from ics_toolkit.integrations.lightning import ICSCallback

    _, plain = _fit(tmp_path / "plain", [])
    cb = ICSCallback(every=2, probe_size=32, methods=("exact",))
    trainer, watched = _fit(tmp_path / "watched", [cb])
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)  # bitwise the same training run
    df = cb.results()
    est = df[df.kind == "estimate"]
    assert sorted(est.step.unique()) == [0, 2]
    assert set(est.layer) == {"net.1"} and set(est.n_samples) == {32}  # drawn from the data
    on_disk = ics.load_results(os.path.join(trainer.log_dir, "ics"))
    assert len(on_disk) == len(df)
    # the numbers reached the trainer's logger (CSVLogger's metrics.csv)
    trainer.loggers[0].save()
    metrics = pd.read_csv(os.path.join(trainer.log_dir, "metrics.csv"))
    col = metrics["ics/net.1/exact"].dropna()
    expect = est[est.quantity == "exact"].set_index("step").value
    assert metrics.loc[col.index, "step"].tolist() == [0, 2]
    assert col.tolist() == pytest.approx(expect.tolist(), rel=1e-6)
    assert not cb.monitor.attached  # detached when training ended


@pytest.mark.slow
def test_lightning_resume_continues_the_monitor(tmp_path):
    from ics_toolkit.integrations.lightning import ICSCallback

    first = ICSCallback(every=2, probe_size=32, methods=("exact",), path=str(tmp_path / "ics"))
    _fit(tmp_path, [first], max_steps=4, checkpoint=True)
    second = ICSCallback(every=2, probe_size=32, methods=("exact",), path=str(tmp_path / "ics"))
    _fit(tmp_path, [second], max_steps=8, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.monitor.run == first.monitor.run
    df = second.results()
    assert sorted(df[df.kind == "estimate"].step.unique()) == [0, 2, 4, 6]
    on_disk = ics.load_results(tmp_path / "ics")
    assert sorted(on_disk[on_disk.kind == "estimate"].step.unique()) == [0, 2, 4, 6]
    assert set(on_disk.run) == {first.monitor.run}


def test_callbacks_refuse_unknown_options():
    from ics_toolkit.integrations.lightning import ICSCallback as Lightning
    from ics_toolkit.integrations.transformers import ICSCallback as HF

    for cls in (Lightning, HF):
        with pytest.raises(ics.ICSTypeError, match=r"unknown option\(s\) \['evry'\]"):
            cls(evry=3)


# ------------------------------------------------------------------ Hugging Face Trainer
T, VOCAB = 12, 50


class _Tokens(torch.utils.data.Dataset):
    """Padded token sequences (right padding, varying lengths) with labels."""

    def __init__(self, n=48):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(1, VOCAB, (n, T), generator=g)
        lengths = torch.randint(4, T + 1, (n,), generator=g)
        self.mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        self.ids = self.ids * self.mask
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=T,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def _train_hf(out, callbacks, max_steps=4, resume=None, save=False, setup=None, accumulate=1):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulate,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        report_to=["tensorboard"],
        logging_steps=1,
        save_strategy="steps" if save else "no",
        save_steps=2,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    model = _bert()
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=callbacks)
    if setup is not None:
        setup(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer, model


@pytest.mark.slow
def test_trainer_callback_measures_logs_and_leaves_training_unchanged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ics_toolkit.integrations.transformers import ICSCallback

    _, plain = _train_hf(tmp_path / "plain", [])
    cb = ICSCallback(every=2, probe_size=16, methods=("exact",), views=("token",))
    trainer, watched = _train_hf(tmp_path / "watched", [cb])
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)
    df = cb.results()
    est = df[df.kind == "estimate"]
    assert sorted(est.step.unique()) == [0, 2]
    layers = set(est.layer)
    assert "bert.embeddings.LayerNorm" in layers and len(layers) == 3
    # the token view with the drawn probe's attention_mask: its real tokens only
    probe_mask = cb.monitor.probe["attention_mask"]
    assert probe_mask.shape == (16, T) and "labels" not in cb.monitor.probe
    assert set(est.view) == {"token"} and set(est.n_samples) == {int(probe_mask.sum())}
    assert int(probe_mask.sum()) < 16 * T
    assert len(ics.load_results(tmp_path / "watched" / "ics")) == len(df)
    history = [h for h in trainer.state.log_history if "ics/bert.embeddings.LayerNorm/exact" in h]
    assert [h["step"] for h in history] == [0, 2]
    exact = est[(est.quantity == "exact") & (est.layer == "bert.embeddings.LayerNorm")]
    assert [h["ics/bert.embeddings.LayerNorm/exact"] for h in history] == exact.value.tolist()
    acc = EventAccumulator(str(tmp_path / "watched" / "runs" / "ics"))
    acc.Reload()
    events = acc.Scalars("ics/bert.embeddings.LayerNorm/exact")
    assert [e.step for e in events] == [0, 2]
    assert [e.value for e in events] == pytest.approx(exact.value.tolist(), rel=1e-6)


@pytest.mark.slow
def test_trainer_resume_continues_the_monitor(tmp_path):
    from ics_toolkit.integrations.transformers import STATE_FILE, ICSCallback

    first = ICSCallback(every=2, probe_size=16, methods=("exact",))
    _train_hf(tmp_path, [first], max_steps=4, save=True)
    state = json.loads((tmp_path / "checkpoint-2" / STATE_FILE).read_text())
    assert state["step_count"] == 2
    second = ICSCallback(every=2, probe_size=16, methods=("exact",))
    _train_hf(tmp_path, [second], max_steps=6, resume=str(tmp_path / "checkpoint-4"), save=True)
    assert second.monitor.run == first.monitor.run
    df = second.results()
    assert sorted(df[df.kind == "estimate"].step.unique()) == [0, 2, 4]
    on_disk = ics.load_results(tmp_path / "ics")
    assert sorted(on_disk[on_disk.kind == "estimate"].step.unique()) == [0, 2, 4]


def test_a_fused_optimizer_step_is_measured_not_taken_for_a_skip():
    # fused AdamW updates the parameters without bumping their version counters
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    monitor = ics.ICSMonitor(model, torch.randn(16, 4), every=1, methods=("exact",))
    monitor.attach(opt)
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    df = monitor.results()
    assert "skipped_step" not in set(df.quantity)
    assert df[df.quantity == "exact"].value.item() > 0


@pytest.mark.slow
def test_add_to_sends_the_numbers_through_the_trainers_reporters(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ics_toolkit.integrations.transformers import ICSCallback

    made = []

    def setup(trainer):
        made.append(ICSCallback.add_to(trainer, every=2, probe_size=16, methods=("exact",)))

    _train_hf(tmp_path, [], setup=setup)
    df = made[0].results()
    exact = df[(df.quantity == "exact") & (df.layer == "bert.embeddings.LayerNorm")]
    runs = [p for p in (tmp_path / "runs").iterdir()]
    assert len(runs) == 1  # the trainer's own TensorBoard run, no separate "ics" run
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    events = acc.Scalars("train/ics/bert.embeddings.LayerNorm/exact")  # the trainer's naming
    assert [e.step for e in events] == [0, 2]
    assert [e.value for e in events] == pytest.approx(exact.value.tolist(), rel=1e-6)
    assert "train/loss" in acc.Tags()["scalars"]  # the same writer as the trainer's own logs


@pytest.mark.slow
def test_gradient_accumulation_micro_batches_are_not_steps(tmp_path):
    from ics_toolkit.integrations.lightning import ICSCallback as Lightning
    from ics_toolkit.integrations.transformers import ICSCallback as HF

    light = Lightning(every=2, probe_size=16, methods=("exact",), path=None)
    trainer, _ = _fit(tmp_path / "pl", [light], max_steps=4, accumulate=2)
    assert trainer.global_step == 4 and light.monitor.step_count == 4
    hf = HF(every=2, probe_size=16, methods=("exact",), path=None)
    hf_trainer, _ = _train_hf(tmp_path / "hf", [hf], max_steps=4, accumulate=2)
    assert hf_trainer.state.global_step == 4 and hf.monitor.step_count == 4
    for cb in (light, hf):
        df = cb.results()
        assert sorted(df[df.kind == "estimate"].step.unique()) == [0, 2]
        assert "skipped_step" not in set(df.quantity)
