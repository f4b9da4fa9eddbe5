"""Molecules of a points element, filtered and bucketed by blocks of pixels in one streaming pass.

Whole slides hold hundreds of millions of molecules, so nothing here holds the slide in memory: the points are
read once, one partition at a time, filtered (controls, low quality, non-finite coordinates), mapped to pixels of
a lattice of the output pixel size and bucketed by 256 x 256 pixel blocks in compact form (one ``uint32`` a
molecule: gene code and place in the block). The pixels holding kept molecules are found in the same pass, so
the output grid can be chosen afterwards without reading the molecules again. Buckets are kept in memory up to
``memory_limit`` bytes and appended to one spill file beyond that (unlinked at once, or named in a folder that
the workers of a cluster share), read back per block with positional reads. Each chunk of the output image then
touches only the molecules of the blocks it overlaps.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import socket
import tempfile
import threading
import uuid
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from st2he._grid import COORDINATE_SYSTEM, Grid

from ._kernels import BUCKET, BUCKET_BITS, MAX_GENES

logger = logging.getLogger("st2he")

#: Names of control probes on Xenium (``BLANK*``, ``NegControl*``, ``UnassignedCodeword*``, ``DeprecatedCodeword*``,
#: ``Intergenic*``), CosMx (``NegPrb*``, ``Negative*``, ``FalseCode*``, ``SystemControl*``) and MERSCOPE
#: (``Blank-*``), matched case-insensitively at the start of the name.
CONTROL_PATTERN = re.compile(
    r"^(blank|negcontrol|neg_control|negprb|negative|unassignedcodeword|deprecatedcodeword|intergenic|falsecode|"
    r"systemcontrol)",
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
    missing_gene: int = 0
    outside: int = 0
    kept: int = 0

    def update(self, stats: np.ndarray) -> None:
        """Take the counts from the kernels' ``stats`` = [total, non-finite, controls, low qv, no gene, kept]."""
        self.total, self.nonfinite, self.controls, self.low_qv, self.missing_gene = (int(v) for v in stats[:5])
        self.kept = int(stats[5])

    def as_dict(self) -> dict[str, int]:
        """Return the counts as a plain dictionary."""
        return {
            "total": self.total,
            "kept": self.kept,
            "dropped_controls": self.controls,
            "dropped_low_qv": self.low_qv,
            "dropped_nonfinite": self.nonfinite,
            "dropped_missing_gene": self.missing_gene,
            "outside_region": self.outside,
        }

    def log(self, what: str, *, min_qv: float | None, warn: bool = True) -> None:
        """Report what was dropped as one :class:`MoleculesDroppedWarning` (an info line when nothing was).

        ``warn=False`` (layers that st2he's tools build for themselves) logs an info line instead.
        """
        qv = f"qv < {min_qv:g}" if min_qv is not None else "low qv"
        reasons = (
            (self.controls, "control probes" if self.controls != 1 else "control probe"),
            (self.low_qv, f"with {qv}"),
            (self.nonfinite, "with NaN or infinite coordinates"),
            (self.missing_gene, "without a gene name"),
        )
        dropped = [f"{n} {reason}" for n, reason in reasons if n]
        msg = f"{what}: kept {self.kept} of {self.total} molecules"
        if dropped:
            msg += f"; dropped {sum(n for n, _ in reasons)}: " + ", ".join(dropped)
        if self.outside:
            msg += f"; {self.outside} kept molecules lie outside the region"
        if dropped and warn:
            warnings.warn(msg + ".", MoleculesDroppedWarning, stacklevel=3)
        else:
            logger.info("%s.", msg)


class MoleculesDroppedWarning(UserWarning):
    """Molecules were left out of a picture: control probes, low quality, non-finite coordinates or no gene."""


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


