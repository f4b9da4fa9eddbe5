"""The super-resolution model: a conditional diffusion model over gene maps on a grid of bins (issue 11, HaDM-ST).

Design (after HaDM-ST, arXiv 2508.07225, and Diff-ST, XiaofeiWang2018/Diffusion-ST; nothing copied):

- **what is generated**: G gene channels on the bin grid (one pixel per bin of ``bin_size`` µm), as
  ``log1p(counts per bin) / scale`` with one ``scale`` per gene (the standard deviation over the training bins,
  stored in the config). The diffusion runs on the *residual* ``x0 - base``, where ``base`` is the best estimate
  the conditions give without learning: the expression model's rescaled prediction when the model uses one, else
  the low-resolution map itself. The denoiser's last convolution starts at zero, so an untrained model returns the
  base (the ``"regression"`` or the flat answer) and training only has to improve on it.
- **conditions**, concatenated to the noisy residual as channels: (a) the low-resolution map (each bin's unit's
  counts per bin area, ``log1p`` and scaled, flat inside a unit) and a mask of the bins inside units; (b) expression-
  relevant image features (HaDM-ST's *semantic distillation*): a small convolutional encoder over the guidance
  pixels (``subpixels`` per bin edge) pooled to the bin grid by two stride-2 convolutions and, when the config says
  so, the dense prediction of an st2he expression model (:class:`~st2he.models.ExpressionModel`) as G more channels;
  (c) the **alignment module**: a small network predicting a bounded 2-channel offset field (at most
  ``max_shift`` bins) that warps the image-derived channels with :func:`torch.nn.functional.grid_sample` (zero at
  start: the identity);
- **denoiser**: diffusers' ``UNet2DModel`` predicting the clean residual (``prediction_type="sample"``, x0
  prediction: the one-step mode and the adversarial loss use it directly), trained with ``DDPMScheduler``
  (``squaredcos_cap_v2``, 1000 steps) and sampled with ``DDIMScheduler`` (``timestep_spacing="trailing"``, so the
  first step starts from pure noise at ``t = T - 1``); ``steps=1`` is the one-step mode (x0 predicted at ``t = T-1``);
- **channel-aware adversarial loss** (training only): a small patch discriminator shared over groups of
  ``group_size`` genes, seeing a group's maps, the same genes' low-resolution map, the mask and a learned embedding
  of the group; hinge loss on the predicted x0 with a small weight.

Each of ``features``, ``alignment`` and ``adversarial`` can be switched off in the config. Nothing here imports
spatialdata.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

FORMAT = "st2he-super-resolution-model"
FORMAT_VERSION = 1
#: Where the shipped super-resolution model lives (``config.json`` + ``model.safetensors``), if one is shipped.
SHIPPED_SUPER_RESOLUTION = Path(__file__).parent / "weights" / "super_resolution"
#: Sizes: the denoiser's U-Net levels and blocks, image-feature channels, encoder width, window (bins) and attention.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"unet_channels": (32, 64), "layers_per_block": 1, "feature_channels": 8, "encoder_channels": 16,
             "window": 32, "attention": False},
    "small": {"unet_channels": (64, 96, 128), "layers_per_block": 1, "feature_channels": 16, "encoder_channels": 32,
              "window": 32, "attention": False},
    "large": {"unet_channels": (128, 256, 256, 512), "layers_per_block": 2, "feature_channels": 32,
              "encoder_channels": 64, "window": 64, "attention": True},
}
NUM_TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"
PREDICTION_TYPE = "sample"


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class SemanticEncoder(nn.Module):
    """Guidance pixels ``(B, 3, s*H, s*W)`` -> expression-relevant features ``(B, F, H, W)`` (``s`` = 4: two stride-2
    convolutions)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, subpixels: int) -> None:
        super().__init__()
        n_down = int(round(math.log2(subpixels)))
        if 2**n_down != subpixels:
            msg = f"subpixels must be a power of 2, got {subpixels}."
            raise ValueError(msg)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(_groups(width), width),
                                   nn.SiLU()]
        for _ in range(n_down):
            layers += [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GroupNorm(_groups(width), width), nn.SiLU()]
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(_groups(width), width), nn.SiLU(),
                   nn.Conv2d(width, out_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


class AlignmentModule(nn.Module):
    """A bounded offset field (in bins, at most ``max_shift``) warping image-derived channels onto the ST grid."""

    def __init__(self, in_channels: int, max_shift: float, hidden: int = 32) -> None:
        super().__init__()
        self.max_shift = float(max_shift)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(), nn.Conv2d(hidden, 2, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def offsets(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 2, H, W)`` offsets in bins (x, y), in ``[-max_shift, max_shift]``."""
        return torch.tanh(self.net(x)) * self.max_shift

    @staticmethod
    def warp(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Sample ``x`` at each bin's position plus its offset (bilinear, borders repeated)."""
        b, _, h, w = x.shape
        ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h * 2 - 1
        xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w * 2 - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([gx, gy], dim=-1)[None].expand(b, h, w, 2)
        shift = torch.stack([offsets[:, 0] * 2 / w, offsets[:, 1] * 2 / h], dim=-1)
        return F.grid_sample(x, grid + shift, mode="bilinear", padding_mode="border", align_corners=False)


class GroupDiscriminator(nn.Module):
    """Channel-aware patch discriminator: one network over groups of ``group_size`` genes, told which group it sees."""

    def __init__(self, n_genes: int, group_size: int, width: int = 32, embed: int = 4) -> None:
        super().__init__()
        self.group_size = int(group_size)
        self.n_groups = math.ceil(n_genes / self.group_size)
        self.embedding = nn.Embedding(self.n_groups, embed)
        c = 2 * self.group_size + 1 + embed
        self.net = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.GroupNorm(_groups(2 * width), 2 * width),
            nn.LeakyReLU(0.2), nn.Conv2d(2 * width, 1, 3, padding=1),
        )

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, g, h, w = x.shape
        pad = self.n_groups * self.group_size - g
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.reshape(b * self.n_groups, self.group_size, h, w)

    def forward(self, x0: torch.Tensor, low: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Patch logits ``(B * n_groups, 1, H/2, W/2)`` for gene maps ``x0`` given the low-resolution map and mask."""
        b, _, h, w = x0.shape
        groups = torch.arange(self.n_groups, device=x0.device).repeat(b)
        emb = self.embedding(groups)[:, :, None, None].expand(-1, -1, h, w)
        m = mask.repeat_interleave(self.n_groups, dim=0)
        return self.net(torch.cat([self._split(x0), self._split(low), m, emb], dim=1))


class SuperResolutionModel(nn.Module):
    """Conditional diffusion model of gene maps on a bin grid; see the module notes.

    Build it with :func:`build_super_resolution_model`; save and load with :func:`save_super_resolution_model` /
    :func:`load_super_resolution_model`; use it with ``st2he.tl.super_resolve(method="diffusion", model=...)``.
    ``model.config`` is the JSON-able architecture (genes, per-gene scales, switches, sizes, bin size);
    ``model.metadata`` the training summary.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.config = copy.deepcopy(config)
        c = self.config
        g = len(c["genes"])
        if len(c["scales"]) != g:
            msg = f"The config has {len(c['scales'])} scales for {g} genes."
            raise ValueError(msg)
        self.register_buffer("scales", torch.tensor(c["scales"], dtype=torch.float32))
        fc = int(c["feature_channels"])
        self.encoder = SemanticEncoder(3, int(c["encoder_channels"]), fc, int(c["subpixels"])) if c["features"] else None
        image_ch = (fc if c["features"] else 0) + (g if c["expression"] else 0)
        self.alignment = None
        if c["alignment"] and image_ch:
            self.alignment = AlignmentModule(image_ch + g + 1, float(c["max_shift"]))
        channels = tuple(int(v) for v in c["unet_channels"])
        n = len(channels)
        attention = bool(c.get("attention"))
        down = ("DownBlock2D",) + (("AttnDownBlock2D",) if attention else ("DownBlock2D",)) * (n - 1)
        up = (("AttnUpBlock2D",) if attention else ("UpBlock2D",)) * (n - 1) + ("UpBlock2D",)
        self.unet = UNet2DModel(
            sample_size=None,
            in_channels=g + g + 1 + image_ch,
            out_channels=g,
            block_out_channels=channels,
            layers_per_block=int(c["layers_per_block"]),
            down_block_types=down,
            up_block_types=up,
            norm_num_groups=min(8, *channels),
            add_attention=attention,
        )
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)
        self.multiple = 2 ** (n - 1)
        self.discriminator = GroupDiscriminator(g, int(c["group_size"])) if c["adversarial"] else None
        self.metadata: dict[str, Any] = {}
        # the ExpressionModel giving the expression channels: not a submodule, so not part of the state (it is saved
        # on its own, and the config names it), of the optimiser's parameters or of .to()
        object.__setattr__(self, "_expression", None)

    # ------------------------------------------------------------------ properties

    @property
    def genes(self) -> list[str]:
        return list(self.config["genes"])

    @property
    def bin_size(self) -> float:
        return float(self.config["bin_size"])

    @property
    def uses_expression(self) -> bool:
        return bool(self.config["expression"])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"genes={len(c['genes'])}, size={c['size']!r}, bin_size={c['bin_size']:g}, features={c['features']}, "
            f"expression={c['expression']}, alignment={c['alignment']}, adversarial={c['adversarial']}"
        )

    def expression_model(self):
        """The expression model of the expression channels (loaded from the config's source when first asked)."""
        if not self.uses_expression:
            return None
        if self._expression is None:
            from ._expression import SHIPPED_EXPRESSION, load_expression_model

            source = self.config.get("expression_model")
            path = SHIPPED_EXPRESSION if source in (None, "shipped") else Path(source)
            if not (Path(path) / "config.json").is_file():
                msg = (
                    f"The super-resolution model needs its expression model, {path}, which is not there: give it as "
                    "model.set_expression_model(st2he.models.load_expression_model(path))."
                )
                raise FileNotFoundError(msg)
            object.__setattr__(self, "_expression", load_expression_model(path))
        return self._expression

    def set_expression_model(self, expression) -> None:
        """Use ``expression`` (an :class:`~st2he.models.ExpressionModel`) for the expression channels."""
        missing = [g for g in self.genes if g not in expression.genes]
        if missing:
            msg = f"The expression model does not predict {len(missing)} genes of the super-resolution model: {missing[:5]}."
            raise ValueError(msg)
        object.__setattr__(self, "_expression", expression)

    # ------------------------------------------------------------------ forward

    def condition(
        self,
        low: torch.Tensor,
        mask: torch.Tensor,
        pixels: torch.Tensor | None = None,
        expression: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditioning channels and the base estimate.

        ``low``: ``(B, G, H, W)`` scaled log1p low-resolution map; ``mask``: ``(B, 1, H, W)``; ``pixels``:
        ``(B, 3, s*H, s*W)`` guidance in ``[-1, 1]`` (``features``); ``expression``: ``(B, G, H, W)`` scaled log1p
        rescaled expression-model estimate (``expression``). Returns ``(cond, base)``.
        """
        image = []
        if self.encoder is not None:
            if pixels is None:
                msg = "This super-resolution model reads image features: pass the guidance pixels."
                raise ValueError(msg)
            image.append(self.encoder(pixels))
        if self.uses_expression:
            if expression is None:
                msg = "This super-resolution model reads an expression model's prediction: pass it."
                raise ValueError(msg)
            image.append(expression)
        if image:
            image_t = torch.cat(image, dim=1)
            if self.alignment is not None:
                off = self.alignment.offsets(torch.cat([image_t, low, mask], dim=1))
                image_t = AlignmentModule.warp(image_t, off)
            cond = torch.cat([low, mask, image_t], dim=1)
        else:
            cond = torch.cat([low, mask], dim=1)
        if self.uses_expression:
            base = cond[:, -low.shape[1]:]  # the (warped) expression estimate
        else:
            base = low
        return cond, base

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The predicted clean residual from the noisy residual ``x_t`` at timesteps ``t``."""
        return self.unet(torch.cat([x_t, cond], dim=1), t).sample

    def forward(self, x_t, t, low, mask, pixels=None, expression=None) -> torch.Tensor:
        """Predicted x0 (scaled log1p gene maps): ``base + denoise(x_t, t, cond)``."""
        cond, base = self.condition(low, mask, pixels, expression)
        return base + self.denoise(x_t, t, cond)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        low: torch.Tensor,
        mask: torch.Tensor,
        pixels: torch.Tensor | None = None,
        expression: torch.Tensor | None = None,
        *,
        steps: int = 10,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sampled x0 (scaled log1p gene maps, ``(B, G, H, W)``): DDIM in ``steps`` steps, or one step (``steps=1``).

        ``noise`` (the starting point, ``(B, G, H, W)``) or ``generator`` make the sample reproducible.
        """
        steps = int(steps)
        if steps < 1:
            msg = f"steps must be at least 1, got {steps}."
            raise ValueError(msg)
        cond, base = self.condition(low, mask, pixels, expression)
        if noise is None:
            noise = torch.randn(base.shape, generator=generator, device="cpu", dtype=torch.float32)
        x = noise.to(base.device, base.dtype)
        t_max = NUM_TRAIN_TIMESTEPS - 1
        if steps == 1:
            t = torch.full((x.shape[0],), t_max, device=x.device, dtype=torch.long)
            return base + self.denoise(x, t, cond)
        scheduler = ddim_scheduler()
        scheduler.set_timesteps(steps, device=x.device)
        r0 = None
        for t in scheduler.timesteps:
            tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
            r0 = self.denoise(x, tt, cond)
            out = scheduler.step(r0, t, x)
            x, r0 = out.prev_sample, out.pred_original_sample
        return base + r0


def ddpm_scheduler():
    """The training noise schedule."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE, prediction_type=PREDICTION_TYPE,
        clip_sample=False,
    )


