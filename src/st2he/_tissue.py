"""The one tissue rule of st2he: which pixels of a picture are tissue, for tiles, zero-shot and training."""

from __future__ import annotations

import numpy as np

#: Brightfield (H&E): a pixel is background when the mean of its RGB values (0-255) is at least this (white glass) ...
WHITE_LEVEL = 220
#: ... or when all three channels are darker than this (padding outside the scanned area, black borders).
BLACK_LEVEL = 25
#: Fluorescence and the ST2HE input picture (black background): tissue where the brightest channel exceeds this.
DARK_LEVEL = 10

RULES = ("brightfield", "fluorescence")


def tissue_mask(values, rule: str, *, channel_axis: int = 0, scale: float = 1.0):
    """Boolean tissue mask of ``values`` (numpy or dask), reducing ``channel_axis``.

    ``rule``: ``"brightfield"`` (tissue is neither white glass nor black padding; the first three channels are read as
    RGB) or ``"fluorescence"`` (tissue is brighter than the black background in some channel). ``scale`` maps the
    values to 0-255 (``255 / 65535`` for uint16, ``255`` for floats in ``[0, 1]``).
    """
    if rule == "brightfield":
        rgb = values.take(range(3), axis=channel_axis) if hasattr(values, "take") else values
        grey = rgb.astype(np.float32).mean(axis=channel_axis) * scale
        brightest = rgb.max(axis=channel_axis).astype(np.float32) * scale
        return (grey < WHITE_LEVEL) & (brightest >= BLACK_LEVEL)
    if rule == "fluorescence":
        return values.max(axis=channel_axis).astype(np.float32) * scale > DARK_LEVEL
    msg = f"Unknown tissue rule {rule!r}; use one of {RULES}."
    raise ValueError(msg)


def value_scale(dtype) -> float:
    """Factor that maps values of ``dtype`` to 0-255 (floats are taken as 0-1)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return 255.0
    return 255.0 / float(np.iinfo(dtype).max)
