"""Building blocks shared by the readers: files, tables, transcripts, images, boundaries and units."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
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


def read_table(
    file: Path,
    *,
    required: Sequence[str] = (),
    dtype: Mapping[str, Any] | None = None,
    lazy: bool = True,
    categorical: str | None = None,
):
    """Open a parquet or csv(.gz) table (lazily with dask by default) and check its columns.

    A lazy parquet table is read by groups of row groups; its ``categorical`` column (dictionary-encoded in Xenium
    files) arrives as a pandas categorical with known categories. Raises a :class:`ValueError` that names the file
    when it cannot be parsed or lacks a ``required`` column.
    """
    import dask.dataframe as dd

    name = file.name.lower()
    try:
        if name.endswith(".parquet"):
            table = _read_parquet_lazy(file, categorical) if lazy else pd.read_parquet(file)
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


_ROWS_PER_PARTITION = 2_000_000


def _read_parquet_lazy(file: Path, categorical: str | None):
    """Return a dask DataFrame over groups of row groups of a parquet file (binary columns decoded as text)."""
    import dask.dataframe as dd
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file)
    schema = parquet.schema_arrow
    if categorical is not None and categorical not in schema.names:
        categorical = None  # the caller reports the missing column
    categories = gene_names(file, categorical) if categorical is not None else None
    batches: list[list[int]] = []
    rows = 0
    for i in range(parquet.num_row_groups):
        n = parquet.metadata.row_group(i).num_rows
        if not batches or rows + n > _ROWS_PER_PARTITION:
            batches.append([])
            rows = 0
        batches[-1].append(i)
        rows += n
    meta = _arrow_to_pandas(schema.empty_table(), categorical, categories)
    if not batches:
        return dd.from_pandas(meta, npartitions=1)
    return dd.from_map(_ParquetRowGroups(str(file), categorical, categories), batches, meta=meta)


class _ParquetRowGroups:
    """Read some row groups of a parquet file as pandas (a picklable callable for dask's ``from_map``)."""

    def __init__(self, file: str, categorical: str | None, categories: list[str] | None):
        self.file, self.categorical, self.categories = file, categorical, categories

    def __call__(self, row_groups: list[int], columns: list[str] | None = None) -> pd.DataFrame:
        import pyarrow.parquet as pq

        read_dictionary = [self.categorical] if self.categorical is not None else None
        parquet = pq.ParquetFile(self.file, read_dictionary=read_dictionary)
        table = parquet.read_row_groups(row_groups, columns=None if columns is None else list(columns))
        categorical = self.categorical if columns is None or self.categorical in columns else None
        return _arrow_to_pandas(table, categorical, self.categories)


def _arrow_to_pandas(table, categorical: str | None, categories: list[str] | None) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        is_dict = pa.types.is_dictionary(column.type)
        kind = column.type.value_type if is_dict else column.type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            if is_dict:
                column = pa.chunked_array([chunk.dictionary_decode() for chunk in column.chunks], type=kind)
            column = pc.cast(column, pa.string())
            if name == categorical:
                column = column.dictionary_encode()
        columns[name] = column
    frame = pa.table(columns).to_pandas(types_mapper={pa.string(): pd.StringDtype("pyarrow")}.get)
    if categorical is not None and categories is not None:
        dtype = pd.CategoricalDtype(categories)
        values = frame[categorical]
        if isinstance(values.dtype, pd.CategoricalDtype):
            frame[categorical] = values.cat.set_categories(categories)
        else:
            frame[categorical] = values.astype(object).astype(dtype)
    return frame


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
    instance_key: str | None = None,
    keep_raw_xy: bool = False,
):
    """Normalise a raw molecule table to the st2he points schema and parse it as a PointsModel element.

    Columns: ``x``, ``y`` (µm; ``raw * scale``), ``z`` (µm, only when ``z`` is given), ``gene`` (categorical,
    the feature key), ``qv`` (float32, NaN when the platform has none), ``is_control`` (bool), then every other
    column of the raw table (``rename`` renames some of them; the raw ``x`` and ``y`` columns stay when
    ``keep_raw_xy``). The element maps to ``global`` with the identity: its coordinates already are µm. The
    result stays lazy; only the gene names are read now (to make them a categorical with known categories).
    """
    import dask.dataframe as dd
    from spatialdata.models import PointsModel
    from spatialdata.transformations import Identity

    if isinstance(table, pd.DataFrame):
        table = dd.from_pandas(table, npartitions=1)
    replaced = {gene, *(c for c in (z, qv) if c is not None)}
    if not keep_raw_xy:
        replaced |= {x, y}
    rename = {k: v for k, v in dict(rename or {}).items() if k in table.columns and k not in replaced}
    raw = table.rename(columns=rename) if rename else table
    others = [c for c in raw.columns if c not in replaced]
    schema = ["x", "y", *(["z"] if z is not None else []), "gene", "qv", "is_control"]
    clash = sorted(set(schema) & set(others))
    if clash:
        msg = (
            f"{str(file)!r} has column(s) {clash} besides the ones st2he derives them from; rename them in the file "
            "before reading."
        )
        raise ValueError(msg)

    # gene: categorical with known categories (parquet: from its dictionaries; csv: one pass over the column)
    genes = raw[gene]
    if isinstance(genes.dtype, pd.CategoricalDtype) and genes.cat.known:
        categories = [str(c) for c in genes.dtype.categories]
        gene_col = genes
    else:
        try:
            categories = sorted({_text(g) for g in genes.dropna().unique().compute()})
        except Exception as err:
            raise _unreadable(file, err) from err
        cat_dtype = pd.CategoricalDtype(categories=categories)
        gene_col = genes.map_partitions(_to_categorical, cat_dtype, meta=pd.Series([], name=gene, dtype=cat_dtype))
    controls = [g for g, m in zip(categories, control_mask(categories, platform), strict=True) if m]

    new = {
        "x": raw[x].astype("float64") * scale if scale != 1.0 else raw[x].astype("float64"),
        "y": raw[y].astype("float64") * scale if scale != 1.0 else raw[y].astype("float64"),
    }
    if z is not None:
        new["z"] = raw[z].astype("float64")
    new["gene"] = gene_col
    new["qv"] = raw[qv].astype("float32") if qv is not None else raw[x].astype("float32") * np.float32(np.nan)
    new["is_control"] = gene_col.isin(controls)
    frame = raw.assign(**new)[schema + others]
    if instance_key is not None and instance_key not in frame.columns:
        instance_key = None
    return PointsModel.parse(
        frame,
        feature_key="gene",
        instance_key=instance_key,
        transformations={COORDINATE_SYSTEM: Identity()},
        sort=True,
    )


