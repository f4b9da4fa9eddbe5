"""``st2he.datasets.synthetic_tissue``: a simulated HR-ST sample with a paired ground-truth H&E, from a seed.

The simulation lays out tissue (tumour regions of two subtypes in stroma), places cells of several types with
their own nuclear morphology and gene programs, draws every transcript inside a cell, renders a DAPI image of
the nuclei, and renders the H&E of the same section with the Beer-Lambert stain model of
:mod:`st2he.datasets._stain_model`. Some of what the H&E shows follows only from which genes the cells express,
not from the nuclei or from how many molecules there are: cytoplasm tint per cell type, mucin in the lumens of
glands lined by mucinous cells, keratin in the pearls of squamous nests, red cells in vessels and collagen fibres
in stroma. A model that reads gene identity can learn these; a baseline that sees only the nuclear stain and the
molecule density cannot.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from st2he._grid import COORDINATE_SYSTEM, Grid
from st2he.datasets import _panels, _realism
from st2he.datasets import _stain_model as stain

logger = logging.getLogger("st2he")

# --------------------------------------------------------------------------------------------------------------
# The panel: gene programs per cell type and cell state, housekeeping genes and control probes.
# --------------------------------------------------------------------------------------------------------------

CELL_TYPES = (
    "tumour_gland",
    "tumour_solid",
    "fibroblast",
    "lymphocyte",
    "macrophage",
    "endothelial",
    "erythrocyte",
)

#: Marker genes of each cell type.
PROGRAMS: dict[str, tuple[str, ...]] = {
    "tumour_gland": (
        "EPCAM",
        "KRT8",
        "KRT18",
        "KRT7",
        "NKX2-1",
        "NAPSA",
        "SFTPB",
        "MUC1",
        "CEACAM6",
        "CLDN4",
        "LPCAT1",
        "SFTA2",
    ),
    "tumour_solid": (
        "KRT5",
        "KRT6A",
        "KRT14",
        "KRT17",
        "TP63",
        "SOX2",
        "DSG3",
        "S100A2",
        "PKP1",
        "CLCA2",
        "DSC3",
        "KRT15",
    ),
    "fibroblast": ("COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "PDGFRA", "FAP", "POSTN", "SFRP2", "FBLN1"),
    "lymphocyte": ("PTPRC", "CD3E", "CD3D", "CD2", "CD8A", "MS4A1", "CD79A", "CCL5", "IL7R", "CD52"),
    "macrophage": ("CD68", "CD163", "LYZ", "C1QA", "C1QB", "APOE", "MARCO", "CD14", "FCGR3A"),
    "endothelial": ("PECAM1", "VWF", "CDH5", "CLDN5", "PLVAP", "EMCN", "KDR", "RAMP2"),
    "erythrocyte": ("HBB", "HBA1", "HBA2"),
}

#: Extra programs of cell states (mucinous gland cells, keratinising squamous cells, cycling tumour cells).
STATE_PROGRAMS: dict[str, tuple[str, ...]] = {
    "mucinous": ("MUC5AC", "TFF1", "AGR2", "SPDEF", "MUC5B"),
    "keratinizing": ("SPRR1A", "SPRR1B", "SPRR3", "IVL", "KRT10", "KRT1"),
    "proliferating": ("MKI67", "TOP2A", "CENPF"),
}

HOUSEKEEPING = ("ACTB", "GAPDH", "EEF1A1", "RPLP0", "B2M", "TPT1", "MALAT1", "NEAT1", "UBC", "PGK1")
#: Transcripts of these genes stay mostly in the nucleus.
NUCLEAR_GENES = ("MALAT1", "NEAT1")
CONTROLS = (
    "BLANK_0006",
    "BLANK_0013",
    "BLANK_0037",
    "BLANK_0041",
    "NegControlProbe_00003",
    "NegControlProbe_00004",
    "NegControlProbe_00009",
    "NegControlCodeword_0500",
    "NegControlCodeword_0502",
)

GENES: tuple[str, ...] = tuple(
    dict.fromkeys(
        [g for t in CELL_TYPES for g in PROGRAMS[t]]
        + [g for s in STATE_PROGRAMS.values() for g in s]
        + list(HOUSEKEEPING)
    )
)
PANEL: tuple[str, ...] = GENES + CONTROLS

#: What a pathologist would call the two tumour subtypes (for prompts of zero-shot classifiers).
SUBTYPE_NAMES = {"gland": "adenocarcinoma", "solid": "squamous cell carcinoma"}

# --------------------------------------------------------------------------------------------------------------
# Cell types: nuclear morphology (DAPI), extent, exclusion radius and stain uptake of the cytoplasm (H&E).
# a, b: semi-axes of the nucleus (µm); irregular: amplitude of its outline's harmonics; R: largest cell radius;
# excl: exclusion radius when placing cells; chromatin: DAPI brightness; texture: chromatin contrast; rim:
# chromatin at the nuclear envelope (vesicular nuclei); h_nuc: haematoxylin per unit chromatin; e/h/hb: eosin,
# haematoxylin and haemoglobin in the cytoplasm; nuclear_share: molecules in the nucleus relative to its share
# of the cell's area.
# --------------------------------------------------------------------------------------------------------------

_TYPES: dict[str, dict[str, float]] = {
    "tumour_gland": {
        "a": 4.2,
        "b": 2.6,
        "irregular": 0.07,
        "R": 8.0,
        "excl": 3.0,
        "chromatin": 0.55,
        "texture": 0.45,
        "rim": 0.6,
        "h_nuc": 2.0,
        "e": 0.32,
        "h": 0.20,
        "hb": 0.0,
        "nuclear_share": 0.85,
    },
    "tumour_solid": {
        "a": 4.6,
        "b": 3.9,
        "irregular": 0.09,
        "R": 7.5,
        "excl": 4.0,
        "chromatin": 0.75,
        "texture": 0.55,
        "rim": 0.2,
        "h_nuc": 2.0,
        "e": 0.72,
        "h": 0.05,
        "hb": 0.0,
        "nuclear_share": 0.9,
    },
    "fibroblast": {
        "a": 5.2,
        "b": 1.4,
        "irregular": 0.03,
        "R": 5.0,
        "excl": 3.5,
        "chromatin": 0.80,
        "texture": 0.2,
        "rim": 0.0,
        "h_nuc": 2.1,
        "e": 0.45,
        "h": 0.04,
        "hb": 0.0,
        "nuclear_share": 1.0,
    },
    "lymphocyte": {
        "a": 2.6,
        "b": 2.4,
        "irregular": 0.02,
        "R": 3.6,
        "excl": 2.8,
        "chromatin": 1.0,
        "texture": 0.15,
        "rim": 0.0,
        "h_nuc": 2.3,
        "e": 0.15,
        "h": 0.18,
        "hb": 0.0,
        "nuclear_share": 1.15,
    },
    "macrophage": {
        "a": 3.6,
        "b": 2.7,
        "irregular": 0.06,
        "R": 9.0,
        "excl": 4.5,
        "chromatin": 0.60,
        "texture": 0.3,
        "rim": 0.1,
        "h_nuc": 1.9,
        "e": 0.38,
        "h": 0.08,
        "hb": 0.0,
        "nuclear_share": 0.8,
    },
    "endothelial": {
        "a": 4.5,
        "b": 1.3,
        "irregular": 0.03,
        "R": 4.5,
        "excl": 2.5,
        "chromatin": 0.75,
        "texture": 0.2,
        "rim": 0.0,
        "h_nuc": 2.0,
        "e": 0.35,
        "h": 0.04,
        "hb": 0.0,
        "nuclear_share": 1.0,
    },
    "erythrocyte": {
        "a": 0.0,
        "b": 0.0,
        "irregular": 0.0,
        "R": 3.6,
        "excl": 3.3,
        "chromatin": 0.0,
        "texture": 0.0,
        "rim": 0.0,
        "h_nuc": 0.0,
        "e": 0.45,
        "h": 0.0,
        "hb": 1.15,
        "nuclear_share": 0.0,
    },
}
#: Cytoplasm of cell states replaces that of the type.
_STATES: dict[str, dict[str, float]] = {
    "mucinous": {"e": 0.10, "h": 0.30, "hb": 0.0, "nuclear_share": 0.75},
    "keratinizing": {"e": 1.10, "h": 0.0, "hb": 0.12, "a": 3.2, "b": 1.2, "chromatin": 1.0, "texture": 0.1, "rim": 0.0},
}
_STATE_NAMES = ("none", "mucinous", "keratinizing", "proliferating")

#: Nuclei of the realistic look (``appearance="realistic"``), drawn anew from the clean look's: ``size``, the standard
#: deviation of a nucleus's log linear size (its area's is twice that); ``giant``, the share of nuclei twice as large in
#: area (pleomorphic tumour nuclei); ``elongation``, the standard deviation of the log change of its axis ratio;
#: ``irregular``, the amplitude of its outline's harmonics k = 2..7 (wavy and lobed outlines); ``notched``, the share
#: of nuclei with a notch (kidney-shaped, cleaved and indented nuclei: solidity well below 1). Measured against
#: nuclei segmented in real H&E (``benchmarks/bench_realism.py``).
_PLEOMORPHISM: dict[str, dict[str, float]] = {
    "tumour_gland": {"size": 0.28, "giant": 0.08, "elongation": 0.3, "irregular": 0.2, "notched": 0.4},
    "tumour_solid": {"size": 0.28, "giant": 0.08, "elongation": 0.3, "irregular": 0.2, "notched": 0.4},
    "fibroblast": {"size": 0.18, "giant": 0.0, "elongation": 0.15, "irregular": 0.14, "notched": 0.15},
    "lymphocyte": {"size": 0.14, "giant": 0.0, "elongation": 0.3, "irregular": 0.1, "notched": 0.15},
    "macrophage": {"size": 0.18, "giant": 0.0, "elongation": 0.3, "irregular": 0.2, "notched": 0.6},
    "endothelial": {"size": 0.16, "giant": 0.0, "elongation": 0.15, "irregular": 0.1, "notched": 0.1},
    "erythrocyte": {"size": 0.0, "giant": 0.0, "elongation": 0.0, "irregular": 0.0, "notched": 0.0},
}
_N_HARMONICS_REALISTIC = 6  # harmonics k = 2..7

# obstacle kinds: parts of the tissue no cell covers
_GLAND_LUMEN, _VESSEL_LUMEN, _PEARL_CORE = 0, 1, 2
_N_HARMONICS = 3  # harmonics k = 2, 3, 4 of the nuclear outline
_NUCLEUS_VERTICES = 40


@dataclass
class _Cells:
    """Columns of the cell list while the layout is built."""

    x: list[np.ndarray] = field(default_factory=list)
    y: list[np.ndarray] = field(default_factory=list)
    ctype: list[np.ndarray] = field(default_factory=list)
    state: list[np.ndarray] = field(default_factory=list)
    angle: list[np.ndarray] = field(default_factory=list)

    def add(self, x, y, ctype: str, state: str | np.ndarray = "none", angle=None, rng=None) -> None:
        x = np.asarray(x, dtype=np.float64).ravel()
        y = np.asarray(y, dtype=np.float64).ravel()
        n = len(x)
        self.x.append(x)
        self.y.append(y)
        self.ctype.append(np.full(n, CELL_TYPES.index(ctype), dtype=np.int16))
        if isinstance(state, str):
            state = np.full(n, _STATE_NAMES.index(state), dtype=np.int16)
        self.state.append(np.asarray(state, dtype=np.int16))
        if angle is None:
            angle = rng.uniform(0, np.pi, n)
        self.angle.append(np.asarray(angle, dtype=np.float64).ravel())


def synthetic_tissue(
    seed: int = 0,
    *,
    size_um: tuple[float, float] | float = (384.0, 384.0),
    subtype: str = "mixed",
    origin_um: tuple[float, float] = (1200.0, 800.0),
    dapi_pixel_size: float = 0.2125,
    he_pixel_size: float = 0.5,
    transcripts_per_um2: float = 1.0,
    appearance: str = "clean",
    artefacts: dict[str, float] | None = None,
    panel: str = "default",
    niche: bool = False,
):
    """Simulate a high-resolution spatial transcriptomics sample with its paired ground-truth H&E.

    The sample has the element names of a Xenium run read together with its aligned post-run H&E, all in the
    coordinate system ``"global"`` in micrometres:

    - ``transcripts`` (points): ``x``, ``y`` (µm), ``gene`` (categorical, the ``feature_key``), ``qv`` (Xenium-like
      quality, mostly >= 20), ``is_control`` (control probes ``BLANK_*``, ``NegControlProbe_*``,
      ``NegControlCodeword_*``), ``cell_id`` (``"UNASSIGNED"`` outside cells), ``overlaps_nucleus``.
    - ``morphology_focus`` (image, channel ``DAPI``, uint16): nuclei with chromatin texture, blur and noise.
    - ``nucleus_boundaries``, ``cell_boundaries`` (shapes, indexed by ``cell_id``).
    - ``he_image`` (image, uint8, channels ``r, g, b``): the H&E of the same section, aligned.
    - ``regions`` (shapes): the tumour regions and the stroma, with columns ``tissue`` and ``subtype``.
    - ``table`` (AnnData, cells x genes counts of transcripts with ``qv >= 20``, controls left out), annotating
      ``cell_boundaries`` (``region_key="region"``, ``instance_key="cell_id"``), with ``obs`` columns
      ``cell_type``, ``cell_state``, ``tissue`` (``"gland_tumour"``, ``"solid_tumour"``, ``"stroma"``),
      ``subtype`` (``"gland"``, ``"solid"`` or ``"none"``), ``region_id``, ``cell_area``, ``nucleus_area``,
      ``transcript_counts`` and the centroids in ``obsm["spatial"]``.

    Cell types: gland-forming tumour cells (adenocarcinoma-like; around lumens, some glands mucinous), solid-sheet
    tumour cells (squamous-like; nests with keratin pearls), fibroblasts in collagen-rich stroma, lymphocytes
    (scattered and in aggregates), macrophages, and endothelial cells lining vessels that hold red cells. Each
    type has its own gene program (:data:`PROGRAMS`), its own nuclear morphology and its own cytoplasm in the
    H&E. Molecules are equally dense in every cell type (``transcripts_per_um2`` per µm² of cell, with
    cell-to-cell variation), so density alone tells cell from no cell but not one type from another.

    Parameters
    ----------
    seed
        Seed of the simulation: the same seed gives the same sample, array for array.
    size_um
        ``(width, height)`` of the sample in µm (or one number for a square). The default takes a few seconds;
        the time grows with the area.
    subtype
        ``"mixed"``: tumour regions of both subtypes (gland-forming and solid) in stroma; ``"gland"`` or
        ``"solid"``: tumour of one subtype only (slides with one label, e.g. for zero-shot subtyping).
    origin_um
        Global ``(x, y)`` of the sample's top-left corner, in µm.
    dapi_pixel_size
        Pixel size of ``morphology_focus`` in µm (Xenium: 0.2125).
    he_pixel_size
        Pixel size of ``he_image`` in µm (a 20x scan: about 0.5).
    transcripts_per_um2
        Mean density of molecules inside cells.
    appearance
        How the H&E is rendered. ``"clean"`` (the default for now): a clean drawing with the same stains, scanner
        and section for every sample; the figures, tests and the shipped model of this release were made with it.
        ``"realistic"``: like a real slide, with stain absorbance vectors, stain intensities, white level and
        tint, blur and JPEG compression drawn per sample within the ranges of real scans, grainy chromatin and
        cytoplasm, wavy collagen fibres with clefts in stroma, nuclei that take up stain unevenly (some with a
        perinuclear halo), and section artefacts (uneven thickness, folds, tears; see ``artefacts``). Its nuclei
        vary in size and shape as in real H&E: sizes spread per cell type (tumour nuclei most, a few of them twice as
        large), axis ratios spread, outlines wavy, lobed or notched (solidity below 1). All of it is drawn from
        ``seed`` (the same seed gives the same image) and rendered as optical densities through the same
        Beer-Lambert model. The cells (positions, types, states, ``cell_boundaries``, regions), the molecules' genes,
        cells and quality, and so the ``table``, are the same in both appearances; since the nuclei are part of the
        section, ``nucleus_boundaries``, the DAPI image (the same nuclei), ``table.obs["nucleus_area"]`` and the
        positions of the molecules within their cells (nuclear ones in the new nuclei) and their
        ``overlaps_nucleus`` differ. Every molecule stays in its cell, every nucleus in its cell. The default will
        switch to ``"realistic"`` once the shipped models are retrained.
    artefacts
        With ``appearance="realistic"``: rates of section artefacts, merged with the defaults
        ``{"fold": 2.0, "tear": 3.0, "thickness": 0.15}``: ``fold`` and ``tear``, the expected number of folds
        (dark bands where the section lies on itself, densities adding) and tears (white cracks) per mm² of
        section; ``thickness``, the standard deviation of the log section thickness (a smooth field). Set a rate
        to 0 to leave that artefact out; the other draws stay the same. What was drawn is recorded in
        ``sdata.attrs["st2he"]["source"]["look"]``.
    panel
        The names of the genes. ``"default"``: the simulation's own panel (:data:`PROGRAMS`, :data:`STATE_PROGRAMS`,
        housekeeping genes). ``"xenium_lung"``, ``"xenium_breast"``: the same programs under the names of genes
        of 10x Genomics' Xenium Human Lung and Human Breast panels that mark the same lineages (the two share 5 of
        their 88 genes; :mod:`st2he.datasets._panels` says where the names come from). Only the names change:
        for the same seed the cells, molecules (positions, counts, quality) and images are the same on every
        panel, and the transcripts' ``gene`` categories, the table's ``var_names`` (with ``var["program"]``) and
        the control probes follow the panel. For measuring how a model trained on one panel reads another.
    niche
        ``False`` (the default): a cell's expected expression depends on its type and state only, so nothing
        about its neighbourhood adds to knowing what cell it is. ``True``: five programs also depend on where the
        cell sits, as in carcinomas (:data:`NICHE_EFFECTS`; each a factor ``1 + (F - 1) w`` on the expected
        expression of its genes in its cell type, ``w`` in [0, 1] smooth in µm): cancer-associated fibroblasts
        (``FAP``, ``POSTN`` x3 in fibroblasts at the tumour border, ``w = exp(-d / 15)`` with ``d`` the distance
        out of the tumour, 1 inside it), cytotoxic lymphocytes in the tumour (``CD8A``, ``CCL5`` x3,
        ``w = 1 / (1 + exp(s / 10))`` with ``s`` the signed distance to the tumour border, negative inside),
        tumour-associated macrophages (``CD163``, ``APOE`` x3, ``w = exp(-d / 20)``), tumour endothelium
        (``PLVAP`` x2.5 in endothelial cells, ``w = exp(-d / 20)``) and hypoxic tumour cores (``PGK1`` x4 in
        tumour cells, ``w = 1 / (1 + exp(-(v - 80) / 15))`` with ``v`` the distance to the nearest vessel lumen).
        Only the genes of each cell's molecules change (drawn again, with their own random stream, from the
        modulated program; ``MALAT1`` and ``NEAT1`` keep their share): the layout, the molecules' positions,
        quality and cells, both images and every other output are those of ``niche=False`` for the same seed.
        The cell table gains ``obs["tumour_distance"]`` (``s``, µm) and ``obs["vessel_distance"]`` (``v``, µm;
        infinite without vessels). No new genes: the panel and every palette stay the same.

    Returns
    -------
    A :class:`spatialdata.SpatialData` object; ``sdata.attrs["st2he"]["source"]`` records how it was made.

    Notes
    -----
    The default sample (384 µm square, about 800 cells and 80,000 molecules) takes about 3 s of one core; time
    and memory grow with the area (a 1 mm square: about 20 s and 2.2 GB, most of it the 0.2125 µm DAPI image).
    The H&E is ``255 exp(-OD)`` with ``OD`` the sum of haematoxylin, eosin and haemoglobin concentration maps
    times their absorbance vectors (:mod:`st2he.datasets._stain_model`), blurred by 0.35 µm and with a little
    camera noise; nuclei take haematoxylin from the same chromatin the DAPI image shows.
    """
    if subtype not in ("mixed", "gland", "solid"):
        msg = f"subtype must be 'mixed', 'gland' or 'solid', got {subtype!r}."
        raise ValueError(msg)
    if appearance not in ("clean", "realistic"):
        msg = f"appearance must be 'clean' or 'realistic', got {appearance!r}."
        raise ValueError(msg)
    if not isinstance(niche, (bool, np.bool_)):
        msg = f"niche must be True or False, got {niche!r}."
        raise TypeError(msg)
    if artefacts is not None and appearance != "realistic":
        msg = "artefacts= only applies with appearance='realistic'; pass appearance='realistic' or leave it out."
        raise ValueError(msg)
    rates = _realism.check_artefacts(artefacts)
    genes, controls = _panels.panel_names(panel)
    if np.isscalar(size_um):
        size_um = (float(size_um), float(size_um))
    width, height = (float(s) for s in size_um)
    if not (width >= 64 and height >= 64 and np.isfinite(width) and np.isfinite(height)):
        msg = f"size_um must be at least 64 µm on each side, got {size_um!r}."
        raise ValueError(msg)
    for name, value in (
        ("dapi_pixel_size", dapi_pixel_size),
        ("he_pixel_size", he_pixel_size),
        ("transcripts_per_um2", transcripts_per_um2),
    ):
        if not (np.isfinite(value) and value > 0):
            msg = f"{name} must be a positive number, got {value!r}."
            raise ValueError(msg)
    seed = int(seed)
    rng = np.random.default_rng(seed)
    x0, y0 = (float(v) for v in origin_um)
    he_grid = Grid(x0, y0, float(he_pixel_size), math.ceil(height / he_pixel_size), math.ceil(width / he_pixel_size))
    dapi_grid = Grid(
        x0, y0, float(dapi_pixel_size), math.ceil(height / dapi_pixel_size), math.ceil(width / dapi_pixel_size)
    )

    layout = _layout(rng, x0, y0, width, height, subtype, he_grid)
    cells = layout["cells"]
    polys, areas = _cell_polygons(layout)
    nuclei = _nucleus_outlines(cells)
    redraw = None
    if appearance == "realistic":  # nuclei of realistic size and shape spread, from their own generator
        drawn = _pleomorphic_nuclei(seed, cells, layout["obstacles"], layout["tissue"])
        redraw = (drawn, _nucleus_outlines(drawn), _realism._rng(seed, "nuclear_molecules"))
    niche_info = _niche_distances(layout) if niche else None
    counts, tx = _transcripts(
        rng, layout, areas, nuclei, transcripts_per_um2, redraw=redraw, niche=niche_info, seed=seed
    )
    if redraw is not None:
        cells, nuclei = redraw[0], redraw[1]
    if panel != "default":  # only the names change: the codes, and every draw, stay those of the default panel
        tx["gene"] = tx["gene"].cat.rename_categories(list(genes) + list(controls))
    chromatin, coverage = _render_nuclei(rng, cells, dapi_grid)
    dapi = _render_dapi(rng, chromatin, dapi_grid)
    look = None
    if appearance == "realistic":
        look = _realism.draw_look(seed)
        look["artefact_rates"] = rates
    he = _render_he(rng, layout, chromatin, coverage, dapi_grid, he_grid, look=look, seed=seed)

    source = {
        "platform": "synthetic",
        "seed": seed,
        "subtype": subtype,
        "size_um": [width, height],
        "origin_um": [x0, y0],
        "pixel_size": float(dapi_pixel_size),
        "he_pixel_size": float(he_pixel_size),
        "transcripts_per_um2": float(transcripts_per_um2),
        "feature_key": "gene",
        "n_cells": int(len(cells["x"])),
        "n_transcripts": int(len(tx)),
        "subtype_names": SUBTYPE_NAMES,
        "appearance": appearance,
        "panel": panel,
    }
    if look is not None:
        source["look"] = look
    if niche:
        source["niche"] = True
    sdata = _assemble(layout, polys, areas, nuclei, counts, tx, dapi, he, dapi_grid, he_grid, source, genes=genes)
    if niche_info is not None:
        obs = sdata["table"].obs
        obs["tumour_distance"] = niche_info["tumour_distance"]
        obs["vessel_distance"] = niche_info["vessel_distance"]
    return sdata


# --------------------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------------------


def _star(cx, cy, rx, ry, rng, amplitude=0.12, n_vertices=160):
    """Make a star-shaped blob: an ellipse whose radius is modulated by a few random harmonics."""
    import shapely

    theta = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    radius = np.ones_like(theta)
    for k in range(2, 7):
        radius += rng.normal(0, amplitude / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    radius = np.clip(radius, 0.5, 1.5)
    return shapely.Polygon(np.c_[cx + rx * radius * np.cos(theta), cy + ry * radius * np.sin(theta)])


def _lattice(x_min, y_min, x_max, y_max, spacing, rng, jitter=0.0):
    """Points of a jittered hexagonal lattice covering a box."""
    dy = spacing * np.sqrt(3) / 2
    ys = np.arange(y_min - spacing, y_max + spacing, dy)
    xs = np.arange(x_min - spacing, x_max + spacing, spacing)
    gx, gy = np.meshgrid(xs, ys)
    gx = gx + (np.arange(len(ys))[:, None] % 2) * spacing / 2 + rng.uniform(0, spacing)
    gy = gy + rng.uniform(0, dy)
    pts = np.c_[gx.ravel(), gy.ravel()]
    if jitter:
        pts = pts + rng.uniform(-jitter, jitter, pts.shape)
    keep = (pts[:, 0] >= x_min) & (pts[:, 0] < x_max) & (pts[:, 1] >= y_min) & (pts[:, 1] < y_max)
    return pts[keep]


def _inside(geometry, pts):
    import shapely

    if len(pts) == 0:
        return np.zeros(0, dtype=bool)
    shapely.prepare(geometry)
    return shapely.contains_xy(geometry, pts[:, 0], pts[:, 1])


def _smooth_field(rng, grid: Grid, sigma_um: float, coarse: float = 2.0):
    """Unit-variance smooth random field on ``grid`` (float32), made on a grid of step ``<= coarse`` µm.

    Returns the field, the noise on its own grid and that grid's step (for sampling it at arbitrary points).
    """
    ps = grid.pixel_size
    step = max(ps, min(coarse, sigma_um / 3))
    if step <= ps * 1.0001:  # at pixel resolution: filter in place
        noise = rng.standard_normal(grid.shape, dtype=np.float32)
        ndimage.gaussian_filter(noise, sigma_um / ps, output=noise, mode="reflect")
        noise /= noise.std() + np.float32(1e-12)
        return noise, noise, ps
    h = math.ceil(grid.height * ps / step) + 2
    w = math.ceil(grid.width * ps / step) + 2
    noise = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma_um / step, mode="wrap")
    noise /= noise.std() + 1e-12
    ys, xs = grid.pixel_centers()
    # bilinear interpolation on a regular grid is separable: one sparse matrix per axis
    wy = _interpolation_matrix((ys - grid.y0) / step, h)
    wx = _interpolation_matrix((xs - grid.x0) / step, w)
    field = np.asarray(wx @ np.asarray(wy @ noise).T).T
    return field.astype(np.float32), noise, step


def _interpolation_matrix(positions, n):
    """Sparse ``(len(positions), n)`` matrix of linear interpolation weights at fractional indices."""
    import scipy.sparse as sp

    positions = np.clip(positions, 0, n - 1)
    i0 = np.minimum(np.floor(positions).astype(np.int64), n - 2)
    f = positions - i0
    rows = np.arange(len(positions))
    return sp.csr_matrix((np.r_[1 - f, f], (np.r_[rows, rows], np.r_[i0, i0 + 1])), shape=(len(positions), n))


def _sample_field(noise, step, x0, y0, x, y):
    return ndimage.map_coordinates(
        noise, [(np.asarray(y) - y0) / step, (np.asarray(x) - x0) / step], order=1, mode="nearest"
    )


def _layout(rng, x0, y0, width, height, subtype, he_grid):
    """Regions, structures (glands, nests, pearls, vessels) and cell positions."""
    import shapely

    domain = shapely.box(x0, y0, x0 + width, y0 + height)
    cx, cy = x0 + width / 2, y0 + height / 2
    tissue = _star(cx, cy, 0.63 * width, 0.63 * height, rng, amplitude=0.10).intersection(domain)
    if tissue.geom_type != "Polygon":
        tissue = max(shapely.get_parts(tissue), key=lambda g: g.area)

    # tumour regions on a jittered grid of about 200 µm, subtypes in a checkerboard; a sample of one grid cell
    # holds one tumour region, which "mixed" splits in two along a band of stroma
    nx, ny = max(1, round(width / 200)), max(1, round(height / 200))
    sx, sy = width / nx, height / ny
    flip = int(rng.integers(2))
    blobs = []
    for j in range(ny):
        for i in range(nx):
            jitter = 0.12 if nx * ny > 1 else 0.04
            bx = x0 + (i + 0.5) * sx + rng.uniform(-jitter, jitter) * sx
            by = y0 + (j + 0.5) * sy + rng.uniform(-jitter, jitter) * sy
            kind = ("gland", "solid")[(i + j + flip) % 2] if subtype == "mixed" else subtype
            r = 0.42 * min(sx, sy) * rng.uniform(0.92, 1.08)
            blobs.append([kind, _star(bx, by, r, r * rng.uniform(0.88, 1.12), rng, amplitude=0.22)])
    if subtype == "mixed" and len(blobs) == 1:
        blob = blobs[0][1]
        c = blob.centroid
        phi = rng.uniform(0, np.pi) if width == height else (0.0 if width > height else np.pi / 2)
        far = 4 * max(width, height)
        ux, uy = np.cos(phi), np.sin(phi)  # normal of the dividing band
        vx, vy = -uy, ux
        halves = []
        for sign in (-1, 1):
            off = sign * 6.0
            near_edge = (c.x + ux * off, c.y + uy * off)
            far_edge = (c.x + ux * (off + sign * far), c.y + uy * (off + sign * far))
            halves.append(
                shapely.Polygon(
                    [
                        (near_edge[0] - vx * far, near_edge[1] - vy * far),
                        (near_edge[0] + vx * far, near_edge[1] + vy * far),
                        (far_edge[0] + vx * far, far_edge[1] + vy * far),
                        (far_edge[0] - vx * far, far_edge[1] - vy * far),
                    ]
                )
            )
        kinds = ("gland", "solid") if flip == 0 else ("solid", "gland")
        blobs = [[kinds[0], blob.intersection(halves[0])], [kinds[1], blob.intersection(halves[1])]]
    inner = tissue.buffer(-min(10.0, 0.05 * min(width, height)))
    kept = []
    for k, (kind, blob) in enumerate(blobs):
        others = [b for m, (_, b) in enumerate(blobs) if m != k]
        blob = blob.intersection(inner)
        if others:
            blob = blob.difference(shapely.union_all(others).buffer(6.0))
        if blob.is_empty or blob.area < 200:
            continue
        if blob.geom_type != "Polygon":
            blob = max(shapely.get_parts(blob), key=lambda g: g.area)
        kept.append((kind, blob))
    if subtype == "mixed" and len({k for k, _ in kept}) < 2:
        msg = f"A sample of {width:g} x {height:g} µm is too small for tumour of both subtypes; use a larger size_um."
        raise ValueError(msg)
    regions = []
    for kind, blob in kept:
        n = sum(1 for r in regions if r["subtype"] == kind) + 1
        regions.append(
            {"region_id": f"{kind}_tumour_{n}", "tissue": f"{kind}_tumour", "subtype": kind, "geometry": blob}
        )
    tumour_union = shapely.union_all([r["geometry"] for r in regions])
    stroma = tissue.difference(tumour_union)
    regions.append({"region_id": "stroma", "tissue": "stroma", "subtype": "none", "geometry": stroma})

    # collagen bundles: patches of parallel fibres whose direction varies smoothly across the tissue
    _, theta_noise, theta_step = _smooth_field(rng, he_grid, 40.0)
    fibre_seeds = _lattice(x0, y0, x0 + width, y0 + height, 40.0, rng, jitter=10.0)
    fibre_dir = _sample_field(theta_noise, theta_step, x0, y0, fibre_seeds[:, 0], fibre_seeds[:, 1]) * np.pi * 0.8
    fibre_dir = fibre_dir + rng.normal(0, 0.25, len(fibre_dir))

    cells = _Cells()
    obstacles: list[tuple[float, float, float, int, bool]] = []  # x, y, r, kind, mucin
    pearl_centres: list[tuple[float, float, float]] = []
    exclusion: list[tuple[float, float, float]] = []  # discs no stroma cell may enter: x, y, r

    for reg in regions[:-1]:
        blob = reg["geometry"]
        bx0, by0, bx1, by1 = blob.bounds
        if reg["subtype"] == "gland":
            # glands packed at random (random sequential adsorption): lumen, then a ring of columnar cells
            centres = _lattice(bx0, by0, bx1, by1, 7.0, rng, jitter=3.5)
            centres = centres[rng.permutation(len(centres))]
            lumens = rng.uniform(3.5, 10.0, len(centres))
            accepted: list[tuple[float, float, float]] = []
            for (gx, gy), rl in zip(centres, lumens, strict=True):
                outer = rl + 13.5
                if not blob.contains(shapely.Point(gx, gy).buffer(outer - 5.0)):
                    continue
                if any(np.hypot(gx - ax, gy - ay) < outer + ao - 4.0 for ax, ay, ao in accepted):
                    continue
                accepted.append((gx, gy, outer))
                mucin = bool(rng.random() < 0.4)
                obstacles.append((gx, gy, rl, _GLAND_LUMEN, mucin))
                exclusion.append((gx, gy, rl + 14.0))
                rc = rl + 5.5
                n = max(5, int(2 * np.pi * rc / 7.0))
                phi = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
                phi = phi + rng.normal(0, 0.15 / n * 2 * np.pi, n)
                rr = rc + rng.normal(0, 0.4, n)
                state = np.where(
                    mucin,
                    _STATE_NAMES.index("mucinous"),
                    np.where(rng.random(n) < 0.2, _STATE_NAMES.index("proliferating"), 0),
                )
                cells.add(gx + rr * np.cos(phi), gy + rr * np.sin(phi), "tumour_gland", state, angle=phi)
        else:
            seeds = _lattice(bx0, by0, bx1, by1, 70.0, rng, jitter=12.0)
            seeds = seeds[_inside(blob, seeds)]
            if len(seeds) < 2:
                seeds = np.array([[blob.centroid.x, blob.centroid.y], [blob.centroid.x + 1e3, blob.centroid.y]])
            # keratin pearls near some nest centres
            nest_pearls = []
            for px, py in seeds:
                if rng.random() > 0.6:
                    continue
                core = rng.uniform(3.0, 6.0)
                px += rng.normal(0, 6)
                py += rng.normal(0, 6)
                outer = core + 14.0
                if not blob.contains(shapely.Point(px, py).buffer(outer + 4)):
                    continue
                obstacles.append((px, py, core, _PEARL_CORE, False))
                pearl_centres.append((px, py, outer))
                nest_pearls.append((px, py, outer))
                for ring, spacing in ((core + 3.2, 6.5), (core + 9.5, 8.0)):
                    n = max(4, int(2 * np.pi * ring / spacing))
                    phi = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
                    cells.add(
                        px + ring * np.cos(phi),
                        py + ring * np.sin(phi),
                        "tumour_solid",
                        "keratinizing",
                        angle=phi + np.pi / 2,
                    )
            # tumour sheet on a hexagonal lattice; septa along the borders between nests
            pts = _lattice(bx0, by0, bx1, by1, 10.5, rng, jitter=1.2)
            pts = pts[_inside(blob.buffer(-4.0), pts)]
            d, _ = cKDTree(seeds).query(pts, k=2)
            pts = pts[(d[:, 1] - d[:, 0]) / 2 > 4.5]
            if nest_pearls:
                dp, ip = cKDTree(np.array(nest_pearls)[:, :2]).query(pts)
                pts = pts[dp > np.array(nest_pearls)[ip, 2] + 2.0]
            state = np.where(rng.random(len(pts)) < 0.2, _STATE_NAMES.index("proliferating"), 0)
            cells.add(pts[:, 0], pts[:, 1], "tumour_solid", state, rng=rng)
            reg["nest_seeds"] = seeds

    # vessels in the stroma (not in the tumour regions)
    stroma_core = stroma.buffer(-14.0)
    if not stroma_core.is_empty:
        bx0, by0, bx1, by1 = stroma.bounds
        vc = _lattice(bx0, by0, bx1, by1, 65.0, rng, jitter=15.0)
        vc = vc[_inside(stroma_core, vc)]
        for vx, vy in vc:
            rv = rng.uniform(4.0, 10.0)
            obstacles.append((vx, vy, rv, _VESSEL_LUMEN, False))
            exclusion.append((vx, vy, rv + 2.0))
            re_ = rv + 1.8
            n = max(3, int(2 * np.pi * re_ / 13.0))
            phi = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
            cells.add(vx + re_ * np.cos(phi), vy + re_ * np.sin(phi), "endothelial", angle=phi + np.pi / 2)
            if rv >= 3.7:
                rbc = _lattice(vx - rv, vy - rv, vx + rv, vy + rv, 7.3, rng, jitter=0.3)
                rbc = rbc[np.hypot(rbc[:, 0] - vx, rbc[:, 1] - vy) <= rv - 3.65]
                if len(rbc) == 0:
                    rbc = np.array([[vx, vy]])
                rbc = rbc[rng.random(len(rbc)) < 0.85]
                cells.add(rbc[:, 0], rbc[:, 1], "erythrocyte", rng=rng)

    # stroma cells: anywhere in the tissue outside epithelial structures
    bx0, by0, bx1, by1 = tissue.bounds
    in_stroma_area = tissue.buffer(-2.0)

    def stroma_candidates(spacing, keep, jitter):
        pts = _lattice(bx0, by0, bx1, by1, spacing, rng, jitter=jitter)
        pts = pts[rng.random(len(pts)) < keep]
        pts = pts[_inside(in_stroma_area, pts)]
        ok = np.ones(len(pts), dtype=bool)
        for reg in regions[:-1]:
            if reg["subtype"] == "solid":
                inside = _inside(reg["geometry"].buffer(-2.0), pts)
                if inside.any():
                    d, _ = cKDTree(reg["nest_seeds"]).query(pts[inside], k=2)
                    in_septum = (d[:, 1] - d[:, 0]) / 2 <= 4.5
                    near_edge = ~_inside(reg["geometry"].buffer(-6.0), pts[inside])
                    ok[np.flatnonzero(inside)[~(in_septum | near_edge)]] = False
        if exclusion:
            ex = np.array(exclusion)
            d, i = cKDTree(ex[:, :2]).query(pts, k=min(3, len(ex)))
            d, i = np.atleast_2d(d.T).T, np.atleast_2d(i.T).T
            ok &= np.all(d > ex[i, 2] + 2.5, axis=1)
        if pearl_centres:
            pc = np.array(pearl_centres)
            d, i = cKDTree(pc[:, :2]).query(pts)
            ok &= d > pc[i, 2] + 3.0
        return pts[ok]

    # lymphoid aggregates in the stroma
    n_agg = max(1, round(stroma.area / 60000.0))
    agg = []
    st_inner = stroma.buffer(-25.0)
    if not st_inner.is_empty:
        bx0s, by0s, bx1s, by1s = st_inner.bounds
        tries = rng.uniform([bx0s, by0s], [bx1s, by1s], (50, 2))
        tries = tries[_inside(st_inner, tries)]
        agg = tries[:n_agg]
    groups = []
    for ax, ay in agg:
        pts = _lattice(ax - 24, ay - 24, ax + 24, ay + 24, 6.4, rng, jitter=0.5)
        pts = pts[np.hypot(pts[:, 0] - ax, pts[:, 1] - ay) < 22 * rng.uniform(0.8, 1.1)]
        groups.append(("lymphocyte", pts, None))
    fib = stroma_candidates(15.0, 0.6, 3.0)
    fib_theta = fibre_dir[cKDTree(fibre_seeds).query(fib)[1]] if len(fib) else np.zeros(0)
    groups.append(("fibroblast", fib, fib_theta))
    groups.append(("macrophage", stroma_candidates(38.0, 0.45, 8.0), None))
    groups.append(("lymphocyte", stroma_candidates(22.0, 0.35, 5.0), None))

    # resolve overlaps: structured cells first, then stroma groups in order
    cells.add(np.zeros(0), np.zeros(0), "tumour_solid", angle=np.zeros(0))  # (no structure at all is fine)
    x = np.concatenate(cells.x)
    y = np.concatenate(cells.y)
    ctype = np.concatenate(cells.ctype)
    state = np.concatenate(cells.state)
    angle = np.concatenate(cells.angle)
    excl_by_type = np.array([_TYPES[t]["excl"] for t in CELL_TYPES])
    for name, pts, theta in groups:
        if len(pts) == 0:
            continue
        e = _TYPES[name]["excl"]
        if len(x):
            tree = cKDTree(np.c_[x, y])
            d, i = tree.query(pts, k=min(8, len(x)), distance_upper_bound=e + excl_by_type.max())
            d, i = np.atleast_2d(d.T).T, np.atleast_2d(i.T).T
            valid = np.isfinite(d)
            ex = np.where(valid, excl_by_type[ctype[np.minimum(i, len(x) - 1)]], 0.0)
            ok = np.all(~valid | (d >= e + ex), axis=1)
            # lattice groups never conflict within themselves, random ones might
            pts = pts[ok]
            if theta is not None:
                theta = theta[ok]
        if theta is None:
            theta = rng.uniform(0, np.pi, len(pts))
        x = np.r_[x, pts[:, 0]]
        y = np.r_[y, pts[:, 1]]
        ctype = np.r_[ctype, np.full(len(pts), CELL_TYPES.index(name), dtype=np.int16)]
        state = np.r_[state, np.zeros(len(pts), dtype=np.int16)]
        angle = np.r_[angle, theta]
    keep = _inside(tissue.buffer(-1.5), np.c_[x, y])
    # structured cells (glands, nests) may still overlap another structure at a region's rim
    x, y, ctype, state, angle = x[keep], y[keep], ctype[keep], state[keep], angle[keep]
    x, y, ctype, state, angle = _thin(x, y, ctype, state, angle, excl_by_type)

    # cells take their region's labels
    region_index = np.full(len(x), len(regions) - 1, dtype=np.int16)
    for k, reg in enumerate(regions[:-1]):
        region_index[_inside(reg["geometry"], np.c_[x, y])] = k

    obs_arr = np.array([o[:4] for o in obstacles], dtype=np.float64).reshape(-1, 4)
    mucin = np.array([o[4] for o in obstacles], dtype=bool)
    cell_arrays = _cell_shapes(rng, x, y, ctype, state, angle, obs_arr, tissue)
    cell_arrays["region"] = region_index
    return {
        "domain": domain,
        "tissue": tissue,
        "regions": regions,
        "cells": cell_arrays,
        "obstacles": obs_arr,
        "mucin": mucin,
        "fibre_seeds": fibre_seeds,
        "fibre_dir": fibre_dir,
    }


def _thin(x, y, ctype, state, angle, excl_by_type):
    """Drop the later of two cells closer than their exclusion radii (deterministic order)."""
    tree = cKDTree(np.c_[x, y])
    pairs = tree.query_pairs(2 * excl_by_type.max(), output_type="ndarray")
    if len(pairs):
        d = np.hypot(x[pairs[:, 0]] - x[pairs[:, 1]], y[pairs[:, 0]] - y[pairs[:, 1]])
        clash = d < excl_by_type[ctype[pairs[:, 0]]] + excl_by_type[ctype[pairs[:, 1]]] - 1e-9
        pairs = pairs[clash]
        pairs.sort(axis=1)
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
        drop = np.zeros(len(x), dtype=bool)
        for i, j in pairs:
            if not drop[i] and not drop[j]:
                drop[j] = True
        keep = ~drop
        x, y, ctype, state, angle = x[keep], y[keep], ctype[keep], state[keep], angle[keep]
    return x, y, ctype, state, angle


def _type_value(ctype, state, key):
    """Per-cell parameter from the type table, replaced by the state table where the state defines it."""
    values = np.array([_TYPES[t][key] for t in CELL_TYPES])[ctype]
    for s, params in _STATES.items():
        if key in params:
            values = np.where(state == _STATE_NAMES.index(s), params[key], values)
    return values


def _cell_shapes(rng, x, y, ctype, state, angle, obstacles, tissue):
    """Cell radii and nuclear outlines that fit inside each cell's own territory."""
    n = len(x)
    R = _type_value(ctype, state, "R") * rng.uniform(0.92, 1.08, n)
    a = _type_value(ctype, state, "a") * rng.uniform(0.85, 1.15, n)
    b = _type_value(ctype, state, "b") * rng.uniform(0.85, 1.15, n)
    irregular = _type_value(ctype, state, "irregular")
    harm_amp = rng.normal(0, 1, (n, _N_HARMONICS)) * irregular[:, None] / np.arange(1, _N_HARMONICS + 1)
    harm_phase = rng.uniform(0, 2 * np.pi, (n, _N_HARMONICS))
    nucleated = a > 0
    cells = {
        "x": x,
        "y": y,
        "ctype": ctype,
        "state": state,
        "angle": angle,
        "R": R,
        "a": a,
        "b": b,
        "harm_amp": harm_amp,
        "harm_phase": harm_phase,
        "nucleated": nucleated,
    }
    _fit_nuclei(cells, obstacles, tissue)
    return cells


