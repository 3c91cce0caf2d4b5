"""The monitor's side of the ``token`` view: which padding mask, and does it fit the layers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ics_toolkit.errors import ICSTypeError, ICSValueError


def resolve_mask(token_mask: Any, probe: Any, views: tuple[str, ...], gather: bool) -> Any:
    """The (N, T) bool padding mask of the probe for the ``token`` view, or None.

    ``token_mask=None`` takes the probe's ``attention_mask`` (a dict probe) if there is
    one; False uses no mask; a tensor is the mask itself.
    """
    if "token" not in views or token_mask is False:
        return None
    if token_mask is None or token_mask is True:
        if isinstance(probe, Mapping) and isinstance(probe.get("attention_mask"), torch.Tensor):
            token_mask = probe["attention_mask"]
        elif token_mask is True:
            raise ICSValueError(
                "token_mask=True takes the mask from the probe's 'attention_mask' key, but the "
                "probe has none; pass the mask itself (token_mask=tensor of shape (N, T))"
            )
        else:
            return None
    if not isinstance(token_mask, torch.Tensor):
        raise ICSTypeError(
            "`token_mask` must be None (the probe's attention_mask, if any), False (no mask) "
            f"or a tensor of shape (N, T), got {type(token_mask).__name__}"
        )
    binary = bool(((token_mask == 0) | (token_mask == 1)).all())
    if token_mask.ndim < 1 or not binary:
        raise ICSValueError(
            "`token_mask` must hold 0/1 or booleans (1 for real tokens), shape (N, T)"
        )
    if gather:
        raise ICSValueError(
            "the token view's padding mask is not gathered across ranks; with gather=True "
            "pass token_mask=False (every position is a token) or use gather=False"
        )
    if not bool(token_mask.any()):
        raise ICSValueError("`token_mask` marks no token as real; nothing to measure")
    return token_mask.detach() != 0


def check_layers(
    mask: torch.Tensor | None, table: Any, axes: Mapping[str, tuple[int, int]]
) -> None:
    """Refuse, at construction, a measured layer whose tokens do not fit the mask.

    ``table`` is a dry run's table (``name``, ``site``, ``shape``); ``axes`` maps layer
    names to their (batch_axis, channel_axis).
    """
    if mask is None:
        return
    want = tuple(mask.shape)
    for row in table.itertuples():
        shape = row.shape
        if shape is None:
            continue
        shape = tuple(shape)
        batch, chan = axes[row.name]
        ndim = len(shape)
        if ndim >= 2:
            b, c = batch % ndim, chan % ndim
            rest = [shape[i] for i in range(ndim) if i not in (b, c)]
            positions = (shape[b], *rest)
        else:
            positions = shape
        if positions != want:
            side = " (input)" if row.site == "input" else ""
            raise ICSValueError(
                f"layer {row.name!r}{side} produced shape {shape}, whose tokens "
                f"{positions} do not match the padding mask {want} of the token view; "
                "leave it out of `layers`, set its axes with axes={name: (batch, channel)}, "
                "or pass token_mask=False"
            )
