"""Pathology CLIP models (QuiltNet, CONCH, PLIP, any open_clip model) behind one small interface.

:func:`load_clip` returns a :class:`ClipModel` whatever the source: an open_clip hub id read from the local
Hugging Face cache, an ``(architecture, checkpoint)`` pair for open_clip, CONCH through its own package, a
CLIP model in the transformers format (PLIP), or a model already in memory.

Offline by default, like every st2he loader: nothing is fetched unless downloads are allowed
(``local_files_only=False`` or ``ST2HE_ALLOW_DOWNLOAD=1``, and ``HF_HUB_OFFLINE`` not set). A model that is not on
this machine fails at once, with a message that says what to provide; while a model loads offline, the Hugging Face
libraries are held offline too (an open_clip config that names a Hub tokenizer or text tower cannot reach out). When
downloads are allowed, every request has a timeout (``HF_HUB_ETAG_TIMEOUT``, ``HF_HUB_DOWNLOAD_TIMEOUT``; 10 s by
default), so a network that does not answer fails in seconds rather than hanging.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("st2he")

#: µm per pixel that pathology CLIP models were trained at (20x) unless told otherwise.
DEFAULT_MPP = 0.5
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_HF_PREFIXES = ("hf-hub:", "hf_hub:")
_CONCH_HUB_ID = "MahmoodLab/conch"
_CONCH_INSTALL = "pip install git+https://github.com/mahmoodlab/CONCH.git"


class ClipModel:
    """A CLIP-style image-text model, ready for zero-shot classification of H&E tiles.

    Made by :func:`load_clip`; wraps the backend model (open_clip, CONCH or transformers) and its tokenizer.

    Attributes
    ----------
    model
        The backend ``torch.nn.Module`` (in eval mode).
    image_size
        Edge length in pixels of the square tiles the image tower takes.
    mean, std
        Per-channel normalisation applied to images scaled to ``[0, 1]``.
    mpp
        µm per pixel the model expects its tiles at (so one tile covers ``image_size * mpp`` µm).
    logit_scale
        The model's learned temperature (``exp`` of its ``logit_scale`` parameter): class probabilities are
        ``softmax(logit_scale * cosine similarity)``.
    name
        What was loaded, for the record.
    backend
        ``"open_clip"``, ``"conch"`` or ``"transformers"`` (or ``"custom"`` for duck-typed models).
    """

    def __init__(
        self,
        model,
        *,
        encode_image: Callable,
        encode_text: Callable,
        image_size: int,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        mpp: float = DEFAULT_MPP,
        logit_scale: float = 100.0,
        name: str = "clip",
        backend: str = "custom",
        device: str = "cpu",
    ):
        if not (np.isfinite(mpp) and mpp > 0):
            msg = f"mpp (µm per pixel the model expects) must be a positive number, got {mpp!r}."
            raise ValueError(msg)
        image_size = _as_int_size(image_size)
        self.model = model
        self._encode_image = encode_image
        self._encode_text = encode_text
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.mpp = float(mpp)
        self.logit_scale = float(logit_scale)
        self.name = str(name)
        self.backend = backend
        self.device = str(device)

    def __repr__(self) -> str:
        return (
            f"ClipModel({self.name!r}, backend={self.backend!r}, image_size={self.image_size}, mpp={self.mpp}, "
            f"logit_scale={self.logit_scale:.1f}, device={self.device!r})"
        )

    @property
    def tile_size_um(self) -> float:
        """The field of view of one input tile in µm: ``image_size * mpp``."""
        return self.image_size * self.mpp

    def to(self, device) -> ClipModel:
        """Move the backend model to ``device`` (in place); returns ``self``."""
        if hasattr(self.model, "to"):
            self.model.to(device)
        self.device = str(device)
        return self

    def preprocess(self, images):
        """Images -> the normalised float tensor ``(n, 3, image_size, image_size)`` the image tower takes.

        ``images`` is a uint8 array or tensor ``(n, h, w, 3)`` (numpy layout) or ``(n, 3, h, w)``, values
        0-255, or a float tensor ``(n, 3, h, w)`` with values in ``[0, 1]``. Tiles of another size are resized
        (bilinear with antialiasing; non-square tiles are squashed, so read square tiles).
        """
        import torch
        import torch.nn.functional as F

        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            msg = f"Expected a batch of RGB images (n, h, w, 3) or (n, 3, h, w), got shape {tuple(x.shape)}."
            raise ValueError(msg)
        if x.shape[1] != 3 and x.shape[-1] in (3, 4):
            x = x[..., :3].permute(0, 3, 1, 2)
        if x.shape[1] != 3:
            msg = f"Expected 3 colour channels (RGB), got shape {tuple(x.shape)}."
            raise ValueError(msg)
        x = x.float() / 255.0 if not x.is_floating_point() else x.float()
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode_image(self, images, *, normalize: bool = True):
        """Image embeddings ``(n, d)`` (float32, on the CPU) of a batch of RGB tiles; see :meth:`preprocess`."""
        import torch

        x = self.preprocess(images).to(self.device, dtype=_dtype_of(self.model))
        with torch.inference_mode():
            features = self._encode_image(x).float()
        if normalize:
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu()

    def encode_text(self, texts: str | Sequence[str], *, normalize: bool = True):
        """Text embeddings ``(n, d)`` (float32, on the CPU) of a list of prompts."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            msg = "encode_text needs at least one text."
            raise ValueError(msg)
        with torch.inference_mode():
            features = self._encode_text(texts).float()
        if normalize:
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu()


