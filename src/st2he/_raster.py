"""The one raster layer: read any image or labels element in any coordinate system, at any µm per pixel.

Every st2he module that reads pixels (evaluation, training pairs, zero-shot tiles, plots) goes through
:class:`Raster`: it takes the element's pyramid levels from spatialdata (:func:`spatialdata.get_pyramid_levels`), each
level's full affine transformation to the chosen coordinate system (rotation, flip, shear and non-square pixels
included), picks the coarsest level that still resolves the wanted pixel size, reads only the chunks under the
region, and resamples them onto an axis-aligned :class:`~st2he._grid.Grid` with one resampler (area averaging by the
whole factor between the level and the grid, then bilinear interpolation through the affine map).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._grid import COORDINATE_SYSTEM, Grid

#: A level resolves a wanted pixel size when its pixels are at most this much larger (1 % slack: pyramids of odd-sized
#: images have levels whose scales are a hair off a power of two).
LEVEL_SLACK = 1.01
#: Largest output grid (pixels) a single read may ask for; larger reads are a caller's error, not a hang.
MAX_READ_PIXELS = 1 << 30


@dataclass(frozen=True)
class Level:
    """One pyramid level: its ``(c, y, x)`` data and the affine map from its pixels to the coordinate system.

    ``affine`` maps ``(x, y, 1)`` in pixel units (pixel ``(row, col)`` covers ``col <= x < col + 1`` and
    ``row <= y < row + 1``) to ``(X, Y, 1)`` in the units of the coordinate system.
    """

    data: object
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        return int(self.data.sizes["y"]), int(self.data.sizes["x"])

    @property
    def pixel_sizes(self) -> tuple[float, float]:
        """Edge lengths ``(along x, along y)`` of one pixel in the coordinate system's units."""
        a = self.affine
        return float(math.hypot(a[0, 0], a[1, 0])), float(math.hypot(a[0, 1], a[1, 1]))

    @property
    def pixel_size(self) -> float:
        """The coarser of the two pixel edges: what this level resolves."""
        return max(self.pixel_sizes)


