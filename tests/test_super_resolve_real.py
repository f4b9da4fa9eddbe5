"""The real-crop protocol of ``benchmarks/bench_super_resolution.py`` (``benchmarks/_sr_holdout.py``), small and fast.

The Xenium crop is split at x = the median of its molecules; a tiny expression model is trained for a few steps on the
left half, and bicubic and regression are scored on the right half only.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _sr_holdout as H  # noqa: E402


@pytest.fixture(scope="module")
def protocol(shared_data, one_torch_thread):
    import st2he

    warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
    full, stain = H.read_crop("xenium", shared_data)
    split = H.split_x(full)
    rgb = H.add_stain_rgb(full, stain)
    train = H.crop_x(full, -np.inf, split, images=[rgb])
    test = H.crop_x(full, split, np.inf, images=[rgb])
    dropped = H.heldout_units(test, split)
    genes = [str(g) for g in test.tables["spots"].var_names]
    expr, _ = H.train_models(train, genes, rgb, expr_steps=2, sr_budget=0, val_fraction=0, log=lambda _: None)
    scores, _ = H.run(
        test,
        {
            "bicubic": {"method": "bicubic", "genes": genes},
            "regression": {"method": "regression", "image_key": rgb, "model": expr, "genes": genes},
        },
    )
    return {"full": full, "train": train, "test": test, "split": split, "dropped": dropped, "scores": scores}


def test_split_partitions_the_molecules(protocol):
    split = protocol["split"]
    x_all = protocol["full"].points["transcripts"]["x"].compute().to_numpy()
    x_train = protocol["train"].points["transcripts"]["x"].compute().to_numpy()
    x_test = protocol["test"].points["transcripts"]["x"].compute().to_numpy()
    assert split % H.BIN_SIZE == 0
    assert abs(split - np.median(x_all)) < H.BIN_SIZE
    assert (x_train < split).all() and (x_test >= split).all()
    assert len(x_train) + len(x_test) == len(x_all)  # every molecule in exactly one half


def test_heldout_bins_never_in_the_training_half(protocol):
    test, split = protocol["test"], protocol["split"]
    spots = test.tables["spots"]
    row, col = spots.obs["array_row"].to_numpy(), spots.obs["array_col"].to_numpy()
    x = (col + (row % 2) / 2) * H.SPOT_SPACING
    assert (x - H.SPOT_DIAMETER / 2 >= split).all()  # whole disks in the held-out half
    assert protocol["dropped"] > 0  # the spots crossing the split were there and were left out
    assert set(test.shapes["spots_55um"].index) == set(spots.obs["instance_id"])
    sr = test.tables["sr"]
    assert (sr.obs["array_col"].to_numpy() * H.BIN_SIZE >= split).all()  # each bin's left edge
    truth = test.tables["truth"]
    assert (truth.obs["array_col"].to_numpy() * H.BIN_SIZE >= split).all()


def test_counts_conserved_per_spot_to_the_molecule(protocol):
    test = protocol["test"]
    spots = test.tables["spots"]
    shapes = test.shapes["spots_55um"]
    pts = test.points["transcripts"].compute()
    pts = pts[~pts["is_control"].astype(bool) & (pts["qv"] >= 20)]  # the rasteriser's filters
    sr = test.tables["sr"]
    per_spot = pd.Series(np.asarray(sr.X, dtype=np.float64).sum(axis=1)).groupby(sr.obs["source_unit"].to_numpy()).sum()
    assert len(per_spot) == spots.n_obs
    for sid, geom in zip(shapes.index, shapes.geometry, strict=True):
        d = np.hypot(pts["x"].to_numpy() - geom.x, pts["y"].to_numpy() - geom.y)
        n = int((d <= H.SPOT_DIAMETER / 2).sum())
        assert n > 0
        assert per_spot[sid] == pytest.approx(n, abs=1e-3)  # bicubic was the first run; regression the last
    assert test.tables["sr"].uns["st2he"]["method"] == "regression"


def test_bicubic_pearson_is_a_direct_computation(protocol):
    import st2he
    from scipy.stats import pearsonr

    test = protocol["test"]
    st2he.tl.super_resolve(test, table_key="spots", method="bicubic", key_added="bic", overwrite=True, progress=False)
    pred, truth = test.tables["bic"], test.tables["truth"]
    shared = pred.obs_names.intersection(truth.obs_names)
    # every true bin (a bin holding a molecule) whose centre lies in a held-out spot is scored, and no other
    centres = (truth.obs[["array_col", "array_row"]].to_numpy() + 0.5) * H.BIN_SIZE
    spots = test.shapes["spots_55um"]
    xy = np.c_[spots.geometry.x, spots.geometry.y]
    d = np.hypot(*(centres[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    under = truth.obs_names[(d <= H.SPOT_DIAMETER / 2).any(axis=1)]
    assert 100 < len(shared) < len(truth.obs_names)
    assert set(shared) == set(under)
    genes = list(pred.var_names)
    p = np.asarray(pred[shared].X, dtype=np.float64)
    t = truth[shared].X
    t = np.asarray(t.toarray() if hasattr(t, "toarray") else t, dtype=np.float64)
    t_all = t.sum(axis=1, keepdims=True)
    lp = np.log1p(p / np.where(p.sum(axis=1, keepdims=True) > 0, p.sum(axis=1, keepdims=True), 1) * 1e4)
    lt = np.log1p(t / np.where(t_all > 0, t_all, 1) * 1e4)
    scores = protocol["scores"]["bicubic"]
    checked = 0
    for j, g in enumerate(genes):
        k = list(truth.var_names).index(g)
        if lt[:, k].std() == 0 or lp[:, j].std() == 0:
            assert np.isnan(scores.loc[g, "pearson"])
            continue
        assert scores.loc[g, "pearson"] == pytest.approx(pearsonr(lp[:, j], lt[:, k])[0], abs=1e-5)
        checked += 1
    assert checked >= 20
    assert (scores["n_units"].dropna() == len(shared)).all()


def test_every_method_scored_on_the_same_bins_and_genes(protocol):
    scores = protocol["scores"]
    assert set(scores) == {"bicubic", "flat", "regression"}
    ref = scores["bicubic"]
    for name, df in scores.items():
        assert list(df.index) == list(ref.index), name
        assert (df["n_units"].fillna(0) == ref["n_units"].fillna(0)).all(), name
    table = H.crop_table(scores, {"bicubic": 1.0, "flat": np.nan, "regression": 2.0}, n_bins=1)
    assert table.loc["bicubic", "pearson_all"] == pytest.approx(ref["pearson"].mean())
    d = (scores["regression"]["pearson"] - ref["pearson"]).dropna()
    assert table.loc["regression", "dPearson_vs_bicubic"] == pytest.approx(d.mean())
    # Diff-ST's conventions beside ours: |Pearson| over the whole grid, averaged over the values that are not zero
    for name, df in scores.items():
        r = df["pearson_hist_convention"].abs()
        assert table.loc[name, "pearson_diffst"] == pytest.approx(r[r.notna() & (r != 0)].mean()), name
        s = df["ssim_diffst_convention"]
        assert table.loc[name, "ssim_diffst"] == pytest.approx(s[s.notna() & (s != 0)].mean()), name
        assert np.isfinite(table.loc[name, "ssim_diffst"]), name