def load_clip(
    model,
    *,
    device: str = "cpu",
    mpp: float | None = None,
    tokenizer=None,
    preprocess=None,
    checkpoint: str | os.PathLike | None = None,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    precision: str = "fp32",
) -> ClipModel:
    """Load a pathology CLIP model for zero-shot classification.

    Parameters
    ----------
    model
        One of

        - a Hugging Face hub id, ``"hf-hub:wisdomik/QuiltNet-B-32"`` (open_clip format) or ``"hf-hub:vinid/plip"``
          (transformers format), read from the local Hugging Face cache (``cache_dir``); downloaded only when
          allowed (see ``local_files_only``), else a model missing from the cache fails at once;
        - an ``(architecture, checkpoint_path)`` pair for open_clip, e.g. ``("ViT-B-32", "quilt.bin")``, including
          architectures registered with :func:`open_clip.add_model_config`; ``("conch", path)`` loads CONCH;
        - ``"conch"``: CONCH through the ``conch`` package (``conch.open_clip_custom``), with its checkpoint
          from ``checkpoint=`` or the Hugging Face cache of ``MahmoodLab/conch``;
        - a local folder: with ``open_clip_config.json`` (open_clip) or a transformers ``config.json`` of a
          ``CLIPModel`` (PLIP) and its tokenizer files;
        - a model already in memory: an open_clip model (``tokenizer`` optional: open_clip's default BPE
          tokenizer is used), a ``transformers.CLIPModel`` with its ``tokenizer``, or any object with
          ``encode_image`` and ``encode_text`` plus a ``tokenizer``; ``preprocess`` (a torchvision transform)
          gives the input size and normalisation when the model does not carry them;
        - a :class:`ClipModel` (returned as it is, moved to ``device``).
    device
        Torch device for the model.
    mpp
        µm per pixel the model expects (default 0.5, i.e. 20x, for pathology CLIP models).
    tokenizer, preprocess
        For models given in memory (see above).
    checkpoint
        CONCH checkpoint file (``pytorch_model.bin``) for ``model="conch"``.
    image_size
        Override the input size in pixels (else read from the model or its ``preprocess``).
    cache_dir
        Hugging Face cache folder (default: the ``HF_HUB_CACHE`` one).
    local_files_only
        ``None`` (default): never touch the network, unless the environment variable ``ST2HE_ALLOW_DOWNLOAD=1``
        allows downloads (the same rule as :func:`st2he.models.from_pretrained`). ``False``: download a hub id that
        is not in the cache (with timeouts). ``True``: never download. ``HF_HUB_OFFLINE=1`` always forbids downloads.
    precision
        open_clip precision (``"fp32"``, ``"fp16"``, ``"bf16"``).

    Returns
    -------
    A :class:`ClipModel` in eval mode on ``device``.

    Raises
    ------
    FileNotFoundError
        The model, its checkpoint or its cache entry is not there (the message says what to provide).
    ValueError
        The model has no text tower (an image-only encoder cannot score class prompts) or is not recognised.
    ImportError
        ``"conch"`` without the CONCH package installed.
    """
    if isinstance(model, ClipModel):
        if mpp is not None:
            model.mpp = float(mpp)
        return model.to(device)
    # why nothing may be downloaded (None: downloads allowed); decided here, before the guard sets HF's flag
    offline = _offline(local_files_only)
    if not offline:
        no_download = None
    elif _hf_offline():
        no_download = "HF_HUB_OFFLINE is set"
    else:
        no_download = (
            "st2he does not download unless asked to (load_clip(..., local_files_only=False) or ST2HE_ALLOW_DOWNLOAD=1)"
        )
    with _hub_offline(offline):
        return _load_any(
            model,
            device=device,
            mpp=mpp,
            tokenizer=tokenizer,
            preprocess=preprocess,
            checkpoint=checkpoint,
            image_size=image_size,
            cache_dir=cache_dir,
            no_download=no_download,
            precision=precision,
        )


