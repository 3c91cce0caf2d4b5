"""Gradient rows: Santurkar et al.'s gradient ICS of every weighted layer, as table rows."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ics_toolkit.errors import ICSError

__all__ = ["gradient_rows"]


def gradient_rows(
    step: int,
    model: nn.Module,
    runner: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    probe: Any,
    targets: Any,
    before: Mapping[str, torch.Tensor],
    *,
    mode: str,
    seed: int,
) -> list[dict[str, Any]]:
    """Rows ``grad_ics_l2``, ``grad_ics_cos``, ``grad_norm`` (view ``"param"``) of one step.

    ``before`` holds the parameters at step t (names of ``model``); ``runner`` is the
    unwrapped module the probe passes call. A failure gives one ``gradient_failed``
    event row instead.
    """
    from ics_toolkit.gradient_shift import gradient_ics
    from ics_toolkit.shift import _event

    start = time.perf_counter()
    params = (
        {k.removeprefix("module."): v for k, v in before.items()} if runner is not model else before
    )
    try:
        out = gradient_ics(
            runner,
            loss_fn,
            probe,
            targets,
            params,
            mode=mode if mode != "keep" else "train",
            seed=seed,
        )
    except ICSError as err:
        return [_event(step, None, "gradient_failed", str(err))]
    seconds = (time.perf_counter() - start) / max(len(out), 1)
    rows = []
    for layer, values in out.items():
        for q, v in values.items():
            rows.append(
                {
                    "step": step,
                    "layer": layer,
                    "view": "param",
                    "quantity": q,
                    "value": v,
                    "kind": "gradient",
                    "wall_time_s": seconds / len(values),
                    "seed": seed,
                }
            )
    return rows
