"""Every bad argument of ICSMonitor fails at construction, naming the argument.

Each case below builds a monitor with one bad argument and checks the error type and
message. The same cases generate the bad-input table of docs/guide.md: the test
fails when the table is not current; regenerate it with

    python tests/test_monitor_inputs.py --write
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ics_toolkit as ics

ROOT = Path(__file__).parent.parent
GUIDE = ROOT / "docs" / "guide.md"
BEGIN, END = "<!-- bad-input-table -->", "<!-- /bad-input-table -->"


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def probe(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(1))


def targets(n: int = 16) -> torch.Tensor:
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(2))


def nan_probe() -> torch.Tensor:
    x = probe()
    x[3, 1] = float("nan")
    return x


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(probe())


def loader(n: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(probe(n), targets(n)))


def raising_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    raise KeyError("logits")


def per_sample_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


GRADIENT = {"gradient": True, "loss_fn": nn.functional.cross_entropy, "targets": targets()}


@dataclass
class Case:
    argument: str
    value: str  # the bad value, as the table shows it
    kwargs: dict[str, Any]
    error: type[Exception]
    match: str  # a regex the message must match
    extra: dict[str, Any] = field(default_factory=dict)  # the other arguments it needs


CASES = [
    Case("model", '"net" (not a Module)', {"model": "net"}, ics.ICSTypeError, r"`model` must be"),
    Case("probe", "None", {"probe": None}, ics.ICSTypeError, r"`probe` is None"),
    Case("probe", "holds a NaN", {"probe": nan_probe()}, ics.ICSValueError, r"`probe` holds 1 non"),
    Case("probe", "1 sample", {"probe": probe(1)}, ics.ICSValueError, r"at least 2"),
    Case(
        "probe",
        "wrong feature size",
        {"probe": torch.randn(16, 5)},
        ics.ICSValueError,
        r"probe does not fit the model",
    ),
    Case(
        "probe",
        "DataLoader over an iterable dataset",
        {"probe": torch.utils.data.DataLoader(Stream())},
        ics.ICSTypeError,
        r"`probe` is a DataLoader over an iterable-style dataset",
    ),
    Case(
        "probe",
        "DataLoader of 1 sample",
        {"probe": loader(1)},
        ics.ICSValueError,
        r"need at least 2",
    ),
    Case("layers", '"nope"', {"layers": "nope"}, ics.ICSValueError, r"nope"),
    Case("every", "0", {"every": 0}, ics.ICSValueError, r"`every` must be a positive int"),
    Case("every", "2.5", {"every": 2.5}, ics.ICSTypeError, r"`every` must be an int"),
    Case("every", "True", {"every": True}, ics.ICSTypeError, r"`every` must be an int"),
    Case("every", '"log:x"', {"every": "log:x"}, ics.ICSValueError, r"END and N_POINTS must be"),
    Case("every", "[]", {"every": []}, ics.ICSValueError, r"`every` is an empty list"),
    Case("every", '[1, "2"]', {"every": [1, "2"]}, ics.ICSTypeError, r"must be ints"),
    Case("every", "[-1]", {"every": [-1]}, ics.ICSValueError, r"indices >= 0"),
    Case("methods", '["emd"]', {"methods": ["emd"]}, ics.ICSValueError, r"unknown method"),
    Case("methods", "[]", {"methods": []}, ics.ICSValueError, r"`methods`"),
    Case("views", '["rows"]', {"views": ["rows"]}, ics.ICSValueError, r"unknown view"),
    Case("where", '"middle"', {"where": "middle"}, ics.ICSValueError, r"`where` must be"),
    Case(
        "floor",
        '["sinkhorn"] (not among methods)',
        {"floor": ["sinkhorn"]},
        ics.ICSValueError,
        r"`floor` names",
    ),
    Case("bounds", '"yes"', {"bounds": "yes"}, ics.ICSTypeError, r"`bounds` must be True or"),
    Case("moments", "1", {"moments": 1}, ics.ICSTypeError, r"`moments` must be True or"),
    Case(
        "gradient",
        "True without loss_fn",
        {"gradient": True},
        ics.ICSValueError,
        r"needs `loss_fn`",
    ),
    Case(
        "loss_fn",
        '"mse" (not callable)',
        {"loss_fn": "mse"},
        ics.ICSTypeError,
        r"`loss_fn` must be callable",
    ),
    Case(
        "loss_fn",
        "raises on the probe",
        {**GRADIENT, "loss_fn": raising_loss},
        ics.ICSValueError,
        r"`loss_fn` failed on the probe",
    ),
    Case(
        "loss_fn",
        "returns one loss per sample",
        {**GRADIENT, "loss_fn": per_sample_loss},
        ics.ICSValueError,
        r"must return a floating scalar tensor",
    ),
    Case(
        "targets",
        "wrong number of samples",
        {**GRADIENT, "targets": targets(10)},
        ics.ICSValueError,
        r"`targets` match the probe",
    ),
    Case("n_projections", "0", {"n_projections": 0}, ics.ICSValueError, r"`n_projections` must be"),
    Case("seed", "-1", {"seed": -1}, ics.ICSValueError, r"`seed` must be an int in"),
    Case("seed", "1.5", {"seed": 1.5}, ics.ICSTypeError, r"`seed` must be an int in"),
    Case("probe_size", "0", {"probe_size": 0}, ics.ICSValueError, r"`probe_size` must be"),
    Case(
        "max_pixel_samples",
        "0",
        {"max_pixel_samples": 0},
        ics.ICSValueError,
        r"`max_pixel_samples`",
    ),
    Case("mode", '"test"', {"mode": "test"}, ics.ICSValueError, r"`mode` must be one of"),
    Case(
        "format",
        '"xlsx"',
        {"format": "xlsx", "path": "out"},
        ics.ICSValueError,
        r"`format` must be",
    ),
    Case("path", "an existing file", {"path": "file.txt"}, ics.ICSValueError, r"is a file"),
    Case("run", "3", {"run": 3}, ics.ICSTypeError, r"`run` must be None or a str"),
    Case(
        "capture_dtype",
        "torch.int32",
        {"capture_dtype": torch.int32},
        ics.ICSTypeError,
        r"`capture_dtype` must be a floating",
    ),
    Case(
        "rtol",
        "-1.0",
        {"rtol": -1.0},
        ics.ICSValueError,
        r"`rtol` must be a positive number \(finite, > 0\)",
    ),
    Case(
        "method_options",
        "a list",
        {"method_options": [("sinkhorn", {})]},
        ics.ICSTypeError,
        r"`method_options` must be a dict",
    ),
    Case(
        "method_options",
        '{"sinkorn": {}}',
        {"method_options": {"sinkorn": {}}},
        ics.ICSValueError,
        r"`method_options` key 'sinkorn' must be one of .*\(did you mean 'sinkhorn'\?\)",
    ),
    Case(
        "method_options",
        '{"sinkhorn": 0.05}',
        {"method_options": {"sinkhorn": 0.05}},
        ics.ICSTypeError,
        r"`method_options\['sinkhorn'\]` must be a dict",
    ),
    Case(
        "method_options",
        '{"exact": {"reg": 0.1}}',
        {"method_options": {"exact": {"reg": 0.1}}},
        ics.ICSTypeError,
        r"unknown option\(s\) 'reg' for method='exact'",
    ),
    Case(
        "method_options",
        '{"sinkhorn": {"reg": -1}}',
        {"method_options": {"sinkhorn": {"reg": -1}}},
        ics.ICSValueError,
        r"`reg` must be a positive number \(finite, > 0\)",
    ),
    Case(
        "method_options",
        '{"sliced": {"n_projections": 8}}',
        {"method_options": {"sliced": {"n_projections": 8}}},
        ics.ICSValueError,
        r"pass n_projections= to the monitor",
    ),
    Case(
        "sketch", "0", {"sketch": 0}, ics.ICSValueError, r"`sketch` must be a positive int or None"
    ),
    Case(
        "sketch",
        "with the pixel view",
        {"sketch": 8, "views": ("flatten", "pixel")},
        ics.ICSValueError,
        r"pass views=\('flatten',\)",
    ),
    Case("rank", "-1", {"rank": -1}, ics.ICSValueError, r"`rank` must be a non-negative int"),
    Case("gather", '"yes"', {"gather": "yes"}, ics.ICSTypeError, r"`gather` must be a bool"),
    Case("gather_timeout", "0", {"gather_timeout": 0}, ics.ICSValueError, r"gather_timeout"),
    Case("group", "without torch.distributed", {"group": object()}, ics.ICSUsageError, r"`group`"),
    Case("on_error", '"ignore"', {"on_error": "ignore"}, ics.ICSValueError, r"`on_error` must be"),
]


def build(case: Case) -> None:
    kwargs = {"model": model(), "probe": probe(), **case.kwargs}
    ics.ICSMonitor(kwargs.pop("model"), kwargs.pop("probe"), **kwargs)


def message(case: Case) -> str:
    with pytest.raises(case.error) as info:
        build(case)
    return str(info.value)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `path` cases write relative to the current folder
    (tmp_path / "file.txt").write_text("a file, not a folder")
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.argument}-{c.value}")
def test_a_bad_argument_fails_at_construction_naming_it(case, in_tmp):
    with pytest.raises(case.error, match=case.match) as info:
        build(case)
    text = str(info.value)
    assert type(info.value) is case.error  # the exact class, not a builtin or a subclass
    named = case.argument in text or (case.argument == "model" and "Module" in text)
    assert named or case.argument in ("probe", "layers", "targets"), text


def test_there_are_at_least_25_categories():
    assert len({(c.argument, c.value) for c in CASES}) == len(CASES) >= 25


def table() -> str:
    lines = ["| argument | bad value | error | message |", "| --- | --- | --- | --- |"]
    for case in CASES:
        text = message(case).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{case.argument}` | {case.value} | `{case.error.__name__}` | {text} |")
    return "\n".join(lines)


BLOCK = re.compile(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), re.S)


def guide_block(text: str) -> str:
    found = BLOCK.search(text)
    assert found is not None, f"docs/guide.md has no {BEGIN} ... {END} block"
    return found.group(1).rstrip("\n")


def test_the_bad_input_table_in_the_guide_is_current(in_tmp):
    assert guide_block(GUIDE.read_text()) == table(), (
        "docs/guide.md's bad-input table is out of date: run "
        "python tests/test_monitor_inputs.py --write"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the table in docs/guide.md")
    args = parser.parse_args()
    import os
    import tempfile

    text = GUIDE.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        here = os.getcwd()
        os.chdir(tmp)
        Path("file.txt").write_text("a file, not a folder")
        try:
            new = table()
        finally:
            os.chdir(here)
    if not args.write:
        print(new)
        return
    guide_block(text)  # the markers are there
    updated = BLOCK.sub(lambda _: f"{BEGIN}\n{new}\n{END}", text)
    GUIDE.write_text(updated)
    print(f"wrote {len(CASES)} rows to {GUIDE}", file=sys.stderr)


if __name__ == "__main__":
    main()