def _load_any(model, *, device, mpp, tokenizer, preprocess, checkpoint, image_size, cache_dir, no_download, precision):
    if isinstance(model, os.PathLike):
        model = str(model)
    if isinstance(model, tuple | list):
        if len(model) != 2:
            msg = f"A model given as a pair must be (architecture, checkpoint_path), got {model!r}."
            raise ValueError(msg)
        arch, ckpt = str(model[0]), Path(model[1]).expanduser()
        if arch.lower().startswith("conch"):
            return _load_conch(ckpt, device=device, mpp=mpp, image_size=image_size)
        return _load_open_clip_pair(arch, ckpt, device=device, mpp=mpp, image_size=image_size, precision=precision)
    if isinstance(model, str):
        if model.lower() == "conch":
            ckpt = checkpoint
            if ckpt is None:
                ckpt = _cached_file(_CONCH_HUB_ID, "pytorch_model.bin", cache_dir)
            if ckpt is None:
                msg = (
                    "CONCH needs its checkpoint file: pass load_clip('conch', checkpoint='/path/to/pytorch_model.bin') "
                    f"(from the gated Hugging Face repository {_CONCH_HUB_ID}; it is not in the local cache "
                    f"{_hf_cache_dir(cache_dir)})."
                )
                raise FileNotFoundError(msg)
            return _load_conch(Path(ckpt).expanduser(), device=device, mpp=mpp, image_size=image_size)
        if model.startswith("local-dir:"):
            model = model[len("local-dir:") :]
        path = Path(model).expanduser()
        if path.is_dir():
            return _load_folder(path, name=model, device=device, mpp=mpp, image_size=image_size, precision=precision)
        if path.is_file():
            msg = (
                f"{model!r} is a single file; say which architecture it holds: load_clip((architecture, {model!r})) "
                "for open_clip, or load_clip('conch', checkpoint=...) for CONCH."
            )
            raise ValueError(msg)
        repo_id = model
        for prefix in _HF_PREFIXES:
            if repo_id.startswith(prefix):
                repo_id = repo_id[len(prefix) :]
                break
        else:
            if repo_id.count("/") != 1 or path.is_absolute() or repo_id.startswith("."):
                msg = (
                    f"Cannot find the model {model!r}: it is no local folder, file or hub id. Give a hub id as "
                    "'hf-hub:org/name', an (architecture, checkpoint_path) pair, a folder, or 'conch'."
                )
                raise FileNotFoundError(msg)
        folder = _resolve_hub(repo_id, cache_dir=cache_dir, no_download=no_download)
        return _load_folder(folder, name=model, device=device, mpp=mpp, image_size=image_size, precision=precision)
    return _wrap_loaded(
        model, tokenizer=tokenizer, preprocess=preprocess, device=device, mpp=mpp, image_size=image_size
    )


