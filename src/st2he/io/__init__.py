"""Readers: Xenium, CosMx and MERSCOPE output folders (and H&E images) into SpatialData objects in micrometres."""

from st2he._raster import Raster

from ._common import CONTROL_PREFIXES, NUCLEAR_STAIN_KEYS
from ._cosmx import read_cosmx
from ._he import read_he_image
from ._merscope import read_merscope
from ._write import write_element
from ._xenium import read_xenium

__all__ = [
    "CONTROL_PREFIXES",
    "NUCLEAR_STAIN_KEYS",
    "Raster",
    "read_cosmx",
    "read_he_image",
    "read_merscope",
    "read_xenium",
    "write_element",
]
