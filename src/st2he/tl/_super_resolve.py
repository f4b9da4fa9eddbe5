"""``st2he.tl.super_resolve``: spot-level counts spread onto bins of a few µm, guided by an image (issue 11).

Geometry
--------
The output bins are the bins of :func:`st2he.pp.aggregate_transcripts` (``by="bins"``): squares of ``bin_size`` µm
anchored at the coordinate system's origin, ``array_col = floor(x / bin_size)``, ``array_row = floor(y / bin_size)``,
id ``f"{array_row}_{array_col}"``, built by the same code (:class:`st2he.pp._aggregate._BinAssigner`), so a
super-resolved table and the bins of the true molecules name the same bin the same. A bin belongs to the source unit
(spot, coarse bin, any shape) that contains its **centre** (edge included; where units overlap, the first in the
table's order). A unit that contains no bin centre gets the bin that holds its centroid when no other unit claims it.

Methods
-------
Each method makes a non-negative estimate per bin and gene; with ``conserve_counts`` the estimates of the bins of a
unit are turned into shares of that unit's measured counts (``counts * estimate / sum of estimates``, or equal
shares where every estimate is zero), so the bins of each unit sum to its counts exactly (up to float32 rounding).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from st2he._grid import COORDINATE_SYSTEM, Grid

logger = logging.getLogger("st2he")

#: The methods of :func:`super_resolve`.
METHODS = ("bicubic", "guided", "regression", "diffusion")
#: Sampling steps of ``method="diffusion"`` when ``steps`` is not given: the one-step mode, which scores higher than
#: 10 DDIM steps with the shipped model on held-out sections, and takes less time (``docs/models.md``).
DIFFUSION_STEPS = 1
#: Windows of the bin grid the diffusion model reads at once per batch.
_DIFFUSION_BATCH = 8
#: Guidance pixels per bin edge.
_GUIDE_SUBPIXELS = 4
#: Bin rows of guidance read at once (bounded memory on whole slides).
_STRIP_BINS = 128
#: Channel names taken for the nuclear stain of a multi-channel fluorescence image, in order of preference.
_NUCLEAR = ("dapi", "hoechst", "nucle", "dna")


def super_resolve(
    sdata,
    *,
    table_key: str,
    image_key: str = "he_image",
    genes: Sequence[str] | None = None,
    bin_size: float = 8.0,
    method: str = "guided",
    model: Any = None,
    n_samples: int = 1,
    steps: int | None = None,
    device: str | None = None,
    conserve_counts: bool = True,
    sigma_spatial: float | None = None,
    sigma_range: float = 0.2,
    seed: int = 0,
    key_added: str = "super_resolved",
    shapes_added: str | None = None,
    image_added: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    coordinate_system: str = COORDINATE_SYSTEM,
):
    """Spread low-resolution counts (spots, coarse bins) onto bins of ``bin_size`` µm, guided by an image.

    Parameters
    ----------
    sdata
        SpatialData object with the table of counts and (``"guided"``, ``"regression"``) the guidance image.
    table_key
        Table of counts per unit (``X``; e.g. :func:`st2he.pp.aggregate_transcripts` with ``by="spots"``, or a Visium
        reader's table) annotating a shapes element: circles (points with a ``radius``) or polygons.
    image_key
        Guidance image. ``"guided"``: an H&E (real or virtual; its haematoxylin by colour deconvolution,
        :func:`skimage.color.rgb2hed`), a grey image, or a fluorescence image whose nuclear stain is read (the channel
        named DAPI / Hoechst / nucleus / DNA, else the first). ``"regression"``: an RGB H&E, read by ``model``. Not
        read by ``"bicubic"``.
    genes
        Genes to resolve (default every gene of the table).
    bin_size
        Edge of the output bins in µm; not larger than the units (their median diameter, or the edge of square ones).
    method
        Default ``"guided"`` (``"diffusion"`` is not the default: the shipped diffusion model knows only the
        simulated panel's genes, so it cannot serve an arbitrary table):

        - ``"bicubic"``: each unit's density (counts per µm² of the unit) placed at its centroid and interpolated at
          the bin centres by piecewise cubic (Clough-Tocher) interpolation over the units' Delaunay triangulation
          (:func:`scipy.interpolate.griddata` ``method="cubic"``; the nearest unit outside their hull), clipped at 0;
        - ``"guided"``: joint bilateral upsampling. A bin's estimate is the mean of the densities of the units whose
          centroids lie within ``3 * sigma_spatial`` of its centre (and of its own unit), weighted by
          ``exp(-d**2 / (2 sigma_spatial**2)) * exp(-(g_bin - g_unit)**2 / (2 sigma_range**2))``: ``d`` the distance
          between bin centre and unit centroid, ``g`` the guidance intensity (nuclear stain, haematoxylin) averaged
          over the bin and over the unit's bins, scaled to [0, 1] by the 1st and 99th percentiles over the bins
          (a bin off the image has weight 1 for the guidance term);
        - ``"regression"``: an expression model's dense prediction (:func:`st2he.tl.predict_expression` over the bins,
          ``model``), ``expm1`` of its log-normalised values taken as each bin's relative share of its unit's
          counts (iStar's rescaling);
        - ``"diffusion"``: a conditional diffusion model (:class:`~st2he.models.SuperResolutionModel`, HaDM-ST's
          design; train one with :func:`st2he.tl.train_super_resolution`) generates each gene's map on the bin grid
          from the units' low-resolution map, image features of ``image_key`` and (when the model was trained with
          one) its expression model's ``"regression"`` answer, in windows of the grid blended where they overlap
          (one band of windows in memory at a time); each sample is then conserved like the other methods.
    model
        ``"diffusion"``: a :class:`~st2he.models.SuperResolutionModel`, the folder of a saved one, or None for the one
        shipped with st2he (``st2he/models/weights/super_resolution``: simulated panel, 50 genes); it must generate
        every gene asked for, and the table must hold every gene it generates.
        ``"regression"``: an :class:`~st2he.models.ExpressionModel` or the folder of a saved one (default: the model
        shipped with st2he, trained on simulated sections); it must predict every gene asked for.
    n_samples
        ``"diffusion"``: samples drawn (each conserved); the table holds their mean over counts and, with more than
        one, their per-bin standard deviation is stored as the image ``f"{key_added}_uncertainty"``.
    steps
        ``"diffusion"``: sampling steps (DDIM with trailing timesteps; ``1`` is the one-step mode). Default
        :data:`DIFFUSION_STEPS` (1).
    device
        ``"regression"``, ``"diffusion"``: torch device of the models (default: CUDA or MPS when available, else the
        CPU).
    conserve_counts
        Rescale the estimates so the bins of each unit sum to its counts exactly. Otherwise the estimates themselves,
        as counts per bin (densities times the bin's area; for ``"regression"`` the predicted share of counts per 10k
        times the unit's counts per bin area).
    sigma_spatial, sigma_range
        ``"guided"``: the spatial kernel's width in µm (default half the median distance between neighbouring units)
        and the guidance kernel's width (guidance scaled to [0, 1]).
    seed
        ``"diffusion"``: seeds the noise of every sample and window (the same seed gives the same result); the other
        methods are deterministic.
    key_added
        Name of the new table.
    shapes_added
        Name of the new shapes element of the bins (default ``f"{key_added}_bins"``).
    image_added
        Also store the result as an image: one channel per gene (``c`` = genes), one pixel per bin, float32, placed in
        µm of ``coordinate_system`` (bins without a unit are 0).
    overwrite
        Replace existing elements of these names (never the inputs).
    progress
        Show a progress bar while the guidance is read.
    coordinate_system
        Coordinate system (µm) of the units, the image and the bins.

    Returns
    -------
    The new table ``sdata.tables[key_added]``: bins x genes, ``X`` the predicted counts per bin (dense float32),
    annotating ``shapes_added`` (``region_key="region"``, ``instance_key="instance_id"``: the bin ids, also
    ``obs_names``), ``obs``: ``array_row``, ``array_col``, ``source_unit`` (the id of the unit the bin belongs to),
    ``total_counts`` (the predicted counts over the genes), ``area_um2``; ``obsm["spatial"]`` the bin centres (µm);
    ``uns["st2he"]`` the parameters.
    """
    from st2he._elements import check_key_free, write_elements
    from st2he._units import gene_columns, table_keys
    from st2he.pp._aggregate import _positive

    if method not in METHODS:
        msg = f"method must be one of {METHODS}, got {method!r}."
        raise ValueError(msg)
    bin_size = _positive(bin_size, "bin_size")
    if method == "regression" and model is None:
        from st2he.models._expression import SHIPPED_EXPRESSION

        model = SHIPPED_EXPRESSION  # the expression model shipped with st2he (simulated panel)
    if method == "diffusion":
        if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) or n_samples < 1:
            msg = f"n_samples must be an integer >= 1, got {n_samples!r}."
            raise ValueError(msg)
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1):
            msg = (
                f"steps must be an integer >= 1 (1: the one-step mode) or None (default {DIFFUSION_STEPS}), "
                f"got {steps!r}."
            )
            raise ValueError(msg)
        model = _diffusion_model(model)
        if abs(model.bin_size - bin_size) > 1e-9:
            msg = (
                f"The super-resolution model generates bins of {model.bin_size:g} µm, not bin_size={bin_size:g}; pass "
                f"bin_size={model.bin_size:g} or a model trained for {bin_size:g} µm bins."
            )
            raise ValueError(msg)
    if method == "guided":
        if sigma_spatial is not None:
            sigma_spatial = _positive(sigma_spatial, "sigma_spatial")
        if not (isinstance(sigma_range, int | float) and math.isfinite(sigma_range) and sigma_range > 0):
            msg = f"sigma_range must be a positive number (the guidance is scaled to [0, 1]), got {sigma_range!r}."
            raise ValueError(msg)
    if table_key not in sdata.tables:
        msg = (
            f"table_key={table_key!r} is not a table of this SpatialData object; its tables are {sorted(sdata.tables)}."
        )
        raise KeyError(msg)
    table = sdata.tables[table_key]
    regions, region_key, instance_key = table_keys(table, name=table_key)
    if method == "diffusion":
        default = model.genes
        in_table = set(map(str, table.var_names))
        missing = [g for g in model.genes if g not in in_table]
        if missing:
            msg = (
                f"{len(missing)} genes of the super-resolution model are not in table {table_key!r} (e.g. "
                f"{missing[:5]}): the model reads the low-resolution map of each of its genes; use a model trained on "
                "this panel (st2he.tl.train_super_resolution)."
            )
            raise ValueError(msg)
        if genes is not None:
            other = [str(g) for g in genes if str(g) not in model.genes]
            if other:
                msg = f"{len(other)} genes asked for are not generated by the super-resolution model: {other[:5]}."
                raise ValueError(msg)
    else:
        default = [str(g) for g in table.var_names]
    gene_list = default if genes is None else [str(g) for g in genes]
    if not gene_list:
        msg = "genes is empty; pass at least one gene of the table."
        raise ValueError(msg)
    columns = gene_columns(table, gene_list, name=table_key)

    shapes_added = shapes_added or f"{key_added}_bins"
    uncertainty_added = f"{key_added}_uncertainty" if method == "diffusion" and n_samples > 1 else None
    written = [key_added, shapes_added] + ([image_added] if image_added else [])
    written += [uncertainty_added] if uncertainty_added else []
    if len(set(written)) < len(written):
        msg = f"key_added, shapes_added and image_added must differ, got {written}."
        raise ValueError(msg)
    needs_image = method in ("guided", "regression") or (
        method == "diffusion" and (model.encoder is not None or model.uses_expression)
    )
    reads = {table_key, *regions} | ({image_key} if needs_image else set())
    kinds = {key_added: "tables", shapes_added: "shapes", image_added: "images", uncertainty_added: "images"}
    parameters = {
        key_added: "key_added", shapes_added: "shapes_added", image_added: "image_added",
        uncertainty_added: "key_added (its uncertainty image, n_samples > 1)",
    }
    for key in written:  # before any work
        check_key_free(
            sdata, key, overwrite=overwrite, parameter=parameters[key], kind=kinds[key], inputs=reads, replaced=written
        )

    units = _source_units(sdata, table, table_key, regions, region_key, instance_key, coordinate_system)
    size = float(np.median(units.size))
    if bin_size > size:
        msg = (
            f"bin_size={bin_size:g} µm is larger than the units of table {table_key!r} (median size {size:.3g} µm): "
            "super-resolution needs bins smaller than the units; pass a smaller bin_size."
        )
        raise ValueError(msg)
    raster = None
    if needs_image:
        raster = _guidance_raster(sdata, image_key, coordinate_system, units)
    bins = _assign_bins(units, bin_size)

    counts = table.X[:, columns]
    counts = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)
    counts = counts.astype(np.float64)
    density = counts / units.area[:, None]
    bin_area = bin_size * bin_size

    info: dict[str, Any] = {}
    spread = None
    if method == "diffusion":
        steps = DIFFUSION_STEPS if steps is None else int(steps)
        samples = _diffusion_estimates(
            sdata, image_key, raster, model, units, bins, counts_of(table, model.genes, table_key), bin_size,
            shapes_added, coordinate_system, n_samples=int(n_samples), steps=steps, seed=int(seed), device=device,
            progress=progress,
        )
        keep = [model.genes.index(g) for g in gene_list]
        samples = [s[:, keep] for s in samples]
        if conserve_counts:
            samples = [conserve(s, counts, bins.unit) for s in samples]
        stack = np.stack(samples)
        estimate = stack.mean(axis=0)
        if n_samples > 1:
            spread = stack.std(axis=0).astype(np.float32)
        info.update(
            model=model.metadata.get("checkpoint", "in memory"), steps=steps, n_samples=int(n_samples),
            expression_channels=bool(model.uses_expression),
        )
    elif method == "bicubic":
        estimate = bicubic_estimate(units.centroids, density, bins.centres) * bin_area
    elif method == "guided":
        guide = _bin_guidance(raster, bins, bin_size, progress=progress)
        if not np.isfinite(guide).any():
            msg = f"The guidance image {image_key!r} covers none of the bins of the units of {table_key!r}."
            raise ValueError(msg)
        if sigma_spatial is None:
            sigma_spatial = _neighbour_distance(units.centroids, size) / 2
        guide = _scale01(guide)
        unit_guide = _unit_means(guide, bins.unit, len(units.ids))
        estimate = guided_estimate(
            units.centroids, density, unit_guide, bins.centres, guide, bins.unit,
            sigma_spatial=sigma_spatial, sigma_range=sigma_range,
        ) * bin_area
        info.update(sigma_spatial=float(sigma_spatial), sigma_range=float(sigma_range))
    else:
        share = _regression_shares(
            sdata, image_key, model, gene_list, bins, bin_size, shapes_added, coordinate_system, progress=progress,
            device=device,
        )
        estimate = share / 1e4 * (counts.sum(axis=1) / units.area)[bins.unit, None] * bin_area
        info.update(model=str(model) if isinstance(model, str | bytes) or hasattr(model, "__fspath__") else "in memory")
    if method == "diffusion":
        values = estimate  # each sample already conserved
    else:
        values = conserve(estimate, counts, bins.unit) if conserve_counts else estimate
    values = values.astype(np.float32)

    params = {
        "method": method,
        "table_key": table_key,
        "image_key": image_key if needs_image else None,
        "genes": gene_list,
        "bin_size": bin_size,
        "conserve_counts": bool(conserve_counts),
        "seed": int(seed),
        "coordinate_system": coordinate_system,
        "uncertainty": uncertainty_added,
        "n_units": len(units.ids),
        "n_bins": len(bins.keys),
        "units_without_bins": int(bins.lost.sum()),
        **info,
    }
    if bins.lost.any():
        lost = counts[bins.lost].sum()
        logger.warning(
            "super_resolve: %d units of %r contain no bin centre and their centroid's bin belongs to another unit; "
            "their %d counts are not placed (use a smaller bin_size).",
            int(bins.lost.sum()), table_key, int(lost),
        )
    elements = {
        shapes_added: _bin_shapes(bins, bin_size, coordinate_system),
        key_added: _table(values, bins, units, gene_list, shapes_added, bin_size, params),
    }
    if image_added:
        elements[image_added] = _image(values, bins, gene_list, bin_size, coordinate_system)
    if uncertainty_added:
        elements[uncertainty_added] = _image(spread, bins, gene_list, bin_size, coordinate_system)
    stored = write_elements(
        sdata,
        elements,
        overwrite=overwrite,
        inputs=reads,
        parameters=parameters,
        params=dict.fromkeys(elements, params),
    )
    logger.info(
        "super_resolve (%s): %d units of %r -> %d bins of %g µm, %d genes.",
        method, len(units.ids), table_key, len(bins.keys), bin_size, len(gene_list),
    )
    return stored[key_added]


# ----------------------------------------------------------------------------------------------- units and bins


@dataclass
class _Units:
    ids: np.ndarray  # table order
    centroids: np.ndarray  # (n, 2)
    radius: np.ndarray  # circles: radius; polygons: NaN
    geoms: np.ndarray  # polygons (None for circles)
    area: np.ndarray  # µm²
    size: np.ndarray  # diameter (circles), sqrt(area) (polygons)


def _source_units(sdata, table, table_key, regions, region_key, instance_key, coordinate_system) -> _Units:
    """The shapes the table annotates, in the table's order, placed in ``coordinate_system``."""
    import shapely
    from spatialdata import transform

    from st2he._elements import affine_to

    n = table.n_obs
    if n == 0:
        msg = f"Table {table_key!r} has no rows: nothing to super-resolve."
        raise ValueError(msg)
    ids = np.empty(n, dtype=object)
    cents = np.full((n, 2), np.nan)
    radius = np.full(n, np.nan)
    geoms = np.empty(n, dtype=object)
    covered = np.zeros(n, dtype=bool)
    region_of = table.obs[region_key].astype(str).to_numpy()
    for region in regions:
        if region not in sdata.shapes:
            kind = "an element of another type" if region in sdata else "not an element"
            msg = (
                f"Table {table_key!r} annotates {region!r}, which is {kind} of this SpatialData object: super_resolve "
                f"needs a table of units that are shapes (spots, bins); its shapes are {sorted(sdata.shapes)}."
            )
            raise ValueError(msg)
        element = sdata.shapes[region]
        affine_to(element, coordinate_system, what=f"Shapes {region!r}")  # a clear error when it is not placed there
        gdf = transform(element, to_coordinate_system=coordinate_system)
        rows = np.flatnonzero(region_of == region)
        pos = pd.Index(gdf.index).get_indexer(table.obs[instance_key].iloc[rows].to_numpy())
        if (pos < 0).any():
            missing = table.obs[instance_key].iloc[rows][pos < 0].head(5).tolist()
            msg = f"{int((pos < 0).sum())} units of table {table_key!r} are not in shapes {region!r} (e.g. {missing})."
            raise ValueError(msg)
        g = np.asarray(gdf.geometry.values, dtype=object)[pos]
        kinds = shapely.get_type_id(g)
        point = kinds == 0
        if point.any():
            if "radius" not in gdf.columns:
                msg = f"Shapes {region!r} are points without a 'radius' column: not units with an area (circles)."
                raise ValueError(msg)
            radius[rows[point]] = gdf["radius"].to_numpy(dtype=np.float64)[pos][point]
        ids[rows] = np.asarray(gdf.index, dtype=object)[pos]
        poly = ~point
        geoms[rows[poly]] = g[poly]
        c = shapely.centroid(g)
        cents[rows] = np.column_stack([shapely.get_x(c), shapely.get_y(c)])
        covered[rows] = True
    if not covered.all():
        msg = f"{int((~covered).sum())} rows of table {table_key!r} annotate none of its regions {regions}."
        raise ValueError(msg)
    circle = np.isfinite(radius)
    area = np.where(circle, math.pi * np.nan_to_num(radius) ** 2, 0.0)
    if (~circle).any():
        area[~circle] = shapely.area(geoms[~circle])
    if not (area > 0).all():
        msg = f"{int((area <= 0).sum())} units of table {table_key!r} have no area (points without radius, lines)."
        raise ValueError(msg)
    size = np.where(circle, 2 * np.nan_to_num(radius), np.sqrt(area))
    return _Units(ids, cents, radius, geoms, area, size)


@dataclass
class _Bins:
    keys: np.ndarray  # grid keys, sorted
    rows: np.ndarray
    cols: np.ndarray
    ids: np.ndarray
    centres: np.ndarray  # (n, 2)
    unit: np.ndarray  # index of the unit each bin belongs to
    lost: np.ndarray  # per unit: no bin


def _assign_bins(units: _Units, bin_size: float) -> _Bins:
    """Bins of ``bin_size`` whose centres the units contain (first unit wins), as aggregate_transcripts names them."""
    import shapely

    from st2he.pp._aggregate import _grid_ids, _grid_key, _grid_rows_cols

    b = bin_size
    parts_unit, parts_r, parts_c = [], [], []
    for i in range(len(units.ids)):
        if np.isfinite(units.radius[i]):
            r = units.radius[i]
            cx, cy = units.centroids[i]
            x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
        else:
            x0, y0, x1, y1 = shapely.bounds(units.geoms[i])
        c0, c1 = math.ceil(x0 / b - 0.5), math.floor(x1 / b - 0.5)
        r0, r1 = math.ceil(y0 / b - 0.5), math.floor(y1 / b - 0.5)
        if c1 < c0 or r1 < r0:
            continue
        rr, cc = np.meshgrid(np.arange(r0, r1 + 1), np.arange(c0, c1 + 1), indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        x, y = (cc + 0.5) * b, (rr + 0.5) * b
        if np.isfinite(units.radius[i]):
            inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
        else:
            inside = shapely.intersects_xy(units.geoms[i], x, y)
        parts_unit.append(np.full(int(inside.sum()), i, dtype=np.int64))
        parts_r.append(rr[inside])
        parts_c.append(cc[inside])
    unit = np.concatenate(parts_unit) if parts_unit else np.zeros(0, np.int64)
    rows = np.concatenate(parts_r).astype(np.int64) if parts_r else np.zeros(0, np.int64)
    cols = np.concatenate(parts_c).astype(np.int64) if parts_c else np.zeros(0, np.int64)
    keys = _grid_key(rows, cols)
    keys, first = np.unique(keys, return_index=True)  # on a bin two units contain, the first unit (lowest index)
    unit = unit[first]
    # units holding no bin centre: the bin of their centroid, if free
    has = np.zeros(len(units.ids), dtype=bool)
    has[unit] = True
    lost = ~has
    if lost.any():
        miss = np.flatnonzero(lost)
        cr = np.floor(units.centroids[miss, 1] / b).astype(np.int64)
        cc = np.floor(units.centroids[miss, 0] / b).astype(np.int64)
        extra_keys = _grid_key(cr, cc)
        extra_keys, first = np.unique(extra_keys, return_index=True)
        free = ~np.isin(extra_keys, keys)
        keys = np.concatenate([keys, extra_keys[free]])
        unit = np.concatenate([unit, miss[first[free]]])
        order = np.argsort(keys, kind="stable")
        keys, unit = keys[order], unit[order]
        lost = np.ones(len(units.ids), dtype=bool)
        lost[unit] = False
    rows, cols = _grid_rows_cols(keys)
    centres = np.column_stack([(cols + 0.5) * b, (rows + 0.5) * b]).astype(np.float64)
    return _Bins(keys, rows, cols, _grid_ids(rows, cols), centres, unit, lost)


def _bin_shapes(bins: _Bins, bin_size: float, coordinate_system: str):
    from st2he.pp._aggregate import _BinAssigner

    return _BinAssigner(bin_size).shapes(bins.keys, bins.ids, coordinate_system)


def _neighbour_distance(centroids: np.ndarray, size: float) -> float:
    """Median distance from each unit's centroid to its nearest neighbour's (the units' size for a lone unit)."""
    from scipy.spatial import cKDTree

    if len(centroids) < 2:
        return float(size)
    d, _ = cKDTree(centroids).query(centroids, k=2)
    return float(np.median(d[:, 1])) or float(size)


# ----------------------------------------------------------------------------------------------- estimates


def bicubic_estimate(points: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Cubic (Clough-Tocher) interpolation of per-unit ``values`` at ``at``, nearest outside the hull, clipped at 0."""
    from scipy.interpolate import griddata
    from scipy.spatial import QhullError

    nearest = griddata(points, values, at, method="nearest")
    if len(points) < 3:
        return np.clip(nearest, 0, None)
    try:
        cubic = griddata(points, values, at, method="cubic")
    except QhullError:  # fewer than 3 units not on one line
        return np.clip(nearest, 0, None)
    out = np.where(np.isfinite(cubic), cubic, nearest)
    return np.clip(out, 0, None)


def guided_estimate(
    points: np.ndarray,
    values: np.ndarray,
    point_guide: np.ndarray,
    at: np.ndarray,
    guide: np.ndarray,
    own: np.ndarray,
    *,
    sigma_spatial: float,
    sigma_range: float,
) -> np.ndarray:
    """Joint bilateral upsampling of per-unit ``values`` at the bins ``at`` (see :func:`super_resolve`)."""
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    pairs = cKDTree(at).sparse_distance_matrix(cKDTree(points), 3 * sigma_spatial, output_type="ndarray")
    i = np.concatenate([pairs["i"].astype(np.int64), np.arange(len(at))])
    j = np.concatenate([pairs["j"].astype(np.int64), own.astype(np.int64)])
    key = np.unique(i * len(points) + j)
    i, j = key // len(points), key % len(points)
    d2 = ((at[i] - points[j]) ** 2).sum(axis=1)
    dg = guide[i] - point_guide[j]
    dg = np.where(np.isfinite(dg), dg, 0.0)
    w = np.exp(-d2 / (2 * sigma_spatial**2)) * np.exp(-(dg**2) / (2 * sigma_range**2))
    W = sp.csr_matrix((w, (i, j)), shape=(len(at), len(points)))
    norm = np.asarray(W.sum(axis=1)).ravel()
    return np.asarray(W @ values) / np.where(norm > 0, norm, 1.0)[:, None]


def conserve(estimate: np.ndarray, counts: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """Shares of each unit's counts in proportion to its bins' estimates (equal shares where all are zero)."""
    n_units = counts.shape[0]
    estimate = np.clip(np.nan_to_num(estimate, nan=0.0), 0, None)
    sums = np.zeros((n_units, estimate.shape[1]))
    np.add.at(sums, unit, estimate)
    n_bins = np.bincount(unit, minlength=n_units).astype(np.float64)
    flat = (sums <= 0)[unit]
    share = np.where(flat, 1.0 / np.maximum(n_bins, 1)[unit, None], estimate / np.where(sums > 0, sums, 1.0)[unit])
    return counts[unit] * share


def _unit_means(values: np.ndarray, unit: np.ndarray, n_units: int) -> np.ndarray:
    ok = np.isfinite(values)
    s = np.bincount(unit[ok], weights=values[ok], minlength=n_units)
    n = np.bincount(unit[ok], minlength=n_units)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def _scale01(values: np.ndarray) -> np.ndarray:
    ok = np.isfinite(values)
    lo, hi = np.percentile(values[ok], [1, 99])
    if hi <= lo:
        return np.where(ok, 0.0, np.nan)
    return np.clip((values - lo) / (hi - lo), 0, 1)


# ----------------------------------------------------------------------------------------------- guidance


def _guidance_raster(sdata, image_key: str, coordinate_system: str, units: _Units):
    from st2he._raster import Raster

    if image_key not in sdata.images:
        msg = (
            f"image_key={image_key!r} is not an image of this SpatialData object; its images are "
            f"{sorted(sdata.images)}. The guided and regression methods need a guidance image (H&E, virtual H&E or "
            "nuclear stain); method='bicubic' needs none."
        )
        raise KeyError(msg)
    raster = Raster(sdata.images[image_key], coordinate_system, name=f"image_key={image_key!r}")
    ix0, iy0, ix1, iy1 = raster.bounds
    r = np.where(np.isfinite(units.radius), units.radius, units.size / 2)
    ux0, uy0 = float((units.centroids[:, 0] - r).min()), float((units.centroids[:, 1] - r).min())
    ux1, uy1 = float((units.centroids[:, 0] + r).max()), float((units.centroids[:, 1] + r).max())
    if min(ix1, ux1) <= max(ix0, ux0) or min(iy1, uy1) <= max(iy0, uy0):
        msg = (
            f"The guidance image {image_key!r} ({tuple(round(v, 1) for v in raster.bounds)} µm) does not overlap the "
            f"units ({round(ux0, 1)}, {round(uy0, 1)}, {round(ux1, 1)}, {round(uy1, 1)} µm) in {coordinate_system!r}: "
            "check the image's transformation (e.g. st2he.tl.register_he) or the coordinate_system."
        )
        raise ValueError(msg)
    return raster


def _guide_channels(raster) -> tuple[list[int], str]:
    """Channels to read and how to make guidance of them: ``"he"`` (haematoxylin of RGB) or ``"grey"``."""
    names = [c.lower() for c in raster.channels]
    n = int(raster.level0.shape[0])
    if n == 3 and (not names or names == ["r", "g", "b"] or names == ["0", "1", "2"]):
        return [0, 1, 2], "he"
    for want in _NUCLEAR:
        for k, name in enumerate(names):
            if want in name:
                return [k], "grey"
    return [0], "grey"


def _bin_guidance(raster, bins: _Bins, bin_size: float, *, progress: bool) -> np.ndarray:
    """Mean guidance intensity over each bin (NaN off the image), read in strips of bin rows."""
    from st2he._progress import tqdm

    channels, kind = _guide_channels(raster)
    k = _GUIDE_SUBPIXELS
    r0, r1 = int(bins.rows.min()), int(bins.rows.max()) + 1
    c0, c1 = int(bins.cols.min()), int(bins.cols.max()) + 1
    out = np.full((r1 - r0, c1 - c0), np.nan)
    starts = list(range(r0, r1, _STRIP_BINS))
    for s in tqdm(starts, desc="guidance", unit="strip", disable=not progress):
        e = min(s + _STRIP_BINS, r1)
        grid = Grid(x0=c0 * bin_size, y0=s * bin_size, pixel_size=bin_size / k, height=(e - s) * k, width=(c1 - c0) * k)
        px = raster.read(grid, channels=channels, fill=np.nan, dtype=np.float32)
        if kind == "he":
            g = _haematoxylin(px)
        else:
            g = px[0].astype(np.float64)
        g = g.reshape(e - s, k, c1 - c0, k)
        with np.errstate(invalid="ignore"), _quiet():
            out[s - r0 : e - r0] = np.nanmean(g, axis=(1, 3))
    return out[bins.rows - r0, bins.cols - c0]


def _haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density of ``(3, y, x)`` RGB (0-255; NaN off the image stays NaN)."""
    from skimage.color import rgb2hed

    off = ~np.isfinite(rgb).all(axis=0)
    img = np.clip(np.nan_to_num(np.moveaxis(rgb, 0, -1), nan=255.0) / 255.0, 0, 1)
    h = rgb2hed(img)[..., 0].astype(np.float64)
    h[off] = np.nan
    return h


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def _regression_shares(
    sdata, image_key, model, genes, bins: _Bins, bin_size: float, shapes_key, coordinate_system, *, progress,
    device=None,
):
    """The expression model's predicted counts per 10k at each bin (``expm1`` of its log-normalised output)."""
    from spatialdata import SpatialData

    from st2he.tl._expression import predict_expression

    scratch = SpatialData(
        images={image_key: sdata.images[image_key]},
        shapes={shapes_key: _bin_shapes(bins, bin_size, coordinate_system)},
    )
    pred = predict_expression(
        scratch, image_key=image_key, model=model, units=shapes_key, genes=genes, pooling="log",
        key_added="prediction", progress=progress, coordinate_system=coordinate_system, device=device,
    )
    pos = pd.Index(pred.obs_names.astype(str)).get_indexer(bins.ids.astype(str))
    X = np.asarray(pred.X, dtype=np.float64)[pos]
    return np.expm1(np.nan_to_num(X, nan=0.0)).clip(0, None)


# ----------------------------------------------------------------------------------------------- output


def _table(values, bins: _Bins, units: _Units, genes, shapes_key: str, bin_size: float, params):
    import anndata as ad
    from spatialdata.models import TableModel

    from st2he.pp._aggregate import INSTANCE_KEY, REGION_KEY, _id_text, _without_none

    names = pd.Index(_id_text(pd.Index(bins.ids)))
    obs = pd.DataFrame(index=names)
    obs[INSTANCE_KEY] = bins.ids
    obs[REGION_KEY] = pd.Categorical([shapes_key] * len(names), categories=[shapes_key])
    obs["array_row"] = bins.rows.astype(np.int64)
    obs["array_col"] = bins.cols.astype(np.int64)
    obs["source_unit"] = pd.Categorical(np.asarray([str(u) for u in units.ids], dtype=object)[bins.unit])
    obs["total_counts"] = values.sum(axis=1, dtype=np.float64)
    obs["area_um2"] = np.full(len(names), bin_size * bin_size)
    adata = ad.AnnData(X=values, obs=obs, var=pd.DataFrame(index=pd.Index(list(genes))))
    adata.obsm["spatial"] = bins.centres.copy()
    adata.uns["st2he"] = _without_none(params)
    return TableModel.parse(adata, region=shapes_key, region_key=REGION_KEY, instance_key=INSTANCE_KEY)


def _image(values, bins: _Bins, genes, bin_size: float, coordinate_system: str):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Affine

    r0, c0 = int(bins.rows.min()), int(bins.cols.min())
    H, W = int(bins.rows.max()) - r0 + 1, int(bins.cols.max()) - c0 + 1
    data = np.zeros((len(genes), H, W), dtype=np.float32)
    data[:, bins.rows - r0, bins.cols - c0] = values.T
    affine = Affine(
        np.array([[bin_size, 0, c0 * bin_size], [0, bin_size, r0 * bin_size], [0, 0, 1]], dtype=np.float64),
        input_axes=("x", "y"),
        output_axes=("x", "y"),
    )
    return Image2DModel.parse(
        data, dims=("c", "y", "x"), c_coords=list(genes), transformations={coordinate_system: affine}
    )


# ----------------------------------------------------------------------------------------------- diffusion


def _diffusion_model(model):
    """A SuperResolutionModel from ``model`` (a model, a folder, or None: the shipped one)."""
    import os

    from st2he.models._super_resolution import (
        SHIPPED_SUPER_RESOLUTION,
        SuperResolutionModel,
        load_super_resolution_model,
    )

    if isinstance(model, SuperResolutionModel):
        return model
    if model is None:
        if not (SHIPPED_SUPER_RESOLUTION / "config.json").is_file():
            msg = (
                "method='diffusion' needs model= (an st2he.models.SuperResolutionModel or the folder of a saved one, "
                "e.g. from st2he.tl.train_super_resolution): no super-resolution model is shipped with this st2he."
            )
            raise ValueError(msg)
        return load_super_resolution_model(SHIPPED_SUPER_RESOLUTION)
    if isinstance(model, str | os.PathLike):
        return load_super_resolution_model(model)
    msg = (
        f"model must be an st2he.models.SuperResolutionModel, the folder of a saved one or None for "
        f"method='diffusion', got {type(model).__name__}."
    )
    raise TypeError(msg)


def counts_of(table, genes, name: str) -> np.ndarray:
    """Dense float64 counts of ``genes`` (in that order) of a table."""
    from st2he._units import gene_columns

    X = table.X[:, gene_columns(table, list(genes), name=name)]
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    return X.astype(np.float64)


def _bin_low(units: _Units, bins: _Bins, counts: np.ndarray, scales: np.ndarray, bin_size: float) -> np.ndarray:
    """The low-resolution map at each bin: ``log1p`` of its unit's counts per bin area, divided by the gene's scale."""
    density = counts / units.area[:, None]
    return (np.log1p(density[bins.unit] * bin_size * bin_size) / scales).astype(np.float32)


def _bin_expression(
    sdata, image_key, expression_model, genes, units: _Units, bins: _Bins, counts: np.ndarray, scales: np.ndarray,
    bin_size: float, shapes_key: str, coordinate_system: str, *, progress: bool, device=None,
) -> np.ndarray:
    """The ``"regression"`` answer (expression model's prediction, conserved in each unit), log1p, scaled."""
    share = _regression_shares(
        sdata, image_key, expression_model, list(genes), bins, bin_size, shapes_key, coordinate_system,
        progress=progress, device=device,
    )
    estimate = conserve(share, counts, bins.unit)
    return (np.log1p(estimate) / scales).astype(np.float32)


def _dense(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, h: int, w: int) -> np.ndarray:
    """``(G, h, w)`` float32 with each bin's values at (row, col), 0 elsewhere."""
    out = np.zeros((values.shape[1], h, w), dtype=np.float32)
    out[:, rows, cols] = values.T
    return out


def _guidance_kind(raster) -> str:
    return "he" if _guide_channels(raster)[1] == "he" else "grey"


def _pixels(raster, row0: int, col0: int, h: int, w: int, bin_size: float, subpixels: int) -> np.ndarray:
    """Guidance pixels ``(3, s*h, s*w)`` in [-1, 1] over bins [row0, row0+h) x [col0, col0+w) (off the image:
    white for an H&E, 0 for a stain)."""
    channels, kind = _guide_channels(raster)
    s = int(subpixels)
    grid = Grid(x0=col0 * bin_size, y0=row0 * bin_size, pixel_size=bin_size / s, height=h * s, width=w * s)
    px = raster.read(grid, channels=channels, fill=np.nan, dtype=np.float32)
    if kind == "he":
        px = np.nan_to_num(px, nan=255.0) / 255.0
    else:
        dtype = np.dtype(raster.level0.dtype)
        top = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0
        px = np.repeat(np.nan_to_num(px[:1], nan=0.0) / top, 3, axis=0)
    return (np.clip(px, 0, 1) * 2 - 1).astype(np.float32)


def _window_weight(window: int, overlap: int) -> np.ndarray:
    """Blending weights of a window: 1 inside, ramping linearly towards the edges over ``overlap`` bins."""
    i = np.arange(window)
    ramp = np.minimum(1.0, np.minimum(i + 1, window - i) / (overlap + 1))
    return np.outer(ramp, ramp).astype(np.float32)


def _starts(lo: int, hi: int, window: int, stride: int) -> list[int]:
    out = [lo]
    while out[-1] + window < hi:
        out.append(out[-1] + stride)
    return out


def _diffusion_estimates(
    sdata, image_key, raster, model, units: _Units, bins: _Bins, counts: np.ndarray, bin_size: float, shapes_key,
    coordinate_system, *, n_samples: int, steps: int, seed: int, device, progress: bool,
) -> list[np.ndarray]:
    """``n_samples`` estimates (counts per bin, ``(n_bins, G)`` over the model's genes), window by window.

    The bin grid is cut into windows of ``model.config["window"]`` bins overlapping by a quarter, processed in bands
    of window rows; overlapping windows are blended with weights that ramp down towards their edges. Only one band
    of the grid is held at a time (memory grows with the slide's width, not its area), plus the output.
    """
    import torch

    from st2he._progress import tqdm

    scales = np.asarray(model.config["scales"], dtype=np.float64)
    if raster is not None and model.encoder is not None:
        kind = _guidance_kind(raster)
        if kind != model.config["guidance"]:
            want = "an RGB H&E" if model.config["guidance"] == "he" else "a single-channel stain"
            msg = (
                f"The super-resolution model reads {want} ({model.config['guidance']!r}) but image {image_key!r} is "
                f"read as {kind!r}: pass the kind of guidance image the model was trained on."
            )
            raise ValueError(msg)
    low = _bin_low(units, bins, counts, scales, bin_size)
    expr = None
    if model.uses_expression:
        expr = _bin_expression(
            sdata, image_key, model.expression_model(), model.genes, units, bins, counts, scales, bin_size,
            shapes_key, coordinate_system, progress=progress, device=device,
        )
    from st2he.tl._generate import resolve_device

    device = resolve_device(device)
    model.eval()
    model.to(device)
    W = int(model.config["window"])
    overlap = W // 4
    stride = W - overlap
    sub = int(model.config["subpixels"])
    rows, cols = bins.rows, bins.cols  # sorted by row (the keys are row-major)
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    c0, c1 = int(cols.min()), int(cols.max()) + 1
    row_starts = _starts(r0, r1, W, stride)
    col_starts = _starts(c0, c1, W, stride)
    width = col_starts[-1] - c0 + W
    weight = _window_weight(W, overlap)
    G = len(model.genes)
    out = [np.zeros((len(rows), G), dtype=np.float32) for _ in range(n_samples)]
    acc = np.zeros((n_samples, G, W, width), dtype=np.float32)
    wsum = np.zeros((W, width), dtype=np.float32)
    for band, s in enumerate(tqdm(row_starts, desc="diffusion", unit="band", disable=not progress)):
        lo, hi = np.searchsorted(rows, s), np.searchsorted(rows, s + W)
        lr, lc = rows[lo:hi] - s, cols[lo:hi] - c0
        low_d = _dense(low[lo:hi], lr, lc, W, width)
        mask_d = _dense(np.ones((hi - lo, 1), np.float32), lr, lc, W, width)
        expr_d = _dense(expr[lo:hi], lr, lc, W, width) if expr is not None else None
        px = None
        if model.encoder is not None and hi > lo:
            px = _pixels(raster, s, c0, W, width, bin_size, sub)
        todo = [j for j, c in enumerate(col_starts) if mask_d[0, :, c - c0 : c - c0 + W].any()]
        for b0 in range(0, len(todo), _DIFFUSION_BATCH):
            batch = todo[b0 : b0 + _DIFFUSION_BATCH]
            offs = [col_starts[j] - c0 for j in batch]

            def crop(a, k=1, offs=offs):
                return torch.from_numpy(np.stack([a[:, :, o * k : (o + W) * k] for o in offs])).to(device)

            inputs = (crop(low_d), crop(mask_d), crop(px, sub) if px is not None else None,
                      crop(expr_d) if expr_d is not None else None)
            for k in range(n_samples):
                noise = np.stack([
                    np.random.default_rng([seed, k, band, j]).standard_normal((G, W, W), dtype=np.float32)
                    for j in batch
                ])
                with torch.no_grad():
                    x0 = model.sample(*inputs, steps=steps, noise=torch.from_numpy(noise)).float().cpu().numpy()
                for i, o in enumerate(offs):
                    acc[k, :, :, o : o + W] += x0[i] * weight
        for o in (col_starts[j] - c0 for j in todo):
            wsum[:, o : o + W] += weight
        final = W if band == len(row_starts) - 1 else stride
        done = lr < final
        if done.any():
            fr, fc = lr[done], lc[done]
            idx = np.arange(lo, hi)[done]
            for k in range(n_samples):
                out[k][idx] = (acc[k][:, fr, fc] / np.maximum(wsum[fr, fc], 1e-12)).T
        acc[:, :, :overlap] = acc[:, :, stride:]
        acc[:, :, overlap:] = 0
        wsum[:overlap] = wsum[stride:]
        wsum[overlap:] = 0
    return [np.clip(np.expm1(np.clip(o.astype(np.float64) * scales, None, 30.0)), 0, None) for o in out]
