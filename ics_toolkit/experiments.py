"""The two experiments of the toolkit, as functions the command line and notebooks call.

- :func:`run_main`: train a reference model once per normalization variant
  (BatchNorm, Unitization, none, ...) from the same initial weights, measure the
  internal covariate shift of every normalization position with
  :class:`~ics_toolkit.ICSMonitor`, evaluate the theory's bounds, and write the
  results table, ``summary.md`` and the plots (``ics-toolkit run``).
- :func:`sweep_dim`: the dimension and noise experiment of the theory (docs/theory.md
  sections 3 and 8) on trained networks: an MLP whose one hidden layer of width
  d = 16..4096 is normalized by BatchNorm or by Unitization (alpha held at 0 or 1),
  trained at batch sizes 8..128 (the noise of the batch statistics) over several
  seeds; the slopes of the measured ICS and of its bounds against d, with intervals
  over seeds, and the verdicts computed from them (``ics-toolkit sweep-dim``).

:func:`draw_results` and :func:`draw_sweep` (re-)draw every figure from saved tables
(``ics-toolkit plot``). Everything is seeded through explicit generators; the global
random state is left as it was.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ics_toolkit import _checks
from ics_toolkit._io import atomic_write, stale_temporaries
from ics_toolkit._vocab import DEFAULT_METHODS, NORM_BOUNDS, quantity_kind, relative_name
from ics_toolkit.errors import ICSValueError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ics_toolkit.data.base import Dataset

__all__ = [
    "DEFAULT_NORMS",
    "MODELS",
    "SWEEP_COLUMNS",
    "SWEEP_VARIANTS",
    "ExperimentResult",
    "build_model",
    "draw_results",
    "draw_sweep",
    "parse_methods",
    "parse_norms",
    "run_main",
    "slope_quantities",
    "sweep_dim",
    "sweep_summary",
]

#: Normalization variants of the main experiment, in order: BatchNorm, the authors'
#: Unitization as they start it (alpha = 0, where it is BatchNorm), Unitization with
#: alpha = 1 (pure unitized outputs) and no normalization.
DEFAULT_NORMS: tuple[str, ...] = ("batch", "unitization", "unitization=1", "none")
#: Variants of the batch-size (noise) sweep of the main experiment.
SWEEP_NORMS: tuple[str, ...] = ("batch", "unitization=1")
#: Reference models :func:`run_main` can train.
MODELS: tuple[str, ...] = ("cnn", "mlp", "resnet20")

#: Columns of the dimension-sweep table (``sweep.csv``): one row per run and quantity.
SWEEP_COLUMNS: dict[str, str] = {
    "variant": "the normalization of the hidden layer: 'batch' (BatchNorm1d), "
    "'unitization=A' (Unitization1d with alpha held at A, not learned), 'unitization' "
    "(alpha learned from 0), or another name of parse_norms",
    "dim": "width d of the MLP's one normalized hidden layer",
    "batch_size": "training batch size: the noise (smaller batches, noisier batch "
    "statistics and steps)",
    "seed": "seed of the run's initial weights, batch order and measurement",
    "quantity": "a quantity the monitor measured on the normalized layer's output (flatten "
    "view): exact (ICS), L1..L3, U1, U2, the normalization bounds (U3 and U3_tight "
    "BatchNorm, U4 / U5 Unitization) and their terms, floor_exact, scale, relative_exact, "
    "identity_share; and test_accuracy",
    "kind": "estimate | lower | upper | floor | stat | relative | term",
    "value": "mean over the run's measured steps (test_accuracy: after training)",
    "n_steps": "measured steps averaged (0 for test_accuracy)",
    "bounds_hold": "every lower bound <= exact <= every upper bound at every measured step",
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
        Final test accuracy per run (NaN if training diverged).
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
    """``make_norm`` callable: Unitization with a given initial alpha (picklable).

    ``learn_alpha=False`` holds alpha at ``alpha_init`` (a buffer): the dimension sweep
    compares layers of a fixed alpha.
    """

    def __init__(self, alpha_init: float, learn_alpha: bool = True) -> None:
        self.alpha_init = alpha_init
        self.learn_alpha = learn_alpha

    def __call__(self, num_features: int, dims: int) -> nn.Module:
        from ics_toolkit.nn import Unitization1d, Unitization2d, Unitization3d

        cls = {1: Unitization1d, 2: Unitization2d, 3: Unitization3d}[dims]
        return cls(num_features, alpha_init=self.alpha_init, learn_alpha=self.learn_alpha)


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
    from ics_toolkit.report import _in_view, order_layers

    max_layers = _positive_int(max_layers, "`max_layers`")
    in_view = df[_in_view(df["view"], view)]  # "flatten" takes the sketched layers too
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
#: Variants of the dimension sweep: BatchNorm, and Unitization with alpha held (not
#: learned) at 0, where its forward is BatchNorm's and U5 bounds it, and at 1, where its
#: outputs are unitized and U4 and U5 bound it.
SWEEP_VARIANTS: tuple[str, ...] = ("batch", "unitization=0", "unitization=1")


_SWEEP_DEFAULTS: dict[str, tuple[Any, Any]] = {
    # full sweep / quick
    "dims": ((16, 64, 256, 1024, 4096), (16, 64)),
    "batch_sizes": ((8, 32, 128), (16, 64)),
    "seeds": (3, 2),
    "steps": (150, 8),
    "every": (10, 4),
    "probe_size": (128, 32),
}
#: The MLP's features are Flatten, Linear, norm, ReLU: the norm's name.
_SWEEP_LAYER = "features.2"
_SWEEP_KINDS = ("estimate", "lower", "upper", "floor", "stat", "relative", "term")
_SWEEP_PARTS = "sweep_parts"
#: The sweep table's row of a run's final test accuracy (kind ``stat``, ``n_steps`` 0).
_ACCURACY = "test_accuracy"


def _sweep_specs(norms: str | Sequence[str]) -> list[tuple[str, Any]]:
    """The sweep's variants: ``unitization=A`` holds alpha at A instead of learning it."""
    out = []
    for name, spec in parse_norms(norms):
        if isinstance(spec, _UnitizationNorm):
            spec = _UnitizationNorm(spec.alpha_init, learn_alpha=False)
        out.append((name, spec))
    return out


