"""st2he.tl.evaluate_he: PSNR, SSIM and MSE over the common region of two H&E images."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.data import astronaut
from skimage.metrics import structural_similarity
from spatialdata import SpatialData

import st2he
from st2he._elements import parse_image
from st2he._grid import Grid

PS = 0.5


@pytest.fixture(scope="module")
def picture():
    """A natural RGB image (c, y, x), not square, values away from 0 and 255 so an offset is exact."""
    img = astronaut()[:300, :380].astype(np.int16)
    return np.clip(img, 20, 235).astype(np.uint8).transpose(2, 0, 1)


def _sdata(**images):
    return SpatialData(images={k: parse_image(v[0], v[1]) for k, v in images.items()})


def test_identical_images(picture):
    grid = Grid(1000.0, 500.0, PS, *picture.shape[1:])
    sdata = _sdata(pred=(picture, grid), true=(picture.copy(), grid))
    df = st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="true", tile_size=128)
    overall = df.loc["overall"]
    assert overall["mse"] == 0
    assert overall["psnr"] == np.inf
    assert overall["ssim"] == pytest.approx(1.0)
    tiles = df.drop(index=["overall", "mean_over_tiles"])
    assert len(tiles) == 3 * 3  # 300 x 380 px in tiles of 128: 3 x 3, the last ones smaller
    assert (tiles["mse"] == 0).all() and np.isinf(tiles["psnr"]).all()
    np.testing.assert_allclose(tiles["ssim"], 1.0)
    assert tiles["height"].tolist()[::3] == [128, 128, 44]
    assert tiles["width"].tolist()[:3] == [128, 128, 124]
    # tile bounds in µm
    first = tiles.iloc[0]
    assert (first["x_min"], first["y_min"], first["x_max"], first["y_max"]) == (1000.0, 500.0, 1064.0, 564.0)


def test_known_noise_gives_the_expected_mse_and_psnr(picture):
    grid = Grid(0.0, 0.0, PS, *picture.shape[1:])
    shifted = (picture.astype(np.int16) + 10).astype(np.uint8)
    sdata = _sdata(pred=(shifted, grid), true=(picture, grid))
    df = st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="true")
    assert df.loc["overall", "mse"] == pytest.approx(100.0)
    assert df.loc["overall", "psnr"] == pytest.approx(10 * np.log10(255**2 / 100))
    assert df.loc["mean_over_tiles", "mse"] == pytest.approx(100.0)

    rng = np.random.default_rng(0)
    noisy = np.clip(picture + rng.normal(0, 10, picture.shape), 0, 255).astype(np.uint8)
    sdata = _sdata(pred=(noisy, grid), true=(picture, grid))
    df = st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="true", tile_size=100)
    expected_mse = np.mean((noisy.astype(float) - picture) ** 2)
    assert df.loc["overall", "mse"] == pytest.approx(expected_mse)
    assert 90 < expected_mse < 110
    # the overall SSIM is that of the whole image, whatever the tiling
    expected_ssim = structural_similarity(
        noisy.transpose(1, 2, 0), picture.transpose(1, 2, 0), channel_axis=-1, data_range=255
    )
    assert df.loc["overall", "ssim"] == pytest.approx(expected_ssim, rel=1e-9)
    assert 0 < df.loc["overall", "ssim"] < 0.95


def test_different_pixel_sizes_are_resampled_onto_one_grid(picture):
    grid = Grid(200.0, 100.0, PS, *picture.shape[1:])
    # the same picture scanned at 1 µm per pixel (2 x 2 area average)
    h, w = picture.shape[1] // 2, picture.shape[2] // 2
    coarse = picture[:, : 2 * h, : 2 * w].astype(float).reshape(3, h, 2, w, 2).mean(axis=(2, 4))
    coarse_grid = Grid(200.0, 100.0, 2 * PS, h, w)
    sdata = _sdata(fine=(picture, grid), coarse=(np.rint(coarse).astype(np.uint8), coarse_grid))
    df = st2he.tl.evaluate_he(sdata, pred_key="coarse", true_key="fine")
    assert df.attrs["params"]["pixel_size"] == pytest.approx(1.0)  # the coarser of the two
    assert df.loc["overall", "mse"] < 0.5  # only rounding
    assert df.loc["overall", "ssim"] > 0.99
    # by hand: at 1 µm the fine picture is its 2 x 2 means (exact, as floats): what is left is the rounding of `coarse`
    rounded = np.rint(coarse)
    assert df.loc["overall", "mse"] == pytest.approx(np.mean((rounded - coarse) ** 2), rel=1e-9)
    expected_ssim = structural_similarity(
        rounded.transpose(1, 2, 0), coarse.transpose(1, 2, 0), channel_axis=-1, data_range=255
    )
    assert df.loc["overall", "ssim"] == pytest.approx(expected_ssim, rel=1e-6)
    bounds = df.loc["overall", ["x_min", "y_min", "x_max", "y_max"]].tolist()
    assert bounds == pytest.approx([200, 100, 200 + w, 100 + h])
    # at the finer pixel size the coarse image is interpolated: close, not exact
    df = st2he.tl.evaluate_he(sdata, pred_key="coarse", true_key="fine", pixel_size=PS, key_added="fine_metrics")
    assert df.attrs["params"]["pixel_size"] == pytest.approx(PS)
    assert df.loc["overall", "psnr"] > 25
    assert df.loc["overall", "ssim"] > 0.8


def test_offset_images_are_compared_on_their_overlap_only(picture):
    grid = Grid(1000.0, 2000.0, PS, *picture.shape[1:])
    r0, r1, c0, c1 = 40, 230, 60, 300
    crop = picture[:, r0:r1, c0:c1].copy()
    crop_grid = Grid(1000.0 + c0 * PS, 2000.0 + r0 * PS, PS, r1 - r0, c1 - c0)
    sdata = _sdata(big=(picture, grid), crop=(crop, crop_grid))
    df = st2he.tl.evaluate_he(sdata, pred_key="crop", true_key="big", tile_size=64)
    assert df.loc["overall", "mse"] == 0
    assert df.loc["overall", "ssim"] == pytest.approx(1.0)
    assert df.loc["overall", ["x_min", "y_min", "x_max", "y_max"]].tolist() == pytest.approx(list(crop_grid.bounds))
    # the same content placed elsewhere does not match
    moved = Grid(crop_grid.x0 + 10.0, crop_grid.y0, PS, r1 - r0, c1 - c0)
    sdata = _sdata(big=(picture, grid), crop=(crop, moved))
    df = st2he.tl.evaluate_he(sdata, pred_key="crop", true_key="big")
    assert df.loc["overall", "mse"] > 100


def test_region_restricts_the_comparison(picture):
    grid = Grid(0.0, 0.0, PS, *picture.shape[1:])
    noisy = picture.copy()
    noisy[:, :, :100] = 0  # damage the left 50 µm only
    sdata = _sdata(pred=(noisy, grid), true=(picture, grid))
    df = st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="true", region=(60.0, 10.0, 150.0, 140.0))
    assert df.loc["overall", "mse"] == 0
    assert df.loc["overall", ["x_min", "y_min", "x_max", "y_max"]].tolist() == [60.0, 10.0, 150.0, 140.0]


def test_results_are_stored_as_a_table_annotating_tiles(picture):
    grid = Grid(0.0, 0.0, PS, *picture.shape[1:])
    sdata = _sdata(pred=(picture, grid), true=(picture, grid))
    df = st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="true", tile_size=150, key_added="scores")
    table = sdata.tables["scores"]
    tiles = sdata.shapes["scores_tiles"]
    assert table.n_obs == len(tiles) == len(df) - 2
    assert list(table.var_names) == ["mse", "psnr", "ssim"]
    assert set(table.obs["tile_id"]) == set(tiles.index)
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "scores_tiles" and attrs["instance_key"] == "tile_id"
    assert table.uns["overall"]["mse"] == 0
    assert table.uns["params"]["tile_size"] == 150
    assert sdata.attrs["st2he"]["scores"]["pred_key"] == "pred"
    # an existing key is an error unless overwrite=True, and nothing is lost
    with pytest.raises(KeyError, match="overwrite"):
        st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="true", key_added="scores")
    assert "scores" in sdata.tables
    st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="true", tile_size=64, key_added="scores", overwrite=True)
    assert sdata.tables["scores"].n_obs == len(sdata.shapes["scores_tiles"]) == 5 * 6


def test_bad_inputs(picture):
    grid = Grid(0.0, 0.0, PS, *picture.shape[1:])
    far = Grid(5000.0, 5000.0, PS, *picture.shape[1:])
    grey = picture[:1]
    sdata = SpatialData(
        images={
            "pred": parse_image(picture, grid),
            "true": parse_image(picture, grid),
            "far": parse_image(picture, far),
            "dapi": parse_image(grey, grid, c_coords=("DAPI",)),
        }
    )
    with pytest.raises(KeyError, match="pred_key='missing'"):
        st2he.tl.evaluate_he(sdata, pred_key="missing", true_key="true")
    with pytest.raises(KeyError, match="true_key"):
        st2he.tl.evaluate_he(sdata, pred_key="pred")
    with pytest.raises(ValueError, match=r"pred_key=.dapi. has 1 channel .*; evaluate_he reads RGB H&E"):
        st2he.tl.evaluate_he(sdata, pred_key="dapi", true_key="true")
    with pytest.raises(ValueError, match="do not overlap"):
        st2he.tl.evaluate_he(sdata, pred_key="far", true_key="true")
    with pytest.raises(ValueError, match="tile_size"):
        st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="true", tile_size=0)
    with pytest.raises(ValueError, match="region"):
        st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="true", region=(900.0, 900.0, 990.0, 990.0))
    with pytest.raises(ValueError, match="pixel_size"):
        st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="true", pixel_size=-1)
    assert "he_metrics" not in sdata


def test_blockwise_reading_gives_the_whole_image_metrics(picture, monkeypatch):
    import st2he.tl._evaluate as evaluate

    grid = Grid(0.0, 0.0, PS, *picture.shape[1:])
    rng = np.random.default_rng(1)
    noisy = np.clip(picture + rng.normal(0, 15, picture.shape), 0, 255).astype(np.uint8)
    sdata = _sdata(pred=(noisy, grid), true=(picture, grid))
    whole = st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="true", tile_size=50, key_added="whole")
    monkeypatch.setattr(evaluate, "_BLOCK_PIXELS", 100)  # 2 x 2 tiles per block: many blocks
    blocks = st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="true", tile_size=50, key_added="blocks")
    assert list(blocks.index) == list(whole.index)
    np.testing.assert_allclose(blocks[["mse", "psnr", "ssim"]], whole[["mse", "psnr", "ssim"]], rtol=1e-10)
    expected = structural_similarity(
        noisy.transpose(1, 2, 0), picture.transpose(1, 2, 0), channel_axis=-1, data_range=255
    )
    assert blocks.loc["overall", "ssim"] == pytest.approx(expected, rel=1e-9)
    # each tile's numbers by hand: MSE and PSNR (scikit-image) of its pixels, SSIM the mean of the whole image's
    # SSIM map (scikit-image, 7 x 7 window, channels averaged) over the tile, without the image's 3-pixel border
    from skimage.metrics import peak_signal_noise_ratio

    pred, true = noisy.transpose(1, 2, 0).astype(float), picture.transpose(1, 2, 0).astype(float)
    _, smap = structural_similarity(pred, true, channel_axis=-1, data_range=255, win_size=7, full=True)
    smap = smap.mean(axis=-1)
    inside = np.zeros(smap.shape, bool)
    inside[3:-3, 3:-3] = True
    tiles = blocks.drop(index=["overall", "mean_over_tiles"])
    assert len(tiles) == 6 * 8  # 300 x 380 px in tiles of 50 px
    for r in range(6):
        for c in range(8):
            row = tiles.loc[f"tile_{r}_{c}"]
            sl = (slice(50 * r, 50 * (r + 1)), slice(50 * c, 50 * (c + 1)))
            width = min(50, 380 - 50 * c)
            assert (row["row0"], row["col0"], row["height"], row["width"]) == (50 * r, 50 * c, 50, width)
            assert (row["x_min"], row["y_min"]) == pytest.approx((25.0 * c, 25.0 * r))
            assert row["mse"] == pytest.approx(np.mean((pred[sl] - true[sl]) ** 2), rel=1e-9)
            assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(true[sl], pred[sl], data_range=255), rel=1e-9)
            assert row["ssim"] == pytest.approx(smap[sl][inside[sl]].mean(), rel=1e-9)
    for metric in ("mse", "psnr", "ssim"):
        assert blocks.loc["mean_over_tiles", metric] == pytest.approx(tiles[metric].mean(), rel=1e-12)
