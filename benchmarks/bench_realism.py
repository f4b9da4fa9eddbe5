"""Realism: how well a classifier tells simulated H&E tiles from real ones, for both looks of ``synthetic_tissue``.

Tiles of 128 px at 0.5 µm per pixel. Real tiles come from ``../shared/data`` (the CMU-1 small-region slide cut over
its tissue, the TCGA tiles and the 32 Kather CRC tiles); simulated tiles from several samples of
:func:`st2he.datasets.synthetic_tissue` (different seeds and subtypes) rendered with ``appearance="clean"`` and with
``appearance="realistic"``. Each tile is described by 20 hand-made colour and texture features (haematoxylin and
eosin optical densities after colour deconvolution, brightness and saturation, gradient-magnitude percentiles,
local variance at two scales, sharpness, background share, ...). A logistic regression, cross-validated in folds
grouped by slide or sample (the tiles of one slide are never on both sides), gives the ROC AUC of real against
simulated for each look: 0.5 means the simulation cannot be told from real slides by these features, 1.0 that it
always can. With ``--cnn`` a small CNN (three conv layers, a few epochs on CPU) is scored the same way. The
features AUC is that of the pooled out-of-fold predictions (the figure of the issue); the mean AUC within folds is
printed too, and is the one given for the CNN, whose calibration differs too much from fold to fold to pool.

Nuclear morphology: nuclei are segmented the same way in the real H&E (the whole CMU-1 region, each TCGA and Kather
tile) and in each simulated sample's whole H&E, with the segmentation of :func:`st2he.datasets.pairs_from_he`
(haematoxylin by colour deconvolution, Otsu threshold over the tissue, distance-transform watershed; nuclei touching
the image's border left out), and described by area (µm²), eccentricity and solidity. The table gives the median
and interquartile range of each, the spread of areas (IQR / median) and the two-sample Kolmogorov-Smirnov statistic
of each feature against the real nuclei; the rows ``truth`` describe the simulation's own nucleus polygons
(``nucleus_boundaries``), what the segmentation is trying to see.

    python benchmarks/bench_realism.py [--seeds 6] [--size 384] [--cnn] [--out DIR]
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import numpy as np

DATA = os.environ.get("ST2HE_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
if not os.path.isdir(DATA):
    DATA = "/work/shared/data"
TILE = 128

FEATURES = (
    "h_mean",
    "h_std",
    "h_p90",
    "e_mean",
    "e_std",
    "e_p90",
    "he_corr",
    "gray_mean",
    "gray_std",
    "sat_mean",
    "sat_std",
    "hue_mean",
    "white_frac",
    "grad_p50",
    "grad_p90",
    "grad_p99",
    "locvar_3",
    "locvar_9",
    "laplace_energy",
    "dark_od_ratio",
)


def _tiles(img: np.ndarray, step: int = TILE) -> list[np.ndarray]:
    """``(H, W, 3)`` uint8 -> non-overlapping ``TILE`` px tiles."""
    out = []
    for r in range(0, img.shape[0] - TILE + 1, step):
        for c in range(0, img.shape[1] - TILE + 1, step):
            out.append(img[r : r + TILE, c : c + TILE])
    return out


def _tissue_share(tile: np.ndarray) -> float:
    rgb = tile.astype(np.float32)
    sat = rgb.max(axis=2) - rgb.min(axis=2)
    return float(np.mean((rgb.mean(axis=2) < 215) | (sat > 25)))


def real_tiles(max_cmu: int = 150, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Real H&E tiles and their slide (group) names."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(seed)
    tiles, groups = [], []
    svs = tifffile.imread(os.path.join(DATA, "he_cmu1_small_region.svs"))  # ~0.499 µm/px
    cmu = [t for t in _tiles(svs) if _tissue_share(t) > 0.5]
    cmu = [cmu[i] for i in np.sort(rng.permutation(len(cmu))[:max_cmu])]
    # the slide is large: split it in four groups by position would leak nothing more, keep one group
    tiles += cmu
    groups += ["cmu1"] * len(cmu)
    for folder in sorted(glob.glob(os.path.join(DATA, "he_tcga_tiles", "TCGA-*"))):
        for f in sorted(glob.glob(os.path.join(folder, "*.jpg"))):
            img = np.asarray(Image.open(f).convert("RGB"))
            for t in _tiles(img):
                if _tissue_share(t) > 0.5:
                    tiles.append(t)
                    groups.append(os.path.basename(folder))
    for f in sorted(glob.glob(os.path.join(DATA, "he_tcga_tiles", "*.tif"))):
        img = np.asarray(Image.open(f).convert("RGB"))
        for t in _tiles(img, step=img.shape[0] - TILE):
            tiles.append(t)
            groups.append(os.path.basename(f))
    for f in sorted(glob.glob(os.path.join(DATA, "he_kather_crc_32", "*.png"))):
        img = np.asarray(Image.open(f).convert("RGB"))  # 224 px at 0.5 µm/px: two overlapping crops each
        for t in (img[:TILE, :TILE], img[-TILE:, -TILE:]):
            tiles.append(t)
            groups.append(os.path.basename(f))
    return tiles, groups


def polygon_morphology(polygons):
    """The description of :func:`st2he.datasets._he_pairs.nuclear_morphology` of polygons (the simulation's
    ``nucleus_boundaries``), from their exact moments."""
    import pandas as pd
    import shapely

    xy, owner = shapely.get_coordinates(polygons, return_index=True)
    same = np.r_[owner[1:] == owner[:-1], False]  # edge k -> k + 1 within one ring
    x0, y0, x1, y1 = xy[:-1, 0], xy[:-1, 1], xy[1:, 0], xy[1:, 1]
    cross = np.where(same[:-1], x0 * y1 - x1 * y0, 0.0)
    n = len(polygons)

    def total(values):
        return np.bincount(owner[:-1], weights=values, minlength=n)

    a = total(cross) / 2
    cx = total(cross * (x0 + x1)) / (6 * a)
    cy = total(cross * (y0 + y1)) / (6 * a)
    sxx = total(cross * (x0 * x0 + x0 * x1 + x1 * x1)) / (12 * a) - cx * cx
    syy = total(cross * (y0 * y0 + y0 * y1 + y1 * y1)) / (12 * a) - cy * cy
    sxy = total(cross * (x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0)) / (24 * a) - cx * cy
    half = np.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
    lam1, lam2 = (sxx + syy) / 2 + half, np.maximum((sxx + syy) / 2 - half, 1e-12)
    area = np.abs(a)
    return pd.DataFrame(
        {
            "area_um2": area,
            "diameter_um": np.sqrt(4 * area / np.pi),
            "eccentricity": np.sqrt(1 - lam2 / lam1),
            "axis_ratio": np.sqrt(lam1 / lam2),
            "solidity": area / shapely.area(shapely.convex_hull(polygons)),
        }
    )


def real_morphology() -> dict:
    """Nuclei segmented in the real H&E of ``../shared/data``, per source (``cmu1``, ``tcga``, ``kather``)."""
    import pandas as pd
    import tifffile
    from PIL import Image

    from st2he.datasets._he_pairs import nuclear_morphology

    out = {"cmu1": nuclear_morphology(tifffile.imread(os.path.join(DATA, "he_cmu1_small_region.svs")), 0.499)}
    for name, pattern in (("tcga", ("he_tcga_tiles", "TCGA-*", "*.jpg")), ("kather", ("he_kather_crc_32", "*.png"))):
        files = sorted(glob.glob(os.path.join(DATA, *pattern)))
        out[name] = pd.concat([nuclear_morphology(np.asarray(Image.open(f).convert("RGB")), 0.5) for f in files])
    return out


MORPHOLOGY = ("area_um2", "eccentricity", "solidity")


def morphology_table(rows: dict, reference: str = "real"):
    """Median [IQR] of area, eccentricity and solidity, area IQR / median, KS statistic against ``reference``."""
    import pandas as pd
    from scipy.stats import ks_2samp

    ref = rows[reference]
    table = []
    for name, df in rows.items():
        row = {"nuclei": name, "n": len(df)}
        for col in MORPHOLOGY:
            q1, q2, q3 = np.percentile(df[col], [25, 50, 75])
            digits = 1 if col == "area_um2" else 3
            row[col] = f"{q2:.{digits}f} [{q1:.{digits}f}, {q3:.{digits}f}]"
            if col == "area_um2":
                row["area IQR/median"] = round((q3 - q1) / q2, 2)
        for col in MORPHOLOGY:
            ks = "" if name == reference else round(float(ks_2samp(df[col], ref[col]).statistic), 3)
            row[f"KS {col.split('_')[0]}"] = ks
        table.append(row)
    return pd.DataFrame(table)


def simulated_tiles(
    seeds, appearance: str, size: float, morphology: dict | None = None
) -> tuple[list[np.ndarray], list[str], float]:
    """Tiles over tissue of ``synthetic_tissue(seed, appearance=...)`` for each seed; mean seconds per sample.

    With ``morphology`` (a dict), its lists ``"segmented"`` and ``"truth"`` receive each sample's nuclei
    (:func:`st2he.datasets._he_pairs.nuclear_morphology` of its H&E, :func:`polygon_morphology` of its
    ``nucleus_boundaries``).
    """
    from st2he._elements import get_image
    from st2he.datasets import synthetic_tissue

    tiles, groups, seconds = [], [], []
    for k, seed in enumerate(seeds):
        subtype = ("mixed", "gland", "solid")[k % 3]
        t0 = time.perf_counter()
        sdata = synthetic_tissue(int(seed), size_um=size, subtype=subtype, appearance=appearance)
        seconds.append(time.perf_counter() - t0)
        img = np.asarray(get_image(sdata, "he_image")[0].values).transpose(1, 2, 0)
        if morphology is not None:
            from st2he.datasets._he_pairs import nuclear_morphology

            he_pixel = float(sdata.attrs["st2he"]["source"]["he_pixel_size"])
            morphology.setdefault("segmented", []).append(nuclear_morphology(img, he_pixel))
            polygons = sdata.shapes["nucleus_boundaries"].geometry.to_numpy()
            morphology.setdefault("truth", []).append(polygon_morphology(polygons))
        for t in _tiles(img):
            if _tissue_share(t) > 0.5:
                tiles.append(t)
                groups.append(f"{appearance}_{seed}")
    return tiles, groups, float(np.mean(seconds))


def features(tile: np.ndarray) -> np.ndarray:
    """The 20 colour and texture features of :data:`FEATURES` of one ``(128, 128, 3)`` uint8 tile."""
    from scipy import ndimage
    from skimage.color import rgb2hed, rgb2hsv

    rgb = tile.astype(np.float32) / 255.0
    hed = rgb2hed(tile)
    h, e = hed[..., 0], hed[..., 1]
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    hsv = rgb2hsv(tile)
    gx = ndimage.sobel(gray, axis=0)
    gy = ndimage.sobel(gray, axis=1)
    grad = np.hypot(gx, gy)

    def locvar(size):
        m = ndimage.uniform_filter(gray, size)
        m2 = ndimage.uniform_filter(gray * gray, size)
        return float(np.mean(np.clip(m2 - m * m, 0, None)))

    od = -np.log(np.clip(rgb, 1 / 255, 1))
    dark = od.sum(axis=2) > np.percentile(od.sum(axis=2), 90)
    ratio = float(od[dark][:, 2].mean() / max(od[dark][:, 0].mean(), 1e-3))
    hue = hsv[..., 0] * 2 * np.pi
    return np.array(
        [
            h.mean(),
            h.std(),
            np.percentile(h, 90),
            e.mean(),
            e.std(),
            np.percentile(e, 90),
            np.corrcoef(h.ravel(), e.ravel())[0, 1] if h.std() > 0 and e.std() > 0 else 0.0,
            gray.mean(),
            gray.std(),
            hsv[..., 1].mean(),
            hsv[..., 1].std(),
            np.angle(np.mean(np.exp(1j * hue))),
            np.mean(gray > 0.85),
            np.percentile(grad, 50),
            np.percentile(grad, 90),
            np.percentile(grad, 99),
            locvar(3),
            locvar(9),
            float(np.mean(ndimage.laplace(gray) ** 2)),
            ratio,
        ],
        dtype=np.float64,
    )


def grouped_auc(X, y, groups, n_splits=5, seed=0) -> tuple[float, float]:
    """ROC AUC of a standardised logistic regression, folds grouped by slide: (pooled out-of-fold, mean per fold)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    score = np.zeros(len(y))
    per_fold = []
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train, test in folds.split(X, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced"))
        model.fit(X[train], y[train])
        score[test] = model.predict_proba(X[test])[:, 1]
        per_fold.append(roc_auc_score(y[test], score[test]))
    return float(roc_auc_score(y, score)), float(np.mean(per_fold))


def cnn_auc(tiles, y, groups, n_splits=5, epochs=6, seed=0) -> tuple[float, float]:
    """ROC AUC of a small CNN (3 conv layers), grouped folds: (pooled out-of-fold, mean per fold)."""
    import torch
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    x = torch.tensor(np.stack(tiles), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    yt = torch.tensor(y, dtype=torch.float32)
    score = np.zeros(len(y))
    per_fold = []
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train, test in folds.split(np.zeros(len(y)), y, groups):
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 1),
        )
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        pos = float(yt[train].mean())
        weight = torch.tensor([(1 - pos) / max(pos, 1e-3)])
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=weight)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.tensor(train)[torch.randperm(len(train), generator=gen)]
            for start in range(0, len(order), 32):
                b = order[start : start + 32]
                xb = x[b]
                if torch.rand(1, generator=gen) < 0.5:
                    xb = xb.flip(3)
                opt.zero_grad()
                loss = loss_fn(net(xb).squeeze(1), yt[b])
                loss.backward()
                opt.step()
        with torch.no_grad():
            score[test] = torch.sigmoid(net(x[test]).squeeze(1)).numpy()
        per_fold.append(roc_auc_score(y[test], score[test]))
    return float(roc_auc_score(y, score)), float(np.mean(per_fold))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=6, help="simulated samples per appearance")
    p.add_argument("--size", type=float, default=384.0, help="side of each simulated sample in µm")
    p.add_argument("--cnn", action="store_true", help="also score a small CNN (slower)")
    p.add_argument("--out", default=None, help="folder for a montage PNG of real and simulated tiles")
    args = p.parse_args()

    import pandas as pd

    rt, rg = real_tiles()
    Xr = np.stack([features(t) for t in rt])
    print(f"real tiles: {len(rt)} from {len(set(rg))} slides")
    real_nuclei = real_morphology()
    nuclei = {"real": pd.concat(list(real_nuclei.values()))}
    nuclei.update({f"real: {k}": v for k, v in real_nuclei.items()})
    results = {}
    sims = {}
    for appearance in ("clean", "realistic"):
        morph: dict = {}
        st, sg, sec = simulated_tiles(range(100, 100 + args.seeds), appearance, args.size, morphology=morph)
        nuclei[f"{appearance}"] = pd.concat(morph["segmented"])
        nuclei[f"{appearance} truth"] = pd.concat(morph["truth"])
        sims[appearance] = st
        Xs = np.stack([features(t) for t in st])
        X = np.r_[Xr, Xs]
        y = np.r_[np.zeros(len(Xr)), np.ones(len(Xs))]
        groups = np.r_[rg, sg]
        pooled, per_fold = grouped_auc(X, y, groups)
        line = f"{appearance:>9}: {len(st)} simulated tiles, {sec:.1f} s per sample; features AUC {pooled:.3f}"
        line += f" (mean per fold {per_fold:.3f})"
        results[appearance] = {"features": pooled}
        if args.cnn:
            pooled, per_fold = cnn_auc(rt + st, y, groups)
            results[appearance]["cnn"] = per_fold
            line += f"; CNN AUC mean per fold {per_fold:.3f} (pooled {pooled:.3f})"
        print(line, flush=True)
    for kind in results["clean"]:
        c, r = results["clean"][kind], results["realistic"][kind]
        ratio = f"{(c - 0.5) / (r - 0.5):.1f}x smaller" if r - 0.5 > 0.02 else "at chance"
        excess = f"excess over chance {c - 0.5:.3f} -> {r - 0.5:.3f}"
        print(f"{kind}: AUC clean {c:.3f} -> realistic {r:.3f}; {excess} ({ratio})")
    print("\nnuclear morphology (segmented like pairs_from_he; 'truth': the simulation's nucleus_boundaries):")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(morphology_table(nuclei).to_string(index=False))
    if args.out:
        from PIL import Image

        rng = np.random.default_rng(0)
        rows = []
        for name, ts in (("real", rt), ("clean", sims["clean"]), ("realistic", sims["realistic"])):
            pick = rng.choice(len(ts), 8, replace=False)
            rows.append(np.concatenate([ts[i] for i in pick], axis=1))
        os.makedirs(args.out, exist_ok=True)
        Image.fromarray(np.concatenate(rows, axis=0)).save(os.path.join(args.out, "realism_tiles.png"))


if __name__ == "__main__":
    main()