class Raster:
    """An image or labels element as st2he reads it: its pyramid levels placed in one coordinate system.

    Parameters
    ----------
    element
        A spatialdata image or labels element, single-scale (``DataArray``) or multiscale (``DataTree``).
    coordinate_system
        The coordinate system to read in (its units are those of every region and pixel size given).
    name
        The element's key, for messages.

    Examples
    --------
    >>> raster = st2he.io.Raster(sdata.images["he_image"])
    >>> raster.bounds  # (x_min, y_min, x_max, y_max) in µm
    >>> rgb = raster.read_region((1000, 1000, 1200, 1200), pixel_size=1.0)  # (3, 200, 200) float32
    """

    def __init__(self, element, coordinate_system: str = COORDINATE_SYSTEM, *, name: str | None = None) -> None:
        from spatialdata import get_pyramid_levels
        from spatialdata.transformations import get_transformation

        self.name = name or "the image"
        self.coordinate_system = coordinate_system
        arrays = get_pyramid_levels(element) if _is_multiscale(element) else [element]
        levels = []
        for i, data in enumerate(arrays):
            transformations = get_transformation(data, get_all=True)
            if coordinate_system not in transformations:
                msg = (
                    f"{self.name} has no transformation to the coordinate system {coordinate_system!r} (it has "
                    f"{sorted(transformations)}). Pass one of those as coordinate_system, or add one with "
                    "spatialdata.transformations.set_transformation."
                )
                raise ValueError(msg)
            affine = np.asarray(
                transformations[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")),
                dtype=np.float64,
            )
            det = affine[0, 0] * affine[1, 1] - affine[0, 1] * affine[1, 0]
            if not (np.all(np.isfinite(affine)) and abs(det) > 0):
                msg = (
                    f"{self.name} (level {i}) has a degenerate transformation to {coordinate_system!r}: {affine[:2].tolist()}. "
                    "Give it an invertible affine transformation."
                )
                raise ValueError(msg)
            levels.append(Level(data, affine))
        self.levels: list[Level] = levels

    # ------------------------------------------------------------------------------------------------ geometry

    @property
    def level0(self):
        """The full-resolution ``(c, y, x)`` DataArray (lazy where the element is)."""
        return self.levels[0].data

    @property
    def affine(self) -> np.ndarray:
        """The full-resolution level's 3x3 affine from pixels to the coordinate system."""
        return self.levels[0].affine

    @property
    def pixel_size(self) -> float:
        """µm (units of the coordinate system) per pixel of the full-resolution level (the coarser edge)."""
        return self.levels[0].pixel_size

    @property
    def channels(self) -> list[str]:
        """Channel names (``c`` coordinate), or ``[]`` for labels."""
        data = self.level0
        return [str(c) for c in data.coords["c"].values] if "c" in data.coords else []

    def check_rgb(self, *, what: str, step: str) -> slice:
        """The colour channels of an H&E element: 3 channels, or 4 with an alpha channel last (dropped).

        Anything else raises, naming ``what`` (the element, as the user gave it) and ``step`` (what reads it).
        """
        data = self.level0
        n = int(data.shape[0]) if data.ndim == 3 else 1
        names = [c.lower() for c in self.channels]
        alpha = n == 4 and (not names or names[3] in ("a", "alpha") or names == ["0", "1", "2", "3"])
        if n == 3 or alpha:
            return slice(0, 3)
        msg = (
            f"{what} has {n} channel{'s' if n != 1 else ''} {self.channels}; {step} reads RGB H&E: 3 channels, or 4 "
            "with an alpha channel last. Give the element of its colour channels (e.g. image.sel(c=['r', 'g', 'b']))."
        )
        raise ValueError(msg)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)`` of the element's footprint (its corners' bounding box)."""
        h, w = self.levels[0].shape
        corners = self.affine @ np.array([[0, w, 0, w], [0, 0, h, h], [1, 1, 1, 1]], dtype=np.float64)
        return (
            float(corners[0].min()),
            float(corners[1].min()),
            float(corners[0].max()),
            float(corners[1].max()),
        )

    def is_axis_aligned(self, level: int = 0) -> bool:
        """True when ``level`` has no rotation, shear or flip (positive scales plus a translation)."""
        a = self.levels[level].affine
        return abs(a[0, 1]) < 1e-9 and abs(a[1, 0]) < 1e-9 and a[0, 0] > 0 and a[1, 1] > 0

    def grid(self) -> Grid:
        """The full-resolution level as a :class:`~st2he._grid.Grid` (axis-aligned, square pixels only).

        Images st2he writes (input pictures, virtual H&E) always have such a grid; read anything else with
        :meth:`read`.
        """
        a = self.affine
        if not self.is_axis_aligned():
            msg = (
                f"{self.name} is rotated, sheared or flipped in {self.coordinate_system!r}; it has no axis-aligned "
                "pixel grid. Read it onto one with Raster.read / Raster.read_region."
            )
            raise ValueError(msg)
        if not math.isclose(a[0, 0], a[1, 1], rel_tol=1e-6):
            msg = (
                f"{self.name} has non-square pixels ({a[0, 0]:.6g} x {a[1, 1]:.6g}); it has no square pixel grid. "
                "Read it onto one with Raster.read / Raster.read_region."
            )
            raise ValueError(msg)
        h, w = self.levels[0].shape
        return Grid(float(a[0, 2]), float(a[1, 2]), float(a[0, 0]), h, w)

    def level_for(self, pixel_size: float | None, *, slack: float = LEVEL_SLACK) -> int:
        """Index of the coarsest level whose pixels are no larger than ``pixel_size`` (level 0 when none is).

        ``slack``: a level whose pixels are at most this factor larger still counts.
        """
        if pixel_size is None:
            return 0
        best = 0
        for i, level in enumerate(self.levels):
            if level.pixel_size <= pixel_size * slack:
                best = i
        return best

    # ------------------------------------------------------------------------------------------------ reading

    def read_region(
        self,
        region: tuple[float, float, float, float] | None = None,
        *,
        pixel_size: float | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Pixels over ``region`` (``x_min, y_min, x_max, y_max``; default: the whole footprint) at ``pixel_size``.

        ``pixel_size`` defaults to the full-resolution level's. Other keywords go to :meth:`read`.
        """
        x0, y0, x1, y1 = self.bounds if region is None else check_region(region)
        ps = self.pixel_size if pixel_size is None else check_pixel_size(pixel_size)
        return self.read(region_grid((x0, y0, x1, y1), ps), **kwargs)

    def read(
        self,
        grid: Grid,
        *,
        level: int | str = "auto",
        channels: slice | list[int] | None = None,
        order: int = 1,
        fill: float = 0.0,
        dtype=np.float32,
    ) -> np.ndarray:
        """Resample the element onto ``grid`` (in this raster's coordinate system): ``(c, grid.height, grid.width)``.

        Parameters
        ----------
        grid
            Axis-aligned target grid.
        level
            ``"auto"``: the coarsest level that resolves ``grid.pixel_size``; or a level index.
        channels
            Channels to read (default all).
        order
            ``1``: area averaging by the whole factor between the level and the grid, then bilinear interpolation;
            ``0``: nearest neighbour (labels).
        fill
            Value of grid pixels whose centres fall outside the element.
        dtype
            Output dtype; integer types are rounded and clipped to their range.
        """
        plan = self._plan(grid, level, channels, order)
        window = None if plan.empty else _read_window(plan.data, plan.channels, *plan.window)
        return _finish(plan, window, fill, np.dtype(dtype))

    def read_many(self, grids, *, level: int | str = "auto", **kwargs) -> list[np.ndarray]:
        """:meth:`read` for many grids (tiles) at once: their chunks are computed together, each once.

        ``level="auto"`` picks one level for all, from the median pixel size of the grids.
        """
        grids = list(grids)
        if not grids:
            return []
        if level == "auto":
            level = self.level_for(float(np.median([g.pixel_size for g in grids])))
        channels, order = kwargs.pop("channels", None), kwargs.pop("order", 1)
        fill, dtype = kwargs.pop("fill", 0.0), np.dtype(kwargs.pop("dtype", np.float32))
        if kwargs:
            msg = f"read_many got unexpected options {sorted(kwargs)}."
            raise TypeError(msg)
        plans = [self._plan(g, level, channels, order) for g in grids]
        lazy = [None if p.empty else _window(p.data, p.channels, *p.window) for p in plans]
        todo = [i for i, block in enumerate(lazy) if block is not None and hasattr(block, "dask")]
        if todo:
            import dask

            for i, block in zip(todo, dask.compute(*[lazy[i] for i in todo]), strict=True):
                lazy[i] = block
        return [
            _finish(p, None if block is None else np.asarray(block), fill, dtype)
            for p, block in zip(plans, lazy, strict=True)
        ]

    def _plan(self, grid: Grid, level, channels, order: int) -> _Plan:
        """Which level and window to read for ``grid``, and the affine map from the grid to that window."""
        if grid.height * grid.width > MAX_READ_PIXELS:
            msg = (
                f"Reading {self.name} onto {grid.height} x {grid.width} pixels of {grid.pixel_size:g} µm is too "
                "large for one read; read a smaller region or at a coarser pixel size."
            )
            raise ValueError(msg)
        lvl = self.levels[self.level_for(grid.pixel_size) if level == "auto" else int(level)]
        height, width = lvl.shape
        n_channels = int(lvl.data.shape[0]) if lvl.data.ndim == 3 else 1
        chan = slice(None) if channels is None else channels
        n_out = len(range(n_channels)[chan]) if isinstance(chan, slice) else len(chan)
        # target pixel (i, j) -> continuous source pixel index (row, col), index k covering [k - 0.5, k + 0.5)
        inv = np.linalg.inv(lvl.affine)
        ps = grid.pixel_size
        cx, cy = grid.x0 + 0.5 * ps, grid.y0 + 0.5 * ps
        matrix = np.array([[inv[1, 1] * ps, inv[1, 0] * ps], [inv[0, 1] * ps, inv[0, 0] * ps]])
        offset = np.array(
            [
                inv[1, 0] * cx + inv[1, 1] * cy + inv[1, 2] - 0.5,
                inv[0, 0] * cx + inv[0, 1] * cy + inv[0, 2] - 0.5,
            ]
        )
        corners = np.array([[0, 0], [0, grid.width - 1], [grid.height - 1, 0], [grid.height - 1, grid.width - 1]])
        src = corners @ matrix.T + offset
        # whole-factor area averaging along each source axis (anti-aliasing for downsampling)
        k_row = max(1, int(math.floor(np.abs(matrix[0]).max() + 1e-6))) if order else 1
        k_col = max(1, int(math.floor(np.abs(matrix[1]).max() + 1e-6))) if order else 1
        r_lo = int(math.floor(src[:, 0].min())) - 1 - k_row
        r_hi = int(math.ceil(src[:, 0].max())) + 2 + k_row
        c_lo = int(math.floor(src[:, 1].min())) - 1 - k_col
        c_hi = int(math.ceil(src[:, 1].max())) + 2 + k_col
        # pooling blocks aligned to multiples of k in the level, so a result never depends on the window
        r_lo, c_lo = max(0, r_lo) // k_row * k_row, max(0, c_lo) // k_col * k_col
        r_hi, c_hi = min(height, r_hi), min(width, c_hi)
        empty = r_hi <= r_lo or c_hi <= c_lo or grid.height == 0 or grid.width == 0
        return _Plan(lvl.data, chan, n_out, grid.shape, (r_lo, r_hi, c_lo, c_hi), matrix, offset, k_row, k_col, order, empty)