def ddim_scheduler():
    """The sampler: DDIM, trailing timesteps (the first step at ``T - 1``), deterministic (``eta = 0``)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE, prediction_type=PREDICTION_TYPE,
        clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True,
    )


def build_super_resolution_model(
    size: str = "tiny",
    *,
    genes: Sequence[str],
    scales: Sequence[float] | None = None,
    features: bool = True,
    alignment: bool = True,
    adversarial: bool = True,
    expression: bool = False,
    expression_model: str | None = None,
    bin_size: float = 8.0,
    subpixels: int = 4,
    guidance: str = "he",
    max_shift: float = 1.0,
    group_size: int = 8,
    window: int | None = None,
    seed: int | None = 0,
) -> SuperResolutionModel:
    """A new (untrained) super-resolution model.

    Parameters
    ----------
    size
        ``"tiny"`` (tests: seconds), ``"small"`` (the shipped one: CPU) or ``"large"`` (GPU); see :data:`SIZES`.
    genes
        The genes generated (one channel each).
    scales
        Per-gene scale of ``log1p(counts per bin)`` (default 1; training sets the standard deviation over its bins).
    features, alignment, adversarial
        Switch the semantic image encoder, the alignment module and the adversarial discriminator on or off.
    expression
        Condition on an expression model's dense prediction as well (``expression_model``: ``"shipped"`` for the
        expression model shipped with st2he, or the folder of a saved one; or set it with ``set_expression_model``).
    bin_size
        µm per bin of the maps the model generates.
    subpixels
        Guidance pixels per bin edge read by the encoder (a power of 2).
    guidance
        ``"he"`` (an RGB H&E) or ``"grey"`` (a single-channel stain, repeated over 3 channels).
    max_shift
        Largest offset of the alignment module, in bins.
    group_size
        Genes per group of the discriminator.
    window
        Bins per window edge at inference (and training crops); default by size.
    seed
        Seed of the initial weights (``None``: torch's global generator).
    """
    if size not in SIZES:
        msg = f"size must be one of {tuple(SIZES)}, got {size!r}."
        raise ValueError(msg)
    genes = [str(g) for g in genes]
    if not genes or len(set(genes)) != len(genes):
        msg = "genes must be a non-empty list of distinct gene names."
        raise ValueError(msg)
    if guidance not in ("he", "grey"):
        msg = f"guidance must be 'he' or 'grey', got {guidance!r}."
        raise ValueError(msg)
    spec = SIZES[size]
    window = int(window or spec["window"])
    multiple = 2 ** (len(spec["unet_channels"]) - 1)
    if window < 2 * multiple or window % multiple:
        msg = f"window must be a multiple of {multiple} bins and at least {2 * multiple}, got {window}."
        raise ValueError(msg)
    config = {
        "genes": genes,
        "scales": [float(s) for s in (scales if scales is not None else [1.0] * len(genes))],
        "size": size,
        "features": bool(features),
        "alignment": bool(alignment),
        "adversarial": bool(adversarial),
        "expression": bool(expression),
        "expression_model": None if not expression else (str(expression_model) if expression_model else "shipped"),
        "bin_size": float(bin_size),
        "subpixels": int(subpixels),
        "guidance": guidance,
        "max_shift": float(max_shift),
        "group_size": int(group_size),
        "window": window,
        "unet_channels": list(spec["unet_channels"]),
        "layers_per_block": int(spec["layers_per_block"]),
        "feature_channels": int(spec["feature_channels"]),
        "encoder_channels": int(spec["encoder_channels"]),
        "attention": bool(spec["attention"]),
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "beta_schedule": BETA_SCHEDULE,
        "prediction_type": PREDICTION_TYPE,
        "target": "log1p counts per bin / scale; diffusion on the residual to the base",
    }
    if seed is None:
        return SuperResolutionModel(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SuperResolutionModel(config)


# --------------------------------------------------------------------------------------------- saving and loading


def save_super_resolution_model(
    model: SuperResolutionModel, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``path/model.safetensors`` (weights; ``dtype=torch.float16`` halves the file) and ``path/config.json``."""
    from safetensors.torch import save_file

    from ._expression import _jsonable
    from ._io import CONFIG_NAME, WEIGHTS_NAME

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous().clone()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[f"model.{k}"] = v
    meta = {**model.metadata, **(metadata or {})}
    meta.pop("checkpoint", None)  # where the model in memory was read from; a reload records its own folder
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "genes": model.genes,
        "architecture": model.config,
        "metadata": json.loads(json.dumps(meta, default=_jsonable)),
    }
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": FORMAT})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return folder


def load_super_resolution_model(
    path: str | os.PathLike, *, device: str | torch.device | None = None
) -> SuperResolutionModel:
    """Read a model written by :func:`save_super_resolution_model`, in eval mode (float32).

    A missing folder or file fails at once naming it; the architecture is checked tensor by tensor against the
    safetensors header before any weight is read. Nothing is downloaded.
    """
    from ._io import load_checked, read_model_config

    folder = Path(os.fspath(path)).expanduser()
    config = read_model_config(
        folder, fmt=FORMAT, max_version=FORMAT_VERSION, kind="super-resolution model",
        writers="save_super_resolution_model or st2he.tl.train_super_resolution",
    )
    model, _ = load_checked(folder, lambda: SuperResolutionModel(config["architecture"]))
    model.metadata = dict(config.get("metadata") or {})
    model.metadata["checkpoint"] = str(folder)
    model.eval()
    if device is not None:
        model.to(device)
    return model

