"""Scale: memory per layer (predicted vs held), half precision, autocast, device placement."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from torch import nn

import ics_toolkit as ics
from ics_toolkit import shift
from ics_toolkit.monitor import WORKING_COPIES
from ics_toolkit.sketch import CHUNK_COPIES, CHUNK_ELEMENTS
from ics_toolkit.views import flatten


class Shared(nn.Module):
    """A CNN whose LayerNorm block runs twice (keys ``ln`` and ``ln#2``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 5 * 5, 20)
        self.ln = nn.LayerNorm(20)
        self.head = nn.Linear(20, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        h = self.ln(self.fc(h))
        return self.head(self.ln(h))


def probe(n=24, seed=3):
    return torch.randn(n, 2, 5, 5, generator=torch.Generator().manual_seed(seed))


def held(capture: shift.StepCapture) -> dict[str, int]:
    """Bytes actually held per key by one capture: the tensor and its normalized values."""
    out = {}
    for key, t in capture.tensors.items():
        snap = capture.norms.get(key)
        out[key] = t.nbytes + (snap.x_hat.nbytes if snap is not None else 0)
    return out


def train(model, monitors, steps=3, autocast=False):
    g = torch.Generator().manual_seed(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for m in monitors:
        m.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:  # the optimizer step (and so the monitor's passes) inside autocast too
            model(torch.randn(16, 2, 5, 5, generator=g)).float().square().mean().backward()
            opt.step()


# ------------------------------------------------------------------ memory


@pytest.mark.parametrize(
    ("sketch", "dtype", "views"),
    [
        (None, torch.float32, ("flatten", "pixel", "channel")),
        (None, torch.bfloat16, ("flatten",)),
        (8, torch.float16, ("flatten",)),
    ],
)
def test_memory_per_layer_predicts_what_a_capture_holds(sketch, dtype, views):
    model = Shared()
    mon = ics.ICSMonitor(
        model,
        probe(),
        layers="all",
        where="both",
        sketch=sketch,
        capture_dtype=dtype,
        views=views,
        max_pixel_samples=40,
    )
    table = mon.memory_per_layer().set_index("layer")
    actual = held(mon._capture())
    assert set(table.index) == set(actual)
    assert "ln#2" in actual and "ln#2:input" in actual  # the second call counts too
    for key, nbytes in actual.items():
        assert table.loc[key, "bytes_per_capture"] == nbytes, key
        assert table.loc[key, "bytes_held"] == 2 * (nbytes + table.loc[key, "bytes_cache"])
        assert table.loc[key, "dtype"] == str(dtype).removeprefix("torch.")
    # closed forms, independent of the code: 24 probe inputs
    size = torch.empty((), dtype=dtype).element_size()
    conv = table.loc["conv"]
    if sketch is None:
        assert conv.bytes_per_capture == 24 * 6 * 5 * 5 * size
        # BatchNorm2d: its output plus its normalized values (input shape), both stored
        assert table.loc["bn", "bytes_per_capture"] == 2 * 24 * 6 * 5 * 5 * size
        if "pixel" in views:  # flatten (24 x 150) + pixel (40 x 6) + channel (600 x 6), x2, f64
            assert conv.bytes_analysis == 2 * 8 * (24 * 150 + 40 * 6 + 600 * 6)
    else:
        assert conv.bytes_per_capture == 24 * sketch * size and conv.sketch == sketch
        assert table.loc["bn", "bytes_per_capture"] == 24 * sketch * size  # no U3 values
        assert table.loc["head", "bytes_per_capture"] == 24 * 3 * size  # 3 <= k: as is
        assert pd_isna(table.loc["head", "sketch"])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"precision": "float64", "views": ("flatten", "pixel", "channel")},
        {"sketch": 8, "methods": ("exact", "sliced")},
        {"moments": False, "methods": ("exact",)},
    ],
)
def test_memory_per_layer_predicts_the_numbers_kept_with_a_capture(options):
    # what the analysis computed from the capture after a step, kept for the next step
    model = Shared()
    mon = ics.ICSMonitor(model, probe(), layers="all", every=1, max_pixel_samples=40, **options)
    table = mon.memory_per_layer().set_index("layer")
    train(model, [mon], steps=1)
    carried = mon._carry[1]
    kept: dict[str, int] = {}
    for ids, value in carried.cache.items():
        parts = value if isinstance(value, tuple) else (value,)
        nbytes = sum(t.nbytes for t in parts if isinstance(t, torch.Tensor))
        kept[ids[0]] = kept.get(ids[0], 0) + nbytes
    assert kept == table.bytes_cache.to_dict() and sum(kept.values()) > 0
    mon.detach()


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_with_a_sketch_memory_per_layer_does_not_grow_with_the_width():
    n, k = 16, 32
    per_capture, peaks = {}, {}
    for d in (256, 4096, 65536):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, d), nn.LayerNorm(d))
        x = torch.randn(n, 4)
        plain = ics.ICSMonitor(model, x).memory_per_layer().set_index("layer").loc["1"]
        sk = ics.ICSMonitor(model, x, sketch=k).memory_per_layer().set_index("layer").loc["1"]
        assert plain.bytes_per_capture == n * d * 4
        per_capture[d] = (sk.bytes_per_capture, sk.bytes_held, sk.bytes_analysis)
        peaks[d] = sk.bytes_peak
    assert len(set(per_capture.values())) == 1
    view = n * k * 8  # one float64 sample matrix of the sketch
    # kept with each capture: row norms and 128 sorted projections of the n rows (a
    # sketch has no moment drift), float32
    cache = (n + 128 * n) * 4
    assert per_capture[256] == (n * k * 4, 2 * (n * k * 4 + cache), 2 * view)
    # the peak adds transient working memory: the estimators' copies, or the hook's
    # chunks (bounded whatever d) and random draws (13 bytes per coordinate: an int64
    # permutation, int8 signs, float32 signs), far below the 4 n bytes per coordinate
    # of a capture
    chunks = CHUNK_COPIES * CHUNK_ELEMENTS["cpu"] * 4
    for d, p in peaks.items():
        assert p <= 2 * n * k * 4 + 2 * view + max(WORKING_COPIES * view, chunks + 13 * d)