@dataclass(frozen=True)
class _Plan:
    data: object
    channels: object
    n_out: int
    shape: tuple[int, int]
    window: tuple[int, int, int, int]
    matrix: np.ndarray
    offset: np.ndarray
    k_row: int
    k_col: int
    order: int
    empty: bool


def _finish(plan: _Plan, window: np.ndarray | None, fill: float, out_dtype: np.dtype) -> np.ndarray:
    """Resample a plan's window (in the level's dtype) onto its grid."""
    out = np.full((plan.n_out, *plan.shape), fill, dtype=out_dtype)
    if plan.empty or window is None:
        return out
    r_lo, _, c_lo, _ = plan.window
    matrix, offset, k_row, k_col = plan.matrix, plan.offset, plan.k_row, plan.k_col
    exact = _signed_permutation(matrix) and k_row == 1 and k_col == 1 and np.allclose(offset, np.round(offset))
    if exact:  # whole pixels, at most swapped and flipped: views of the window, copied once into the output
        _copy_permuted(window, np.round(matrix).astype(int), np.round(offset).astype(int) - [r_lo, c_lo], out)
        return out
    window = window.astype(np.float64, copy=False)
    if plan.order == 0:
        values, inside = _nearest(window, matrix, offset - [r_lo, c_lo], plan.shape)
    else:
        if k_row > 1 or k_col > 1:
            window = _pool(window, k_row, k_col)
            scale = np.array([k_row, k_col], dtype=np.float64)
            shift = (scale - 1) / 2
            matrix = matrix / scale[:, None]
            offset = (offset - [r_lo, c_lo] - shift) / scale
        else:
            offset = offset - [r_lo, c_lo]
        values, inside = _bilinear(window, matrix, offset, plan.shape)
    if np.issubdtype(out_dtype, np.integer):
        info = np.iinfo(out_dtype)
        np.rint(values, out=values)
        np.clip(values, info.min, info.max, out=values)
    if inside is True:
        out[:] = values
    else:
        np.copyto(out, values, where=inside, casting="unsafe")
    return out


