"""Loading and saving :class:`~st2he.models.Pix2PixTurbo` models; nothing here executes code from a file.

Formats
-------
* **Base** (``base=``): a diffusers-format Stable Diffusion folder (SD-Turbo: ``vae/``, ``unet/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or a hub id resolved from the local Hugging Face cache.
* **Published ST2HE / pix2pix-turbo checkpoints** (``CondGen.pkl``, ``UnCondGen.pkl``): a pickled dict with
  ``rank_unet``, ``rank_vae``, ``unet_lora_target_modules``, ``vae_lora_target_modules``, ``state_dict_unet`` and
  ``state_dict_vae``, read with ``torch.load(weights_only=True)`` (plain tensors and containers only). Keys written by
  older diffusers / peft releases are matched by module path and LoRA role (``lora_A`` / ``lora_B``, with or without
  the adapter name, with or without ``base_layer``); keys that match nothing are reported in a warning.
* **st2he checkpoints**: a folder with ``config.json`` (architecture, LoRA set-up, prompt, and what the model was
  trained with: palette, pixel size, tile size, training history) and ``model.safetensors``. Models trained from
  scratch (``tiny``, ``small``) store every weight; models fine-tuned from a base store only what training changes
  (LoRA weights, the UNet's ``conv_in``, the skip convolutions) and name their base. ``config.json`` must be valid
  JSON of a ``format_version`` this st2he reads; a full model is first built on the meta device and checked, tensor by
  tensor, against the safetensors header (shapes and dtypes, no data read), so a config that does not fit its weights
  fails at once instead of allocating what it claims.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ._config import get_config
from ._pix2pix import Pix2PixTurbo, _import_diffusers, default_prompt

logger = logging.getLogger("st2he")

FORMAT = "st2he-pix2pix-turbo"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_SPEC = "st2he_tokenizer.json"
PUBLISHED_KEYS = (
    "rank_unet",
    "rank_vae",
    "unet_lora_target_modules",
    "vae_lora_target_modules",
    "state_dict_unet",
    "state_dict_vae",
)
#: The generators shipped with st2he, by name: ``"small"`` (the default; simulated pairs, co-expression palette) and
#: ``"small-real"`` (simulated pairs and pairs derived from real H&E, lineage palette); see ``docs/models.md``.
SHIPPED = {
    "small": Path(__file__).parent / "weights" / "small",
    "small-real": Path(__file__).parent / "weights" / "small_real",
}

# --------------------------------------------------------------------------- key matching

_ADAPTER = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.[^.]+\.(weight|bias)$")
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def canonical_key(key: str) -> str:
    """Reduce a key to its module path and role: adapter names, ``base_layer`` and TwinConv wrappers removed."""
    key = _ADAPTER.sub(r".\1.\2", key)
    key = key.replace(".base_layer.", ".")
    if key.startswith("base_model.model."):
        key = key[len("base_model.model.") :]
    key = key.replace("conv_in.conv_in_curr.", "conv_in.")
    # diffusers < 0.14 named the VAE attention projections query / key / value / proj_attn
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in _OLD_ATTN and i >= 2 and parts[i - 2] == "attentions":
            parts[i] = _OLD_ATTN[part]
            return ".".join(parts)
    return key


def load_matching(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, what: str) -> list[str]:
    """Copy ``state_dict`` into ``module`` matching keys by :func:`canonical_key`; return the keys left unmatched.

    A key that matches a parameter of another shape is an error (the checkpoint does not fit the architecture).
    """
    own = module.state_dict()
    index: dict[str, str] = {}
    for k in own:
        index.setdefault(canonical_key(k), k)
    matched: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    wrong_shape: list[str] = []
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            unmatched.append(k)
            continue
        target = index.get(canonical_key(k))
        if target is None:
            unmatched.append(k)
            continue
        if tuple(own[target].shape) != tuple(v.shape):
            wrong_shape.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[target].shape)}")
            continue
        matched[target] = v.to(dtype=own[target].dtype)
    if wrong_shape:
        listed = "\n  ".join(wrong_shape[:20])
        msg = (
            f"The {what} weights of the checkpoint do not fit the model architecture ({len(wrong_shape)} tensors of "
            f"another shape), e.g.:\n  {listed}\nIs the base model the one the checkpoint was trained from?"
        )
        raise ValueError(msg)
    module.load_state_dict(matched, strict=False)
    return unmatched


def _warn_unmatched(unmatched: list[str], what: str, source) -> None:
    if unmatched:
        listed = ", ".join(unmatched[:30]) + (" ..." if len(unmatched) > 30 else "")
        warnings.warn(
            f"{len(unmatched)} {what} weights of {source} match no module of the model and were not loaded: {listed}",
            UserWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- base models


def _offline_default(local_files_only: bool | None) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True  # the user's word for every Hugging Face download
    if local_files_only is not None:
        return bool(local_files_only)
    allow = os.environ.get("ST2HE_ALLOW_DOWNLOAD", "").lower() in ("1", "true", "yes")
    return not allow


def resolve_base(base: str | os.PathLike, *, local_files_only: bool | None = None) -> Path:
    """Local folder of a diffusers base: the folder itself, or a hub id's snapshot in the local Hugging Face cache.

    Downloads happen only with ``local_files_only=False`` (or ``ST2HE_ALLOW_DOWNLOAD=1``); by default nothing touches
    the network, so a missing base fails at once instead of hanging.
    """
    path = Path(os.fspath(base)).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(base)
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not path.exists()
    if not looks_like_hub_id:
        msg = (
            f"Base model {name!r} not found: give a diffusers-format folder (with vae/, unet/, text_encoder/, "
            "tokenizer/, scheduler/) or a hub id such as 'stabilityai/sd-turbo' that is in the local Hugging Face cache."
        )
        raise FileNotFoundError(msg)
    offline = _offline_default(local_files_only)
    patterns = ["*.json", "*.txt", "*.safetensors", "vae/*", "unet/*", "text_encoder/*", "tokenizer/*"]
    try:
        if offline:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(name, local_files_only=True, allow_patterns=patterns)
        else:  # every request with a timeout: a network that does not answer fails instead of hanging
            from ._clip import _download_hub

            folder = _download_hub(name, None, patterns)
    except Exception as err:
        how = (
            f"download it once with `huggingface-cli download {name}` (or call with local_files_only=False / set "
            "ST2HE_ALLOW_DOWNLOAD=1), or pass the path of a local copy"
            if offline
            else "check the network connection or pass the path of a local copy"
        )
        msg = f"Base model {name!r} is not available{' in the local Hugging Face cache' if offline else ''}: {how}."
        raise FileNotFoundError(msg) from err
    return Path(folder)


def _load_tokenizer(folder: Path):
    from ._tokenizer import build_tokenizer

    tok_dir = folder / "tokenizer"
    spec = tok_dir / TOKENIZER_SPEC
    if spec.is_file():
        return build_tokenizer(json.loads(spec.read_text()))
    if (tok_dir / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    msg = f"No tokenizer in {tok_dir}: expected CLIP's vocab.json and merges.txt (as SD-Turbo has) or {TOKENIZER_SPEC}."
    raise FileNotFoundError(msg)


def load_base(folder: Path, *, torch_dtype: torch.dtype | None = None):
    """``(vae, unet, text_encoder, tokenizer, scheduler)`` from a diffusers-format folder."""
    diffusers = _import_diffusers()
    from transformers import CLIPTextModel

    for sub in ("vae", "unet", "text_encoder"):
        if not (folder / sub / "config.json").is_file():
            msg = f"{folder} is not a diffusers-format Stable Diffusion folder: {sub}/config.json is missing."
            raise FileNotFoundError(msg)
    kwargs = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    with _quiet_hf():
        return _load_parts(diffusers, CLIPTextModel, folder, kwargs, torch_dtype)


@contextlib.contextmanager
def _quiet_hf():
    """No progress bars from transformers / diffusers while loading small local files."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_parts(diffusers, CLIPTextModel, folder: Path, kwargs: dict, torch_dtype):
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", **kwargs)
        unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kwargs)
        te_kwargs = {"local_files_only": True}
        if torch_dtype is not None:
            te_kwargs["dtype"] = torch_dtype
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **te_kwargs)
    except OSError as err:
        msg = f"Could not read the base model in {folder}: {err}"
        raise FileNotFoundError(msg) from err
    tokenizer = _load_tokenizer(folder)
    sched_cfg = folder / "scheduler" / "scheduler_config.json"
    if sched_cfg.is_file():
        scheduler = diffusers.DDPMScheduler.from_config(json.loads(sched_cfg.read_text()))
    else:
        from ._config import SCHEDULER_SD_TURBO

        scheduler = diffusers.DDPMScheduler(**SCHEDULER_SD_TURBO)
    return vae, unet, text_encoder, tokenizer, scheduler


