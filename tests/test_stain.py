"""The stain-model baseline (st2he.tl._stain.stain_he) and the Beer-Lambert model it shares with the simulator."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

import st2he
from st2he._grid import Grid, _scale0
from st2he.datasets import _stain_model as stain
from st2he.tl._stain import stain_he


@pytest.fixture(scope="module")
def sample():
    sdata = st2he.datasets.synthetic_tissue(1, size_um=192)
    st2he.pp.rasterize_transcripts(sdata, pixel_size=0.5)
    return sdata


def test_beer_lambert_model():
    # no stain: the white of bare glass
    white = stain.render_rgb(np.zeros((2, 4, 4)))
    assert white.dtype == np.uint8 and white.shape == (3, 4, 4)
    assert (white >= 248).all()
    # haematoxylin is blue-purple, eosin pink, haemoglobin red
    h, e, hb = (
        stain.render_rgb(np.eye(3)[k][:, None] * 1.5, ("haematoxylin", "eosin", "haemoglobin"))[:, 0] for k in range(3)
    )
    assert h[2] > h[0] > h[1] - 40 and h.mean() < 150
    assert e[0] > e[1] + 100 and e[2] > e[1]
    assert hb[0] > hb[1] + 100 and hb[0] > hb[2] + 100
    # densities add, and RGB -> OD inverts OD -> RGB
    od = stain.concentrations_to_od(np.array([[0.4], [0.7]]))
    np.testing.assert_allclose(stain.rgb_to_od(stain.od_to_rgb(od)), od, atol=0.01)
    np.testing.assert_allclose(
        od[:, 0] - stain.GLASS_OD, 0.4 * stain.STAIN_VECTORS["haematoxylin"] + 0.7 * stain.STAIN_VECTORS["eosin"]
    )
    with pytest.raises(ValueError, match="Unknown stains"):
        stain.stain_matrix(("dab",))


def test_output_lies_on_the_input_grid_and_is_lazy(sample):
    rgb = stain_he(sample, chunk=128)
    grid = Grid.from_element(sample.images["st2he_input"])
    assert isinstance(rgb, da.Array)
    assert rgb.dtype == np.uint8
    assert rgb.shape == (3, *grid.shape)
    assert rgb.chunksize[1:] == (128, 128)
    # the chunked result does not depend on the chunk size (smoothing across chunk borders)
    np.testing.assert_array_equal(rgb.compute(), stain_he(sample, chunk=1024).compute())


def test_nuclei_are_dark_purple_cytoplasm_pink_and_empty_glass_white(sample):
    rgb = stain_he(sample).compute().astype(float)
    grid = Grid.from_element(sample.images["st2he_input"])
    obs = sample["table"].obs
    nuclear = obs["cell_type"].isin(["lymphocyte", "tumour_solid", "fibroblast"]).to_numpy()
    xy = sample["table"].obsm["spatial"][nuclear]
    rows, cols = grid.to_pixel(xy[:, 0], xy[:, 1])
    nuclei = rgb[:, rows, cols]
    assert nuclei.mean() < 150
    assert (nuclei[2] > nuclei[1]).mean() > 0.9  # purple-blue: green absorbed most
    # molecules without stain (cytoplasm): pink, lighter than nuclei
    tx = sample["transcripts"].compute()
    cyto = tx[~tx["overlaps_nucleus"] & (tx["cell_id"] != "UNASSIGNED") & ~tx["is_control"]]
    r, c = grid.to_pixel(cyto["x"].to_numpy(), cyto["y"].to_numpy())
    pink = rgb[:, r, c]
    assert pink.mean() > nuclei.mean() + 40
    assert (pink[0] - pink[1]).mean() > 30
    # neither molecules nor stain: white
    corner = rgb[:, :6, :6].reshape(3, -1)
    assert corner.min() >= 245


def test_blank_where_there_are_no_molecules_and_no_stain(sample):
    sdata = st2he.datasets.synthetic_tissue(1, size_um=96)
    # a picture of an empty region far away from the tissue (the rasteriser refuses one: made here as it would be)
    with pytest.raises(ValueError, match="holds no kept molecule and no stain"):
        st2he.pp.rasterize_transcripts(sdata, region=(5000.0, 5000.0, 5040.0, 5030.0), key_added="empty")
    from st2he._elements import add_image

    grid = Grid.from_bounds(5000.0, 5000.0, 5040.0, 5030.0, 0.5)
    params = {"points_key": "transcripts", "stain_key": "morphology_focus", "min_qv": 20.0, "drop_controls": True}
    add_image(sdata, "empty", da.zeros((3, *grid.shape), dtype=np.uint8), grid, params=params)
    rgb = stain_he(sdata, input_key="empty").compute()
    assert rgb.shape == (3, *Grid.from_element(sdata.images["empty"]).shape)
    assert rgb.shape[1] >= 60 and rgb.shape[2] >= 80
    assert rgb.min() >= 245


def test_scored_against_the_simulated_he(sample):
    st2he.tl.virtual_he(sample, method="stain", key_added="stain_he")
    element = sample.images["stain_he"]
    assert Grid.from_element(element) == Grid.from_element(sample.images["st2he_input"])
    assert list(_scale0(element).coords["c"].values) == ["r", "g", "b"]
    df = st2he.tl.evaluate_he(sample, pred_key="stain_he", true_key="he_image", key_added="stain_metrics")
    overall = df.loc["overall"]
    assert np.isfinite(overall["psnr"]) and 14 < overall["psnr"] < 30
    assert 0.4 < overall["ssim"] < 0.95
    assert overall["mse"] > 50  # the baseline cannot know fibres, keratin, mucin or red cells
    # the scores by hand, on the common pixels of both images (the same lattice; the input grid has one more pixel)
    from skimage.metrics import structural_similarity

    he_grid, grid = Grid.from_element(sample.images["he_image"]), Grid.from_element(element)
    assert (he_grid.x0, he_grid.y0, he_grid.pixel_size) == (grid.x0, grid.y0, grid.pixel_size)
    h, w = min(he_grid.height, grid.height), min(he_grid.width, grid.width)
    pred = np.moveaxis(np.asarray(_scale0(element).values), 0, -1)[:h, :w].astype(float)
    true = np.moveaxis(np.asarray(_scale0(sample.images["he_image"]).values), 0, -1)[:h, :w].astype(float)
    mse = np.mean((pred - true) ** 2)
    assert overall["mse"] == pytest.approx(mse, rel=1e-9)
    assert overall["psnr"] == pytest.approx(10 * np.log10(255**2 / mse), rel=1e-9)
    assert overall["ssim"] == pytest.approx(
        structural_similarity(pred, true, channel_axis=-1, data_range=255), rel=1e-9
    )


def test_bad_input(sample):
    with pytest.raises(KeyError, match="input_key"):
        stain_he(sample, input_key="nothing")
    with pytest.raises(ValueError, match="chunk"):
        stain_he(sample, chunk=0)
    with pytest.raises(ValueError, match="eosin"):
        stain_he(sample, eosin=-1)
    with pytest.raises(ValueError, match="density_scale"):
        stain_he(sample, density_scale=0.0)
    with pytest.raises(ValueError, match="stain_floor"):
        stain_he(sample, stain_floor=1.0)


def test_real_xenium_crop(shared_data):
    """The baseline on a real Xenium crop: nuclei (bright DAPI) dark, empty glass white."""
    # the crop's DAPI image covers exactly the 400 µm square at (1000, 1000) µm (see the data README)
    sdata = st2he.io.read_xenium(
        shared_data / "xenium_cellline_crop", image_pixel_size=400 / 237, image_origin=(1000.0, 1000.0)
    )
    st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0)
    rgb = stain_he(sdata).compute().astype(float)
    grid = Grid.from_element(sdata.images["st2he_input"])
    assert rgb.shape == (3, *grid.shape)
    nuclei = sdata["nucleus_boundaries"].geometry.centroid
    rows, cols = grid.to_pixel(nuclei.x.to_numpy(), nuclei.y.to_numpy())
    ok = (rows >= 0) & (rows < grid.height) & (cols >= 0) & (cols < grid.width)
    at_nuclei = rgb[:, rows[ok], cols[ok]].mean(axis=0)
    brightness = rgb.mean(axis=0)
    assert np.median(at_nuclei) < np.percentile(brightness, 25)
    assert np.percentile(brightness, 95) > 235


def test_pixels_are_the_beer_lambert_recipe_worked_out_by_hand():
    """Every pixel of a small picture against the documented recipe, computed here with numpy and scipy."""
    import dask.dataframe as dd
    import geopandas as gpd
    import pandas as pd
    from scipy import ndimage
    from shapely.geometry import box
    from spatialdata import SpatialData
    from spatialdata.models import PointsModel, ShapesModel
    from spatialdata.transformations import Identity

    rng = np.random.default_rng(3)
    x, y = rng.uniform(0.5, 19.5, 300), rng.uniform(0.5, 13.5, 300)
    x[:100], y[:100] = rng.uniform(10, 14, 100), rng.uniform(4, 8, 100)  # a dense patch
    df = pd.DataFrame({"x": x, "y": y, "gene": pd.Categorical(rng.choice(["A", "B"], 300)), "qv": 40.0})
    sdata = SpatialData(
        points={"transcripts": PointsModel.parse(dd.from_pandas(df, npartitions=1), feature_key="gene")},
        shapes={
            "nucleus_boundaries": ShapesModel.parse(
                gpd.GeoDataFrame(geometry=[box(3, 3, 7, 9)]), transformations={"global": Identity()}
            )
        },
    )
    st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0, region=(0, 0, 19.5, 13.5))  # 20 x 14 pixels of 1 µm
    grid = Grid.from_element(sdata.images["st2he_input"])
    assert (grid.x0, grid.y0, grid.pixel_size, grid.shape) == (0.0, 0.0, 1.0, (14, 20))
    rgb = stain_he(sdata, haematoxylin=2.0, eosin=0.8, sigma_um=1.0, density_scale=2.0, stain_floor=0.05).compute()
    # by hand: molecules per µm² in 1 µm pixels, Gaussian-smoothed (sigma 1 px, zeros outside); eosin
    # 0.8 (1 - exp(-rho / 2)); haematoxylin 2.0 in the nucleus (3..7 x 3..9 µm), none elsewhere; RGB = 255 exp(-OD)
    counts, _, _ = np.histogram2d(y, x, bins=(np.arange(15), np.arange(21)))
    rho = ndimage.gaussian_filter(counts, 1.0, mode="constant", cval=0.0)
    e = 0.8 * (1 - np.exp(-rho / 2.0))
    h = np.zeros_like(e)
    h[3:9, 3:7] = 2.0
    od = 0.02 + h[None] * stain.STAIN_VECTORS["haematoxylin"][:, None, None]
    od = od + e[None] * stain.STAIN_VECTORS["eosin"][:, None, None]
    want = np.clip(np.rint(255 * np.exp(-od)), 0, 255)
    assert np.abs(rgb.astype(int) - want).max() <= 1
    assert (rgb == want).mean() > 0.98
    # the nucleus is dark purple, the dense patch pink, the empty corner glass
    assert rgb[:, 5, 5].mean() < 100 and rgb[0, 6, 12] > rgb[1, 6, 12] + 60 and rgb[:, 13, 0].min() >= 245
