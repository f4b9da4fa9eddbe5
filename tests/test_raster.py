"""The raster layer: any affine, any size, any coordinate system, checked against a per-pixel reference model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.data import astronaut
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, Labels2DModel
from spatialdata.transformations import Affine, Identity, Scale, Sequence, Translation

import st2he
from st2he._elements import parse_image
from st2he._grid import Grid
from st2he._raster import Raster

PS = 0.5
X0, Y0 = 1000.0, 500.0


@pytest.fixture(scope="module")
def picture():
    """A natural RGB image ``(3, 300, 380)`` uint8."""
    return np.ascontiguousarray(astronaut()[:300, :380].transpose(2, 0, 1))


def _affine_of(theta_deg: float, *, flip: bool = False, sx: float = PS, sy: float = PS, origin=(X0, Y0)) -> np.ndarray:
    """Pixel (x, y) -> µm: scale, optional flip of x, rotation by theta about the pixel origin, then translation."""
    t = math.radians(theta_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    lin = rot @ np.diag([-sx if flip else sx, sy])
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = origin
    return m


def _element(data, matrix, *, scale_factors=None, cs="global"):
    transformation = Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))
    return Image2DModel.parse(
        data, dims=("c", "y", "x"), scale_factors=scale_factors, transformations={cs: transformation}, chunks=(3, 64, 64)
    )


def _reference_read(data: np.ndarray, matrix: np.ndarray, grid: Grid, fill: float = 0.0) -> np.ndarray:
    """Bilinear resampling written pixel by pixel: centre -> inverse affine -> interpolate (edges extended 1/2 px)."""
    inv = np.linalg.inv(matrix)
    c, h, w = data.shape
    out = np.full((c, grid.height, grid.width), fill, dtype=np.float64)
    for i in range(grid.height):
        for j in range(grid.width):
            X = grid.x0 + (j + 0.5) * grid.pixel_size
            Y = grid.y0 + (i + 0.5) * grid.pixel_size
            u, v, _ = inv @ np.array([X, Y, 1.0])
            col, row = u - 0.5, v - 0.5
            if not (-0.5 <= row <= h - 0.5 and -0.5 <= col <= w - 0.5):
                continue
            row, col = min(max(row, 0.0), h - 1.0), min(max(col, 0.0), w - 1.0)
            r0, c0 = min(int(math.floor(row)), h - 2), min(int(math.floor(col)), w - 2)
            fr, fc = row - r0, col - c0
            out[:, i, j] = (
                data[:, r0, c0] * (1 - fr) * (1 - fc)
                + data[:, r0 + 1, c0] * fr * (1 - fc)
                + data[:, r0, c0 + 1] * (1 - fr) * fc
                + data[:, r0 + 1, c0 + 1] * fr * fc
            )
    return out


@pytest.mark.parametrize(
    ("theta", "flip", "sx", "sy"),
    [(0, False, PS, PS), (30, False, PS, PS), (-17, True, PS, 0.6), (90, False, 0.4, 0.4), (180, True, PS, PS)],
)
def test_read_matches_a_per_pixel_reference_model(picture, theta, flip, sx, sy):
    data = picture[:, :40, :50].astype(np.float64)
    matrix = _affine_of(theta, flip=flip, sx=sx, sy=sy)
    raster = Raster(_element(data.astype(np.uint8), matrix))
    x0, y0, x1, y1 = raster.bounds
    # a grid a bit larger than the footprint (to see the fill) at a pixel size close to the source's
    grid = Grid.from_bounds(x0 - 2, y0 - 2, x1 + 2, y1 + 2, 0.55)
    got = raster.read(grid, fill=-1, dtype=np.float64)
    want = _reference_read(data, matrix, grid, fill=-1)
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert (got == -1).any() and (got >= 0).any()


def test_bounds_pixel_size_and_levels_of_an_odd_sized_pyramid(picture):
    data = np.pad(picture, ((0, 0), (0, 1), (0, 1)))  # 301 x 381: odd on both axes
    element = _element(data, _affine_of(0), scale_factors=[2, 2])
    raster = Raster(element)
    assert raster.bounds == pytest.approx((X0, Y0, X0 + 381 * PS, Y0 + 301 * PS))
    assert raster.pixel_size == pytest.approx(PS)
    # coarser levels of an odd-sized image have x and y scales a hair apart: no square-pixel check trips on them
    sizes = [lv.pixel_sizes for lv in raster.levels]
    assert sizes[1][0] != sizes[1][1]
    assert raster.level_for(PS) == 0
    assert raster.level_for(2 * PS) == 1  # 1.001 x 2 x PS is within the 1 % slack
    assert raster.level_for(4.1 * PS) == 2
    assert raster.level_for(0.1) == 0
    # reading at 2 PS from level 1 and from level 0 (pooled) agree up to the pyramid's own downsampling
    grid = Grid.from_bounds(X0 + 10, Y0 + 10, X0 + 150, Y0 + 120, 2 * PS)
    a = raster.read(grid, level=1, dtype=np.float64)
    b = raster.read(grid, level=0, dtype=np.float64)
    assert np.abs(a - b).mean() < 6


def test_rotated_by_90_and_flipped_images_read_back_exactly(picture):
    grid = Grid(X0, Y0, PS, 300, 380)
    straight = Raster(_element(picture, _affine_of(0))).read(grid, dtype=np.uint8)
    np.testing.assert_array_equal(straight, picture)
    # stored rotated: the data turned by -90 degrees, the affine turning it back by +90 about the same footprint
    rotated = np.ascontiguousarray(np.rot90(picture, k=1, axes=(1, 2)))  # (3, 380, 300)
    m = _affine_of(90, origin=(X0 + 380 * PS, Y0))
    # check the construction: pixel (x=0, y=0) of the rotated data is the picture's top-right pixel
    np.testing.assert_array_equal(rotated[:, 0, 0], picture[:, 0, -1])
    got = Raster(_element(rotated, m)).read(grid, dtype=np.uint8)
    np.testing.assert_array_equal(got, picture)
    # flipped left-right, and the affine flips it back
    flipped = np.ascontiguousarray(picture[:, :, ::-1])
    got = Raster(_element(flipped, _affine_of(0, flip=True, origin=(X0 + 380 * PS, Y0)))).read(grid, dtype=np.uint8)
    np.testing.assert_array_equal(got, picture)


def test_coordinate_system_other_than_global(picture):
    element = Image2DModel.parse(
        picture,
        dims=("c", "y", "x"),
        transformations={
            "global": Identity(),
            "aligned": Sequence([Scale([2.0, 2.0], axes=("y", "x")), Translation([10.0, 20.0], axes=("y", "x"))]),
        },
    )
    raster = Raster(element, "aligned")
    assert raster.bounds == (20.0, 10.0, 20.0 + 760, 10.0 + 600)
    assert raster.grid() == Grid(20.0, 10.0, 2.0, 300, 380)
    with pytest.raises(ValueError, match="no transformation to the coordinate system 'other'.*'aligned', 'global'"):
        Raster(element, "other")


def test_labels_read_by_nearest_neighbour():
    labels = np.arange(12 * 10, dtype=np.int32).reshape(12, 10)
    element = Labels2DModel.parse(labels, dims=("y", "x"), transformations={"global": Scale([0.5, 0.5], axes=("y", "x"))})
    raster = Raster(element)
    got = raster.read(Grid(0.0, 0.0, 1.0, 6, 5), order=0, dtype=np.int32)
    # centres of 1 µm pixels fall on the corner between four labels; nearest rounds half up: the lower-right one
    np.testing.assert_array_equal(got[0], labels[1::2, 1::2])


def test_grid_refuses_rotated_images_and_read_errors(picture):
    raster = Raster(_element(picture, _affine_of(30)), name="he")
    with pytest.raises(ValueError, match="he is rotated, sheared or flipped"):
        raster.grid()
    with pytest.raises(ValueError, match="too large for one read"):
        raster.read(Grid(0.0, 0.0, 1e-3, 1 << 16, 1 << 15))
    with pytest.raises(ValueError, match="x_max > x_min"):
        raster.read_region((10, 10, 5, 20))
    with pytest.raises(ValueError, match="positive number"):
        raster.read_region((0, 0, 5, 20), pixel_size=-1)
    # numpy scalars are numbers too
    out = raster.read_region((X0, Y0, X0 + 20, Y0 + 10), pixel_size=np.float32(1.0))
    assert out.shape == (3, 10, 20)


# ------------------------------------------------------------------------------------------------ evaluate_he


def _rotated_copy(picture, theta: float):
    """The picture's content stored rotated by ``theta`` degrees, with an affine that puts it back in place.

    The data are the picture resampled (bilinear) onto a rotated pixel lattice that covers it, so reading the
    element back onto the picture's grid gives the picture up to two bilinear resamplings.
    """
    from scipy import ndimage

    c, h, w = picture.shape
    t = math.radians(theta)
    # the rotated lattice: pixel (x, y) -> picture pixel coords via R(theta) about the centre, size that covers it
    hh = int(math.ceil(abs(h * math.cos(t)) + abs(w * math.sin(t)))) + 2
    ww = int(math.ceil(abs(w * math.cos(t)) + abs(h * math.sin(t)))) + 2
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    centre_pic = np.array([w / 2, h / 2])
    centre_new = np.array([ww / 2, hh / 2])
    # picture (x, y) = rot @ ((x', y') - centre_new) + centre_pic  (both in pixel units)
    out = np.empty((c, hh, ww), dtype=np.uint8)
    # scipy works in (row, col): input = M @ output + offset
    m_rc = np.array([[rot[1, 1], rot[1, 0]], [rot[0, 1], rot[0, 0]]])
    off_xy = centre_pic - rot @ centre_new + rot @ np.array([0.5, 0.5]) - 0.5
    offset = np.array([off_xy[1], off_xy[0]])
    for k in range(c):
        out[k] = np.clip(np.rint(ndimage.affine_transform(picture[k].astype(np.float64), m_rc, offset, output_shape=(hh, ww), order=1, mode="nearest")), 0, 255)
    # element affine: pixel (x', y') -> µm = X0 + PS * (picture pixel coords)
    m = np.eye(3)
    m[:2, :2] = PS * rot
    m[:2, 2] = np.array([X0, Y0]) + PS * (centre_pic - rot @ centre_new)
    return out, m


@pytest.mark.parametrize("theta", [90, 30])
def test_evaluate_he_scores_a_rotated_he_as_its_axis_aligned_copy(picture, theta):
    grid = Grid(X0, Y0, PS, *picture.shape[1:])
    rng = np.random.default_rng(0)
    pred = np.clip(picture + rng.normal(0, 12, picture.shape), 0, 255).astype(np.uint8)
    if theta == 90:
        data = np.ascontiguousarray(np.rot90(picture, k=1, axes=(1, 2)))
        matrix = _affine_of(90, origin=(X0 + picture.shape[2] * PS, Y0))
    else:
        data, matrix = _rotated_copy(picture, theta)
    sdata = SpatialData(
        images={
            "pred": parse_image(pred, grid),
            "he_straight": parse_image(picture, grid),
            "he_rotated": _element(data, matrix, scale_factors=[2]),
        }
    )
    a = st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="he_straight", key_added="m_straight")
    b = st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="he_rotated", key_added="m_rotated", region=grid.bounds)
    a_all, b_all = a.loc["overall"], b.loc["overall"]
    if theta == 90:
        pd_cols = ["mse", "psnr", "ssim"]
        np.testing.assert_array_equal(a_all[pd_cols].to_numpy(float), b_all[pd_cols].to_numpy(float))
    else:
        # within resampling error: the rotated copy went through two bilinear resamplings
        assert abs(a_all["psnr"] - b_all["psnr"]) < 0.6
        assert abs(a_all["ssim"] - b_all["ssim"]) < 0.03
        # the copy itself is close to the picture: the error is the resampling's, not a misplacement
        back = Raster(sdata.images["he_rotated"]).read(grid, dtype=np.float64)
        inner = (slice(None), slice(5, -5), slice(5, -5))
        assert np.abs(back[inner] - picture[inner]).mean() < 6
        # a misplacement by 2 pixels would be far worse than the resampling error
        assert np.abs(back[:, 5:-5, 7:-3] - picture[:, 5:-5, 5:-5]).mean() > 2 * np.abs(back[inner] - picture[inner]).mean()


def _rotate_element_90(element):
    """The same H&E stored turned by 90 degrees, with an Affine that puts it back exactly in place."""
    from st2he._raster import Raster

    raster = Raster(element)
    data = np.asarray(raster.level0.values)
    h, w = data.shape[1:]
    rotated = np.ascontiguousarray(np.rot90(data, k=1, axes=(1, 2)))
    a = raster.affine  # axis-aligned: scale s, origin (x0, y0)
    s, x0, y0 = a[0, 0], a[0, 2], a[1, 2]
    m = np.array([[0.0, -s, x0 + w * s], [s, 0.0, y0], [0, 0, 1]])
    return _element(rotated, m, scale_factors=[2])


def test_training_pairs_from_a_rotated_he_are_the_same():
    from st2he.tl._train import prepare_pairs

    sdata = st2he.datasets.synthetic_tissue(3, size_um=96)
    st2he.pp.rasterize_transcripts(sdata)
    sdata.images["he_rotated"] = _rotate_element_90(sdata.images["he_image"])
    a = prepare_pairs(sdata, validation=0.3, tile_size=32)
    b = prepare_pairs(sdata, target_key="he_rotated", validation=0.3, tile_size=32)
    np.testing.assert_array_equal(a["train_targets"][0], b["train_targets"][0])
    np.testing.assert_array_equal(a["train_inputs"][0], b["train_inputs"][0])
    np.testing.assert_array_equal(a["val_targets"], b["val_targets"])
    assert a["train_targets"][0].std() > 10  # real content, not an empty picture


def test_one_ssim_training_equals_scikit_image_and_evaluate_he(picture):
    """The training loss / validation SSIM is scikit-image's, the one evaluate_he reports."""
    import torch
    from skimage.metrics import structural_similarity

    from st2he.models._losses import ssim

    rng = np.random.default_rng(1)
    a = picture[:, :96, :128]
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    want = structural_similarity(a, b, channel_axis=0, data_range=255)
    # training maps its [-1, 1] images to [0, 1] for SSIM (its luminance term is not offset-invariant)
    ta = torch.from_numpy(a.astype(np.float32) / 255)[None]
    tb = torch.from_numpy(b.astype(np.float32) / 255)[None]
    assert float(ssim(ta, tb, data_range=1.0)) == pytest.approx(want, abs=1e-5)
    assert float(ssim(ta * 2 - 1, tb * 2 - 1, data_range=2.0)) != pytest.approx(want, abs=1e-5)
    grid = Grid(X0, Y0, PS, 96, 128)
    sdata = SpatialData(images={"pred": parse_image(b, grid), "true": parse_image(a, grid)})
    df = st2he.tl.evaluate_he(sdata, pred_key="pred", true_key="true", tile_size=512)
    assert df.loc["overall", "ssim"] == pytest.approx(want, abs=1e-9)


