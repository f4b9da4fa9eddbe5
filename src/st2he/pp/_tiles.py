"""Tiles over an image element, as a shapes element of squares in global µm, for training and inference."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from st2he._elements import ATTRS_KEY, check_key_free, get_image, write_elements
from st2he._grid import Grid
from st2he._tissue import tissue_mask, value_scale

logger = logging.getLogger("st2he")

TISSUE_RULES = ("auto", "not_white", "not_black", "none")


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: every ``stride``, plus one flush with the far edge so all pixels are covered."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _tissue_rule(sdata, image_key: str, data, tissue: str) -> str:
    if tissue not in TISSUE_RULES:
        msg = f"tissue must be one of {TISSUE_RULES}, got {tissue!r}."
        raise ValueError(msg)
    if tissue != "auto":
        return tissue
    coords = [str(c).lower() for c in data.coords["c"].values] if "c" in data.coords else []
    ours = sdata.attrs.get(ATTRS_KEY, {}).get(image_key, {})
    if coords[:3] == ["r", "g", "b"] and "style" not in ours:
        return "not_white"  # a brightfield picture (H&E): tissue is whatever is not the white glass
    return "not_black"  # fluorescence or the st2he input picture: tissue is whatever is not the black background


def _tissue_map(element, tile_size: int, rule: str) -> tuple[np.ndarray, float]:
    """Fraction of tissue per pixel of a coarse level and that level's downsampling factor relative to scale 0.

    The level is the coarsest whose pixels are at most ``tile_size / 16`` scale-0 pixels across (a pyramid level
    when the element has one, else a block mean of scale 0 computed chunk by chunk with dask).
    """
    import dask.array as da

    from ._rasterize import _levels

    levels = _levels(element)
    h0 = levels[0].sizes["y"]
    target = max(1.0, tile_size / 16)
    factors = [h0 / lv.sizes["y"] for lv in levels]
    li = max(i for i, f in enumerate(factors) if f <= target * (1 + 1e-6))
    level, factor = levels[li], factors[li]
    arr = level.data
    if "c" not in level.dims:
        arr = arr[None]
    mask = tissue_mask(arr, "brightfield" if rule == "not_white" else "fluorescence", scale=value_scale(arr.dtype))
    k = max(1, int(math.floor(target / factor)))
    frac = mask.astype(np.float32)
    if k > 1:
        frac = da.coarsen(np.mean, frac, {0: k, 1: k}, trim_excess=True)
    return np.asarray(frac.compute() if hasattr(frac, "compute") else frac, dtype=np.float64), factor * k


def _tile_fractions(frac: np.ndarray, factor: float, rows0, cols0, tile_size: int) -> np.ndarray:
    """Mean tissue fraction of each tile (outside the image counts as no tissue)."""
    integral = np.zeros((frac.shape[0] + 1, frac.shape[1] + 1))
    integral[1:, 1:] = frac.cumsum(0).cumsum(1)
    out = np.empty(len(rows0))
    for i, (r0, c0) in enumerate(zip(rows0, cols0, strict=True)):
        a = int(np.clip(round(r0 / factor), 0, frac.shape[0]))
        b = int(np.clip(round((r0 + tile_size) / factor), 0, frac.shape[0]))
        c = int(np.clip(round(c0 / factor), 0, frac.shape[1]))
        d = int(np.clip(round((c0 + tile_size) / factor), 0, frac.shape[1]))
        area = max((tile_size / factor) ** 2, 1e-9)
        out[i] = (integral[b, d] - integral[a, d] - integral[b, c] + integral[a, c]) / area
    return np.clip(out, 0.0, 1.0)


def _centres(sdata, centers) -> np.ndarray:
    """``(n, 2)`` global ``(x, y)`` in µm from a shapes key (centroids) or an array."""
    if isinstance(centers, str):
        from spatialdata.transformations import get_transformation

        if centers not in sdata.shapes:
            msg = f"centers={centers!r} is not a shapes element; the shapes elements are {sorted(sdata.shapes)}."
            raise KeyError(msg)
        gdf = sdata.shapes[centers]
        pts = gdf.geometry.centroid
        xy = np.column_stack([pts.x.to_numpy(), pts.y.to_numpy()])
        m = np.asarray(get_transformation(gdf, "global").to_affine_matrix(("x", "y"), ("x", "y")), dtype=float)
        return xy @ m[:2, :2].T + m[:2, 2]
    xy = np.asarray(centers, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        msg = f"centers must be a shapes key or an (n, 2) array of (x, y) in µm, got shape {xy.shape}."
        raise ValueError(msg)
    bad = np.flatnonzero(~np.isfinite(xy).all(axis=1))
    if len(bad):
        rows = ", ".join(str(i) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
        msg = (
            f"centers has {len(bad)} of {len(xy)} rows that are not finite (NaN or infinite), rows {rows}; "
            "a tile needs a position: drop those rows (e.g. xy[np.isfinite(xy).all(axis=1)])."
        )
        raise ValueError(msg)
    return xy


def make_tiles(
    sdata,
    image_key: str,
    *,
    tile_size: int = 512,
    overlap: int = 0,
    min_tissue_fraction: float = 0.0,
    centers: str | Sequence | np.ndarray | None = None,
    tissue: str = "auto",
    key_added: str = "tiles",
    overwrite: bool = False,
):
    """Write square tiles over image ``image_key`` as a shapes element (polygons in global µm).

    Parameters
    ----------
    sdata
        SpatialData object.
    image_key
        Image the tiles are cut from; ``tile_size`` and the ``row0``/``col0`` columns are in pixels of its
        scale 0.
    tile_size
        Edge of a tile in pixels.
    overlap
        Pixels shared by neighbouring tiles of the grid (``0 <= overlap < tile_size``). Tiles start every
        ``tile_size - overlap`` pixels, plus one row and column flush with the far edges, so every pixel lies in
        a tile; an image smaller than a tile gets one tile at its origin.
    min_tissue_fraction
        Keep tiles whose tissue fraction is at least this (0 keeps all).
    centers
        Instead of a grid, one tile centred on each of these points: a shapes key (centroids, e.g. cells) or an
        ``(n, 2)`` array of ``(x, y)`` in µm. Tiles are shifted to lie inside the image when it is larger than
        a tile.
    tissue
        How tissue is told from background, on a coarse pyramid level (about ``tile_size / 16`` pixels per
        coarse pixel): ``"not_white"`` (brightfield, e.g. H&E: mean RGB below 220 of 255), ``"not_black"``
        (fluorescence and the st2he input picture: brightest channel above 10 of 255), ``"none"`` (fraction 1),
        or ``"auto"``: ``"not_white"`` for RGB images other than the st2he input picture, else ``"not_black"``.
    key_added
        Name of the shapes element; an existing one raises a :class:`KeyError` unless ``overwrite``.
    overwrite
        Replace an existing shapes element ``key_added``. Never replaced, even so: an element of another type,
        ``image_key`` or ``centers``, and shapes that a table annotates (e.g. the cell boundaries of the cell
        table).

    Returns
    -------
    The new shapes element, ``sdata.shapes[key_added]``: a GeoDataFrame with columns ``tile_id``, ``row0``,
    ``col0`` (top-left pixel in scale 0), ``tile_size``, ``tissue_fraction`` and, for centred tiles,
    ``center_index``.
    """
    inputs = {image_key} | ({centers} if isinstance(centers, str) else set())
    check_key_free(sdata, key_added, overwrite=overwrite, kind="shapes", inputs=inputs)
    element, params = build_tiles(
        sdata,
        image_key,
        tile_size=tile_size,
        overlap=overlap,
        min_tissue_fraction=min_tissue_fraction,
        centers=centers,
        tissue=tissue,
    )
    stored = write_elements(
        sdata, {key_added: element}, overwrite=overwrite, inputs=inputs, params={key_added: params}
    )[key_added]
    logger.info(
        "make_tiles: %d tiles of %d px over %r (%d dropped below tissue fraction %g).",
        params["n_tiles"],
        params["tile_size"],
        image_key,
        params["n_dropped"],
        min_tissue_fraction,
    )
    return stored


def build_tiles(
    sdata,
    image_key: str,
    *,
    tile_size: int = 512,
    overlap: int = 0,
    min_tissue_fraction: float = 0.0,
    centers: str | Sequence | np.ndarray | None = None,
    tissue: str = "auto",
):
    """Make the tiles of :func:`make_tiles` without storing them: ``(shapes element, parameters to record)``."""
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    if int(tile_size) != tile_size or tile_size < 1:
        msg = f"tile_size must be a positive whole number of pixels, got {tile_size!r}."
        raise ValueError(msg)
    tile_size = int(tile_size)
    if int(overlap) != overlap or not 0 <= overlap < tile_size:
        msg = f"overlap must be a whole number of pixels in [0, tile_size), got {overlap!r}."
        raise ValueError(msg)
    if not 0.0 <= min_tissue_fraction <= 1.0:
        msg = f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction!r}."
        raise ValueError(msg)
    data, grid = get_image(sdata, image_key)
    rule = _tissue_rule(sdata, image_key, data, tissue)

    extra = {}
    if centers is None:
        stride = tile_size - int(overlap)
        rs = _starts(grid.height, tile_size, stride)
        cs = _starts(grid.width, tile_size, stride)
        rows0 = np.repeat(rs, len(cs)).astype(np.int64)
        cols0 = np.tile(cs, len(rs)).astype(np.int64)
    else:
        xy = _centres(sdata, centers)
        cols0 = np.round((xy[:, 0] - grid.x0) / grid.pixel_size - tile_size / 2).astype(np.int64)
        rows0 = np.round((xy[:, 1] - grid.y0) / grid.pixel_size - tile_size / 2).astype(np.int64)
        if grid.width >= tile_size:
            cols0 = np.clip(cols0, 0, grid.width - tile_size)
        if grid.height >= tile_size:
            rows0 = np.clip(rows0, 0, grid.height - tile_size)
        extra["center_index"] = np.arange(len(xy))

    if rule == "none" or len(rows0) == 0:
        fractions = np.ones(len(rows0))
    else:
        frac, factor = _tissue_map(sdata.images[image_key], tile_size, rule)
        fractions = _tile_fractions(frac, factor, rows0, cols0, tile_size)
    keep = fractions >= min_tissue_fraction
    rows0, cols0, fractions = rows0[keep], cols0[keep], fractions[keep]
    extra = {k: v[keep] for k, v in extra.items()}
    ps = grid.pixel_size
    x0 = grid.x0 + cols0 * ps
    y0 = grid.y0 + rows0 * ps
    geometry = shapely.box(x0, y0, x0 + tile_size * ps, y0 + tile_size * ps)
    gdf = gpd.GeoDataFrame(
        {
            "tile_id": np.arange(len(rows0), dtype=np.int64),
            "row0": rows0,
            "col0": cols0,
            "tile_size": np.full(len(rows0), tile_size, dtype=np.int64),
            "tissue_fraction": fractions.astype(np.float64),
            **extra,
        },
        geometry=geometry,
    )
    gdf.index = gdf["tile_id"].astype(str)
    element = ShapesModel.parse(gdf, transformations={"global": Identity()})
    params = {
        "image_key": image_key,
        "tile_size": tile_size,
        "overlap": int(overlap),
        "min_tissue_fraction": float(min_tissue_fraction),
        "tissue": rule,
        "centers": centers if isinstance(centers, str) else (None if centers is None else "array"),
        "pixel_size": ps,
        "grid": [grid.x0, grid.y0, grid.pixel_size, grid.height, grid.width],
        "n_tiles": len(gdf),
        "n_dropped": int((~keep).sum()),
    }
    return element, params


def tile_grid(grid: Grid, row0: int, col0: int, tile_size: int) -> Grid:
    """Return the pixel grid of one tile (may extend past the image)."""
    return Grid(
        grid.x0 + col0 * grid.pixel_size, grid.y0 + row0 * grid.pixel_size, grid.pixel_size, tile_size, tile_size
    )
