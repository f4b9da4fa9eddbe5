"""``st2he.tl.train_generator``: train or fine-tune the pix2pix-turbo generator on paired SpatialData objects."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from st2he._elements import get_image, get_params
from st2he._grid import COORDINATE_SYSTEM
from st2he._raster import Raster

logger = logging.getLogger("st2he")


def aligned_pair(
    sdata, *, input_key: str = "st2he_input", target_key: str = "he_image", coordinate_system: str = COORDINATE_SYSTEM
):
    """Return the input picture and the real H&E of ``sdata`` on the input's grid: ``(input, target, grid)``, uint8.

    Both are cut to the part of the input grid that the H&E's footprint covers; ``grid`` is that part. The H&E is
    read through its full affine transformation (:class:`st2he._raster.Raster`); where a rotated H&E leaves pixels
    of that part uncovered, both images are black there.
    """
    x, grid = get_image(sdata, input_key, parameter="input_key", coordinate_system=coordinate_system)
    if target_key not in sdata.images:
        msg = f"target_key={target_key!r} is not an image of this SpatialData object; its images are {sorted(sdata.images)}."
        raise KeyError(msg)
    target = Raster(sdata.images[target_key], coordinate_system, name=f"target_key={target_key!r}")
    if x.shape[0] != 3:
        msg = f"Training needs RGB images: {input_key!r} has {x.shape[0]} channels."
        raise ValueError(msg)
    rgb = target.check_rgb(what=f"target_key={target_key!r}", step="training")
    # keep the input pixels whose centres the H&E's footprint covers
    ys, xs = grid.pixel_centers()
    tx0, ty0, tx1, ty1 = target.bounds
    rows = np.flatnonzero((ys >= ty0) & (ys < ty1))
    cols = np.flatnonzero((xs >= tx0) & (xs < tx1))
    if not len(rows) or not len(cols):
        msg = f"{input_key!r} and {target_key!r} do not overlap in the {coordinate_system!r} coordinate system."
        raise ValueError(msg)
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    sub = grid.crop(r0, r1, c0, c1)
    block = x.data[:, r0:r1, c0:c1]
    xin = np.asarray(block.compute() if hasattr(block, "compute") else block)
    if xin.dtype != np.uint8:
        msg = f"{input_key!r} must be uint8 (as st2he.pp.rasterize_transcripts writes), got {xin.dtype}."
        raise TypeError(msg)
    if target.is_axis_aligned():
        return xin, target.read(sub, channels=rgb, dtype=np.uint8), sub
    # read once, the uncovered pixels marked: both images are black there
    values = target.read(sub, channels=rgb, fill=-1.0, dtype=np.float32)
    covered = values[0] >= 0
    yt = np.where(covered, np.clip(np.rint(values), 0, 255), 0).astype(np.uint8)
    return np.where(covered, xin, 0).astype(np.uint8), yt, sub


def tissue_fraction(tiles: np.ndarray) -> np.ndarray:
    """Fraction of pixels of each ``(n, 3, S, S)`` input tile that are tissue (st2he's rule for a black background)."""
    from st2he._tissue import tissue_mask

    return tissue_mask(tiles, "fluorescence", channel_axis=1).mean(axis=(1, 2))


def grid_tiles(image: np.ndarray, tile: int, stride: int | None = None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Square tiles of ``image`` ``(c, H, W)`` on a regular grid (last row / column flush with the edge)."""
    from st2he.models._tiling import tile_starts

    stride = stride or tile
    _, H, W = image.shape
    if H < tile or W < tile:
        return np.zeros((0, image.shape[0], tile, tile), image.dtype), []
    rows = tile_starts(H, tile, tile - stride)
    cols = tile_starts(W, tile, tile - stride)
    pos = [(int(r), int(c)) for r in rows for c in cols]
    return np.stack([image[:, r : r + tile, c : c + tile] for r, c in pos]), pos


def prepare_pairs(
    sdatas,
    *,
    input_key: str = "st2he_input",
    target_key: str = "he_image",
    validation: float | Sequence | None = 0.2,
    tile_size: int = 256,
    min_tissue_fraction: float = 0.05,
    coordinate_system: str = COORDINATE_SYSTEM,
) -> dict[str, Any]:
    """Training images and validation tiles from paired SpatialData objects, split by region or by sample.

    ``validation`` a fraction: in each object, the right-most band of that fraction of the width is held out (a gap
    of half a tile keeps training crops off its tiles); a list of SpatialData objects: those are held out whole;
    ``None``: no validation. Both images are placed in ``coordinate_system``. Returns a dict with ``train_inputs`` / ``train_targets`` (lists of ``(3, H, W)``
    uint8), ``val_inputs`` / ``val_targets`` (``(n, 3, S, S)`` uint8 tiles), ``pixel_size``, ``palette`` and
    ``palette_method`` (``"lineage"`` when every picture was drawn with the lineage palette, else ``None``).
    """
    objs = [sdatas] if not isinstance(sdatas, list | tuple) else list(sdatas)
    if not objs:
        msg = "Give at least one SpatialData object to train on."
        raise ValueError(msg)
    held = []
    if isinstance(validation, list | tuple):
        held = list(validation)
        frac = 0.0
    elif validation is None:
        frac = 0.0
    else:
        frac = float(validation)
        if not 0 <= frac < 1:
            msg = f"validation must be a fraction in [0, 1), a list of SpatialData objects or None, got {validation}."
            raise ValueError(msg)
    train_x, train_y, val_x, val_y = [], [], [], []
    pixel_sizes, palette, methods = [], None, set()
    for sd in objs:
        x, y, grid = aligned_pair(sd, input_key=input_key, target_key=target_key, coordinate_system=coordinate_system)
        pixel_sizes.append(grid.pixel_size)
        made = get_params(sd, input_key)
        palette = palette or made.get("palette")
        methods.add(made.get("palette_method"))
        if frac > 0:
            W = x.shape[2]
            cut = int(round(W * (1 - frac)))
            gap = tile_size // 2
            if cut - gap < tile_size or W - cut < tile_size:
                msg = (
                    f"An image of {W} pixels across is too narrow to hold out {frac:.0%} of it for validation with "
                    f"{tile_size}-pixel tiles; pass validation=[held-out SpatialData objects] or a smaller tile_size."
                )
                raise ValueError(msg)
            train_x.append(x[:, :, : cut - gap])
            train_y.append(y[:, :, : cut - gap])
            vx, _ = grid_tiles(x[:, :, cut:], tile_size)
            vy, _ = grid_tiles(y[:, :, cut:], tile_size)
            val_x.append(vx)
            val_y.append(vy)
        else:
            train_x.append(x)
            train_y.append(y)
    for sd in held:
        x, y, _ = aligned_pair(sd, input_key=input_key, target_key=target_key, coordinate_system=coordinate_system)
        vx, _ = grid_tiles(x, tile_size)
        vy, _ = grid_tiles(y, tile_size)
        val_x.append(vx)
        val_y.append(vy)
    if val_x:
        vx = np.concatenate(val_x)
        vy = np.concatenate(val_y)
        keep = tissue_fraction(vx) >= min_tissue_fraction
        vx, vy = vx[keep], vy[keep]
    else:
        vx = vy = None
    if len(set(np.round(pixel_sizes, 6))) > 1:
        logger.warning("The training objects have different input pixel sizes: %s µm.", sorted(set(pixel_sizes)))
    return {
        "train_inputs": train_x,
        "train_targets": train_y,
        "val_inputs": vx,
        "val_targets": vy,
        "pixel_size": float(np.median(pixel_sizes)),
        "palette": palette,
        # "lineage" when every picture was drawn with the panel-independent lineage palette
        "palette_method": "lineage" if methods == {"lineage"} else None,
    }


def _palette_change(learnt: dict, data: dict) -> str | None:
    """Why fine-tuning a generator (metadata ``learnt``) on these pairs starts from colours that mean other genes."""
    from st2he.tl._generate import compare_palettes, palette_by_method

    old_palette, old_lineage = learnt.get("palette"), palette_by_method(learnt) is not None
    new_palette, new_lineage = data.get("palette"), palette_by_method(data) is not None
    if not old_palette or not new_palette or (old_lineage and new_lineage):
        return None
    fix = "so it starts from colours that mean other genes and must learn them again"
    if old_lineage:
        return (
            "The generator being fine-tuned learnt the lineage palette, but the training pictures were drawn with "
            f"another palette, {fix}. Draw them with st2he.pp.rasterize_transcripts(..., palette='lineage')."
        )
    if new_lineage:
        return (
            "The generator being fine-tuned learnt a fixed gene palette, but the training pictures were drawn with "
            f"palette='lineage', {fix}. Fine-tune a lineage generator (model='small-real') instead, or draw the "
            "pictures with the model's own palette (rasterize_transcripts(..., palette=model.metadata['palette']))."
        )
    shared, differ, _ = compare_palettes(old_palette, new_palette)
    if shared and not differ:
        return None
    what = f"{len(differ)} of the {len(shared)} genes they share" if shared else "genes it never saw (none shared)"
    return (
        f"The training pictures colour {what} otherwise than the palette the generator being fine-tuned learnt, "
        f"{fix}. Draw them with the model's palette (rasterize_transcripts(..., palette=model.metadata['palette'])), "
        "or use palette='lineage' with a lineage generator (model='small-real')."
    )


def build_model(model, *, tissue: str | None = None, seed: int = 0):
    """Build a :class:`~st2he.models.Pix2PixTurbo` from a config name / dict (random weights), a path or a model."""
    from st2he.models import Pix2PixTurbo, load_model
    from st2he.models._config import CONFIGS

    if isinstance(model, Pix2PixTurbo):
        return model
    if isinstance(model, dict) or (isinstance(model, str) and model in CONFIGS):
        return Pix2PixTurbo.from_config(model, seed=seed, tissue=tissue)
    return load_model(model)


def train_generator(
    sdatas,
    *,
    input_key: str = "st2he_input",
    target_key: str = "he_image",
    model: Any = "small",
    validation: float | Sequence | None = 0.2,
    tissue: str | None = None,
    tile_size: int = 256,
    min_tissue_fraction: float = 0.05,
    steps: int = 1000,
    batch_size: int = 4,
    grad_accum: int = 1,
    lr: float | None = None,
    l2_weight: float = 1.0,
    perceptual: str | None = "auto",
    perceptual_weight: float = 1.0,
    gan_weight: float = 0.05,
    val_every: int = 100,
    ckpt_every: int = 500,
    output_dir: str | Path | None = None,
    resume: str | Path | bool | None = None,
    device: str = "auto",
    seed: int = 0,
    coordinate_system: str = COORDINATE_SYSTEM,
    progress: bool = True,
    overwrite: bool = False,
    **train_kwargs,
):
    """Train (or fine-tune) the pix2pix-turbo generator on paired input pictures and real H&E images.

    Parameters
    ----------
    sdatas
        One SpatialData object or a list, each with the input picture ``input_key`` (from
        :func:`st2he.pp.rasterize_transcripts`) and an aligned real H&E ``target_key`` (resampled onto the input's
        grid where their pixels differ; any affine transformation, rotated or flipped H&E included).
    model
        ``"small"`` / ``"tiny"`` / a config dict (trained from scratch), a :class:`~st2he.models.Pix2PixTurbo`
        (e.g. SD-Turbo from :func:`st2he.models.from_pretrained`, fine-tuned with LoRA), a checkpoint path, or
        ``"small-real"``: the shipped generator for real panels, fine-tuned (it reads the lineage palette: draw the
        pictures with ``palette="lineage"``). Fine-tuning a model on pictures whose colours mean other genes than
        the ones it learnt (another palette, or lineage against a fixed palette) warns: it would start from colours
        that mean other genes.
    validation
        A fraction: the right-most band of that width of each object is held out (split by region, never by
        random pixel); a list of SpatialData objects held out whole; ``None``: no validation.
    tissue
        Tissue name for the conditional prompt ``"This is a {tissue} H&E image"``; ``None``: ``"dapi2he"``.
    tile_size
        Size of the training crops and validation tiles (pixels of ``input_key``); a multiple of 8.
    min_tissue_fraction
        Validation tiles with less tissue (non-black input) than this are skipped.
    steps, batch_size, grad_accum, lr
        Optimisation: AdamW steps, crops per step (``batch_size * grad_accum``), learning rate (default 2e-4 for
        models trained from scratch, 1e-4 for LoRA).
    l2_weight, perceptual, perceptual_weight, gan_weight
        Loss weights; ``perceptual`` is ``"auto"`` (LPIPS when the lpips package and its weights are on this
        machine, else SSIM), ``"lpips"``, ``"ssim"`` or ``None``. The adversarial term uses a conditional PatchGAN
        critic with the hinge loss.
    val_every, ckpt_every
        Validation PSNR / SSIM and checkpoints every so many steps.
    output_dir
        Checkpoints go to ``output_dir/checkpoint-<step>``, the final model to ``output_dir/model`` (each written
        atomically). A new run refuses a folder that holds an earlier run unless ``overwrite=True``.
    resume
        A checkpoint folder, or ``"latest"``: continue an interrupted run; with the same data and seed the result is
        that of an uninterrupted run. A checkpoint of another run (other data or settings) is refused, naming what
        differs; ``steps`` may grow (to train longer), as may ``val_every`` and ``ckpt_every``.
    device
        ``"auto"``: CUDA when available (bf16 autocast), else CPU.
    seed
        Seed of the initial weights and of every random draw (crops, flips, noise).
    coordinate_system
        The coordinate system in which the H&E is placed over the input picture.
    progress
        Show a progress bar.
    overwrite
        Start a new run in an ``output_dir`` that already holds one (its checkpoints are removed, its model replaced).
    train_kwargs
        Further fields of :class:`st2he.models._training.TrainConfig` (e.g. ``warmup_steps``, ``lr_schedule``,
        ``stochastic_prob``, ``mixed_precision``, ``log_every``, ``gan_start``).

    Returns
    -------
    ``(model, history)``: the trained :class:`~st2he.models.Pix2PixTurbo` (in eval mode; its ``metadata`` records
    the palette, pixel size, tile size and training history) and a :class:`pandas.DataFrame` with one row per
    logged step (training losses) or validation (``val_l2``, ``val_psnr``, ``val_ssim``).
    """
    import pandas as pd

    from st2he.models._training import TrainConfig, save_final, train

    if tile_size % 8:
        msg = f"tile_size must be a multiple of 8, got {tile_size}."
        raise ValueError(msg)
    data = prepare_pairs(
        sdatas,
        input_key=input_key,
        target_key=target_key,
        coordinate_system=coordinate_system,
        validation=validation,
        tile_size=tile_size,
        min_tissue_fraction=min_tissue_fraction,
    )
    net = build_model(model, tissue=tissue, seed=seed)
    change = _palette_change(net.metadata, data)
    if change:
        warnings.warn(change, UserWarning, stacklevel=2)
    if tissue is not None:
        net.prompt = net.prompt_for(tissue)
        net.metadata["tissue"] = tissue
    net.metadata.update(
        {"palette": data["palette"], "pixel_size": data["pixel_size"], "tile_size": tile_size, "input_key": input_key}
    )
    if data["palette_method"]:
        net.metadata["palette_method"] = data["palette_method"]
    else:
        net.metadata.pop("palette_method", None)
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        crop_size=tile_size,
        lr=lr,
        l2_weight=l2_weight,
        perceptual=perceptual,
        perceptual_weight=perceptual_weight,
        gan_weight=gan_weight,
        val_every=val_every,
        ckpt_every=ckpt_every,
        seed=seed,
        **train_kwargs,
    )
    net, history = train(
        net,
        data["train_inputs"],
        data["train_targets"],
        data["val_inputs"],
        data["val_targets"],
        config=cfg,
        output_dir=output_dir,
        resume=resume,
        device=device,
        progress=progress,
        overwrite=overwrite,
    )
    if output_dir is not None:
        save_final(net, output_dir)
    return net, pd.DataFrame(history)