def test_one_tissue_rule_for_tiles_and_zero_shot():
    """make_tiles (on a pyramid, lazily) and zero-shot (on tiles as read) count the same pixels as tissue."""
    from st2he._tissue import tissue_mask
    from st2he.tl._zero_shot import tissue_fraction

    # glass (white), padding (black), pink tissue, a dark-purple nucleus and a near-white but tissue pixel
    px = np.array([[255, 255, 255], [0, 0, 0], [230, 150, 200], [60, 20, 90], [225, 210, 220], [20, 20, 30]], np.uint8)
    want = np.array([False, False, True, True, True, True])  # mean 218 < 220 is tissue; (20,20,30) reaches 25
    np.testing.assert_array_equal(tissue_mask(px.T, "brightfield"), want)
    tile = np.tile(px[None], (6, 1, 1))  # (6, 6, 3): each column one kind
    assert tissue_fraction(tile)[0] == pytest.approx(4 / 6)
    grid = Grid(0.0, 0.0, 1.0, 6, 6)
    sdata = SpatialData(images={"he": parse_image(np.moveaxis(tile, -1, 0), grid)})
    st2he.pp.make_tiles(sdata, "he", tile_size=6, min_tissue_fraction=0.0, key_added="t")
    assert float(sdata.shapes["t"]["tissue_fraction"].iloc[0]) == pytest.approx(4 / 6)


