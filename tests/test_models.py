"""st2he.models: the pix2pix-turbo generator, its config family and checkpoint formats (tiny models, CPU)."""

from __future__ import annotations

import pickle
import re
import warnings

import numpy as np
import pytest
import torch

import st2he.models as M
from st2he.models._io import canonical_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tiny():
    return M.Pix2PixTurbo.from_config("tiny", seed=0).set_eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny SD-shaped base model written in diffusers format."""
    return M.save_base(tmp_path_factory.mktemp("base") / "tiny-sd", "tiny", seed=0)


def _perturb(model, seed=1):
    """Give the trainable parts (LoRA B, skip convolutions, conv_in) non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "skip_conv" in name or name.startswith("unet.conv_in"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model._prompt_cache.clear()
    return model


def _x(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_shapes_and_ranges(tiny):
    x = _x()
    with torch.no_grad():
        y = tiny(x)
    assert y.shape == x.shape
    assert y.min() >= -1 and y.max() <= 1
    tiles = np.random.default_rng(0).integers(0, 256, (3, 3, 40, 48), dtype=np.uint8)
    out = tiny.predict(tiles, batch_size=2)
    assert out.shape == tiles.shape and out.dtype == np.uint8
    # the values: predict is the forward pass on tiles scaled to [-1, 1], mapped back to 0-255 and rounded
    with torch.no_grad():
        y = tiny(torch.from_numpy(tiles).float() / 127.5 - 1.0)
    want = ((y.double() + 1.0) * 127.5).round().clamp(0, 255).numpy()
    assert np.abs(out - want).max() <= 1 and (out == want).mean() > 0.99
    assert tiny.downscale == 8
    # the architecture is SD-shaped: skip convs from every encoder block into the decoder, LoRA where pix2pix-turbo has it
    assert all(hasattr(tiny.vae.decoder, f"skip_conv_{i}") for i in (1, 2, 3, 4))
    names = [n for n, _ in tiny.named_parameters()]
    assert any(re.search(r"unet\..*attn1\.to_q\.lora_A\.default", n) for n in names)
    assert any("vae.decoder.skip_conv_1.lora_A.vae_skip" in n for n in names)


def test_determinism_and_stochastic_mode(tiny):
    x = _x()
    with torch.no_grad():
        a = tiny(x)
        b = tiny(x)
        assert torch.equal(a, b)
        # r = 1 is the deterministic mode
        assert torch.allclose(tiny(x, r=1.0), a)
        n1 = torch.randn(tiny.latent_shape(32, 32, 2), generator=torch.Generator().manual_seed(3))
        s1 = tiny(x, r=0.5, noise=n1)
        s2 = tiny(x, r=0.5, noise=n1.clone())
        s3 = tiny(x, r=0.5, noise=torch.randn(n1.shape, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)
    # seeds per tile make predict reproducible whatever the batching
    tiles = np.random.default_rng(1).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    p1 = tiny.predict(tiles, batch_size=1, r=0.5, seeds=[7, 8, 9])
    p3 = tiny.predict(tiles, batch_size=3, r=0.5, seeds=[7, 8, 9])
    assert np.array_equal(p1, p3)
    # same seed, same model
    other = M.Pix2PixTurbo.from_config("tiny", seed=0).set_eval()
    again = M.Pix2PixTurbo.from_config("tiny", seed=0).set_eval()
    with torch.no_grad():
        assert torch.equal(other(x), again(x))
        assert torch.allclose(other(x), a, atol=1e-5)  # ``tiny`` now runs channels-last: rounding differs


def test_clear_errors(tiny):
    with pytest.raises(ValueError, match="3-channel"):
        tiny(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="Unknown model config"):
        M.get_config("huge")


def test_tokenizer_is_deterministic():
    tok = M.HashingWordTokenizer(4096, 16)
    a = tok("This is a lung H&E image").input_ids
    b = tok(["This is a lung H&E image"]).input_ids
    assert torch.equal(a, b) and a.shape == (1, 16)
    assert a[0, 0] == tok.bos_token_id
    assert not torch.equal(a, tok("This is a breast H&E image").input_ids)
    assert M.default_prompt("lung") == "This is a lung H&E image"
    assert M.default_prompt(None) == "dapi2he"


def test_diffusers_base_round_trip(base):
    """A tiny SD-shaped model saved in diffusers format loads back through from_pretrained."""
    model = M.from_pretrained(base)
    fresh = M.Pix2PixTurbo(*M._pix2pix.build_components("tiny", seed=0), "tiny").set_eval()
    for part in ("vae", "unet", "text_encoder"):
        ours = {k: v for k, v in getattr(model, part).state_dict().items() if "lora" not in k and "skip" not in k}
        ref = {k: v for k, v in getattr(fresh, part).state_dict().items() if "lora" not in k and "skip" not in k}
        assert ours.keys() == ref.keys()
        assert all(torch.equal(ours[k], ref[k]) for k in ours)
    with torch.no_grad():
        assert torch.allclose(model(_x()), fresh(_x()))
    assert model.metadata["base"] == str(base)


def test_published_checkpoint_round_trip(base, tmp_path):
    model = _perturb(M.from_pretrained(base))
    with torch.no_grad():
        expected = model(_x())
    path = M.save_published(model, tmp_path / "CondGen.pkl")
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"rank_unet", "rank_vae", "unet_lora_target_modules", "vae_lora_target_modules"}
    assert any("skip_conv" in k for k in raw["state_dict_vae"]) and "conv_in.weight" in raw["state_dict_unet"]
    loaded = M.from_pretrained(base, path)
    with torch.no_grad():
        assert torch.equal(loaded(_x()), expected)


def test_published_keys_of_older_releases(base, tmp_path):
    """Keys without adapter names or base_layer (older peft) load by module path and LoRA role; others are reported."""
    model = _perturb(M.from_pretrained(base), seed=2)
    with torch.no_grad():
        expected = model(_x())
    path = M.save_published(model, tmp_path / "new.pkl")
    sd = torch.load(path, weights_only=True)
    sd["state_dict_unet"] = {re.sub(r"\.default\.", ".", k): v for k, v in sd["state_dict_unet"].items()}
    sd["state_dict_vae"] = {
        k.replace(".base_layer", "").replace(".vae_skip.", "."): v for k, v in sd["state_dict_vae"].items()
    }
    sd["state_dict_vae"]["decoder.not_a_module.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "old.pkl")
    with pytest.warns(UserWarning, match="decoder.not_a_module.weight"):
        loaded = M.from_pretrained(base, tmp_path / "old.pkl")
    with torch.no_grad():
        assert torch.equal(loaded(_x()), expected)
    assert canonical_key("a.to_q.lora_A.default.weight") == canonical_key("a.to_q.lora_A.weight")
    assert canonical_key("a.conv1.base_layer.weight") == "a.conv1.weight"


def test_st2he_format_round_trips(base, tmp_path):
    # full weights (models trained from scratch)
    tiny = M.Pix2PixTurbo.from_config("tiny", seed=5).set_eval()
    M.save_pretrained(tiny, tmp_path / "full")
    again = M.from_pretrained(tmp_path / "full")
    with torch.no_grad():
        assert torch.equal(again(_x()), tiny(_x()))
    # only what fine-tuning changes (models with a base), loaded with or without naming the base
    tuned = _perturb(M.from_pretrained(base), seed=3)
    tuned.metadata.update({"palette": {"EPCAM": "#ff0000"}, "pixel_size": 0.5, "tile_size": 64})
    M.save_pretrained(tuned, tmp_path / "delta")
    with torch.no_grad():
        expected = tuned(_x())
        assert torch.equal(M.from_pretrained(base, tmp_path / "delta")(_x()), expected)
        loaded = M.from_pretrained(tmp_path / "delta")
        assert torch.equal(loaded(_x()), expected)
    assert loaded.metadata["palette"] == {"EPCAM": "#ff0000"} and loaded.metadata["tile_size"] == 64
    # a model without LoRA adapters round-trips too
    plain = M.Pix2PixTurbo.from_config("tiny", lora=False).set_eval()
    M.save_pretrained(plain, tmp_path / "plain")
    assert not M.from_pretrained(tmp_path / "plain").has_lora


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_loading_fails_clearly(base, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="CondGen.pkl"):
        M.from_pretrained(base, tmp_path / "missing.pkl")
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(b"\x80\x04 not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        M.from_pretrained(base, corrupt)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"rank_unet": _Evil()}))
    with pytest.raises(ValueError, match="never executes code"):
        M.from_pretrained(base, evil)
    wrong = tmp_path / "wrong.pkl"
    torch.save({"state_dict": {}}, wrong)
    with pytest.raises(ValueError, match="not a pix2pix-turbo checkpoint"):
        M.from_pretrained(base, wrong)
    # a hub id that is not in the (empty) local cache fails at once, without touching the network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("ST2HE_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        M.from_pretrained("stabilityai/sd-turbo")
    with pytest.raises(FileNotFoundError, match="diffusers-format"):
        M.from_pretrained(tmp_path / "no" / "such" / "folder")
    st2he_dir = tmp_path / "ckpt"
    M.save_pretrained(M.Pix2PixTurbo.from_config("tiny", lora=False), st2he_dir)
    (st2he_dir / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        M.from_pretrained(st2he_dir)


def test_lora_merge_matches_unmerged(base):
    model = _perturb(M.from_pretrained(base), seed=4)
    tiles = np.random.default_rng(2).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    a = model.predict(tiles, merge_lora=False)
    b = model.predict(tiles, merge_lora=True)
    assert model.lora_merged
    assert np.abs(a.astype(int) - b).max() <= 1
    model.set_train("lora")
    assert not model.lora_merged
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n or "skip_conv" in n or n.startswith("unet.conv_in") for n in trainable)


def test_shipped_model_loads():
    """The small model shipped in the package loads (and is within the size limit)."""
    from st2he.models._io import SHIPPED

    folder = SHIPPED["small"]
    if not (folder / "model.safetensors").is_file():
        pytest.skip("shipped weights not present")
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 25e6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = M.load_model()
    assert model.metadata["palette"] and model.metadata["tile_size"] == 256
    out = model.predict(np.zeros((1, 3, 64, 64), dtype=np.uint8))
    assert out.shape == (1, 3, 64, 64)


def test_misspelt_shipped_name_says_which_names_exist(tmp_path, monkeypatch):
    """A name that is neither a folder, a hub id nor a shipped generator names the shipped ones and the closest."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'smal-real' not found.*'small', 'small-real'.*mean .*'small-real'"):
        M.load_model("smal-real")
    with pytest.raises(FileNotFoundError, match=r"shipped generators are named 'small', 'small-real'\.$"):
        M.load_model("no_such_model")


def _edit_config(folder, edit):
    import json

    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_config_that_is_not_json_is_reported_as_such(tmp_path):
    folder = M.save_pretrained(M.Pix2PixTurbo.from_config("tiny", lora=False), tmp_path / "ckpt")
    (folder / "config.json").write_text('{"format": "st2he-pix2pix-turbo",\n "weights": }\n')
    for path in (folder, folder / "config.json", folder / "model.safetensors"):
        with pytest.raises(ValueError, match=r"config\.json is not valid JSON: .* at line 2, column 13") as info:
            M.from_pretrained(path)
        assert str(folder / "config.json") in str(info.value)
    # a stray config.json beside a published checkpoint is no st2he checkpoint and no error
    from st2he.models._io import is_st2he_checkpoint

    (folder / "CondGen.pkl").write_bytes(b"")
    assert not is_st2he_checkpoint(folder / "CondGen.pkl")


def test_huge_dimension_in_config_fails_before_allocating(tmp_path):
    """config.json and model.safetensors are checked against each other on the meta device, before any allocation."""
    import resource
    import time

    folder = M.save_pretrained(M.Pix2PixTurbo.from_config("tiny", lora=False), tmp_path / "ckpt")
    _edit_config(folder, lambda c: c["architecture"]["text_encoder"].update(vocab_size=10**8))  # 6.4 GB of float32
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="does not fit the architecture") as info:
        M.from_pretrained(folder)
    seconds = time.perf_counter() - t0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    msg = str(info.value)
    assert "model.text_encoder.embeddings.token_embedding.weight: (1024, 16) in the file, (100000000, 16)" in msg
    assert seconds < 10 and grown_mb < 300, (seconds, grown_mb)
    # a LoRA rank that does not match the stored adapters fails before the adapters are built
    tuned = M.Pix2PixTurbo.from_config("tiny", seed=1)
    tuned.metadata["base"] = "some/base"
    M.save_pretrained(tuned, tmp_path / "delta", weights="delta")
    _edit_config(tmp_path / "delta", lambda c: c["architecture"]["lora"].update(rank_unet=10**7))
    with pytest.raises(ValueError, match=r"LoRA rank rank_unet=10000000 .* \(rank \[8\]\)"):
        M.from_pretrained(tmp_path / "delta")
    path = M.save_published(tuned, tmp_path / "CondGen.pkl")
    sd = torch.load(path, weights_only=True)
    sd["rank_vae"] = 10**6
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"LoRA rank rank_vae=1000000 .* \(rank \[4\]\)"):
        M.read_published(path)


def test_format_version_is_checked(tmp_path):
    from st2he.models._io import FORMAT_VERSION

    model = M.Pix2PixTurbo.from_config("tiny", lora=False).set_eval()
    folder = M.save_pretrained(model, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(M.from_pretrained(folder)(_x()), model(_x()))  # the current version loads
    _edit_config(folder, lambda c: c.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1} by a newer st2he.*Upgrade st2he"):
        M.from_pretrained(folder)
    for odd in ("1", None, 0, 1.5):
        _edit_config(folder, lambda c, v=odd: c.update(format_version=v))
        with pytest.raises(ValueError, match="unknown format_version"):
            M.from_pretrained(folder)


def test_unpickling_errors_never_advise_unsafe_loading(base, tmp_path):
    import traceback

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"rank_unet": _Evil()}))
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(b"\x80\x04 not a checkpoint")
    with_numpy = tmp_path / "numpy.pkl"
    torch.save({"rank_unet": np.zeros(3)}, with_numpy)
    for path in (evil, corrupt, with_numpy):
        with pytest.raises(ValueError) as info:
            M.from_pretrained(base, path)
        shown = "".join(traceback.format_exception(info.value))
        assert "weights_only" not in shown and "Weights only load failed" not in shown
        assert "objects other than tensors" in str(info.value) and "trusted environment" in str(info.value)
        assert "safetensors" in str(info.value)
    with pytest.raises(ValueError, match="numpy"):  # the offending object is named when torch names it
        M.read_published(with_numpy)


def test_base_downloads_only_when_allowed_and_always_with_timeouts(monkeypatch, tmp_path):
    """resolve_base: offline by default and under HF_HUB_OFFLINE; an allowed download goes through the timed path."""
    from st2he.models import _clip, _io

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("ST2HE_ALLOW_DOWNLOAD", raising=False)
    calls = []

    def timed(repo_id, cache_dir, patterns):
        calls.append((repo_id, tuple(patterns)))
        folder = tmp_path / "downloaded"
        folder.mkdir(exist_ok=True)
        return folder

    monkeypatch.setattr(_clip, "_download_hub", timed)
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        _io.resolve_base("stabilityai/sd-turbo")
    assert calls == []
    assert _io.resolve_base("stabilityai/sd-turbo", local_files_only=False) == tmp_path / "downloaded"
    assert calls and calls[0][0] == "stabilityai/sd-turbo" and "unet/*" in calls[0][1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not available in the local Hugging Face cache"):
        _io.resolve_base("stabilityai/sd-turbo", local_files_only=False)
    assert len(calls) == 1


def test_a_saved_model_reloads_to_the_same_outputs_byte_for_byte(tmp_path):
    """Loaded weights live in aligned memory of their own, so the reloaded model computes exactly as the saved one."""
    from st2he.models import Pix2PixTurbo, load_model, save_pretrained

    model = Pix2PixTurbo.from_config("tiny", seed=0).set_eval()
    loaded = load_model(str(save_pretrained(model, tmp_path / "tiny")))
    for p in loaded.parameters():
        assert p.data_ptr() % 16 == 0
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_a_reloaded_model_records_the_folder_it_was_read_from(tmp_path):
    """A model fine-tuned from a loaded one records its own folder when reloaded, not its parent's."""
    parent = M.save_pretrained(M.Pix2PixTurbo.from_config("tiny", seed=0), tmp_path / "parent")
    model = M.from_pretrained(parent)
    assert model.metadata["checkpoint"] == str(parent)
    child = M.save_pretrained(model, tmp_path / "child")  # e.g. after fine-tuning
    import json

    assert "checkpoint" not in json.loads((child / "config.json").read_text())["metadata"]
    assert M.from_pretrained(child).metadata["checkpoint"] == str(child)
    # the shipped generators: each records its own folder
    from st2he.models._io import SHIPPED

    for name, folder in SHIPPED.items():
        assert M.load_model(name).metadata["checkpoint"] == str(folder)


def test_reloaded_expression_and_super_resolution_models_record_their_own_folder(tmp_path):
    import json

    from st2he.models import (
        build_expression_model,
        build_super_resolution_model,
        load_expression_model,
        load_super_resolution_model,
        save_expression_model,
        save_super_resolution_model,
    )

    expression = build_expression_model(["A", "B"], encoder="tiny", seed=0)
    super_resolution = build_super_resolution_model("tiny", genes=["A", "B"])
    cases = (
        (expression, save_expression_model, load_expression_model),
        (super_resolution, save_super_resolution_model, load_super_resolution_model),
    )
    for model, save, load in cases:
        save(model, tmp_path / "parent")
        loaded = load(tmp_path / "parent")
        assert loaded.metadata["checkpoint"] == str(tmp_path / "parent")
        save(loaded, tmp_path / "child")
        assert "checkpoint" not in json.loads((tmp_path / "child" / "config.json").read_text())["metadata"]
        assert load(tmp_path / "child").metadata["checkpoint"] == str(tmp_path / "child")
