"""The ST2HE input picture: the nuclear stain in grey with every kept transcript drawn as a coloured dot.

Everything here is lazy and chunked. One streaming pass over the molecules buckets them by output chunk
(:mod:`st2he.pp._molecules`); each chunk of the picture is then drawn from its own molecules only, and the stain
is resampled chunk by chunk from the pyramid level that matches the output pixel size. Peak memory depends on
the chunk size, not on the slide.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from st2he._elements import ATTRS_KEY, add_image, check_key_free
from st2he._grid import COORDINATE_SYSTEM, Grid, _scale0
from st2he._raster import Raster

from ._kernels import (
    BUCKET,
    compose_rows,
    compose_rows_resampled,
    count_molecules,
    disc_footprint,
    gene_keys,
    lut_planes,
    paint_winners,
    pool_mean,
    resample_bilinear,
    resampling_state,
)
from ._molecules import BinnedMolecules, bin_molecules, is_control_name, lattice_origin, molecule_source
from ._palette import METHODS, BinCounts, check_mapping, coexpression_palette, hex_to_rgb, hue_palette, to_hex

logger = logging.getLogger("st2he")

STYLES = ("multicolor", "single", "stain")

# ----------------------------------------------------------------------------------------------- the stain


@dataclass(frozen=True)
class _Geom:
    """Axis-aligned placement of one pyramid level in global µm (pixels may be slightly non-square)."""

    x0: float
    y0: float
    psx: float
    psy: float
    height: int
    width: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x0 + self.width * self.psx, self.y0 + self.height * self.psy)


def _geom(level) -> _Geom:
    """The axis-aligned placement of a :class:`st2he._raster.Level` (the compiled resampler needs one)."""
    m = level.affine
    if abs(m[0][1]) > 1e-9 or abs(m[1][0]) > 1e-9 or m[0][0] <= 0 or m[1][1] <= 0:
        msg = (
            "The stain image is rotated, sheared or flipped relative to the global coordinate system; the "
            "rasteriser draws over an axis-aligned stain. Resample it first (spatialdata.transform)."
        )
        raise ValueError(msg)
    h, w = level.shape
    return _Geom(float(m[0][2]), float(m[1][2]), float(m[0][0]), float(m[1][1]), h, w)


def _levels(element) -> list:
    """DataArrays of a raster element, finest first."""
    return [lv.data for lv in Raster(element).levels]


_NUCLEAR_CHANNEL = re.compile(r"dapi|hoechst|nucle", re.IGNORECASE)
#: Stains that mark something other than nuclei (MERSCOPE PolyT and cell-boundary stains, Xenium's multimodal
#: segmentation channels, CosMx's membrane and protein channels): never taken as the nuclear stain by "auto".
_NON_NUCLEAR = re.compile(
    r"poly-?t|cellbound|boundary|membrane|cadherin|18s|vimentin|pan-?ck|cd45|cd298|b2m|cd3|alphasma|gfap|rrna",
    re.IGNORECASE,
)
#: Fraction of a stain's pixels at or above its upper normalisation bound beyond which it has no usable contrast.
SATURATED_FRACTION = 0.25
#: Fraction of a stain's pixels in the upper half of its contrast range beyond which it shows no separate nuclei (a
#: nuclear stain is bright on nuclei, which cover well under half of a section; the real Xenium crop's DAPI has 18 %
#: of its pixels there, its maximum projection 48 %, the real MERSCOPE crop's blurred DAPI mosaic 94 %).
BRIGHT_FRACTION = 0.6


class StainWarning(UserWarning):
    """The nuclear stain chosen is probably not one, or has no usable contrast."""


def _is_rgb(data) -> bool:
    if "c" not in data.dims:
        return False
    coords = [str(c).lower() for c in data.coords["c"].values] if "c" in data.coords else []
    return coords == ["r", "g", "b"] or coords == ["r", "g", "b", "a"]


def _nuclear_channel(data) -> int:
    if "c" not in data.dims or "c" not in data.coords:
        return 0
    names = [str(c) for c in data.coords["c"].values]
    for i, name in enumerate(names):
        if _NUCLEAR_CHANNEL.search(name):
            return i
    return 0


def _auto_stain_image(sdata) -> str | None:
    """Name the image ``stain_key="auto"`` picks, by this rule (first match wins).

    Among the images that are not RGB(A) pictures (``c`` = r, g, b: H&E, or st2he's own outputs) and not written
    by st2he: ``morphology_focus``; ``morphology_mip``; a name containing ``dapi``; an image with a channel
    named like ``DAPI``; a name containing ``nucle`` or ``hoechst``; a name containing ``morphology``; and
    finally the only such image if there is exactly one and it has a single channel.
    """
    ours = set(sdata.attrs.get(ATTRS_KEY, {})) if hasattr(sdata, "attrs") else set()
    candidates = []
    for key in sdata.images:
        if key in ours:
            continue
        data = _scale0(sdata.images[key])
        if _is_rgb(data):
            continue
        candidates.append((key, data))
    if not candidates:
        return None

    def rank(item) -> int:
        key, data = item
        low = key.lower()
        channels = [str(c) for c in data.coords["c"].values] if "c" in data.coords else []
        if _NON_NUCLEAR.search(low) and not _NUCLEAR_CHANNEL.search(low):
            return 99  # PolyT, cell-boundary and protein stains are not nuclear stains
        if low == "morphology_focus":
            return 0
        if low == "morphology_mip":
            return 1
        if "dapi" in low:
            return 2
        if any(re.search("dapi", c, re.IGNORECASE) for c in channels):
            return 3
        if "nucle" in low or "hoechst" in low:
            return 4
        if "morphology" in low:
            return 5
        if len(candidates) == 1 and data.sizes.get("c", 1) == 1:
            return 6
        return 99

    best = min(candidates, key=lambda item: (rank(item), item[0]))
    return best[0] if rank(best) < 99 else None


def _auto_nuclei(sdata) -> tuple[str, str] | None:
    """``(kind, key)`` of nucleus boundaries (shapes) or labels: the first whose name contains ``nucle``."""
    for kind, elements in (("shapes", sdata.shapes), ("labels", sdata.labels)):
        for key in sorted(elements):
            if "nucle" in key.lower():
                return kind, key
    return None


def _check_stain(sample: np.ndarray, key: str, channel_name, lo: float, hi: float, *, chosen: str) -> None:
    """Say which image became the nuclear stain; warn when it is probably not nuclear or has no contrast."""
    import warnings

    how = "picked by stain_key='auto'" if chosen == "auto" else "given as stain_key"
    where = f"image {key!r}" + (f", channel {channel_name!r}" if channel_name is not None else "")
    logger.info("nuclear stain: %s (%s)", where, how)
    names = " ".join(n for n in (key, channel_name) if n)
    if _NON_NUCLEAR.search(names) and not _NUCLEAR_CHANNEL.search(names):
        msg = (
            f"The nuclear stain is {where}, which by its name marks something other than nuclei (PolyT, cell "
            "boundaries, a protein): the picture's grey will not show nuclei. Pass the DAPI image as stain_key."
        )
        warnings.warn(msg, StainWarning, stacklevel=4)
    fraction = float((sample >= hi).mean()) if sample.size else 0.0
    if fraction > SATURATED_FRACTION:
        msg = (
            f"The nuclear stain {where} has no usable contrast: {fraction:.0%} of its pixels are at or above its "
            f"upper bound ({hi:g}) and are all drawn white, so the picture shows no chromatin texture there. Check "
            "that it is the raw DAPI image, not a saturated or thresholded one; percentiles= sets the bounds."
        )
        warnings.warn(msg, StainWarning, stacklevel=4)
        return
    bright = float((sample >= (lo + hi) / 2).mean()) if sample.size and hi > lo else 0.0
    if bright > BRIGHT_FRACTION:
        msg = (
            f"The nuclear stain {where} shows no separate nuclei: {bright:.0%} of its pixels are in the upper half of "
            f"its contrast range ({lo:g}-{hi:g}), where a nuclear stain is bright only on nuclei, well under half of "
            "a section. It looks out of focus, inverted or not nuclear, so the picture's grey will not show nuclei "
            "and a generator will invent them. Pass another stain image, or segmented nuclei (a shapes or labels "
            "element), as stain_key."
        )
        warnings.warn(msg, StainWarning, stacklevel=4)


def _stain_sample(element, channel: int) -> np.ndarray:
    """The stain's finite values that its normalisation and checks are computed from (at most ~2 M).

    From the finest pyramid level of at most ~2 M pixels; without one, from a strided sample of at most 4 x 4
    of the image's chunks spread over it, so a whole slide is never read for this.
    """
    import dask.array as da

    levels = _levels(element)
    target = 2_000_000
    level = next((lv for lv in levels if lv.sizes["y"] * lv.sizes["x"] <= target), levels[-1])
    arr = level.data
    if "c" in level.dims:
        arr = arr[channel]
    if not isinstance(arr, da.Array):
        arr = da.from_array(np.asarray(arr), chunks=1024)
    if arr.size > target:
        picks = [np.unique(np.linspace(0, n - 1, min(n, 4)).round().astype(int)) for n in arr.numblocks]
        blocks = [arr.blocks[int(i), int(j)] for i in picks[0] for j in picks[1]]
        per_block = max(1, target // len(blocks))
        parts = []
        for b in blocks:
            step = max(1, int(math.ceil(math.sqrt(b.size / per_block))))
            parts.append(b[::step, ::step].ravel())
        sample = da.concatenate(parts)
    else:
        sample = arr.ravel()
    sample = np.asarray(sample.compute(), dtype=np.float64)
    return sample[np.isfinite(sample)]


def _robust_range(sample: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """Percentiles of the stain's sample, computed once for the whole image (so every chunk and region agrees)."""
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, percentiles)
    if not hi > lo:
        hi = lo + (1.0 if sample.max() <= 1 else max(1.0, abs(lo) * 1e-3))
    return float(lo), float(hi)


