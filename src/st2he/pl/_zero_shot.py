"""Plots of zero-shot calls: the class probability map next to the H&E, and ROC curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from st2he._grid import COORDINATE_SYSTEM
from st2he._raster import Raster

from ._common import draw_image, save_figure, scale_bar, set_um_axes


def zero_shot(
    sdata,
    *,
    key: str = "zero_shot",
    class_name: str | None = None,
    image_key: str | None = None,
    cmap: str = "magma",
    alpha: float = 0.7,
    max_pixels: int = 1500,
    scale_bar_um: float | str | None = "auto",
    coordinate_system: str = COORDINATE_SYSTEM,
    um_axes: bool = False,
    figsize: tuple[float, float] | None = None,
    ax: Sequence | None = None,
    save=None,
):
    """Show the probability of one class per tile over the tissue, next to the H&E it was read from.

    Parameters
    ----------
    sdata
        SpatialData object with a table written by :func:`st2he.tl.zero_shot`.
    key
        That table (the ``key_added`` of the run).
    class_name
        Class to map; default the slide-level call.
    image_key
        H&E image to show; default the one the run classified.
    cmap
        Colour map of the probabilities (0 to 1).
    alpha
        Opacity of the tiles over a faded copy of the H&E.
    max_pixels
        Longest side of the displayed H&E in pixels (a coarser pyramid level is read for big slides).
    scale_bar_um
        Length of the scale bar in µm (on both panels); ``"auto"`` picks a round length, ``None`` draws none.
    coordinate_system
        The coordinate system shown (the tiles are placed in it through their transformation).
    um_axes
        Label the axes with coordinates in µm (default: no ticks; the scale bar gives the size).
    figsize
        Size of a new figure.
    ax
        Two matplotlib axes to draw into; new ones otherwise.
    save
        Path to write the figure to (format from the suffix), or ``None``.

    Returns
    -------
    The two axes: the H&E and the probability map.
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    from st2he.tl._zero_shot import _zero_shot_table, tile_boxes

    adata = _zero_shot_table(sdata, key)
    info = adata.uns[key]
    classes = list(adata.var_names)
    if class_name is None:
        class_name = str(info["slide"]["class"])
    if class_name not in classes:
        msg = f"class_name={class_name!r} is not one of the classes {classes}."
        raise KeyError(msg)
    image_key = image_key or str(info["params"]["image_key"])
    if image_key not in sdata.images:
        msg = f"image_key={image_key!r} is not an image; images are {sorted(sdata.images)}."
        raise KeyError(msg)
    region = Raster(sdata.images[image_key], coordinate_system, name=image_key).bounds
    if ax is None:
        width = (region[2] - region[0]) / max(region[3] - region[1], 1e-12)
        figsize = figsize or (min(16.0, 2 * 5.0 * width + 1.5), 5.0)
        fig, ax = plt.subplots(1, 2, figsize=figsize, sharex=True, sharey=True, layout="constrained")
    ax_he, ax_map = ax
    draw_image(ax_he, sdata.images[image_key], region, max_pixels=max_pixels, coordinate_system=coordinate_system)
    ax_he.set_title(f"H&E ({image_key})")
    ax_map.set_facecolor("black")
    for im in ax_he.get_images():  # a faded copy of the H&E under the tiles (read once, drawn twice)
        rgba = np.array(im.get_array(), dtype=np.float32)
        rgba[..., :3] = 1 - (1 - rgba[..., :3]) * 0.35
        ax_map.imshow(rgba, extent=im.get_extent(), interpolation="nearest")
    boxes = tile_boxes(sdata, adata, coordinate_system=coordinate_system)
    probs = np.asarray(adata.X)[:, classes.index(class_name)]
    patches = [Rectangle((x0, y0), x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes]
    coll = PatchCollection(patches, cmap=cmap, alpha=alpha, linewidths=0)
    coll.set_array(probs)
    coll.set_clim(0.0, 1.0)
    ax_map.add_collection(coll)
    slide = info["slide"]
    p_slide = float(slide["probabilities"][class_name])
    ax_map.set_title(f"P({class_name}) per tile; slide: {slide['class']} (P({class_name})={p_slide:.2f})")
    ax_map.figure.colorbar(coll, ax=ax_map, shrink=0.8, label=f"P({class_name})")
    for axis in (ax_he, ax_map):
        set_um_axes(axis, region, ticks=um_axes)
        scale_bar(axis, region, scale_bar_um, color="black")
    save_figure(ax_he.figure, save)
    return [ax_he, ax_map]


def roc(
    data,
    *,
    key: str = "zero_shot",
    labels=None,
    regions: str | None = None,
    region_label: str = "label",
    min_region_fraction: float | None = None,
    label_map: Mapping[str, str] | None = None,
    classes: Sequence[str] | None = None,
    ax=None,
):
    """ROC curves (one vs rest) of zero-shot tile probabilities against true labels.

    Parameters
    ----------
    data
        The dict returned by :func:`st2he.tl.evaluate_zero_shot` (with labels), or a SpatialData object, in which
        case the other arguments below are passed to it.
    key, labels, regions, region_label, min_region_fraction, label_map
        See :func:`st2he.tl.evaluate_zero_shot`.
    classes
        Classes to draw; default all with positive and negative tiles (only the second of two classes).
    ax
        Matplotlib axes; a new one otherwise.

    Returns
    -------
    The axes.
    """
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    result: Mapping[str, Any]
    if isinstance(data, Mapping):
        result = data
    else:
        from st2he.tl._zero_shot import evaluate_zero_shot

        result = evaluate_zero_shot(
            data,
            key=key,
            labels=labels,
            regions=regions,
            region_label=region_label,
            min_region_fraction=min_region_fraction,
            label_map=label_map,
        )
    if "y_true" not in result:
        msg = "The evaluation has no labels (y_true); evaluate with labels= or regions= first."
        raise ValueError(msg)
    y_true, y_score = np.asarray(result["y_true"]), np.asarray(result["y_score"])
    all_classes = list(result["classes"])
    if classes is None:
        classes = [c for c in all_classes if 0 < (y_true == c).sum() < len(y_true)]
        if len(all_classes) == 2:
            classes = [c for c in classes if c == all_classes[1]] or classes[:1]
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5), layout="constrained")
    for cls in classes:
        j = all_classes.index(cls)
        pos = y_true == cls
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, y_score[:, j])
        auc = result["roc_auc_per_class"][cls]
        ax.plot(fpr, tpr, lw=1.5, label=f"{cls} (AUC {auc:.2f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"zero-shot ROC, {result.get('n_tiles', len(y_true))} tiles")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_aspect("equal")
    return ax