def gene_names(file: Path, column: str) -> list[str] | None:
    """Sorted distinct values of a parquet file's string column, from its dictionaries; None when not parquet."""
    if not file.name.lower().endswith(".parquet"):
        return None
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file, read_dictionary=[column])
    names: set[str] = set()
    for i in range(parquet.num_row_groups):
        chunked = parquet.read_row_group(i, columns=[column]).column(0)
        for chunk in chunked.chunks:
            values = chunk.dictionary if hasattr(chunk, "dictionary") else pc.unique(chunk)
            names.update(_text(v) for v in values.to_pylist() if v is not None)
    return sorted(names)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _to_categorical(series: pd.Series, dtype: pd.CategoricalDtype) -> pd.Series:
    if len(series) and series.dtype == object and isinstance(series.iloc[0], bytes):
        series = series.str.decode("utf-8")
    return series.astype(dtype)


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
            check_tiff_complete(tif, file)
        store = tifffile.imread(file, aszarr=True, series=0, level=0)
        array = da.from_zarr(zarr.open(store, mode="r"))
    except TruncatedImageError:
        raise
    except Exception as err:
        raise damaged_image(file, err) from err
    array = _to_cyx(array, axes, file)
    return array, ome_pixel_size(ome)


class TruncatedImageError(ValueError):
    """An image file ends before the image data its own header points at (an interrupted copy or download)."""


