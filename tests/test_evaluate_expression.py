"""st2he.tl.evaluate_expression: per-gene metrics against scipy / skimage / sklearn computed directly."""

from __future__ import annotations

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import shapely
from scipy.stats import pearsonr, spearmanr
from skimage.metrics import structural_similarity
from sklearn.metrics import average_precision_score, roc_auc_score
from spatialdata import SpatialData
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import Identity

import st2he

GENES = ["A", "B", "C", "D"]


def make_expression_sdata(
    *,
    n_rows: int = 9,
    n_cols: int = 10,
    bin_size: float = 8.0,
    genes=GENES,
    extra_genes=("E",),
    holes=((0, 0), (4, 5), (8, 9)),
    measured_only=((2, 3),),
    predicted_only=((6, 1),),
    out_of_tissue=((1, 1), (3, 7)),
    gridded: bool = True,
    circles: bool = False,
    seed: int = 0,
) -> SpatialData:
    """Square bins (``"bins"``, ids ``"{row}_{col}"``) with a measured table of counts and a predicted table.

    ``measured``: Poisson counts of ``genes`` + ``extra_genes`` (the extra genes only count towards the totals),
    CSR float32, with ``array_row`` / ``array_col``, ``obsm["spatial"]`` and a tumour label (``tumour``: bool,
    ``compartment``: strings). ``predicted``: the measured log-normalised values plus noise (dense float32), for
    ``genes`` only, with ``in_tissue`` and ``tumour_probability``. ``holes`` are in neither table,
    ``measured_only`` / ``predicted_only`` in one table only, ``out_of_tissue`` have ``in_tissue=False``.
    """
    rng = np.random.default_rng(seed)
    cells = [(r, c) for r in range(n_rows) for c in range(n_cols) if (r, c) not in set(holes)]
    ids = [f"{r}_{c}" for r, c in cells]
    rows = np.array([r for r, _ in cells])
    cols = np.array([c for _, c in cells])
    x0, y0 = cols * bin_size, rows * bin_size
    if circles:
        shapes = gpd.GeoDataFrame(
            {"radius": np.full(len(ids), bin_size / 2)},
            geometry=gpd.points_from_xy(x0 + bin_size / 2, y0 + bin_size / 2),
            index=pd.Index(ids),
        )
    else:
        shapes = gpd.GeoDataFrame(geometry=shapely.box(x0, y0, x0 + bin_size, y0 + bin_size), index=pd.Index(ids))
    shapes = ShapesModel.parse(shapes, transformations={"global": Identity()})

    all_genes = list(genes) + list(extra_genes)
    # spatial patterns: gradients and a blob, so that genes differ
    lam = np.stack(
        [
            2
            + 10 * (k % 3 == 0) * cols / n_cols
            + 8 * (k % 3 == 1) * rows / n_rows
            + 6 * (k % 3 == 2) * ((rows - 4) ** 2 + (cols - 5) ** 2 < 8)
            for k in range(len(all_genes))
        ],
        axis=1,
    )
    counts = rng.poisson(lam).astype(np.float32)
    tumour = (cols >= n_cols // 2) & (rows >= 2)

    def _obs(keep, extra):
        obs = pd.DataFrame(
            {"instance_id": np.asarray(ids)[keep], "region": pd.Categorical(["bins"] * int(keep.sum()))},
            index=[f"u{i}" for i in np.flatnonzero(keep)],
        )
        if gridded:
            obs["array_row"] = rows[keep]
            obs["array_col"] = cols[keep]
        for name, values in extra.items():
            obs[name] = np.asarray(values)[keep]
        return obs

    in_meas = np.array([(r, c) not in set(predicted_only) for r, c in cells])
    in_pred = np.array([(r, c) not in set(measured_only) for r, c in cells])
    compartment = np.where(tumour, "tumour", "stroma")
    mobs = _obs(in_meas, {"tumour": tumour, "compartment": compartment})
    measured = ad.AnnData(X=sp.csr_matrix(counts[in_meas]), obs=mobs, var=pd.DataFrame(index=all_genes))
    measured.obs["total_counts"] = counts[in_meas].sum(axis=1)
    measured.obsm["spatial"] = np.c_[x0 + bin_size / 2, y0 + bin_size / 2][in_meas]
    measured = TableModel.parse(measured, region="bins", region_key="region", instance_key="instance_id")

    totals = counts.sum(axis=1, keepdims=True)
    lognorm = np.log1p(counts[:, : len(genes)] / np.maximum(totals, 1) * 1e4)
    pred_values = (lognorm + rng.normal(0, 0.6, lognorm.shape)).astype(np.float32)
    in_tissue = np.array([(r, c) not in set(out_of_tissue) for r, c in cells])
    prob = np.clip(0.5 * tumour + rng.uniform(0, 0.6, len(ids)), 0, 1)
    pobs = _obs(in_pred, {"in_tissue": in_tissue, "tumour_probability": prob})
    predicted = ad.AnnData(X=pred_values[in_pred], obs=pobs, var=pd.DataFrame(index=list(genes)))
    predicted.obsm["spatial"] = np.c_[x0 + bin_size / 2, y0 + bin_size / 2][in_pred]
    predicted = TableModel.parse(predicted, region="bins", region_key="region", instance_key="instance_id")
    return SpatialData(shapes={"bins": shapes}, tables={"measured": measured, "predicted": predicted})


def reference(sdata, genes, *, pred_key="predicted", true_key="measured", data_range=None):
    """The metrics computed directly: ``(frame, measured, predicted, rows, cols)`` over the scored units."""
    true, pred = sdata.tables[true_key], sdata.tables[pred_key]
    counts = true.X.toarray().astype(np.float64)
    lognorm = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)  # every gene in the totals
    tid = list(true.obs["instance_id"])
    pid = list(pred.obs["instance_id"])
    shared = [i for i in pid if i in set(tid)]
    if "in_tissue" in pred.obs:
        tissue = dict(zip(pid, pred.obs["in_tissue"], strict=True))
        shared = [i for i in shared if tissue[i]]
    ti = [tid.index(i) for i in shared]
    pi = [pid.index(i) for i in shared]
    out = {}
    have_grid = "array_row" in true.obs
    if have_grid:
        r = true.obs["array_row"].to_numpy()[ti]
        c = true.obs["array_col"].to_numpy()[ti]
        r, c = r - r.min(), c - c.min()
    for g in genes:
        x = lognorm[ti, list(true.var_names).index(g)]
        y = np.asarray(pred.X)[pi, list(pred.var_names).index(g)].astype(np.float64)
        row = {
            "pearson": pearsonr(x, y).statistic,
            "spearman": spearmanr(x, y).statistic,
            "rmse": np.sqrt(np.mean((x - y) ** 2)),
            "n_units": len(shared),
            "mean_true": x.mean(),
            "var_true": x.var(),
        }
        if have_grid:
            a = np.zeros((r.max() + 1, c.max() + 1))
            b = np.zeros_like(a)
            a[r, c], b[r, c] = x, y
            rng = a.max() - a.min() if data_range is None else data_range
            row["ssim"] = structural_similarity(a, b, data_range=rng)
            row["pearson_hist_convention"] = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        else:
            row["ssim"] = row["pearson_hist_convention"] = np.nan
        out[g] = row
    return pd.DataFrame(out).T


