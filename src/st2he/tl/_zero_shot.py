"""Zero-shot classification of H&E tiles (virtual or real) with pathology CLIP models, and its evaluation."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from st2he._elements import check_key_free, get_image, write_elements
from st2he._grid import COORDINATE_SYSTEM, Grid
from st2he._raster import Raster
from st2he._tissue import tissue_mask

from ._prompts import build_prompts, resolve_classes, resolve_templates

logger = logging.getLogger("st2he")

REGION_KEY = "region"
INSTANCE_KEY = "tile_id"


# ---------------------------------------------------------------------------------------------------------------
# zero-shot classification


def zero_shot(
    sdata,
    *,
    image_key: str = "virtual_he",
    classes,
    templates: Sequence[str] | None = None,
    model,
    tile_size_um: float | None = None,
    tiles_key: str | None = None,
    min_tissue_fraction: float = 0.25,
    batch_size: int = 32,
    top_k: int = 50,
    device: str = "auto",
    cells_table: str | None = "auto",
    key_added: str = "zero_shot",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Classify the tiles of an H&E image (virtual or real) zero-shot with a pathology CLIP model.

    Each class is described by one or more names; every name is put into every template ("an H&E image of
    {}."), the text embeddings of all these prompts are L2-normalised, averaged and normalised again (a prompt
    ensemble). Each tile is read at the physical size the model expects, embedded, and scored by cosine
    similarity with each class; probabilities are ``softmax(logit_scale * cosine)``. The slide-level call pools
    the tile scores MI-Zero style: for each class, the mean cosine of its ``top_k`` best-matching tiles.

    Parameters
    ----------
    sdata
        SpatialData object with an RGB H&E image.
    image_key
        The H&E image element: the virtual H&E (``"virtual_he"``) or a real one (e.g. ``"he_image"``).
    classes
        Class -> name or list of names, e.g. ``{"LUAD": ["adenocarcinoma", "lung adenocarcinoma"], "LUSC":
        ["squamous cell carcinoma"]}``; a list of names (one class each); or the name of a built-in prompt set
        (``"nsclc"``, ``"kaposi"``, ``"breast"``, ``"crc"``; see :data:`st2he.tl.PROMPTS`).
    templates
        Sentences with ``{}`` for the class name; ``None`` uses :data:`st2he.tl.TEMPLATES`.
    model
        What :func:`st2he.models.load_clip` accepts (a hub id, an ``(architecture, checkpoint)`` pair,
        ``"conch"``, a folder, a loaded model) or a :class:`~st2he.models.ClipModel`.
    tile_size_um
        Edge of a tile in µm. ``None``: the model's field of view, ``image_size * mpp`` (112 µm for a 224 px
        model at 0.5 µm/px). Tiles are resampled from ``tile_size_um`` to the model's input size, read from the
        coarsest pyramid level that still has at least the model's resolution.
    tiles_key
        A shapes element of tiles to classify (e.g. made with :func:`st2he.pp.make_tiles`). ``None``: square
        tiles of ``tile_size_um`` are made with :func:`st2he.pp.make_tiles` and stored as
        ``f"{key_added}_tiles"``. With ``tiles_key`` each tile is read over its bounding box.
    min_tissue_fraction
        Tiles whose tissue fraction is below this are skipped (not embedded, not in the table). A pixel is
        background when the mean of its RGB values is at least 220 of 255 (glass) or all its channels are below
        25 (padding), the rule :func:`st2he.pp.make_tiles` uses too; the tissue fraction is the share of the other
        pixels, measured on the tile as read. Tiles of a tiles element whose ``tissue_fraction`` column (as
        :func:`st2he.pp.make_tiles` writes it) is 0 are skipped without being read.
    batch_size
        Tiles per forward pass.
    top_k
        Number of best-scoring tiles per class pooled into the slide-level score (all tiles when fewer).
    device
        Torch device; ``"auto"`` picks CUDA when available, else the CPU.
    cells_table
        Table of cells that receive the class of the tile they lie in: ``"auto"`` uses ``"table"`` when the object
        has one that annotates cell shapes or carries centroids in ``obsm["spatial"]``; ``None`` skips this.
    key_added
        Name of the tile table written to ``sdata.tables``; also the prefix of the cell-table columns.
    overwrite
        Replace an existing ``key_added`` table (and its tiles and cell columns). Never replaced, even so: an element
        of another type, an element the call reads (``image_key``, ``tiles_key``, ``cells_table``) or tiles another
        table annotates. The table and its tiles are stored only when the call succeeds, both at once.
    progress
        Show a progress bar.

    Returns
    -------
    The new tile table, ``sdata.tables[key_added]`` (see Notes). The slide-level result is
    ``table.uns[key_added]["slide"]``: a dict with ``"class"`` (the predicted class), ``"probabilities"``
    (class -> probability), ``"scores"`` (class -> pooled cosine similarity), ``"top_k"`` (the k used) and
    ``"n_tiles"`` (tiles classified).

    Notes
    -----
    Writes ``sdata.tables[key_added]``, an AnnData that annotates the tiles shapes element (region key
    ``"region"``, instance key ``"tile_id"`` = the index of the tiles element) with

    - ``X``: class probabilities (tiles x classes, ``var_names`` = classes),
    - ``obs["class"]`` (categorical), ``obs[f"prob_{class}"]``, ``obs["tissue_fraction"]``,
    - ``obsm["embedding"]`` (L2-normalised image embeddings), ``obsm["similarity"]`` (cosine per class),
      ``obsm["spatial"]`` (tile centres, x and y in µm),
    - ``uns[key_added]``: ``"slide"`` (as returned), ``"params"``, ``"classes"`` (class -> names), ``"templates"``.

    With a cell table, ``obs[f"{key_added}_class"]`` and ``obs[f"{key_added}_prob_{class}"]`` of each cell come
    from the tile that contains its centroid (the tile whose centre is nearest when tiles overlap); cells in no
    classified tile get missing values. So ``sc.pl.spatial``/``sc.tl.rank_genes_groups`` can group by it.
    """
    from spatialdata.models import TableModel

    from st2he.models._clip import ClipModel, _info, load_clip

    class_names = resolve_classes(classes)
    template_list = resolve_templates(templates)
    if not isinstance(top_k, int | np.integer) or top_k < 1:
        msg = f"top_k must be a positive integer, got {top_k!r}."
        raise ValueError(msg)
    if not (0.0 <= float(min_tissue_fraction) <= 1.0):
        msg = f"min_tissue_fraction must lie in [0, 1], got {min_tissue_fraction!r}."
        raise ValueError(msg)
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        msg = f"batch_size must be a positive integer, got {batch_size!r}."
        raise ValueError(msg)
    image, grid = get_image(sdata, image_key)
    if "c" in image.dims and image.sizes["c"] not in (3, 4):
        msg = f"Image {image_key!r} has {image.sizes['c']} channels; zero-shot classification needs an RGB H&E image."
        raise ValueError(msg)
    if tiles_key is not None and tiles_key not in sdata.shapes:
        msg = f"tiles_key={tiles_key!r} is not a shapes element of this SpatialData object; its shapes are {sorted(sdata.shapes)}."
        raise KeyError(msg)
    own_tiles_key = f"{key_added}_tiles"
    # what the call reads is never replaced; what it writes is checked now, before any work, and stored at the end
    inputs = {image_key} | ({tiles_key} if tiles_key is not None else set())
    if cells_table not in (None, "auto"):
        inputs.add(cells_table)
    written = {key_added} | ({own_tiles_key} if tiles_key is None else set())
    check_key_free(sdata, key_added, overwrite=overwrite, kind="tables", inputs=inputs, replaced=written)
    if tiles_key is None:
        check_key_free(
            sdata,
            own_tiles_key,
            overwrite=overwrite,
            parameter="key_added (for its tiles)",
            kind="shapes",
            inputs=inputs,
            replaced=written,
        )
    cell_key = _find_cell_table(sdata, cells_table, exclude=key_added)
    if cell_key is not None and not overwrite:
        clash = [c for c in sdata.tables[cell_key].obs.columns if c.startswith(f"{key_added}_")]
        if clash:
            msg = f"The cell table {cell_key!r} already has columns {clash[:3]}; pass overwrite=True or another key_added."
            raise KeyError(msg)

    device = _resolve_device(device)
    clip = model if isinstance(model, ClipModel) else load_clip(model, device=device)
    if isinstance(model, ClipModel) and clip.device != device and device != "cpu":
        clip.to(device)
    if tile_size_um is None:
        tile_size_um = clip.tile_size_um
    tile_size_um = float(tile_size_um)
    if not (math.isfinite(tile_size_um) and tile_size_um > 0):
        msg = f"tile_size_um must be a positive number of micrometres, got {tile_size_um!r}."
        raise ValueError(msg)
    if tile_size_um < grid.pixel_size:
        msg = (
            f"tile_size_um={tile_size_um} µm is smaller than one pixel of {image_key!r} ({grid.pixel_size:.4g} µm); "
            f"use tiles of at least a few pixels (the model's field of view is {clip.tile_size_um:.4g} µm)."
        )
        raise ValueError(msg)
    _check_tile_pixels(np.array([[0.0, 0.0, tile_size_um, tile_size_um]]), grid, clip, image_key, "tile_size_um")

    # text side first: cheap, and a broken tokenizer fails before any tile is read
    text_embeddings = class_text_embeddings(clip, class_names, template_list)

    new_tiles = None
    if tiles_key is None:
        # the tiles are made now and stored with the table at the end: a failed call leaves the old ones in place
        tiles_key = own_tiles_key
        new_tiles, tiles_params = _make_tiles(sdata, image_key, grid, tile_size_um)
        boxes, tile_ids = np.asarray(new_tiles.geometry.bounds, dtype=np.float64), np.asarray(new_tiles.index)
        coarse = new_tiles.get("tissue_fraction")
    else:
        boxes, tile_ids = _tile_boxes(sdata, tiles_key)
        _check_tile_pixels(boxes, grid, clip, image_key, f"the tiles of tiles_key={tiles_key!r}")
        coarse = sdata.shapes[tiles_key].get("tissue_fraction")
    readable = None
    if coarse is not None and min_tissue_fraction > 0:
        readable = np.asarray(pd.to_numeric(coarse, errors="coerce").fillna(1.0)) > 0
    embeddings, tissue, keep = embed_tiles(
        sdata,
        image_key,
        boxes,
        clip,
        read=readable,
        min_tissue_fraction=min_tissue_fraction,
        batch_size=batch_size,
        progress=progress,
    )
    if not keep.any():
        msg = (
            f"No tile of {image_key!r} has a tissue fraction of at least {min_tissue_fraction} "
            f"(largest: {tissue.max() if tissue.size else 0:.3f}); lower min_tissue_fraction or check the image."
        )
        raise ValueError(msg)

    similarity = embeddings @ text_embeddings.T
    probabilities = _softmax(clip.logit_scale * similarity)
    labels = list(class_names)
    slide = pool_top_k(similarity, labels, top_k=top_k, logit_scale=clip.logit_scale)

    boxes_kept = boxes[keep]
    centers = np.column_stack([(boxes_kept[:, 0] + boxes_kept[:, 2]) / 2, (boxes_kept[:, 1] + boxes_kept[:, 3]) / 2])
    pred = np.asarray(labels)[probabilities.argmax(axis=1)]
    obs = pd.DataFrame(index=[str(i) for i in tile_ids[keep]])
    obs[INSTANCE_KEY] = tile_ids[keep]
    obs[REGION_KEY] = pd.Categorical([tiles_key] * len(obs))
    obs["tissue_fraction"] = tissue[keep].astype(np.float32)
    obs["class"] = pd.Categorical(pred, categories=labels)
    for j, cls in enumerate(labels):
        obs[f"prob_{cls}"] = probabilities[:, j].astype(np.float32)

    params = {
        "image_key": image_key,
        "tiles_key": tiles_key,
        "tile_size_um": tile_size_um,
        "read_mpp": _read_mpp(sdata, image_key, boxes, clip.image_size),
        "min_tissue_fraction": float(min_tissue_fraction),
        "top_k": int(top_k),
        "batch_size": int(batch_size),
        "model": _info(clip),
        "n_tiles_total": int(len(boxes)),
        "n_tiles_classified": int(keep.sum()),
        "cells_table": cell_key or "",
    }
    import anndata as ad

    adata = ad.AnnData(X=probabilities.astype(np.float32), obs=obs, var=pd.DataFrame(index=labels))
    adata.obsm["embedding"] = embeddings.astype(np.float32)
    adata.obsm["similarity"] = similarity.astype(np.float32)
    adata.obsm["spatial"] = centers.astype(np.float64)
    adata.uns[key_added] = {
        "slide": slide,
        "params": params,
        "classes": {cls: list(names) for cls, names in class_names.items()},
        "templates": template_list,
    }
    table = TableModel.parse(adata, region=tiles_key, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    cell_columns = None
    if cell_key is not None:
        cell_columns = _cell_columns(sdata, cell_key, boxes_kept, probabilities, labels, key_added=key_added)
    # everything is made: store the tiles (when made here) and the table together, or neither
    elements = {key_added: table}
    element_params = {key_added: params}
    if new_tiles is not None:
        elements = {tiles_key: new_tiles, key_added: table}
        element_params[tiles_key] = tiles_params
    table = write_elements(sdata, elements, overwrite=overwrite, inputs=inputs, params=element_params)[key_added]
    if cell_columns is not None:
        _annotate_cells(sdata, cell_key, cell_columns, key_added=key_added, slide=slide)
    logger.info(
        "zero_shot: %d of %d tiles classified on %r; slide-level call %s (p=%.3f)",
        keep.sum(),
        len(boxes),
        image_key,
        slide["class"],
        slide["probabilities"][slide["class"]],
    )
    return table


def class_text_embeddings(clip, classes, templates=None):
    """L2-normalised class embeddings ``(n_classes, d)``: mean over names x templates of normalised prompt embeddings.

    Parameters
    ----------
    clip
        A :class:`~st2he.models.ClipModel`.
    classes, templates
        As in :func:`zero_shot`.

    Returns
    -------
    A float32 numpy array, one row per class in the order of ``classes``.
    """
    prompts = build_prompts(classes, templates)
    rows = []
    for cls_prompts in prompts.values():
        emb = clip.encode_text(cls_prompts, normalize=True).numpy().astype(np.float64)
        mean = emb.mean(axis=0)
        rows.append(mean / max(np.linalg.norm(mean), 1e-12))
    return np.stack(rows).astype(np.float32)


def pool_top_k(similarity: np.ndarray, classes: Sequence[str], *, top_k: int = 50, logit_scale: float = 100.0) -> dict:
    """MI-Zero top-k pooling: per class, the mean of its ``top_k`` highest tile similarities; softmax for probabilities.

    Parameters
    ----------
    similarity
        ``(n_tiles, n_classes)`` cosine similarities.
    classes
        Class names, one per column.
    top_k
        Tiles pooled per class; all when there are fewer.
    logit_scale
        Temperature of the softmax over pooled scores.

    Returns
    -------
    ``{"class", "probabilities", "scores", "top_k", "n_tiles"}`` (see :func:`zero_shot`).
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    n = similarity.shape[0]
    if n == 0:
        msg = "Cannot pool zero tiles."
        raise ValueError(msg)
    k = int(min(top_k, n))
    top = -np.sort(-similarity, axis=0)[:k]
    pooled = top.mean(axis=0)
    prob = _softmax(logit_scale * pooled[None])[0]
    best = int(np.argmax(pooled))
    return {
        "class": str(classes[best]),
        "probabilities": {str(c): float(p) for c, p in zip(classes, prob, strict=True)},
        "scores": {str(c): float(s) for c, s in zip(classes, pooled, strict=True)},
        "top_k": k,
        "n_tiles": int(n),
    }


# ---------------------------------------------------------------------------------------------------------------
# reading tiles


def tissue_fraction(tiles: np.ndarray) -> np.ndarray:
    """Share of tissue pixels in each of ``(n, h, w, 3)`` uint8 H&E tiles (st2he's brightfield tissue rule)."""
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    tissue = tissue_mask(tiles[..., :3], "brightfield", channel_axis=-1)
    return tissue.reshape(len(tiles), -1).mean(axis=1)


def read_tiles(
    sdata,
    image_key: str,
    boxes: np.ndarray,
    *,
    out_size: int | None = None,
    level: int | str = "auto",
    coordinate_system: str = COORDINATE_SYSTEM,
):
    """Read RGB tiles of an image over boxes in µm, from the coarsest sufficient pyramid level.

    Parameters
    ----------
    sdata
        SpatialData object.
    image_key
        RGB image element (any affine transformation: it is read through :class:`st2he._raster.Raster`).
    boxes
        ``(n, 4)`` array of ``x_min, y_min, x_max, y_max`` in µm of ``coordinate_system``.
    out_size
        Pixels the tiles will be resampled to; picks the coarsest level whose pixels are no larger than
        ``box edge / out_size``. ``None`` reads scale 0.
    level
        ``"auto"`` (above) or a level index.
    coordinate_system
        The coordinate system of ``boxes``.

    Returns
    -------
    A list of ``(h, w, 3)`` uint8 arrays at the level's pixel size (regions outside the image are white), and that
    pixel size (µm). The tiles of an axis-aligned image start on its pixel lattice and are its pixels, untouched.
    """
    raster = Raster(sdata.images[image_key], coordinate_system, name=f"image_key={image_key!r}")
    raster.check_rgb(what=f"image_key={image_key!r}", step="the CLIP model's image tower")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if level == "auto":
        level = _pick_level(raster, boxes, out_size)
    lvl = raster.levels[int(level)]
    px = lvl.pixel_size
    grids = []
    for x0, y0, x1, y1 in boxes:
        if raster.is_axis_aligned(int(level)):  # snap to the level's pixel lattice: tiles are its pixels
            gx, gy = lvl.affine[0, 2], lvl.affine[1, 2]
            x0 = gx + math.floor((x0 - gx) / px + 0.5) * px
            y0 = gy + math.floor((y0 - gy) / px + 0.5) * px
        nc = max(1, int(round((x1 - x0) / px))) if np.isfinite(x1 - x0) else 1
        nr = max(1, int(round((y1 - y0) / px))) if np.isfinite(y1 - y0) else 1
        grids.append(Grid(float(x0), float(y0), px, nr, nc))
    uint8 = raster.level0.dtype == np.uint8
    tiles = raster.read_many(
        grids, level=int(level), channels=slice(0, 3), fill=255 if uint8 else np.nan, dtype=np.uint8 if uint8 else np.float32
    )
    if not uint8:
        tiles = [_to_uint8(t, raster.level0.dtype) for t in tiles]
    return [np.ascontiguousarray(np.moveaxis(t, 0, -1)) for t in tiles], px


def embed_tiles(
    sdata,
    image_key: str,
    boxes: np.ndarray,
    clip,
    *,
    min_tissue_fraction: float = 0.25,
    batch_size: int = 32,
    read: np.ndarray | None = None,
    progress: bool = True,
):
    """Embed the tiles over ``boxes`` (µm) with ``clip``; tiles with too little tissue are skipped.

    ``read`` (boolean, one per box) marks the tiles to read at all; the others count as tissue-free.

    Returns
    -------
    ``(embeddings, tissue, keep)``: L2-normalised embeddings of the kept tiles ``(n_kept, d)``, the tissue fraction
    of every tile ``(n,)`` and the boolean mask of kept tiles ``(n,)``.
    """
    from st2he._progress import tqdm

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    level = _pick_level(Raster(sdata.images[image_key], name=image_key), boxes, clip.image_size)
    tissue = np.zeros(n, dtype=np.float64)
    keep = np.zeros(n, dtype=bool)
    chunks: list[np.ndarray] = []
    todo = np.flatnonzero(np.ones(n, bool) if read is None else np.asarray(read, bool))
    bar = tqdm(total=len(todo), desc=f"zero-shot tiles of {image_key}", unit="tile", disable=not progress)
    for start in range(0, len(todo), batch_size):
        which = todo[start : start + batch_size]
        tiles, _ = read_tiles(sdata, image_key, boxes[which], level=level)
        frac = np.array([tissue_fraction(t)[0] for t in tiles])
        tissue[which] = frac
        ok = frac >= min_tissue_fraction
        keep[which] = ok
        batch = [_resize(t, clip.image_size) for t, k in zip(tiles, ok, strict=True) if k]
        if batch:
            chunks.append(clip.encode_image(np.stack(batch), normalize=True).numpy())
        bar.update(len(which))
    bar.close()
    dim = chunks[0].shape[1] if chunks else 0
    embeddings = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, dim), np.float32)
    return embeddings, tissue, keep


