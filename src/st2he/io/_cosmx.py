"""NanoString (Bruker) CosMx SMI flat-file exports, full or partial."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ._common import (
    CELL_BOUNDARIES_KEY,
    TABLE_KEY,
    TRANSCRIPTS_KEY,
    all_to_microns,
    build_transcripts,
    check_folder,
    control_mask,
    find_file,
    polygons_from_vertices,
    quiet_spatialdata_io,
    read_table,
    scale_matrix,
    set_source,
    shapes_element,
    table_element,
    warn_assumption,
)

#: µm per pixel of current CosMx instruments (early runs: 0.18).
COSMX_PIXEL_SIZE = 0.12028

_SUFFIXES = {
    "transcripts": "_tx_file",
    "counts": "_exprMat_file",
    "metadata": "_metadata_file",
    "fov_positions": "_fov_positions_file",
    "polygons": "-polygons",
}
_EXTENSIONS = (".csv", ".csv.gz", ".parquet")


def read_cosmx(
    path: str | Path,
    *,
    pixel_size: float = COSMX_PIXEL_SIZE,
    dataset_id: str | None = None,
    use_spatialdata_io: bool | None = None,
):
    """Read a CosMx SMI flat-file export into a SpatialData object in micrometres.

    The molecules are placed by their global pixel columns (``x_global_px``, ``y_global_px``) times
    ``pixel_size``, so the FOV positions are not needed for them. Cell polygons (``*-polygons.csv``) are placed
    the same way, so molecules and polygons line up; the axes are kept as exported (µm = global px x
    ``pixel_size``, row = y, no flip), which is also how :func:`spatialdata_io.cosmx` orients the FOV images.
    When the folder is a full export (``*_fov_positions_file.csv`` plus the ``CellComposite`` and ``CellLabels``
    folders) the per-FOV images and segmentation labels are read with :func:`spatialdata_io.cosmx` and scaled to
    µm. Nothing is filtered: ``NegPrb*``, ``FalseCode*`` and ``SystemControl*`` are marked in ``is_control``.

    Parameters
    ----------
    path
        The folder of the flat files (``<dataset_id>_tx_file.csv``, ``_exprMat_file.csv``, ``_metadata_file.csv``,
        ``-polygons.csv``, ...).
    pixel_size
        µm per CosMx pixel: 0.12028 on current instruments, 0.18 on early ones.
    dataset_id
        The files' common prefix; needed only when the folder holds several exports.
    use_spatialdata_io
        Force (True) or forbid (False) reading the FOV images and labels through :func:`spatialdata_io.cosmx`; by
        default it is used when the folder is a full export.

    Returns
    -------
    A :class:`spatialdata.SpatialData` whose elements all map to the coordinate system ``"global"`` in µm:

    ``transcripts`` (points)
        One row per molecule of ``*_tx_file.csv``: ``x``, ``y`` (µm), ``gene`` (categorical, the feature key,
        from ``target``), ``qv`` (NaN: the flat files carry none), ``is_control``, and all other columns (``fov``,
        ``cell_ID``, ``x_global_px``, ``y_global_px``, ``x_local_px``, ``y_local_px``, ``CellComp``, ...); the
        z slice ``z`` is renamed ``z_index`` (it is an index, not µm).
    ``cell_boundaries`` (shapes)
        Cell polygons in µm from ``*-polygons.csv``, indexed by ``"<cell_ID>_<fov>"``.
    ``table`` (table)
        Cells x targets from ``*_exprMat_file.csv`` (background ``cell_ID`` 0 left out; all targets, with
        ``var["is_control"]``), ``*_metadata_file.csv`` in ``obs``, centres in µm in ``obsm["spatial"]``;
        ``obs["cell"]`` (``"<cell_ID>_<fov>"``) links it to ``cell_boundaries``.
    ``<fov>_image``, ``<fov>_labels`` (images, labels)
        Per-FOV composite images and segmentation masks of a full export.

    ``sdata.attrs["st2he"]["source"]`` records ``platform="cosmx"``, ``native_pixel_size`` (= ``pixel_size``),
    ``path``, ``dataset_id``, ``reader`` and ``assumptions``. CosMx exports carry no nuclear stain image that st2he
    reads, so ``nuclear_stain`` is None: :mod:`st2he.pp` draws nuclei from the boundaries instead.

    Examples
    --------
    >>> import st2he
    >>> sdata = st2he.io.read_cosmx("shared/data/cosmx_mouse_brain_quarter")  # doctest: +SKIP
    >>> sdata = st2he.io.read_cosmx("early_run", pixel_size=0.18)  # doctest: +SKIP
    """
    folder = check_folder(path, "CosMx")
    if not (np.isfinite(pixel_size) and pixel_size > 0):
        msg = f"pixel_size must be a positive number of µm per CosMx pixel (0.12028 or 0.18), got {pixel_size!r}."
        raise ValueError(msg)
    dataset_id = _dataset_id(folder, dataset_id)
    files = {kind: _file(folder, dataset_id, suffix) for kind, suffix in _SUFFIXES.items()}
    full = files["fov_positions"] is not None and (folder / "CellComposite").is_dir()
    full = full and (folder / "CellLabels").is_dir() and files["counts"] is not None and files["metadata"] is not None
    if use_spatialdata_io is None:
        use_spatialdata_io = full
    elif use_spatialdata_io and not full:
        msg = (
            f"use_spatialdata_io=True needs a full CosMx export in {str(folder)!r} (the _exprMat_file, "
            "_metadata_file and _fov_positions_file tables and the CellComposite and CellLabels folders). Leave "
            "use_spatialdata_io=None to read the files that are there."
        )
        raise FileNotFoundError(msg)

    transcripts = _read_transcripts(files["transcripts"], pixel_size)
    from spatialdata import SpatialData

    images, labels, shapes, tables = {}, {}, {}, {}
    reader = "st2he (partial folder)"
    table = None
    if use_spatialdata_io:
        images, labels, table = _read_full(folder, dataset_id, pixel_size)  # its table annotates the FOV labels
        reader = "spatialdata_io.cosmx"
    if files["polygons"] is not None:
        shapes[CELL_BOUNDARIES_KEY] = _read_polygons(files["polygons"], pixel_size)
    if table is None or CELL_BOUNDARIES_KEY in shapes:
        table = _read_cell_table(
            files["counts"],
            files["metadata"],
            pixel_size,
            annotates=CELL_BOUNDARIES_KEY if CELL_BOUNDARIES_KEY in shapes else None,
        )
    if table is not None:
        tables[TABLE_KEY] = table
    sdata = SpatialData(images=images, labels=labels, shapes=shapes, tables=tables)
    sdata[TRANSCRIPTS_KEY] = transcripts
    set_source(
        sdata,
        {
            "platform": "cosmx",
            "native_pixel_size": float(pixel_size),
            "path": str(folder),
            "dataset_id": dataset_id,
            "transcripts_file": files["transcripts"].name,
            "reader": reader,
            "image_pixel_size": None,
            "image_origin": None,
            "nuclear_stain": None,
            "assumptions": [],
        },
    )
    return sdata


def _dataset_id(folder: Path, dataset_id: str | None) -> str:
    hits = sorted(p.name for p in folder.iterdir() if re.search(r"_tx_file\.(csv|csv\.gz|parquet)$", p.name))
    ids = sorted({re.sub(r"_tx_file\.(csv|csv\.gz|parquet)$", "", h) for h in hits})
    if dataset_id is not None:
        if dataset_id not in ids:
            msg = (
                f"No transcripts table {dataset_id}_tx_file.csv in {str(folder)!r} (found {hits or 'none'}). "
                "Check dataset_id."
            )
            raise FileNotFoundError(msg)
        return dataset_id
    if not ids:
        msg = (
            f"No transcripts table in {str(folder)!r}: expected a CosMx flat file named <dataset_id>_tx_file.csv "
            "(or .csv.gz). Pass the folder of the CosMx flat-file export."
        )
        raise FileNotFoundError(msg)
    if len(ids) > 1:
        msg = f"{str(folder)!r} holds several CosMx exports {ids}; choose one with dataset_id=."
        raise ValueError(msg)
    return ids[0]


def _file(folder: Path, dataset_id: str, suffix: str) -> Path | None:
    return find_file(folder, [f"{dataset_id}{suffix}{ext}" for ext in _EXTENSIONS])


def _read_transcripts(file: Path, pixel_size: float):
    table = read_table(
        file,
        required=("target", "x_global_px", "y_global_px"),
        dtype={"target": "object", "CellComp": "object", "cell": "object"},
    )
    return build_transcripts(
        table,
        file=file,
        platform="cosmx",
        gene="target",
        x="x_global_px",
        y="y_global_px",
        scale=pixel_size,
        rename={"z": "z_index"},
        keep_raw_xy=True,
    )


def _read_polygons(file: Path, pixel_size: float):
    table = read_table(file, lazy=False)
    cell_col = next((c for c in ("cellID", "cell_ID", "cell_id") if c in table.columns), None)
    missing = [c for c in ("fov", "x_global_px", "y_global_px") if c not in table.columns]
    if cell_col is None or missing:
        msg = (
            f"{str(file)!r} lacks the columns fov, cellID, x_global_px and y_global_px that a CosMx polygons file has "
            f"(it has {list(table.columns)})."
        )
        raise ValueError(msg)
    table["__cell_id"] = table[cell_col].astype(str) + "_" + table["fov"].astype(str)
    frame = polygons_from_vertices(
        table, id_col="__cell_id", x="x_global_px", y="y_global_px", scale=pixel_size, file=file
    )
    first = table.groupby("__cell_id", sort=False)[["fov", cell_col]].first()
    frame["fov"] = first["fov"].reindex(frame.index).to_numpy()
    frame["cell_ID"] = first[cell_col].reindex(frame.index).to_numpy()
    frame.index.name = "cell"
    return shapes_element(frame)


def _cell_index(frame: pd.DataFrame) -> pd.Index:
    return pd.Index(frame["cell_ID"].astype(str) + "_" + frame["fov"].astype(str))


def _read_cell_table(counts_file: Path | None, metadata_file: Path | None, pixel_size: float, *, annotates):
    import anndata as ad
    from scipy.sparse import csr_matrix

    if counts_file is None:
        return None
    counts = read_table(counts_file, required=("fov", "cell_ID"), lazy=False)
    counts = counts[counts["cell_ID"] != 0]  # cell 0 collects the molecules outside every cell
    counts.index = _cell_index(counts)
    genes = [c for c in counts.columns if c not in ("fov", "cell_ID", "cell")]
    if metadata_file is not None:
        obs = read_table(metadata_file, required=("fov", "cell_ID"), lazy=False)
        obs.index = _cell_index(obs)
        common = obs.index.intersection(counts.index, sort=False)
        if len(common) < len(counts):
            note = f"{len(counts) - len(common)} cells of {counts_file.name} have no row in {metadata_file.name}"
            warn_assumption(note + "; they were left out of the table", "Check that the two files are of one export.")
        obs, counts = obs.loc[common], counts.loc[common]
    else:
        obs = counts[["fov", "cell_ID"]].copy()
    adata = ad.AnnData(
        csr_matrix(counts[genes].to_numpy(np.float32)), obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str))
    )
    if "cell" in adata.obs.columns:  # newer exports have their own cell names; ours link to the polygons
        adata.obs = adata.obs.rename(columns={"cell": "cell_export"})
    adata.obs["cell"] = adata.obs_names.to_numpy()
    if {"CenterX_global_px", "CenterY_global_px"} <= set(obs.columns):
        adata.obsm["spatial"] = obs[["CenterX_global_px", "CenterY_global_px"]].to_numpy(np.float64) * pixel_size
    adata.var["is_control"] = control_mask(adata.var_names, "cosmx")
    return table_element(adata, annotates=annotates, instance_key="cell")


def _read_full(folder: Path, dataset_id: str, pixel_size: float):
    from spatialdata_io import cosmx

    with quiet_spatialdata_io():
        sdata_io = cosmx(folder, dataset_id=dataset_id, transcripts=False)
    to_um = scale_matrix(pixel_size)  # spatialdata-io's "global" is CosMx global pixels
    images = all_to_microns(sdata_io.images, to_um)
    labels = all_to_microns(sdata_io.labels, to_um)
    table = sdata_io.tables.get(TABLE_KEY)
    if table is not None:
        table.var["is_control"] = control_mask(table.var_names, "cosmx")
        if "global" in table.obsm:
            table.obsm["spatial"] = np.asarray(table.obsm.pop("global"), dtype=np.float64) * pixel_size
    return images, labels, table
