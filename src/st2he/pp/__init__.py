"""Preprocessing: the ST2HE input picture, gene palettes, density images and tiles."""

from ._palette import make_palette
from ._rasterize import rasterize_transcripts, transcript_density

__all__ = ["make_palette", "rasterize_transcripts", "transcript_density"]