@pytest.fixture
def sdata():
    return make_expression_sdata()


COLUMNS = ["pearson", "spearman", "rmse", "ssim", "pearson_hist_convention", "n_units", "mean_true", "var_true"]


def test_metrics_equal_scipy_skimage(sdata):
    df = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured")
    want = reference(sdata, GENES)
    assert list(df.index) == GENES
    # 90 bins - 3 holes = 87; 86 measured, 86 predicted, 85 shared, 83 in tissue
    assert (df["n_units"] == 83).all()
    for col in COLUMNS:
        np.testing.assert_allclose(
            df[col].to_numpy(dtype=float), want[col].to_numpy(dtype=float), rtol=1e-5, err_msg=col
        )
    assert (df["pearson"] > 0.3).all()  # a real signal, not a degenerate case
    summary = df.attrs["summary"]
    for name in ("pearson", "spearman", "rmse", "ssim", "pearson_hist_convention"):
        assert summary[f"{name}_mean"] == pytest.approx(want[name].astype(float).mean(), rel=1e-5)
        assert summary[f"{name}_median"] == pytest.approx(want[name].astype(float).median(), rel=1e-5)
        # four genes: the top-50 HVGs are all of them
        assert summary[f"{name}_mean_hvg"] == pytest.approx(summary[f"{name}_mean"])
    assert summary["hvg"] == GENES and df["highly_variable"].all()
    assert summary["n_nan_genes"] == 0 and summary["nan_genes"] == []
    assert (summary["n_units_measured"], summary["n_units_predicted"]) == (86, 86)
    assert (summary["n_units_shared"], summary["n_units"], summary["n_units_gridded"]) == (85, 83, 83)
    assert np.isnan(summary["tumour_auroc"]) and summary["n_tumour_units"] == 0
    # stored: genes in obs, the summary in uns, the parameters recorded; nothing else changed
    table = sdata.tables["predicted_metrics"]
    assert list(table.obs_names) == GENES and table.n_vars == 0
    pd.testing.assert_frame_equal(table.obs, df.rename_axis(None), check_dtype=False)
    assert table.uns["summary"]["pearson_mean"] == summary["pearson_mean"]
    assert "spatialdata_attrs" not in table.uns or table.uns["spatialdata_attrs"].get("region") is None
    assert st2he._elements.get_params(sdata, "predicted_metrics")["true_key"] == "measured"
    assert set(sdata.tables) == {"measured", "predicted", "predicted_metrics"}


