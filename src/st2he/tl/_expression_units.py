"""Geometry of expression units on the model's output lattice, and the chip loop of train / predict_expression.

The model reads H&E at ``model.um_per_px`` µm per pixel and predicts one value per ``model.stride`` pixels, i.e. on
*output pixels* of ``s = stride * um_per_px`` µm. Every chip is read on one lattice anchored at the coordinate
system's origin (chip corners at multiples of the model's downsampling), so a location gets the same output pixel
whichever chip computes it.

A unit (cell, spot, bin, any shape) is the set of output pixels whose **centres** it contains; a unit that contains
no pixel centre (smaller than a pixel, or thin) gets the one pixel nearest its centroid, so no unit is lost. These
(pixel, unit) pairs may share a pixel between small units. The prediction of a unit is the mean of the dense maps over
its pixels (:func:`st2he.models.pool_units`); its embedding for the baselines is the mean of the fused features.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from st2he._grid import COORDINATE_SYSTEM, Grid

WHITE = 255


# ============================================================================================== units and geometry


@dataclass
class Units:
    """Units as st2he reads them: ids, geometries in µm of the coordinate system, centroids, the shapes key."""

    key: str
    ids: np.ndarray  # object array of the shapes' index values
    geoms: np.ndarray  # shapely geometries (polygons; circles buffered)
    centroids: np.ndarray  # (n, 2) x, y in µm
    array_rows: np.ndarray | None = None
    array_cols: np.ndarray | None = None
    shapes: Any = None  # a new shapes element to write (spots, bins), else None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        import shapely

        b = shapely.bounds(self.geoms)  # NaN rows for empty geometries
        lo, hi = np.nanmin(b[:, :2], axis=0), np.nanmax(b[:, 2:], axis=0)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def _shape_geometries(gdf) -> np.ndarray:
    """Polygons of a shapes element: circles (points with a ``radius`` column) become disks."""
    import shapely

    geoms = np.asarray(gdf.geometry.values, dtype=object)
    kinds = shapely.get_type_id(geoms)
    if (kinds == 0).any():  # points: circles of their radius
        if "radius" not in gdf.columns:
            msg = "A shapes element of points needs a 'radius' column (circles) to be used as units."
            raise ValueError(msg)
        radius = gdf["radius"].to_numpy(dtype=np.float64)
        pts = kinds == 0
        geoms = geoms.copy()
        geoms[pts] = shapely.buffer(geoms[pts], radius[pts], quad_segs=16)
    return geoms


def shapes_units(sdata, key: str, *, coordinate_system: str = COORDINATE_SYSTEM, parameter: str = "units") -> Units:
    """The units of shapes element ``key`` with geometries in ``coordinate_system``."""
    from spatialdata import transform

    from st2he._elements import affine_to
    from st2he._units import unit_centroids

    if key not in sdata.shapes:
        msg = (
            f"{parameter}={key!r} is not a shapes element of this SpatialData object; its shapes are "
            f"{sorted(sdata.shapes)}."
        )
        raise KeyError(msg)
    element = sdata.shapes[key]
    affine_to(element, coordinate_system, what=f"Shapes {key!r}")  # a clear error when it is not placed there
    gdf = transform(element, to_coordinate_system=coordinate_system)
    if len(gdf) == 0:
        msg = f"Shapes {key!r} hold no units."
        raise ValueError(msg)
    geoms = _shape_geometries(gdf)
    centroids, empty = unit_centroids(geoms)
    if empty.all():
        msg = f"Shapes {key!r} hold no units: every geometry of its {len(geoms)} is empty."
        raise ValueError(msg)
    if empty.any():
        ids = gdf.index[empty][:5].tolist()
        warnings.warn(
            f"{int(empty.sum())} of the {len(geoms)} units of shapes {key!r} have an empty geometry (e.g. {ids}): "
            "they cover no pixel, so they are neither trained on nor predicted (NaN in a predicted table).",
            UserWarning,
            stacklevel=3,
        )
    return Units(key=key, ids=np.asarray(gdf.index.values, dtype=object), geoms=geoms, centroids=centroids)


def lonely_units(units: Units, pixel_size: float) -> np.ndarray:
    """Which units contain no output-pixel centre of the lattice of ``pixel_size`` µm pixels anchored at the origin.

    A unit whose bounding box holds more than 256 pixel centres is taken to contain one (a shape that large and
    holding none would have to be a thin sliver).
    """
    import shapely

    b = shapely.bounds(units.geoms)
    b[~np.isfinite(b).all(1)] = 0.0  # empty geometries: no pixel (and lonely, with no centroid to fall back on)
    c0 = np.ceil(b[:, 0] / pixel_size - 0.5).astype(np.int64)
    c1 = np.floor(b[:, 2] / pixel_size - 0.5).astype(np.int64)
    r0 = np.ceil(b[:, 1] / pixel_size - 0.5).astype(np.int64)
    r1 = np.floor(b[:, 3] / pixel_size - 0.5).astype(np.int64)
    nx, ny = np.maximum(c1 - c0 + 1, 0), np.maximum(r1 - r0 + 1, 0)
    n = nx * ny
    lonely = n == 0
    check = np.flatnonzero((n > 0) & (n <= 256))
    if len(check):
        counts = n[check]
        which = np.repeat(check, counts)
        k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        xs = (c0[which] + k % nx[which] + 0.5) * pixel_size
        ys = (r0[which] + k // nx[which] + 0.5) * pixel_size
        inside = shapely.contains_xy(units.geoms[which], xs, ys)
        hits = np.bincount(which[inside], minlength=len(units))
        lonely[check] = hits[check] == 0
    return lonely


def unit_pairs(
    units: Units, grid: Grid, *, subset: np.ndarray | None = None, lonely: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, cols, unit)`` pairs of the output pixels of ``grid`` (pixel centres inside a unit) and their units.

    A unit with no pixel centre inside it (``lonely``, default :func:`lonely_units` on ``grid``'s pixel size) gets
    the pixel nearest its centroid when its centroid lies on ``grid``; several such units may share a pixel.
    ``subset``: indices of the units to consider (default all); the unit indices returned are into ``units``.
    """
    import shapely

    idx = np.arange(len(units)) if subset is None else np.asarray(subset, dtype=np.int64)
    empty = (np.zeros(0, np.int64),) * 3
    if not len(idx) or grid.height == 0 or grid.width == 0:
        return empty
    if lonely is None:
        lonely = lonely_units(units, grid.pixel_size)
    ys = grid.y0 + (np.arange(grid.height) + 0.5) * grid.pixel_size
    xs = grid.x0 + (np.arange(grid.width) + 0.5) * grid.pixel_size
    tree = shapely.STRtree(units.geoms[idx])
    pts_r, pts_c = np.meshgrid(np.arange(grid.height), np.arange(grid.width), indexing="ij")
    pts_r, pts_c = pts_r.ravel(), pts_c.ravel()
    hit_pt, hit_geom = tree.query(shapely.points(xs[pts_c], ys[pts_r]), predicate="within")
    rows, cols, which = pts_r[hit_pt], pts_c[hit_pt], idx[hit_geom]
    alone = idx[lonely[idx]]
    alone = alone[np.isfinite(units.centroids[alone]).all(1)]  # an empty geometry has no place
    if len(alone):
        c = np.floor((units.centroids[alone, 0] - grid.x0) / grid.pixel_size).astype(np.int64)
        r = np.floor((units.centroids[alone, 1] - grid.y0) / grid.pixel_size).astype(np.int64)
        ok = (r >= 0) & (r < grid.height) & (c >= 0) & (c < grid.width)
        rows, cols = np.concatenate([rows, r[ok]]), np.concatenate([cols, c[ok]])
        which = np.concatenate([which, alone[ok]])
    return rows.astype(np.int64), cols.astype(np.int64), which.astype(np.int64)


