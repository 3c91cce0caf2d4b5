"""A minimal, seeded training loop shared by the experiments, the CLI and the notebooks.

SGD with (Nesterov) momentum and weight decay, a step learning-rate schedule with
milestones given as fractions of the run, a fixed number of steps, a private
generator for the batch order, and a progress bar. The ICS monitor attaches to the
optimizer's step hooks: pass ``on_optimizer`` (called with the optimizer before the
first step) or your own ``optimizer``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ics_toolkit._progress import ProgressBar
from ics_toolkit.errors import ICSRuntimeWarning, ICSTypeError, ICSValueError

if TYPE_CHECKING:
    import pandas as pd

    from ics_toolkit.data.base import Dataset

__all__ = ["TrainResult", "evaluate", "lr_at", "train"]

ArrayLike = Any


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    losses : list of float
        Training loss of each step's batch (before that step's update).
    accuracies : list of float
        Accuracy on each step's batch, in [0, 1].
    lrs : list of float
        Learning rate of the first parameter group at each step.
    test_accuracy : float or None
        Accuracy on the test split after training (None without a test split, NaN
        if training diverged).
    wall_time : float
        Seconds spent in the training loop (final evaluation excluded).
    steps : int
        Steps actually taken (fewer than asked if the loss diverged).
    seed : int
        The seed of the batch order.
    diverged : bool
        True if a loss was NaN or Inf; training stopped at that step.
    """

    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    test_accuracy: float | None = None
    wall_time: float = 0.0
    steps: int = 0
    seed: int = 0
    diverged: bool = False

    def to_frame(self) -> pd.DataFrame:
        """One row per step: ``step``, ``loss``, ``accuracy``, ``lr``."""
        import pandas as pd

        return pd.DataFrame(
            {
                "step": np.arange(len(self.losses)),
                "loss": self.losses,
                "accuracy": self.accuracies,
                "lr": self.lrs,
            }
        )


