"""HEST-1k samples (mahmoodlab/HEST): spots in pixels of a whole-slide image, the image, and its metadata."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ._common import TABLE_KEY, check_folder, logger, set_source, shapes_element
from ._visium import HE_KEY, SPOTS_KEY, VISIUM_SPOT_DIAMETER, _plain_counts, assemble_units

CELLS_KEY = "cellvit"
#: ``st_technology`` values of HEST-1k whose units are squares (transcripts or 2 µm bins pooled by HEST).
_SQUARE_TECHNOLOGIES = ("xenium", "visium hd", "visium_hd", "visium-hd")
#: obs columns st2he derives itself (a column of the same name in the h5ad is replaced).
_DERIVED_OBS = ("instance_id", "region", "total_counts", "area_um2")


def read_hest(
    root: str | Path,
    sample_id: str | None = None,
    *,
    pixel_size: float | None = None,
    spot_diameter: float | None = None,
    image: bool = True,
    cells: bool = False,
):
    """Read one HEST-1k sample into a SpatialData object in micrometres.

    HEST-1k (``MahmoodLab/hest`` on Hugging Face) keeps each sample as files named by its id in folders of the
    download: ``st/<id>.h5ad`` (spots x genes, positions in pixels of the whole-slide image in
    ``obsm["spatial"]``), ``wsis/<id>.tif`` (pyramidal TIFF), ``metadata/<id>.json`` (pixel size, spot diameter,
    technology) and optionally ``cellvit_seg/<id>_cellvit_seg.parquet`` (or ``.geojson``; CellViT nuclei in
    pixels). The image is read lazily with its own pyramid (:func:`st2he.io.read_he_image`); a position of ``p``
    pixels lies at ``p x pixel_size`` µm, and pixel ``(row, col)`` of the image covers
    ``col <= x / pixel_size < col + 1``.

    Parameters
    ----------
    root
        The HEST-1k download folder (holding ``st/``, ``wsis/``, ``metadata/``), or the sample's ``st/<id>.h5ad``
        in it (then ``sample_id`` is its name).
    sample_id
        The sample's id (``"TENX95"``, ``"NCBI783"``, ...); may be left out when ``st/`` holds one sample.
    pixel_size
        µm per pixel of the whole-slide image. By default ``pixel_size_um_estimated`` of the metadata (the value
        HEST itself works with), else ``pixel_size_um_embedded``.
    spot_diameter
        Diameter (Visium, ST: circles) or side (Xenium, Visium HD pooled by HEST: squares) of a spot in µm. By
        default the metadata's ``spot_diameter``, else 55 µm for Visium, else ``spot_diameter_fullres`` of the
        h5ad's scale factors.
    image
        Read the whole-slide image as ``he_image`` (False: the spots and table only; the WSI need not be there).
    cells
        Also read the CellViT nuclei as shapes ``cellvit`` (polygons in µm).

    Returns
    -------
    A :class:`spatialdata.SpatialData` whose elements all map to ``"global"`` in µm: ``he_image`` (image, uint8
    ``r, g, b``), ``spots`` (shapes: circles of the spot diameter, or squares for pooled technologies, indexed by
    the h5ad's barcodes), ``table`` (counts as CSR float32, genes in ``var``; ``obs``: ``instance_id`` (the
    barcode), ``region``, ``in_tissue``, ``array_row`` / ``array_col`` when the h5ad has them,
    ``pxl_row_in_fullres`` / ``pxl_col_in_fullres`` and the h5ad's other obs columns, ``total_counts``,
    ``area_um2``; ``obsm["spatial"]`` spot centres in µm; annotating ``spots``) and, with ``cells=True``,
    ``cellvit`` (shapes).
    ``sdata.attrs["st2he"]["source"]`` records ``platform="hest"``, ``sample_id``, ``st_technology``,
    ``pixel_size`` (and where it came from), ``spot_diameter``, ``spot_shape`` and the files read.

    Examples
    --------
    >>> import st2he
    >>> sdata = st2he.io.read_hest("hest_data", "TENX95")  # doctest: +SKIP
    """
    given = Path(root).expanduser()
    if given.is_file() and given.suffix == ".h5ad" and given.parent.name == "st":
        if sample_id is not None and str(sample_id) != given.stem:
            msg = f"sample_id={sample_id!r} but the file given is sample {given.stem!r}; pass one or the other."
            raise ValueError(msg)
        root, sample_id = given.parent.parent, given.stem
    folder = check_folder(root, "HEST")
    st_dir = folder / "st"
    sample_id = _sample_id(folder, st_dir, sample_id)
    st_file = st_dir / f"{sample_id}.h5ad"
    meta_file = folder / "metadata" / f"{sample_id}.json"
    wsi_file = folder / "wsis" / f"{sample_id}.tif"

    meta = _read_metadata(meta_file, required=pixel_size is None)
    pixel_size, pixel_how = _pixel_size(pixel_size, meta, meta_file)
    adata_file = _read_h5ad(st_file)
    xy_px = _positions(adata_file, st_file)
    technology = str(meta.get("st_technology") or "").strip()
    shape = "square" if technology.lower() in _SQUARE_TECHNOLOGIES else "circle"
    diameter, diameter_how = _spot_diameter(spot_diameter, meta, adata_file, technology, pixel_size, meta_file)

    adata = _plain_counts(adata_file)
    for col in adata_file.obs.columns:  # HEST's spot columns (in_tissue, array_row, pxl_*, ...) and any others
        if col not in _DERIVED_OBS:
            adata.obs[str(col)] = adata_file.obs[col].to_numpy()

    from spatialdata import SpatialData

    spots, table = assemble_units(adata, xy_px, um_per_px=pixel_size, shapes_key=SPOTS_KEY, shape=shape, size=diameter)
    sdata = SpatialData(shapes={SPOTS_KEY: spots}, tables={TABLE_KEY: table})
    files = {"st": str(st_file), "metadata": str(meta_file) if meta_file.exists() else None}
    if image:
        if not wsi_file.exists():
            msg = (
                f"No whole-slide image for HEST sample {sample_id!r}: {str(wsi_file)!r} does not exist. Download the "
                "sample's wsis/ file, or pass image=False to read the spots and counts only."
            )
            raise FileNotFoundError(msg)
        from ._he import read_he_image

        read_he_image(wsi_file, pixel_size=pixel_size, key=HE_KEY, origin=(0.0, 0.0), sdata=sdata)
        files["wsi"] = str(wsi_file)
    if cells:
        cells_file = _cells_file(folder, sample_id)
        sdata.shapes[CELLS_KEY] = _read_cells(cells_file, pixel_size)
        files["cells"] = str(cells_file)
    set_source(
        sdata,
        {
            "platform": "hest",
            "path": str(folder),
            "sample_id": sample_id,
            "st_technology": technology or None,
            "pixel_size": pixel_size,
            "pixel_size_from": pixel_how,
            "spot_diameter": diameter,
            "spot_diameter_from": diameter_how,
            "spot_shape": shape,
            "files": files,
            "metadata": meta,
        },
        used=[Path(f) for f in files.values() if f],
    )
    logger.info("HEST %s: %d spots, %.4g µm per pixel (%s)", sample_id, table.n_obs, pixel_size, pixel_how)
    return sdata


def _sample_id(folder: Path, st_dir: Path, sample_id: str | None) -> str:
    if not st_dir.is_dir():
        msg = (
            f"{str(folder)!r} has no st/ folder; read_hest expects the HEST-1k download folder that holds st/, wsis/ "
            "and metadata/."
        )
        raise FileNotFoundError(msg)
    ids = sorted(p.stem for p in st_dir.glob("*.h5ad") if not p.name.startswith("."))
    if sample_id is None:
        if len(ids) == 1:
            return ids[0]
        msg = (
            f"{str(st_dir)!r} holds {len(ids)} samples ({_listing(ids)}); name one with sample_id=."
            if ids
            else f"{str(st_dir)!r} holds no <id>.h5ad file. Download a sample first."
        )
        raise (ValueError if ids else FileNotFoundError)(msg)
    sample_id = str(sample_id)
    if sample_id not in ids:
        msg = (
            f"No HEST sample {sample_id!r} in {str(folder)!r}: {str(st_dir / (sample_id + '.h5ad'))!r} does not "
            f"exist. The folder holds {_listing(ids) if ids else 'no sample'}."
        )
        raise FileNotFoundError(msg)
    return sample_id


def _listing(ids: list[str], n: int = 10) -> str:
    return ", ".join(ids[:n]) + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def _read_metadata(file: Path, *, required: bool) -> dict:
    if not file.exists():
        if required:
            msg = (
                f"No metadata for this HEST sample: {str(file)!r} does not exist, and st2he needs its pixel size "
                "(pixel_size_um_estimated). Download the sample's metadata/ file, or pass pixel_size= (µm per pixel)."
            )
            raise FileNotFoundError(msg)
        return {}
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"Could not read {str(file)!r} ({err}); it should be HEST's JSON metadata. Download it again."
        raise ValueError(msg) from err
    if not isinstance(meta, dict):
        msg = f"{str(file)!r} is not a JSON object; expected HEST's metadata of one sample."
        raise ValueError(msg)
    return meta


def _positive(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _pixel_size(given, meta: dict, file: Path) -> tuple[float, str]:
    if given is not None:
        value = _positive(given)
        if value is None:
            msg = f"pixel_size must be a positive number of µm per pixel, got {given!r}."
            raise ValueError(msg)
        return value, "given"
    for key in ("pixel_size_um_estimated", "pixel_size_um_embedded"):
        value = _positive(meta.get(key))
        if value is not None:
            return value, key
    msg = (
        f"{str(file)!r} gives no pixel size (neither 'pixel_size_um_estimated' nor 'pixel_size_um_embedded'); pass "
        "pixel_size= (µm per pixel of the whole-slide image)."
    )
    raise ValueError(msg)


def _read_h5ad(file: Path):
    import anndata as ad

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ad.read_h5ad(file)
    except Exception as err:
        msg = f"Could not read {str(file)!r} ({type(err).__name__}: {err}); the file is damaged. Download it again."
        raise ValueError(msg) from err


def _positions(adata, file: Path) -> np.ndarray:
    if "spatial" in adata.obsm and np.asarray(adata.obsm["spatial"]).shape == (adata.n_obs, 2):
        return np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(adata.obs.columns):
        return adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    msg = (
        f"{str(file)!r} has no spot positions: neither obsm['spatial'] (x, y in pixels of the whole-slide image) nor "
        "obs columns pxl_col_in_fullres / pxl_row_in_fullres."
    )
    raise ValueError(msg)


def _spot_diameter(given, meta: dict, adata, technology: str, pixel_size: float, file: Path) -> tuple[float, str]:
    if given is not None:
        value = _positive(given)
        if value is None:
            msg = f"spot_diameter must be a positive number of µm, got {given!r}."
            raise ValueError(msg)
        return value, "given"
    value = _positive(meta.get("spot_diameter"))
    if value is not None:
        return value, "metadata spot_diameter"
    if technology.lower() == "visium":
        return VISIUM_SPOT_DIAMETER, "Visium"
    for library in dict(adata.uns.get("spatial", {}) or {}).values():
        factors = dict(library.get("scalefactors", {}) or {}) if isinstance(library, dict) else {}
        value = _positive(factors.get("spot_diameter_fullres"))
        if value is not None:
            return value * pixel_size, "h5ad scalefactors spot_diameter_fullres"
    msg = (
        f"The spot diameter of this HEST sample is unknown: {str(file)!r} has no 'spot_diameter' and the h5ad no "
        "spot_diameter_fullres. Pass spot_diameter= in µm."
    )
    raise ValueError(msg)


def _cells_file(folder: Path, sample_id: str) -> Path:
    for name in (f"{sample_id}_cellvit_seg.parquet", f"{sample_id}_cellvit_seg.geojson"):
        file = folder / "cellvit_seg" / name
        if file.exists():
            return file
    msg = (
        f"cells=True but there is no CellViT segmentation for {sample_id!r}: expected cellvit_seg/{sample_id}"
        f"_cellvit_seg.parquet (or .geojson) in {str(folder)!r}. Download it, or pass cells=False."
    )
    raise FileNotFoundError(msg)


def _read_cells(file: Path, pixel_size: float):
    import geopandas as gpd

    try:
        frame = gpd.read_parquet(file) if file.suffix == ".parquet" else gpd.read_file(file)
    except Exception as err:
        msg = f"Could not read the cell segmentation {str(file)!r} ({type(err).__name__}: {err}); download it again."
        raise ValueError(msg) from err
    frame = frame[~frame.geometry.is_empty & frame.geometry.notna()].copy()
    frame = gpd.GeoDataFrame(
        frame.drop(columns=frame.geometry.name), geometry=frame.geometry.scale(pixel_size, pixel_size, origin=(0, 0))
    )
    frame.index = pd.Index(frame.index.astype(str))
    return shapes_element(frame)
