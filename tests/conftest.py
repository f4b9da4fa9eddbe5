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