def _fit_nuclei(cells, obstacles, tissue, *, margin=1.15, step=0.85, rounds=8) -> None:
    """Shrink nuclei (in place) until their outline lies inside their cell (territory, radius, obstacles, tissue).

    The outline grown by ``margin`` must fit; nuclei that do not are shrunk by ``step``, at most ``rounds`` times.
    """
    idx = np.flatnonzero(cells["nucleated"])
    for _ in range(rounds):
        if len(idx) == 0:
            break
        bx, by = _nucleus_boundary(cells, idx, scale=margin)
        inside = _in_cell(cells, obstacles, tissue, bx.ravel(), by.ravel(), np.repeat(idx, bx.shape[1]))
        bad = ~inside.reshape(bx.shape).all(axis=1)
        if not bad.any():
            break
        cells["a"][idx[bad]] *= step
        cells["b"][idx[bad]] *= step
        idx = idx[bad]


def _pleomorphic_nuclei(seed: int, cells: dict, obstacles, tissue) -> dict:
    """The cells with their nuclei drawn anew for the realistic look (sizes, shapes and outlines as in real H&E).

    Starts from the clean look's nuclei (same centres, orientations and mean sizes per type) and varies them per
    :data:`_PLEOMORPHISM`, from the sample's own generator of nuclei (the clean look's draws are untouched); then
    shrinks, as the clean look does, those that do not fit in their cell. Returns a new dict; ``cells`` is left as
    it is.
    """
    rng = _realism._rng(seed, "nuclei")
    n = len(cells["x"])
    ctype = cells["ctype"]

    def param(key):
        return np.array([_PLEOMORPHISM[t][key] for t in CELL_TYPES])[ctype]

    scale = np.exp(rng.normal(0.0, 1.0, n) * param("size"))
    scale *= np.where(rng.random(n) < param("giant"), np.sqrt(2.0), 1.0)
    stretch = np.exp(0.5 * rng.normal(0.0, 1.0, n) * param("elongation"))
    k = np.arange(2, 2 + _N_HARMONICS_REALISTIC)
    irregular = param("irregular") * rng.lognormal(0.0, 0.5, n)  # some nuclei smooth, some notched or lobed
    amp = rng.normal(0.0, 1.0, (n, len(k))) * irregular[:, None] / (k - 1) ** 0.7
    coef = amp * np.exp(1j * rng.uniform(0, 2 * np.pi, (n, len(k))))
    # a notch of depth d and angular width w at theta0: r -= d exp(-(theta - theta0)^2 / 2w^2), harmonics k >= 2
    notched = rng.random(n) < param("notched")
    depth, width = rng.uniform(0.3, 0.6, n), rng.uniform(0.25, 0.45, n)
    theta0 = rng.uniform(0, 2 * np.pi, n)
    notch = -(depth * width * np.sqrt(2 / np.pi))[:, None] * np.exp(-0.5 * (k[None, :] * width[:, None]) ** 2)
    coef += np.where(notched[:, None], notch * np.exp(-1j * k[None, :] * theta0[:, None]), 0.0)
    # the outline stays within 45 % of the ellipse (nuclei are looked for up to 60 % beyond it)
    coef *= np.minimum(1.0, 0.45 / np.maximum(np.abs(coef).sum(axis=1), 1e-12))[:, None]
    out = {key: value for key, value in cells.items() if key != "harm_coef"}
    out["a"] = cells["a"] * scale * stretch
    out["b"] = cells["b"] * scale / stretch
    out["harm_amp"] = np.abs(coef)
    out["harm_phase"] = np.angle(coef)
    out["reach"] = 1.0 + np.abs(coef).sum(axis=1) + 0.02  # how far the outline reaches, relative to the ellipse
    # nuclei may come closer to the cell's edge than in the clean look, shrunk in finer steps
    _fit_nuclei(out, obstacles, tissue, margin=1.05, step=0.93, rounds=20)
    return out


