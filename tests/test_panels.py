"""synthetic_tissue(panel=...): the same tissue under the gene names of commercial panels."""

from __future__ import annotations

import numpy as np
import pytest

from st2he.datasets import synthetic_tissue
from st2he.datasets._panels import PANEL_GENES, PANELS, PROGRAM_ORDER, gene_map, panel_names, panel_programs
from st2he.datasets._synthetic import CONTROLS, GENES, HOUSEKEEPING, PROGRAMS, STATE_PROGRAMS
from st2he.pp._palette import LINEAGE_COLOURS, lineage_markers, make_palette

SIZE = 96.0


@pytest.fixture(scope="module")
def samples():
    return {p: synthetic_tissue(5, size_um=SIZE, panel=p) for p in ("default", "xenium_lung", "xenium_breast")}


def _image(sd, key):
    return np.asarray(sd.images[key]["scale0"].image if hasattr(sd.images[key], "keys") else sd.images[key])


def test_only_the_names_change(samples):
    ref = samples["default"]
    tx0 = ref.points["transcripts"].compute()
    default_names = np.array(list(GENES) + list(CONTROLS), dtype=object)
    for panel in ("xenium_lung", "xenium_breast"):
        sd = samples[panel]
        for key in ("morphology_focus", "he_image"):
            np.testing.assert_array_equal(_image(sd, key), _image(ref, key))
        tx = sd.points["transcripts"].compute()
        for col in ("x", "y", "qv", "is_control", "cell_id", "overlaps_nucleus"):
            np.testing.assert_array_equal(tx[col].to_numpy(), tx0[col].to_numpy())
        np.testing.assert_array_equal(tx["gene"].cat.codes.to_numpy(), tx0["gene"].cat.codes.to_numpy())
        genes, controls = panel_names(panel)
        assert list(tx["gene"].cat.categories) == list(genes) + list(controls)
        # molecule by molecule: the panel's gene is the counterpart of the default's
        mapping = {**gene_map(panel), **{c: c for c in CONTROLS}}
        want = [mapping[g] for g in default_names[tx0["gene"].cat.codes.to_numpy()]]
        assert list(tx["gene"].astype(str)) == want
        table, table0 = sd.tables["table"], ref.tables["table"]
        assert list(table.var_names) == list(genes)
        np.testing.assert_array_equal(table.X.toarray(), table0.X.toarray())
        assert list(table.var["program"]) == list(table0.var["program"])
        assert table.obs.equals(table0.obs)
        assert sd.attrs["st2he"]["source"]["panel"] == panel
        for key in ("cell_boundaries", "nucleus_boundaries"):
            assert sd.shapes[key].geometry.equals(ref.shapes[key].geometry)
    assert ref.attrs["st2he"]["source"]["panel"] == "default"


def test_default_panel_is_the_simulation_s_own():
    genes, controls = panel_names("default")
    assert genes == GENES and controls == CONTROLS
    programs = panel_programs("default")
    assert programs["housekeeping"] == HOUSEKEEPING
    assert all(programs[k] == v for k, v in {**PROGRAMS, **STATE_PROGRAMS}.items())


@pytest.mark.parametrize("panel", sorted(PANELS))
def test_every_program_mapped_to_genes_of_the_panel(panel):
    programs = panel_programs(panel)
    default = panel_programs("default")
    assert tuple(programs) == PROGRAM_ORDER
    for name in PROGRAM_ORDER:
        assert len(programs[name]) == len(default[name]), name
    genes, _ = panel_names(panel)
    assert len(genes) == len(set(genes)) == len(GENES) == 88
    off = sorted(set(genes) - PANEL_GENES[panel])
    assert off == [], f"{panel}: not on the listed panel: {off}"


def test_the_two_panels_share_few_genes():
    lung, _ = panel_names("xenium_lung")
    breast, _ = panel_names("xenium_breast")
    assert sorted(set(lung) & set(breast)) == ["EPCAM", "KRT15", "KRT5", "PTPRC", "TOP2A"]


def test_marked_counterparts_mark_the_same_lineage():
    """Where both a lung gene and its breast counterpart are in the marker table, they mark the same lineage."""
    markers = lineage_markers()
    lung, breast = gene_map("xenium_lung"), gene_map("xenium_breast")
    both = same = 0
    for g in GENES:
        a, b = markers.get(lung[g]), markers.get(breast[g])
        if a and b:
            both += 1
            same += a == b
    assert (both, same) == (40, 40)
    # the lung panel marks 75 of its 88 genes through the table, the breast panel 41
    assert sum(lung[g] in markers for g in GENES) == 75
    assert sum(breast[g] in markers for g in GENES) == 41


def test_lineage_palette_colours_counterparts_alike():
    """The lineage palette (table, then co-expression for unmarked genes) on one seed of each panel."""
    sds = {p: synthetic_tissue(1, size_um=192.0, panel=p) for p in ("xenium_lung", "xenium_breast")}
    pal = {p: make_palette(sd, method="lineage") for p, sd in sds.items()}
    lung, breast = gene_map("xenium_lung"), gene_map("xenium_breast")
    default = panel_programs("default")
    same = {
        name: sum(pal["xenium_lung"][lung[g]] == pal["xenium_breast"][breast[g]] for g in genes)
        for name, genes in default.items()
    }
    assert same == {
        "tumour_gland": 11,
        "tumour_solid": 12,
        "fibroblast": 10,
        "lymphocyte": 9,
        "macrophage": 9,
        "endothelial": 3,
        "erythrocyte": 0,
        "mucinous": 5,
        "keratinizing": 0,
        "proliferating": 3,
        "housekeeping": 8,
    }
    assert sum(same.values()) == 70  # of 88 genes; 7 of the 11 programs have every gene alike
    # every marker of the epithelial programs is in an epithelial colour on both panels
    epithelial = {LINEAGE_COLOURS[k] for k in ("epithelial", "glandular_epithelial", "squamous_epithelial")}
    for name in ("tumour_gland", "tumour_solid", "mucinous"):
        for g in default[name]:
            assert pal["xenium_lung"][lung[g]] in epithelial
            assert pal["xenium_breast"][breast[g]] in epithelial


def test_unknown_panel_refused():
    with pytest.raises(ValueError, match="panel must be one of"):
        synthetic_tissue(0, size_um=64.0, panel="cosmx_6k")
