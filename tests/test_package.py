"""The package imports cheaply and without side effects."""

import subprocess
import sys


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return out.stdout.strip()


def test_import_has_no_side_effects():
    code = (
        "import sys, ics_toolkit\n"
        "import torch\n"
        "print(torch.cuda.is_initialized(), 'ot' in sys.modules,"
        " 'matplotlib' in sys.modules)"
    )
    assert _run(code) == "False False False"


def test_errors_are_also_builtins():
    import ics_toolkit as ics

    assert issubclass(ics.ICSValueError, ValueError)
    assert issubclass(ics.ICSTypeError, TypeError)
    assert issubclass(ics.ICSUsageError, RuntimeError)
    assert issubclass(ics.SolverError, RuntimeError)
    assert issubclass(ics.ICSValueError, ics.ICSError)


def test_unknown_attribute_raises_attribute_error():
    import ics_toolkit as ics

    try:
        ics.does_not_exist  # noqa: B018
    except AttributeError as err:
        assert "does_not_exist" in str(err)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")
