"""NanoString (Bruker) CosMx SMI flat-file exports, full or partial."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._common import (
    CELL_BOUNDARIES_KEY,
    TABLE_KEY,
    TRANSCRIPTS_KEY,
    all_to_microns,
    build_transcripts,
    check_folder,
    check_tiff_complete,
    control_mask,
    find_file,
    image_element,
    labels_element,
    logger,
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

MORPHOLOGY_KEY = "morphology"
COMPOSITE_KEY = "cell_composite"
CELL_LABELS_KEY = "cell_labels"
#: The cell ``cell_ID`` of FOV ``fov`` has the label ``fov * LABEL_FACTOR + cell_ID`` in ``cell_labels``.
LABEL_FACTOR = 100_000
#: The picture folders of a CosMx export (read or not), whose files the files report lists one by one.
COSMX_SUBFOLDERS = ("Morphology2D", "CellComposite", "CellLabels", "CellOverlay", "CompartmentLabels")
#: The order of the Morphology2D channels (TIFF pages) when the export does not say; ``U`` is the DAPI channel.
MORPHOLOGY_ORDER = "BGYRU"
_PICTURE_DIRS = (("morphology", "Morphology2D"), ("composite", "CellComposite"), ("labels", "CellLabels"))
_FOV_FILE = re.compile(r"_F(\d+)\.(tif|tiff|jpg|jpeg|png)$", re.IGNORECASE)
_CHANNEL_DICTIONARY = "Morphology_ChannelID_Dictionary.txt"
#: Local and global pixels that disagree by more than this (px) place a FOV elsewhere than its positions file.
_PLACEMENT_TOLERANCE = 1.0
#: Rows and columns of one block of a stitched picture (each block reads only the FOV windows under it).
_BLOCK = 2048


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
    ``pixel_size``, row = y, no flip).

    The per-FOV pictures are stitched, lazily, into one element each, in µm: ``Morphology2D/*_F001.TIF`` (the
    multi-channel morphology stains, with ``DAPI``), ``CellComposite/*_F001.jpg`` (the RGB composite) and
    ``CellLabels/*_F001.tif`` (the cell segmentation). A FOV is placed by ``*_fov_positions_file.csv``
    (``x_global_px``/``y_global_px``, or ``X_mm``/``Y_mm`` in mm): its local pixel ``(x_local_px, y_local_px)``
    lies at global pixel ``(x + x_local_px, y + y_local_px)``, and the picture files store local y from the
    bottom up (file row ``r`` holds ``y_local_px`` in ``[H - 1 - r, H - r)`` for a FOV of ``H`` rows), as
    :func:`spatialdata_io.cosmx` reads them too. That convention is checked, not assumed: the CellLabels of the
    FOVs with the most cells are read and the cell centres of the metadata must fall on their own cell; if they do
    when the files are read another way (some AtoMx exports, 1.3.2 and later, store the pictures turned by 180
    degrees against the molecules), every picture is read that way, with a warning, and the finding is recorded in
    ``sdata.attrs["st2he"]["source"]["fovs"]["orientation"]``. Where the export's cell metadata (or molecules)
    give local and global pixels, they are checked against the positions file; a FOV they place elsewhere (a
    shifted positions file, local y counted the other way) is placed as they say, with a warning. Without a
    positions file the FOVs are placed by those columns alone. Where FOVs overlap, the higher FOV number's pixels are
    kept. Each piece that is missing (a folder, a FOV's file, the positions) is reported in
    ``sdata.attrs["st2he"]["source"]["assumptions"]`` and leaves out only what needs it. Nothing is filtered:
    ``NegPrb*``, ``FalseCode*`` and ``SystemControl*`` are marked in ``is_control``.

    Parameters
    ----------
    path
        The folder of the flat files (``<dataset_id>_tx_file.csv``, ``_exprMat_file.csv``, ``_metadata_file.csv``,
        ``_fov_positions_file.csv``, ``-polygons.csv``, and the ``Morphology2D``, ``CellComposite`` and
        ``CellLabels`` folders).
    pixel_size
        µm per CosMx pixel: 0.12028 on current instruments, 0.18 on early ones. The FOV pictures have the same
        pixels.
    dataset_id
        The files' common prefix; needed only when the folder holds several exports.
    use_spatialdata_io
        True: read the FOV pictures and labels of a full export (``_exprMat_file``, ``_metadata_file``,
        ``_fov_positions_file``, ``CellComposite``, ``CellLabels``) with :func:`spatialdata_io.cosmx` instead, as
        one image and one labels element per FOV (``<fov>_image``, ``<fov>_labels``) placed by its own
        alignment; ``Morphology2D`` is then not read. By default (None or False) st2he stitches them itself,
        with tifffile and pandas only.

    Returns
    -------
    A :class:`spatialdata.SpatialData` whose elements all map to the coordinate system ``"global"`` in µm:

    ``transcripts`` (points)
        One row per molecule of ``*_tx_file.csv``: ``x``, ``y`` (µm), ``gene`` (categorical, the feature key,
        from ``target``), ``qv`` (NaN: the flat files carry none), ``is_control``, and all other columns (``fov``,
        ``cell_ID``, ``x_global_px``, ``y_global_px``, ``x_local_px``, ``y_local_px``, ``CellComp``, ...); the
        z slice ``z`` is renamed ``z_index`` (it is an index, not µm).
    ``morphology`` (image)
        The stitched ``Morphology2D`` stains (uint16), one channel per stain, named by the biological target
        the files' metadata give (``Morphology_ChannelID_Dictionary.txt`` or the TIFF description), else
        ``Channel-B``, ``Channel-G``, ...; the DAPI channel (CosMx's ``U`` channel, whatever target name the
        export gives it) is named ``"DAPI"``, so :func:`st2he.pp.rasterize_transcripts` takes it as the nuclear
        stain. Without channel metadata, five channels are taken in CosMx's order ``B, G, Y, R, U``.
    ``cell_composite`` (image)
        The stitched ``CellComposite`` pictures (uint8, channels ``r, g, b``; never taken as the nuclear stain).
    ``cell_labels`` (labels)
        The stitched ``CellLabels``: the cell of ``cell_ID`` in FOV ``fov`` has the label
        ``fov * 100000 + cell_ID`` (0 is the background; the factor grows to the next power of ten above the
        largest ``cell_ID`` if one reaches 100000), so labels are unique across FOVs.
    ``cell_boundaries`` (shapes)
        Cell polygons in µm from ``*-polygons.csv``, indexed by ``"<cell_ID>_<fov>"``.
    ``table`` (table)
        Cells x targets from ``*_exprMat_file.csv`` (background ``cell_ID`` 0 left out; all targets, with
        ``var["is_control"]``), ``*_metadata_file.csv`` in ``obs``, centres in µm in ``obsm["spatial"]``;
        ``obs["cell"]`` (``"<cell_ID>_<fov>"``) links it to ``cell_boundaries``, and ``obs["label"]`` to
        ``cell_labels`` (the table annotates ``cell_boundaries`` when there are polygons, else ``cell_labels``).
    ``<fov>_image``, ``<fov>_labels`` (images, labels)
        Only with ``use_spatialdata_io=True``: per-FOV composite images and segmentation masks.

    ``sdata.attrs["st2he"]["source"]`` records ``platform="cosmx"``, ``native_pixel_size`` (= ``pixel_size``),
    ``path``, ``dataset_id``, ``reader``, ``nuclear_stain`` (``"morphology"`` with ``nuclear_stain_channel``
    ``"DAPI"`` when the DAPI channel is known, else None), ``image_pixel_size`` and ``image_origin`` (µm) of
    the stitched pictures, ``fovs`` (how many were placed, by what), ``cell_labels`` (the label formula and
    its factor) and ``assumptions``; ``sdata.attrs["st2he"]["files"]`` lists the files used and ignored.

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
    if use_spatialdata_io and not full:
        msg = (
            f"use_spatialdata_io=True needs a full CosMx export in {str(folder)!r} (the _exprMat_file, "
            "_metadata_file and _fov_positions_file tables and the CellComposite and CellLabels folders). Leave "
            "use_spatialdata_io=None to read the files that are there."
        )
        raise FileNotFoundError(msg)

    transcripts = _read_transcripts(files["transcripts"], pixel_size)
    from spatialdata import SpatialData

    images, labels, shapes, tables = {}, {}, {}, {}
    assumptions: list[str] = []
    used: list[Path] = [files["transcripts"]]
    table = None
    pictures = _Pictures()
    if use_spatialdata_io:
        images, labels, table = _read_full(folder, dataset_id, pixel_size)  # its table annotates the FOV labels
        used += [files["counts"], files["metadata"], files["fov_positions"], folder / "CellComposite"]
        used.append(folder / "CellLabels")
        reader = "spatialdata_io.cosmx"
    else:
        pictures = _read_pictures(folder, files, transcripts, pixel_size, assumptions, used)
        images, labels = pictures.images, pictures.labels
        reader = "st2he" if pictures.images or pictures.labels else "st2he (partial folder)"
    if files["polygons"] is not None:
        shapes[CELL_BOUNDARIES_KEY] = _read_polygons(files["polygons"], pixel_size)
        used.append(files["polygons"])
    if table is None or CELL_BOUNDARIES_KEY in shapes:
        annotates, instance_key = None, "cell"
        if CELL_BOUNDARIES_KEY in shapes:
            annotates = CELL_BOUNDARIES_KEY
        elif CELL_LABELS_KEY in labels:
            annotates, instance_key = CELL_LABELS_KEY, "label"
        table = _read_cell_table(
            files["counts"],
            files["metadata"],
            pixel_size,
            annotates=annotates,
            instance_key=instance_key,
            label_factor=pictures.label_factor,
        )
        used += [f for f in (files["counts"], files["metadata"]) if f is not None]
        if table is not None and CELL_LABELS_KEY in labels:
            _check_cells_have_labels(table, pictures, assumptions)
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
            "image_pixel_size": pictures.pixel_size,
            "image_origin": pictures.origin,
            "nuclear_stain": pictures.nuclear_stain,
            "nuclear_stain_channel": pictures.nuclear_channel,
            "fovs": pictures.fovs,
            "cell_labels": pictures.label_info,
            "assumptions": assumptions,
        },
        used=used,
        subfolders=COSMX_SUBFOLDERS,
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


def _read_cell_table(
    counts_file: Path | None,
    metadata_file: Path | None,
    pixel_size: float,
    *,
    annotates,
    instance_key: str = "cell",
    label_factor: int | None = None,
):
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
    if label_factor is not None:  # the cell's label in the stitched cell_labels
        fov = pd.to_numeric(adata.obs["fov"]).to_numpy(np.int64)
        adata.obs["label"] = fov * label_factor + pd.to_numeric(adata.obs["cell_ID"]).to_numpy(np.int64)
    if {"CenterX_global_px", "CenterY_global_px"} <= set(obs.columns):
        adata.obsm["spatial"] = obs[["CenterX_global_px", "CenterY_global_px"]].to_numpy(np.float64) * pixel_size
    adata.var["is_control"] = control_mask(adata.var_names, "cosmx")
    return table_element(adata, annotates=annotates, instance_key=instance_key)


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


# ------------------------------------------------------------------------------------------- per-FOV pictures


@dataclass
class _Pictures:
    """The stitched pictures of an export and what the reader records about them."""

    images: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    pixel_size: float | None = None
    origin: list[float] | None = None
    nuclear_stain: str | None = None
    nuclear_channel: str | None = None
    fovs: dict | None = None
    label_factor: int | None = None
    label_info: dict | None = None
    label_fovs: set = field(default_factory=set)


@dataclass(frozen=True)
class _Layout:
    """Where the pixels of one FOV file are: its axes (tifffile's letters, or ``"YXS"`` for a JPEG/PNG)."""

    axes: str
    channels: int
    height: int
    width: int
    dtype: str
    picture: bool  # JPEG/PNG (decoded whole) rather than TIFF (read by windows)


def _read_pictures(folder: Path, files, transcripts, pixel_size: float, assumptions: list[str], used: list[Path]):
    """Stitch the Morphology2D, CellComposite and CellLabels pictures of the FOVs into one element each."""
    found: dict[str, dict[int, Path]] = {}
    for kind, name in _PICTURE_DIRS:
        directory = folder / name
        if not directory.is_dir():
            continue
        fov_files = _fov_files(directory)
        if fov_files:
            found[kind] = fov_files
        else:
            _note(assumptions, f"{name}/ holds no per-FOV picture (<name>_F001.TIF, ...): nothing read from it")
    out = _Pictures()
    if not found:
        return out

    layouts: dict[str, dict[int, _Layout]] = {}
    for kind, fov_files in found.items():
        layouts[kind] = {}
        for fov, file in fov_files.items():
            try:
                layouts[kind][fov] = _layout(file)
            except Exception as err:  # one damaged FOV file costs that FOV, not the run
                _note(assumptions, f"{file.parent.name}/{file.name} could not be read ({err}); FOV {fov} left out")
    fovs = sorted({fov for per_kind in layouts.values() for fov in per_kind})
    cells = _cell_centres(files)
    placements, how, listed = _fov_placements(files, cells, transcripts, pixel_size, fovs, assumptions, used)
    out.fovs = how
    if not placements:
        return out

    bottom_up, reversed_x, out.fovs["orientation"] = _file_orientation(found, layouts, cells, placements, assumptions)
    tiles: dict[str, list[tuple]] = {}
    for kind, per_kind in layouts.items():
        tiles[kind] = []
        for fov, layout in sorted(per_kind.items()):
            if fov not in placements:
                continue
            x, y, sign = placements[fov]
            top = y if sign > 0 else y - layout.height  # local y runs with global y, or against it
            flip_rows = (sign > 0) == bottom_up  # the file's rows run against the placed rows
            tiles[kind].append((fov, str(found[kind][fov]), top, x, layout, flip_rows, reversed_x))
    corners = [(t[3], t[2]) for per_kind in tiles.values() for t in per_kind]
    if not corners:
        return out
    ox, oy = min(c[0] for c in corners), min(c[1] for c in corners)
    out.pixel_size, out.origin = float(pixel_size), [ox * pixel_size, oy * pixel_size]

    if tiles.get("morphology"):
        per_kind = _same_channels(tiles["morphology"], "Morphology2D", assumptions)
        first = found["morphology"][per_kind[0][0]]
        names, dapi = _morphology_channels(folder, first, per_kind[0][4].channels, assumptions, used)
        data, grid = _stitch(per_kind, ox, oy, pixel_size, channels=len(names))
        out.images[MORPHOLOGY_KEY] = image_element(data, grid, names)
        if dapi is not None:
            out.nuclear_stain, out.nuclear_channel = MORPHOLOGY_KEY, names[dapi]
        used += [found["morphology"][t[0]] for t in per_kind]
    if tiles.get("composite"):
        per_kind = _same_channels(tiles["composite"], "CellComposite", assumptions)
        n = per_kind[0][4].channels
        names = ["r", "g", "b"] if n == 3 else ["r", "g", "b", "a"] if n == 4 else [f"c{i}" for i in range(n)]
        data, grid = _stitch(per_kind, ox, oy, pixel_size, channels=n)
        out.images[COMPOSITE_KEY] = image_element(data, grid, names)
        used += [found["composite"][t[0]] for t in per_kind]
    if tiles.get("labels"):
        per_kind = tiles["labels"]
        factor = _label_factor(files, [t[4] for t in per_kind], assumptions)
        data, grid = _stitch(per_kind, ox, oy, pixel_size, channels=None, label_factor=factor)
        out.labels[CELL_LABELS_KEY] = labels_element(data, grid)
        out.label_factor = factor
        out.label_fovs = {t[0] for t in per_kind}
        out.label_info = {"element": CELL_LABELS_KEY, "label": f"fov * {factor} + cell_ID", "factor": factor}
        used += [found["labels"][t[0]] for t in per_kind]
    for kind, name in _PICTURE_DIRS:
        missing = sorted((set(fovs) | listed) - {t[0] for t in tiles.get(kind, [])}) if kind in found else []
        if missing:
            _note(assumptions, f"{name}/ has no usable picture for FOV(s) {_listing(missing)}: left blank there")
    logger.info(
        "CosMx pictures: %s stitched from %d FOVs at %.5g µm per pixel",
        ", ".join(sorted([*out.images, *out.labels])),
        len(placements),
        pixel_size,
    )
    return out


def _note(assumptions: list[str], note: str) -> None:
    assumptions.append(note)
    warn_assumption(note, "Check the CosMx export (copy the missing files, or pass the folder they are in)")


def _listing(values, n: int = 10) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:n])
    return shown + (f" and {len(values) - n} more" if len(values) > n else "")


