"""Which image becomes the nuclear stain, and warnings when it is not one or has no contrast (issue 12 §2)."""

import logging
from pathlib import Path

import numpy as np
import pytest

MERSCOPE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "merscope_brain_cancer_crop"


def _sample():
    import st2he

    return st2he.datasets.synthetic_tissue(0, size_um=96)


def _stain_values(sdata):
    from st2he._raster import Raster

    return np.asarray(Raster(sdata["morphology_focus"]).level0.values[0]).copy()


def _add_image(sdata, key, values, channel):
    from st2he._elements import parse_image
    from st2he._raster import Raster

    grid = Raster(sdata["morphology_focus"]).grid()
    sdata.images[key] = parse_image(values[None], grid, c_coords=(channel,))


def test_polyt_is_never_taken_as_the_nuclear_stain_by_auto(caplog):
    import st2he

    sdata = _sample()
    _add_image(sdata, "polyt", _stain_values(sdata), "PolyT")
    del sdata.images["morphology_focus"]
    with caplog.at_level(logging.INFO, logger="st2he"):
        st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0, key_added="picture")
    # no stain image was taken: the grey is drawn from the nucleus boundaries instead
    assert sdata.attrs["st2he"]["picture"]["stain_key"] == "nucleus_boundaries"
    # and asking for it explicitly warns
    with pytest.warns(st2he.pp.StainWarning, match="marks something other than nuclei"):
        st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0, stain_key="polyt", key_added="picture2")


def test_the_choice_is_said(caplog):
    import st2he

    sdata = _sample()
    with caplog.at_level(logging.INFO, logger="st2he"):
        st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0)
    assert "nuclear stain: image 'morphology_focus', channel 'DAPI' (picked by stain_key='auto')" in caplog.text


def test_a_saturated_stain_warns():
    import st2he

    sdata = _sample()
    values = _stain_values(sdata)
    values[: values.shape[0] * 2 // 3] = np.iinfo(values.dtype).max  # two thirds of the image saturated
    _add_image(sdata, "dapi_raw", values, "DAPI")
    with pytest.warns(st2he.pp.StainWarning, match="no usable contrast"):
        st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0, stain_key="dapi_raw")


@pytest.mark.skipif(not MERSCOPE.exists(), reason="real data crops not present")
def test_merscope_polyt_only_draws_no_stain_silently():
    import warnings

    import st2he

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the crop's resampled-mosaic note
        sdata = st2he.io.read_merscope(MERSCOPE, stains=["PolyT"])
    st2he.pp.rasterize_transcripts(sdata, pixel_size=2.0)
    info = sdata.attrs["st2he"]["st2he_input"]
    assert info["stain_key"] != "polyt"


def test_a_stain_bright_almost_everywhere_warns_and_a_nuclear_one_does_not():
    import warnings

    import st2he

    sdata = _sample()
    values = _stain_values(sdata)
    with warnings.catch_warnings():
        warnings.simplefilter("error", st2he.pp.StainWarning)
        st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0, stain_key="morphology_focus")  # nuclei: no warning
    inverted = np.iinfo(values.dtype).max - values  # dark nuclei on a bright field
    _add_image(sdata, "dapi_inverted", inverted, "DAPI")
    with pytest.warns(st2he.pp.StainWarning, match=r"shows no separate nuclei: 9\d% of its pixels"):
        st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0, stain_key="dapi_inverted", key_added="picture2")


@pytest.mark.skipif(not MERSCOPE.exists(), reason="real data crops not present")
def test_the_real_merscope_crops_blurred_dapi_warns():
    import warnings

    import st2he

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the crop's resampled-mosaic note
        sdata = st2he.io.read_merscope(MERSCOPE)
    with pytest.warns(st2he.pp.StainWarning, match=r"image 'dapi'.* shows no separate nuclei: 94% of its pixels"):
        st2he.pp.rasterize_transcripts(sdata, pixel_size=2.0)