# ---------------------------------------------------------------------------------------------------------------
# sources


def _hf_cache_dir(cache_dir) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return "~/.cache/huggingface/hub"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hf_offline() -> bool:
    """Whether the Hugging Face libraries are offline (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _offline(local_files_only: bool | None) -> bool:
    """No downloads unless asked for (local_files_only=False, ST2HE_ALLOW_DOWNLOAD=1); never when HF is offline."""
    if _hf_offline():
        return True
    if local_files_only is not None:
        return bool(local_files_only)
    return not _env_true("ST2HE_ALLOW_DOWNLOAD")


@contextlib.contextmanager
def _hub_offline(offline: bool = True):
    """Hold the Hugging Face libraries offline while a model loads (they read ``constants.HF_HUB_OFFLINE`` per call).

    An open_clip config may name a Hub tokenizer or text tower; transformers may look for a newer file. Offline,
    each of these fails at once instead of opening a connection.
    """
    if not offline:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _cached_file(repo_id: str, filename: str, cache_dir) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    return found if isinstance(found, str) and os.path.isfile(found) else None


_HUB_PATTERNS = [
    "*.json",
    "*.txt",
    "*.model",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
]


def _resolve_hub(repo_id: str, *, cache_dir, no_download: str | None) -> Path:
    """Return the local snapshot folder of hub repository ``repo_id``; download only when allowed, with timeouts.

    ``no_download``: why nothing may be downloaded (``None``: downloads are allowed).
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any cache miss: decide below whether to go online
        cache_error = err
    if no_download is not None:
        msg = (
            f"The model 'hf-hub:{repo_id}' is not in the local Hugging Face cache ({_hf_cache_dir(cache_dir)}) and "
            f"{no_download}. Give its weights as (architecture, checkpoint_path), e.g. load_clip(('ViT-B-32', "
            "'/path/to/open_clip_pytorch_model.bin')), or a folder holding open_clip_config.json and the weights; or "
            f"download it where there is network (`hf download {repo_id}`) and copy the cache here (or set HF_HOME / "
            "cache_dir); or allow the download with local_files_only=False."
        )
        raise FileNotFoundError(msg) from cache_error
    try:
        return _download_hub(repo_id, cache_dir)
    except Exception as err:  # network errors of every kind become one clear message
        msg = (
            f"Could not download 'hf-hub:{repo_id}' ({type(err).__name__}: {err}). It is not in the local Hugging "
            f"Face cache ({_hf_cache_dir(cache_dir)}) either. Download it where there is network and copy the cache "
            "here, or pass its weights as (architecture, checkpoint_path), e.g. ('ViT-B-32', "
            "'/path/to/open_clip_pytorch_model.bin')."
        )
        raise FileNotFoundError(msg) from err


def _download_hub(repo_id: str, cache_dir, patterns: Sequence[str] = tuple(_HUB_PATTERNS)) -> Path:
    """Download the files of ``repo_id`` that match ``patterns`` (a CLIP model's by default), each with a timeout.

    ``snapshot_download`` lists the repository without a timeout (it waits forever on a network that does not
    answer); here the listing uses ``HF_HUB_ETAG_TIMEOUT`` and each file ``HF_HUB_ETAG_TIMEOUT`` /
    ``HF_HUB_DOWNLOAD_TIMEOUT`` (seconds without an answer, 10 by default).
    """
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

    timeout = float(constants.HF_HUB_ETAG_TIMEOUT)
    info = HfApi().repo_info(repo_id, timeout=timeout)
    names = [
        f.rfilename for f in info.siblings or [] if any(fnmatch.fnmatch(f.rfilename, p) for p in patterns)
    ]
    if not names:
        msg = f"the repository has no files matching {', '.join(patterns)}"
        raise FileNotFoundError(msg)
    for name in names:
        hf_hub_download(repo_id, name, revision=info.sha, cache_dir=cache_dir, etag_timeout=timeout)
    return Path(snapshot_download(repo_id, revision=info.sha, cache_dir=cache_dir, local_files_only=True))