def _fov_files(directory: Path) -> dict[int, Path]:
    """The per-FOV files of a picture folder by FOV number (``..._F001.TIF`` is FOV 1)."""
    out: dict[int, Path] = {}
    for file in sorted(directory.iterdir()):
        match = _FOV_FILE.search(file.name)
        if match and file.is_file() and not file.name.startswith("."):
            out.setdefault(int(match.group(1)), file)
    return out


def _layout(file: Path) -> _Layout:
    """The axes, size and type of a FOV file, from its header only."""
    if file.suffix.lower() in (".jpg", ".jpeg", ".png"):
        from PIL import Image

        with Image.open(file) as img:
            width, height = img.size
            bands = len(img.getbands())
        return _Layout("YXS", 3 if bands < 3 else bands, height, width, "uint8", True)
    import tifffile

    with tifffile.TiffFile(file) as tif:
        check_tiff_complete(tif, file)
        series = tif.series[0]
        shape, axes, dtype = tuple(series.shape), series.axes.upper(), str(series.dtype)
    if "Y" not in axes or "X" not in axes:
        msg = f"{file.name}: expected an image with Y and X axes, got axes {axes!r} of shape {shape}"
        raise ValueError(msg)
    sizes = dict(zip(axes, shape, strict=True))
    channels = int(np.prod([n for a, n in sizes.items() if a not in "YX"], dtype=np.int64))
    return _Layout(axes, channels, int(sizes["Y"]), int(sizes["X"]), dtype, False)


