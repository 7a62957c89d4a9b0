"""Test setup: Triton interpreter on CPU machines, hypothesis profiles, the device under test."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: the kernels then run on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

# `python -m pytest` puts the repository root on sys.path, where the top-level kernels/ folder (installed
# as precision_ce.kernels) would shadow the PyPI package `kernels` that transformers imports. The
# package is installed, so the root is not needed on the path; spawned test processes inherit this path.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != _ROOT]

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# PRECISION_CE_HYPOTHESIS=thorough for thousands of examples per property.
settings.load_profile(os.environ.get("PRECISION_CE_HYPOTHESIS", "ci"))


@pytest.fixture
def device() -> str:
    """Where kernels run: CUDA when present (compiled kernels), else the CPU (interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_blocks(monkeypatch):
    """Small kernel blocks so rows span several blocks and end in a ragged tail."""
    from precision_ce import triton_backend

    monkeypatch.setattr(triton_backend, "FORCED_BLOCK", 16)
