"""The binning pass of st2he.pp (one reading of the molecules), against a NumPy model of what it must produce."""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from spatialdata import SpatialData
from spatialdata.models import PointsModel
from spatialdata.transformations import Affine, Identity

from st2he._grid import Grid
from st2he.pp._kernels import BUCKET, BUCKET_BITS, bin_hash
from st2he.pp._molecules import bin_molecules, molecule_source
from st2he.pp._palette import BinCounts

GENES = ["A", "B", "C", "BLANK_0001", "NegControlProbe_7"]


def _messy_points(seed: int, n: int, *, qv: bool, control_column: bool, transformation):
    """Molecules with every kind of trouble: NaN and infinite coordinates, no gene name, control probes (by name
    and by column), low and missing quality values, and some far outside the region the tests draw."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-20, 300, n)
    y = rng.uniform(-10, 200, n)
    x[rng.random(n) < 0.02] = np.nan
    y[rng.random(n) < 0.02] = np.inf
    x[rng.random(n) < 0.01] = -np.inf
    genes = pd.Categorical(rng.choice(GENES, n), categories=GENES)
    genes[rng.random(n) < 0.03] = np.nan
    df = pd.DataFrame({"x": x, "y": y, "gene": genes})
    if qv:
        q = np.where(rng.random(n) < 0.1, 5.0, 35.0)
        q[rng.random(n) < 0.05] = np.nan  # no quality value: kept
        df["qv"] = q.astype(np.float32)
    if control_column:
        df["is_control"] = rng.random(n) < 0.05
    points = PointsModel.parse(
        dd.from_pandas(df, npartitions=4), feature_key="gene", transformations={"global": transformation}
    )
    return SpatialData(points={"transcripts": points}), df


def _model(df, affine, *, qv: bool, control_column: bool, origin, pixel_size, grid, bin_size):
    """What the pass must give, written plainly: counts by first reason, extent, buckets (in order), bin sample."""
    x, y = df["x"].to_numpy(), df["y"].to_numpy()
    with np.errstate(invalid="ignore"):
        gx = affine[0, 0] * x + affine[0, 1] * y + affine[0, 2]
        gy = affine[1, 0] * x + affine[1, 1] * y + affine[1, 2]
    finite = np.isfinite(gx) & np.isfinite(gy)
    names = df["gene"].astype(object).to_numpy()
    control = np.isin(names, GENES[3:])
    if control_column:
        control |= df["is_control"].to_numpy()
    low = (df["qv"].to_numpy() < 20) if qv else np.zeros(len(df), bool)
    missing = pd.isna(names)
    r1 = ~finite
    r2 = finite & control
    r3 = finite & ~control & low
    r4 = finite & ~control & ~low & missing
    kept = ~(r1 | r2 | r3 | r4)
    counts = {"total": len(df), "nonfinite": r1.sum(), "controls": r2.sum(), "low_qv": r3.sum(), "missing": r4.sum()}
    with np.errstate(invalid="ignore"):
        col = np.floor((gx - origin[0]) / pixel_size)
        row = np.floor((gy - origin[1]) / pixel_size)
    inside = kept.copy()
    if grid is not None:
        inside &= (col >= 0) & (row >= 0) & (col < grid.width) & (row < grid.height)
    # the bounds of the pixels holding the molecules drawn (far edges exclusive)
    extent = (
        origin[0] + col[inside].min() * pixel_size,
        origin[1] + row[inside].min() * pixel_size,
        origin[0] + (col[inside].max() + 1) * pixel_size,
        origin[1] + (row[inside].max() + 1) * pixel_size,
    )
    codes = pd.Categorical(names, categories=GENES).codes
    buckets: dict[tuple[int, int], list[int]] = {}
    for i in np.flatnonzero(inside):  # in the molecules' order
        r, c = int(row[i]), int(col[i])
        packed = int(codes[i]) << 16 | (r & (BUCKET - 1)) << BUCKET_BITS | (c & (BUCKET - 1))
        buckets.setdefault((r >> BUCKET_BITS, c >> BUCKET_BITS), []).append(packed)
    with np.errstate(invalid="ignore"):
        keys = (np.floor(gx / bin_size).astype(np.int64) + (1 << 30)) * (1 << 31) + (
            np.floor(gy / bin_size).astype(np.int64) + (1 << 30)
        )
    sample = sorted(zip(keys[kept].tolist(), codes[kept].tolist(), strict=True))
    return counts, extent, kept.sum() - inside.sum(), buckets, sample


@pytest.mark.parametrize("qv", [True, False])
@pytest.mark.parametrize("control_column", [True, False])
@pytest.mark.parametrize("transformed", [False, True])
@pytest.mark.parametrize("region", [False, True])
def test_binning_pass_matches_a_plain_model(qv, control_column, transformed, region):
    seed = 8 * qv + 4 * control_column + 2 * transformed + region
    affine = np.array([[0.75, 0.1, 12.5], [-0.05, 0.8, -3.0], [0, 0, 1]]) if transformed else np.eye(3)
    transformation = Affine(affine, input_axes=("x", "y"), output_axes=("x", "y")) if transformed else Identity()
    sd, df = _messy_points(seed, 6000, qv=qv, control_column=control_column, transformation=transformation)
    source = molecule_source(sd, "transcripts")
    pixel_size = 0.3
    grid = Grid(-3.0, 6.0, pixel_size, 400, 700) if region else None
    origin = (grid.x0, grid.y0) if region else (-6.0, -9.0)
    bins = BinCounts(bin_size=7.0)
    binned = bin_molecules(
        source, grid, pixel_size=pixel_size, origin=None if region else origin, chunk=256, min_qv=20, bins=bins
    )
    counts, extent, outside, buckets, sample = _model(
        df, affine, qv=qv, control_column=control_column, origin=origin, pixel_size=pixel_size, grid=grid, bin_size=7.0
    )
    report = binned.report
    assert (report.total, report.nonfinite, report.controls, report.low_qv, report.missing_gene) == tuple(
        counts.values()
    )
    assert report.kept == counts["total"] - sum(list(counts.values())[1:]) and report.outside == outside
    np.testing.assert_allclose(binned.extent, extent, rtol=0, atol=1e-12)
    assert set(binned.index) == set(buckets)
    for block, expected in buckets.items():
        got = np.concatenate(list(binned.buckets(*block))).astype(np.int64)
        np.testing.assert_array_equal(got, expected)  # the molecules' order is kept within a block
    assert bins.level == 0
    got = sorted(zip(np.concatenate(bins.keys).tolist(), np.concatenate(bins.codes).tolist(), strict=True))
    assert got == sample
    # at a higher level, the sample is the bins whose hash has that many zero bits
    level = 3
    sub = BinCounts(bin_size=7.0)
    sub.level = level
    bin_molecules(
        source, grid, pixel_size=pixel_size, origin=None if region else origin, chunk=256, bins=sub, store=False
    )
    mask = np.uint64((1 << level) - 1)
    expected = [s for s in sample if (int(bin_hash(np.int64(s[0]))) >> 20) & int(mask) == 0]
    got = sorted(zip(np.concatenate(sub.keys).tolist(), np.concatenate(sub.codes).tolist(), strict=True))
    assert got == expected and 0 < len(got) < len(sample)
