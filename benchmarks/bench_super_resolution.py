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

Then the real crops in ``/work/shared/data`` (Xenium cell-line crop via ``st2he.io.read_xenium(...,
image_pixel_size=400 / 237, image_origin=(1000, 1000))``, the MERSCOPE brain crop), guided by their nuclear stain:
pseudo-spots -> 8 µm bins against their own molecules (few spots: read the figures as a check, not a ranking).
Seconds per mm² of each method (the super_resolve call alone, 2 CPU cores shared).

    python benchmarks/bench_super_resolution.py
    python benchmarks/bench_super_resolution.py --model PATH   # regression with a saved expression model
    python benchmarks/bench_super_resolution.py --model src/st2he/models/weights/expression \
        --diffusion src/st2he/models/weights/super_resolution --no-real   # + the diffusion model

With ``--diffusion`` (a super-resolution model, e.g. the shipped one) every method resolves the model's genes only
(its 50 most variable genes of the training seeds), so the comparison is paired gene by gene; rows ``diffusion``
(10 DDIM steps) and ``diffusion_1step`` (the one-step mode) are added.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

TEST_SEEDS = (101, 102, 103)
TRAIN_SEEDS = (0, 1)
SIZE_UM = 512.0
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _log_table(sdata, key: str, truth: str, out: str, *, flat: bool = False) -> None:
    """A copy of super-resolved table ``key``, log-normalised, annotating the truth's bins (same ids by design)."""
    import anndata as ad
    from spatialdata.models import TableModel

    from st2he._units import lognormalise

    t = sdata.tables[key]
    X = np.asarray(t.X, dtype=np.float64)
    if flat:
        X = pd.DataFrame(X).groupby(t.obs["source_unit"].astype(str).to_numpy()).transform("mean").to_numpy()
    region = sdata.tables[truth].uns["spatialdata_attrs"]["region"]
    tab = ad.AnnData(X=lognormalise(X), obs=t.obs[["instance_id", "array_row", "array_col"]].copy(), var=t.var.copy())
    tab.obs["region"] = pd.Categorical([region] * tab.n_obs)
    sdata.tables[out] = TableModel.parse(tab, region=region, region_key="region", instance_key="instance_id")


def _score(sdata, key: str, truth: str, *, flat: bool = False) -> pd.DataFrame:
    import st2he

    _log_table(sdata, key, truth, "_scored", flat=flat)
    df = st2he.tl.evaluate_expression(sdata, pred_key="_scored", true_key=truth, overwrite=True)
    del sdata.tables["_scored"]
    return df


def _area_mm2(sdata, spots: str) -> float:
    """Area of the spots' bounding box in mm²."""
    g = sdata.shapes[spots]
    x0, y0, x1, y1 = g.geometry.total_bounds
    r = float(g["radius"].iloc[0])
    return (x1 - x0 + 2 * r) * (y1 - y0 + 2 * r) / 1e6