def test_read_he_image_keeps_the_slides_own_pyramid(shared_data, tmp_path):
    """A pyramidal slide's levels become the element's levels, untouched; odd sizes plot and evaluate."""
    import matplotlib
    import tifffile

    matplotlib.use("Agg")
    svs = shared_data / "he_cmu1_small_region.svs"
    full = tifffile.imread(svs, series=0, level=0)  # (2967, 2220, 3): odd height
    levels = [full]
    for _ in range(2):  # the slide's own downsampled levels (not what spatialdata would compute: every 2nd pixel)
        levels.append(np.ascontiguousarray(levels[-1][::2, ::2]))
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(full, subifds=2, tile=(256, 256), photometric="rgb", metadata={"PhysicalSizeX": 0.499, "PhysicalSizeY": 0.499})
        for lv in levels[1:]:
            tif.write(lv, subfiletype=1, tile=(256, 256), photometric="rgb")
    sdata = st2he.io.read_he_image(path, origin=(100.0, 200.0))
    raster = Raster(sdata.images["he_image"])
    assert [lv.shape for lv in raster.levels] == [(2967, 2220), (1484, 1110), (742, 555)]
    for lv, want in zip(raster.levels, levels, strict=True):
        np.testing.assert_array_equal(np.moveaxis(np.asarray(lv.data.data[:, :300, :200]), 0, -1), want[:300, :200])
    assert raster.pixel_size == pytest.approx(0.499)
    assert raster.bounds == pytest.approx((100.0, 200.0, 100.0 + 2220 * 0.499, 200.0 + 2967 * 0.499))
    assert raster.levels[2].pixel_sizes[0] == pytest.approx(0.499 * 2220 / 555)
    assert raster.level_for(2.0) == 2
    # a read at 2 µm per pixel comes from level 2: its pixels, not a pooled level 0
    region = (100.0, 200.0, 100.0 + 40 * raster.levels[2].pixel_sizes[0], 200.0 + 30 * raster.levels[2].pixel_sizes[1])
    got = raster.read_region(region, pixel_size=raster.levels[2].pixel_sizes[0] * 1.001, dtype=np.float64)
    assert np.abs(np.moveaxis(got, 0, -1)[2:-2, 2:-2] - levels[2][2:28, 2:38]).mean() < 3
    # odd-sized levels plot (the old square-pixel check failed on every coarse level) and evaluate against themselves
    axes = st2he.pl.compare(sdata, input_key=None, pred_key=None, genes=[], max_pixels=300)
    assert max(axes[0].get_images()[0].get_array().shape[:2]) <= 300
    sdata.images["copy"] = sdata.images["he_image"]
    df = st2he.tl.evaluate_he(sdata, pred_key="copy", true_key="he_image", pixel_size=4.0)
    assert df.loc["overall", "mse"] == 0