def _same_channels(tiles: list[tuple], name: str, assumptions: list[str]) -> list[tuple]:
    """The tiles with as many channels as most FOVs have (the others reported and left out)."""
    counts = pd.Series([t[4].channels for t in tiles])
    n = int(counts.mode().iloc[0])
    odd = [t[0] for t in tiles if t[4].channels != n]
    if odd:
        _note(assumptions, f"{name}/: FOV(s) {_listing(odd)} have another number of channels than {n}; left out")
    return [t for t in tiles if t[4].channels == n]


# placement


#: How the FOV files may store local pixels: (rows bottom-up, columns right to left) -> description. The first is
#: CosMx's convention (as spatialdata-io reads the files); the last, a rotation by 180 degrees, is how the pictures
#: of some AtoMx exports (1.3.2 and later) lie against their molecules.
_ORIENTATIONS = {
    (True, False): "local y from the bottom row up, local x from left to right (CosMx's convention)",
    (False, False): "local y from the top row down, local x from left to right",
    (True, True): "local y from the bottom row up, local x from right to left",
    (False, True): "local y from the top row down, local x from right to left (turned by 180 degrees)",
}
#: FOVs whose CellLabels are read whole to check how the files store local pixels (those with the most cells).
_ORIENTATION_FOVS = 3
#: Share of cell centres that must lie on their own label for an orientation to be trusted.
_ORIENTATION_AGREEMENT = 0.5


