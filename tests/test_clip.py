"""st2he.models.load_clip: every way of naming a pathology CLIP model, offline, with tiny models made here."""

from __future__ import annotations

import json
import sys
import time
import types

import numpy as np
import pytest
import torch

from st2he.models import ClipModel, load_clip

ARCH = "st2he-tiny-clip-vit"
TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny open_clip ViT registered with open_clip.add_model_config, its checkpoint and the model itself."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    (folder / f"{ARCH}.json").write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(folder / f"{ARCH}.json")
    torch.manual_seed(1)
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH)
    model.eval()
    torch.save(model.state_dict(), folder / "tiny.pt")
    return types.SimpleNamespace(folder=folder, ckpt=folder / "tiny.pt", model=model, preprocess=preprocess)


def _batch():
    return np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)


def test_architecture_and_checkpoint_pair(tiny):
    clip = load_clip((ARCH, tiny.ckpt), mpp=1.0)
    assert isinstance(clip, ClipModel) and clip.backend == "open_clip"
    assert clip.image_size == 32 and clip.mpp == 1.0 and clip.tile_size_um == 32.0
    assert clip.logit_scale == pytest.approx(float(tiny.model.logit_scale.detach().exp()))
    with torch.no_grad():
        x = clip.preprocess(_batch())
        want = torch.nn.functional.normalize(tiny.model.encode_image(x), dim=-1)
    np.testing.assert_allclose(clip.encode_image(_batch()).numpy(), want.numpy(), atol=1e-5)
    assert load_clip(clip, mpp=0.5) is clip and clip.mpp == 0.5


def test_model_in_memory_with_tokenizer_and_preprocess(tiny):
    import open_clip

    clip = load_clip(tiny.model, tokenizer=open_clip.get_tokenizer(ARCH), preprocess=tiny.preprocess)
    ref = load_clip((ARCH, tiny.ckpt))
    assert clip.image_size == 32 and clip.mean == ref.mean
    np.testing.assert_allclose(clip.encode_text(["stroma."]).numpy(), ref.encode_text(["stroma."]).numpy(), atol=1e-5)
    # open_clip's default BPE tokenizer is used when none is given
    assert load_clip(tiny.model).encode_text(["a", "b"]).shape == (2, 16)


