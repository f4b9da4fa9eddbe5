"""Readers: Xenium, CosMx and MERSCOPE output folders into SpatialData objects in micrometres."""

from ._common import CONTROL_PREFIXES, NUCLEAR_STAIN_KEYS
from ._merscope import read_merscope
from ._xenium import read_xenium

__all__ = ["CONTROL_PREFIXES", "NUCLEAR_STAIN_KEYS", "read_merscope", "read_xenium"]
