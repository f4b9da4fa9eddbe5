"""10x Genomics Visium and Visium HD (Space Ranger) output folders, full or partial."""

from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from ._common import (
    TABLE_KEY,
    check_folder,
    find_file,
    logger,
    quiet_spatialdata_io,
    set_source,
    shapes_element,
    table_element,
    warn_assumption,
)

#: Diameter (µm) of a Visium spot; ``spot_diameter_fullres`` in the scale factors is this many µm in pixels.
VISIUM_SPOT_DIAMETER = 55.0
#: Centre-to-centre distance (µm) of neighbouring Visium spots.
VISIUM_SPOT_SPACING = 100.0
#: Bin sizes (µm) that Space Ranger writes for Visium HD.
VISIUM_HD_BIN_SIZES = (2, 8, 16)

HE_KEY = "he_image"
SPOTS_KEY = "spots"
INSTANCE_KEY = "instance_id"

_COUNTS_FILE = "filtered_feature_bc_matrix.h5"
_SCALEFACTORS = "scalefactors_json.json"
_POSITIONS = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
_HIRES = "tissue_hires_image.png"
_LOWRES = "tissue_lowres_image.png"
_FULLRES_PATTERNS = (
    "microscope_image/*",
    "*tissue_image.*",
    "*_image.tif",
    "*_image.tiff",
    "*_image.btf",
    "*_image.jpg",
    "*_image.jpeg",
)
_NOT_FULLRES = ("hires", "lowres", "cytassist", "fiducials", "detected_tissue", "spot_colors")
_POSITION_COLUMNS = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
_IMAGE_CHOICES = ("full", "hires", "lowres")


