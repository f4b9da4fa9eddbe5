"""Counts of molecules per unit of expression (square bins, pseudo-Visium spots or cells) in one streaming pass.

The molecules are read once, one partition at a time, and filtered by the rasteriser's own compiled pass
(:func:`st2he.pp._kernels.bin_partition`: controls, low quality, non-finite coordinates and missing gene names, by
the same rules and with the same report as :func:`st2he.pp.rasterize_transcripts`). Each batch of kept molecules is
assigned to its unit and reduced at once to ``(unit, gene, count)`` triples, which are merged as they accumulate:
memory grows with the number of non-zero counts of the result, never with the number of molecules.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from st2he._elements import check_key_free, write_elements
from st2he._grid import COORDINATE_SYSTEM
from st2he._units import unit_centroids

from ._kernels import BUCKET, BUCKET_BITS, bin_partition
from ._molecules import (
    BATCH,
    FilterReport,
    GeneCodes,
    MoleculeSource,
    _affine,
    _Buffers,
    _check_panel,
    _raw_partitions,
    is_control_name,
    molecule_source,
)

logger = logging.getLogger("st2he")

#: What ``by`` may be.
UNITS = ("bins", "spots", "cells")
#: The ``region_key`` and ``instance_key`` of the tables st2he writes.
REGION_KEY = "region"
INSTANCE_KEY = "instance_id"
#: Values of a cell id column that mean "in no cell" (Xenium writes ``UNASSIGNED``, older versions ``-1``; CosMx
#: ``0``), compared as lower-case text; a value that names a shape is that shape's all the same.
UNASSIGNED = frozenset({"unassigned", "", "-1", "0", "nan", "none", "<na>"})
#: Columns of ``obs`` written by :func:`aggregate_transcripts` (``labels_column`` may not take one of these names).
OBS_COLUMNS = (INSTANCE_KEY, REGION_KEY, "total_counts", "area_um2", "array_row", "array_col")
#: Grid units are keyed ``row << 32 | (col + 2**31)`` (int64, ordered by row then column); rows and columns beyond
#: ``2**30`` mean coordinates astray.
_COL_OFFSET = 1 << 31
_MAX_INDEX = 1 << 30


# ----------------------------------------------------------------------------------------------- the public function


def aggregate_transcripts(
    sdata,
    *,
    points_key: str = "transcripts",
    by: str = "bins",
    bin_size: float = 8.0,
    spot_diameter: float = 55.0,
    spot_spacing: float = 100.0,
    shapes_key: str | None = None,
    cell_id_column: str | None = "auto",
    genes: Sequence[str] | None = None,
    min_qv: float | None = 20.0,
    drop_controls: bool = True,
    min_counts: int = 1,
    labels_key: str | None = None,
    labels_column: str | None = None,
    coordinate_system: str = COORDINATE_SYSTEM,
    key_added: str | None = None,
    shapes_added: str | None = None,
    overwrite: bool = False,
):
    """Count the molecules of each gene in square bins, pseudo-Visium spots or cells: a table of units.

    The molecules are read once, partition by partition, and never held together: the counts accumulate as
    ``(unit, gene, count)`` triples, so memory grows with the result, not with the slide. Molecules are filtered
    exactly as :func:`rasterize_transcripts` filters them (control probes, quality below ``min_qv``, non-finite
    coordinates, no gene name), with the same :class:`MoleculesDroppedWarning`.

    Units, in micrometres of ``coordinate_system`` (the molecules are mapped there through their transformation):

    - ``"bins"``: squares of ``bin_size`` µm anchored at the origin. A molecule at ``(x, y)`` counts in the bin
      ``array_col = floor(x / bin_size)``, ``array_row = floor(y / bin_size)`` (the same lattice as the pixels of
      :func:`transcript_density` at ``pixel_size=bin_size``, so a molecule on an edge counts in the bin to its right
      or below); the bin's id is ``f"{array_row}_{array_col}"``, the same in every call over the same area.
    - ``"spots"``: disks of ``spot_diameter`` µm on a hexagonal lattice anchored at the origin, as pseudo-Visium
      spots: row pitch ``spot_spacing * sqrt(3) / 2``, odd rows shifted by ``spot_spacing / 2``, centre
      ``x = (array_col + (array_row % 2) / 2) * spot_spacing``, ``y = array_row * spot_spacing * sqrt(3) / 2``, id
      ``f"{array_row}_{array_col}"``. A molecule counts in the spot whose disk holds it (edge included); molecules
      between the disks count nowhere. Disks may touch (``spot_diameter == spot_spacing``; a molecule on the point
      where two touch counts in the one with the lower ``array_row``, then the lower ``array_col``), never overlap:
      ``spot_diameter > spot_spacing`` is refused, as it would count molecules twice.
    - ``"cells"``: the cells of shapes element ``shapes_key`` (polygons, or circles: points with a ``radius``
      column). A molecule counts in the cell its points' cell id column names (see ``cell_id_column``), else in
      the cell whose shape holds it (edge included; where shapes overlap or share an edge, the first in the
      element's order).

    Bins and spots with at least ``min_counts`` molecules are written as a new shapes element ``shapes_added``
    (bins as square polygons; spots as spatialdata's circles, points with a ``radius`` column), indexed by their
    ids. Cells are ``shapes_key`` itself (nothing new is written there) and every cell is kept, with or without
    molecules.

    Parameters
    ----------
    sdata
        SpatialData object with the molecules as a points element.
    points_key
        Points element of the molecules; its ``feature_key`` names the gene column.
    by
        ``"bins"``, ``"spots"`` or ``"cells"``.
    bin_size
        Edge of a bin in µm (``by="bins"``; 2, 8 and 16 are Visium HD's).
    spot_diameter, spot_spacing
        Spot disk diameter and centre-to-centre distance in µm (``by="spots"``; Visium: 55 and 100).
    shapes_key
        Shapes element of the cells (``by="cells"``, required).
    cell_id_column
        ``by="cells"``: the points' column naming each molecule's cell. ``"auto"`` (default): the points element's
        ``instance_key`` (else a ``cell_id`` column) when its values name the shapes' index (at least half of the
        assigned values met in the first partition, or of the column's categories, do) and ``shapes_key`` is not
        named like nuclei (``nucle`` in its name: nuclei are indexed by their cell's id, but only the molecules
        inside them are theirs); otherwise molecules are placed by position. A column name uses that column (an
        error when no value of it names a shape); ``None`` always places by position. Values ``"UNASSIGNED"``,
        ``-1``, ``0``, empty or missing, and any value that names no shape, count in no cell (reported).
    genes
        Count only these genes, in this order (default: every kept gene, sorted by name). ``total_counts`` sums
        the genes of the table.
    min_qv
        Molecules whose quality value (Xenium ``qv``) is below this are left out; ``None`` keeps all. Ignored when
        the points have no quality column; a NaN quality value is kept.
    drop_controls
        Leave out control probes (by name, see :data:`st2he.pp._molecules.CONTROL_PATTERN`, or a boolean
        ``is_control`` column).
    min_counts
        Bins and spots with fewer molecules (of the table's genes) are left out; at least 1. Ignored for cells.
    labels_key, labels_column
        Label transfer: each unit gets ``obs[labels_column]``, the value of ``labels_column`` of the shape of
        ``labels_key`` that holds the unit's centroid (the first in order where shapes overlap; missing outside
        every shape), e.g. ``labels_key="regions", labels_column="tissue"`` for the simulated sample.
    coordinate_system
        Coordinate system (µm) of the units, centroids and areas; units are written with an identity
        transformation to it.
    key_added
        Name of the table written (default ``f"{shapes}_table"``).
    shapes_added
        Name of the shapes element of bins or spots (default ``f"bins_{bin_size:g}um"`` or
        ``f"spots_{spot_diameter:g}um"``); not used for cells.
    overwrite
        Replace existing elements of these names (never the points, ``shapes_key``, ``labels_key``, an element of
        another type, or shapes that another table annotates).

    Returns
    -------
    The table as stored, ``sdata.tables[key_added]``: an AnnData of units x genes with ``X`` the counts (CSR
    float32), annotating the units' shapes (``region_key="region"``, ``instance_key="instance_id"``: the unit ids,
    which are also ``obs_names``), ``obs["total_counts"]``, ``obs["area_um2"]``, for bins and spots
    ``obs["array_row"]`` and ``obs["array_col"]``, ``obsm["spatial"]`` the centroids (µm). The parameters and the
    molecule counts (kept, dropped by reason, counted, outside every unit, in units below ``min_counts``, of other
    genes) are recorded with :func:`st2he._elements.record_params` for the table (and the new shapes) and in
    ``table.uns["st2he"]``.
    """
    options = _Options.check(
        by=by,
        bin_size=bin_size,
        spot_diameter=spot_diameter,
        spot_spacing=spot_spacing,
        shapes_key=shapes_key,
        min_counts=min_counts,
        labels_key=labels_key,
        labels_column=labels_column,
    )
    genes = _check_genes(genes)
    if by == "cells":
        shapes_name = _check_shapes_key(sdata, shapes_key, "shapes_key")
        if shapes_added is not None:
            msg = f"shapes_added is for bins and spots; by='cells' counts in shapes_key={shapes_key!r} itself."
            raise ValueError(msg)
    else:
        shapes_name = shapes_added if shapes_added is not None else options.default_shapes_name()
    key_added = key_added if key_added is not None else f"{shapes_name}_table"
    if labels_key is not None:
        _check_shapes_key(sdata, labels_key, "labels_key")
        if labels_column not in sdata.shapes[labels_key].columns:
            msg = (
                f"labels_column={labels_column!r} is not a column of the shapes element labels_key={labels_key!r}; "
                f"its columns are {[c for c in sdata.shapes[labels_key].columns if c != 'geometry']}."
            )
            raise KeyError(msg)
    inputs = {k for k in (points_key, shapes_key, labels_key) if k is not None}
    written = [key_added] if by == "cells" else [shapes_name, key_added]
    if key_added == shapes_name:
        msg = f"key_added and the units' shapes are both named {key_added!r}; name the table differently."
        raise ValueError(msg)
    parameters = {key_added: "key_added", shapes_name: "shapes_added"}
    for key in written:  # before reading any molecule
        kind = "tables" if key == key_added else "shapes"
        check_key_free(
            sdata, key, overwrite=overwrite, parameter=parameters[key], kind=kind, inputs=inputs, replaced=written
        )
    source = molecule_source(sdata, points_key, coordinate_system=coordinate_system)
    if genes is not None and source.panel is not None:  # known now: fail before reading the molecules
        _check_genes_in_panel(genes, _panel(source.panel, [], drop_controls))

    if by == "cells":
        cells = _Shapes.read(sdata, shapes_key, coordinate_system, "shapes_key")
        _unique_ids(cells)
        id_column = _choose_cell_id_column(source, cells, cell_id_column, shapes_key)
        assigner = _CellAssigner(cells, id_column)
    elif by == "bins":
        assigner = _BinAssigner(options.bin_size)
    else:
        assigner = _SpotAssigner(options.spot_diameter, options.spot_spacing)

    book = GeneCodes(source.panel or ())
    report, triples, outside = _count(source, book, assigner, min_qv=min_qv, drop_controls=drop_controls)
    report.log("aggregate_transcripts", min_qv=min_qv if source.qv_column else None)

    panel = _panel(source.panel, book.names, drop_controls)
    if genes is not None:
        _check_genes_in_panel(genes, panel)
    var_names = list(genes) if genes is not None else panel
    table_units = _Table.build(triples, book.names, var_names, assigner, min_counts=options.min_counts)
    if by != "cells" and table_units.n_units == 0:
        msg = (
            f"No {by[:-1]} holds {options.min_counts} or more molecules: nothing to write ({report.kept} of "
            f"{report.total} molecules kept after filtering, {outside} of them outside every {by[:-1]}). Check "
            f"points_key, min_qv, drop_controls, genes and min_counts."
        )
        raise ValueError(msg)

    shapes_element = None if by == "cells" else assigner.shapes(table_units.keys, table_units.ids, coordinate_system)
    centroids, areas = table_units.centroids, table_units.areas
    labels = None
    if labels_key is not None:
        regions = _Shapes.read(sdata, labels_key, coordinate_system, "labels_key")
        labels = _transfer_labels(regions, labels_column, centroids)

    molecules = {
        **report.as_dict(),
        "counted": table_units.counted,
        "outside_units": int(outside),
        "in_units_below_min_counts": table_units.below_min_counts,
        "other_genes": table_units.other_genes,
    }
    molecules.pop("outside_region", None)
    if by == "cells":
        molecules["cells_by"] = "cell_id" if id_column is not None else "position"
        if id_column is not None:
            molecules["cell_ids_not_in_shapes"] = assigner.unknown_ids
    params: dict[str, Any] = {
        "method": "aggregate_transcripts",
        "points_key": points_key,
        "by": by,
        **options.unit_params(),
        "cell_id_column": id_column if by == "cells" else None,
        "genes": list(genes) if genes is not None else None,
        "min_qv": min_qv,
        "drop_controls": bool(drop_controls),
        "labels_key": labels_key,
        "labels_column": labels_column,
        "coordinate_system": coordinate_system,
        "shapes": shapes_name,
        "n_units": table_units.n_units,
        "n_genes": len(var_names),
        "molecules": molecules,
    }
    table = _table_element(table_units, var_names, shapes_name, centroids, areas, labels, labels_column, params)
    elements = {key_added: table} if shapes_element is None else {shapes_name: shapes_element, key_added: table}
    stored = write_elements(
        sdata,
        elements,
        overwrite=overwrite,
        inputs=inputs,
        parameters=parameters,
        params=dict.fromkeys(elements, params),
    )[key_added]
    logger.info(
        "aggregate_transcripts: %d molecules of %d genes counted in %d %s (%d kept molecules outside every unit).",
        table_units.counted,
        len(var_names),
        table_units.n_units,
        by,
        outside,
    )
    return stored


# ----------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class _Options:
    """The validated unit options of one call."""

    by: str
    bin_size: float
    spot_diameter: float
    spot_spacing: float
    min_counts: int

    @classmethod
    def check(cls, *, by, bin_size, spot_diameter, spot_spacing, shapes_key, min_counts, labels_key, labels_column):
        if by not in UNITS:
            msg = f"by must be one of {UNITS}, got {by!r}."
            raise ValueError(msg)
        bin_size = _positive(bin_size, "bin_size")
        spot_diameter = _positive(spot_diameter, "spot_diameter")
        spot_spacing = _positive(spot_spacing, "spot_spacing")
        if by == "spots" and spot_diameter > spot_spacing:
            msg = (
                f"spot_diameter ({spot_diameter:g} µm) is larger than spot_spacing ({spot_spacing:g} µm): the disks "
                f"would overlap and count the molecules between two centres twice. Use spot_diameter <= spot_spacing "
                f"(Visium: 55 and 100 µm)."
            )
            raise ValueError(msg)
        if by == "cells" and shapes_key is None:
            msg = "by='cells' needs shapes_key, the shapes element of the cells (e.g. 'cell_boundaries')."
            raise ValueError(msg)
        if by != "cells" and shapes_key is not None:
            msg = f"shapes_key is for by='cells'; by={by!r} makes its own units (name them with shapes_added)."
            raise ValueError(msg)
        if isinstance(min_counts, bool) or not isinstance(min_counts, numbers.Integral) or min_counts < 1:
            msg = f"min_counts must be a whole number >= 1, got {min_counts!r}."
            raise ValueError(msg)
        if (labels_key is None) != (labels_column is None):
            msg = (
                "labels_key and labels_column go together: the shapes element whose column labels the units and "
                f"that column, e.g. labels_key='regions', labels_column='tissue' (got {labels_key!r}, "
                f"{labels_column!r})."
            )
            raise ValueError(msg)
        if labels_column in OBS_COLUMNS:
            msg = f"labels_column={labels_column!r} is a column the table holds already ({OBS_COLUMNS}); rename it."
            raise ValueError(msg)
        return cls(by, bin_size, spot_diameter, spot_spacing, int(min_counts))

    def default_shapes_name(self) -> str:
        if self.by == "bins":
            return f"bins_{self.bin_size:g}um"
        return f"spots_{self.spot_diameter:g}um"

    def unit_params(self) -> dict[str, Any]:
        if self.by == "bins":
            return {"bin_size": self.bin_size, "min_counts": self.min_counts}
        if self.by == "spots":
            spots = {"spot_diameter": self.spot_diameter, "spot_spacing": self.spot_spacing}
            return {**spots, "min_counts": self.min_counts}
        return {}


def _positive(value, name: str) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not (math.isfinite(value) and value > 0):
        msg = f"{name} must be a positive number of micrometres, got {value!r}."
        raise ValueError(msg)
    return float(value)


def _check_genes(genes) -> list[str] | None:
    if genes is None:
        return None
    if isinstance(genes, Mapping):
        msg = "genes must be a list of gene names (groups of genes are transcript_density's, not a table's)."
        raise TypeError(msg)
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        msg = "genes must name at least one gene (or be None for all of them)."
        raise ValueError(msg)
    return list(dict.fromkeys(genes))


def _check_genes_in_panel(genes: Sequence[str], panel: Sequence[str]) -> None:
    known = set(panel)
    unknown = [g for g in genes if g not in known]
    if unknown:
        shown = ", ".join(repr(g) for g in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        msg = (
            f"{len(unknown)} gene(s) are not in the panel of these molecules (after dropping control probes): "
            f"{shown}. The panel has {len(panel)} genes, e.g. {list(panel)[:5]}."
        )
        raise ValueError(msg)


def _check_shapes_key(sdata, key: str, parameter: str) -> str:
    if key not in sdata.shapes:
        msg = (
            f"{parameter}={key!r} is not a shapes element of this SpatialData object; its shapes elements are "
            f"{sorted(sdata.shapes)}."
        )
        raise KeyError(msg)
    return key


def _panel(panel: Sequence[str] | None, met: Sequence[str], drop_controls: bool) -> list[str]:
    """The genes of the table: the points' categories and every gene met, without controls, sorted by name."""
    names = set(panel or ()) | set(met)
    if drop_controls:
        names = {g for g in names if not is_control_name([g])[0]}
    return sorted(names)


# ----------------------------------------------------------------------------------------------- the streaming pass


def _count(source: MoleculeSource, book: GeneCodes, assigner, *, min_qv, drop_controls):
    """Read the molecules once: filter them, assign the kept ones to units and count ``(unit, gene)`` pairs.

    Returns the filter report, the merged triples ``(unit keys, gene codes, counts)`` and the number of kept
    molecules in no unit.
    """
    stats = np.zeros(6, dtype=np.int64)
    box = np.array([2**62, 2**62, -(2**62), -(2**62)], dtype=np.int64)
    buffers = _Buffers()
    affine, identity = _affine(source)
    qv_limit = float(min_qv) if min_qv is not None else -np.inf
    pixel_size = assigner.pixel_size
    triples = _Triples()
    outside = 0
    extra = assigner.columns
    for part in _raw_partitions(source, book, min_qv=min_qv, drop_controls=drop_controls, extra=extra):
        x, y, raw, lut, control_code, control_col, qv = part[:7]
        _check_panel(book.names)
        n = len(x)
        context = assigner.partition(part[7] if extra else ())
        for s in range(0, n, BATCH):
            e = min(n, s + BATCH)
            xs, ys, raws, ccol, qvs = (a[s:e] if len(a) == n else a for a in (x, y, raw, control_col, qv))
            m = e - s
            buffers.fit(m, False)
            bin_partition(
                xs, ys, raws, lut, control_code, ccol, qvs, affine, identity, bool(drop_controls), qv_limit, stats,
                0.0, 0.0, pixel_size, 0, 0, 0.0, 0, box, buffers.rows, buffers.cols, buffers.packed, buffers.codes,
                buffers.flags, buffers.out, buffers.bin_keys, buffers.bin_codes, 0,
            )  # fmt: skip
            kept = (buffers.flags[:m] & 1).astype(bool)  # the kernel's _INSIDE: kept (no grid: every kept molecule)
            if not kept.any():
                continue
            packed = buffers.packed[:m][kept]
            codes = (packed >> 16).astype(np.int64)
            batch = _Batch(xs, ys, kept, packed, buffers.rows[:m][kept], buffers.cols[:m][kept], affine, identity, s)
            inside, keys = assigner.assign(batch, context)
            outside += int(len(inside) - np.count_nonzero(inside))
            triples.add(keys[inside], codes[inside])
    report = FilterReport()
    report.update(stats)
    return report, triples.merged(), outside


@dataclass
class _Batch:
    """The kept molecules of one batch, as the assigners read them."""

    x: np.ndarray  # raw coordinates of the whole batch
    y: np.ndarray
    kept: np.ndarray  # bool, per molecule of the batch
    packed: np.ndarray  # the kernel's packed values of the kept molecules (gene << 16 | row << 8 | col in block)
    block_rows: np.ndarray  # the kernel's block rows and columns of the kept molecules
    block_cols: np.ndarray
    affine: np.ndarray
    identity: bool
    start: int  # the batch's first molecule in its partition

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates of the kept molecules in the coordinate system (the kernel's arithmetic)."""
        x = np.asarray(self.x[self.kept], dtype=np.float64)
        y = np.asarray(self.y[self.kept], dtype=np.float64)
        if self.identity:
            return x, y
        a = self.affine
        return a[0, 0] * x + a[0, 1] * y + a[0, 2], a[1, 0] * x + a[1, 1] * y + a[1, 2]

    def pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows and columns of the kept molecules on the kernel's lattice (anchored at 0, of its pixel size)."""
        low = BUCKET - 1
        rows = (self.block_rows.astype(np.int64) << BUCKET_BITS) | ((self.packed >> BUCKET_BITS) & low).astype(np.int64)
        cols = (self.block_cols.astype(np.int64) << BUCKET_BITS) | (self.packed & low).astype(np.int64)
        return rows, cols


class _Triples:
    """``(unit key, gene code, count)`` triples, reduced per batch and merged whenever they have doubled."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending = 0
        self.merged_size = 0

    def add(self, keys: np.ndarray, codes: np.ndarray) -> None:
        if len(keys) == 0:
            return
        self.parts.append(_reduce(keys, codes, np.ones(len(keys), dtype=np.int64)))
        self.pending += len(self.parts[-1][0])
        if self.pending > max(2 * self.merged_size, 1 << 22):
            self._merge()

    def _merge(self) -> None:
        keys, codes, counts = (np.concatenate(a) for a in zip(*self.parts, strict=True))
        self.parts = [_reduce(keys, codes, counts)]
        self.merged_size = self.pending = len(self.parts[0][0])

    def merged(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        self._merge()
        return self.parts[0]


def _reduce(keys: np.ndarray, codes: np.ndarray, counts: np.ndarray):
    """Sum ``counts`` per ``(key, code)`` pair; the pairs come back sorted by key, then code."""
    units, unit_of = np.unique(keys, return_inverse=True)
    width = int(codes.max()) + 1
    pair = unit_of.astype(np.int64) * width + codes
    pairs, pair_of = np.unique(pair, return_inverse=True)
    summed = np.bincount(pair_of, weights=counts, minlength=len(pairs))
    return units[pairs // width], pairs % width, np.rint(summed).astype(np.int64)


# ----------------------------------------------------------------------------------------------- units


def _grid_key(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    if len(rows) and (np.abs(rows).max() >= _MAX_INDEX or np.abs(cols).max() >= _MAX_INDEX):
        msg = (
            f"Some molecules lie more than {_MAX_INDEX} units from the origin: their coordinates are astray "
            "(check the points' transformation and units)."
        )
        raise ValueError(msg)
    return (rows.astype(np.int64) << 32) + (cols.astype(np.int64) + _COL_OFFSET)


def _grid_rows_cols(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return keys >> 32, (keys & 0xFFFFFFFF) - _COL_OFFSET


def _grid_ids(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Unit ids ``f"{array_row}_{array_col}"``."""
    return np.array([f"{r}_{c}" for r, c in zip(rows.tolist(), cols.tolist(), strict=True)], dtype=object)


class _BinAssigner:
    """Square bins anchored at the origin: the kernel's own pixel lattice at ``pixel_size = bin_size``."""

    columns: tuple[str, ...] = ()

    def __init__(self, bin_size: float) -> None:
        self.bin_size = bin_size
        self.pixel_size = bin_size

    def partition(self, extra):
        return None

    def assign(self, batch: _Batch, context) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = batch.pixels()
        return np.ones(len(rows), dtype=bool), _grid_key(rows, cols)

    def geometry(self, keys: np.ndarray):
        rows, cols = _grid_rows_cols(keys)
        b = self.bin_size
        centres = np.column_stack([(cols + 0.5) * b, (rows + 0.5) * b])
        return rows, cols, centres, np.full(len(keys), b * b)

    def shapes(self, keys: np.ndarray, ids: np.ndarray, coordinate_system: str):
        import geopandas as gpd
        import shapely

        rows, cols = _grid_rows_cols(keys)
        b = self.bin_size
        frame = gpd.GeoDataFrame(
            {"array_row": rows, "array_col": cols},
            geometry=shapely.box(cols * b, rows * b, (cols + 1) * b, (rows + 1) * b),
            index=pd.Index(ids),
        )
        return _parse_shapes(frame, coordinate_system)


class _SpotAssigner:
    """Disks on a hexagonal lattice anchored at the origin (pseudo-Visium spots)."""

    columns: tuple[str, ...] = ()
    pixel_size = 1.0  # the kernel's lattice is not used

    def __init__(self, diameter: float, spacing: float) -> None:
        self.diameter = diameter
        self.spacing = spacing
        self.radius = diameter / 2
        self.pitch = spacing * math.sqrt(3) / 2

    def centres(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Spot centres (µm) of lattice rows and columns."""
        return (cols + (rows % 2) / 2) * self.spacing, rows * self.spacing * math.sqrt(3) / 2

    def partition(self, extra):
        return None

    def assign(self, batch: _Batch, context) -> tuple[np.ndarray, np.ndarray]:
        x, y = batch.positions()
        first = np.floor(y / self.pitch)
        best = np.full(len(x), np.inf)
        rows = np.zeros(len(x), dtype=np.int64)
        cols = np.zeros(len(x), dtype=np.int64)
        for r in (first, first + 1):  # a disk of diameter <= spacing reaches no farther than the next row
            r = np.clip(r, -_MAX_INDEX, _MAX_INDEX).astype(np.int64)
            # the nearest centre of row r; halfway between two, the lower column
            c = np.ceil(x / self.spacing - (r % 2) / 2 - 0.5)
            c = np.clip(np.nan_to_num(c), -_MAX_INDEX, _MAX_INDEX).astype(np.int64)
            cx, cy = self.centres(r, c)
            d = (x - cx) ** 2 + (y - cy) ** 2
            better = d < best  # strict: on a tie the lower row stays
            best = np.where(better, d, best)
            rows = np.where(better, r, rows)
            cols = np.where(better, c, cols)
        inside = best <= self.radius**2
        return inside, _grid_key(np.where(inside, rows, 0), np.where(inside, cols, 0))

    def geometry(self, keys: np.ndarray):
        rows, cols = _grid_rows_cols(keys)
        cx, cy = self.centres(rows, cols)
        return rows, cols, np.column_stack([cx, cy]), np.full(len(keys), math.pi * self.radius**2)

    def shapes(self, keys: np.ndarray, ids: np.ndarray, coordinate_system: str):
        import geopandas as gpd
        import shapely

        rows, cols = _grid_rows_cols(keys)
        cx, cy = self.centres(rows, cols)
        frame = gpd.GeoDataFrame(
            {"radius": np.full(len(keys), self.radius), "array_row": rows, "array_col": cols},
            geometry=shapely.points(cx, cy),
            index=pd.Index(ids),
        )
        return _parse_shapes(frame, coordinate_system)


def _parse_shapes(frame, coordinate_system: str):
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    return ShapesModel.parse(frame, transformations={coordinate_system: Identity()})


@dataclass
class _Shapes:
    """A shapes element placed in a coordinate system: polygons and circles, its index and its own columns."""

    key: str
    frame: Any  # GeoDataFrame, geometry in the coordinate system
    polygons: np.ndarray  # positions of polygon shapes
    circles: np.ndarray  # positions of circle shapes (points with a radius)
    radius: np.ndarray  # per shape (NaN for polygons)

    @classmethod
    def read(cls, sdata, key: str, coordinate_system: str, parameter: str) -> _Shapes:
        import shapely

        from st2he._elements import affine_to

        element = sdata.shapes[key]
        affine = affine_to(element, coordinate_system, what=f"The shapes element {parameter}={key!r}")
        geoms = np.asarray(element.geometry.values)
        types = shapely.get_type_id(geoms)
        is_point = types == 0
        radius = np.full(len(geoms), np.nan)
        if is_point.any():
            if "radius" not in element.columns:
                msg = f"The shapes element {parameter}={key!r} holds points without a 'radius' column."
                raise ValueError(msg)
            radius[is_point] = np.asarray(element["radius"], dtype=np.float64)[is_point]
        is_polygon = np.isin(types, (3, 6))  # Polygon, MultiPolygon
        other = ~(is_point | is_polygon)
        if other.any():
            kinds = sorted(set(shapely.get_type_id(geoms[other]).tolist()))
            msg = (
                f"The shapes element {parameter}={key!r} holds geometries other than polygons and circles "
                f"(shapely type ids {kinds}); units need an inside."
            )
            raise ValueError(msg)
        if not np.allclose(affine, np.eye(3)):
            m = affine
            geoms = shapely.transform(geoms, lambda c: c @ m[:2, :2].T + m[:2, 2])
            if is_point.any():
                det = abs(np.linalg.det(m[:2, :2]))
                sv = np.linalg.svd(m[:2, :2], compute_uv=False)
                if not math.isclose(sv[0], sv[-1], rel_tol=1e-6):
                    msg = (
                        f"The circles of {parameter}={key!r} would become ellipses in {coordinate_system!r} (its "
                        "transformation scales x and y differently); transform them to polygons first."
                    )
                    raise ValueError(msg)
                radius = radius * math.sqrt(det)
        _, empty = unit_centroids(geoms)
        if empty.any():
            warnings.warn(
                f"{int(empty.sum())} of the {len(geoms)} shapes of {parameter}={key!r} have an empty geometry (e.g. "
                f"{list(element.index[empty][:5])}): they hold molecules only by the molecules' cell ids, never by position, "
                "and their centroid is NaN.",
                UserWarning,
                stacklevel=3,
            )
        frame = element.copy()
        frame.geometry = geoms
        return cls(key, frame, np.flatnonzero(is_polygon & ~empty), np.flatnonzero(is_point & ~empty), radius)

    @property
    def geoms(self) -> np.ndarray:
        return np.asarray(self.frame.geometry.values)

    def centroids(self) -> np.ndarray:
        """``(n, 2)`` x, y of each shape's centroid; NaN for an empty geometry (it has no place)."""
        return unit_centroids(self.geoms)[0]

    def areas(self) -> np.ndarray:
        import shapely

        area = shapely.area(self.geoms)
        area[self.circles] = math.pi * self.radius[self.circles] ** 2
        return area

    def locator(self) -> _Locator:
        return _Locator(self)


class _Locator:
    """Which shape holds each point (edge included; the first in the element's order where several do)."""

    def __init__(self, shapes: _Shapes) -> None:
        import shapely

        geoms = shapes.geoms
        self.polygons = shapes.polygons
        self.circles = shapes.circles
        self.poly_tree = shapely.STRtree(geoms[self.polygons]) if len(self.polygons) else None
        self.circle_xy = shapely.get_coordinates(geoms[self.circles]).reshape(-1, 2)
        self.circle_r = shapes.radius[self.circles]
        self.circle_tree = shapely.STRtree(geoms[self.circles]) if len(self.circles) else None

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        import shapely

        found = np.full(len(x), np.iinfo(np.int64).max)
        if len(x) == 0:
            return np.full(0, -1, dtype=np.int64)
        points = shapely.points(x, y)
        if self.poly_tree is not None:
            i, j = self.poly_tree.query(points, predicate="intersects")
            np.minimum.at(found, i, self.polygons[j])
        if self.circle_tree is not None:
            i, j = self.circle_tree.query(points, predicate="dwithin", distance=float(self.circle_r.max()))
            ok = (x[i] - self.circle_xy[j, 0]) ** 2 + (y[i] - self.circle_xy[j, 1]) ** 2 <= self.circle_r[j] ** 2
            np.minimum.at(found, i[ok], self.circles[j[ok]])
        return np.where(found == np.iinfo(np.int64).max, -1, found)


def _id_text(values) -> np.ndarray:
    """Cell ids as text, so that ``7``, ``7.0`` and ``"7"`` name the same cell (missing values: ``"nan"``)."""
    values = pd.Series(values) if not isinstance(values, pd.Series | pd.Index) else values
    dtype = values.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return values.astype(str).to_numpy(dtype=object)
    if pd.api.types.is_numeric_dtype(dtype):
        v = np.asarray(values.to_numpy(dtype=np.float64, na_value=np.nan))
        whole = np.isfinite(v) & (v == np.round(v))
        out = np.asarray(values.astype(str).to_numpy(dtype=object))
        out[whole] = v[whole].astype(np.int64).astype(str)
        out[~np.isfinite(v)] = "nan"
        return out
    out = values.astype(object).to_numpy(dtype=object)
    missing = pd.isna(out)
    out = out.astype(str).astype(object)
    out[missing] = "nan"
    return out


class _CellAssigner:
    """Cells of a shapes element: by the points' cell id column, or else by position."""

    pixel_size = 1.0

    def __init__(self, cells: _Shapes, id_column: str | None) -> None:
        self.cells = cells
        self.id_column = id_column
        self.columns = (id_column,) if id_column is not None else ()
        self.index = _unique_ids(cells)
        self.locate = cells.locator() if id_column is None else None
        self.unknown_ids = 0  # kept molecules whose id is neither a cell nor an unassigned value

    def partition(self, extra):
        """Shape positions of the molecules of one partition (by id; ``None`` when placed by position)."""
        if self.id_column is None:
            return None
        values = extra[0]
        if isinstance(values.dtype, pd.CategoricalDtype):
            lut = self.index.get_indexer(_id_text(values.cat.categories))
            cats = _id_text(values.cat.categories).astype(str)
            unknown = (lut < 0) & ~np.isin(np.char.lower(cats), list(UNASSIGNED))
            codes = np.asarray(values.cat.codes)
            pos = np.where(codes >= 0, lut[codes], -1)
            return pos, np.where(codes >= 0, unknown[codes], False)
        text = _id_text(values)
        pos = self.index.get_indexer(text)
        unknown = pos < 0
        missing = np.flatnonzero(unknown)
        unknown[missing] = ~np.isin(np.char.lower(text[missing].astype(str)), list(UNASSIGNED))
        return pos, unknown

    def assign(self, batch: _Batch, context) -> tuple[np.ndarray, np.ndarray]:
        if context is None:
            x, y = batch.positions()
            pos = self.locate(x, y)
        else:
            positions, unknown = context
            sl = slice(batch.start, batch.start + len(batch.kept))
            pos = positions[sl][batch.kept].astype(np.int64)
            self.unknown_ids += int(np.count_nonzero(unknown[sl][batch.kept]))
        return pos >= 0, pos

    def geometry(self, keys: np.ndarray):
        return None, None, self.cells.centroids()[keys], self.cells.areas()[keys]


def _unique_ids(cells: _Shapes) -> pd.Index:
    """The cells' ids as text; an error when two cells share one."""
    index = pd.Index(_id_text(cells.frame.index))
    if not index.is_unique:
        twice = list(cells.frame.index[index.duplicated()][:3])
        msg = (
            f"The shapes element {cells.key!r} has repeated index values (e.g. {twice}); each cell needs its own id "
            "to be a unit of the table."
        )
        raise ValueError(msg)
    return index


def _choose_cell_id_column(source: MoleculeSource, cells: _Shapes, cell_id_column, shapes_key: str) -> str | None:
    """The points' column naming each molecule's cell, when it names the cells of ``shapes_key``; else ``None``."""
    if cell_id_column is None:
        return None
    columns = list(source.points.columns)
    if cell_id_column == "auto":
        if "nucle" in shapes_key.lower():  # nuclei carry their cell's id: the cell's molecules are not theirs
            logger.info("aggregate_transcripts: molecules placed in the nuclei of %r by position.", shapes_key)
            return None
        attrs = source.points.attrs.get("spatialdata_attrs", {}) if hasattr(source.points, "attrs") else {}
        candidate = attrs.get("instance_key")
        if candidate not in columns:
            candidate = "cell_id" if "cell_id" in columns else None
        if candidate is None:
            return None
    else:
        if cell_id_column not in columns:
            msg = (
                f"cell_id_column={cell_id_column!r} is not a column of the points element {source.key!r}; its "
                f"columns are {columns}. Pass cell_id_column=None to place the molecules by position."
            )
            raise KeyError(msg)
        candidate = cell_id_column
    sample = _id_sample(source, candidate)
    assigned = sample[~np.isin(np.char.lower(sample.astype(str)), list(UNASSIGNED))] if len(sample) else sample
    matched = int(np.count_nonzero(_unique_ids(cells).get_indexer(assigned) >= 0))
    if cell_id_column == "auto":
        if len(assigned) and matched >= 0.5 * len(assigned):
            logger.info("aggregate_transcripts: molecules assigned to %r by the points' %r.", shapes_key, candidate)
            return candidate
        logger.info(
            "aggregate_transcripts: the points' %r does not name the cells of %r (%d of %d ids met do); molecules "
            "placed by position.",
            candidate,
            shapes_key,
            matched,
            len(assigned),
        )
        return None
    if matched == 0:
        msg = (
            f"No value of the points' cell_id_column={candidate!r} names a shape of shapes_key={shapes_key!r} "
            f"(e.g. {list(assigned[:3])} against {list(cells.frame.index[:3])}). Pass cell_id_column=None to place "
            "the molecules by position."
        )
        raise ValueError(msg)
    return candidate


def _id_sample(source: MoleculeSource, column: str) -> np.ndarray:
    """Distinct cell ids as text: the known categories, else those of the first partition with molecules."""
    import dask

    points = source.points
    dtype = points.dtypes[column]
    if isinstance(dtype, pd.CategoricalDtype) and dtype.categories is not None:
        cats = [str(c) for c in dtype.categories]
        if "__UNKNOWN_CATEGORIES__" not in cats:
            return _id_text(pd.Index(dtype.categories))
    for part in points[column].to_delayed():
        values = dask.compute(part, scheduler="sync")[0]
        if len(values):
            return _id_text(pd.Series(pd.unique(values.dropna()), dtype=object))
    return np.zeros(0, dtype=object)


# ----------------------------------------------------------------------------------------------- the table


@dataclass
class _Table:
    """The units that make the table, their counts and what was left out."""

    keys: np.ndarray  # unit keys (grid keys, or cell positions)
    matrix: Any  # CSR counts, units x var genes
    rows: np.ndarray | None
    cols: np.ndarray | None
    centroids: np.ndarray
    areas: np.ndarray
    ids: np.ndarray  # instance ids
    counted: int
    below_min_counts: int
    other_genes: int

    @property
    def n_units(self) -> int:
        return len(self.keys)

    @classmethod
    def build(cls, triples, gene_names: Sequence[str], var_names: Sequence[str], assigner, *, min_counts: int):
        import scipy.sparse as sp

        keys, codes, counts = triples
        column = pd.Index(var_names).get_indexer(list(gene_names)) if len(gene_names) else np.zeros(0, np.int64)
        col = column[codes] if len(codes) else np.zeros(0, np.int64)
        other = int(counts[col < 0].sum())
        keys, col, counts = keys[col >= 0], col[col >= 0], counts[col >= 0]
        if isinstance(assigner, _CellAssigner):
            units = np.arange(len(assigner.cells.frame), dtype=np.int64)
            unit_of = keys
            below = 0
        else:
            units, unit_of = np.unique(keys, return_inverse=True)
            totals = np.bincount(unit_of, weights=counts, minlength=len(units))
            keep = totals >= min_counts
            below = int(totals[~keep].sum())
            new = np.cumsum(keep) - 1
            sel = keep[unit_of]
            units, unit_of, col, counts = units[keep], new[unit_of[sel]], col[sel], counts[sel]
        matrix = sp.csr_matrix(
            (counts.astype(np.float32), (unit_of, col)), shape=(len(units), len(var_names)), dtype=np.float32
        )
        matrix.sum_duplicates()
        matrix.sort_indices()
        rows, cols, centroids, areas = assigner.geometry(units)
        if isinstance(assigner, _CellAssigner):
            ids = np.asarray(assigner.cells.frame.index)
        else:
            ids = _grid_ids(rows, cols)
        return cls(units, matrix, rows, cols, centroids, areas, ids, int(counts.sum()), below, other)


def _transfer_labels(regions: _Shapes, column: str, centroids: np.ndarray) -> pd.Series:
    """``column`` of the region holding each centroid (missing outside every region)."""
    where = regions.locator()(centroids[:, 0], centroids[:, 1]) if len(centroids) else np.zeros(0, np.int64)
    values = regions.frame[column].reset_index(drop=True)
    out = values.reindex(where).reset_index(drop=True)  # -1 is not an index label: missing
    if isinstance(values.dtype, pd.CategoricalDtype):
        out = out.astype(values.dtype)
    elif values.dtype == object or pd.api.types.is_string_dtype(values.dtype):
        out = pd.Categorical(out.astype(object).where(out.notna(), None))
        out = pd.Series(out)
    return out


def _table_element(units: _Table, var_names, shapes_name, centroids, areas, labels, labels_column, params):
    import anndata as ad
    from spatialdata.models import TableModel

    names = pd.Index(_id_text(pd.Index(units.ids)))
    obs = pd.DataFrame(index=names)
    obs[INSTANCE_KEY] = units.ids
    obs[REGION_KEY] = pd.Categorical([shapes_name] * len(names), categories=[shapes_name])
    obs["total_counts"] = np.asarray(units.matrix.sum(axis=1)).ravel().astype(np.int64)
    obs["area_um2"] = np.asarray(areas, dtype=np.float64)
    if units.rows is not None:
        obs["array_row"] = units.rows.astype(np.int64)
        obs["array_col"] = units.cols.astype(np.int64)
    if labels is not None:
        obs[labels_column] = labels.to_numpy() if not isinstance(labels.dtype, pd.CategoricalDtype) else labels.values
    adata = ad.AnnData(X=units.matrix, obs=obs, var=pd.DataFrame(index=pd.Index(list(var_names))))
    adata.obsm["spatial"] = np.asarray(centroids, dtype=np.float64).reshape(-1, 2)
    adata.uns["st2he"] = _without_none(params)
    return TableModel.parse(adata, region=shapes_name, region_key=REGION_KEY, instance_key=INSTANCE_KEY)


def _without_none(value):
    """A copy of nested parameters without ``None`` values (AnnData cannot write them)."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_without_none(v) for v in value]
    return value
