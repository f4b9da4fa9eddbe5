"""Shared fixtures: the real data crops beside the repository (../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# keep the 2-core CI machines responsive when torch and dask share them
os.environ.setdefault("OMP_NUM_THREADS", "2")

SHARED_DATA = Path(os.environ.get("ST2HE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real data crops; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data crops not found at {SHARED_DATA} (set ST2HE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one torch thread.

    Tiny models gain nothing from threads, and idle OpenMP threads spin on a busy 2-core machine.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fingerprint(values, k: int = 4) -> tuple:
    """Size, mean and ``k`` fixed random projections of the centred values (float64).

    For "unchanged" checks of floating-point outputs: a byte hash also changes with the last bits that numpy's SIMD
    kernels (which differ between CPUs) give to float32 trigonometry, while a moved molecule or outline moves a
    projection by about its displacement. Compare with ``atol`` of a few thousandths of the values' unit.
    """
    import numpy as np

    a = np.asarray(values, dtype=np.float64).ravel()
    w = np.random.default_rng(0).standard_normal((k, a.size))
    return (a.size, float(a.mean()), *(float(v) for v in w @ (a - a.mean())))


@pytest.fixture(scope="session")
def fingerprint():
    """:func:`_fingerprint`: size, mean and projections of float values, robust to last-bit differences."""
    return _fingerprint