def test_fixed_data_range_and_no_grid():
    sdata = make_expression_sdata()
    df = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", data_range=10.0)
    np.testing.assert_allclose(df["ssim"], reference(sdata, GENES, data_range=10.0)["ssim"].astype(float), rtol=1e-6)
    # cells (no array_row / array_col): SSIM and HiST's convention are NaN, the rest is scored
    cells = make_expression_sdata(gridded=False)
    df = st2he.tl.evaluate_expression(cells, pred_key="predicted", true_key="measured")
    assert df["ssim"].isna().all() and df["pearson_hist_convention"].isna().all()
    np.testing.assert_allclose(df["pearson"], reference(cells, GENES)["pearson"].astype(float), rtol=1e-6)
    assert df.attrs["summary"]["n_units_gridded"] == 0 and np.isnan(df.attrs["summary"]["ssim_mean"])
    with pytest.raises(ValueError, match="data_range must be 'measured' or a positive number"):
        st2he.tl.evaluate_expression(cells, pred_key="predicted", true_key="measured", data_range=0, key_added="x")


def test_gene_without_variance_is_nan_and_reported(sdata):
    # gene C: no counts anywhere (measured constant 0); gene D: the prediction is a constant (a mean baseline)
    true, pred = sdata.tables["measured"], sdata.tables["predicted"]
    counts = true.X.toarray()
    counts[:, 2] = 0
    true.X = sp.csr_matrix(counts)
    pred.X[:, 3] = 1.5
    with pytest.warns(UserWarning, match=r"2 of 4 genes have no variance.*C, D"):
        df = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured")
    assert df.loc[["C", "D"], ["pearson", "spearman"]].isna().all().all()
    assert np.isfinite(df.loc[["A", "B"], ["pearson", "spearman", "ssim"]].to_numpy()).all()
    # RMSE is defined for them all; SSIM of a map with no range (gene C) is NaN
    want = reference(sdata, ["A", "B", "D"])
    np.testing.assert_allclose(df.loc[["A", "B", "D"], "rmse"], want["rmse"].astype(float), rtol=1e-6)
    scored = pred.obs["in_tissue"].to_numpy() & pred.obs["instance_id"].isin(true.obs["instance_id"]).to_numpy()
    assert df.loc["C", "rmse"] == pytest.approx(np.sqrt(np.mean(pred.X[scored, 2].astype(float) ** 2)), rel=1e-6)
    assert np.isnan(df.loc["C", "ssim"])
    summary = df.attrs["summary"]
    assert summary["n_nan_genes"] == 2 and summary["nan_genes"] == ["C", "D"]
    assert summary["pearson_mean"] == pytest.approx(df.loc[["A", "B"], "pearson"].mean())


