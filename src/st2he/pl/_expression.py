"""``st2he.pl.expression``: measured and predicted gene maps over the H&E, the tumour map and per-gene Pearson r."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from st2he._grid import COORDINATE_SYSTEM
from st2he._raster import check_region
from st2he._units import gene_columns, lognormalise, table_keys, total_counts

from ._common import draw_image, save_figure, scale_bar, set_um_axes

logger = logging.getLogger("st2he")

#: How much of the H&E's contrast is kept under the units (1: all, 0: white).
_FADE = 0.35


@dataclass
class _Shapes:
    """One shapes element placed in a coordinate system: its ids, geometries and bounds; outlines made on demand."""

    index: object  # pandas Index of the instance ids, as strings
    geoms: np.ndarray  # shapely geometries in the coordinate system
    bounds: np.ndarray  # (n, 4) x_min, y_min, x_max, y_max
    centres: np.ndarray | None = None  # circles: (n, 2)
    radii: np.ndarray | None = None  # circles: (n,)
    outlines: dict | None = None  # position -> list of closed matplotlib Paths (a multipolygon's parts)

    def paths(self, positions: np.ndarray) -> tuple[list, np.ndarray]:
        """Outlines of the shapes at ``positions`` and, for each, the index in ``positions`` it belongs to.

        Each shape's outlines are made once and shared by every panel (and every table) that draws it.
        """
        import shapely
        from matplotlib.path import Path

        if self.outlines is None:
            self.outlines = {}
        todo = np.unique([p for p in positions.tolist() if p not in self.outlines]).astype(np.int64)
        if len(todo):
            pieces, owner = shapely.get_parts(self.geoms[todo], return_index=True)
            coords, ring_of = shapely.get_coordinates(shapely.get_exterior_ring(pieces), return_index=True)
            starts = np.flatnonzero(np.r_[True, np.diff(ring_of) != 0]) if len(ring_of) else np.zeros(0, int)
            for p in todo.tolist():
                self.outlines[p] = []
            for xy, shape in zip(np.split(coords, starts[1:]), owner[ring_of[starts]], strict=True):
                self.outlines[int(todo[shape])].append(Path(xy, closed=True))
        paths, owner = [], []
        for k, p in enumerate(positions.tolist()):
            parts = self.outlines[p]
            paths += parts
            owner += [k] * len(parts)
        return paths, np.asarray(owner, dtype=np.int64)


@dataclass
class _Units:
    """The units of a table that are drawn: its ``rows``, and the element and position of each one's shape."""

    rows: np.ndarray
    shapes: list  # the _Shapes of the table's regions
    which: np.ndarray  # per unit: index into ``shapes``
    positions: np.ndarray  # per unit: position in that element

    @property
    def bounds(self) -> np.ndarray:
        out = np.zeros((len(self.rows), 4))
        for k, shapes in enumerate(self.shapes):
            sel = self.which == k
            out[sel] = shapes.bounds[self.positions[sel]]
        return out

    def select(self, keep: np.ndarray) -> _Units:
        """The units where ``keep`` (a boolean over ``rows``) is True."""
        return _Units(self.rows[keep], self.shapes, self.which[keep], self.positions[keep])

    def collection(self, values: np.ndarray, *, cmap, vmin: float, vmax: float, alpha: float, axis):
        """A matplotlib collection of the units coloured by ``values`` (one per unit), added to ``axis``."""
        from matplotlib.collections import EllipseCollection, PathCollection

        circles = [s.radii is not None for s in self.shapes]
        if all(circles):
            centres = np.zeros((len(self.rows), 2))
            radii = np.zeros(len(self.rows))
            for k, shapes in enumerate(self.shapes):
                sel = self.which == k
                centres[sel] = shapes.centres[self.positions[sel]]
                radii[sel] = shapes.radii[self.positions[sel]]
            coll = EllipseCollection(
                widths=2 * radii,
                heights=2 * radii,
                angles=np.zeros(len(radii)),
                units="xy",
                offsets=centres,
                offset_transform=axis.transData,
            )
            coll.set_array(np.ma.masked_invalid(values))
        elif not any(circles):
            paths, owner = [], []
            for k, shapes in enumerate(self.shapes):
                sel = np.flatnonzero(self.which == k)
                p, o = shapes.paths(self.positions[sel])
                paths += p
                owner.append(sel[o])
            owner = np.concatenate(owner) if owner else np.zeros(0, np.int64)
            coll = PathCollection(paths)  # no sizes: the outlines are drawn in data coordinates
            coll.set_array(np.ma.masked_invalid(values[owner]))
        else:
            msg = "A table annotates both circles and polygons; draw one element's units at a time."
            raise ValueError(msg)
        coll.set_cmap(cmap)
        coll.set_clim(vmin, vmax)
        coll.set_alpha(alpha)
        coll.set_linewidth(0)
        coll.set_rasterized(True)
        axis.add_collection(coll, autolim=False)  # the region is set by the caller
        return coll