def _nucleus_radius(cells, idx, z):
    """Outline radius factor ``1 + sum_k amp_k cos(k theta + phase_k)`` of nuclei ``idx`` at unit vectors ``z``.

    ``z = exp(i theta)`` (complex); ``cos(k theta + phase) = Re(exp(i phase) z**k)``.
    """
    if "harm_coef" not in cells:
        cells["harm_coef"] = (cells["harm_amp"] * np.exp(1j * cells["harm_phase"])).astype(np.complex64)
    coef = cells["harm_coef"][idx]
    if z.ndim == 2:
        coef = coef[:, None, :]
    zk = z * z  # k = 2
    out = 1 + (coef[..., 0] * zk).real
    for k in range(1, coef.shape[-1]):
        zk = zk * z
        out += (coef[..., k] * zk).real
    return out


def _nucleus_boundary(cells, idx, scale=1.0, n_vertices=_NUCLEUS_VERTICES):
    """Global ``x, y`` ``(len(idx), n_vertices)`` of the outlines of nuclei ``idx``."""
    t = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)[None, :].repeat(len(idx), axis=0)
    rho = _nucleus_radius(cells, idx, np.exp(1j * t).astype(np.complex64)) * scale
    u = cells["a"][idx, None] * rho * np.cos(t)
    v = cells["b"][idx, None] * rho * np.sin(t)
    ca, sa = np.cos(cells["angle"][idx])[:, None], np.sin(cells["angle"][idx])[:, None]
    return cells["x"][idx, None] + u * ca - v * sa, cells["y"][idx, None] + u * sa + v * ca


