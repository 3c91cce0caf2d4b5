"""Probe handling: draw a fixed probe, move it, check it fits, capture it around a step.

The monitor's probe is a tensor, a tuple of positional arguments, a dict of keyword
arguments, or a DataLoader from which a fixed, seeded batch is drawn once.
:func:`map_probe` is the one walker over those structures (device moves, sharding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ics_toolkit._failsafe import isolated_rng
from ics_toolkit._norm_snapshot import norm_snapshot, snapshot_from_hat
from ics_toolkit.errors import ICSError, ICSTypeError, ICSValueError
from ics_toolkit.recording import Recorder

__all__ = ["capture", "check_probe", "draw_probe", "map_probe", "to_device"]

Probe = Any  # Tensor | tuple | dict | torch.utils.data.DataLoader


def map_probe(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor of a probe (a tensor, tuple or mapping; others kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_probe(o, fn) for o in obj)
    if isinstance(obj, Mapping):
        return {k: map_probe(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device: torch.device | None) -> Any:
    """The probe with every tensor on ``device`` (unchanged for None)."""
    if device is None:
        return obj
    return map_probe(obj, lambda t: t.to(device))


def draw_batch(dataset: Any, collate: Any, size: int, seed: int) -> Any:
    """``size`` samples of a map-style dataset chosen by a private seeded generator, collated.

    The dataset's own random transforms draw seeded inside :func:`isolated_rng`, so no
    global RNG (``random``, numpy, torch) moves.
    """
    n = len(dataset)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[: min(size, n)].sort().values.tolist()
    collate = collate or torch.utils.data.default_collate
    with isolated_rng(seed):  # a dataset's random transforms draw seeded, then restore
        return collate([dataset[i] for i in idx])


def draw_probe(loader: Any, size: int, seed: int) -> tuple[Any, Any]:
    """A fixed, seeded probe from a DataLoader's dataset, without touching any global RNG.

    Iterating the loader would draw its shuffle order from the global RNG (and so
    shift the training run); indexing its dataset with a private generator does not.
    Returns ``(inputs, targets)`` (targets None unless the dataset yields pairs).
    """
    dataset = loader.dataset
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ICSTypeError(
            "`probe` is a DataLoader over an iterable-style dataset; pass a fixed probe "
            "batch (a tensor, tuple or dict) instead"
        )
    n = len(dataset)
    if n < 2:
        raise ICSValueError(f"`probe` DataLoader's dataset has {n} sample(s); need at least 2")
    batch = draw_batch(dataset, loader.collate_fn, size, seed)
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]  # (inputs, targets) datasets
    return batch, None


def check_probe(recorder: Recorder, probe: Any) -> Any:
    """Run the probe once (side-effect free) so that a probe that does not fit fails now.

    Returns the dry run's table (:meth:`ics_toolkit.Recorder.dry_run`).
    """
    try:
        table = recorder.dry_run(probe)
    except ICSError:
        raise
    except Exception as err:
        raise ICSValueError(
            f"the probe does not fit the model: its forward pass raised "
            f"{type(err).__name__}: {err}. Pass probe inputs the model accepts "
            "(a tensor, a tuple of positional arguments or a dict of keyword arguments)"
        ) from err
    missing = table.loc[table["calls"] == 0, "name"].tolist()
    if missing:
        raise ICSValueError(
            f"selected layer(s) {missing} never ran in the forward pass of the probe; "
            "choose other `layers` or check the model's forward"
        )
    return table


def capture(
    recorder: Recorder,
    probe: Any,
    *,
    mode: str,
    snapshots: Callable[[nn.Module], bool],
    measured: Callable[[str], bool],
    sketch: int | None,
) -> Any:
    """One probe pass: the captured tensors, the norm snapshots, the sketched keys.

    Inputs of bound layers (``snapshots(module)``) are captured to recompute their
    normalized values, then dropped unless ``measured(key)``.
    """
    from ics_toolkit.shift import StepCapture

    tensors = recorder.run(probe)
    info = recorder.info
    norms = {}
    training = mode == "train"
    transform = recorder.transform
    hat_keys = getattr(transform, "hat_keys", None)  # HatTransform, or a chain starting with it
    hats = hat_keys(list(tensors)) if hat_keys is not None else set()
    for key, inf in info.items():
        if not key.endswith(":input") or not snapshots(inf.module):
            continue
        if mode == "keep":
            training = inf.module.training
        if key in hats:  # normalized in the hook already
            snap = snapshot_from_hat(inf.module, tensors[key])
        else:
            snap = norm_snapshot(inf.module, tensors[key], training=training)
        if snap is not None:
            norms[key[: -len(":input")]] = snap
    for key in [k for k in tensors if k.endswith(":input") and not measured(k)]:
        del tensors[key]  # captured only for the normalized values
    sketched = {}
    if sketch is not None:
        for key, inf in info.items():
            if key in tensors and inf.shape != inf.source_shape:
                sketched[key] = math.prod(inf.source_shape) // inf.shape[0]
    return StepCapture(tensors=tensors, info=info, norms=norms, sketched=sketched)
