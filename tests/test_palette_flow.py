"""The palette flows from the model: virtual_he redraws a picture drawn with other gene colours (issue 12 §3)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import st2he
from st2he._elements import get_params
from st2he._raster import Raster
from st2he.models import Pix2PixTurbo

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Identity(Pix2PixTurbo):
    """Tiles come back unchanged: the virtual H&E is the picture it was given."""

    def predict(self, tiles, **kwargs):
        return np.asarray(tiles).copy()


@pytest.fixture(scope="module")
def model():
    m = _Identity.from_config("tiny", seed=0)
    m.metadata["tile_size"] = 64
    return m.set_eval()


def _pixels(sdata, key):
    return np.asarray(Raster(sdata[key]).level0.values)


def _sample():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
        sdata = st2he.datasets.synthetic_tissue(0, size_um=80)
        st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0)  # a fresh co-expression palette
    return sdata


def _model_palette(sdata, drop=()):
    genes = sorted(get_params(sdata, "st2he_input")["palette"])
    hues = st2he.pp.make_palette(genes, method="hue")
    return {g: c for g, c in hues.items() if g not in drop}


def test_redraws_with_the_models_palette(model):
    sdata = _sample()
    before = _pixels(sdata, "st2he_input").copy()
    palette = _model_palette(sdata)
    assert palette != get_params(sdata, "st2he_input")["palette"]
    model.metadata["palette"] = palette
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
            st2he.tl.virtual_he(sdata, model=model, progress=False)
            # the same picture drawn directly with the model's palette
            st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0, palette=palette, key_added="direct")
    finally:
        del model.metadata["palette"]
    redrawn = _pixels(sdata, "virtual_he_input")
    np.testing.assert_array_equal(redrawn, _pixels(sdata, "direct"))
    assert not np.array_equal(redrawn, before)  # the colours did change
    np.testing.assert_array_equal(_pixels(sdata, "virtual_he"), redrawn)  # generated from the redrawn picture
    np.testing.assert_array_equal(_pixels(sdata, "st2he_input"), before)  # the user's picture is kept
    assert get_params(sdata, "virtual_he")["input_key"] == "virtual_he_input"
    assert get_params(sdata, "virtual_he_input")["palette"] == palette


def test_unknown_genes_are_left_out_with_a_warning(model):
    sdata = _sample()
    genes = sorted(get_params(sdata, "st2he_input")["palette"])
    model.metadata["palette"] = _model_palette(sdata, drop=genes[:5])
    try:
        with pytest.warns(UserWarning, match="5 genes of 'st2he_input' are not in the model's palette"):
            st2he.tl.virtual_he(sdata, model=model, progress=False)
    finally:
        del model.metadata["palette"]
    assert sorted(get_params(sdata, "virtual_he_input")["palette"]) == genes[5:]


def test_refusals_lose_nothing(model):
    sdata = _sample()
    model.metadata["palette"] = {"NOT_A_GENE": "#ff0000"}
    try:
        with pytest.raises(ValueError, match="share no gene"):
            st2he.tl.virtual_he(sdata, model=model, progress=False)
        model.metadata["palette"] = _model_palette(sdata)
        with pytest.raises(ValueError, match="other gene colours"):
            st2he.tl.virtual_he(sdata, model=model, progress=False, palette_mismatch="error")
        with pytest.raises(ValueError, match="palette_mismatch must be one of"):
            st2he.tl.virtual_he(sdata, model=model, progress=False, palette_mismatch="ignore")
    finally:
        del model.metadata["palette"]
    assert "virtual_he" not in sdata and "virtual_he_input" not in sdata


#: A panel that shares no gene with the simulated one (markers of st2he's lineage table, and two unmarked genes).
_NEW_PANEL = ["KRT19", "CDH1", "CD19", "CD4", "ACTA2", "MYH11", "VIM", "PDGFRB", "ITGAX", "NOTAGENE1", "NOTAGENE2"]


def _new_panel_sample(palette):
    rng = np.random.default_rng(3)
    he = np.full((96, 96, 3), 235, np.uint8)
    for cy, cx in rng.integers(8, 88, (25, 2)):
        yy, xx = np.ogrid[:96, :96]
        he[(yy - cy) ** 2 + (xx - cx) ** 2 <= 12] = (80, 40, 120)  # dark purple nuclei
    sdata = st2he.datasets.pairs_from_he(he, genes=_NEW_PANEL, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
        st2he.pp.rasterize_transcripts(sdata, palette=palette)
    return sdata


@pytest.fixture
def lineage_model(model):
    """The model as if trained with palette="lineage" on the simulated panel (its stored map has other genes)."""
    sim = st2he.datasets._synthetic.GENES
    model.metadata["palette"] = st2he.pp.make_palette(list(sim), method="lineage")
    model.metadata["palette_method"] = "lineage"
    yield model
    del model.metadata["palette"], model.metadata["palette_method"]


def test_a_lineage_model_redraws_a_new_panel_with_that_panels_lineage_palette(lineage_model):
    sdata = _new_panel_sample("coexpression")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
        st2he.tl.virtual_he(sdata, model=lineage_model, progress=False)
        st2he.pp.rasterize_transcripts(sdata, palette="lineage", key_added="direct")
    redrawn = get_params(sdata, "virtual_he_input")
    assert redrawn["palette_method"] == "lineage"
    assert sorted(redrawn["palette"]) == sorted(_NEW_PANEL)  # every gene of the new panel kept
    assert redrawn["palette"]["CD19"] == st2he.pp._palette.LINEAGE_COLOURS["b_cell"]
    assert redrawn["palette"]["ACTA2"] == st2he.pp._palette.LINEAGE_COLOURS["smooth_muscle_pericyte"]
    np.testing.assert_array_equal(_pixels(sdata, "virtual_he_input"), _pixels(sdata, "direct"))
    np.testing.assert_array_equal(_pixels(sdata, "virtual_he"), _pixels(sdata, "direct"))


def test_a_lineage_model_takes_a_lineage_picture_of_any_panel_as_it_is(lineage_model):
    sdata = _new_panel_sample("lineage")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no palette warning either
        st2he.tl.virtual_he(sdata, model=lineage_model, progress=False)
    assert "virtual_he_input" not in sdata
    np.testing.assert_array_equal(_pixels(sdata, "virtual_he"), _pixels(sdata, "st2he_input"))
    other = _new_panel_sample("hue")
    with pytest.raises(ValueError, match="model was trained with palette='lineage'"):
        st2he.tl.virtual_he(other, model=lineage_model, progress=False, palette_mismatch="error")
    assert "virtual_he" not in other


def test_training_pairs_record_the_lineage_palette_method():
    from st2he.tl._train import prepare_pairs

    lineage = _new_panel_sample("lineage")
    other = _new_panel_sample("coexpression")
    assert prepare_pairs([lineage], validation=None, tile_size=64)["palette_method"] == "lineage"
    assert prepare_pairs([lineage, other], validation=None, tile_size=64)["palette_method"] is None


def _breast_sample(**kwargs):
    """Lung-trained models meet this panel: 88 genes, 5 shared with the lung panel, a table of 67 cells."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
        sdata = st2he.datasets.synthetic_tissue(1, panel="xenium_breast", size_um=128)
        st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0, **kwargs)  # the default co-expression palette
    return sdata


