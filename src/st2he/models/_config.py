"""The pix2pix-turbo config family: ``tiny`` (tests), ``small`` (shipped with st2he) and ``sd-turbo`` (SD-Turbo's shape).

A config is a plain JSON-serialisable dict with one sub-dict per part, holding the keyword arguments of the
diffusers / transformers classes that build it (``AutoencoderKL``, ``UNet2DConditionModel``, ``CLIPTextConfig``),
plus the tokenizer, the LoRA set-up and the one-step scheduler. Nothing here imports torch.
"""

from __future__ import annotations

import copy
from typing import Any

#: LoRA target modules of pix2pix-turbo (Parmar et al. 2024), matched by peft against module names.
UNET_LORA_TARGETS = [
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "conv",
    "conv1",
    "conv2",
    "conv_shortcut",
    "conv_out",
    "proj_in",
    "proj_out",
    "ff.net.2",
    "ff.net.0.proj",
]
VAE_LORA_TARGETS_BASE = [
    "conv1",
    "conv2",
    "conv_in",
    "conv_shortcut",
    "conv",
    "conv_out",
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
]

#: The one-step scheduler: SD-Turbo's noise schedule (a DDPM schedule evaluated once at t=999).
SCHEDULER_SD_TURBO: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}

TISSUE_PROMPT = "This is a {tissue} H&E image"
UNCONDITIONAL_PROMPT = "dapi2he"


def vae_lora_targets(n_blocks: int) -> list[str]:
    """pix2pix-turbo's VAE LoRA targets, with one ``skip_conv_i`` per encoder down block."""
    targets = list(VAE_LORA_TARGETS_BASE)
    insert_at = targets.index("conv_out") + 1
    targets[insert_at:insert_at] = [f"skip_conv_{i + 1}" for i in range(n_blocks)]
    return targets


def _vae(block_out_channels, layers_per_block, norm_num_groups, sample_size, scaling_factor=0.18215) -> dict:
    n = len(block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": layers_per_block,
        "latent_channels": 4,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
    }


def _unet(
    block_out_channels, layers_per_block, cross_attention_dim, attention_head_dim, norm_num_groups, sample_size
) -> dict:
    n = len(block_out_channels)
    down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": layers_per_block,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": attention_head_dim,
        "norm_num_groups": norm_num_groups,
        "use_linear_projection": True,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def _text(vocab_size, hidden_size, intermediate_size, layers, heads, max_len, act="gelu") -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": max_len,
        "hidden_act": act,
        "projection_dim": hidden_size,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }


def _hashing_tokenizer(vocab_size: int, max_length: int) -> dict:
    return {"type": "hashing-word", "vocab_size": vocab_size, "model_max_length": max_length}


CONFIGS: dict[str, dict[str, Any]] = {
    # a few thousand parameters per part: CPU tests in well under a second per call
    "tiny": {
        "vae": _vae((8, 16, 16, 16), 1, 4, 64),
        "unet": _unet((16, 32), 1, 16, 4, 8, 8),
        "text_encoder": _text(1024, 16, 32, 1, 2, 16),
        "tokenizer": _hashing_tokenizer(1024, 16),
        "lora": {"rank_unet": 8, "rank_vae": 4, "alpha_unet": 8, "alpha_vae": 8},
        "train_mode": "full",
    },
    # the model shipped with st2he: ~5 M parameters, 256 px tiles, about a minute per demo sample on 2 CPU cores
    "small": {
        "vae": _vae((32, 64, 128, 128), 1, 16, 256),
        "unet": _unet((32, 64, 128), 1, 64, 8, 16, 32),
        "text_encoder": _text(4096, 64, 128, 1, 4, 16),
        "tokenizer": _hashing_tokenizer(4096, 16),
        # trained from scratch, every weight: LoRA adapters would only slow training (add them to fine-tune later)
        "lora": {"rank_unet": 8, "rank_vae": 4, "alpha_unet": 8, "alpha_vae": 8, "enabled": False},
        "train_mode": "full",
    },
    # SD-Turbo (Stable Diffusion 2.1 shape): load its weights with from_pretrained("stabilityai/sd-turbo");
    # built from this config it has random weights (for timing only) and a hashing tokenizer of CLIP's vocab size
    "sd-turbo": {
        "vae": _vae((128, 256, 512, 512), 2, 32, 768),
        "unet": {
            **_unet((320, 640, 1280, 1280), 2, 1024, [5, 10, 20, 20], 32, 96),
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        },
        "text_encoder": _text(49408, 1024, 4096, 23, 16, 77),
        "tokenizer": _hashing_tokenizer(49408, 77),
        "lora": {"rank_unet": 8, "rank_vae": 4, "alpha_unet": 8, "alpha_vae": 8},
        "train_mode": "lora",
    },
}


def get_config(name: str | dict) -> dict[str, Any]:
    """Return a deep copy of config ``name`` (``"tiny"``, ``"small"``, ``"sd-turbo"``), or of a given config dict, completed."""
    if isinstance(name, dict):
        config = copy.deepcopy(name)
    else:
        if name not in CONFIGS:
            msg = f"Unknown model config {name!r}; choose one of {sorted(CONFIGS)} or pass a config dict."
            raise ValueError(msg)
        config = copy.deepcopy(CONFIGS[name])
        config["name"] = name
    for part in ("vae", "unet", "text_encoder", "tokenizer"):
        if part not in config:
            msg = f"A model config needs a {part!r} section."
            raise ValueError(msg)
    config.setdefault("name", "custom")
    config.setdefault("scheduler", dict(SCHEDULER_SD_TURBO))
    lora = config.setdefault("lora", {})
    lora.setdefault("rank_unet", 8)
    lora.setdefault("rank_vae", 4)
    lora.setdefault("alpha_unet", 8)
    lora.setdefault("alpha_vae", 8)
    lora.setdefault("unet_target_modules", list(UNET_LORA_TARGETS))
    lora.setdefault("vae_target_modules", vae_lora_targets(len(config["vae"]["block_out_channels"])))
    config.setdefault("train_mode", "full")
    return config
