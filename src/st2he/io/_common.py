"""Building blocks shared by the readers: files, tables, transcripts, images, boundaries and units."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from st2he._elements import ATTRS_KEY
from st2he._grid import COORDINATE_SYSTEM, Grid

logger = logging.getLogger("st2he")

#: Gene-name prefixes of the control probes and codewords of each platform (matched case-insensitively).
CONTROL_PREFIXES: dict[str, tuple[str, ...]] = {
    "xenium": (
        "BLANK",
        "NegControl",  # NegControlProbe_*, NegControlCodeword_*
        "UnassignedCodeword",
        "DeprecatedCodeword",
        "Intergenic_Region",  # genomic control probes of Xenium Prime panels
    ),
    "cosmx": ("NegPrb", "Negative", "FalseCode", "SystemControl"),
    "merscope": ("Blank-",),
}

#: Names of the image elements the readers write for a nuclear stain, in order of preference.
NUCLEAR_STAIN_KEYS: tuple[str, ...] = ("morphology_focus", "morphology_mip", "dapi")

TRANSCRIPTS_KEY = "transcripts"
TABLE_KEY = "table"
CELL_BOUNDARIES_KEY = "cell_boundaries"
NUCLEUS_BOUNDARIES_KEY = "nucleus_boundaries"
REGION_KEY = "region"


def control_mask(genes: Iterable[str], platform: str) -> np.ndarray:
    """Boolean mask of the control probes among ``genes`` for ``platform`` (see :data:`CONTROL_PREFIXES`)."""
    prefixes = tuple(p.lower() for p in CONTROL_PREFIXES[platform])
    return np.array([str(g).lower().startswith(prefixes) for g in genes], dtype=bool)


# --------------------------------------------------------------------------------------------------- files


def check_folder(path: str | Path, platform: str) -> Path:
    """Return the output folder as an existing directory, or raise a clear error."""
    folder = Path(path).expanduser()
    if not folder.exists():
        msg = f"No {platform} output folder at {str(folder)!r}: the path does not exist. Check the path."
        raise FileNotFoundError(msg)
    if not folder.is_dir():
        msg = (
            f"{str(folder)!r} is a file, but read_{platform.lower()} expects the {platform} output folder that "
            "contains it. Pass the folder instead."
        )
        raise NotADirectoryError(msg)
    return folder


def find_file(folder: Path, names: Sequence[str]) -> Path | None:
    """Return the first of ``names`` (file names or glob patterns) that exists in ``folder``; None when none does."""
    for name in names:
        if any(ch in name for ch in "*?["):
            hits = sorted(p for p in folder.glob(name) if not p.name.startswith("._"))
            if hits:
                return hits[0]
        elif (folder / name).exists():
            return folder / name
    return None


def read_table(file: Path, *, required: Sequence[str] = (), dtype: Mapping[str, Any] | None = None, lazy: bool = True):
    """Open a parquet or csv(.gz) table (lazily with dask by default) and check its columns.

    Raises a :class:`ValueError` that names the file when it cannot be parsed or lacks a ``required`` column.
    """
    import dask.dataframe as dd

    name = file.name.lower()
    try:
        if name.endswith(".parquet"):
            table = dd.read_parquet(file) if lazy else pd.read_parquet(file)
        elif name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")):
            sep = "\t" if ".tsv" in name else ","
            kwargs: dict[str, Any] = {"sep": sep, "dtype": dict(dtype or {})}
            if lazy:
                if name.endswith(".gz"):
                    kwargs["blocksize"] = None  # gzip cannot be split into blocks
                table = dd.read_csv(file, **kwargs)
            else:
                table = pd.read_csv(file, **kwargs)
        else:
            msg = f"Cannot read {str(file)!r}: expected a .parquet or .csv(.gz) file."
            raise ValueError(msg)
    except ValueError as err:
        if str(err).startswith("Cannot read"):
            raise
        raise _unreadable(file, err) from err
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise _unreadable(file, err) from err
    except Exception as err:
        raise _unreadable(file, err) from err
    missing = [c for c in required if c not in table.columns]
    if missing:
        msg = (
            f"{str(file)!r} lacks the column(s) {missing} that a {file.name} table must have "
            f"(it has {list(table.columns)}). Is it the right file, and was it exported unmodified?"
        )
        raise ValueError(msg)
    return table


def _unreadable(file: Path, err: Exception) -> ValueError:
    msg = (
        f"Could not read {str(file)!r} ({type(err).__name__}: {err}). The file is damaged, truncated or not a "
        "table of the expected format; copy it again from the instrument output."
    )
    return ValueError(msg)


# --------------------------------------------------------------------------------------------- transcripts


def build_transcripts(
    table,
    *,
    file: Path,
    platform: str,
    gene: str,
    x: str,
    y: str,
    z: str | None = None,
    scale: float = 1.0,
    qv: str | None = None,
    rename: Mapping[str, str] | None = None,
    drop: Sequence[str] = (),
    instance_key: str | None = None,
    keep_raw_xy: bool = False,
):
    """Normalise a raw molecule table to the st2he points schema and parse it as a PointsModel element.

    Columns: ``x``, ``y`` (µm; ``raw * scale``), ``z`` (µm, only when ``z`` is given), ``gene`` (categorical,
    the feature key), ``qv`` (float32, NaN when the platform has none), ``is_control`` (bool), then every other
    column of the raw table (``rename`` renames some of them first; ``drop`` lists raw columns replaced by the
    above; the raw ``x`` and ``y`` columns stay when ``keep_raw_xy``). The element maps to ``global`` with the identity: its coordinates already are µm.
    """
    import dask.dataframe as dd
    from spatialdata.models import PointsModel
    from spatialdata.transformations import Identity

    if isinstance(table, pd.DataFrame):
        table = dd.from_pandas(table, npartitions=1)
    raw = table
    # --- gene: decoded, categorical with known categories (one pass over one column) ---
    genes_raw = raw[gene]
    sample = genes_raw.head(1)
    if len(sample) and isinstance(sample.iloc[0], bytes):
        genes_raw = genes_raw.map_partitions(lambda s: s.str.decode("utf-8"), meta=(gene, "object"))
    try:
        categories = sorted(str(g) for g in genes_raw.dropna().unique().compute())
    except Exception as err:
        raise _unreadable(file, err) from err
    cat_dtype = pd.CategoricalDtype(categories=categories)
    controls = [g for g, m in zip(categories, control_mask(categories, platform), strict=True) if m]

    out = {}
    out["x"] = raw[x].astype("float64") * scale if scale != 1.0 else raw[x].astype("float64")
    out["y"] = raw[y].astype("float64") * scale if scale != 1.0 else raw[y].astype("float64")
    if z is not None:
        out["z"] = raw[z].astype("float64")
    gene_col = genes_raw.astype(str).astype(cat_dtype) if categories else genes_raw.astype(cat_dtype)
    out["gene"] = gene_col
    if qv is not None:
        out["qv"] = raw[qv].astype("float32")
    out["is_control"] = gene_col.isin(controls)

    frame = raw.assign(**{f"__st2he_{k}": v for k, v in out.items()})
    replaced = {gene, *(c for c in (z, qv) if c is not None), *drop}
    if not keep_raw_xy:
        replaced |= {x, y}
    rename = dict(rename or {})
    keep = [c for c in raw.columns if c not in replaced]
    frame = frame[[f"__st2he_{k}" for k in out] + keep]
    names = list(out) + [rename.get(c, c) for c in keep]
    clash = {n for n in names if names.count(n) > 1}
    if clash:
        msg = f"Column name clash {sorted(clash)} while normalising {str(file)!r}; rename them before reading."
        raise ValueError(msg)
    frame.columns = names
    if qv is None:
        frame["qv"] = np.float32(np.nan)
        frame = frame[["x", "y", *(["z"] if z is not None else []), "gene", "qv", "is_control", *names[len(out) :]]]
    for col in frame.columns:
        if frame[col].dtype == object and col != "gene":
            frame[col] = frame[col].map_partitions(_decode_bytes, meta=(col, "object"))
    if instance_key is not None and instance_key not in frame.columns:
        instance_key = None
    return PointsModel.parse(
        frame,
        feature_key="gene",
        instance_key=instance_key,
        transformations={COORDINATE_SYSTEM: Identity()},
        sort=True,
    )


def _decode_bytes(series: pd.Series) -> pd.Series:
    if len(series) and isinstance(series.iloc[0], bytes):
        return series.str.decode("utf-8")
    return series


# ---------------------------------------------------------------------------------------------------- images


def read_image_lazy(file: Path):
    """Open a TIFF / OME-TIFF as a lazy ``(c, y, x)`` dask array (full resolution) and its OME pixel size in µm."""
    import dask.array as da
    import tifffile
    import zarr

    try:
        with tifffile.TiffFile(file) as tif:
            series = tif.series[0]
            axes = series.axes
            ome = tif.ome_metadata
        store = tifffile.imread(file, aszarr=True, series=0, level=0)
        array = da.from_zarr(zarr.open(store, mode="r"))
    except Exception as err:
        msg = f"Could not read the image {str(file)!r} ({type(err).__name__}: {err}); copy it again."
        raise ValueError(msg) from err
    array = _to_cyx(array, axes, file)
    return array, ome_pixel_size(ome)


def _to_cyx(array, axes: str, file: Path):
    axes = axes.upper()
    # drop singleton T and Z; a real Z stack is projected by its maximum
    for ax in ("T", "Z", "Q"):
        if ax in axes:
            i = axes.index(ax)
            array = array[(slice(None),) * i + (0,)] if array.shape[i] == 1 else array.max(axis=i)
            axes = axes[:i] + axes[i + 1 :]
    if axes in ("YXS", "YXC"):
        array = array.transpose(2, 0, 1)
        axes = "CYX"
    if axes == "SYX":
        axes = "CYX"
    if axes == "YX":
        array = array[None]
        axes = "CYX"
    if axes != "CYX":
        msg = f"Unsupported image layout {axes!r} in {str(file)!r}; expected YX or CYX planes."
        raise ValueError(msg)
    return array


def ome_pixel_size(ome_xml: str | None) -> float | None:
    """``PhysicalSizeX`` of an OME-XML block in µm, or None when it is not given."""
    if not ome_xml:
        return None
    match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome_xml)
    if match is None:
        return None
    value = float(match.group(1))
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', ome_xml)
    factors = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "m": 1e6}
    factor = factors.get(unit.group(1), 1.0) if unit else 1.0
    return value * factor if value > 0 else None


def image_element(data, grid: Grid, c_coords: Sequence[str]):
    """Parse a lazy ``(c, y, x)`` array as an image element placed on ``grid`` (a pyramid when large)."""
    from st2he._elements import parse_image

    return parse_image(data, grid, c_coords=list(c_coords), scale_factors="auto", chunks=1024)


def grid_from_extent(
    shape: tuple[int, int], extent: tuple[float, float, float, float], *, what: str
) -> tuple[Grid, str]:
    """Return the square-pixel grid of ``shape`` pixels whose top-left corner is the extent's minimum; and a note."""
    x_min, y_min, x_max, y_max = extent
    height, width = shape
    pixel_size = max((x_max - x_min) / width, (y_max - y_min) / height)
    note = (
        f"{what}: assumed it covers the molecules' extent x {x_min:.2f}-{x_max:.2f}, y {y_min:.2f}-{y_max:.2f} µm, "
        f"i.e. {pixel_size:.5g} µm per pixel with its corner at ({x_min:.2f}, {y_min:.2f}) µm"
    )
    return Grid(float(x_min), float(y_min), float(pixel_size), height, width), note