def region_grid(region, pixel_size: float) -> Grid:
    """The grid of ``pixel_size`` pixels anchored at the region's top-left corner that covers it (a partial last
    pixel counts when it is more than a millionth of a pixel)."""
    x0, y0, x1, y1 = region
    width = max(1, math.ceil((x1 - x0) / pixel_size - 1e-6))
    height = max(1, math.ceil((y1 - y0) / pixel_size - 1e-6))
    return Grid(float(x0), float(y0), float(pixel_size), int(height), int(width))


def check_pixel_size(pixel_size, parameter: str = "pixel_size") -> float:
    """``pixel_size`` as a positive finite float (numpy scalars accepted), or a ValueError naming ``parameter``."""
    try:
        value = float(pixel_size)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(pixel_size, bool) or not (math.isfinite(value) and value > 0):
        msg = f"{parameter} must be a positive number of µm, got {pixel_size!r}."
        raise ValueError(msg)
    return value


def check_region(region, parameter: str = "region") -> tuple[float, float, float, float]:
    """``(x_min, y_min, x_max, y_max)`` as finite floats with positive extent, or a ValueError."""
    try:
        values = tuple(float(v) for v in region)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values) or values[2] <= values[0] or values[3] <= values[1]:
        msg = f"{parameter} must be (x_min, y_min, x_max, y_max) with x_max > x_min and y_max > y_min, got {region!r}."
        raise ValueError(msg)
    return values  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _is_multiscale(element) -> bool:
    return hasattr(element, "children") and "scale0" in getattr(element, "children", {})


