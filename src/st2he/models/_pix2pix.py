"""The one-step pix2pix-turbo generator (Parmar et al., 2024) that ST2HE fine-tunes, built from diffusers and peft parts.

Layout (module paths as in pix2pix-turbo, so its checkpoints load by name):

* ``vae``: a diffusers ``AutoencoderKL``. Its encoder keeps the activation entering each down block; 1x1 convolutions
  ``vae.decoder.skip_conv_1 .. skip_conv_n`` add them (deepest first) to the input of the matching decoder up block.
* ``unet``: a diffusers ``UNet2DConditionModel``, evaluated once at ``t = 999``; the clean latent is predicted from its
  output with the noise schedule of the one-step ``DDPMScheduler`` (SD-Turbo's schedule).
* ``text_encoder``: a transformers ``CLIPTextModel`` (frozen) for the prompt, "This is a {tissue} H&E image" for the
  tissue-conditional model or "dapi2he" for the tissue-independent one.
* LoRA adapters from peft: ``"default"`` on the UNet (rank 8) and ``"vae_skip"`` on the VAE (rank 4, the skip
  convolutions included), target modules as in pix2pix-turbo.

Deterministic mode: latent of the input -> UNet -> predicted clean latent -> decoder with skips. Stochastic mode
(``r < 1``): as pix2pix-turbo, the LoRA weights of UNet and VAE are first scaled by ``r`` (so the input is encoded
with the scaled VAE adapters), the UNet input is ``r * latent + (1 - r) * noise``, the UNet's first convolution
blends the pretrained and fine-tuned kernels by ``r`` and the skip activations are scaled by ``r``.

This module imports neither spatialdata nor anything else from st2he outside :mod:`st2he.models`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np
import torch
from torch import nn

from ._config import TISSUE_PROMPT, UNCONDITIONAL_PROMPT, get_config

T_ONE_STEP = 999


def _import_diffusers():
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - diffusers is a dependency
        msg = "st2he.models needs diffusers (pip install diffusers)."
        raise ImportError(msg) from err
    return diffusers


def build_components(config: dict[str, Any], *, seed: int | None = 0):
    """Randomly initialised ``(vae, unet, text_encoder, tokenizer, scheduler)`` of a config (no skips, no LoRA)."""
    diffusers = _import_diffusers()
    from transformers import CLIPTextConfig, CLIPTextModel

    from ._tokenizer import build_tokenizer

    config = get_config(config)
    devnull = contextlib.nullcontext()
    ctx = torch.random.fork_rng(devices=[]) if seed is not None else devnull
    with ctx:
        if seed is not None:
            torch.manual_seed(seed)
        vae = diffusers.AutoencoderKL.from_config(config["vae"])
        unet = diffusers.UNet2DConditionModel.from_config(config["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
    tokenizer = build_tokenizer(config["tokenizer"])
    scheduler = diffusers.DDPMScheduler.from_config(config["scheduler"])
    return vae, unet, text_encoder.eval(), tokenizer, scheduler


def default_prompt(tissue: str | None) -> str:
    """Return ``"This is a {tissue} H&E image"`` (conditional) or ``"dapi2he"`` (tissue-independent, ``tissue=None``)."""
    return UNCONDITIONAL_PROMPT if tissue is None else TISSUE_PROMPT.format(tissue=tissue)


class Pix2PixTurbo(nn.Module):
    """One-step image-to-image diffusion generator (pix2pix-turbo) for virtual H&E.

    Build one with :meth:`from_config` (random weights, e.g. ``"small"`` before training),
    :func:`st2he.models.from_pretrained` (SD-Turbo plus a published ST2HE checkpoint, or an st2he checkpoint) or
    :func:`st2he.models.load_model`.

    Parameters
    ----------
    vae, unet, text_encoder, tokenizer, scheduler
        The diffusers / transformers parts (an ``AutoencoderKL`` without skip convolutions, a
        ``UNet2DConditionModel``, a ``CLIPTextModel``, its tokenizer and a ``DDPMScheduler``).
    config
        The model config (see :mod:`st2he.models._config`); its ``lora`` section sets the adapters.
    prompt
        The text prompt; default ``"dapi2he"``.
    metadata
        What the model was trained with: ``palette``, ``pixel_size``, ``tile_size``, ``tissue``, training history...
    add_lora
        Add fresh LoRA adapters (zero-initialised B, so they start as a no-op).
    skip_init
        Initial weight of the skip convolutions: ``"constant"`` (1e-5, pix2pix-turbo's choice for a pretrained VAE)
        or ``"default"`` (PyTorch's initialisation, for models trained from scratch).
    """

    def __init__(
        self,
        vae,
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        config: dict[str, Any],
        *,
        prompt: str = UNCONDITIONAL_PROMPT,
        metadata: dict[str, Any] | None = None,
        add_lora: bool = True,
        skip_init: str = "constant",
    ) -> None:
        super().__init__()
        self.config = get_config(config)
        self.vae = vae
        self.unet = unet
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.prompt = prompt
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.use_skips = True
        self._lock = threading.RLock()
        self._prompt_cache: dict[tuple, torch.Tensor] = {}
        self._r: float | None = None
        self._compiled = None
        # the first convolution of the UNet as it was before fine-tuning, blended in by the stochastic mode
        self.conv_in_pretrained = _copy_conv(unet.conv_in).requires_grad_(False)
        self.unet.conv_in.register_forward_hook(self._blend_conv_in)
        self._attach_skip_convs(skip_init)
        if add_lora:
            self.add_lora()
        self.config["lora"]["enabled"] = bool(add_lora)
        # keep the config's record of the architecture in step with the parts
        self.config["vae"] = _plain_config(vae.config)
        self.config["unet"] = _plain_config(unet.config)
        self.config["text_encoder"] = _text_config(text_encoder.config)
        self.config["scheduler"] = _plain_config(scheduler.config)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        config: str | dict = "small",
        *,
        seed: int = 0,
        prompt: str | None = None,
        tissue: str | None = None,
        lora: bool | None = None,
        **metadata,
    ) -> Pix2PixTurbo:
        """Build a randomly initialised model of config ``"tiny"``, ``"small"``, ``"sd-turbo"`` or a config dict."""
        config = get_config(config)
        vae, unet, text_encoder, tokenizer, scheduler = build_components(config, seed=seed)
        skip_init = "default" if config.get("train_mode") == "full" else "constant"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            model = cls(
                vae,
                unet,
                text_encoder,
                tokenizer,
                scheduler,
                config,
                prompt=prompt or default_prompt(tissue),
                metadata={"tissue": tissue, **metadata},
                skip_init=skip_init,
                add_lora=config["lora"].get("enabled", True) if lora is None else lora,
            )
        return model

    def _skip_channels(self) -> list[tuple[int, int]]:
        """(in, out) channels of ``skip_conv_1..n``: encoder down-block inputs (deepest first) -> decoder up-block inputs."""
        boc = list(self.vae.config.block_out_channels)
        enc_in = [boc[0]] + boc[:-1]  # channels entering each encoder down block
        rev = boc[::-1]
        dec_in = [rev[0]] + rev[:-1]  # channels entering each decoder up block
        return [(enc_in[::-1][i], dec_in[i]) for i in range(len(boc))]

    def _attach_skip_convs(self, init: str) -> None:
        for i, (c_in, c_out) in enumerate(self._skip_channels()):
            name = f"skip_conv_{i + 1}"
            if hasattr(self.vae.decoder, name):
                continue
            conv = nn.Conv2d(c_in, c_out, kernel_size=1, stride=1, bias=False)
            if init == "constant":
                nn.init.constant_(conv.weight, 1e-5)
            setattr(self.vae.decoder, name, conv)

    @property
    def n_skips(self) -> int:
        return len(self.vae.config.block_out_channels)

    def add_lora(
        self,
        *,
        rank_unet: int | None = None,
        rank_vae: int | None = None,
        unet_target_modules: list[str] | None = None,
        vae_target_modules: list[str] | None = None,
        alpha_unet: float | None = None,
        alpha_vae: float | None = None,
    ) -> None:
        """Add the peft LoRA adapters (``"default"`` on the UNet, ``"vae_skip"`` on the VAE), replacing existing ones."""
        from peft import LoraConfig

        lora = self.config["lora"]
        for key, value in (
            ("rank_unet", rank_unet),
            ("rank_vae", rank_vae),
            ("unet_target_modules", unet_target_modules),
            ("vae_target_modules", vae_target_modules),
            ("alpha_unet", alpha_unet),
            ("alpha_vae", alpha_vae),
        ):
            if value is not None:
                lora[key] = list(value) if isinstance(value, list | tuple) else value
        if self.has_lora:
            self.unet.delete_adapters("default")
            self.vae.delete_adapters("vae_skip")
        unet_cfg = LoraConfig(
            r=int(lora["rank_unet"]),
            lora_alpha=lora["alpha_unet"],
            init_lora_weights="gaussian",
            target_modules=list(lora["unet_target_modules"]),
        )
        vae_cfg = LoraConfig(
            r=int(lora["rank_vae"]),
            lora_alpha=lora["alpha_vae"],
            init_lora_weights="gaussian",
            target_modules=list(lora["vae_target_modules"]),
        )
        self.vae.add_adapter(vae_cfg, adapter_name="vae_skip")
        self.unet.add_adapter(unet_cfg, adapter_name="default")

    def _lora_layers(self) -> list:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in [*self.unet.modules(), *self.vae.modules()] if isinstance(m, BaseTunerLayer)]

    def merge_lora(self) -> Pix2PixTurbo:
        """Fold the LoRA weights into the layers they adapt (faster deterministic inference; undone by training)."""
        with torch.no_grad():
            for m in self._lora_layers():
                if not m.merged:
                    m.merge()
        return self

    def unmerge_lora(self) -> Pix2PixTurbo:
        """Undo :meth:`merge_lora`."""
        with torch.no_grad():
            for m in self._lora_layers():
                while m.merged:
                    m.unmerge()
        return self

    @property
    def lora_merged(self) -> bool:
        return any(m.merged for m in self._lora_layers())

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.unet, "_hf_peft_config_loaded", False)) and bool(
            getattr(self.vae, "_hf_peft_config_loaded", False)
        )

    # ------------------------------------------------------------------ training set-up
    def set_train(self, mode: str | None = None) -> Pix2PixTurbo:
        """Switch to training mode.

        ``"lora"`` (pix2pix-turbo): LoRA weights, the UNet's ``conv_in`` and the skip convolutions are trained;
        ``"full"``: every weight of the VAE and UNet is trained (for models trained from scratch). The text encoder
        stays frozen.
        """
        mode = mode or self.config.get("train_mode", "lora")
        if mode not in ("lora", "full"):
            msg = f"train mode must be 'lora' or 'full', got {mode!r}."
            raise ValueError(msg)
        self.unmerge_lora()
        self.unet.train()
        self.vae.train()
        self.text_encoder.eval().requires_grad_(False)
        self.conv_in_pretrained.requires_grad_(False)
        if mode == "full":
            self.unet.requires_grad_(True)
            self.vae.requires_grad_(True)
        else:
            self.unet.requires_grad_(False)
            self.vae.requires_grad_(False)
            for name, p in [*self.unet.named_parameters(), *self.vae.named_parameters()]:
                if "lora" in name:
                    p.requires_grad_(True)
            self.unet.conv_in.requires_grad_(True)
            for i in range(self.n_skips):
                getattr(self.vae.decoder, f"skip_conv_{i + 1}").requires_grad_(True)
        return self

    def set_eval(self) -> Pix2PixTurbo:
        """Inference mode: no dropout, no gradients."""
        self.eval()
        self.requires_grad_(False)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ prompt
    @property
    def tissue(self) -> str | None:
        return self.metadata.get("tissue")

    def prompt_for(self, tissue: str | None = None) -> str:
        """Return the prompt to use: the model's own unless a ``tissue`` is given."""
        return self.prompt if tissue is None else default_prompt(tissue)

    @torch.no_grad()
    def encode_prompt(self, prompt: str | None = None, *, batch_size: int = 1) -> torch.Tensor:
        """CLIP text embedding ``(batch_size, tokens, dim)`` of ``prompt`` (cached)."""
        prompt = self.prompt if prompt is None else prompt
        device = self.device
        key = (prompt, str(device))
        emb = self._prompt_cache.get(key)
        if emb is None:
            tokenizer = self.tokenizer
            ids = tokenizer(
                prompt,
                max_length=tokenizer.model_max_length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            emb = self.text_encoder(ids)[0].float()
            self._prompt_cache[key] = emb
        return emb.expand(batch_size, -1, -1)

    # ------------------------------------------------------------------ forward
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def downscale(self) -> int:
        """Pixels per latent pixel: the VAE halves the size in each down block but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for inputs the model cannot take."""
        if x.ndim != 4:
            msg = f"The generator takes a batch (B, 3, H, W) of images, got a tensor of shape {tuple(x.shape)}."
            raise ValueError(msg)
        if x.shape[1] != self.vae.config.in_channels:
            msg = (
                f"The generator takes {self.vae.config.in_channels}-channel (RGB) input pictures, got "
                f"{x.shape[1]} channels."
            )
            raise ValueError(msg)
        f = self.downscale
        if x.shape[2] % f or x.shape[3] % f:
            msg = f"Tile height and width must be multiples of {f}, got {x.shape[2]} x {x.shape[3]} pixels."
            raise ValueError(msg)

    def _encode(self, x: torch.Tensor):
        enc = self.vae.encoder
        h = enc.conv_in(x)
        skips = []
        for block in enc.down_blocks:
            skips.append(h)
            h = block(h)
        h = enc.mid_block(h)
        h = enc.conv_act(enc.conv_norm_out(h))
        # the latent is amplified ~15x by the one-step x0 prediction: compute it in float32 even under autocast
        with _full_precision(h):
            h = enc.conv_out(h.float())
            if getattr(self.vae, "quant_conv", None) is not None:
                h = self.vae.quant_conv(h)
        return h, skips

    def _decode(self, z: torch.Tensor, skips: list[torch.Tensor], gamma: float) -> torch.Tensor:
        if getattr(self.vae, "post_quant_conv", None) is not None:
            z = self.vae.post_quant_conv(z)
        dec = self.vae.decoder
        h = dec.conv_in(z)
        h = dec.mid_block(h, None)
        h = h.to(next(iter(dec.up_blocks.parameters())).dtype)
        for i, block in enumerate(dec.up_blocks):
            if self.use_skips:
                skip = skips[-1 - i]
                h = h + getattr(dec, f"skip_conv_{i + 1}")(skip * gamma if gamma != 1 else skip)
            h = block(h, None)
        h = dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))
        return h

    def _predict_x0(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        cfg = self.scheduler.config
        a = self._alpha_one_step()
        if cfg.prediction_type == "epsilon":
            x0 = (sample - (1 - a) ** 0.5 * model_output) / a**0.5
        elif cfg.prediction_type == "v_prediction":
            x0 = a**0.5 * sample - (1 - a) ** 0.5 * model_output
        elif cfg.prediction_type == "sample":
            x0 = model_output
        else:  # pragma: no cover
            msg = f"Unsupported prediction_type {cfg.prediction_type!r}."
            raise ValueError(msg)
        if getattr(cfg, "clip_sample", False):
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0

    def _alpha_one_step(self) -> float:
        """``alphas_cumprod`` of the scheduler at t = 999, as a Python float (cached)."""
        key = id(self.scheduler)
        if getattr(self, "_alpha_key", None) != key:
            t = min(T_ONE_STEP, self.scheduler.config.num_train_timesteps - 1)
            self._alpha = float(self.scheduler.alphas_cumprod[t])
            self._alpha_key = key
        return self._alpha

    def _blend_conv_in(self, module, inputs, output):
        if self._r is None:
            return None
        pretrained = self.conv_in_pretrained(inputs[0]).detach()
        return pretrained * (1 - self._r) + output * self._r

    @contextlib.contextmanager
    def _lora_scale(self, r: float):
        from peft.tuners.lora import LoraLayer

        layers = [m for m in [*self.unet.modules(), *self.vae.modules()] if isinstance(m, LoraLayer)]
        for m in layers:
            for name in m.active_adapters:
                m.set_scale(name, r)
        try:
            yield
        finally:
            for m in layers:
                for name in m.active_adapters:
                    m.set_scale(name, 1.0)

    def _deterministic(self, x: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Deterministic one-step translation with the posterior mean (the path :meth:`compile` speeds up)."""
        moments, skips = self._encode(x)
        z = moments[:, : self.vae.config.latent_channels] * self.vae.config.scaling_factor
        timestep = torch.full((x.shape[0],), T_ONE_STEP, device=x.device, dtype=torch.long)
        eps = self.unet(z, timestep, encoder_hidden_states=prompt_embeds).sample
        x0 = self._predict_x0(eps.float(), z.float())
        return self._clamp(self._decode(x0 / self.vae.config.scaling_factor, skips, 1.0))

    def compile(self, **kwargs) -> Pix2PixTurbo:
        """Compile the deterministic inference path with ``torch.compile`` (GPU; the first call then takes a while).

        Keyword arguments go to :func:`torch.compile`. LoRA weights are merged first, as :meth:`predict` does.
        """
        if self.has_lora:
            self.merge_lora()
        self._alpha_one_step()
        _keep_fp32(self.unet.conv_out)
        self._compiled = torch.compile(self._deterministic, **kwargs)
        return self

    def latent_shape(self, height: int, width: int, batch: int = 1) -> tuple[int, int, int, int]:
        f = self.downscale
        return (batch, self.vae.config.latent_channels, height // f, width // f)

    def forward(
        self,
        x: torch.Tensor,
        *,
        prompt: str | None = None,
        prompt_embeds: torch.Tensor | None = None,
        r: float | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        sample_posterior: bool = False,
    ) -> torch.Tensor:
        """Translate input pictures ``x`` (B, 3, H, W) in ``[-1, 1]`` to H&E in ``[-1, 1]``.

        Parameters
        ----------
        x
            Input pictures scaled to ``[-1, 1]``; H and W multiples of :attr:`downscale`.
        prompt, prompt_embeds
            The prompt (default: the model's) or its precomputed CLIP embedding.
        r
            ``None`` or 1: deterministic. ``0 <= r < 1``: pix2pix-turbo's stochastic mode, with ``noise`` (latent
            shape) or noise drawn from ``generator``.
        sample_posterior
            Draw the latent from the VAE posterior (as in training) instead of taking its mean.
        """
        self.check_input(x)
        _keep_fp32(self.unet.conv_out)
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt, batch_size=x.shape[0])
        elif prompt_embeds.shape[0] != x.shape[0]:
            prompt_embeds = prompt_embeds.expand(x.shape[0], -1, -1)
        prompt_embeds = prompt_embeds.to(x.device)
        stochastic = r is not None and r < 1
        if not stochastic and not sample_posterior:
            core = self._compiled if self._compiled is not None and not self.training else self._deterministic
            return core(x, prompt_embeds)
        timestep = torch.full((x.shape[0],), T_ONE_STEP, device=x.device, dtype=torch.long)
        if not stochastic:
            z, skips = self._latent(x, generator=generator, sample_posterior=sample_posterior)
            eps = self.unet(z, timestep, encoder_hidden_states=prompt_embeds).sample
            x0 = self._predict_x0(eps.float(), z.float())
            return self._clamp(self._decode(x0 / self.vae.config.scaling_factor, skips, 1.0))
        if not 0 <= r <= 1:
            msg = f"r must lie in [0, 1], got {r}."
            raise ValueError(msg)
        with self._lock:
            if self.lora_merged:  # the LoRA weights are scaled by r: they must stand apart
                self.unmerge_lora()
            return self._stochastic(x, prompt_embeds, timestep, r, noise, generator, sample_posterior)

    def _stochastic(self, x, prompt_embeds, timestep, r, noise, generator, sample_posterior) -> torch.Tensor:
        # as pix2pix-turbo: every LoRA adapter (the VAE encoder's included) is scaled by r BEFORE the input is encoded
        with self._lora_scale(r):
            z, skips = self._latent(x, generator=generator, sample_posterior=sample_posterior)
            if noise is None:
                noise = torch.randn(
                    z.shape, generator=generator, device=z.device if generator is None else generator.device
                )
            noise = noise.to(device=z.device, dtype=z.dtype)
            unet_in = z * r + noise * (1 - r)
            self._r = r
            try:
                eps = self.unet(unet_in, timestep, encoder_hidden_states=prompt_embeds).sample
            finally:
                self._r = None
            x0 = self._predict_x0(eps.float(), unet_in.float())
            return self._clamp(self._decode(x0 / self.vae.config.scaling_factor, skips, r))

    def _latent(self, x: torch.Tensor, *, generator: torch.Generator | None, sample_posterior: bool):
        """Scaled latent of ``x`` (posterior mean, or a draw from ``generator``) and the encoder's skip activations."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments, skips = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return z * self.vae.config.scaling_factor, skips

    def _clamp(self, y: torch.Tensor) -> torch.Tensor:
        # pix2pix-turbo clamps to [-1, 1]; in training the clamp would stop the gradient of every saturated pixel
        # (a model trained from scratch can get stuck there), so it is applied in eval mode only
        return y if self.training else y.clamp(-1, 1)

    # ------------------------------------------------------------------ numpy inference
    @torch.no_grad()
    def predict(
        self,
        tiles: np.ndarray,
        *,
        batch_size: int = 4,
        prompt: str | None = None,
        r: float | None = None,
        seeds: list[int] | None = None,
        autocast: bool | str = "auto",
        channels_last: bool | str = "auto",
        merge_lora: bool = True,
    ) -> np.ndarray:
        """Run the model over uint8 tiles ``(n, 3, H, W)`` and return uint8 H&E tiles of the same shape.

        ``seeds`` (one per tile) make the stochastic noise of every tile reproducible whatever the batching.
        ``merge_lora`` folds the LoRA weights into their layers for deterministic runs (fewer kernels; training or
        the stochastic mode undo it).
        On a GPU ``autocast`` (bf16 where supported, else fp16) is used by default; channels-last memory on GPU and CPU.
        """
        tiles = np.asarray(tiles)
        if tiles.ndim != 4:
            msg = f"predict takes tiles (n, 3, H, W), got shape {tiles.shape}."
            raise ValueError(msg)
        device = self.device
        on_gpu = device.type == "cuda"
        use_autocast = on_gpu if autocast == "auto" else bool(autocast)
        use_cl = device.type in ("cuda", "cpu") if channels_last == "auto" else bool(channels_last)
        amp_dtype = torch.bfloat16 if (on_gpu and torch.cuda.is_bf16_supported()) else torch.float16
        out = np.empty_like(tiles, dtype=np.uint8)
        emb = self.encode_prompt(prompt)
        stochastic = r is not None and r < 1
        with self._lock:
            if merge_lora and not stochastic and self.has_lora:
                self.merge_lora()
            if use_cl:
                self.unet.to(memory_format=torch.channels_last)
                self.vae.to(memory_format=torch.channels_last)
            for start in range(0, len(tiles), batch_size):
                chunk = tiles[start : start + batch_size]
                x = torch.from_numpy(np.ascontiguousarray(chunk)).to(device=device, dtype=torch.float32)
                x = x / 127.5 - 1.0
                if use_cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                noise = None
                if stochastic:
                    shape = self.latent_shape(x.shape[2], x.shape[3])[1:]
                    batch_seeds = seeds[start : start + len(chunk)] if seeds is not None else range(len(chunk))
                    noise = torch.stack(
                        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in batch_seeds]
                    ).to(device)
                ctx = torch.autocast(device.type, dtype=amp_dtype) if use_autocast else contextlib.nullcontext()
                with ctx:
                    y = self(x, prompt_embeds=emb, r=r, noise=noise)
                finite = torch.isfinite(y).flatten(1).all(dim=1)
                if not bool(finite.all()):  # NaN would become black pixels without a word
                    _non_finite(start + torch.nonzero(~finite).flatten().cpu(), seeds)
                y = ((y.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
                out[start : start + len(chunk)] = y.cpu().numpy()
        return out

    def num_parameters(self, part: str | None = None) -> int:
        """Parameter count of the whole model or of one part (``"vae"``, ``"unet"``, ``"text_encoder"``)."""
        module = self if part is None else getattr(self, part)
        return sum(p.numel() for p in module.parameters())

    def __repr__(self) -> str:
        return (
            f"Pix2PixTurbo(config={self.config.get('name')!r}, prompt={self.prompt!r}, "
            f"vae={self.num_parameters('vae') / 1e6:.2f} M, unet={self.num_parameters('unet') / 1e6:.2f} M, "
            f"text_encoder={self.num_parameters('text_encoder') / 1e6:.2f} M parameters)"
        )


def _non_finite(tiles: torch.Tensor, seeds) -> None:
    """Raise for the tiles (indices in this call) whose output is not finite; the error carries their seeds."""
    bad = [int(i) for i in tiles]
    msg = f"the generator's output is NaN or infinite for tile(s) {bad} of this call (weights or overflow)"
    err = FloatingPointError(msg)
    err.seeds = [int(seeds[i]) for i in bad] if seeds is not None else []
    raise err


def _copy_conv(conv: nn.Module) -> nn.Conv2d:
    """A detached copy of a convolution (of its base layer when peft wraps it)."""
    conv = getattr(conv, "base_layer", conv)
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _full_precision(t: torch.Tensor):
    """Suspend autocast (if on) for the enclosed operations."""
    if _autocast_on(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def _keep_fp32(module: nn.Module) -> None:
    """Run ``module`` in float32 even under autocast (once per module; the state dict is unchanged).

    At t = 999 the clean latent is ``(z - 0.998 eps) / 0.069``: bf16 rounding of the UNet's output ``eps`` (0.4 %)
    would come out amplified ~15x, enough to wreck training and blur inference. The UNet's last convolution (and
    the VAE encoder's, in :meth:`Pix2PixTurbo._encode`) therefore computes in float32; everything else keeps the
    speed of autocast.
    """
    if getattr(module, "_st2he_fp32", False):
        return
    inner = module.forward

    def forward(x, *args, **kwargs):
        if _autocast_on(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return inner(x.float(), *args, **kwargs)
        return inner(x, *args, **kwargs)

    module.forward = forward
    module._st2he_fp32 = True


def _text_config(config) -> dict[str, Any]:
    """Return the keyword arguments that rebuild a ``CLIPTextConfig``."""
    out = config.to_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype", "model_type"):
        out.pop(key, None)
    return out


def _plain_config(config) -> dict[str, Any]:
    """Return a JSON-serialisable copy of a diffusers config (private keys dropped)."""
    out = {}
    for k, v in dict(config).items():
        if k.startswith("_"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out
