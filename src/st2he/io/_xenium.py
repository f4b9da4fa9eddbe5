"""10x Genomics Xenium output folders, full or partial."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from st2he._grid import Grid

from ._common import (
    CELL_BOUNDARIES_KEY,
    NUCLEUS_BOUNDARIES_KEY,
    TABLE_KEY,
    TRANSCRIPTS_KEY,
    all_to_microns,
    annotate,
    build_transcripts,
    check_folder,
    control_mask,
    find_file,
    grid_from_extent,
    image_element,
    logger,
    points_extent,
    polygons_from_vertices,
    quiet_spatialdata_io,
    read_image_lazy,
    read_table,
    scale_matrix,
    set_source,
    shapes_element,
    table_element,
    warn_assumption,
)

#: µm per pixel of the Xenium morphology images (and of its labels) on every Xenium instrument so far.
XENIUM_PIXEL_SIZE = 0.2125

_TRANSCRIPT_FILES = ("transcripts.parquet", "transcripts.csv.gz", "transcripts.csv")
_SPECS_FILE = "experiment.xenium"
_CELLS_ZARR = "cells.zarr.zip"


def read_xenium(
    path: str | Path,
    *,
    image_pixel_size: float | None = None,
    image_origin: tuple[float, float] | None = None,
    labels: bool = False,
    aligned_images: bool = True,
    use_spatialdata_io: bool | None = None,
    he_image: str | Path | None = None,
    alignment: str | Path | None = None,
    keypoints: str | Path | None = None,
    he_pixel_size: float | None = None,
    he_key: str = "he_image",
):
    """Read a 10x Genomics Xenium output folder into a SpatialData object in micrometres.

    Full output folders (with ``experiment.xenium`` and ``cells.zarr.zip``) are read with
    :func:`spatialdata_io.xenium` for the images, boundaries, labels and cell table; partial folders (for
    example a crop shared as ``transcripts.parquet`` plus ``morphology_focus.ome.tif`` plus boundaries) are read
    file by file. The molecules are always read by st2he, lazily, so that whole slides need not fit in memory.
    Nothing is filtered: control probes are marked in ``is_control`` and the quality value is kept in ``qv``
    (filtering is :mod:`st2he.pp`'s job).

    Parameters
    ----------
    path
        The Xenium output folder.
    image_pixel_size
        µm per pixel of the morphology images. By default taken from ``experiment.xenium``, else from the
        OME metadata, else inferred from the extent of the molecules (with a warning saying what was assumed).
    image_origin
        Global ``(x, y)`` position in µm of the top-left corner of the images' first pixel. By default
        ``(0, 0)`` (where Xenium puts it) when the pixel size is known and the image then covers the molecules,
        else the minimum of the molecules' coordinates (with a warning).
    labels
        Also read the cell and nucleus segmentation masks (``cell_labels``, ``nucleus_labels``) of a full
        output folder.
    aligned_images
        Also read images aligned by Xenium Explorer (for example the post-run H&E) of a full output folder.
    use_spatialdata_io
        Force (True) or forbid (False) reading through :func:`spatialdata_io.xenium`; by default it is used when
        the folder has ``experiment.xenium`` and ``cells.zarr.zip``.
    he_image
        A post-run H&E (or other brightfield) image file to place over the run as image ``he_key``, read lazily
        with :func:`st2he.io.read_he_image` (pyramid levels kept).
    alignment
        Xenium Explorer's image alignment CSV for ``he_image`` (``*_imagealignment.csv``: the 3x3 matrix from the
        image's pixels to the morphology image's pixels). The image gets that transformation, in µm: rotations,
        flips and shears included.
    keypoints
        Xenium Explorer's keypoints CSV of the same alignment (``*_keypoints.csv``). Optional: when given, the
        matrix is checked against the landmarks (whether it was written in pixels or in µm, and the residual in
        µm, recorded in ``sdata.attrs["st2he"]["source"]["he_alignment"]``; a warning above 20 µm RMS).
    he_pixel_size
        Without ``alignment``: the image is taken as already aligned to the run, with this many µm per pixel and
        its first pixel at the run's origin.
    he_key
        Name of the H&E image element.

    Returns
    -------
    A :class:`spatialdata.SpatialData` whose elements all map to the coordinate system ``"global"`` in µm:

    ``transcripts`` (points)
        One row per molecule of ``transcripts.parquet`` (or ``.csv.gz``): ``x``, ``y``, ``z`` (µm), ``gene``
        (categorical, the points' feature key, from ``feature_name``), ``qv`` (float32, Phred-scaled),
        ``is_control`` (``BLANK*``, ``NegControl*``, ``UnassignedCodeword*``, ``DeprecatedCodeword*``,
        ``Intergenic_Region*``), and all other columns of the table (``cell_id``, ``overlaps_nucleus``,
        ``fov_name``, ``nucleus_distance``, ...).
    ``morphology_focus``, ``morphology_mip`` (images)
        The nuclear stain (DAPI, channel ``"DAPI"``; more channels for multimodal segmentation runs) where the
        folder has them.
    ``cell_boundaries``, ``nucleus_boundaries`` (shapes)
        Segmentation polygons in µm, indexed by ``cell_id`` (cells).
    ``table`` (table)
        Cell x gene counts from ``cell_feature_matrix.h5`` (gene expression features), cell metadata from
        ``cells.parquet`` in ``obs``, centroids (µm) in ``obsm["spatial"]``, ``var["is_control"]``; it annotates
        ``cell_boundaries`` through ``obs["cell_id"]`` when those are present.
    ``cell_labels``, ``nucleus_labels`` (labels), aligned images
        Only with ``labels=True`` / ``aligned_images=True`` and a full output folder.

    ``sdata.attrs["st2he"]["source"]`` records ``platform="xenium"``, ``native_pixel_size`` (µm per pixel of the
    instrument's images, 0.2125), ``image_pixel_size``, ``image_origin``, ``path``, ``reader`` and ``assumptions``.

    Examples
    --------
    >>> import st2he
    >>> sdata = st2he.io.read_xenium("shared/data/xenium_cellline_crop")  # doctest: +SKIP
    >>> sdata["transcripts"].compute().groupby("is_control").size()  # doctest: +SKIP
    >>> sdata = st2he.io.read_xenium("crop", image_pixel_size=400 / 237, image_origin=(1000, 1000))  # doctest: +SKIP
    """
    folder = check_folder(path, "Xenium")
    transcripts_file = find_file(folder, _TRANSCRIPT_FILES)
    if transcripts_file is None:
        msg = (
            f"No transcripts table in {str(folder)!r}: expected one of {list(_TRANSCRIPT_FILES)}. Pass the Xenium "
            "output folder (the one that holds transcripts.parquet)."
        )
        raise FileNotFoundError(msg)
    specs = _read_specs(folder)
    full = (folder / _SPECS_FILE).exists() and (folder / _CELLS_ZARR).exists()
    if use_spatialdata_io is None:
        use_spatialdata_io = full
    elif use_spatialdata_io and not full:
        msg = (
            f"use_spatialdata_io=True needs a full Xenium output folder, but {str(folder)!r} lacks "
            f"{_SPECS_FILE!r} or {_CELLS_ZARR!r}. Leave use_spatialdata_io=None to read the files that are there."
        )
        raise FileNotFoundError(msg)

    transcripts = _read_transcripts(transcripts_file)
    assumptions: list[str] = []
    used: list[Path] = [transcripts_file, folder / _SPECS_FILE]
    native = float(specs.get("pixel_size", XENIUM_PIXEL_SIZE))
    source = {
        "platform": "xenium",
        "native_pixel_size": native,
        "path": str(folder),
        "transcripts_file": transcripts_file.name,
    }
    if "pixel_size" not in specs:
        assumptions.append(f"native pixel size: {_SPECS_FILE} absent, assumed the Xenium {XENIUM_PIXEL_SIZE} µm")

    if use_spatialdata_io:
        sdata, image_pixel = _read_full(folder, native, labels=labels, aligned_images=aligned_images)
        used += _full_folder_files(folder, aligned_images=aligned_images)
        source.update(reader="spatialdata_io.xenium", image_pixel_size=image_pixel, image_origin=[0.0, 0.0])
        if image_pixel_size is not None or image_origin is not None:
            logger.info("image_pixel_size / image_origin are ignored for a full Xenium output folder.")
    else:
        sdata, grid = _read_partial(
            folder,
            transcripts,
            specs=specs,
            image_pixel_size=image_pixel_size,
            image_origin=image_origin,
            assumptions=assumptions,
            used=used,
        )
        source.update(
            reader="st2he (partial folder)",
            image_pixel_size=None if grid is None else grid.pixel_size,
            image_origin=None if grid is None else [grid.x0, grid.y0],
        )
    sdata[TRANSCRIPTS_KEY] = transcripts
    if he_image is not None:
        source["he_alignment"] = _place_he(sdata, he_image, alignment, keypoints, he_pixel_size, native, he_key)
        used += [Path(p) for p in (he_image, alignment, keypoints) if p is not None]
    elif alignment is not None or keypoints is not None:
        msg = "alignment= and keypoints= place an H&E image: pass the image file as he_image= too."
        raise ValueError(msg)
    source["nuclear_stain"] = next((k for k in ("morphology_focus", "morphology_mip") if k in sdata.images), None)
    source["assumptions"] = assumptions
    set_source(sdata, source, used=used, subfolders=("morphology_focus",))
    return sdata


def _full_folder_files(folder: Path, *, aligned_images: bool) -> list[Path]:
    """The files of a full output folder that :func:`spatialdata_io.xenium` reads (as st2he calls it)."""
    names = (
        _CELLS_ZARR,
        "cell_feature_matrix.h5",
        "cells.parquet",
        "cell_boundaries.parquet",
        "nucleus_boundaries.parquet",
        "morphology_mip.ome.tif",
        "morphology_focus.ome.tif",
        "morphology_focus",
    )
    files = [folder / name for name in names]
    if aligned_images:
        for image in folder.glob("*.ome.tif"):
            if image.name.endswith(("he_image.ome.tif", "if_image.ome.tif")):
                files += [image, folder / (image.name[: -len(".ome.tif")] + "alignment.csv")]
    return files


def _place_he(sdata, image, alignment, keypoints, pixel_size, native: float, key: str) -> dict:
    """Read an H&E image into ``sdata[key]``, placed by Xenium Explorer's alignment (or a plain pixel size)."""
    from ._alignment import alignment_to_um, read_alignment_matrix, read_keypoints
    from ._common import to_microns
    from ._he import read_he_image

    if key in sdata:
        msg = f"he_key={key!r} is already an element of this Xenium run (from its folder); pass another he_key."
        raise ValueError(msg)
    if alignment is None:
        if pixel_size is None:
            msg = (
                "he_image= needs alignment= (Xenium Explorer's *_imagealignment.csv) to be placed over the run, or "
                "he_pixel_size= when the image is already aligned to it."
            )
            raise ValueError(msg)
        read_he_image(image, pixel_size=pixel_size, key=key, sdata=sdata)
        return {"matrix_units": None, "pixel_size": float(pixel_size), "file": str(image)}
    matrix = read_alignment_matrix(alignment)
    points = read_keypoints(keypoints) if keypoints is not None else None
    to_um, report = alignment_to_um(matrix, native, points)
    read_he_image(image, pixel_size=1.0, key=key, sdata=sdata)  # image pixels first, then the alignment
    to_microns(sdata.images[key], to_um)
    report.update(file=str(image), alignment=str(alignment), matrix_um=to_um.tolist())
    return report


def _read_specs(folder: Path) -> dict:
    file = folder / _SPECS_FILE
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"Could not read {str(file)!r} ({err}); it should be the JSON file Xenium writes. Copy it again."
        raise ValueError(msg) from err


def _read_transcripts(file: Path):
    table = read_table(
        file,
        required=("feature_name", "x_location", "y_location"),
        dtype={"feature_name": "object", "cell_id": "object", "fov_name": "object"},
        categorical="feature_name",
    )
    return build_transcripts(
        table,
        file=file,
        platform="xenium",
        gene="feature_name",
        x="x_location",
        y="y_location",
        z="z_location" if "z_location" in table.columns else None,
        qv="qv" if "qv" in table.columns else None,
        instance_key="cell_id",
    )


# ----------------------------------------------------------------------------------------------- full folders


def _read_full(folder: Path, pixel_size: float, *, labels: bool, aligned_images: bool):
    from spatialdata import SpatialData
    from spatialdata_io import xenium

    with quiet_spatialdata_io():
        sdata_io = xenium(
            folder,
            transcripts=False,
            cells_boundaries=True,
            nucleus_boundaries=True,
            cells_as_circles=False,
            cells_labels=labels,
            nucleus_labels=labels,
            morphology_mip=True,
            morphology_focus=True,
            aligned_images=aligned_images,
            cells_table=True,
        )
    to_um = scale_matrix(pixel_size)  # spatialdata-io's "global" is the morphology image's pixels
    images = all_to_microns(sdata_io.images, to_um)
    label_elements = all_to_microns(sdata_io.labels, to_um)
    shapes = all_to_microns(sdata_io.shapes, to_um)
    tables = {}
    table = sdata_io.tables.get(TABLE_KEY)
    if table is not None:
        table.var["is_control"] = control_mask(table.var_names, "xenium")
        if CELL_BOUNDARIES_KEY in shapes and "cell_id" in table.obs:
            table = annotate(table, CELL_BOUNDARIES_KEY, "cell_id")
        tables[TABLE_KEY] = table
    sdata = SpatialData(images=images, labels=label_elements, shapes=shapes, tables=tables)
    return sdata, pixel_size


# -------------------------------------------------------------------------------------------- partial folders


def _read_partial(folder, transcripts, *, specs, image_pixel_size, image_origin, assumptions, used):
    from spatialdata import SpatialData

    images: dict = {}
    shapes: dict = {}
    tables: dict = {}
    grid: Grid | None = None
    for key, names in (
        ("morphology_focus", ("morphology_focus.ome.tif", "morphology_focus/morphology_focus_0000.ome.tif")),
        ("morphology_mip", ("morphology_mip.ome.tif",)),
    ):
        file = find_file(folder, names)
        if file is None:
            continue
        data, ome_size = read_image_lazy(file)
        used.append(file)
        if grid is None or grid.shape != tuple(data.shape[1:]):
            grid = _image_grid(
                data.shape[1:],
                file=file,
                transcripts=transcripts,
                specs=specs,
                ome_size=ome_size,
                image_pixel_size=image_pixel_size,
                image_origin=image_origin,
                assumptions=assumptions,
            )
        channels = ["DAPI"] + [f"channel_{i}" for i in range(1, data.shape[0])]
        images[key] = image_element(data, grid, channels)

    for key, stem in ((CELL_BOUNDARIES_KEY, "cell_boundaries"), (NUCLEUS_BOUNDARIES_KEY, "nucleus_boundaries")):
        file = find_file(folder, (f"{stem}.parquet", f"{stem}.csv.gz", f"{stem}.csv"))
        if file is None:
            continue
        table = read_table(file, required=("cell_id", "vertex_x", "vertex_y"), lazy=False)
        used.append(file)
        id_col = "label_id" if (key == NUCLEUS_BOUNDARIES_KEY and "label_id" in table.columns) else "cell_id"
        frame = polygons_from_vertices(table, id_col=id_col, x="vertex_x", y="vertex_y", file=file)
        if id_col == "label_id":
            first = table.groupby("label_id", sort=False)["cell_id"].first()
            first = first.map(lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v))
            frame["cell_id"] = pd.Series(first.to_numpy(), index=first.index.astype(str)).reindex(frame.index).values
        frame.index.name = id_col
        shapes[key] = shapes_element(frame)

    table = _read_cell_table(
        folder, annotates=CELL_BOUNDARIES_KEY if CELL_BOUNDARIES_KEY in shapes else None, used=used
    )
    if table is not None:
        tables[TABLE_KEY] = table
    return SpatialData(images=images, shapes=shapes, tables=tables), grid


def _image_grid(shape, *, file, transcripts, specs, ome_size, image_pixel_size, image_origin, assumptions) -> Grid:
    height, width = int(shape[0]), int(shape[1])
    pixel_size = image_pixel_size
    origin = None if image_origin is None else (float(image_origin[0]), float(image_origin[1]))
    how = "given"
    if pixel_size is None and ome_size is not None:
        pixel_size, how = ome_size, "OME metadata"
    if pixel_size is None and "pixel_size" in specs:
        pixel_size, how = float(specs["pixel_size"]), _SPECS_FILE
    fix = "Pass image_pixel_size= (µm per pixel) and image_origin= (x, y in µm) to read_xenium to set them."
    if pixel_size is None:
        extent = points_extent(transcripts, what=f"used to place {file.name}", assumptions=assumptions)
        if origin is not None:
            x0, y0 = origin
            pixel_size = max((extent[2] - x0) / width, (extent[3] - y0) / height)
            note = f"{file.name}: no pixel size in its metadata; assumed {pixel_size:.5g} µm per pixel so that it "
            note += "spans from the given origin to the molecules' maximum"
            grid = Grid(x0, y0, float(pixel_size), height, width)
        else:
            grid, note = grid_from_extent(
                (height, width), extent, what=f"{file.name} has no pixel size in its metadata"
            )
        assumptions.append(note)
        warn_assumption(note, fix)
        return grid
    if origin is None:
        origin = (0.0, 0.0)
        candidate = Grid(0.0, 0.0, float(pixel_size), height, width)
        extent = points_extent(transcripts, what=f"used to place {file.name}", assumptions=assumptions)
        cx, cy = (extent[0] + extent[2]) / 2, (extent[1] + extent[3]) / 2
        x_min, y_min, x_max, y_max = candidate.bounds
        if not (x_min <= cx <= x_max and y_min <= cy <= y_max):
            origin = (extent[0], extent[1])
            note = (
                f"{file.name}: at {pixel_size:.5g} µm per pixel ({how}) an image starting at (0, 0) would miss the "
                f"molecules; assumed its corner at their minimum ({origin[0]:.2f}, {origin[1]:.2f}) µm"
            )
            assumptions.append(note)
            warn_assumption(note, fix)
    logger.info("%s: %.5g µm per pixel (%s), corner at %s µm", file.name, pixel_size, how, origin)
    return Grid(float(origin[0]), float(origin[1]), float(pixel_size), height, width)


def _read_cell_table(folder: Path, *, annotates: str | None, used: list[Path]):
    import anndata as ad
    import scanpy as sc

    h5 = folder / "cell_feature_matrix.h5"
    mtx = folder / "cell_feature_matrix"
    try:
        if h5.exists():
            adata = sc.read_10x_h5(h5, gex_only=True)
            source = h5
        elif (mtx / "matrix.mtx.gz").exists():
            adata = sc.read_10x_mtx(mtx, gex_only=True)
            source = mtx
        else:
            return None
    except Exception as err:
        file = h5 if h5.exists() else mtx
        msg = f"Could not read the cell x gene matrix {str(file)!r} ({type(err).__name__}: {err}); copy it again."
        raise ValueError(msg) from err
    used.append(source)
    adata = ad.AnnData(adata.X.tocsr() if hasattr(adata.X, "tocsr") else adata.X, obs=adata.obs, var=adata.var)
    adata.obs_names = adata.obs_names.astype(str)
    adata.obs["cell_id"] = adata.obs_names.to_numpy()
    cells_file = find_file(folder, ("cells.parquet", "cells.csv.gz", "cells.csv"))
    if cells_file is not None:
        cells = read_table(cells_file, required=("cell_id",), lazy=False)
        used.append(cells_file)
        cells["cell_id"] = cells["cell_id"].map(lambda v: v.decode() if isinstance(v, bytes) else str(v))
        cells = cells.set_index("cell_id").reindex(adata.obs_names)
        for col in cells.columns:
            adata.obs[col] = cells[col].to_numpy()
        if {"x_centroid", "y_centroid"} <= set(cells.columns):
            adata.obsm["spatial"] = cells[["x_centroid", "y_centroid"]].to_numpy(np.float64)
    adata.var["is_control"] = control_mask(adata.var_names, "xenium")
    logger.info("Read the cell table from %s: %d cells x %d features", source, adata.n_obs, adata.n_vars)
    return table_element(adata, annotates=annotates, instance_key="cell_id")