def save_base(folder: str | os.PathLike, config: str | dict = "tiny", *, seed: int = 0) -> Path:
    """Write a randomly initialised SD-shaped base model of ``config`` in diffusers format (for tests and timing)."""
    from ._pix2pix import build_components

    folder = Path(folder)
    config = get_config(config)
    vae, unet, text_encoder, tokenizer, scheduler = build_components(config, seed=seed)
    with _quiet_hf():
        vae.save_pretrained(folder / "vae")
        unet.save_pretrained(folder / "unet")
        text_encoder.save_pretrained(folder / "text_encoder")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer" / TOKENIZER_SPEC).write_text(json.dumps(tokenizer.to_config(), indent=1))
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "st2he_config": config.get("name", "custom")}, indent=1)
    )
    return folder


# --------------------------------------------------------------------------- checkpoints


def safe_torch_load(path: str | os.PathLike, *, what: str = "a checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with errors of our own.

    A file that holds anything but tensors and plain containers is refused with a message that says how to convert
    it; torch's own advice to turn safe loading off never reaches the user.
    """
    import pickle

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        which = f" (e.g. {found.group(1)})" if found else ""
        msg = (
            f"Could not read {path} as {what}: the file holds objects other than tensors and plain containers"
            f"{which}, or it is corrupt. st2he never executes code from a checkpoint. If the file comes from a source "
            "you trust, convert it: load it yourself in a trusted environment and save its tensors alone (a dict of "
            "tensors with torch.save, or a safetensors file), e.g. torch.save({k: v for k, v in sd.items() if "
            "isinstance(v, (torch.Tensor, dict, list, int, float, str))}, 'plain.pkl')."
        )
        raise ValueError(msg) from None
    except Exception as err:
        if "weights_only" in str(err):  # torch's advice to load unsafely: not passed on
            msg = f"Could not read {path} as {what}: the file is corrupt or truncated."
            raise ValueError(msg) from None
        msg = f"Could not read {path} as {what} ({type(err).__name__}: {err}): the file is corrupt or truncated."
        raise ValueError(msg) from err


def read_published(path: str | os.PathLike) -> dict[str, Any]:
    """Read a pix2pix-turbo / ST2HE ``.pkl`` checkpoint safely (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        msg = (
            f"Checkpoint {path} not found. Give the path of a published ST2HE checkpoint (CondGen.pkl or "
            "UnCondGen.pkl) or of an st2he checkpoint folder."
        )
        raise FileNotFoundError(msg)
    sd = safe_torch_load(path, what="a pix2pix-turbo checkpoint")
    if not isinstance(sd, dict) or any(k not in sd for k in PUBLISHED_KEYS):
        have = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
        msg = f"{path} is not a pix2pix-turbo checkpoint: it needs the entries {list(PUBLISHED_KEYS)}, it has {have}."
        raise ValueError(msg)
    header = {
        f"{part}.{k}": (tuple(v.shape), "")
        for part in ("unet", "vae")
        for k, v in (sd[f"state_dict_{part}"] if isinstance(sd[f"state_dict_{part}"], dict) else {}).items()
        if isinstance(v, torch.Tensor)
    }
    _check_lora_ranks(sd, header, path)
    return sd


def save_published(model: Pix2PixTurbo, path: str | os.PathLike) -> Path:
    """Write ``model``'s trained weights in the pix2pix-turbo / ST2HE ``.pkl`` layout (readable by the original code)."""
    lora = model.config["lora"]
    sd = {
        "unet_lora_target_modules": list(lora["unet_target_modules"]),
        "vae_lora_target_modules": list(lora["vae_target_modules"]),
        "rank_unet": int(lora["rank_unet"]),
        "rank_vae": int(lora["rank_vae"]),
        "state_dict_unet": {
            k: v.detach().cpu().clone() for k, v in model.unet.state_dict().items() if "lora" in k or "conv_in" in k
        },
        "state_dict_vae": {
            k: v.detach().cpu().clone() for k, v in model.vae.state_dict().items() if "lora" in k or "skip" in k
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def load_published_into(model: Pix2PixTurbo, path: str | os.PathLike) -> Pix2PixTurbo:
    """Load a published checkpoint into a model built from its base (adapters rebuilt with the file's set-up)."""
    sd = read_published(path)
    model.add_lora(
        rank_unet=int(sd["rank_unet"]),
        rank_vae=int(sd["rank_vae"]),
        unet_target_modules=list(sd["unet_lora_target_modules"]),
        vae_target_modules=list(sd["vae_lora_target_modules"]),
    )
    unet_sd = dict(sd["state_dict_unet"])
    # a stochastic (TwinConv) checkpoint also carries the pretrained conv_in
    twin = {k.split("conv_in.conv_in_pretrained.", 1)[1]: v for k, v in unet_sd.items() if "conv_in_pretrained." in k}
    unet_sd = {k: v for k, v in unet_sd.items() if "conv_in_pretrained." not in k}
    if twin:
        model.conv_in_pretrained.load_state_dict(twin)
    _warn_unmatched(load_matching(model.unet, unet_sd, what="UNet"), "UNet", path)
    _warn_unmatched(load_matching(model.vae, dict(sd["state_dict_vae"]), what="VAE"), "VAE", path)
    model.metadata["checkpoint"] = str(path)
    model._prompt_cache.clear()
    return model


def _trainable_state(model: Pix2PixTurbo) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.unet.state_dict().items():
        if "lora" in k or k.startswith("conv_in."):
            out[f"unet.{k}"] = v
    for k, v in model.vae.state_dict().items():
        if "lora" in k or "skip_conv" in k:
            out[f"vae.{k}"] = v
    return out


def save_pretrained(
    model: Pix2PixTurbo, folder: str | os.PathLike, *, weights: str = "auto", dtype: torch.dtype | None = None
) -> Path:
    """Write an st2he checkpoint folder (``config.json`` + ``model.safetensors``).

    ``weights="full"`` stores every weight; ``"delta"`` only what fine-tuning changes (needs the base to load);
    ``"auto"``: delta when the model was built from a named base, else full. ``dtype`` (e.g. ``torch.float16``)
    stores floating-point weights in that precision.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = model.metadata.get("base")
    if weights == "auto":
        weights = "delta" if base else "full"
    if weights == "delta" and not base:
        msg = "weights='delta' needs a model built from a named base (from_pretrained(base, ...))."
        raise ValueError(msg)
    if weights == "full":
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
    elif weights == "delta":
        state = _trainable_state(model)
        state.update({f"conv_in_pretrained.{k}": v for k, v in model.conv_in_pretrained.state_dict().items()})
    else:
        msg = f"weights must be 'auto', 'full' or 'delta', got {weights!r}."
        raise ValueError(msg)
    tensors = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous().clone()
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": FORMAT})
    tok = model.tokenizer
    tokenizer_spec = tok.to_config() if hasattr(tok, "to_config") else {"type": "clip", "from_base": True}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": weights,
        "base": base,
        "prompt": model.prompt,
        "architecture": {**model.config, "tokenizer": tokenizer_spec},
        # where the model in memory was read from is not part of what it is: a reload records its own folder
        "metadata": {k: v for k, v in model.metadata.items() if k != "checkpoint"},
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=1, default=_jsonable))
    return folder


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, tuple | set):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def is_st2he_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an st2he checkpoint folder (or its ``config.json`` / ``model.safetensors``).

    A ``config.json`` that is not valid JSON is an error (with its line and column) when ``path`` is its folder or one
    of the checkpoint's own files, rather than a reason to look for something else there.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        return False
    names_checkpoint = path.is_dir() or path.name in (CONFIG_NAME, WEIGHTS_NAME)
    try:
        config = _read_json(config_file)
    except ValueError:
        if names_checkpoint:
            raise
        return False
    except OSError:
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def _read_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error is reported with the file, line and column."""
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        msg = (
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. Fix the file or re-save "
            "the model (st2he.models.save_pretrained)."
        )
        raise ValueError(msg) from None


def _read_st2he_config(folder: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json``, checked: valid JSON, an st2he generator config, a format version we read."""
    path = folder / CONFIG_NAME
    try:
        config = _read_json(path)
    except OSError as err:
        msg = f"Could not read {path}: {err}. Re-save the model or give another checkpoint."
        raise ValueError(msg) from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        msg = f"{path} is not an st2he generator config (format {found!r}, expected {FORMAT!r})."
        raise ValueError(msg)
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        msg = (
            f"{path} has an unknown format_version {version!r} (this st2he reads format version {FORMAT_VERSION}). "
            "Re-save the model with st2he.models.save_pretrained."
        )
        raise ValueError(msg)
    if version > FORMAT_VERSION:
        msg = (
            f"{path} was written in format version {version} by a newer st2he; this st2he reads format version "
            f"{FORMAT_VERSION} and older. Upgrade st2he (pip install -U st2he) to load it."
        )
        raise ValueError(msg)
    return config


def _weights_file(folder: Path) -> Path:
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        msg = f"{weights} is missing: an st2he checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        raise FileNotFoundError(msg)
    return weights


def _weights_header(weights: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype of every tensor of a safetensors file, read from its header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(weights, framework="pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(int(n) for n in sl.get_shape()), str(sl.get_dtype()))
            return out
    except Exception as err:
        msg = f"Could not read {weights} ({type(err).__name__}: {err}); the file is corrupt or truncated."
        raise ValueError(msg) from err


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(weights)
    except Exception as err:
        msg = f"Could not read {weights} ({type(err).__name__}: {err}); the file is corrupt or truncated."
        raise ValueError(msg) from err


def _read_st2he(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` (checked) and every tensor of ``model.safetensors``."""
    config = _read_st2he_config(folder)
    return config, _read_weights(_weights_file(folder))


def read_model_config(folder: Path, *, fmt: str, max_version: int, kind: str, writers: str) -> dict[str, Any]:
    """``config.json`` of a model folder of format ``fmt``, checked: folder and file there, valid JSON, format, version.

    ``kind`` names the model in messages (``"expression model"``); ``writers`` names what writes such folders.
    """
    if not folder.is_dir():
        msg = (
            f"{kind.capitalize()} {folder} not found: give the folder that {writers} wrote (it holds {CONFIG_NAME} "
            f"and {WEIGHTS_NAME})."
        )
        raise FileNotFoundError(msg)
    path = folder / CONFIG_NAME
    if not path.is_file():
        msg = f"{path} is missing: an st2he {kind} folder holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        raise FileNotFoundError(msg)
    config = _read_json(path)
    if not isinstance(config, dict) or config.get("format") != fmt:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        msg = f"{path} is not an st2he {kind} config (format {found!r}, expected {fmt!r})."
        raise ValueError(msg)
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= max_version:
        msg = (
            f"{path} has format_version {version!r}; this st2he reads {kind}s of format version {max_version} and "
            "older. Upgrade st2he (pip install -U st2he) or re-save the model."
        )
        raise ValueError(msg)
    return config


def load_checked(folder: Path, build) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Build a model on the meta device with ``build()``, check it against the header of ``folder``'s weights tensor
    by tensor (no data read), then load its ``model.*`` tensors. Returns the model and every tensor of the file."""
    weights = _weights_file(folder)
    header = _weights_header(weights)
    try:
        with torch.device("meta"):
            skeleton = build()
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        msg = f"The architecture in {folder / CONFIG_NAME} cannot be built ({type(err).__name__}: {err})."
        raise ValueError(msg) from err
    own = skeleton.state_dict()
    _check_against_header(own, header, weights, prefix="model.")
    state = _read_weights(weights)
    skeleton.load_state_dict({k: _own_memory(state[f"model.{k}"], own[k].dtype) for k in own}, assign=True)
    return skeleton, state


_INT_DTYPES = ("BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64")


def _check_against_header(
    own: dict[str, torch.Tensor], header: dict[str, tuple[tuple[int, ...], str]], weights: Path, *, prefix: str
) -> None:
    """Check that each tensor of the model (built on the meta device) is in the file with its shape and kind of dtype."""
    missing, wrong = [], []
    for k, v in own.items():
        entry = header.get(prefix + k)
        if entry is None:
            missing.append(prefix + k)
            continue
        shape, dtype = entry
        if shape != tuple(v.shape):
            wrong.append(f"{prefix + k}: {shape} in the file, {tuple(v.shape)} from {CONFIG_NAME}")
        elif v.is_floating_point() == (dtype in _INT_DTYPES):
            wrong.append(f"{prefix + k}: dtype {dtype} in the file, {v.dtype} in the model")
    if wrong:
        listed = "\n  ".join(wrong[:10])
        msg = (
            f"{weights} does not fit the architecture in {weights.parent / CONFIG_NAME} ({len(wrong)} tensors differ), "
            f"e.g.:\n  {listed}\nThe two files do not belong together; re-save the model."
        )
        raise ValueError(msg)
    if missing:
        msg = f"{weights} lacks {len(missing)} weights of the model, e.g. {missing[:5]}; the file is incomplete."
        raise ValueError(msg)


def _check_lora_ranks(lora: dict[str, Any], header: dict[str, tuple[tuple[int, ...], str]], source) -> None:
    """The LoRA ranks of a config must be those of the stored ``lora_A`` weights (checked before the adapters exist)."""
    for part, key in (("unet", "rank_unet"), ("vae", "rank_vae")):
        ranks = {shape[0] for k, (shape, _) in header.items() if k.startswith(part + ".") and ".lora_A." in k and shape}
        rank = lora.get(key)
        try:
            fits = {int(rank)} == ranks
        except (TypeError, ValueError):
            fits = False
        if ranks and not fits:
            msg = (
                f"The LoRA rank {key}={rank!r} of {source} does not match its stored {part} LoRA weights (rank "
                f"{sorted(ranks)}); the checkpoint is inconsistent, re-save the model."
            )
            raise ValueError(msg)


def _build_from_config(config: dict[str, Any]) -> Pix2PixTurbo:
    from ._pix2pix import build_components

    arch = dict(config["architecture"])
    vae, unet, text_encoder, tokenizer, scheduler = build_components(arch, seed=None)
    return Pix2PixTurbo(
        vae,
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        arch,
        prompt=config.get("prompt") or default_prompt(None),
        metadata=config.get("metadata") or {},
        skip_init="default",
        add_lora=arch.get("lora", {}).get("enabled", True),
    )


def _load_st2he_full(folder: Path, config: dict, weights: Path) -> Pix2PixTurbo:
    """A model that stores every weight: built on the meta device, checked against the file's header, then loaded.

    No memory is allocated for the model before the architecture of ``config.json`` is known to fit the weights.
    """
    header = _weights_header(weights)
    try:
        with torch.device("meta"):
            skeleton = _build_from_config(config)
    except (TypeError, ValueError, KeyError) as err:
        msg = f"The architecture in {folder / CONFIG_NAME} cannot be built ({type(err).__name__}: {err})."
        raise ValueError(msg) from err
    own = skeleton.state_dict()
    _check_against_header(own, header, weights, prefix="model.")
    state = _read_weights(weights)
    sd = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    _warn_unmatched([k for k in sd if k not in own], "model", folder)
    # the file's tensors become the model's, each in memory of its own: a tensor left as a view into the
    # memory-mapped file is misaligned, and BLAS then takes other kernels (outputs off by ~1e-6, so a loaded
    # model would not reproduce the saved one's pictures byte for byte). Buffers no state dict holds are rebuilt.
    skeleton.load_state_dict({k: _own_memory(sd[k], own[k].dtype) for k in own}, assign=True)
    if _fill_unsaved_buffers(skeleton):
        # the noise schedule was computed on the meta device too
        skeleton.scheduler = type(skeleton.scheduler).from_config(skeleton.scheduler.config)
        return skeleton
    model = _build_from_config(config)  # a buffer we cannot rebuild: the model is built in memory and loaded
    model.load_state_dict({k: sd[k].to(own[k].dtype) for k in own})
    return model


def _own_memory(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` as ``dtype`` in a fresh (aligned) allocation, never a view into the weights file."""
    out = tensor.to(dtype)
    return out.clone() if out.data_ptr() == tensor.data_ptr() else out


def _fill_unsaved_buffers(model: torch.nn.Module) -> bool:
    """Give the non-persistent buffers left on the meta device their values; False if one is not known."""
    for name, buf in list(model.named_buffers()):
        if buf.device.type != "meta":
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr == "position_ids":  # CLIP's text embeddings: 0, 1, 2, ... along the last axis
            value = torch.arange(buf.shape[-1], dtype=buf.dtype).expand(buf.shape)
            owner.register_buffer(attr, value, persistent=False)
        else:
            return False
    return not any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])


def _apply_delta(model: Pix2PixTurbo, folder: Path, config: dict, state: dict[str, torch.Tensor]) -> Pix2PixTurbo:
    lora = config["architecture"].get("lora", {})
    model.add_lora(
        rank_unet=lora.get("rank_unet"),
        rank_vae=lora.get("rank_vae"),
        unet_target_modules=lora.get("unet_target_modules"),
        vae_target_modules=lora.get("vae_target_modules"),
        alpha_unet=lora.get("alpha_unet"),
        alpha_vae=lora.get("alpha_vae"),
    )
    parts = {"unet": {}, "vae": {}, "conv_in_pretrained": {}}
    other = []
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if head in parts:
            parts[head][rest] = v
        else:
            other.append(k)
    unmatched = [f"unet.{k}" for k in load_matching(model.unet, parts["unet"], what="UNet")]
    unmatched += [f"vae.{k}" for k in load_matching(model.vae, parts["vae"], what="VAE")]
    if parts["conv_in_pretrained"]:
        model.conv_in_pretrained.load_state_dict(parts["conv_in_pretrained"])
    _warn_unmatched(unmatched + other, "checkpoint", folder)
    model.prompt = config.get("prompt") or model.prompt
    model.metadata.update(config.get("metadata") or {})
    return model


def from_pretrained(
    base: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    *,
    tissue: str | None = None,
    prompt: str | None = None,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
) -> Pix2PixTurbo:
    """Load a generator.

    Parameters
    ----------
    base
        A diffusers-format Stable Diffusion folder or hub id (SD-Turbo: ``"stabilityai/sd-turbo"``, read from the
        local Hugging Face cache unless ``local_files_only=False``); or an st2he checkpoint folder; or the name of a
        generator shipped with st2he: ``"small"`` (the default) or ``"small-real"`` (see :data:`SHIPPED`). May be
        ``None`` when ``checkpoint`` is an st2he checkpoint that names its base or stores every weight.
    checkpoint
        A published ST2HE / pix2pix-turbo file (``CondGen.pkl``, ``UnCondGen.pkl``) or an st2he checkpoint folder.
    tissue, prompt
        The prompt: ``prompt`` verbatim, else ``"This is a {tissue} H&E image"``, else the checkpoint's own prompt,
        else ``"dapi2he"``. Use ``tissue`` with the conditional ``CondGen.pkl`` and neither with ``UnCondGen.pkl``.
    device, torch_dtype
        Where to put the model and the precision to load the base in.
    local_files_only
        Never touch the network (the default unless ``ST2HE_ALLOW_DOWNLOAD=1``).
    """
    if base is None and checkpoint is None:
        base = "small"
    if isinstance(base, str) and base in SHIPPED:
        if not is_st2he_checkpoint(SHIPPED[base]):
            msg = f"The shipped {base!r} model is missing from the installation ({SHIPPED[base]}); reinstall st2he."
            raise FileNotFoundError(msg)
        base = SHIPPED[base]
    # an st2he checkpoint given as base (or alone)
    st2he_ckpt = None
    if base is not None and is_st2he_checkpoint(base):
        if checkpoint is not None:
            msg = f"{base} is an st2he checkpoint, which holds its own weights; do not also pass checkpoint=."
            raise ValueError(msg)
        st2he_ckpt, base = base, None
    elif checkpoint is not None and is_st2he_checkpoint(checkpoint):
        st2he_ckpt = checkpoint
    if st2he_ckpt is not None:
        folder = Path(st2he_ckpt)
        folder = folder if folder.is_dir() else folder.parent
        config = _read_st2he_config(folder)
        weights = _weights_file(folder)
        if config.get("weights") == "full":
            model = _load_st2he_full(folder, config, weights)
        else:
            base = base if base is not None else config.get("base")
            if base is None:
                msg = f"{folder} stores only fine-tuned weights; pass the base model it was trained from (base=...)."
                raise ValueError(msg)
            _check_lora_ranks(config["architecture"].get("lora", {}), _weights_header(weights), folder)
            state = _read_weights(weights)
            model = _model_from_base(base, local_files_only=local_files_only, torch_dtype=torch_dtype)
            model = _apply_delta(model, folder, config, state)
        model.metadata["checkpoint"] = str(folder)  # the folder read, even when it was fine-tuned from another
    else:
        if base is None:
            msg = "Pass base= (the diffusers-format SD-Turbo folder or hub id) to load a published checkpoint."
            raise ValueError(msg)
        if checkpoint is not None:
            # check the file before loading a multi-GB base
            read_published(checkpoint)
        model = _model_from_base(base, local_files_only=local_files_only, torch_dtype=torch_dtype)
        if checkpoint is not None:
            load_published_into(model, checkpoint)
    if prompt is not None or tissue is not None:
        model.prompt = prompt if prompt is not None else default_prompt(tissue)
        if tissue is not None:
            model.metadata["tissue"] = tissue
    model._prompt_cache.clear()
    model.set_eval()
    if device is not None:
        model.to(device)
    return model


def _model_from_base(base, *, local_files_only=None, torch_dtype=None) -> Pix2PixTurbo:
    try:
        folder = resolve_base(base, local_files_only=local_files_only)
    except FileNotFoundError as err:
        import difflib

        name = os.fspath(base)
        close = difflib.get_close_matches(name, list(SHIPPED), n=1, cutoff=0.6)
        hint = f" Did you mean the shipped generator {close[0]!r}?" if close else ""
        shipped = ", ".join(map(repr, SHIPPED))
        msg = f"{err} st2he's shipped generators are named {shipped}.{hint}"
        raise FileNotFoundError(msg) from err.__cause__
    vae, unet, text_encoder, tokenizer, scheduler = load_base(folder, torch_dtype=torch_dtype)
    name = os.fspath(base)
    config = {
        "name": Path(name).name if Path(name).is_dir() else name,
        "vae": dict(vae.config),
        "unet": dict(unet.config),
        "text_encoder": {},
        "tokenizer": tokenizer.to_config() if hasattr(tokenizer, "to_config") else {"type": "clip"},
        "train_mode": "lora",
    }
    model = Pix2PixTurbo(
        vae, unet, text_encoder, tokenizer, scheduler, config, metadata={"base": name}, skip_init="constant"
    )
    return model


def load_model(model=None, *, device: str | torch.device | None = None, **kwargs) -> Pix2PixTurbo:
    """A :class:`Pix2PixTurbo` from ``None`` / ``"small"`` / ``"small-real"`` (shipped), a checkpoint path, a model."""
    if isinstance(model, Pix2PixTurbo):
        if device is not None:
            model.to(device)
        return model
    if model is None:
        model = "small"
    if isinstance(model, str | os.PathLike):
        return from_pretrained(model, device=device, **kwargs)
    msg = (
        f"model must be None, a shipped model's name ({', '.join(map(repr, SHIPPED))}), a checkpoint path or a "
        f"Pix2PixTurbo, got {type(model).__name__}."
    )
    raise TypeError(msg)
