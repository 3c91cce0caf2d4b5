"""The two experiments of the toolkit, as functions the command line and notebooks call.

- :func:`run_main`: train a reference model once per normalization variant
  (BatchNorm, Unitization, none, ...) from the same initial weights, measure the
  internal covariate shift of every normalization position with
  :class:`~ics_toolkit.ICSMonitor`, evaluate the theory's bounds, and write the
  results table, ``summary.md`` and the plots (``ics-toolkit run``).
- :func:`sweep_dim`: the dimension and noise experiment of the theory (docs/theory.md
  sections 3 and 8): BatchNorm-normalized versus unitized outputs of widths 4..4096
  under a fixed update with rising noise; BatchNorm's W1 and bound U3 grow like
  ``sqrt(d)``, the unitized bound U4 does not (``ics-toolkit sweep-dim``).

:func:`draw_results` and :func:`draw_sweep` (re-)draw every figure from saved tables
(``ics-toolkit plot``). Everything is seeded through explicit generators; the global
random state is left as it was.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ics_toolkit import _checks
from ics_toolkit._io import atomic_write, stale_temporaries
from ics_toolkit._vocab import DEFAULT_METHODS, quantity_kind, relative_name
from ics_toolkit.errors import ICSValueError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ics_toolkit.data.base import Dataset

__all__ = [
    "DEFAULT_NORMS",
    "MODELS",
    "SWEEP_COLUMNS",
    "ExperimentResult",
    "build_model",
    "draw_results",
    "draw_sweep",
    "parse_methods",
    "parse_norms",
    "run_main",
    "sweep_dim",
]

#: Normalization variants of the main experiment, in order: BatchNorm, the authors'
#: Unitization as they start it (alpha = 0, where it is BatchNorm), Unitization with
#: alpha = 1 (pure unitized outputs) and no normalization.
DEFAULT_NORMS: tuple[str, ...] = ("batch", "unitization", "unitization=1", "none")
#: Variants of the batch-size (noise) sweep of the main experiment.
SWEEP_NORMS: tuple[str, ...] = ("batch", "unitization=1")
#: Reference models :func:`run_main` can train.
MODELS: tuple[str, ...] = ("cnn", "mlp", "resnet20")

#: Columns of the dimension-sweep table (``sweep.csv``).
SWEEP_COLUMNS: dict[str, str] = {
    "variant": "'batch' (BatchNorm-normalized, train-mode statistics) or 'unitization' "
    "(the same values divided by their norm: x_hat / sqrt(||x_hat||^2 + eps), k = 1)",
    "dim": "width d of the layer",
    "noise": "std of the noise added to the update, relative to each coordinate's scale",
    "n_samples": "probe inputs n (rows of each sample)",
    "seed": "seed of the generator that drew the activations, update and noise",
    "quantity": "exact (W1), L1..L3 (lower bounds), U1, U2, U3 (BatchNorm), U3_tight "
    "(BatchNorm, measured second moments), U4 (unitized), "
    "rho (BatchNorm: mean <x_hat_i, y_hat_i> / d')",
    "kind": "estimate | lower | upper | stat",
    "value": "the number (W1 and bounds in the unit of the normalized outputs)",
    "bounds_hold": "every lower bound <= exact <= every upper bound (ics_toolkit.bounding.RTOL)",
}

_MAIN_DEFAULTS = {
    # full run / quick run
    "steps": (200, 16),
    "every": (20, 4),
    "probe_size": (128, 48),
    "batch_size": (128, 64),
    "n_projections": (64, 16),
    # CNN channels of the main job's first stage (24 runs must fit ~2 minutes on 2 cores)
    "cnn_width": (16, 8),
    "seeds": (3, 2),
    "sweep_batch_sizes": ((8, 32), (16,)),
}
_WIDTH = {"cnn": (32, 8), "resnet20": (16, 8)}
_HIDDEN = ((256, 256, 256), (32, 32))
_QUICK_SUBSET = (1024, 512)  # training / test samples kept by quick=True


@dataclass
class ExperimentResult:
    """What :func:`run_main` and :func:`sweep_dim` return.

    Attributes
    ----------
    out_dir : Path
        The output folder.
    table : pandas.DataFrame
        The results table written (``results.csv`` or ``sweep.csv``).
    files : list of Path
        Every file written, tables first, then the summary, then the plots.
    summary : str
        The markdown summary written (``summary.md`` / ``sweep_summary.md``).
    accuracies : dict of str to float
        Final test accuracy per variant (NaN if training diverged; empty for the sweep).
    wall_time_s : float
        Seconds the experiment took.
    config : dict
        The resolved settings (also written to ``config.json``).
    """

    out_dir: Path
    table: pd.DataFrame
    files: list[Path] = field(default_factory=list)
    summary: str = ""
    accuracies: dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- options
class _UnitizationNorm:
    """``make_norm`` callable: Unitization with a given initial alpha (picklable)."""

    def __init__(self, alpha_init: float) -> None:
        self.alpha_init = alpha_init

    def __call__(self, num_features: int, dims: int) -> nn.Module:
        from ics_toolkit.nn import Unitization1d, Unitization2d, Unitization3d

        cls = {1: Unitization1d, 2: Unitization2d, 3: Unitization3d}[dims]
        return cls(num_features, alpha_init=self.alpha_init)


def _split(values: str | Sequence[str]) -> list[str]:
    if isinstance(values, str):
        return [v.strip() for v in values.split(",") if v.strip()]
    return [str(v).strip() for v in values]


def parse_norms(norms: str | Sequence[str], argument: str = "`norms`") -> list[tuple[str, Any]]:
    """Normalization variants as ``(name, make_norm spec)`` pairs.

    Parameters
    ----------
    norms : str or sequence of str
        Names (a comma-separated string or a sequence) from
        :data:`ics_toolkit.models.NORM_KINDS` (``batch``, ``unitization``, ``group``,
        ``layer``, ``none``), or ``unitization=A``: the Unitization layer with every
        alpha initialised to ``A`` (the authors start at 0, i.e. BatchNorm; 1 is a
        pure unitization).
    argument : str
        How error messages name the option.

    Returns
    -------
    list of (str, str or callable)
        The variant name (the ``run`` label) and what ``make_norm`` takes.

    Examples
    --------
    >>> [name for name, _ in parse_norms("batch, unitization=1,none")]
    ['batch', 'unitization=1', 'none']
    """
    from ics_toolkit.models import NORM_KINDS

    names = _split(norms)
    if not names:
        raise ICSValueError(f"{argument} is empty; name at least one of {', '.join(NORM_KINDS)}")
    out: list[tuple[str, Any]] = []
    for name in names:
        if name in NORM_KINDS:
            out.append((name, name))
            continue
        kind, _, value = name.partition("=")
        alpha = math.nan
        if kind == "unitization" and value:
            try:
                alpha = float(value)
            except ValueError:
                alpha = math.nan
        if not math.isfinite(alpha):
            raise ICSValueError(
                f"{argument}: unknown normalization {name!r}; choose from "
                f"{', '.join(NORM_KINDS)}, or unitization=ALPHA (initial alpha, e.g. "
                "unitization=1)"
            )
        out.append((name, _UnitizationNorm(alpha)))
    dup = sorted({n for n, _ in out if [m for m, _ in out].count(n) > 1})
    if dup:
        raise ICSValueError(f"{argument} names {dup} more than once; list each variant once")
    return out


def parse_methods(methods: str | Sequence[str], argument: str = "`methods`") -> tuple[str, ...]:
    """W1 estimators by name (comma-separated string or sequence), checked.

    Examples
    --------
    >>> parse_methods("exact,sliced")
    ('exact', 'sliced')
    """
    return _checks.methods(_split(methods), argument)


def _positive_int(value: Any, argument: str) -> int:
    return _checks.positive_int(value, argument)


def _device(device: str | torch.device, argument: str = "`device`") -> torch.device:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ICSValueError(f"{argument} {device!r} is not a torch device: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ICSValueError(
            f"{argument} {str(device)!r} asks for CUDA, but torch.cuda.is_available() is False "
            "(a CPU build of torch, or no GPU); use cpu"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ICSValueError(
            f"{argument} {str(device)!r} asks for Apple's MPS, but "
            "torch.backends.mps.is_available() is False on this machine; use cpu"
        )
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ICSValueError(f"{argument} {str(device)!r}: use cpu, cuda, cuda:N or mps")
    return dev


def _prepare_out(
    out_dir: str | os.PathLike[str], argument: str = "`out_dir`", create: bool = True
) -> Path:
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ICSValueError(
            f"{argument} {str(out)!r} is a file; pass a folder (it is created if missing)"
        )
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, text)


def _write_csv(path: Path, df: pd.DataFrame) -> Path:
    return atomic_write(path, df.to_csv(index=False))


def _seed(seed: Any, argument: str = "`seed`") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ICSValueError(f"{argument} must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


#: Files of ``ics-toolkit run`` in its output folder (figures: these stems, any format).
_RUN_FILES = ("config.json", "training.csv", "results.csv", "results.parquet", "summary.md")
_RUN_FIGURES = ("ics_vs_step", "heatmap", "bn_vs_unitization", "batch_sweep")
#: Files of ``ics-toolkit sweep-dim``.
_SWEEP_FILES = ("config.json", "sweep.csv", "sweep_summary.md")
_SWEEP_FIGURES = ("bounds_vs_dim",)


def _owned(name: str, files: Sequence[str], figures: Sequence[str]) -> bool:
    """Whether an experiment with these files and figure stems owns a file of this name."""
    stem, dot, suffix = name.rpartition(".")
    return name in files or (bool(dot) and stem in figures and suffix.isalnum())


def _claim_out(
    out: Path,
    files: Sequence[str],
    figures: Sequence[str],
    parts: bool,
    overwrite: bool,
) -> None:
    """Make ``out`` ready for a new run of an experiment: refuse or clear an earlier run.

    An earlier run is recognised by the files the experiment writes (``parts/`` with
    result parts for the main run). Without ``overwrite`` such a folder is refused;
    with it exactly those files are removed (other files in the folder are kept), so
    an earlier run's variants never mix into the new results. Temporary files of
    interrupted writes (``.NAME.tmp``) of owned names are removed in either case.
    """
    from ics_toolkit.results import _PART

    if not out.is_dir():
        return
    found = sorted(f for f in out.iterdir() if f.is_file() and _owned(f.name, files, figures))
    part_dir = out / "parts"
    old_parts = (
        sorted(f for f in part_dir.iterdir() if _PART.match(f.name))
        if parts and part_dir.is_dir()
        else []
    )
    if (found or old_parts) and not overwrite:
        names = [f.name for f in found] + (["parts/"] if old_parts else [])
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ICSValueError(
            f"the output folder {str(out)!r} holds an earlier run ({shown}); pass "
            "--overwrite (Python: overwrite=True) to replace it, or choose another folder"
        )
    stale = stale_temporaries(out, lambda n: _owned(n, files, figures))
    if parts:
        stale += stale_temporaries(part_dir, lambda n: _PART.match(n) is not None)
    for f in [*found, *old_parts, *stale]:
        f.unlink(missing_ok=True)


class _TrainingLog:
    """``training.csv`` written as training goes: one appended line per step.

    Each line is written by one ``write`` call on a file opened for appending, so a
    killed process leaves whole lines only (at most the line of the step in flight is
    missing); :meth:`close` rewrites the file atomically from the finished curves.
    """

    COLUMNS = ("run", "step", "loss", "accuracy", "lr")

    def __init__(self, path: Path) -> None:
        self.path = path
        atomic_write(path, ",".join(self.COLUMNS) + "\n")
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.run = ""
        self.steps = 0
        self._accuracy = math.nan
        self._optimizer: Any = None

    def start(self, run: str) -> None:
        self.run, self.steps, self._accuracy = run, 0, math.nan

    def loss(self, criterion: Any) -> Any:
        """Wrap ``criterion(logits, labels)`` to note the batch accuracy (no side effect)."""

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            self._accuracy = float((logits.detach().argmax(1) == labels).float().mean())
            return criterion(logits, labels)

        return loss_fn

    def optimizer(self, optimizer: Any) -> None:
        self._optimizer = optimizer

    def step(self, step: int, loss: float) -> None:
        lr = float(self._optimizer.param_groups[0]["lr"]) if self._optimizer else math.nan
        self._line(step, loss, self._accuracy, lr)

    def _line(self, step: int, loss: float, accuracy: float, lr: float) -> None:
        os.write(self._fd, f"{self.run},{step},{loss!r},{accuracy!r},{lr!r}\n".encode())
        self.steps = step + 1

    def finish(self, frame: pd.DataFrame) -> None:
        """Append the steps of a finished variant the hook did not see (a diverged step)."""
        for row in frame[frame["step"] >= self.steps].itertuples(index=False):
            self._line(int(row.step), float(row.loss), float(row.accuracy), float(row.lr))

    def close(self, frame: pd.DataFrame | None = None) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if frame is not None:
            _write_csv(self.path, frame[list(self.COLUMNS)])


def _have_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- models
def build_model(
    model: str,
    norm: Any,
    data: Dataset,
    *,
    width: int | None = None,
    seed: int = 0,
    quick: bool = False,
) -> nn.Module:
    """A reference model for ``data`` with the given normalization layers.

    Parameters
    ----------
    model : {"cnn", "mlp", "resnet20"}
        :class:`~ics_toolkit.models.SmallCNN` (six norm layers),
        :class:`~ics_toolkit.models.MLP` (three hidden layers) or a CIFAR ResNet-20
        (:func:`~ics_toolkit.models.cifar_resnet`, 19 norm layers). The CNN and the
        ResNet need image inputs (C, H, W).
    norm : str or callable
        What :func:`~ics_toolkit.models.make_norm` takes (see :func:`parse_norms`).
    data : Dataset
        Sets the input shape and the number of classes.
    width : int, optional
        Channels of the first stage (CNN: 32, ResNet: 16) or the width of each hidden
        layer (MLP: 256); ``quick`` defaults are smaller.
    seed : int
        Seed of the initial weights (the same for every variant).
    quick : bool
        Use the small default widths.

    Returns
    -------
    torch.nn.Module
    """
    from ics_toolkit.models import MLP, SmallCNN, cifar_resnet

    if model not in MODELS:
        raise ICSValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    shape = data.input_shape
    if model in ("cnn", "resnet20"):
        if len(shape) != 3 or min(shape[1:]) < 4:
            raise ICSValueError(
                f"model {model!r} needs image inputs (C, H, W) with H, W >= 4, but dataset "
                f"{data.name!r} has inputs of shape {shape}; use model 'mlp'"
            )
        w = width if width is not None else _WIDTH[model][int(quick)]
        w = _positive_int(w, "`width`")
        if model == "cnn":
            return SmallCNN(shape[0], data.num_classes, width=w, norm=norm, seed=seed)
        return cifar_resnet(
            20, data.num_classes, norm=norm, in_channels=shape[0], width=w, seed=seed
        )
    hidden = _HIDDEN[int(quick)] if width is None else (_positive_int(width, "`width`"),) * 3
    return MLP(data.in_features, data.num_classes, hidden=hidden, norm=norm, seed=seed)


def _norm_slots(model: str, data: Dataset, width: int | None, quick: bool) -> list[str]:
    """Names of the normalization positions: the BatchNorm layers of the BatchNorm build.

    Every variant is built from the same code with another ``make_norm`` spec, so its
    layer at each of these names is its normalization (``Identity`` for ``"none"``).
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    reference = build_model(model, "batch", data, width=width, seed=0, quick=quick)
    return [name for name, m in reference.named_modules() if isinstance(m, _BatchNorm)]


