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
    # the numbers: open_clip's own tokenizer and towers on the same weights, computed directly
    from PIL import Image

    with torch.no_grad():
        want_text = tiny.model.encode_text(open_clip.get_tokenizer(ARCH)(["a", "b"]))
        rgb = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)  # the model's input size
        want_image = tiny.model.encode_image(torch.stack([tiny.preprocess(Image.fromarray(im)) for im in rgb]))
    np.testing.assert_allclose(
        load_clip(tiny.model).encode_text(["a", "b"]).numpy(),
        torch.nn.functional.normalize(want_text, dim=-1).numpy(),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        clip.encode_image(rgb).numpy(), torch.nn.functional.normalize(want_image, dim=-1).numpy(), atol=1e-5
    )


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
    # the text embeddings are transformers' own text features of the same prompts, padded together
    with torch.no_grad():
        enc = tokenizer(["an h&e image of tumor.", "stroma"], padding=True, return_tensors="pt")
        want = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    want = getattr(want, "pooler_output", want) if not isinstance(want, torch.Tensor) else want
    np.testing.assert_allclose(
        clip.encode_text(["an h&e image of tumor.", "stroma"]).numpy(),
        torch.nn.functional.normalize(want, dim=-1).numpy(),
        atol=1e-5,
    )
    assert clip.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    # the loaded transformers model works too, with its tokenizer
    assert load_clip(model, tokenizer=tokenizer, image_size=32).encode_text(["x"]).shape == (1, 16)
    # a vision-only checkpoint has no text tower
    vision_only = tmp_path / "vision"
    vision_only.mkdir()
    (vision_only / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match="no text tower"):
        load_clip(vision_only)


# CONCH's published preprocessing constants (conch/open_clip_custom/constants.py: the OpenAI CLIP ones)
CONCH_MEAN = (0.48145466, 0.4578275, 0.40821073)
CONCH_STD = (0.26862954, 0.26130258, 0.27577711)