def _file_orientation(found, layouts, cells, placements, assumptions: list[str]) -> tuple[bool, bool, dict]:
    """``(rows bottom-up, columns right to left, report)``: how the FOV files store local pixels.

    Read from the data, not assumed: the CellLabels of the FOVs with the most cells are read whole and each of the
    four orientations is scored by the share of the metadata's cell centres (``CenterX_local_px``,
    ``CenterY_local_px``) that fall on their own ``cell_ID``. The convention holds unless another orientation puts
    clearly more cells on their labels. Without CellLabels or cell metadata the convention is assumed, and said.
    """
    default = (True, False)

    def report(orientation, **extra) -> tuple[bool, bool, dict]:
        return (*orientation, {"files_store": _ORIENTATIONS[orientation], **extra})

    centres = ["fov", "cell_ID", "CenterX_local_px", "CenterY_local_px"]
    frame = cells[centres] if cells is not None and set(centres) <= set(cells.columns) else None
    labelled = [f for f in layouts.get("labels", {}) if f in placements]
    if frame is None or not labelled:
        why = "no CellLabels" if not labelled else "no cell metadata with local centres"
        _note(assumptions, f"FOV pictures taken to store {_ORIENTATIONS[default]}: not checked ({why})")
        return report(default, checked=False)
    frame = frame.set_axis(["fov", "cell", "x", "y"], axis=1).apply(pd.to_numeric, errors="coerce").dropna()
    frame = frame[frame["fov"].isin(labelled) & (frame["cell"] > 0)]
    chosen = frame["fov"].value_counts().index[:_ORIENTATION_FOVS].astype(int).tolist()
    hits = dict.fromkeys(_ORIENTATIONS, 0)
    n = 0
    for fov in chosen:
        layout = layouts["labels"][fov]
        h, w = layout.height, layout.width
        cells = frame[frame["fov"] == fov]
        label = _read_window(str(found["labels"][fov]), layout, (0, h), (0, w))[0]
        col = np.floor(cells["x"].to_numpy()).astype(np.int64).clip(0, w - 1)
        row = np.floor(cells["y"].to_numpy()).astype(np.int64).clip(0, h - 1)
        want = cells["cell"].to_numpy().astype(np.int64)
        for bottom_up, reversed_x in hits:
            r = h - 1 - row if bottom_up else row
            c = w - 1 - col if reversed_x else col
            hits[bottom_up, reversed_x] += int((label[r, c].astype(np.int64) == want).sum())
        n += len(cells)
    if n == 0:
        _note(assumptions, f"FOV pictures taken to store {_ORIENTATIONS[default]}: no cell to check them by")
        return report(default, checked=False)
    share = {k: v / n for k, v in hits.items()}
    best = max(share, key=lambda k: (share[k], k == default))
    checked = {"checked": True, "cells_checked": n, "fovs_checked": chosen}
    if share[best] < _ORIENTATION_AGREEMENT or share[best] <= share[default] + 0.25:
        if share[default] < _ORIENTATION_AGREEMENT:
            _note(
                assumptions,
                f"CellLabels put at most {share[best]:.0%} of {n} cell centres on their own cell in any orientation: "
                f"FOV pictures taken to store {_ORIENTATIONS[default]}",
            )
        return report(default, cells_on_their_label=share[default], **checked)
    msg = (
        f"The FOV pictures of this export store {_ORIENTATIONS[best]}: so read, CellLabels put {share[best]:.0%} of "
        f"{n} cell centres (FOVs {_listing(chosen)}) on their own cell, against {share[default]:.0%} read by "
        f"CosMx's convention ({_ORIENTATIONS[default]}). All pictures are placed accordingly."
    )
    warnings.warn(msg, UserWarning, stacklevel=4)
    _note(assumptions, msg)
    return report(best, cells_on_their_label=share[best], **checked)


