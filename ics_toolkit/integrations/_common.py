"""What the framework callbacks share: option checks and the probe drawn from a loader."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from ics_toolkit._probe import draw_batch
from ics_toolkit.errors import ICSTypeError, ICSValueError

#: Keys of a dict batch that hold targets, not model inputs (left out of the probe).
LABEL_KEYS = ("labels", "label", "label_ids")

#: Options the callbacks decide themselves.
_OWN = ("model", "probe")


def check_options(options: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Refuse keyword arguments that ``ICSMonitor`` does not take, naming them."""
    from ics_toolkit.monitor import ICSMonitor

    accepted = [p for p in inspect.signature(ICSMonitor).parameters if p not in _OWN]
    bad = sorted(k for k in options if k not in accepted)
    if bad:
        raise ICSTypeError(
            f"{owner} got unknown option(s) {bad}; it takes the options of ICSMonitor: "
            f"{', '.join(accepted)}"
        )
    return dict(options)


def to_device(obj: Any, device: torch.device | None) -> Any:
    """Move the tensors of a probe (tensor, tuple, list or dict) to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def draw_probe(loader: Any, size: int, seed: int) -> tuple[Any, Any]:
    """A fixed probe from a DataLoader's dataset, drawn with a private seeded generator.

    Returns ``(inputs, targets)``: for ``(input, target)`` samples the collated inputs
    and targets; for dict samples the dict without its label keys (:data:`LABEL_KEYS`)
    and the labels (or None). The loader is not iterated, so its shuffle order (drawn
    from the global RNG) and the training run are untouched.
    """
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ICSValueError(
            "no probe was given and the training dataloader has no map-style dataset to draw "
            "one from; pass probe=... (a batch of model inputs) to ICSCallback"
        )
    n = len(dataset)
    if n < 2:
        raise ICSValueError(f"the training dataset has {n} sample(s); the probe needs at least 2")
    batch = draw_batch(dataset, getattr(loader, "collate_fn", None), size, seed)
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return inputs, labels
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]
    return batch, None