@pytest.mark.parametrize("genes", [None, "subset"])
def test_a_lineage_model_redraws_as_a_direct_lineage_drawing_with_the_table(lineage_model, genes):
    # the lineage palette places genes outside the marker table by their co-expression, measured over the cells of
    # the object's table when it covers the genes: the redrawn picture must read that table as a direct drawing does
    sdata = _breast_sample()
    panel = sorted(get_params(sdata, "st2he_input")["palette"])
    assert sdata.tables["table"].n_obs >= 50 and set(panel) <= set(sdata.tables["table"].var_names)
    drawn = None if genes is None else panel[::2]
    if drawn is not None:
        sdata = _breast_sample(genes=drawn)
    before = _pixels(sdata, "st2he_input").copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
        st2he.tl.virtual_he(sdata, model=lineage_model, progress=False)
        st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0, palette="lineage", genes=drawn, key_added="direct")
    redrawn, direct = get_params(sdata, "virtual_he_input"), get_params(sdata, "direct")
    assert redrawn["palette_method"] == "lineage" and redrawn["redrawn_from"] == "st2he_input"
    assert sorted(redrawn["palette"]) == (panel if drawn is None else drawn)  # every gene drawn is kept
    assert redrawn["palette"] == direct["palette"]
    markers = st2he.pp._palette.lineage_markers()
    unmarked = [g for g in redrawn["palette"] if g.upper() not in markers]
    assert unmarked  # genes placed by co-expression are compared too
    np.testing.assert_array_equal(_pixels(sdata, "virtual_he_input"), _pixels(sdata, "direct"))
    np.testing.assert_array_equal(_pixels(sdata, "virtual_he"), _pixels(sdata, "direct"))
    np.testing.assert_array_equal(_pixels(sdata, "st2he_input"), before)
    assert get_params(sdata, "st2he_input")["palette_method"] == "coexpression"


def test_a_lineage_model_warns_and_uses_another_palette_as_it_is(lineage_model):
    sdata = _new_panel_sample("coexpression")
    with pytest.warns(UserWarning, match="drawn with the 'coexpression' palette, but the model was trained with"):
        st2he.tl.virtual_he(sdata, model=lineage_model, progress=False, palette_mismatch="warn")
    assert "virtual_he_input" not in sdata
    np.testing.assert_array_equal(_pixels(sdata, "virtual_he"), _pixels(sdata, "st2he_input"))


def test_a_model_without_the_lineage_method_reads_its_stored_palette_only(model):
    # the same lineage colours, but not recorded as palette_method="lineage" (e.g. trained on pictures drawn with a
    # stored mapping): the model's own gene -> colour map applies, and the new panel shares no gene with it
    sim = st2he.datasets._synthetic.GENES
    model.metadata["palette"] = st2he.pp.make_palette(list(sim), method="lineage")
    try:
        sdata = _new_panel_sample("lineage")
        with pytest.raises(ValueError, match="share no gene"):
            st2he.tl.virtual_he(sdata, model=model, progress=False)
        assert "virtual_he" not in sdata and "virtual_he_input" not in sdata
        # a picture of the model's own panel drawn with another palette: redrawn with the model's map, as before
        own = _sample()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
            st2he.tl.virtual_he(own, model=model, progress=False)
        assert get_params(own, "virtual_he_input")["palette"] == model.metadata["palette"]
        assert get_params(own, "virtual_he_input")["palette_method"] == "mapping"
    finally:
        del model.metadata["palette"]


def test_warn_uses_a_picture_the_model_shares_no_gene_with_and_says_so(model):
    sdata = _sample()
    model.metadata["palette"] = {"NOT_A_GENE": "#ff0000"}
    try:
        with pytest.warns(UserWarning, match="share no gene with the palette the model was trained with"):
            st2he.tl.virtual_he(sdata, model=model, progress=False, palette_mismatch="warn")
    finally:
        del model.metadata["palette"]
    assert "virtual_he_input" not in sdata
    np.testing.assert_array_equal(_pixels(sdata, "virtual_he"), _pixels(sdata, "st2he_input"))
