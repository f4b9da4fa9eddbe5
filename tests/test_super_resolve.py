"""tl.super_resolve: spot counts onto 8 µm bins, conserved exactly, on aggregate_transcripts' bins; direct sums."""

from __future__ import annotations

import math
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import st2he
from st2he._units import lognormalise

B = 8.0


def _pearson_vs_truth(sdata, key: str, truth: str, *, flat: bool = False) -> float:
    """Mean per-gene Pearson (evaluate_expression) of a super-resolved table, log-normalised, against the true bins.

    ``flat``: each bin gets its spot's mean instead (the spot's counts spread evenly).
    """
    from spatialdata.models import TableModel

    t = sdata.tables[key]
    X = np.asarray(t.X, dtype=np.float64)
    if flat:
        X = pd.DataFrame(X).groupby(t.obs["source_unit"].astype(str).to_numpy()).transform("mean").to_numpy()
    region = sdata.tables[truth].uns["spatialdata_attrs"]["region"]
    tab = ad.AnnData(
        X=lognormalise(X), obs=t.obs[["instance_id", "array_row", "array_col"]].copy(), var=t.var.copy()
    )
    tab.obs["region"] = pd.Categorical([region] * tab.n_obs)
    sdata.tables["_scored"] = TableModel.parse(tab, region=region, region_key="region", instance_key="instance_id")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            df = st2he.tl.evaluate_expression(sdata, pred_key="_scored", true_key=truth, overwrite=True)
    finally:
        del sdata.tables["_scored"]
        if "_scored_metrics" in sdata.tables:
            del sdata.tables["_scored_metrics"]
    return float(df.attrs["summary"]["pearson_mean"])


@pytest.fixture(scope="module")
def sample():
    sdata = st2he.datasets.synthetic_tissue(5)
    st2he.pp.aggregate_transcripts(sdata, by="spots", key_added="spots")
    st2he.pp.aggregate_transcripts(sdata, by="bins", bin_size=B, key_added="truth")
    return sdata


def _spot_sums(table, counts_table):
    X = pd.DataFrame(np.asarray(table.X, dtype=np.float64), columns=list(table.var_names))
    sums = X.groupby(table.obs["source_unit"].astype(str).to_numpy()).sum()
    want = pd.DataFrame(
        counts_table[:, list(table.var_names)].X.toarray(), index=counts_table.obs_names.astype(str),
        columns=list(table.var_names),
    )
    return sums, want


@pytest.mark.parametrize("method", ["bicubic", "guided"])
def test_counts_conserved_to_the_molecule_and_bins_overlay_aggregate(sample, method):
    key = f"sr_{method}"
    out = st2he.tl.super_resolve(
        sample, table_key="spots", method=method, key_added=key, image_added=f"{key}_image", progress=False
    )
    spots = sample.tables["spots"]
    sums, want = _spot_sums(out, spots)
    # every spot holds bins, and the bins of each spot sum to its counts for every gene
    assert set(sums.index) == set(want.index)
    diff = (sums - want.loc[sums.index]).abs().to_numpy()
    assert diff.max() < 1e-3
    assert (np.rint(sums.to_numpy()) == want.loc[sums.index].to_numpy()).all()
    assert out.X.dtype == np.float32

    # ids, array coordinates and centres are aggregate_transcripts' bins
    rows, cols = out.obs["array_row"].to_numpy(), out.obs["array_col"].to_numpy()
    assert list(out.obs_names) == [f"{r}_{c}" for r, c in zip(rows, cols, strict=True)]
    np.testing.assert_array_equal(out.obsm["spatial"], np.column_stack([(cols + 0.5) * B, (rows + 0.5) * B]))
    truth = sample.tables["truth"]
    shared = out.obs_names.intersection(truth.obs_names)
    assert len(shared) > 100  # bins of the spots that hold molecules
    t = truth[shared]
    np.testing.assert_array_equal(out[shared].obs[["array_row", "array_col"]], t.obs[["array_row", "array_col"]])
    mine = sample.shapes[f"{key}_bins"].loc[shared].geometry.bounds.to_numpy()
    theirs = sample.shapes["bins_8um"].loc[shared].geometry.bounds.to_numpy()
    np.testing.assert_array_equal(mine, theirs)
    # each bin's centre lies in its spot; every true bin whose centre lies in a spot is there
    sp = sample.shapes["spots_55um"]
    centres = sp.geometry.loc[out.obs["source_unit"].astype(str)]
    d = np.hypot(centres.x.to_numpy() - out.obsm["spatial"][:, 0], centres.y.to_numpy() - out.obsm["spatial"][:, 1])
    assert (d <= 27.5).all()
    tc = truth.obsm["spatial"]
    near = np.min(np.hypot(tc[:, :1] - sp.geometry.x.to_numpy()[None], tc[:, 1:] - sp.geometry.y.to_numpy()[None]), 1)
    assert set(truth.obs_names[near <= 27.5]) <= set(out.obs_names)

    # the image: one channel per gene, one pixel per bin, placed in µm
    from spatialdata.transformations import get_transformation

    img = sample.images[f"{key}_image"]
    assert list(img.coords["c"].values) == list(out.var_names)
    A = get_transformation(img, "global").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    r0, c0 = rows.min(), cols.min()
    np.testing.assert_allclose(A[:2], [[B, 0, c0 * B], [0, B, r0 * B]])
    data = np.asarray(img.data)
    np.testing.assert_array_equal(data[:, rows - r0, cols - c0].T, np.asarray(out.X))


