"""Xenium Explorer's alignment files: a real H&E placed over a real Xenium crop by a known matrix."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
XENIUM = DATA / "xenium_cellline_crop"
SVS = DATA / "he_cmu1_small_region.svs"
NATIVE = 0.2125  # µm per morphology pixel (no experiment.xenium in the crop: the Xenium default)

pytestmark = pytest.mark.skipif(not XENIUM.exists() or not SVS.exists(), reason="real data crops not present")


def _read(run, **kwargs):
    import st2he

    return st2he.io.read_xenium(run, image_pixel_size=400 / 237, image_origin=(1000.0, 1000.0), **kwargs)


def _he_crop(tmp_path):
    import tifffile

    he = tifffile.imread(SVS)[400:700, 300:700]  # 300 x 400 px of real H&E
    path = tmp_path / "run_he_image.png"
    Image.fromarray(he).save(path)
    return path, he


def _matrix():
    """H&E pixel (x, y) -> morphology pixel: rotated by 90 degrees, mirrored, 0.5 µm per H&E pixel, shifted."""
    s = 0.5 / NATIVE
    rot_flip = np.array([[0.0, 1.0], [1.0, 0.0]])  # x' = y, y' = x (a transpose: rotation plus flip)
    m = np.eye(3)
    m[:2, :2] = s * rot_flip
    m[:2, 2] = (1050.0 / NATIVE, 1020.0 / NATIVE)
    return m


def _folder(tmp_path, matrix, keypoints=None):
    run = tmp_path / "run"
    shutil.copytree(XENIUM, run)
    np.savetxt(run / "he_imagealignment.csv", matrix, delimiter=",")
    if keypoints is not None:
        keypoints.to_csv(run / "he_keypoints.csv", index=False)
    return run


def test_alignment_places_each_pixel(tmp_path):
    import st2he
    from st2he.io import Raster

    he_path, he = _he_crop(tmp_path)
    run = _folder(tmp_path, _matrix())
    sdata = _read(run, he_image=he_path, alignment=run / "he_imagealignment.csv")
    raster = Raster(sdata["he_image"])
    # pixel (col, row) of the H&E lands at x = 1050 + 0.5 row, y = 1020 + 0.5 col (µm)
    expected = np.array([[0, 0.5, 1050.0], [0.5, 0, 1020.0], [0, 0, 1]])
    np.testing.assert_allclose(raster.affine, expected, atol=1e-9)
    # read back through the raster: the µm square of H&E pixel (row 100, col 250) holds that pixel's colour
    row, col = 100, 250
    x0, y0 = 1050.0 + 0.5 * row, 1020.0 + 0.5 * col
    patch = raster.read_region((x0, y0, x0 + 0.5, y0 + 0.5), pixel_size=0.5)
    np.testing.assert_array_equal(patch[:, 0, 0], he[row, col])
    assert sdata.attrs["st2he"]["source"]["he_alignment"]["matrix_units"] == "morphology pixels"
    # the molecules are untouched, in µm
    tx = sdata["transcripts"].compute()
    assert tx["x"].between(1000, 1400).all()


def test_keypoints_check_the_units_and_the_fit(tmp_path):
    import pandas as pd

    import st2he

    he_path, _ = _he_crop(tmp_path)
    m = _matrix()
    image_px = np.array([[10.0, 20.0], [300.0, 40.0], [150.0, 250.0], [390.0, 290.0]])
    um = (np.c_[image_px, np.ones(4)] @ (np.diag([NATIVE, NATIVE, 1]) @ m).T)[:, :2]
    kp = pd.DataFrame({"fixedX": um[:, 0], "fixedY": um[:, 1], "alignmentX": image_px[:, 0], "alignmentY": image_px[:, 1]})
    run = _folder(tmp_path, m, kp)
    sdata = _read(
        run, he_image=he_path, alignment=run / "he_imagealignment.csv", keypoints=run / "he_keypoints.csv"
    )
    report = sdata.attrs["st2he"]["source"]["he_alignment"]
    assert report["matrix_units"] == "morphology pixels"
    assert report["keypoint_rms_um"] < 1e-6 and report["n_keypoints"] == 4

    # a matrix written in µm is recognised by its keypoints and read as such
    m_um = np.diag([NATIVE, NATIVE, 1]) @ m
    np.savetxt(run / "he_imagealignment.csv", m_um, delimiter=",")
    sdata = _read(
        run, he_image=he_path, alignment=run / "he_imagealignment.csv", keypoints=run / "he_keypoints.csv"
    )
    assert sdata.attrs["st2he"]["source"]["he_alignment"]["matrix_units"] == "micrometres"
    np.testing.assert_allclose(st2he.io.Raster(sdata["he_image"]).affine, m_um, atol=1e-9)

    # keypoints that the matrix does not fit: a warning with the residual
    kp2 = kp.assign(fixedX=kp["fixedX"] + 50.0)
    kp2.to_csv(run / "he_keypoints.csv", index=False)
    with pytest.warns(UserWarning, match=r"50\.0 µm \(RMS\)"):
        _read(
            run, he_image=he_path, alignment=run / "he_imagealignment.csv", keypoints=run / "he_keypoints.csv"
        )


def test_alignment_bad_input(tmp_path):
    import st2he

    he_path, _ = _he_crop(tmp_path)
    run = _folder(tmp_path, _matrix())
    with pytest.raises(ValueError, match="he_pixel_size"):
        _read(run, he_image=he_path)
    with pytest.raises(ValueError, match="he_image="):
        _read(run, alignment=run / "he_imagealignment.csv")
    with pytest.raises(FileNotFoundError, match="Alignment file not found"):
        _read(run, he_image=he_path, alignment=run / "missing.csv")
    (run / "bad.csv").write_text("1,0\n0,1\n")
    with pytest.raises(ValueError, match="3x3 affine"):
        _read(run, he_image=he_path, alignment=run / "bad.csv")
    np.savetxt(run / "singular.csv", np.array([[1, 2, 0], [2, 4, 0], [0, 0, 1.0]]), delimiter=",")
    with pytest.raises(ValueError, match="singular"):
        _read(run, he_image=he_path, alignment=run / "singular.csv")
    # an image already aligned: a plain pixel size
    sdata = _read(run, he_image=he_path, he_pixel_size=0.5)
    np.testing.assert_allclose(st2he.io.Raster(sdata["he_image"]).affine, np.diag([0.5, 0.5, 1.0]))
