"""Pairs derived from real H&E: st2he.datasets.pairs_from_he (issue 12 §4)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import shapely
from scipy import ndimage

import st2he
from st2he._elements import get_params
from st2he._grid import Grid
from st2he._raster import Raster
from st2he.datasets import _synthetic as syn
from st2he.datasets._he_pairs import haematoxylin, segment_nuclei, tissue_mask

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.exists():
    DATA = Path(__file__).resolve().parents[1].parent.parent / "shared" / "data"
KATHER = DATA / "he_kather_crc_32" / "TUM-TCGA-DRHQMTQA.png"
needs_data = pytest.mark.skipif(not KATHER.exists(), reason="the real H&E of ../shared/data is not here")

HAEM = (70, 40, 130)  # a dark purple nucleus
PALE = (150, 120, 190)  # a paler, larger nucleus
PINK = (235, 170, 200)  # eosin background


def _drawn():
    """An H&E drawing at 0.5 µm: 6 small dark round, 4 elongated and 3 large pale nuclei, apart, on pink tissue."""
    img = np.full((200, 200, 3), PINK, np.uint8)
    yy, xx = np.mgrid[:200, :200]
    kinds = []
    for k, (cy, cx) in enumerate([(20, 20), (20, 60), (20, 100), (20, 140), (20, 180), (60, 180)]):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 4.5**2] = HAEM  # 2.25 µm radius: about 16 µm²
        kinds.append("lymphocyte")
    for cy, cx in [(70, 30), (70, 90), (110, 30), (110, 90)]:
        img[((yy - cy) / 3.5) ** 2 + ((xx - cx) / 14) ** 2 <= 1] = HAEM  # 7 x 1.75 µm
        kinds.append("fibroblast")
    for cy, cx in [(160, 40), (160, 110), (150, 170)]:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 10**2] = PALE  # 5 µm radius: about 79 µm²
        kinds.append("tumour_gland")
    return img, kinds


def _pairs(image, **kwargs):
    return st2he.datasets.pairs_from_he(image, **kwargs)


def test_drawn_nuclei_are_found_one_by_one_and_typed_by_their_shape():
    img, kinds = _drawn()
    sd = _pairs(img, seed=0, origin_um=(100.0, 50.0))
    obs = sd["table"].obs
    assert len(obs) == len(kinds) == 13
    # each drawn nucleus is one segmented nucleus, and its centre lies in it
    nuclei = sd["nucleus_boundaries"]
    found = {}
    centres = [(20, 20), (20, 60), (20, 100), (20, 140), (20, 180), (60, 180)]
    centres += [(70, 30), (70, 90), (110, 30), (110, 90), (160, 40), (160, 110), (150, 170)]
    for (cy, cx), kind in zip(centres, kinds, strict=True):
        x, y = 100.0 + (cx + 0.5) * 0.5, 50.0 + (cy + 0.5) * 0.5
        hit = nuclei.index[shapely.contains_xy(nuclei.geometry.values, x, y)]
        assert len(hit) == 1
        found[hit[0]] = kind
    assert len(found) == 13
    assert obs.loc[list(found), "cell_type"].astype(str).tolist() == list(found.values())
    # nucleus areas are the drawn ones (µm²): discs of 4.5 px and 10 px radius, ellipses of 14 x 3.5 px
    area = nuclei.geometry.area
    for cid, kind in found.items():
        want = {"lymphocyte": np.pi * 2.25**2, "fibroblast": np.pi * 7 * 1.75, "tumour_gland": np.pi * 25}[kind]
        assert area[cid] == pytest.approx(want, rel=0.2)
    # lymphocytes carry their program: most of their molecules are lymphocyte genes or housekeeping
    tx = sd["transcripts"].compute()
    lym = tx[tx["cell_id"].isin([c for c, k in found.items() if k == "lymphocyte"])]
    genes = set(syn.PROGRAMS["lymphocyte"]) | set(syn.HOUSEKEEPING)
    assert lym["gene"].isin(genes).mean() > 0.85


@needs_data
def test_real_tile_nuclei_count_matches_a_direct_labelling_and_every_molecule_lies_in_its_cell():
    sd = _pairs(KATHER, seed=2)
    from PIL import Image

    rgb = np.asarray(Image.open(KATHER).convert("RGB"))
    h = haematoxylin(rgb)
    labels = segment_nuclei(h, 0.5, tissue=tissue_mask(rgb))
    n = int(labels.max())
    assert n > 50  # a tumour tile is full of nuclei
    assert len(sd["table"]) == len(sd["nucleus_boundaries"]) == len(sd["cell_boundaries"]) == n
    assert len(np.unique(labels)) == n + 1  # labels 1..n, each used
    # the watershed only splits: never fewer nuclei than connected pieces of the nuclear mask
    assert n >= ndimage.label(labels > 0)[1]
    # each nucleus shape covers exactly its labelled pixels
    nuc_px = np.bincount(labels.ravel())[1:] * 0.25
    np.testing.assert_allclose(sd["nucleus_boundaries"].geometry.area.to_numpy(), nuc_px)
    np.testing.assert_allclose(sd["table"].obs["nucleus_area"].to_numpy(), nuc_px)

    tx = sd["transcripts"].compute()
    assert len(tx) == int(sd["table"].X.sum()) == get_params(sd, "transcripts").get("n", len(tx))
    assert (tx["cell_id"] != "UNASSIGNED").all()
    cells = sd["cell_boundaries"]
    inside = shapely.contains_xy(cells.geometry.loc[tx["cell_id"].astype(str)].values, tx["x"], tx["y"])
    assert inside.all()
    # molecules said to overlap the nucleus lie in it, the others do not
    nuclei = sd["nucleus_boundaries"].geometry.loc[tx["cell_id"].astype(str)].values
    np.testing.assert_array_equal(shapely.contains_xy(nuclei, tx["x"], tx["y"]), tx["overlaps_nucleus"].to_numpy())
    # the table counts every molecule of its cell
    counts = tx.groupby(["cell_id", "gene"], observed=True).size().unstack(fill_value=0)
    table = sd["table"].to_df().loc[counts.index, counts.columns]
    np.testing.assert_array_equal(table.to_numpy(), counts.to_numpy())


@needs_data
def test_stain_and_he_overlay_exactly_and_the_picture_round_trips():
    from spatialdata.transformations import get_transformation

    sd = _pairs(KATHER, seed=2, origin_um=(1000.0, 2000.0), pixel_size=0.5)
    stain, he = sd["morphology_focus"], sd["he_image"]
    assert Grid.from_element(stain) == Grid.from_element(he) == Grid(1000.0, 2000.0, 0.5, 224, 224)
    assert get_transformation(Raster(stain).level0, "global") == get_transformation(Raster(he).level0, "global")
    # the H&E is the file's pixels, untouched; the stain is bright where the haematoxylin is
    from PIL import Image

    rgb = np.asarray(Image.open(KATHER).convert("RGB"))
    np.testing.assert_array_equal(np.moveaxis(np.asarray(Raster(he).level0.values), 0, -1), rgb)
    dapi = np.asarray(Raster(stain).level0.values)[0].astype(float)
    h = haematoxylin(rgb)
    assert np.corrcoef(dapi.ravel(), h.ravel())[0, 1] > 0.95
    nuc = np.asarray(sd["nucleus_boundaries"].geometry.union_all().area) / (224 * 224 * 0.25)
    assert 0.05 < nuc < 0.8

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
        st2he.pp.rasterize_transcripts(sd, palette="lineage", pixel_size=0.5)
    made = get_params(sd, "st2he_input")
    assert made["palette_method"] == "lineage"
    pic = np.asarray(Raster(sd["st2he_input"]).level0.values)
    assert Grid.from_element(sd["st2he_input"]) == Grid.from_element(he)
    tx = sd["transcripts"].compute()
    assert made["molecules"]["kept"] == len(tx)  # every molecule drawn (qv >= 20, no controls)
    # the pixel of a molecule that is alone in its pixel has that molecule's gene colour
    col = ((tx["x"] - 1000.0) / 0.5).astype(int).to_numpy()
    row = ((tx["y"] - 2000.0) / 0.5).astype(int).to_numpy()
    flat = row * 224 + col
    alone = np.bincount(flat, minlength=224 * 224)[flat] == 1
    assert alone.sum() > 1000
    want = np.array([st2he.pp._palette.hex_to_rgb(made["palette"][g]) for g in tx["gene"].astype(str)[alone]])
    np.testing.assert_array_equal(pic[:, row[alone], col[alone]].T, want)


def test_same_seed_same_sample_and_a_new_panel():
    img, _ = _drawn()
    a = _pairs(img, seed=5)["transcripts"].compute()
    b = _pairs(img, seed=5)["transcripts"].compute()
    c = _pairs(img, seed=6)["transcripts"].compute()
    np.testing.assert_array_equal(a[["x", "y"]].to_numpy(), b[["x", "y"]].to_numpy())
    assert len(a) != len(c) or not np.array_equal(a[["x", "y"]].to_numpy(), c[["x", "y"]].to_numpy())
    panel = ["CD19", "MS4A1", "ACTA2", "VIM", "KRT19", "EPCAM", "NOTAGENE"]
    sd = _pairs(img, seed=5, genes=panel)
    assert list(sd["table"].var_names) == panel
    tx = sd["transcripts"].compute()
    assert set(tx["gene"].cat.categories) == set(panel)
    by_type = tx.merge(sd["table"].obs[["cell_type"]], left_on="cell_id", right_index=True)
    share = by_type.groupby("cell_type", observed=True)["gene"].apply(lambda g: g.isin(["CD19", "MS4A1"]).mean())
    assert share["lymphocyte"] > 0.6 > 0.15 > share["tumour_gland"]  # B-cell markers in lymphocytes
    epi = by_type.groupby("cell_type", observed=True)["gene"].apply(lambda g: g.isin(["KRT19", "EPCAM"]).mean())
    assert epi["tumour_gland"] > 0.6


def test_refusals():
    with pytest.raises(ValueError, match="RGB image"):
        _pairs(np.zeros((50, 50), np.uint8))
    with pytest.raises(ValueError, match="pixel_size must be a positive"):
        _pairs(np.zeros((50, 50, 3), np.uint8), pixel_size=0)
    with pytest.raises(FileNotFoundError, match="no image file"):
        _pairs("/nonexistent/he.png")
    with pytest.raises(ValueError, match="distinct gene names"):
        _pairs(np.zeros((50, 50, 3), np.uint8), genes=["A", "A"])
