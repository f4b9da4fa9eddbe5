"""``st2he.tl.train_super_resolution``: train the conditional diffusion model of ``super_resolve(method="diffusion")``.

Training pairs come from molecule-level samples: the low-resolution input is the molecules counted in pseudo-spots
(``low="spots"``: 55 µm disks on a 100 µm lattice) or coarse bins (``low="bins"``), the target the molecules counted in
the ``bin_size`` bins (both with :func:`st2he.pp.aggregate_transcripts`), on the very geometry ``super_resolve`` uses
(a bin belongs to the unit that holds its centre). Validation is by region: the rightmost ``val_fraction`` of each
section's columns of bins is never a training target.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from st2he._grid import COORDINATE_SYSTEM
from st2he._units import TARGET_SUM

logger = logging.getLogger("st2he")

LOW = ("spots", "bins")
_STATE = "training_state.pt"


@dataclass
class _Section:
    low: np.ndarray  # (G, H, W) scaled log1p low map
    mask: np.ndarray  # (1, H, W)
    target: np.ndarray  # (G, H, W) scaled log1p target
    expression: np.ndarray | None  # (G, H, W)
    pixels: np.ndarray | None  # (3, sH, sW) in [-1, 1]
    train: np.ndarray  # (1, H, W) bins that may be training targets
    # for validation
    rows: np.ndarray
    cols: np.ndarray
    unit: np.ndarray
    counts: np.ndarray  # (units, G)
    target_counts: np.ndarray  # (bins, G)
    val: np.ndarray  # per bin


def train_super_resolution(
    sdatas,
    *,
    points_key: str = "transcripts",
    image_key: str = "he_image",
    genes: Sequence[str] | None = None,
    n_genes: int = 50,
    low: str = "spots",
    spot_diameter: float = 55.0,
    spot_spacing: float = 100.0,
    low_bin_size: float = 32.0,
    bin_size: float = 8.0,
    size: str = "small",
    expression_model: Any = None,
    features: bool = True,
    alignment: bool = True,
    adversarial: bool = True,
    adversarial_weight: float = 0.01,
    composition_weight: float = 0.3,
    steps: int = 2000,
    batch_size: int = 8,
    window: int | None = None,
    lr: float = 1e-3,
    val_fraction: float = 0.15,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: str | os.PathLike | None = None,
    time_budget: float | None = None,
    device: str = "cpu",
    progress: bool = True,
    coordinate_system: str = COORDINATE_SYSTEM,
):
    """Train a :class:`~st2he.models.SuperResolutionModel` on molecule-level samples.

    Parameters
    ----------
    sdatas
        A SpatialData object or a list of them, each with molecules ``points_key`` and (image features, expression
        model) the guidance image ``image_key``, in µm of ``coordinate_system``. They are not modified.
    genes
        Genes to generate (default: the ``n_genes`` with the largest variance of ``log1p`` counts over the target
        bins, among the genes of every sample and, with ``expression_model``, of the expression model).
    low
        ``"spots"`` (disks of ``spot_diameter`` µm on a hexagonal lattice of ``spot_spacing`` µm) or ``"bins"``
        (squares of ``low_bin_size`` µm): the low-resolution units.
    bin_size
        The target bins (µm).
    size
        ``"tiny"``, ``"small"`` or ``"large"`` (see :data:`st2he.models._super_resolution.SIZES`).
    expression_model
        Also condition on an expression model's prediction (recommended): ``"shipped"`` (the one shipped with
        st2he), the folder of a saved one, or an :class:`~st2he.models.ExpressionModel`; ``None``: not used.
    features, alignment, adversarial
        Switch the semantic image encoder, the alignment module and the adversarial loss on or off.
    adversarial_weight
        Weight of the generator's hinge loss (from a fifth of the steps on).
    composition_weight
        Weight of a second loss on each bin's composition: ``log1p`` of counts per 10k over the model's genes, of the
        prediction against the target, per gene divided by its spread over the training bins, over the bins that hold
        molecules. The main loss (on ``log1p`` counts) teaches how many molecules a bin holds; this one keeps the
        share of each gene right, which is what a bin's log-normalised expression scores. ``0``: off (models trained
        before it existed); 0.3, the default, is the shipped model's weight (``docs/models.md`` shows what it adds).
    steps, batch_size, window, lr
        Optimisation steps, crops per step, bins per crop edge (default the size's window), AdamW's learning rate.
    val_fraction
        Fraction of each section's columns of bins (its right edge) held out for validation.
    seed
        Seeds the weights, the crops, the noise and the held-out figures: the same call gives the same model.
    out
        Folder for the final model (``config.json`` + ``model.safetensors``) and the checkpoints (``out/last``).
    checkpoint_every
        Write ``out/last`` (model and optimiser state) every this many steps (0: only at the end).
    resume
        A checkpoint folder (``out/last`` of an earlier call with the same data and settings) to continue from.
    time_budget
        Stop after this many seconds of optimisation even if ``steps`` are not done (recorded in the metadata).
    device
        Torch device.

    Returns
    -------
    The trained model (eval mode); ``model.metadata`` holds the settings, the loss history and the held-out mean
    per-gene Pearson of the model (one step and ``steps=10``) and of its base (the flat or regression answer).
    """
    import torch

    from st2he.models._super_resolution import build_super_resolution_model, ddpm_scheduler
    from st2he.pp._aggregate import _positive

    if low not in LOW:
        msg = f"low must be one of {LOW}, got {low!r}."
        raise ValueError(msg)
    bin_size = _positive(bin_size, "bin_size")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("n_genes", n_genes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            msg = f"{name} must be a positive integer, got {v!r}."
            raise ValueError(msg)
    number = isinstance(composition_weight, int | float) and not isinstance(composition_weight, bool)
    if not number or not composition_weight >= 0:
        msg = f"composition_weight must be a number >= 0, got {composition_weight!r}."
        raise ValueError(msg)
    if not 0 < val_fraction < 1:
        msg = f"val_fraction must be in (0, 1), got {val_fraction!r}."
        raise ValueError(msg)
    if resume is not None and not (Path(resume) / _STATE).is_file():
        msg = f"resume={str(resume)!r} holds no {_STATE}: give the out/last folder of an earlier training."
        raise FileNotFoundError(msg)
    if not isinstance(sdatas, list | tuple):
        sdatas = [sdatas]
    if not sdatas:
        msg = "sdatas is empty: give at least one molecule-level sample."
        raise ValueError(msg)

    expr, expr_source = _expression_model(expression_model)
    need_image = features or expr is not None
    pairs = [
        _pair(sd, i, points_key, image_key if need_image else None, low, spot_diameter, spot_spacing, low_bin_size,
              bin_size, coordinate_system)
        for i, sd in enumerate(sdatas)
    ]
    panel = [g for g in pairs[0]["genes"] if all(g in set(p["genes"]) for p in pairs[1:])]
    if expr is not None:
        panel = [g for g in panel if g in set(expr.genes)]
    if genes is None:
        genes = _variable_genes(pairs, panel, n_genes)
    else:
        genes = [str(g) for g in genes]
        missing = [g for g in genes if g not in panel]
        if missing:
            msg = (
                f"{len(missing)} genes are not in every sample"
                + (" and the expression model" if expr is not None else "")
                + f": {missing[:5]}."
            )
            raise ValueError(msg)
    kinds = {p["kind"] for p in pairs if p["kind"]}
    if len(kinds) > 1:
        msg = f"The guidance images are of different kinds {sorted(kinds)}: train on one kind (H&E or a stain)."
        raise ValueError(msg)
    guidance = kinds.pop() if kinds else "he"

    # per-gene scales over the training bins
    logs = np.concatenate([
        np.log1p(_target_counts(p, genes))[~_val_bins(p["bins"], val_fraction)] for p in pairs
    ])
    scales = np.maximum(logs.std(axis=0), 0.05)
    comp_scales = _composition_scales(np.expm1(logs)) if composition_weight else None
    model = build_super_resolution_model(
        size, genes=genes, scales=scales, features=features, alignment=alignment, adversarial=adversarial,
        expression=expr is not None, expression_model=expr_source, bin_size=bin_size, guidance=guidance,
        window=window, seed=seed,
    )
    if expr is not None:
        model.set_expression_model(expr)
    win = int(model.config["window"])
    sections = [
        _section(
            p, genes, scales, model, expr, val_fraction, win, coordinate_system, image_key, progress=progress,
            device=device,
        )
        for p in pairs
    ]

    device = torch.device(device)
    model.to(device)
    gen_params = [p for n, p in model.named_parameters() if not n.startswith("discriminator.")]
    opt = torch.optim.AdamW(gen_params, lr=lr, weight_decay=1e-4)
    opt_d = None
    if model.discriminator is not None:
        opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    rng = np.random.default_rng(seed)
    tgen = torch.Generator().manual_seed(int(seed))
    history: list[dict[str, Any]] = []
    start = 0
    if resume is not None:
        start, history = _resume(resume, model, opt, opt_d, rng, tgen, genes, composition_weight)
    scheduler = ddpm_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    weights = np.array([s.train.sum() for s in sections], dtype=np.float64)
    weights /= weights.sum()
    adv_from = steps // 5
    out_path = Path(out) if out is not None else None
    settings = {
        "points_key": points_key, "image_key": image_key, "low": low, "spot_diameter": spot_diameter,
        "spot_spacing": spot_spacing, "low_bin_size": low_bin_size, "bin_size": bin_size, "size": size,
        "expression_model": expr_source, "features": features, "alignment": alignment, "adversarial": adversarial,
        "adversarial_weight": adversarial_weight, "steps": steps, "batch_size": batch_size, "window": win, "lr": lr,
        "val_fraction": val_fraction, "seed": seed, "n_samples": len(sdatas), "time_budget": time_budget,
        "composition_weight": composition_weight,
    }
    if comp_scales is not None:
        scales_t = torch.as_tensor(scales, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        comp_scales_t = torch.as_tensor(comp_scales, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    from st2he._progress import tqdm

    t0 = time.perf_counter()
    step = start
    stopped_by_budget = False
    model.train()
    for step in tqdm(range(start, steps), desc="super-resolution", disable=not progress, initial=start, total=steps):
        if time_budget is not None and time.perf_counter() - t0 > time_budget:
            stopped_by_budget = True
            break
        batch = _batch(sections, weights, rng, batch_size, win, int(model.config["subpixels"]), device)
        low_t, mask_t, px_t, expr_t, target_t, lm_t = batch
        cond, base = model.condition(low_t, mask_t, px_t, expr_t)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=tgen).to(device)
        noise = torch.randn(target_t.shape, generator=tgen).to(device)
        r = ((target_t - base.detach()) * lm_t)
        a = alphas[t].float()[:, None, None, None]
        x_t = a.sqrt() * r + (1 - a).sqrt() * noise
        x0 = base + model.denoise(x_t, t, cond)
        n_in = lm_t.sum().clamp_min(1) * target_t.shape[1]
        loss_mse = (((x0 - target_t) ** 2) * lm_t).sum() / n_in
        loss = loss_mse
        entry = {"step": step + 1, "loss_mse": float(loss_mse.detach())}
        if comp_scales is not None:
            loss_comp = _composition_loss(x0, target_t, lm_t, scales_t, comp_scales_t)
            loss = loss + composition_weight * loss_comp
            entry["loss_composition"] = float(loss_comp.detach())
        if opt_d is not None and step >= adv_from:
            loss_g = -model.discriminator(x0, low_t, mask_t).mean()
            loss = loss + adversarial_weight * loss_g
            entry["loss_adv"] = float(loss_g.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen_params, 1.0)
        opt.step()
        if opt_d is not None and step >= adv_from:
            real = model.discriminator(target_t * mask_t, low_t, mask_t)
            fake = model.discriminator(x0.detach() * mask_t, low_t, mask_t)
            loss_d = torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            entry["loss_d"] = float(loss_d.detach())
        if (step + 1) % 10 == 0 or step == start:
            history.append(entry)
        if out_path is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            _checkpoint(out_path / "last", model, opt, opt_d, rng, tgen, step + 1, history, settings)
    else:
        step = steps
    done = step if stopped_by_budget else steps
    seconds = time.perf_counter() - t0
    model.eval()
    val = _validate(model, sections, seed=seed, device=device)
    model.metadata = {
        "training": {
            "settings": settings,
            "steps_done": int(done),
            "stopped_by_time_budget": stopped_by_budget,
            "seconds": seconds,
            "seconds_per_step": seconds / max(done - start, 1),
            "n_train_bins": int(sum(int(s.train.sum()) for s in sections)),
            "n_val_bins": int(sum(int(s.val.sum()) for s in sections)),
            "history": history,
            "validation": val,
        },
    }
    if out_path is not None:
        _checkpoint(out_path / "last", model, opt, opt_d, rng, tgen, done, history, settings)
        from st2he.models._super_resolution import save_super_resolution_model

        save_super_resolution_model(model, out_path)
    logger.info(
        "train_super_resolution: %d steps in %.0f s; held-out Pearson %.3f (one step), base %.3f.",
        done, seconds, val["pearson_one_step"], val["pearson_base"],
    )
    return model


# ----------------------------------------------------------------------------------------------- data


def _expression_model(expression_model):
    if expression_model is None:
        return None, None
    from st2he.models._expression import SHIPPED_EXPRESSION, ExpressionModel, load_expression_model

    if isinstance(expression_model, ExpressionModel):
        return expression_model, str(expression_model.metadata.get("checkpoint", "in memory"))
    if isinstance(expression_model, str) and expression_model == "shipped":
        return load_expression_model(SHIPPED_EXPRESSION), "shipped"
    if isinstance(expression_model, str | os.PathLike):
        return load_expression_model(expression_model), str(expression_model)
    msg = (
        "expression_model must be None, 'shipped', the folder of a saved expression model or an "
        f"st2he.models.ExpressionModel, got {type(expression_model).__name__}."
    )
    raise TypeError(msg)


def _pair(sdata, index, points_key, image_key, low, spot_diameter, spot_spacing, low_bin_size, bin_size, cs):
    """Low-resolution units and target bins of one sample (aggregated on a light copy; the sample is not modified)."""
    from spatialdata import SpatialData

    import st2he
    from st2he._units import table_keys
    from st2he.tl._super_resolve import _assign_bins, _guidance_kind, _source_units

    if points_key not in sdata.points:
        msg = f"Sample {index} has no points {points_key!r}; its points are {sorted(sdata.points)}."
        raise KeyError(msg)
    images = {}
    raster = None
    if image_key is not None:
        if image_key not in sdata.images:
            msg = f"Sample {index} has no image {image_key!r}; its images are {sorted(sdata.images)}."
            raise KeyError(msg)
        images[image_key] = sdata.images[image_key]
    light = SpatialData(points={points_key: sdata.points[points_key]}, images=images)
    if low == "spots":
        st2he.pp.aggregate_transcripts(
            light, points_key=points_key, by="spots", spot_diameter=spot_diameter, spot_spacing=spot_spacing,
            key_added="_low", shapes_added="_low_units", coordinate_system=cs,
        )
    else:
        st2he.pp.aggregate_transcripts(
            light, points_key=points_key, by="bins", bin_size=low_bin_size, key_added="_low",
            shapes_added="_low_units", coordinate_system=cs,
        )
    st2he.pp.aggregate_transcripts(
        light, points_key=points_key, by="bins", bin_size=bin_size, key_added="_target", shapes_added="_target_bins",
        coordinate_system=cs,
    )
    table = light.tables["_low"]
    regions, region_key, instance_key = table_keys(table, name="_low")
    units = _source_units(light, table, "_low", regions, region_key, instance_key, cs)
    bins = _assign_bins(units, bin_size)
    kind = None
    if image_key is not None:
        from st2he._raster import Raster

        raster = Raster(light.images[image_key], cs, name=f"image_key={image_key!r}")
        kind = _guidance_kind(raster)
    return {
        "sdata": light, "table": table, "target": light.tables["_target"], "units": units, "bins": bins,
        "raster": raster, "kind": kind, "genes": [str(g) for g in table.var_names], "bin_size": bin_size,
    }


def _target_counts(pair, genes) -> np.ndarray:
    from st2he.tl._super_resolve import counts_of

    target = pair["target"]
    measured = set(map(str, target.var_names))
    have = [g for g in genes if g in measured]
    X = np.zeros((len(pair["bins"].ids), len(genes)))
    pos = np.asarray(target.obs_names.astype(str).get_indexer(pair["bins"].ids.astype(str)))
    if have:
        sub = counts_of(target, have, "_target")
        cols = [genes.index(g) for g in have]
        ok = pos >= 0
        X[np.ix_(np.flatnonzero(ok), cols)] = sub[pos[ok]]
    return X


def _variable_genes(pairs, panel, n_genes) -> list[str]:
    if not panel:
        msg = "No gene is shared by every sample (and the expression model): nothing to train on."
        raise ValueError(msg)
    logs = np.concatenate([np.log1p(_target_counts(p, panel)) for p in pairs])
    var = logs.var(axis=0)
    top = np.sort(np.argsort(-var, kind="stable")[: min(n_genes, len(panel))])
    return [panel[i] for i in top]


def _val_bins(bins, val_fraction) -> np.ndarray:
    c0, c1 = int(bins.cols.min()), int(bins.cols.max()) + 1
    cut = c1 - max(1, int(round((c1 - c0) * val_fraction)))
    return bins.cols >= cut


def _section(
    pair, genes, scales, model, expr, val_fraction, window, cs, image_key, *, progress, device
) -> _Section:
    from st2he.tl._super_resolve import _bin_expression, _bin_low, _dense, _pixels, counts_of

    units, bins = pair["units"], pair["bins"]
    bin_size = pair["bin_size"]
    counts = counts_of(pair["table"], genes, "_low")
    target_counts = _target_counts(pair, genes)
    r0, c0 = int(bins.rows.min()), int(bins.cols.min())
    H = max(int(bins.rows.max()) - r0 + 1, window)
    W = max(int(bins.cols.max()) - c0 + 1, window)
    m = model.multiple
    H, W = math.ceil(H / m) * m, math.ceil(W / m) * m
    rr, cc = bins.rows - r0, bins.cols - c0
    low = _bin_low(units, bins, counts, scales, bin_size)
    val = _val_bins(bins, val_fraction)
    expression = None
    if expr is not None:
        e = _bin_expression(
            pair["sdata"], image_key, expr, genes, units, bins, counts, scales, bin_size, "_sr_bins", cs,
            progress=progress, device=device,
        )
        expression = _dense(e, rr, cc, H, W)
    pixels = None
    if model.encoder is not None:
        pixels = _pixels(pair["raster"], r0, c0, H, W, bin_size, int(model.config["subpixels"]))
    return _Section(
        low=_dense(low, rr, cc, H, W),
        mask=_dense(np.ones((len(rr), 1), np.float32), rr, cc, H, W),
        target=_dense((np.log1p(target_counts) / scales).astype(np.float32), rr, cc, H, W),
        expression=expression,
        pixels=pixels,
        train=_dense((~val).astype(np.float32)[:, None], rr, cc, H, W),
        rows=rr, cols=cc, unit=bins.unit, counts=counts, target_counts=target_counts, val=val,
    )


def _batch(sections, weights, rng, batch_size, window, sub, device):
    import torch

    items = {k: [] for k in ("low", "mask", "pixels", "expression", "target", "train")}
    for _ in range(batch_size):
        s = sections[int(rng.choice(len(sections), p=weights))]
        H, W = s.mask.shape[1:]
        r = int(rng.integers(0, H - window + 1))
        c = int(rng.integers(0, W - window + 1))
        k = int(rng.integers(4))
        flip = bool(rng.integers(2))

        def aug(a, f=1, r=r, c=c, k=k, flip=flip):
            a = a[:, r * f : (r + window) * f, c * f : (c + window) * f]
            a = np.rot90(a, k, axes=(1, 2))
            return np.ascontiguousarray(a[:, :, ::-1] if flip else a)

        for name in items:
            a = getattr(s, name)
            if a is not None:
                items[name].append(aug(a, sub if name == "pixels" else 1))
    out = []
    for name in ("low", "mask", "pixels", "expression", "target", "train"):
        out.append(torch.from_numpy(np.stack(items[name])).to(device) if items[name] else None)
    low, mask, pixels, expression, target, train = out
    return low, mask, pixels, expression, target, mask * train


def _composition_scales(counts: np.ndarray) -> np.ndarray:
    """Per-gene spread of ``log1p`` CP10k over the training bins (bins x genes counts) that hold molecules."""
    total = counts.sum(axis=1, keepdims=True)
    held = total[:, 0] > 0
    if not held.any():
        return np.ones(counts.shape[1])
    comp = np.log1p(counts[held] / total[held] * TARGET_SUM)
    return np.maximum(comp.std(axis=0), 0.05)


def _composition_loss(x0, target, weight, scales, comp_scales):
    """MSE of the bins' ``log1p`` CP10k over the model's genes, prediction against target (both scaled ``log1p``
    counts), each gene divided by its spread, over the weighted bins whose target holds molecules."""
    pred = (x0 * scales).clamp_min(0).expm1()
    true = (target * scales).clamp_min(0).expm1()
    pred_total = pred.sum(1, keepdim=True)
    true_total = true.sum(1, keepdim=True)
    pred_comp = (pred / (pred_total + 1e-6) * TARGET_SUM).log1p()
    true_comp = (true / true_total.clamp_min(1e-6) * TARGET_SUM).log1p()
    w = weight * (true_total > 0.5)
    n = w.sum().clamp_min(1) * target.shape[1]
    return ((((pred_comp - true_comp) / comp_scales) ** 2) * w).sum() / n


# ----------------------------------------------------------------------------------------------- validation


def _validate(model, sections, *, seed, device) -> dict[str, float]:
    """Held-out mean per-gene Pearson (log1p of the conserved estimate vs log1p of the true counts) over the
    validation strips: the model in one step and in 10 steps, and its base (flat or regression)."""
    import torch

    from st2he.tl._super_resolve import conserve

    scales = np.asarray(model.config["scales"], dtype=np.float64)
    preds: dict[str, list[np.ndarray]] = {"one_step": [], "ten_steps": [], "base": []}
    truth = []
    for i, s in enumerate(sections):
        if not s.val.any():
            continue
        G, H, W = s.low.shape

        def t(a):
            return torch.from_numpy(a[None]).to(device) if a is not None else None

        noise = torch.from_numpy(np.random.default_rng([seed, i]).standard_normal((1, G, H, W), dtype=np.float32))
        with torch.no_grad():
            cond, base = model.condition(t(s.low), t(s.mask), t(s.pixels), t(s.expression))
            maps = {
                "base": base,
                "one_step": model.sample(t(s.low), t(s.mask), t(s.pixels), t(s.expression), steps=1, noise=noise),
                "ten_steps": model.sample(t(s.low), t(s.mask), t(s.pixels), t(s.expression), steps=10, noise=noise),
            }
        for name, x in maps.items():
            x = x[0].float().cpu().numpy()[:, s.rows, s.cols].T.astype(np.float64)
            est = np.clip(np.expm1(np.clip(x * scales, None, 30.0)), 0, None)
            preds[name].append(np.log1p(conserve(est, s.counts, s.unit))[s.val])
        truth.append(np.log1p(s.target_counts)[s.val])
    if not truth:
        return {"pearson_one_step": float("nan"), "pearson_ten_steps": float("nan"), "pearson_base": float("nan")}
    y = np.concatenate(truth)
    return {f"pearson_{k}": _mean_pearson(np.concatenate(v), y) for k, v in preds.items()}


def _mean_pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(0), y - y.mean(0)
    den = np.sqrt((xc**2).sum(0) * (yc**2).sum(0))
    ok = den > 0
    return float(((xc * yc).sum(0)[ok] / den[ok]).mean()) if ok.any() else float("nan")


# ----------------------------------------------------------------------------------------------- checkpoints


def _checkpoint(folder: Path, model, opt, opt_d, rng, tgen, step, history, settings) -> None:
    import torch

    from st2he.models._super_resolution import save_super_resolution_model

    save_super_resolution_model(model, folder, metadata={"checkpoint_step": int(step), "settings": settings})
    state = {
        "step": int(step),
        "optimizer": opt.state_dict(),
        "optimizer_d": opt_d.state_dict() if opt_d is not None else None,
        "numpy_rng": rng.bit_generator.state,
        "torch_rng": tgen.get_state(),
        "history": history,
    }
    torch.save(state, folder / _STATE)


def _resume(folder, model, opt, opt_d, rng, tgen, genes, composition_weight):
    import torch

    from st2he.models._super_resolution import load_super_resolution_model

    folder = Path(folder)
    saved = load_super_resolution_model(folder)
    if saved.genes != list(genes) or saved.config["size"] != model.config["size"]:
        msg = f"The checkpoint {folder} was trained on other genes or another size; resume with the same settings."
        raise ValueError(msg)
    # checkpoints written before the composition loss existed trained without it
    was = float(saved.metadata.get("settings", {}).get("composition_weight", 0.0))
    if was != float(composition_weight):
        msg = (
            f"The checkpoint {folder} was trained with composition_weight={was:g}, this call asks for "
            f"{composition_weight:g}: pass composition_weight={was:g} to resume it."
        )
        raise ValueError(msg)
    model.load_state_dict(saved.state_dict())
    state = torch.load(folder / _STATE, weights_only=True)
    opt.load_state_dict(state["optimizer"])
    if opt_d is not None and state["optimizer_d"] is not None:
        opt_d.load_state_dict(state["optimizer_d"])
    rng.bit_generator.state = state["numpy_rng"]
    tgen.set_state(state["torch_rng"])
    return int(state["step"]), list(state["history"])
