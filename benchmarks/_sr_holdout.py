"""Scoring and the held-out protocol of ``bench_super_resolution.py`` (also read by ``tests/test_super_resolve_real``).

Real crops: a crop is split at ``x = split`` (the median x of its molecules, floored to a multiple of the 8 µm bin:
the bins never straddle it). Models are trained on the molecules (and the guidance images) with ``x < split`` only;
every method is scored on the other half alone: pseudo-spots (55 µm disks on a 100 µm lattice) counted from the
molecules with ``x >= split``, those whose disk crosses the split left out, super-resolved to 8 µm bins and scored
against the 8 µm bins of the same molecules. The methods never see the molecules of the training half, nor the truth.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
BIN_SIZE = 8.0
SPOT_DIAMETER = 55.0
SPOT_SPACING = 100.0
#: Diff-ST's conventions (``evaluate_expression``'s ``*_diffst_convention``), averaged as Diff-ST does: the entries
#: that are not zero. Not comparable with the signed Pearson and the fixed-range SSIM; only beside Diff-ST's figures.
DIFFST_COLUMNS = {"pearson_diffst": "pearson_diffst_convention", "ssim_diffst": "ssim_diffst_convention"}
DIFFST_NOTE = (
    "pearson_diffst, ssim_diffst: Diff-ST convention, not comparable (|Pearson| over the whole grid; SSIM of each "
    "map min-max normalised on its own, as uint8(x * 225); averaged over the values that are not zero)"
)

# ----------------------------------------------------------------------------------------------- scoring


def log_table(
    sdata, key: str, truth: str, out: str, *, flat: bool = False, normalisation: str = "log1p_cp10k"
) -> None:
    """A copy of super-resolved table ``key``, log-normalised, annotating the truth's bins (same ids by design).

    ``flat``: each bin gets its spot's mean (the floor any method must clear). ``normalisation``: ``"log1p_cp10k"``
    (log1p of counts per 10k of the bin: its composition) or ``"log1p"`` (the counts are kept, and scored as
    log1p of counts: also how many molecules the bin holds).
    """
    import anndata as ad
    from spatialdata.models import TableModel

    from st2he._units import lognormalise

    t = sdata.tables[key]
    X = np.asarray(t.X, dtype=np.float64)
    if flat:
        X = pd.DataFrame(X).groupby(t.obs["source_unit"].astype(str).to_numpy()).transform("mean").to_numpy()
    region = sdata.tables[truth].uns["spatialdata_attrs"]["region"]
    values = lognormalise(X) if normalisation == "log1p_cp10k" else X  # counts: evaluate_expression takes log1p
    tab = ad.AnnData(X=values, obs=t.obs[["instance_id", "array_row", "array_col"]].copy(), var=t.var.copy())
    tab.obs["region"] = pd.Categorical([region] * tab.n_obs)
    sdata.tables[out] = TableModel.parse(tab, region=region, region_key="region", instance_key="instance_id")


def score(sdata, key: str, truth: str, *, flat: bool = False, normalisation: str = "log1p_cp10k") -> pd.DataFrame:
    """Per-gene frame of ``st2he.tl.evaluate_expression`` (signed Pearson, SSIM with the measured data range).

    ``normalisation``: how bins are normalised before scoring, both sides alike (the benchmarks' ``--normalisation``).
    """
    import st2he

    log_table(sdata, key, truth, "_scored", flat=flat, normalisation=normalisation)
    # log1p: both tables' counts as log1p(counts), by evaluate_expression itself
    kwargs = {"prediction": "counts", "normalisation": "log1p"} if normalisation == "log1p" else {}
    df = st2he.tl.evaluate_expression(sdata, pred_key="_scored", true_key=truth, overwrite=True, **kwargs)
    del sdata.tables["_scored"]
    return df


def density_weighted(sdata, key: str, image_key: str, *, out: str, floor: float = 0.05) -> None:
    """Table ``key`` (super-resolved counts) with each gene's bins re-weighted by the bin's nuclear density.

    A benchmark-only baseline: ``method="regression"`` spreads each gene of a spot over its bins by the expression
    model's predicted composition and ignores how many molecules a bin holds; here each bin's weight is also scaled
    by the mean haematoxylin (H&E) or stain intensity over the bin (as ``method="guided"`` reads it; plus ``floor``
    x its mean, so bins without a nucleus keep some), then every gene's spot count is spread again in proportion.
    """
    from types import SimpleNamespace

    from st2he._raster import Raster
    from st2he.tl._super_resolve import _bin_guidance

    t = sdata.tables[key]
    grid = SimpleNamespace(rows=t.obs["array_row"].to_numpy(int), cols=t.obs["array_col"].to_numpy(int))
    d = np.nan_to_num(_bin_guidance(Raster(sdata.images[image_key]), grid, BIN_SIZE, progress=False), nan=0.0)
    d = d.clip(0, None)
    d = d + floor * (d.mean() if d.mean() > 0 else 1.0)
    X = np.asarray(t.X, dtype=np.float64)
    spot = t.obs["source_unit"].astype(str).to_numpy()
    weighted = X * d[:, None]
    total = pd.DataFrame(X).groupby(spot).transform("sum").to_numpy()
    norm = pd.DataFrame(weighted).groupby(spot).transform("sum").to_numpy()
    new = np.divide(weighted * total, norm, out=np.zeros_like(weighted), where=norm > 0)
    copy = t.copy()
    copy.X = new.astype(np.float32)
    sdata.tables[out] = copy


def area_mm2(sdata, spots: str) -> float:
    """Area of the spots' bounding box in mm²."""
    g = sdata.shapes[spots]
    x0, y0, x1, y1 = g.geometry.total_bounds
    r = float(g["radius"].iloc[0])
    return (x1 - x0 + 2 * r) * (y1 - y0 + 2 * r) / 1e6


def run(
    sdata,
    methods: dict,
    *,
    truth: str = "truth",
    spots: str = "spots",
    normalisation: str = "log1p_cp10k",
    density_baseline: bool = False,
) -> tuple[dict, dict]:
    """Per-method per-gene frames and seconds per mm² (``flat`` scored from the ``bicubic`` run).

    ``normalisation``: passed to :func:`score`. ``density_baseline``: also score each ``regression*`` method
    re-weighted by each bin's nuclear density (:func:`density_weighted`; the benchmarks' ``--density-baseline``).
    """
    import st2he

    scores, speed = {}, {}
    area = area_mm2(sdata, sdata.tables[spots].uns["spatialdata_attrs"]["region"])
    for name, kwargs in methods.items():
        t = time.perf_counter()
        st2he.tl.super_resolve(sdata, table_key=spots, key_added="sr", overwrite=True, progress=False, **kwargs)
        speed[name] = (time.perf_counter() - t) / area
        scores[name] = score(sdata, "sr", truth, normalisation=normalisation)
        if name.startswith("regression") and density_baseline:
            density_weighted(sdata, "sr", kwargs.get("image_key", "he_image"), out="sr_density")
            scores[f"{name}_density"] = score(sdata, "sr_density", truth, normalisation=normalisation)
            del sdata.tables["sr_density"]
            speed[f"{name}_density"] = speed[name]
        if name == "bicubic":
            scores["flat"] = score(sdata, "sr", truth, flat=True, normalisation=normalisation)
            speed["flat"] = float("nan")
    return scores, speed


def paired(x: pd.Series, y: pd.Series, alternative: str = "two-sided") -> dict:
    """Paired Wilcoxon signed-rank test over the genes both score (finite): mean difference, wins, p."""
    from scipy.stats import wilcoxon

    both = pd.concat([x.rename("a"), y.rename("b")], axis=1).dropna()
    d = (both["a"] - both["b"]).to_numpy()
    p = wilcoxon(both["a"], both["b"], alternative=alternative).pvalue if np.any(d != 0) else float("nan")
    return {"mean_diff": float(d.mean()) if len(d) else float("nan"), "wins": int((d > 0).sum()), "n": len(d), "p": p}


def mean_nonzero(values) -> float:
    """Diff-ST's average: the mean of the values that are not zero (NaN left out too)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values) & (values != 0)]
    return float(values.mean()) if len(values) else float("nan")


def crop_table(scores: dict[str, pd.DataFrame], speed: dict[str, float], n_bins: int, ref: str = "bicubic"):
    """One row per method: mean signed Pearson (all genes scored, top HVG), SSIM, genes, bins, s/mm², vs ``ref``.

    Also Diff-ST's conventions over all genes (``DIFFST_COLUMNS``, ``DIFFST_NOTE``): not comparable with the rest.
    """
    rows = {}
    for k, v in scores.items():
        test = paired(v["pearson"], scores[ref]["pearson"]) if k != ref else {}
        rows[k] = {
            "pearson_all": v["pearson"].mean(),
            "pearson_hvg": v[v["highly_variable"]]["pearson"].mean(),
            "ssim_all": v["ssim"].mean(),
            **{name: mean_nonzero(v[column]) for name, column in DIFFST_COLUMNS.items()},
            "n_genes": int(v["pearson"].notna().sum()),
            "n_hvg": int(v["highly_variable"].sum()),
            "n_bins": n_bins,
            "s_per_mm2": speed[k],
            f"dPearson_vs_{ref}": test.get("mean_diff", np.nan),
            "wins": f"{test['wins']}/{test['n']}" if test else "",
            "wilcoxon_p": test.get("p", np.nan),
        }
    return pd.DataFrame(rows).T


# ----------------------------------------------------------------------------------------------- real crops


def read_crop(name: str, data: Path = DATA):
    """``(sdata, nuclear stain key or None)`` of a real crop, read as the tutorials do."""
    import st2he

    if name == "xenium":
        sd = st2he.io.read_xenium(data / "xenium_cellline_crop", image_pixel_size=400 / 237, image_origin=(1000, 1000))
        return sd, "morphology_focus"
    if name == "merscope":
        return st2he.io.read_merscope(data / "merscope_brain_cancer_crop"), "dapi"
    if name == "cosmx":
        return st2he.io.read_cosmx(data / "cosmx_mouse_brain_quarter", pixel_size=0.12028), None
    msg = f"Unknown crop {name!r}; use 'xenium', 'merscope' or 'cosmx'."
    raise ValueError(msg)


def add_virtual_he(sdata) -> str:
    """The crop's virtual H&E with the shipped generator (README: rasterise at 0.5 µm, then ``virtual_he``)."""
    import st2he

    st2he.pp.rasterize_transcripts(sdata, pixel_size=0.5)
    st2he.tl.virtual_he(sdata, progress=False)  # redraws the picture in the generator's (lineage) palette
    return "virtual_he"


def add_stain_rgb(sdata, stain: str, key: str = "stain_rgb") -> str:
    """The nuclear stain as a 3-channel uint8 image the expression model can read.

    Scaled to 30-200 by its 99.5th percentile (never white glass nor black padding, so every pixel is tissue by
    st2he's brightfield rule); the channels are named ``dapi*`` so guidance reads it as a grey stain.
    """
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    from st2he._raster import Raster
    from st2he.tl._super_resolve import _guide_channels

    raster = Raster(sdata.images[stain], "global")
    channels, _ = _guide_channels(raster)  # the channel guided super-resolution reads
    img = np.asarray(raster.level0.values[channels[0]], dtype=np.float64)
    hi = max(float(np.percentile(img, 99.5)), 1e-9)
    u8 = (30 + 170 * np.clip(img / hi, 0, 1)).round().astype(np.uint8)
    sdata.images[key] = Image2DModel.parse(
        da.from_array(np.stack([u8] * 3)), dims=("c", "y", "x"), c_coords=["dapi", "dapi_1", "dapi_2"],
        transformations={"global": get_transformation(sdata.images[stain], to_coordinate_system="global")},
    )
    return key


def split_x(sdata, *, points_key: str = "transcripts", bin_size: float = BIN_SIZE) -> float:
    """The median x of the molecules, floored to a multiple of ``bin_size`` (µm)."""
    x = sdata.points[points_key]["x"].compute().to_numpy()
    return float(np.floor(np.median(x) / bin_size) * bin_size)


def crop_x(sdata, lo: float, hi: float, *, images=(), points_key: str = "transcripts"):
    """A new SpatialData with the molecules with ``lo <= x < hi`` and ``images`` cropped to that band."""
    from spatialdata import SpatialData, bounding_box_query
    from spatialdata.models import PointsModel
    from spatialdata.transformations import Identity, get_transformation

    pts = sdata.points[points_key]
    if not isinstance(get_transformation(pts, to_coordinate_system="global"), Identity):
        msg = f"points {points_key!r} are not in µm of 'global' (identity transformation); crop_x reads their x."
        raise ValueError(msg)
    df = pts.compute()
    df = df[(df["x"] >= lo) & (df["x"] < hi)].reset_index(drop=True)
    points = PointsModel.parse(df, coordinates={"x": "x", "y": "y"}, feature_key="gene")
    out = {}
    for key in images:
        img = sdata.images[key]
        y0, y1 = -1e9, 1e9
        out[key] = bounding_box_query(
            img, axes=("x", "y"), min_coordinate=[lo, y0], max_coordinate=[hi, y1], target_coordinate_system="global"
        )
    return SpatialData(points={points_key: points}, images=out)


def heldout_units(sdata, split: float, *, spots: str = "spots", truth: str = "truth", points_key: str = "transcripts"):
    """Pseudo-spots and true 8 µm bins of a held-out crop; spots whose disk reaches ``x < split`` are left out.

    Returns the number of spots left out.
    """
    import st2he

    st2he.pp.aggregate_transcripts(
        sdata, points_key=points_key, by="spots", spot_diameter=SPOT_DIAMETER, spot_spacing=SPOT_SPACING,
        key_added=spots, shapes_added=f"{spots}_55um",
    )
    st2he.pp.aggregate_transcripts(sdata, points_key=points_key, by="bins", bin_size=BIN_SIZE, key_added=truth)
    t = sdata.tables[spots]
    row, col = t.obs["array_row"].to_numpy(), t.obs["array_col"].to_numpy()
    x = (col + (row % 2) / 2) * SPOT_SPACING
    keep = x - SPOT_DIAMETER / 2 >= split
    shapes = f"{spots}_55um"
    g = sdata.shapes[shapes]
    ids = t.obs["instance_id"].to_numpy()[keep]
    sub = g.loc[g.index.isin(ids)]
    sub.attrs = g.attrs
    sdata.shapes[shapes] = sub
    sdata.tables[spots] = t[keep].copy()
    return int((~keep).sum())


def train_models(
    train, genes, image_key: str, *, expr_steps: int, sr_budget: float, val_fraction: float = 0.2, seed: int = 0,
    log=print,
):
    """A ``tiny`` expression model (16 µm bins of the training half) and a ``tiny`` super-resolution model on it.

    ``val_fraction``: the expression model's validation band (right of the training half; 0: none).
    """
    import torch

    import st2he

    st2he.pp.aggregate_transcripts(train, by="bins", bin_size=16.0, key_added="bins16", overwrite=True)
    torch.manual_seed(seed)
    t = time.perf_counter()
    expr = st2he.tl.train_expression(
        train, image_key=image_key, table_key="bins16", genes=genes, model="tiny", um_per_px=1.0, chip_um=64.0,
        steps=expr_steps, batch_size=4, lr=3e-3, val_fraction=val_fraction, val_every=max(expr_steps // 2, 1),
        ckpt_every=0, seed=seed,
        progress=False,
    )
    te = time.perf_counter() - t
    sr = None
    if sr_budget > 0:
        t = time.perf_counter()
        sr = st2he.tl.train_super_resolution(
            train, image_key=image_key, genes=genes, size="tiny", expression_model=expr, steps=10_000, batch_size=8,
            time_budget=sr_budget, seed=seed, progress=False,
        )
        tr = sr.metadata["training"]
        log(
            f"    {image_key}: expression tiny {expr_steps} steps in {te:.0f} s; super-resolution tiny "
            f"{tr['steps_done']} steps in {time.perf_counter() - t:.0f} s (validation strip of the training half: "
            f"one step {tr['validation']['pearson_one_step']:.3f}, base {tr['validation']['pearson_base']:.3f})"
        )
    else:
        log(f"    {image_key}: expression tiny {expr_steps} steps in {te:.0f} s")
    return expr, sr