def test_out_of_tissue_and_one_table_units_are_not_scored(sdata):
    before = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", key_added="before")
    pred, true = sdata.tables["predicted"], sdata.tables["measured"]
    # wild predictions out of tissue, and wild counts in units the other table lacks, change nothing
    out = ~pred.obs["in_tissue"].to_numpy()
    assert out.sum() == 2
    pred.X[out] = 50.0
    only = ~pred.obs["instance_id"].isin(true.obs["instance_id"]).to_numpy()
    assert list(pred.obs["instance_id"][only]) == ["6_1"]
    pred.X[only] = -30.0
    counts = true.X.toarray()
    only_true = ~true.obs["instance_id"].isin(pred.obs["instance_id"]).to_numpy()
    assert list(true.obs["instance_id"][only_true]) == ["2_3"]
    counts[only_true, :4] = 1000
    true.X = sp.csr_matrix(counts)
    after = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", key_added="after")
    pd.testing.assert_frame_equal(before, after)
    # ... while a wild prediction in tissue does change the scores
    pred.X[0] = 50.0
    changed = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", key_added="changed")
    assert not np.allclose(changed["pearson"], before["pearson"])


def test_hist_convention_on_a_grid_with_holes():
    # a 7 x 8 grid with holes, every unit in tissue: gene maps with zero background where no unit is
    holes = ((0, 0), (0, 7), (3, 3), (3, 4), (6, 0))
    sdata = make_expression_sdata(
        n_rows=7, n_cols=8, holes=holes, measured_only=(), predicted_only=(), out_of_tissue=()
    )
    df = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured")
    true, pred = sdata.tables["measured"], sdata.tables["predicted"]
    counts = true.X.toarray().astype(np.float64)
    lognorm = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    r, c = true.obs["array_row"].to_numpy(), true.obs["array_col"].to_numpy()
    for k, g in enumerate(GENES):
        a, b = np.zeros((7, 8)), np.zeros((7, 8))
        a[r, c], b[r, c] = lognorm[:, k], np.asarray(pred.X)[:, k]
        assert (a[[0, 0, 3, 3, 6], [0, 7, 3, 4, 0]] == 0).all()
        x, y = a.ravel() - a.mean(), b.ravel() - b.mean()
        assert df.loc[g, "pearson_hist_convention"] == pytest.approx((x @ y) / np.sqrt((x @ x) * (y @ y)), rel=1e-6)
        assert df.loc[g, "ssim"] == pytest.approx(structural_similarity(a, b, data_range=a.max() - a.min()), rel=1e-6)
    # the convention counts the holes as agreeing zeros: it differs from the in-tissue Pearson
    assert not np.allclose(df["pearson_hist_convention"], df["pearson"])


def _diffst_reference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Diff-ST's metrics of measured map ``a`` and predicted map ``b``, step by step as its super_res_sample.py."""
    r = pearsonr(b.ravel(), a.ravel()).statistic
    gt = (a - a.min()) / (a.max() - a.min())
    pr = (b - b.min()) / (b.max() - b.min())
    rmse = np.sqrt(np.mean((pr - gt) ** 2)) / (gt.max() - gt.min())
    ssim = structural_similarity(np.uint8(pr * 225), np.uint8(gt * 225), gaussian_weights=True, sigma=1.5)
    return {"pearson_diffst_convention": abs(r), "rmse_diffst_convention": rmse, "ssim_diffst_convention": ssim}