def points_extent(points) -> tuple[float, float, float, float]:
    """``(x_min, y_min, x_max, y_max)`` of a points element (one pass over two columns)."""
    import dask

    xs, ys = points["x"], points["y"]
    x_min, y_min, x_max, y_max = dask.compute(xs.min(), ys.min(), xs.max(), ys.max())
    return float(x_min), float(y_min), float(x_max), float(y_max)


# ------------------------------------------------------------------------------------------------ boundaries


def polygons_from_vertices(table: pd.DataFrame, *, id_col: str, x: str, y: str, scale: float = 1.0, file: Path):
    """Build a GeoDataFrame of one polygon per run of rows with the same ``id_col`` (rows of a polygon are contiguous)."""
    import shapely
    from geopandas import GeoDataFrame

    ids = _decode_bytes(table[id_col].reset_index(drop=True))
    coords = np.column_stack([table[x].to_numpy(np.float64), table[y].to_numpy(np.float64)]) * scale
    if len(ids) == 0:
        return GeoDataFrame({"geometry": []}, geometry="geometry")
    values = ids.to_numpy()
    change = np.concatenate([[True], values[1:] != values[:-1]])
    starts = np.flatnonzero(change)
    if len(starts) != pd.unique(values).size:
        # rows of a polygon are not contiguous: group them, keeping the first-seen order
        order = np.argsort(pd.factorize(values)[0], kind="stable")
        values, coords = values[order], coords[order]
        change = np.concatenate([[True], values[1:] != values[:-1]])
        starts = np.flatnonzero(change)
    ends = np.concatenate([starts[1:], [len(values)]])
    rings = []
    for s, e in zip(starts, ends, strict=True):
        ring = coords[s:e]
        if len(ring) and not np.array_equal(ring[0], ring[-1]):
            ring = np.vstack([ring, ring[:1]])
        if len(ring) < 4:  # degenerate: repeat the points so shapely accepts the ring
            ring = np.vstack([ring, np.repeat(ring[:1], 4 - len(ring), axis=0)])
        rings.append(ring)
    try:
        geoms = shapely.polygons([shapely.linearrings(r) for r in rings])
    except Exception as err:
        raise _unreadable(file, err) from err
    frame = GeoDataFrame({"geometry": geoms}, index=pd.Index(values[starts].astype(str), name=None))
    return frame


