"""st2he.tl.virtual_he: whole-image generation in blended tiles, chunked; errors; the stain baseline."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import spatialdata as sd_mod
from scipy import ndimage

import st2he
from st2he._elements import add_image, record_params
from st2he._grid import Grid, _scale0
from st2he.models import Pix2PixTurbo
from st2he.models._tiling import border_gradient_ratio, reader_from_array, render_region, tile_starts

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def _picture(h=150, w=170, seed=0):
    rng = np.random.default_rng(seed)
    img = ndimage.gaussian_filter(rng.random((3, h, w)), sigma=(0, 3, 3))
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return img.astype(np.uint8)


def _sdata(img=None, *, palette=None, pixel_size=0.5):
    img = _picture() if img is None else img
    sdata = sd_mod.SpatialData()
    grid = Grid(100.0, 50.0, pixel_size, img.shape[1], img.shape[2])
    add_image(sdata, "st2he_input", img, grid)
    if palette is not None:
        record_params(sdata, "st2he_input", {"palette": palette})
    return sdata, grid


@pytest.fixture(scope="module")
def tiny():
    m = Pix2PixTurbo.from_config("tiny", seed=0)
    m.metadata["tile_size"] = 64
    return m.set_eval()


class _Identity(Pix2PixTurbo):
    """A model whose tiles come back unchanged (to test the tiler and the element plumbing)."""

    def predict(self, tiles, **kwargs):
        return np.asarray(tiles).copy()


class _Offset(Pix2PixTurbo):
    """Each tile shifted by its own random colour: a worst case for seams."""

    def predict(self, tiles, seeds=None, **kwargs):
        out = []
        for t, s in zip(tiles, seeds, strict=True):
            shift = np.random.default_rng(s).normal(0, 25, size=(3, 1, 1))
            out.append(np.clip(t.astype(float) + shift, 0, 255))
        return np.stack(out)


def _make(cls):
    base = Pix2PixTurbo.from_config("tiny", seed=0)
    m = cls(base.vae, base.unet, base.text_encoder, base.tokenizer, base.scheduler, base.config, add_lora=False)
    m.metadata["tile_size"] = 64
    return m.set_eval()


def _image(sdata, key):
    return np.asarray(_scale0(sdata.images[key]).values)


def test_identity_model_gives_back_the_input_exactly():
    sdata, grid = _sdata()
    st2he.tl.virtual_he(sdata, model=_make(_Identity), tile_size=64, overlap=16, chunk=48, progress=False)
    out = _image(sdata, "virtual_he")
    assert out.dtype == np.uint8
    assert np.array_equal(out, _image(sdata, "st2he_input"))
    # the output carries the input's transformation
    assert Grid.from_element(sdata.images["virtual_he"]) == grid
    assert list(_scale0(sdata.images["virtual_he"]).coords["c"].values) == ["r", "g", "b"]


def test_blending_is_seamless_and_chunk_independent():
    img = _picture(192, 192, seed=3)
    read = reader_from_array(img)
    model = _make(_Offset)
    pred = model.predict
    smooth, _ = render_region(pred, read, (192, 192), (0, 192, 0, 192), tile=64, overlap=24)
    hard, _ = render_region(pred, read, (192, 192), (0, 192, 0, 192), tile=64, overlap=0)
    boxed, _ = render_region(pred, read, (192, 192), (0, 192, 0, 192), tile=64, overlap=24, window="box")
    r_smooth = border_gradient_ratio(smooth, 64, 24)
    r_hard = border_gradient_ratio(hard, 64, 0)
    r_box = border_gradient_ratio(boxed, 64, 24)
    assert r_smooth < 1.5 < r_hard and r_smooth < r_box
    # blocks computed on their own equal the whole-image result (tiles lie on one global grid)
    sdata, _ = _sdata(img)
    st2he.tl.virtual_he(sdata, model=model, tile_size=64, overlap=24, chunk=40, key_added="a", progress=False)
    st2he.tl.virtual_he(sdata, model=model, tile_size=64, overlap=24, chunk=200, key_added="b", progress=False)
    st2he.tl.virtual_he(sdata, model=model, tile_size=64, overlap=24, chunk=80, key_added="c", lazy=True)
    a, b, c = (_image(sdata, k) for k in "abc")
    assert np.array_equal(a, b) and np.array_equal(a, c)
    assert np.array_equal(a, smooth)


def test_tiles_cover_small_and_odd_images():
    assert list(tile_starts(40, 64, 16)) == [0]
    starts = tile_starts(150, 64, 16)
    assert starts[0] == 0 and starts[-1] == 150 - 64 and np.all(np.diff(starts) <= 48)
    img = _picture(40, 50)
    sdata, _ = _sdata(img)
    st2he.tl.virtual_he(sdata, model=_make(_Identity), tile_size=64, overlap=16, progress=False)
    assert np.array_equal(_image(sdata, "virtual_he"), img)


def test_tiny_model_end_to_end_with_uncertainty(tiny):
    sdata, grid = _sdata(_picture(96, 80))
    st2he.tl.virtual_he(sdata, model=tiny, tile_size=64, overlap=16, progress=False)
    out = _image(sdata, "virtual_he")
    assert out.shape == (3, 96, 80) and out.dtype == np.uint8
    # the values: an image of exactly one tile comes back as the model's own prediction of that tile
    one = _picture(64, 64, seed=4)
    single, _ = _sdata(one)
    st2he.tl.virtual_he(single, model=tiny, tile_size=64, overlap=16, progress=False)
    want = tiny.predict(one[None])[0]
    got = _image(single, "virtual_he")
    assert np.abs(got.astype(int) - want).max() <= 1 and (got == want).mean() > 0.99
    # in a larger image, a pixel covered by one tile only (the top-left corner) is that tile's prediction there
    corner = tiny.predict(_picture(96, 80)[None, :, :64, :64])[0]
    assert np.abs(out[:, :8, :8].astype(int) - corner[:, :8, :8]).max() <= 1
    st2he.tl.virtual_he(sdata, model=tiny, n_samples=3, r=0.5, key_added="vs", progress=False)
    spread = _image(sdata, "vs_uncertainty")
    assert spread.shape == (1, 96, 80) and spread.dtype == np.float32
    assert spread.max() > 0 and spread.min() >= 0
    assert Grid.from_element(sdata.images["vs_uncertainty"]) == grid
    # the same seed gives the same samples
    st2he.tl.virtual_he(sdata, model=tiny, n_samples=3, r=0.5, key_added="vs2", progress=False)
    assert np.array_equal(_image(sdata, "vs2"), _image(sdata, "vs"))
    params = sdata.attrs["st2he"]["vs"]
    assert params["method"] == "diffusion" and params["n_samples"] == 3


def test_clear_errors(tiny):
    sdata, grid = _sdata()
    with pytest.raises(KeyError, match="input_key='nope'"):
        st2he.tl.virtual_he(sdata, model=tiny, input_key="nope")
    with pytest.raises(ValueError, match="multiple of 8"):
        st2he.tl.virtual_he(sdata, model=tiny, tile_size=60)
    add_image(sdata, "four", np.zeros((4, 150, 170), np.uint8), grid, c_coords=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="4 channels"):
        st2he.tl.virtual_he(sdata, model=tiny, input_key="four")
    st2he.tl.virtual_he(sdata, model=_make(_Identity), progress=False)
    with pytest.raises(KeyError, match="already exists"):
        st2he.tl.virtual_he(sdata, model=tiny)
    st2he.tl.virtual_he(sdata, model=tiny, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="method"):
        st2he.tl.virtual_he(sdata, method="gan", key_added="x")


def test_palette_and_pixel_size_warnings(tiny):
    sdata, _ = _sdata(palette={"EPCAM": "#ff0000", "CD3E": "#00ff00"}, pixel_size=1.0)
    tiny.metadata["palette"] = {"EPCAM": "#0000ff", "CD3E": "#00ff00"}
    tiny.metadata["pixel_size"] = 0.5
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            st2he.tl.virtual_he(sdata, model=tiny, progress=False, palette_mismatch="warn")
        messages = [str(w.message) for w in rec]
        assert any("EPCAM (#ff0000 vs #0000ff)" in m for m in messages)
        assert any("0.5 µm pixels" in m for m in messages)
    finally:
        del tiny.metadata["palette"], tiny.metadata["pixel_size"]


def test_stain_method():
    sdata = st2he.datasets.synthetic_tissue(0, size_um=64)
    st2he.pp.rasterize_transcripts(sdata)
    st2he.tl.virtual_he(sdata, method="stain")
    out = _image(sdata, "virtual_he")
    assert out.dtype == np.uint8 and out.shape[0] == 3
    assert Grid.from_element(sdata.images["virtual_he"]) == Grid.from_element(sdata.images["st2he_input"])
    # the values are those of the stain baseline (checked pixel by pixel against the recipe in test_stain.py)
    from st2he.tl._stain import stain_he

    np.testing.assert_array_equal(out, stain_he(sdata).compute())
    assert 0 < (out.min(axis=0) < 200).mean() < 1  # stained tissue and glass, not one flat colour


# ----------------------------------------------------------------------------------------------- failures


class _FailsOnThirdCall(Pix2PixTurbo):
    """Identity until its third call, which raises (a crash half-way through a slide)."""

    calls = 0

    def predict(self, tiles, **kwargs):
        type(self).calls += 1
        if type(self).calls == 3:
            msg = "out of memory on the third tile"
            raise RuntimeError(msg)
        return np.asarray(tiles).copy()


def test_a_failed_run_leaves_nothing_and_a_retry_works(tmp_path, monkeypatch):
    import tempfile

    import st2he.tl._generate as generate

    # outputs "over 1 GB" go to a temporary zarr store: here all of them, in a folder we watch
    monkeypatch.setattr(generate, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sdata, _ = _sdata()
    kwargs = {"tile_size": 64, "overlap": 16, "chunk": 48, "progress": False}
    _FailsOnThirdCall.calls = 0
    with pytest.raises(RuntimeError, match="third tile"):
        st2he.tl.virtual_he(sdata, model=_make(_FailsOnThirdCall), n_samples=2, r=0.5, **kwargs)
    assert _FailsOnThirdCall.calls == 3
    assert "virtual_he" not in sdata and "virtual_he_uncertainty" not in sdata
    assert "virtual_he" not in sdata.attrs.get("st2he", {})
    stores = lambda: list(tmp_path.glob("st2he_virtual_he_*"))  # noqa: E731
    assert stores() == []  # the half-written temporary store is gone
    # the retry, same key, works
    st2he.tl.virtual_he(sdata, model=_make(_Identity), **kwargs)
    assert np.array_equal(_image(sdata, "virtual_he"), _image(sdata, "st2he_input"))
    assert len(stores()) == 1 and (stores()[0] / "zarr.json").exists()
    # the temporary store goes with the element
    del sdata["virtual_he"]
    gc.collect()
    assert stores() == []


def test_non_finite_weights_or_outputs_are_refused():
    import torch

    sdata, _ = _sdata()
    nan = Pix2PixTurbo.from_config("tiny", seed=0).set_eval()
    with torch.no_grad():
        nan.unet.conv_out.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"non-finite weights .*: unet\.conv_out\..*weight"):
        st2he.tl.virtual_he(sdata, model=nan, tile_size=64, progress=False)
    # finite weights whose computation overflows: the tiles are named (here every tile of the picture)
    huge = Pix2PixTurbo.from_config("tiny", seed=0).set_eval()
    with torch.no_grad():
        huge.vae.decoder.conv_in.weight.mul_(1e37)
    for lazy in (False, True):
        with pytest.raises(ValueError, match=r"non-finite values .* at rows 0\.\.64, columns 0\.\.64"):
            st2he.tl.virtual_he(sdata, model=huge, tile_size=64, overlap=16, lazy=lazy, progress=False)
            _scale0(sdata.images["virtual_he"]).data.compute()
        assert "virtual_he" not in sdata or lazy


def test_an_evaluation_pixel_size_far_too_fine_is_refused():
    sdata, grid = _sdata()
    add_image(sdata, "truth", _picture(seed=1), grid)
    with pytest.raises(ValueError, match=r"pixel_size=0\.0001 µm .* about 6\.\d+e\+11 pixels .* pixel_size >= 0\.25"):
        st2he.tl.evaluate_he(sdata, pred_key="st2he_input", true_key="truth", pixel_size=1e-4)
    tiles = st2he.tl.evaluate_he(sdata, pred_key="st2he_input", true_key="truth", pixel_size=0.25, tile_size=64)
    assert tiles.index.str.startswith("tile_").sum() == 5 * 6  # 300 x 340 evaluation pixels in tiles of 64: half the limit is fine