def _nucleus_rho(cells, idx, px, py):
    """Normalised radius of points relative to the outline of nuclei ``idx`` (<= 1 inside)."""
    # per-cell constants first (cheap), then gathered per point
    ca = np.cos(cells["angle"]).astype(np.float32)[idx]
    sa = np.sin(cells["angle"]).astype(np.float32)[idx]
    inv_a = (1 / np.maximum(cells["a"], 1e-6)).astype(np.float32)[idx]
    inv_b = (1 / np.maximum(cells["b"], 1e-6)).astype(np.float32)[idx]
    dx = (px - cells["x"][idx]).astype(np.float32)
    dy = (py - cells["y"][idx]).astype(np.float32)
    u = (dx * ca + dy * sa) * inv_a
    v = (dy * ca - dx * sa) * inv_b
    rho = np.hypot(u, v)
    # the outline's harmonics move it by well under 60%: farther points are outside whatever they are
    near = np.flatnonzero(rho < 1.6)
    z = ((u[near] + 1j * v[near]) / np.maximum(rho[near], 1e-12)).astype(np.complex64)
    rho[near] /= _nucleus_radius(cells, idx[near], z)
    return rho


def _obstacle_blocked(obstacles, ctype, px, py):
    """Tell where points lie in a lumen or keratin core that cells of type ``ctype`` cannot cover."""
    blocked = np.zeros(len(px), dtype=bool)
    if len(obstacles) == 0:
        return blocked
    tree = cKDTree(obstacles[:, :2])
    k = min(3, len(obstacles))
    d, i = tree.query(np.c_[px, py], k=k, distance_upper_bound=obstacles[:, 2].max() + 1e-6, workers=-1)
    d, i = np.atleast_2d(d.T).T, np.atleast_2d(i.T).T
    valid = np.isfinite(d)
    i = np.minimum(i, len(obstacles) - 1)
    inside = valid & (d < obstacles[i, 2])
    rbc = ctype == CELL_TYPES.index("erythrocyte")
    vessel = obstacles[i, 3] == _VESSEL_LUMEN
    blocked = np.any(inside & ~(vessel & rbc[:, None]), axis=1)
    return blocked


