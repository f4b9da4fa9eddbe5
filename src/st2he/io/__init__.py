"""Readers: Xenium, CosMx, MERSCOPE, Visium (HD) output folders, HEST-1k samples and H&E images into SpatialData in µm."""

from st2he._raster import Raster

from ._common import CONTROL_PREFIXES, NUCLEAR_STAIN_KEYS
from ._cosmx import read_cosmx
from ._he import read_he_image
from ._hest import read_hest
from ._merscope import read_merscope
from ._visium import read_visium
from ._write import write_element
from ._xenium import read_xenium

__all__ = [
    "CONTROL_PREFIXES",
    "NUCLEAR_STAIN_KEYS",
    "Raster",
    "read_cosmx",
    "read_he_image",
    "read_hest",
    "read_merscope",
    "read_visium",
    "read_xenium",
    "write_element",
]
