"""tl.register_he: a real H&E, moved by a known affine (and deformed), found again on a stain derived from it."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PS = 0.499  # µm per pixel of the CMU-1 slide


def _setup(shared_data, deformation=None):
    import spatialdata as sd
    import tifffile
    from skimage.color import rgb2hed

    import st2he
    from st2he._elements import parse_image
    from st2he._grid import Grid

    he = tifffile.imread(shared_data / "he_cmu1_small_region.svs")[:1600, :2000]
    # the nuclear stain: the haematoxylin of the undeformed H&E, area-averaged to 1 µm-ish pixels (2 x 2)
    hed = rgb2hed(he / 255.0)[..., 0]
    h2, w2 = hed.shape[0] // 2 * 2, hed.shape[1] // 2 * 2
    stain = hed[:h2, :w2].reshape(h2 // 2, 2, w2 // 2, 2).mean(axis=(1, 3))
    lo, hi = np.percentile(stain, (1, 99.5))
    dapi = (np.clip((stain - lo) / (hi - lo), 0, 1) * 4000 + 100).astype(np.uint16)
    sdata = sd.SpatialData(
        images={"morphology_focus": parse_image(dapi[None], Grid(0.0, 0.0, 2 * PS, *dapi.shape), c_coords=("DAPI",))}
    )
    if deformation is not None:
        from scipy.ndimage import map_coordinates

        rows, cols = np.mgrid[0 : he.shape[0], 0 : he.shape[1]].astype(np.float64)
        x, y = (cols + 0.5) * PS, (rows + 0.5) * PS
        dx, dy = deformation(x, y)
        src = [rows + dy / PS, cols + dx / PS]
        he = np.stack([map_coordinates(he[..., k], src, order=1, mode="nearest") for k in range(3)], axis=-1)
    grid = Grid(0.0, 0.0, PS, he.shape[0], he.shape[1])
    sdata.images["he_image"] = parse_image(np.moveaxis(he, -1, 0), grid)
    return sdata, st2he


def _perturb(sdata):
    """Place the H&E wrongly: rotated by 30 degrees, mirrored, 10 % too large and shifted."""
    from spatialdata.transformations import Affine, set_transformation

    t = math.radians(30)
    p = np.eye(3)
    p[:2, :2] = 1.1 * np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]) @ np.diag([-1.0, 1.0])
    p[:2, 2] = (300.0, -150.0)
    true = np.diag([PS, PS, 1.0])
    set_transformation(sdata["he_image"], {"global": Affine(p @ true, input_axes=("x", "y"), output_axes=("x", "y"))}, set_all=True)
    return true


def _rms_um(a, b, shape, step=50):
    yy, xx = np.mgrid[0 : shape[0] : step, 0 : shape[1] : step]
    pts = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5, np.ones(xx.size)])
    err = (a @ pts - b @ pts)[:2]
    return float(np.sqrt(np.mean(np.sum(err**2, axis=0))))


def test_affine_recovered_within_2_um(shared_data):
    sdata, st2he = _setup(shared_data)
    true = _perturb(sdata)
    report = st2he.tl.register_he(sdata, transform="affine", pixel_size=2.0)
    placed = st2he.io.Raster(sdata["he_image"]).affine
    shape = st2he.io.Raster(sdata["he_image"]).levels[0].shape
    assert _rms_um(placed, true, shape) < 2.0
    assert report["flip"] and report["residual_um"] < 2.0 and report["overlap"] > 0.9
    assert report["correlation"] > 0.9 > report["correlation_before"]
    assert sdata.attrs["st2he"]["he_image"]["registration"]["residual_um"] == report["residual_um"]


def test_rigid_keeps_the_scale(shared_data):
    sdata, st2he = _setup(shared_data)
    from spatialdata.transformations import Affine, set_transformation

    t = math.radians(-20)
    p = np.eye(3)
    p[:2, :2] = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    p[:2, 2] = (-80.0, 120.0)
    true = np.diag([PS, PS, 1.0])
    set_transformation(sdata["he_image"], {"global": Affine(p @ true, input_axes=("x", "y"), output_axes=("x", "y"))}, set_all=True)
    report = st2he.tl.register_he(sdata, transform="rigid", pixel_size=2.0, scales=(1.0,))
    placed = st2he.io.Raster(sdata["he_image"]).affine
    assert _rms_um(placed, true, st2he.io.Raster(sdata["he_image"]).levels[0].shape) < 2.0
    assert abs(report["scale"] - 1.0) < 1e-6 and not report["flip"]


def test_elastic_recovers_a_smooth_deformation(shared_data):
    amp, wavelength = 6.0, 700.0

    def deformation(x, y):
        return amp * np.sin(2 * np.pi * y / wavelength), amp * np.cos(2 * np.pi * x / wavelength)

    sdata, st2he = _setup(shared_data, deformation)
    true = np.diag([PS, PS, 1.0])
    report = st2he.tl.register_he(sdata, transform="elastic", pixel_size=2.0, smoothness_um=40.0, scales=(1.0,))
    field = st2he.io.Raster(sdata["he_image_displacement"])
    assert field.channels == ["dx", "dy"]
    placed = st2he.io.Raster(sdata["he_image"]).affine
    # stain positions in the tissue's interior: where the registration says each lies in the H&E, against the truth
    g = field.grid()
    rows, cols = np.mgrid[40 : g.height - 40 : 10, 40 : g.width - 40 : 10]
    x = g.x0 + (cols + 0.5) * g.pixel_size
    y = g.y0 + (rows + 0.5) * g.pixel_size
    values = np.asarray(field.level0.values)
    u = values[:, rows, cols]
    est = np.linalg.inv(placed) @ np.stack([x + u[0], y + u[1], np.ones_like(x)]).reshape(3, -1)
    dx, dy = deformation(x, y)
    truth = np.linalg.inv(true) @ np.stack([x - dx, y - dy, np.ones_like(x)]).reshape(3, -1)
    err = np.sqrt(np.sum((true @ est - true @ truth)[:2] ** 2, axis=0))
    affine_only = (true @ (np.linalg.inv(placed) @ np.stack([x, y, np.ones_like(x)]).reshape(3, -1)) - true @ truth)[:2]
    affine_err = np.sqrt(np.sum(affine_only**2, axis=0))
    # scored where the section has tissue (structure in the stain): blank glass has nothing to register by
    from scipy.ndimage import uniform_filter

    stain = np.asarray(st2he.io.Raster(sdata["morphology_focus"]).read(g)[0], dtype=np.float64)
    stain = (stain - stain.min()) / (stain.max() - stain.min())
    spread = np.sqrt(np.maximum(uniform_filter(stain**2, 25) - uniform_filter(stain, 25) ** 2, 0))
    tissue = (spread[rows, cols] > 0.05).ravel()
    assert tissue.mean() > 0.3
    rms = float(np.sqrt(np.mean(err[tissue] ** 2)))
    rms_affine = float(np.sqrt(np.mean(affine_err[tissue] ** 2)))
    # the field brings the deformed H&E within 2 µm; the affine alone leaves about the deformation's own size
    assert rms < 2.0 < rms_affine
    assert report["elastic_rms_um"] > 2.0


def test_a_wrong_stain_is_refused_and_nothing_changes(shared_data):
    sdata, st2he = _setup(shared_data)
    from st2he._elements import parse_image
    from st2he._grid import Grid

    rng = np.random.default_rng(0)
    noise = (rng.random((400, 500)) * 4000).astype(np.uint16)
    sdata.images["morphology_focus"] = parse_image(noise[None], Grid(0.0, 0.0, 2.0, 400, 500), c_coords=("DAPI",))
    before = st2he.io.Raster(sdata["he_image"]).affine.copy()
    with pytest.raises(ValueError, match="failed its checks"):
        st2he.tl.register_he(sdata, pixel_size=4.0, scales=(1.0,))
    np.testing.assert_array_equal(st2he.io.Raster(sdata["he_image"]).affine, before)
    with pytest.raises(ValueError, match="transform must be one of"):
        st2he.tl.register_he(sdata, transform="bspline")
    with pytest.raises(KeyError, match="he_key='nope'"):
        st2he.tl.register_he(sdata, he_key="nope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyError, match="stain_key='dapi2'"):
            st2he.tl.register_he(sdata, stain_key="dapi2")


def test_simulated_pair_moved_and_registered_scores_as_aligned():
    import st2he
    from spatialdata.transformations import Affine, get_transformation, set_transformation

    sdata = st2he.datasets.synthetic_tissue(0, size_um=200)
    st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0)
    st2he.tl.virtual_he(sdata, method="stain")
    aligned = st2he.tl.evaluate_he(sdata, pixel_size=1.0, key_added="m0").attrs["overall"]
    old = get_transformation(sdata["he_image"], "global").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    t = math.radians(12)
    centre = np.array([1300.0, 900.0])
    move = np.eye(3)
    move[:2, :2] = [[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]
    move[:2, 2] = centre - move[:2, :2] @ centre + (25.0, -15.0)
    set_transformation(sdata["he_image"], Affine(move @ old, input_axes=("x", "y"), output_axes=("x", "y")), "global")
    moved = st2he.tl.evaluate_he(sdata, pixel_size=1.0, key_added="m1").attrs["overall"]
    report = st2he.tl.register_he(sdata, transform="rigid", pixel_size=1.0, scales=(1.0,))
    back = st2he.tl.evaluate_he(sdata, pixel_size=1.0, key_added="m2").attrs["overall"]
    assert moved["psnr"] < aligned["psnr"] - 2.0
    assert abs(back["psnr"] - aligned["psnr"]) < 0.3 and abs(back["ssim"] - aligned["ssim"]) < 0.02
    assert abs(report["rotation_deg"] + 12.0) < 0.5