def _in_cell(cells, obstacles, tissue, px, py, owner):
    """Tell where points belong to the cell ``owner`` (its Voronoi territory within its radius, not blocked)."""
    tree = cKDTree(np.c_[cells["x"], cells["y"]])
    d, nearest = tree.query(np.c_[px, py], workers=-1)
    ok = (nearest == owner) & (d < cells["R"][owner])
    ok &= ~_obstacle_blocked(obstacles, cells["ctype"][owner], px, py)
    ok &= _inside(tissue, np.c_[px, py])
    return ok


def _cell_polygons(layout):
    """Cell outlines (Voronoi territory within each cell's radius, minus lumens, within the tissue) and areas."""
    import shapely

    cells = layout["cells"]
    obstacles = layout["obstacles"]
    tissue = layout["tissue"]
    pts = shapely.points(cells["x"], cells["y"])
    bx0, by0, bx1, by1 = layout["domain"].bounds
    frame = shapely.box(bx0 - 100, by0 - 100, bx1 + 100, by1 + 100)
    vor = shapely.get_parts(
        shapely.voronoi_polygons(shapely.MultiPoint(np.c_[cells["x"], cells["y"]]), extend_to=frame, ordered=True)
    )
    polys = shapely.intersection(vor, shapely.buffer(pts, cells["R"], quad_segs=16))
    if len(obstacles):
        tree = cKDTree(obstacles[:, :2])
        circles = shapely.buffer(shapely.points(obstacles[:, 0], obstacles[:, 1]), obstacles[:, 2], quad_segs=16)
        rbc = cells["ctype"] == CELL_TYPES.index("erythrocyte")
        k = min(3, len(obstacles))
        d, i = tree.query(np.c_[cells["x"], cells["y"]], k=k)
        d, i = np.atleast_2d(d.T).T, np.atleast_2d(i.T).T
        for col in range(k):
            near = d[:, col] < cells["R"] + obstacles[i[:, col], 2]
            near &= ~(rbc & (obstacles[i[:, col], 3] == _VESSEL_LUMEN))
            sel = np.flatnonzero(near)
            if len(sel):
                polys[sel] = shapely.difference(polys[sel], circles[i[sel, col]])
    edge = shapely.distance(tissue.exterior, pts) < cells["R"] + 1e-6
    if edge.any():
        polys[edge] = shapely.intersection(polys[edge], tissue)
    # keep the largest part of a cell split in two; a cell squeezed to nothing keeps a disk of 1 µm
    multi = np.flatnonzero((shapely.get_type_id(polys) != 3) | shapely.is_empty(polys))
    for m in multi:
        parts = shapely.get_parts(polys[m])
        parts = [p for p in parts if p.geom_type == "Polygon" and not p.is_empty]
        polys[m] = (
            max(parts, key=lambda g: g.area) if parts else shapely.Point(cells["x"][m], cells["y"][m]).buffer(1.0)
        )
    polys = shapely.set_precision(polys, 0.0)
    return polys, shapely.area(polys)


def _nucleus_outlines(cells):
    import shapely

    idx = np.flatnonzero(cells["nucleated"])
    bx, by = _nucleus_boundary(cells, idx)
    coords = np.stack([bx, by], axis=-1)
    coords = np.concatenate([coords, coords[:, :1]], axis=1)
    return {"index": idx, "polygons": shapely.polygons(coords)}


# --------------------------------------------------------------------------------------------------------------
# Transcripts
# --------------------------------------------------------------------------------------------------------------