def expression(
    sdata,
    *,
    genes: str | Sequence[str],
    pred_key: str,
    true_key: str | None = None,
    input_key: str | None = None,
    prediction: str = "log1p_cp10k",
    image_key: str | None = "he_image",
    metrics_key: str | None = None,
    tumour: bool = True,
    tumour_probability: str = "tumour_probability",
    coordinate_system: str = COORDINATE_SYSTEM,
    region: Sequence[float] | None = None,
    scale_bar_um: float | str | None = "auto",
    cmap: str = "viridis",
    tumour_cmap: str = "magma",
    percentile: float = 99.0,
    alpha: float = 1.0,
    max_pixels: int = 1200,
    um_axes: bool = False,
    figsize: tuple[float, float] | None = None,
    save=None,
):
    """Show measured and predicted expression of chosen genes side by side over the H&E, with per-gene Pearson r.

    One row per gene: the measured map (``true_key``) and the predicted map (``pred_key``), each unit drawn as its
    shape (the polygons or circles of the shapes element its table annotates) over a faded copy of the H&E, in the
    same colours: from the minimum to the ``percentile``-th percentile of the gene's measured log-normalised
    values (``log1p(counts / total * 1e4)``, total over every gene of the measured table) over the units shown
    (of its predicted values when there is no ``true_key``); higher values take the top colour. Below them: the
    predicted tumour probability (0 to 1) when the predicted table has one, and a bar per gene of the Pearson r of
    measured and predicted values over the units in tissue (:func:`st2he.tl.evaluate_expression`). Every map shows
    the same box of ``coordinate_system`` (µm) with a scale bar.

    Parameters
    ----------
    sdata
        SpatialData object.
    genes
        Gene or genes to show, one row each.
    pred_key
        Table of predicted log-normalised expression (:func:`st2he.tl.predict_expression`).
    true_key
        Table of measured counts (:func:`st2he.pp.aggregate_transcripts` or a reader); ``None`` shows the
        predicted maps only.
    input_key
        Table of low-resolution counts shown in a first column (e.g. the spots :func:`st2he.tl.super_resolve` read),
        log-normalised like the measured table and drawn in the same colours.
    prediction
        What ``pred_key`` holds: ``"log1p_cp10k"`` (log-normalised expression, :func:`st2he.tl.predict_expression`) or
        ``"counts"`` (:func:`st2he.tl.super_resolve`), log-normalised here over the genes of the predicted table
        (``log1p(counts / total * 1e4)``); the bars then match units by grid position when both tables are
        gridded (``evaluate_expression(match="grid")``).
    image_key
        H&E image drawn, faded, under the units; ``None`` draws none.
    metrics_key
        Table written by :func:`st2he.tl.evaluate_expression` whose ``pearson`` the bars show. Default: computed
        here (nothing stored) when ``true_key`` is given and both tables hold the same units, else no bars.
    tumour
        Show the tumour probability map when the predicted table has ``obs[tumour_probability]`` (not all NaN).
    tumour_probability
        Column of the predicted table's ``obs`` with the tumour probability.
    coordinate_system
        The coordinate system of ``region`` and of every map (shapes and image are placed in it).
    region
        ``(x_min, y_min, x_max, y_max)`` in µm. Default: the extent of the units drawn.
    scale_bar_um
        Length of the scale bar in µm; ``"auto"``: a round number near a fifth of the region's width; ``None``: none.
    cmap
        Colour map of expression.
    tumour_cmap
        Colour map of the tumour probability.
    percentile
        Upper colour limit of each gene, as a percentile of its measured values (100: the maximum).
    alpha
        Opacity of the units over the H&E.
    max_pixels
        Largest number of H&E pixels across the region; coarser pyramid levels are read above it.
    um_axes
        Label the axes with coordinates in µm (default: no ticks; the scale bar gives the size).
    figsize
        Figure size. Default: 4 inches per map column.
    save
        Path to write the figure to (format from the suffix), or ``None``.

    Returns
    -------
    A 1-D numpy array of the :class:`matplotlib.axes.Axes` drawn, in panel order: for each gene its input map (with
    ``input_key``), its measured map (with ``true_key``) and its predicted map, then the tumour map and the bar chart
    (when shown).
    """
    import matplotlib.pyplot as plt

    from st2he.tl._evaluate_expression import _evaluate, get_table, shared_genes

    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        msg = "genes is empty; pass the gene or genes to show."
        raise ValueError(msg)
    if len(set(genes)) != len(genes):
        msg = f"genes names some genes more than once: {sorted({g for g in genes if genes.count(g) > 1})}."
        raise ValueError(msg)
    if not 0 < float(percentile) <= 100:
        msg = f"percentile must lie in (0, 100], got {percentile!r}."
        raise ValueError(msg)
    if prediction not in ("log1p_cp10k", "counts"):
        msg = f"prediction must be 'log1p_cp10k' or 'counts', got {prediction!r}."
        raise ValueError(msg)
    pred = get_table(sdata, pred_key, "pred_key")
    true = get_table(sdata, true_key, "true_key") if true_key is not None else None
    low = get_table(sdata, input_key, "input_key") if input_key is not None else None
    pcols = gene_columns(pred, genes, name=pred_key)
    tcols = gene_columns(true, genes, name=true_key) if true is not None else None
    lcols = gene_columns(low, genes, name=input_key) if low is not None else None
    if image_key is not None and image_key not in sdata.images:
        msg = (
            f"image_key={image_key!r} is not an image of this SpatialData object (its images are "
            f"{sorted(sdata.images)}); pass the H&E to draw under the units, or image_key=None for none."
        )
        raise KeyError(msg)
    metrics = None
    if metrics_key is not None:
        mtable = get_table(sdata, metrics_key, "metrics_key")
        if "pearson" not in mtable.obs.columns:
            msg = (
                f"metrics_key={metrics_key!r} has no obs column 'pearson' ({list(mtable.obs.columns)}); pass a table "
                "written by st2he.tl.evaluate_expression."
            )
            raise KeyError(msg)
        missing = [g for g in genes if g not in mtable.obs_names]
        if missing:
            msg = (
                f"Genes {missing} are not scored in metrics_key={metrics_key!r} (it scores {list(mtable.obs_names)[:10]}"
                f"{' ...' if mtable.n_obs > 10 else ''}); run st2he.tl.evaluate_expression with them."
            )
            raise KeyError(msg)
        metrics = mtable.obs.loc[genes, "pearson"].to_numpy(dtype=np.float64)

    # the units, placed in the coordinate system, and their values
    cache: dict = {}  # shapes elements read once, their outlines made once for both tables
    pred_units = _units(sdata, pred, pred_key, coordinate_system, cache)
    true_units = _units(sdata, true, true_key, coordinate_system, cache) if true is not None else None
    low_units = _units(sdata, low, input_key, coordinate_system, cache) if low is not None else None
    if region is None:
        boxes = [u.bounds for u in (pred_units, true_units, low_units) if u is not None and len(u.rows)]
        if not boxes:
            msg = f"The tables {[k for k in (pred_key, true_key) if k]} have no unit to draw."
            raise ValueError(msg)
        b = np.concatenate(boxes)
        region = (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())
    region = check_region(region)
    pred_units = _in_region(pred_units, region)
    true_units = _in_region(true_units, region) if true_units is not None else None
    low_units = _in_region(low_units, region) if low_units is not None else None
    # counts: totals over the genes both tables hold, as evaluate_expression(prediction="counts") normalises
    common = None
    if prediction == "counts":
        common = shared_genes(pred, true) if true is not None else [str(g) for g in pred.var_names]
        totals = _dense(pred.X[pred_units.rows][:, gene_columns(pred, common)]).sum(axis=1)
        predicted = lognormalise(pred.X[pred_units.rows][:, pcols], totals)
    else:
        predicted = _dense(pred.X[pred_units.rows][:, pcols])
    low_values = None
    if low is not None:
        low_values = lognormalise(low.X[low_units.rows][:, lcols], total_counts(low)[low_units.rows])
    measured = None
    if true is not None:
        totals = total_counts(true)[true_units.rows]
        if common is not None:  # over the genes both tables hold, as the predicted counts
            totals = np.asarray(true.X[true_units.rows][:, gene_columns(true, common)].sum(axis=1)).ravel()
        measured = lognormalise(true.X[true_units.rows][:, tcols], totals)
    if len(pred_units.rows) == 0 and (true_units is None or len(true_units.rows) == 0):
        msg = f"No unit of {[k for k in (pred_key, true_key) if k]} lies in region {tuple(region)}."
        raise ValueError(msg)

    probability = None
    if tumour and tumour_probability in pred.obs.columns:
        import pandas as pd

        probability = pd.to_numeric(pred.obs[tumour_probability], errors="coerce").to_numpy(dtype=np.float64)
        probability = probability[pred_units.rows]
        if not np.isfinite(probability).any():
            probability = None
    if metrics is None and true_key is not None:
        try:
            gridded = all({"array_row", "array_col"} <= set(t.obs.columns) for t in (pred, true))
            match = "grid" if prediction == "counts" and gridded else "instance"
            df, _, _ = _evaluate(
                sdata, pred_key=pred_key, true_key=true_key, genes=genes, prediction=prediction, match=match
            )
            metrics = df["pearson"].to_numpy(dtype=np.float64)
        except ValueError as err:  # units of different elements (cells measured, bins predicted): maps, no bars
            msg = f"No Pearson r bars: {pred_key!r} and {true_key!r} cannot be scored unit by unit. {err}"
            warnings.warn(msg, UserWarning, stacklevel=2)

    # layout: one row per gene (measured, predicted), then the tumour map and the bars
    map_cols = 1 + (true is not None) + (low is not None)
    mosaic: list[list[str]] = []
    names: list[str] = []
    for g in genes:
        row = ([f"low:{g}"] if low is not None else []) + ([f"true:{g}"] if true is not None else []) + [f"pred:{g}"]
        mosaic.append(row)
        names += row
    extras = (["tumour"] if probability is not None else []) + (["bars"] if metrics is not None else [])
    names += extras
    if map_cols >= 2 and len(extras) == 2:
        # the tumour map under the predicted maps, its colour bar in line with theirs
        mosaic.append(["bars"] * (map_cols - 1) + ["tumour"])
    else:
        mosaic += [[name] * map_cols for name in extras]
    width, height = region[2] - region[0], region[3] - region[1]
    side = 4.0
    if figsize is None:
        figsize = (side * map_cols + 1.5, len(mosaic) * (side * height / width + 0.6))
    fig, panels = plt.subplot_mosaic(mosaic, figsize=figsize, layout="constrained")
    axes = [panels[n] for n in names]

    background = None
    for name in names:
        if name == "bars":
            continue
        axis = panels[name]
        if image_key is not None:
            if background is None:  # read once, drawn faded under every map
                draw_image(
                    axis, sdata.images[image_key], region, max_pixels=max_pixels, coordinate_system=coordinate_system
                )
                images = axis.get_images()
                if images:
                    rgba = np.array(images[0].get_array(), dtype=np.float32)
                    rgba[..., :3] = 1 - (1 - rgba[..., :3]) * _FADE
                    background = (rgba, images[0].get_extent())
                    images[0].remove()
                else:
                    background = False
            if background:
                axis.imshow(background[0], extent=background[1], interpolation="nearest", zorder=0)
        axis.set_facecolor("white")

    for k, g in enumerate(genes):
        values = measured[:, k] if measured is not None else predicted[:, k]
        vmin, vmax = _limits(values, percentile)
        if true is not None:
            ax_t = panels[f"true:{g}"]
            coll = true_units.collection(measured[:, k], cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, axis=ax_t)
            ax_t.set_title(f"{g}: measured ({true_key})")
        if low is not None:
            ax_l = panels[f"low:{g}"]
            low_units.collection(low_values[:, k], cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, axis=ax_l)
            ax_l.set_title(f"{g}: input ({input_key})")
        ax_p = panels[f"pred:{g}"]
        coll = pred_units.collection(predicted[:, k], cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha, axis=ax_p)
        ax_p.set_title(f"{g}: predicted ({pred_key})")
        row_axes = [panels[n] for n in (f"low:{g}", f"true:{g}") if n in panels] + [ax_p]
        fig.colorbar(coll, ax=row_axes, shrink=0.8, label=f"{g}, log1p(counts per 10k)")
    if probability is not None:
        ax_tu = panels["tumour"]
        coll = pred_units.collection(probability, cmap=tumour_cmap, vmin=0.0, vmax=1.0, alpha=alpha, axis=ax_tu)
        ax_tu.set_title(f"tumour probability ({pred_key})")
        fig.colorbar(coll, ax=ax_tu, shrink=0.8, label="P(tumour)")
    elif tumour and tumour_probability not in pred.obs.columns:
        logger.info("expression: %r has no obs[%r]; no tumour map.", pred_key, tumour_probability)
    for name in names:
        if name == "bars":
            continue
        set_um_axes(panels[name], region, ticks=um_axes)
        scale_bar(panels[name], region, scale_bar_um, color="black")
    if metrics is not None:
        _bars(panels["bars"], genes, metrics, metrics_key)
    save_figure(fig, save)
    return np.asarray(axes, dtype=object)