def lr_at(step: int, total: int, milestones: Sequence[float], decay: float) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total`` steps.

    The rate is multiplied by ``decay`` at each milestone: a fraction ``f`` of the
    run becomes step ``round(f * total)``.

    Examples
    --------
    >>> [lr_at(s, 8, (0.5, 0.75), 0.1) for s in (0, 3, 4, 5, 6, 7)]
    [1.0, 1.0, 0.1, 0.1, 0.010000000000000002, 0.010000000000000002]
    """
    passed = sum(step >= round(f * total) for f in milestones)
    return float(decay**passed)


def _as_xy(
    x: ArrayLike, y: ArrayLike, name: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    tx = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    ty = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    if tx.dim() < 2 or ty.dim() != 1 or tx.shape[0] != ty.shape[0]:
        raise ICSValueError(
            f"`{name}` inputs must be (n, ...) and labels (n,) with the same n, got "
            f"{tuple(tx.shape)} and {tuple(ty.shape)}"
        )
    if tx.shape[0] == 0:
        raise ICSValueError(f"`{name}` is empty")
    if ty.is_floating_point() or ty.is_complex():
        raise ICSTypeError(f"`{name}` labels must be integers, got dtype {ty.dtype}")
    return tx.to(dtype), ty.long()


def _unpack(data: object, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    from ics_toolkit.data.base import Dataset

    if isinstance(data, Dataset):
        parts: tuple[Any, ...] = (data.x_train, data.y_train, data.x_test, data.y_test)
    elif isinstance(data, (tuple, list)) and len(data) in (2, 4):
        parts = tuple(data)
    else:
        raise ICSTypeError(
            "`data` must be an ics_toolkit.data.Dataset, (x_train, y_train) or "
            f"(x_train, y_train, x_test, y_test), got {type(data).__name__}"
        )
    out = _as_xy(parts[0], parts[1], "train", dtype)
    if len(parts) == 4 and len(parts[3]):
        out += _as_xy(parts[2], parts[3], "test", dtype)
    return out


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, (p.dtype if p.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


def _flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_flags(flags: list[tuple[nn.Module, bool]]) -> None:
    for m, was in flags:
        m.training = was


def evaluate(
    model: nn.Module,
    x: ArrayLike,
    y: ArrayLike,
    *,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> float:
    """Classification accuracy of ``model`` on ``(x, y)``, in eval mode.

    Every submodule's train/eval flag is restored afterwards and nothing else
    changes (eval-mode BatchNorm does not update its statistics).

    Parameters
    ----------
    model : torch.nn.Module
        Maps (n, ...) inputs to (n, num_classes) logits.
    x : array_like
        Inputs, shape (n, ...).
    y : array_like
        Integer labels, shape (n,).
    batch_size : int
        Inputs per forward pass.
    device : torch.device or str or None
        Where to run; None means the model's parameters' device.

    Returns
    -------
    float
        Fraction of correct argmax predictions, in [0, 1].

    Examples
    --------
    >>> model = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.eye(2)), model.bias.zero_()
    >>> evaluate(model, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), [0, 1, 1])
    0.6666666666666666
    """
    dev, dtype = _model_device_dtype(model)
    dev = torch.device(device) if device is not None else dev
    tx, ty = _as_xy(x, y, "x/y", dtype)
    flags = _flags(model)
    correct = 0
    try:
        model.eval()
        with torch.no_grad():
            for i in range(0, tx.shape[0], max(int(batch_size), 1)):
                xb = tx[i : i + batch_size].to(dev)
                yb = ty[i : i + batch_size].to(dev)
                correct += int((model(xb).argmax(1) == yb).sum())
    finally:
        _restore_flags(flags)
    return correct / tx.shape[0]


def train(
    model: nn.Module,
    data: Dataset | Sequence[ArrayLike],
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 0.05,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    milestones: Sequence[float] = (0.5, 0.75),
    lr_decay: float = 0.1,
    seed: int = 0,
    device: torch.device | str | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_optimizer: Callable[[torch.optim.Optimizer], object] | None = None,
    on_step: Callable[[int, float], object] | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    progress: bool | None = None,
    desc: str = "train",
    global_seed: int | None = None,
    eval_batch_size: int = 1024,
) -> TrainResult:
    """Train a classifier for a fixed number of SGD steps.

    Parameters
    ----------
    model : torch.nn.Module
        Maps (batch, ...) inputs to (batch, num_classes) logits. Moved to ``device``
        if one is given. It is in train mode during the loop; every submodule's
        flag is restored at the end.
    data : Dataset or tuple
        A :class:`~ics_toolkit.data.Dataset`, ``(x_train, y_train)`` or
        ``(x_train, y_train, x_test, y_test)`` (numpy arrays or tensors).
    steps : int
        Number of optimizer steps.
    batch_size : int
        Samples per step (capped at the training set size). Batches walk through a
        fresh permutation each epoch; an incomplete last batch is skipped.
    lr, momentum, nesterov, weight_decay : float, float, bool, float
        ``torch.optim.SGD`` settings (Nesterov only when ``momentum > 0``); weight
        decay applies to every parameter. Ignored if ``optimizer`` is given.
    milestones : sequence of float
        Fractions of ``steps`` (in (0, 1), increasing) at which the learning rate is
        multiplied by ``lr_decay`` (see :func:`lr_at`). ``()`` keeps it constant.
    lr_decay : float
        The multiplier at each milestone.
    seed : int
        Seed of the private generator for the batch order and the augmentation; the
        global RNGs are not touched.
    device : torch.device or str or None
        Where to train; None means the model's parameters' device.
    optimizer : torch.optim.Optimizer or None
        Use this optimizer instead of building SGD; the schedule still scales each
        group's initial ``lr``.
    on_optimizer : callable or None
        Called as ``on_optimizer(optimizer)`` before the first step, e.g. to attach
        an :class:`~ics_toolkit.ICSMonitor` to the optimizer's step hooks.
    on_step : callable or None
        Called as ``on_step(step, loss)`` after each optimizer step (``step`` is
        0-based, ``loss`` that step's batch loss).
    augment : callable or None
        ``augment(x_batch, generator) -> x_batch`` applied to each training batch,
        e.g. :func:`ics_toolkit.data.flip_and_shift`; ``generator`` is on the device.
    loss_fn : callable
        ``loss_fn(logits, labels) -> scalar``; cross-entropy by default.
    progress : bool or None
        Show a progress bar on stderr (loss and batch accuracy); None: only when
        stderr is a terminal.
    desc : str
        Label of the progress bar.
    global_seed : int or None
        If given, ``torch.manual_seed(global_seed)`` first (for models whose forward
        draws from the global RNG, e.g. dropout). The default leaves it alone.
    eval_batch_size : int
        Batch size of the final test evaluation.

    Returns
    -------
    TrainResult
        Per-step losses, batch accuracies and learning rates, the test accuracy and
        the wall time.

    Examples
    --------
    >>> from ics_toolkit.data import make_blobs
    >>> from ics_toolkit.models import MLP
    >>> result = train(MLP(4, 2, hidden=(8,), seed=0), make_blobs(64, 32, num_classes=2, dim=4),
    ...                steps=20, batch_size=16, progress=False)
    >>> len(result.losses), result.losses[-1] < result.losses[0]
    (20, True)
    """
    if not isinstance(model, nn.Module):
        raise ICSTypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ICSValueError(f"`steps` must be a positive int, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ICSValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    ms = tuple(float(f) for f in milestones)
    if any(not 0.0 < f < 1.0 for f in ms) or list(ms) != sorted(ms):
        raise ICSValueError(
            f"`milestones` must be increasing fractions of the run in (0, 1), got {milestones!r}"
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ICSTypeError(
            f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )

    if device is not None:
        model.to(device)
    dev, dtype = _model_device_dtype(model)
    tensors = _unpack(data, dtype)
    x_tr, y_tr = tensors[0].to(dev), tensors[1].to(dev)
    n = x_tr.shape[0]
    bs = min(batch_size, n)

    if optimizer is None:
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=momentum,
            nesterov=bool(nesterov and momentum > 0),
            weight_decay=weight_decay,
        )
    base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
    if on_optimizer is not None:
        on_optimizer(optimizer)
    if global_seed is not None:
        torch.manual_seed(global_seed)

    order = torch.Generator(device="cpu").manual_seed(int(seed))
    aug_gen = None
    if augment is not None:
        aug_seed = int(torch.randint(0, 2**62, (1,), generator=order))
        aug_gen = torch.Generator(device=dev).manual_seed(aug_seed)

    result = TrainResult(seed=int(seed))
    flags = _flags(model)
    perm: torch.Tensor | None = None
    pos = 0
    bar = ProgressBar(steps, desc, enabled=progress)
    start = time.perf_counter()
    try:
        model.train()
        for step in range(steps):
            if perm is None or pos + bs > n:
                perm = torch.randperm(n, generator=order).to(dev)
                pos = 0
            idx = perm[pos : pos + bs]
            pos += bs
            xb, yb = x_tr[idx], y_tr[idx]
            if augment is not None:
                xb = augment(xb, aug_gen)  # type: ignore[arg-type]
            scale = lr_at(step, steps, ms, lr_decay)
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * scale
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss_value = float(loss.detach())
            acc = float((logits.detach().argmax(1) == yb).float().mean())
            result.losses.append(loss_value)
            result.accuracies.append(acc)
            result.lrs.append(float(optimizer.param_groups[0]["lr"]))
            if not math.isfinite(loss_value):
                result.diverged = True
                warnings.warn(
                    f"training stopped at step {step}: the loss is {loss_value} "
                    "(try a smaller lr, or a normalization layer)",
                    ICSRuntimeWarning,
                    stacklevel=2,
                )
                break
            loss.backward()
            optimizer.step()
            result.steps = step + 1
            if on_step is not None:
                on_step(step, loss_value)
            bar.update(1, loss=loss_value, acc=acc)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        result.wall_time = time.perf_counter() - start
    finally:
        bar.close()
        _restore_flags(flags)
    if len(tensors) == 4:
        result.test_accuracy = (
            float("nan")
            if result.diverged
            else evaluate(model, tensors[2], tensors[3], batch_size=eval_batch_size, device=dev)
        )
    return result