def _axis_weights(start: float, n: int, step: float, src0: float, src_ps: float, src_n: int):
    """Bilinear source indices and weights for ``n`` output pixel centres along one axis."""
    centres = start + (np.arange(n) + 0.5) * step
    inside = (centres >= src0) & (centres < src0 + src_n * src_ps)
    f = np.clip((centres - src0) / src_ps - 0.5, 0, max(src_n - 1, 0))
    i0 = np.floor(f).astype(np.int64)
    i1 = np.minimum(i0 + 1, src_n - 1)
    w = (f - i0).astype(np.float32)
    return i0, i1, w, inside


def _pooled_window(window, k: int, raw_ok: bool = False) -> np.ndarray:
    """The source window after a ``k`` x ``k`` mean, as float32; ``raw_ok``: integer/float32 windows as they are.

    Small integer and float32 values are exact as float32, so a kernel reading them unconverted computes the same.
    """
    win = np.asarray(window)
    if k > 1:
        if win.dtype.kind not in "uif" or win.dtype.itemsize > 4:
            win = win.astype(np.float32)
        win = pool_mean(win, k)
    if raw_ok and win.dtype in _RAW_DTYPES:
        return np.ascontiguousarray(win)
    return np.ascontiguousarray(win, dtype=np.float32)


_RAW_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.float32))


def _resample_block(window, i0y, i1y, wy, iny, i0x, i1x, wx, inx, k, lo, hi):
    """Bilinear resampling of a source window (after a ``k`` x ``k`` mean) onto one output chunk, normalised."""
    win = _pooled_window(window, k)
    return resample_bilinear(win, i0y, i1y, wy, iny, i0x, i1x, wx, inx, np.float32(lo), np.float32(1.0 / (hi - lo)))


def _image_blocks(element, grid: Grid, chunk: int, channel: int, binary: bool = False, bounds: bool = False):
    """Per output chunk ``(r, c, h, w, spec)``: where it reads the source, and how it resamples it.

    ``spec`` is ``None`` where the chunk misses the source, else the source window (lazy) and the resampling
    indices ``(window, i0y, i1y, wy, iny, i0x, i1x, wx, inx, k)``.

    ``bounds=True``: ``window`` is ``(source, y0, y1, x0, x1)`` instead, the 2-D dask array of the source
    channel and the window's pixel bounds in it.
    """
    raster = Raster(element)
    # the coarsest level still at least as fine as the output, then a k x k mean down to about the output size
    li = raster.level_for(grid.pixel_size, slack=1 + 1e-6)
    level, geom = raster.levels[li].data, _geom(raster.levels[li])
    k = max(1, int(math.floor(grid.pixel_size / max(geom.psx, geom.psy) + 1e-6)))
    arr = level.data
    if "c" in level.dims:
        arr = arr[channel]
    if binary:
        arr = arr > 0
    src_h, src_w = geom.height // k, geom.width // k
    psx, psy = geom.psx * k, geom.psy * k
    for r in range(0, grid.height, chunk):
        h = min(chunk, grid.height - r)
        for c in range(0, grid.width, chunk):
            w = min(chunk, grid.width - c)
            by0 = grid.y0 + r * grid.pixel_size
            bx0 = grid.x0 + c * grid.pixel_size
            i0y, i1y, wy, iny = _axis_weights(by0, h, grid.pixel_size, geom.y0, psy, src_h)
            i0x, i1x, wx, inx = _axis_weights(bx0, w, grid.pixel_size, geom.x0, psx, src_w)
            if src_h == 0 or src_w == 0 or not iny.any() or not inx.any():
                yield r, c, h, w, None
                continue
            ry0, ry1 = int(i0y.min()), int(i1y.max()) + 1
            rx0, rx1 = int(i0x.min()), int(i1x.max()) + 1
            if bounds:
                window = (arr, ry0 * k, ry1 * k, rx0 * k, rx1 * k)
            else:
                window = arr[ry0 * k : ry1 * k, rx0 * k : rx1 * k]
            yield r, c, h, w, (window, i0y - ry0, i1y - ry0, wy, iny, i0x - rx0, i1x - rx0, wx, inx, k)


def _image_layer(element, grid: Grid, chunk: int, channel: int, lo: float, hi: float, binary: bool = False):
    """Lazy ``(y, x)`` float32 resampling of one channel of ``element`` onto ``grid``."""
    import dask
    import dask.array as da

    rows: list[list] = []
    for _, c, h, w, spec in _image_blocks(element, grid, chunk, channel, binary):
        if c == 0:
            rows.append([])
        if spec is None:
            rows[-1].append(da.zeros((h, w), dtype=np.float32, chunks=(h, w)))
            continue
        block = dask.delayed(_resample_block, pure=True)(*spec, lo, hi)
        rows[-1].append(da.from_delayed(block, shape=(h, w), dtype=np.float32))
    return da.block(rows)