def _fake_conch_package(tiny, calls):
    """A stand-in for ``conch.open_clip_custom`` that mirrors the published CONCH code path.

    It follows github.com/mahmoodlab/CONCH (conch/open_clip_custom): ``create_model_from_pretrained(model_cfg,
    checkpoint_path, device=...)`` reads the weights from the checkpoint file (a state dict, optionally under
    ``"state_dict"`` and with ``"module."`` prefixes, as ``read_state_dict`` accepts), sets ``visual.image_mean`` /
    ``visual.image_std`` to the OpenAI constants and returns ``image_transform(visual.image_size, mean, std)``
    (Resize bicubic, CenterCrop, RGB, ToTensor, Normalize); the model's ``encode_image(images, normalize=True,
    proj_contrast=True)`` gives the contrastive projection (``proj_contrast=False`` the un-projected trunk features)
    and ``encode_text(text, normalize=True, embed_cls=True)`` drops the last token (the place of the CLS token);
    ``tokenize(tokenizer, texts)`` pads to the context length and appends one pad token. The towers themselves are
    the tiny open_clip ViT's: the real CoCa towers (timm ViT-B/16 at 448 px, 512-d) and their weights are not
    available offline.
    """
    import open_clip
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    def image_transform(image_size, mean, std):
        return Compose(
            [
                Resize(image_size, interpolation=InterpolationMode.BICUBIC),
                CenterCrop(image_size),
                lambda image: image.convert("RGB"),
                ToTensor(),
                Normalize(mean=mean, std=std),
            ]
        )

    class CoCa(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.visual = inner.visual
            self.logit_scale = inner.logit_scale
            self.context_length = inner.context_length

        def encode_image(self, images, normalize=True, proj_contrast=True):
            calls["encode_image"] = {"normalize": normalize, "proj_contrast": proj_contrast}
            calls["proj_contrast"] = proj_contrast
            if proj_contrast:
                latent = self.inner.encode_image(images)
            else:  # the trunk's features before the projection: another space altogether
                latent = self.inner.encode_image(images) @ self.visual.proj.T
            return torch.nn.functional.normalize(latent, dim=-1) if normalize else latent

        def encode_text(self, text, normalize=True, embed_cls=True):
            calls["text_tokens"] = tuple(text.shape)
            text = text[:, :-1] if embed_cls else text
            latent = self.inner.encode_text(text)
            return torch.nn.functional.normalize(latent, dim=-1) if normalize else latent

    def create_model_from_pretrained(model_cfg, checkpoint_path=None, device="cpu", **kwargs):
        calls["create"] = (model_cfg, checkpoint_path)
        calls["device"] = device
        state = torch.load(checkpoint_path, map_location="cpu")
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if next(iter(state)).startswith("module"):
            state = {k[7:]: v for k, v in state.items()}
        torch.manual_seed(123)  # other random weights: only the checkpoint makes it the tiny model
        inner = open_clip.create_model(ARCH)
        inner.load_state_dict(state)
        model = CoCa(inner).to(device)
        model.train()  # as CONCH returns it: st2he must switch it to eval mode
        model.visual.image_mean, model.visual.image_std = CONCH_MEAN, CONCH_STD
        return model, image_transform(model.visual.image_size, CONCH_MEAN, CONCH_STD)

    context = TINY_VIT["text_cfg"]["context_length"]

    def tokenize(tokenizer, texts):
        tokens = tokenizer(texts)[:, : context]  # CONCH: max_length = context - 1 ... then one pad appended
        calls["tokenized"] = list(texts)
        return torch.nn.functional.pad(tokens, (0, 1), value=0)

    package = types.ModuleType("conch")
    custom = types.ModuleType("conch.open_clip_custom")
    custom.create_model_from_pretrained = create_model_from_pretrained
    custom.get_tokenizer = lambda: open_clip.get_tokenizer(ARCH)
    custom.tokenize = tokenize
    package.open_clip_custom = custom
    return package, custom


def test_conch_goes_through_the_conch_package(tiny, monkeypatch, tmp_path):
    """CONCH through a stand-in of its package (see ``_fake_conch_package``).

    Limit: the ``conch`` package and the gated CONCH weights are not available offline, so the real CoCa towers are
    never run here. What is checked is st2he's side of the published interface: the factory's name and checkpoint,
    the preprocessing constants and input size taken from CONCH's transform, ``encode_image(...,
    proj_contrast=True, normalize=False)``, ``tokenize(tokenizer=..., texts=...)`` and ``encode_text``, and that
    the numbers are those of the model CONCH's own preprocessing and towers give for the same image and prompt.
    """
    from PIL import Image

    # the CONCH package is not installed here: without it, a clear error; with it, its factory and tokenizer are used
    if "conch" not in sys.modules:
        with pytest.raises(ImportError, match="CONCH package"):
            load_clip("conch", checkpoint=tiny.ckpt)
    with pytest.raises((FileNotFoundError, ImportError), match="checkpoint|CONCH"):
        load_clip("conch", cache_dir=tmp_path)
    import open_clip

    calls = {}
    package, custom = _fake_conch_package(tiny, calls)
    monkeypatch.setitem(sys.modules, "conch", package)
    monkeypatch.setitem(sys.modules, "conch.open_clip_custom", custom)
    clip = load_clip("conch", checkpoint=tiny.ckpt)
    assert calls["create"] == ("conch_ViT-B-16", str(tiny.ckpt))
    assert clip.backend == "conch" and clip.image_size == 32 and clip.mpp == 0.5
    assert clip.encode_image(_batch()).shape == (3, 16) and calls["proj_contrast"] is True
    assert clip.encode_text(["tumor"]).shape == (1, 16)
    assert load_clip(("conch", tiny.ckpt)).backend == "conch"

    # the values: CONCH's normalisation constants and input size, from its transform
    assert clip.mean == pytest.approx(CONCH_MEAN) and clip.std == pytest.approx(CONCH_STD)
    assert not clip.model.training  # put in eval mode
    assert clip.logit_scale == pytest.approx(float(tiny.model.logit_scale.detach().exp()))
    # an image at CONCH's input size: st2he's embedding is CONCH's own preprocessing + contrastive projection
    rgb = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    got = clip.encode_image(rgb)
    assert calls["encode_image"] == {"normalize": False, "proj_contrast": True}
    _, transform = custom.create_model_from_pretrained("conch_ViT-B-16", str(tiny.ckpt))
    x = torch.stack([transform(Image.fromarray(im)) for im in rgb])
    with torch.no_grad():
        want = torch.nn.functional.normalize(tiny.model.encode_image(x), dim=-1)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    # a prompt: CONCH's tokenisation (one extra pad token, dropped again by encode_text) and the text tower
    got = clip.encode_text(["tumor", "stroma."])
    assert calls["tokenized"] == ["tumor", "stroma."]
    assert calls["text_tokens"] == (2, TINY_VIT["text_cfg"]["context_length"] + 1)
    with torch.no_grad():
        want = tiny.model.encode_text(open_clip.get_tokenizer(ARCH)(["tumor", "stroma."]))
    np.testing.assert_allclose(got.numpy(), torch.nn.functional.normalize(want, dim=-1).numpy(), atol=1e-5)
    # a checkpoint as a training run saves it ({"state_dict": {"module.…": …}}) gives the same model
    wrapped = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny.model.state_dict().items()}}, wrapped)
    again = load_clip("conch", checkpoint=wrapped)
    assert calls["create"] == ("conch_ViT-B-16", str(wrapped)) and again.name == "conch:pytorch_model.bin"
    np.testing.assert_allclose(again.encode_image(rgb).numpy(), clip.encode_image(rgb).numpy(), atol=1e-6)


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