def _load_folder(folder: Path, *, name, device, mpp, image_size, precision) -> ClipModel:
    if (folder / "open_clip_config.json").is_file():
        import open_clip

        weights = [folder / f for f in _HUB_PATTERNS[3:5] if (folder / f).is_file()]
        weights += sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt*"))
        if not weights:
            msg = (
                f"{folder} has an open_clip config but no weights (open_clip_pytorch_model.bin or "
                "open_clip_model.safetensors); copy the checkpoint there."
            )
            raise FileNotFoundError(msg)
        config = json.loads((folder / "open_clip_config.json").read_text())
        if "text_cfg" not in config.get("model_cfg", config):
            _no_text_tower(name)
        try:
            clip, _, _ = open_clip.create_model_and_transforms(
                f"local-dir:{folder}", device=device, precision=precision
            )
            tok = open_clip.get_tokenizer(f"local-dir:{folder}")
        except OSError as err:
            msg = f"Could not build the open_clip model in {folder}: {err}"
            raise FileNotFoundError(msg) from err
        return _from_open_clip(clip, tok, name=name, device=device, mpp=mpp, image_size=image_size)
    if (folder / "config.json").is_file():
        return _load_transformers(folder, name=name, device=device, mpp=mpp, image_size=image_size)
    msg = (
        f"{folder} holds neither an open_clip model (open_clip_config.json) nor a transformers one (config.json); "
        f"it has {sorted(p.name for p in folder.iterdir())[:10]}."
    )
    raise FileNotFoundError(msg)


def _load_open_clip_pair(arch: str, ckpt: Path, *, device, mpp, image_size, precision) -> ClipModel:
    import open_clip

    if arch not in open_clip.list_models():
        msg = (
            f"open_clip does not know the architecture {arch!r}. Register its config first with "
            "open_clip.add_model_config('/path/to/config.json') (a JSON with embed_dim, vision_cfg and text_cfg), "
            "or use one of open_clip.list_models()."
        )
        raise ValueError(msg)
    config = open_clip.get_model_config(arch) or {}
    if not config.get("text_cfg"):
        _no_text_tower(arch)
    if not ckpt.is_file():
        msg = f"The checkpoint file {ckpt} does not exist; pass the path to the model's weights (.bin, .pt or .safetensors)."
        raise FileNotFoundError(msg)
    try:
        clip, _, _ = open_clip.create_model_and_transforms(
            arch, pretrained=str(ckpt), device=device, precision=precision
        )
    except OSError as err:  # a Hugging Face text tower (hf_model_name) that is not on this machine
        _hub_files_missing(f"The architecture {arch!r}", config, err)
    except RuntimeError as err:
        msg = f"The checkpoint {ckpt} does not fit the architecture {arch!r}: {err}"
        raise ValueError(msg) from err
    try:
        tok = open_clip.get_tokenizer(arch)
    except OSError as err:  # a Hugging Face tokenizer (hf_tokenizer_name) that is not on this machine
        _hub_files_missing(f"The architecture {arch!r}", config, err)
    return _from_open_clip(clip, tok, name=f"{arch}:{ckpt.name}", device=device, mpp=mpp, image_size=image_size)


