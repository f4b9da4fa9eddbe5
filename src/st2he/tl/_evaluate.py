"""``st2he.tl.evaluate_he``: PSNR, SSIM and MSE of a virtual H&E against a real one, per tile and overall."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from st2he._elements import check_key_free, write_elements
from st2he._grid import COORDINATE_SYSTEM, Grid
from st2he._raster import MAX_READ_PIXELS, Raster, check_pixel_size, check_region

logger = logging.getLogger("st2he")

METRICS = ("mse", "psnr", "ssim")
#: SSIM window (skimage's default 7 x 7 uniform window) and the margin it needs around a block.
_SSIM_WIN = 7
_SSIM_MARGIN = _SSIM_WIN // 2
_DATA_RANGE = 255.0
#: Edge (evaluation pixels) of the blocks read at a time; peak memory grows with it, not with the image.
_BLOCK_PIXELS = 1024


def evaluate_he(
    sdata,
    *,
    pred_key: str = "virtual_he",
    true_key: str = "he_image",
    tile_size: int = 256,
    pixel_size: float | None = None,
    region: Sequence[float] | None = None,
    coordinate_system: str = COORDINATE_SYSTEM,
    key_added: str = "he_metrics",
    overwrite: bool = False,
) -> pd.DataFrame:
    """Score a virtual H&E against a real H&E of the same section: MSE, PSNR and SSIM per tile and overall.

    The two RGB images are compared over their common region in ``coordinate_system`` (µm), on one axis-aligned
    evaluation grid of ``pixel_size`` µm anchored at the region's top-left corner. Each image is read from its
    coarsest pyramid level that resolves ``pixel_size`` and resampled onto the grid through its full affine
    transformation (rotated, flipped, sheared or non-square images are fine): by area averaging over the largest
    whole number of source pixels per evaluation pixel, then bilinear interpolation at the evaluation pixel centres
    (an image already on the grid, or only rotated by a multiple of 90 degrees or flipped onto it, is read exactly).
    The grid is cut into square tiles of ``tile_size`` evaluation pixels (the last row and column may be
    smaller).

    Metrics, on 0-255 values (``skimage.metrics``, ``data_range=255``, SSIM with a 7 x 7 window averaged over the
    three channels):

    - ``overall``: MSE over every pixel of the common region, PSNR from that MSE, and SSIM of the whole region
      (the mean of its SSIM map without the 3-pixel outer border, as :func:`skimage.metrics.structural_similarity`
      computes it; made block by block with overlapping margins, so it is exact at any image size);
    - per tile: ``mse`` and ``psnr`` of the tile's pixels, and ``ssim``: the mean of the whole region's SSIM map
      over the tile (so tiles have no edge effects and their pixel-weighted mean is the overall SSIM; NaN for a
      tile that lies entirely in the region's border or for a region under 7 pixels);
    - ``mean_over_tiles``: the mean of the tile values (PSNR averaged over tiles where it is finite).

    PSNR is ``inf`` where the images are identical (MSE 0).

    Parameters
    ----------
    sdata
        SpatialData object with both images.
    pred_key
        Image element to score (uint8 RGB), e.g. from :func:`st2he.tl.virtual_he`.
    true_key
        Image element of the real H&E (uint8 RGB).
    tile_size
        Edge of the tiles in pixels of the evaluation grid.
    pixel_size
        Evaluation pixel size in µm. Default: the coarser of the two images' pixel sizes.
    region
        ``(x_min, y_min, x_max, y_max)`` in µm to restrict the comparison to (intersected with the common
        region).
    coordinate_system
        The coordinate system both images are compared in.
    key_added
        Name of the table written (its tiles go to the shapes element ``{key_added}_tiles``, which it annotates).
    overwrite
        Replace existing elements of those names.

    Returns
    -------
    Data frame with one row per tile (index ``tile_id``; columns ``mse``, ``psnr``, ``ssim``, the tile's pixel
    offsets ``row0``, ``col0``, size ``height``, ``width`` and bounds ``x_min``, ``y_min``, ``x_max``, ``y_max`` in
    µm), followed by the rows ``"mean_over_tiles"`` and ``"overall"``: the values of the new table
    ``sdata.tables[key_added]`` as one frame. That table holds the tiles (metrics in ``X`` and ``obs``) and
    ``uns["overall"]``, ``uns["mean_over_tiles"]``, ``uns["params"]``.
    """
    if int(tile_size) != tile_size or tile_size < 1:
        msg = f"tile_size must be a whole number of pixels >= 1, got {tile_size!r}."
        raise ValueError(msg)
    tile_size = int(tile_size)
    tiles_key = f"{key_added}_tiles"
    inputs, written = {pred_key, true_key}, {key_added, tiles_key}
    check_key_free(sdata, key_added, overwrite=overwrite, kind="tables", inputs=inputs, replaced=written)
    check_key_free(
        sdata, tiles_key, overwrite=overwrite, parameter="key_added", kind="shapes", inputs=inputs, replaced=written
    )
    pred = _raster(sdata, pred_key, "pred_key", coordinate_system)
    true = _raster(sdata, true_key, "true_key", coordinate_system)
    _check_rgb(pred, pred_key, "pred_key")
    _check_rgb(true, true_key, "true_key")

    grid = _evaluation_grid(pred, true, pixel_size, region)
    rows = []
    sse_total = 0.0
    ssim_sum = 0.0
    ssim_count = 0
    m = _SSIM_MARGIN
    # blocks of whole tiles, each read once with a margin so that its SSIM map equals that of the whole region
    # (a lazily generated image is then computed about once, not once per tile)
    block = max(1, _BLOCK_PIXELS // tile_size) * tile_size
    for br in range(0, grid.height, block):
        for bc in range(0, grid.width, block):
            br1, bc1 = min(br + block, grid.height), min(bc + block, grid.width)
            er0, ec0 = max(br - m, 0), max(bc - m, 0)
            er1, ec1 = min(br1 + m, grid.height), min(bc1 + m, grid.width)
            read = grid.crop(er0, er1, ec0, ec1)
            a = _read_on_grid(pred, read)
            b = _read_on_grid(true, read)
            smap = _ssim_map(a, b) if min(read.shape) >= _SSIM_WIN else None
            for r0 in range(br, br1, tile_size):
                for c0 in range(bc, bc1, tile_size):
                    r1, c1 = min(r0 + tile_size, grid.height), min(c0 + tile_size, grid.width)
                    inner = (slice(r0 - er0, r1 - er0), slice(c0 - ec0, c1 - ec0))
                    diff = a[inner] - b[inner]
                    sse = float(np.sum(diff * diff))
                    sse_total += sse
                    mse = sse / diff.size
                    # SSIM: the whole region's map averaged over the tile, without the region's outer border
                    ssim_tile = float("nan")
                    if smap is not None:
                        rr = np.arange(r0, r1)
                        cc = np.arange(c0, c1)
                        ok_r = (rr >= m) & (rr < grid.height - m)
                        ok_c = (cc >= m) & (cc < grid.width - m)
                        n_ok = int(ok_r.sum() * ok_c.sum())
                        if n_ok:
                            tile_sum = float(smap[inner][np.ix_(ok_r, ok_c)].sum())
                            ssim_sum += tile_sum
                            ssim_count += n_ok
                            ssim_tile = tile_sum / n_ok
                    x_min, y_min, x_max, y_max = grid.crop(r0, r1, c0, c1).bounds
                    rows.append(
                        {
                            "tile_id": f"tile_{r0 // tile_size}_{c0 // tile_size}",
                            "mse": mse,
                            "psnr": _psnr(mse),
                            "ssim": ssim_tile,
                            "row0": r0,
                            "col0": c0,
                            "height": r1 - r0,
                            "width": c1 - c0,
                            "x_min": x_min,
                            "y_min": y_min,
                            "x_max": x_max,
                            "y_max": y_max,
                        }
                    )
    rows.sort(key=lambda row: (row["row0"], row["col0"]))
    tiles = pd.DataFrame(rows).set_index("tile_id")
    n_values = grid.height * grid.width * 3
    overall_mse = sse_total / n_values
    overall = {
        "mse": overall_mse,
        "psnr": _psnr(overall_mse),
        "ssim": ssim_sum / ssim_count if ssim_count else float("nan"),
    }
    finite_psnr = tiles["psnr"][np.isfinite(tiles["psnr"])]
    mean_over_tiles = {
        "mse": float(tiles["mse"].mean()),
        "psnr": float(finite_psnr.mean()) if len(finite_psnr) else float("inf"),
        "ssim": float(tiles["ssim"].mean()),
    }
    params: dict[str, Any] = {
        "pred_key": pred_key,
        "true_key": true_key,
        "tile_size": tile_size,
        "pixel_size": grid.pixel_size,
        "region": list(grid.bounds),
        "coordinate_system": coordinate_system,
        "resampling": "area average (whole factor) + bilinear",
        "data_range": _DATA_RANGE,
        "ssim_window": _SSIM_WIN,
        "n_pixels": grid.height * grid.width,
    }
    _store(sdata, tiles, overall, mean_over_tiles, params, key_added, tiles_key, overwrite)
    logger.info(
        "evaluate_he: %s vs %s over %d x %d px at %.3g µm: PSNR %.2f dB, SSIM %.3f, MSE %.1f",
        pred_key,
        true_key,
        grid.height,
        grid.width,
        grid.pixel_size,
        overall["psnr"],
        overall["ssim"],
        overall["mse"],
    )
    summary = pd.DataFrame(
        [
            {**mean_over_tiles, "height": grid.height, "width": grid.width},
            {**overall, "row0": 0, "col0": 0, "height": grid.height, "width": grid.width},
        ],
        index=["mean_over_tiles", "overall"],
    )
    x_min, y_min, x_max, y_max = grid.bounds
    for name in ("mean_over_tiles", "overall"):
        summary.loc[name, ["x_min", "y_min", "x_max", "y_max"]] = [x_min, y_min, x_max, y_max]
    out = pd.concat([tiles, summary])
    out.index.name = "tile_id"
    out.attrs["overall"] = overall
    out.attrs["mean_over_tiles"] = mean_over_tiles
    out.attrs["params"] = params
    return out


# ------------------------------------------------------------------------------------------------ helpers


def _check_rgb(raster: Raster, key: str, parameter: str) -> None:
    raster.check_rgb(what=f"{parameter}={key!r}", step="evaluate_he")
    channels = raster.channels[:3]
    if channels and [c.lower() for c in channels] not in (["r", "g", "b"], ["0", "1", "2"]):
        logger.warning("%s=%r has channels %s; reading them as r, g, b.", parameter, key, channels)


def _raster(sdata, key: str, parameter: str, coordinate_system: str) -> Raster:
    if key not in sdata.images:
        msg = f"{parameter}={key!r} is not an image of this SpatialData object; its images are {sorted(sdata.images)}."
        raise KeyError(msg)
    return Raster(sdata.images[key], coordinate_system, name=f"{parameter}={key!r}")


def _evaluation_grid(pred: Raster, true: Raster, pixel_size, region) -> Grid:
    """The evaluation grid over the two images' common region (and ``region``), at ``pixel_size``."""
    import shapely

    px0, py0, px1, py1 = pred.bounds
    tx0, ty0, tx1, ty1 = true.bounds
    x0, y0, x1, y1 = max(px0, tx0), max(py0, ty0), min(px1, tx1), min(py1, ty1)
    cs = pred.coordinate_system
    if x1 <= x0 or y1 <= y0:
        msg = (
            f"{pred.name} (x {px0:.1f}..{px1:.1f}, y {py0:.1f}..{py1:.1f} µm) and {true.name} "
            f"(x {tx0:.1f}..{tx1:.1f}, y {ty0:.1f}..{ty1:.1f} µm) do not overlap in the {cs!r} "
            "coordinate system; nothing to compare. Check their transformations."
        )
        raise ValueError(msg)
    if region is not None:
        rx0, ry0, rx1, ry1 = check_region(region)
        x0, y0, x1, y1 = max(x0, rx0), max(y0, ry0), min(x1, rx1), min(y1, ry1)
        if x1 <= x0 or y1 <= y0:
            msg = f"region {tuple(region)} does not overlap the common region of {pred.name} and {true.name}."
            raise ValueError(msg)
    if pixel_size is None:
        pixel_size = max(pred.pixel_size, true.pixel_size)
    pixel_size = check_pixel_size(pixel_size)
    # whole pixels that fit in the common region (a hair of tolerance for floating point bounds)
    width = int(math.floor((x1 - x0) / pixel_size + 1e-6))
    height = int(math.floor((y1 - y0) / pixel_size + 1e-6))
    if width < 1 or height < 1:
        msg = (
            f"The common region ({x1 - x0:.3g} x {y1 - y0:.3g} µm) is smaller than one evaluation pixel of "
            f"{pixel_size} µm."
        )
        raise ValueError(msg)
    # an evaluation grid far finer than both images only upsamples them, at the cost of hours of tiles
    sizes = [r.levels[0].shape[0] * r.levels[0].shape[1] for r in (pred, true)]
    if height * width > min(max(4 * max(sizes), 4096), MAX_READ_PIXELS):
        finest = min(pred.pixel_size, true.pixel_size)
        msg = (
            f"pixel_size={pixel_size!r} µm would make the evaluation grid about {float(height) * width:.3g} pixels "
            f"over the common region, far finer than the images ({finest:g} µm pixels). Use pixel_size >= "
            f"{finest / 2:g} µm (default: the coarser image's pixel size)."
        )
        raise ValueError(msg)
    grid = Grid(float(x0), float(y0), float(pixel_size), height, width)
    # a rotated image's bounding box holds corners it does not cover: say so rather than score them as black
    box = shapely.box(*grid.bounds)
    for raster in (pred, true):
        covered = box.intersection(_footprint(raster)).area / box.area
        if covered < 0.999:
            msg = (
                f"{100 * (1 - covered):.1f} % of the evaluated region lies outside {raster.name} (its transformation "
                "rotates or shears it); those pixels are scored as black. Pass region= to restrict the comparison to "
                "where both images have data."
            )
            warnings.warn(msg, UserWarning, stacklevel=3)
    return grid


def _footprint(raster: Raster):
    import shapely

    h, w = raster.levels[0].shape
    corners = raster.affine @ np.array([[0, w, w, 0], [0, 0, h, h], [1, 1, 1, 1]], dtype=np.float64)
    return shapely.Polygon(corners[:2].T)


def _read_on_grid(raster: Raster, dst: Grid) -> np.ndarray:
    """Values of the RGB image resampled onto ``dst``: float64 ``(H, W, 3)``."""
    return np.moveaxis(raster.read(dst, channels=slice(0, 3), dtype=np.float64), 0, -1)


def _psnr(mse: float) -> float:
    if mse <= 0:
        return float("inf")
    return float(10 * np.log10(_DATA_RANGE**2 / mse))


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from skimage.metrics import structural_similarity

    _, smap = structural_similarity(a, b, channel_axis=-1, data_range=_DATA_RANGE, win_size=_SSIM_WIN, full=True)
    return smap.mean(axis=-1)


def _store(sdata, tiles, overall, mean_over_tiles, params, key_added, tiles_key, overwrite) -> None:
    import anndata as ad
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    boxes = shapely.box(tiles["x_min"], tiles["y_min"], tiles["x_max"], tiles["y_max"])
    shapes = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=boxes, index=pd.Index(tiles.index.astype(str), name="tile_id")),
        transformations={COORDINATE_SYSTEM: Identity()},
    )
    obs = tiles.copy()
    obs.index = obs.index.astype(str)
    obs.index.name = None
    obs.insert(0, "tile_id", tiles.index.astype(str))
    obs.insert(1, "region", pd.Categorical([tiles_key] * len(obs)))
    adata = ad.AnnData(
        X=tiles[list(METRICS)].to_numpy(dtype=np.float64),
        obs=obs,
        var=pd.DataFrame(index=list(METRICS)),
    )
    adata.obsm["spatial"] = np.c_[(tiles["x_min"] + tiles["x_max"]) / 2, (tiles["y_min"] + tiles["y_max"]) / 2]
    adata.uns["overall"] = dict(overall)
    adata.uns["mean_over_tiles"] = dict(mean_over_tiles)
    adata.uns["params"] = dict(params)
    table = TableModel.parse(adata, region=tiles_key, region_key="region", instance_key="tile_id")
    # the tiles and the table that annotates them are stored together, or neither
    write_elements(
        sdata,
        {tiles_key: shapes, key_added: table},
        overwrite=overwrite,
        inputs={params["pred_key"], params["true_key"]},
        parameters={tiles_key: "key_added", key_added: "key_added"},
        params={key_added: params},
    )