def check_tiff_complete(tif, file: Path, series: int = 0) -> None:
    """Raise :class:`TruncatedImageError` when the full-resolution pages of a TIFF point past the file's end.

    Compares the file size with the last byte of every strip or tile of the series' first level (the offsets
    and byte counts the header records), so a truncated file fails now, naming itself, rather than when a
    chunk is decoded much later. Reads the page headers only, not the pixels.
    """
    size = int(tif.filehandle.size)
    if not tif.series:
        msg = (
            f"The image {str(file)!r} is truncated or damaged: no image was found in its {size:,} bytes. Copy it "
            "again from the instrument or scanner output."
        )
        raise TruncatedImageError(msg)
    chosen = tif.series[series]
    level = chosen.levels[0] if chosen.levels else chosen
    end = 0
    for page in level.pages:
        if page is None:
            continue
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        used = counts > 0
        if used.any():
            end = max(end, int((offsets[used] + counts[used]).max()))
    if end > size:
        msg = (
            f"The image {str(file)!r} is truncated: its pixel data run to byte {end:,} but the file has only "
            f"{size:,} bytes ({end - size:,} missing). Copy it again from the instrument or scanner output."
        )
        raise TruncatedImageError(msg)


def damaged_image(file: Path, err: Exception) -> ValueError:
    """The error for an image file that cannot be parsed (``IndexError`` etc. from a cut-off TIFF header)."""
    size = file.stat().st_size if file.exists() else 0
    msg = (
        f"Could not read the image {str(file)!r} ({type(err).__name__}: {err}): the file ({size:,} bytes) is "
        "truncated or damaged. Copy it again from the instrument or scanner output."
    )
    return TruncatedImageError(msg)


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
    factors = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
    factor = factors.get(unit.group(1), 1.0) if unit else 1.0
    return value * factor if value > 0 else None


def image_element(data, grid: Grid, c_coords: Sequence[str]):
    """Parse a lazy ``(c, y, x)`` array as an image element placed on ``grid`` (a pyramid when large)."""
    from st2he._elements import parse_image

    return parse_image(data, grid, c_coords=list(c_coords), scale_factors="auto", chunks=1024)


def labels_element(data, grid: Grid, *, chunks: int = 1024):
    """Parse a lazy ``(y, x)`` integer array as a labels element placed on ``grid`` (a pyramid when large)."""
    import dask.array as da
    from spatialdata.models import Labels2DModel

    from st2he._elements import auto_scale_factors

    if not isinstance(data, da.Array):
        data = da.from_array(data, chunks=(chunks, chunks))
    return Labels2DModel.parse(
        data,
        dims=("y", "x"),
        scale_factors=auto_scale_factors(grid.shape) or None,
        transformations={COORDINATE_SYSTEM: grid.transformation()},
        chunks=(chunks, chunks),
    )


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


