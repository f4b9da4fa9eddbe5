"""Import ``st2he.models`` modules without ``st2he/__init__`` (which needs spatialdata), for bare GPU machines."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_models(*names: str) -> tuple[types.ModuleType, ...]:
    """Return ``st2he.models.<name>`` for each name; without spatialdata, the packages are stubbed to their folders."""
    try:
        import spatialdata  # noqa: F401
    except ImportError:
        for name, path in (("st2he", ROOT / "src" / "st2he"), ("st2he.models", ROOT / "src" / "st2he" / "models")):
            if name not in sys.modules:
                module = types.ModuleType(name)
                module.__path__ = [str(path)]
                sys.modules[name] = module
    return tuple(importlib.import_module(f"st2he.models.{name}") for name in names)