def _load_data(dataset: str, data_root: str | os.PathLike[str] | None, seed: int) -> Dataset:
    from ics_toolkit.data import DATASETS, load_dataset

    if dataset not in DATASETS:
        raise ICSValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if dataset in ("cifar10", "cifar100"):
        return load_dataset(dataset, root=data_root)
    return load_dataset(dataset, seed=seed)


# ---------------------------------------------------------------------- the main run
def run_main(
    out_dir: str | os.PathLike[str],
    *,
    model: str = "cnn",
    dataset: str = "digits",
    norms: str | Sequence[str] = DEFAULT_NORMS,
    steps: int | None = None,
    probe_size: int | None = None,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    every: int | str | None = None,
    views: str | Sequence[str] = ("flatten",),
    device: str = "cpu",
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    data_root: str | os.PathLike[str] | None = None,
    width: int | None = None,
    batch_size: int | None = None,
    lr: float = 0.05,
    n_projections: int | None = None,
    formats: Sequence[str] = ("png", "svg"),
    overwrite: bool = False,
    seeds: int | Sequence[int] | None = None,
    sweep_batch_sizes: Sequence[int] | None = None,
    sweep_norms: str | Sequence[str] | None = None,
) -> ExperimentResult:
    """Train each normalization variant over several seeds and batch sizes; test the claims.

    The runs (``config.json``'s ``design``): every variant of ``norms`` at
    ``batch_size`` for each of ``seeds`` seeds, and every variant of ``sweep_norms``
    at each of ``sweep_batch_sizes`` (the noise sweep: smaller batches are noisier
    steps) for the same seeds. A run is labelled by its variant, plus ``-b<batch>``
    off ``batch_size`` and ``-s<seed>`` off ``seed`` (``batch``, ``batch-b8``,
    ``unitization=1-s1``, ...). ``summary.md`` opens with a "Claims" section
    (:mod:`ics_toolkit.claims`: each claim of the paper, its statistic per seed, the
    interval over seeds and a verdict computed from the table), then the per-layer
    tables of the base runs (first seed, ``batch_size``).

    For each run the same architecture is built with the run's seed as the
    initial-weight seed (within a seed, only the normalization layers differ), trained
    with SGD (Nesterov momentum 0.9, weight decay 5e-4, learning rate divided by 10 at
    50 % and 75 % of the run) on the seed's batch order, and monitored by
    :class:`~ics_toolkit.ICSMonitor` at the normalization positions: the BatchNorm /
    Unitization layers, and for ``"none"`` the ``Identity`` placeholders at the same
    names, so layer names match across variants. Each measured step t gives the W1
    estimators between the layer's outputs on a fixed probe (drawn once from the
    training set) before and after the update t -> t+1, their sampling floors, the
    theory's bounds (L1..L3, U1, U2 and U3 for BatchNorm, U5 for Unitization) with their
    terms, the moment drift, the output scale with the relative (scale-free) values, the
    identity share of the exact plan and the probe-resampling 95 % intervals; after
    training, ICS per unit of learning rate (``exact_per_lr``,
    ``relative_exact_per_lr``) is added from the learning rate of each step.

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created). Written as the run goes, so that a killed run
        keeps everything but the step in flight: ``config.json`` (the settings,
        first; ``status`` is ``running`` until the end, then ``complete``;
        ``finished`` and ``accuracies`` list the finished variants), ``parts/``
        (results appended as measured, one file per measured step),
        ``training.csv`` (loss, batch accuracy and learning rate, one line per step
        as it is taken) and ``summary.md`` (rewritten when a variant finishes).
        At the end: ``results.csv`` (the tidy table of every variant,
        :data:`ics_toolkit.results.COLUMNS`, ``run`` = variant), ``results.parquet``
        (if pyarrow is installed), the final ``summary.md`` and the plots (PNG and
        SVG): ``ics_vs_step`` (a row of layer panels per base run), ``heatmap``,
        ``bn_vs_unitization`` (relative ICS of every variant with 95 % bands) and
        ``batch_sweep`` (ICS and bounds versus batch size; see :func:`draw_results`).
        Every file is written atomically (a temporary file renamed into place).
    model : {"cnn", "mlp", "resnet20"}
        See :func:`build_model`.
    dataset : {"digits", "shapes", "blobs", "cifar10", "cifar100"}
        ``digits`` is the embedded real dataset (8x8 handwritten digits); CIFAR is
        read from ``data_root`` (or ``$ICS_TOOLKIT_DATA``, else ``./data``), nothing
        is downloaded. ``blobs`` are vectors: use ``model="mlp"``.
    norms : str or sequence of str
        The variants (see :func:`parse_norms`); default BatchNorm, Unitization (the
        authors' layer, alpha initialised to 0, where it is BatchNorm), Unitization
        with alpha initialised to 1 (pure unitized outputs) and none.
    steps : int, optional
        Optimizer steps per run (default 200; quick 16).
    probe_size : int, optional
        Probe inputs (default 128; quick 48). Exact W1 costs O(n^3) in it.
    methods : str or sequence of str
        W1 estimators (:func:`ics_toolkit.wasserstein` methods).
    every : int or str, optional
        Measure every k steps (default 20; quick 4), or ``"log:END[:N]"``.
    views : str or sequence of str
        Views of the layer outputs (``flatten``, ``pixel``, ``channel``).
    device : str
        ``"cpu"`` or ``"cuda"`` (``"cuda:1"``, ...).
    seed : int
        Seeds (an integer in [0, 2**32)) the initial weights, the batch order, the probe
        draw and every random choice of the measurement.
    quick : bool
        Small defaults for a smoke test (narrow model, few steps, small probe, a
        subset of the data): well under a minute on a laptop CPU.
    progress : bool
        Print a line per variant to stderr, and a progress bar when stderr is a
        terminal.
    data_root : str or Path, optional
        Folder of the CIFAR files.
    width : int, optional
        Model width (see :func:`build_model`; the CNN of the main job defaults to 16
        channels in its first stage, 8 for quick).
    batch_size : int, optional
        Training batch size (default 128; quick 64).
    lr : float
        Initial learning rate.
    n_projections : int, optional
        Random directions of the sliced estimators and L3 (default 64; quick 16).
    formats : sequence of str
        Figure formats; empty writes no figure.
    overwrite : bool
        A folder holding an earlier run (its ``config.json``, ``parts/``, tables or
        figures) is refused unless True; then exactly those files are removed first,
        so no earlier variant mixes into the new results (other files are kept).
    seeds : int or sequence of int, optional
        How many seeds (``seed``, ``seed + 1``, ...; default 3, quick 2) or which.
        Every seed sets a run's initial weights, batch order and measurement seeds;
        the probe is the same for all (drawn with ``seed``). The claims' intervals
        are over the seeds (one seed gives no interval, so no verdict).
    sweep_batch_sizes : sequence of int, optional
        Training batch sizes of the noise sweep besides ``batch_size`` (default
        (8, 32); quick (16,)); empty turns the sweep off.
    sweep_norms : str or sequence of str, optional
        Variants of the sweep, a subset of ``norms`` (default: those of BatchNorm and
        Unitization with alpha = 1 that ``norms`` has; none, no sweep).

    Returns
    -------
    ExperimentResult
        The results table, the files written, the final test accuracies and the
        summary text.

    Raises
    ------
    ICSValueError
        Bad option values (unknown model, dataset, variant or method; a model that
        does not fit the dataset; a negative seed; a figure format matplotlib cannot
        write; ``out_dir`` is a file or holds an earlier run; CUDA without a GPU).
    ics_toolkit.data.DatasetNotFoundError
        CIFAR files missing (the message says where to put them).
    """
    import torch

    import ics_toolkit
    from ics_toolkit.claims import add_per_lr
    from ics_toolkit.monitor import ICSMonitor
    from ics_toolkit.plots import check_formats
    from ics_toolkit.report import summary_markdown
    from ics_toolkit.results import load_results
    from ics_toolkit.schedules import as_schedule
    from ics_toolkit.train import train

    start = time.perf_counter()
    q = int(bool(quick))
    variants = parse_norms(norms)
    methods = parse_methods(methods)
    views = _checks.views(_split(views), "views")
    if model not in MODELS:
        raise ICSValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    steps = _positive_int(steps if steps is not None else _MAIN_DEFAULTS["steps"][q], "`steps`")
    probe_size = _positive_int(
        probe_size if probe_size is not None else _MAIN_DEFAULTS["probe_size"][q], "`probe_size`"
    )
    batch_size = _positive_int(
        batch_size if batch_size is not None else _MAIN_DEFAULTS["batch_size"][q], "`batch_size`"
    )
    n_projections = _positive_int(
        n_projections if n_projections is not None else _MAIN_DEFAULTS["n_projections"][q],
        "`n_projections`",
    )
    every = every if every is not None else _MAIN_DEFAULTS["every"][q]
    as_schedule(every)  # a bad schedule fails now, before any data is loaded
    if probe_size < 4:
        raise ICSValueError(
            f"`probe_size` must be at least 4 (the floor splits it), got {probe_size}"
        )
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ICSValueError(f"`lr` must be a positive number, got {lr!r}")
    dev = _device(device)
    seed = _seed(seed)
    if formats:
        formats = check_formats(formats)
    out = _prepare_out(out_dir, create=False)
    seed_list = _seed_list(seeds if seeds is not None else _MAIN_DEFAULTS["seeds"][q], seed)
    sweep_sizes = [
        _positive_int(b, "`sweep_batch_sizes` entries")
        for b in (
            sweep_batch_sizes
            if sweep_batch_sizes is not None
            else _MAIN_DEFAULTS["sweep_batch_sizes"][q]
        )
        if b != batch_size
    ]
    if sweep_norms is None:  # the default sweep variants that this run trains
        sweep = [v for v in SWEEP_NORMS if v in [name for name, _ in variants]]
    else:
        sweep = [name for name, _ in parse_norms(sweep_norms, "`sweep_norms`")]
    sweep = sweep if sweep_sizes else []
    sweep_sizes = sweep_sizes if sweep else []
    unknown = [v for v in sweep if v not in [name for name, _ in variants]]
    if unknown:
        raise ICSValueError(
            f"`sweep_norms` names {unknown}, which are not among `norms` "
            f"{[name for name, _ in variants]}; sweep a subset of the variants"
        )
    _claim_out(out, _RUN_FILES, _RUN_FIGURES, True, overwrite)

    if width is None and model == "cnn":
        width = _MAIN_DEFAULTS["cnn_width"][q]
    data = _load_data(dataset, data_root, seed)
    if quick:
        data = data.subset(*_QUICK_SUBSET)
    slots = _norm_slots(model, data, width, quick)
    gen = torch.Generator().manual_seed(int(seed))
    n_train = int(data.x_train.shape[0])
    probe_idx = torch.randperm(n_train, generator=gen)[: min(probe_size, n_train)]
    probe = data.x_train[probe_idx].to(dev)
    names = [name for name, _ in variants]
    specs = dict(variants)
    shown = "flatten" if "flatten" in views else views[0]  # the view of the summary and plots
    design = _design(names, sweep, seed_list, batch_size, sweep_sizes)
    base_runs = [r["run"] for r in design if r["seed"] == seed and r["batch_size"] == batch_size]

    # config.json first: a folder with it holds a run, finished or not ("status")
    out.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "experiment": "main",
        "status": "running",
        "model": model,
        "dataset": dataset,
        "norms": names,
        "seeds": seed_list,
        "sweep_norms": sweep,
        "sweep_batch_sizes": sweep_sizes,
        "design": design,
        "layers": slots,
        "steps": steps,
        "every": every,
        "probe_size": int(probe.shape[0]),
        "methods": list(methods),
        "views": list(views),
        "n_projections": n_projections,
        "batch_size": batch_size,
        "lr": lr,
        "width": width,
        "device": str(dev),
        "seed": seed,
        "quick": bool(quick),
        "finished": [],
        "accuracies": {},
        "variant_wall_time_s": {},
        "versions": {"ics_toolkit": ics_toolkit.__version__, "torch": torch.__version__},
    }
    config_file = _write_text(out / "config.json", json.dumps(config, indent=2))
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    log = _TrainingLog(out / "training.csv")

    accuracies: dict[str, float] = {}
    curves = []
    timings: dict[str, float] = {}
    notes = [
        f"Model `{model}` on `{dataset}`, {steps} SGD steps per run (lr {lr:g}, divided by 10 "
        f"at 50 % and 75 % of the steps), ICS measured every {every} step(s) on a fixed probe "
        f"of {int(probe.shape[0])} training inputs. Variants {', '.join(names)} at batch "
        f"{batch_size} with seeds {', '.join(map(str, seed_list))}; batch-size (noise) sweep "
        f"of {', '.join(sweep) or 'no variant'} at batch "
        f"{', '.join(map(str, sweep_sizes)) or '-'} with the same seeds"
        + (" (quick run)." if quick else "."),
    ]
    _say(
        progress,
        f"ics-toolkit run: model {model} on {dataset} ({n_train} training inputs), "
        f"{len(design)} runs ({len(names)} variant(s) x {len(seed_list)} seed(s), batch sweep "
        f"{sweep_sizes}) x {steps} steps, ICS of {len(slots)} layer(s) every {every} step(s) "
        f"on a probe of {probe.shape[0]}, methods {', '.join(methods)}",
    )
    table = pd.DataFrame()
    try:
        for i, spec_row in enumerate(design, 1):
            name = spec_row["run"]
            run_seed, run_batch = spec_row["seed"], spec_row["batch_size"]
            t0 = time.perf_counter()
            spec = specs[spec_row["variant"]]
            net = build_model(model, spec, data, width=width, seed=run_seed, quick=quick).to(dev)
            monitor = ICSMonitor(
                net,
                probe,
                layers=slots,
                every=every,
                methods=methods,
                views=views,
                n_projections=n_projections,
                seed=run_seed,
                path=parts,
                run=name,
                precision="float64",  # the main job's numbers are the float64 reference
            )
            log.start(name)

            def on_optimizer(optimizer: torch.optim.Optimizer, monitor: Any = monitor) -> None:
                log.optimizer(optimizer)
                monitor.attach(optimizer)

            try:
                result = train(
                    net,
                    data,
                    steps=steps,
                    batch_size=run_batch,
                    lr=lr,
                    seed=run_seed,
                    device=dev,
                    on_optimizer=on_optimizer,
                    on_step=log.step,
                    loss_fn=log.loss(torch.nn.functional.cross_entropy),
                    progress=None if progress else False,
                    desc=f"{name:>16}",
                )
            finally:
                if monitor.attached:
                    monitor.detach()
            curve = result.to_frame().assign(run=name)
            log.finish(curve)
            curves.append(curve)
            acc = result.test_accuracy
            accuracies[name] = float("nan") if acc is None else float(acc)
            timings[name] = time.perf_counter() - t0
            acc_text = "diverged" if math.isnan(accuracies[name]) else f"{accuracies[name]:.1%}"
            _say(
                progress,
                f"[{i}/{len(design)}] {name}: {result.steps} steps in {timings[name]:.1f} s, "
                f"{monitor.update_count} measured, test accuracy {acc_text}",
            )
            done = [r["run"] for r in design[:i]]
            config["finished"] = done
            config["accuracies"] = {
                k: (None if math.isnan(v) else v) for k, v in accuracies.items()
            }
            config["variant_wall_time_s"] = dict(timings)
            _write_text(config_file, json.dumps(config, indent=2))
            if name in base_runs and i < len(design):
                # the finished variants' summary, in case the run dies later
                table = load_results(parts)
                finished = [r for r in base_runs if r in done]
                table = table[table["run"].isin(finished)].reset_index(drop=True)
                partial = [*notes, f"Partial: {i} of {len(design)} runs finished."]
                base_acc = {r: accuracies[r] for r in finished}
                text = summary_markdown(table, base_acc, view=shown, notes=partial)
                _write_text(out / "summary.md", text)
    except BaseException as err:
        config["status"] = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        _write_text(config_file, json.dumps(config, indent=2))
        raise
    finally:
        log.close()
    training = pd.concat(curves, ignore_index=True)
    log.close(training)

    table = add_per_lr(load_results(parts), training)
    # the order load_results gives (run, then step), per-lr rows with their step
    table = table.sort_values(["run", "step"], kind="stable", na_position="first")
    table = table.reset_index(drop=True)
    files = [_write_csv(out / "results.csv", table)]
    if _have_pyarrow():
        files.append(
            atomic_write(out / "results.parquet", lambda tmp: table.to_parquet(tmp, index=False))
        )
    files.append(log.path)
    text = main_summary(table, pd.DataFrame(design), accuracies, training, view=shown, notes=notes)
    files.append(_write_text(out / "summary.md", text))
    files += draw_results(table, out, view=shown, formats=formats, design=pd.DataFrame(design))
    config["status"] = "complete"
    config["wall_time_s"] = time.perf_counter() - start
    files.append(_write_text(config_file, json.dumps(config, indent=2)))
    return ExperimentResult(
        out_dir=out,
        table=table,
        files=files,
        summary=text,
        accuracies=accuracies,
        wall_time_s=config["wall_time_s"],
        config=config,
    )


