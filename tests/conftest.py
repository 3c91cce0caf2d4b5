"""Shared test configuration."""

import os

import pytest
import torch
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


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors are fastest on one thread, and CI's 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