# ---------------------------------------------------------------------------------------------------------------
# evaluation


def evaluate_zero_shot(
    sdata,
    *,
    key: str = "zero_shot",
    labels: str | Sequence | None = None,
    regions: str | None = None,
    region_label: str = "label",
    min_region_fraction: float | None = None,
    label_map: Mapping[str, str] | None = None,
    other_key: str | None = None,
) -> dict[str, Any]:
    """Score zero-shot calls against known labels, and/or against the calls on another image of the same slide.

    Parameters
    ----------
    sdata
        SpatialData object with the table written by :func:`zero_shot`.
    key
        Its ``key_added``.
    labels
        True labels per tile: a column of the tile table's ``obs`` or of the tiles shapes element, or a sequence
        with one label per tile of the table.
    regions
        Instead of ``labels``: a shapes element of annotated regions (polygons) with the label in column
        ``region_label``; each tile gets the label of the region containing its centre (tiles in none are left out).
    region_label
        Label column of ``regions``.
    min_region_fraction
        With ``regions``: instead of the centre rule, label a tile only when regions of one label cover at least
        this share of its area (e.g. 0.7: tiles straddling a border, whose truth is mixed, are left out).
    label_map
        Maps label values to class names (e.g. ``{"gland-forming": "LUAD"}``). Tiles whose label is not a class
        (after mapping) are left out of the metrics, with a warning that counts them.
    other_key
        The table of a second :func:`zero_shot` run on another image of the same slide (e.g. the real H&E):
        tiles are matched by centre and their calls compared.

    Returns
    -------
    A dict. With labels: ``"roc_auc"`` (one-vs-rest, macro over classes present; for two classes the AUC of the
    second class), ``"roc_auc_per_class"``, ``"balanced_accuracy"``, ``"accuracy"``, ``"confusion_matrix"``
    (DataFrame, rows = true, columns = predicted), ``"n_tiles"``, ``"classes"``, ``"y_true"`` and ``"y_score"``
    (probabilities, for :func:`st2he.pl.roc`). With ``other_key``: ``"agreement"`` with ``"cohen_kappa"``,
    ``"fraction_agreeing"``, ``"probability_correlation"`` (class -> Pearson r), ``"n_tiles"`` and
    ``"per_tile"`` (DataFrame of both calls per matched tile).
    """
    adata = _zero_shot_table(sdata, key)
    classes = list(adata.var_names)
    result: dict[str, Any] = {"key": key, "classes": classes}
    if labels is None and regions is None and other_key is None:
        msg = "Give labels= (a column or a sequence), regions= (annotated shapes) or other_key= (a second run)."
        raise ValueError(msg)
    if labels is not None or regions is not None:
        y = _tile_labels(
            sdata,
            adata,
            labels=labels,
            regions=regions,
            region_label=region_label,
            min_region_fraction=min_region_fraction,
        )
        if label_map is not None:
            y = y.map(lambda v: label_map.get(v, v) if isinstance(v, str) else v)
        known = y.isin(classes).to_numpy()
        if (~known).any():
            left = y[~known]
            warnings.warn(
                f"{int((~known).sum())} of {len(y)} tiles have a label that is not a class ({sorted(map(str, left.dropna().unique()))[:5]}"
                f"{' or none' if left.isna().any() else ''}); they are left out of the metrics. Use label_map to map labels to classes.",
                UserWarning,
                stacklevel=2,
            )
        if not known.any():
            msg = f"No tile has a label among the classes {classes}; map the labels with label_map."
            raise ValueError(msg)
        result.update(classification_metrics(y[known].astype(str).to_numpy(), adata.X[known], classes))
    if other_key is not None:
        result["agreement"] = _agreement(adata, _zero_shot_table(sdata, other_key), classes)
    return result