@pytest.mark.parametrize("theta", [0, 90, 180, 270])
@pytest.mark.parametrize("flip", [False, True])
def test_whole_pixel_reads_in_all_eight_orientations_match_the_reference(picture, theta, flip):
    """The exact path (slices of the window, no interpolation) against the per-pixel model, partly outside."""
    data = picture[:, :23, :31]
    matrix = _affine_of(theta, flip=flip, origin=(X0 + 3.0, Y0 - 2.0))
    raster = Raster(_element(data, matrix))
    x0, y0, x1, y1 = raster.bounds
    grid = Grid(x0 - 2 * PS, y0 + 3 * PS, PS, 40, 25)  # hangs over two edges
    got = raster.read(grid, fill=-1, dtype=np.float64)
    np.testing.assert_allclose(got, _reference_read(data.astype(np.float64), matrix, grid, fill=-1), atol=1e-9)
    assert (got == -1).any() and (got >= 0).any() and np.array_equal(got, np.round(got))  # whole pixels, untouched
    np.testing.assert_array_equal(raster.read(grid, fill=7, dtype=np.uint8), np.where(got == -1, 7, got).astype(np.uint8))


def test_odd_sized_pyramids_of_images_and_labels_work_in_every_function(tmp_path):
    """Multiscale images and labels of odd width and height (coarse levels with x and y scales a hair apart)."""
    import matplotlib
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import get_transformation

    matplotlib.use("Agg")
    sdata = st2he.datasets.synthetic_tissue(5, size_um=96)
    for key in ("he_image", "morphology_focus"):  # cut to odd sizes, stored as 3-level pyramids
        raster = Raster(sdata.images[key])
        data = np.asarray(raster.level0.values)[:, :-1, :-3]
        assert data.shape[1] % 2 and data.shape[2] % 2
        sdata[key] = Image2DModel.parse(
            data,
            dims=("c", "y", "x"),
            c_coords=list(raster.level0.coords["c"].values),
            scale_factors=[2, 2],
            transformations={"global": get_transformation(raster.level0)},
        )
        assert len(Raster(sdata.images[key]).levels) == 3
    # nuclei as odd-sized multiscale labels, on the stain's lattice
    dapi = Raster(sdata.images["morphology_focus"])
    labels = (np.asarray(dapi.level0.values)[0] > np.percentile(dapi.level0.values, 80)).astype(np.int32)
    sdata["nuclei"] = Labels2DModel.parse(
        labels, dims=("y", "x"), scale_factors=[2, 2], transformations={"global": get_transformation(dapi.level0)}
    )
    # the rasteriser over the stain image and over the labels
    st2he.pp.rasterize_transcripts(sdata, stain_key="morphology_focus", pixel_size=1.0)
    over_labels = st2he.pp.rasterize_transcripts(sdata, stain_key="nuclei", pixel_size=1.0, key_added="over_labels")
    assert np.asarray(Raster(over_labels).level0.values).max() > 0
    # tiles, evaluation (same image: exact), the stain baseline against the odd H&E, plots, training pairs
    tiles = st2he.pp.make_tiles(sdata, "he_image", tile_size=64, key_added="tiles")
    assert len(tiles) > 0
    sdata["he_copy"] = sdata.images["he_image"]
    df = st2he.tl.evaluate_he(sdata, pred_key="he_copy", true_key="he_image", pixel_size=2.0)
    assert df.loc["overall", "mse"] == 0
    st2he.tl.virtual_he(sdata, method="stain")
    df = st2he.tl.evaluate_he(sdata, pred_key="virtual_he", true_key="he_image", key_added="m2")
    assert 10 < df.loc["overall", "psnr"] < 40
    axes = st2he.pl.compare(sdata, true_key="he_image", genes=[], max_pixels=40, save=tmp_path / "odd.png")
    assert len(axes) == 3
    from st2he.tl._train import prepare_pairs

    pairs = prepare_pairs(sdata, validation=None, tile_size=32)
    assert pairs["train_targets"][0].shape == pairs["train_inputs"][0].shape
