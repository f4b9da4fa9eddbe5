"""st2he's generator against pix2pix-turbo (Parmar et al. 2024, img2img-turbo's ``src/pix2pix_turbo.py``).

The checkpoint is written the way pix2pix-turbo writes one: diffusers parts of a base model, 1x1 skip convolutions set
as attributes of the VAE decoder, peft LoRA adapters added with ``add_adapter`` (``"vae_skip"`` of rank 4 on the VAE,
the default adapter of rank 8 on the UNet, pix2pix-turbo's target module lists), for the stochastic variant the UNet's
``conv_in`` replaced by a twin of the pretrained and the fine-tuned convolution, and the state dicts filtered as its
``save_model`` does. pix2pix-turbo's forward pass is written out below from the same diffusers modules (its encoder and
decoder forwards, the one-step DDPM scheduler at t = 999, the LoRA scaling by ``r``, the noise blend and the skip
activations scaled by ``gamma = r``), and st2he's model loaded from that file must give the same pictures.

One deliberate difference is kept apart: pix2pix-turbo draws the latent from the VAE posterior
(``latent_dist.sample()``), st2he takes its mean unless ``sample_posterior=True``; both are compared here.
"""

from __future__ import annotations

import copy

import pytest
import torch

import st2he.models as M

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

# pix2pix-turbo's LoRA target modules
UNET_TARGETS = [
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
    "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj",
]  # fmt: skip
VAE_TARGETS_HEAD = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out"]
VAE_TARGETS_TAIL = ["to_k", "to_q", "to_v", "to_out.0"]
PROMPT = "dapi2he"


class Twin(torch.nn.Module):
    """The stochastic variant's UNet ``conv_in``: pretrained and fine-tuned kernels blended by ``r``."""

    def __init__(self, conv: torch.nn.Module) -> None:
        super().__init__()
        self.conv_in_pretrained = copy.deepcopy(conv)
        self.conv_in_curr = copy.deepcopy(conv)
        self.r = None

    def forward(self, x):
        pretrained = self.conv_in_pretrained(x).detach()
        return pretrained * (1 - self.r) + self.conv_in_curr(x) * self.r


def _encoder_forward(self, sample):
    """pix2pix-turbo's VAE encoder: the activation entering each down block is kept for the decoder."""
    h = self.conv_in(sample)
    acts = []
    for block in self.down_blocks:
        acts.append(h)
        h = block(h)
    h = self.conv_act(self.conv_norm_out(self.mid_block(h)))
    self.current_down_blocks = acts
    return self.conv_out(h)