def classification_metrics(y_true: Sequence[str], y_score: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """ROC AUC (one vs rest), balanced accuracy, accuracy and confusion matrix of class probabilities."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score

    classes = list(classes)
    y_true = np.asarray(y_true).astype(str)
    y_score = np.asarray(y_score, dtype=np.float64)
    y_pred = np.asarray(classes)[y_score.argmax(axis=1)]
    per_class = {}
    for j, cls in enumerate(classes):
        pos = y_true == cls
        per_class[cls] = float(roc_auc_score(pos, y_score[:, j])) if 0 < pos.sum() < len(pos) else float("nan")
    present = [c for c in classes if np.isfinite(per_class[c])]
    if len(classes) == 2:
        auc = per_class[classes[1]]
    else:
        auc = float(np.mean([per_class[c] for c in present])) if present else float("nan")
    cm = confusion_matrix(y_true, y_pred, labels=classes)
    return {
        "roc_auc": auc,
        "roc_auc_per_class": per_class,
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "accuracy": float(np.mean(y_true == y_pred)),
        "confusion_matrix": pd.DataFrame(
            cm, index=pd.Index(classes, name="true"), columns=pd.Index(classes, name="predicted")
        ),
        "n_tiles": int(len(y_true)),
        "y_true": y_true,
        "y_score": y_score,
    }


# ---------------------------------------------------------------------------------------------------------------
# internals


def _resolve_device(device) -> str:
    if device is None or device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _to_uint8(block: np.ndarray, source_dtype) -> np.ndarray:
    """Values read from an image of ``source_dtype`` as uint8 (NaN, outside the image, is white)."""
    source_dtype = np.dtype(source_dtype)
    if np.issubdtype(source_dtype, np.floating):
        scale = 255.0 if np.nanmax(block, initial=0) <= 1.0 else 1.0
    elif source_dtype == np.uint16:
        scale = 1 / 257
    else:
        scale = 1.0
    return np.clip(np.nan_to_num(block * scale, nan=255.0), 0, 255).round().astype(np.uint8)


def _resize(tile: np.ndarray, size: int) -> np.ndarray:
    """Square-resample a uint8 tile to ``size`` pixels (area-averaging when shrinking) for stacking."""
    if tile.shape[0] == size and tile.shape[1] == size:
        return tile
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _pick_level(raster: Raster, boxes: np.ndarray, out_size: int | None) -> int:
    """Coarsest level whose pixel is no larger than the typical (median) box edge / ``out_size``."""
    if out_size is None or len(boxes) == 0:
        return 0
    edge = float(np.median(np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))
    return raster.level_for(edge / out_size)


def _read_mpp(sdata, image_key, boxes, out_size) -> float:
    raster = Raster(sdata.images[image_key], name=image_key)
    return raster.levels[_pick_level(raster, boxes, out_size)].pixel_size


def _make_tiles(sdata, image_key: str, grid: Grid, tile_size_um: float):
    """Square tiles of ``tile_size_um`` over the image as :func:`st2he.pp.make_tiles` makes them, not yet stored.

    Returns the shapes element and the parameters to record with it.
    """
    from st2he.pp._tiles import build_tiles

    tile_px = max(1, int(round(tile_size_um / grid.pixel_size)))
    return build_tiles(sdata, image_key, tile_size=tile_px, overlap=0, min_tissue_fraction=0.0)


def _check_tile_pixels(boxes: np.ndarray, grid: Grid, clip, image_key: str, what: str) -> None:
    """Refuse tiles that span fewer than half the model's input pixels at the image's finest level.

    Such tiles would be upscaled more than twice to the model's input size: the model would see blur it was never
    trained on, and still make a confident call.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return
    edges = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / grid.pixel_size
    need = clip.image_size / 2
    small = edges < need
    if small.any():
        msg = (
            f"{what}: {int(small.sum())} of {len(boxes)} tiles span fewer than {need:g} pixels of {image_key!r} "
            f"(the smallest: {edges.min():.3g} px of {grid.pixel_size:.4g} µm, "
            f"{edges.min() * grid.pixel_size:.4g} µm); "
            f"the model reads {clip.image_size} px tiles, so these would be upscaled more than twice. Use tiles of "
            f"at least {need * grid.pixel_size:.4g} µm (the model's field of view is {clip.tile_size_um:.4g} µm), "
            "or an image with finer pixels."
        )
        raise ValueError(msg)


def _tile_boxes(sdata, tiles_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes ``(n, 4)`` in global µm and ids (the shapes index) of the tiles of a shapes element."""
    shapes = _shapes_in_global(sdata, tiles_key)
    if len(shapes) == 0:
        msg = f"The tiles element {tiles_key!r} has no tiles."
        raise ValueError(msg)
    return np.asarray(shapes.geometry.bounds, dtype=np.float64), np.asarray(shapes.index)


def _shapes_in_global(sdata, key: str, coordinate_system: str = COORDINATE_SYSTEM):
    from spatialdata import transform
    from spatialdata.transformations import get_transformation

    shapes = sdata.shapes[key]
    transformations = get_transformation(shapes, get_all=True)
    if coordinate_system not in transformations:
        msg = f"The shapes element {key!r} has no transformation to the {coordinate_system!r} coordinate system."
        raise ValueError(msg)
    if "radius" in shapes.columns:
        shapes = shapes.copy()
        shapes["geometry"] = shapes.geometry.buffer(shapes["radius"])
        shapes = shapes.drop(columns="radius")
    return transform(shapes, to_coordinate_system=coordinate_system)


def _find_cell_table(sdata, cells_table, *, exclude: str) -> str | None:
    if cells_table is None:
        return None
    if cells_table != "auto":
        if cells_table not in sdata.tables:
            msg = f"cells_table={cells_table!r} is not a table of this SpatialData object; its tables are {sorted(sdata.tables)}."
            raise KeyError(msg)
        if _cell_positions_source(sdata, cells_table) is None:
            msg = (
                f"The table {cells_table!r} neither annotates shapes (cell boundaries or circles) nor has centroids "
                "in obsm['spatial']; cannot place its cells."
            )
            raise ValueError(msg)
        return cells_table
    if "table" in sdata.tables and exclude != "table" and _cell_positions_source(sdata, "table") is not None:
        return "table"
    return None


def _cell_positions_source(sdata, table_key: str) -> str | None:
    table = sdata.tables[table_key]
    attrs = table.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    regions = [region] if isinstance(region, str) else list(region or [])
    if regions and all(r in sdata.shapes for r in regions) and attrs.get("instance_key") in table.obs:
        return "shapes"
    if "spatial" in table.obsm and np.asarray(table.obsm["spatial"]).shape[1] >= 2:
        return "obsm"
    return None


def _cell_centroids(sdata, table_key: str) -> np.ndarray:
    """``(n_cells, 2)`` x, y centroids in global µm of the cells of a table (NaN where unknown)."""
    table = sdata.tables[table_key]
    source = _cell_positions_source(sdata, table_key)
    out = np.full((table.n_obs, 2), np.nan)
    if source == "shapes":
        attrs = table.uns["spatialdata_attrs"]
        region_key, instance_key = attrs["region_key"], attrs["instance_key"]
        region = attrs["region"]
        regions = [region] if isinstance(region, str) else list(region)
        for r in regions:
            shapes = _shapes_in_global(sdata, r)
            cent = shapes.geometry.centroid
            lookup = pd.DataFrame({"x": cent.x.to_numpy(), "y": cent.y.to_numpy()}, index=shapes.index)
            mask = (
                (table.obs[region_key].astype(str) == r).to_numpy()
                if region_key in table.obs
                else np.ones(table.n_obs, bool)
            )
            ids = table.obs[instance_key].to_numpy()[mask]
            found = lookup.reindex(pd.Index(ids))
            if found.isna().all().all() and len(ids):
                # instance ids stored as another dtype than the shapes index (e.g. str vs int)
                found = lookup.set_axis(lookup.index.astype(str)).reindex(pd.Index(ids).astype(str))
            out[mask] = found[["x", "y"]].to_numpy()
    elif source == "obsm":
        out[:] = np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2]
    return out


def assign_points_to_tiles(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Index of the box containing each ``(x, y)`` point (the one with the nearest centre when several do); -1 for none."""
    from scipy.spatial import cKDTree

    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.full(len(points), -1, dtype=np.int64)
    if len(boxes) == 0 or len(points) == 0:
        return out
    centers = np.column_stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2])
    finite = np.isfinite(points).all(axis=1)
    half_diag = float(np.max(np.hypot(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])) / 2)
    tree = cKDTree(centers)
    k = min(len(boxes), 9)
    dist, idx = tree.query(points[finite], k=k)
    dist, idx = dist.reshape(len(idx), -1), idx.reshape(len(idx), -1)
    p = points[finite]
    res = np.full(len(p), -1, dtype=np.int64)
    for j in range(k):  # nearest centre first: take the first candidate box that contains the point
        cand = idx[:, j]
        b = boxes[np.minimum(cand, len(boxes) - 1)]
        inside = (
            (res < 0)
            & (dist[:, j] <= half_diag * (1 + 1e-9))
            & (p[:, 0] >= b[:, 0])
            & (p[:, 0] < b[:, 2])
            & (p[:, 1] >= b[:, 1])
            & (p[:, 1] < b[:, 3])
        )
        res[inside] = cand[inside]
    out[finite] = res
    return out


