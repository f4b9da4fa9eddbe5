"""The shipped ``"small-real"`` generator: lineage palette, trained on simulated pairs and pairs derived from real H&E.

It is the shipped generator for real panels: it reads any panel (lineage colours), and on a real H&E it never saw it
paints closer to the truth than the stain baseline. Checked on the real crops in ../shared/data.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("torch")

import st2he  # noqa: E402
from st2he._raster import Raster  # noqa: E402
from st2he.models import load_model  # noqa: E402
from st2he.models._io import SHIPPED  # noqa: E402

#: rows of CMU-1-Small-Region the model never trained on (it trained on rows [0, 2161))
CMU_HELD_OUT_ROW = 2225


@pytest.fixture(scope="module")
def small_real():
    return load_model("small-real")


def _rgb(sdata, key) -> np.ndarray:
    return np.moveaxis(np.asarray(Raster(sdata.images[key]).level0.values), 0, -1).astype(np.float64)


def test_small_real_is_shipped_with_its_record(small_real):
    folder = SHIPPED["small-real"]
    assert sum(p.stat().st_size for p in folder.iterdir()) < 25e6
    meta = small_real.metadata
    assert meta["palette_method"] == "lineage"
    assert meta["tile_size"] == 256 and meta["pixel_size"] == 0.5
    assert "pairs_from_he" in meta["trained_on"] and "CMU-1-Small-Region" in meta["trained_on"]
    # the default stays the simulated-panel model
    assert load_model().metadata.get("palette_method") != "lineage"
    with pytest.raises(TypeError, match=r"'small', 'small-real'"):
        load_model(3)


def test_small_real_beats_the_stain_model_on_real_he_it_never_saw(small_real, shared_data, one_torch_thread):
    """A pair derived from the bottom of CMU-1 (skin), below every row the model trained on."""
    import tifffile

    rgb = tifffile.imread(shared_data / "he_cmu1_small_region.svs", key=0)
    crop = rgb[CMU_HELD_OUT_ROW : CMU_HELD_OUT_ROW + 512, 512:1536]
    sdata = st2he.datasets.pairs_from_he(crop, seed=1, origin_um=(256.0, CMU_HELD_OUT_ROW * 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
        st2he.pp.rasterize_transcripts(sdata, palette="lineage")
    st2he.tl.virtual_he(sdata, model=small_real, key_added="virtual_he", progress=False)
    st2he.tl.virtual_he(sdata, method="stain", key_added="stain_he")
    scores = {
        key: st2he.tl.evaluate_he(sdata, pred_key=key, true_key="he_image", key_added=f"metrics_{key}")
        for key in ("virtual_he", "stain_he")
    }
    psnr = {k: float(np.mean(v["psnr"])) for k, v in scores.items()}
    ssim = {k: float(np.mean(v["ssim"])) for k, v in scores.items()}
    assert psnr["virtual_he"] >= psnr["stain_he"] + 4.0, psnr  # measured: 17.8 against 11.0 dB
    assert ssim["virtual_he"] > ssim["stain_he"], ssim
    # the colours of real H&E: nuclei (the darkest haematoxylin) blue-purple and darker than the rest
    out = _rgb(sdata, "virtual_he")
    stain = np.asarray(Raster(sdata.images["morphology_focus"]).level0.values)[0].astype(np.float64)
    nuclei = stain > np.percentile(stain, 90)
    rest = stain < np.percentile(stain, 50)
    luminance = out.mean(axis=-1)
    assert luminance[nuclei].mean() < luminance[rest].mean() - 80  # measured: 131 darker
    assert (out[nuclei, 2] - out[nuclei, 1]).mean() > 30  # blue over green: haematoxylin (measured: 41)


def test_small_real_reads_a_real_xenium_panel(small_real, shared_data, one_torch_thread):
    """The real Xenium crop (Jurkat and Raji cells): drawn in lineage colours of its own panel, nuclei on the DAPI."""
    sdata = st2he.io.read_xenium(
        shared_data / "xenium_cellline_crop", image_pixel_size=400 / 237, image_origin=(1000, 1000)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
        st2he.pp.rasterize_transcripts(sdata, pixel_size=0.5)  # the default palette: redrawn for the model
        st2he.tl.virtual_he(sdata, model="small-real", progress=False)
    drawn = st2he._elements.get_params(sdata, "virtual_he_input")
    assert drawn["palette_method"] == "lineage"
    picture, he = Raster(sdata.images["virtual_he_input"]), Raster(sdata.images["virtual_he"])
    assert he.level0.shape == picture.level0.shape and np.allclose(he.bounds, picture.bounds)
    out = _rgb(sdata, "virtual_he")
    dapi = _rgb(sdata, "virtual_he_input").max(axis=-1)  # grey nuclear stain under the dots
    nuclei = dapi > np.percentile(dapi, 75)
    gaps = dapi < np.percentile(dapi, 25)
    luminance = out.mean(axis=-1)
    assert luminance[nuclei].mean() < luminance[gaps].mean() - 100  # measured: 185 darker
    assert (out[nuclei, 2] - out[nuclei, 1]).mean() > 25  # measured: 38


def test_small_real_reads_a_panel_the_default_refuses(small_real, shared_data, one_torch_thread):
    """The CosMx mouse-brain crop shares no gene with the default's palette; "small-real" reads its lineage colours.

    The crop has no image and few molecules (4,188 over 490 x 510 µm): the slide is mostly bare glass, and the
    generator must leave it so rather than invent tissue.
    """
    sdata = st2he.io.read_cosmx(shared_data / "cosmx_mouse_brain_quarter", pixel_size=0.12028)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
        st2he.pp.rasterize_transcripts(sdata, pixel_size=0.5)
        with pytest.raises(ValueError, match="share no gene with the palette"):
            st2he.tl.virtual_he(sdata, progress=False)
        assert "virtual_he" not in sdata.images
        st2he.tl.virtual_he(sdata, model=small_real, progress=False)
    assert st2he._elements.get_params(sdata, "virtual_he_input")["palette_method"] == "lineage"
    out = _rgb(sdata, "virtual_he")
    glass = (out.min(axis=-1) > 220).mean()
    assert glass > 0.9, glass


def test_fine_tuning_small_real_keeps_the_lineage_palette_and_warns_on_other_colours(one_torch_thread):
    """``train_generator(model="small-real")`` fine-tunes the shipped weights; other colours than it learnt warn."""
    lineage = st2he.datasets.synthetic_tissue(3, size_um=96)
    other = st2he.datasets.synthetic_tissue(3, size_um=96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
        st2he.pp.rasterize_transcripts(lineage, palette="lineage")
        st2he.pp.rasterize_transcripts(other, palette="coexpression")
    options = {"tile_size": 64, "steps": 1, "batch_size": 1, "val_every": 0, "ckpt_every": 0, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", category=st2he.pp.MoleculesDroppedWarning)
        tuned, _ = st2he.tl.train_generator(lineage, model="small-real", validation=None, **options)
    assert tuned.metadata["palette_method"] == "lineage"
    import torch

    shipped = load_model("small-real")
    moved = [
        name
        for (name, a), (_, b) in zip(tuned.named_parameters(), shipped.named_parameters(), strict=True)
        if not torch.equal(a.detach().cpu().float(), b.detach().cpu().float())
    ]
    assert moved  # one step moved the shipped weights ...
    assert len(moved) < len(list(shipped.parameters()))  # ... through what fine-tuning trains, not a new model
    with pytest.warns(UserWarning, match=r"learnt the lineage palette, but the training pictures were drawn with"):
        st2he.tl.train_generator(other, model="small-real", validation=None, **options)
    with pytest.warns(UserWarning, match=r"learnt a fixed gene palette, but .* palette='lineage'"):
        st2he.tl.train_generator(lineage, model=load_model("small"), validation=None, **options)
    # a fixed palette: its own colours train quietly, other colours for the genes it knows warn
    small = load_model("small")
    own = st2he.datasets.synthetic_tissue(3, size_um=96)
    hue = st2he.datasets.synthetic_tissue(3, size_um=96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
        st2he.pp.rasterize_transcripts(own, palette=small.metadata["palette"])
        st2he.pp.rasterize_transcripts(hue, palette="hue")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", category=st2he.pp.MoleculesDroppedWarning)
        st2he.tl.train_generator(own, model=small, validation=None, **options)
    with pytest.warns(UserWarning, match=r"colour \d+ of the 88 genes they share otherwise than the palette"):
        st2he.tl.train_generator(hue, model=load_model("small"), validation=None, **options)
