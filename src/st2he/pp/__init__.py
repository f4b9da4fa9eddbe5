"""Preprocessing: the ST2HE input picture, gene palettes, density images, tiles and tables of units."""

from ._aggregate import aggregate_transcripts
from ._molecules import MoleculesDroppedWarning
from ._palette import make_palette
from ._rasterize import StainWarning, rasterize_transcripts, transcript_density
from ._tiles import make_tiles

__all__ = [
    "MoleculesDroppedWarning",
    "StainWarning",
    "aggregate_transcripts",
    "make_palette",
    "make_tiles",
    "rasterize_transcripts",
    "transcript_density",
]