def _cell_columns(sdata, cell_key, boxes, probabilities, labels, *, key_added: str) -> dict[str, Any]:
    """The columns :func:`_annotate_cells` adds to the cell table (made before anything is stored)."""
    table = sdata.tables[cell_key]
    centroids = _cell_centroids(sdata, cell_key)
    tile = assign_points_to_tiles(centroids, boxes)
    inside = tile >= 0
    cls = np.full(table.n_obs, None, dtype=object)
    cls[inside] = np.asarray(labels, dtype=object)[probabilities[tile[inside]].argmax(axis=1)]
    columns: dict[str, Any] = {f"{key_added}_class": pd.Categorical(cls, categories=list(labels))}
    for j, name in enumerate(labels):
        p = np.full(table.n_obs, np.nan, dtype=np.float32)
        p[inside] = probabilities[tile[inside], j]
        columns[f"{key_added}_prob_{name}"] = p
    return columns


def _annotate_cells(sdata, cell_key, columns: dict[str, Any], *, key_added: str, slide: dict) -> None:
    table = sdata.tables[cell_key]
    for name, values in columns.items():
        table.obs[name] = values
    inside = int(pd.notna(columns[f"{key_added}_class"]).sum())
    table.uns[key_added] = {"slide": slide, "tiles_table": key_added, "n_cells_assigned": inside}
    logger.info("zero_shot: %d of %d cells of %r lie in a classified tile", inside, table.n_obs, cell_key)