def _sweep_design(
    names: Sequence[str], dims: Sequence[int], batch_sizes: Sequence[int], seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """Every (width, batch size, seed, variant), narrow widths first (cheap runs first)."""
    return [
        {"run": f"{v}-d{d}-b{b}-s{s}", "variant": v, "dim": d, "batch_size": b, "seed": s}
        for d in dims
        for b in batch_sizes
        for s in seeds
        for v in names
    ]


def _positive_ints(values: Sequence[Any], argument: str) -> list[int]:
    out = [_positive_int(v, f"{argument} entries") for v in values]
    if not out:
        raise ICSValueError(f"{argument} is empty; pass at least one value")
    if len(set(out)) != len(out):
        raise ICSValueError(f"{argument} lists a value more than once: {out}")
    return out


def _sweep_rows(frame: pd.DataFrame, run: Mapping[str, Any], accuracy: float) -> list[dict]:
    """A run's rows of the sweep table: each quantity's mean over the measured steps."""
    at = frame[
        (frame["layer"] == _SWEEP_LAYER)
        & (frame["view"] == "flatten")
        & frame["kind"].isin(_SWEEP_KINDS)
    ]
    holds = bool(at["bounds_hold"].fillna(True).astype(bool).all())
    keys = {k: run[k] for k in ("variant", "dim", "batch_size", "seed")}
    grouped = at.groupby("quantity", sort=False)
    rows = [
        {
            **keys,
            "quantity": q,
            "kind": str(g["kind"].iloc[0]),
            "value": float(g["value"].astype("float64").mean()),
            "n_steps": int(g["step"].nunique()),
            "bounds_hold": holds,
        }
        for q, g in grouped
    ]
    rows.append(
        {
            **keys,
            "quantity": _ACCURACY,
            "kind": "stat",
            "value": accuracy,
            "n_steps": 0,
            "bounds_hold": holds,
        }
    )
    return rows


def _sweep_run(
    run: Mapping[str, Any], spec: Any, data: Dataset, probe: torch.Tensor, opts: Mapping[str, Any]
) -> tuple[pd.DataFrame, float]:
    """Train one MLP (hidden width ``run["dim"]``) under the monitor: its table, its accuracy."""
    from ics_toolkit.models import MLP
    from ics_toolkit.monitor import ICSMonitor
    from ics_toolkit.train import train

    seed = int(run["seed"])
    net = MLP(data.in_features, data.num_classes, hidden=(int(run["dim"]),), norm=spec, seed=seed)
    net = net.to(opts["device"])
    monitor = ICSMonitor(
        net,
        probe,
        layers=[_SWEEP_LAYER],
        every=opts["every"],
        methods=("exact",),
        moments=False,
        n_projections=opts["n_projections"],
        seed=seed,
        path=opts["parts"],
        run=str(run["run"]),
        precision="float64",
    )
    try:
        result = train(
            net,
            data,
            steps=opts["steps"],
            batch_size=int(run["batch_size"]),
            lr=opts["lr"],
            seed=seed,
            milestones=(),  # a constant step size: the widths and variants share it
            device=opts["device"],
            on_optimizer=monitor.attach,
            progress=False,
        )
    finally:
        if monitor.attached:
            monitor.detach()
    acc = result.test_accuracy
    return monitor.results(), math.nan if acc is None else float(acc)


def slope_quantities(sweep_df: pd.DataFrame) -> list[str]:
    """The quantities of a sweep table whose slopes against d are reported, in order.

    The ICS (``exact``), its scale-free form (``relative_exact``) and every
    normalization bound present: U3, U4, U5 and their variants (``U3_tight``, ...),
    not U1 / U2, which follow the measured displacement.

    Examples
    --------
    >>> slope_quantities(pd.DataFrame({"quantity": ["U1", "U5", "exact", "U3_tight", "U3"]}))
    ['exact', 'U3', 'U3_tight', 'U5']
    """
    present = set(sweep_df["quantity"].astype(str))
    # U3..U9 and their named forms (U3_tight), not the terms (U3_core, U5_alpha, ...)
    bounds = sorted(
        q for q in present if re.fullmatch(r"U[3-9](_[a-z]+)?", q) and quantity_kind(q) != "term"
    )
    return [q for q in ("exact", "relative_exact") if q in present] + bounds


def sweep_summary(sweep_df: pd.DataFrame, *, notes: Sequence[str] = (), level: float = 0.95) -> str:
    """``sweep_summary.md``: slopes against d with intervals over seeds, verdicts, values.

    Parameters
    ----------
    sweep_df : pandas.DataFrame
        The table of :func:`sweep_dim` (columns :data:`SWEEP_COLUMNS`).
    notes : sequence of str
        Paragraphs under the title (the settings).
    level : float
        Level of the intervals over seeds.

    Returns
    -------
    str
        Markdown: the slopes of :func:`slope_quantities` (:func:`~ics_toolkit.report.
        fit_slopes`), the verdicts of :data:`ics_toolkit.claims.SWEEP_CLAIMS` computed
        from them, and the mean ICS, bound and test accuracy per variant and width.
    """
    from ics_toolkit.claims import evaluate_sweep_claims, sweep_claims_markdown
    from ics_toolkit.report import fit_slopes, markdown_table

    quantities = slope_quantities(sweep_df)
    slopes = fit_slopes(sweep_df[sweep_df["quantity"].isin(quantities)], level=level)
    order = {q: i for i, q in enumerate(quantities)}
    slopes = slopes.sort_values(
        ["variant", "quantity", "batch_size"],
        key=lambda c: c.map(order) if c.name == "quantity" else c,
        kind="stable",
    )
    pct = f"{100 * level:g} %"
    lines = ["# ICS and its bounds versus width d (trained networks)", "", *notes]
    lines += [
        "",
        "## Slopes against d",
        "",
        "Per seed, the least-squares slope of log(value) against log(d) over the widths; "
        f"the mean over seeds and its {pct} Student-t interval. 0.5 is growth like sqrt(d), "
        "0 is flat in d. Values are means over each run's measured steps.",
        "",
        markdown_table(
            ["variant", "batch", "quantity", "slope", f"{pct} interval", "per seed", "widths"],
            align="lrlrrlr",
            rows=[
                (
                    r.variant,
                    r.batch_size,
                    r.quantity,
                    f"{r.slope + 0.0:.3f}",
                    _interval(r.low, r.high),
                    r.per_seed,
                    r.n_dims,
                )
                for r in slopes.itertuples(index=False)
            ],
        ),
        "",
        "## Claims",
        "",
        sweep_claims_markdown(evaluate_sweep_claims(slopes)),
        "",
        "## Values",
        "",
        _sweep_values(sweep_df),
        "",
        f"Bounds held at every measured step in {_runs_held(sweep_df)} runs.",
    ]
    return "\n".join(lines) + "\n"


def _interval(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "–"
    return f"[{low + 0.0:.3f}, {high + 0.0:.3f}]"


def _runs_held(sweep_df: pd.DataFrame) -> str:
    runs = sweep_df.groupby(["variant", "dim", "batch_size", "seed"])["bounds_hold"].all()
    return f"{int(runs.sum())} of {len(runs)}"


def _sweep_values(sweep_df: pd.DataFrame) -> str:
    """Mean over seeds per variant and width: ICS and the variant's bound per batch size."""
    from ics_toolkit.report import markdown_table, order_runs

    means = sweep_df.groupby(["variant", "dim", "batch_size", "quantity"])["value"].mean()
    batches = sorted(sweep_df["batch_size"].unique())
    header = ["variant", "d", *[f"ICS b{b}" for b in batches], "bound"]
    header += [f"bound b{b}" for b in batches] + [f"test acc b{batches[-1]}"]
    rows = []
    for variant in order_runs(sweep_df["variant"]):
        present = set(sweep_df.loc[sweep_df["variant"] == variant, "quantity"])
        bound = next((q for q in NORM_BOUNDS if q in present), None)
        for d in sorted(sweep_df.loc[sweep_df["variant"] == variant, "dim"].unique()):

            def cell(q: str | None, b: Any, d: Any = d, variant: str = variant) -> str:
                v = means.get((variant, d, b, q), math.nan) if q else math.nan
                return "–" if not math.isfinite(v) else f"{v:.4g}"

            rows.append(
                (
                    variant,
                    int(d),
                    *[cell("exact", b) for b in batches],
                    bound or "–",
                    *[cell(bound, b) for b in batches],
                    cell(_ACCURACY, batches[-1]),
                )
            )
    return markdown_table(
        header, rows, align="lr" + "r" * len(batches) + "l" + "r" * (len(batches) + 1)
    )


def _claim_sweep_out(out: Path) -> None:
    """Refuse a folder of ``ics-toolkit run``; clear an earlier sweep's files (its own only)."""
    from ics_toolkit.results import _PART

    config = out / "config.json"
    try:
        main = json.loads(config.read_text()).get("experiment") == "main"
    except (OSError, ValueError, AttributeError):
        main = False
    if main or (out / "parts").is_dir() or (out / "training.csv").is_file():
        raise ICSValueError(
            f"the output folder {str(out)!r} holds a run of `ics-toolkit run`, whose config.json "
            "the sweep would replace; choose another folder"
        )
    if not out.is_dir():
        return
    owned = [
        f for f in out.iterdir() if f.is_file() and _owned(f.name, _SWEEP_FILES, _SWEEP_FIGURES)
    ]
    owned += stale_temporaries(out, lambda n: _owned(n, _SWEEP_FILES, _SWEEP_FIGURES))
    parts = out / _SWEEP_PARTS
    if parts.is_dir():
        owned += [f for f in parts.iterdir() if f.is_file() and _PART.match(f.name)]
        owned += stale_temporaries(parts, lambda n: _PART.match(n) is not None)
    for f in owned:
        f.unlink(missing_ok=True)


def sweep_dim(
    out_dir: str | os.PathLike[str],
    *,
    dims: Sequence[int] | None = None,
    batch_sizes: Sequence[int] | None = None,
    norms: str | Sequence[str] = SWEEP_VARIANTS,
    seeds: int | Sequence[int] | None = None,
    steps: int | None = None,
    every: int | str | None = None,
    probe_size: int | None = None,
    lr: float = 0.05,
    n_projections: int = 16,
    dataset: str = "digits",
    device: str = "cpu",
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    formats: Sequence[str] = ("png", "svg"),
    threads: int | None = 1,
) -> ExperimentResult:
    """ICS and its bounds against the width d of a trained normalized layer, per batch size.

    For every width d, training batch size, seed and variant of ``norms``, an MLP
    (:class:`~ics_toolkit.models.MLP`: Linear without bias, the variant's normalization,
    ReLU, then a Linear classifier) with one hidden layer of width d is trained on
    ``dataset`` for ``steps`` SGD steps (Nesterov momentum 0.9, weight decay 5e-4, the
    same constant learning rate ``lr`` for every run), from the seed's initial weights
    and batch order. :class:`~ics_toolkit.ICSMonitor` measures the normalized layer's
    output every ``every`` steps on a fixed probe of ``probe_size`` training inputs
    (train mode, float64): the exact W1 between the outputs before and after the
    update (the ICS), its sampling floor, L1..L3, U1, U2 and the layer's bounds (U3 for
    BatchNorm, U5 for Unitization and U4 where alpha = 1) with their terms. Each run's
    row per quantity is its mean over the measured steps.

    The noise is the batch size's: a batch of 8 gives noisier batch statistics and
    noisier steps than one of 128. ``sweep_summary.md`` fits, per seed, the slope of
    log(value) against log(d) for the ICS and every normalization bound present
    (:func:`slope_quantities`), reports the mean over seeds with its 95 % Student-t
    interval, and the verdicts of :data:`ics_toolkit.claims.SWEEP_CLAIMS` computed from
    those intervals, whatever they turn out to be.

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created). Written as the sweep goes: ``config.json`` first
        (``status`` ``running``, then ``complete``; ``finished`` lists the finished
        runs), ``sweep_parts/`` (the monitor's per-step results, one part per
        measured step, run label ``<variant>-d<d>-b<batch>-s<seed>``; read them with
        :func:`ics_toolkit.load_results`) and ``sweep.csv`` (the table, columns
        :data:`SWEEP_COLUMNS`, rewritten after every run). At the end:
        ``sweep_summary.md`` and ``bounds_vs_dim.png`` / ``.svg``. Every file is
        written atomically; an earlier sweep's files are replaced, a folder of
        :func:`run_main` is refused.
    dims : sequence of int, optional
        Widths d (default 16, 64, 256, 1024, 4096; quick 16, 64).
    batch_sizes : sequence of int, optional
        Training batch sizes (default 8, 32, 128; quick 16, 64).
    norms : str or sequence of str
        Variants (:func:`parse_norms` names); ``unitization=A`` holds alpha at A (not
        learned). Default :data:`SWEEP_VARIANTS`.
    seeds : int or sequence of int, optional
        How many seeds (``seed``, ``seed + 1``, ...; default 3, quick 2) or which.
    steps : int, optional
        SGD steps per run (default 150; quick 8).
    every : int or str, optional
        Measure every k steps (default 10; quick 4), or ``"log:END[:N]"``.
    probe_size : int, optional
        Probe inputs (default 128; quick 32); exact W1 is O(n^3) in it.
    lr : float
        The learning rate of every run (constant).
    n_projections : int
        Random directions of L3.
    dataset : {"digits", "shapes", "blobs"}
        Training data (flattened for the MLP); default the embedded 8x8 digits.
    device : str
        ``"cpu"`` or ``"cuda"``.
    seed : int
        Base seed (an integer in [0, 2**32)): the data split, the probe and the first
        run seed.
    quick : bool
        Small defaults for a smoke test (seconds).
    progress : bool
        Print a line per run to stderr.
    formats : sequence of str
        Figure formats; empty writes no figure.
    threads : int or None
        Torch's intra-op CPU threads during the sweep, restored after (None: leave
        torch's setting). One by default: the tensors are small (a probe of 128 x d),
        and on 2 cores shared with other work two threads made the runs 8x slower
        (docs/benchmarks.md).

    Returns
    -------
    ExperimentResult
        ``table`` is the sweep table, ``summary`` the text of ``sweep_summary.md``,
        ``accuracies`` the test accuracy per run.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     res = sweep_dim(tmp, dims=(16, 64), batch_sizes=(32,), seeds=1, steps=2,
    ...                     every=1, probe_size=16, progress=False, formats=())
    >>> sorted(res.table["dim"].unique().tolist()), sorted(res.table["variant"].unique())
    ([16, 64], ['batch', 'unitization=0', 'unitization=1'])
    >>> res.summary.splitlines()[0]
    '# ICS and its bounds versus width d (trained networks)'
    """
    import torch

    import ics_toolkit
    from ics_toolkit.schedules import as_schedule

    start = time.perf_counter()
    q = int(bool(quick))

    def default(value: Any, key: str) -> Any:
        return value if value is not None else _SWEEP_DEFAULTS[key][q]

    dims = _positive_ints(default(dims, "dims"), "`dims`")
    batch_sizes = _positive_ints(default(batch_sizes, "batch_sizes"), "`batch_sizes`")
    variants = _sweep_specs(norms)
    steps = _positive_int(default(steps, "steps"), "`steps`")
    every = default(every, "every")
    as_schedule(every)
    probe_size = _positive_int(default(probe_size, "probe_size"), "`probe_size`")
    if probe_size < 4:
        raise ICSValueError(
            f"`probe_size` must be at least 4 (the floor splits it), got {probe_size}"
        )
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ICSValueError(f"`lr` must be a positive number, got {lr!r}")
    n_projections = _positive_int(n_projections, "`n_projections`")
    if threads is not None:
        threads = _positive_int(threads, "`threads`")
    if dataset in ("cifar10", "cifar100"):
        raise ICSValueError("the sweep trains on digits, shapes or blobs, not CIFAR")
    dev = _device(device)
    seed = _seed(seed)
    seed_list = _seed_list(default(seeds, "seeds"), seed)
    if formats:
        from ics_toolkit.plots import check_formats

        formats = check_formats(formats)
    out = _prepare_out(out_dir, create=False)
    _claim_sweep_out(out)

    data = _load_data(dataset, None, seed)
    if quick:
        data = data.subset(*_QUICK_SUBSET)
    gen = torch.Generator().manual_seed(int(seed))
    n_train = int(data.x_train.shape[0])
    probe = data.x_train[torch.randperm(n_train, generator=gen)[: min(probe_size, n_train)]]
    probe = probe.to(dev)
    specs = dict(variants)
    design = _sweep_design([n for n, _ in variants], dims, batch_sizes, seed_list)
    parts = out / _SWEEP_PARTS
    parts.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "experiment": "sweep-dim",
        "status": "running",
        "dataset": dataset,
        "model": "mlp, one normalized hidden layer of width d",
        "norms": list(specs),
        "dims": dims,
        "batch_sizes": batch_sizes,
        "seeds": seed_list,
        "steps": steps,
        "every": every,
        "probe_size": int(probe.shape[0]),
        "lr": lr,
        "n_projections": n_projections,
        "device": str(dev),
        "threads": threads,
        "seed": seed,
        "quick": bool(quick),
        "finished": [],
        "versions": {"ics_toolkit": ics_toolkit.__version__, "torch": torch.__version__},
    }
    config_file = _write_text(out / "config.json", json.dumps(config, indent=2))
    opts = {
        "every": every,
        "steps": steps,
        "lr": lr,
        "n_projections": n_projections,
        "device": dev,
        "parts": parts,
    }
    _say(
        progress,
        f"ics-toolkit sweep-dim: {len(design)} runs ({len(specs)} variant(s) x widths {dims} "
        f"x batch sizes {batch_sizes} x {len(seed_list)} seed(s)), {steps} steps each, ICS "
        f"every {every} step(s) on a probe of {probe.shape[0]}",
    )
    rows: list[dict[str, Any]] = []
    accuracies: dict[str, float] = {}
    table = pd.DataFrame(columns=list(SWEEP_COLUMNS))
    was_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        for i, run in enumerate(design, 1):
            t0 = time.perf_counter()
            frame, acc = _sweep_run(run, specs[run["variant"]], data, probe, opts)
            run_rows = _sweep_rows(frame, run, acc)
            rows += run_rows
            accuracies[run["run"]] = acc
            table = pd.DataFrame.from_records(rows, columns=list(SWEEP_COLUMNS))
            _write_csv(out / "sweep.csv", table)
            config["finished"].append(run["run"])
            _write_text(config_file, json.dumps(config, indent=2))
            ics = next((r["value"] for r in run_rows if r["quantity"] == "exact"), math.nan)
            _say(
                progress,
                f"[{i}/{len(design)}] {run['run']}: {time.perf_counter() - t0:.1f} s, "
                f"mean ICS {ics:.4g}, test accuracy {acc:.1%}",
            )
    except BaseException as err:
        config["status"] = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        _write_text(config_file, json.dumps(config, indent=2))
        raise
    finally:
        torch.set_num_threads(was_threads)
    files = [out / "sweep.csv"]
    notes = [
        f"An MLP on `{dataset}` with one hidden layer of width d ({', '.join(map(str, dims))}) "
        f"normalized by each variant ({', '.join(specs)}; `unitization=A` holds alpha at A), "
        f"trained {steps} SGD steps at the same constant learning rate {lr:g} (Nesterov "
        f"momentum 0.9, weight decay 5e-4) with batch sizes {', '.join(map(str, batch_sizes))} "
        "(the noise: smaller batches, noisier batch statistics and steps) and seeds "
        f"{', '.join(map(str, seed_list))}. ICSMonitor measured the normalized layer's output "
        f"every {every} step(s) on a fixed probe of {int(probe.shape[0])} training inputs "
        "(train mode, float64)" + (" (quick run)." if quick else "."),
    ]
    text = sweep_summary(table, notes=notes)
    files.append(_write_text(out / "sweep_summary.md", text))
    files += draw_sweep(table, out, formats=formats)
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