def _shapes_layer(sdata, key: str, grid: Grid, chunk: int):
    """Lazy ``(y, x)`` float32 image of filled nuclei (1 inside, 0 outside) from a shapes element."""
    import dask
    import dask.array as da
    import shapely
    from shapely import affinity
    from spatialdata.transformations import get_transformation

    gdf = sdata.shapes[key]
    m = np.asarray(get_transformation(gdf, COORDINATE_SYSTEM).to_affine_matrix(("x", "y"), ("x", "y")), dtype=float)
    geoms = gdf.geometry
    if "radius" in gdf.columns and (geoms.geom_type == "Point").any():
        geoms = geoms.buffer(gdf["radius"].to_numpy())
    geoms = np.asarray(geoms.values)
    if not np.allclose(m, np.eye(3)):
        geoms = np.array(
            [affinity.affine_transform(g, [m[0, 0], m[0, 1], m[1, 0], m[1, 1], m[0, 2], m[1, 2]]) for g in geoms]
        )
    tree = shapely.STRtree(geoms)
    rows = []
    for r in range(0, grid.height, chunk):
        h = min(chunk, grid.height - r)
        row = []
        for c in range(0, grid.width, chunk):
            w = min(chunk, grid.width - c)
            sub = grid.crop(r, r + h, c, c + w)
            hits = tree.query(shapely.box(*sub.bounds))
            if len(hits) == 0:
                row.append(da.zeros((h, w), dtype=np.float32, chunks=(h, w)))
                continue
            block = dask.delayed(_fill_polygons, pure=True)(geoms[np.sort(hits)], sub)
            row.append(da.from_delayed(block, shape=(h, w), dtype=np.float32))
        rows.append(row)
    return da.block(rows)


def _fill_polygons(geoms, grid: Grid) -> np.ndarray:
    from skimage.draw import polygon as fill

    out = np.zeros(grid.shape, dtype=np.float32)
    for g in geoms:
        parts = getattr(g, "geoms", [g])
        for p in parts:
            if p.geom_type != "Polygon" or p.is_empty:
                continue
            xs, ys = np.asarray(p.exterior.coords).T[:2]
            rr, cc = fill((ys - grid.y0) / grid.pixel_size - 0.5, (xs - grid.x0) / grid.pixel_size - 0.5, grid.shape)
            out[rr, cc] = 1.0
            for hole in p.interiors:
                xs, ys = np.asarray(hole.coords).T[:2]
                rr, cc = fill(
                    (ys - grid.y0) / grid.pixel_size - 0.5, (xs - grid.x0) / grid.pixel_size - 0.5, grid.shape
                )
                out[rr, cc] = 0.0
    return out


def _stain(
    sdata, grid: Grid, *, stain_key, boundaries_key, percentiles, chunk, image_layer: bool = True
) -> tuple[Any, dict[str, Any]]:
    """Return the stain layer and what it was made from (``image_layer=False``: no layer for a stain image)."""
    import dask.array as da

    info: dict[str, Any] = {"stain_key": None, "stain_kind": None}
    key, kind = None, None
    if stain_key == "auto":
        key = _auto_stain_image(sdata)
        kind = "images" if key is not None else None
        if key is None and boundaries_key is not None:
            if boundaries_key == "auto":
                found = _auto_nuclei(sdata)
                if found is not None:
                    kind, key = found
            else:
                kind, key = _kind_of(sdata, boundaries_key, "boundaries_key"), boundaries_key
    elif stain_key is not None:
        kind, key = _kind_of(sdata, stain_key, "stain_key"), stain_key
    if key is None:
        logger.info("No nuclear stain image, nucleus boundaries or labels: the background is black.")
        return da.zeros(grid.shape, dtype=np.float32, chunks=chunk), info
    info.update(stain_key=key, stain_kind=kind)
    if kind == "images":
        element = sdata.images[key]
        data = _scale0(element)
        channel = _nuclear_channel(data)
        sample = _stain_sample(element, channel)
        lo, hi = _robust_range(sample, tuple(percentiles))
        if "c" in data.coords:
            info["stain_channel"] = str(data.coords["c"].values[channel])
        chosen = "auto" if stain_key == "auto" else "given"
        _check_stain(sample, key, info.get("stain_channel"), lo, hi, chosen=chosen)
        info["stain_range"] = [lo, hi]
        info["stain_percentiles"] = list(percentiles)
        return (_image_layer(element, grid, chunk, channel, lo, hi) if image_layer else None), info
    if kind == "labels":
        return _image_layer(sdata.labels[key], grid, chunk, 0, 0.0, 1.0, binary=True), info
    if kind == "shapes":
        return _shapes_layer(sdata, key, grid, chunk), info
    msg = f"{key!r} is a {kind} element; the stain must be an image, nucleus labels or nucleus boundary shapes."
    raise ValueError(msg)


def _kind_of(sdata, key: str, parameter: str) -> str:
    for kind in ("images", "labels", "shapes", "points", "tables"):
        if key in getattr(sdata, kind):
            return kind
    msg = f"{parameter}={key!r} is not an element of this SpatialData object; its images are {sorted(sdata.images)}."
    raise KeyError(msg)


def nuclear_stain_layer(
    sdata,
    grid: Grid,
    *,
    stain_key: str | None = "auto",
    boundaries_key: str | None = "auto",
    percentiles: tuple[float, float] = (1.0, 99.5),
    chunk: int = 1024,
):
    """Resample the nuclear stain onto ``grid``: a lazy ``(y, x)`` float32 dask array in [0, 1].

    Parameters
    ----------
    sdata
        SpatialData object.
    grid
        Output pixel grid (:class:`st2he._grid.Grid`).
    stain_key
        Image holding the nuclear stain. ``"auto"`` picks one by the rule of ``_auto_stain_image``:
        ``morphology_focus``, ``morphology_mip``, a name containing ``dapi``, an image with a ``DAPI``-like
        channel, a name containing ``nucle``/``hoechst``/``morphology``, or the only single-channel non-RGB image.
        Within the image the channel named like DAPI (else the first) is used. The name of a labels or
        shapes element draws nuclei from it instead; ``None`` gives zeros.
    boundaries_key
        When ``stain_key="auto"`` finds no image: nucleus boundaries (shapes) or labels to draw filled nuclei
        (value 1) from. ``"auto"`` takes the first shapes, then labels, element whose name contains ``nucle``.
        With neither, the layer is zeros.
    percentiles
        Robust normalisation: these percentiles of the stain map to 0 and 1. They are computed once for the
        whole image, on a pyramid level of at most ~2 M pixels or, without one, on a strided sample of at most
        4 x 4 of its chunks, so every chunk and every region is normalised alike.
    chunk
        Chunk edge in pixels.
    """
    percentiles = _check_percentiles(percentiles)
    layer, _ = _stain(
        sdata, grid, stain_key=stain_key, boundaries_key=boundaries_key, percentiles=percentiles, chunk=chunk
    )
    return layer


# ----------------------------------------------------------------------------------------------- molecules


def _stain_bounds(sdata, stain_key) -> tuple[float, float, float, float] | None:
    """Global bounds in µm of the stain image ``stain_key`` resolves to (``None``: no stain image)."""
    key = _auto_stain_image(sdata) if stain_key == "auto" else stain_key
    if key is None or key not in sdata.images:
        return None
    return Raster(sdata.images[key], name=repr(key)).bounds