# ------------------------------------------------------------------------------------------------ helpers


def _dense(x) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


def _limits(values: np.ndarray, percentile: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return 0.0, 1.0
    vmin = float(finite.min())
    vmax = float(np.percentile(finite, percentile))
    if vmax <= vmin:
        vmax = vmin + 1e-6
    return vmin, vmax


def _bars(axis, genes, pearson, metrics_key) -> None:
    colours = ["#4c72b0" if not np.isfinite(r) or r >= 0 else "#c44e52" for r in pearson]
    bars = axis.bar(np.arange(len(genes)), np.nan_to_num(pearson, nan=0.0), color=colours)
    axis.bar_label(bars, labels=[f"{r:.2f}" if np.isfinite(r) else "NaN" for r in pearson], fontsize=8)
    axis.set_xticks(
        np.arange(len(genes)), genes, rotation=45 if len(genes) > 4 else 0, ha="right" if len(genes) > 4 else "center"
    )
    axis.axhline(0.0, color="black", linewidth=0.8)
    low = min(0.0, float(np.nanmin(pearson)) if np.isfinite(pearson).any() else 0.0)
    axis.set_ylim(-1.05 if low < 0 else 0.0, 1.05)
    axis.set_ylabel("Pearson r (in tissue)")
    source = f" ({metrics_key})" if metrics_key is not None else ""
    axis.set_title(f"Pearson r per gene{source}")


def _shapes_in(sdata, key: str, name: str, coordinate_system: str, cache: dict) -> _Shapes:
    """Shapes element ``key`` placed in ``coordinate_system`` (one vectorised affine), read once per call."""
    import pandas as pd
    import shapely

    from st2he._elements import affine_to

    if key in cache:
        return cache[key]
    if key not in sdata.shapes:
        msg = (
            f"Table {name!r} annotates {key!r}, which is not a shapes element of this SpatialData object "
            f"(shapes: {sorted(sdata.shapes)}); its units cannot be drawn."
        )
        raise KeyError(msg)
    element = sdata.shapes[key]
    affine = affine_to(element, coordinate_system, what=f"The shapes element {key!r}")
    geoms = element.geometry.to_numpy()
    if not np.allclose(affine, np.eye(3)):
        geoms = shapely.transform(geoms, lambda xy: xy @ affine[:2, :2].T + affine[:2, 2])
    index = pd.Index(element.index.astype(str))
    if "radius" in element.columns:
        centres = shapely.get_coordinates(geoms)[:, :2]
        # (a circle under a non-uniform scale or shear is drawn as the circle of the same area)
        radii = element["radius"].to_numpy(dtype=np.float64) * np.sqrt(abs(np.linalg.det(affine[:2, :2])))
        bounds = np.c_[centres - radii[:, None], centres + radii[:, None]]
        out = _Shapes(index, geoms, bounds, centres=centres, radii=radii)
    else:
        out = _Shapes(index, geoms, shapely.bounds(geoms))
    cache[key] = out
    return out


def _units(sdata, table, name: str, coordinate_system: str, cache: dict) -> _Units:
    """The units of ``table``: its rows matched by instance id to the shapes of the elements it annotates."""
    regions, region_key, instance_key = table_keys(table, name=name)
    obs_region = table.obs[region_key].astype(str).to_numpy()
    obs_ids = table.obs[instance_key].astype(str).to_numpy()
    shapes = [_shapes_in(sdata, str(r), name, coordinate_system, cache) for r in regions]
    rows, which, positions = [], [], []
    for k, (region, element) in enumerate(zip(regions, shapes, strict=True)):
        sel = np.flatnonzero(obs_region == str(region))
        found = element.index.get_indexer(obs_ids[sel])
        if (found < 0).any():
            logger.warning(
                "expression: %d units of %r are not in the shapes %r and are not drawn (e.g. %r).",
                int((found < 0).sum()),
                name,
                region,
                obs_ids[sel][found < 0][0],
            )
        rows.append(sel[found >= 0])
        positions.append(found[found >= 0])
        which.append(np.full(int((found >= 0).sum()), k))
    return _Units(np.concatenate(rows), shapes, np.concatenate(which), np.concatenate(positions))


def _in_region(units: _Units, region) -> _Units:
    x0, y0, x1, y1 = region
    b = units.bounds
    keep = (b[:, 2] > x0) & (b[:, 0] < x1) & (b[:, 3] > y0) & (b[:, 1] < y1)
    return units if keep.all() else units.select(keep)
