"""st2he.datasets.synthetic_tissue: a simulated Xenium-like sample with a paired ground-truth H&E."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import shapely
from skimage.draw import polygon as fill_polygon

import st2he
from st2he._grid import Grid, _scale0
from st2he.datasets._synthetic import CONTROLS, PROGRAMS, STATE_PROGRAMS


@pytest.fixture(scope="module")
def sample():
    return st2he.datasets.synthetic_tissue(0)


@pytest.fixture(scope="module")
def transcripts(sample):
    return sample["transcripts"].compute()


def _image(sdata, key):
    element = sdata.images[key]
    return _scale0(element).values, Grid.from_element(element)


def _fill(geoms, grid: Grid) -> np.ndarray:
    """Label image (0 = none, k + 1 = geoms[k]) of polygons on ``grid``."""
    labels = np.zeros(grid.shape, dtype=np.int32)
    for k, g in enumerate(geoms):
        xy = np.asarray(g.exterior.coords)
        rr, cc = fill_polygon(
            (xy[:, 1] - grid.y0) / grid.pixel_size - 0.5, (xy[:, 0] - grid.x0) / grid.pixel_size - 0.5, grid.shape
        )
        labels[rr, cc] = k + 1
    return labels


# ------------------------------------------------------------------------------------------------ structure


def test_elements_are_those_of_a_xenium_object_with_its_he(sample):
    assert set(sample.images) == {"morphology_focus", "he_image"}
    assert set(sample.points) == {"transcripts"}
    assert {"cell_boundaries", "nucleus_boundaries", "regions"} <= set(sample.shapes)
    assert set(sample.tables) == {"table"}

    he, he_grid = _image(sample, "he_image")
    assert he.dtype == np.uint8 and he.shape[0] == 3
    assert list(sample.images["he_image"]["scale0"].image.coords["c"].values) == ["r", "g", "b"]
    dapi, dapi_grid = _image(sample, "morphology_focus")
    assert dapi.dtype == np.uint16 and dapi.shape[0] == 1
    assert list(sample.images["morphology_focus"]["scale0"].image.coords["c"].values) == ["DAPI"]

    # all in global µm, aligned, with the sample's (non-zero) origin
    assert he_grid.pixel_size == pytest.approx(0.5)
    assert dapi_grid.pixel_size == pytest.approx(0.2125)
    assert (he_grid.x0, he_grid.y0) == (dapi_grid.x0, dapi_grid.y0) == (1200.0, 800.0)
    assert he_grid.bounds[2] == pytest.approx(1200 + 384) and dapi_grid.bounds[3] == pytest.approx(800 + 384, abs=0.3)

    from spatialdata.transformations import Identity, get_transformation

    for key in ("transcripts", "cell_boundaries", "nucleus_boundaries", "regions"):
        assert isinstance(get_transformation(sample[key], "global"), Identity)

    source = sample.attrs["st2he"]["source"]
    assert source["platform"] == "synthetic" and source["seed"] == 0 and source["subtype"] == "mixed"
    assert source["pixel_size"] == pytest.approx(0.2125)


def test_transcripts_follow_the_schema(sample, transcripts):
    from spatialdata.models import PointsModel

    attrs = sample["transcripts"].attrs[PointsModel.ATTRS_KEY]
    assert attrs[PointsModel.FEATURE_KEY] == "gene"
    assert attrs[PointsModel.INSTANCE_KEY] == "cell_id"
    assert {"x", "y", "gene", "qv", "is_control", "cell_id", "overlaps_nucleus"} <= set(transcripts.columns)
    assert isinstance(transcripts["gene"].dtype, pd.CategoricalDtype)
    assert np.isfinite(transcripts[["x", "y"]].to_numpy()).all()
    # Xenium-like quality: most molecules pass qv >= 20, some do not
    passing = (transcripts["qv"] >= 20).mean()
    assert 0.8 < passing < 0.99
    assert transcripts["qv"].between(0, 40).all()
    # a few control probes, flagged and named like Xenium's
    controls = transcripts[transcripts["is_control"]]
    assert 0 < len(controls) < 0.02 * len(transcripts)
    assert set(controls["gene"].astype(str)) <= set(CONTROLS)
    assert any(g.startswith("BLANK_") for g in controls["gene"].astype(str))
    assert any(g.startswith("NegControlProbe_") for g in controls["gene"].astype(str))
    assert not transcripts.loc[~transcripts["is_control"], "gene"].astype(str).isin(CONTROLS).any()
    # molecules inside the tissue's box
    x0, y0, x1, y1 = 1200, 800, 1584, 1184
    assert transcripts["x"].between(x0, x1).all() and transcripts["y"].between(y0, y1).all()


def test_transcripts_lie_inside_their_cells(sample, transcripts):
    cells = sample["cell_boundaries"]
    assigned = transcripts[transcripts["cell_id"] != "UNASSIGNED"]
    assert len(assigned) > 0.9 * len(transcripts)
    polygons = cells.geometry.loc[assigned["cell_id"].astype(str).to_numpy()].to_numpy()
    inside = shapely.contains_xy(polygons, assigned["x"].to_numpy(), assigned["y"].to_numpy())
    assert inside.mean() > 0.95

    nuclei = sample["nucleus_boundaries"]
    has = assigned["cell_id"].astype(str).isin(nuclei.index)
    sub = assigned[has]
    in_nucleus = shapely.contains_xy(
        nuclei.geometry.loc[sub["cell_id"].astype(str).to_numpy()].to_numpy(), sub["x"].to_numpy(), sub["y"].to_numpy()
    )
    assert (in_nucleus == sub["overlaps_nucleus"].to_numpy()).mean() > 0.98
    assert 0.1 < sub["overlaps_nucleus"].mean() < 0.7
    # nuclei lie inside their cells
    assert shapely.within(nuclei.geometry.to_numpy(), cells.geometry.loc[nuclei.index].to_numpy()).mean() > 0.99


def test_table_labels_cells_and_regions(sample):
    table = sample["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "cell_boundaries"
    assert attrs["region_key"] == "region" and attrs["instance_key"] == "cell_id"
    assert set(table.obs["cell_id"]) == set(sample["cell_boundaries"].index)
    for column in ("cell_type", "cell_state", "tissue", "subtype", "region_id", "cell_area", "transcript_counts"):
        assert column in table.obs
    assert set(table.obs["cell_type"]) >= {"tumour_gland", "tumour_solid", "fibroblast", "lymphocyte", "endothelial"}
    assert set(table.obs["tissue"]) == {"gland_tumour", "solid_tumour", "stroma"}
    # the region labels agree with the regions element
    regions = sample["regions"]
    assert set(regions["tissue"]) == {"gland_tumour", "solid_tumour", "stroma"}
    xy = table.obsm["spatial"]
    for region_id, row in regions.iterrows():
        inside = shapely.contains_xy(row.geometry, xy[:, 0], xy[:, 1])
        labelled = (table.obs["region_id"] == region_id).to_numpy()
        assert (inside == labelled)[inside | labelled].mean() > 0.97
    # tumour cells sit in their own subtype's regions
    gland = table.obs["cell_type"] == "tumour_gland"
    assert (table.obs.loc[gland, "subtype"] == "gland").all()
    solid = table.obs["cell_type"] == "tumour_solid"
    assert (table.obs.loc[solid, "subtype"] == "solid").all()
    # counts are those of the molecules Xenium would count
    assert int(table.X.sum()) > 0.8 * sample.attrs["st2he"]["source"]["n_transcripts"]


def test_each_cell_type_has_its_gene_program(sample):
    table = sample["table"]
    X = np.asarray(table.X.todense(), dtype=float)
    total = X.sum(axis=1).clip(1)
    genes = list(table.var_names)
    for cell_type, markers in PROGRAMS.items():
        mask = (table.obs["cell_type"] == cell_type).to_numpy()
        assert mask.any(), cell_type
        share = X[:, [genes.index(g) for g in markers]].sum(axis=1) / total
        assert share[mask].mean() > 0.4, cell_type
        assert share[mask].mean() > 10 * share[~mask].mean(), cell_type
    # states: keratinising and mucinous cells express their own programs
    for state, markers in STATE_PROGRAMS.items():
        mask = (table.obs["cell_state"] == state).to_numpy()
        if not mask.any():
            continue
        share = X[:, [genes.index(g) for g in markers]].sum(axis=1) / total
        assert share[mask].mean() > 5 * share[~mask].mean(), state


def test_molecule_density_does_not_tell_cell_types_apart(sample):
    obs = sample["table"].obs
    density = obs["transcript_counts"] / obs["cell_area"]
    by_type = density.groupby(obs["cell_type"], observed=True).mean()
    assert by_type.max() / by_type.min() < 1.4


def test_same_seed_same_sample_other_seed_other_sample():
    a = st2he.datasets.synthetic_tissue(5, size_um=96)
    b = st2he.datasets.synthetic_tissue(5, size_um=96)
    c = st2he.datasets.synthetic_tissue(6, size_um=96)
    for key in ("he_image", "morphology_focus"):
        np.testing.assert_array_equal(_image(a, key)[0], _image(b, key)[0])
        assert not np.array_equal(_image(a, key)[0], _image(c, key)[0])
    ta, tb, tc = (s["transcripts"].compute() for s in (a, b, c))
    pd.testing.assert_frame_equal(ta, tb)
    assert len(ta) != len(tc) or not np.allclose(ta["x"], tc["x"])
    assert a["cell_boundaries"].geometry.equals(b["cell_boundaries"].geometry)
    np.testing.assert_array_equal(a["table"].X.toarray(), b["table"].X.toarray())


def test_subtype_option_gives_slides_of_one_subtype():
    gland = st2he.datasets.synthetic_tissue(2, size_um=160, subtype="gland")
    solid = st2he.datasets.synthetic_tissue(2, size_um=160, subtype="solid")
    assert "tumour_gland" in set(gland["table"].obs["cell_type"])
    assert "tumour_solid" not in set(gland["table"].obs["cell_type"])
    assert set(gland["regions"]["subtype"]) == {"gland", "none"}
    assert "tumour_solid" in set(solid["table"].obs["cell_type"])
    assert "tumour_gland" not in set(solid["table"].obs["cell_type"])
    assert set(solid["regions"]["subtype"]) == {"solid", "none"}
    assert gland.attrs["st2he"]["source"]["subtype"] == "gland"


def test_bad_arguments():
    with pytest.raises(ValueError, match="subtype"):
        st2he.datasets.synthetic_tissue(0, subtype="squamous")
    with pytest.raises(ValueError, match="size_um"):
        st2he.datasets.synthetic_tissue(0, size_um=10)
    with pytest.raises(ValueError, match="he_pixel_size"):
        st2he.datasets.synthetic_tissue(0, he_pixel_size=0)


def test_non_square_sample_and_pixel_sizes():
    sdata = st2he.datasets.synthetic_tissue(3, size_um=(200, 120), dapi_pixel_size=0.5, he_pixel_size=1.0)
    he, grid = _image(sdata, "he_image")
    assert he.shape == (3, 120, 200)
    dapi, dgrid = _image(sdata, "morphology_focus")
    assert dapi.shape == (1, 240, 400)
    assert (grid.x0, grid.y0) == (dgrid.x0, dgrid.y0)


# ------------------------------------------------------------------------------------------------ the H&E


def test_he_has_haematoxylin_and_eosin_where_expected(sample):
    he, grid = _image(sample, "he_image")
    rgb = he.astype(float)
    table = sample["table"]
    # nuclei: centres of lymphocytes and tumour cells are dark and blue-purple
    nuclear = table.obs["cell_type"].isin(["lymphocyte", "tumour_solid", "tumour_gland"]).to_numpy()
    rows, cols = grid.to_pixel(table.obsm["spatial"][nuclear, 0], table.obsm["spatial"][nuclear, 1])
    nuclei = rgb[:, rows, cols]
    # stroma between cells: pink (eosin), lighter
    cells = _fill(sample["cell_boundaries"].geometry.to_numpy(), grid)
    stroma_region = sample["regions"].geometry["stroma"]
    ys, xs = grid.pixel_centers()
    rng = np.random.default_rng(0)
    r = rng.integers(0, grid.height, 20000)
    c = rng.integers(0, grid.width, 20000)
    in_stroma = shapely.contains_xy(stroma_region, xs[c], ys[r]) & (cells[r, c] == 0)
    stroma = rgb[:, r[in_stroma], c[in_stroma]]
    assert nuclei.mean() < stroma.mean() - 60
    assert (nuclei[2] - nuclei[0]).mean() > (stroma[2] - stroma[0]).mean() + 20  # bluer
    assert stroma[1].mean() < stroma[0].mean() - 20  # eosin: pink, green absorbed
    # background outside the tissue is white
    corners = rgb[:, :8, :8].reshape(3, -1)
    assert corners.min() > 230
    # red cells are bright red
    rbc = (table.obs["cell_type"] == "erythrocyte").to_numpy()
    rows, cols = grid.to_pixel(table.obsm["spatial"][rbc, 0], table.obsm["spatial"][rbc, 1])
    red = rgb[:, rows, cols]
    assert (red[0] - red[1]).mean() > 80 and (red[0] - red[2]).mean() > 60


def _cytoplasm_stats(sample, cell_mask):
    """Mean RGB, DAPI and molecule density over the cytoplasm (cell minus nucleus) of the selected cells."""
    he, grid = _image(sample, "he_image")
    dapi, dgrid = _image(sample, "morphology_focus")
    table = sample["table"]
    ids = table.obs_names[cell_mask]
    cells = _fill(sample["cell_boundaries"].geometry.loc[ids].to_numpy(), grid)
    nuclei_ids = [i for i in ids if i in sample["nucleus_boundaries"].index]
    nuclei = _fill(sample["nucleus_boundaries"].geometry.loc[nuclei_ids].buffer(1.0).to_numpy(), grid)
    cytoplasm = (cells > 0) & (nuclei == 0)
    r, c = np.nonzero(cytoplasm)
    ys, xs = grid.pixel_centers()
    dr, dc = dgrid.to_pixel(xs[c], ys[r])
    obs = table.obs.loc[ids]
    centres = table.obsm["spatial"][cell_mask]
    nr, nc = dgrid.to_pixel(centres[:, 0], centres[:, 1])
    return {
        "nuclear_dapi": float(np.median(dapi[0, nr, nc])),
        "rgb": he[:, r, c].astype(float).mean(axis=1),
        "dapi": float(np.median(dapi[0, dr, dc])),
        "density": float((obs["transcript_counts"] / obs["cell_area"]).mean()),
    }


def test_histology_that_only_gene_identity_predicts(sample):
    """Keratinising vs other squamous cells, red cells vs endothelium: same DAPI and density, other colours."""
    obs = sample["table"].obs
    solid = (obs["cell_type"] == "tumour_solid").to_numpy()
    keratin = solid & (obs["cell_state"] == "keratinizing").to_numpy()
    assert keratin.any()
    k = _cytoplasm_stats(sample, keratin)
    s = _cytoplasm_stats(sample, solid & ~keratin)
    # the nuclear stain in the cytoplasm is background for both (a few % of a nucleus)
    assert max(k["dapi"], s["dapi"]) < 0.08 * s["nuclear_dapi"]
    assert 0.75 < k["density"] / s["density"] < 1.33
    assert s["rgb"][1] - k["rgb"][1] > 25  # keratin: much more eosin

    red = (obs["cell_type"] == "erythrocyte").to_numpy()
    endo = (obs["cell_type"] == "endothelial").to_numpy()
    r = _cytoplasm_stats(sample, red)
    e = _cytoplasm_stats(sample, endo)
    assert max(r["dapi"], e["dapi"]) < 0.08 * e["nuclear_dapi"]
    assert 0.75 < r["density"] / e["density"] < 1.33
    assert e["rgb"][2] - r["rgb"][2] > 60  # haemoglobin absorbs blue: red, not pink

    muc = (obs["cell_state"] == "mucinous").to_numpy()
    gland = (obs["cell_type"] == "tumour_gland").to_numpy()
    if muc.any() and (gland & ~muc).any():
        m = _cytoplasm_stats(sample, muc)
        g = _cytoplasm_stats(sample, gland & ~muc)
        assert 0.75 < m["density"] / g["density"] < 1.33
        assert (m["rgb"][1] - m["rgb"][0]) - (g["rgb"][1] - g["rgb"][0]) > 10  # pale blue-grey, not pink


def test_dapi_shows_nuclei(sample):
    dapi, grid = _image(sample, "morphology_focus")
    table = sample["table"]
    nucleated = table.obs_names.isin(sample["nucleus_boundaries"].index)
    rows, cols = grid.to_pixel(table.obsm["spatial"][nucleated, 0], table.obsm["spatial"][nucleated, 1])
    at_nuclei = dapi[0, rows, cols].astype(float)
    background = dapi[0, :20, :20].astype(float)
    assert np.median(at_nuclei) > 10 * np.median(background)
    # texture and noise: not a flat mask
    assert dapi[0].std() > 0 and len(np.unique(dapi[0, rows, cols])) > 100