def _load_conch(ckpt: Path, *, device, mpp, image_size) -> ClipModel:
    try:
        from conch.open_clip_custom import create_model_from_pretrained, get_tokenizer, tokenize
    except ImportError as err:
        msg = f"model='conch' needs the CONCH package, which is not installed: {_CONCH_INSTALL}"
        raise ImportError(msg) from err
    if not ckpt.is_file():
        msg = f"The CONCH checkpoint {ckpt} does not exist; pass the path to its pytorch_model.bin."
        raise FileNotFoundError(msg)
    clip, transform = create_model_from_pretrained("conch_ViT-B-16", str(ckpt), device=device)
    clip.eval()
    tok = get_tokenizer()
    size, mean, std = _from_transform(transform)
    size = image_size or size or _as_int_size(getattr(clip.visual, "image_size", 448))

    def encode_image(x):
        return clip.encode_image(x, proj_contrast=True, normalize=False)

    def encode_text(texts):
        return clip.encode_text(tokenize(texts=texts, tokenizer=tok).to(_device_of(clip)))

    return ClipModel(
        clip,
        encode_image=encode_image,
        encode_text=encode_text,
        image_size=size,
        mean=mean or OPENAI_MEAN,
        std=std or OPENAI_STD,
        mpp=DEFAULT_MPP if mpp is None else mpp,
        logit_scale=_logit_scale(clip),
        name=f"conch:{ckpt.name}",
        backend="conch",
        device=device,
    )


def _load_transformers(folder: Path, *, name, device, mpp, image_size) -> ClipModel:
    import transformers

    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type", "")
    if model_type.endswith("vision_model") or ("vision_config" in config and "text_config" not in config):
        _no_text_tower(name)
    if model_type not in ("clip", "siglip", "siglip2", "chinese_clip", "altclip"):
        msg = f"{folder} holds a transformers model of type {model_type!r}, not a CLIP model (model_type 'clip')."
        raise ValueError(msg)
    if not any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")) and not list(
        folder.glob("model*.safetensors")
    ):
        msg = f"{folder} has a config.json but no weights (model.safetensors or pytorch_model.bin); copy them there."
        raise FileNotFoundError(msg)
    clip = transformers.AutoModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        msg = f"{folder} has no usable tokenizer files (tokenizer.json or vocab.json + merges.txt): {err}"
        raise FileNotFoundError(msg) from err
    size, mean, std = None, None, None
    pp_file = folder / "preprocessor_config.json"
    if pp_file.is_file():
        pp = json.loads(pp_file.read_text())
        crop = pp.get("crop_size") or pp.get("size")
        if isinstance(crop, dict):
            crop = crop.get("height") or crop.get("shortest_edge")
        size = int(crop) if crop else None
        mean, std = pp.get("image_mean"), pp.get("image_std")
    vision = getattr(clip.config, "vision_config", None)
    size = image_size or size or getattr(vision, "image_size", 224)
    return _from_transformers(clip, tok, name=name, device=device, mpp=mpp, image_size=size, mean=mean, std=std)