def _fixed_sdata():
    """Seven 40 µm spots on a hexagon, two genes, a grey guidance image constant over each 8 µm block (1 µm px)."""
    import geopandas as gpd
    import shapely
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    centre = np.array([100.0, 100.0])
    ang = np.arange(6) * np.pi / 3
    pts = np.vstack([centre, centre + 44.0 * np.column_stack([np.cos(ang), np.sin(ang)])])
    ids = [f"s{i}" for i in range(len(pts))]
    spots = ShapesModel.parse(
        gpd.GeoDataFrame({"radius": np.full(len(pts), 20.0)}, geometry=shapely.points(pts), index=pd.Index(ids)),
        transformations={"global": Identity()},
    )
    counts = np.array([[10, 0], [3, 7], [0, 12], [5, 5], [8, 1], [2, 9], [6, 6]], dtype=np.float32)
    import scipy.sparse as sp

    table = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"region": pd.Categorical(["spots"] * 7), "instance_id": ids}, index=pd.Index(ids)),
        var=pd.DataFrame(index=["A", "B"]),
    )
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="instance_id")
    rng = np.random.default_rng(0)
    blocks = rng.uniform(0, 1000, size=(25, 25))
    grey = np.kron(blocks, np.ones((8, 8)))[None].astype(np.float32)  # 200 x 200 µm at 1 µm per pixel
    image = Image2DModel.parse(grey, dims=("c", "y", "x"), c_coords=["DAPI"], transformations={"global": Identity()})
    sdata = SpatialData(images={"dapi": image}, shapes={"spots": spots}, tables={"counts": table})
    return sdata, pts, counts, blocks