_CENTRES = ("CenterX_local_px", "CenterY_local_px", "CenterX_global_px", "CenterY_global_px")


def _cell_centres(files) -> pd.DataFrame | None:
    """The cell metadata's FOV, ``cell_ID`` and centre columns, read once for placing and orienting the pictures.

    The first of these column sets the file has: all of them; FOV and the local and global centres (to place FOVs);
    FOV, ``cell_ID`` and the local centres (to check how the files lie). None without metadata or such columns.
    """
    if files["metadata"] is None:
        return None
    for names in (("fov", "cell_ID", *_CENTRES), ("fov", *_CENTRES), ("fov", "cell_ID", *_CENTRES[:2])):
        frame = _columns(files["metadata"], names)
        if frame is not None:
            return frame
    return None


def _fov_placements(
    files, cells, transcripts, pixel_size: float, fovs: list[int], assumptions: list[str], used: list[Path]
):
    """Each FOV's ``(x, y, sign)``: the global px of its local pixel (0, 0), and whether local y runs with global y.

    From the positions file, checked against the cell metadata's (else the molecules') local and global
    pixels; those decide where they disagree or where the positions file is missing.
    """
    listed = None
    if files["fov_positions"] is not None:
        listed = _read_fov_positions(files["fov_positions"], pixel_size)
        used.append(files["fov_positions"])
    measured, measured_from = _local_to_global(files, cells, transcripts)
    placements: dict[int, tuple[float, float, int]] = {}
    moved, by_cells, unplaced = [], [], []
    for fov in fovs:
        seen = measured.get(fov) if measured else None
        given = listed.get(fov) if listed is not None else None
        if given is not None and seen is not None:
            off = max(abs(given[0] - seen[0]), abs(given[1] - seen[1]))
            if off > _PLACEMENT_TOLERANCE or seen[2] < 0:
                moved.append((fov, given, seen))
                placements[fov] = seen
            else:
                placements[fov] = (given[0], given[1], 1)
        elif given is not None:
            placements[fov] = (given[0], given[1], 1)
        elif seen is not None:
            placements[fov] = seen
            by_cells.append(fov)
        else:
            unplaced.append(fov)
    if moved:
        fov, given, seen = moved[0]
        flipped = sum(1 for m in moved if m[2][2] < 0)
        note = (
            f"{len(moved)} FOV(s) ({_listing([m[0] for m in moved])}) are placed by the local and global pixels of "
            f"{measured_from}, not by {files['fov_positions'].name}, which places them elsewhere (FOV {fov}: "
            f"({given[0]:.1f}, {given[1]:.1f}) px there, ({seen[0]:.1f}, {seen[1]:.1f}) px by the cells)"
        )
        if flipped:
            note += f"; in {flipped} of them local y runs against global y, so their pictures are not flipped"
        _note(assumptions, note)
    if by_cells:
        where = "no FOV positions file" if listed is None else f"{files['fov_positions'].name} lacks them"
        note = f"FOV(s) {_listing(by_cells)} placed by the local and global pixels of {measured_from} ({where})"
        _note(assumptions, note)
    if unplaced:
        _note(
            assumptions,
            f"FOV(s) {_listing(unplaced)} have pictures but no position (no _fov_positions_file row, and no cell or "
            "molecule with local and global pixels): their pictures are not read",
        )
    how = {
        "placed": len(placements),
        "by_positions_file": len(placements) - len(moved) - len(by_cells),
        "by_local_and_global_pixels": len(moved) + len(by_cells),
        "not_placed": unplaced,
        "checked_against": measured_from,
    }
    return placements, how, set(listed or ())