def _wrap_loaded(model, *, tokenizer, preprocess, device, mpp, image_size) -> ClipModel:
    import torch

    try:
        import transformers
    except ImportError:  # pragma: no cover
        transformers = None
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        if not hasattr(model, "get_text_features"):
            _no_text_tower(type(model).__name__)
        if tokenizer is None:
            msg = "A transformers CLIP model needs its tokenizer: load_clip(model, tokenizer=CLIPTokenizer...)."
            raise ValueError(msg)
        size, mean, std = _from_transform(preprocess)
        vision = getattr(model.config, "vision_config", None)
        size = image_size or size or getattr(vision, "image_size", 224)
        return _from_transformers(
            model.to(device).eval(),
            tokenizer,
            name=type(model).__name__,
            device=device,
            mpp=mpp,
            image_size=size,
            mean=mean,
            std=std,
        )
    if not hasattr(model, "encode_text") or _open_clip_lacks_text(model):
        if hasattr(model, "encode_image") or hasattr(model, "forward"):
            _no_text_tower(type(model).__name__)
        msg = (
            f"Cannot use a {type(model).__name__} as a CLIP model. Pass a hub id, an (architecture, checkpoint_path) "
            "pair, 'conch', a folder, or a CLIP model with encode_image and encode_text."
        )
        raise ValueError(msg)
    if not hasattr(model, "encode_image"):
        msg = f"The {type(model).__name__} has encode_text but no encode_image: it is not a CLIP image-text model."
        raise ValueError(msg)
    if tokenizer is None:
        is_open_clip = type(model).__module__.startswith("open_clip")
        if is_open_clip and hasattr(model, "context_length") and not hasattr(model, "text"):
            import open_clip

            tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=int(model.context_length))
        else:
            msg = f"Pass the tokenizer of the {type(model).__name__}: load_clip(model, tokenizer=...)."
            raise ValueError(msg)
    if isinstance(model, torch.nn.Module) and type(model).__module__.startswith("open_clip"):
        if preprocess is not None:
            size, mean, std = _from_transform(preprocess)
            if mean is not None and std is not None:
                from open_clip import set_model_preprocess_cfg

                cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
                cfg.update({"mean": tuple(mean), "std": tuple(std)})
                if size:
                    cfg["size"] = size
                set_model_preprocess_cfg(model, cfg)
        return _from_open_clip(
            model, tokenizer, name=type(model).__name__, device=device, mpp=mpp, image_size=image_size
        )
    size, mean, std = _from_transform(preprocess)
    visual = getattr(model, "visual", None)
    size = image_size or size or _as_int_size(getattr(visual, "image_size", None) or 0) or None
    if not size:
        msg = "Cannot tell the model's input size: pass preprocess= (its torchvision transform) or image_size=."
        raise ValueError(msg)
    if isinstance(model, torch.nn.Module):
        model.to(device).eval()

    def encode_text(texts):
        tokens = tokenizer(texts)
        return model.encode_text(tokens.to(_device_of(model)) if hasattr(tokens, "to") else tokens)

    return ClipModel(
        model,
        encode_image=model.encode_image,
        encode_text=encode_text,
        image_size=size,
        mean=mean or OPENAI_MEAN,
        std=std or OPENAI_STD,
        mpp=DEFAULT_MPP if mpp is None else mpp,
        logit_scale=_logit_scale(model),
        name=type(model).__name__,
        backend="custom",
        device=device,
    )


# ---------------------------------------------------------------------------------------------------------------
# backends


def _from_open_clip(clip, tokenizer, *, name, device, mpp, image_size) -> ClipModel:
    if _open_clip_lacks_text(clip):
        _no_text_tower(name)
    clip = clip.to(device).eval()
    cfg = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    size = image_size or cfg.get("size") or getattr(clip.visual, "image_size", 224)

    def encode_image(x):
        return clip.encode_image(x)

    def encode_text(texts):
        return clip.encode_text(tokenizer(texts).to(_device_of(clip)))

    return ClipModel(
        clip,
        encode_image=encode_image,
        encode_text=encode_text,
        image_size=size,
        mean=cfg.get("mean", OPENAI_MEAN),
        std=cfg.get("std", OPENAI_STD),
        mpp=DEFAULT_MPP if mpp is None else mpp,
        logit_scale=_logit_scale(clip),
        name=name,
        backend="open_clip",
        device=device,
    )