def molecule_source(
    sdata, points_key: str = "transcripts", *, need_genes: bool = True, coordinate_system: str = COORDINATE_SYSTEM
) -> MoleculeSource:
    """Validate ``points_key`` and find its gene, quality and control columns.

    The gene column is the points element's ``feature_key`` (spatialdata's PointsModel attribute); without
    one, the first of :data:`GENE_COLUMNS` present is used. ``need_genes=True`` makes its absence an error.
    ``affine`` maps the points to ``coordinate_system`` (``global`` unless told).
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
    if coordinate_system not in transformations:
        msg = (
            f"The points element {points_key!r} has no transformation to the coordinate system "
            f"{coordinate_system!r} (it has {sorted(transformations)})."
        )
        raise ValueError(msg)
    affine = np.asarray(
        transformations[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")),
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

    def encode(self, values) -> tuple[np.ndarray, np.ndarray]:
        """Raw codes of a column of gene names (categorical or strings) and the lookup table to global codes."""
        if isinstance(values.dtype, pd.CategoricalDtype):
            cat = values.array
            categories = [str(c) for c in cat.categories]
            raw = np.asarray(cat.codes)
        else:
            raw, uniques = pd.factorize(values.astype(str), sort=False)
            categories = [str(c) for c in uniques]
        lut = np.fromiter((self.code(c) for c in categories), dtype=np.int32, count=len(categories))
        if len(lut) == 0:
            lut = np.zeros(1, dtype=np.int32)  # every raw code is -1 here
        return raw, lut


_EMPTY_BOOL = np.zeros(0, dtype=bool)
_EMPTY_F32 = np.zeros(0, dtype=np.float32)
_EMPTY_I8 = np.zeros(0, dtype=np.int8)


def _raw_partitions(source: MoleculeSource, genes: GeneCodes, *, min_qv, drop_controls, columns=None, extra=()):
    """Yield the arrays the kernels read from each non-empty partition.

    ``extra``: more columns to read; each partition then also yields a tuple of those columns (pandas Series).
    """
    import dask

    columns = list(columns or source.columns)
    columns += [c for c in extra if c not in columns]
    points = source.points
    # selecting columns lets parquet skip the others, but copies in-memory frames: skip it when all are needed
    frame = points if list(points.columns) == columns else points[columns]
    control_code = np.zeros(1, dtype=bool)
    for part in frame.to_delayed():
        df = dask.compute(part, scheduler="sync")[0]
        if len(df) == 0:
            continue
        x = _numeric(df["x"])
        y = _numeric(df["y"])
        raw, lut = _EMPTY_I8, np.zeros(1, dtype=np.int32)
        if source.gene_column is not None and source.gene_column in df.columns:
            raw, lut = genes.encode(df[source.gene_column])
        if len(control_code) != max(len(genes.names), 1):
            control_code = is_control_name(genes.names) if genes.names else np.zeros(1, dtype=bool)
        control_col = _EMPTY_BOOL
        if drop_controls and source.control_column is not None and source.control_column in df.columns:
            control_col = df[source.control_column].fillna(False).to_numpy(dtype=bool)
        qv = _EMPTY_F32
        if min_qv is not None and source.qv_column is not None and source.qv_column in df.columns:
            qv = _numeric(df[source.qv_column])
        if extra:
            yield x, y, raw, lut, control_code, control_col, qv, tuple(df[c] for c in extra)
        else:
            yield x, y, raw, lut, control_code, control_col, qv


def _affine(source: MoleculeSource) -> tuple[np.ndarray, bool]:
    return np.ascontiguousarray(source.affine[:2], dtype=np.float64), bool(np.allclose(source.affine, np.eye(3)))


def _numeric(series) -> np.ndarray:
    """Return a numeric column as a float numpy array (NaN for missing values)."""
    dtype = series.dtype
    if isinstance(dtype, np.dtype) and dtype.kind == "f":
        return series.to_numpy()
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


def points_extent(source: MoleculeSource) -> tuple[float, float, float, float] | None:
    """``(x_min, y_min, x_max, y_max)`` in global µm of the molecules with finite coordinates (``None``: none).

    Reads the coordinate columns only, so filtering does not enter: the extent of all molecules.
    """
    from ._kernels import extent_of

    affine, identity = _affine(source)
    box = np.array([np.inf, np.inf, -np.inf, -np.inf])
    for x, y, *_ in _raw_partitions(source, GeneCodes(), min_qv=None, drop_controls=False, columns=["x", "y"]):
        extent_of(x, y, affine, identity, box)
    if not np.all(np.isfinite(box)):
        return None
    return float(box[0]), float(box[1]), float(box[2]), float(box[3])


@dataclass
class _Part:
    """The bucketed molecules of one partition, in memory or spilled to a file.

    Molecules are sorted by block; :attr:`BinnedMolecules.index` says where each block's run lies. Pickled (for
    a worker process of a ``dask.distributed`` cluster), a part in memory travels with its values, a part in a
    spill file that other processes can open (``path``: a folder the user named) as that path, opened there on
    first use; a part in a private, already unlinked spill file travels with its values, read back.
    """

    n: int  # molecules
    packed: np.ndarray | None  # uint32 gene code << 16 | row_in_block << 8 | col_in_block
    fd: int | None = None  # spilled: the packed values lie in this file ...
    offset: int = 0  # ... from this byte on, read back with pread
    path: str | None = None  # the spill file's path when other processes may open it (else it is unlinked)

    def slice(self, s: int, e: int) -> np.ndarray:
        if self.packed is not None:
            return self.packed[s:e]
        fd = self.fd if self.fd is not None else _shared_fd(self.path)
        # positional reads: thread-safe, and nothing stays mapped, so resident memory does not grow
        return np.frombuffer(os.pread(fd, 4 * (e - s), self.offset + 4 * s), dtype=np.uint32)

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.packed is None and self.path is None:  # a private spill file: the values travel
            state["packed"], state["offset"] = self.slice(0, self.n), 0
        state["fd"] = None  # a file descriptor means nothing in another process
        return state


#: Spill files named by path, opened read-only once per process (``{path: (pid, fd)}``).
_SHARED_FDS: dict[str, tuple[int, int]] = {}
_SHARED_FDS_LOCK = threading.Lock()


def _shared_fd(path: str) -> int:
    """A read-only descriptor of the spill file ``path``, opened on first use in this process and kept."""
    pid = os.getpid()
    held = _SHARED_FDS.get(path)
    if held is not None and held[0] == pid:
        return held[1]
    with _SHARED_FDS_LOCK:  # the worker's threads open it once
        return _open_shared(path, pid)


def _open_shared(path: str, pid: int) -> int:
    held = _SHARED_FDS.get(path)
    if held is None or held[0] != pid:  # none yet, or inherited through a fork
        if len(_SHARED_FDS) >= 256:  # a long-lived worker: let go of the files already removed
            for old in [p for p, (owner, _) in _SHARED_FDS.items() if owner == pid and not os.path.exists(p)]:
                _close_quietly(_SHARED_FDS.pop(old)[1])
        try:
            held = _SHARED_FDS[path] = (pid, os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0)))
        except FileNotFoundError as err:
            msg = (
                f"The molecules' spill file {path} is gone: it is removed when the rasterised element that made it "
                f"is dropped, and every worker must see its folder (spill_dir= on storage shared by all workers)."
            )
            raise FileNotFoundError(msg) from err
    return held[1]


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:  # pragma: no cover - already closed
        pass


@dataclass
class BinnedMolecules:
    """Kept molecules bucketed by blocks of ``BUCKET x BUCKET`` pixels (:data:`st2he.pp._kernels.BUCKET`).

    The lattice has ``pixel_size`` µm pixels counted from ``(x0, y0)`` (global µm): block ``(I, J)`` holds
    pixel rows ``I * BUCKET ..`` and columns ``J * BUCKET ..``. ``grid`` is the output grid, read in chunks of
    ``chunk`` pixels (see :meth:`place` and :meth:`pieces`).
    """

    x0: float
    y0: float
    pixel_size: float
    chunk: int
    genes: list[str]
    report: FilterReport
    grid: Grid | None = None
    # µm bounds of the pixels holding molecules (see bin_molecules)
    extent: tuple[float, float, float, float] | None = None
    parts: list[_Part] = field(default_factory=list)
    index: dict[tuple[int, int], list[tuple[int, int, int]]] = field(default_factory=dict)  # block -> (part, s, e)
    spill_dir: str | None = None  # the folder of a spill file other processes may open (kept until dropped)
    spill_fd: int | None = None  # the spill file, open for appending (and its parts' reading)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    shift: tuple[int, int] = (0, 0)  # the grid's first pixel in lattice pixels (row, col)

    @property
    def block_rows(self) -> int:
        """Number of chunk rows of ``grid``."""
        return max(1, math.ceil(self.grid.height / self.chunk))

    @property
    def block_cols(self) -> int:
        """Number of chunk columns of ``grid``."""
        return max(1, math.ceil(self.grid.width / self.chunk))

    @property
    def origin_pixel(self) -> tuple[int, int]:
        """The lattice origin's pixel ``(row, col)`` on the lattice of ``pixel_size`` anchored at 0 µm."""
        return round(self.y0 / self.pixel_size), round(self.x0 / self.pixel_size)

    def __dask_tokenize__(self):
        return ("st2he-binned-molecules", self.token, self.shift)

    def __getstate__(self):
        return {**self.__dict__, "spill_fd": None}  # the parts carry what another process needs

    def place(self, grid: Grid) -> None:
        """Read the blocks for ``grid``: same pixel size, origin on the lattice (``x0``, ``y0`` + whole pixels)."""
        if not math.isclose(grid.pixel_size, self.pixel_size, rel_tol=1e-9):
            msg = f"The grid's pixels ({grid.pixel_size} µm) differ from the molecules' ({self.pixel_size} µm)."
            raise ValueError(msg)
        row = (grid.y0 - self.y0) / self.pixel_size
        col = (grid.x0 - self.x0) / self.pixel_size
        if abs(row - round(row)) > 1e-6 or abs(col - round(col)) > 1e-6:
            msg = f"The grid's origin ({grid.x0}, {grid.y0}) µm is not on the molecules' pixel lattice."
            raise ValueError(msg)
        self.grid = grid
        self.shift = (int(round(row)), int(round(col)))

    def buckets(self, bi: int, bj: int) -> Iterator[np.ndarray]:
        """The packed molecules of lattice block ``(bi, bj)``, one array per stored part (nothing is copied).

        ``packed`` = gene code << 16 | row_in_block << 8 | col_in_block.
        """
        for p, s, e in self.index.get((bi, bj), ()):
            yield self.parts[p].slice(s, e)

    def pieces(self, row: int, col: int, h: int, w: int, reach: int = 0):
        """Buckets that can draw into rows ``row:row + h`` and columns ``col:col + w`` of ``grid``.

        Yields ``(packed, row0, col0, grow0, gcol0)``: the bucket's first pixel lies ``(row0, col0)`` pixels from
        the window's first pixel and at ``(grow0, gcol0)`` on the lattice anchored at 0 µm (for
        :func:`st2he.pp._kernels.priority`); molecules outside the window are the caller's to skip. ``reach``:
        pixels a molecule draws beyond its own (dots).
        """
        r0, c0 = self.shift[0] + row, self.shift[1] + col
        gr, gc = self.origin_pixel
        for bi in range((r0 - reach) >> BUCKET_BITS, ((r0 + h - 1 + reach) >> BUCKET_BITS) + 1):
            for bj in range((c0 - reach) >> BUCKET_BITS, ((c0 + w - 1 + reach) >> BUCKET_BITS) + 1):
                for packed in self.buckets(bi, bj):
                    yield packed, bi * BUCKET - r0, bj * BUCKET - c0, gr + bi * BUCKET, gc + bj * BUCKET

    def block(self, bi: int, bj: int) -> tuple[np.ndarray, np.ndarray]:
        """``(pixel offsets row * BUCKET + col, gene codes)`` of the molecules in lattice block ``(bi, bj)``."""
        arrays = list(self.buckets(bi, bj))
        if not arrays:
            return np.empty(0, np.int32), np.empty(0, np.int32)
        packed = np.concatenate(arrays).astype(np.int64)
        return (packed & 0xFFFF).astype(np.int32), (packed >> 16).astype(np.int32)