def _default_grid(mol, img, pixel_size) -> Grid:
    """Grid over the pixels of the kept molecules ``mol`` and the stain image's bounds ``img``.

    The grid lies on the lattice of ``pixel_size`` anchored at 0 µm. Both boxes are ``(x_min, y_min, x_max,
    y_max)`` µm with exclusive far edges (``mol`` on the lattice: :attr:`BinnedMolecules.extent`).
    """
    boxes = [b for b in (mol, img) if b is not None]
    if not boxes:
        msg = (
            "Nothing to rasterise: there are no molecules left after filtering and no stain image. Check "
            "points_key, min_qv and drop_controls."
        )
        raise ValueError(msg)
    x0, y0 = lattice_origin((min(b[0] for b in boxes), min(b[1] for b in boxes)), pixel_size)
    width = height = 1
    for box in boxes:
        width = max(width, math.ceil((box[2] - x0) / pixel_size - 1e-6))
        height = max(height, math.ceil((box[3] - y0) / pixel_size - 1e-6))
    if width * height > MAX_PIXELS:
        where = f"molecules x {mol[0]:g}..{mol[2]:g}, y {mol[1]:g}..{mol[3]:g} µm" if mol is not None else "the image"
        msg = (
            f"The picture would be {height} x {width} pixels of {pixel_size} µm ({where}): some coordinates lie far "
            f"from the others. Give region=(x_min, y_min, x_max, y_max) in µm or a larger pixel_size."
        )
        raise ValueError(msg)
    return Grid(float(x0), float(y0), pixel_size, int(height), int(width))


#: Most pixels a default region may hold (10^12: a 20 x 20 cm slide at 0.2 µm); beyond, coordinates are astray.
MAX_PIXELS = 10**12


def _bin_and_place(source, region, img, pixel_size, chunk, **options) -> tuple[BinnedMolecules, Grid]:
    """Read the molecules once, bucketed, and choose the output grid.

    The grid is ``region``, or else covers the kept molecules and the stain image's bounds ``img``. Without a
    region the molecules are bucketed on the lattice through the stain image's corner (or, without one, through
    the first molecules' pixel); the grid usually starts there, so each of its chunks reads whole blocks.
    """
    if region is not None:
        grid = _region_grid(region, pixel_size, chunk)
        return bin_molecules(source, grid, chunk=chunk, **options), grid
    origin = lattice_origin(img, pixel_size) if img is not None else None
    binned = bin_molecules(source, pixel_size=pixel_size, origin=origin, chunk=chunk, **options)
    grid = _default_grid(binned.extent, img, pixel_size)
    binned.place(grid)
    return binned, grid


def _region_grid(region, pixel_size, chunk: int = 1024) -> Grid:
    try:
        x_min, y_min, x_max, y_max = (float(v) for v in region)
    except (TypeError, ValueError) as err:
        msg = f"region must be (x_min, y_min, x_max, y_max) in µm, got {region!r}."
        raise ValueError(msg) from err
    if not all(np.isfinite([x_min, y_min, x_max, y_max])):
        msg = f"region must be finite, got {region!r}."
        raise ValueError(msg)
    grid = Grid.from_bounds(x_min, y_min, x_max, y_max, pixel_size)
    chunks = math.ceil(grid.height / chunk) * math.ceil(grid.width / chunk)
    if grid.height * grid.width > MAX_PIXELS or chunks > MAX_CHUNKS:
        msg = (
            f"region {tuple(region)} µm at pixel_size={pixel_size} µm would be {grid.height} x {grid.width} pixels "
            f"in {chunks} chunks of {chunk} px; st2he draws at most {MAX_PIXELS:.0e} pixels in {MAX_CHUNKS:.0e} "
            "chunks. Give the region in µm of the global coordinate system (x_min, y_min, x_max, y_max), a larger "
            "pixel_size or a larger chunk."
        )
        raise ValueError(msg)
    return grid


#: Most chunks a picture may have (a 20 x 20 cm slide at 0.2 µm has 10^6 chunks of 1024 px): beyond, graph building
#: alone would take hours.
MAX_CHUNKS = 4 * 10**6


def _spill_options(spill_dir) -> dict[str, Any]:
    """``bin_molecules`` options for a ``spill_dir`` the user named: every bucket goes to a file there."""
    return {} if spill_dir is None else {"spill_dir": os.fspath(spill_dir), "memory_limit": 0}


def _check_region_holds_data(sdata, source, binned, grid: Grid, region, stain_info, what: str, molecules: bool) -> None:
    """Refuse a region that holds neither kept molecules nor stain (a black picture); warn when it has stain only.

    The messages name the region and where the data lie: the molecules' extent and the stain's bounds.
    """
    import warnings

    from ._molecules import points_extent

    report = binned.report if binned is not None else None
    inside = report.kept - report.outside if report is not None else 0
    if molecules and inside > 0:
        return
    stain = _stain_extent(sdata, stain_info)
    box = grid.bounds
    covered = stain is not None and stain[0] < box[2] and box[0] < stain[2] and stain[1] < box[3] and box[1] < stain[3]
    where = []
    if source is not None:
        extent = points_extent(source)
        if extent is None:
            where.append("no molecule has finite coordinates")
        else:
            kept = f"{report.kept} of {report.total} kept after filtering" if report is not None else "all"
            where.append(
                f"the molecules ({kept}) lie in x {extent[0]:g}..{extent[2]:g}, y {extent[1]:g}..{extent[3]:g} µm"
            )
    if stain is not None:
        bounds = f"x {stain[0]:g}..{stain[2]:g}, y {stain[1]:g}..{stain[3]:g} µm"
        where.append(f"the stain {stain_info['stain_key']!r} covers {bounds}")
    data = "; ".join(where) if where else "there are no molecules and no stain"
    shown = "region=({:g}, {:g}, {:g}, {:g}) µm".format(*(float(v) for v in region))
    if not covered:
        held = "no kept molecule and no stain" if molecules else "no stain"
        msg = (
            f"{what}: {shown} holds {held}, so the picture would be empty: {data}. Give a region that "
            "overlaps the data, or region=None for their extent."
        )
        raise ValueError(msg)
    if molecules:
        msg = f"{what}: {shown} holds no kept molecule, so the picture shows the stain alone: {data}."
        warnings.warn(msg, UserWarning, stacklevel=3)


def _stain_extent(sdata, stain_info) -> tuple[float, float, float, float] | None:
    """Global bounds in µm of the resolved stain (an image, labels or nucleus shapes); ``None`` without one."""
    key, kind = stain_info.get("stain_key"), stain_info.get("stain_kind")
    if key is None:
        return None
    if kind in ("images", "labels"):
        return Raster(getattr(sdata, kind)[key], name=repr(key)).bounds
    from spatialdata.transformations import get_transformation

    gdf = sdata.shapes[key]
    if len(gdf) == 0:
        return None
    x0, y0, x1, y1 = gdf.total_bounds
    if "radius" in gdf.columns:
        r = float(np.nanmax(gdf["radius"].to_numpy()))
        x0, y0, x1, y1 = x0 - r, y0 - r, x1 + r, y1 + r
    m = np.asarray(get_transformation(gdf, COORDINATE_SYSTEM).to_affine_matrix(("x", "y"), ("x", "y")), dtype=float)
    corners = m @ np.array([[x0, x1, x0, x1], [y0, y0, y1, y1], [1, 1, 1, 1]])
    return float(corners[0].min()), float(corners[1].min()), float(corners[0].max()), float(corners[1].max())


