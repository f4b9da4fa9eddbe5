"""Vizgen MERSCOPE output folders (region folders), full or partial."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from st2he._grid import Grid

from ._common import (
    CELL_BOUNDARIES_KEY,
    TABLE_KEY,
    TRANSCRIPTS_KEY,
    annotate,
    build_transcripts,
    check_folder,
    control_mask,
    find_file,
    grid_from_extent,
    image_element,
    logger,
    points_extent,
    quiet_spatialdata_io,
    read_image_lazy,
    read_table,
    set_source,
    shapes_element,
    table_element,
    to_microns,
    warn_assumption,
)

_TRANSCRIPT_FILES = ("detected_transcripts.parquet", "detected_transcripts.csv", "detected_transcripts.csv.gz")
_TRANSFORM_FILE = "images/micron_to_mosaic_pixel_transform.csv"
_MANIFEST_FILE = "images/manifest.json"
_MOSAIC = re.compile(r"^mosaic_(?P<stain>.+)_z(?P<z>\d+)\.tiff?$")


def read_merscope(
    path: str | Path,
    *,
    stains: Sequence[str] | Literal["all"] = ("DAPI",),
    z_layers: int | Sequence[int] | Literal["auto", "max"] = "auto",
    image_pixel_size: float | None = None,
    image_origin: tuple[float, float] | None = None,
    use_spatialdata_io: bool | None = None,
):
    """Read a Vizgen MERSCOPE region folder into a SpatialData object in micrometres.

    When the folder has ``images/micron_to_mosaic_pixel_transform.csv`` (full instrument output) the cell table
    and cell boundaries are read with :func:`spatialdata_io.merscope` and the mosaics are placed with that
    transform; partial folders (for example a crop with ``images/manifest.json`` but no transform file) are read
    file by file and the mosaics are placed from the manifest's ``bbox_microns``. The molecules are always read by
    st2he, lazily. Nothing is filtered: ``Blank-*`` barcodes are marked in ``is_control``.

    Parameters
    ----------
    path
        The MERSCOPE region folder (holding ``detected_transcripts.csv`` and ``images/``).
    stains
        Mosaic stains to read as images (``"DAPI"``, ``"PolyT"``, ``"Cellbound1"``, ...), or ``"all"``.
    z_layers
        Which z plane of each stain: an index, a list of indices (one element per plane), ``"max"`` (the maximum
        projection over the planes present) or ``"auto"`` (plane 3 when present, the middle plane otherwise).
    image_pixel_size, image_origin
        µm per mosaic pixel and the global ``(x, y)`` µm of the mosaic's top-left corner, overriding the transform
        file and the manifest.
    use_spatialdata_io
        Force (True) or forbid (False) reading the table and boundaries through :func:`spatialdata_io.merscope`;
        by default it is used when the transform file exists.

    Returns
    -------
    A :class:`spatialdata.SpatialData` whose elements all map to the coordinate system ``"global"`` in µm:

    ``transcripts`` (points)
        One row per molecule of ``detected_transcripts.csv``: ``x``, ``y`` (µm, from ``global_x``/``global_y``),
        ``gene`` (categorical, the feature key), ``qv`` (NaN: MERSCOPE reports none), ``is_control``
        (``Blank-*``), and all other columns; the per-FOV pixel columns ``x``/``y`` are renamed
        ``x_local_px``/``y_local_px`` and the z plane stays in ``global_z`` (an index, not µm).
    ``dapi`` (image)
        The DAPI mosaic (channel ``"DAPI"``), one z plane or its maximum projection; other stains are named the
        same way in lower case (``polyt``, ``cellbound1``); several z planes give ``dapi_z2``, ``dapi_z3``, ...
    ``cell_boundaries`` (shapes)
        Cell polygons in µm (one z plane per cell: the lowest present), indexed by ``EntityID`` (str).
    ``table`` (table)
        Cells x genes from ``cell_by_gene.csv`` with ``cell_metadata.csv`` in ``obs`` (the layout of
        spatialdata-io: ``Blank-*`` counts in ``obsm["blank"]``, centres in ``obsm["spatial"]``), annotating
        ``cell_boundaries`` through ``obs["EntityID"]``.

    ``sdata.attrs["st2he"]["source"]`` records ``platform="merscope"``, ``native_pixel_size`` (µm per pixel of the
    instrument's mosaic, e.g. 0.108), ``image_pixel_size`` and ``image_origin`` of the mosaics read, ``z_layers``,
    ``path``, ``reader`` and ``assumptions``.

    Examples
    --------
    >>> import st2he
    >>> sdata = st2he.io.read_merscope("shared/data/merscope_brain_cancer_crop")  # doctest: +SKIP
    >>> sdata = st2he.io.read_merscope("region_0", stains=["DAPI", "PolyT"], z_layers="max")  # doctest: +SKIP
    """
    folder = check_folder(path, "MERSCOPE")
    transcripts_file = find_file(folder, _TRANSCRIPT_FILES)
    if transcripts_file is None:
        msg = (
            f"No transcripts table in {str(folder)!r}: expected one of {list(_TRANSCRIPT_FILES)}. Pass the MERSCOPE "
            "region folder (the one that holds detected_transcripts.csv and images/)."
        )
        raise FileNotFoundError(msg)
    has_transform = (folder / _TRANSFORM_FILE).exists()
    if use_spatialdata_io is None:
        use_spatialdata_io = has_transform
    elif use_spatialdata_io and not has_transform:
        msg = (
            f"use_spatialdata_io=True needs {str(folder / _TRANSFORM_FILE)!r}, which is missing. Leave "
            "use_spatialdata_io=None to read the files that are there."
        )
        raise FileNotFoundError(msg)

    transcripts = _read_transcripts(transcripts_file)
    assumptions: list[str] = []
    placement = _mosaic_placement(folder, image_pixel_size, image_origin)
    used: list[Path] = [transcripts_file, folder / _MANIFEST_FILE, folder / _TRANSFORM_FILE]
    images, grid_info = _read_mosaics(folder, stains, z_layers, placement, transcripts, assumptions, used)

    shapes: dict = {}
    tables: dict = {}
    reader = "st2he (partial folder)"
    if use_spatialdata_io:
        try:
            shapes, tables = _read_full(folder, placement["micron_to_pixel"])
            reader = "spatialdata_io.merscope"
        except Exception as err:  # noqa: BLE001 - any failure falls back to reading the files one by one
            note = f"spatialdata_io.merscope could not read the cells ({type(err).__name__}: {err}); read the files"
            assumptions.append(note)
            warn_assumption(note, "Check the cell_by_gene.csv, cell_metadata.csv and cell_boundaries.parquet files.")
    if not shapes:
        boundaries = _read_boundaries(folder)
        if boundaries is not None:
            shapes[CELL_BOUNDARIES_KEY] = boundaries
    if not tables:
        table = _read_cell_table(folder, annotates=CELL_BOUNDARIES_KEY if CELL_BOUNDARIES_KEY in shapes else None)
        if table is not None:
            tables[TABLE_KEY] = table
    if shapes:
        parquet = folder / "cell_boundaries.parquet"
        used.append(parquet if parquet.exists() else folder / "cell_boundaries")
    if tables:
        used += [folder / "cell_by_gene.csv", folder / "cell_metadata.csv"]

    from spatialdata import SpatialData

    sdata = SpatialData(images=images, shapes=shapes, tables=tables)
    sdata[TRANSCRIPTS_KEY] = transcripts
    assumptions = placement["assumptions"] + assumptions
    source = {
        "platform": "merscope",
        "native_pixel_size": placement["native_pixel_size"],
        "path": str(folder),
        "transcripts_file": transcripts_file.name,
        "reader": reader,
        **grid_info,
        "nuclear_stain": "dapi" if "dapi" in images else None,
        "assumptions": assumptions,
    }
    set_source(sdata, source, used=used, subfolders=("images", "cell_boundaries"))
    return sdata


def _read_transcripts(file: Path):
    table = read_table(
        file,
        required=("gene", "global_x", "global_y"),
        dtype={"gene": "object", "transcript_id": "object"},
    )
    rename = {"x": "x_local_px", "y": "y_local_px"}
    return build_transcripts(
        table,
        file=file,
        platform="merscope",
        gene="gene",
        x="global_x",
        y="global_y",
        rename=rename,
        instance_key="cell_id",
    )


# ------------------------------------------------------------------------------------------------------ images


def _mosaic_placement(folder: Path, image_pixel_size, image_origin) -> dict:
    """µm per mosaic pixel, the mosaic's corner, the native pixel size, and the µm->pixel matrix when known."""
    notes: list[str] = []
    manifest = {}
    manifest_file = folder / _MANIFEST_FILE
    if manifest_file.exists():
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            msg = f"Could not read {str(manifest_file)!r} ({err}); it should be the JSON manifest MERSCOPE writes."
            raise ValueError(msg) from err
    matrix = None
    transform_file = folder / _TRANSFORM_FILE
    if transform_file.exists():
        try:
            matrix = np.loadtxt(transform_file).reshape(3, 3)
        except ValueError as err:
            msg = f"Could not read {str(transform_file)!r} ({err}); it should hold a 3x3 matrix (µm -> pixels)."
            raise ValueError(msg) from err
    pixel_size = origin = None
    how = None
    if matrix is not None:
        if abs(matrix[0, 1]) > 1e-9 or abs(matrix[1, 0]) > 1e-9:
            msg = f"{str(transform_file)!r} rotates the mosaic; st2he needs an axis-aligned mosaic."
            raise ValueError(msg)
        scale = (matrix[0, 0] + matrix[1, 1]) / 2
        pixel_size = 1.0 / scale
        origin = (-matrix[0, 2] / matrix[0, 0], -matrix[1, 2] / matrix[1, 1])
        how = _TRANSFORM_FILE
    native = float(manifest.get("microns_per_pixel", pixel_size if pixel_size is not None else 0.108))
    return {
        "manifest": manifest,
        "pixel_size": image_pixel_size if image_pixel_size is not None else pixel_size,
        "origin": tuple(image_origin) if image_origin is not None else origin,
        "how": "given" if image_pixel_size is not None else how,
        "native_pixel_size": native,
        "micron_to_pixel": matrix,
        "assumptions": notes,
    }


def _mosaic_grid(shape, placement, file: Path, transcripts, assumptions) -> Grid:
    height, width = int(shape[0]), int(shape[1])
    pixel_size, origin = placement["pixel_size"], placement["origin"]
    manifest = placement["manifest"]
    fix = "Pass image_pixel_size= (µm per pixel) and image_origin= (x, y in µm) to read_merscope to set them."
    bbox = manifest.get("bbox_microns")
    if (pixel_size is None or origin is None) and bbox is not None and len(bbox) == 4:
        x0, y0, x1, y1 = (float(v) for v in bbox)
        from_bbox = ((x1 - x0) / width + (y1 - y0) / height) / 2
        mpp = manifest.get("microns_per_pixel")
        if pixel_size is None:
            pixel_size = from_bbox
            if mpp is not None and abs(float(mpp) - from_bbox) > 0.01 * from_bbox:
                note = (
                    f"{file.name}: the manifest says {float(mpp):.5g} µm per pixel, but its {width} x {height} pixels "
                    f"span the bbox_microns box of {x1 - x0:.2f} x {y1 - y0:.2f} µm; used {from_bbox:.5g} µm per "
                    "pixel from bbox_microns (the mosaic was probably resampled)"
                )
                if note not in assumptions:
                    assumptions.append(note)
                    warn_assumption(note, fix)
        if origin is None:
            origin = (x0, y0)
    if pixel_size is None or origin is None:
        extent = points_extent(transcripts, what=f"used to place {file.name}", assumptions=assumptions)
        if pixel_size is None and origin is None:
            grid, note = grid_from_extent((height, width), extent, what=f"{file.name} has no placement")
        else:
            if origin is None:
                origin = (extent[0], extent[1])
            else:
                pixel_size = max((extent[2] - origin[0]) / width, (extent[3] - origin[1]) / height)
            grid = Grid(float(origin[0]), float(origin[1]), float(pixel_size), height, width)
            note = f"{file.name}: no transform file nor manifest bbox; assumed {grid} from the molecules' extent"
        assumptions.append(note)
        warn_assumption(note, fix)
        return grid
    return Grid(float(origin[0]), float(origin[1]), float(pixel_size), height, width)


def _read_mosaics(folder: Path, stains, z_layers, placement, transcripts, assumptions, used: list[Path]):
    import dask.array as da

    images_dir = folder / "images"
    found: dict[str, dict[int, Path]] = {}
    if images_dir.is_dir():
        for file in sorted(images_dir.iterdir()):
            match = _MOSAIC.match(file.name)
            if match:
                found.setdefault(match.group("stain"), {})[int(match.group("z"))] = file
    wanted = list(found) if isinstance(stains, str) and stains == "all" else list(stains)
    by_lower = {s.lower(): s for s in found}
    images: dict = {}
    info: dict = {"image_pixel_size": None, "image_origin": None, "z_layers": {}}
    for stain in wanted:
        actual = by_lower.get(str(stain).lower())
        if actual is None:
            if found:
                logger.info("No mosaic of stain %r in %s (found %s).", stain, images_dir, sorted(found))
            continue
        planes = found[actual]
        available = sorted(planes)
        name = re.sub(r"[^0-9a-z]+", "_", actual.lower()).strip("_")
        if isinstance(z_layers, str) and z_layers == "max":
            arrays = [read_image_lazy(planes[z])[0] for z in available]
            data = da.stack(arrays).max(axis=0) if len(arrays) > 1 else arrays[0]
            selected = {name: (data, planes[available[0]])}
            used += [planes[z] for z in available]
            info["z_layers"][actual] = "max of " + ",".join(map(str, available))
        else:
            if isinstance(z_layers, str):  # "auto"
                zs = [3 if 3 in planes else available[len(available) // 2]]
            elif isinstance(z_layers, int | np.integer):
                zs = [int(z_layers)]
            else:
                zs = [int(z) for z in z_layers]
            missing = [z for z in zs if z not in planes]
            if missing:
                msg = (
                    f"No {actual} mosaic for z plane(s) {missing} in {str(images_dir)!r}; the planes present are "
                    f"{available}. Choose z_layers among them, or 'max'."
                )
                raise ValueError(msg)
            selected = {
                (name if len(zs) == 1 else f"{name}_z{z}"): (read_image_lazy(planes[z])[0], planes[z]) for z in zs
            }
            info["z_layers"][actual] = zs if len(zs) > 1 else zs[0]
            used += [planes[z] for z in zs]
        for key, (data, file) in selected.items():
            grid = _mosaic_grid(data.shape[1:], placement, file, transcripts, assumptions)
            images[key] = image_element(data[:1] if data.shape[0] > 1 else data, grid, [actual])
            info["image_pixel_size"], info["image_origin"] = grid.pixel_size, [grid.x0, grid.y0]
    return images, info


# --------------------------------------------------------------------------------------------- cells (full)


def _read_full(folder: Path, micron_to_pixel: np.ndarray):
    from spatialdata_io import merscope

    with quiet_spatialdata_io():
        sdata_io = merscope(folder, transcripts=False, mosaic_images=False, cells_boundaries=True, cells_table=True)
    shapes, tables = {}, {}
    pixel_to_micron = np.linalg.inv(micron_to_pixel)  # spatialdata-io's "global" is the mosaic's pixels
    if len(sdata_io.shapes) == 1:
        (element,) = sdata_io.shapes.values()
        if len(element) == 0:
            msg = "no cell boundaries at z plane 0"
            raise ValueError(msg)
        to_microns(element, pixel_to_micron)
        shapes[CELL_BOUNDARIES_KEY] = element
    table = sdata_io.tables.get(TABLE_KEY)
    if table is not None:
        table.var["is_control"] = control_mask(table.var_names, "merscope")
        # spatialdata-io's obs "region" is the Vizgen region name; "region" becomes the annotated element below
        table.obs = table.obs.drop(columns=["cells_region"], errors="ignore").rename(
            columns={"region": "vizgen_region"}
        )
        if CELL_BOUNDARIES_KEY in shapes:
            table = annotate(table, CELL_BOUNDARIES_KEY, "EntityID")
        tables[TABLE_KEY] = table
    return shapes, tables


# ------------------------------------------------------------------------------------------ cells (partial)


def _read_boundaries(folder: Path):
    file = folder / "cell_boundaries.parquet"
    if file.exists():
        frame = _boundaries_from_parquet(file)
    elif (folder / "cell_boundaries").is_dir() and any((folder / "cell_boundaries").glob("*.hdf5")):
        frame = _boundaries_from_hdf5(folder / "cell_boundaries")
    else:
        return None
    return shapes_element(frame)


def _boundaries_from_parquet(file: Path):
    import geopandas as gpd
    import pyarrow.parquet as pq
    import shapely

    try:
        metadata = pq.read_schema(file).metadata or {}
        if b"geo" in metadata:
            frame = gpd.read_parquet(file)
        else:
            raw = pd.read_parquet(file)
            geometry_col = next((c for c in raw.columns if c.lower() == "geometry"), None)
            if geometry_col is None:
                msg = f"{str(file)!r} has no Geometry column (it has {list(raw.columns)}); is it a MERSCOPE file?"
                raise ValueError(msg)
            geoms = shapely.from_wkb(raw.pop(geometry_col).to_numpy())
            frame = gpd.GeoDataFrame(raw, geometry=geoms)
    except ValueError:
        raise
    except Exception as err:
        msg = f"Could not read {str(file)!r} ({type(err).__name__}: {err}); copy it again."
        raise ValueError(msg) from err
    if frame.geometry.name != "geometry":
        frame = frame.rename_geometry("geometry")
    if "EntityID" not in frame.columns:
        msg = f"{str(file)!r} has no EntityID column (it has {list(frame.columns)}); is it a MERSCOPE file?"
        raise ValueError(msg)
    if "ZIndex" in frame.columns:  # the same cell at several z planes: keep the lowest
        frame = frame.sort_values(["EntityID", "ZIndex"], kind="stable").drop_duplicates("EntityID")
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("__index_level")], errors="ignore")
    frame.index = pd.Index(frame["EntityID"].astype(str).to_numpy(), name="EntityID")
    return frame


def _boundaries_from_hdf5(directory: Path):
    import geopandas as gpd
    import h5py
    import shapely

    ids, geoms, zs = [], [], []
    for file in sorted(directory.glob("*.hdf5")):
        try:
            with h5py.File(file, "r") as h5:
                for entity, group in h5["featuredata"].items():
                    levels = sorted((k for k in group if k.startswith("zIndex_")), key=lambda k: int(k.split("_")[1]))
                    if not levels:
                        continue
                    parts = [np.asarray(group[levels[0]][p]["coordinates"])[0] for p in group[levels[0]]]
                    polys = [shapely.Polygon(p) for p in parts if len(p) >= 3]
                    if not polys:
                        continue
                    ids.append(str(entity))
                    zs.append(int(levels[0].split("_")[1]))
                    geoms.append(polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys))
        except Exception as err:
            msg = f"Could not read {str(file)!r} ({type(err).__name__}: {err}); copy it again."
            raise ValueError(msg) from err
    frame = gpd.GeoDataFrame({"EntityID": ids, "ZIndex": zs}, geometry=geoms)
    frame.index = pd.Index(ids, name="EntityID")
    return frame