def _read_fov_positions(file: Path, pixel_size: float) -> dict[int, tuple[float, float]]:
    """FOV -> global px of its local pixel (0, 0), from ``x_global_px``/``y_global_px`` or ``X_mm``/``Y_mm``."""
    table = read_table(file, lazy=False)
    lower = {str(c).lower(): c for c in table.columns}
    fov_col = lower.get("fov")
    for x, y, scale in (
        ("x_global_px", "y_global_px", 1.0),
        ("x_mm", "y_mm", 1000.0 / pixel_size),
        ("x_global_mm", "y_global_mm", 1000.0 / pixel_size),
    ):
        if fov_col is not None and x in lower and y in lower:
            fovs = pd.to_numeric(table[fov_col], errors="coerce")
            xs = pd.to_numeric(table[lower[x]], errors="coerce") * scale
            ys = pd.to_numeric(table[lower[y]], errors="coerce") * scale
            ok = fovs.notna() & xs.notna() & ys.notna()
            return {int(f): (float(a), float(b)) for f, a, b in zip(fovs[ok], xs[ok], ys[ok], strict=True)}
    msg = (
        f"{str(file)!r} lacks the columns of a CosMx FOV positions file: fov with x_global_px and y_global_px (or "
        f"X_mm and Y_mm); it has {list(table.columns)}. Is it the export's _fov_positions_file?"
    )
    raise ValueError(msg)


def _local_to_global(files, cells, transcripts) -> tuple[dict[int, tuple[float, float, int]] | None, str | None]:
    """Per FOV, ``(x, y, sign)`` with global px = ``(x + local x, y + sign * local y)``, from the cells' (else the
    first molecules') local and global pixel columns; None where they give none."""
    frame, source = None, None
    columns = ("CenterX_local_px", "CenterY_local_px", "CenterX_global_px", "CenterY_global_px")
    if cells is not None and {"fov", *columns} <= set(cells.columns):
        frame = cells[["fov", *columns]]
        source = files["metadata"].name
    if frame is None:
        columns = ("x_local_px", "y_local_px", "x_global_px", "y_global_px")
        if set(columns) <= set(transcripts.columns) and "fov" in transcripts.columns:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fewer rows than asked in the first partition
                frame = transcripts[["fov", *columns]].head(200_000, npartitions=1, compute=True)
            source = f"the first molecules of {files['transcripts'].name}"
    if frame is None or frame.empty:
        return None, None
    frame = frame.set_axis(["fov", "xl", "yl", "xg", "yg"], axis=1).apply(pd.to_numeric, errors="coerce").dropna()
    frame = frame.assign(dx=frame.xg - frame.xl, dm=frame.yg - frame.yl, dp=frame.yg + frame.yl)
    groups = frame.groupby(frame["fov"].astype(np.int64))
    spread = groups[["dx", "dm", "dp", "yl"]].agg(lambda s: float(s.max() - s.min()))
    middle = groups[["dx", "dm", "dp"]].median()
    tol = _PLACEMENT_TOLERANCE
    decisive = spread["yl"] > tol  # one cell, or cells in one row, cannot tell the direction of y
    plus = int(((spread["dm"] <= tol) & decisive).sum())
    minus = int(((spread["dp"] <= tol) & (spread["dm"] > tol) & decisive).sum())
    sign = -1 if minus > plus else 1
    column = "dm" if sign > 0 else "dp"
    ok = (spread["dx"] <= tol) & (spread[column] <= tol)
    out = {int(f): (float(middle.at[f, "dx"]), float(middle.at[f, column]), sign) for f in spread.index[ok]}
    if (~ok).any():
        logger.info("CosMx FOV(s) %s: local and global pixels disagree within the FOV", _listing(spread.index[~ok]))
    return out or None, source


