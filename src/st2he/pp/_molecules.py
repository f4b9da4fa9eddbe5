"""Molecules of a points element, filtered and binned into the chunks of a pixel grid in one streaming pass.

Whole slides hold hundreds of millions of molecules, so nothing here holds the slide in memory: the points are
read one partition at a time, filtered (controls, low quality, non-finite coordinates), mapped to pixels of the
output grid and bucketed by output chunk in compact form (``int32`` pixel offset within the chunk plus
``int32`` gene code). Buckets are kept in memory up to ``memory_limit`` bytes and spilled to ``.npy`` files in a
temporary folder beyond that, which are read back per chunk through memory maps. Each chunk of the output image
then touches only its own molecules.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import uuid
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from st2he._grid import COORDINATE_SYSTEM, Grid

logger = logging.getLogger("st2he")

#: Names of control probes on Xenium (``BLANK*``, ``NegControl*``, ``UnassignedCodeword*``, ``DeprecatedCodeword*``,
#: ``Intergenic*``), CosMx (``NegPrb*``, ``FalseCode*``, ``SystemControl*``) and MERSCOPE (``Blank-*``).
CONTROL_PATTERN = re.compile(
    r"^(blank|negcontrol|neg_control|negprb|unassignedcodeword|deprecatedcodeword|intergenic|falsecode|"
    r"systemcontrol|antisense)",
    re.IGNORECASE,
)
#: Boolean columns that mark control probes (any of them, when present, is honoured too).
CONTROL_COLUMNS = ("is_control", "control", "is_control_probe", "control_probe")
#: Columns holding the per-molecule quality value (Xenium ``qv``, Phred-scaled).
QV_COLUMNS = ("qv", "quality", "quality_value")
#: Gene columns tried when the points element records no ``feature_key``.
GENE_COLUMNS = ("feature_name", "gene", "target", "gene_name", "feature")


def is_control_name(names: Sequence[str]) -> np.ndarray:
    """Whether each gene name is a control probe name (see :data:`CONTROL_PATTERN`)."""
    return np.fromiter((bool(CONTROL_PATTERN.match(str(n))) for n in names), dtype=bool, count=len(names))


@dataclass
class FilterReport:
    """Counts of molecules read, kept and dropped (each molecule is counted under the first reason that applies)."""

    total: int = 0
    nonfinite: int = 0
    controls: int = 0
    low_qv: int = 0
    outside: int = 0
    kept: int = 0

    def as_dict(self) -> dict[str, int]:
        """Return the counts as a plain dictionary."""
        return {
            "total": self.total,
            "kept": self.kept,
            "dropped_controls": self.controls,
            "dropped_low_qv": self.low_qv,
            "dropped_nonfinite": self.nonfinite,
            "outside_region": self.outside,
        }

    def log(self, what: str, *, min_qv: float | None) -> None:
        """Report what was dropped: a warning for non-finite coordinates, an info line for the rest."""
        if self.nonfinite:
            warnings.warn(
                f"{what}: dropped {self.nonfinite} of {self.total} molecules with NaN or infinite coordinates.",
                UserWarning,
                stacklevel=3,
            )
        qv = f"qv < {min_qv:g}" if min_qv is not None else "low qv"
        logger.info(
            "%s: kept %d of %d molecules; dropped %d control probes, %d with %s, %d with non-finite coordinates; "
            "%d outside the region.",
            what,
            self.kept,
            self.total,
            self.controls,
            self.low_qv,
            qv,
            self.nonfinite,
            self.outside,
        )


@dataclass
class MoleculeSource:
    """A points element with the columns st2he reads from it and its affine map to ``global`` µm."""

    key: str
    points: object  # dask DataFrame
    gene_column: str | None
    qv_column: str | None
    control_column: str | None
    affine: np.ndarray  # 3 x 3, (x, y, 1) -> global (x, y, 1)
    panel: list[str] | None = None  # the gene categories when the points element knows them

    @property
    def columns(self) -> list[str]:
        """Columns read per partition."""
        cols = ["x", "y"]
        cols += [c for c in (self.gene_column, self.qv_column, self.control_column) if c is not None]
        return cols


def molecule_source(sdata, points_key: str = "transcripts", *, need_genes: bool = True) -> MoleculeSource:
    """Validate ``points_key`` and find its gene, quality and control columns.

    The gene column is the points element's ``feature_key`` (spatialdata's PointsModel attribute); without
    one, the first of :data:`GENE_COLUMNS` present is used. ``need_genes=True`` makes its absence an error.
    """
    from spatialdata.transformations import get_transformation

    if points_key not in sdata.points:
        available = sorted(sdata.points)
        msg = (
            f"points_key={points_key!r} is not a points element of this SpatialData object; its points elements are "
            f"{available}. Read the molecules with st2he.io (read_xenium, read_cosmx, read_merscope) or pass "
            f"the name of the points element that holds them."
        )
        raise KeyError(msg)
    points = sdata.points[points_key]
    columns = list(points.columns)
    missing_xy = [c for c in ("x", "y") if c not in columns]
    if missing_xy:
        msg = f"The points element {points_key!r} has no {missing_xy} coordinate column(s); its columns are {columns}."
        raise ValueError(msg)
    attrs = points.attrs.get("spatialdata_attrs", {}) if hasattr(points, "attrs") else {}
    gene_column = attrs.get("feature_key")
    if gene_column is not None and gene_column not in columns:
        gene_column = None
    if gene_column is None:
        gene_column = next((c for c in GENE_COLUMNS if c in columns), None)
    if gene_column is None and need_genes:
        msg = (
            f"The points element {points_key!r} has no gene column: it records no feature_key and has none of the "
            f"columns {list(GENE_COLUMNS)} (its columns are {columns}). Set one with "
            f"spatialdata.models.PointsModel.parse(..., feature_key=<gene column>)."
        )
        raise ValueError(msg)
    qv_column = next((c for c in QV_COLUMNS if c in columns), None)
    control_column = next((c for c in CONTROL_COLUMNS if c in columns), None)
    transformations = get_transformation(points, get_all=True)
    if COORDINATE_SYSTEM not in transformations:
        msg = (
            f"The points element {points_key!r} has no transformation to the coordinate system "
            f"{COORDINATE_SYSTEM!r} (it has {sorted(transformations)})."
        )
        raise ValueError(msg)
    affine = np.asarray(
        transformations[COORDINATE_SYSTEM].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")),
        dtype=np.float64,
    )
    panel = None
    if gene_column is not None:
        dtype = points.dtypes[gene_column]
        if isinstance(dtype, pd.CategoricalDtype) and dtype.categories is not None:
            # dask marks unknown categories with a placeholder "__UNKNOWN_CATEGORIES__"
            cats = [str(c) for c in dtype.categories]
            if "__UNKNOWN_CATEGORIES__" not in cats:
                panel = cats
    return MoleculeSource(points_key, points, gene_column, qv_column, control_column, affine, panel)


class GeneCodes:
    """Codes for gene names, assigned in order of first appearance while streaming over the partitions."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        for n in names:
            self.code(n)

    def code(self, name: str) -> int:
        """Return the code of ``name``, new if unseen."""
        i = self.index.get(name)
        if i is None:
            i = len(self.names)
            self.index[name] = i
            self.names.append(name)
        return i

    def encode(self, values) -> tuple[np.ndarray, list[str]]:
        """Codes of a column of gene names (categorical or strings) and the names of its categories."""
        if isinstance(values.dtype, pd.CategoricalDtype):
            cat = values.array
            categories = [str(c) for c in cat.categories]
            codes = np.asarray(cat.codes, dtype=np.int64)
        else:
            codes, uniques = pd.factorize(values.astype(str), sort=False)
            categories = [str(c) for c in uniques]
        lut = np.fromiter((self.code(c) for c in categories), dtype=np.int32, count=len(categories))
        out = np.full(codes.shape, -1, dtype=np.int32)
        ok = codes >= 0
        out[ok] = lut[codes[ok]]
        return out, categories