def _run_label(variant: str, seed: int, batch: int, base_seed: int, base_batch: int) -> str:
    """``variant``, plus ``-b<batch>`` off the base batch and ``-s<seed>`` off the base seed."""
    label = variant
    if batch != base_batch:
        label += f"-b{batch}"
    if seed != base_seed:
        label += f"-s{seed}"
    return label


def _design(
    names: Sequence[str],
    sweep: Sequence[str],
    seeds: Sequence[int],
    batch_size: int,
    sweep_sizes: Sequence[int],
) -> list[dict[str, Any]]:
    """The runs of the main job, base seed first.

    Every variant at ``batch_size`` for every seed, then the sweep variants at each
    sweep batch size for every seed.
    """
    rows = []
    for s in seeds:
        for v in names:
            rows.append({"variant": v, "seed": s, "batch_size": batch_size})
        for b in sweep_sizes:
            for v in sweep:
                rows.append({"variant": v, "seed": s, "batch_size": b})
    for r in rows:
        r["run"] = _run_label(r["variant"], r["seed"], r["batch_size"], seeds[0], batch_size)
    return [{"run": r["run"], **{k: r[k] for k in ("variant", "seed", "batch_size")}} for r in rows]


def main_summary(
    table: pd.DataFrame,
    design: pd.DataFrame,
    accuracies: dict[str, float],
    training: pd.DataFrame | None = None,
    *,
    view: str = "flatten",
    notes: Sequence[str] = (),
) -> str:
    """``summary.md`` of the main job: the claims, then the base runs' per-layer tables.

    Parameters
    ----------
    table : pandas.DataFrame
        The results table of every run.
    design : pandas.DataFrame
        ``run``, ``variant``, ``seed``, ``batch_size`` per run (``config.json``'s
        ``design``).
    accuracies : dict
        Final test accuracy per run.
    training : pandas.DataFrame, optional
        ``training.csv`` (``run``, ``step``, ``lr``): the step-size paragraph.
    view : str
        The view reported.
    notes : sequence of str
        Lines under the title.

    Returns
    -------
    str
        Markdown.
    """
    from ics_toolkit.claims import claims_markdown, evaluate_claims, lr_phases
    from ics_toolkit.report import summary_markdown

    base_seed = int(design["seed"].iloc[0])
    base_batch = int(design["batch_size"].max())
    base = design[(design["seed"] == base_seed) & (design["batch_size"] == base_batch)]
    base_runs = list(base["run"])
    claims = evaluate_claims(table, design, accuracies)
    extra = [claims_markdown(claims)]
    if training is not None and "batch" in base_runs:
        ph = lr_phases(table, training, "batch")
        if math.isfinite(ph["lrs"][0]):
            extra.append(
                f"Step size, not shift: in the BatchNorm run the learning rate falls from "
                f"{ph['lrs'][0]:g} to {ph['lrs'][1]:g}; mean relative ICS goes from "
                f"{ph['ics'][0]:.3g} to {ph['ics'][1]:.3g} (x{ph['ics'][1] / ph['ics'][0]:.2g}), "
                f"relative ICS per unit of learning rate (`relative_exact_per_lr`) from "
                f"{ph['per_lr'][0]:.3g} to {ph['per_lr'][1]:.3g} "
                f"(x{ph['per_lr'][1] / ph['per_lr'][0]:.2g}). A drop of ICS that the per-lr "
                "value does not share is the step size, not the normalization."
            )
    base_table = table[table["run"].isin(base_runs)].reset_index(drop=True)
    base_acc = {r: accuracies[r] for r in base_runs if r in accuracies}
    body = summary_markdown(base_table, base_acc, view=view, notes=notes, claims=extra)
    return body


