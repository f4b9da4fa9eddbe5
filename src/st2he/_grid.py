"""The pixel grid that places an image over the molecules, in micrometres of the ``global`` coordinate system."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

COORDINATE_SYSTEM = "global"


@dataclass(frozen=True)
class Grid:
    """A regular pixel grid in the ``global`` coordinate system (1 unit = 1 µm).

    Pixel ``(row, col)`` covers ``y0 + row * pixel_size <= y < y0 + (row + 1) * pixel_size`` and the same
    for ``x`` with ``col``: row = y, no flips. The grid is what every image st2he writes carries as its
    transformation, so the image lies exactly over the molecules it was drawn from.

    Parameters
    ----------
    x0, y0
        Global coordinates (µm) of the top-left corner of pixel ``(0, 0)``.
    pixel_size
        Edge length of one pixel in µm.
    height, width
        Number of rows and columns.
    """

    x0: float
    y0: float
    pixel_size: float
    height: int
    width: int

    def __post_init__(self) -> None:
        if not (np.isfinite(self.pixel_size) and self.pixel_size > 0):
            msg = f"pixel_size must be a positive number of micrometres, got {self.pixel_size!r}."
            raise ValueError(msg)
        if self.height < 0 or self.width < 0:
            msg = f"A grid cannot have a negative size, got height={self.height}, width={self.width}."
            raise ValueError(msg)

    @classmethod
    def from_bounds(cls, x_min: float, y_min: float, x_max: float, y_max: float, pixel_size: float) -> Grid:
        """Smallest grid of ``pixel_size`` µm pixels, anchored at ``(x_min, y_min)``, that covers the box."""
        if not (x_max >= x_min and y_max >= y_min):
            msg = f"Empty or inverted bounds: x {x_min}..{x_max}, y {y_min}..{y_max} µm."
            raise ValueError(msg)
        width = max(1, math.ceil((x_max - x_min) / pixel_size - 1e-9))
        height = max(1, math.ceil((y_max - y_min) / pixel_size - 1e-9))
        # a point exactly on x_max must still land inside the grid
        if x_min + width * pixel_size <= x_max:
            width += 1
        if y_min + height * pixel_size <= y_max:
            height += 1
        return cls(float(x_min), float(y_min), float(pixel_size), int(height), int(width))

    @classmethod
    def from_element(cls, element, coordinate_system: str = COORDINATE_SYSTEM) -> Grid:
        """The full-resolution grid of an axis-aligned image or labels element with square pixels.

        Images st2he writes always have one; read any other element through :class:`st2he._raster.Raster`.
        """
        from ._raster import Raster

        return Raster(element, coordinate_system).grid()

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        return (self.height, self.width)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)`` in µm."""
        return (self.x0, self.y0, self.x0 + self.width * self.pixel_size, self.y0 + self.height * self.pixel_size)

    def transformation(self):
        """The spatialdata transformation from pixels to global µm (scale then translation)."""
        from spatialdata.transformations import Scale, Sequence, Translation

        return Sequence(
            [
                Scale([self.pixel_size, self.pixel_size], axes=("y", "x")),
                Translation([self.y0, self.x0], axes=("y", "x")),
            ]
        )

    def to_pixel(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Integer ``(row, col)`` of the pixels containing global points ``(x, y)``; may fall outside."""
        col = np.floor((np.asarray(x, dtype=np.float64) - self.x0) / self.pixel_size).astype(np.int64)
        row = np.floor((np.asarray(y, dtype=np.float64) - self.y0) / self.pixel_size).astype(np.int64)
        return row, col

    def pixel_centers(self) -> tuple[np.ndarray, np.ndarray]:
        """Global ``(y, x)`` of the pixel centres along each axis."""
        ys = self.y0 + (np.arange(self.height) + 0.5) * self.pixel_size
        xs = self.x0 + (np.arange(self.width) + 0.5) * self.pixel_size
        return ys, xs

    def crop(self, row0: int, row1: int, col0: int, col1: int) -> Grid:
        """Sub-grid of rows ``row0:row1`` and columns ``col0:col1``."""
        row0, col0 = max(row0, 0), max(col0, 0)
        row1, col1 = min(row1, self.height), min(col1, self.width)
        return Grid(
            self.x0 + col0 * self.pixel_size,
            self.y0 + row0 * self.pixel_size,
            self.pixel_size,
            max(row1 - row0, 0),
            max(col1 - col0, 0),
        )

    def blocks(self, chunk: int) -> Iterator[tuple[slice, slice]]:
        """Row and column slices of ``chunk`` x ``chunk`` blocks covering the grid."""
        for r in range(0, self.height, chunk):
            for c in range(0, self.width, chunk):
                yield slice(r, min(r + chunk, self.height)), slice(c, min(c + chunk, self.width))


def _scale0(element):
    """The full-resolution DataArray of a single- or multi-scale raster element."""
    if hasattr(element, "children") and "scale0" in getattr(element, "children", {}):
        node = element["scale0"]
        return next(iter(node.ds.data_vars.values()))
    return element
