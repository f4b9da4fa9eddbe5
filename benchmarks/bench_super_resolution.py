"""Super-resolution of spot-level expression to 8 µm bins (issue 11): every method of ``st2he.tl.super_resolve``.

Held-out simulated sections (seeds 101-103, never trained on; 512 µm squares): pseudo-Visium spots (55 µm disks on a
100 µm lattice, ``aggregate_transcripts(by="spots")``) are super-resolved to 8 µm bins and scored against the 8 µm
bins of the same molecules (``aggregate_transcripts(by="bins", bin_size=8)``), which the methods never see. Methods:
``flat`` (each bin gets its spot's mean: the floor any method must clear), ``bicubic``, ``guided`` by the H&E
(haematoxylin) and by the nuclear stain, and ``regression`` (an expression model's dense prediction rescaled within
each spot; a tiny model trained here on seeds 0-1 unless ``--model`` names one).

Scoring: the super-resolved counts are log-normalised per bin (log1p CP10k over the genes resolved, every gene of the
panel) and scored with ``st2he.tl.evaluate_expression`` over the bins both tables hold: signed per-gene Pearson and
SSIM (fixed data range: the measured map's max - min). Reported over the top-50 highly variable genes of each
section (``evaluate_expression``'s ``highly_variable``); paired one-sided Wilcoxon tests over (section, gene) pairs.
``--normalisation log1p`` scores the gene maps as log1p of the counts instead (both sides; the normalisation
``evaluate_expression`` gives bins of equal area): then how many molecules a bin holds counts too, not only its
composition.

Then the real crops in ``/work/shared/data`` (Xenium cell-line crop via ``st2he.io.read_xenium(...,
image_pixel_size=400 / 237, image_origin=(1000, 1000))``, the MERSCOPE brain crop, the CosMx brain crop), held out by
region (``_sr_holdout``): split at x = the median of the molecules (floored to 8 µm); a ``tiny`` expression model
(``--expr-steps``) and a ``tiny`` super-resolution model (``--sr-budget`` seconds) are trained on the molecules of the
left half for each guidance: the nuclear stain (read by the models as a grey RGB image) and the crop's virtual H&E
(shipped generator, drawn from all the crop's molecules); every method is scored on the right half only (its
pseudo-spots whose disk lies wholly right of the split -> its 8 µm bins holding a molecule), with paired two-sided
Wilcoxon tests over genes against bicubic. CosMx has no image, and its mouse panel shares no gene with the shipped
generator's palette (no virtual H&E), and 748 genes over ~2,000 molecules per half: flat and bicubic only. Few
spots per half: read the figures as a check, not a ranking.
Seconds per mm² of each method (the super_resolve call alone, 2 CPU cores shared).

Beside st2he's figures, labelled and not comparable with them: Diff-ST's conventions (``pearson_diffst``,
``ssim_diffst``: ``evaluate_expression``'s ``*_diffst_convention``, |Pearson| over the whole grid and SSIM of each map
min-max normalised on its own as ``uint8(x * 225)``, averaged as Diff-ST does over the values that are not zero), only
to set st2he's numbers beside published Diff-ST figures. ``--json PATH`` also writes the tables.

    python benchmarks/bench_super_resolution.py
    python benchmarks/bench_super_resolution.py --model PATH   # regression with a saved expression model
    python benchmarks/bench_super_resolution.py --model src/st2he/models/weights/expression \
        --diffusion src/st2he/models/weights/super_resolution --no-real   # + the diffusion model
    python benchmarks/bench_super_resolution.py --model src/st2he/models/weights/expression \
        --diffusion src/st2he/models/weights/super_resolution --no-real --n-samples 4 \
        --methods regression diffusion_1step diffusion_1step_mean4   # the mean of 4 one-step samples
    python benchmarks/bench_super_resolution.py --real-only [--crops xenium] [--guides stain vhe]
    python benchmarks/bench_super_resolution.py --model src/st2he/models/weights/expression \
        --diffusion src/st2he/models/weights/super_resolution --no-real --seeds 101 \
        --methods diffusion_1step   # the quickest scoring run: one held-out seed, bicubic, flat, one-step diffusion

With ``--diffusion`` (a super-resolution model, e.g. the shipped one) every method resolves the model's genes only
(its 50 most variable genes of the training seeds), so the comparison is paired gene by gene; rows ``diffusion``
(10 DDIM steps) and ``diffusion_1step`` (the one-step mode) are added; with ``--n-samples n`` also
``diffusion_1step_mean{n}``: ``super_resolve(n_samples=n)``, whose table is the mean of the n conserved samples
(sample 0 is the ``diffusion_1step`` sample: the same noise).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import _sr_holdout as H

TEST_SEEDS = (101, 102, 103)
TRAIN_SEEDS = (0, 1)
SIZE_UM = 512.0
REAL_CROPS = ("xenium", "merscope", "cosmx")


def _tiny_model(genes):
    import torch

    import st2he

    torch.manual_seed(0)
    sections = [st2he.datasets.synthetic_tissue(s, size_um=SIZE_UM) for s in TRAIN_SEEDS]
    t = time.perf_counter()
    model = st2he.tl.train_expression(
        sections, model="tiny", genes=genes, um_per_px=1.0, chip_um=128.0, steps=300, batch_size=4, lr=3e-3,
        val_every=100, ckpt_every=0, progress=False,
    )
    print(f"regression model: tiny, trained on seeds {TRAIN_SEEDS} in {time.perf_counter() - t:.0f} s (300 steps)")
    return model


def _summary(all_scores: dict[str, list[pd.DataFrame]]) -> pd.DataFrame:
    """Per method, over the (section, gene) pairs of each section's top-50 HVG; Diff-ST's conventions labelled."""
    rows = {}
    for name, frames in all_scores.items():
        hv = pd.concat([f[f["highly_variable"]] for f in frames])
        rows[name] = {
            "pearson_hvg": hv["pearson"].mean(),
            "ssim_hvg": hv["ssim"].mean(),
            "pearson_all": pd.concat(frames)["pearson"].mean(),
            "n_gene_sections": len(hv),
            # Diff-ST's conventions, averaged as Diff-ST does (values that are not zero): not comparable
            **{f"{k}_hvg": H.mean_nonzero(hv[column]) for k, column in H.DIFFST_COLUMNS.items()},
        }
    return pd.DataFrame(rows).T


def _wilcoxon(all_scores, pairs, metric: str) -> None:
    from scipy.stats import wilcoxon

    for a, b in pairs:
        if a not in all_scores or b not in all_scores:
            continue
        x = pd.concat([f[f["highly_variable"]][metric] for f in all_scores[a]]).to_numpy()
        y = pd.concat([f[f["highly_variable"]][metric] for f in all_scores[b]]).to_numpy()
        ok = np.isfinite(x) & np.isfinite(y)
        d = x[ok] - y[ok]
        p = wilcoxon(x[ok], y[ok], alternative="greater").pvalue if np.any(d != 0) else float("nan")
        print(
            f"  {metric:8s} {a:>14s} > {b:<14s}: mean diff {d.mean():+.4f}, wins {int((d > 0).sum())}/{len(d)}, "
            f"one-sided Wilcoxon p = {p:.2g}"
        )


def simulated(
    model_path: str | None,
    diffusion: str | None = None,
    *,
    n_samples: int = 1,
    only: list[str] | None = None,
    seeds=TEST_SEEDS,
    normalisation: str = "log1p_cp10k",
    density_baseline: bool = False,
) -> pd.DataFrame:
    """Every method on the held-out seeds; ``n_samples > 1`` adds ``diffusion_1step_mean{n}`` (the mean of n samples).

    ``only``: run just these methods (``bicubic`` always runs: ``flat`` is scored from it). ``normalisation``,
    ``density_baseline``: as ``_sr_holdout.run``. Returns the summary table printed.
    """
    import st2he

    all_scores: dict[str, list[pd.DataFrame]] = {}
    speeds: dict[str, list[float]] = {}
    model = model_path
    seeds = tuple(seeds)
    sr = None
    if diffusion is not None:  # read once: every seed resolves its genes
        from st2he.models import load_super_resolution_model

        sr = load_super_resolution_model(diffusion)
    for seed in seeds:
        sdata = st2he.datasets.synthetic_tissue(seed, size_um=SIZE_UM)
        st2he.pp.aggregate_transcripts(sdata, by="spots", key_added="spots", shapes_added="spots_55um")
        st2he.pp.aggregate_transcripts(sdata, by="bins", bin_size=8.0, key_added="truth")
        genes = list(sdata.tables["spots"].var_names)
        if model is None:
            model = _tiny_model(genes)
        if sr is not None:
            genes = sr.genes
        methods = {
            "bicubic": {"method": "bicubic"},
            "guided_he": {"method": "guided", "image_key": "he_image"},
            "guided_dapi": {"method": "guided", "image_key": "morphology_focus"},
            "regression": {"method": "regression", "image_key": "he_image", "model": model},
        }
        if sr is not None:
            methods["diffusion"] = {"method": "diffusion", "image_key": "he_image", "model": sr, "steps": 10}
            methods["diffusion_1step"] = {"method": "diffusion", "image_key": "he_image", "model": sr, "steps": 1}
            if n_samples > 1:  # super_resolve's table holds the mean of the n conserved samples
                methods[f"diffusion_1step_mean{n_samples}"] = {**methods["diffusion_1step"], "n_samples": n_samples}
            for kw in methods.values():
                kw["genes"] = genes
        if only:
            methods = {k: v for k, v in methods.items() if k == "bicubic" or k in only}
        scores, speed = H.run(sdata, methods, normalisation=normalisation, density_baseline=density_baseline)
        for k, v in scores.items():
            all_scores.setdefault(k, []).append(v)
            speeds.setdefault(k, []).append(speed[k])
        n_bins = sdata.tables["sr"].n_obs
        print(f"seed {seed}: {sdata.tables['spots'].n_obs} spots -> {n_bins} bins of 8 µm, {len(genes)} genes")
    table = _summary(all_scores)
    table["s_per_mm2"] = {k: float(np.nanmean(v)) for k, v in speeds.items()}
    print(f"\nSimulated, held-out seeds {seeds} ({SIZE_UM:g} µm), 55 µm spots -> 8 µm bins, top-50 HVG each:")
    print(table.round(4).to_string())
    print(H.DIFFST_NOTE)
    pairs = [
        ("guided_he", "flat"), ("guided_dapi", "flat"), ("bicubic", "flat"), ("guided_he", "bicubic"),
        ("guided_dapi", "bicubic"), ("regression", "flat"), ("regression", "guided_he"), ("guided_he", "regression"),
    ]
    for d in ("diffusion", "diffusion_1step", f"diffusion_1step_mean{n_samples}"):
        pairs += [(d, b) for b in ("flat", "bicubic", "guided_he", "guided_dapi", "regression", "regression_density")]
    mean = f"diffusion_1step_mean{n_samples}"
    pairs += [(mean, "diffusion_1step"), ("regression", mean)]
    for metric in ("pearson", "ssim"):
        _wilcoxon(all_scores, pairs, metric)
    return table


def real(
    crops=REAL_CROPS,
    *,
    guides=("stain", "vhe"),
    expr_steps: int = 150,
    sr_budget: float = 80.0,
    normalisation: str = "log1p_cp10k",
    density_baseline: bool = False,
) -> dict[str, pd.DataFrame]:
    """Every method on the held-out half of each real crop (protocol: ``_sr_holdout``), models trained on the other.

    Returns each crop's table, as printed.
    """
    import st2he

    tables = {}
    for name in crops:
        try:
            full, stain = H.read_crop(name)
        except FileNotFoundError as e:
            print(f"\n{name}: skipped ({e})")
            continue
        split = H.split_x(full)
        guide = {}
        if stain is not None and "stain" in guides:
            guide["stain"] = stain
            stain_rgb = H.add_stain_rgb(full, stain)
        if "vhe" in guides:
            t = time.perf_counter()
            try:
                guide["vhe"] = H.add_virtual_he(full)
                print(f"\n{name}: virtual H&E of the whole crop in {time.perf_counter() - t:.0f} s")
            except ValueError as e:  # CosMx mouse panel: no gene of the shipped generator's palette
                print(f"\n{name}: no virtual H&E ({e})")
        images = list(full.images)
        test = H.crop_x(full, split, np.inf, images=images)
        dropped = H.heldout_units(test, split)
        genes = [str(g) for g in test.tables["spots"].var_names]
        trainable = stain is not None  # CosMx: 748 genes over ~2,000 training molecules and no stain; see the docs
        models = {}
        if trainable:
            train = H.crop_x(full, -np.inf, split, images=images)
            train_genes = set(map(str, train.points["transcripts"]["gene"].compute().unique()))
            genes = [g for g in genes if g in train_genes]
            print(f"  training half x < {split:g} µm ({len(train.points['transcripts'])} molecules):")
            for g, key in guide.items():
                read = stain_rgb if g == "stain" else key
                models[g] = (read, *H.train_models(train, genes, read, expr_steps=expr_steps, sr_budget=sr_budget))
        methods = {"bicubic": {"method": "bicubic"}}
        for g, key in guide.items():
            methods[f"guided_{g}"] = {"method": "guided", "image_key": key}
        for g, (read, expr, sr) in models.items():
            methods[f"regression_{g}"] = {"method": "regression", "image_key": read, "model": expr}
            if sr is not None:
                methods[f"diffusion_{g}"] = {"method": "diffusion", "image_key": read, "model": sr, "steps": 10}
                methods[f"diffusion_1step_{g}"] = {"method": "diffusion", "image_key": read, "model": sr, "steps": 1}
        for kw in methods.values():
            kw["genes"] = genes
        scores, speed = H.run(test, methods, normalisation=normalisation, density_baseline=density_baseline)
        n_bins = int(len(set(test.tables["sr"].obs_names) & set(test.tables["truth"].obs_names)))
        n = test.tables["spots"].n_obs
        print(
            f"{name}: held-out half x >= {split:g} µm: {n} pseudo-spots ({dropped} crossing the split left out) -> "
            f"{n_bins} scored 8 µm bins, {len(genes)} genes; Wilcoxon: paired over genes vs bicubic, two-sided"
        )
        table = H.crop_table(scores, speed, n_bins)
        tables[name] = table.copy()
        table["wilcoxon_p"] = table["wilcoxon_p"].map(lambda p: "" if np.isnan(p) else f"{p:.2g}")
        print(table.round(4).to_string())
        print(H.DIFFST_NOTE)
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="saved expression model for method='regression'")
    parser.add_argument("--no-real", action="store_true", help="skip the real crops")
    parser.add_argument(
        "--density-baseline", action="store_true",
        help="also score regression re-weighted by each bin's nuclear density (a benchmark-only baseline)",
    )
    parser.add_argument(
        "--normalisation", choices=["log1p_cp10k", "log1p"], default="log1p_cp10k",
        help="bins scored as log1p CP10k (their composition; default) or log1p counts (also their molecule density)",
    )
    parser.add_argument("--real-only", action="store_true", help="only the real crops")
    parser.add_argument("--diffusion", default=None, help="saved super-resolution model for method='diffusion'")
    parser.add_argument(
        "--n-samples", type=int, default=1, help="with --diffusion, also the mean of this many one-step samples"
    )
    parser.add_argument("--methods", nargs="+", default=None, help="simulated: run only these methods (+ bicubic)")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=list(TEST_SEEDS), help="simulated: the held-out seeds to score"
    )
    parser.add_argument("--crops", nargs="+", default=list(REAL_CROPS), help="real crops to run")
    parser.add_argument("--guides", nargs="+", default=["stain", "vhe"], help="real: guidance images to use")
    parser.add_argument("--expr-steps", type=int, default=150, help="real: steps of each tiny expression model")
    parser.add_argument(
        "--sr-budget", type=float, default=80.0, help="real: seconds of each tiny super-resolution model (0: none)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the tables to this JSON file")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("st2he").setLevel(logging.ERROR)
    scoring = {"normalisation": args.normalisation, "density_baseline": args.density_baseline}
    out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "note": H.DIFFST_NOTE}
    if not args.real_only:
        table = simulated(
            args.model, args.diffusion, n_samples=args.n_samples, only=args.methods, seeds=args.seeds, **scoring
        )
        out["simulated"] = table.to_dict(orient="index")
    if not args.no_real:
        tables = real(args.crops, guides=args.guides, expr_steps=args.expr_steps, sr_budget=args.sr_budget, **scoring)
        out["real"] = {name: t.to_dict(orient="index") for name, t in tables.items()}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
