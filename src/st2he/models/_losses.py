"""Losses and metrics for training the generator: L2, SSIM, LPIPS (when its weights are local), a PatchGAN critic."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("st2he")


#: The SSIM of st2he, everywhere: scikit-image's ``structural_similarity`` defaults (7 x 7 uniform window, sample
#: covariances, K1 = 0.01, K2 = 0.03, mean over the map without its 3-pixel border, channels averaged).
SSIM_WINDOW = 7


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity of image batches ``(B, C, H, W)``, exactly :func:`skimage.metrics.structural_similarity`.

    The same definition as :func:`st2he.tl.evaluate_he` (7 x 7 uniform window, sample covariances, the map's
    3-pixel border left out, channels averaged), differentiable, so the training loss, the validation metric and
    the evaluation agree. Give images on a scale that starts at 0, as scikit-image sees uint8 images (SSIM's
    luminance term is not invariant to an offset): images in ``[-1, 1]`` as ``(x + 1) / 2`` with ``data_range=1``.
    ``reduction="none"`` gives one value per image.
    """
    a = a.float()
    b = b.float()
    c = a.shape[1]
    w = SSIM_WINDOW
    if min(a.shape[-2:]) < w:
        msg = f"SSIM needs images of at least {w} x {w} pixels, got {tuple(a.shape[-2:])}."
        raise ValueError(msg)
    win = torch.full((c, 1, w, w), 1.0 / (w * w), device=a.device, dtype=a.dtype)
    cov_norm = w * w / (w * w - 1)
    mu_a = F.conv2d(a, win, groups=c)
    mu_b = F.conv2d(b, win, groups=c)
    aa = cov_norm * (F.conv2d(a * a, win, groups=c) - mu_a**2)
    bb = cov_norm * (F.conv2d(b * b, win, groups=c) - mu_b**2)
    ab = cov_norm * (F.conv2d(a * b, win, groups=c) - mu_a * mu_b)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (aa + bb + c2))
    per_image = s.mean(dim=(1, 2, 3))
    return per_image if reduction == "none" else per_image.mean()


def psnr(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio (dB) per image of two batches."""
    mse = ((a.float() - b.float()) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return 10 * torch.log10(torch.tensor(data_range**2, device=mse.device) / mse)


def load_lpips(net: str = "vgg"):
    """LPIPS from the ``lpips`` package when it and its backbone's weights are already on this machine, else ``None``.

    Never downloads: a missing package or missing weights give ``None`` (callers fall back to SSIM).
    """
    try:
        import lpips
    except ImportError:
        return None
    from pathlib import Path

    hub = Path(torch.hub.get_dir()) / "checkpoints"
    prefix = {"vgg": "vgg16", "alex": "alexnet", "squeeze": "squeezenet"}.get(net, net)
    if not any(hub.glob(f"{prefix}*.pth")):
        logger.info("LPIPS backbone weights (%s) are not in %s; using SSIM as the perceptual term.", prefix, hub)
        return None
    try:
        model = lpips.LPIPS(net=net, verbose=False)
    except Exception as err:  # noqa: BLE001 - any failure: fall back to SSIM
        logger.info("LPIPS could not be built (%s); using SSIM as the perceptual term.", err)
        return None
    return model.eval().requires_grad_(False)


class PatchDiscriminator(nn.Module):
    """A conditional PatchGAN critic (pix2pix): scores overlapping patches of (input picture, H&E) pairs.

    Spectral normalisation keeps it Lipschitz; trained with the hinge loss.
    """

    def __init__(self, in_channels: int = 6, width: int = 32, n_layers: int = 3) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers: list[nn.Module] = [sn(nn.Conv2d(in_channels, width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, n_layers):
            out = width * min(2**i, 8)
            layers += [sn(nn.Conv2d(ch, out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            ch = out
        layers += [sn(nn.Conv2d(ch, ch, 4, stride=1, padding=1)), nn.LeakyReLU(0.2)]
        layers += [sn(nn.Conv2d(ch, 1, 4, stride=1, padding=1))]
        self.net = nn.Sequential(*layers)

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([condition, image], dim=1))


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the critic."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """Return the generator side of the hinge loss."""
    return -fake.mean()


def mean_or_nan(values: list[float]) -> float:
    """Mean of a list, NaN when empty."""
    return float(sum(values) / len(values)) if values else math.nan