def test_hub_id_from_the_local_cache_only(tiny, tmp_path, monkeypatch):
    # lay out a Hugging Face cache entry by hand, as `hf download` leaves it
    repo = tmp_path / "hub" / "models--st2he--tiny-clip"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    cfg = {"model_cfg": TINY_VIT, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (snap / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.save(tiny.model.state_dict(), snap / "open_clip_pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip = load_clip("hf-hub:st2he/tiny-clip", cache_dir=tmp_path / "hub")
    assert clip.mean == (0.5, 0.5, 0.5) and clip.std == (0.25, 0.25, 0.25) and clip.image_size == 32
    np.testing.assert_allclose(
        clip.encode_text(["tumor"]).numpy(), load_clip(tiny.model).encode_text(["tumor"]).numpy(), atol=1e-5
    )
    # a model that is not in the cache fails at once, saying what to provide
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache") as err:
        load_clip("hf-hub:wisdomik/QuiltNet-B-32", cache_dir=tmp_path / "hub")
    assert time.perf_counter() - start < 5
    assert "hf download wisdomik/QuiltNet-B-32" in str(err.value) and "(architecture, checkpoint_path)" in str(
        err.value
    )
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load_clip("hf-hub:wisdomik/QuiltNet-B-32", cache_dir=tmp_path / "hub", local_files_only=True)


def test_transformers_clip_folder(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    # a character-level vocabulary is enough for a CLIP tokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz&.,'-":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    plip = tmp_path / "plip"
    model.save_pretrained(plip)
    tokenizer.save_pretrained(plip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(plip)
    clip = load_clip(plip)
    assert clip.backend == "transformers" and clip.image_size == 32
    emb = clip.encode_image(_batch())
    assert emb.shape == (3, 16)
    np.testing.assert_allclose(emb.norm(dim=1).numpy(), 1.0, atol=1e-5)
    with torch.no_grad():
        out = model(pixel_values=clip.preprocess(_batch()), input_ids=torch.tensor([[0, 1]]))
    np.testing.assert_allclose(emb.numpy(), torch.nn.functional.normalize(out.image_embeds, dim=-1).numpy(), atol=1e-5)
    assert clip.encode_text(["an h&e image of tumor.", "stroma"]).shape == (2, 16)
    # the loaded transformers model works too, with its tokenizer
    assert load_clip(model, tokenizer=tokenizer, image_size=32).encode_text(["x"]).shape == (1, 16)
    # a vision-only checkpoint has no text tower
    vision_only = tmp_path / "vision"
    vision_only.mkdir()
    (vision_only / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match="no text tower"):
        load_clip(vision_only)


def test_conch_goes_through_the_conch_package(tiny, monkeypatch, tmp_path):
    # the CONCH package is not installed here: without it, a clear error; with it, its factory and tokenizer are used
    if "conch" not in sys.modules:
        with pytest.raises(ImportError, match="CONCH package"):
            load_clip("conch", checkpoint=tiny.ckpt)
    with pytest.raises((FileNotFoundError, ImportError), match="checkpoint|CONCH"):
        load_clip("conch", cache_dir=tmp_path)
    import open_clip

    calls = {}

    def create_model_from_pretrained(name, checkpoint_path, device="cpu"):
        calls["create"] = (name, checkpoint_path)
        model = tiny.model

        class Conch(torch.nn.Module):  # CONCH's encode_image takes proj_contrast and normalize
            def __init__(self):
                super().__init__()
                self.inner = model
                self.logit_scale = model.logit_scale

            def encode_image(self, x, proj_contrast=True, normalize=True):
                calls["proj_contrast"] = proj_contrast
                return self.inner.encode_image(x)

            def encode_text(self, tokens):
                return self.inner.encode_text(tokens)

        return Conch(), tiny.preprocess

    package = types.ModuleType("conch")
    custom = types.ModuleType("conch.open_clip_custom")
    custom.create_model_from_pretrained = create_model_from_pretrained
    custom.get_tokenizer = lambda: open_clip.get_tokenizer(ARCH)
    custom.tokenize = lambda texts, tokenizer: tokenizer(texts)
    package.open_clip_custom = custom
    monkeypatch.setitem(sys.modules, "conch", package)
    monkeypatch.setitem(sys.modules, "conch.open_clip_custom", custom)
    clip = load_clip("conch", checkpoint=tiny.ckpt)
    assert calls["create"] == ("conch_ViT-B-16", str(tiny.ckpt))
    assert clip.backend == "conch" and clip.image_size == 32 and clip.mpp == 0.5
    assert clip.encode_image(_batch()).shape == (3, 16) and calls["proj_contrast"] is True
    assert clip.encode_text(["tumor"]).shape == (1, 16)
    assert load_clip(("conch", tiny.ckpt)).backend == "conch"


def test_bad_models(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip((ARCH, tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="add_model_config"):
        load_clip(("no-such-architecture", tiny.ckpt))
    with pytest.raises(ValueError, match="architecture"):
        load_clip(str(tiny.ckpt))  # a bare file: which architecture?
    with pytest.raises(FileNotFoundError, match="no local folder"):
        load_clip("./not/here/at/all")
    with pytest.raises(ValueError, match="no text tower"):
        load_clip(tiny.model.visual)

    class ImageOnly(torch.nn.Module):
        def encode_image(self, x):
            return x.mean((2, 3))

    with pytest.raises(ValueError, match="no text tower"):
        load_clip(ImageOnly())
    with pytest.raises(ValueError, match="pair"):
        load_clip((ARCH, tiny.ckpt, "extra"))
    # weights that do not fit the architecture
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_clip((ARCH, tmp_path / "wrong.pt"))


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Every connection attempt is recorded and refused; the Hugging Face cache is an empty folder; no offline flags."""
    import socket

    import huggingface_hub.constants

    touched = []

    def refuse(*args, **kwargs):
        touched.append(args[1:] or args)
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "ST2HE_ALLOW_DOWNLOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return types.SimpleNamespace(touched=touched, cache=tmp_path / "hf_home" / "hub")


def test_hub_id_is_not_downloaded_by_default(no_network):
    """load_clip went online by default and hung for minutes where the network did not answer."""
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache") as err:
        load_clip("hf-hub:wisdomik/QuiltNet-B-32", cache_dir=no_network.cache)
    assert time.perf_counter() - start < 5
    assert no_network.touched == []
    text = str(err.value)
    assert "load_clip(('ViT-B-32', '/path/to/open_clip_pytorch_model.bin'))" in text
    assert "open_clip_config.json" in text and "local_files_only=False" in text
    assert "does not download unless asked" in text


def test_downloads_only_when_allowed_and_with_timeouts(no_network, monkeypatch):
    import huggingface_hub

    calls = []

    def repo_info(self, repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("timeout")))
        raise TimeoutError("no answer")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    with pytest.raises(FileNotFoundError, match=r"Could not download 'hf-hub:org/clip' \(TimeoutError"):
        load_clip("hf-hub:org/clip", cache_dir=no_network.cache, local_files_only=False)
    monkeypatch.setenv("ST2HE_ALLOW_DOWNLOAD", "1")
    with pytest.raises(FileNotFoundError, match="Could not download"):
        load_clip("hf-hub:org/clip", cache_dir=no_network.cache)
    assert calls == [("org/clip", 10.0), ("org/clip", 10.0)]  # HF_HUB_ETAG_TIMEOUT, never None (wait forever)
    # HF_HUB_OFFLINE forbids downloads whatever the call says
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        load_clip("hf-hub:org/clip", cache_dir=no_network.cache, local_files_only=False)
    assert len(calls) == 2


def test_an_architecture_with_a_hub_tokenizer_loads_offline(tiny, no_network):
    """open_clip fetched the Hub tokenizer an architecture names: 19 connection attempts over ~50 s, retried."""
    import open_clip

    arch = "st2he-tiny-clip-hub-tokenizer"
    cfg = {**TINY_VIT, "text_cfg": {**TINY_VIT["text_cfg"], "hf_tokenizer_name": "org/some-tokenizer"}}
    (tiny.folder / f"{arch}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tiny.folder / f"{arch}.json")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"needs files from the Hugging Face Hub \(org/some-tokenizer\)"):
        load_clip((arch, tiny.ckpt))
    assert time.perf_counter() - start < 5
    assert no_network.touched == []