def _to_global(affine: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if np.allclose(affine, np.eye(3)):
        return x, y
    gx = affine[0, 0] * x + affine[0, 1] * y + affine[0, 2]
    gy = affine[1, 0] * x + affine[1, 1] * y + affine[1, 2]
    return gx, gy


def iter_molecules(
    source: MoleculeSource,
    *,
    min_qv: float | None = 20.0,
    drop_controls: bool = True,
    genes: GeneCodes | None = None,
    report: FilterReport | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Yield ``(x, y, gene_code)`` of the kept molecules, partition by partition, in global µm.

    Drops molecules with non-finite coordinates, control probes (``drop_controls``; by name, see
    :data:`CONTROL_PATTERN`, or by a boolean control column) and molecules whose quality value is below
    ``min_qv`` (when the points have a quality column; ``None`` keeps all). ``gene_code`` indexes
    ``genes.names`` (``None`` when the points have no gene column).
    """
    import dask

    genes = genes if genes is not None else GeneCodes()
    report = report if report is not None else FilterReport()
    frame = source.points[source.columns]
    for part in frame.to_delayed():
        df = dask.compute(part, scheduler="sync")[0]
        n = len(df)
        if n == 0:
            continue
        report.total += n
        x = df["x"].to_numpy(dtype=np.float64, na_value=np.nan)
        y = df["y"].to_numpy(dtype=np.float64, na_value=np.nan)
        x, y = _to_global(source.affine, x, y)
        keep = np.isfinite(x) & np.isfinite(y)
        report.nonfinite += int(n - np.count_nonzero(keep))
        codes = None
        if source.gene_column is not None:
            codes, categories = genes.encode(df[source.gene_column])
        if drop_controls:
            control = np.zeros(n, dtype=bool)
            if codes is not None:
                control_code = is_control_name(genes.names)
                control |= (codes >= 0) & control_code[np.maximum(codes, 0)]
            if source.control_column is not None:
                control |= df[source.control_column].fillna(False).to_numpy(dtype=bool)
            report.controls += int(np.count_nonzero(keep & control))
            keep &= ~control
        if min_qv is not None and source.qv_column is not None:
            qv = df[source.qv_column].to_numpy(dtype=np.float64, na_value=np.nan)
            low = ~(qv >= min_qv)
            report.low_qv += int(np.count_nonzero(keep & low))
            keep &= ~low
        if codes is not None:
            keep &= codes >= 0  # missing gene names
        if not keep.all():
            x, y = x[keep], y[keep]
            codes = codes[keep] if codes is not None else None
        yield x, y, codes


def points_extent(
    source: MoleculeSource, *, min_qv: float | None = 20.0, drop_controls: bool = True
) -> tuple[float, float, float, float] | None:
    """``(x_min, y_min, x_max, y_max)`` in global µm of the kept molecules (``None`` when there are none)."""
    lo = np.array([np.inf, np.inf])
    hi = np.array([-np.inf, -np.inf])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y, _ in iter_molecules(source, min_qv=min_qv, drop_controls=drop_controls):
            if len(x):
                lo = np.minimum(lo, [x.min(), y.min()])
                hi = np.maximum(hi, [x.max(), y.max()])
    if not np.all(np.isfinite(lo)):
        return None
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


@dataclass
class _Part:
    starts: np.ndarray  # int64, n_blocks + 1: molecules of block b are [starts[b], starts[b+1])
    offsets: np.ndarray  # int32 pixel offset within the block: row_in_block * chunk + col_in_block
    codes: np.ndarray  # int32 gene codes


@dataclass
class BinnedMolecules:
    """Kept molecules bucketed by the ``chunk`` x ``chunk`` blocks of ``grid``."""

    grid: Grid
    chunk: int
    genes: list[str]
    report: FilterReport
    parts: list[_Part] = field(default_factory=list)
    spill_dir: str | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def block_rows(self) -> int:
        """Number of block rows."""
        return max(1, math.ceil(self.grid.height / self.chunk))

    @property
    def block_cols(self) -> int:
        """Number of block columns."""
        return max(1, math.ceil(self.grid.width / self.chunk))

    def __dask_tokenize__(self):
        return ("st2he-binned-molecules", self.token)

    def block(self, bi: int, bj: int) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets, codes)`` of the molecules in block ``(bi, bj)`` (offsets use stride ``chunk``)."""
        if not (0 <= bi < self.block_rows and 0 <= bj < self.block_cols):
            return np.empty(0, np.int32), np.empty(0, np.int32)
        b = bi * self.block_cols + bj
        offs, codes = [], []
        for part in self.parts:
            s, e = int(part.starts[b]), int(part.starts[b + 1])
            if e > s:
                offs.append(np.asarray(part.offsets[s:e]))
                codes.append(np.asarray(part.codes[s:e]))
        if not offs:
            return np.empty(0, np.int32), np.empty(0, np.int32)
        if len(offs) == 1:
            return offs[0], codes[0]
        return np.concatenate(offs), np.concatenate(codes)

    def window(self, bi: int, bj: int, margin: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, cols, codes)`` relative to block ``(bi, bj)``'s origin of molecules within ``margin`` pixels of it."""
        rows, cols, codes = [], [], []
        span = range(-1, 2) if margin > 0 else range(0, 1)
        h = min(self.chunk, self.grid.height - bi * self.chunk)
        w = min(self.chunk, self.grid.width - bj * self.chunk)
        for di in span:
            for dj in span:
                off, code = self.block(bi + di, bj + dj)
                if len(off) == 0:
                    continue
                r = off // self.chunk + di * self.chunk
                c = off % self.chunk + dj * self.chunk
                if di or dj:
                    near = (r >= -margin) & (r < h + margin) & (c >= -margin) & (c < w + margin)
                    r, c, code = r[near], c[near], code[near]
                rows.append(r)
                cols.append(c)
                codes.append(code)
        if not rows:
            e = np.empty(0, np.int32)
            return e, e, e
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(codes)


def bin_molecules(
    source: MoleculeSource,
    grid: Grid,
    *,
    chunk: int = 1024,
    min_qv: float | None = 20.0,
    drop_controls: bool = True,
    genes: Sequence[str] = (),
    memory_limit: int = 256 * 2**20,
    spill_dir: str | None = None,
    observers: Sequence = (),
) -> BinnedMolecules:
    """One streaming pass over ``source``: filter, map to pixels of ``grid``, bucket by ``chunk`` blocks.

    ``genes`` fixes the first gene codes (others are appended as met). ``observers`` are called with
    ``(x, y, codes)`` of every partition's kept molecules (e.g. to gather co-expression statistics in the same
    pass). Buckets beyond ``memory_limit`` bytes go to ``.npy`` files in a temporary folder (under
    ``spill_dir``, default the system's) that is removed when the returned object is garbage-collected.
    """
    if chunk < 1 or chunk > 46340:
        msg = f"chunk must be between 1 and 46340 pixels, got {chunk}."
        raise ValueError(msg)
    codes_book = GeneCodes(genes)
    report = FilterReport()
    binned = BinnedMolecules(grid, chunk, codes_book.names, report)
    n_blocks = binned.block_rows * binned.block_cols
    in_memory = 0
    for x, y, codes in iter_molecules(
        source, min_qv=min_qv, drop_controls=drop_controls, genes=codes_book, report=report
    ):
        for observer in observers:
            observer(x, y, codes)
        n = len(x)
        col = np.floor((x - grid.x0) / grid.pixel_size)
        row = np.floor((y - grid.y0) / grid.pixel_size)
        inside = (col >= 0) & (col < grid.width) & (row >= 0) & (row < grid.height)
        n_in = int(np.count_nonzero(inside))
        report.outside += n - n_in
        report.kept += n
        if n_in == 0:
            continue
        if n_in < n:
            col, row = col[inside], row[inside]
            codes = codes[inside] if codes is not None else None
        col = col.astype(np.int64)
        row = row.astype(np.int64)
        block = (row // chunk) * binned.block_cols + (col // chunk)
        offset = ((row % chunk) * chunk + (col % chunk)).astype(np.int32)
        if codes is None:
            codes = np.zeros(n_in, dtype=np.int32)
        order = np.argsort(block.astype(np.uint16 if n_blocks <= 65535 else np.int64), kind="stable")
        counts = np.bincount(block, minlength=n_blocks)
        starts = np.zeros(n_blocks + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        part = _Part(starts, offset[order], codes[order].astype(np.int32, copy=False))
        nbytes = part.offsets.nbytes + part.codes.nbytes
        if in_memory + nbytes > memory_limit:
            if binned.spill_dir is None:
                binned.spill_dir = tempfile.mkdtemp(prefix="st2he-molecules-", dir=spill_dir)
                weakref.finalize(binned, shutil.rmtree, binned.spill_dir, True)
            part = _spill(part, binned.spill_dir, len(binned.parts))
        else:
            in_memory += nbytes
        binned.parts.append(part)
    return binned


def _spill(part: _Part, folder: str, index: int) -> _Part:
    paths = []
    for name in ("offsets", "codes"):
        path = os.path.join(folder, f"part{index:06d}_{name}.npy")
        np.save(path, getattr(part, name))
        paths.append(path)
    return _Part(part.starts, np.load(paths[0], mmap_mode="r"), np.load(paths[1], mmap_mode="r"))