#: Niche-dependent programs of ``synthetic_tissue(..., niche=True)``: (name, cell types, genes, factor F at full
#: strength, weight kind, length scale µm, centre µm). A cell's expected expression of the genes is multiplied by
#: ``1 + (F - 1) w`` with ``w`` given by :func:`_niche_weight` from its distances to the tumour border and to vessels.
NICHE_EFFECTS: tuple[tuple[str, tuple[str, ...], tuple[str, ...], float, str, float, float], ...] = (
    ("cancer-associated fibroblasts", ("fibroblast",), ("FAP", "POSTN"), 3.0, "near_tumour", 15.0, 0.0),
    ("cytotoxic lymphocytes in tumour", ("lymphocyte",), ("CD8A", "CCL5"), 3.0, "in_tumour", 10.0, 0.0),
    ("tumour-associated macrophages", ("macrophage",), ("CD163", "APOE"), 3.0, "near_tumour", 20.0, 0.0),
    ("tumour endothelium", ("endothelial",), ("PLVAP",), 2.5, "near_tumour", 20.0, 0.0),
    ("hypoxic tumour cores", ("tumour_gland", "tumour_solid"), ("PGK1",), 4.0, "far_from_vessels", 15.0, 80.0),
)


def _niche_weight(kind, scale, centre, tumour_distance, vessel_distance):
    """Strength in [0, 1] of a niche effect for cells at signed ``tumour_distance`` (negative inside) and
    ``vessel_distance`` (µm)."""
    s = np.asarray(tumour_distance, dtype=np.float64)
    v = np.asarray(vessel_distance, dtype=np.float64)
    if kind == "near_tumour":  # 1 inside the tumour, decaying outside
        return np.exp(-np.clip(s, 0, None) / scale)
    if kind == "in_tumour":
        return 0.5 * (1 - np.tanh(s / (2 * scale)))  # logistic 1 / (1 + exp(s / scale)), without overflow
    if kind == "far_from_vessels":
        return 0.5 * (1 + np.tanh(np.where(np.isfinite(v), v - centre, 1e6) / (2 * scale)))
    msg = f"unknown niche weight {kind!r}"
    raise ValueError(msg)


def niche_factors(cell_type, tumour_distance, vessel_distance) -> np.ndarray:
    """Factors ``(cells, genes of GENES)`` of ``niche=True`` on each cell's expected expression.

    ``cell_type``: codes into :data:`CELL_TYPES` or names; distances as in the table's ``obs["tumour_distance"]``
    and ``obs["vessel_distance"]``.
    """
    ct = np.asarray(cell_type)
    if ct.dtype.kind in "OUS":
        ct = np.array([CELL_TYPES.index(str(t)) for t in ct], dtype=np.int64)
    ct = ct.astype(np.int64)
    factors = np.ones((len(ct), len(GENES)))
    for _, types, genes, strength, kind, scale, centre in NICHE_EFFECTS:
        w = _niche_weight(kind, scale, centre, tumour_distance, vessel_distance)
        sel = np.isin(ct, [CELL_TYPES.index(t) for t in types])
        for g in genes:
            factors[sel, GENES.index(g)] *= 1 + (strength - 1) * w[sel]
    return factors


def _niche_distances(layout) -> dict[str, np.ndarray]:
    """Signed distance of each cell centre to the tumour border (negative inside) and distance to a vessel lumen."""
    import shapely

    cells = layout["cells"]
    pts = shapely.points(cells["x"], cells["y"])
    regions = layout["regions"]
    tumour = [r["geometry"] for r in regions[:-1]]
    if tumour:
        border = shapely.union_all([g.boundary for g in tumour])
        s = shapely.distance(border, pts)
        s = np.where(cells["region"] < len(regions) - 1, -s, s)
    else:
        s = np.full(len(pts), np.inf)
    obstacles = layout["obstacles"]
    vessels = obstacles[obstacles[:, 3] == _VESSEL_LUMEN] if len(obstacles) else obstacles
    if len(vessels):
        d, i = cKDTree(vessels[:, :2]).query(np.c_[cells["x"], cells["y"]])
        v = np.clip(d - vessels[i, 2], 0, None)
    else:
        v = np.full(len(pts), np.inf)
    return {"tumour_distance": s.astype(np.float64), "vessel_distance": v.astype(np.float64), "ctype": cells["ctype"]}



def _expression_means(cells):
    """Mean expression profile (cells x genes, rows sum to 1) from type and state programs."""
    panel_rng = np.random.default_rng(20240611)  # gene weights are part of the panel, the same for every seed
    n_genes = len(GENES)
    gene_weight = panel_rng.uniform(0.5, 1.8, n_genes)
    gidx = {g: k for k, g in enumerate(GENES)}
    n_types = len(CELL_TYPES)
    type_profile = np.full((n_types, n_genes), 0.03)
    for t, name in enumerate(CELL_TYPES):
        if name != "erythrocyte":
            for g in HOUSEKEEPING:
                type_profile[t, gidx[g]] += 1.0
        for g in PROGRAMS[name]:
            type_profile[t, gidx[g]] += 4.0 if name != "erythrocyte" else 12.0
    state_profile = np.zeros((len(_STATE_NAMES), n_genes))
    for s, name in enumerate(_STATE_NAMES):
        for g in STATE_PROGRAMS.get(name, ()):
            state_profile[s, gidx[g]] += 5.0
    profile = (type_profile[cells["ctype"]] + state_profile[cells["state"]]) * gene_weight
    return profile


def _place_molecules(rng, cells, obstacles, tissue, owner, want_nuc):
    """Positions of molecules in their cell ``owner``, in its nucleus where ``want_nuc`` (rejection sampling).

    Returns ``x``, ``y`` and whether each molecule found a place (those that did not: cells whose territory is tiny).
    ``want_nuc`` is changed: nuclear molecules that did not hit their nucleus in 10 tries go to the cytoplasm.
    """
    px = np.empty(len(owner))
    py = np.empty(len(owner))
    placed = np.zeros(len(owner), dtype=bool)
    for attempt in range(30):
        todo = np.flatnonzero(~placed)
        if len(todo) == 0:
            break
        o = owner[todo]
        nuc = want_nuc[todo]
        # candidates: inside the nucleus's bounding ellipse, or anywhere in the cell's disc
        r = np.sqrt(rng.random(len(todo)))
        t = rng.uniform(0, 2 * np.pi, len(todo))
        reach = cells["reach"][o] if "reach" in cells else 1.3  # of the outline, relative to the ellipse
        a = np.where(nuc, cells["a"][o] * reach, cells["R"][o])
        b = np.where(nuc, cells["b"][o] * reach, cells["R"][o])
        u, v = a * r * np.cos(t), b * r * np.sin(t)
        ca, sa = np.cos(cells["angle"][o]), np.sin(cells["angle"][o])
        cx = cells["x"][o] + u * ca - v * sa
        cy = cells["y"][o] + u * sa + v * ca
        in_nucleus = np.where(cells["nucleated"][o], _nucleus_rho(cells, o, cx, cy) <= 1.0, False)
        ok = np.where(nuc, in_nucleus, ~in_nucleus)
        ok[ok] = _in_cell(cells, obstacles, tissue, cx[ok], cy[ok], o[ok])
        px[todo[ok]] = cx[ok]
        py[todo[ok]] = cy[ok]
        placed[todo[ok]] = True
        if attempt == 9:  # nuclear molecules of cells whose nucleus is too small to hit go to the cytoplasm
            want_nuc[:] = np.where(placed, want_nuc, False)
    return px, py, placed


def _transcripts(rng, layout, areas, nuclei, density, *, redraw=None, niche=None, seed=0):
    """Molecules of every cell, a few unassigned ones and control probes; the cells x genes count matrix.

    ``redraw``: ``(cells, nuclei, rng)`` of nuclei drawn anew (the realistic look): the molecules drawn with
    ``nuclei`` (their genes, cells, quality, and every draw of ``rng``) stay, and the molecules of cells are placed
    again in their cell with the new nuclei, from the generator given there.

    With ``niche`` (:func:`_niche_distances`), the genes of the cells' molecules (but those of the nuclear genes) are
    drawn again, from a random stream of their own, from each cell's program times :func:`niche_factors`: every
    draw of ``rng`` stays that of ``niche=None``, so positions, quality and all images stay the same.
    """
    import shapely

    cells = layout["cells"]
    n_cells = len(cells["x"])
    n_genes = len(GENES)
    profile = _expression_means(cells) * rng.gamma(4.0, 0.25, (n_cells, n_genes))
    profile /= profile.sum(axis=1, keepdims=True)
    n_per_cell = rng.poisson(density * areas * rng.lognormal(0.0, 0.3, n_cells))
    counts = rng.multinomial(n_per_cell, profile)  # cells x genes

    owner = np.repeat(np.arange(n_cells), counts.sum(axis=1))
    gene = np.concatenate([np.repeat(np.arange(n_genes), row) for row in counts]) if n_cells else np.zeros(0, int)
    # the nucleus holds a share of a cell's molecules in proportion to its area, somewhat more in cells with
    # scant cytoplasm, less in secretory and phagocytic cells (and more for MALAT1, NEAT1)
    nuc_area = np.zeros(n_cells)
    nuc_area[nuclei["index"]] = shapely.area(nuclei["polygons"])
    p_nuc = np.clip(
        nuc_area / np.maximum(areas, 1e-6) * _type_value(cells["ctype"], cells["state"], "nuclear_share"), 0, 0.95
    )
    factor = np.ones(n_genes)
    for g in NUCLEAR_GENES:
        factor[GENES.index(g)] = 3.0
    want_nuc = rng.random(len(owner)) < np.clip(p_nuc[owner] * factor[gene], 0, 0.97)
    obstacles, tissue = layout["obstacles"], layout["tissue"]
    px, py, placed = _place_molecules(rng, cells, obstacles, tissue, owner, want_nuc)
    if not placed.all():
        # leftover molecules (cells whose territory is tiny) sit on the cell centre
        left = ~placed
        px[left] = cells["x"][owner[left]]
        py[left] = cells["y"][owner[left]]
        counts = np.zeros_like(counts)
        np.add.at(counts, (owner, gene), 1)
    if redraw is not None:
        # the same molecules (genes, cells, quality: the draws above), placed anew with the nuclei drawn anew
        cells, nuclei, place_rng = redraw
        nuc_area = np.zeros(n_cells)
        nuc_area[nuclei["index"]] = shapely.area(nuclei["polygons"])
        p_nuc = np.clip(
            nuc_area / np.maximum(areas, 1e-6) * _type_value(cells["ctype"], cells["state"], "nuclear_share"), 0, 0.95
        )
        want_nuc = place_rng.random(len(owner)) < np.clip(p_nuc[owner] * factor[gene], 0, 0.97)
        px, py, placed = _place_molecules(place_rng, cells, obstacles, tissue, owner, want_nuc)
        px[~placed] = cells["x"][owner[~placed]]
        py[~placed] = cells["y"][owner[~placed]]
    overlaps = np.zeros(len(owner), dtype=bool)
    nucleated = cells["nucleated"][owner]
    overlaps[nucleated] = _nucleus_rho(cells, owner[nucleated], px[nucleated], py[nucleated]) <= 1.0
    if niche is not None:
        gene = _niche_genes(np.random.default_rng([seed, 0x61C4E]), profile, niche, owner, gene)

    # unassigned molecules in the tissue outside cells, and control probes anywhere in the tissue
    tissue_area = tissue.area
    n_free = rng.poisson(0.02 * len(owner))
    n_ctrl = rng.poisson(0.004 * len(owner) + 5)
    bx0, by0, bx1, by1 = tissue.bounds
    extra = []
    for n_want, control in ((n_free, False), (n_ctrl, True)):
        got = np.zeros((0, 2))
        while len(got) < n_want:
            cand = rng.uniform([bx0, by0], [bx1, by1], (max(64, 2 * n_want), 2))
            cand = cand[_inside(tissue, cand)]
            got = np.r_[got, cand]
        got = got[:n_want]
        _, nearest = cKDTree(np.c_[cells["x"], cells["y"]]).query(got)
        inside = _in_cell(cells, obstacles, tissue, got[:, 0], got[:, 1], nearest)
        if not control:
            got = got[~inside]
            genes = rng.choice(n_genes, len(got), p=profile.mean(axis=0) / profile.mean(axis=0).sum())
            owners = np.full(len(got), -1)
        else:
            genes = n_genes + rng.integers(0, len(CONTROLS), len(got))
            owners = np.where(inside, nearest, -1)
        extra.append((got, genes, owners))
    del tissue_area

    all_x = np.concatenate([px] + [e[0][:, 0] for e in extra])
    all_y = np.concatenate([py] + [e[0][:, 1] for e in extra])
    all_gene = np.concatenate([gene] + [e[1] for e in extra])
    all_owner = np.concatenate([owner] + [e[2] for e in extra])
    all_nuc = np.concatenate([overlaps] + [np.zeros(len(e[0]), dtype=bool) for e in extra])
    if extra[1][0].shape[0]:
        ctrl_start = len(all_x) - len(extra[1][0])
        ctrl_owner = all_owner[ctrl_start:]
        has = ctrl_owner >= 0
        sel = np.flatnonzero(has) + ctrl_start
        all_nuc[sel] = np.where(
            cells["nucleated"][all_owner[sel]],
            _nucleus_rho(cells, all_owner[sel], all_x[sel], all_y[sel]) <= 1.0,
            False,
        )
    is_control = all_gene >= n_genes
    # Xenium-like quality: most molecules >= 20, a tail below; control probes score lower
    deficit = np.where(is_control, rng.gamma(2.0, 9.0, len(all_x)), rng.gamma(1.1, 7.0, len(all_x)))
    qv = np.clip(np.rint(40.0 - deficit), 0, 40).astype(np.float32)

    order = rng.permutation(len(all_x))
    width = max(5, len(str(n_cells)))
    cell_ids = np.array([f"cell_{i + 1:0{width}d}" for i in range(n_cells)] + ["UNASSIGNED"], dtype=object)
    tx = pd.DataFrame(
        {
            "x": all_x[order],
            "y": all_y[order],
            "gene": pd.Categorical.from_codes(all_gene[order], categories=list(PANEL)),
            "qv": qv[order],
            "is_control": is_control[order],
            "cell_id": cell_ids[np.where(all_owner[order] >= 0, all_owner[order], n_cells)],
            "overlaps_nucleus": all_nuc[order],
        }
    )
    tx["cell_id"] = tx["cell_id"].astype("category")
    # the count matrix counts what Xenium counts: assigned, not control, qv >= 20
    good = (all_owner >= 0) & ~is_control & (qv >= 20)
    mat = np.zeros((n_cells, n_genes), dtype=np.int32)
    np.add.at(mat, (all_owner[good], all_gene[good]), 1)
    return {"matrix": mat, "cell_ids": cell_ids[:-1]}, tx


