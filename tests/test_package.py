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


def test_every_public_name_resolves_even_after_its_module_is_imported():
    code = (
        "import importlib, ics_toolkit as ics\n"
        "for mod in set(ics._LAZY.values()):\n"
        "    importlib.import_module(mod)\n"
        "bad = [n for n in ics.__all__ if n != '__version__' and not callable(getattr(ics, n))]\n"
        "print(bad, callable(ics.capture), callable(ics.bounds))"
    )
    assert _run(code) == "[] True True"


def test_submodules_are_reachable_as_attributes():
    import ics_toolkit as ics

    assert ics.nn.Unitization.__name__ == "Unitization"
    assert callable(ics.views.flatten)