def points_extent(
    points, *, what: str = "", assumptions: list[str] | None = None
) -> tuple[float, float, float, float]:
    """``(x_min, y_min, x_max, y_max)`` of the molecules with finite coordinates (one pass over two columns).

    Molecules whose ``x`` or ``y`` is NaN or infinite are left out, with a warning that says how many (and
    appended to ``assumptions``); ``what`` names what the extent is used for. When no molecule has finite
    coordinates, a :class:`ValueError` says so.
    """
    import dask

    xs, ys = points["x"], points["y"]
    finite_x, finite_y = xs.abs() < np.inf, ys.abs() < np.inf  # False for NaN too
    finite = finite_x & finite_y
    x_min, y_min, x_max, y_max, n, n_finite, bad_x, bad_y = dask.compute(
        xs[finite].min(),
        ys[finite].min(),
        xs[finite].max(),
        ys[finite].max(),
        finite.size,
        finite.sum(),
        (~finite_x).sum(),
        (~finite_y).sum(),
    )
    where = f" {what}" if what else ""
    if int(n) == 0:
        msg = f"The transcripts table holds no molecule, so there is no extent{where}. Check the file."
        raise ValueError(msg)
    n_bad = int(n) - int(n_finite)
    if n_bad:
        bad = points[["x", "y"]].map_partitions(_first_nonfinite, meta={"x": "f8", "y": "f8"}).compute()
        shown = ", ".join(f"(x={x:g}, y={y:g})" for x, y in bad.head(3).itertuples(index=False))
        if n_bad == int(n):
            msg = (
                f"All {n_bad} molecules have NaN or infinite coordinates (e.g. {shown}); cannot place the "
                f"images{where}. Check the x and y columns of the transcripts table."
            )
            raise ValueError(msg)
        note = (
            f"{n_bad} of {int(n)} molecules have NaN or infinite coordinates ({int(bad_x)} in x, {int(bad_y)} in y; "
            f"e.g. {shown}); they were left out of the molecules' extent{where}"
        )
        if assumptions is not None:
            assumptions.append(note)
        warn_assumption(note, "Check the x and y columns of the transcripts table")
    return float(x_min), float(y_min), float(x_max), float(y_max)


def _first_nonfinite(frame: pd.DataFrame) -> pd.DataFrame:
    x, y = frame["x"].to_numpy(np.float64), frame["y"].to_numpy(np.float64)
    bad = ~(np.isfinite(x) & np.isfinite(y))
    return pd.DataFrame({"x": x[bad][:3], "y": y[bad][:3]})


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


def all_to_microns(elements, unit_to_um) -> dict:
    """Apply :func:`to_microns` to every element of a mapping; return the elements as a plain dict."""
    for element in elements.values():
        to_microns(element, unit_to_um)
    return dict(elements)


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


def set_source(
    sdata, source: dict[str, Any], *, used: Iterable[str | Path] | None = None, subfolders: Iterable[str] = ()
) -> None:
    """Record where the object came from in ``sdata.attrs['st2he']['source']`` (JSON-serialisable).

    With ``used`` (the files and folders the reader read), also record which files of the folder
    ``source["path"]`` were used and which were ignored, in ``sdata.attrs['st2he']['files']`` (see
    :func:`files_report`; ``subfolders`` are the folders whose files are listed one by one), and log it as one
    INFO line.
    """
    import json

    from st2he._elements import _jsonable

    store = sdata.attrs.setdefault(ATTRS_KEY, {})
    store["source"] = json.loads(json.dumps(source, default=_jsonable))
    if used is not None and source.get("path") is not None:
        report = files_report(Path(source["path"]), used, subfolders=subfolders)
        store["files"] = report
        logger.info("read_%s: %s", source.get("platform", "?"), describe_files(report, sep="; "))


#: At most this many files per folder are named in a files report; the others are counted.
FILES_LISTED = 20

#: Names a files report never lists (operating-system litter).
_LITTER = (".DS_Store", "Thumbs.db", "desktop.ini")


