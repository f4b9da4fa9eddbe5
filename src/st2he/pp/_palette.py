"""One global, deterministic gene palette: a gene gets the same colour in every tile, run and chunk.

Methods
-------
``"hue"``
    Genes sorted by name get evenly spaced hues at full saturation and value. It depends on the gene names
    only, so the same panel always gets the same colours.
``"coexpression"``
    Genes expressed together get near hues, so the colour of a dot speaks of the cell type it sits in.
    Gene-gene Pearson correlations of log-normalised counts are computed over cells (from a table of at least 50
    cells whose genes cover the panel) or, without one, over square spatial bins of ``bin_size`` µm filled from the molecules
    (a deterministic spatial subsample of bins caps the work on whole slides). The positive correlations
    form a gene graph whose first two non-trivial Laplacian eigenvectors place each gene on a circle; genes
    are ordered by their angle (ties by name), the circle is cut at the widest angular gap, and the ordered
    genes get evenly spaced hues. Eigenvector signs are fixed (largest component positive), so the result
    is the same on every run for the same data. Because it is learnt from data, reuse the stored palette
    (``get_params(sdata, key)["palette"]``) to keep colours fixed across slides, e.g. between training and
    inference.
``"lineage"``
    Panel-independent: every gene that marks a cell lineage (epithelial, glandular and squamous epithelium,
    T/NK, B and plasma cells, myeloid cells, granulocytes and mast cells, fibroblasts, smooth muscle and
    pericytes, endothelium, red cells, cycling cells, neurons, astrocytes, oligodendrocytes, adipocytes,
    melanocytes) gets that lineage's colour (:data:`LINEAGE_COLOURS`), from a curated table of markers shipped
    with st2he (``st2he/pp/data/lineage_markers.csv``; human symbols, matched case-insensitively so that mouse
    symbols match too). A gene the table does not know takes the colour of the lineage whose markers it is most
    co-expressed with in the sample (mean Pearson correlation over cells or bins, as for ``"coexpression"``, at
    least 0.15), else the colour of ``"other"``. A gene means the same colour on every panel, so a generator
    trained with it can read a panel it never saw.
a mapping
    ``{gene: colour}`` with any matplotlib colour; see :func:`make_palette` for genes it lacks or does not
    know.

Colours are saturated (HSV saturation and value 1) so that no gene is confused with the grey stain.
"""

from __future__ import annotations

import colorsys
import logging
from collections.abc import Mapping, Sequence

import numpy as np

logger = logging.getLogger("st2he")

METHODS = ("coexpression", "hue", "lineage")

#: The colour of each lineage of the ``"lineage"`` palette (saturated, far from the grey of the stain).
LINEAGE_COLOURS: dict[str, str] = {
    "epithelial": "#ff9900",
    "glandular_epithelial": "#ffee00",
    "squamous_epithelial": "#ff3300",
    "t_nk_cell": "#0044ff",
    "b_cell": "#00ccff",
    "plasma_cell": "#8800ff",
    "immune": "#5a5aff",
    "myeloid": "#ff00cc",
    "granulocyte_mast": "#ff66aa",
    "fibroblast": "#00ff44",
    "smooth_muscle_pericyte": "#99ff00",
    "endothelial": "#00ffcc",
    "erythroid": "#cc0000",
    "proliferating": "#ff0066",
    "neuron": "#ffcc00",
    "astrocyte": "#66ffaa",
    "oligodendrocyte": "#cc77ff",
    "adipocyte": "#ffff66",
    "melanocyte": "#996600",
    "other": "#808000",
}
#: Least mean correlation with a lineage's markers for a gene outside the marker table to take its colour.
LINEAGE_MIN_CORRELATION = 0.15