#: Most blocks one partition may span (beyond, its molecules lie absurdly far apart for the pixel size).
MAX_BLOCKS = 1 << 22


class _Arena:
    """Memory for the buckets kept in memory, taken from the system in slabs of plain anonymous mappings.

    The kernel writes each partition's buckets straight into a slab (no copy). NumPy asks for transparent huge
    pages on large arrays; faulting those in costs several times more than small pages in virtual machines (measured
    here: 2.4 against 0.35 ms per MB), and buckets are written once and read once, so they gain nothing from them.
    """

    def __init__(self, slab: int = 64 * 2**20) -> None:
        self.slab = slab
        self.next = 2**20  # slabs double from 1 MB up to ``slab``, so small jobs stay small
        self.current = np.empty(0, np.uint32)
        self.used = 0

    @property
    def free(self) -> np.ndarray:
        """The unused end of the current slab (``uint32``)."""
        return self.current[self.used :]

    def reserve(self, n: int) -> np.ndarray:
        """At least ``n`` free ``uint32`` values, in a new slab if the current one has too few."""
        if len(self.current) - self.used < n:
            nbytes = max(min(self.next, self.slab), 4 * n)
            self.next *= 2
            if hasattr(mmap, "MAP_ANONYMOUS"):  # POSIX
                memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            else:  # Windows: anonymous memory too
                memory = mmap.mmap(-1, nbytes)
            self.current = np.frombuffer(memory, dtype=np.uint32)
            self.used = 0
        return self.free

    def take(self, n: int) -> np.ndarray:
        """Keep the first ``n`` values of :attr:`free`; return them."""
        out = self.current[self.used : self.used + n]
        self.used += n
        return out


