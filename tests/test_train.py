"""Training the generator: the tensor-only core and st2he.tl.train_generator (tiny models, CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

import st2he
from st2he.models import Pix2PixTurbo, from_pretrained
from st2he.models._training import PairSampler, train
from st2he.tl._train import grid_tiles, prepare_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


def _pairs(n, size, seed):
    """Smooth random pictures and a fixed colour mapping of them (a task a tiny model learns in a few steps)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(n):
        x = ndimage.gaussian_filter(rng.random((3, size, size)), sigma=(0, 2, 2))
        x = ((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
        y = (255 - x)[[2, 0, 1]]
        xs.append(x)
        ys.append(y)
    return xs, ys


CFG = {
    "batch_size": 4,
    "crop_size": 32,
    "lr": 3e-3,
    "warmup_steps": 0,
    "perceptual": "ssim",
    "perceptual_weight": 0.2,
    "gan_weight": 0.02,
    "log_every": 5,
    "channels_last": False,
}


def test_validation_loss_falls():
    tx, ty = _pairs(4, 48, 0)
    vx, vy = _pairs(4, 32, 1)
    model = Pix2PixTurbo.from_config("tiny", seed=0)
    model, history = train(
        model,
        tx,
        ty,
        np.stack(vx),
        np.stack(vy),
        config={**CFG, "steps": 40, "val_every": 20, "lr": 1e-3, "gan_weight": 0.0},
        progress=False,
    )
    vals = [h for h in history if "val_l2" in h]
    assert [h["step"] for h in vals] == [0, 20, 40]
    assert vals[-1]["val_l2"] < 0.8 * vals[0]["val_l2"]
    assert vals[-1]["val_psnr"] > vals[0]["val_psnr"]
    assert any("ssim" in h for h in history)
    assert not model.training


def test_resume_gives_the_uninterrupted_result(tmp_path):
    tx, ty = _pairs(3, 40, 2)
    vx, vy = _pairs(2, 32, 3)
    cfg = {**CFG, "steps": 6, "val_every": 3, "ckpt_every": 3, "stochastic_prob": 0.5}
    full, _ = train(
        Pix2PixTurbo.from_config("tiny", seed=0), tx, ty, np.stack(vx), np.stack(vy), config=cfg, progress=False
    )
    # a run stopped after 3 steps, then resumed into a freshly built (differently initialised) model
    train(
        Pix2PixTurbo.from_config("tiny", seed=0),
        tx,
        ty,
        np.stack(vx),
        np.stack(vy),
        config={**cfg, "steps": 3},
        output_dir=tmp_path,
        progress=False,
    )
    assert (tmp_path / "checkpoint-3" / "training_state.pt").is_file()
    resumed, history = train(
        Pix2PixTurbo.from_config("tiny", seed=9),
        tx,
        ty,
        np.stack(vx),
        np.stack(vy),
        config=cfg,
        output_dir=tmp_path,
        resume="latest",
        progress=False,
    )
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert history[-1]["step"] == 6 and any("critic" in h for h in history)
    with pytest.raises(FileNotFoundError, match="training checkpoint"):
        train(full, tx, ty, config=cfg, resume=tmp_path / "nope", progress=False)


def test_losses_are_computed_outside_autocast(monkeypatch):
    """Under bf16 autocast SSIM's variances cancel catastrophically: the GPU recipe did not learn (or gave NaN)."""
    import st2he.models._training as training

    seen = []

    def recording_ssim(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return ssim(*args, **kwargs)

    ssim = training.ssim
    monkeypatch.setattr(training, "ssim", recording_ssim)
    tx, ty = _pairs(2, 40, 4)
    cfg = {**CFG, "steps": 2, "val_every": 0, "gan_start": 0, "mixed_precision": "bf16"}
    _, history = train(Pix2PixTurbo.from_config("tiny", seed=0), tx, ty, config=cfg, progress=False)
    assert seen == [False, False]
    assert all(np.isfinite(h["loss"]) for h in history if "loss" in h)
    assert any("critic" in h for h in history)


def test_sampler_keeps_pairs_aligned():
    x = np.arange(3 * 20 * 20, dtype=np.int64).reshape(3, 20, 20) % 251
    x = x.astype(np.uint8)
    s = PairSampler([x], [x.copy()], 8)
    a, b = s.sample(16, torch.Generator().manual_seed(0))
    assert a.shape == (16, 3, 8, 8) and torch.equal(a, b)
    with pytest.raises(ValueError, match="smaller than the crop"):
        PairSampler([x], [x], 32)
    with pytest.raises(ValueError, match="not the same size"):
        PairSampler([x], [x[:, :10]], 8)


def test_resample_to_grid():
    from st2he._elements import parse_image
    from st2he._grid import Grid
    from st2he._raster import Raster

    img = np.arange(2 * 6 * 8, dtype=np.float32).reshape(2, 6, 8)
    src = Raster(parse_image(img, Grid(0.0, 0.0, 1.0, 6, 8), c_coords=("a", "b"), scale_factors=None))
    # whole-pixel offset: a copy, zero outside
    out = src.read(Grid(2.0, 1.0, 1.0, 6, 8))
    assert np.array_equal(out[:, :5, :6], img[:, 1:, 2:]) and (out[:, 5:] == 0).all()
    # half-size pixels: bilinear at the new centres
    fine = src.read(Grid(0.0, 0.0, 0.5, 12, 16))
    assert fine.shape == (2, 12, 16)
    assert np.isclose(fine[0, 1:-1, 1:-1].mean(), img[0, :, :].mean(), atol=1.0)


def test_train_generator_on_simulated_data(tmp_path):
    sdata = st2he.datasets.synthetic_tissue(1, size_um=80)
    st2he.pp.rasterize_transcripts(sdata)
    data = prepare_pairs(sdata, validation=0.4, tile_size=32)
    width = data["train_inputs"][0].shape[2]
    assert width <= int(round(160 * 0.6)) - 16  # the held-out band and a half-tile gap are not trained on
    assert data["val_inputs"].shape[1:] == (3, 32, 32) and data["palette"]
    model, history = st2he.tl.train_generator(
        sdata,
        model="tiny",
        validation=0.4,
        tile_size=32,
        steps=4,
        batch_size=2,
        val_every=2,
        ckpt_every=2,
        output_dir=tmp_path,
        progress=False,
        channels_last=False,
    )
    assert {"val_psnr", "val_ssim", "l2"} <= set(history.columns)
    assert model.metadata["tile_size"] == 32 and model.metadata["palette"] == data["palette"]
    loaded = from_pretrained(tmp_path / "model")
    assert loaded.metadata["pixel_size"] == pytest.approx(0.5)
    st2he.tl.virtual_he(sdata, model=loaded, progress=False)
    assert "virtual_he" in sdata.images
    # the saved weights are the trained ones: the reloaded model predicts what the trained model predicts
    val = np.asarray(data["val_inputs"][:2])
    np.testing.assert_array_equal(loaded.predict(val), model.predict(val))
    # and the virtual H&E is that model's output: its top-left corner, inside the first tile only, by hand
    from st2he._grid import _scale0

    picture = np.asarray(_scale0(sdata.images["st2he_input"]).values)
    out = np.asarray(_scale0(sdata.images["virtual_he"]).values)
    corner = loaded.predict(picture[None, :, :32, :32])[0]
    assert np.abs(out[:, :4, :4].astype(int) - corner[:, :4, :4]).max() <= 1
    with pytest.raises(ValueError, match="multiple of 8"):
        st2he.tl.train_generator(sdata, model="tiny", tile_size=30, steps=1)
    # a new run into that folder is refused; overwrite=True replaces the earlier run
    again = {"model": "tiny", "validation": 0.4, "tile_size": 32, "batch_size": 2, "output_dir": tmp_path}
    with pytest.raises(FileExistsError, match=r"already holds a training run \(the finished model model/ and"):
        st2he.tl.train_generator(sdata, steps=1, progress=False, **again)
    st2he.tl.train_generator(sdata, steps=1, val_every=0, progress=False, overwrite=True, channels_last=False, **again)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "model"]
    assert from_pretrained(tmp_path / "model").metadata["training"]["steps"] == 1


def test_grid_tiles():
    img = np.zeros((3, 70, 50), np.uint8)
    tiles, pos = grid_tiles(img, 32)
    assert tiles.shape[1:] == (3, 32, 32) and pos[-1] == (70 - 32, 50 - 32)
