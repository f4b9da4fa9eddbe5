"""``st2he.datasets.pairs_from_he``: a spatial transcriptomics sample derived from a real H&E image.

The real H&E stays as it is (``he_image``); everything else is derived from it: its haematoxylin (colour
deconvolution) becomes the nuclear stain, the nuclei are segmented in it, each nucleus is given a cell lineage
from its morphology, and molecules of that lineage's gene program (the programs of
:func:`st2he.datasets.synthetic_tissue`) are placed in and around it. The result pairs a real H&E with an input
picture drawn from molecules, for training and scoring generators on real histology.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from st2he._grid import COORDINATE_SYSTEM, Grid
from st2he.datasets import _synthetic as syn

#: Lineages of the "lineage" palette each simulated cell type stands for (genes outside the simulated panel are
#: given to the cell types of the lineage they mark in st2he's marker table).
TYPE_LINEAGES: dict[str, tuple[str, ...]] = {
    "tumour_gland": ("glandular_epithelial", "epithelial"),
    "tumour_solid": ("squamous_epithelial", "epithelial"),
    "fibroblast": ("fibroblast", "smooth_muscle_pericyte"),
    "lymphocyte": ("t_nk_cell", "b_cell", "plasma_cell", "immune"),
    "macrophage": ("myeloid", "granulocyte_mast"),
    "endothelial": ("endothelial",),
    "erythrocyte": ("erythroid",),
}


def _read_rgb(image) -> tuple[np.ndarray, str]:
    """``(H, W, 3)`` uint8 RGB from an array or a file (SVS / TIFF with tifffile, PNG / JPEG with Pillow)."""
    if isinstance(image, str | os.PathLike):
        path = os.fspath(image)
        if not os.path.exists(path):
            msg = f"pairs_from_he: no image file at {path!r}."
            raise FileNotFoundError(msg)
        if path.lower().endswith((".svs", ".tif", ".tiff")):
            import tifffile

            arr = tifffile.imread(path, key=0)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        source = path
    else:
        arr = np.asarray(image)
        source = "array"
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):  # (c, y, x)
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        msg = f"pairs_from_he needs an RGB image of shape (height, width, 3), got shape {arr.shape} from {source}."
        raise ValueError(msg)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and np.nanmax(arr) <= 1.0:
            arr = np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8)
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    if min(arr.shape[:2]) < 32:
        msg = f"pairs_from_he needs an image of at least 32 x 32 pixels, got {arr.shape[:2]} from {source}."
        raise ValueError(msg)
    return np.ascontiguousarray(arr), source


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density of an RGB H&E (``skimage.color.rgb2hed``), float32, 0 where there is none."""
    from skimage.color import rgb2hed

    h = rgb2hed(rgb)[..., 0]
    return np.clip(h - np.percentile(h, 1.0), 0, None).astype(np.float32)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Where an RGB H&E is not the slide's background white (summed optical density above 0.25, smoothed)."""
    od = -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0).sum(axis=-1)
    return ndimage.binary_closing(ndimage.gaussian_filter(od, 1.0) > 0.25, iterations=2)


def segment_nuclei(
    h: np.ndarray, pixel_size: float, *, tissue: np.ndarray | None = None, min_area_um2: float = 8.0
) -> np.ndarray:
    """Label image of nuclei in a haematoxylin map: Otsu threshold, then a distance-transform watershed.

    The threshold is Otsu's over the tissue's pixels (``tissue``: a boolean mask; default every pixel).

    Touching nuclei are split at the saddles of the distance to the background (maxima at least 0.5 µm deep);
    objects smaller than ``min_area_um2`` are dropped. Labels are 1..n in raster order of their markers.
    """
    from skimage.filters import threshold_otsu
    from skimage.measure import label
    from skimage.morphology import h_maxima, remove_small_objects
    from skimage.segmentation import watershed

    smooth = ndimage.gaussian_filter(h, max(0.4 / pixel_size, 0.5))
    values = smooth[tissue] if tissue is not None else smooth.ravel()
    if values.size < 16 or float(np.ptp(values)) == 0:
        return np.zeros(h.shape, dtype=np.int32)
    thr = threshold_otsu(values)
    mask = smooth > thr
    mask = ndimage.binary_opening(mask, iterations=1)
    mask = ndimage.binary_fill_holes(mask)
    min_px = max(1, int(round(min_area_um2 / pixel_size**2)))
    mask = remove_small_objects(mask, max_size=min_px - 1) if min_px > 1 else mask
    dist = ndimage.distance_transform_edt(mask)
    dist = ndimage.gaussian_filter(dist, 0.5)
    # markers: maxima of the distance at least 0.5 µm above the saddle to any other (one per round or elongated
    # nucleus, two for two touching ones)
    markers = label(h_maxima(dist, max(0.5 / pixel_size, 0.5)) & mask).astype(np.int32)
    labels = watershed(-dist, markers, mask=mask).astype(np.int32)
    # pieces the watershed gave no marker to (none: every component holds a peak) and too small ones go
    sizes = np.bincount(labels.ravel())
    small = np.flatnonzero(sizes < min_px)
    small = small[small > 0]
    if len(small):
        labels[np.isin(labels, small)] = 0
    # consecutive labels 1..n
    uniq = np.unique(labels)
    uniq = uniq[uniq > 0]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lut[uniq] = np.arange(1, len(uniq) + 1, dtype=np.int32)
    return lut[labels]