def _zero_shot_table(sdata, key: str):
    if key not in sdata.tables:
        msg = f"No zero-shot table {key!r}; run st2he.tl.zero_shot(..., key_added={key!r}) first. Tables: {sorted(sdata.tables)}."
        raise KeyError(msg)
    adata = sdata.tables[key]
    if "spatial" not in adata.obsm or key not in adata.uns:
        msg = f"The table {key!r} was not written by st2he.tl.zero_shot."
        raise ValueError(msg)
    return adata


def tile_boxes(sdata, adata, *, coordinate_system: str = COORDINATE_SYSTEM) -> np.ndarray:
    """``(n, 4)`` boxes (µm) of the tiles of a zero-shot table: from its tiles element, else squares around the centres.

    With its tiles element, the boxes are the tiles' bounds in ``coordinate_system``; the centres fallback is in
    ``"global"``.
    """
    region = str(adata.obs[REGION_KEY].iloc[0]) if adata.n_obs else ""
    if region in sdata.shapes:
        bounds = _shapes_in_global(sdata, region, coordinate_system).geometry.bounds
        found = bounds.reindex(pd.Index(adata.obs[INSTANCE_KEY].to_numpy()))
        if not found.isna().any().any():
            return found.to_numpy()
    params = next(v for v in adata.uns.values() if isinstance(v, Mapping) and "params" in v)["params"]
    half = float(params.get("tile_size_um", 1.0)) / 2
    c = np.asarray(adata.obsm["spatial"])[:, :2]
    return np.column_stack([c[:, 0] - half, c[:, 1] - half, c[:, 0] + half, c[:, 1] + half])