def lattice_origin(x: float, step: float) -> float:
    """The largest multiple of ``step`` at or below ``x`` (grids anchored at the coordinate system's origin)."""
    return math.floor(x / step + 1e-9) * step


def snapped_grid(bounds, pixel_size: float, multiple: int) -> Grid:
    """The grid of ``pixel_size`` pixels covering ``bounds``, corners on multiples of ``multiple`` pixels from 0."""
    step = pixel_size * multiple
    x0, y0 = lattice_origin(bounds[0], step), lattice_origin(bounds[1], step)
    w = max(1, math.ceil((bounds[2] - x0) / step - 1e-9)) * multiple
    h = max(1, math.ceil((bounds[3] - y0) / step - 1e-9)) * multiple
    return Grid(x0, y0, pixel_size, h, w)


def _intersect(a, b):
    return max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])


# ============================================================================================== chips


@dataclass(frozen=True)
class ChipPlan:
    """Chips of ``chip`` pixels (``margin`` of context on each side, ``core`` kept) over an input-pixel grid."""

    um_per_px: float
    stride: int
    chip: int
    margin: int

    @property
    def core(self) -> int:
        return self.chip - 2 * self.margin

    def cores(self, region: Grid) -> list[Grid]:
        """Core grids (input pixels) tiling ``region`` (whose corner is on the lattice)."""
        out = []
        for r0 in range(0, region.height, self.core):
            for c0 in range(0, region.width, self.core):
                h, w = min(self.core, region.height - r0), min(self.core, region.width - c0)
                out.append(
                    Grid(region.x0 + c0 * self.um_per_px, region.y0 + r0 * self.um_per_px, self.um_per_px, h, w)
                )
        return out

    def chip_grid(self, core: Grid) -> Grid:
        m = self.margin * self.um_per_px
        return Grid(core.x0 - m, core.y0 - m, self.um_per_px, self.chip, self.chip)

    def out_grid(self, core: Grid) -> Grid:
        s = self.stride * self.um_per_px
        return Grid(core.x0, core.y0, s, -(-core.height // self.stride), -(-core.width // self.stride))


def make_plan(model, chip_um: float, margin_um: float | None) -> ChipPlan:
    from st2he.models._expression import chip_multiple

    mult = chip_multiple(model)
    um = model.um_per_px
    chip = max(mult, int(round(chip_um / um / mult)) * mult)
    if margin_um is None:
        margin = (chip // 8) // mult * mult
    else:
        margin = math.ceil(float(margin_um) / um / mult) * mult
    if chip - 2 * margin < mult:
        msg = (
            f"chip_um={chip_um:g} leaves no core inside a margin of {margin * um:g} µm on each side; pass a larger "
            "chip_um or a smaller margin_um."
        )
        raise ValueError(msg)
    return ChipPlan(um, model.stride, chip, margin)


def _amp(device):
    import torch

    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    import contextlib

    return contextlib.nullcontext()


#: Pixels predicted above this log1p CP10k (10^4 counts per 10k: every molecule one gene) are clipped when pooled in
#: count space.
_MAX_LOG1P_CP10K = float(np.log1p(1e4))
#: Weight of a pixel without tissue when pooling in count space, so that a unit with no tissue at all still gets
#: the plain mean of its pixels.
_NO_TISSUE_WEIGHT = 1e-6


POOLINGS = ("log", "counts")
#: ``pooling="auto"`` pools in count space units whose median area is at least this many µm² (spots of 55 µm hold
#: 2376 µm², bins of 32 µm 1024, bins of 16 µm 256).
POOLING_COUNTS_AREA = 1000.0


def resolve_pooling(pooling: str, median_area: float | None = None) -> str:
    """Check ``pooling`` (``"auto"``, ``"log"``, ``"counts"``); with ``median_area`` (µm²) resolve ``"auto"``."""
    if pooling not in ("auto", *POOLINGS):
        msg = f"pooling must be 'auto', 'log' or 'counts', got {pooling!r}."
        raise ValueError(msg)
    if pooling == "auto" and median_area is not None:
        return "counts" if median_area >= POOLING_COUNTS_AREA else "log"
    return pooling


class UnitAccumulator:
    """Per-unit sums of the model's maps over output pixels, accumulated chip by chip (exact across chips).

    ``pooling="log"``: a unit's genes are the mean of its pixels' log1p CP10k (what the model is trained on).
    ``pooling="counts"``: ``log1p`` of the mean of its pixels' counts per 10k (``expm1`` of the prediction), each
    pixel weighted by its tissue fraction: the composition of the molecules a unit pools, the right mean for units
    that hold several cells (a cell of high expression outweighs a neighbour of none).
    """

    def __init__(
        self, n_units: int, n_genes: int, *, features: int = 0, tumour: bool = True, pooling: str = "log"
    ) -> None:
        if pooling not in POOLINGS:
            msg = f"pooling must be one of {POOLINGS}, got {pooling!r}."
            raise ValueError(msg)
        self.pooling = pooling
        self.genes = np.zeros((n_units, n_genes), np.float64)
        self.tumour = np.zeros(n_units, np.float64) if tumour else None
        self.features = np.zeros((n_units, features), np.float64) if features else None
        self.tissue = np.zeros(n_units, np.float64)
        self.counts = np.zeros(n_units, np.float64)

    def add(self, out: dict[str, np.ndarray], tissue: np.ndarray, rows, cols, units) -> None:
        np.add.at(self.counts, units, 1.0)
        g = out["genes"][:, rows, cols].T.astype(np.float64)
        if self.pooling == "counts":
            w = tissue[rows, cols].astype(np.float64) + _NO_TISSUE_WEIGHT  # their sum: self.tissue + eps * counts
            np.add.at(self.genes, units, np.expm1(np.minimum(g, _MAX_LOG1P_CP10K)) * w[:, None])
        else:
            np.add.at(self.genes, units, g)
        if self.tumour is not None and "tumour" in out:
            np.add.at(self.tumour, units, out["tumour"][0, rows, cols].astype(np.float64))
        if self.features is not None:
            np.add.at(self.features, units, out["features"][:, rows, cols].T.astype(np.float64))
        np.add.at(self.tissue, units, tissue[rows, cols].astype(np.float64))

    def means(self) -> dict[str, np.ndarray]:
        n = self.counts
        with np.errstate(invalid="ignore", divide="ignore"):
            genes = (
                np.log1p(np.maximum(self.genes / (self.tissue + _NO_TISSUE_WEIGHT * n)[:, None], 0.0))
                if self.pooling == "counts"
                else self.genes / n[:, None]
            )
            res = {
                "genes": genes,
                "tissue": self.tissue / n,
                "counts": n,
            }
            if self.tumour is not None:
                res["tumour"] = self.tumour / n
            if self.features is not None:
                res["features"] = self.features / n[:, None]
        return res


def tissue_fraction_map(chip: np.ndarray, stride: int) -> np.ndarray:
    """Fraction of tissue pixels (st2he's brightfield rule) in each ``stride x stride`` block of a uint8 chip."""
    from st2he._tissue import tissue_mask

    mask = tissue_mask(chip, "brightfield").astype(np.float32)
    h, w = mask.shape
    return mask.reshape(h // stride, stride, w // stride, stride).mean(axis=(1, 3))


def run_chips(
    model,
    plan: ChipPlan,
    cores: list[Grid],
    read,
    pairs_for,
    acc: UnitAccumulator,
    *,
    batch_size: int,
    device,
    bar=None,
) -> None:
    """Run the model over chips around ``cores`` and add each core's output pixels into ``acc``.

    ``read(grid) -> (3, h, w) uint8`` reads H&E (white where there is none); ``pairs_for(out_grid) -> (rows, cols,
    units)`` gives the units' pixels in a core's output grid (chips with none are skipped).
    """
    import torch

    lo = plan.margin // plan.stride
    want_features = acc.features is not None
    todo = []
    for core in cores:
        og = plan.out_grid(core)
        pairs = pairs_for(og)
        if len(pairs[0]):
            todo.append((core, og, pairs))
        elif bar is not None:
            bar.update(1)
    for s in range(0, len(todo), batch_size):
        batch = todo[s : s + batch_size]
        chips = np.stack([read(plan.chip_grid(core)) for core, _, _ in batch])
        x = torch.from_numpy(chips).to(device).float().div_(255)
        with torch.inference_mode(), _amp(device):
            out = model(x)
        out = {k: v.float().cpu().numpy() for k, v in out.items() if k != "features" or want_features}
        for i, (_, og, (rows, cols, units)) in enumerate(batch):
            sl = (slice(lo, lo + og.height), slice(lo, lo + og.width))
            o = {k: v[i][:, sl[0], sl[1]] for k, v in out.items()}
            tissue = tissue_fraction_map(chips[i], plan.stride)[sl]
            acc.add(o, tissue, rows, cols, units)
        if bar is not None:
            bar.update(len(batch))


def raster_reader(raster):
    """``read(grid)``: uint8 RGB of a :class:`~st2he._raster.Raster` on ``grid``, white outside the image.

    Values are mapped to 0-255 by the image's dtype (uint16 by 255 / 65535, floats taken as 0-1).
    """
    from st2he._tissue import value_scale

    scale = value_scale(raster.level0.dtype)

    def read(grid: Grid) -> np.ndarray:
        values = raster.read(grid, channels=[0, 1, 2], fill=WHITE / scale, dtype=np.float32)
        return _as_uint8(values * scale)

    return read


def _as_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def array_reader(image: np.ndarray, grid: Grid):
    """``read(grid)`` from an in-memory uint8 image on ``grid`` (same lattice), white outside it."""

    def read(g: Grid) -> np.ndarray:
        out = np.full((3, g.height, g.width), WHITE, np.uint8)
        r0 = int(round((g.y0 - grid.y0) / grid.pixel_size))
        c0 = int(round((g.x0 - grid.x0) / grid.pixel_size))
        a0, b0 = max(r0, 0), max(c0, 0)
        a1, b1 = min(r0 + g.height, grid.height), min(c0 + g.width, grid.width)
        if a1 > a0 and b1 > b0:
            out[:, a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = image[:, a0:a1, b0:b1]
        return out

    return read


def _image_raster(sdata, image_key: str, coordinate_system: str):
    from st2he._raster import Raster

    if image_key not in sdata.images:
        msg = (
            f"image_key={image_key!r} is not an image of this SpatialData object; its images are "
            f"{sorted(sdata.images)}."
        )
        raise KeyError(msg)
    raster = Raster(sdata.images[image_key], coordinate_system, name=f"image_key={image_key!r}")
    raster.check_rgb(what=f"image_key={image_key!r}", step="the expression model")
    return raster


def _tissue_area(raster, pixel: float) -> tuple[np.ndarray, Grid]:
    """Tissue mask of the whole image at a coarse pixel (at most ~4096 pixels across), and its grid."""
    from st2he._tissue import tissue_mask

    b = raster.bounds
    pixel = max(pixel, (b[2] - b[0]) / 4096, (b[3] - b[1]) / 4096)
    grid = Grid.from_bounds(*b, pixel)
    values = raster.read(grid, channels=[0, 1, 2], fill=float(WHITE), dtype=np.float32)
    return tissue_mask(values, "brightfield"), grid


def lattice_units(raster, kind: str, *, bin_size: float, spot_diameter: float, spot_spacing: float, key: str) -> Units:
    """Bins or spots over the image's tissue, on lattices anchored at the origin (see EXPRESSION.md)."""
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel

    size = bin_size if kind == "bins" else spot_diameter
    mask, grid = _tissue_area(raster, size / 4)
    rr, cc = np.nonzero(mask)
    ys = grid.y0 + (rr + 0.5) * grid.pixel_size
    xs = grid.x0 + (cc + 0.5) * grid.pixel_size
    if kind == "bins":
        rows, cols = np.floor(ys / bin_size).astype(np.int64), np.floor(xs / bin_size).astype(np.int64)
        rc = np.unique(np.stack([rows, cols], axis=1), axis=0) if len(rows) else np.zeros((0, 2), np.int64)
        rows, cols = rc[:, 0], rc[:, 1]
        geoms = shapely.box(cols * bin_size, rows * bin_size, (cols + 1) * bin_size, (rows + 1) * bin_size)
        cx, cy = (cols + 0.5) * bin_size, (rows + 0.5) * bin_size
    else:
        pitch = spot_spacing * math.sqrt(3) / 2
        cand_r = np.floor(ys / pitch).astype(np.int64)
        found = []
        for dr in (0, 1):
            r = cand_r + dr
            shift = (r % 2) / 2
            for dc in (0, 1):
                c = np.floor(xs / spot_spacing - shift).astype(np.int64) + dc
                d = np.hypot(xs - (c + shift) * spot_spacing, ys - r * pitch)
                ok = d <= spot_diameter / 2
                found.append(np.stack([r[ok], c[ok]], axis=1))
        rc = np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.int64)
        rows, cols = rc[:, 0], rc[:, 1]
        cx = (cols + (rows % 2) / 2) * spot_spacing
        cy = rows * pitch
        geoms = shapely.buffer(shapely.points(cx, cy), spot_diameter / 2, quad_segs=16)
    if not len(rows):
        msg = f"The image has no tissue (st2he's brightfield rule) to lay {kind} over."
        raise ValueError(msg)
    ids = np.array([f"{r}_{c}" for r, c in zip(rows, cols, strict=True)], dtype=object)
    if kind == "bins":
        gdf = gpd.GeoDataFrame(geometry=list(geoms), index=pd.Index(ids))
    else:
        gdf = gpd.GeoDataFrame(
            {"radius": np.full(len(ids), spot_diameter / 2)}, geometry=list(shapely.points(cx, cy)), index=pd.Index(ids)
        )
    shapes = ShapesModel.parse(gdf)
    return Units(
        key=key,
        ids=ids,
        geoms=np.asarray(geoms, dtype=object),
        centroids=np.column_stack([cx, cy]).astype(np.float64),
        array_rows=rows,
        array_cols=cols,
        shapes=shapes,
    )
