"""Hugging Face ``Trainer``: measure ICS with one ``TrainerCallback``.

Example::

    from transformers import Trainer
    from ics_toolkit.integrations.transformers import ICSCallback

    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[ICSCallback(every=50, views=("token",))])
    trainer.train()

The callback builds an :class:`~ics_toolkit.ICSMonitor` on the trainer's model when
training begins and measures around every optimizer step the trainer takes (its
``on_pre_optimizer_step`` / ``on_optimizer_step`` events, so gradient-accumulation
micro-batches are not steps), with the trainer's ``global_step`` as the step index:
a run resumed from a checkpoint continues the schedule. The probe is given, or drawn
once from the training dataloader's dataset with a private seeded generator
(``probe_size`` samples, collated by the trainer's data collator, label keys left
out); a dict probe with an ``attention_mask`` serves the ``token`` view's padding
mask.

Where the numbers go:

- result parts in ``<output_dir>/ics`` (:func:`ics_toolkit.load_results`);
- the trainer's own record, ``state.log_history`` (saved in every checkpoint's
  ``trainer_state.json``): one entry ``{"step": t, "ics/<layer>/<quantity>": value,
  ...}`` per measured step;
- with :meth:`ICSCallback.add_to` (``ICSCallback.add_to(trainer, ...)`` instead of
  ``callbacks=[...]``): every reporting integration of the trainer (``report_to``:
  TensorBoard, W&B, MLflow, ...) through its ``on_log``, at the trainer's
  ``global_step`` (TensorBoard shows them as ``train/ics/<layer>/<quantity>``);
- otherwise, when ``"tensorboard"`` (or ``"all"``) is in ``args.report_to``: a
  ``SummaryWriter`` in ``<logging dir>/ics`` (the logging dir is
  ``$TENSORBOARD_LOGGING_DIR`` or ``<output_dir>/runs``, where the trainer's own
  runs are), so TensorBoard shows both (a callback given in ``callbacks=[...]`` has no
  handle on the trainer's other callbacks);
- any other logger through ``log_to`` (e.g. ``lambda step, s: wandb.log(s,
  step=step)``).

On every checkpoint the monitor's state is written beside it
(``checkpoint-<step>/ics_monitor.json``) and read back when training resumes from
that checkpoint: the run id, the rows and the results folder continue.

Requires ``pip install "ics-toolkit[transformers]"``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import TrainerCallback

from ics_toolkit.errors import ICSUsageError
from ics_toolkit.integrations._common import check_options, draw_probe, to_device

__all__ = ["STATE_FILE", "ICSCallback"]

#: File of the monitor's state inside each ``checkpoint-<step>`` folder.
STATE_FILE = "ics_monitor.json"


class ICSCallback(TrainerCallback):
    """A ``TrainerCallback`` that measures internal covariate shift during ``train()``.

    Parameters
    ----------
    probe : Tensor, tuple or dict, optional
        The fixed probe inputs (moved to the model's device), e.g. a tokenized batch
        ``{"input_ids": ..., "attention_mask": ...}``. Default: ``probe_size``
        samples drawn from the training dataloader's dataset.
    path : str, "auto" or None
        Folder of the result parts: ``"auto"`` (default) is ``<output_dir>/ics``;
        None keeps results in memory only.
    log : bool
        Record the numbers in ``state.log_history`` and, if the trainer reports to
        TensorBoard, in a SummaryWriter beside the trainer's.
    **options
        Any option of :class:`~ics_toolkit.ICSMonitor` (``layers``, ``every``,
        ``methods``, ``views``, ``probe_size``, ``seed``, ``log_to``, ...); unknown
        names raise :class:`~ics_toolkit.errors.ICSTypeError` here.

    Attributes
    ----------
    monitor : ICSMonitor or None
        The monitor, once training has begun.
    """

    def __init__(
        self, probe: Any = None, *, path: str | None = "auto", log: bool = True, **options
    ):
        if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # the events it measures at
            raise ICSUsageError(
                "ICSCallback needs a transformers version whose Trainer sends "
                "on_pre_optimizer_step / on_optimizer_step events: pip install -U transformers"
            )
        self.options = check_options(options, "ICSCallback")
        self.probe = probe
        self.path = path
        self.log = bool(log)
        self.monitor: Any = None
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._writer: Any = None
        self._open = False
        self._handler: Any = None  # the trainer's CallbackHandler, set by add_to()

    @classmethod
    def add_to(cls, trainer: Any, probe: Any = None, **kwargs: Any) -> ICSCallback:
        """Build the callback, add it to ``trainer`` and send its numbers to every reporter.

        Parameters
        ----------
        trainer : transformers.Trainer
            The trainer (built with its ``report_to``).
        probe : optional
            As in :class:`ICSCallback`.
        **kwargs
            ``path``, ``log`` and the :class:`~ics_toolkit.ICSMonitor` options.

        Returns
        -------
        ICSCallback
            The callback, already added with ``trainer.add_callback``.
        """
        callback = cls(probe, **kwargs)
        callback._handler = trainer.callback_handler
        trainer.add_callback(callback)
        return callback

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Build the monitor (once); on resume, load its state from the checkpoint."""
        if self.monitor is not None:
            return
        model = kwargs.get("model")
        if model is None:
            raise ICSUsageError("ICSCallback: the trainer passed no model to on_train_begin")
        self.monitor = self._build(args, model, kwargs.get("train_dataloader"))
        saved = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if state.global_step > 0 and os.path.isfile(saved):
            with open(saved, encoding="utf-8") as f:
                self.monitor.load_state_dict(json.load(f))
        self.monitor.step_count = int(state.global_step)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Capture the probe before the optimizer step ``state.global_step``."""
        if self.monitor is None:
            return
        if self._open:  # the last step raised between the events
            self.monitor.abort_step("the previous optimizer step raised before finishing")
        self.monitor.before_step(int(state.global_step))
        self._open = True

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Capture again after the step, measure, and record the numbers."""
        if self.monitor is None or not self._open:
            return
        self._open = False
        self.monitor.after_step()
        for step, values in self._pending:
            state.log_history.append({**values, "step": step})
            if self._writer is not None:
                for name, value in values.items():
                    self._writer.add_scalar(name, value, global_step=step)
            for reporter in self._reporters():  # at state.global_step, which is step
                reporter.on_log(args, state, control, logs=dict(values))
        self._pending.clear()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the monitor's state beside the checkpoint the trainer just saved."""
        if self.monitor is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(self.monitor.state_dict(), f)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the TensorBoard writer (results stay in :attr:`monitor`)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ results
    def results(self) -> Any:
        """The monitor's tidy results table (see :meth:`ics_toolkit.ICSMonitor.results`)."""
        if self.monitor is None:
            raise ICSUsageError("ICSCallback.results(): training has not begun yet")
        return self.monitor.results()

    # ------------------------------------------------------------------ internals
    def _build(self, args: Any, model: Any, loader: Any) -> Any:
        from ics_toolkit.monitor import ICSMonitor

        options = dict(self.options)
        device = next((p.device for p in model.parameters()), None)
        probe, targets = self.probe, options.pop("targets", None)
        if probe is None:
            if loader is None:
                raise ICSUsageError(
                    "ICSCallback: no probe given and the trainer has no training dataloader; "
                    "pass probe=... (a tokenized batch)"
                )
            probe, drawn = draw_probe(
                loader, options.get("probe_size", 256), options.get("seed", 0)
            )
            targets = drawn if targets is None else targets
        probe = to_device(probe, device)
        if targets is not None:
            options["targets"] = to_device(targets, device)
        path = self.path
        if path == "auto":
            path = os.path.join(args.output_dir, "ics")
        sinks = options.pop("log_to", None)
        sinks = [] if sinks is None else list(sinks) if isinstance(sinks, list | tuple) else [sinks]
        if self.log:
            sinks.append(self._collect)
            if (
                _reports_to_tensorboard(args)
                and args.process_index == 0
                and self._handler is None  # with add_to, the trainer's own writer has them
            ):
                from torch.utils.tensorboard import SummaryWriter

                root = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(
                    args.output_dir, "runs"
                )
                self._writer = SummaryWriter(log_dir=os.path.join(os.path.expanduser(root), "ics"))
        return ICSMonitor(model, probe, path=path, log_to=sinks or None, **options)

    def _reporters(self) -> list[Any]:
        """The trainer's reporting integrations (TensorBoard, W&B, ...), if known."""
        if self._handler is None:
            return []
        return [
            cb
            for cb in self._handler.callbacks
            if type(cb).__module__.startswith("transformers.integrations") and cb is not self
        ]

    def _collect(self, step: int, values: dict[str, float]) -> None:
        self._pending.append((step, dict(values)))


def _reports_to_tensorboard(args: Any) -> bool:
    report = args.report_to
    report = [report] if isinstance(report, str) else list(report or [])
    return "tensorboard" in report or "all" in report