def shapes_element(frame):
    """Parse a GeoDataFrame in µm as a shapes element mapped to ``global`` with the identity."""
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    return ShapesModel.parse(frame, transformations={COORDINATE_SYSTEM: Identity()})


# ---------------------------------------------------------------------------------------------------- tables


def table_element(adata, *, annotates: str | None, instance_key: str):
    """Parse an AnnData as the cell table, annotating shapes element ``annotates`` through ``instance_key``."""
    from spatialdata.models import TableModel

    adata.obs_names = adata.obs_names.astype(str)
    adata.obs_names_make_unique()
    if annotates is None:
        return TableModel.parse(adata)
    adata.obs[REGION_KEY] = pd.Categorical([annotates] * adata.n_obs)
    return TableModel.parse(adata, region=annotates, region_key=REGION_KEY, instance_key=instance_key)


def annotate(table, region: str, instance_key: str):
    """Point an existing table at ``region`` (a shapes element) through ``instance_key``."""
    from spatialdata.models import TableModel

    table.obs[REGION_KEY] = pd.Categorical([region] * table.n_obs)
    attrs = table.uns.get(TableModel.ATTRS_KEY, {})
    attrs.update({"region": region, "region_key": REGION_KEY, "instance_key": instance_key})
    table.uns[TableModel.ATTRS_KEY] = attrs
    return TableModel.parse(table)


