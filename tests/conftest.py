"""Shared test configuration."""

import os

from hypothesis import HealthCheck, settings

# Small, deterministic hypothesis runs: CI has 2 cores and a time budget.
settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