def _bins_of(pts, radius=20.0):
    """Bins whose centres lie in a spot (first spot wins), sorted by row then column."""
    found = {}
    for i, (x, y) in enumerate(pts):
        for r in range(int((y - radius) // B) - 1, int((y + radius) // B) + 2):
            for c in range(int((x - radius) // B) - 1, int((x + radius) // B) + 2):
                if math.hypot((c + 0.5) * B - x, (r + 0.5) * B - y) <= radius and (r, c) not in found:
                    found[(r, c)] = i
    keys = sorted(found)
    return keys, np.array([found[k] for k in keys])


def _conserve(est, counts, unit):
    out = np.zeros_like(est)
    for s in range(len(counts)):
        m = unit == s
        for g in range(est.shape[1]):
            tot = est[m, g].sum()
            out[m, g] = counts[s, g] * (est[m, g] / tot if tot > 0 else 1.0 / m.sum())
    return out


def test_bicubic_on_fixed_input_matches_a_direct_computation():
    from scipy.interpolate import CloughTocher2DInterpolator, NearestNDInterpolator

    sdata, pts, counts, _ = _fixed_sdata()
    out = st2he.tl.super_resolve(sdata, table_key="counts", method="bicubic", progress=False)
    keys, unit = _bins_of(pts)
    assert list(out.obs_names) == [f"{r}_{c}" for r, c in keys]
    assert list(out.obs["source_unit"].astype(str)) == [f"s{i}" for i in unit]
    xy = np.array([[(c + 0.5) * B, (r + 0.5) * B] for r, c in keys])
    density = counts / (math.pi * 20.0**2)
    est = CloughTocher2DInterpolator(pts, density)(xy)
    est = np.where(np.isfinite(est), est, NearestNDInterpolator(pts, density)(xy))
    est = np.clip(est, 0, None) * B * B
    np.testing.assert_allclose(out.X, _conserve(est, counts.astype(np.float64), unit), rtol=1e-5, atol=1e-5)
    raw = st2he.tl.super_resolve(
        sdata, table_key="counts", method="bicubic", conserve_counts=False, key_added="raw", progress=False
    )
    np.testing.assert_allclose(raw.X, est, rtol=1e-5, atol=1e-7)


def test_guided_on_fixed_input_matches_a_direct_computation():
    sdata, pts, counts, blocks = _fixed_sdata()
    sigma_s, sigma_r = 30.0, 0.25
    out = st2he.tl.super_resolve(
        sdata, table_key="counts", image_key="dapi", method="guided", sigma_spatial=sigma_s, sigma_range=sigma_r,
        conserve_counts=False, progress=False,
    )
    keys, unit = _bins_of(pts)
    xy = np.array([[(c + 0.5) * B, (r + 0.5) * B] for r, c in keys])
    g = np.array([blocks[r, c] for r, c in keys])  # the mean of the image over each bin
    lo, hi = np.percentile(g, [1, 99])
    g = np.clip((g - lo) / (hi - lo), 0, 1)
    g_spot = np.array([g[unit == s].mean() for s in range(len(pts))])
    density = counts / (math.pi * 20.0**2)
    est = np.zeros((len(keys), 2))
    for b in range(len(keys)):
        num, den = 0.0, 0.0
        for s in range(len(pts)):
            d = math.hypot(*(xy[b] - pts[s]))
            if d > 3 * sigma_s and s != unit[b]:
                continue
            w = math.exp(-(d**2) / (2 * sigma_s**2)) * math.exp(-((g[b] - g_spot[s]) ** 2) / (2 * sigma_r**2))
            num, den = num + w * density[s], den + w
        est[b] = num / den * B * B
    np.testing.assert_allclose(out.X, est, rtol=1e-5, atol=1e-7)
    # the image matters: with a flat guidance term (huge sigma_range) the estimate changes
    flat = st2he.tl.super_resolve(
        sdata, table_key="counts", image_key="dapi", method="guided", sigma_spatial=sigma_s, sigma_range=1e6,
        conserve_counts=False, key_added="flat", progress=False,
    )
    assert np.abs(np.asarray(flat.X) - est).max() > 1e-3
    cons = st2he.tl.super_resolve(
        sdata, table_key="counts", image_key="dapi", method="guided", sigma_spatial=sigma_s, sigma_range=sigma_r,
        key_added="conserved", progress=False,
    )
    np.testing.assert_allclose(cons.X, _conserve(est, counts.astype(np.float64), unit), rtol=1e-5, atol=1e-5)


def test_guided_beats_a_flat_spread_on_a_held_out_sample(sample):
    st2he.tl.super_resolve(
        sample, table_key="spots", image_key="morphology_focus", method="guided", key_added="sr_dapi", progress=False
    )
    guided = _pearson_vs_truth(sample, "sr_dapi", "truth")
    flat = _pearson_vs_truth(sample, "sr_dapi", "truth", flat=True)
    assert guided > flat + 1e-3, (guided, flat)
    assert 0.2 < flat < guided < 0.9


def test_regression_rescales_the_model_prediction_within_each_spot(sample):
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    from st2he.models import build_expression_model

    genes = list(sample.tables["spots"].var_names[:6])
    model = build_expression_model(genes, encoder="tiny", um_per_px=1.0, field=False, seed=1).eval()
    out = st2he.tl.super_resolve(
        sample, table_key="spots", method="regression", model=model, genes=genes, key_added="sr_reg", progress=False
    )
    sums, want = _spot_sums(out, sample.tables["spots"])
    assert np.abs(sums.to_numpy() - want.loc[sums.index].to_numpy()).max() < 1e-3
    pred = st2he.tl.predict_expression(
        sample, model=model, units="sr_reg_bins", genes=genes, key_added="pred_bins", progress=False
    )
    # the model's counts per 10k (expm1 of its log1p CP10k; negatives, and NaN off the image, as 0) as shares of each
    # spot's counts
    share = np.expm1(np.nan_to_num(np.asarray(pred[out.obs_names].X, dtype=np.float64))).clip(0, None)
    spot = out.obs["source_unit"].astype(str).to_numpy()
    total = pd.DataFrame(share).groupby(spot).transform("sum").to_numpy()
    n = pd.Series(spot).map(pd.Series(spot).value_counts()).to_numpy()[:, None]
    share = np.where(total > 0, share / np.where(total > 0, total, 1), 1.0 / n)
    counts = want.loc[spot].to_numpy()
    np.testing.assert_allclose(np.asarray(out.X), counts * share, rtol=1e-4, atol=1e-4)
    assert (total > 0).any()  # some genes take the model's shares (not only the even spread)


def test_bad_input_fails_with_specific_errors_and_loses_nothing():
    from spatialdata.models import Image2DModel, TableModel
    from spatialdata.transformations import Translation

    sdata, _, _, _ = _fixed_sdata()
    before = {k: set(getattr(sdata, k)) for k in ("images", "shapes", "tables")}
    X_before = sdata.tables["counts"].X.toarray().copy()
    bare = ad.AnnData(X=sdata.tables["counts"].X.copy(), var=pd.DataFrame(index=["A", "B"]))
    sdata.tables["bare"] = TableModel.parse(bare)
    before["tables"].add("bare")
    with pytest.raises(ValueError, match="does not annotate any element|does not say which element"):
        st2he.tl.super_resolve(sdata, table_key="bare", image_key="dapi", progress=False)
    with pytest.raises(KeyError, match="not a table"):
        st2he.tl.super_resolve(sdata, table_key="nope", image_key="dapi", progress=False)
    with pytest.raises(KeyError, match="1 of 2 genes are not in table 'counts': 'Z'"):
        st2he.tl.super_resolve(sdata, table_key="counts", image_key="dapi", genes=["A", "Z"], progress=False)
    far = Image2DModel.parse(
        np.ones((1, 50, 50), np.float32), dims=("c", "y", "x"),
        transformations={"global": Translation([5000.0, 5000.0], axes=("x", "y"))},
    )
    sdata.images["far"] = far
    before["images"].add("far")
    with pytest.raises(ValueError, match="does not overlap the units"):
        st2he.tl.super_resolve(sdata, table_key="counts", image_key="far", progress=False)
    with pytest.raises(KeyError, match="not an image"):
        st2he.tl.super_resolve(sdata, table_key="counts", image_key="he_image", progress=False)
    with pytest.raises(ValueError, match="bin_size=60 µm is larger than the units"):
        st2he.tl.super_resolve(sdata, table_key="counts", image_key="dapi", bin_size=60, progress=False)
    with pytest.raises(ValueError, match="bin_size must be a positive"):
        st2he.tl.super_resolve(sdata, table_key="counts", image_key="dapi", bin_size=-8, progress=False)
    # method="diffusion" exists now (issue 11); the shipped model's genes are not in this table
    with pytest.raises(ValueError, match="genes of the super-resolution model are not in table 'counts'"):
        st2he.tl.super_resolve(sdata, table_key="counts", image_key="dapi", method="diffusion", progress=False)
    with pytest.raises(ValueError, match="expression model reads RGB H&E"):  # regression: the shipped model
        st2he.tl.super_resolve(sdata, table_key="counts", image_key="dapi", method="regression", progress=False)
    with pytest.raises(KeyError, match="already exists.*overwrite=True"):
        st2he.tl.super_resolve(sdata, table_key="counts", image_key="dapi", key_added="bare", progress=False)
    with pytest.raises(ValueError, match="reads"):
        st2he.tl.super_resolve(
            sdata, table_key="counts", image_key="dapi", key_added="counts", overwrite=True, progress=False
        )
    assert {k: set(getattr(sdata, k)) for k in ("images", "shapes", "tables")} == before
    np.testing.assert_array_equal(sdata.tables["counts"].X.toarray(), X_before)
    assert sdata.tables["bare"].n_obs == 7
    # a good call after all that, then the same key again with overwrite
    st2he.tl.super_resolve(sdata, table_key="counts", image_key="dapi", progress=False)
    again = st2he.tl.super_resolve(sdata, table_key="counts", image_key="dapi", overwrite=True, progress=False)
    assert again.n_obs == sdata.tables["super_resolved"].n_obs > 0


def test_coarse_square_bins_split_into_their_own_8um_bins(sample):
    """Visium HD-like 32 µm bins (polygons): each holds exactly its 16 bins of 8 µm, which sum to its counts."""
    coarse = st2he.pp.aggregate_transcripts(sample, by="bins", bin_size=32.0, key_added="bins32")
    out = st2he.tl.super_resolve(
        sample, table_key="bins32", image_key="he_image", key_added="sr32", progress=False
    )
    src = out.obs["source_unit"].astype(str)
    r32 = coarse.obs.loc[src, "array_row"].to_numpy()
    c32 = coarse.obs.loc[src, "array_col"].to_numpy()
    np.testing.assert_array_equal(out.obs["array_row"].to_numpy() // 4, r32)
    np.testing.assert_array_equal(out.obs["array_col"].to_numpy() // 4, c32)
    assert (src.value_counts() == 16).all() and src.nunique() == coarse.n_obs
    sums, want = _spot_sums(out, coarse)
    assert (np.rint(sums.to_numpy()) == want.loc[sums.index].to_numpy()).all()
    assert np.abs(sums.to_numpy() - want.loc[sums.index].to_numpy()).max() < 1e-3