# ------------------------------------------------------------------------------------------------------ units


def to_microns(element, unit_to_um) -> None:
    """Replace an element's transformations by one to ``global`` in µm.

    ``unit_to_um`` is a 3x3 affine matrix (x, y) taking the element's current ``global`` units to µm; the result
    is simplified to the identity, a scale and a translation, or an affine.
    """
    from spatialdata.transformations import get_transformation, set_transformation

    current = get_transformation(element, COORDINATE_SYSTEM)
    matrix = np.asarray(unit_to_um, dtype=float) @ current.to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    set_transformation(element, {COORDINATE_SYSTEM: simplify(matrix)}, set_all=True)


def simplify(matrix: np.ndarray):
    """Return the simplest spatialdata transformation equal to a 3x3 (x, y) affine matrix."""
    from spatialdata.transformations import Affine, Identity, Scale, Sequence, Translation

    m = np.asarray(matrix, dtype=float)
    if np.allclose(m, np.eye(3), atol=1e-9):
        return Identity()
    if abs(m[0, 1]) < 1e-12 and abs(m[1, 0]) < 1e-12 and m[0, 0] > 0 and m[1, 1] > 0:
        return Sequence([Scale([m[1, 1], m[0, 0]], axes=("y", "x")), Translation([m[1, 2], m[0, 2]], axes=("y", "x"))])
    return Affine(m, input_axes=("x", "y"), output_axes=("x", "y"))


def scale_matrix(factor: float) -> np.ndarray:
    """3x3 matrix of an isotropic scale."""
    return np.diag([factor, factor, 1.0])


# ----------------------------------------------------------------------------------------------------- attrs


def set_source(sdata, source: dict[str, Any]) -> None:
    """Record where the object came from in ``sdata.attrs['st2he']['source']`` (JSON-serialisable)."""
    import json

    from st2he._elements import _jsonable

    store = sdata.attrs.setdefault(ATTRS_KEY, {})
    store["source"] = json.loads(json.dumps(source, default=_jsonable))


def warn_assumption(note: str, how_to_fix: str) -> None:
    """Tell the user what a reader assumed (a warning and a log line)."""
    msg = f"{note}. {how_to_fix}"
    logger.info(msg)
    warnings.warn(msg, UserWarning, stacklevel=4)