def _window(data, chan, r0: int, r1: int, c0: int, c1: int):
    """The (lazy where the level is) ``(c, r1 - r0, c1 - c0)`` window of a level."""
    arr = data.data
    return arr[chan, r0:r1, c0:c1] if arr.ndim == 3 else arr[None, r0:r1, c0:c1]


def _read_window(data, chan, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """``(c, r1 - r0, c1 - c0)`` values of a level (its dtype), reading only the chunks under the window."""
    block = _window(data, chan, r0, r1, c0, c1)
    if hasattr(block, "compute"):
        block = block.compute()
    return np.asarray(block)


def _axis_slices(coeff: int, off: int, n_out: int, n_src: int) -> tuple[slice, slice] | None:
    """Output and source slices along one axis for ``src = coeff * out + off`` (``coeff`` = +-1), or None."""
    lo, hi = (-off, n_src - off) if coeff > 0 else (off - n_src + 1, off + 1)
    a, b = max(lo, 0), min(hi, n_out)
    if b <= a:
        return None
    s0 = coeff * a + off
    return slice(a, b), (slice(s0, s0 + (b - a)) if coeff > 0 else slice(s0, (s0 - (b - a)) if s0 - (b - a) >= 0 else None, -1))


def _copy_permuted(window: np.ndarray, m: np.ndarray, off: np.ndarray, out: np.ndarray) -> None:
    """``out[:, i, j] = window[:, m @ (i, j) + off]`` for a signed permutation ``m``, where it lands in the window."""
    if m[0, 0] == 0:  # the output's rows run along the window's columns: transpose, then it is a diagonal map
        window = window.transpose(0, 2, 1)
        m = m[::-1]
        off = off[::-1]
    rows = _axis_slices(int(m[0, 0]), int(off[0]), out.shape[1], window.shape[1])
    cols = _axis_slices(int(m[1, 1]), int(off[1]), out.shape[2], window.shape[2])
    if rows is None or cols is None:
        return
    values = window[:, rows[1], cols[1]]
    if np.issubdtype(out.dtype, np.integer) and values.dtype != out.dtype:
        info = np.iinfo(out.dtype)
        values = np.clip(np.rint(values) if np.issubdtype(values.dtype, np.floating) else values, info.min, info.max)
    out[:, rows[0], cols[0]] = values


def _signed_permutation(matrix: np.ndarray) -> bool:
    """True for a map that only swaps and flips axes at unit scale (90-degree rotations, flips, the identity)."""
    m = np.round(matrix)
    return bool(np.allclose(matrix, m, atol=1e-9) and np.all(np.abs(m).sum(axis=0) == 1) and np.all(np.abs(m).sum(axis=1) == 1))


def _index_grids(matrix, offset, shape):
    i = np.arange(shape[0], dtype=np.float64)[:, None]
    j = np.arange(shape[1], dtype=np.float64)[None, :]
    rows = matrix[0, 0] * i + matrix[0, 1] * j + offset[0]
    cols = matrix[1, 0] * i + matrix[1, 1] * j + offset[1]
    return rows, cols


def _nearest(window, matrix, offset, shape):
    """Nearest-pixel values (labels) and the inside mask."""
    rows, cols = _index_grids(matrix, offset, shape)
    h, w = window.shape[1:]
    rows, cols = np.floor(rows + 0.5), np.floor(cols + 0.5)
    ri, ci = rows.astype(np.int64), cols.astype(np.int64)
    inside = (ri >= 0) & (ri < h) & (ci >= 0) & (ci < w)
    values = window[:, np.clip(ri, 0, h - 1), np.clip(ci, 0, w - 1)]
    return values, inside[None]


def _pool(window: np.ndarray, k_row: int, k_col: int) -> np.ndarray:
    """Mean over ``k_row x k_col`` blocks (a partial last block averages what it has)."""
    c, h, w = window.shape
    hh, ww = -(-h // k_row) * k_row, -(-w // k_col) * k_col
    if (hh, ww) != (h, w):
        padded = np.zeros((c, hh, ww), dtype=window.dtype)
        padded[:, :h, :w] = window
        counts = np.zeros((hh, ww), dtype=np.float64)
        counts[:h, :w] = 1
        sums = padded.reshape(c, hh // k_row, k_row, ww // k_col, k_col).sum(axis=(2, 4))
        n = counts.reshape(hh // k_row, k_row, ww // k_col, k_col).sum(axis=(1, 3))
        return sums / n
    return window.reshape(c, h // k_row, k_row, w // k_col, k_col).mean(axis=(2, 4))


def _bilinear(window, matrix, offset, shape):
    """Bilinear values through the affine map (edge pixels extended by half a pixel) and the inside mask."""
    from scipy import ndimage

    h, w = window.shape[1:]
    if matrix[0, 1] == 0 and matrix[1, 0] == 0:  # axis-aligned: bilinear is two 1-D linear interpolations
        values = _linear_axis(_linear_axis(window, matrix[0, 0], offset[0], shape[0], axis=1), matrix[1, 1], offset[1], shape[1], axis=2)
    else:
        values = np.empty((window.shape[0], *shape), dtype=np.float64)
        for k in range(window.shape[0]):
            ndimage.affine_transform(window[k], matrix, offset=offset, output_shape=shape, output=values[k], order=1, mode="nearest")
    # inside: the centre maps within half a pixel of the window's pixels (an affine map: check the corners first)
    corners = np.array([[0, 0], [0, shape[1] - 1], [shape[0] - 1, 0], [shape[0] - 1, shape[1] - 1]]) @ matrix.T + offset
    if corners[:, 0].min() >= -0.5 and corners[:, 0].max() <= h - 0.5 and corners[:, 1].min() >= -0.5 and corners[:, 1].max() <= w - 0.5:
        return values, True
    rows, cols = _index_grids(matrix, offset, shape)
    inside = (rows >= -0.5) & (rows <= h - 0.5) & (cols >= -0.5) & (cols <= w - 0.5)
    return values, inside[None]


def _linear_axis(values: np.ndarray, scale: float, offset: float, n_out: int, *, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis`` at ``scale * k + offset`` (k < n_out), edges extended (clamped)."""
    n = values.shape[axis]
    pos = np.clip(scale * np.arange(n_out, dtype=np.float64) + offset, 0.0, n - 1.0)
    lo = np.minimum(np.floor(pos).astype(np.int64), max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    frac = pos - lo
    shape = [1, 1, 1]
    shape[axis] = n_out
    frac = frac.reshape(shape)
    a = np.take(values, lo, axis=axis).astype(np.float64, copy=False)
    b = np.take(values, hi, axis=axis).astype(np.float64, copy=False)
    a *= 1.0 - frac
    a += b * frac
    return a
