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
  (LoRA weights, the UNet's ``conv_in``, the skip convolutions) and name their base.
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
SHIPPED = {"small": Path(__file__).parent / "weights" / "small"}

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
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            name,
            local_files_only=offline,
            allow_patterns=["*.json", "*.txt", "*.safetensors", "vae/*", "unet/*", "text_encoder/*", "tokenizer/*"],
        )
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


def read_published(path: str | os.PathLike) -> dict[str, Any]:
    """Read a pix2pix-turbo / ST2HE ``.pkl`` checkpoint safely (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        msg = (
            f"Checkpoint {path} not found. Give the path of a published ST2HE checkpoint (CondGen.pkl or "
            "UnCondGen.pkl) or of an st2he checkpoint folder."
        )
        raise FileNotFoundError(msg)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        msg = (
            f"Could not read {path} as a pix2pix-turbo checkpoint ({type(err).__name__}: {err}). The file is corrupt, "
            "truncated, or holds objects other than tensors (st2he never executes code from a checkpoint)."
        )
        raise ValueError(msg) from err
    if not isinstance(sd, dict) or any(k not in sd for k in PUBLISHED_KEYS):
        have = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
        msg = f"{path} is not a pix2pix-turbo checkpoint: it needs the entries {list(PUBLISHED_KEYS)}, it has {have}."
        raise ValueError(msg)
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
    model.metadata.setdefault("checkpoint", str(path))
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
        "metadata": model.metadata,
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
    """Whether ``path`` is an st2he checkpoint folder (or its ``config.json`` / ``model.safetensors``)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / CONFIG_NAME).is_file():
        return False
    try:
        return json.loads((folder / CONFIG_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _read_st2he(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as err:
        msg = f"Could not read {folder / CONFIG_NAME}: {err}. Re-save the model or give another checkpoint."
        raise ValueError(msg) from err
    if config.get("format") != FORMAT:
        msg = f"{folder / CONFIG_NAME} is not an st2he generator config (format {config.get('format')!r})."
        raise ValueError(msg)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        msg = f"{weights} is missing: an st2he checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        raise FileNotFoundError(msg)
    try:
        state = load_file(weights)
    except Exception as err:
        msg = f"Could not read {weights} ({type(err).__name__}: {err}); the file is corrupt or truncated."
        raise ValueError(msg) from err
    return config, state


def _load_st2he_full(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> Pix2PixTurbo:
    from ._pix2pix import build_components

    arch = dict(config["architecture"])
    vae, unet, text_encoder, tokenizer, scheduler = build_components(arch, seed=None)
    model = Pix2PixTurbo(
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
    own = model.state_dict()
    sd = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        msg = f"{folder / WEIGHTS_NAME} lacks {len(missing)} weights of the model, e.g. {missing[:5]}; the file is incomplete."
        raise ValueError(msg)
    _warn_unmatched(unexpected, "model", folder)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items() if k in own})
    return model


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
        local Hugging Face cache unless ``local_files_only=False``); or an st2he checkpoint folder; or ``"small"``
        for the model shipped with st2he. May be ``None`` when ``checkpoint`` is an st2he checkpoint that names its
        base or stores every weight.
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
        config, state = _read_st2he(folder)
        if config.get("weights") == "full":
            model = _load_st2he_full(folder, config, state)
        else:
            base = base if base is not None else config.get("base")
            if base is None:
                msg = f"{folder} stores only fine-tuned weights; pass the base model it was trained from (base=...)."
                raise ValueError(msg)
            model = _model_from_base(base, local_files_only=local_files_only, torch_dtype=torch_dtype)
            model = _apply_delta(model, folder, config, state)
        model.metadata.setdefault("checkpoint", str(folder))
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
    folder = resolve_base(base, local_files_only=local_files_only)
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
    """Return a :class:`Pix2PixTurbo` from ``None`` / ``"small"`` (the shipped model), a checkpoint path, or a model."""
    if isinstance(model, Pix2PixTurbo):
        if device is not None:
            model.to(device)
        return model
    if model is None:
        model = "small"
    if isinstance(model, str | os.PathLike):
        return from_pretrained(model, device=device, **kwargs)
    msg = f"model must be None, 'small', a checkpoint path or a Pix2PixTurbo, got {type(model).__name__}."
    raise TypeError(msg)
