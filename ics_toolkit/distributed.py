"""Measuring under ``torch.distributed``: which rank measures, and gathering probe shards.

:class:`~ics_toolkit.ICSMonitor` works in a job of several processes (``torch.distributed``
with gloo or NCCL, the model typically wrapped in ``DistributedDataParallel``). Build the
monitor on every rank, after ``init_process_group``, with the same arguments; then
one of two modes:

``gather=False`` (default): one rank measures
    Only rank ``rank`` (default 0) runs the probe passes and the analysis and keeps
    results; the other ranks only count optimizer steps. They make **no collective
    call at all** for the monitor, so they never wait for the measuring rank (they wait
    for it only in DDP's own gradient all-reduce, as they would anyway).
``gather=True``: every rank captures its shard
    Every rank runs the probe pass on its own probe (its *shard*, e.g. from
    :func:`shard`) before and after each scheduled step; at the end of that step the
    shards are gathered to the measuring rank, which measures the concatenation (in
    rank order) as one probe. All ranks take part in the same two collectives (a
    16-byte header all-gather, then one gather of the captures) at the same scheduled
    steps and at no other time.

Probe passes run the *wrapped* module (``ddp.module``): no DDP collective fires and
layer names carry no ``module.`` prefix. Only the measuring rank writes result files.

Failures never leave a rank waiting:

- a rank whose training step raises inside ``with monitor.step():`` (or whose
  optimizer step raised, noticed at its next step) still joins the exchange, with an
  *aborted* status; a rank whose capture fails joins with a *failed* status. Every
  rank sees every status in the header, so all ranks skip the payload together and the
  measuring rank records an ``aborted`` event naming the ranks;
- a rank that dies (or never arrives) makes the collectives fail (gloo: "connection
  closed") or time out after ``gather_timeout`` seconds; the monitor then records a
  ``gather_failed`` event, warns, and stops gathering for the rest of the run instead
  of hanging (with NCCL the timeout is enforced by ``Work.wait``; NCCL's own watchdog
  timeout also applies);
- ranks at different step indices or with different capture layouts raise the same
  error on every rank.

With SyncBatchNorm in ``mode="train"`` the probe pass itself synchronizes across
ranks, so ``gather=False`` is refused there (use ``gather=True`` or ``mode="eval"``);
in gather mode the U3 bound is not reported for SyncBatchNorm layers (their normalized
values use statistics of all shards, which one rank cannot recompute).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ics_toolkit import _checks
from ics_toolkit.errors import ICSError, ICSTypeError, ICSUsageError, ICSValueError

__all__ = [
    "ABORTED",
    "FAILED",
    "OK",
    "SKIPPED",
    "CommFailure",
    "DistContext",
    "Exchange",
    "context",
    "exchange",
    "shard",
]

#: Status codes a rank sends in the header of an exchange.
OK, SKIPPED, ABORTED, FAILED = 0, 1, 2, 3
STATUS_NAMES = {OK: "ok", SKIPPED: "skipped", ABORTED: "aborted", FAILED: "failed"}

_ALIGN = 8  # every segment of a payload starts at a multiple of 8 bytes


class CommFailure(ICSError, RuntimeError):
    """A collective of the monitor failed or timed out (a rank died or never arrived).

    The monitor catches it, records a ``gather_failed`` event and stops gathering.
    """


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job, as the monitor sees it.

    Attributes
    ----------
    world_size : int
        Processes in ``group`` (1 without an initialised process group).
    rank : int
        This process's rank in ``group``.
    measuring_rank : int
        The rank (in ``group``) that measures and writes results.
    gather : bool
        Whether shards are gathered to the measuring rank.
    group : ProcessGroup or None
        The process group (None: the default group).
    timeout : float
        Seconds a collective of the monitor may take before it counts as failed.
    """

    world_size: int = 1
    rank: int = 0
    measuring_rank: int = 0
    gather: bool = False
    group: Any = None
    timeout: float = 300.0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def measures(self) -> bool:
        """Whether this process analyses and keeps results."""
        return not self.distributed or self.rank == self.measuring_rank

    @property
    def exchanges(self) -> bool:
        """Whether this process captures its shard and takes part in the gather."""
        return self.distributed and self.gather

    @property
    def captures(self) -> bool:
        """Whether this process runs probe passes."""
        return self.measures or self.exchanges


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def context(
    rank: int = 0, gather: bool = False, group: Any = None, timeout: float = 300.0
) -> DistContext:
    """Resolve the monitor's distributed options against the current process group.

    Parameters
    ----------
    rank : int
        The measuring rank, in ``group``.
    gather : bool
        Gather every rank's probe shard to the measuring rank.
    group : ProcessGroup, optional
        The process group (default: the default group).
    timeout : float
        Seconds before a collective of the monitor counts as failed.

    Returns
    -------
    DistContext
        A single-process context (``world_size=1``) when no process group is
        initialised: the process measures.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ICSValueError(f"`rank` must be a non-negative int (the measuring rank), got {rank!r}")
    if not isinstance(gather, bool):
        raise ICSTypeError(f"`gather` must be a bool, got {type(gather).__name__}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ICSValueError(
            f"`gather_timeout` must be a positive number of seconds, got {timeout!r}"
        )
    _checks.positive_number(timeout, "gather_timeout", unit=" of seconds")
    if not _initialized():
        if group is not None:
            raise ICSUsageError(
                "`group` was given but no torch.distributed process group is initialised; "
                "call torch.distributed.init_process_group before building the monitor"
            )
        return DistContext(measuring_rank=rank, gather=gather, timeout=float(timeout))
    import torch.distributed as dist

    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    if me < 0:
        raise ICSUsageError(
            "this process is not a member of `group`; build the monitor only on the ranks of "
            "the group it should use"
        )
    if rank >= world:
        raise ICSValueError(
            f"`rank`={rank} is not a rank of the process group (world size {world}); pick the "
            f"measuring rank in 0..{world - 1}"
        )
    return DistContext(
        world_size=world,
        rank=me,
        measuring_rank=rank,
        gather=gather,
        group=group,
        timeout=float(timeout),
    )


def shard(probe: Any, rank: int | None = None, world_size: int | None = None) -> Any:
    """Cut this rank's contiguous share of a probe batch, for ``ICSMonitor(gather=True)``.

    Splits along the batch axis 0 into ``world_size`` contiguous parts whose sizes
    differ by at most one (the first ranks get the extra samples), so that gathering
    the shards in rank order gives back ``probe``.

    Parameters
    ----------
    probe : Tensor, tuple or dict of tensors
        The full probe (non-tensor items are passed through unchanged).
    rank, world_size : int, optional
        Default: this process's rank and the world size of the default group (0 and 1
        without one).

    Returns
    -------
    Same structure as ``probe``
        Views of the shard (no copy).

    Examples
    --------
    >>> import torch
    >>> from ics_toolkit.distributed import shard
    >>> [shard(torch.arange(5), r, 2).tolist() for r in range(2)]
    [[0, 1, 2], [3, 4]]
    """
    if rank is None or world_size is None:
        if _initialized():
            import torch.distributed as dist

            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank, world_size = rank or 0, world_size or 1
    world_size = _checks.positive_int(world_size, "world_size")
    if not isinstance(rank, int):
        raise ICSValueError(f"`rank` must be an int, got {rank!r}")
    if not 0 <= rank < world_size:
        raise ICSValueError(f"`rank`={rank} is not in 0..{world_size - 1}")

    from ics_toolkit._probe import map_probe

    def part(t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0]
        if n < world_size:
            raise ICSValueError(
                f"the probe has {n} sample(s), fewer than the {world_size} ranks to share it"
            )
        base, extra = divmod(n, world_size)
        start = rank * base + min(rank, extra)
        return t[start : start + base + (1 if rank < extra else 0)]

    return map_probe(probe, part)


# ------------------------------------------------------------------ the exchange
@dataclass
class Exchange:
    """What an exchange returns.

    Attributes
    ----------
    statuses : list of int
        Every rank's status (:data:`OK`, :data:`SKIPPED`, :data:`ABORTED`, :data:`FAILED`).
    before, after : StepCapture or None
        On the measuring rank, when every status is OK: the captures of all shards
        concatenated in rank order. None elsewhere.
    """

    statuses: list[int]
    before: Any = None
    after: Any = None


def _segments(before: Any, after: Any) -> list[tuple[str, str, torch.Tensor, int]]:
    """(side, key, tensor, batch_axis) of everything a rank sends, in a fixed order."""
    out = []
    for side, cap in (("before", before), ("after", after)):
        for key, t in cap.tensors.items():
            out.append((side, key, t, cap.info[key].batch_axis))
        for key, snap in cap.norms.items():
            out.append((side, key + "\x00x_hat", snap.x_hat, 0))
    return out


def _layout(segments: Sequence[tuple[str, str, torch.Tensor, int]]) -> tuple[list[Any], int]:
    layout = []
    for side, key, t, b in segments:
        per_sample = tuple(t.shape[:b]) + tuple(t.shape[b + 1 :])
        layout.append((side, key, per_sample, b, str(t.dtype)))
    return layout, zlib.crc32(repr(layout).encode("utf-8"))


def _comm_device(group: Any, device: torch.device) -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if device.type == "cuda" and "nccl" in backend:
        return device
    if "gloo" in backend or "mpi" in backend or "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _wait(work: Any, timeout: float, what: str) -> None:
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as err:
        raise CommFailure(f"{what} failed or timed out after {timeout:g} s: {err}") from err


def _pack(segments: Sequence[tuple[str, str, torch.Tensor, int]], device: torch.device) -> Any:
    counts = torch.tensor([t.shape[b] for _, _, t, b in segments], dtype=torch.int64)
    parts = [counts.view(torch.uint8).to(device)]
    for _, _, t, _ in segments:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).to(device)
        parts.append(raw)
        pad = -raw.numel() % _ALIGN
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=device))
    return torch.cat(parts)


def _unpack(buf: torch.Tensor, layout: list[Any]) -> list[torch.Tensor]:
    n = len(layout)
    counts = buf[: 8 * n].view(torch.int64).tolist()
    off = 8 * n
    out = []
    for (_, _, per_sample, b, dtype_name), count in zip(layout, counts, strict=True):
        dtype = getattr(torch, dtype_name.removeprefix("torch."))
        shape = (*per_sample[:b], count, *per_sample[b:])
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out.append(buf[off : off + nbytes].view(dtype).reshape(shape))
        off += nbytes + (-nbytes % _ALIGN)
    return out


def exchange(
    ctx: DistContext,
    step: int,
    status: int,
    before: Any = None,
    after: Any = None,
    *,
    device: torch.device | None = None,
) -> Exchange:
    """Take part in the gather of one scheduled step (every rank, same step).

    Parameters
    ----------
    ctx : DistContext
        The monitor's context (``ctx.exchanges`` must be True).
    step : int
        The step index; ranks at different steps raise :class:`ICSUsageError`.
    status : int
        This rank's status; with :data:`OK`, ``before`` and ``after`` are its
        ``StepCapture`` objects.
    before, after : StepCapture, optional
        This rank's captures.
    device : torch.device, optional
        The model's device (the same type on every rank): with an NCCL group the
        collectives run there, otherwise on the CPU. Default: the captures' device.

    Returns
    -------
    Exchange
        The statuses, and on the measuring rank the concatenated captures when every
        rank is OK.

    Raises
    ------
    CommFailure
        A collective failed or timed out (a rank died or never arrived).
    ICSUsageError
        The ranks are at different steps.
    ICSValueError
        The ranks captured different layers, shapes or dtypes.
    """
    import torch.distributed as dist

    segments = _segments(before, after) if status == OK else []
    layout, crc = _layout(segments)
    local = device or next((t.device for _, _, t, _ in segments), torch.device("cpu"))
    device = _comm_device(ctx.group, local)
    payload = _pack(segments, device) if status == OK else None
    nbytes = 0 if payload is None else payload.numel()
    header = torch.tensor([status, step, nbytes, crc], dtype=torch.int64, device=device)
    headers = [torch.empty_like(header) for _ in range(ctx.world_size)]
    work = dist.all_gather(headers, header, group=ctx.group, async_op=True)
    _wait(work, ctx.timeout, f"step {step}: the monitor's header all-gather")
    table = torch.stack(headers).cpu().tolist()
    statuses = [int(row[0]) for row in table]
    steps = sorted({int(row[1]) for row in table})
    if len(steps) > 1:
        raise ICSUsageError(
            f"the ranks reached the monitor's exchange at different steps {steps}; every rank "
            "must count optimizer steps alike (attach() on every rank, or the same step "
            "indices to before_step/step())"
        )
    if any(s != OK for s in statuses):
        return Exchange(statuses)
    if len({int(row[3]) for row in table}) > 1:
        raise ICSValueError(
            f"step {step}: the ranks captured different layers, sample shapes or dtypes; build "
            "the monitor with the same arguments on every rank, with probe shards that "
            "differ only in their number of samples"
        )
    size = max(int(row[2]) for row in table)
    assert payload is not None
    if payload.numel() < size:
        payload = torch.cat([payload, payload.new_zeros(size - payload.numel())])
    measuring = ctx.rank == ctx.measuring_rank
    bufs = [torch.empty_like(payload) for _ in range(ctx.world_size)] if measuring else None
    dst = (
        ctx.measuring_rank
        if ctx.group is None
        else dist.get_global_rank(ctx.group, ctx.measuring_rank)
    )
    work = dist.gather(payload, bufs, dst=dst, group=ctx.group, async_op=True)
    _wait(work, ctx.timeout, f"step {step}: the monitor's gather of the probe shards")
    del payload
    if not measuring:
        return Exchange(statuses)
    assert bufs is not None
    pieces = [_unpack(buf, layout) for buf in bufs]
    merged = []
    for j, (_, _, _, b, _) in enumerate(layout):
        merged.append(torch.cat([p[j] for p in pieces], dim=b).to(local))
    del pieces, bufs
    return Exchange(statuses, *_rebuild(before, after, segments, merged))


def _rebuild(before: Any, after: Any, segments: Sequence[Any], merged: list[torch.Tensor]):
    caps = {"before": before, "after": after}
    tensors: dict[str, dict[str, torch.Tensor]] = {"before": {}, "after": {}}
    xhats: dict[str, dict[str, torch.Tensor]] = {"before": {}, "after": {}}
    for (side, key, _, _), t in zip(segments, merged, strict=True):
        if key.endswith("\x00x_hat"):
            xhats[side][key.removesuffix("\x00x_hat")] = t
        else:
            tensors[side][key] = t
    out = []
    for side in ("before", "after"):
        cap = caps[side]
        info = {
            k: dataclasses.replace(cap.info[k], shape=tuple(tensors[side][k].shape))
            for k in cap.info
            if k in tensors[side]
        }
        norms = {k: dataclasses.replace(s, x_hat=xhats[side][k]) for k, s in cap.norms.items()}
        # other tensors than the local capture's: a cache of their own
        whole = {"tensors": tensors[side], "info": {**cap.info, **info}, "norms": norms}
        out.append(dataclasses.replace(cap, **whole, cache={}))
    return out[0], out[1]