def classify_nuclei(props: pd.DataFrame) -> np.ndarray:
    """Cell type (index into :data:`st2he.datasets._synthetic.CELL_TYPES`) of each nucleus from its morphology.

    ``props`` has per nucleus ``area`` (µm²), ``major`` and ``minor`` (axis lengths, µm), ``darkness`` (mean
    haematoxylin relative to the median nucleus of the image) and ``crowding`` (other nuclei whose centres lie
    within 12 µm). The rules, later ones overriding earlier ones:

    - the rest (mid-sized, pale or irregular, alone) -> macrophage (myeloid);
    - large (>= 48 µm²) or crowded (>= 4 neighbours: nuclei packed in a sheet): pale (darkness < 1) ->
      gland-forming epithelial / tumour cell, dark -> squamous-like epithelial / tumour cell;
    - elongated (major / minor >= 2.2) and not crowded: thin (minor < 2.6 µm) and small (< 30 µm²) ->
      endothelial, else fibroblast (spindle cells: fibroblasts and smooth muscle);
    - small (< 36 µm²), round (major / minor < 1.6) and dark (darkness >= 1) -> lymphocyte (immune).
    """
    types = {n: i for i, n in enumerate(syn.CELL_TYPES)}
    ratio = props["major"].to_numpy() / np.maximum(props["minor"].to_numpy(), 1e-6)
    area = props["area"].to_numpy()
    dark = props["darkness"].to_numpy()
    minor = props["minor"].to_numpy()
    crowded = props["crowding"].to_numpy() >= 4 if "crowding" in props else np.zeros(len(props), dtype=bool)
    out = np.full(len(props), types["macrophage"], dtype=np.int64)
    epithelial = (area >= 48.0) | crowded
    out[epithelial & (dark < 1.0)] = types["tumour_gland"]
    out[epithelial & (dark >= 1.0)] = types["tumour_solid"]
    spindle = (ratio >= 2.2) & ~crowded
    out[spindle] = types["fibroblast"]
    out[spindle & (minor < 2.6) & (area < 30.0)] = types["endothelial"]
    out[(area < 36.0) & (ratio < 1.6) & (dark >= 1.0)] = types["lymphocyte"]
    return out