def _niche_genes(rng, profile, niche, owner, gene):
    """Genes of the cells' molecules drawn again from ``profile`` times the niche factors (nuclear genes kept)."""
    n_genes = len(GENES)
    nuclear = np.isin(np.arange(n_genes), [GENES.index(g) for g in NUCLEAR_GENES])
    p = profile * niche_factors(niche["ctype"], niche["tumour_distance"], niche["vessel_distance"])
    p[:, nuclear] = 0.0
    p /= np.maximum(p.sum(axis=1, keepdims=True), 1e-300)
    # inverse CDF per molecule on the concatenated rows (row k's CDF shifted by k keeps the whole array sorted)
    cdf = np.cumsum(p, axis=1)
    cdf[:, -1] = 1.0
    cdf += np.arange(len(p))[:, None]
    redraw = np.flatnonzero(~nuclear[gene])
    u = owner[redraw] + rng.random(len(redraw))
    new = np.searchsorted(cdf.ravel(), u, side="right") - owner[redraw] * n_genes
    gene = gene.copy()
    gene[redraw] = np.clip(new, 0, n_genes - 1)
    return gene


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def _render_nuclei(rng, cells, grid: Grid, batch: int = 2_000_000):
    """Chromatin density and nuclear coverage on ``grid`` (float32, ``(H, W)``), drawn nucleus by nucleus."""
    ps = grid.pixel_size
    fine, _, _ = _smooth_field(rng, grid, 0.35, coarse=ps)
    coarse, _, _ = _smooth_field(rng, grid, 0.9, coarse=ps)
    chromatin = np.zeros(grid.shape, dtype=np.float32)
    coverage = np.zeros(grid.shape, dtype=np.float32)
    idx_all = np.flatnonzero(cells["nucleated"])
    if len(idx_all) == 0:
        return chromatin, coverage
    ctype, state = cells["ctype"], cells["state"]
    level = _type_value(ctype, state, "chromatin") * rng.uniform(0.85, 1.15, len(ctype))
    texture = _type_value(ctype, state, "texture")
    rim = _type_value(ctype, state, "rim")
    # bounding box of each (rotated, irregular) ellipse, with room for the outline's harmonics and soft edge
    reach = cells["reach"][idx_all] + 0.05 if "reach" in cells else 1.35
    a_ = cells["a"][idx_all] * reach + 0.5
    b_ = cells["b"][idx_all] * reach + 0.5
    ang = cells["angle"][idx_all]
    half_x = np.ceil(np.hypot(a_ * np.cos(ang), b_ * np.sin(ang)) / ps).astype(np.int64) + 1
    half_y = np.ceil(np.hypot(a_ * np.sin(ang), b_ * np.cos(ang)) / ps).astype(np.int64) + 1
    sizes = (2 * half_x + 1) * (2 * half_y + 1)
    starts = np.r_[0, np.cumsum(sizes)]
    edge = 0.35  # µm of soft edge
    pos = 0
    while pos < len(idx_all):
        end = int(np.searchsorted(starts, starts[pos] + batch, side="right")) - 1
        end = min(max(end, pos + 1), len(idx_all))
        sel = idx_all[pos:end]
        hx, hy = half_x[pos:end], half_y[pos:end]
        n_px = sizes[pos:end]
        owner_local = np.repeat(np.arange(len(sel)), n_px)
        local = np.arange(n_px.sum()) - np.repeat(np.r_[0, np.cumsum(n_px)[:-1]], n_px)
        side = (2 * hx + 1)[owner_local]
        dr = local // side - hy[owner_local]
        dc = local % side - hx[owner_local]
        owner = sel[owner_local]
        r0, c0 = grid.to_pixel(cells["x"][owner], cells["y"][owner])
        rows, cols = r0 + dr, c0 + dc
        valid = (rows >= 0) & (rows < grid.height) & (cols >= 0) & (cols < grid.width)
        rows, cols, owner = rows[valid], cols[valid], owner[valid]
        px = grid.x0 + (cols + 0.5) * ps
        py = grid.y0 + (rows + 0.5) * ps
        rho = _nucleus_rho(cells, owner, px, py)
        a = cells["b"][owner]  # the short semi-axis sets how sharp the edge is in rho units
        mask = np.clip((1.0 - rho) * a / edge + 0.5, 0.0, 1.0).astype(np.float32)
        envelope = np.clip((rho - 0.65) / 0.3, 0, 1) * (rho <= 1.05)
        tex = 1.0 + texture[owner] * (0.6 * fine[rows, cols] + 0.6 * coarse[rows, cols])
        value = mask * level[owner] * np.clip(tex, 0.05, None) * (1.0 + rim[owner] * envelope)
        np.maximum.at(chromatin, (rows, cols), value.astype(np.float32))
        np.maximum.at(coverage, (rows, cols), mask)
        pos = end
    return chromatin, coverage


def _render_dapi(rng, chromatin, grid: Grid):
    """Nuclear stain image: chromatin blurred by the optics, with out-of-focus haze, shot and read noise."""
    ps = grid.pixel_size
    signal = ndimage.gaussian_filter(chromatin, 0.3 / ps)
    # out-of-focus haze (a wide blur): computed on a coarser copy, it is smooth anyway
    f = max(1, int(round(0.8 / ps)))
    h, w = chromatin.shape
    hp, wp = math.ceil(h / f) * f, math.ceil(w / f) * f
    padded = np.pad(chromatin, ((0, hp - h), (0, wp - w)), mode="edge")
    small = padded.reshape(hp // f, f, wp // f, f).mean(axis=(1, 3))
    small = ndimage.gaussian_filter(small, 2.0 / (ps * f))
    haze = _upsample(small, f, (h, w))
    signal = signal + np.float32(0.12) * haze
    counts = np.float32(90.0) + np.float32(9000.0) * (signal.astype(np.float32) + np.float32(0.012))
    # shot noise (variance proportional to the signal) and read noise
    counts += np.sqrt(counts * np.float32(2.0)) * rng.standard_normal(counts.shape, dtype=np.float32)
    counts += np.float32(25.0) * rng.standard_normal(counts.shape, dtype=np.float32)
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)[None]


def _polygon_mask(polygon, grid: Grid) -> np.ndarray:
    """Pixels of ``grid`` whose centres lie inside ``polygon`` (its exterior; scanlines, even-odd rule)."""
    xy = np.asarray(polygon.exterior.coords)
    x0, y0 = xy[:-1, 0], xy[:-1, 1]
    x1, y1 = xy[1:, 0], xy[1:, 1]
    ys, xs = grid.pixel_centers()
    mask = np.zeros(grid.shape, dtype=bool)
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    for row, y in enumerate(ys):
        crossing = (lo <= y) & (hi > y)
        if not crossing.any():
            continue
        t = (y - y0[crossing]) / (y1[crossing] - y0[crossing])
        cross_x = np.sort(x0[crossing] + t * (x1[crossing] - x0[crossing]))
        mask[row] = np.searchsorted(cross_x, xs) % 2 == 1
    return mask


def _upsample(small, factor, shape):
    """Bilinear upsampling of a block-averaged map by a whole ``factor`` back to ``shape``."""
    positions_y = (np.arange(shape[0]) + 0.5) / factor - 0.5
    positions_x = (np.arange(shape[1]) + 0.5) / factor - 0.5
    if small.shape[0] < 2 or small.shape[1] < 2:
        return np.broadcast_to(small.mean(), shape).astype(np.float32)
    wy = _interpolation_matrix(positions_y, small.shape[0])
    wx = _interpolation_matrix(positions_x, small.shape[1])
    return np.asarray(wx @ np.asarray(wy @ small).T).T.astype(np.float32)