def test_diffst_convention_equals_a_direct_computation():
    # a full 12 x 16 grid, every unit in tissue; counts designed so that each unit totals 60 over every gene
    n_rows, n_cols = 12, 16
    sdata = make_expression_sdata(
        n_rows=n_rows, n_cols=n_cols, holes=(), measured_only=(), predicted_only=(), out_of_tissue=()
    )
    true, pred = sdata.tables["measured"], sdata.tables["predicted"]
    r, c = true.obs["array_row"].to_numpy(), true.obs["array_col"].to_numpy()
    assert (pred.obs["array_row"].to_numpy() == r).all() and (pred.obs["array_col"].to_numpy() == c).all()
    counts = np.zeros((len(r), 5))
    counts[:, 0] = 1 + c + (r > 5) * 6  # A: a gradient and a step
    counts[:, 1] = 2 + ((r - 6) ** 2 + (c - 8) ** 2 < 12) * 9  # B: a blob
    counts[:, 2] = np.where(r % 2 == 0, 5, 1)  # C: row parity only
    counts[:, 3] = 1 + (r + c) % 5  # D: diagonal stripes
    counts[:, 4] = 60 - counts[:, :4].sum(axis=1)  # E: the totals are all 60, so C's values depend on rows only
    assert (counts[:, 4] > 0).all()
    true.X = sp.csr_matrix(counts.astype(np.float32))
    lognorm = np.log1p(counts[:, :4] / 60 * 1e4).astype(np.float32)
    noise = np.random.default_rng(1).normal(0, 0.3, len(r))
    predicted = np.c_[
        10 - lognorm[:, 0],  # A: anti-correlated (signed Pearson -1)
        50 * lognorm[:, 1] + 7,  # B: right pattern, wrong scale and offset: values far above 225 / 255 = 1.13
        (c % 2).astype(np.float64),  # C: column parity, orthogonal to the measured rows: Pearson exactly 0
        lognorm[:, 3] + noise,  # D: noisy
    ]
    pred.X = predicted.astype(np.float32)
    df = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured")

    for k, g in enumerate(GENES):
        a, b = np.zeros((n_rows, n_cols)), np.zeros((n_rows, n_cols))
        a[r, c] = lognorm[:, k]
        b[r, c] = np.asarray(pred.X, dtype=np.float64)[:, k]
        for name, value in _diffst_reference(a, b).items():
            assert df.loc[g, name] == pytest.approx(value, rel=1e-6, abs=1e-12), (g, name)
    # anti-correlation: |r| = 1 where the signed Pearson is -1
    assert df.loc["A", "pearson"] == pytest.approx(-1, abs=1e-6)
    assert df.loc["A", "pearson_diffst_convention"] == pytest.approx(1, abs=1e-6)
    assert df.loc["A", "ssim_diffst_convention"] < 0  # the inverted map still looks unlike the truth to SSIM
    # wrong scale: each map min-max normalised on its own before uint8(x * 225), so nothing saturates and the
    # error is forgiven (SSIM ~ 1, RMSE ~ 0), where st2he's SSIM with the measured range and its RMSE punish it
    assert df.loc["B", "ssim_diffst_convention"] > 0.99 and df.loc["B", "rmse_diffst_convention"] < 0.01
    assert df.loc["B", "ssim"] < 0.05 and df.loc["B", "rmse"] > 100
    # a gene scored exactly 0: Diff-ST's average skips it, the mean over genes counts it
    assert df.loc["C", "pearson_diffst_convention"] == 0.0 and df.loc["C", "pearson"] == 0.0
    summary = df.attrs["summary"]
    scored = df.loc[["A", "B", "D"], "pearson_diffst_convention"]
    assert summary["pearson_diffst_convention_mean_nonzero"] == pytest.approx(scored.mean())
    assert summary["pearson_diffst_convention_mean"] == pytest.approx(scored.sum() / 4)
    assert summary["pearson_diffst_convention_mean_nonzero_hvg"] == pytest.approx(scored.mean())  # 4 genes: all HVG
    for name in ("ssim_diffst_convention", "rmse_diffst_convention"):
        values = df[name].to_numpy()
        assert np.isfinite(values).all()
        # a perfect RMSE of 0 is dropped as well (gene B here: its two normalised maps agree to the last bit)
        assert summary[f"{name}_mean_nonzero"] == pytest.approx(values[values != 0].mean())
        assert summary[f"{name}_mean"] == pytest.approx(values.mean())
        assert summary[f"{name}_median"] == pytest.approx(np.median(values))
    assert df.attrs["params"]["diffst_ssim"] == {"levels": 225, "sigma": 1.5, "window": 11, "data_range": 255}