class _Buffers:
    """Work arrays for :func:`bin_molecules`, reused across partitions and grown when one is larger."""

    def __init__(self) -> None:
        self.size = 0

    def fit(self, n: int, bins: bool) -> None:
        if n <= self.size and (not bins or len(self.bin_keys) >= n):
            return
        size = max(n, self.size)
        self.size = size
        self.rows = np.empty(size, np.int32)
        self.cols = np.empty(size, np.int32)
        self.packed = np.empty(size, np.uint32)
        self.codes = np.empty(size, np.int32)
        self.flags = np.empty(size, np.uint8)
        self.out = np.empty(size, np.uint32)
        self.bin_keys = np.empty(size if bins else 0, np.int64)
        self.bin_codes = np.empty(size if bins else 0, np.int32)


def bin_molecules(
    source: MoleculeSource,
    grid: Grid | None = None,
    *,
    pixel_size: float | None = None,
    origin: tuple[float, float] | None = None,
    chunk: int = 1024,
    min_qv: float | None = 20.0,
    drop_controls: bool = True,
    genes: Sequence[str] = (),
    memory_limit: int = 512 * 2**20,
    spill_dir: str | None = None,
    bins=None,
    store: bool = True,
) -> BinnedMolecules:
    """One streaming pass over ``source``: filter, map to pixels, bucket by blocks of pixels (4 bytes a molecule).

    With ``grid``, the molecules are bucketed on its lattice and those outside it are counted as outside. Without
    one, every kept molecule is bucketed on the lattice of ``pixel_size`` µm pixels through ``origin`` (default:
    the lattice anchored at 0 µm, through the first molecules' pixel) and the extent of the pixels that hold kept
    molecules is recorded (``binned.extent`` = (x_min, y_min, x_max, y_max) µm on the lattice, the far edges
    exclusive; with a grid, of the pixels inside it), so that the output grid can be chosen after this single
    reading; then call :meth:`BinnedMolecules.place`. ``chunk`` is the output grid's chunk edge in pixels.

    ``genes`` fixes the first gene codes (others are appended as met). ``bins`` (a
    :class:`st2he.pp._palette.BinCounts`) gathers co-expression statistics of all kept molecules, inside the
    grid or not, in the same pass. Buckets beyond ``memory_limit`` bytes go to a spill file: by default a
    temporary file unlinked as soon as it is opened (nothing is left behind, even by a killed run); with
    ``spill_dir``, a named file in that folder, which every worker of a ``dask.distributed`` cluster can open
    when the folder is on shared storage (pickled, the parts name it instead of carrying their values), removed
    when the returned object is garbage-collected (files of killed runs on this machine are removed at the next
    spill there). Molecules are read in batches of :data:`BATCH`; each batch becomes one part.
    ``store=False`` keeps no buckets: the pass only filters, counts, finds the extent and gathers ``bins`` (the
    same statistics, from the same code, as a stored pass).

    A molecule is dropped for non-finite coordinates, as a control probe (``drop_controls``; by name, see
    :data:`CONTROL_PATTERN`, or by a boolean control column), for a quality value below ``min_qv`` (when the
    points have a quality column; a NaN quality value, as st2he's readers write for platforms without one, is
    kept; ``None`` keeps all) or for a missing gene name, counted under the first reason in that order. Without
    a gene column every code is 0.
    """
    from ._kernels import extent_of

    if chunk < 1 or chunk > 46340:
        msg = f"chunk must be between 1 and 46340 pixels, got {chunk}."
        raise ValueError(msg)
    if grid is not None:
        pixel_size, origin = grid.pixel_size, (grid.x0, grid.y0)
    elif pixel_size is None:
        msg = "bin_molecules needs a grid or a pixel_size."
        raise ValueError(msg)
    codes_book = GeneCodes(genes)
    binner = None
    for x, y, raw, lut, control_code, control_col, qv in _raw_partitions(
        source, codes_book, min_qv=min_qv, drop_controls=drop_controls
    ):
        _check_panel(codes_book.names)
        if binner is None:
            if origin is None:  # the lattice through the first molecules' pixel
                affine, identity = _affine(source)
                box = np.array([np.inf, np.inf, -np.inf, -np.inf])
                extent_of(x, y, affine, identity, box)
                origin = lattice_origin(box if np.isfinite(box[0]) else (0.0, 0.0), pixel_size)
            binned = BinnedMolecules(origin[0], origin[1], pixel_size, chunk, codes_book.names, FilterReport())
            binner = _Binner(
                binned,
                source,
                grid,
                bins,
                drop_controls=drop_controls,
                min_qv=min_qv,
                memory_limit=memory_limit,
                spill_dir=spill_dir,
                store=store,
            )
        n = len(x)
        # in batches: the work arrays stay small (in cache, and cheap to touch for the first time)
        for s in range(0, n, BATCH):
            e = min(n, s + BATCH)
            binner.add(*(a[s:e] if len(a) == n else a for a in (x, y, raw, control_col, qv)), lut, control_code)
    _check_panel(codes_book.names)
    if binner is None:  # no partition with molecules
        origin = origin if origin is not None else (0.0, 0.0)
        binned = BinnedMolecules(origin[0], origin[1], pixel_size, chunk, codes_book.names, FilterReport())
    else:
        binned = binner.binned
        if binner.box[0] <= binner.box[2]:
            binned.extent = binner.extent_um()
    if grid is not None:
        binned.place(grid)
    return binned