def _decoder_forward(self, sample, latent_embeds=None):
    """pix2pix-turbo's VAE decoder: skip convolution ``i`` adds ``gamma`` x the matching encoder activation."""
    h = self.mid_block(self.conv_in(sample), latent_embeds)
    h = h.to(next(iter(self.up_blocks.parameters())).dtype)
    acts = self.incoming_skip_acts[::-1]
    for i, block in enumerate(self.up_blocks):
        h = h + getattr(self, f"skip_conv_{i + 1}")(acts[i] * self.gamma)
        h = block(h, latent_embeds)
    return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class Reference:
    """pix2pix-turbo built from a diffusers base folder as its ``Pix2Pix_Turbo.__init__`` builds it (no weights)."""

    def __init__(self, base, *, stochastic: bool, seed: int) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig

        vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        vae.encoder.forward = _encoder_forward.__get__(vae.encoder)
        vae.decoder.forward = _decoder_forward.__get__(vae.decoder)
        # skip convolution i: from the activation entering encoder block n - i to the input of decoder block i
        enc_in = [b.resnets[0].in_channels for b in vae.encoder.down_blocks][::-1]
        dec_in = [b.resnets[0].in_channels for b in vae.decoder.up_blocks]
        n = len(enc_in)
        for i in range(n):
            conv = torch.nn.Conv2d(enc_in[i], dec_in[i], kernel_size=(1, 1), stride=(1, 1), bias=False)
            torch.nn.init.constant_(conv.weight, 1e-5)
            setattr(vae.decoder, f"skip_conv_{i + 1}", conv)
        vae.decoder.gamma = 1
        if stochastic:
            unet.conv_in = Twin(unet.conv_in)
        self.vae_targets = VAE_TARGETS_HEAD + [f"skip_conv_{i + 1}" for i in range(n)] + VAE_TARGETS_TAIL
        torch.manual_seed(seed)
        vae.add_adapter(
            LoraConfig(r=4, init_lora_weights="gaussian", target_modules=self.vae_targets), adapter_name="vae_skip"
        )
        unet.add_adapter(LoraConfig(r=8, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
        # "training": every trainable weight away from its initial value (LoRA B starts at zero)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in [*unet.named_parameters(), *vae.named_parameters()]:
                if "lora" in name or "skip_conv" in name or (name.startswith("conv_in") and "pretrained" not in name):
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        self.vae, self.unet = vae.eval(), unet.eval()
        self.sched = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        self.sched.set_timesteps(1)
        self.timesteps = torch.tensor([999]).long()

    def save_model(self, path) -> None:
        """The ``.pkl`` that pix2pix-turbo's ``save_model`` writes."""
        sd = {
            "unet_lora_target_modules": list(UNET_TARGETS),
            "vae_lora_target_modules": list(self.vae_targets),
            "rank_unet": 8,
            "rank_vae": 4,
            "state_dict_unet": {k: v for k, v in self.unet.state_dict().items() if "lora" in k or "conv_in" in k},
            "state_dict_vae": {k: v for k, v in self.vae.state_dict().items() if "lora" in k or "skip" in k},
        }
        torch.save(sd, path)

    def _latent(self, c_t, generator):
        dist = self.vae.encode(c_t).latent_dist
        z = dist.mode() if generator is None else dist.sample(generator)
        return z * self.vae.config.scaling_factor

    def _decode(self, x_denoised, gamma):
        self.vae.decoder.incoming_skip_acts = self.vae.encoder.current_down_blocks
        self.vae.decoder.gamma = gamma
        return self.vae.decode(x_denoised / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    @torch.no_grad()
    def forward(self, c_t, caption_enc, *, r=1.0, noise_map=None, generator=None):
        """pix2pix-turbo's forward (``deterministic=noise_map is None``)."""
        if noise_map is None:
            z = self._latent(c_t, generator)
            pred = self.unet(z, self.timesteps, encoder_hidden_states=caption_enc).sample
            x_denoised = self.sched.step(pred, self.timesteps, z, return_dict=True).prev_sample.to(pred.dtype)
            return self._decode(x_denoised, 1)
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        # the LoRA weights are scaled by r first, and only then is the input encoded
        self.unet.set_adapters(["default"], weights=[r])
        set_weights_and_activate_adapters(self.vae, ["vae_skip"], [r])
        z = self._latent(c_t, generator)
        unet_input = z * r + noise_map * (1 - r)
        self.unet.conv_in.r = r
        out = self.unet(unet_input, self.timesteps, encoder_hidden_states=caption_enc).sample
        self.unet.conv_in.r = None
        x_denoised = self.sched.step(out, self.timesteps, unet_input, return_dict=True).prev_sample.to(out.dtype)
        return self._decode(x_denoised, r)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny SD-shaped base (diffusers format: 4 VAE blocks as SD-Turbo's, 2 UNet blocks)."""
    return M.save_base(tmp_path_factory.mktemp("ref") / "tiny-sd", "tiny", seed=0)


def _pair(base, tmp_path, *, stochastic: bool):
    ref = Reference(base, stochastic=stochastic, seed=3)
    path = tmp_path / ("stochastic.pkl" if stochastic else "deterministic.pkl")
    ref.save_model(path)
    model = M.from_pretrained(base, checkpoint=path)
    caption_enc = model.encode_prompt(PROMPT, batch_size=2)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    return ref, model, caption_enc, x


def test_deterministic_mode_equals_pix2pix_turbo(base, tmp_path):
    ref, model, emb, x = _pair(base, tmp_path, stochastic=False)
    with torch.no_grad():
        want = ref.forward(x, emb)
        got = model(x, prompt_embeds=emb)
        assert (want - x).abs().mean() > 0.1  # a real translation, not the identity
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        # pix2pix-turbo samples the posterior: st2he does too when asked, with the same draw
        want_s = ref.forward(x, emb, generator=torch.Generator().manual_seed(5))
        got_s = model(x, prompt_embeds=emb, sample_posterior=True, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got_s, want_s, atol=2e-5, rtol=0)
        assert (got_s - got).abs().max() > 1e-3
        # merged LoRA weights (what predict uses) change nothing
        model.merge_lora()
        torch.testing.assert_close(model(x, prompt_embeds=emb), want, atol=5e-5, rtol=0)


def test_stochastic_mode_equals_pix2pix_turbo(base, tmp_path):
    ref, model, emb, x = _pair(base, tmp_path, stochastic=True)
    noise = torch.randn(model.latent_shape(32, 32, 2), generator=torch.Generator().manual_seed(1))
    r = 0.4
    with torch.no_grad():
        want = ref.forward(x, emb, r=r, noise_map=noise)
        model.merge_lora()  # the stochastic mode must undo it
        got = model(x, prompt_embeds=emb, r=r, noise=noise)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        want_s = ref.forward(x, emb, r=r, noise_map=noise, generator=torch.Generator().manual_seed(6))
        got_s = model(x, prompt_embeds=emb, r=r, noise=noise, sample_posterior=True,
                      generator=torch.Generator().manual_seed(6))  # fmt: skip
        torch.testing.assert_close(got_s, want_s, atol=2e-5, rtol=0)
        # the LoRA scale is restored afterwards: r = 1 is the deterministic model again, whose conv_in is the
        # fine-tuned one (the stochastic checkpoint's twin holds the pretrained one apart)
        det = model(x, prompt_embeds=emb)
        assert not torch.allclose(det, got, atol=1e-3)
        torch.testing.assert_close(model(x, prompt_embeds=emb, r=1.0), det)
    # the stochastic picture moves with r and with the noise map: the comparison above is not vacuous
    with torch.no_grad():
        other = model(x, prompt_embeds=emb, r=0.7, noise=noise)
    assert (other - got).abs().max() > 1e-2