def read_visium(
    path: str | Path,
    *,
    bin_size: int | None = None,
    image: str | None = "full",
    fullres_image_file: str | Path | None = None,
    counts_file: str = _COUNTS_FILE,
    use_spatialdata_io: bool | None = None,
):
    """Read a 10x Genomics Visium or Visium HD (Space Ranger) output folder into a SpatialData object in µm.

    The folder's kind is told by its layout: a Visium HD folder has ``binned_outputs/square_<size>um/`` folders (or
    is one of them); a Visium folder has the counts matrix beside a ``spatial/`` folder. Full folders are read with
    :func:`spatialdata_io.visium` / :func:`spatialdata_io.visium_hd` for the counts and the spot or bin positions;
    partial ones (for example a single ``square_008um`` folder, or a Visium HD folder without ``feature_slice.h5``)
    are read file by file. The H&E is always read by st2he, lazily and with the slide's own pyramid when it is a
    tiled TIFF (:func:`st2he.io.read_he_image`), so whole slides need not fit in memory.

    Micrometres come from ``spatial/scalefactors_json.json``: for Visium, ``spot_diameter_fullres`` pixels are
    55 µm; for Visium HD, ``microns_per_pixel`` (else ``bin_size_um / spot_diameter_fullres``). A position of
    ``p`` full-resolution pixels lies at ``p x µm per pixel`` µm, and pixel ``(row, col)`` of the full-resolution
    image covers ``col <= x / µm per pixel < col + 1`` (as :func:`spatialdata_io.visium` places it).

    Parameters
    ----------
    path
        The Space Ranger output folder (``outs``): for Visium the one holding ``filtered_feature_bc_matrix.h5`` and
        ``spatial/``; for Visium HD the one holding ``binned_outputs/`` (or one ``square_<size>um`` folder).
    bin_size
        Visium HD only: the bins to read, 2, 8 or 16 µm (one per call). By default 8 µm, or the only bin size the
        folder has.
    image
        Which H&E becomes ``he_image``: ``"full"`` (the full-resolution microscope image: ``fullres_image_file``,
        else one found in the folder, else the hires and then the lowres image, saying so in the log and in
        ``sdata.attrs["st2he"]["source"]["image"]``), ``"hires"`` or ``"lowres"`` (Space Ranger's downscaled PNGs;
        an error when absent), or None (no image).
    fullres_image_file
        The full-resolution image Space Ranger was run with (absolute, or relative to ``path``). By default it is
        looked for in ``path``: ``microscope_image/*``, ``*tissue_image.*``, ``*_image.tif`` / ``.btf`` / ``.jpg``.
    counts_file
        Visium only: the counts matrix, ``filtered_feature_bc_matrix.h5`` (spots under tissue; default) or
        ``raw_feature_bc_matrix.h5`` (every spot); a ``<sample>_`` prefix in the folder is found too. Visium HD
        reads ``filtered_feature_bc_matrix.h5`` of the bin folder.
    use_spatialdata_io
        Force (True) or forbid (False) reading the counts and positions through spatialdata-io; by default it is
        used when the folder has what its reader needs (Visium: an ``.h5`` matrix and ``tissue_positions*.csv``;
        Visium HD: ``feature_slice.h5`` and ``binned_outputs/``, and no ``segmented_outputs/`` cell segmentation,
        which :func:`spatialdata_io.visium_hd` would load too). Both ways give the same object.

    Returns
    -------
    A :class:`spatialdata.SpatialData` whose elements all map to the coordinate system ``"global"`` in µm:

    ``he_image`` (image)
        The H&E (uint8, channels ``r, g, b``) placed over the spots or bins; absent with ``image=None`` or when the
        folder has no image at all (with a warning).
    ``spots`` (shapes; Visium)
        One circle per barcode at its centre, radius 27.5 µm, indexed by barcode.
    ``bins_<size>um`` (shapes; Visium HD)
        One axis-aligned square of ``bin_size`` µm per bin, centred on the bin, indexed by barcode.
    ``table`` (table)
        Counts (CSR float32, genes in ``var`` with ``gene_ids`` and ``feature_types``); ``obs``: ``instance_id``
        (the barcode, the instance key), ``region``, ``in_tissue`` (bool), ``array_row``, ``array_col`` (int, Space
        Ranger's grid), ``pxl_row_in_fullres``, ``pxl_col_in_fullres`` (as in the positions file), ``total_counts``,
        ``area_um2``; ``obsm["spatial"]``: centres ``(x, y)`` in µm. It annotates the spots or bins.

    ``sdata.attrs["st2he"]["source"]`` records ``platform`` (``"visium"`` or ``"visium_hd"``), ``path``,
    ``reader``, ``microns_per_pixel`` (of the full-resolution image), ``spot_diameter`` or ``bin_size`` (µm),
    ``image`` (which image, its file and µm per pixel) and ``assumptions``.

    Examples
    --------
    >>> import st2he
    >>> sdata = st2he.io.read_visium("CytAssist_FFPE_Human_Breast_Cancer/outs")  # doctest: +SKIP
    >>> sdata = st2he.io.read_visium("Visium_HD_Human_Colon/outs", bin_size=16, image="hires")  # doctest: +SKIP
    """
    folder = check_folder(path, "Visium")
    if image is not None and image not in _IMAGE_CHOICES:
        msg = f"image must be one of {list(_IMAGE_CHOICES)} or None, got {image!r}."
        raise ValueError(msg)
    outs, bin_dirs = _hd_layout(folder)
    if outs is not None or bin_size is not None:
        return _read_hd(
            folder,
            outs or folder,
            bin_dirs,
            bin_size=bin_size,
            image=image,
            fullres_image_file=fullres_image_file,
            use_spatialdata_io=use_spatialdata_io,
        )
    return _read_visium(
        folder,
        image=image,
        fullres_image_file=fullres_image_file,
        counts_file=counts_file,
        use_spatialdata_io=use_spatialdata_io,
    )


# --------------------------------------------------------------------------------------------------------- Visium


