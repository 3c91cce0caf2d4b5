"""The ``ics-toolkit`` command line (also ``python -m ics_toolkit``).

Commands::

    ics-toolkit run --out DIR [--overwrite] [--quick] [--model cnn|mlp|resnet20] ...
    ics-toolkit sweep-dim --out DIR [--quick] [--dims 16,64,...] [--batch-sizes 8,32,...] ...
    ics-toolkit plot RESULTS [RESULTS ...] --out DIR [--formats png,svg] [--strict]
    ics-toolkit --version

A bad option prints one line, ``ics-toolkit: error: ...``, to stderr and exits with
status 2 (usage) or 1 (a value the toolkit refused: unknown method, missing CIFAR
files, an output path that is a file or holds an earlier run, an unreadable table,
...); no traceback. Warnings print as one line each (``ics-toolkit: warning: ...``).
``run`` writes ``config.json`` first and ``training.csv`` and ``parts/`` as it goes,
so Ctrl-C (exit 130) or ``kill -9`` keeps everything measured but the step in flight;
``plot`` draws it.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ics_toolkit._vocab import DEFAULT_METHODS, METHODS
from ics_toolkit.errors import ICSError, ICSValueError

__all__ = ["build_parser", "main"]

PROG = "ics-toolkit"


class _UsageError(Exception):
    """An argparse error, turned into one line by :func:`main`."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _csv(kind: type, what: str) -> Any:
    """An argparse type: a comma-separated list of ``kind`` values."""

    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {what}, got {text!r}"
            ) from None

    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _every(text: str) -> int | str:
    if text.startswith("log:"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'log:END[:N]', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**32 - 1, got {text!r}")
    return value


def _device(text: str) -> str:
    kind = text.split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ics-toolkit`` (its errors raise instead of exiting)."""
    from ics_toolkit import __version__

    parser = _Parser(
        prog=PROG,
        description="Measure and bound internal covariate shift (ICS): the Wasserstein-1 "
        "distance between a layer's outputs before and after each optimizer step.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="train a model per normalization variant and measure every layer's ICS",
        description="Train the model once per normalization variant (same initial weights), "
        "measure ICS at every normalization position with the theory's bounds, and write "
        "results.csv, summary.md and the plots to --out.",
    )
    run.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    run.add_argument("--quick", action="store_true", help="small, fast settings (smoke test)")
    run.add_argument("--model", choices=("cnn", "mlp", "resnet20"), default="cnn")
    run.add_argument(
        "--dataset",
        choices=("digits", "shapes", "blobs", "cifar10", "cifar100"),
        default="digits",
        help="digits (default) is the embedded real dataset; CIFAR is read from --data-root",
    )
    run.add_argument(
        "--data-root",
        metavar="PATH",
        help="folder holding cifar-10-batches-py/ or cifar-100-python/ (default: "
        "$ICS_TOOLKIT_DATA, else ./data)",
    )
    run.add_argument(
        "--norms",
        type=_csv(str, "normalization names"),
        default=["batch", "unitization", "unitization=1", "none"],
        metavar="LIST",
        help="variants: batch, unitization, group, layer, none, unitization=ALPHA "
        "(default: batch,unitization,unitization=1,none)",
    )
    run.add_argument(
        "--seeds",
        type=_positive,
        metavar="K",
        help="seeds per run, from --seed on (default 3; quick 2); claims get intervals over them",
    )
    run.add_argument(
        "--sweep-batch-sizes",
        type=_csv(_positive, "batch sizes"),
        metavar="LIST",
        help="extra training batch sizes of the noise sweep (default 8,32; quick 16; "
        "'--sweep-batch-sizes 128' or the base batch alone turns it off)",
    )
    run.add_argument(
        "--sweep-norms",
        type=_csv(str, "normalization names"),
        metavar="LIST",
        help="variants of the batch-size sweep, among --norms (default: batch,unitization=1 "
        "where --norms has them)",
    )
    run.add_argument("--steps", type=_positive, metavar="N", help="steps per variant (600)")
    run.add_argument(
        "--every", type=_every, metavar="K", help="measure every K steps (10), or log:END[:N]"
    )
    run.add_argument(
        "--probe-size", type=_positive, metavar="N", help="probe inputs (256); exact W1 is O(N^3)"
    )
    run.add_argument(
        "--methods",
        type=_csv(str, "method names"),
        default=list(DEFAULT_METHODS),
        metavar="LIST",
        help=f"W1 estimators: {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})",
    )
    run.add_argument(
        "--views",
        type=_csv(str, "view names"),
        default=["flatten"],
        metavar="LIST",
        help="flatten, pixel, channel (default: flatten)",
    )
    run.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    run.add_argument("--seed", type=_seed, default=0, metavar="S")
    run.add_argument("--width", type=_positive, metavar="W", help="model width")
    run.add_argument("--batch-size", type=_positive, metavar="B", help="training batch (128)")
    run.add_argument("--lr", type=float, default=0.05, help="initial learning rate (0.05)")
    run.add_argument("--no-progress", action="store_true", help="print nothing while running")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --out (its files only; without it such a folder "
        "is refused)",
    )

    sweep = sub.add_parser(
        "sweep-dim",
        help="ICS and its bounds against the width d of trained normalized layers",
        description="Train an MLP on the digits with one normalized hidden layer of width d "
        "(BatchNorm, Unitization with alpha held at 0 and at 1) for every width, batch size "
        "(the noise) and seed; measure the layer's ICS and bounds with ICSMonitor; write "
        "sweep.csv, sweep_summary.md (log-log slopes against d with intervals over seeds, "
        "and the verdicts computed from them) and bounds_vs_dim.png/svg.",
    )
    sweep.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    sweep.add_argument("--quick", action="store_true", help="small, fast settings (seconds)")
    sweep.add_argument(
        "--dims",
        type=_csv(int, "integers"),
        metavar="LIST",
        help="widths d (default: 16,64,256,1024,4096; quick 16,64)",
    )
    sweep.add_argument(
        "--batch-sizes",
        type=_csv(int, "integers"),
        metavar="LIST",
        help="training batch sizes, the noise (default: 8,32,128; quick 16,64)",
    )
    sweep.add_argument(
        "--norms",
        type=_csv(str, "normalization names"),
        default=["batch", "unitization=0", "unitization=1"],
        metavar="LIST",
        help="variants; unitization=ALPHA holds alpha fixed (default: "
        "batch,unitization=0,unitization=1)",
    )
    sweep.add_argument("--seeds", type=_positive, metavar="K", help="seeds (default 3; quick 2)")
    sweep.add_argument("--steps", type=_positive, metavar="N", help="SGD steps per run (150)")
    sweep.add_argument(
        "--every", type=_every, metavar="K", help="measure every K steps (10), or log:END[:N]"
    )
    sweep.add_argument(
        "--probe-size", type=_positive, metavar="N", help="probe inputs (128); exact W1 is O(N^3)"
    )
    sweep.add_argument("--lr", type=float, default=0.05, help="learning rate of every run (0.05)")
    sweep.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda")
    sweep.add_argument("--seed", type=_seed, default=0, metavar="S")
    sweep.add_argument("--no-progress", action="store_true", help="print nothing while running")

    plot = sub.add_parser(
        "plot",
        help="re-draw every plot from saved results",
        description="Re-draw the plots from results.csv / results.parquet, a folder of "
        "result parts, a run's output folder, or a sweep.csv.",
    )
    plot.add_argument("results", nargs="+", metavar="RESULTS", help="files or folders")
    plot.add_argument("--out", required=True, metavar="DIR", help="folder for the figures")
    plot.add_argument("--quantity", help="ICS estimate drawn (default: exact when measured)")
    plot.add_argument(
        "--view",
        default="flatten",
        help="view drawn (default: flatten; it includes sketched layers, drawn by their "
        "rescaled exact_jl and lower bounds)",
    )
    plot.add_argument(
        "--formats",
        type=_csv(str, "formats"),
        default=["png", "svg"],
        metavar="LIST",
        help="figure formats (default: png,svg)",
    )
    plot.add_argument(
        "--strict",
        action="store_true",
        help="fail on an unreadable result part (default: skip it with a warning)",
    )
    return parser


def _check_out(path: str) -> Path:
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ICSValueError(
            f"--out {str(out)!r} is a file; pass a folder (it is created if missing)"
        )
    return out


def _print_files(files: Sequence[Path]) -> None:
    print("outputs:")
    for f in files:
        print(f"  {f}")


def _cmd_run(args: argparse.Namespace) -> int:
    from ics_toolkit.experiments import _device, parse_methods, parse_norms, run_main

    out = _check_out(args.out)
    parse_norms(args.norms, "--norms")
    parse_methods(args.methods, "--methods")
    _device(args.device, "--device")
    result = run_main(
        out,
        model=args.model,
        dataset=args.dataset,
        norms=args.norms,
        steps=args.steps,
        probe_size=args.probe_size,
        methods=args.methods,
        every=args.every,
        views=args.views,
        device=args.device,
        seed=args.seed,
        quick=args.quick,
        progress=not args.no_progress,
        data_root=args.data_root,
        width=args.width,
        batch_size=args.batch_size,
        lr=args.lr,
        overwrite=args.overwrite,
        seeds=args.seeds,
        sweep_batch_sizes=args.sweep_batch_sizes,
        sweep_norms=args.sweep_norms,
    )
    print(result.summary)
    _print_files(result.files)
    print(f"ics-toolkit run: done in {result.wall_time_s:.1f} s; results in {result.out_dir}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ics_toolkit.experiments import _device, parse_norms, sweep_dim

    out = _check_out(args.out)
    parse_norms(args.norms, "--norms")
    _device(args.device, "--device")
    result = sweep_dim(
        out,
        dims=args.dims,
        batch_sizes=args.batch_sizes,
        norms=args.norms,
        seeds=args.seeds,
        steps=args.steps,
        every=args.every,
        probe_size=args.probe_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        quick=args.quick,
        progress=not args.no_progress,
    )
    print(result.summary)
    _print_files(result.files)
    print(f"ics-toolkit sweep-dim: done in {result.wall_time_s:.1f} s; results in {result.out_dir}")
    return 0


def _read_table(path: Path, nrows: int | None = None) -> Any:
    """A CSV / Parquet table; any failure to read it is an error naming the file."""
    import pandas as pd

    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, nrows=nrows)
    except OSError:
        raise
    except Exception as err:  # pandas / pyarrow parse errors, bad encodings
        raise ICSValueError(
            f"RESULTS {str(path)!r} is not a readable table: {type(err).__name__}: {err}"
        ) from None


def _is_sweep_file(path: Path) -> bool:
    columns = list(_read_table(path, nrows=0).columns)
    return "variant" in columns and "dim" in columns and "layer" not in columns


def _collect(paths: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """Split RESULTS arguments into results sources and sweep tables."""
    from ics_toolkit.results import _PART

    results: list[Path] = []
    sweeps: list[Path] = []
    for text in paths:
        p = Path(text).expanduser()
        if p.is_file():
            if p.suffix not in (".csv", ".parquet"):
                raise ICSValueError(f"RESULTS {str(p)!r}: expected a .csv or .parquet file")
            (sweeps if _is_sweep_file(p) else results).append(p)
        elif p.is_dir():
            found = False
            for name in ("results.parquet", "results.csv"):
                if (p / name).is_file():
                    results.append(p / name)
                    found = True
                    break
            else:
                if any(_PART.match(f.name) for f in p.iterdir()):
                    results.append(p)
                    found = True
                elif (p / "parts").is_dir():
                    results.append(p / "parts")
                    found = True
            if (p / "sweep.csv").is_file():
                sweeps.append(p / "sweep.csv")
                found = True
            if not found:
                raise ICSValueError(
                    f"RESULTS {str(p)!r} holds no results.csv, sweep.csv or result parts"
                )
        else:
            raise ICSValueError(f"RESULTS {str(p)!r} does not exist")
    return results, sweeps


def _design_of(path: Path) -> Any:
    """The main job's runs (``design`` of the run folder's config.json), or None."""
    import pandas as pd

    folder = path if path.is_dir() else path.parent
    for candidate in (folder / "config.json", folder.parent / "config.json"):
        try:
            design = json.loads(candidate.read_text()).get("design")
        except (OSError, ValueError, AttributeError):
            continue
        if design:
            return pd.DataFrame(design)
    return None


def _cmd_plot(args: argparse.Namespace) -> int:
    import pandas as pd

    from ics_toolkit.experiments import SWEEP_COLUMNS, draw_results, draw_sweep
    from ics_toolkit.plots import check_formats
    from ics_toolkit.report import check_columns
    from ics_toolkit.results import load_results

    out = _check_out(args.out)
    formats = check_formats(args.formats, "--formats")
    results, sweeps = _collect(args.results)
    files: list[Path] = []
    if results:
        table = pd.concat([load_results(p, strict=args.strict) for p in results], ignore_index=True)
        design = _design_of(results[0]) if len(results) == 1 else None
        files += draw_results(
            table, out, quantity=args.quantity, view=args.view, formats=formats, design=design
        )
    for sweep in sweeps:
        table = _read_table(sweep)
        need = ("variant", "dim", "quantity", "value")
        check_columns(table, [c for c in SWEEP_COLUMNS if c in need], f"RESULTS {str(sweep)!r}")
        files += draw_sweep(table, out, formats=formats)
    _print_files(files)
    return 0


_COMMANDS = {"run": _cmd_run, "sweep-dim": _cmd_sweep, "plot": _cmd_plot}


def _one_line(err: object) -> str:
    return " ".join(str(err).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 when the toolkit refused a value (one line on stderr), 2 for
        usage errors, 130 when interrupted.

    Examples
    --------
    >>> main(["--version"])
    ics-toolkit 0.1.0
    0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except _UsageError as err:
        print(f"{PROG}: error: {_one_line(err)} (see {PROG} --help)", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help and --version print, then exit
        return int(exit_.code or 0)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Warnings as one line each (``ics-toolkit: warning: ...``), without source lines."""
    print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr if file is None else file)


def _run(args: argparse.Namespace) -> int:
    try:
        return _COMMANDS[args.command](args)
    except ICSError as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. permission denied on the output folder
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (results measured so far are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