def _read_cell_table(folder: Path, *, annotates: str | None):
    import anndata as ad
    from scipy.sparse import csr_matrix

    counts_file = folder / "cell_by_gene.csv"
    if not counts_file.exists():
        return None
    counts = read_table(counts_file, lazy=False)
    cell_col = counts.columns[0]
    counts = counts.set_index(counts[cell_col].astype(str)).drop(columns=[cell_col])
    counts.index.name = None
    metadata_file = folder / "cell_metadata.csv"
    if metadata_file.exists():
        obs = read_table(metadata_file, lazy=False)
        id_col = "EntityID" if "EntityID" in obs.columns else obs.columns[0]
        obs.index = obs.pop(id_col).astype(str).to_numpy()
        obs = obs.reindex(counts.index)
    else:
        obs = pd.DataFrame(index=counts.index)
    blank = control_mask(counts.columns, "merscope")
    adata = ad.AnnData(
        csr_matrix(counts.loc[:, ~blank].to_numpy(np.float32)),
        obs=obs,
        var=pd.DataFrame(index=counts.columns[~blank].astype(str)),
    )
    adata.obsm["blank"] = counts.loc[:, blank].set_axis(adata.obs_names)
    if {"center_x", "center_y"} <= set(obs.columns):
        adata.obsm["spatial"] = obs[["center_x", "center_y"]].to_numpy(np.float64)
    adata.obs["EntityID"] = adata.obs_names.to_numpy()
    adata.var["is_control"] = control_mask(adata.var_names, "merscope")
    return table_element(adata, annotates=annotates, instance_key="EntityID")