def test_diffst_convention_nan_where_undefined(sdata):
    # a 9 x 10 grid: under Diff-ST's 11 x 11 Gaussian window, so no SSIM; |r| and the RMSE are still defined
    df = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured")
    assert df["ssim_diffst_convention"].isna().all() and np.isnan(df.attrs["summary"]["ssim_diffst_convention_mean"])
    np.testing.assert_allclose(df["pearson_diffst_convention"], df["pearson_hist_convention"].abs(), rtol=1e-12)
    assert df["rmse_diffst_convention"].between(0, 1).all()
    # a measured map with no range (gene C without counts): nothing to min-max normalise, NaN (not 0) and skipped
    counts = sdata.tables["measured"].X.toarray()
    counts[:, 2] = 0
    sdata.tables["measured"].X = sp.csr_matrix(counts)
    with pytest.warns(UserWarning, match="no variance"):
        df = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", overwrite=True)
    assert df.loc["C", ["pearson_diffst_convention", "rmse_diffst_convention"]].isna().all()
    summary = df.attrs["summary"]
    want = df.loc[["A", "B", "D"], "pearson_diffst_convention"].mean()
    assert summary["pearson_diffst_convention_mean_nonzero"] == pytest.approx(want)
    # cells (no array coordinates): no gene maps, every Diff-ST column NaN
    cells = make_expression_sdata(gridded=False)
    df = st2he.tl.evaluate_expression(cells, pred_key="predicted", true_key="measured")
    cols = ["pearson_diffst_convention", "ssim_diffst_convention", "rmse_diffst_convention"]
    assert df[cols].isna().all().all()
    assert np.isnan(df.attrs["summary"]["pearson_diffst_convention_mean_nonzero"])


def test_visium_doubled_columns_are_halved(sdata):
    # Visium numbers spots on a hexagonal lattice with doubled columns: 2 c + (r % 2); neighbours stay neighbours
    want = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", key_added="plain")
    for table in sdata.tables.values():
        if "array_col" in table.obs:
            table.obs["array_col"] = 2 * table.obs["array_col"] + table.obs["array_row"] % 2
    got = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", key_added="doubled")
    pd.testing.assert_frame_equal(got, want)


def test_tumour_auroc_auprc_on_known_labels(sdata):
    pred, true = sdata.tables["predicted"], sdata.tables["measured"]
    df = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", tumour_key="tumour")
    # the units scored: shared and in tissue
    ids = pred.obs["instance_id"][pred.obs["in_tissue"].to_numpy()]
    ids = ids[ids.isin(true.obs["instance_id"])]
    labels = true.obs.set_index("instance_id").loc[ids, "tumour"].to_numpy().astype(float)
    probs = pred.obs.set_index("instance_id").loc[ids, "tumour_probability"].to_numpy()
    # AUROC by hand: the fraction of (tumour, other) pairs ranked right, ties counting half
    pos, neg = probs[labels == 1], probs[labels == 0]
    by_hand = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    summary = df.attrs["summary"]
    assert summary["tumour_auroc"] == pytest.approx(by_hand)
    assert summary["tumour_auroc"] == pytest.approx(roc_auc_score(labels, probs))
    assert summary["tumour_auprc"] == pytest.approx(average_precision_score(labels, probs))
    assert summary["n_tumour_units"] == 83 and 0.7 < summary["tumour_auroc"] < 1.0
    # labels as strings with tumour_values, read from the predicted table when only it has the column
    pred.obs["compartment2"] = np.where(pred.obs["tumour_probability"] > 0.6, "tumour", "stroma")
    df2 = st2he.tl.evaluate_expression(
        sdata,
        pred_key="predicted",
        true_key="measured",
        tumour_key="compartment2",
        tumour_values=["tumour"],
        key_added="m2",
    )
    assert df2.attrs["summary"]["tumour_auroc"] == pytest.approx(1.0)
    # a label column that is in neither table
    with pytest.raises(KeyError, match="tumour_key='nope' is not a column"):
        st2he.tl.evaluate_expression(
            sdata, pred_key="predicted", true_key="measured", tumour_key="nope", key_added="m3"
        )
    assert "m3" not in sdata.tables


def test_top_50_highly_variable_genes():
    import scanpy as sc

    genes = [f"g{i:02d}" for i in range(60)]
    sdata = make_expression_sdata(genes=genes, extra_genes=())
    df = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured")
    summary = df.attrs["summary"]
    true, pred = sdata.tables["measured"], sdata.tables["predicted"]
    ids = pred.obs["instance_id"][pred.obs["in_tissue"].to_numpy()]
    ids = ids[ids.isin(true.obs["instance_id"])]
    counts = true.X.toarray().astype(np.float64)
    lognorm = pd.DataFrame(np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4), index=true.obs["instance_id"])
    adata = ad.AnnData(lognorm.loc[ids].to_numpy(np.float32), var=pd.DataFrame(index=genes))
    hv = sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=50, inplace=False)["highly_variable"]
    want = [g for g, h in zip(genes, hv, strict=True) if h]
    assert len(want) == 50 and summary["hvg"] == want
    assert df["highly_variable"].sum() == 50
    assert summary["pearson_mean_hvg"] == pytest.approx(df.loc[want, "pearson"].mean())
    assert summary["pearson_median_hvg"] == pytest.approx(df.loc[want, "pearson"].median())
    assert summary["pearson_mean_hvg"] != pytest.approx(summary["pearson_mean"])


