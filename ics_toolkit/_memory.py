"""Memory plan of a monitor: bytes held, analysed and worked on per captured layer.

:func:`memory_plan` is the body of :meth:`ics_toolkit.ICSMonitor.memory_per_layer`
(see there for the columns): one counting-only probe pass gives each layer's shape,
the sizes follow from the capture dtype, the sketch, the views and the bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ics_toolkit.recording import Recorder
from ics_toolkit.sketch import chunk_bytes

if TYPE_CHECKING:
    from ics_toolkit.monitor import ICSMonitor

__all__ = ["WORKING_COPIES", "analysis_bytes", "cache_bytes", "layer_rows", "memory_plan"]

#: Transient working memory of the estimators at a measured step, in float64 copies of
#: one layer's largest view matrix (``ICSMonitor.memory_per_layer``'s ``bytes_working``):
#: ``exact`` centres both samples and recomputes near-diagonal differences, the
#: bounds difference the samples and sort every column for L3, the moments square the
#: centred samples, the order check takes absolute values. Measured with
#: ``benchmarks/scale.py`` (n = 256, d = 32768, CPU resident high-water mark): 1.5
#: (``paired`` alone) to 5.5 (``exact``, or the bounds) copies on top of the held
#: captures and views; U3 / U5 layers use 2 more (their float64 normalized values).
WORKING_COPIES = 6


def analysis_bytes(
    config: Any, stored: tuple[int, ...], batch: int, channel: int
) -> tuple[int, int]:
    """float64 sample matrices of every view of one layer (both sides), and the largest."""
    total = largest = 0
    for _, rows, width in _view_shapes(config, stored, batch, channel):
        total += 2 * rows * width * 8
        largest = max(largest, rows * width * 8)
    return total, largest


def cache_bytes(
    config: Any, stored: tuple[int, ...], batch: int, channel: int, sketched: bool
) -> int:
    """The one-sided numbers the analysis keeps with one capture (``StepCapture.cache``).

    Per view of r rows and w columns, in the analysis dtype: the row norms (r), the
    sorted projections of sliced / max_sliced (L r, not on the channel view) and the
    column mean, variance and fourth moment of the drift (3 w, not on the channel view
    or a sketch).
    """
    itemsize = 8 if config.precision == "float64" else 4
    projected = bool({"sliced", "max_sliced"} & set(config.methods))
    total = 0
    for name, rows, width in _view_shapes(config, stored, batch, channel):
        total += rows
        if name != "channel":
            total += config.n_projections * rows if projected else 0
            total += 3 * width if config.moments and not sketched else 0
    return total * itemsize


def _view_shapes(
    config: Any, stored: tuple[int, ...], batch: int, channel: int
) -> list[tuple[str, int, int]]:
    """(view, rows, columns) of every view of ``config.views`` of a layer stored as ``stored``."""
    numel = math.prod(stored)
    n = stored[batch]
    out = []
    for name in config.views:
        if name == "flatten" or len(stored) == 1:
            rows, width = n, numel // n
        else:  # pixel / channel: one row per (input, position), C columns
            width = stored[channel % len(stored)]
            rows = numel // width
        if name == "token" and config.token_mask is not None:
            rows = int(config.token_mask.sum())  # the real tokens only
        if name in ("pixel", "token"):
            rows = min(rows, config.max_pixel_samples)
        out.append((name, rows, width))
    return out


def memory_plan(monitor: ICSMonitor) -> Any:
    """The table of :meth:`ics_toolkit.ICSMonitor.memory_per_layer`."""
    import pandas as pd

    recorder = monitor.recorder
    quiet = Recorder(monitor.model, recorder.layers, recorder.where, mode="eval")
    table = quiet.dry_run(monitor.probe)
    frame = pd.DataFrame(layer_rows(monitor, table, monitor._sketch_of))
    frame["sketch"] = frame["sketch"].astype("Int64")
    return frame


def layer_rows(
    monitor: ICSMonitor,
    table: Any,
    sketch_of: Callable[[str], int | None],
) -> list[dict[str, Any]]:
    """One row per measured capture key, with the sketch dimension ``sketch_of(name)``.

    ``table`` is a dry run's table (``Recorder.dry_run``); a layer with a sketch k < d
    stores (n, k) and keeps no normalized values (no U3 / U5 on a sketch).
    """
    recorder = monitor.recorder
    targets = {name: (module, axes) for name, module, axes in recorder.selected()}
    itemsize = torch.empty((), dtype=recorder.dtype).element_size()
    shapes = {(row.name, row.site): tuple(row.shape) for row in table.itertuples()}
    device = str(monitor._device) if monitor._device is not None else "cpu"
    config = monitor.config
    rows = []
    for row in table.itertuples():
        if row.calls != row.calls or not row.calls:  # NaN or 0: never ran
            continue
        module, axes = targets[row.name]
        sketch = sketch_of(row.name)
        for call in range(1, int(row.calls) + 1):
            key = row.name + (f"#{call}" if call > 1 else "")
            key += ":input" if row.site == "input" else ""
            if not monitor._measured(key):
                continue
            shape = tuple(row.shape)
            batch = axes[0] % len(shape)
            n = shape[batch]
            dim = math.prod(shape) // n
            sketched = sketch is not None and dim > sketch
            stored = (n, sketch) if sketched else shape
            stored_bytes = math.prod(stored) * itemsize
            extra = 0
            snapshot = monitor.sketch is None and sketch is None and monitor._bound_snapshot(module)
            if row.site == "output" and snapshot:
                in_shape = shapes.get((row.name, "input"), shape)
                extra = math.prod(in_shape) * itemsize  # x_hat, storage dtype
            kept = cache_bytes(config, stored, 0 if sketched else batch, axes[1], sketched)
            held = 2 * (stored_bytes + extra + kept)
            analysis, largest = analysis_bytes(config, stored, 0 if sketched else batch, axes[1])
            working = (WORKING_COPIES + (2 if extra else 0)) * largest
            if sketched:  # the hook's transient chunks (not at the same time)
                source = torch.empty((), dtype=_source_dtype(monitor.model)).element_size()
                working = max(working, chunk_bytes(n, dim, device, max(source, 4)))
            rows.append(
                {
                    "layer": key,
                    "site": row.site,
                    "device": device,
                    "dtype": str(recorder.dtype).removeprefix("torch."),
                    "shape": shape,
                    "stored_shape": stored,
                    "dim": dim,
                    "sketch": sketch if sketched else None,
                    "bytes_per_capture": stored_bytes + extra,
                    "bytes_cache": kept,
                    "bytes_held": held,
                    "bytes_analysis": analysis,
                    "bytes_working": working,
                    "bytes_peak": held + analysis + working,
                }
            )
    return rows


def _source_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters()), torch.float32)
