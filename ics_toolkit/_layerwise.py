"""The analysis one layer at a time (a memory plan's choice, :mod:`ics_toolkit.memory_plan`).

:func:`ics_toolkit.shift.measure_step` builds the float64 views of every layer, then
runs each estimator over all of them (the fused path). Here each layer's pair is
measured on its own and its float64 views are freed before the next layer, so only
one float64 working set exists at a time; with host offload the pair (stored in host
memory) is moved to the device for its analysis only. The rows are the same as the
fused path's (the random directions depend on the width and the seed only), up to
their ``wall_time_s``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ics_toolkit.shift import MeasureConfig, StepCapture, measure_step

__all__ = ["measure_layerwise"]


def measure_layerwise(
    step: int,
    before: StepCapture,
    after: StepCapture,
    config: MeasureConfig,
    keys: Sequence[str],
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """The rows of :func:`~ics_toolkit.shift.measure_step`, one layer at a time.

    Parameters
    ----------
    step : int
        The step t of the update t -> t+1.
    before, after : StepCapture
        The captures at t and t+1.
    config : MeasureConfig
        What to compute.
    keys : sequence of str
        Capture keys to measure, in order.
    device : torch.device, optional
        Where each pair is analysed (captures kept elsewhere, e.g. in host memory, are
        moved there one layer at a time); default: where they are.

    Returns
    -------
    list of dict
        The rows, layer after layer.
    """
    rows: list[dict[str, Any]] = []
    for key in keys:
        one_before = _one(before, key, device)
        one_after = _one(after, key, device)
        rows.extend(measure_step(step, one_before, one_after, config, [key]))
        del one_before, one_after  # the device copies (if any) go before the next layer
    return rows


def _one(capture: StepCapture, key: str, device: torch.device | None) -> StepCapture:
    """The capture of one key, on ``device``."""
    tensor = _to(capture.tensors[key], device)
    norms = {}
    if key in capture.norms:
        snap = capture.norms[key]
        moved = {
            f.name: _to(getattr(snap, f.name), device)
            for f in dataclasses.fields(snap)
            if isinstance(getattr(snap, f.name), torch.Tensor)
        }
        norms[key] = dataclasses.replace(snap, **moved)
    sketched = {key: capture.sketched[key]} if key in capture.sketched else {}
    # the same cache: what this layer's analysis computes from one side stays with it
    return StepCapture({key: tensor}, {key: capture.info[key]}, norms, sketched, capture.cache)


def _to(t: Any, device: torch.device | None) -> Any:
    if device is None or not isinstance(t, torch.Tensor) or t.device == device:
        return t
    # from page-locked memory (host offload) the copy is queued, not waited for: the
    # analysis' kernels on the same stream run after it, and the capture keeps the source
    return t.to(device, non_blocking=t.device.type == "cpu" and t.is_pinned())
