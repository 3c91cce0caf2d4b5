r"""Random-projection sketches of wide layer outputs: keep n x k numbers instead of n x d.

A layer with d = 64 x 32 x 32 = 65536 outputs per probe input costs n d numbers per
capture. :class:`Sketch` maps every flattened output ``z`` in R^d to ``P z`` in R^k
with a fixed random matrix ``P`` (k x d), inside the capture hook, so only n x k numbers
are ever stored (``ICSMonitor(sketch=k)``).

The map is a *subsampled randomized Hadamard transform* (SRHT)::

    P = S H D E / sqrt(d')

- ``E`` pads ``z`` with zeros to ``d'``, the smallest power of two >= d;
- ``D`` multiplies each coordinate by an independent random sign;
- ``H`` is the d' x d' Sylvester-Hadamard matrix (entries +-1; ``H / sqrt(d')`` is
  orthogonal), applied in O(d' log d') operations per row, never stored (for k <= 256
  on rows of d' >= 2^14 only the k kept coordinates of ``H D E z`` are computed, in one
  pass over the row: O(k d') operations as matrix products, faster on a CPU, see
  ``benchmarks/sketch_speed.py``; not measured on a GPU);
- ``S`` keeps k of the d' coordinates, chosen uniformly without replacement.

What follows from this construction (proofs in ``docs/theory.md``, section 9):

- **Contraction.** ``||P z|| <= ||z||`` for every z (``H D / sqrt(d')`` is orthogonal,
  ``S`` and ``E`` do not increase norms; when d is a power of two, P has orthonormal
  rows, ``P P^T = I``). A 1-Lipschitz map cannot increase W1, so
  ``W1(P X, P Y) <= W1(X, Y)``: every lower bound computed on the sketch (L1, L2, L3,
  sliced, max_sliced) and the exact W1 of the sketch itself are lower bounds of the
  true W1 -- exactly, for every draw, not only with high probability.
- **Upper bounds do not survive.** ``paired``, U1 and U2 computed on the sketch bound
  the sketch's W1, not the true one (they shrink by about sqrt(k / d')).
- **Johnson-Lindenstrauss scaling.** ``E ||P z||^2 = (k / d') ||z||^2``, so
  :attr:`Sketch.scale` ``= sqrt(d' / k)`` makes squared norms unbiased, and with high
  probability every one of the 2n (n)-pairwise distances among the before/after
  outputs is kept within a factor (1 +- eps). Then every coupling's cost, hence W1,
  is kept within (1 +- eps) too: ``scale * W1(P X, P Y)`` estimates W1 with relative
  error eps, of order sqrt(log(n) / k) (up to log(d) factors in the SRHT's worst
  case). Measured: see ``tests/test_sketch.py`` and ``docs/theory.md``, section 9.

The matrix is a function of ``(d, k, seed, device type)`` only: signs and kept
coordinates are drawn from a private ``torch.Generator`` on the samples' device seeded
with ``seed`` (the global RNGs are not touched), and drawn again at each call instead of
being stored, so a sketch holds no d-sized state and the memory a monitor keeps per
layer does not grow with d.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Collection

import torch

from ics_toolkit import _checks
from ics_toolkit._arrays import ArrayLike, as_samples
from ics_toolkit.errors import ICSTypeError, ICSValueError

__all__ = [
    "CHUNK_COPIES",
    "CHUNK_ELEMENTS",
    "Sketch",
    "SketchTransform",
    "chunk_bytes",
    "jl_epsilon",
    "jl_scale",
    "layer_seed",
    "no_autocast",
    "padded_dim",
]

#: Rows are transformed in chunks of at most this many padded elements (at least one
#: row per chunk), per device type (``"default"`` for the others), so the transient
#: memory of a sketch is bounded whatever n: about :data:`CHUNK_COPIES` chunks. 16 MiB
#: float32 chunks (2^22 values) were the fastest on 2 CPU cores with torch 2.13 (one row
#: per chunk made the Kronecker factors' batched matmuls tiny): against 2^18, 4.5x for
#: n = 256, d = 65536; 2.5x for n = 64, d = 802,816 (ResNet-50's widest layers); 7x for
#: d = 200,704; the sketch is the same to the bit (rows are transformed independently).
CHUNK_ELEMENTS: dict[str, int] = {"cpu": 1 << 22, "default": 1 << 22}
#: Chunk-sized buffers alive at once while a chunk is transformed (the signed, padded
#: copy and the input and output of one Kronecker factor's matmul).
CHUNK_COPIES = 3


def chunk_bytes(n: int, d: int, device: str | torch.device = "cpu", itemsize: int = 4) -> int:
    """Transient bytes of sketching n rows of width d.

    :data:`CHUNK_COPIES` chunks, plus the random draws (an int64 permutation of d'
    and d signs, then the signs in the compute dtype) and, where only the kept
    coordinates are computed, the rows of the first Hadamard factor (at most
    :data:`KEPT_MAX_K` x 8 :data:`KEPT_MAX_K` values), all freed when the hook returns.

    Examples
    --------
    >>> chunk_bytes(256, 65536)  # 64 rows of 65536 float32 values per chunk, 3 chunks
    53280768
    """
    dp = padded_dim(d)
    budget = CHUNK_ELEMENTS.get(torch.device(device).type, CHUNK_ELEMENTS["default"])
    rows = min(n, max(1, budget // dp))
    kept = 0
    if dp >= 1 << KEPT_MIN_BITS:
        kept = KEPT_MAX_K * (1 << ((KEPT_MAX_K - 1).bit_length() + _KEPT_EXTRA_BITS)) * itemsize
    return CHUNK_COPIES * rows * dp * itemsize + 8 * dp + (1 + itemsize) * d + kept


# Largest Hadamard factor (as a power of two) of the Kronecker-product transform:
# H_{2^m} = H_{2^{b1}} (x) H_{2^{b2}} (x) ..., each factor a small dense matmul. 2^4 was
# the fastest on 2 CPU cores (n = 64..256, d' = 2^12..2^20); wider factors suit GPUs.
_FACTOR_BITS = {"cpu": 4}
_FACTOR_BITS_DEFAULT = 6


def padded_dim(d: int) -> int:
    """The smallest power of two >= ``d`` (the length the Hadamard transform works on).

    Examples
    --------
    >>> padded_dim(3072), padded_dim(4096)
    (4096, 4096)
    """
    d = _checks.positive_int(d, "d")
    return 1 << (d - 1).bit_length()


def jl_scale(d: int, k: int) -> float:
    """``sqrt(d' / k)``: the factor making ``scale * ||P z||`` an estimate of ``||z||``.

    ``d'`` is :func:`padded_dim` of ``d``. ``E ||scale * P z||^2 = ||z||^2`` exactly.

    Examples
    --------
    >>> jl_scale(4096, 256)
    4.0
    """
    return math.sqrt(padded_dim(d) / k)


def jl_epsilon(n: int, k: int) -> float:
    """``sqrt(ln(2n) / k)``: the scale of the relative error of the rescaled sketch W1.

    The Johnson-Lindenstrauss lemma keeps all pairwise distances among the 2n points
    (n before, n after the step) within (1 +- eps) with eps of this order (up to a
    constant, and up to log(d) factors in the SRHT's worst case). Measured on the cases of
    ``tests/test_sketch.py`` (noise-like, low-rank and sparse samples, n = 48): the
    worst relative error of ``scale * W1(P X, P Y)`` over 12 draws stayed below it, and
    its root mean square fell like 1 / sqrt(k), between 0.05 and 1 times ``1/sqrt(k)``.

    Examples
    --------
    >>> round(jl_epsilon(256, 256), 3)
    0.156
    """
    return math.sqrt(math.log(2 * n) / k)


def layer_seed(seed: int, key: str) -> int:
    """A per-layer seed: ``seed`` mixed with a stable hash (CRC-32) of the capture ``key``.

    Stable across processes and runs (unlike Python's salted ``hash``), so every rank
    of a distributed job draws the same matrix for the same layer.

    Examples
    --------
    >>> layer_seed(0, "conv1") == layer_seed(0, "conv1") != layer_seed(0, "conv2")
    True
    """
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (1 << 62)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """A context with autocast disabled on ``device``'s type (a no-op where unsupported)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # pragma: no cover - a device type without autocast
        return contextlib.nullcontext()


def _hadamard(bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 2^bits x 2^bits Sylvester-Hadamard matrix (entries +-1)."""
    return _hadamard_rows(torch.arange(1 << bits, device=device), bits, dtype)


def _transform(z: torch.Tensor) -> torch.Tensor:
    """Unnormalized Sylvester-Hadamard transform ``z @ H`` of every row (d' a power of 2)."""
    r, dp = z.shape
    m = dp.bit_length() - 1
    most = _FACTOR_BITS.get(z.device.type, _FACTOR_BITS_DEFAULT)
    pre, x = 1, z
    while m > 0:
        b = min(most, m)
        a = 1 << b
        post = dp // (pre * a)
        x = torch.matmul(_hadamard(b, z.dtype, z.device), x.reshape(r * pre, a, post))
        pre, m = pre * a, m - b
    return x.reshape(r, dp)


#: Sketches of at most this many coordinates, of rows at least 2^14 wide (padded), compute
#: only their k kept coordinates of ``H D z`` (:class:`_KeptCoordinates`): on 2 CPU cores
#: (torch 2.13, float32) 1.4x to 6.4x faster than the whole transform for k = 64..256,
#: d = 32768..802816 (``python benchmarks/sketch_speed.py``); for k = 1024 the whole
#: transform is 1.4x to 7x faster, and for rows of 8192 both take the same time.
KEPT_MAX_K = 256
KEPT_MIN_BITS = 14
#: The first factor is 2^3 = 8 times wider than the largest k it serves.
_KEPT_EXTRA_BITS = 3


def _hadamard_rows(rows: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``rows`` of the 2^bits x 2^bits Sylvester-Hadamard matrix, shape (len(rows), 2^bits).

    Entry (i, j) is (-1)^popcount(i & j); built one bit at a time (a Kronecker product
    of 2-vectors), never the whole matrix: each step appends the columns whose next
    higher bit is 1, so bit b of i pairs with bit b of j.
    """
    h = torch.ones(rows.numel(), 1, dtype=dtype, device=rows.device)
    for bit in range(bits):
        sign = 1 - 2 * ((rows >> bit) & 1).to(dtype)  # the row's bit: +1 or -1
        h = torch.cat((h, h * sign[:, None]), 1)
    return h


class _KeptCoordinates:
    """Only the k kept coordinates of ``H z / sqrt(d')``, in one pass over the rows.

    With d' = a1 a2 (the index's high b1 bits and low b2 bits), ``H_{d'} = H_{a1} (x)
    H_{a2}``, so coordinate (i1, i2) of ``H z`` is ``(H_{a1} Z H_{a2})[i1, i2]`` for Z
    the row reshaped to (a1, a2). Only the rows i1 of ``H_{a1}`` that a kept
    coordinate needs are applied (at most k of a1 = 8k), which reads the row once and
    leaves a1 / k times fewer numbers for the ``H_{a2}`` transform; the whole
    transform instead passes over all d' numbers once per Kronecker factor. The same
    map (same signs, same kept coordinates), rounded differently: within a few
    float32 (or float64) units of the whole transform.
    """

    def __init__(self, h1: torch.Tensor, which: torch.Tensor, low: torch.Tensor, a2: int):
        self.h1, self.which, self.low, self.a2 = h1, which, low, a2

    @classmethod
    def plan(cls, dp: int, rows: torch.Tensor, dtype: torch.dtype) -> _KeptCoordinates | None:
        """The factors for kept coordinates ``rows`` of width ``dp``; None: transform all."""
        bits, k = dp.bit_length() - 1, rows.numel()
        if k > KEPT_MAX_K or bits < KEPT_MIN_BITS:
            return None
        b1 = min(bits, (k - 1).bit_length() + _KEPT_EXTRA_BITS)
        b2 = bits - b1
        high, which = torch.unique(rows >> b2, return_inverse=True)
        h1 = _hadamard_rows(high, b1, dtype).mul_(1.0 / math.sqrt(dp))
        return cls(h1, which, rows & ((1 << b2) - 1), 1 << b2)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        r = z.shape[0]
        w = torch.matmul(self.h1, z.reshape(r, -1, self.a2))  # (r, distinct high parts, a2)
        if self.a2 > 1:
            w = _transform(w.reshape(-1, self.a2)).reshape(r, -1, self.a2)
        return w[:, self.which, self.low]


class Sketch:
    r"""A fixed random contraction ``R^d -> R^k`` (subsampled randomized Hadamard transform).

    ``P = S H D E / sqrt(d')`` (see the module docs): ``||P z|| <= ||z||`` for every z, so
    the exact W1 and every lower bound of the sketch are lower bounds of the true W1;
    ``scale * P`` with ``scale = sqrt(d' / k)`` preserves distances within (1 +- eps),
    eps ~ sqrt(log n / k), with high probability.

    Parameters
    ----------
    d : int
        Input dimension (the flattened layer width).
    k : int
        Sketch dimension, 1 <= k <= d' (``padded_dim(d)``).
    seed : int
        Seed of the private generator that draws the signs and the kept coordinates.
        The matrix depends only on ``(d, k, seed)`` and the device type of the samples.

    Attributes
    ----------
    d, k, seed : int
        As given.
    d_padded : int
        ``d'``, the power of two the transform works on.
    scale : float
        ``sqrt(d' / k)``, the Johnson-Lindenstrauss rescaling.

    Examples
    --------
    >>> import torch
    >>> from ics_toolkit.sketch import Sketch
    >>> sk = Sketch(1000, 64, seed=3)
    >>> x = torch.randn(5, 1000, dtype=torch.float64)
    >>> y = sk(x)
    >>> y.shape, sk.d_padded
    (torch.Size([5, 64]), 1024)
    >>> bool((y.norm(dim=1) <= x.norm(dim=1)).all())   # a contraction
    True
    >>> torch.allclose(y, x @ sk.matrix(dtype=torch.float64).T)
    True
    """

    def __init__(self, d: int, k: int, *, seed: int = 0) -> None:
        self.d_padded = padded_dim(d)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.d_padded:
            raise ICSValueError(
                f"`k` must be an int in 1..{self.d_padded} (the padded width of d={d}), got {k!r}"
            )
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ICSTypeError(f"`seed` must be an int, got {type(seed).__name__}")
        self.d, self.k, self.seed = d, k, seed
        self.scale = math.sqrt(self.d_padded / k)

    def __repr__(self) -> str:
        return f"Sketch(d={self.d}, k={self.k}, seed={self.seed})"

    def _draw(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed)
        signs = torch.randint(0, 2, (self.d,), generator=gen, device=device, dtype=torch.int8)
        rows = torch.randperm(self.d_padded, generator=gen, device=device)[: self.k]
        return signs, rows

    def signs(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The diagonal of ``D``: shape (d,), values +-1 (int64), as drawn on ``device``."""
        return self._draw(torch.device(device))[0].long() * 2 - 1

    def rows(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The coordinates ``S`` keeps: shape (k,), distinct indices in ``0..d'-1``."""
        return self._draw(torch.device(device))[1]

    def matrix(
        self, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The dense matrix ``P``, shape (k, d): O(k d) memory, for checks and small d."""
        eye = torch.eye(self.d, dtype=dtype, device=torch.device(device))
        return self(eye).T.contiguous()

    def __call__(self, x: ArrayLike) -> torch.Tensor:
        """Sketch every row: ``x`` of shape (n, d) -> ``x @ P^T`` of shape (n, k).

        Computed on ``x``'s device, in float64 for float64 input and float32 otherwise
        (half-precision input is upcast first); the result has that dtype.
        """
        t = as_samples(x, "x", dtype=None, check_finite=False, min_samples=1)
        if t.shape[1] != self.d:
            raise ICSValueError(
                f"`x` has rows of width {t.shape[1]}, but this sketch maps R^{self.d}; "
                "build a Sketch for this width"
            )
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        # autocast would run the Hadamard matmuls in bfloat16 / float16: keep them exact
        with torch.no_grad(), no_autocast(t.device):
            bits, rows = self._draw(t.device)
            signs = bits.to(dtype).mul_(2).sub_(1)
            kept = _KeptCoordinates.plan(self.d_padded, rows, dtype)
            n = t.shape[0]
            out = torch.empty(n, self.k, dtype=dtype, device=t.device)
            budget = CHUNK_ELEMENTS.get(t.device.type, CHUNK_ELEMENTS["default"])
            step = max(1, budget // self.d_padded)
            norm = 1.0 / math.sqrt(self.d_padded)
            # one padded buffer for every chunk: its zero tail (E) is written once
            buf = torch.zeros(min(step, n), self.d_padded, dtype=dtype, device=t.device)
            for start in range(0, n, step):
                z = buf[: min(step, n - start)]
                torch.mul(t[start : start + step], signs, out=z[:, : self.d])
                if kept is None:
                    out[start : start + step] = _transform(z)[:, rows] * norm
                else:
                    out[start : start + step] = kept(z)
        return out


def _layer_name(key: str) -> str:
    """The layer name of a capture key ``name[#call][:input]``."""
    name = key.removesuffix(":input")
    head, sep, tail = name.rpartition("#")
    return head if sep and tail.isdigit() else name


class SketchTransform:
    """A :class:`~ics_toolkit.Recorder` ``transform`` storing a sketch of each capture.

    Inside the hook, each captured tensor is flattened to (n, d) (one row per probe
    input, as the ``flatten`` view does) and, when d > k, replaced by its
    :class:`Sketch` (n, k) with the per-layer seed :func:`layer_seed` ``(seed, key)``:
    the same matrix at every capture of the layer, on every rank. Captures with
    d <= k are stored unchanged (nothing to save; every quantity stays exact).

    Parameters
    ----------
    k : int
        Sketch dimension.
    seed : int
        Base seed of the per-layer matrices.
    batch_axes : mapping of str to int, optional
        Batch axis of each layer's tensor, by layer name (default 0).
    layers : collection of str, optional
        Sketch only these layers (by name; the others are stored unchanged); default
        every layer. A memory plan sketches only the widest layers.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from ics_toolkit import capture
    >>> from ics_toolkit.sketch import SketchTransform
    >>> model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8))
    >>> out = capture(model, torch.randn(4, 1, 6, 6), transform=SketchTransform(16, seed=0))
    >>> tuple(out["1"].shape)   # 4 probe inputs of width 8 * 6 * 6 = 288, sketched to 16
    (4, 16)
    """

    def __init__(
        self,
        k: int,
        seed: int = 0,
        batch_axes: dict[str, int] | None = None,
        layers: Collection[str] | None = None,
    ) -> None:
        k = _checks.positive_int(k, "`sketch` (k)")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ICSTypeError(f"`seed` must be an int, got {type(seed).__name__}")
        self.k, self.seed = k, seed
        self.batch_axes = dict(batch_axes or {})
        self.layers = None if layers is None else frozenset(layers)

    def __repr__(self) -> str:
        return f"SketchTransform(k={self.k}, seed={self.seed})"

    def __call__(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """The (n, k) sketch of capture ``t`` of layer ``key`` (``t`` itself when d <= k)."""
        from ics_toolkit.views import flatten

        name = _layer_name(key)
        if self.layers is not None and name not in self.layers:
            return t
        axis = self.batch_axes.get(name, 0) % max(t.ndim, 1)
        flat = flatten(t, axis)
        if flat.shape[1] <= self.k:
            return t
        return Sketch(int(flat.shape[1]), self.k, seed=layer_seed(self.seed, key))(flat)
