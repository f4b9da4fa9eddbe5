"""The expression model: gene expression and tumour read back from H&E, densely, pooled into any unit.

Design (after HiST, Yelab2020/HiST: a tile encoder followed by a U-Net over the slide's grid of tile features, a
tumour channel and a gene head; and HEST-1k's benchmark, mahmoodlab/HEST ``src/hest/bench``, for the baselines):

- an **encoder** from timm with ``features_only=True``: a small ResNet trained from scratch (``"tiny"``,
  ``"small"``), or any timm model with a local weights file (UNI, Virchow, H-optimus are timm ViTs);
- **multi-scale features**: the finest used map (stride 8 for the ResNets: the unit itself) and the deeper maps
  (stride 16 and 32: its neighbourhood), upsampled to the finest and fused by convolutions (``features``);
- a **field**: a small U-Net (diffusers' ``UNet2DModel``) over the grid of fused features, whose receptive field spans
  the chip (HiST's slide-level U-Net), added to the fused features;
- **heads**: a 1x1 convolution to the genes (log1p counts per 10k) and one tumour logit per location.

The model predicts densely, one value per ``model.stride`` input pixels; :func:`pool_units` averages a dense map over
the pixels of each unit (cells, spots, bins), in training and prediction alike.

The **baselines** (``"mean"``, ``"knn"``, ``"ridge"``) are fitted on the same unit embeddings (the fused features
pooled over each unit) and stored with the model; see :func:`fit_baselines`.

Nothing here imports spatialdata.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

FORMAT = "st2he-expression-model"
FORMAT_VERSION = 1
NORMALISATION = "log1p_cp10k"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Sizes of the ResNets trained from scratch: blocks per stage, channels per stage, fused feature channels and the
#: channels of the field's U-Net levels.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128), "features": 32, "field_channels": (32, 64, 64)},
    "small": {"layers": (2, 2, 2, 2), "channels": (32, 64, 128, 256), "features": 64, "field_channels": (64, 128, 128)},
}
METHODS = ("multiscale", "mean", "knn", "ridge")
#: Hidden channels of the gene head's per-location MLP.
HEAD_HIDDEN = 128
#: Largest number of training units the kNN baseline keeps (a seeded subsample beyond; the model file stays small).
KNN_MAX_UNITS = 20000
KNN_NEIGHBOURS = 10
#: HEST's linear probe: PCA to this many components (fewer when there are fewer units or features).
PCA_COMPONENTS = 256
#: Where a shipped expression model lives (``config.json`` + ``model.safetensors``); ``predict_expression(model=None)``
#: uses it when present.
SHIPPED_EXPRESSION = Path(__file__).parent / "weights" / "expression"


# --------------------------------------------------------------------------------------------- the encoder


def _encoder_spec(encoder) -> dict[str, Any]:
    """A JSON-able encoder spec from ``"tiny"`` / ``"small"`` / ``{"timm": ...}`` / ``{"clip": ...}`` / a ClipModel."""
    from ._clip import ClipModel

    if isinstance(encoder, ClipModel):
        return {"kind": "clip", "source": encoder.name, "kwargs": {}, "_object": encoder}
    if isinstance(encoder, str):
        if encoder not in SIZES:
            msg = (
                f"encoder={encoder!r} is not known: use 'tiny' or 'small' (a ResNet trained from scratch) or "
                "{'timm': '<model name>', 'weights': '<local weights file>'}."
            )
            raise ValueError(msg)
        size = SIZES[encoder]
        return {"kind": "resnet", "size": encoder, "layers": list(size["layers"]), "channels": list(size["channels"])}
    if isinstance(encoder, Mapping):
        spec = dict(encoder)
        if spec.get("kind") == "resnet":
            return spec
        if "timm" in spec:
            out = {"kind": "timm", "name": str(spec["timm"]), "weights": spec.get("weights"), "frozen": True}
            out.update({k: v for k, v in spec.items() if k in ("frozen", "kwargs", "mean", "std")})
            return out
        if spec.get("kind") == "clip":
            return spec
        if "clip" in spec:
            source = spec["clip"]
            from ._clip import ClipModel

            if isinstance(source, ClipModel):
                return {"kind": "clip", "source": source.name, "kwargs": {}, "_object": source}
            if isinstance(source, list | tuple):
                source = [str(v) for v in source]
            elif isinstance(source, os.PathLike):
                source = os.fspath(source)
            kwargs = {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in spec.items() if k != "clip"}
            return {"kind": "clip", "source": source, "kwargs": kwargs}
    msg = (
        f"encoder must be 'tiny', 'small', {{'timm': name, 'weights': path}}, {{'clip': <what load_clip takes>}} "
        f"or a ClipModel, got {encoder!r}. Nothing is downloaded: a pretrained encoder needs its weights on this "
        "machine."
    )
    raise ValueError(msg)


class _FeatureInfo:
    def __init__(self, channels: list[int], reduction: list[int]) -> None:
        self._channels, self._reduction = channels, reduction

    def channels(self) -> list[int]:
        return list(self._channels)

    def reduction(self) -> list[int]:
        return list(self._reduction)


class ClipTileEncoder(nn.Module):
    """The frozen image tower of a CLIP model (:func:`st2he.models.load_clip`) as a coarse feature map.

    Each chip is cut into square tiles of ``tile_px`` pixels (the CLIP model's field of view at the expression model's
    µm per pixel; resized to the tower's input size by :meth:`ClipModel.preprocess`), and each tile's pooled image
    embedding becomes one location of a ``(B, D, H / tile_px, W / tile_px)`` map (HiST's tile encoder). The CLIP
    weights are not stored with the expression model: it loads them again with ``load_clip(source, **kwargs)`` (or
    takes the ClipModel given to :func:`load_expression_model`).
    """

    def __init__(self, spec: dict[str, Any], clip=None) -> None:
        super().__init__()
        self.spec = spec
        self._clip = clip
        self.feature_info = _FeatureInfo([int(spec["embed_dim"])], [int(spec["tile_px"])])

    @property
    def clip(self):
        if self._clip is None:
            from ._clip import load_clip

            source = self.spec["source"]
            self._clip = load_clip(tuple(source) if isinstance(source, list) else source, **self.spec["kwargs"])
        return self._clip

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        t = int(self.spec["tile_px"])
        b, _, h, w = x.shape
        tiles = x.unfold(2, t, t).unfold(3, t, t)  # (B, 3, h/t, w/t, t, t)
        gh, gw = tiles.shape[2], tiles.shape[3]
        tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(b * gh * gw, 3, t, t)
        clip = self.clip
        if str(clip.device) != str(x.device):
            clip.to(x.device)
        emb = clip.encode_image(tiles.float(), normalize=False).to(x.device).clone()  # not an inference tensor
        return [emb.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous().to(x.dtype)]


def _clip_spec(spec: dict[str, Any], um_per_px: float) -> dict[str, Any]:
    """Complete a CLIP spec: the tower's embedding size and the tile size in pixels at ``um_per_px``."""
    encoder = ClipTileEncoder({**spec, "embed_dim": 1, "tile_px": 1}, spec.get("_object"))
    clip = encoder.clip
    tile_px = max(1, int(round(clip.tile_size_um / um_per_px)))
    with torch.no_grad():
        dim = int(clip.encode_image(torch.zeros(1, 3, clip.image_size, clip.image_size), normalize=False).shape[-1])
    out = {k: v for k, v in spec.items() if k != "_object"}
    out.update(embed_dim=dim, tile_px=tile_px, image_size=int(clip.image_size), mpp=float(clip.mpp))
    return out, clip


def _build_encoder(spec: dict[str, Any], *, load_weights: bool, clip=None) -> nn.Module:
    """A timm ``features_only`` network for ``spec``; pretrained weights come only from the local file named there."""
    import timm

    if spec["kind"] == "clip":
        return ClipTileEncoder(spec, clip)
    if spec["kind"] == "resnet":
        channels = tuple(int(c) for c in spec["channels"])
        return timm.create_model(
            "resnet18",
            pretrained=False,
            features_only=True,
            out_indices=(2, 3, 4),
            layers=tuple(int(n) for n in spec["layers"]),
            channels=channels,
            stem_width=channels[0],
        )
    if spec["kind"] == "timm":
        kwargs = dict(spec.get("kwargs") or {})
        weights = spec.get("weights")
        if load_weights:
            if weights is None:
                msg = (
                    f"The timm encoder {spec['name']!r} needs a local weights file: pass "
                    f"encoder={{'timm': {spec['name']!r}, 'weights': '/path/to/weights.safetensors'}} (nothing is "
                    "downloaded)."
                )
                raise FileNotFoundError(msg)
            path = Path(os.fspath(weights)).expanduser()
            if not path.is_file():
                msg = (
                    f"The weights file of the timm encoder {spec['name']!r} was not found: {path}. Download it once "
                    "(e.g. from the model's Hugging Face page) and pass its local path as encoder={'timm': ..., "
                    "'weights': path}; st2he never downloads weights."
                )
                raise FileNotFoundError(msg)
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        else:
            kwargs.update(pretrained=False)
        try:
            return timm.create_model(spec["name"], features_only=True, **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                msg = f"{spec['name']!r} is not a timm model name ({err})."
                raise ValueError(msg) from err
            raise
    msg = f"Unknown encoder kind {spec.get('kind')!r}."
    raise ValueError(msg)


def _used_levels(encoder: nn.Module) -> list[int]:
    """Indices of the feature maps used: per distinct stride >= 8 (the finest if none is), the last map of it."""
    reductions = list(encoder.feature_info.reduction())
    keep: dict[int, int] = {}
    for i, r in enumerate(reductions):
        if r >= 8:
            keep[int(r)] = i
    if not keep:
        keep[int(reductions[-1])] = len(reductions) - 1
    return [keep[r] for r in sorted(keep)]


# --------------------------------------------------------------------------------------------- the model


class ExpressionModel(nn.Module):
    """Dense gene expression (log1p counts per 10k) and tumour logits from H&E chips; see the module notes.

    Build it with :func:`build_expression_model`; save and load with :func:`save_expression_model` /
    :func:`load_expression_model`. ``model.config`` is the JSON-able architecture (genes, encoder spec, µm per pixel,
    sizes); ``model.stride`` the input pixels per output location; ``model.baselines`` the fitted baselines
    (``"mean"``, ``"knn"``, ``"ridge"``, dicts of numpy arrays; empty until fitted); ``model.metadata`` the training
    summary and anything else recorded with the model (JSON-able).
    """

    def __init__(self, config: dict[str, Any], *, load_weights: bool = True, clip=None) -> None:
        super().__init__()
        self.config = copy.deepcopy(config)
        spec = self.config["encoder"]
        self.encoder = _build_encoder(spec, load_weights=load_weights, clip=clip)
        self.levels = _used_levels(self.encoder)
        info_ch = self.encoder.feature_info.channels()
        info_red = self.encoder.feature_info.reduction()
        self.stride = int(info_red[self.levels[0]])
        self.pad_multiple = int(max(info_red[i] for i in self.levels))
        c = int(self.config["features"])
        in_ch = sum(int(info_ch[i]) for i in self.levels)
        self.fuse = nn.Sequential(
            nn.Conv2d(in_ch, c, 1),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
        )
        field_channels = tuple(int(n) for n in self.config.get("field_channels") or ())
        self.field = None
        if self.config.get("field", True):
            from diffusers import UNet2DModel

            n = len(field_channels)
            self.field = UNet2DModel(
                sample_size=None,
                in_channels=c,
                out_channels=c,
                block_out_channels=field_channels,
                layers_per_block=1,
                down_block_types=("DownBlock2D",) * n,
                up_block_types=("UpBlock2D",) * n,
                norm_num_groups=min(8, *field_channels),
                add_attention=False,
            )
            self.field_multiple = 2 ** (n - 1)
        hidden = int(self.config.get("head_hidden") or 0)
        if hidden:  # a per-location MLP: expression is a non-linear function of the features (cell types)
            self.gene_head = nn.Sequential(
                nn.Conv2d(c, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, len(self.config["genes"]), 1)
            )
        else:
            self.gene_head = nn.Conv2d(c, len(self.config["genes"]), 1)
        self.tumour_head = nn.Conv2d(c, 1, 1) if self.config.get("tumour", True) else None
        if spec["kind"] == "timm" and spec.get("frozen", True):
            for p in self.encoder.parameters():
                p.requires_grad_(False)
        self.baselines: dict[str, dict[str, np.ndarray]] = {}
        self.metadata: dict[str, Any] = {}

    # ------------------------------------------------------------------ properties

    @property
    def genes(self) -> list[str]:
        """Gene names of the gene head's channels."""
        return list(self.config["genes"])

    @property
    def um_per_px(self) -> float:
        """µm per pixel of the H&E the model reads."""
        return float(self.config["um_per_px"])

    @property
    def has_tumour(self) -> bool:
        """Whether the model has a tumour head."""
        return self.tumour_head is not None

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.parameters()).device

    def extra_repr(self) -> str:
        enc = self.config["encoder"]
        name = enc.get("size") or enc.get("name")
        return (
            f"genes={len(self.config['genes'])}, encoder={name!r}, um_per_px={self.um_per_px:g}, "
            f"stride={self.stride}, field={self.field is not None}, tumour={self.has_tumour}"
        )

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: ``(B, 3, H, W)`` RGB in ``[0, 1]``, ``H`` and ``W`` multiples of :attr:`pad_multiple`.

        Returns ``{"genes": (B, G, h, w), "tumour": (B, 1, h, w) logits (absent without a tumour head),
        "features": (B, C, h, w)}`` with ``h = H / stride``; ``features`` are the fused multi-scale encoder features
        (before the field), the unit embeddings of the baselines.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            msg = f"The expression model takes (B, 3, H, W) RGB chips, got shape {tuple(x.shape)}."
            raise ValueError(msg)
        if isinstance(self.encoder, ClipTileEncoder):
            maps = self.encoder(x)  # the CLIP model normalises its tiles itself
        else:
            mean = torch.tensor(self.config.get("mean", IMAGENET_MEAN), dtype=x.dtype, device=x.device)
            std = torch.tensor(self.config.get("std", IMAGENET_STD), dtype=x.dtype, device=x.device)
            maps = self.encoder((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        maps = [maps[i] for i in self.levels]
        h, w = maps[0].shape[-2:]
        ups = [maps[0]] + [F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False) for m in maps[1:]]
        features = self.fuse(torch.cat(ups, dim=1))
        out = features
        if self.field is not None:
            m = self.field_multiple
            ph, pw = (-h) % m, (-w) % m
            padded = F.pad(features, (0, pw, 0, ph), mode="replicate") if (ph or pw) else features
            timestep = torch.zeros((), device=x.device)
            field = self.field(padded, timestep).sample[..., :h, :w]
            out = features + field
        result = {"genes": self.gene_head(out), "features": features}
        if self.tumour_head is not None:
            result["tumour"] = self.tumour_head(out)
        return result


def build_expression_model(
    genes: Sequence[str],
    *,
    encoder: str | Mapping = "small",
    um_per_px: float = 1.0,
    tumour: bool = True,
    field: bool = True,
    features: int | None = None,
    field_channels: Sequence[int] | None = None,
    head_hidden: int | None = None,
    seed: int | None = 0,
) -> ExpressionModel:
    """Build an :class:`ExpressionModel` with random weights (a pretrained encoder's from its local file).

    Parameters
    ----------
    genes
        Gene names of the gene head (its channels, in this order).
    encoder
        ``"tiny"`` / ``"small"``: a timm ResNet (BasicBlocks, fewer channels than ResNet-18) trained from scratch,
        output stride 8; or ``{"timm": "<model name>", "weights": "<local file>"}``: any timm model with
        ``features_only`` support and its weights file (frozen unless ``"frozen": False``; ``"kwargs"`` go to
        ``timm.create_model``, e.g. ``{"dynamic_img_size": True}`` for ViTs). A missing file raises
        :class:`FileNotFoundError` naming it; nothing is downloaded. Or the image tower of a CLIP model:
        ``{"clip": <what st2he.models.load_clip takes>, **load_clip options}`` or a
        :class:`~st2he.models.ClipModel` (frozen; one pooled embedding per tile of the CLIP model's field of view,
        HiST's tile encoder, so the output stride is that tile; the CLIP weights are loaded again from their source
        when the model is loaded).
    um_per_px
        µm per pixel of the H&E chips the model reads.
    tumour
        With a tumour head.
    field
        With the field (a U-Net over the grid of fused features).
    features, field_channels
        Channels of the fused features and of the field's U-Net levels (defaults by size: tiny 32 / (32, 64, 64),
        small 64 / (64, 128, 128); timm encoders use the small sizes).
    head_hidden
        Hidden channels of the gene head, a per-location MLP (default :data:`HEAD_HIDDEN`); ``0``: a linear head.
    seed
        Seed of the random initial weights (``None``: torch's global generator).
    """
    genes = [str(g) for g in genes]
    if not genes:
        msg = "Give at least one gene for the expression model."
        raise ValueError(msg)
    if len(set(genes)) != len(genes):
        msg = "The genes of an expression model must be distinct."
        raise ValueError(msg)
    from st2he._raster import check_pixel_size

    spec = _encoder_spec(encoder)
    size = SIZES.get(spec.get("size", "small"), SIZES["small"])
    config = {
        "genes": genes,
        "encoder": spec,
        "um_per_px": check_pixel_size(um_per_px, "um_per_px"),
        "tumour": bool(tumour),
        "field": bool(field),
        "features": int(features or size["features"]),
        "field_channels": [int(c) for c in (field_channels or size["field_channels"])],
        "head_hidden": int(HEAD_HIDDEN if head_hidden is None else head_hidden),
        "normalisation": NORMALISATION,
    }
    clip = None
    if spec["kind"] == "timm":
        config["mean"], config["std"] = _timm_norm(spec)
    if spec["kind"] == "clip":
        config["encoder"], clip = _clip_spec(spec, config["um_per_px"])
    if seed is None:
        return ExpressionModel(config, clip=clip)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ExpressionModel(config, clip=clip)


def _timm_norm(spec: dict[str, Any]) -> tuple[list[float], list[float]]:
    if spec.get("mean") and spec.get("std"):
        return [float(v) for v in spec["mean"]], [float(v) for v in spec["std"]]
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(spec["name"])
        mean, std = cfg.mean, cfg.std
    except Exception:  # noqa: BLE001 - no config known: ImageNet's
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return [float(v) for v in mean], [float(v) for v in std]


# --------------------------------------------------------------------------------------------- pooling


def unit_sums(
    dense: torch.Tensor, pixels: torch.Tensor, units: torch.Tensor, n_units: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit sums of a dense map and pixel counts, from (pixel, unit) pairs.

    ``dense``: ``(B, C, h, w)``; ``pixels``: flat indices into ``B * h * w`` (batch-major); ``units``: the unit of each
    pair, in ``[0, n_units)``. A pixel may serve several units (units smaller than a pixel) and a unit many pixels.
    Returns ``(sums (n_units, C), counts (n_units,))`` in the dtype of ``dense``.
    """
    b, c, h, w = dense.shape
    flat = dense.permute(0, 2, 3, 1).reshape(b * h * w, c)
    sums = torch.zeros((n_units, c), dtype=dense.dtype, device=dense.device)
    sums.index_add_(0, units, flat[pixels])
    counts = torch.zeros(n_units, dtype=dense.dtype, device=dense.device)
    counts.index_add_(0, units, torch.ones_like(units, dtype=dense.dtype))
    return sums, counts


def pool_units(dense: torch.Tensor, labels: torch.Tensor, n_units: int) -> torch.Tensor:
    """Mean of a dense map over each unit of a label map: ``(n_units, C)``.

    ``dense``: ``(B, C, h, w)`` (or ``(C, h, w)``); ``labels``: ``(B, h, w)`` (or ``(h, w)``) integer unit indices in
    ``[0, n_units)``, ``-1`` for no unit. A unit with no pixel gets zeros.
    """
    if dense.ndim == 3:
        dense = dense[None]
    if labels.ndim == 2:
        labels = labels[None]
    if tuple(labels.shape) != (dense.shape[0], *dense.shape[2:]):
        msg = f"labels {tuple(labels.shape)} do not match the dense map {tuple(dense.shape)}."
        raise ValueError(msg)
    flat = labels.reshape(-1).to(dense.device)
    pixels = torch.nonzero(flat >= 0).ravel()
    sums, counts = unit_sums(dense, pixels, flat[pixels].long(), n_units)
    return sums / counts.clamp_min(1)[:, None]


# --------------------------------------------------------------------------------------------- baselines


def fit_baselines(
    embeddings: np.ndarray, targets: np.ndarray, *, methods: Sequence[str] = ("mean", "knn", "ridge"), seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Fit the baselines on unit embeddings ``(n, C)`` and targets ``(n, G)`` (log1p CP10k); numpy arrays out.

    - ``"mean"``: the training mean of each gene.
    - ``"ridge"``: HEST-1k's linear probe (``src/hest/bench``): ``StandardScaler`` -> ``PCA(256, random_state=seed)``
      (fewer components when there are fewer units or features) -> ``Ridge(solver="lsqr", alpha=100 / (n_components *
      n_genes), fit_intercept=False, max_iter=1000, random_state=seed)``. HEST fits without an intercept on the
      centred PCA scores, so its predictions lack the training mean (Pearson does not see it); st2he adds the
      training mean of each gene back, which changes no coefficient (the scores are centred) and gives predictions on
      the targets' scale.
    - ``"knn"``: ``KNeighborsRegressor(n_neighbors=10)`` (fewer with fewer units) on the same scaled PCA scores;
      at most :data:`KNN_MAX_UNITS` training units are kept (a seeded subsample).
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) < 2:
        msg = f"Baselines need at least 2 units with embeddings (n, C) and targets (n, G); got {x.shape} and {y.shape}."
        raise ValueError(msg)
    out: dict[str, dict[str, np.ndarray]] = {}
    mean = y.mean(axis=0)
    if "mean" in methods:
        out["mean"] = {"mean": mean.astype(np.float32)}
    if "ridge" in methods or "knn" in methods:
        scaler = StandardScaler().fit(x)
        n_comp = min(PCA_COMPONENTS, x.shape[0], x.shape[1])
        pca = PCA(n_components=n_comp, random_state=seed).fit(scaler.transform(x))
        z = pca.transform(scaler.transform(x))
        proj = {
            "scaler_mean": scaler.mean_,
            "scaler_scale": scaler.scale_,
            "pca_mean": pca.mean_,
            "pca_components": pca.components_,
        }
        if "ridge" in methods:
            ridge = Ridge(
                solver="lsqr", alpha=100 / (n_comp * y.shape[1]), fit_intercept=False, max_iter=1000, random_state=seed
            ).fit(z, y)
            out["ridge"] = {**proj, "coef": ridge.coef_, "intercept": mean}
        if "knn" in methods:
            keep = np.arange(len(z))
            if len(z) > KNN_MAX_UNITS:
                keep = np.sort(np.random.default_rng(seed).choice(len(z), KNN_MAX_UNITS, replace=False))
            out["knn"] = {
                **proj,
                "train_scores": z[keep],
                "train_targets": y[keep],
                "n_neighbors": np.array(min(KNN_NEIGHBOURS, len(keep))),
            }
    return out


def _project(state: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    z = (x - state["scaler_mean"]) / state["scaler_scale"]
    return (z - state["pca_mean"]) @ state["pca_components"].T


def predict_baseline(baselines: dict[str, dict[str, np.ndarray]], method: str, embeddings: np.ndarray) -> np.ndarray:
    """Predictions ``(n, G)`` (float32) of a fitted baseline for unit embeddings ``(n, C)``."""
    if method not in baselines:
        msg = (
            f"The model has no fitted {method!r} baseline (it has {sorted(baselines) or 'none'}); train it with "
            "st2he.tl.train_expression, which fits them."
        )
        raise ValueError(msg)
    state = {k: np.asarray(v) for k, v in baselines[method].items()}
    x = np.asarray(embeddings, dtype=np.float64)
    if method == "mean":
        return np.broadcast_to(state["mean"], (len(x), state["mean"].shape[0])).astype(np.float32)
    z = _project(state, x)
    if method == "ridge":
        return (z @ state["coef"].T + state["intercept"]).astype(np.float32)
    from sklearn.neighbors import KNeighborsRegressor

    knn = KNeighborsRegressor(n_neighbors=int(state["n_neighbors"])).fit(state["train_scores"], state["train_targets"])
    return knn.predict(z).astype(np.float32)


# --------------------------------------------------------------------------------------------- saving and loading


def save_expression_model(
    model: ExpressionModel,
    path: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    baselines: dict[str, dict[str, np.ndarray]] | None = None,
) -> Path:
    """Write ``path/model.safetensors`` (weights and baseline arrays) and ``path/config.json``.

    ``config.json`` holds the format, genes, normalisation (``"log1p_cp10k"``), µm per pixel, the encoder spec and
    sizes, the model's metadata (training summary) updated by ``metadata``, and the names of the fitted baselines;
    ``baselines`` (default: the model's own) are stored as ``baseline.<method>.<array>`` tensors.
    """
    from safetensors.torch import save_file

    from ._io import CONFIG_NAME, WEIGHTS_NAME

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    baselines = model.baselines if baselines is None else baselines
    meta = {**model.metadata, **(metadata or {})}
    meta.pop("checkpoint", None)  # where the model in memory was read from; a reload records its own folder
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    for method, arrays in baselines.items():
        for name, value in arrays.items():
            tensors[f"baseline.{method}.{name}"] = torch.from_numpy(np.array(value, copy=True, order="C"))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "genes": model.genes,
        "normalisation": NORMALISATION,
        "um_per_px": model.um_per_px,
        "stride": model.stride,
        "encoder": model.config["encoder"],
        "architecture": model.config,
        "baselines": sorted(baselines),
        "metadata": json.loads(json.dumps(meta, default=_jsonable)),
    }
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": FORMAT})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    return folder


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def _read_config(folder: Path) -> dict[str, Any]:
    from ._io import read_model_config

    config = read_model_config(
        folder, fmt=FORMAT, max_version=FORMAT_VERSION, kind="expression model",
        writers="save_expression_model or st2he.tl.train_expression",
    )
    path = folder / "config.json"
    if not isinstance(config.get("architecture"), dict) or not isinstance(config["architecture"].get("genes"), list):
        msg = f"{path} has no architecture with genes; the file is damaged, re-save the model."
        raise ValueError(msg)
    return config


def load_expression_model(
    path: str | os.PathLike, *, device: str | torch.device | None = None, clip=None
) -> ExpressionModel:
    """Read a model written by :func:`save_expression_model` (weights, baselines, metadata), in eval mode.

    A model with a CLIP encoder loads its CLIP model again with :func:`st2he.models.load_clip` from the source it
    records (when first used), or takes ``clip`` (a :class:`~st2he.models.ClipModel`).

    The architecture is first built on the meta device and checked tensor by tensor against the safetensors header
    (shapes and dtypes, no data read), so a config that does not fit its weights fails at once; a missing or foreign
    file fails naming what is missing. Nothing is downloaded and no code is executed from the files.
    """
    from ._io import load_checked

    folder = Path(os.fspath(path)).expanduser()
    config = _read_config(folder)
    model, state = load_checked(folder, lambda: ExpressionModel(config["architecture"], load_weights=False, clip=clip))
    baselines: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        if key.startswith("baseline."):
            _, method, name = key.split(".", 2)
            baselines.setdefault(method, {})[name] = value.numpy().copy()
    model.baselines = baselines
    model.metadata = dict(config.get("metadata") or {})
    model.metadata["checkpoint"] = str(folder)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def is_expression_model(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder with an st2he expression model ``config.json``."""
    from ._io import CONFIG_NAME

    cfg = Path(os.fspath(path)) / CONFIG_NAME
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def chip_multiple(model: ExpressionModel) -> int:
    """Chips must have sides that are multiples of this many pixels (the encoder's and the field's downsampling)."""
    m = model.pad_multiple
    if model.field is not None:
        m = math.lcm(m, model.stride * model.field_multiple)
    return m