def _tile_labels(sdata, adata, *, labels, regions, region_label, min_region_fraction=None) -> pd.Series:
    index = adata.obs_names
    if regions is not None:
        if regions not in sdata.shapes:
            msg = f"regions={regions!r} is not a shapes element; its shapes are {sorted(sdata.shapes)}."
            raise KeyError(msg)
        shapes = _shapes_in_global(sdata, regions)
        if region_label not in shapes.columns:
            msg = f"The regions {regions!r} have no column {region_label!r}; columns: {list(shapes.columns)}."
            raise KeyError(msg)
        import geopandas as gpd

        if min_region_fraction is None:
            pts = gpd.GeoDataFrame(geometry=gpd.points_from_xy(*np.asarray(adata.obsm["spatial"]).T[:2]), index=index)
            joined = gpd.sjoin(pts, shapes[[region_label, "geometry"]], how="left", predicate="within")
            joined = joined[~joined.index.duplicated(keep="first")]
            return joined[region_label].reindex(index).astype(object)
        if not 0.0 < float(min_region_fraction) <= 1.0:
            msg = f"min_region_fraction must lie in (0, 1], got {min_region_fraction!r}."
            raise ValueError(msg)
        import shapely

        tiles = gpd.GeoDataFrame(geometry=shapely.box(*tile_boxes(sdata, adata).T), index=index)
        right = shapes[[region_label, "geometry"]].reset_index(drop=True)
        right.index.name = None
        pairs = gpd.sjoin(tiles, right, how="inner", predicate="intersects")
        out = pd.Series(None, index=index, dtype=object)
        if len(pairs):
            region_geoms = right.geometry.to_numpy()[pairs["index_right"].to_numpy()]
            tile_geoms = tiles.geometry.loc[pairs.index].to_numpy()
            share = shapely.area(shapely.intersection(tile_geoms, region_geoms)) / shapely.area(tile_geoms)
            pairs = pairs.assign(share=share)
            # the share of each label (regions with the same label add up), the largest one per tile
            per_label = pairs.groupby([pairs.index, region_label], observed=True)["share"].sum().reset_index()
            per_label.columns = ["tile", "label", "share"]
            best = per_label.sort_values("share", ascending=False).drop_duplicates("tile").set_index("tile")
            best = best[best["share"] >= float(min_region_fraction) - 1e-9]
            out.loc[best.index] = best["label"].to_numpy()
        return out
    if isinstance(labels, str):
        if labels in adata.obs.columns:
            return adata.obs[labels].astype(object)
        region = adata.obs[REGION_KEY].iloc[0]
        if region in sdata.shapes and labels in sdata.shapes[region].columns:
            col = sdata.shapes[region][labels]
            ids = adata.obs[INSTANCE_KEY].to_numpy()
            return pd.Series(col.reindex(pd.Index(ids)).to_numpy(), index=index, dtype=object)
        msg = f"labels={labels!r} is neither a column of the tile table nor of its tiles element."
        raise KeyError(msg)
    values = list(labels)
    if len(values) != adata.n_obs:
        msg = f"labels has {len(values)} values but the table has {adata.n_obs} tiles."
        raise ValueError(msg)
    return pd.Series(values, index=index, dtype=object)