def panel_means(genes: Sequence[str], ctype: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Mean expression (cells x ``genes``) from the simulation's programs (genes it does not know: by lineage)."""
    from st2he.pp._palette import lineage_of

    sim = syn._expression_means({"ctype": ctype, "state": state})
    index = {g: k for k, g in enumerate(syn.GENES)}
    unknown = [g for g in genes if g not in index]
    lineage = lineage_of(unknown) if unknown else {}
    out = np.empty((len(ctype), len(genes)))
    for j, g in enumerate(genes):
        if g in index:
            out[:, j] = sim[:, index[g]]
            continue
        lin = lineage.get(g, "other")
        if lin in ("other", "proliferating"):
            out[:, j] = 0.3  # unmarked or cycling genes: a little in every cell
            continue
        w = np.array([4.0 if lin in TYPE_LINEAGES[t] else 0.03 for t in syn.CELL_TYPES])
        out[:, j] = w[ctype]
    return out


def pairs_from_he(
    image,
    *,
    pixel_size: float = 0.5,
    genes: Sequence[str] | None = None,
    seed: int = 0,
    density: float = 1.0,
    origin_um: tuple[float, float] = (0.0, 0.0),
    cell_radius_um: float = 4.0,
    min_nucleus_area_um2: float = 8.0,
    he_key: str = "he_image",
    stain_key: str = "morphology_focus",
    points_key: str = "transcripts",
):
    """A spatial transcriptomics sample derived from a real H&E image, paired with that H&E.

    The sample has the element names and units of :func:`st2he.datasets.synthetic_tissue` (all in µm of
    ``"global"``), so everything that runs on a simulated sample runs on it:

    - ``he_key`` (image, uint8 ``r, g, b``): the real H&E as given, on the pixel grid of ``pixel_size`` µm with its
      top-left corner at ``origin_um``.
    - ``stain_key`` (image, channel ``DAPI``, uint16): the nuclear stain, the H&E's haematoxylin (colour
      deconvolution, :func:`skimage.color.rgb2hed`) scaled like the simulated DAPI (background about 200 counts,
      nuclei several thousand), on exactly the same grid as the H&E: same transformation, same bounds.
    - ``nucleus_boundaries``, ``cell_boundaries`` (shapes indexed by ``cell_id``): nuclei segmented in the
      haematoxylin (Otsu threshold, distance-transform watershed), cells grown from them by up to
      ``cell_radius_um`` inside the tissue (where the H&E is not background white).
    - ``points_key`` (points): ``x``, ``y`` (µm), ``gene``, ``qv``, ``is_control`` (all False), ``cell_id``,
      ``overlaps_nucleus``. Each cell holds a Poisson number of molecules (``density`` per µm² of cell, with
      cell-to-cell variation as in the simulation) of its lineage's program, drawn as in the simulation (program
      means of :data:`st2he.datasets._synthetic.PROGRAMS` times a per-cell gamma factor), placed uniformly in the
      cell's pixels, in the nucleus in proportion to its share of the cell. Every molecule lies in its cell.
    - ``table`` (AnnData, cells x genes counts) annotating ``cell_boundaries``, with ``obs`` columns
      ``cell_type``, ``cell_area``, ``nucleus_area``, ``transcript_counts`` and ``obsm["spatial"]``.

    Each nucleus's cell type follows from its morphology alone (:func:`classify_nuclei`): elongated -> fibroblast
    (spindle cells: fibroblasts, smooth muscle) or, thin and small, endothelial; small, round and dark ->
    lymphocyte; large and pale -> gland-forming epithelial / tumour cell; large and dark -> squamous-like
    epithelial / tumour cell; the rest -> macrophage. These are rules of thumb: the molecules say what a
    pathologist would guess from the nucleus, no more (no cytoplasm, no context, no red cells).

    Parameters
    ----------
    image
        The H&E: an ``(H, W, 3)`` uint8 array (or ``(3, H, W)``), or a path to an SVS / TIFF (first page, read
        with tifffile) or a PNG / JPEG file.
    pixel_size
        Size of an H&E pixel in µm (a 20x scan: about 0.5).
    genes
        The panel. ``None``: the simulated panel (:data:`st2he.datasets._synthetic.GENES`). Genes of the
        simulated panel keep their program means; other genes are given to the cell types of the lineage they mark
        in st2he's marker table (``st2he/pp/data/lineage_markers.csv``), unmarked genes a little to every cell.
    seed
        Seed of the molecules: the same image and seed give the same sample.
    density
        Mean molecules per µm² of cell.
    origin_um
        Global ``(x, y)`` of the image's top-left corner, in µm.
    cell_radius_um
        How far a cell reaches beyond its nucleus, at most (µm).
    min_nucleus_area_um2
        Smaller objects of the haematoxylin threshold are not nuclei.
    he_key, stain_key, points_key
        Names of the H&E, the nuclear stain and the molecules.

    Returns
    -------
    A :class:`spatialdata.SpatialData` object; ``sdata.attrs["st2he"]["source"]`` records how it was made
    (``platform="he_derived"``, the image, the number of nuclei per cell type).
    """
    from skimage.measure import regionprops_table
    from skimage.segmentation import expand_labels

    if not (np.isfinite(pixel_size) and pixel_size > 0):
        msg = f"pixel_size must be a positive number of micrometres, got {pixel_size!r}."
        raise ValueError(msg)
    if not (np.isfinite(density) and density > 0):
        msg = f"density must be a positive number of molecules per µm², got {density!r}."
        raise ValueError(msg)
    if not (np.isfinite(cell_radius_um) and cell_radius_um >= 0):
        msg = f"cell_radius_um must be a number of micrometres >= 0, got {cell_radius_um!r}."
        raise ValueError(msg)
    keys = [he_key, stain_key, points_key]
    if len(set(keys)) != 3 or {"cell_boundaries", "nucleus_boundaries", "table"} & set(keys):
        msg = f"he_key, stain_key and points_key must be distinct names other than the shapes and table, got {keys}."
        raise ValueError(msg)
    panel = list(syn.GENES) if genes is None else [str(g) for g in genes]
    if not panel or len(set(panel)) != len(panel):
        msg = (
            f"genes must be a non-empty list of distinct gene names, got {len(panel)} names "
            f"({len(set(panel))} distinct)."
        )
        raise ValueError(msg)
    rgb, source_name = _read_rgb(image)
    ps = float(pixel_size)
    x0, y0 = (float(v) for v in origin_um)
    grid = Grid(x0, y0, ps, rgb.shape[0], rgb.shape[1])
    rng = np.random.default_rng(int(seed))

    # the nuclear stain: haematoxylin, scaled like the simulated DAPI (counts = 90 + 9000 (signal + 0.012))
    h = haematoxylin(rgb)
    top = float(np.percentile(h, 99.5)) or 1.0
    signal = np.clip(h / top, 0, 1.2)
    dapi = np.clip(np.rint(90.0 + 9000.0 * (signal + 0.012)), 0, 65535).astype(np.uint16)[None]

    tissue = tissue_mask(rgb)
    nuclei = segment_nuclei(h, ps, tissue=tissue, min_area_um2=min_nucleus_area_um2)
    n = int(nuclei.max())
    cells = expand_labels(nuclei, distance=cell_radius_um / ps)
    cells[~tissue & (nuclei == 0)] = 0

    props = pd.DataFrame(
        regionprops_table(
            nuclei,
            intensity_image=h,
            properties=("label", "area", "axis_major_length", "axis_minor_length", "intensity_mean", "centroid"),
        )
    )
    cell_px = np.bincount(cells.ravel(), minlength=n + 1)[1:]
    med = float(np.median(props["intensity_mean"])) if n else 1.0
    morph = pd.DataFrame(
        {
            "area": props["area"].to_numpy() * ps**2,
            "major": np.maximum(props["axis_major_length"].to_numpy(), 1.0) * ps,
            "minor": np.maximum(props["axis_minor_length"].to_numpy(), 1.0) * ps,
            "darkness": props["intensity_mean"].to_numpy() / max(med, 1e-9),
        }
    )
    if n:
        from scipy.spatial import cKDTree

        centres = np.c_[props["centroid-1"].to_numpy(), props["centroid-0"].to_numpy()] * ps
        morph["crowding"] = [len(k) - 1 for k in cKDTree(centres).query_ball_point(centres, 12.0)]
    ctype = classify_nuclei(morph) if n else np.zeros(0, dtype=np.int64)
    state = np.zeros(n, dtype=np.int64)
    areas = cell_px * ps**2
    nuc_area = morph["area"].to_numpy() if n else np.zeros(0)

    # expression as in the simulation: program means times a per-cell gamma factor, a Poisson total per cell
    means = panel_means(panel, ctype, state) * rng.gamma(4.0, 0.25, (n, len(panel)))
    means /= np.maximum(means.sum(axis=1, keepdims=True), 1e-12)
    n_per_cell = rng.poisson(density * areas * rng.lognormal(0.0, 0.3, n))
    counts = np.zeros((n, len(panel)), dtype=np.int64)
    for i in range(n):
        counts[i] = rng.multinomial(n_per_cell[i], means[i])

    # molecules at random pixels of their cell (nuclear ones in the nucleus), uniform within the pixel
    owner = np.repeat(np.arange(n), counts.sum(axis=1))
    gene = np.concatenate([np.repeat(np.arange(len(panel)), row) for row in counts]) if n else np.zeros(0, int)
    p_nuc = np.clip(nuc_area / np.maximum(areas, 1e-9), 0, 0.95) if n else np.zeros(0)
    in_nuc = rng.random(len(owner)) < p_nuc[owner]
    flat_cells = cells.ravel()
    is_nuc_px = nuclei.ravel() > 0
    pools = {}
    for where, pixels_of in (("nucleus", is_nuc_px), ("cytoplasm", ~is_nuc_px)):
        idx = np.flatnonzero((flat_cells > 0) & pixels_of)
        lab = flat_cells[idx] - 1
        order = np.argsort(lab, kind="stable")
        idx, lab = idx[order], lab[order]
        start = np.searchsorted(lab, np.arange(n))
        pools[where] = (idx, start, np.searchsorted(lab, np.arange(n), side="right") - start)
    # a cell whose nucleus fills it (no cytoplasm pixel) keeps all its molecules in the nucleus
    in_nuc |= pools["cytoplasm"][2][owner] == 0
    pick = np.empty(len(owner), dtype=np.int64)
    for where, sel in (("nucleus", np.flatnonzero(in_nuc)), ("cytoplasm", np.flatnonzero(~in_nuc))):
        idx, start, size = pools[where]
        o = owner[sel]
        pick[sel] = idx[start[o] + (rng.random(len(o)) * size[o]).astype(np.int64)]
    px_y, px_x = np.divmod(pick, rgb.shape[1])
    # uniform within the pixel, kept a hair inside it so that the pixel lookup is exact
    x = x0 + (px_x + rng.uniform(0.01, 0.99, len(owner))) * ps
    y = y0 + (px_y + rng.uniform(0.01, 0.99, len(owner))) * ps
    overlaps = nuclei[px_y, px_x] > 0
    deficit = rng.gamma(1.1, 7.0, len(owner))
    qv = np.clip(np.rint(40.0 - deficit), 20, 40).astype(np.float32)

    width = max(5, len(str(n)))
    cell_ids = np.array([f"cell_{i + 1:0{width}d}" for i in range(n)], dtype=object)
    perm = rng.permutation(len(owner))
    tx = pd.DataFrame(
        {
            "x": x[perm],
            "y": y[perm],
            "gene": pd.Categorical.from_codes(gene[perm], categories=panel),
            "qv": qv[perm],
            "is_control": np.zeros(len(owner), dtype=bool),
            "cell_id": pd.Categorical(cell_ids[owner[perm]], categories=list(cell_ids)),
            "overlaps_nucleus": overlaps[perm],
        }
    )
    types, n_types = np.unique(ctype, return_counts=True)
    source = {
        "platform": "he_derived",
        "image": source_name if source_name == "array" else os.path.basename(source_name),
        "seed": int(seed),
        "pixel_size": ps,
        "he_pixel_size": ps,
        "origin_um": [x0, y0],
        "size_um": [rgb.shape[1] * ps, rgb.shape[0] * ps],
        "density": float(density),
        "feature_key": "gene",
        "n_cells": n,
        "n_transcripts": int(len(tx)),
        "cell_types": {syn.CELL_TYPES[t]: int(k) for t, k in zip(types, n_types, strict=True)},
    }
    centroids = np.zeros((0, 2))
    if n:
        cx, cy = props["centroid-1"].to_numpy(), props["centroid-0"].to_numpy()
        centroids = np.c_[x0 + (cx + 0.5) * ps, y0 + (cy + 0.5) * ps]
    return _assemble(
        rgb, dapi, grid, nuclei, cells, ctype, areas, nuc_area, counts, cell_ids, centroids, tx, panel, source,
        he_key=he_key, stain_key=stain_key, points_key=points_key,
    )


def label_polygons(labels: np.ndarray, grid: Grid, n: int) -> list:
    """One shapely geometry (µm) per label 1..n: the exact outline of its pixels (union of its row runs).

    A point lies in the geometry exactly when it lies in one of the label's pixels (a label in several pieces gives
    a MultiPolygon); an absent label gives an empty polygon.
    """
    import shapely

    ps = grid.pixel_size
    h, w = labels.shape
    padded = np.zeros((h, w + 2), dtype=labels.dtype)
    padded[:, 1:-1] = labels
    change = np.flatnonzero((padded[:, 1:] != padded[:, :-1]).ravel())  # run boundaries, row-major over w + 1
    rows, cols = np.divmod(change, w + 1)
    # consecutive boundaries in the same row bound a run; keep the runs of a label (not background)
    same_row = rows[1:] == rows[:-1]
    r, c0, c1 = rows[:-1][same_row], cols[:-1][same_row], cols[1:][same_row]
    lab = labels[r, c0]
    keep = lab > 0
    r, c0, c1, lab = r[keep], c0[keep], c1[keep], lab[keep]
    boxes = shapely.box(grid.x0 + c0 * ps, grid.y0 + r * ps, grid.x0 + c1 * ps, grid.y0 + (r + 1) * ps)
    order = np.argsort(lab, kind="stable")
    boxes, lab = boxes[order], lab[order]
    starts = np.searchsorted(lab, np.arange(1, n + 2))
    out = []
    for i in range(n):
        part = boxes[starts[i] : starts[i + 1]]
        out.append(shapely.union_all(part) if len(part) else shapely.Polygon())
    return out


def _assemble(
    rgb, dapi, grid, nuclei, cells, ctype, areas, nuc_area, counts, cell_ids, centroids, tx, panel, source, *, he_key,
    stain_key, points_key,
):
    import anndata as ad
    import dask.dataframe as dd
    import geopandas as gpd
    import scipy.sparse as sp
    from spatialdata import SpatialData
    from spatialdata.models import PointsModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    from st2he._elements import ATTRS_KEY, parse_image

    ident = {COORDINATE_SYSTEM: Identity()}
    n = len(cell_ids)
    index = pd.Index(list(cell_ids), name="cell_id")
    cell_shapes = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=label_polygons(cells, grid, n), index=index), transformations=ident
    )
    nucleus_shapes = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=label_polygons(nuclei, grid, n), index=index.copy()), transformations=ident
    )
    points = PointsModel.parse(
        dd.from_pandas(tx, npartitions=max(1, len(tx) // 1_000_000 + 1), sort=False),
        coordinates={"x": "x", "y": "y"},
        feature_key="gene",
        instance_key="cell_id",
        transformations=ident,
    )
    obs = pd.DataFrame(
        {
            "cell_id": list(cell_ids),
            "region": pd.Categorical(["cell_boundaries"] * n),
            "cell_type": pd.Categorical.from_codes(ctype, categories=list(syn.CELL_TYPES)),
            "cell_area": areas,
            "nucleus_area": nuc_area,
            "transcript_counts": counts.sum(axis=1),
        },
        index=pd.Index(list(cell_ids), name=None),
    )
    program = dict.fromkeys(syn.HOUSEKEEPING, "housekeeping")
    for name, gs in list(syn.STATE_PROGRAMS.items()) + list(syn.PROGRAMS.items()):
        for g in gs:
            program.setdefault(g, name)
    var = pd.DataFrame({"program": pd.Categorical([program.get(g, "other") for g in panel])}, index=pd.Index(panel))
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.int32)), obs=obs, var=var)
    adata.obsm["spatial"] = centroids
    table = TableModel.parse(adata, region="cell_boundaries", region_key="region", instance_key="cell_id")
    he = np.moveaxis(rgb, -1, 0)
    sdata = SpatialData(
        images={stain_key: parse_image(dapi, grid, c_coords=("DAPI",)), he_key: parse_image(he, grid)},
        points={points_key: points},
        shapes={"cell_boundaries": cell_shapes, "nucleus_boundaries": nucleus_shapes},
        tables={"table": table},
    )
    sdata.attrs[ATTRS_KEY] = {"source": source}
    return sdata


