"""The panel-independent "lineage" palette (issue 12 §3)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

import st2he
from st2he._elements import get_params
from st2he.pp._palette import LINEAGE_COLOURS, lineage_markers


def test_markers_take_their_lineage_colour_on_any_panel_and_in_mouse_symbols():
    small = st2he.pp.make_palette(["EPCAM", "CD3E", "COL1A1"], method="lineage")
    big = st2he.pp.make_palette(["EPCAM", "CD3E", "COL1A1", "KRT5", "PECAM1", "MS4A1", "CD68"], method="lineage")
    for gene in small:
        assert small[gene] == big[gene]  # a gene means the same colour on every panel
    assert big["EPCAM"] == LINEAGE_COLOURS["epithelial"]
    assert big["CD3E"] == LINEAGE_COLOURS["t_nk_cell"]
    assert big["COL1A1"] == LINEAGE_COLOURS["fibroblast"]
    assert big["KRT5"] == LINEAGE_COLOURS["squamous_epithelial"]
    assert big["MS4A1"] == LINEAGE_COLOURS["b_cell"]
    mouse = st2he.pp.make_palette(["Epcam", "Cd3e", "Col1a1"], method="lineage")
    assert mouse == {"Cd3e": big["CD3E"], "Col1a1": big["COL1A1"], "Epcam": big["EPCAM"]}
    # without expression data an unknown gene is "other"
    assert st2he.pp.make_palette(["NOT_A_MARKER"], method="lineage") == {"NOT_A_MARKER": LINEAGE_COLOURS["other"]}


def test_unmarked_genes_follow_the_lineage_they_are_coexpressed_with():
    rng = np.random.default_rng(0)
    n = 400
    t_cell = rng.random(n) < 0.5  # half the cells are T cells, half fibroblasts
    counts = {
        "CD3E": rng.poisson(np.where(t_cell, 8, 0.2)),
        "CD2": rng.poisson(np.where(t_cell, 6, 0.2)),
        "COL1A1": rng.poisson(np.where(t_cell, 0.2, 9)),
        "DCN": rng.poisson(np.where(t_cell, 0.2, 7)),
        "MY_T_GENE": rng.poisson(np.where(t_cell, 5, 0.3)),
        "MY_STROMA_GENE": rng.poisson(np.where(t_cell, 0.3, 5)),
        "FLAT_GENE": rng.poisson(np.full(n, 3.0)),
    }
    genes = sorted(counts)
    adata = ad.AnnData(np.stack([counts[g] for g in genes], axis=1).astype(np.float32))
    adata.var_names = genes
    pal = st2he.pp.make_palette(adata, method="lineage")
    assert pal["MY_T_GENE"] == LINEAGE_COLOURS["t_nk_cell"]
    assert pal["MY_STROMA_GENE"] == LINEAGE_COLOURS["fibroblast"]
    assert pal["FLAT_GENE"] == LINEAGE_COLOURS["other"]


def test_marker_table_is_well_formed():
    markers = lineage_markers()
    assert len(markers) > 200
    assert set(markers.values()) <= set(LINEAGE_COLOURS) - {"other"}
    assert all(g == g.upper() for g in markers)


def test_rasterise_with_the_lineage_palette():
    sdata = st2he.datasets.synthetic_tissue(0, size_um=96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
        st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0, palette="lineage")
        expected = st2he.pp.make_palette(sdata, method="lineage")
    params = get_params(sdata, "st2he_input")
    assert params["palette_method"] == "lineage"
    assert params["palette"] == expected
    assert params["palette"]["EPCAM"] == LINEAGE_COLOURS["epithelial"]
    assert params["palette"]["TP63"] == LINEAGE_COLOURS["squamous_epithelial"]


def test_real_cell_line_panel(shared_data):
    sdata = st2he.io.read_xenium(
        shared_data / "xenium_cellline_crop", image_pixel_size=400 / 237, image_origin=(1000.0, 1000.0)
    )
    pal = st2he.pp.make_palette(sdata, method="lineage")
    # Jurkat (T) and Raji (B) cells: their markers in their lineages' colours
    assert pal["CD3E"] == pal["CD3D"] == LINEAGE_COLOURS["t_nk_cell"]
    assert pal["SPIB"] == pal["POU2AF1"] == LINEAGE_COLOURS["b_cell"]
    # unmarked genes are placed by co-expression: at least some of them in the T or B colour
    unmarked = [g for g in pal if g.upper() not in lineage_markers()]
    placed = [g for g in unmarked if pal[g] in (LINEAGE_COLOURS["t_nk_cell"], LINEAGE_COLOURS["b_cell"])]
    assert len(placed) >= 5


def test_unknown_method_lists_lineage():
    with pytest.raises(ValueError, match="lineage"):
        st2he.pp.make_palette(["EPCAM"], method="lineages")