def _check_pixel_size(pixel_size) -> float:
    ok = isinstance(pixel_size, numbers.Real) and not isinstance(pixel_size, bool | np.bool_)  # numpy scalars too
    if not (ok and np.isfinite(pixel_size) and pixel_size > 0):
        msg = f"pixel_size must be a positive number of µm, got {pixel_size!r}."
        raise ValueError(msg)
    return float(pixel_size)


def _check_percentiles(percentiles) -> tuple[float, float]:
    """``(lo, hi)`` of the stain's contrast percentiles, or a :class:`ValueError` that says what is wrong."""
    try:
        lo, hi = (float(v) for v in percentiles)
    except (TypeError, ValueError) as err:
        msg = f"percentiles must be two numbers (lo, hi) in [0, 100], such as (1, 99.5); got {percentiles!r}."
        raise ValueError(msg) from err
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo < hi <= 100):
        msg = (
            f"percentiles must be (lo, hi) with 0 <= lo < hi <= 100 (the stain's lo-th percentile shows black, its "
            f"hi-th white), such as (1, 99.5); got {percentiles!r}."
        )
        raise ValueError(msg)
    return lo, hi


def _panel(source, binned: BinnedMolecules, drop_controls: bool) -> list[str]:
    names = list(source.panel) if source.panel is not None else []
    names += [g for g in binned.genes if g not in set(names)]
    if drop_controls:
        names = [g for g, c in zip(names, is_control_name(names), strict=True) if not c]
    return sorted(set(names))