def nuclear_morphology(rgb: np.ndarray, pixel_size: float) -> pd.DataFrame:
    """Nuclei of an ``(H, W, 3)`` uint8 H&E, segmented as :func:`pairs_from_he` does, one row each.

    Columns ``area_um2``, ``diameter_um`` (of the disc of that area), ``eccentricity``, ``axis_ratio`` (major / minor
    axis of the ellipse of the same second moments) and ``solidity`` (area / its convex hull's). Nuclei touching the
    image's border are left out (their outline is cut). For comparing simulated H&E with real H&E like for like.
    """
    from skimage.measure import regionprops_table

    labels = segment_nuclei(haematoxylin(rgb), pixel_size, tissue=tissue_mask(rgb))
    props = pd.DataFrame(
        regionprops_table(
            labels, properties=("area", "axis_major_length", "axis_minor_length", "eccentricity", "solidity", "bbox")
        )
    )
    h, w = labels.shape
    inner = (props["bbox-0"] > 0) & (props["bbox-1"] > 0) & (props["bbox-2"] < h) & (props["bbox-3"] < w)
    props = props[inner]
    area = props["area"].to_numpy() * pixel_size**2
    return pd.DataFrame(
        {
            "area_um2": area,
            "diameter_um": np.sqrt(4 * area / np.pi),
            "eccentricity": props["eccentricity"].to_numpy(),
            "axis_ratio": props["axis_major_length"].to_numpy() / np.maximum(props["axis_minor_length"].to_numpy(), 1),
            "solidity": props["solidity"].to_numpy(),
        }
    )