#: Molecules handled by one call of the binning kernel.
BATCH = 1 << 18


def lattice_origin(bounds, pixel_size: float) -> tuple[float, float]:
    """The point of the pixel lattice anchored at 0 µm at or before the top-left corner ``bounds[:2]`` (µm)."""
    return (
        math.floor(bounds[0] / pixel_size + 1e-9) * pixel_size,
        math.floor(bounds[1] / pixel_size + 1e-9) * pixel_size,
    )


def _check_panel(names: Sequence[str]) -> None:
    if len(names) > MAX_GENES:
        msg = f"The molecules name {len(names)} genes; st2he draws at most {MAX_GENES}."
        raise ValueError(msg)


class _Binner:
    """The state of one binning pass: its options, running counts and extent, work arrays and kept memory."""

    def __init__(self, binned, source, grid, bins, *, drop_controls, min_qv, memory_limit, spill_dir, store):
        self.binned, self.key, self.bins, self.grid = binned, source.key, bins, grid
        self.affine, self.identity = _affine(source)
        self.drop_controls = bool(drop_controls)
        self.min_qv = float(min_qv) if min_qv is not None else -np.inf
        self.memory_limit = memory_limit
        self.spill_dir = spill_dir  # a folder every worker can read (None: a private, unlinked temporary file)
        self.store = store  # False: statistics only, no buckets
        self.stats = np.zeros(6, dtype=np.int64)
        # lattice pixels (col_min, row_min, col_max, row_max) of the bucketed molecules
        self.box = np.array([2**62, 2**62, -(2**62), -(2**62)], dtype=np.int64)
        self.buffers = _Buffers()
        self.arena = _Arena()
        self.in_memory = 0

    def extent_um(self) -> tuple[float, float, float, float]:
        """The pixels of :attr:`box` as ``(x_min, y_min, x_max, y_max)`` µm, far edges exclusive."""
        (c0, r0, c1, r1), b = self.box.tolist(), self.binned
        ps = b.pixel_size
        return (b.x0 + c0 * ps, b.y0 + r0 * ps, b.x0 + (c1 + 1) * ps, b.y0 + (r1 + 1) * ps)

    def add(self, x, y, raw, control_col, qv, lut, control_code) -> None:
        """Bucket one batch of molecules into a new part of ``binned``."""
        from ._kernels import bin_partition

        binned, bins, grid, buffers = self.binned, self.bins, self.grid, self.buffers
        buffers.fit(len(x), bins is not None)
        # write straight into memory that is kept when this part is likely to stay in memory
        keep_in_memory = self.store and self.in_memory + 4 * len(x) <= self.memory_limit
        out = self.arena.reserve(len(x)) if keep_in_memory else buffers.out
        row0, col0, nbr, nbc, starts, n_in, n_kept, n_bins = bin_partition(
            x,
            y,
            raw,
            lut,
            control_code,
            control_col,
            qv,
            self.affine,
            self.identity,
            self.drop_controls,
            self.min_qv,
            self.stats,
            binned.x0,
            binned.y0,
            binned.pixel_size,
            grid.height if grid is not None else 0,
            grid.width if grid is not None else 0,
            bins.bin_size if bins is not None else 0.0,
            bins.level if bins is not None else 0,
            self.box,
            buffers.rows,
            buffers.cols,
            buffers.packed,
            buffers.codes,
            buffers.flags,
            out,
            buffers.bin_keys,
            buffers.bin_codes,
            MAX_BLOCKS if self.store else 0,  # not storing: no blocks, so no sort
        )
        binned.report.update(self.stats)
        binned.report.outside += int(n_kept) - int(n_in)
        if bins is not None and n_bins:
            bins.add(buffers.bin_keys[:n_bins].copy(), buffers.bin_codes[:n_bins].copy())
        if not self.store:
            return
        if nbr < 0:
            e = self.extent_um()
            msg = (
                f"The molecules of {self.key!r} span more than {MAX_BLOCKS} blocks of {BUCKET} x {BUCKET} pixels of "
                f"{binned.pixel_size} µm: some coordinates lie far from the others (kept molecules so far: x "
                f"{e[0]:g}..{e[2]:g}, y {e[1]:g}..{e[3]:g} µm). Give region=(x_min, y_min, x_max, y_max) in µm or a "
                f"larger pixel_size."
            )
            raise ValueError(msg)
        if n_in == 0:
            return
        index = len(binned.parts)
        if keep_in_memory:
            self.in_memory += 4 * n_in
            part = _Part(int(n_in), self.arena.take(n_in))
        else:
            if binned.spill_fd is None:
                binned.spill_fd = _open_spill(binned, self.spill_dir)
            offset = _spill(out[:n_in], binned.spill_fd)
            part = _Part(int(n_in), None, binned.spill_fd, offset, path=_spill_path(binned))
        binned.parts.append(part)
        for k in np.flatnonzero(np.diff(starts)).tolist():
            a, b = divmod(k, nbc)
            binned.index.setdefault((row0 + a, col0 + b), []).append((index, int(starts[k]), int(starts[k + 1])))