def _channels(genes, panel: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Channel names and the genes summed in each, for ``genes`` = None | list | {name: list}."""
    if genes is None:
        return ["total"], {}
    if isinstance(genes, str):
        genes = [genes]
    groups = (
        {str(k): [str(g) for g in ([v] if isinstance(v, str) else v)] for k, v in genes.items()}
        if isinstance(genes, Mapping)
        else {str(g): [str(g)] for g in genes}
    )
    known = set(panel)
    unknown = sorted({g for gs in groups.values() for g in gs if g not in known})
    if unknown:
        shown = ", ".join(repr(g) for g in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        msg = f"{len(unknown)} gene(s) are not in the panel of these molecules: {shown}."
        raise ValueError(msg)
    if not groups:
        msg = "genes must name at least one gene."
        raise ValueError(msg)
    return list(groups), groups


def _density_block(binned: BinnedMolecules, *, channel_of: np.ndarray, n_channels: int, dtype, block_id=None):
    bi, bj = block_id[1], block_id[2]
    chunk = binned.chunk
    h = min(chunk, binned.grid.height - bi * chunk)
    w = min(chunk, binned.grid.width - bj * chunk)
    counts = np.zeros((n_channels, h, w), dtype=np.int64)
    for packed, row0, col0, _, _ in binned.pieces(bi * chunk, bj * chunk, h, w):
        count_molecules(packed, channel_of, row0, col0, counts)
    return counts.astype(dtype)


def _density(binned: BinnedMolecules, channels: list[str], groups: dict[str, list[str]], dtype=np.float32):
    import dask.array as da

    grid, chunk = binned.grid, binned.chunk
    if groups:
        index = {g: i for i, g in enumerate(channels)}
        channel_of = np.full(len(binned.genes), -1, dtype=np.int64)
        gene_channel: dict[str, int] = {}
        for name, gs in groups.items():
            for g in gs:
                gene_channel.setdefault(g, index[name])
        for code, g in enumerate(binned.genes):
            channel_of[code] = gene_channel.get(g, -1)
        # a gene in several groups counts in each: expand by drawing one layer per extra membership
        multi = {g for g in gene_channel if sum(g in gs for gs in groups.values()) > 1}
        if multi:
            layers = [_density(binned, [n], {n: gs}, dtype) for n, gs in groups.items()]
            return da.concatenate(layers, axis=0)
    else:
        channel_of = np.zeros(0, dtype=np.int64)
    chunks = ((len(channels),), _split(grid.height, chunk), _split(grid.width, chunk))
    return da.map_blocks(
        functools.partial(_density_block, channel_of=channel_of, n_channels=len(channels), dtype=dtype),
        _as_dependency(binned),
        chunks=chunks,
        dtype=dtype,
        meta=np.empty((0, 0, 0), dtype),
    )


def _split(n: int, chunk: int) -> tuple[int, ...]:
    return tuple(min(chunk, n - i) for i in range(0, n, chunk)) or (0,)


def density_layer(
    sdata,
    grid: Grid,
    *,
    points_key: str = "transcripts",
    genes=None,
    min_qv: float | None = 20.0,
    drop_controls: bool = True,
    chunk: int = 1024,
):
    """Molecule counts per pixel of ``grid``: a lazy ``(c, y, x)`` float32 dask array.

    ``genes=None`` gives one channel of all kept molecules; a list one channel per gene; a mapping
    ``{name: [genes]}`` one channel per group (its molecules summed). Filtering as in
    :func:`rasterize_transcripts`. The molecules are read once, now; the chunks are counted lazily.
    """
    source = molecule_source(sdata, points_key, need_genes=genes is not None)
    binned = bin_molecules(
        source, grid, chunk=chunk, min_qv=min_qv, drop_controls=drop_controls, genes=source.panel or ()
    )
    binned.report.log("density_layer", min_qv=min_qv if source.qv_column else None, warn=False)  # a tool's layer
    channels, groups = _channels(genes, _panel(source, binned, drop_controls) if genes is not None else [])
    return _density(binned, channels, groups)


# ----------------------------------------------------------------------------------------------- the picture


def _draw_block(
    binned: BinnedMolecules | None, *stain, rank_of, rank_key, planes, dy, dx, chunk=1024, grid=None, block_id=None
):
    bi, bj = block_id[1], block_id[2]
    if not stain:  # no stain: a black background
        h = min(chunk, grid.height - bi * chunk)
        w = min(chunk, grid.width - bj * chunk)
        grey = np.zeros((0, 0), dtype=np.float32)
    else:
        grey = np.ascontiguousarray(stain[0][0], dtype=np.float32)
        h, w = grey.shape

    def compose(out, r0, band):
        compose_rows(grey, band, planes, out, r0)

    return _draw(binned, bi, bj, h, w, rank_of, rank_key, dy, dx, compose)


def _draw_block_resampled(binned, spec, lo, hi, bi, bj, h, w, *, rank_of, rank_key, planes, dy, dx):
    """One chunk over a stain image: the stain resampled in the same kernel that composes the colours."""
    if spec is None:  # the chunk misses the stain image
        empty = np.zeros((0, 0), dtype=np.float32)

        def compose(out, r0, band):
            compose_rows(empty, band, planes, out, r0)

    else:
        window, i0y, i1y, wy, iny, i0x, i1x, wx, inx, k = spec
        window = _source_window(window, k)
        resampling = (i0y, i1y, wy, iny, i0x, i1x, wx, inx, np.float32(lo), np.float32(1.0 / (hi - lo)))
        state = resampling_state(w, window[4])

        def compose(out, r0, band):
            compose_rows_resampled(window, *resampling, band, planes, out, r0, *state)

    return _draw(binned, bi, bj, h, w, rank_of, rank_key, dy, dx, compose)


#: Rows drawn at a time: their winners (BAND x 1024 int32 = 1 MB in a 1024-pixel chunk) stay in the core's cache
#: while the molecules are painted and the colours composed.
BAND = BUCKET

_SCRATCH = threading.local()


def _draw(binned, bi, bj, h, w, rank_of, rank_key, dy, dx, compose) -> np.ndarray:
    """The ``(3, h, w)`` uint8 chunk ``(bi, bj)``, drawn in bands of :data:`BAND` rows.

    For each band, which gene wins each pixel is painted into a buffer reused by the thread's next band (a fresh
    buffer costs a page fault per 4 kB), then ``compose(out, first_row, winners)`` writes the band's colours.
    """
    out = np.empty((3, h, w), dtype=np.uint8)
    winners = getattr(_SCRATCH, "winners", None)
    if winners is None or winners.shape[0] < BAND * w:
        winners = _SCRATCH.winners = np.empty(BAND * w, dtype=np.int32)
    pieces = []
    reach = int(max(np.abs(dy).max(initial=0), np.abs(dx).max(initial=0)))
    if binned is not None:
        c = binned.chunk
        pieces = list(binned.pieces(bi * c, bj * c, h, w, reach))
    for r0 in range(0, h, BAND):
        bh = min(BAND, h - r0)
        band = winners[: bh * w]
        band.fill(-1)
        for packed, row0, col0, grow0, gcol0 in pieces:
            # a bucket's molecules draw into its BUCKET rows, and ``reach`` beyond
            if row0 - reach < r0 + bh and row0 + BUCKET + reach > r0:
                paint_winners(packed, rank_of, rank_key, row0 - r0, col0, grow0, gcol0, bh, w, dy, dx, band)
        compose(out, r0, band)
    return out


def _source_window(window, k: int):
    """The source window as :func:`st2he.pp._kernels.compose_rows_resampled` reads it.

    Returns ``(pieces, offsets, ys, xs, width)``. ``window`` is a 2-D array, or ``(chunks, (ycuts, xcuts))``: the
    source's chunks it overlaps (a list of rows) and the rows and columns cut from each. Up to 2 x 2 chunks of one
    kind are read in place, without assembling the window (a copy of megabytes per output chunk); more, or a
    ``k`` x ``k`` mean first, assemble it.
    """
    if isinstance(window, tuple):
        chunks, (ycuts, xcuts) = window
        arrays = [np.ascontiguousarray(c) for row in chunks for c in row] if k == 1 and len(chunks) <= 2 else []
        kinds = {(a.dtype, a.ndim, a.flags.writeable) for a in arrays}
        if arrays and len(xcuts) <= 2 and len(kinds) == 1 and arrays[0].dtype in _RAW_DTYPES:
            nx = len(xcuts)
            corners = (0, nx - 1, len(arrays) - nx, len(arrays) - 1)  # top left, top right, bottom left, bottom right
            offsets = np.array(
                [[ycuts[i // nx][0], xcuts[i % nx][0]] for i in corners],
                dtype=np.int64,
            )
            width = sum(b - a for a, b in xcuts)
            return (
                tuple(arrays[i] for i in corners),
                offsets,
                ycuts[0][1] - ycuts[0][0],
                xcuts[0][1] - xcuts[0][0],
                width,
            )
        rows = [
            [np.asarray(c)[ya:yb, xa:xb] for c, (xa, xb) in zip(row, xcuts, strict=True)]
            for row, (ya, yb) in zip(chunks, ycuts, strict=True)
        ]
        window = rows[0][0] if len(rows) == 1 and len(rows[0]) == 1 else np.block(rows)
    win = _pooled_window(window, k, raw_ok=True)
    return (win, win, win, win), np.zeros((4, 2), dtype=np.int64), win.shape[0], win.shape[1], win.shape[1]


def _picture_over_image(element, grid: Grid, chunk: int, stain_range, **draw):
    """Lazy ``(3, y, x)`` uint8 picture over a stain image: one task per chunk resamples and composes.

    The graph is made by hand, one layer: each task takes the source chunks its window overlaps and cuts the
    window itself (slicing the dask array per chunk, or passing the molecules to a delayed call per chunk,
    costs milliseconds of graph work per chunk).
    """
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    lo, hi = (float(v) for v in stain_range)
    channel = _nuclear_channel(_scale0(element))
    molecules = _as_dependency(draw.pop("binned"))
    binned = molecules.key if molecules is not None else None  # the molecules: one key every task reads
    draw_fn = functools.partial(_draw_block_resampled, **draw)
    levels = [lv.data for lv in _levels(element)]
    name = "st2he-picture-" + tokenize(draw, binned, lo, hi, grid, chunk, channel, levels)
    dsk: dict = {}
    sources: dict[int, Any] = {}  # the source channel as a dask array (the same object for every chunk)
    for r, c, h, w, spec in _image_blocks(element, grid, chunk, channel, bounds=True):
        bi, bj = r // chunk, c // chunk
        if spec is None:
            dsk[(name, 0, bi, bj)] = (draw_fn, binned, None, lo, hi, bi, bj, h, w)
            continue
        (arr, y0, y1, x0, x1), rest = spec[0], list(spec[1:])
        if id(arr) not in sources:
            sources[id(arr)] = arr if isinstance(arr, da.Array) else da.from_array(np.asarray(arr), chunks=2048)
        keys, cuts = _window_pieces(sources[id(arr)], y0, y1, x0, x1)
        dsk[(name, 0, bi, bj)] = (_draw_from_pieces, draw_fn, binned, keys, cuts, rest, lo, hi, bi, bj, h, w)
    dependencies = list(sources.values()) + ([molecules] if molecules is not None else [])
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=dependencies)
    chunks = ((3,), _split(grid.height, chunk), _split(grid.width, chunk))
    return da.Array(graph, name, chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), dtype=np.uint8))


def _window_pieces(arr, y0: int, y1: int, x0: int, x1: int):
    """Keys of the chunks of 2-D ``arr`` that rows ``y0:y1`` and columns ``x0:x1`` overlap, and the cut in each."""
    cy = np.cumsum((0, *arr.chunks[0]))
    cx = np.cumsum((0, *arr.chunks[1]))
    rows = range(int(np.searchsorted(cy, y0, "right")) - 1, int(np.searchsorted(cy, y1, "left")))
    cols = range(int(np.searchsorted(cx, x0, "right")) - 1, int(np.searchsorted(cx, x1, "left")))
    keys = [[(arr.name, i, j) for j in cols] for i in rows]
    cuts = (
        [[int(max(y0, cy[i]) - cy[i]), int(min(y1, cy[i + 1]) - cy[i])] for i in rows],
        [[int(max(x0, cx[j]) - cx[j]), int(min(x1, cx[j + 1]) - cx[j])] for j in cols],
    )
    return keys, list(cuts)


def _draw_from_pieces(draw_fn, binned, pieces, cuts, rest, lo, hi, bi, bj, h, w):
    chunks = [[np.asarray(p) for p in row] for row in pieces]
    return draw_fn(binned, ((chunks, tuple(cuts)), *rest), lo, hi, bi, bj, h, w)


def _as_dependency(binned: BinnedMolecules | None):
    """The molecules as one key of the graph (``None`` stays ``None``) that every chunk's task reads.

    In the graph once, not in every task: a ``dask.distributed`` cluster ships them to each worker once (see
    :class:`st2he.pp._molecules._Part` for what travels).
    """
    import dask

    return None if binned is None else dask.delayed(binned, traverse=False, pure=True)


def _resolve_palette(sdata, palette, panel, drawn, bins: BinCounts | None, binned, table_key=None) -> dict[str, str]:
    """``{gene: colour}`` for the genes ``drawn``; a user mapping is checked against the whole ``panel``."""
    from ._palette import _table_correlation, correlation

    if isinstance(palette, Mapping):
        pal = check_mapping(palette, panel, required=drawn)
        return {g: pal[g] for g in drawn}
    panel = drawn
    if palette == "hue":
        return hue_palette(panel)
    if palette in ("coexpression", "lineage"):
        corr = _table_correlation(sdata, panel, table_key)
        if corr is None:
            index = {g: i for i, g in enumerate(binned.genes)}  # every gene of the panel has a code
            m = bins.matrix(len(binned.genes))
            logger.info("Palette co-expression from %d spatial bins of %g µm.", m.shape[0], bins.bin_size)
            corr = correlation(m[:, [index[g] for g in panel]])
        if palette == "lineage":
            from ._palette import lineage_palette

            return lineage_palette(panel, corr)
        return coexpression_palette(panel, corr)
    msg = f"palette must be one of {METHODS} or a mapping gene -> colour, got {palette!r}."
    raise ValueError(msg)


def rasterize_transcripts(
    sdata,
    *,
    points_key: str = "transcripts",
    stain_key: str | None = "auto",
    style: str = "multicolor",
    palette: str | Mapping[str, Any] = "coexpression",
    pixel_size: float = 0.5,
    dot_size: int = 1,
    color: str = "#ff0000",
    region: Sequence[float] | None = None,
    min_qv: float | None = 20.0,
    drop_controls: bool = True,
    genes: Sequence[str] | None = None,
    boundaries_key: str | None = "auto",
    percentiles: tuple[float, float] = (1.0, 99.5),
    chunk: int = 1024,
    key_added: str = "st2he_input",
    overwrite: bool = False,
    spill_dir: str | os.PathLike | None = None,
):
    """Draw the ST2HE input picture: the nuclear stain in grey and every kept transcript as a coloured dot.

    The picture is written to ``sdata.images[key_added]`` as a multiscale uint8 RGB image (channels r, g, b)
    whose transformation to ``global`` places pixel ``(row, col)`` over ``y0 + row * pixel_size`` ..
    ``x0 + col * pixel_size`` µm: row = y, no flips, and each molecule lies in the pixel that contains it.
    The parameters, including the resolved stain and the palette, are recorded with
    :func:`st2he._elements.record_params` (``get_params(sdata, key_added)``) so that training and inference can
    reuse them. The molecules are read once, now: one streaming pass filters them, finds their extent (for the
    default region), gathers the co-expression statistics of the palette and buckets them by blocks of 256 x 256
    pixels at 4 bytes a molecule (kept in memory up to 512 MB, beyond that in a temporary folder that is removed
    with the image). The pixels are computed lazily, chunk by chunk, when the image is written or read, each from
    the molecules of the blocks it overlaps: peak memory depends on the chunk, not on the slide.

    Parameters
    ----------
    sdata
        SpatialData object with the molecules as a points element (all elements in µm in ``global``).
    points_key
        Points element of the molecules; its ``feature_key`` names the gene column.
    stain_key
        Nuclear stain: ``"auto"`` (see :func:`nuclear_stain_layer`: ``morphology_focus`` or a DAPI-like image,
        else nuclei drawn from nucleus boundaries or labels, else black), an element name, or ``None`` (black).
    style
        ``"multicolor"``: each gene in its palette colour (the default); ``"single"``: every transcript in
        ``color``; ``"stain"``: the stain alone (the ablations of the ST2HE paper).
    palette
        ``"coexpression"`` (default), ``"hue"``, ``"lineage"`` (each gene in the colour of the cell lineage it
        marks: the same on every panel) or a mapping gene -> colour covering the genes drawn, e.g. a stored
        palette ``get_params(sdata, "st2he_input")["palette"]``; see :func:`make_palette`.
    pixel_size
        Output pixel edge in µm.
    dot_size
        Diameter of a transcript's dot in pixels (1: the molecule's own pixel). Where several molecules cover a
        pixel (in the same pixel, or dots that meet), the one with the highest pseudo-random priority wins, a hash
        of its pixel (on the lattice of ``pixel_size`` anchored at 0 µm) and its gene (ties: the gene last by
        name), so the result does not depend on the order of the molecules or on the chunking.
    color
        Colour of every transcript for ``style="single"``.
    region
        ``(x_min, y_min, x_max, y_max)`` in µm; by default the extent of the kept molecules and the stain image,
        snapped to a multiple of ``pixel_size``.
    min_qv
        Molecules whose quality value (Xenium ``qv``) is below this are dropped; ``None`` keeps all. Ignored
        when the points have no quality column.
    drop_controls
        Drop control probes (``BLANK*``, ``NegControl*``, ``NegPrb*``, ``FalseCode*``, ``Blank-*``, ... or a
        boolean ``is_control`` column).
    genes
        Draw only these genes (default: all kept genes).
    boundaries_key
        Nucleus boundaries or labels used when there is no stain image (see :func:`nuclear_stain_layer`).
    percentiles
        Robust normalisation of the stain.
    chunk
        Chunk edge in pixels; peak memory grows with it, not with the slide.
    key_added
        Name of the image element written.
    overwrite
        Replace an existing image ``key_added``; otherwise an existing one raises a :class:`KeyError`. Never
        replaced, even so: an element of another type, or one the picture is drawn from (the points, the stain).

    spill_dir
        For a ``dask.distributed`` cluster of several machines: a folder on storage every worker can read, where
        the bucketed molecules are written (all of them, 4 bytes a molecule; the graph then carries the file's
        name, not the molecules). The file is removed with the image. By default they stay in memory up to
        512 MB, beyond that in a temporary file only this process can read (shipped to the workers within
        the graph).

    Returns
    -------
    The new image element, ``sdata.images[key_added]``.
    """
    if style not in STYLES:
        msg = f"style must be one of {STYLES}, got {style!r}."
        raise ValueError(msg)
    named = {k for k in (points_key, stain_key, boundaries_key) if isinstance(k, str) and k != "auto"}
    check_key_free(sdata, key_added, overwrite=overwrite, kind="images", inputs=named)
    pixel_size = _check_pixel_size(pixel_size)
    percentiles = _check_percentiles(percentiles)
    genes = [genes] if isinstance(genes, str) else genes  # one gene, not its letters
    if int(dot_size) != dot_size or dot_size < 1:
        msg = f"dot_size must be a whole number of pixels >= 1, got {dot_size!r}."
        raise ValueError(msg)
    dot_size = int(dot_size)
    if dot_size // 2 >= chunk:
        msg = f"dot_size ({dot_size} px) must be less than twice the chunk ({chunk} px)."
        raise ValueError(msg)
    need_points = style != "stain"
    source = None
    if need_points or points_key in sdata.points:
        source = molecule_source(sdata, points_key, need_genes=style == "multicolor" or genes is not None)
    if isinstance(palette, str) and palette not in METHODS:
        msg = f"palette must be one of {METHODS} or a mapping gene -> colour, got {palette!r}."
        raise ValueError(msg)
    img = _stain_bounds(sdata, stain_key) if region is None else None
    binned = None
    bins = None
    if source is not None:
        # style="stain" reads the molecules too, so that its picture has the same grid as the others
        bins = BinCounts() if style == "multicolor" and palette in ("coexpression", "lineage") else None
        binned, grid = _bin_and_place(
            source,
            region,
            img,
            pixel_size,
            chunk,
            min_qv=min_qv,
            drop_controls=drop_controls,
            genes=source.panel or (),
            bins=bins,
            **_spill_options(spill_dir),
        )
    else:
        grid = _region_grid(region, pixel_size, chunk) if region is not None else _default_grid(None, img, pixel_size)
    stain, stain_info = _stain(
        sdata,
        grid,
        stain_key=stain_key,
        boundaries_key=boundaries_key,
        percentiles=percentiles,
        chunk=chunk,
        image_layer=False,  # a stain image is resampled inside the drawing tasks (_picture_over_image)
    )
    if region is not None:
        _check_region_holds_data(sdata, source, binned, grid, region, stain_info, "rasterize_transcripts", need_points)
    params: dict[str, Any] = {
        "points_key": points_key if source is not None else None,
        "stain_key": stain_info["stain_key"],
        "stain": stain_info,
        "style": style,
        "pixel_size": pixel_size,
        "dot_size": dot_size,
        "min_qv": min_qv,
        "drop_controls": drop_controls,
        "region": list(grid.bounds),
        "chunk": chunk,
    }
    lut = np.zeros((1, 3), dtype=np.uint8)
    rank_of = np.zeros(0, dtype=np.int32)
    rank_key = np.zeros(1, dtype=np.int64)  # one colour: which molecule wins does not show
    if not need_points:
        binned = None
    if need_points:
        binned.report.log("rasterize_transcripts", min_qv=min_qv if source.qv_column else None)
        panel = _panel(source, binned, drop_controls) if source.gene_column is not None else []
        drawn = panel
        if genes is not None:
            _, groups = _channels(list(genes), panel)
            drawn = sorted(groups)
        if style == "multicolor":
            pal = _resolve_palette(sdata, palette, panel, drawn, bins, binned)
            order = sorted(pal)
            rank = {g: i for i, g in enumerate(order)}
            rank_of = np.array([rank.get(g, -1) for g in binned.genes], dtype=np.int32)
            lut = np.array([hex_to_rgb(pal[g]) for g in order], dtype=np.uint8).reshape(-1, 3)
            rank_key = gene_keys(order)
            params["palette"] = pal
            params["palette_method"] = palette if isinstance(palette, str) else "mapping"
        else:
            drawn_set = set(drawn)
            if genes is None:
                rank_of = np.zeros(len(binned.genes), dtype=np.int32)
            else:
                rank_of = np.array([0 if g in drawn_set else -1 for g in binned.genes], dtype=np.int32)
            if len(rank_of) == 0:  # no gene column: every molecule code is 0
                rank_of = np.zeros(1, dtype=np.int32)
            lut = np.array([hex_to_rgb(color)], dtype=np.uint8)
            params["color"] = to_hex(color)
        params["genes"] = list(genes) if genes is not None else None
        params["molecules"] = binned.report.as_dict()
    dy, dx = disc_footprint(dot_size)
    import dask.array as da

    options = {
        "binned": binned,
        "rank_of": rank_of,
        "rank_key": rank_key,
        "planes": lut_planes(lut),
        "dy": dy,
        "dx": dx,
    }
    # the picture reads these lazily: they are never replaced by it
    inputs = {k for k in (params["points_key"], stain_info["stain_key"]) if k is not None}
    if stain_info["stain_kind"] == "images":
        image = sdata.images[stain_info["stain_key"]]
        data = _picture_over_image(image, grid, chunk, stain_info["stain_range"], **options)
        return add_image(sdata, key_added, data, grid, overwrite=overwrite, inputs=inputs, chunks=chunk, params=params)
    stain_input = (stain[None],) if stain_info["stain_key"] is not None else ()
    # the options go in a partial: dask would otherwise walk through the molecules' index looking for collections
    molecules = _as_dependency(options.pop("binned"))
    draw = functools.partial(_draw_block, chunk=chunk, grid=grid, **options)
    data = da.map_blocks(
        draw,
        molecules,
        *stain_input,
        chunks=((3,), _split(grid.height, chunk), _split(grid.width, chunk)),
        dtype=np.uint8,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
    )
    return add_image(sdata, key_added, data, grid, overwrite=overwrite, inputs=inputs, chunks=chunk, params=params)


def transcript_density(
    sdata,
    *,
    points_key: str = "transcripts",
    genes=None,
    pixel_size: float = 0.5,
    region: Sequence[float] | None = None,
    min_qv: float | None = 20.0,
    drop_controls: bool = True,
    chunk: int = 1024,
    dtype: str = "float32",
    key_added: str = "transcript_density",
    overwrite: bool = False,
    spill_dir: str | os.PathLike | None = None,
):
    """Write a multi-channel image of molecule counts per pixel, for models that take channels.

    One channel per gene (``genes`` a list), per gene group (a mapping ``{name: [genes]}``; a gene in several
    groups counts in each) or one ``"total"`` channel (``genes=None``); channel names are the ``c`` coordinates.
    Counts are exact (no pyramid: downsampling would blur counts), ``float32`` or ``uint16`` (saturating).
    Placed on the same kind of grid as :func:`rasterize_transcripts` (same ``region`` and ``pixel_size`` give the
    same pixels), computed lazily chunk by chunk. ``key_added`` names the image written; an existing image of that
    name is replaced only with ``overwrite=True`` (never ``points_key`` or an element of another type).
    ``spill_dir``: as in :func:`rasterize_transcripts`.

    Returns
    -------
    The new image element, ``sdata.images[key_added]``.
    """
    check_key_free(sdata, key_added, overwrite=overwrite, kind="images", inputs={points_key})
    pixel_size = _check_pixel_size(pixel_size)
    if dtype not in ("float32", "uint16"):
        msg = f"dtype must be 'float32' or 'uint16', got {dtype!r}."
        raise ValueError(msg)
    source = molecule_source(sdata, points_key, need_genes=genes is not None)
    binned, grid = _bin_and_place(
        source,
        region,
        None,
        pixel_size,
        chunk,
        min_qv=min_qv,
        drop_controls=drop_controls,
        genes=source.panel or (),
        **_spill_options(spill_dir),
    )
    if region is not None:
        _check_region_holds_data(sdata, source, binned, grid, region, {"stain_key": None}, "transcript_density", True)
    binned.report.log("transcript_density", min_qv=min_qv if source.qv_column else None)
    channels, groups = _channels(genes, _panel(source, binned, drop_controls) if genes is not None else [])
    data = _density(binned, channels, groups)
    if dtype == "uint16":
        data = data.clip(0, 65535).astype(np.uint16)
    params = {
        "points_key": points_key,
        "genes": groups or None,
        "channels": channels,
        "pixel_size": pixel_size,
        "min_qv": min_qv,
        "drop_controls": drop_controls,
        "region": list(grid.bounds),
        "dtype": dtype,
        "molecules": binned.report.as_dict(),
    }
    return add_image(
        sdata,
        key_added,
        data,
        grid,
        overwrite=overwrite,
        inputs={points_key},
        c_coords=channels,
        scale_factors=None,
        chunks=chunk,
        params=params,
    )