def _columns(file: Path, names: tuple[str, ...]) -> pd.DataFrame | None:
    """Some columns of a csv(.gz) or parquet table; None when it lacks one of them."""
    try:
        if file.name.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            if not set(names) <= set(pq.ParquetFile(file).schema_arrow.names):
                return None
            return pd.read_parquet(file, columns=list(names))
        header = pd.read_csv(file, nrows=0).columns
        if not set(names) <= set(header):
            return None
        return pd.read_csv(file, usecols=list(names))[list(names)]
    except Exception as err:
        msg = f"Could not read {str(file)!r} ({type(err).__name__}: {err}); copy it again from the CosMx export."
        raise ValueError(msg) from err


# channels and labels


def _morphology_channels(folder: Path, file: Path, n: int, assumptions: list[str], used: list[Path]):
    """The names of the ``n`` Morphology2D channels (DAPI named ``"DAPI"``) and the DAPI channel's index."""
    import tifffile

    with tifffile.TiffFile(file) as tif:
        description = tif.pages[0].description or ""
    order, targets = _description_channels(description)
    dictionary = next(
        (p for p in (folder / _CHANNEL_DICTIONARY, folder / "RunSummary" / _CHANNEL_DICTIONARY) if p.is_file()), None
    )
    if dictionary is not None:
        listed = _dictionary_channels(dictionary)
        if listed:
            used.append(dictionary)
            targets = {**listed, **targets}
            order = order or "".join(listed)
    if order is None or len(order) != n:
        if n == len(MORPHOLOGY_ORDER):
            order = MORPHOLOGY_ORDER
            if not targets:
                logger.info("Morphology2D: no channel names in the files; taken in CosMx's order %s", order)
        else:
            names = [f"channel_{i}" for i in range(n)]
            _note(
                assumptions,
                f"Morphology2D: {n} channels and no channel order in the files, so the DAPI channel is unknown; "
                f"the channels are named {names[0]}..{names[-1]} (pass stain_key= and pick the channel yourself)",
            )
            return names, None
    names = []
    for letter in order:
        target = targets.get(letter)
        names.append("DAPI" if letter == "U" else (target.replace("/", ".") if target else f"Channel-{letter}"))
    dapi = names.index("DAPI") if "DAPI" in names else None
    if dapi is None:  # no U channel: a target that is DNA
        dapi = next((i for i, t in enumerate(names) if re.fullmatch(r"(?i)dapi|dna|hoechst.*|nucle.*", t)), None)
        if dapi is not None:
            names[dapi] = "DAPI"
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name}_{seen[name]}"
    return names, dapi


def _description_channels(description: str) -> tuple[str | None, dict[str, str]]:
    """Channel order (``"BGYRU"``) and ChannelId -> BiologicalTarget from a Morphology2D TIFF description."""
    order, targets = None, {}
    try:
        parsed = json.loads(description)
    except (ValueError, TypeError):
        parsed = None
    if parsed is not None:
        stack = [parsed]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                if isinstance(item.get("ChannelOrder"), str) and order is None:
                    order = item["ChannelOrder"]
                if "ChannelId" in item:
                    target = item.get("BiologicalTarget") or item.get("Target") or item.get("DisplayName")
                    if target:
                        targets[_channel_letter(item["ChannelId"])] = str(target)
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
    else:  # not JSON: the same keys by pattern
        found = re.search(r'"ChannelOrder"\s*:\s*"([A-Za-z]+)"', description)
        order = found.group(1) if found else None
        pairs = re.findall(r'"ChannelId"\s*:\s*"([^"]+)"[^{}]*?"BiologicalTarget"\s*:\s*"([^"]*)"', description)
        for cid, target in pairs:
            if target:
                targets[_channel_letter(cid)] = target
    return (order.upper() if order else None), targets


def _dictionary_channels(file: Path) -> dict[str, str]:
    """ChannelId -> BiologicalTarget from ``Morphology_ChannelID_Dictionary.txt`` (``Channel-B  Histone`` lines)."""
    out: dict[str, str] = {}
    try:
        lines = file.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and parts[0].lower().startswith("channel-"):
            out[_channel_letter(parts[0])] = parts[1].strip()
    return out


def _channel_letter(channel_id) -> str:
    text = str(channel_id).strip()
    return text[len("Channel-") :].upper() if text.lower().startswith("channel-") else text.upper()


def _label_factor(files, layouts: list[_Layout], assumptions: list[str]) -> int:
    """``LABEL_FACTOR``, or the next power of ten above the largest cell_ID when one reaches it."""
    if all(np.dtype(layout.dtype).itemsize <= 2 for layout in layouts):
        return LABEL_FACTOR  # 16-bit labels stay below 100000
    largest = None
    for kind in ("metadata", "counts"):
        if files[kind] is not None:
            ids = _columns(files[kind], ("cell_ID",))
            if ids is not None and len(ids):
                largest = int(pd.to_numeric(ids["cell_ID"], errors="coerce").max())
                break
    if largest is None:
        logger.info("CosMx cell labels: no cell table to bound cell_ID; assumed below %d", LABEL_FACTOR)
        return LABEL_FACTOR
    factor = LABEL_FACTOR
    while largest >= factor:
        factor *= 10
    return factor