def _spill(packed: np.ndarray, fd: int) -> int:
    """Append one part's buckets to the spill file (from the array's own memory, no copy); return its offset."""
    offset = os.lseek(fd, 0, os.SEEK_END)
    data = memoryview(np.ascontiguousarray(packed, dtype=np.uint32)).cast("B")
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])
    return offset


def _spill_path(binned: BinnedMolecules) -> str | None:
    return os.path.join(binned.spill_dir, _spill_name(binned.token)) if binned.spill_dir is not None else None


def _spill_name(token: str, pid: int | None = None) -> str:
    return f"st2he-molecules-{_HOST}-{os.getpid() if pid is None else pid}-{token}.bin"


_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_SPILL_NAME = re.compile(r"^st2he-molecules-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[0-9a-f]+\.bin$")


def _open_spill(binned: BinnedMolecules, spill_dir: str | None) -> int:
    """Open the spill file of ``binned`` for appending and reading; return its descriptor.

    Without ``spill_dir`` the file is made in the system's temporary folder and unlinked at once (POSIX): only
    this descriptor reaches it, and the system frees it when the descriptor is closed, even when the process
    is killed. In ``spill_dir`` (a folder every worker of a cluster can read) it keeps its name, is removed when
    ``binned`` is garbage-collected or at exit, and files left there by killed runs on this machine are removed
    now.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    if spill_dir is None:
        fd, path = tempfile.mkstemp(prefix="st2he-molecules-", suffix=".bin")
        try:
            os.unlink(path)
            weakref.finalize(binned, _close_quietly, fd)
        except OSError:  # Windows: an open file cannot be unlinked; remove it when done
            weakref.finalize(binned, _close, fd, path)
        return fd
    os.makedirs(spill_dir, exist_ok=True)
    _remove_stale_spills(spill_dir)
    binned.spill_dir = os.path.abspath(spill_dir)
    path = _spill_path(binned)
    fd = os.open(path, flags, 0o644)
    weakref.finalize(binned, _close, fd, path)
    return fd


def _remove_stale_spills(folder: str) -> None:
    """Remove the spill files in ``folder`` that runs on this machine left when they were killed."""
    for name in os.listdir(folder):
        m = _SPILL_NAME.match(name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        try:
            os.remove(os.path.join(folder, name))
            logger.info("Removed the spill file %s left by a run that ended without cleaning up.", name)
        except OSError:  # pragma: no cover - removed meanwhile
            pass


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. no permission: it exists
        return True
    return True


def _close(fd: int, path: str) -> None:
    _close_quietly(fd)
    try:
        os.remove(path)
    except OSError:
        pass
