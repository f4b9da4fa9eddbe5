"""``st2he.pl.compare``: input picture, virtual H&E, real H&E and gene expression side by side."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from st2he._elements import get_params
from st2he._grid import COORDINATE_SYSTEM
from st2he._raster import Raster, check_region

from ._common import draw_image, save_figure, scale_bar, set_um_axes

logger = logging.getLogger("st2he")

_DEFAULT_DOT_COLOR = "#ffd92f"


def compare(
    sdata,
    *,
    input_key: str | None = "st2he_input",
    pred_key: str | None = "virtual_he",
    true_key: str | None = "he_image",
    genes: Sequence[str] | None = None,
    n_genes: int = 2,
    points_key: str = "transcripts",
    region: Sequence[float] | None = None,
    scale_bar_um: float | str | None = "auto",
    max_pixels: int = 1200,
    max_points: int = 200_000,
    dot_size: float | None = None,
    coordinate_system: str = COORDINATE_SYSTEM,
    um_axes: bool = False,
    figsize: tuple[float, float] | None = None,
    ax=None,
    save=None,
):
    """Show the input picture, the virtual H&E, the real H&E and the expression of genes over the same region.

    Every panel shows the same box of ``coordinate_system`` (µm) with a scale bar. Images are read through their full
    transformation (rotated or flipped H&E included) from the coarsest pyramid level that gives at most
    ``max_pixels`` pixels across the region.

    Parameters
    ----------
    sdata
        SpatialData object.
    input_key
        The ST2HE input picture (:func:`st2he.pp.rasterize_transcripts`); ``None`` leaves the panel out.
    pred_key
        The virtual H&E (:func:`st2he.tl.virtual_he`); ``None`` leaves the panel out.
    true_key
        The real H&E; left out when ``None`` or when the object has no such image.
    genes
        Genes whose molecules are drawn, one panel each, as dots in the gene's palette colour (the palette
        recorded with ``input_key``, else yellow) on black. Default: ``n_genes`` abundant genes with distinct
        spatial patterns in the region (markers of different cell types rather than housekeeping genes; control
        probes left out). ``[]`` draws no gene panel.
    n_genes
        Number of genes shown when ``genes`` is None.
    points_key
        Points element of the molecules (its ``feature_key`` names the gene column).
    region
        ``(x_min, y_min, x_max, y_max)`` in µm. Default: the extent of the first image shown (else of the molecules).
    scale_bar_um
        Length of the scale bar in µm; ``"auto"``: a round number near a fifth of the region's width; ``None``: none.
    max_pixels
        Largest number of image pixels across the region; coarser pyramid levels are used above it.
    max_points
        Largest number of molecules drawn per gene panel (a random subset beyond it, the same in every call).
    dot_size
        Marker size of the molecules (points²). Default: from the region's size.
    coordinate_system
        The coordinate system of ``region`` and of every panel.
    um_axes
        Label the axes with coordinates in µm (default: no ticks; the scale bar gives the size).
    figsize
        Figure size when the axes are made here. Default: 4 inches per panel.
    ax
        Axes to draw into, one per panel (a sequence or an array), or ``None`` to make a figure.
    save
        Path to write the figure to (format from the suffix), or ``None``.

    Returns
    -------
    A 1-D numpy array of the :class:`matplotlib.axes.Axes` drawn, in panel order.
    """
    import matplotlib.pyplot as plt

    genes = [genes] if isinstance(genes, str) else genes  # one gene, not its letters
    panels: list[tuple[str, str]] = []  # (kind, key or gene)
    for key, label, optional in (
        (input_key, "input_key", False),
        (pred_key, "pred_key", False),
        (true_key, "true_key", True),
    ):
        if key is None:
            continue
        if key not in sdata.images:
            if optional:
                logger.info("compare: no image %r, its panel is left out.", key)
                continue
            msg = (
                f"{label}={key!r} is not an image of this SpatialData object (its images are {sorted(sdata.images)}). "
                f"Pass {label}=None to leave the panel out."
            )
            raise KeyError(msg)
        panels.append(("image", key))

    if region is None:
        region = _default_region(sdata, [k for _, k in panels], points_key, coordinate_system)
    region = check_region(region)

    molecules = None
    if genes is None or len(genes):
        molecules = _molecules(sdata, points_key, region, need=genes is not None, coordinate_system=coordinate_system)
    palette = get_params(sdata, input_key).get("palette", {}) if input_key is not None else {}
    if genes is None:
        genes = _top_genes(molecules, n_genes, region) if molecules is not None else []
    else:
        genes = [str(g) for g in genes]
        if genes:
            panel = molecules["panel"]
            unknown = [g for g in genes if g not in panel]
            if unknown:
                msg = f"Genes {unknown} are not in the panel of {points_key!r} (e.g. {sorted(panel)[:10]})."
                raise ValueError(msg)
    panels += [("gene", g) for g in genes]
    if not panels:
        msg = "Nothing to show: no image panel and no gene panel. Give input_key, pred_key, true_key or genes."
        raise ValueError(msg)

    width = region[2] - region[0]
    height = region[3] - region[1]
    if ax is None:
        side = 4.0
        fs = figsize or (side * len(panels), side * height / width + 0.5)
        fig, axes = plt.subplots(1, len(panels), figsize=fs, squeeze=False, layout="constrained")
        axes = axes[0]
    else:
        axes = np.atleast_1d(np.asarray(ax, dtype=object)).ravel()
        if len(axes) != len(panels):
            msg = f"ax holds {len(axes)} axes but there are {len(panels)} panels ({[p[1] for p in panels]})."
            raise ValueError(msg)

    titles = {input_key: "input", pred_key: "virtual H&E", true_key: "H&E"}
    for axis, (kind, key) in zip(axes, panels, strict=True):
        if kind == "image":
            dark = draw_image(
                axis, sdata.images[key], region, max_pixels=max_pixels, coordinate_system=coordinate_system, name=key
            )
            axis.set_title(f"{titles.get(key, key)} ({key})")
        else:
            n = _draw_gene(axis, molecules, key, palette.get(key, _DEFAULT_DOT_COLOR), region, max_points, dot_size)
            axis.set_title(f"{key} ({n:,} molecules)")
            dark = True
        set_um_axes(axis, region, ticks=um_axes)
        scale_bar(axis, region, scale_bar_um, color="white" if dark else "black")
    save_figure(axes[0].figure, save)
    return np.asarray(axes, dtype=object)


# ------------------------------------------------------------------------------------------------ helpers


def _default_region(sdata, image_keys, points_key, coordinate_system):
    for key in image_keys:
        return Raster(sdata.images[key], coordinate_system, name=key).bounds
    if points_key in sdata.points:
        pts = sdata.points[points_key]
        x = pts["x"].compute().to_numpy()
        y = pts["y"].compute().to_numpy()
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.any():
            return (x[ok].min(), y[ok].min(), x[ok].max() + 1e-6, y[ok].max() + 1e-6)
    msg = "Cannot tell which region to show: no image and no molecules. Pass region=(x_min, y_min, x_max, y_max)."
    raise ValueError(msg)


def _molecules(sdata, points_key, region, need: bool, coordinate_system: str = COORDINATE_SYSTEM):
    """Molecules in ``region`` (positions in ``coordinate_system``): ``{"x", "y", "gene", "panel", "control"}``."""
    if points_key not in sdata.points:
        if need:
            msg = f"points_key={points_key!r} is not a points element (points: {sorted(sdata.points)}); no gene panels."
            raise KeyError(msg)
        logger.info("compare: no points element %r, no gene panels.", points_key)
        return None
    from spatialdata.models import PointsModel

    points = sdata.points[points_key]
    feature_key = points.attrs.get(PointsModel.ATTRS_KEY, {}).get(PointsModel.FEATURE_KEY)
    if feature_key is None or feature_key not in points.columns:
        if need:
            msg = f"The points element {points_key!r} has no gene column (no feature_key)."
            raise ValueError(msg)
        return None
    from spatialdata.transformations import get_transformation

    transformations = get_transformation(points, get_all=True)
    if coordinate_system not in transformations:
        msg = f"The points element {points_key!r} has no transformation to {coordinate_system!r} ({sorted(transformations)})."
        raise ValueError(msg)
    m = transformations[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    x0, y0, x1, y1 = region
    columns = ["x", "y", feature_key] + (["is_control"] if "is_control" in points.columns else [])
    sub = points[columns]
    if not np.allclose(m, np.eye(3)):
        x, y = sub["x"], sub["y"]
        sub = sub.assign(x=m[0, 0] * x + m[0, 1] * y + m[0, 2], y=m[1, 0] * x + m[1, 1] * y + m[1, 2])
    sub = sub[(sub["x"] >= x0) & (sub["x"] < x1) & (sub["y"] >= y0) & (sub["y"] < y1)].compute()
    genes = sub[feature_key]
    if not hasattr(genes, "cat"):
        genes = genes.astype(str).astype("category")
    panel = [str(c) for c in genes.cat.categories]
    codes = genes.cat.codes.to_numpy()
    control = np.zeros(len(panel), dtype=bool)
    if "is_control" in sub.columns and len(sub):
        flagged = np.unique(codes[sub["is_control"].to_numpy(dtype=bool)])
        control[flagged[flagged >= 0]] = True
    prefixes = (
        "blank",
        "negcontrol",
        "unassignedcodeword",
        "deprecatedcodeword",
        "negprb",
        "falsecode",
        "systemcontrol",
    )
    control |= np.array([p.lower().startswith(prefixes) for p in panel], dtype=bool)
    return {
        "x": sub["x"].to_numpy(),
        "y": sub["y"].to_numpy(),
        "gene": codes,
        "panel": panel,
        "control": control,
    }


def _top_genes(molecules, n_genes: int, region) -> list[str]:
    """Pick abundant genes with distinct spatial patterns (of different cell types, not housekeeping genes).

    Among the 30 most abundant genes (control probes left out), greedily take the one whose distribution over a
    12 x 12 grid of the region differs most from that of all molecules and from the genes already taken (L1
    distance of the normalised distributions), weighted by the logarithm of its count.
    """
    if molecules is None or len(molecules["gene"]) == 0 or n_genes < 1:
        return []
    codes = molecules["gene"]
    ok = codes >= 0
    counts = np.bincount(codes[ok], minlength=len(molecules["panel"]))
    counts[molecules["control"]] = -1
    candidates = [i for i in np.argsort(-counts, kind="stable")[:30] if counts[i] > 0]
    if len(candidates) <= n_genes:
        return [molecules["panel"][i] for i in candidates]
    n_bins = 12
    x0, y0, x1, y1 = region
    bx = np.clip(((molecules["x"] - x0) / (x1 - x0) * n_bins).astype(int), 0, n_bins - 1)
    by = np.clip(((molecules["y"] - y0) / (y1 - y0) * n_bins).astype(int), 0, n_bins - 1)
    cell = by * n_bins + bx
    index = {g: k for k, g in enumerate(candidates)}
    rows = np.array([index.get(c, -1) for c in range(len(molecules["panel"]))])[codes[ok]]
    keep = rows >= 0
    dist = np.zeros((len(candidates), n_bins * n_bins))
    np.add.at(dist, (rows[keep], cell[ok][keep]), 1.0)
    dist /= dist.sum(axis=1, keepdims=True)
    total = np.bincount(cell[ok & ~molecules["control"][np.maximum(codes, 0)]], minlength=n_bins * n_bins)
    total = total / max(total.sum(), 1)
    weight = np.log1p(counts[candidates].astype(float))
    gap = np.abs(dist - total).sum(axis=1)
    picked: list[int] = []
    for _ in range(n_genes):
        score = gap * weight
        score[picked] = -np.inf
        best = int(np.argmax(score))
        picked.append(best)
        gap = np.minimum(gap, np.abs(dist - dist[best]).sum(axis=1))
    return [molecules["panel"][candidates[k]] for k in picked]


def _draw_gene(axis, molecules, gene, color, region, max_points, dot_size) -> int:
    axis.set_facecolor("black")
    code = molecules["panel"].index(gene)
    sel = np.flatnonzero(molecules["gene"] == code)
    n = len(sel)
    if n > max_points:
        sel = np.sort(np.random.default_rng(0).choice(sel, max_points, replace=False))
    if dot_size is None:
        dot_size = float(np.clip(1500.0 / max(region[2] - region[0], 1.0), 0.3, 16.0))
    axis.scatter(
        molecules["x"][sel],
        molecules["y"][sel],
        s=dot_size,
        c=[_visible_on_black(color)],
        marker=".",
        linewidths=0,
        rasterized=True,
    )
    return n


def _visible_on_black(color) -> tuple[float, float, float]:
    """Lighten a colour (towards white) until it stands out on black (relative luminance >= 0.4)."""
    from matplotlib.colors import to_rgb

    rgb = np.asarray(to_rgb(color), dtype=float)
    for _ in range(10):
        if float(rgb @ [0.2126, 0.7152, 0.0722]) >= 0.4:
            break
        rgb = rgb + 0.25 * (1 - rgb)
    return tuple(float(v) for v in rgb)
