"""Shared fixtures: offline hub, one OMP thread, and one local Ray cluster per test session.

Tests under tests/unit need no Ray; tests that take the ``ray_cluster`` fixture share a single
local cluster (starting one costs ~3 s; one per test would dominate the suite's time).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the whole session; actors must request fractional CPUs."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,  # logical CPUs: fractional requests share the machine's 2 real cores
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
