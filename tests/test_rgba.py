"""An H&E element with an alpha channel (RGBA, as PNG exports and some readers give) reads as its RGB everywhere;
an image of other channels is refused with the same message by every step that reads H&E."""

from __future__ import annotations

import numpy as np
import pytest
from spatialdata.models import Image2DModel
from spatialdata.transformations import get_transformation

import st2he
from st2he._raster import Raster
from st2he.tl._train import aligned_pair
from st2he.tl._zero_shot import read_tiles


@pytest.fixture(scope="module")
def sample():
    sdata = st2he.datasets.synthetic_tissue(3, size_um=128.0)
    he = sdata["he_image"]
    rgb = np.asarray(he.values)
    transformations = get_transformation(he, get_all=True)
    alpha = np.full((1, *rgb.shape[1:]), 255, rgb.dtype)
    sdata.images["he_rgba"] = Image2DModel.parse(
        np.concatenate([rgb, alpha]), dims=("c", "y", "x"), c_coords=["r", "g", "b", "a"],
        transformations=transformations,
    )
    sdata.images["he_two"] = Image2DModel.parse(
        rgb[:2], dims=("c", "y", "x"), c_coords=["h", "e"], transformations=transformations
    )
    with pytest.warns(st2he.pp.MoleculesDroppedWarning):
        st2he.pp.rasterize_transcripts(sdata)
    return sdata


def test_rgba_reads_as_its_rgb_in_every_step(sample):
    x0, y0, _, _ = Raster(sample["he_image"]).bounds
    box = np.array([[x0 + 10, y0 + 10, x0 + 74, y0 + 74]])
    # zero-shot tiles
    (t_rgb,), _ = read_tiles(sample, "he_image", box)
    (t_rgba,), _ = read_tiles(sample, "he_rgba", box)
    assert t_rgba.shape[-1] == 3
    np.testing.assert_array_equal(t_rgba, t_rgb)
    # training pairs
    _, y_rgb, _ = aligned_pair(sample, target_key="he_image")
    _, y_rgba, _ = aligned_pair(sample, target_key="he_rgba")
    assert y_rgba.shape[0] == 3
    np.testing.assert_array_equal(y_rgba, y_rgb)
    # evaluate_he: an RGBA image against its own RGB is perfect
    df = st2he.tl.evaluate_he(sample, pred_key="he_rgba", true_key="he_image", key_added="m_rgba")
    overall = df.attrs["overall"]
    assert overall["mse"] == 0.0 and overall["ssim"] == pytest.approx(1.0)
    # expression read from either is the same
    a = st2he.tl.predict_expression(sample, image_key="he_image", key_added="p_rgb", progress=False)
    b = st2he.tl.predict_expression(sample, image_key="he_rgba", key_added="p_rgba", progress=False)
    np.testing.assert_array_equal(a.X, b.X)


@pytest.mark.parametrize(
    ("call", "step"),
    [
        (lambda s: read_tiles(s, "he_two", np.array([[0.0, 0.0, 10.0, 10.0]])), "the CLIP model's image tower"),
        (lambda s: aligned_pair(s, target_key="he_two"), "training"),
        (lambda s: st2he.tl.evaluate_he(s, pred_key="he_image", true_key="he_two"), "evaluate_he"),
        (lambda s: st2he.tl.predict_expression(s, image_key="he_two", progress=False), "the expression model"),
        (lambda s: st2he.tl.register_he(s, he_key="he_two"), "register_he"),
    ],
)
def test_an_image_of_other_channels_is_refused_by_name(sample, call, step):
    before = set(sample.images) | set(sample.tables)
    with pytest.raises(ValueError, match=rf"'he_two' has 2 channels \['h', 'e'\]; {step} reads RGB H&E"):
        call(sample)
    assert set(sample.images) | set(sample.tables) == before
