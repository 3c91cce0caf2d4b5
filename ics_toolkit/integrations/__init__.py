"""Callbacks for the training loops people use; each imports its framework only when used.

- :mod:`ics_toolkit.integrations.lightning`: ``ICSCallback`` for PyTorch Lightning
  (``pip install "ics-toolkit[lightning]"``);
- :mod:`ics_toolkit.integrations.transformers`: ``ICSCallback`` for the Hugging Face
  ``Trainer`` (``pip install "ics-toolkit[transformers]"``).

Importing ``ics_toolkit`` or this package imports neither framework.
"""

__all__: list[str] = []
