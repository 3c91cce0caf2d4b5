"""Write docs/api.md, the API reference, from the public objects' signatures and docstrings.

Run ``python docs/make_api.py`` after changing a public signature or docstring; the
test suite checks that docs/api.md is up to date (tests/test_docs.py).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

# (section title, module, public names in the order they are listed)
SECTIONS: list[tuple[str, str, list[str]]] = [
    (
        "The Earth Mover engine",
        "ics_toolkit.distances",
        [
            "wasserstein",
            "wasserstein_many",
            "sampling_floor",
            "random_directions",
            "projected_w1",
            "columnwise_w1",
            "METHODS",
            "ORDER_RTOL",
            "DEFAULT_MEMORY_LIMIT",
        ],
    ),
    ("Capturing layer outputs", "ics_toolkit.recording", ["capture", "dry_run", "Recorder"]),
    ("Views", "ics_toolkit.views", ["flatten", "pixel", "channel", "token", "view"]),
    (
        "Bounds",
        "ics_toolkit.bounding",
        ["bounds", "NormState", "check_order", "BoundCheck", "RTOL", "ATOL"],
    ),
    ("Moment drift", "ics_toolkit.moments", ["moment_drift"]),
    ("Gradient ICS", "ics_toolkit.gradient_shift", ["gradient_ics", "weighted_layers"]),
    ("The monitor", "ics_toolkit.monitor", ["ICSMonitor"]),
    (
        "Schedules",
        "ics_toolkit.schedules",
        ["linear", "explicit", "logarithmic", "as_schedule"],
    ),
    (
        "Results",
        "ics_toolkit.results",
        ["load_results", "to_wide", "ResultStore", "ResultWriter", "COLUMNS"],
    ),
    (
        "Normalization layers",
        "ics_toolkit.nn",
        ["Unitization", "replace_norm", "normalized", "unitization_scale"],
    ),
    (
        "Reference models",
        "ics_toolkit.models",
        ["make_norm", "MLP", "SmallCNN", "cifar_resnet", "resnet20", "resnet56", "resnet110"],
    ),
    (
        "Data",
        "ics_toolkit.data",
        [
            "Dataset",
            "load_dataset",
            "load_digits",
            "make_blobs",
            "make_shapes",
            "load_cifar10",
            "load_cifar100",
        ],
    ),
    ("Training loop", "ics_toolkit.train", ["train", "evaluate", "TrainResult"]),
    (
        "Plots",
        "ics_toolkit.plots",
        ["plot_ics", "plot_heatmap", "plot_compare", "plot_bounds_vs_dim", "save_figure"],
    ),
    (
        "Summaries",
        "ics_toolkit.report",
        ["summary", "summary_markdown", "bound_band", "fit_slopes"],
    ),
    ("Experiments", "ics_toolkit.experiments", ["run_main", "sweep_dim", "sweep_summary"]),
    ("Sketches of wide layers", "ics_toolkit.sketch", ["Sketch", "SketchTransform"]),
    (
        "Memory plan",
        "ics_toolkit.memory_plan",
        ["MemoryPlan", "available_memory"],
    ),
    ("Distributed training", "ics_toolkit.distributed", ["shard"]),
    ("FSDP2 and wrappers", "ics_toolkit.fsdp", ["check_wrappers", "resharded", "is_fsdp"]),
    ("Logger sinks", "ics_toolkit.sinks", ["as_sink", "scalars", "Sink"]),
    ("PyTorch Lightning", "ics_toolkit.integrations.lightning", ["ICSCallback"]),
    (
        "Hugging Face Trainer",
        "ics_toolkit.integrations.transformers",
        ["ICSCallback", "STATE_FILE"],
    ),
    (
        "Errors and warnings",
        "ics_toolkit.errors",
        [
            "ICSError",
            "ICSValueError",
            "ICSTypeError",
            "ICSUsageError",
            "ICSMemoryError",
            "SolverError",
            "ICSWarning",
            "ICSRuntimeWarning",
        ],
    ),
]

_HEADING = re.compile(r"^(\w[\w ]*)\n-+\n", re.MULTILINE)


def _sections(doc: str) -> dict[str, str]:
    """Split a NumPy-style docstring into its summary and named sections."""
    parts = _HEADING.split(doc)
    out = {"": parts[0].strip()}
    for title, body in zip(parts[1::2], parts[2::2], strict=True):
        out[title.strip()] = body.rstrip()
    return out


def _parameters(body: str) -> list[str]:
    """One bullet per ``name : type`` entry of a section, with its whole description."""
    out: list[list[str]] = []
    for line in body.splitlines():
        if line.strip() and not line.startswith(" "):
            out.append([f"- `{line.strip()}`"])
        elif out and line.strip():
            out[-1].append(line.strip())
    return [entry[0] + (": " + " ".join(entry[1:]) if entry[1:] else "") for entry in out]


def _signature(obj: object, name: str) -> str:
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return name
    # postponed annotations are strings: show them as code, not as quoted strings
    text = re.sub(r"(: |-> )'([^']*)'", r"\1\2", str(sig))
    text = re.sub(r"<function (\S+) at 0x[0-9a-f]+>", r"\1", text)  # no memory addresses
    if inspect.isclass(obj):
        text = text.replace(" -> None", "")
    return f"{name}{text}"


def _entry(module: str, name: str) -> str:
    obj = getattr(importlib.import_module(module), name)
    path = f"{module}.{name}"
    if not (inspect.isclass(obj) or callable(obj)):  # a constant
        return f"### `{path}`\n\n`{name} = {obj!r}`\n"
    kind = "class" if inspect.isclass(obj) else "function"
    doc = _sections(inspect.cleandoc(obj.__doc__ or ""))
    lines = [f"### `{path}` ({kind})", "", "```python", _signature(obj, name), "```", ""]
    if doc[""]:
        lines += [doc[""], ""]
    for title in ("Parameters", "Attributes"):
        if title in doc:
            lines += [f"*{title}:*", "", *_parameters(doc[title]), ""]
    for title in ("Returns", "Raises"):
        if title in doc:
            lines += [f"*{title}:*", "", *_parameters(doc[title]), ""]
    return "\n".join(lines)


def _cli() -> str:
    import os

    from ics_toolkit.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal: fix the width
    parser = build_parser()
    blocks = [parser.format_help()]
    for action in parser._subparsers._group_actions:  # argparse has no public API for this
        for name, sub in action.choices.items():
            blocks.append(f"$ ics-toolkit {name} --help\n{sub.format_help()}")
    return "```text\n" + "\n".join(b.rstrip() for b in blocks) + "\n```\n"


def render() -> str:
    """The whole of docs/api.md."""
    out = [
        "# API reference",
        "",
        "Generated by `python docs/make_api.py` from the signatures and docstrings; the",
        "docstrings themselves hold the full parameter descriptions, shapes and examples",
        "(`help(ics_toolkit.wasserstein)`). The names most users need are importable from",
        "the package root: `ics_toolkit.wasserstein`, `wasserstein_many`, `sampling_floor`,",
        "`capture`, `dry_run`, `Recorder`, `bounds`, `ICSMonitor`, `load_results`,",
        "`to_wide`, `gradient_ics`, `replace_norm` and the error classes.",
        "",
        "## Contents",
        "",
    ]
    for title, module, _ in SECTIONS:
        anchor = re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")
        out.append(f"- [{title}](#{anchor}) (`{module}`)")
    out += ["- [Command line](#command-line)", ""]
    for title, module, names in SECTIONS:
        out += [f"## {title}", ""]
        out += [_entry(module, name) for name in names]
    out += ["## Command line", "", _cli()]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    """Write docs/api.md, or with ``--check`` report whether it is stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    args = parser.parse_args()
    target = Path(__file__).with_name("api.md")
    text = render()
    if args.check:
        # the command-line section follows argparse's formatting, which changes between
        # Python versions: only the Python API part must match exactly
        def api_part(doc: str) -> str:
            return doc.split("## Command line\n\n```text")[0]

        if api_part(target.read_text()) != api_part(text):
            print("docs/api.md is stale: run python docs/make_api.py", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