def _read_visium(folder: Path, *, image, fullres_image_file, counts_file: str, use_spatialdata_io):
    counts = _find_counts(folder, counts_file)
    spatial = folder / "spatial"
    positions_file = find_file(spatial, _POSITIONS) if spatial.is_dir() else None
    if positions_file is None:
        msg = (
            f"No spot positions in {str(folder)!r}: expected spatial/tissue_positions.csv (Space Ranger 2 or later) "
            "or spatial/tissue_positions_list.csv (Space Ranger 1). Pass the Space Ranger output folder that holds "
            "the spatial/ folder."
        )
        raise FileNotFoundError(msg)
    scalefactors = _read_scalefactors(spatial / _SCALEFACTORS, folder)
    diameter_px = _scalefactor(scalefactors, "spot_diameter_fullres", spatial / _SCALEFACTORS)
    um_per_px = VISIUM_SPOT_DIAMETER / diameter_px

    possible = counts.name.endswith(".h5") and positions_file.suffix == ".csv"
    if use_spatialdata_io is None:
        use_spatialdata_io = possible
    elif use_spatialdata_io and not possible:
        msg = (
            f"use_spatialdata_io=True needs an .h5 counts matrix and a tissue_positions*.csv file, but "
            f"{str(folder)!r} has {counts.name!r} and {positions_file.name!r}. Leave use_spatialdata_io=None."
        )
        raise FileNotFoundError(msg)
    if use_spatialdata_io:
        adata, xy_px = _visium_through_spatialdata_io(folder, counts, counts_file)
        reader = "spatialdata_io.visium"
    else:
        adata = _read_counts(counts)
        xy_px = _join_positions(adata, _read_positions(positions_file), positions_file)
        reader = "st2he (files)"

    assumptions: list[str] = []
    sdata = _assemble(
        adata,
        xy_px,
        um_per_px=um_per_px,
        shapes_key=SPOTS_KEY,
        shape="circle",
        size=VISIUM_SPOT_DIAMETER,
    )
    image_source = _add_image(
        sdata,
        folder,
        spatial,
        image=image,
        fullres_image_file=fullres_image_file,
        um_per_px=um_per_px,
        scalefactors=scalefactors,
        xy_um=np.asarray(sdata.tables[TABLE_KEY].obsm["spatial"]),
        assumptions=assumptions,
    )
    set_source(
        sdata,
        {
            "platform": "visium",
            "path": str(folder),
            "reader": reader,
            "counts_file": counts.name,
            "positions_file": positions_file.name,
            "microns_per_pixel": um_per_px,
            "spot_diameter": VISIUM_SPOT_DIAMETER,
            "spot_spacing": VISIUM_SPOT_SPACING,
            "image": image_source,
            "assumptions": assumptions,
        },
        used=[counts, positions_file, spatial / _SCALEFACTORS, *([image_source["file"]] if image_source else [])],
        subfolders=("spatial",),
    )
    return sdata


def _find_counts(folder: Path, counts_file: str) -> Path:
    stem = counts_file[: -len(".h5")] if counts_file.endswith(".h5") else counts_file
    found = find_file(folder, (counts_file, f"*_{counts_file}", f"{stem}/matrix.mtx.gz", f"*_{stem}/matrix.mtx.gz"))
    if found is None:
        msg = (
            f"No counts matrix in {str(folder)!r}: expected {counts_file!r} (or <sample>_{counts_file}, or the "
            f"{stem}/ folder of matrix.mtx.gz). Pass the Space Ranger output folder (outs), or name the file with "
            "counts_file=."
        )
        raise FileNotFoundError(msg)
    return found.parent if found.name == "matrix.mtx.gz" else found


