"""st2he.io.write_element: a lazy element that fails while it is written leaves nothing on disk, and the retry works."""

from __future__ import annotations

import numpy as np
import pytest
import spatialdata as sd
from scipy import ndimage

import st2he
from st2he._elements import add_image
from st2he._grid import Grid
from st2he.models import Pix2PixTurbo


class _FailsOnThirdTile(Pix2PixTurbo):
    """Identity until its third call, which raises (a crash half-way through a slide)."""

    calls = 0

    def predict(self, tiles, **kwargs):
        type(self).calls += 1
        if type(self).calls == 3:
            msg = "out of memory on the third tile"
            raise RuntimeError(msg)
        return np.asarray(tiles).copy()


class _Identity(Pix2PixTurbo):
    def predict(self, tiles, **kwargs):
        return np.asarray(tiles).copy()


def _make(cls):
    base = Pix2PixTurbo.from_config("tiny", seed=0)
    m = cls(base.vae, base.unet, base.text_encoder, base.tokenizer, base.scheduler, base.config, add_lora=False)
    m.metadata["tile_size"] = 64
    return m.set_eval()


def _pixels(element) -> np.ndarray:
    return np.asarray(st2he.io.Raster(element).level0.values)


def _backed(tmp_path):
    rng = np.random.default_rng(0)
    img = ndimage.gaussian_filter(rng.random((3, 150, 170)), sigma=(0, 3, 3))
    img = ((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)
    sdata = sd.SpatialData()
    add_image(sdata, "st2he_input", img, Grid(100.0, 50.0, 0.5, 150, 170))
    sdata.write(tmp_path / "slide.zarr")
    return sd.read_zarr(tmp_path / "slide.zarr"), img


def test_a_lazy_element_that_fails_while_written_leaves_nothing_and_the_retry_works(tmp_path):
    sdata, img = _backed(tmp_path)
    kwargs = {"tile_size": 64, "overlap": 16, "chunk": 48, "progress": False, "lazy": True}
    _FailsOnThirdTile.calls = 0
    st2he.tl.virtual_he(sdata, model=_make(_FailsOnThirdTile), **kwargs)  # lazy: nothing computed yet
    with pytest.raises(RuntimeError, match="third tile"):
        st2he.io.write_element(sdata, "virtual_he")
    assert _FailsOnThirdTile.calls >= 3  # the failure came from computing the element while it was written
    store = tmp_path / "slide.zarr"
    assert not (store / "images" / "virtual_he").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["slide.zarr"]  # no staging store left beside it
    assert set(sd.read_zarr(store).images) == {"st2he_input"}  # the store is as it was
    # the retry: the same key, a working model
    st2he.tl.virtual_he(sdata, model=_make(_Identity), overwrite=True, **kwargs)
    st2he.io.write_element(sdata, "virtual_he")
    back = sd.read_zarr(store)
    assert set(back.images) == {"st2he_input", "virtual_he"}
    np.testing.assert_array_equal(_pixels(back.images["virtual_he"]), img)
    np.testing.assert_array_equal(_pixels(back.images["st2he_input"]), img)


def test_write_element_replaces_only_when_told_and_only_when_complete(tmp_path):
    sdata, img = _backed(tmp_path)
    store = tmp_path / "slide.zarr"
    add_image(sdata, "other", 255 - img, Grid(100.0, 50.0, 0.5, 150, 170))
    st2he.io.write_element(sdata, "other")
    with pytest.raises(KeyError, match="already holds an element 'other'.*overwrite=True"):
        st2he.io.write_element(sdata, "other")
    # a replacement that fails keeps the old element whole
    kwargs = {"tile_size": 64, "overlap": 16, "chunk": 48, "progress": False, "lazy": True}
    _FailsOnThirdTile.calls = 0
    st2he.tl.virtual_he(sdata, model=_make(_FailsOnThirdTile), key_added="other", overwrite=True, **kwargs)
    with pytest.raises(RuntimeError, match="third tile"):
        st2he.io.write_element(sdata, "other", overwrite=True)
    np.testing.assert_array_equal(_pixels(sd.read_zarr(store).images["other"]), 255 - img)
    # and a replacement that succeeds replaces it
    st2he.tl.virtual_he(sdata, model=_make(_Identity), key_added="other", overwrite=True, **kwargs)
    st2he.io.write_element(sdata, "other", overwrite=True)
    np.testing.assert_array_equal(_pixels(sd.read_zarr(store).images["other"]), img)
    # bad input
    with pytest.raises(KeyError, match="not an element"):
        st2he.io.write_element(sdata, "nothing")
    with pytest.raises(ValueError, match="backed by a zarr store"):
        st2he.io.write_element(sd.SpatialData(images={"a": sdata.images["other"]}), "a")