def test_stored_table_survives_zarr(sdata, tmp_path):
    from spatialdata import read_zarr

    with pytest.warns(UserWarning, match="no variance"):
        sdata.tables["predicted"].X[:, 1] = 0.0
        st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", key_added="m")
    st2he.tl.evaluate_expression(
        sdata, pred_key="predicted", true_key="measured", genes=["A"], tumour_key="tumour", key_added="m_a"
    )
    sdata.write(tmp_path / "s.zarr")
    tables = read_zarr(tmp_path / "s.zarr").tables
    assert tables["m_a"].uns["summary"]["n_nan_genes"] == 0
    assert tables["m_a"].uns["summary"]["tumour_auroc"] == sdata.tables["m_a"].uns["summary"]["tumour_auroc"]
    back = tables["m"]
    assert list(back.obs_names) == GENES and np.isnan(back.obs.loc["B", "pearson"])
    assert back.uns["summary"]["n_nan_genes"] == 1 and list(back.uns["summary"]["nan_genes"]) == ["B"]


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_tables_and_genes(sdata):
    with pytest.raises(KeyError, match=r"pred_key='nope' is not a table.*\['measured', 'predicted'\]"):
        st2he.tl.evaluate_expression(sdata, pred_key="nope", true_key="measured")
    with pytest.raises(KeyError, match=r"true_key='table' is not a table.*\['measured', 'predicted'\]"):
        st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="table")
    with pytest.raises(KeyError, match=r"1 of 2 genes are not in table 'predicted': 'E'"):
        st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", genes=["A", "E"])
    with pytest.raises(KeyError, match=r"genes are not in table 'measured': 'ZZ'"):
        sdata.tables["predicted"].var_names = ["A", "B", "C", "ZZ"]
        st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", genes=["A", "ZZ"])
    assert set(sdata.tables) == {"measured", "predicted"}


def test_tables_over_different_elements_or_no_shared_unit(sdata):
    pred = sdata.tables["predicted"]
    from spatialdata import deepcopy

    sdata["other_bins"] = deepcopy(sdata.shapes["bins"])
    del sdata.tables["predicted"]
    pred.obs["region"] = pd.Categorical(["other_bins"] * pred.n_obs)
    pred.uns["spatialdata_attrs"]["region"] = "other_bins"
    sdata.tables["predicted"] = pred
    with pytest.raises(ValueError, match=r"annotate different elements: 'predicted' annotates \['other_bins'\]"):
        st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured")
    # same element, no id in common
    pred.obs["region"] = pd.Categorical(["bins"] * pred.n_obs)
    pred.uns["spatialdata_attrs"]["region"] = "bins"
    pred.obs["instance_id"] = [f"x{i}" for i in range(pred.n_obs)]
    with pytest.raises(ValueError, match="share no unit"):
        st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured")
    assert "predicted_metrics" not in sdata.tables


def test_existing_key_added(sdata):
    first = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured")
    kept = sdata.tables["predicted_metrics"]
    sdata.tables["predicted"].X[:] = 0.0  # would change every score
    with pytest.raises(KeyError, match="already exists.*overwrite=True"):
        st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured")
    assert sdata.tables["predicted_metrics"] is kept
    pd.testing.assert_frame_equal(kept.obs, first.rename_axis(None), check_dtype=False)
    with pytest.raises(ValueError, match="names an element this call reads"):
        st2he.tl.evaluate_expression(
            sdata, pred_key="predicted", true_key="measured", key_added="measured", overwrite=True
        )
    with pytest.warns(UserWarning, match="no variance"):
        st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", overwrite=True)
    assert sdata.tables["predicted_metrics"].obs["pearson"].isna().all()