def _resample(image, src: Grid, dst: Grid):
    """Resample a 2D map from ``src`` to ``dst`` (area-weighted by a Gaussian prefilter, then bilinear)."""
    factor = dst.pixel_size / src.pixel_size
    if factor > 1:
        image = ndimage.gaussian_filter(image, 0.5 * factor, mode="nearest")
    ys, xs = dst.pixel_centers()
    rows = (ys - src.y0) / src.pixel_size - 0.5
    cols = (xs - src.x0) / src.pixel_size - 0.5
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(image, [rr, cc], order=1, mode="nearest").astype(np.float32)


def _render_he(rng, layout, chromatin, coverage, dapi_grid: Grid, grid: Grid, *, look=None, seed=0):
    """H&E of the section: stain concentration maps -> Beer-Lambert -> RGB (uint8, ``(3, H, W)``).

    With ``look`` (:func:`st2he.datasets._realism.draw_look`), rendered with the realistic appearance: texture and
    section artefacts on the concentration maps, then this sample's stains and scanner; ``look["artefacts"]``
    receives what was drawn.
    """
    cells = layout["cells"]
    obstacles = layout["obstacles"]
    ps = grid.pixel_size
    ys, xs = grid.pixel_centers()
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    px, py = xx.ravel(), yy.ravel()
    shape = grid.shape

    tissue = _polygon_mask(layout["tissue"], grid).ravel()

    # which cell each pixel belongs to
    tree = cKDTree(np.c_[cells["x"], cells["y"]])
    d, nn = tree.query(np.c_[px, py], k=2, workers=-1)
    d1, d2, label = d[:, 0], d[:, 1], nn[:, 0]
    in_cell = tissue & (d1 < cells["R"][label])
    in_cell &= ~_obstacle_blocked(obstacles, cells["ctype"][label], px, py)

    # lumens and keratin cores
    kind = np.full(len(px), -1, dtype=np.int8)
    mucin_px = np.zeros(len(px), dtype=bool)
    core_r = np.zeros(len(px))
    if len(obstacles):
        otree = cKDTree(obstacles[:, :2])
        od, oi = otree.query(np.c_[px, py], workers=-1)
        inside = od < obstacles[oi, 2]
        kind[inside] = obstacles[oi[inside], 3].astype(np.int8)
        mucin_px[inside] = layout["mucin"][oi[inside]]
        core_r = od

    ctype = cells["ctype"][label]
    state = cells["state"][label]
    n_cells = len(cells["x"])
    cell_noise = rng.normal(0, 1, n_cells)
    grain, _, _ = _smooth_field(rng, grid, 0.6, coarse=ps)
    grain = grain.ravel()
    e_cell = _type_value(cells["ctype"], cells["state"], "e") * (1 + 0.12 * cell_noise)
    h_cell = _type_value(cells["ctype"], cells["state"], "h")
    hb_cell = _type_value(cells["ctype"], cells["state"], "hb")

    H = np.zeros(len(px), dtype=np.float32)
    E = np.zeros(len(px), dtype=np.float32)
    Hb = np.zeros(len(px), dtype=np.float32)

    # stroma: collagen fibres along the orientation field, patchy
    _, patch_of = cKDTree(layout["fibre_seeds"]).query(np.c_[px, py], workers=-1)
    direction = layout["fibre_dir"][patch_of]
    normal_x, normal_y = -np.sin(direction), np.cos(direction)
    seeds = layout["fibre_seeds"][patch_of]
    phase_noise, _, _ = _smooth_field(rng, grid, 4.0)
    patch, _, _ = _smooth_field(rng, grid, 12.0)
    breaks, _, _ = _smooth_field(rng, grid, 1.2, coarse=ps)
    across = (px - seeds[:, 0]) * normal_x + (py - seeds[:, 1]) * normal_y
    wave = np.cos(2 * np.pi * across / 4.0 + 3.0 * phase_noise.ravel())
    fibre = (0.5 + 0.5 * wave) ** 2 * np.clip(0.6 + 0.5 * breaks.ravel(), 0, 1)
    fibre = fibre * np.clip(0.7 + 0.3 * patch.ravel(), 0.3, 1.0)
    ecm = tissue & ~in_cell
    E[ecm] = 0.16 + 0.5 * fibre[ecm]
    H[ecm] = 0.03

    lumen = ecm & (kind == _GLAND_LUMEN)
    E[lumen] = 0.02
    H[lumen] = 0.0
    muc = lumen & mucin_px
    wisp, _, _ = _smooth_field(rng, grid, 1.5, coarse=ps)
    E[muc] = 0.05
    H[muc] = 0.24 * np.clip(0.65 + 0.35 * wisp.ravel()[muc], 0.2, 1.2)
    vessel = ecm & (kind == _VESSEL_LUMEN)
    E[vessel] = 0.12
    H[vessel] = 0.0
    core = ecm & (kind == _PEARL_CORE)
    whorl = 0.5 + 0.5 * np.cos(2 * np.pi * core_r[core] / 2.2 + 0.8 * phase_noise.ravel()[core])
    E[core] = 1.05 + 0.35 * whorl
    Hb[core] = 0.15

    # cytoplasm with its type's tint, fine grain, membranes of squamous cells
    c = in_cell
    E[c] = e_cell[label[c]] * (1 + 0.18 * grain[c])
    H[c] = h_cell[label[c]] * (1 + 0.25 * grain[c])
    mucinous = c & (state == _STATE_NAMES.index("mucinous"))
    H[mucinous] *= np.clip(1 + 0.5 * wisp.ravel()[mucinous], 0.3, 1.8)
    foamy = c & (ctype == CELL_TYPES.index("macrophage"))
    E[foamy] *= np.clip(1 + 0.45 * grain[foamy], 0.2, 2.0)
    membrane = c & (ctype == CELL_TYPES.index("tumour_solid")) & (d2 - d1 < 0.9)
    E[membrane] += 0.25
    rbc = c & (ctype == CELL_TYPES.index("erythrocyte"))
    rr_ = d1[rbc] / cells["R"][label[rbc]]
    Hb[rbc] = hb_cell[label[rbc]] * (0.8 + 0.25 * rr_**2)
    kerat = c & (state == _STATE_NAMES.index("keratinizing"))
    Hb[kerat] = hb_cell[label[kerat]]

    # nuclei: haematoxylin from the same chromatin the DAPI image shows
    chrom = _resample(chromatin, dapi_grid, grid).ravel()
    cover = np.clip(_resample(coverage, dapi_grid, grid).ravel(), 0, 1)
    h_nuc = _type_value(cells["ctype"], cells["state"], "h_nuc")[label]
    nucleus = c & (cover > 0.01)
    w = cover[nucleus]
    H[nucleus] = (1 - w) * H[nucleus] + w * (h_nuc[nucleus] * chrom[nucleus] / np.maximum(w, 0.3) + 0.15)
    E[nucleus] = (1 - w) * E[nucleus] + w * 0.12

    conc = np.stack([H, E, Hb]).reshape(3, *shape)
    if look is not None:
        tumour = np.isin(cells["ctype"], [CELL_TYPES.index("tumour_gland"), CELL_TYPES.index("tumour_solid")])
        maps = {"label": label, "in_cell": in_cell, "stroma": ecm & (kind < 0), "cover": np.where(nucleus, cover, 0.0)}
        maps.update({"direction": direction, "tumour": tumour})
        _realism.texture(seed, conc, maps, ps)
        look["artefacts"] = _realism.artefacts(
            seed, conc, tissue, ps, look["artefact_rates"], origin=(grid.x0, grid.y0)
        )
        return _realism.scan(seed, conc, look, ps)
    conc = ndimage.gaussian_filter(conc, (0, 0.35 / ps, 0.35 / ps))
    od = stain.concentrations_to_od(conc, ("haematoxylin", "eosin", "haemoglobin"))
    rgb = stain.WHITE * np.exp(-np.clip(od, 0, None)) + rng.normal(0, 1.5, od.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------------------------


def _assemble(layout, polys, areas, nuclei, counts, tx, dapi, he, dapi_grid, he_grid, source, *, genes=GENES):
    import anndata as ad
    import dask.dataframe as dd
    import geopandas as gpd
    import scipy.sparse as sp
    import shapely
    from spatialdata import SpatialData
    from spatialdata.models import PointsModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    from st2he._elements import ATTRS_KEY, parse_image

    cells = layout["cells"]
    ident = {COORDINATE_SYSTEM: Identity()}
    cell_ids = counts["cell_ids"]

    cell_shapes = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=polys, index=pd.Index(cell_ids, name="cell_id")), transformations=ident
    )
    nucleus_shapes = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=nuclei["polygons"], index=pd.Index(cell_ids[nuclei["index"]], name="cell_id")),
        transformations=ident,
    )
    regions = layout["regions"]
    region_shapes = ShapesModel.parse(
        gpd.GeoDataFrame(
            {"tissue": [r["tissue"] for r in regions], "subtype": [r["subtype"] for r in regions]},
            geometry=[r["geometry"] for r in regions],
            index=pd.Index([r["region_id"] for r in regions], name="region_id"),
        ),
        transformations=ident,
    )

    points = PointsModel.parse(
        dd.from_pandas(tx, npartitions=max(1, len(tx) // 1_000_000 + 1), sort=False),
        coordinates={"x": "x", "y": "y"},
        feature_key="gene",
        instance_key="cell_id",
        transformations=ident,
    )

    nuc_area = np.zeros(len(cell_ids))
    nuc_area[nuclei["index"]] = shapely.area(nuclei["polygons"])
    region_of = cells["region"]
    obs = pd.DataFrame(
        {
            "cell_id": cell_ids,
            "region": pd.Categorical(["cell_boundaries"] * len(cell_ids)),
            "cell_type": pd.Categorical.from_codes(cells["ctype"], categories=list(CELL_TYPES)),
            "cell_state": pd.Categorical.from_codes(cells["state"], categories=list(_STATE_NAMES)),
            "tissue": pd.Categorical(
                [regions[k]["tissue"] for k in region_of], categories=["gland_tumour", "solid_tumour", "stroma"]
            ),
            "subtype": pd.Categorical(
                [regions[k]["subtype"] for k in region_of], categories=["gland", "solid", "none"]
            ),
            "region_id": pd.Categorical([regions[k]["region_id"] for k in region_of]),
            "cell_area": areas,
            "nucleus_area": nuc_area,
            "transcript_counts": counts["matrix"].sum(axis=1),
        },
        index=pd.Index(cell_ids, name=None),
    )
    var = pd.DataFrame(index=pd.Index(list(genes)))
    program = dict.fromkeys(HOUSEKEEPING, "housekeeping")
    for name, members in list(STATE_PROGRAMS.items()) + list(PROGRAMS.items()):
        for g in members:
            program.setdefault(g, name)
    # the programs of the default panel's genes, position by position (the panel's genes only rename them)
    var["program"] = pd.Categorical([program[g] for g in GENES])
    adata = ad.AnnData(X=sp.csr_matrix(counts["matrix"]), obs=obs, var=var)
    adata.obsm["spatial"] = np.c_[cells["x"], cells["y"]]
    table = TableModel.parse(adata, region="cell_boundaries", region_key="region", instance_key="cell_id")

    sdata = SpatialData(
        images={
            "morphology_focus": parse_image(dapi, dapi_grid, c_coords=("DAPI",)),
            "he_image": parse_image(he, he_grid),
        },
        points={"transcripts": points},
        shapes={"cell_boundaries": cell_shapes, "nucleus_boundaries": nucleus_shapes, "regions": region_shapes},
        tables={"table": table},
    )
    sdata.attrs[ATTRS_KEY] = {"source": source}
    return sdata