def _hex(rgb: Sequence[float]) -> str:
    r, g, b = (int(round(min(max(v, 0.0), 1.0) * 255)) for v in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def _hues_to_hex(hues: np.ndarray) -> list[str]:
    return [_hex(colorsys.hsv_to_rgb(float(h) % 1.0, 1.0, 1.0)) for h in hues]


def hue_palette(genes: Sequence[str]) -> dict[str, str]:
    """Evenly spaced hues over ``genes`` sorted by name."""
    names = sorted({str(g) for g in genes})
    hues = np.arange(len(names)) / max(len(names), 1)
    return dict(zip(names, _hues_to_hex(hues), strict=True))


def to_hex(colour) -> str:
    """``"#rrggbb"`` of any matplotlib colour."""
    from matplotlib.colors import to_hex as _to_hex

    try:
        return _to_hex(colour, keep_alpha=False)
    except (ValueError, TypeError) as err:
        msg = f"{colour!r} is not a colour (give '#rrggbb', a matplotlib colour name or an RGB tuple in [0, 1])."
        raise ValueError(msg) from err


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    """``(r, g, b)`` in 0..255 of a ``"#rrggbb"`` colour."""
    c = to_hex(colour)
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


# ----------------------------------------------------------------------------------------------- coexpression


def correlation(counts) -> np.ndarray:
    """Gene-gene Pearson correlation of ``log1p`` of per-unit normalised counts (units x genes, dense or sparse)."""
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    if sp.issparse(counts) and counts.shape[0] * counts.shape[1] > 30_000_000:
        x = sp.csr_matrix(counts, dtype=np.float64)  # large: stays sparse
    else:
        x = np.asarray(counts.toarray() if sp.issparse(counts) else counts, dtype=np.float64)
    dense = isinstance(x, np.ndarray)
    totals = np.asarray(x.sum(axis=1)).ravel()
    keep = totals > 0
    x = x[keep]
    totals = totals[keep]
    n, n_genes = x.shape
    if n < 2:
        return np.zeros((n_genes, n_genes))
    factors = np.median(totals) / totals
    if dense:
        x = np.log1p(x * factors[:, None])
    else:
        x = sp.diags(factors) @ x
        x.data = np.log1p(x.data)
    mean = np.asarray(x.mean(axis=0)).ravel()
    with threadpool_limits(1):  # multi-threaded BLAS is slow on small problems and shared machines
        gram = x.T @ x if dense else np.asarray((x.T @ x).todense())
    cov = gram / n - np.outer(mean, mean)
    sd = np.sqrt(np.clip(np.diag(cov), 0, None))
    ok = sd > 1e-12
    corr = np.zeros_like(cov)
    corr[np.ix_(ok, ok)] = cov[np.ix_(ok, ok)] / np.outer(sd[ok], sd[ok])
    np.fill_diagonal(corr, 1.0)
    return np.clip(corr, -1.0, 1.0)


def _fix_sign(v: np.ndarray) -> np.ndarray:
    i = int(np.argmax(np.abs(v) - 1e-12 * np.arange(len(v))))  # first of the largest
    return v if v[i] >= 0 else -v


def coexpression_palette(genes: Sequence[str], corr: np.ndarray) -> dict[str, str]:
    """Palette placing correlated genes at near hues (see the module docstring)."""
    genes = [str(g) for g in genes]
    n = len(genes)
    if n <= 2:
        return hue_palette(genes)
    # sort by name first, so the result does not depend on the input order
    order = np.argsort(np.array(genes, dtype=object), kind="stable")
    genes = [genes[i] for i in order]
    c = np.asarray(corr, dtype=np.float64)[np.ix_(order, order)]
    w = np.clip(np.nan_to_num(c, nan=0.0), 0.0, None)
    np.fill_diagonal(w, 0.0)
    w += 1e-3 / n  # keeps the graph connected: genes without partners fall in between
    np.fill_diagonal(w, 0.0)
    d = w.sum(axis=1)
    dinv = 1.0 / np.sqrt(d)
    lap = np.eye(n) - dinv[:, None] * w * dinv[None, :]
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # multi-threaded BLAS is far slower than one thread on small matrices
        _, vecs = np.linalg.eigh((lap + lap.T) / 2)
    v1 = _fix_sign(dinv * vecs[:, 1])
    v2 = _fix_sign(dinv * vecs[:, 2])
    v1 = v1 / (np.abs(v1).max() or 1.0)
    v2 = v2 / (np.abs(v2).max() or 1.0)
    angle = np.round(np.mod(np.arctan2(v2, v1), 2 * np.pi), 9)
    ring = sorted(range(n), key=lambda i: (angle[i], genes[i]))
    # cut the circle at its widest gap, so the hue sequence starts where the genes are least related
    a = angle[ring]
    gaps = np.diff(np.concatenate([a, [a[0] + 2 * np.pi]]))
    start = (int(np.argmax(gaps)) + 1) % n
    ring = ring[start:] + ring[:start]
    hues = np.arange(n) / n
    colours = _hues_to_hex(hues)
    return {genes[i]: colours[k] for k, i in enumerate(ring)}


def lineage_markers() -> dict[str, str]:
    """The shipped marker table: ``{GENE (upper case): lineage}``."""
    global _MARKERS
    if _MARKERS is None:
        from importlib.resources import files

        text = files("st2he.pp").joinpath("data", "lineage_markers.csv").read_text()
        markers: dict[str, str] = {}
        for line in text.splitlines():
            if not line or line.startswith("#") or line == "gene,lineage":
                continue
            gene, lineage = line.split(",")
            markers.setdefault(gene.strip().upper(), lineage.strip())
        _MARKERS = markers
    return _MARKERS


_MARKERS: dict[str, str] | None = None


def lineage_of(genes: Sequence[str], corr: np.ndarray | None = None) -> dict[str, str]:
    """``{gene: lineage}``: by the marker table, else by co-expression with marked genes (``corr`` over ``genes``)."""
    markers = lineage_markers()
    genes = [str(g) for g in genes]
    out = {g: markers.get(g.upper(), "") for g in genes}
    unmarked = [i for i, g in enumerate(genes) if not out[g]]
    if unmarked and corr is not None:
        by_lineage: dict[str, list[int]] = {}
        for i, g in enumerate(genes):
            if out[g]:
                by_lineage.setdefault(out[g], []).append(i)
        names = sorted(by_lineage)
        for i in unmarked:
            if not names:
                break
            scores = np.array([np.nanmean(corr[i, by_lineage[n]]) for n in names])
            scores = np.nan_to_num(scores, nan=-1.0)
            best = int(np.argmax(scores))
            if scores[best] >= LINEAGE_MIN_CORRELATION:
                out[genes[i]] = names[best]
    return {g: (lin or "other") for g, lin in out.items()}


def lineage_palette(genes: Sequence[str], corr: np.ndarray | None = None) -> dict[str, str]:
    """The ``"lineage"`` palette of ``genes`` (``corr``: their gene-gene correlation, for unmarked genes)."""
    lineages = lineage_of(genes, corr)
    marked = sum(lin != "other" for lin in lineages.values())
    logger.info("Lineage palette: %d of %d genes placed in a lineage.", marked, len(lineages))
    return {g: LINEAGE_COLOURS[lin] for g, lin in sorted(lineages.items())}


class BinCounts:
    """Gene counts in square spatial bins, gathered while streaming over the molecules.

    A deterministic spatial subsample keeps the work bounded: a bin is kept when the lowest ``level`` bits of a
    hash of its index are zero, and ``level`` rises whenever more than ``budget`` molecules are held.
    """

    def __init__(self, bin_size: float = 10.0, budget: int = 1_000_000) -> None:
        if not bin_size > 0:
            msg = f"bin_size must be a positive number of µm, got {bin_size!r}."
            raise ValueError(msg)
        self.bin_size = float(bin_size)
        self.budget = int(budget)
        self.level = 0
        self.keys: list[np.ndarray] = []  # bin keys (int64), one array per partition
        self.codes: list[np.ndarray] = []
        self.held = 0

    def add(self, keys: np.ndarray, codes: np.ndarray) -> None:
        """Add bin keys and gene codes already selected at the current level."""
        from ._kernels import compact_level

        self.keys.append(keys)
        self.codes.append(codes)
        self.held += len(keys)
        while self.held > self.budget:
            self.level += 1
            self.held = 0
            for i, k in enumerate(self.keys):
                c = self.codes[i]
                if not (k.flags.writeable and c.flags.writeable):
                    k, c = k.copy(), c.copy()
                m = compact_level(k, c, self.level)  # in place, in order: keeps the bins selected at the new level
                # copy the survivors so that the larger buffer they came from is freed
                self.keys[i], self.codes[i] = k[:m].copy(), c[:m].copy()
                self.held += m

    def matrix(self, n_genes: int):
        """Bins x genes count matrix: dense (float64) while it holds at most 30 million entries, else sparse."""
        import scipy.sparse as sp

        if not self.keys:
            return sp.csr_matrix((0, n_genes))
        keys = np.concatenate(self.keys)
        codes = np.concatenate(self.codes)
        ok = (codes >= 0) & (codes < n_genes)
        _, rows = np.unique(keys[ok], return_inverse=True)
        n_bins = int(rows.max(initial=-1)) + 1
        if n_bins * n_genes <= 30_000_000:
            flat = np.bincount(rows.astype(np.int64) * n_genes + codes[ok], minlength=n_bins * n_genes)
            return flat.reshape(n_bins, n_genes).astype(np.float64)
        m = sp.coo_matrix((np.ones(int(ok.sum())), (rows, codes[ok])), shape=(n_bins, n_genes))
        return m.tocsr()


# ----------------------------------------------------------------------------------------------- resolution


def check_mapping(
    mapping: Mapping,
    genes: Sequence[str],
    *,
    missing: str = "error",
    unknown: str = "error",
    required: Sequence[str] | None = None,
) -> dict[str, str]:
    """Validate a user palette against the panel ``genes``.

    ``unknown="error"`` rejects genes of the mapping that are not in the panel (``"drop"`` drops them);
    ``missing="error"`` rejects a mapping that lacks genes of ``required`` (default: the whole panel;
    ``"hue"`` gives them the colours of the ``"hue"`` palette of the panel; grey is not offered: grey is the
    stain).
    """
    if not isinstance(mapping, Mapping):
        msg = f"A palette must be a method name {METHODS} or a mapping gene -> colour, got {type(mapping).__name__}."
        raise TypeError(msg)
    panel = [str(g) for g in genes]
    known = set(panel)
    pal = {str(g): to_hex(c) for g, c in mapping.items()}
    unknown_genes = sorted(g for g in pal if g not in known)
    if unknown_genes:
        if unknown == "error":
            shown = ", ".join(repr(g) for g in unknown_genes[:10]) + (" ..." if len(unknown_genes) > 10 else "")
            msg = (
                f"The palette names {len(unknown_genes)} gene(s) that are not in the panel of these molecules: "
                f"{shown}. Check the spelling, or drop them with "
                f"st2he.pp.make_palette(sdata, method=palette, unknown='drop')."
            )
            raise ValueError(msg)
        if unknown != "drop":
            msg = f"unknown must be 'error' or 'drop', got {unknown!r}."
            raise ValueError(msg)
        pal = {g: c for g, c in pal.items() if g in known}
    missing_genes = sorted(g for g in (panel if required is None else required) if g not in pal)
    if missing_genes:
        if missing == "error":
            shown = ", ".join(repr(g) for g in missing_genes[:10]) + (" ..." if len(missing_genes) > 10 else "")
            msg = (
                f"The palette has no colour for {len(missing_genes)} gene(s) of the panel: {shown}. Give them "
                f"colours, restrict the genes drawn with genes=[...], or complete the palette with "
                f"st2he.pp.make_palette(sdata, method=palette, missing='hue')."
            )
            raise ValueError(msg)
        if missing != "hue":
            msg = f"missing must be 'error' or 'hue', got {missing!r}."
            raise ValueError(msg)
        fill = hue_palette(panel)
        pal.update({g: fill[g] for g in missing_genes})
    return dict(sorted(pal.items()))


def _table_correlation(sdata, genes: Sequence[str], table_key: str | None):
    """Correlation over the cells of the table covering ``genes`` (``None`` when no table covers them)."""
    tables = getattr(sdata, "tables", {})
    keys = [table_key] if table_key is not None else sorted(tables)
    if table_key is not None and table_key not in tables:
        msg = f"table_key={table_key!r} is not a table of this SpatialData object; its tables are {sorted(tables)}."
        raise KeyError(msg)
    for key in keys:
        adata = tables[key]
        names = [str(v) for v in adata.var_names]
        index = {g: i for i, g in enumerate(names)}
        if adata.n_obs >= 50 and all(g in index for g in genes):
            cols = [index[g] for g in genes]
            logger.info("Palette co-expression from the %d cells of table %r.", adata.n_obs, key)
            return correlation(adata.X[:, cols])
    return None


def make_palette(
    data,
    *,
    method: str | Mapping = "coexpression",
    points_key: str = "transcripts",
    table_key: str | None = None,
    source: str = "auto",
    bin_size: float = 10.0,
    min_qv: float | None = 20.0,
    drop_controls: bool = True,
    missing: str = "error",
    unknown: str = "error",
) -> dict[str, str]:
    """Make a deterministic ``{gene: "#rrggbb"}`` palette for the genes of a panel.

    Parameters
    ----------
    data
        A SpatialData object (its points element ``points_key`` gives the panel: the gene categories, or the
        genes met; control probes are left out when ``drop_controls``), an AnnData (cells x genes; the panel is
        its ``var_names``) or a sequence of gene names (``"hue"`` and mappings only).
    method
        ``"coexpression"``, ``"hue"``, ``"lineage"`` or a mapping gene -> colour (see :mod:`st2he.pp._palette`).
        ``"lineage"`` colours each gene by the cell lineage it marks (a curated marker table shipped with st2he;
        genes it lacks by their co-expression with marked genes), so colours mean the same on every panel. A
        mapping is checked against the panel: see ``missing`` and ``unknown``.
    points_key
        Points element of the molecules.
    table_key
        Table of cells for co-expression; by default the first table whose genes cover the panel.
    source
        Where co-expression is measured: ``"auto"`` (a covering table, else spatial bins of the molecules),
        ``"table"`` or ``"points"``.
    bin_size
        Edge of the spatial bins in µm (about one cell) when co-expression comes from the molecules.
    min_qv, drop_controls
        Filtering of the molecules, as in :func:`st2he.pp.rasterize_transcripts`.
    missing
        For a mapping that lacks genes of the panel: ``"error"`` or ``"hue"`` (fill them from the hue palette).
    unknown
        For a mapping with genes outside the panel: ``"error"`` or ``"drop"``.

    Returns
    -------
    ``{gene: "#rrggbb"}`` sorted by gene name.
    """
    genes, counts_from_points, corr_from_table = _panel_and_sources(
        data, method, points_key, table_key, source, bin_size, min_qv, drop_controls
    )
    if isinstance(method, Mapping):
        return check_mapping(method, genes, missing=missing, unknown=unknown)
    if method == "hue":
        return hue_palette(genes)
    if method == "lineage":
        corr = corr_from_table() if corr_from_table is not None else None
        if corr is None and counts_from_points is not None:
            corr = counts_from_points()
        return lineage_palette(genes, corr)
    if method != "coexpression":
        msg = f"method must be one of {METHODS} or a mapping gene -> colour, got {method!r}."
        raise ValueError(msg)
    corr = corr_from_table() if corr_from_table is not None else None
    if corr is None:
        if counts_from_points is None:
            msg = (
                "The 'coexpression' palette needs expression data: give a SpatialData object with molecules or an "
                "AnnData, or use method='hue' for a list of gene names."
            )
            raise ValueError(msg)
        corr = counts_from_points()
    return dict(sorted(coexpression_palette(genes, corr).items()))


def _panel_and_sources(data, method, points_key, table_key, source, bin_size, min_qv, drop_controls):
    """Return the panel and lazy callables giving the co-expression correlation from points or a table."""
    from anndata import AnnData

    if source not in ("auto", "table", "points"):
        msg = f"source must be 'auto', 'table' or 'points', got {source!r}."
        raise ValueError(msg)
    if isinstance(data, AnnData):
        genes = sorted(str(g) for g in data.var_names)
        order = [list(map(str, data.var_names)).index(g) for g in genes]
        return genes, None, (lambda: correlation(data.X[:, order]))
    if isinstance(data, str):  # one gene, not its letters
        data = [data]
    if not hasattr(data, "points"):
        return sorted({str(g) for g in data}), None, None
    from ._molecules import bin_molecules, is_control_name, molecule_source

    src = molecule_source(data, points_key, need_genes=True)
    need_counts = method in ("coexpression", "lineage") and source != "table"
    bins = BinCounts(bin_size) if need_counts else None
    names = list(src.panel or ())
    if src.panel is None or need_counts:
        # the very pass rasterize_transcripts makes, without keeping the molecules: the same genes, the same bins
        read = bin_molecules(
            src, pixel_size=bin_size, min_qv=min_qv, drop_controls=drop_controls, genes=names, bins=bins, store=False
        )
        names = list(read.genes)
    panel = [g for g, ctrl in zip(names, is_control_name(names), strict=True) if not (drop_controls and ctrl)]
    genes = sorted(panel)

    def from_points():
        m = bins.matrix(len(names))
        index = {g: i for i, g in enumerate(names)}
        logger.info("Palette co-expression from %d spatial bins of %g µm.", m.shape[0], bin_size)
        return correlation(m[:, [index[g] for g in genes]])

    def from_table():
        corr = _table_correlation(data, genes, table_key)
        if corr is None and source == "table":
            msg = "source='table' but no table of this SpatialData object has all genes of the panel."
            raise ValueError(msg)
        return corr

    table = from_table if source in ("auto", "table") else None
    return genes, (from_points if need_counts else None), table
