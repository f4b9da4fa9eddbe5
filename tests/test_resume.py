"""Resuming training safely: atomic checkpoints, another run's checkpoint refused, damaged ones skipped (tiny, CPU)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import st2he.models._training as training
from st2he.models import Pix2PixTurbo
from st2he.models._training import MANIFEST_NAME, STATE_NAME, save_final, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

CFG = {
    "batch_size": 2,
    "crop_size": 32,
    "lr": 3e-3,
    "perceptual": "ssim",
    "perceptual_weight": 0.2,
    "gan_weight": 0.0,
    "log_every": 1,
    "val_every": 0,
    "ckpt_every": 1,
    "channels_last": False,
}


def _pairs(n, size, seed):
    rng = np.random.default_rng(seed)
    xs = [rng.integers(0, 256, (3, size, size), dtype=np.uint8) for _ in range(n)]
    return xs, [(255 - x)[[2, 0, 1]] for x in xs]


@pytest.fixture(scope="module")
def data():
    return _pairs(2, 40, 0)


@pytest.fixture
def tiny():
    """Builds the tiny model each run starts from (the same weights every time)."""
    return lambda: Pix2PixTurbo.from_config("tiny", seed=0)


def _run(tiny, data, output_dir=None, **kwargs):
    config = {**CFG, **kwargs.pop("config", {})}
    model = tiny if isinstance(tiny, Pix2PixTurbo) else tiny()
    return train(model, *data, config=config, output_dir=output_dir, progress=False, **kwargs)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_crash_while_writing_leaves_no_checkpoint_that_looks_complete(tiny, data, tmp_path, monkeypatch):
    full, _ = _run(tiny, data, config={"steps": 2})
    real_save = torch.save
    calls = []

    def crashing_save(obj, path, *args, **kwargs):
        # the second checkpoint's training state: half of it reaches the disk, then the process dies
        calls.append(path)
        if len(calls) == 2:
            import io

            buf = io.BytesIO()
            real_save(obj, buf)
            with open(path, "wb") as fh:
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise KeyboardInterrupt
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(training.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, data, tmp_path, config={"steps": 2})
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint-2").exists()
    assert (tmp_path / "checkpoint-1" / MANIFEST_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]  # the half-written folder was removed
    # a folder left by a killed process (hidden, named .checkpoint-<step>.tmp-...) is ignored, then removed
    leftover = tmp_path / ".checkpoint-2.tmp-123-0123abcd"
    leftover.mkdir()
    (leftover / STATE_NAME).write_bytes(b"PK")
    resumed, history = _run(tiny, data, tmp_path, config={"steps": 2}, resume="latest")
    assert _same_weights(resumed, full) and history[-1]["step"] == 2
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    # the finished model: written the same way
    save_final(resumed, tmp_path)
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_resume_refuses_the_checkpoint_of_another_run(tiny, data, tmp_path):
    _run(tiny, data, tmp_path, config={"steps": 1})
    with pytest.raises(ValueError, match="other settings or data") as err:
        _run(tiny, data, tmp_path, config={"steps": 2, "batch_size": 3, "lr": 1e-3, "seed": 5}, resume="latest")
    text = str(err.value)
    assert "batch_size: 2 in the checkpoint, 3 now" in text
    assert "lr: 0.003 in the checkpoint, 0.001 now" in text
    assert "seed: 0 in the checkpoint, 5 now" in text
    assert "another output_dir" in text and "steps" in text  # what to do, and what may change
    assert [line.split(":")[0].strip() for line in text.splitlines() if line.startswith("  ")] == [
        "batch_size",
        "lr",
        "seed",
    ]
    # other training images (same shapes)
    other = _pairs(2, 40, 1)
    with pytest.raises(ValueError, match=r"training inputs: 2 arrays \(3x40x40, 3x40x40\), hash \w+ in the checkpoint"):
        _run(tiny, other, tmp_path, config={"steps": 2}, resume="latest")
    # the palette the pictures were drawn with
    painted = tiny()
    painted.metadata["palette"] = {"EPCAM": [255, 0, 0]}
    with pytest.raises(ValueError, match="palette: null in the checkpoint"):
        _run(painted, data, tmp_path, config={"steps": 2}, resume="latest")
    # steps below the checkpoint's step
    with pytest.raises(ValueError, match=r"steps=0 is below the step of the checkpoint .*checkpoint-1 \(1\)"):
        _run(tiny, data, tmp_path, config={"steps": 0}, resume="latest")
    # a cosine schedule is shaped by steps: changing it is another run
    cos = tmp_path / "cosine"
    _run(tiny, data, cos, config={"steps": 1, "lr_schedule": "cosine"})
    with pytest.raises(ValueError, match="steps: 1 in the checkpoint, 2 now"):
        _run(tiny, data, cos, config={"steps": 2, "lr_schedule": "cosine"}, resume="latest")
    # what may change: a longer run, how often it validates, checkpoints and logs
    _, history = _run(
        tiny, data, tmp_path, config={"steps": 2, "val_every": 7, "ckpt_every": 5, "log_every": 2}, resume="latest"
    )
    assert [h["step"] for h in history] == [1, 2]


def test_damaged_checkpoints(tiny, data, tmp_path):
    full, _ = _run(tiny, data, tmp_path, config={"steps": 3})
    state = tmp_path / "checkpoint-3" / STATE_NAME
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    weights = tmp_path / "checkpoint-2" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100:] = bytes(100)  # corrupt, same size
    weights.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="damaged checkpoint") as record:
        resumed, history = _run(tiny, data, tmp_path, config={"steps": 3}, resume="latest")
    messages = [str(w.message) for w in record]
    assert any("checkpoint-3" in m and STATE_NAME in m for m in messages)
    assert any("checkpoint-2" in m and "model.safetensors" in m and "hash" in m for m in messages)
    assert _same_weights(resumed, full) and history[-1]["step"] == 3  # resumed from checkpoint-1
    # rewritten: intact again
    json.loads((tmp_path / "checkpoint-3" / MANIFEST_NAME).read_text())
    # a damaged checkpoint named explicitly is an error
    state = tmp_path / "checkpoint-2" / STATE_NAME
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"checkpoint-2 is damaged: training_state.pt has \d+ bytes instead of"):
        _run(tiny, data, tmp_path, config={"steps": 3}, resume=tmp_path / "checkpoint-2")
    # all damaged: an error saying so
    for p in tmp_path.glob("checkpoint-*"):
        (p / STATE_NAME).write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="Every checkpoint in .* is damaged"):
            _run(tiny, data, tmp_path, config={"steps": 3}, resume="latest")


def test_a_new_run_does_not_overwrite_an_earlier_one(tiny, data, tmp_path):
    first, _ = _run(tiny, data, tmp_path, config={"steps": 2})
    with pytest.raises(FileExistsError, match=r"already holds a training run \(checkpoint-1, checkpoint-2\)"):
        _run(tiny, data, tmp_path, config={"steps": 1})
    done = tmp_path / "done"
    save_final(first, done)
    with pytest.raises(FileExistsError, match="the finished model model/.*resume='latest'.*overwrite=True"):
        _run(tiny, data, done, config={"steps": 1})
    with pytest.raises(ValueError, match="cannot be combined with resume"):
        _run(tiny, data, tmp_path, config={"steps": 1}, resume="latest", overwrite=True)
    # overwrite=True: the earlier run's checkpoints go, so a later resume cannot pick them up
    _run(tiny, data, tmp_path, config={"steps": 1, "seed": 3}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "done"]
    manifest = json.loads((tmp_path / "checkpoint-1" / MANIFEST_NAME).read_text())
    assert manifest["step"] == 1 and manifest["fingerprint"]["seed"] == 3


def test_a_checkpoint_written_before_fingerprints_is_checked_by_its_settings(tiny, data, tmp_path):
    _run(tiny, data, tmp_path, config={"steps": 1})
    (tmp_path / "checkpoint-1" / MANIFEST_NAME).unlink()
    with pytest.warns(UserWarning, match="without a fingerprint"):
        with pytest.raises(ValueError, match="batch_size: 2 in the checkpoint, 4 now"):
            _run(tiny, data, tmp_path, config={"steps": 2, "batch_size": 4}, resume="latest")
    with pytest.warns(UserWarning, match="without a fingerprint"):
        _, history = _run(tiny, data, tmp_path, config={"steps": 2}, resume="latest")
    assert history[-1]["step"] == 2