def _seed_list(seeds: int | Sequence[int], seed: int) -> list[int]:
    """Seeds of the main job: ``seeds`` consecutive seeds from ``seed``, or the given list."""
    if isinstance(seeds, int | np.integer) and not isinstance(seeds, bool):
        count = _positive_int(int(seeds), "`seeds`")
        return [seed + i for i in range(count)]
    out = [_seed(s, "`seeds` entries") for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ICSValueError(f"`seeds` must name distinct seeds (or be a count), got {seeds!r}")
    return out if out[0] == seed else [seed, *[s for s in out if s != seed]]


def _some_layers(df: pd.DataFrame, view: str, max_layers: int) -> list[str] | None:
    """At most ``max_layers`` measured layers, evenly spaced in model order (None: all)."""
    from ics_toolkit.report import order_layers

    max_layers = _positive_int(max_layers, "`max_layers`")
    in_view = df[(df["view"] == view).fillna(False).astype(bool)]
    names = order_layers(in_view["layer"])
    if len(names) <= max_layers:
        return None
    idx = np.unique(np.linspace(0, len(names) - 1, max_layers).round().astype(int))
    return [names[i] for i in idx]


def draw_results(
    df: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    *,
    quantity: str | None = None,
    view: str = "flatten",
    formats: Sequence[str] = ("png", "svg"),
    dpi: int = 100,
    max_layers: int = 8,
    design: pd.DataFrame | None = None,
) -> list[Path]:
    """Draw every figure of a results table into ``out_dir``.

    Parameters
    ----------
    df : pandas.DataFrame
        The tidy results table (one or several runs).
    out_dir : str or Path
        Folder for the figures (created).
    quantity : str, optional
        The ICS estimate drawn (default ``"exact"`` when measured).
    view : str
        The view drawn.
    formats : sequence of str
        File formats (PNG and SVG by default); empty draws nothing.
    dpi : int
        Resolution of the PNG files.
    max_layers : int
        Panels per variant in the per-layer figures: a model with more measured
        layers is shown by this many, evenly spaced from the first to the last (the
        heatmap always shows every layer).
    design : pandas.DataFrame, optional
        The main job's runs (``run``, ``variant``, ``seed``, ``batch_size``; see
        ``config.json``). Given, the per-step figures show the base runs (first seed,
        largest batch) and ``batch_sweep.*`` is drawn from every run.

    Returns
    -------
    list of Path
        ``ics_vs_step.*`` (:func:`~ics_toolkit.plots.plot_ics`: a row of layer
        panels per variant), ``heatmap.*``, ``bn_vs_unitization.*``
        (:func:`~ics_toolkit.plots.plot_compare`: the relative ICS of every variant
        with its 95 % band) and, with ``design``, ``batch_sweep.*``
        (:func:`~ics_toolkit.plots.plot_batch_sweep`).
    """
    from ics_toolkit.plots import (
        check_formats,
        plot_batch_sweep,
        plot_compare,
        plot_heatmap,
        plot_ics,
        save_figure,
    )
    from ics_toolkit.report import check_columns, default_quantity

    check_columns(df, ("step", "layer", "view", "quantity", "value"))
    if not formats:
        return []
    formats = check_formats(formats)
    out = _prepare_out(out_dir)
    quantity = default_quantity(df, quantity)
    files: list[Path] = []
    full = df
    if design is not None and len(design):
        base = design[
            (design["seed"] == design["seed"].iloc[0])
            & (design["batch_size"] == design["batch_size"].max())
        ]
        df = df[df["run"].isin(base["run"])]
    layers = _some_layers(df, view, max_layers)
    fig = plot_ics(df, quantity=quantity, view=view, layers=layers)
    files += save_figure(fig, out / "ics_vs_step", formats=formats, dpi=dpi)
    fig = plot_heatmap(df, quantity=quantity, view=view)
    files += save_figure(fig, out / "heatmap", formats=formats, dpi=dpi)
    relative = relative_name(quantity)  # variants compare by the scale-free values
    compared = relative if (df["quantity"] == relative).any() else quantity
    fig = plot_compare(df, quantity=compared, view=view, layers=layers)
    files += save_figure(fig, out / "bn_vs_unitization", formats=formats, dpi=dpi)
    if design is not None and design["batch_size"].nunique() > 1:
        fig = plot_batch_sweep(full, design, view=view)
        files += save_figure(fig, out / "batch_sweep", formats=formats, dpi=dpi)
    return files


# ---------------------------------------------------------------------- the sweep
_SWEEP_DEFAULTS = {"noises": ((0.0, 0.1, 0.3, 1.0), (0.0, 0.3)), "n": (512, 64)}


def _bn(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Train-mode BatchNorm without affine map: per-coordinate batch mean, biased variance."""
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / (var + eps).sqrt()


def _sweep_samples(
    d: int, noises: Sequence[float], n: int, step_size: float, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Pre-normalization activations at step t, and at t+1 for each noise level (float64)."""
    import torch

    f64 = torch.float64
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(d))
    # n probe inputs with per-coordinate means and scales
    mu = torch.randn(d, generator=gen, dtype=f64)
    sigma = 0.5 + 1.5 * torch.rand(d, generator=gen, dtype=f64)
    z = mu + sigma * torch.randn(n, d, generator=gen, dtype=f64)
    # the fixed update: each coordinate gains step_size times another (random sign), and
    # every coordinate's scale and offset drift by about step_size (BatchNorm removes these)
    perm = torch.randperm(d, generator=gen)
    signs = torch.randint(0, 2, (d,), generator=gen).to(f64) * 2 - 1
    scale = 1 + step_size * torch.randn(d, generator=gen, dtype=f64)
    shift = step_size * sigma * torch.randn(d, generator=gen, dtype=f64)
    moved = (z + step_size * signs * z[:, perm]) * scale + shift
    afters = [
        moved + float(noise) * sigma * torch.randn(n, d, generator=gen, dtype=f64)
        for noise in noises
    ]
    return z, afters


def _sweep_point(
    d: int, noises: Sequence[float], n: int, step_size: float, seed: int, eps: float
) -> list[dict[str, Any]]:
    """Rows of the sweep table for one width d (every noise level shares the activations)."""
    from ics_toolkit.bounding import NormState, bounds, check_order
    from ics_toolkit.distances import wasserstein
    from ics_toolkit.nn.functional import unitization

    z, afters = _sweep_samples(d, noises, n, step_size, seed)
    x_hat = _bn(z, eps)
    u = unitization(z, alpha=1.0, training=True, eps=eps, norm="l2")
    rows: list[dict[str, Any]] = []
    for noise, after in zip(noises, afters, strict=True):
        y_hat = _bn(after, eps)
        v = unitization(after, alpha=1.0, training=True, eps=eps, norm="l2")
        for variant, x, y, states in (
            (
                "batch",
                x_hat,
                y_hat,
                (
                    NormState(x_hat=x_hat, form="batchnorm", eps=eps),
                    NormState(x_hat=y_hat, form="batchnorm", eps=eps),
                ),
            ),
            (
                "unitization",
                u,
                v,
                (
                    NormState(x_hat=x_hat, alpha=1.0, k=1.0, eps=eps, form="unitization"),
                    NormState(x_hat=y_hat, alpha=1.0, k=1.0, eps=eps, form="unitization"),
                ),
            ),
        ):
            values = {"exact": float(wasserstein(x, y, "exact"))}
            values.update(
                bounds(x, y, before=states[0], after=states[1], n_projections=64, seed=seed)
            )
            scale_ = float(max(x.abs().max(), y.abs().max()))
            holds = check_order(values, scale=scale_).holds
            if variant == "batch":
                d_eff = max(float(d), float((x * x).sum(1).mean()), float((y * y).sum(1).mean()))
                values["rho"] = float((x * y).sum(1).mean()) / d_eff
            for quantity, value in values.items():
                kind = "stat" if quantity == "rho" else quantity_kind(quantity)
                rows.append(
                    {
                        "variant": variant,
                        "dim": d,
                        "noise": float(noise),
                        "n_samples": n,
                        "seed": seed,
                        "quantity": quantity,
                        "kind": kind,
                        "value": value,
                        "bounds_hold": holds,
                    }
                )
    return rows


def sweep_dim(
    out_dir: str | os.PathLike[str],
    *,
    dims: Sequence[int] = (4, 16, 64, 256, 1024, 4096),
    noises: Sequence[float] | None = None,
    n: int | None = None,
    step_size: float = 0.1,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    eps: float = 1e-5,
    formats: Sequence[str] = ("png", "svg"),
) -> ExperimentResult:
    """BatchNorm versus unitization across widths d and noise levels (theory sections 3, 8).

    For each width d, ``n`` probe inputs give pre-normalization activations
    ``z_i = mu + sigma * g_i`` (random per-coordinate means and scales). A fixed
    update moves them to ``z'_i = (z_i + step_size * s * z_i[perm]) * (1 + step_size
    * a) + step_size * sigma * b`` (every coordinate gains a fraction of another one,
    and drifts in scale and offset), plus noise ``noise * sigma * e_i`` with fresh
    ``e_i ~ N(0, I)`` per level. Both steps are then

    - BatchNorm-normalized with train-mode statistics (``x_hat``; no affine map), and
    - unitized: ``x_hat / sqrt(||x_hat||^2 + eps)`` (:func:`ics_toolkit.nn.functional.
      unitization` with alpha = 1, ``norm="l2"``, so ``k = 1``),

    and for each the exact W1 (:func:`ics_toolkit.wasserstein`) and the bounds
    (:func:`ics_toolkit.bounds`: L1..L3, U1, U2, and U3 for BatchNorm / U4 for the
    unitized outputs, from :class:`~ics_toolkit.bounding.NormState`) are computed.
    Expected: BatchNorm's W1 and U3 grow like ``sqrt(d)``; U4 = 2 for every d, and the
    unitized W1 stays below it.

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created): ``sweep.csv`` (the table, columns
        :data:`SWEEP_COLUMNS`), ``sweep_summary.md`` (log-log slopes against d),
        ``config.json`` and ``bounds_vs_dim.png`` / ``.svg``, each written atomically;
        an earlier sweep's files are replaced, a folder of :func:`run_main` is refused.
    dims : sequence of int
        Widths d.
    noises : sequence of float, optional
        Noise levels, relative to each coordinate's scale (default 0, 0.1, 0.3, 1;
        quick 0, 0.3).
    n : int, optional
        Probe inputs per distribution (default 512; quick 64). Exact W1 is O(n^3).
    step_size : float
        Size of the fixed update.
    seed : int
        Seed (an integer in [0, 2**32)) of the activations, update and noise (a private
        generator per d).
    quick : bool
        Small defaults for a smoke test.
    progress : bool
        Print a line per width to stderr.
    eps : float
        The normalizations' eps.
    formats : sequence of str
        Figure formats.

    Returns
    -------
    ExperimentResult
        ``table`` is the sweep table; ``summary`` the slopes report.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     res = sweep_dim(tmp, dims=(4, 64), noises=(0.0,), n=16, progress=False,
    ...                     formats=())
    >>> u4 = res.table[res.table.quantity == "U4"].value
    >>> [round(float(v), 4) for v in u4]
    [2.0, 2.0]
    """
    from ics_toolkit.report import fit_slopes, markdown_table

    start = time.perf_counter()
    q = int(bool(quick))
    dims = [_positive_int(d, "`dims` entries") for d in dims]
    if not dims:
        raise ICSValueError("`dims` is empty; pass widths such as (4, 16, 64)")
    noises = list(noises if noises is not None else _SWEEP_DEFAULTS["noises"][q])
    if not noises or any(not (math.isfinite(float(x)) and float(x) >= 0) for x in noises):
        raise ICSValueError(f"`noises` must be non-negative numbers, got {noises!r}")
    n = _positive_int(n if n is not None else _SWEEP_DEFAULTS["n"][q], "`n`")
    if n < 4:
        raise ICSValueError(f"`n` must be at least 4, got {n}")
    if not (math.isfinite(step_size) and step_size > 0):
        raise ICSValueError(f"`step_size` must be a positive number, got {step_size!r}")
    seed = _seed(seed)
    if formats:
        from ics_toolkit.plots import check_formats

        formats = check_formats(formats)
    out = _prepare_out(out_dir, create=False)
    if (out / "parts").is_dir() or (out / "training.csv").is_file():
        raise ICSValueError(
            f"the output folder {str(out)!r} holds a run of `ics-toolkit run`, whose config.json "
            "the sweep would replace; choose another folder"
        )
    for stale in stale_temporaries(out, lambda n: _owned(n, _SWEEP_FILES, _SWEEP_FIGURES)):
        stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    for d in dims:
        t0 = time.perf_counter()
        rows += _sweep_point(d, noises, n, step_size, seed, eps)
        _say(progress, f"sweep-dim: d = {d:>5}: {time.perf_counter() - t0:.1f} s")
    table = pd.DataFrame.from_records(rows, columns=list(SWEEP_COLUMNS))
    files = [_write_csv(out / "sweep.csv", table)]

    slopes = fit_slopes(table[table["quantity"].isin(["exact", "U3", "U4"])])
    lines = [
        "# Bounds versus dimension",
        "",
        f"Widths {dims}, noise levels {noises}, n = {n} probe inputs, update size "
        f"{step_size:g}, seed {seed}. Slope of log(value) against log(d): 0.5 is growth "
        "like sqrt(d), 0 is flat.",
        "",
        markdown_table(
            ["variant", "noise", "quantity", "slope", "widths"],
            align="lrlrr",
            rows=[
                (r.variant, r.noise, r.quantity, f"{r.slope + 0.0:.3f}", r.n_dims)
                for r in slopes.itertuples(index=False)
            ],
        ),
        "",
        f"Bounds held in {int(table['bounds_hold'].sum())} of {len(table)} rows.",
    ]
    text = "\n".join(lines) + "\n"
    files.append(_write_text(out / "sweep_summary.md", text))
    files += draw_sweep(table, out, formats=formats)
    config = {
        "experiment": "sweep-dim",
        "dims": dims,
        "noises": [float(x) for x in noises],
        "n": n,
        "step_size": step_size,
        "seed": seed,
        "eps": eps,
        "quick": bool(quick),
        "wall_time_s": time.perf_counter() - start,
    }
    files.append(_write_text(out / "config.json", json.dumps(config, indent=2)))
    return ExperimentResult(
        out_dir=out,
        table=table,
        files=files,
        summary=text,
        wall_time_s=config["wall_time_s"],
        config=config,
    )


def draw_sweep(
    sweep_df: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    *,
    formats: Sequence[str] = ("png", "svg"),
    dpi: int = 100,
) -> list[Path]:
    """Draw the bounds-versus-dimension figure (``bounds_vs_dim.*``) into ``out_dir``.

    Parameters
    ----------
    sweep_df : pandas.DataFrame
        The table of :func:`sweep_dim`.
    out_dir : str or Path
        Folder for the figure (created).
    formats : sequence of str
        File formats; empty writes nothing.
    dpi : int
        Resolution of the PNG file.

    Returns
    -------
    list of Path
        The files written.
    """
    from ics_toolkit.plots import check_formats, plot_bounds_vs_dim, save_figure

    if not formats:
        return []
    formats = check_formats(formats)
    out = _prepare_out(out_dir)
    fig = plot_bounds_vs_dim(sweep_df)
    return save_figure(fig, out / "bounds_vs_dim", formats=formats, dpi=dpi)