def _run(sdata, methods: dict, *, truth: str = "truth", spots: str = "spots") -> tuple[dict, dict]:
    """Per-method per-gene frames and seconds per mm²."""
    import st2he

    scores, speed = {}, {}
    area = _area_mm2(sdata, sdata.tables[spots].uns["spatialdata_attrs"]["region"])
    for name, kwargs in methods.items():
        t = time.perf_counter()
        st2he.tl.super_resolve(sdata, table_key=spots, key_added="sr", overwrite=True, progress=False, **kwargs)
        speed[name] = (time.perf_counter() - t) / area
        scores[name] = _score(sdata, "sr", truth)
        if name == "bicubic":
            scores["flat"] = _score(sdata, "sr", truth, flat=True)
            speed["flat"] = float("nan")
    return scores, speed


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
    rows = {}
    for name, frames in all_scores.items():
        hv = pd.concat([f[f["highly_variable"]] for f in frames])
        rows[name] = {
            "pearson_hvg": hv["pearson"].mean(),
            "ssim_hvg": hv["ssim"].mean(),
            "pearson_all": pd.concat(frames)["pearson"].mean(),
            "n_gene_sections": len(hv),
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


def simulated(model_path: str | None, diffusion: str | None = None) -> None:
    import st2he

    all_scores: dict[str, list[pd.DataFrame]] = {}
    speeds: dict[str, list[float]] = {}
    model = model_path
    for seed in TEST_SEEDS:
        sdata = st2he.datasets.synthetic_tissue(seed, size_um=SIZE_UM)
        st2he.pp.aggregate_transcripts(sdata, by="spots", key_added="spots", shapes_added="spots_55um")
        st2he.pp.aggregate_transcripts(sdata, by="bins", bin_size=8.0, key_added="truth")
        genes = list(sdata.tables["spots"].var_names)
        if model is None:
            model = _tiny_model(genes)
        sr = None
        if diffusion is not None:
            from st2he.models import load_super_resolution_model

            sr = load_super_resolution_model(diffusion)
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
            for kw in methods.values():
                kw["genes"] = genes
        scores, speed = _run(sdata, methods)
        for k, v in scores.items():
            all_scores.setdefault(k, []).append(v)
            speeds.setdefault(k, []).append(speed[k])
        n_bins = sdata.tables["sr"].n_obs
        print(f"seed {seed}: {sdata.tables['spots'].n_obs} spots -> {n_bins} bins of 8 µm, {len(genes)} genes")
    table = _summary(all_scores)
    table["s_per_mm2"] = {k: float(np.nanmean(v)) for k, v in speeds.items()}
    print(f"\nSimulated, held-out seeds {TEST_SEEDS} ({SIZE_UM:g} µm), 55 µm spots -> 8 µm bins, top-50 HVG each:")
    print(table.round(4).to_string())
    pairs = [
        ("guided_he", "flat"), ("guided_dapi", "flat"), ("bicubic", "flat"), ("guided_he", "bicubic"),
        ("guided_dapi", "bicubic"), ("regression", "flat"), ("regression", "guided_he"), ("guided_he", "regression"),
    ]
    for d in ("diffusion", "diffusion_1step"):
        pairs += [(d, b) for b in ("flat", "bicubic", "guided_he", "guided_dapi", "regression")]
    for metric in ("pearson", "ssim"):
        _wilcoxon(all_scores, pairs, metric)


def real() -> None:
    import st2he

    crops = {}
    xen = DATA / "xenium_cellline_crop"
    if xen.exists():
        crops["xenium"] = (
            st2he.io.read_xenium(xen, image_pixel_size=400 / 237, image_origin=(1000, 1000)), "morphology_focus"
        )
    mer = DATA / "merscope_brain_cancer_crop"
    if mer.exists():
        crops["merscope"] = (st2he.io.read_merscope(mer), "dapi")
    for name, (sdata, stain) in crops.items():
        st2he.pp.aggregate_transcripts(sdata, by="spots", key_added="spots", shapes_added="spots_55um")
        st2he.pp.aggregate_transcripts(sdata, by="bins", bin_size=8.0, key_added="truth")
        methods = {"bicubic": {"method": "bicubic"}, "guided_stain": {"method": "guided", "image_key": stain}}
        scores, speed = _run(sdata, methods)
        table = pd.DataFrame(
            {
                k: {
                    "pearson_all": v["pearson"].mean(),
                    "pearson_hvg": v[v["highly_variable"]]["pearson"].mean(),
                    "ssim_all": v["ssim"].mean(),
                    "n_genes_scored": int(v["pearson"].notna().sum()),
                    "s_per_mm2": speed[k],
                }
                for k, v in scores.items()
            }
        ).T
        n = sdata.tables["spots"].n_obs
        print(f"\n{name} crop ({n} pseudo-spots -> {sdata.tables['sr'].n_obs} bins, guided by {stain!r}):")
        print(table.round(4).to_string())
        _wilcoxon({k: [v] for k, v in scores.items()}, [("guided_stain", "flat"), ("bicubic", "flat")], "pearson")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="saved expression model for method='regression'")
    parser.add_argument("--no-real", action="store_true", help="skip the real crops")
    parser.add_argument("--diffusion", default=None, help="saved super-resolution model for method='diffusion'")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("st2he").setLevel(logging.ERROR)
    simulated(args.model, args.diffusion)
    if not args.no_real:
        real()


if __name__ == "__main__":
    main()