def _from_transformers(clip, tokenizer, *, name, device, mpp, image_size, mean, std) -> ClipModel:
    import torch

    max_len = getattr(getattr(clip.config, "text_config", None), "max_position_embeddings", 77)

    def _features(out):
        if isinstance(out, torch.Tensor):
            return out
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out[0]

    def encode_image(x):
        return _features(clip.get_image_features(pixel_values=x))

    def encode_text(texts):
        enc = tokenizer(
            texts,
            padding="max_length" if "siglip" in clip.config.model_type else True,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )
        enc = {k: v.to(_device_of(clip)) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        return _features(clip.get_text_features(**enc))

    return ClipModel(
        clip,
        encode_image=encode_image,
        encode_text=encode_text,
        image_size=image_size,
        mean=mean or OPENAI_MEAN,
        std=std or OPENAI_STD,
        mpp=DEFAULT_MPP if mpp is None else mpp,
        logit_scale=_logit_scale(clip),
        name=str(name),
        backend="transformers",
        device=device,
    )


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _hub_files_missing(what: str, config: dict, err: Exception) -> None:
    text_cfg = config.get("text_cfg") or {}
    names = sorted({str(text_cfg[k]) for k in ("hf_model_name", "hf_tokenizer_name") if text_cfg.get(k)})
    msg = (
        f"{what} needs files from the Hugging Face Hub ({', '.join(names) or 'its text tower or tokenizer'}) that are "
        "not on this machine, and st2he loads offline by default. Download them where there is network and copy the "
        "Hugging Face cache here (or set HF_HOME), or allow the download with load_clip(..., local_files_only=False) "
        f"or ST2HE_ALLOW_DOWNLOAD=1. ({type(err).__name__}: {err})"
    )
    raise FileNotFoundError(msg) from err


def _no_text_tower(name) -> None:
    msg = (
        f"The model {name!r} has no text tower: zero-shot classification scores tiles against class prompts, so it "
        "needs a CLIP-style image-text model (QuiltNet, CONCH, PLIP, an open_clip CLIP). Image-only encoders "
        "(UNI, Virchow, a CLIP's visual tower) give embeddings but cannot read prompts."
    )
    raise ValueError(msg)


def _open_clip_lacks_text(model) -> bool:
    """Tell whether an open_clip model lacks its text tower (e.g. built image-only)."""
    if not type(model).__module__.startswith("open_clip"):
        return False
    if hasattr(model, "text"):
        return model.text is None
    return getattr(model, "transformer", None) is None or getattr(model, "token_embedding", None) is None


def _device_of(model):
    """Return the device of a module's first parameter (CPU for parameter-less objects)."""
    import torch

    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _dtype_of(model):
    """Return the dtype of a module's first floating parameter (float32 otherwise): half models take half input."""
    import torch

    try:
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    except (AttributeError, TypeError):
        pass
    return torch.float32


def _logit_scale(model) -> float:
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        return 100.0
    try:
        value = float(np.exp(float(scale.detach().float().cpu().reshape(-1)[0])))
    except (AttributeError, TypeError):
        value = float(scale)
    return value if np.isfinite(value) and value > 0 else 100.0


def _as_int_size(size) -> int:
    if isinstance(size, tuple | list):
        if len(set(size)) != 1:
            msg = f"Only square model inputs are supported, got {size!r}."
            raise ValueError(msg)
        size = size[0]
    size = int(size)
    if size < 0:
        msg = f"image_size must be positive, got {size}."
        raise ValueError(msg)
    return size


def _from_transform(transform) -> tuple[int | None, list[float] | None, list[float] | None]:
    """Input size and normalisation read from a torchvision-style transform (``Compose`` of ``Resize``, ...)."""
    if transform is None:
        return None, None, None
    steps = list(getattr(transform, "transforms", [transform]))
    size = mean = std = None
    for step in steps:
        kind = type(step).__name__
        if kind in ("CenterCrop", "Resize", "ResizeKeepRatio") and getattr(step, "size", None) is not None:
            s = step.size
            size = _as_int_size(s if isinstance(s, tuple | list) else (s,))
        if kind == "Normalize":
            mean, std = [float(v) for v in step.mean], [float(v) for v in step.std]
    return size, mean, std


def _info(model: ClipModel) -> dict[str, Any]:
    """Describe a model for the params recorded with a result."""
    return {
        "name": model.name,
        "backend": model.backend,
        "image_size": model.image_size,
        "mpp": model.mpp,
        "logit_scale": model.logit_scale,
    }