def files_report(folder: Path, used: Iterable[str | Path], *, subfolders: Iterable[str] = ()) -> dict[str, Any]:
    """Which files of an instrument output folder a reader used and which it ignored.

    Returns ``{"used": [...], "ignored": [...], "unlisted": {"used": {folder: n}, "ignored": {folder: n}}}``:
    paths relative to ``folder`` (``/``-separated, sorted; a folder ends with ``/``; a used file outside
    ``folder`` keeps its absolute path). ``ignored`` lists the files at the top level of ``folder`` and in its
    ``subfolders`` (the image folders a platform writes) that are not in ``used`` nor inside a used folder;
    another folder at the top level is listed as one entry. At most :data:`FILES_LISTED` paths per folder are
    named in each list; ``unlisted`` counts the others by folder (``""`` is the top level). Hidden files are
    left out.
    """
    folder = Path(folder)
    used_paths: set[str] = set()
    for item in used:
        path = Path(item)
        if not path.exists():
            continue
        used_paths.add(_relative(path, folder))
    used_dirs = tuple(p for p in used_paths if p.endswith("/"))

    present: list[str] = []
    wanted = {s.strip("/") for s in subfolders}
    for entry in _visible(folder):
        if entry.is_dir() and entry.name in wanted:
            present.extend(_relative(sub, folder) for sub in _visible(entry))
        else:
            present.append(_relative(entry, folder))

    def covered(rel: str) -> bool:
        if rel in used_paths or any(rel.startswith(d) for d in used_dirs):
            return True
        # a folder that holds something used is not ignored as a whole
        return rel.endswith("/") and any(p.startswith(rel) for p in used_paths)

    ignored = sorted(rel for rel in present if not covered(rel))
    used_list, used_more = _bounded(sorted(used_paths))
    ignored_list, ignored_more = _bounded(ignored)
    return {"used": used_list, "ignored": ignored_list, "unlisted": {"used": used_more, "ignored": ignored_more}}


def describe_files(report: Mapping[str, Any], *, sep: str = "\n") -> str:
    """The files report of a reader (:func:`files_report`) as text: the used files, then the ignored ones."""
    lines = []
    for kind in ("used", "ignored"):
        names = list(report.get(kind, []))
        more = report.get("unlisted", {}).get(kind, {})
        names += [f"... {n} more in {where or 'the folder'}" for where, n in sorted(more.items())]
        lines.append(f"files {kind}: " + (", ".join(names) if names else "none"))
    return sep.join(lines)


def _visible(directory: Path) -> list[Path]:
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return []
    return [p for p in entries if not p.name.startswith(".") and p.name not in _LITTER]


def _relative(path: Path, folder: Path) -> str:
    try:
        rel = path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        rel = str(path.resolve())
    return rel + "/" if path.is_dir() else rel


def _bounded(paths: list[str]) -> tuple[list[str], dict[str, int]]:
    """At most :data:`FILES_LISTED` paths per parent folder, and the counts of the rest by folder."""
    shown: list[str] = []
    counts: dict[str, int] = {}
    more: dict[str, int] = {}
    for rel in paths:
        parent = rel.rstrip("/").rpartition("/")[0] if not rel.startswith("/") else ""
        counts[parent] = counts.get(parent, 0) + 1
        if counts[parent] <= FILES_LISTED:
            shown.append(rel)
        else:
            more[parent] = more.get(parent, 0) + 1
    return shown, more


@contextmanager
def quiet_spatialdata_io():
    """Silence the warnings spatialdata-io raises about its own intermediate objects (deprecations, annotations)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*is annotating.*which is not present.*")
        yield


@contextmanager
def quiet_zarr_writes():
    """Write zarr stores without the warnings of anndata, zarr and ome-zarr about their own defaults.

    Tables are written unsharded, as before, with that choice made explicit (anndata otherwise warns, once per
    array, that zarr v3 autosharding will become the default); ome-zarr's deprecation of the ``Scaler`` that
    spatialdata still uses is silenced too. Other warnings pass through.
    """
    import anndata as ad

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*zarr v3 autosharding", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*deprecated class Scaler", category=DeprecationWarning)
        if "auto_shard_zarr_v3" in dir(ad.settings):
            with ad.settings.override(auto_shard_zarr_v3=False):
                yield
        else:
            yield


def warn_assumption(note: str, how_to_fix: str) -> None:
    """Tell the user what a reader assumed (one warning)."""
    msg = f"{note}. {how_to_fix}"
    warnings.warn(msg, UserWarning, stacklevel=4)  # one warning, not a log line besides