def _agreement(a, b, classes) -> dict[str, Any]:
    from scipy.spatial import cKDTree
    from sklearn.metrics import cohen_kappa_score

    if list(b.var_names) != list(classes):
        msg = f"The two runs scored different classes: {list(classes)} vs {list(b.var_names)}."
        raise ValueError(msg)
    ca, cb = np.asarray(a.obsm["spatial"])[:, :2], np.asarray(b.obsm["spatial"])[:, :2]
    if len(ca) == 0 or len(cb) == 0:
        msg = "One of the two runs has no classified tiles."
        raise ValueError(msg)
    pa = a.uns[next(k for k in a.uns if isinstance(a.uns[k], Mapping) and "params" in a.uns[k])]["params"]
    tol = 0.25 * float(pa.get("tile_size_um", 1.0))
    dist, idx = cKDTree(cb).query(ca, k=1)
    matched = dist <= tol
    if not matched.any():
        msg = "No tile of one run lies at a tile centre of the other: run both on the same tiles (tiles_key=...)."
        raise ValueError(msg)
    ia, ib = np.flatnonzero(matched), idx[matched]
    call_a = np.asarray(a.obs["class"].astype(str))[ia]
    call_b = np.asarray(b.obs["class"].astype(str))[ib]
    corr = {}
    for j, cls in enumerate(classes):
        xa, xb = np.asarray(a.X)[ia, j], np.asarray(b.X)[ib, j]
        corr[cls] = float(np.corrcoef(xa, xb)[0, 1]) if len(ia) > 1 and xa.std() > 0 and xb.std() > 0 else float("nan")
    per_tile = pd.DataFrame(
        {
            "tile_id": a.obs[INSTANCE_KEY].to_numpy()[ia],
            "class": call_a,
            "other_class": call_b,
            "agree": call_a == call_b,
        },
        index=a.obs_names[ia],
    )
    for j, cls in enumerate(classes):
        per_tile[f"prob_{cls}"] = np.asarray(a.X)[ia, j]
        per_tile[f"other_prob_{cls}"] = np.asarray(b.X)[ib, j]
    kappa = (
        float(cohen_kappa_score(call_a, call_b, labels=list(classes))) if len(set(call_a) | set(call_b)) > 1 else 1.0
    )
    return {
        "cohen_kappa": kappa,
        "fraction_agreeing": float(np.mean(call_a == call_b)),
        "probability_correlation": corr,
        "n_tiles": int(len(ia)),
        "per_tile": per_tile,
    }