def _check_cells_have_labels(table, pictures: _Pictures, assumptions: list[str]) -> None:
    fovs = pd.to_numeric(table.obs["fov"]).to_numpy(np.int64)
    missing = ~np.isin(fovs, sorted(pictures.label_fovs))
    if missing.any():
        _note(
            assumptions,
            f"{int(missing.sum())} of {table.n_obs} cells of the table are in FOV(s) "
            f"{_listing(sorted(set(fovs[missing].tolist())))} that have no CellLabels picture",
        )


# stitching


def _stitch(tiles: list[tuple], ox: float, oy: float, pixel_size: float, *, channels: int | None, label_factor=None):
    """A lazy array of the FOV files in ``tiles`` on one canvas whose pixel (0, 0) is at global px (ox, oy)."""
    import dask.array as da
    from dask.base import tokenize

    from st2he._grid import Grid

    placed = []
    for fov, file, top, left, layout, flip, flip_cols in tiles:
        row0, col0 = int(round(top - oy)), int(round(left - ox))
        placed.append((int(fov), file, row0, col0, layout, bool(flip), bool(flip_cols)))
    height = max(t[2] + t[4].height for t in placed)
    width = max(t[3] + t[4].width for t in placed)
    if label_factor is None:
        dtype = np.result_type(*[np.dtype(t[4].dtype) for t in placed])
    else:
        largest = (max(t[0] for t in placed) + 1) * label_factor
        dtype = np.dtype(np.uint32) if largest < 2**32 else np.dtype(np.int64)
    rows = _split(height)
    cols = _split(width)
    chunks = (rows, cols) if channels is None else ((channels,), rows, cols)
    reader = _FovBlocks(tuple(placed), dtype.str, label_factor)
    name = "cosmx-stitch-" + tokenize(placed, dtype.str, label_factor, [Path(t[1]).stat().st_mtime for t in placed])
    data = da.map_blocks(reader, chunks=chunks, dtype=dtype, meta=np.empty((0,) * len(chunks), dtype), name=name)
    return data, Grid(ox * pixel_size, oy * pixel_size, float(pixel_size), height, width)


def _split(n: int) -> tuple[int, ...]:
    return tuple(min(_BLOCK, n - i) for i in range(0, n, _BLOCK))


class _FovBlocks:
    """Fill one block of a stitched picture from the windows of the FOV files under it (picklable for dask)."""

    def __init__(self, tiles: tuple, dtype: str, label_factor: int | None):
        self.tiles, self.dtype, self.label_factor = tiles, np.dtype(dtype), label_factor

    def __call__(self, block_info=None) -> np.ndarray:
        location = block_info[None]["array-location"]
        (r0, r1), (q0, q1) = location[-2], location[-1]
        out = np.zeros(tuple(b - a for a, b in location), dtype=self.dtype)
        for fov, file, top, left, layout, flip, flip_cols in self.tiles:  # ascending FOV: the higher one wins
            a, b = max(r0, top), min(r1, top + layout.height)
            c, d = max(q0, left), min(q1, left + layout.width)
            if a >= b or c >= d:
                continue
            lo, hi = a - top, b - top  # rows of the placed FOV
            rows = (layout.height - hi, layout.height - lo) if flip else (lo, hi)
            cols = (layout.width - (d - left), layout.width - (c - left)) if flip_cols else (c - left, d - left)
            window = _read_window(file, layout, rows, cols)
            if flip:
                window = window[:, ::-1, :]
            if flip_cols:
                window = window[:, :, ::-1]
            if self.label_factor is None:
                out[..., a - r0 : b - r0, c - q0 : d - q0] = window.astype(self.dtype, copy=False)
            else:
                cells = window[0].astype(self.dtype)
                offset = self.dtype.type(fov * self.label_factor)
                out[a - r0 : b - r0, c - q0 : d - q0] = np.where(cells > 0, cells + offset, 0)
        return out


def _read_window(file: str, layout: _Layout, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Rows ``rows`` and columns ``cols`` of a FOV file as ``(channels, rows, cols)``."""
    if layout.picture:
        window = _decoded(file)[rows[0] : rows[1], cols[0] : cols[1]]
        return np.moveaxis(window, -1, 0)
    import tifffile
    import zarr

    axes = layout.axes
    index: list[Any] = [slice(None)] * len(axes)
    index[axes.index("Y")] = slice(*rows)
    index[axes.index("X")] = slice(*cols)
    store = tifffile.imread(file, aszarr=True, series=0, level=0)
    try:
        window = np.asarray(zarr.open(store, mode="r")[tuple(index)])
    finally:
        store.close()
    order = [i for i, a in enumerate(axes) if a not in "YX"] + [axes.index("Y"), axes.index("X")]
    return window.transpose(order).reshape(-1, rows[1] - rows[0], cols[1] - cols[0])


@lru_cache(maxsize=2)
def _decoded(file: str) -> np.ndarray:
    """A JPEG/PNG FOV picture decoded whole (a few recent ones are kept: blocks of one FOV read it in turn)."""
    from PIL import Image

    with Image.open(file) as img:
        return np.asarray(img.convert("RGB") if img.mode not in ("RGB", "RGBA") else img)