@pytest.fixture(scope="module")
def resolved():
    """Simulated molecules: 55 µm spots super-resolved to 8 µm bins (bicubic), and the true 8 µm bins."""
    sdata = st2he.datasets.synthetic_tissue(3, size_um=256.0)
    st2he.pp.aggregate_transcripts(sdata, by="spots", key_added="spots")
    st2he.pp.aggregate_transcripts(sdata, by="bins", bin_size=8.0, key_added="truth")
    st2he.tl.super_resolve(sdata, table_key="spots", method="bicubic", key_added="sr", progress=False)
    return sdata


@pytest.mark.parametrize("normalisation", ["log1p_cp10k", "log1p"])
def test_counts_matched_on_the_grid_equal_a_direct_computation(resolved, normalisation):
    """Super-resolved counts (their own bins element) scored against the true bins by grid position."""
    sdata = resolved
    sr, truth = sdata.tables["sr"], sdata.tables["truth"]
    genes = list(sr.var_names[:12])
    df = st2he.tl.evaluate_expression(
        sdata, pred_key="sr", true_key="truth", genes=genes, prediction="counts", normalisation=normalisation,
        match="grid", key_added=f"m_{normalisation}",
    )
    # direct: bins matched by (array_row, array_col), both normalised over the same genes
    t = truth.obs.reset_index(drop=True)
    p = sr.obs.reset_index(drop=True)
    tkey = dict(zip(zip(t["array_row"], t["array_col"], strict=True), range(len(t)), strict=True))
    pairs = [(i, tkey[k]) for i, k in enumerate(zip(p["array_row"], p["array_col"], strict=True)) if k in tkey]
    pi = np.array([a for a, _ in pairs])
    ti = np.array([b for _, b in pairs])
    assert df["n_units"].iloc[0] == len(pairs) > 200
    common = [g for g in sr.var_names if g in set(truth.var_names)]
    x = truth[:, common].X.toarray()[ti].astype(np.float64)
    y = np.asarray(sr[:, common].X, dtype=np.float64)[pi]

    def norm(c):  # totals over every gene both tables hold, not only the scored ones
        if normalisation == "log1p":
            return np.log1p(c)
        tot = c.sum(axis=1, keepdims=True)
        return np.log1p(np.divide(c * 1e4, tot, out=np.zeros_like(c), where=tot > 0))

    x, y = norm(x)[:, : len(genes)], norm(y)[:, : len(genes)]
    for j, g in enumerate(genes):
        if np.ptp(x[:, j]) == 0 or np.ptp(y[:, j]) == 0:
            assert np.isnan(df.loc[g, "pearson"])
            continue
        assert df.loc[g, "pearson"] == pytest.approx(pearsonr(x[:, j], y[:, j]).statistic, abs=1e-5)
        assert df.loc[g, "rmse"] == pytest.approx(np.sqrt(np.mean((x[:, j] - y[:, j]) ** 2)), abs=1e-5)
    assert df.attrs["params"]["match"] == "grid"
    assert df.attrs["params"]["normalisation"] == normalisation
    # the bins of the two tables are different elements: instance matching refuses, naming both
    with pytest.raises(ValueError, match="annotate different elements"):
        st2he.tl.evaluate_expression(sdata, pred_key="sr", true_key="truth", prediction="counts", key_added="x")


def test_grid_matching_and_counts_refuse_bad_input(resolved):
    sdata = resolved
    st2he.pp.aggregate_transcripts(sdata, by="bins", bin_size=16.0, key_added="truth16")
    with pytest.raises(ValueError, match="bins of one size"):
        st2he.tl.evaluate_expression(sdata, pred_key="sr", true_key="truth16", prediction="counts", match="grid")
    with pytest.raises(ValueError, match="prediction must be one of"):
        st2he.tl.evaluate_expression(sdata, pred_key="sr", true_key="truth", prediction="log", match="grid")
    with pytest.raises(ValueError, match="gridded units"):
        st2he.tl.evaluate_expression(sdata, pred_key="sr", true_key="table", prediction="counts", match="grid")
    # a log-normalised prediction with negative values is not counts
    neg = sdata.tables["sr"].copy()
    neg.X = np.asarray(neg.X) - 1.0
    sdata.tables["neg"] = neg
    with pytest.raises(ValueError, match="does not hold counts"):
        st2he.tl.evaluate_expression(sdata, pred_key="neg", true_key="truth", prediction="counts", match="grid")
    assert "sr_metrics" not in sdata.tables
