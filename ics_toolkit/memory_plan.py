"""The memory plan of a monitor: the peak of a measured step against the memory there is.

Before the first measured step the monitor knows, from the dry run of its probe,
every captured layer's shape, hence the bytes a measured step will need (see
:meth:`ics_toolkit.ICSMonitor.memory_per_layer` for the per-layer columns):

- the captures at both steps (and the normalized values of BatchNorm / Unitization
  layers, for U3 / U5), held from before the optimizer step to the end of the
  analysis: ``bytes_held``; with the analysis worker (``worker``, on by default on a
  GPU) one capture more, since the step being analysed in the background still holds
  its two while the next probe pass stores a third;
- the float64 sample matrices of the views: ``bytes_analysis``, for every layer at
  once (the fused analysis) or for one layer at a time;
- the estimators' transient working copies: ``bytes_working``, one layer at a time;
- the probe's forward pass (:data:`FORWARD_COPIES` copies of its largest captured
  activation, an estimate);
- the random directions of ``sliced``, ``max_sliced`` and L3, d x L float64 values per
  distinct width d, which the engine keeps for the next steps (:func:`direction_bytes`).

:func:`make_plan` compares that peak with a budget, a share of the memory available
where the captures live (:func:`available_memory`: host RAM from ``/proc/meminfo``,
device memory from ``torch.cuda.mem_get_info``), and when it does not fit adapts, in
this order, until it fits:

1. **one layer at a time**: the analysis builds one layer's float64 views, measures
   them and frees them before the next layer, so only one float64 working set exists
   (the captures stay in their storage dtype); results are unchanged;
2. **host offload** (captures on a GPU): the captures are stored in page-locked host
   memory and each layer's pair is moved to the device for its analysis; results are
   unchanged; the host holds :func:`pinned_bytes` of each stored tensor (torch's caching
   host allocator rounds a block up to a power of two);
3. **sketch the widest layers**: layers are replaced, widest first, by a random
   projection of :data:`PLAN_SKETCH` numbers per probe input (:mod:`ics_toolkit.sketch`;
   their rows have view ``"sketch"``, read as the sketch section of the monitor says).

If even sketching every wide layer does not fit, the monitor refuses at construction
(:class:`~ics_toolkit.errors.ICSMemoryError`) with the numbers and the options,
instead of an allocator error inside ``optimizer.step()``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ics_toolkit._memory import layer_rows
from ics_toolkit.errors import ICSTypeError, ICSValueError

if TYPE_CHECKING:
    from ics_toolkit.monitor import ICSMonitor

__all__ = [
    "DEFAULT_BUDGET",
    "FORWARD_COPIES",
    "PLAN_SKETCH",
    "MemoryPlan",
    "available_memory",
    "direction_bytes",
    "format_bytes",
    "make_plan",
    "pinned_bytes",
]

#: Default ``memory_budget``: the share of the available memory a measured step may use
#: (the rest is left to training: its activations, gradients and optimizer state).
DEFAULT_BUDGET = 0.5
#: Sketch dimension k the plan chooses for the layers it sketches (unless ``sketch``
#: is given): the sketch W1 rescaled to the true one has a relative error of order
#: ``sqrt(log(2n) / k)`` (0.14 for n = 64, :func:`ics_toolkit.sketch.jl_epsilon`).
PLAN_SKETCH = 256
#: The probe's forward pass, in copies of its largest captured activation (the layer's
#: input and output plus a residual branch and an intermediate buffer; an estimate).
FORWARD_COPIES = 4
#: Widths whose random directions the engine keeps (``distances._directions``' cache).
DIRECTION_CACHE = 8


def available_memory(device: str | torch.device | None = None) -> int:
    """Bytes of memory available now where captures on ``device`` would live.

    Parameters
    ----------
    device : str or torch.device, optional
        ``None`` or a CPU device: host RAM (``MemAvailable`` of ``/proc/meminfo``; where
        there is none, the free physical pages); a CUDA device: its free memory
        (``torch.cuda.mem_get_info``); other devices: host RAM (an approximation).

    Returns
    -------
    int
        Bytes.

    Examples
    --------
    >>> available_memory() > 0
    True
    """
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - no sysconf
        return 1 << 62  # unknown: do not pretend there is a limit


def format_bytes(n: float) -> str:
    """Bytes in a short human unit.

    Examples
    --------
    >>> format_bytes(1536), format_bytes(3 * 2**30)
    ('1.5 KiB', '3.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


@dataclass(frozen=True)
class MemoryPlan:
    """What a measured step will hold at its peak, and what the monitor chose to fit.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per measured capture key, under the chosen plan: the columns of
        :meth:`ics_toolkit.ICSMonitor.memory_per_layer` plus ``sketched_by_plan``
        (True for the layers the plan sketched).
    available : int
        Bytes available where the captures live, when the plan was made (host RAM, or
        the device's free memory on a GPU).
    budget : int
        Bytes a measured step may use: ``share * available``, or the bytes given.
    share : float or None
        The budget as a share of ``available`` (None when given in bytes).
    peak : int
        Predicted peak bytes of a measured step under the plan, where the budget
        applies (on a GPU with offload: device memory).
    peak_unplanned : int
        The same without any adaptation (every layer's views at once, nothing sketched).
    host_peak : int
        With host offload: the page-locked host memory the captures take, blocks rounded
        up to powers of two (:func:`pinned_bytes`; else 0).
    forward_bytes : int
        The probe pass's share of ``peak`` (an estimate, :data:`FORWARD_COPIES`).
    directions_bytes : int
        The cached random directions' share of ``peak`` (:func:`direction_bytes`).
    layerwise : bool
        The analysis runs one layer at a time.
    offload : bool
        Captures are stored in host memory and moved to the device per layer.
    sketch : int or None
        The sketch dimension k of the sketched layers.
    sketched : tuple of str
        Layer names the plan sketched (widest first).
    user_sketch : bool
        Every wide layer is sketched because ``sketch`` was given.
    where : str
        Where the budget applies: ``"host"`` or the device (e.g. ``"cuda:0"``).
    """

    table: Any
    available: int
    budget: int
    share: float | None
    peak: int
    peak_unplanned: int
    host_peak: int = 0
    forward_bytes: int = 0
    directions_bytes: int = 0
    layerwise: bool = False
    offload: bool = False
    sketch: int | None = None
    sketched: tuple[str, ...] = ()
    user_sketch: bool = False
    where: str = "host"
    notes: tuple[str, ...] = field(default=(), repr=False)

    @property
    def fits(self) -> bool:
        """Whether the predicted peak is within the budget."""
        return self.peak <= self.budget

    @property
    def adapted(self) -> bool:
        """Whether the plan changed anything (one layer at a time, offload, sketch)."""
        return self.layerwise or self.offload or bool(self.sketched)

    def summary(self) -> str:
        """One paragraph: the peak against the budget and what was chosen, for which layers."""
        budget = f"{format_bytes(self.budget)}"
        if self.share is not None:
            budget += f" ({self.share:.0%} of {format_bytes(self.available)} available"
        else:
            budget += f" (of {format_bytes(self.available)} available"
        budget += f" on the {self.where})"
        text = (
            f"memory plan: a measured step would peak at {format_bytes(self.peak_unplanned)}"
            f" against a budget of {budget}"
        )
        if not self.adapted:
            return text + "; nothing to adapt"
        chosen = []
        if self.layerwise:
            chosen.append("the analysis runs one layer at a time")
        if self.offload:
            chosen.append(
                f"captures are kept in host memory ({format_bytes(self.host_peak)}) and moved "
                "to the device one layer at a time"
            )
        if self.sketched:
            chosen.append(
                f"{len(self.sketched)} layer(s) are stored as a sketch of k={self.sketch} "
                f"numbers per probe input (rows with view 'sketch'; no U3-U5 or moment drift "
                f"there): {list(self.sketched)}"
            )
        now = format_bytes(self.peak)
        return text + "; chose: " + "; ".join(chosen) + f"; predicted peak now {now}"

    def __str__(self) -> str:
        return self.summary()


def check_budget(value: Any) -> float | int | None:
    """``memory_budget`` checked: None, a share in (0, 1] (float), or bytes >= 1 (int)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ICSTypeError(
            "`memory_budget` must be a share of the available memory in (0, 1] (a float, "
            f"e.g. 0.5), a number of bytes (an int) or None, got {type(value).__name__}"
        )
    if isinstance(value, float):
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise ICSValueError(
                f"`memory_budget` as a float is a share of the available memory in (0, 1], "
                f"got {value!r}; pass e.g. 0.5, or an int number of bytes"
            )
        return value
    if value < 1:
        raise ICSValueError(f"`memory_budget` as an int is a number of bytes >= 1, got {value}")
    return value


def direction_bytes(rows: Sequence[Mapping[str, Any]], n_projections: int) -> int:
    """Bytes of the cached random directions (float64, d x L per distinct width d).

    ``sliced``, ``max_sliced`` and L3 project on L directions per width, drawn once and
    kept by the engine for later steps (at most :data:`DIRECTION_CACHE` widths).
    """
    widths = sorted({int(r["width"]) for r in rows}, reverse=True)[:DIRECTION_CACHE]
    return sum(widths) * n_projections * 8


def pinned_bytes(nbytes: int) -> int:
    """Page-locked host bytes a stored tensor of ``nbytes`` takes under host offload.

    torch's caching host allocator serves a pinned block of the next power of two (and
    keeps it for reuse once freed); 0 stays 0.

    Examples
    --------
    >>> pinned_bytes(0), pinned_bytes(4096), pinned_bytes(205_520_896)  # 64 x 256 x 56 x 56
    (0, 4096, 268435456)
    """
    return 0 if nbytes <= 0 else 1 << (int(nbytes) - 1).bit_length()


def _peaks(
    rows: Sequence[Mapping[str, Any]],
    layerwise: bool,
    offload: bool,
    directions: int = 0,
    worker: bool = False,
) -> tuple[int, int, int]:
    """(peak where the budget applies, host bytes held, forward bytes) of one choice.

    ``worker``: the analysis runs on a background thread, so the captures of the step
    it analyses (t and t+1) can still be held while the next probe pass stores t+2:
    one capture more than ``bytes_held`` (the two sides) counts.
    """
    sides = 3 if worker else 2
    held = sum(r["bytes_held"] for r in rows) * sides // 2
    if layerwise:
        analysis = max((r["bytes_analysis"] + r["bytes_working"] for r in rows), default=0)
    else:
        analysis = sum(r["bytes_analysis"] for r in rows)
        analysis += max((r["bytes_working"] for r in rows), default=0)
    forward = FORWARD_COPIES * max((r["bytes_source"] for r in rows), default=0)
    analysis += directions
    if offload:  # the device holds one layer's pair (storage dtype) and its analysis
        pair = max((r["bytes_held"] for r in rows), default=0)
        host = sum(r.get("bytes_host", r["bytes_held"]) for r in rows) * sides // 2
        return pair + analysis + forward, host, forward
    return held + analysis + forward, 0, forward


def make_plan(
    monitor: ICSMonitor,
    table: Any,
    budget: float | int | None,
    *,
    available: int | None = None,
) -> MemoryPlan:
    """The monitor's plan from its dry-run ``table`` (see the module docs).

    ``budget`` None makes a plan without adapting (the budget is then all the
    available memory, for the table only). ``available`` overrides
    :func:`available_memory` (bytes). Raises
    :class:`~ics_toolkit.errors.ICSMemoryError` when nothing fits.
    """
    import pandas as pd

    device = monitor._device
    on_gpu = device is not None and device.type == "cuda"
    where = str(device) if on_gpu else "host"
    avail = int(available_memory(device if on_gpu else None) if available is None else available)
    share = budget if isinstance(budget, float) else (1.0 if budget is None else None)
    limit = int(share * avail) if share is not None else int(budget)  # type: ignore[arg-type]
    source = torch.empty((), dtype=_model_dtype(monitor.model)).element_size()
    itemsize = torch.empty((), dtype=monitor.recorder.dtype).element_size()
    user_sketch = monitor.sketch is not None
    k = monitor.sketch if user_sketch else PLAN_SKETCH

    def rows_for(sketched: set[str]) -> list[dict[str, Any]]:
        def sketch_of(name: str) -> int | None:
            return k if user_sketch or name in sketched else None

        rows = layer_rows(monitor, table, sketch_of)
        for r in rows:
            r["name"] = _name_of(r["layer"])
            own = math.prod(r["stored_shape"]) * itemsize
            # both sides' stored tensors: the capture and, for U3 / U5, the normalized values
            r["bytes_host"] = 2 * (pinned_bytes(own) + pinned_bytes(r["bytes_per_capture"] - own))
            r["bytes_source"] = math.prod(r["shape"]) * source
            stored = r["stored_shape"]
            flat = math.prod(stored) // stored[0]
            r["width"] = flat if "flatten" in views else min(flat, int(r["shape"][1]))
        return rows

    config = monitor.config
    views = config.views
    worker = monitor._uses_worker
    projects = config.bounds or bool({"sliced", "max_sliced"} & set(config.methods))

    def peaks(rows: list[dict[str, Any]], layerwise: bool, offload: bool) -> tuple[int, ...]:
        dirs = direction_bytes(rows, config.n_projections) if projects else 0
        return _peaks(rows, layerwise, offload, dirs, worker)

    base = rows_for(set())
    peak0, _, _ = peaks(base, False, False)
    layerwise = offload = False
    sketched: list[str] = []
    rows = base
    peak, host, forward = peaks(rows, layerwise, offload)
    if budget is not None and peak > limit:
        layerwise = True
        peak, host, forward = peaks(rows, layerwise, offload)
        if peak > limit and on_gpu:
            offload = True
            peak, host, forward = peaks(rows, layerwise, offload)
        # a user's capture transform would be replaced by the sketch: never sketch then
        own = monitor.recorder.transform is None or hasattr(monitor.recorder.transform, "hat_keys")
        can_sketch = monitor.config.views == ("flatten",) and not user_sketch and own
        if peak > limit and can_sketch:
            # the widest layers first: by what a layer holds and analyses
            size: dict[str, int] = {}
            for r in base:
                if r["dim"] > k:
                    size[r["name"]] = size.get(r["name"], 0) + r["bytes_held"] + r["bytes_analysis"]
            for name in sorted(size, key=lambda m: (-size[m], m)):
                sketched.append(name)
                rows = rows_for(set(sketched))
                peak, host, forward = peaks(rows, layerwise, offload)
                if peak <= limit:
                    break
        if offload and host > avail:
            peak = max(peak, host)  # the host cannot hold the captures either
        if peak > limit:
            _refuse(monitor, peak0, peak, limit, avail, share, where, k, can_sketch, base)
    frame = pd.DataFrame(rows).drop(columns=["name", "bytes_source", "width", "bytes_host"])
    frame["sketch"] = frame["sketch"].astype("Int64")
    frame["sketched_by_plan"] = [_name_of(x) in sketched for x in frame["layer"]]
    return MemoryPlan(
        table=frame,
        available=avail,
        budget=limit,
        share=share if budget is not None else None,
        peak=peak,
        peak_unplanned=peak0,
        host_peak=host,
        forward_bytes=forward,
        directions_bytes=direction_bytes(rows, config.n_projections) if projects else 0,
        layerwise=layerwise,
        offload=offload,
        sketch=k if (sketched or user_sketch) else None,
        sketched=tuple(sketched),
        user_sketch=user_sketch,
        where=where,
    )


def _refuse(
    monitor: ICSMonitor,
    peak0: int,
    peak: int,
    limit: int,
    avail: int,
    share: float | None,
    where: str,
    k: int,
    can_sketch: bool,
    base: Sequence[Mapping[str, Any]],
) -> None:
    from ics_toolkit.errors import ICSMemoryError

    widest = sorted(base, key=lambda r: -(r["bytes_held"] + r["bytes_analysis"]))[:3]
    listing = ", ".join(
        f"{r['layer']} {format_bytes(r['bytes_held'] + r['bytes_analysis'])}" for r in widest
    )
    n = int(base[0]["shape"][0]) if base else 0
    budget = format_bytes(limit) + (
        f" ({share:.0%} of {format_bytes(avail)} available on the {where})"
        if share is not None
        else f" (of {format_bytes(avail)} available on the {where})"
    )
    tried = "one layer at a time" + (f", every wide layer sketched to k={k}" if can_sketch else "")
    options = [
        f"a smaller probe (n = {n} now; the held captures grow linearly with n)",
        "fewer layers (`layers=`, e.g. the deeper, narrower ones)",
    ]
    if not can_sketch and monitor.sketch is None:
        options.append("views=('flatten',), so that the plan can sketch wide layers")
    if monitor.sketch is not None:
        options.append(f"a smaller `sketch` (k = {monitor.sketch} now)")
    options.append(
        "a larger `memory_budget` (a share up to 1.0, or bytes), or memory_budget=None to skip "
        "the plan at your own risk"
    )
    raise ICSMemoryError(
        f"a measured step does not fit in memory: it would peak at {format_bytes(peak0)}, and "
        f"still at {format_bytes(peak)} with {tried}, against a budget of {budget}. Widest "
        f"layers (held + analysed): {listing}. Options: " + "; ".join(options)
    )


def _name_of(key: str) -> str:
    from ics_toolkit.sketch import _layer_name

    return _layer_name(key)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters()), torch.float32)