# ------------------------------------------------------------------ precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage_works_end_to_end(dtype):
    model = Shared()
    x = probe(48)
    ref = ics.ICSMonitor(model, x, every=1, layers=["bn", "ln"])
    half = ics.ICSMonitor(model, x, every=1, layers=["bn", "ln"], capture_dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ics.ICSWarning)  # a violated bound would raise
        train(model, [ref, half])
    cap = half._capture()
    assert {t.dtype for t in cap.tensors.values()} == {dtype}
    assert cap.norms["bn"].x_hat.dtype == dtype
    a = ics.to_wide(ref.results().query("kind != 'event'")).set_index(["step", "layer", "view"])
    b = ics.to_wide(half.results().query("kind != 'event'")).set_index(["step", "layer", "view"])
    assert half.results().query("kind != 'event'").bounds_hold.all()
    rel = 1e-2 if dtype == torch.float16 else 3e-2  # storage rounding: 2^-11, 2^-8
    for q in ("exact", "U1", "U3", "L1"):
        pairs = a[q].dropna()
        torch.testing.assert_close(
            torch.tensor(b.loc[pairs.index, q].values),
            torch.tensor(pairs.values),
            rtol=rel,
            atol=1e-4,
        )


def test_capture_under_autocast_is_stored_as_asked_and_analysed_in_float64():
    model = Shared()
    x = probe(32)
    mon = ics.ICSMonitor(
        model,
        x,
        every=1,
        layers=["fc", "bn", "ln"],
        methods=("exact",),
        reuse_probe=False,
        precision="float64",
    )
    seen = []
    capture = mon._capture

    def spy():
        out = capture()
        seen.append(out)
        return out

    mon._capture = spy
    with warnings.catch_warnings():
        warnings.simplefilter("error", ics.ICSWarning)
        train(model, [mon], steps=2, autocast=True)
    info = seen[0].info
    assert info["fc"].source_dtype == torch.bfloat16  # autocast ran the layer in bf16
    assert all(t.dtype == torch.float32 for t in seen[0].tensors.values())
    df = mon.results().query("kind != 'event'")
    assert df.bounds_hold.all() and df.value.notna().all()
    # the reported exact W1 is the float64 W1 of the stored captures (POT, outside autocast)
    import numpy as np
    import ot

    for i, step in enumerate((0, 1)):
        before, after = seen[2 * i], seen[2 * i + 1]
        for key in ("fc", "bn", "ln"):
            xs = flatten(before.tensors[key]).double().numpy()
            ys = flatten(after.tensors[key]).double().numpy()
            w = np.full(len(xs), 1 / len(xs))
            ref = ot.emd2(w, w, ot.dist(xs, ys, metric="euclidean"))
            got = df[(df.step == step) & (df.layer == key) & (df.quantity == "exact")].value
            assert got.item() == pytest.approx(ref, rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------ device placement


@contextlib.contextmanager
def host_transfers(record: list[tuple[str, tuple[int, ...]]]):
    """Record every move of a tensor to the host: ``cpu()``, ``to("cpu")``, and ``to(d)``
    with a CPU device ``d`` from a tensor on another device.

    On a CPU-only machine this catches the code that names the host explicitly (a
    literal "cpu" or ``.cpu()``), while ``.to(other.device)`` (device-generic) passes;
    on a GPU it catches every real transfer. (``numpy()`` works on host tensors only,
    so a device tensor reaches numpy through one of these.)
    """
    originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "to")}

    def cpu(self, *args, **kwargs):
        record.append(("cpu", tuple(self.shape)))
        return originals["cpu"](self, *args, **kwargs)

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, str | torch.device) and torch.device(target).type == "cpu":
            if isinstance(target, str) or self.device.type != "cpu":
                record.append(("to", tuple(self.shape)))
        return originals["to"](self, *args, **kwargs)

    torch.Tensor.cpu, torch.Tensor.to = cpu, to
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def check_placement(device: str) -> None:
    model = Shared().to(device)
    n = 32
    x = probe(n).to(device)
    mon = ics.ICSMonitor(
        model,
        x,
        every=1,
        layers=["conv", "bn"],  # 150 wide: a sample matrix dwarfs any result vector
        views=("flatten", "pixel", "channel"),
        methods=("exact", "paired", "sliced", "max_sliced"),
        max_pixel_samples=100,
    )
    before, after = mon._capture(), mon._capture()
    assert {t.device.type for t in before.tensors.values()} == {torch.device(device).type}
    assert {s.x_hat.device.type for s in before.norms.values()} == {torch.device(device).type}
    record: list[tuple[str, tuple[int, ...]]] = []
    with host_transfers(record):
        rows = shift.measure_step(0, before, after, mon.config)
    assert rows and all(math.isfinite(r["value"]) for r in rows if r["kind"] != "event")
    # the only sample-sized arrays reaching the host are exact's cost matrices, m x m
    # for the m rows of a view (flatten: n, pixel: 100) or half of them (its floor);
    # the rest are result vectors (per direction, per channel), far smaller than one
    # sample matrix
    costs = {(m, m) for m in (n, n // 2, 100, 50)}
    smallest_matrix = min(flatten(t).numel() for t in before.tensors.values())
    for how, shape in record:
        if shape not in costs:
            assert math.prod(shape) < smallest_matrix / 2, (how, shape)
    assert any(shape == (n, n) for _, shape in record)  # exact did go to POT on the CPU


def test_everything_but_the_exact_solver_stays_on_the_captures_device():
    check_placement("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_captures_and_estimators_stay_on_the_gpu():
    check_placement("cuda")
    model = Shared().cuda()
    mon = ics.ICSMonitor(model, probe().cuda(), every=1, sketch=16)
    assert mon.memory_per_layer().device.unique().tolist() == ["cuda:0"]
    train_cuda(model, mon)
    assert mon.results().query("kind != 'event'").bounds_hold.all()


def train_cuda(model, monitor):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.attach(opt)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(16, 2, 5, 5, device="cuda")).square().mean().backward()
        opt.step()