def _visium_through_spatialdata_io(folder: Path, counts: Path, counts_file: str):
    from spatialdata_io import visium

    prefix = counts.name[: -len(counts_file) - 1] if counts.name.endswith("_" + counts_file) else ""
    counts_name = counts.name[len(prefix) + 1 :] if prefix else counts.name
    with quiet_spatialdata_io(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sdata_io = visium(folder, dataset_id=prefix or "visium", counts_file=counts_name)
        except Exception as err:
            raise _unreadable_folder(folder, "spatialdata_io.visium", err) from err
    table = sdata_io.tables[TABLE_KEY]
    xy = np.asarray(table.obsm["spatial"], dtype=np.float64)
    adata = _plain_counts(table)
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = table.obs[col].to_numpy()
    adata.obs["pxl_row_in_fullres"] = xy[:, 1]
    adata.obs["pxl_col_in_fullres"] = xy[:, 0]
    return adata, xy


# ------------------------------------------------------------------------------------------------------ Visium HD


def _hd_layout(folder: Path) -> tuple[Path | None, dict[int, Path]]:
    """The Visium HD output folder (with spatial/, feature_slice.h5) and its bin folders by size; (None, {}) if not HD."""
    for root in (folder / "binned_outputs", folder):
        if root.is_dir():
            bins = _bin_dirs(root)
            if bins:
                return folder, bins
    if not (folder / "spatial" / "tissue_positions.parquet").exists():
        return None, {}
    size = _bin_size_of(folder.name)
    if size is None:  # a bin folder under another name, told apart from Visium by its scale factors
        try:
            size = json.loads((folder / "spatial" / _SCALEFACTORS).read_text()).get("bin_size_um")
        except (OSError, ValueError, AttributeError):
            size = None
        if size is None:
            return None, {}
        size = int(round(float(size)))
    outs = folder.parent.parent if folder.parent.name == "binned_outputs" else folder
    return outs, {size: folder}


def _bin_dirs(root: Path) -> dict[int, Path]:
    found = {}
    for sub in sorted(root.iterdir()):
        size = _bin_size_of(sub.name)
        if size is not None and sub.is_dir():
            found[size] = sub
    return found


def _bin_size_of(name: str) -> int | None:
    match = re.fullmatch(r"square_(\d{3})um", name)
    return int(match.group(1)) if match else None


def _read_hd(folder, outs, bin_dirs, *, bin_size, image, fullres_image_file, use_spatialdata_io):
    if not bin_dirs:
        msg = (
            f"No Visium HD bins in {str(folder)!r}: expected binned_outputs/square_002um, square_008um or "
            "square_016um folders (or one of them). Pass the Space Ranger output folder (outs)."
        )
        raise FileNotFoundError(msg)
    available = sorted(bin_dirs)
    if bin_size is None:
        bin_size = 8 if 8 in bin_dirs else available[0] if len(available) == 1 else None
        if bin_size is None:
            msg = f"{str(folder)!r} has bins of {available} µm but not 8 µm; choose one with bin_size=."
            raise ValueError(msg)
    if isinstance(bin_size, (list, tuple)) or int(bin_size) != bin_size:
        msg = f"bin_size must be one whole number of µm ({list(VISIUM_HD_BIN_SIZES)}), got {bin_size!r}."
        raise ValueError(msg)
    bin_size = int(bin_size)
    if bin_size not in bin_dirs:
        msg = f"No {bin_size} µm bins in {str(folder)!r} (square_{bin_size:03d}um); it has {available} µm."
        raise FileNotFoundError(msg)
    bin_dir = bin_dirs[bin_size]
    counts = bin_dir / _COUNTS_FILE
    if not counts.exists():
        msg = (
            f"No counts matrix for the {bin_size} µm bins: {str(counts)!r} does not exist. Copy the whole "
            f"square_{bin_size:03d}um folder of the Space Ranger output."
        )
        raise FileNotFoundError(msg)
    positions_file = bin_dir / "spatial" / "tissue_positions.parquet"
    if not positions_file.exists():
        msg = (
            f"No bin positions for the {bin_size} µm bins: {str(positions_file)!r} does not exist. Copy the whole "
            f"square_{bin_size:03d}um folder of the Space Ranger output."
        )
        raise FileNotFoundError(msg)
    top_spatial = outs / "spatial"
    bin_factors_file = bin_dir / "spatial" / _SCALEFACTORS
    factors_file = bin_factors_file if bin_factors_file.exists() else top_spatial / _SCALEFACTORS
    scalefactors = _read_scalefactors(factors_file, bin_dir)
    um_per_px = _hd_microns_per_pixel(scalefactors, factors_file, bin_size)

    feature_slice = next(iter(sorted(outs.glob("*feature_slice.h5"))), None)
    possible = feature_slice is not None and bin_dir == outs / "binned_outputs" / f"square_{bin_size:03d}um"
    if use_spatialdata_io is None:
        # spatialdata-io would also load Space Ranger's cell segmentation (a GeoJSON of millions of polygons)
        segmented = (outs / "segmented_outputs" / "cell_segmentations.geojson").exists()
        use_spatialdata_io = possible and not segmented
    elif use_spatialdata_io and not possible:
        msg = (
            f"use_spatialdata_io=True needs a full Visium HD output folder (feature_slice.h5 beside binned_outputs/), "
            f"but {str(folder)!r} is not one. Leave use_spatialdata_io=None to read the files that are there."
        )
        raise FileNotFoundError(msg)
    if use_spatialdata_io:
        adata, xy_px = _hd_through_spatialdata_io(outs, bin_size, feature_slice)
        reader = "spatialdata_io.visium_hd"
    else:
        adata = _read_counts(counts)
        xy_px = _join_positions(adata, _read_positions(positions_file), positions_file)
        reader = "st2he (files)"

    assumptions: list[str] = []
    shapes_key = f"bins_{bin_size}um"
    sdata = _assemble(adata, xy_px, um_per_px=um_per_px, shapes_key=shapes_key, shape="square", size=float(bin_size))
    image_source = _add_image(
        sdata,
        folder,
        top_spatial if top_spatial.is_dir() else bin_dir / "spatial",
        image=image,
        fullres_image_file=fullres_image_file,
        um_per_px=um_per_px,
        scalefactors=scalefactors,
        xy_um=np.asarray(sdata.tables[TABLE_KEY].obsm["spatial"]),
        assumptions=assumptions,
        search=(outs, folder),
        fallback_spatial=bin_dir / "spatial",
    )
    set_source(
        sdata,
        {
            "platform": "visium_hd",
            "path": str(folder),
            "reader": reader,
            "bin_folder": str(bin_dir),
            "microns_per_pixel": um_per_px,
            "bin_size": bin_size,
            "image": image_source,
            "assumptions": assumptions,
        },
        used=[counts, positions_file, factors_file, *([image_source["file"]] if image_source else [])],
        subfolders=("spatial",),
    )
    return sdata


def _hd_microns_per_pixel(scalefactors: dict, file: Path, bin_size: int) -> float:
    if "microns_per_pixel" in scalefactors:
        value = float(scalefactors["microns_per_pixel"])
    elif "spot_diameter_fullres" in scalefactors:
        size = float(scalefactors.get("bin_size_um", bin_size))
        value = size / float(scalefactors["spot_diameter_fullres"])
    else:
        msg = (
            f"{str(file)!r} has neither 'microns_per_pixel' nor 'spot_diameter_fullres', so the bins cannot be placed "
            "in µm. Is it the scalefactors_json.json Space Ranger wrote for Visium HD?"
        )
        raise ValueError(msg)
    if not (np.isfinite(value) and value > 0):
        msg = f"{str(file)!r} gives {value!r} µm per pixel; expected a positive number."
        raise ValueError(msg)
    return value


def _hd_through_spatialdata_io(outs: Path, bin_size: int, feature_slice: Path):
    from spatialdata_io import visium_hd

    prefix = feature_slice.name[: -len("feature_slice.h5")].rstrip("_")
    with quiet_spatialdata_io(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # the H&E is read by st2he (lazily); a path that does not exist keeps spatialdata-io from loading it
            sdata_io = visium_hd(
                outs,
                dataset_id=prefix or None,
                bin_size=bin_size,
                load_segmentations_only=False,
                fullres_image_file=outs / ".st2he-reads-the-image-itself",
                gex_only=True,
            )
        except Exception as err:
            raise _unreadable_folder(outs, "spatialdata_io.visium_hd", err) from err
    table = sdata_io.tables[f"square_{bin_size:03d}um"]
    xy = np.asarray(table.obsm["spatial"], dtype=np.float64)
    adata = _plain_counts(table)
    for col in ("in_tissue", "array_row", "array_col"):
        adata.obs[col] = table.obs[col].to_numpy()
    adata.obs["pxl_row_in_fullres"] = xy[:, 1]
    adata.obs["pxl_col_in_fullres"] = xy[:, 0]
    return adata, xy


# ------------------------------------------------------------------------------------------------------ files


def _read_scalefactors(file: Path, folder: Path) -> dict:
    if not file.exists():
        msg = (
            f"No scale factors for {str(folder)!r}: {str(file)!r} does not exist. st2he needs it to place the spots "
            "and the images in µm; copy the spatial/ folder of the Space Ranger output with it."
        )
        raise FileNotFoundError(msg)
    try:
        factors = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"Could not read {str(file)!r} ({err}); it should be the JSON file Space Ranger writes. Copy it again."
        raise ValueError(msg) from err
    if not isinstance(factors, dict):
        msg = f"{str(file)!r} is not a JSON object of scale factors."
        raise ValueError(msg)
    return factors


def _scalefactor(factors: dict, name: str, file: Path) -> float:
    value = factors.get(name)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = None
    if value is None or not (np.isfinite(value) and value > 0):
        msg = (
            f"{str(file)!r} lacks a positive {name!r} (it has {sorted(factors)}); st2he needs it to place the spots "
            "in µm. Is it the scalefactors_json.json Space Ranger wrote?"
        )
        raise ValueError(msg)
    return value


def _read_counts(file: Path):
    import scanpy as sc

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if file.is_dir():
                adata = sc.read_10x_mtx(file, gex_only=True)
            else:
                adata = sc.read_10x_h5(file, gex_only=True)
    except Exception as err:
        msg = (
            f"Could not read the counts matrix {str(file)!r} ({type(err).__name__}: {err}); it is damaged or not a "
            "10x feature-barcode matrix. Copy it again from the Space Ranger output."
        )
        raise ValueError(msg) from err
    return _plain_counts(adata)


def _plain_counts(adata):
    """A fresh AnnData of the counts (CSR float32) and genes (``gene_ids``, ``feature_types``), obs indexed by barcode."""
    import anndata as ad
    from scipy import sparse

    x = adata.X
    x = sparse.csr_matrix(x, dtype=np.float32) if not sparse.issparse(x) else x.tocsr().astype(np.float32)
    var = pd.DataFrame(index=pd.Index(adata.var_names.astype(str)))
    for col in ("gene_ids", "feature_types", "genome"):
        if col in adata.var:
            var[col] = adata.var[col].astype(str).to_numpy()
    obs = pd.DataFrame(index=pd.Index(adata.obs_names.astype(str), name=None))
    out = ad.AnnData(x, obs=obs, var=var)
    out.var_names_make_unique()
    return out


def _read_positions(file: Path) -> pd.DataFrame:
    try:
        if file.suffix == ".parquet":
            frame = pd.read_parquet(file)
        else:
            frame = pd.read_csv(file, header=None)
            if "in_tissue" in [str(v) for v in frame.iloc[0].tolist()]:  # a header row
                frame = pd.read_csv(file)
            elif frame.shape[1] == 6:
                frame.columns = ["barcode", *_POSITION_COLUMNS]
    except Exception as err:
        msg = f"Could not read the positions file {str(file)!r} ({type(err).__name__}: {err}); copy it again."
        raise ValueError(msg) from err
    missing = [c for c in ["barcode", *_POSITION_COLUMNS] if c not in frame.columns]
    if missing:
        msg = (
            f"{str(file)!r} lacks the column(s) {missing} (it has {list(frame.columns)}); expected Space Ranger's "
            "barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres."
        )
        raise ValueError(msg)
    frame["barcode"] = frame["barcode"].astype(str)
    return frame.set_index("barcode")


def _join_positions(adata, positions: pd.DataFrame, file: Path) -> np.ndarray:
    missing = adata.obs_names.difference(positions.index)
    if len(missing):
        msg = (
            f"{len(missing)} of the {adata.n_obs} barcodes of the counts matrix have no row in {str(file)!r} "
            f"(e.g. {list(missing[:3])}). Are the matrix and the spatial/ folder from the same Space Ranger run?"
        )
        raise ValueError(msg)
    rows = positions.loc[adata.obs_names]
    for col in _POSITION_COLUMNS:
        adata.obs[col] = rows[col].to_numpy()
    return rows[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)


def _unreadable_folder(folder: Path, reader: str, err: Exception) -> ValueError:
    msg = (
        f"{reader} could not read {str(folder)!r} ({type(err).__name__}: {err}). Pass use_spatialdata_io=False to "
        "read the files that are there one by one."
    )
    return ValueError(msg)


# ------------------------------------------------------------------------------------------------- assembling


def assemble_units(adata, xy_px: np.ndarray, *, um_per_px: float, shapes_key: str, shape: str, size: float):
    """The shapes of the units (circles of diameter ``size`` or squares of side ``size`` µm) and their table.

    ``adata`` holds the counts, obs indexed by unit id, with ``in_tissue`` / ``array_row`` / ``array_col`` when
    known; ``xy_px`` the unit centres ``(x, y)`` in pixels of ``um_per_px`` µm. Returns ``(shapes, table)``.
    """
    import shapely
    from geopandas import GeoDataFrame

    xy = np.asarray(xy_px, dtype=np.float64) * float(um_per_px)
    if not np.isfinite(xy).all():
        bad = int((~np.isfinite(xy).all(axis=1)).sum())
        msg = f"{bad} of {len(xy)} units have no finite position; check the positions of the spots or bins."
        raise ValueError(msg)
    ids = adata.obs_names.astype(str)
    if shape == "circle":
        frame = GeoDataFrame(
            {"geometry": shapely.points(xy[:, 0], xy[:, 1]), "radius": np.full(len(xy), size / 2.0)},
            index=pd.Index(ids),
            geometry="geometry",
        )
        area = np.pi * (size / 2.0) ** 2
    else:
        half = size / 2.0
        boxes = shapely.box(xy[:, 0] - half, xy[:, 1] - half, xy[:, 0] + half, xy[:, 1] + half)
        frame = GeoDataFrame({"geometry": boxes}, index=pd.Index(ids), geometry="geometry")
        area = size * size
    shapes = shapes_element(frame)

    obs = adata.obs
    obs[INSTANCE_KEY] = ids.to_numpy()
    obs["in_tissue"] = obs["in_tissue"].astype(bool).to_numpy() if "in_tissue" in obs else np.ones(len(obs), bool)
    for col in ("array_row", "array_col"):
        if col in obs:
            obs[col] = obs[col].to_numpy().astype(np.int64)
    obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).ravel().astype(np.float32)
    obs["area_um2"] = np.full(len(obs), area, dtype=np.float64)
    adata.obsm["spatial"] = xy
    table = table_element(adata, annotates=shapes_key, instance_key=INSTANCE_KEY)
    return shapes, table


def _assemble(adata, xy_px, *, um_per_px, shapes_key, shape, size):
    from spatialdata import SpatialData

    shapes, table = assemble_units(adata, xy_px, um_per_px=um_per_px, shapes_key=shapes_key, shape=shape, size=size)
    return SpatialData(shapes={shapes_key: shapes}, tables={TABLE_KEY: table})


# ------------------------------------------------------------------------------------------------------ images


def _find_fullres(folder: Path, fullres_image_file, search) -> Path | None:
    if fullres_image_file is not None:
        file = Path(fullres_image_file).expanduser()
        if not file.is_absolute() and not file.exists():
            file = folder / file
        if not file.is_file():
            msg = f"fullres_image_file {str(fullres_image_file)!r} does not exist (looked at {str(file)!r})."
            raise FileNotFoundError(msg)
        return file
    for root in dict.fromkeys(search):
        for pattern in _FULLRES_PATTERNS:
            hits = sorted(
                p
                for p in root.glob(pattern)
                if p.is_file() and not p.name.startswith(".") and not any(w in p.name.lower() for w in _NOT_FULLRES)
            )
            if hits:
                return hits[0]
    return None


def _add_image(
    sdata,
    folder: Path,
    spatial: Path,
    *,
    image,
    fullres_image_file,
    um_per_px: float,
    scalefactors: dict,
    xy_um: np.ndarray,
    assumptions: list[str],
    search=None,
    fallback_spatial: Path | None = None,
) -> dict | None:
    """Read the chosen H&E into ``sdata`` as ``he_image`` in µm; return what was read (for the source record)."""
    from ._he import read_he_image

    if image is None:
        return None
    spatials = [s for s in (spatial, fallback_spatial) if s is not None and s.is_dir()]

    def downscaled(name: str, factor_key: str):
        file = next((s / name for s in spatials if (s / name).exists()), None)
        if file is None:
            return None
        factor = _scalefactor(scalefactors, factor_key, spatial / _SCALEFACTORS)
        return file, um_per_px / factor

    chosen = None
    kind = image
    if image == "full":
        file = _find_fullres(folder, fullres_image_file, search or (folder,))
        if file is not None:
            chosen = (file, um_per_px)
        else:
            for kind, name, key in (
                ("hires", _HIRES, "tissue_hires_scalef"),
                ("lowres", _LOWRES, "tissue_lowres_scalef"),
            ):
                chosen = downscaled(name, key)
                if chosen is not None:
                    logger.info("No full-resolution image in %s; he_image is the %s image.", folder, kind)
                    assumptions.append(f"he_image: no full-resolution image found, used the {kind} image")
                    break
    else:
        name, key = (_HIRES, "tissue_hires_scalef") if image == "hires" else (_LOWRES, "tissue_lowres_scalef")
        chosen = downscaled(name, key)
        if chosen is None:
            msg = (
                f"image={image!r} but there is no {name} in {[str(s) for s in spatials] or str(spatial)!r}. Choose "
                "another image, or image=None to read the counts and positions only."
            )
            raise FileNotFoundError(msg)
    if chosen is None:
        note = f"no H&E image in {str(folder)!r} (no full-resolution, hires or lowres image): no he_image"
        assumptions.append(note)
        warn_assumption(note, "Pass fullres_image_file= to read the microscope image")
        return None
    file, pixel_size = chosen
    with _large_images():
        read_he_image(file, pixel_size=pixel_size, key=HE_KEY, origin=(0.0, 0.0), sdata=sdata)
    _check_covers(sdata, xy_um, file, assumptions)
    return {"kind": kind, "file": str(file), "pixel_size": pixel_size}


@contextmanager
def _large_images():
    """Let Pillow open a whole microscope image (Visium JPEGs of 20k x 20k px exceed its decompression-bomb limit)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _check_covers(sdata, xy_um: np.ndarray, file: Path, assumptions: list[str]) -> None:
    """Warn when the image does not cover the units' centres (a wrong image or scale factors)."""
    from st2he._raster import Raster

    if not len(xy_um):
        return
    x0, y0, x1, y1 = Raster(sdata.images[HE_KEY], name=HE_KEY).bounds
    inside = (xy_um[:, 0] >= x0) & (xy_um[:, 0] <= x1) & (xy_um[:, 1] >= y0) & (xy_um[:, 1] <= y1)
    if inside.mean() < 0.95:
        note = (
            f"he_image from {file.name} spans x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f} µm but only "
            f"{inside.mean():.0%} of the spot or bin centres fall inside it"
        )
        assumptions.append(note)
        warn_assumption(note, "Check that the image is the one Space Ranger was run with (fullres_image_file=)")
