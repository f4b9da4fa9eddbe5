"""st2he.pp.make_palette: global, deterministic, saturated; co-expressed genes get near colours."""

from __future__ import annotations

import colorsys

import anndata as ad
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from spatialdata import SpatialData
from spatialdata.models import PointsModel, TableModel

import st2he
from st2he._elements import get_params
from st2he.pp._palette import hex_to_rgb

GROUPS = {
    "epi": ["KRT8", "KRT18", "EPCAM", "CDH1"],
    "imm": ["PTPRC", "CD3E", "CD4", "CD8A"],
    "str": ["COL1A1", "DCN", "LUM", "ACTA2"],
}


def _tissue(n_cells=300, seed=0, npartitions=3) -> SpatialData:
    """Cells of three types on a 15 µm lattice; each type expresses only its own genes (plus a little noise)."""
    rng = np.random.default_rng(seed)
    xs, ys, genes = [], [], []
    kinds = list(GROUPS)
    side = int(np.ceil(np.sqrt(n_cells)))
    for i in range(n_cells):
        cx, cy = (i % side) * 15.0 + 7.5, (i // side) * 15.0 + 7.5
        kind = kinds[rng.integers(3)]
        n = rng.poisson(40)
        own = rng.random(n) < 0.95
        pool = [rng.choice(GROUPS[kind]) if o else rng.choice(sum(GROUPS.values(), [])) for o in own]
        xs += list(cx + rng.normal(0, 3, n))
        ys += list(cy + rng.normal(0, 3, n))
        genes += pool
    df = pd.DataFrame({"x": xs, "y": ys, "gene": pd.Categorical(genes), "qv": 40.0})
    return SpatialData(
        points={"transcripts": PointsModel.parse(dd.from_pandas(df, npartitions=npartitions), feature_key="gene")}
    )


def _hue(colour: str) -> float:
    r, g, b = (v / 255 for v in hex_to_rgb(colour))
    return colorsys.rgb_to_hsv(r, g, b)[0]


def _hue_distance(a: str, b: str) -> float:
    d = abs(_hue(a) - _hue(b))
    return min(d, 1 - d)


def _arcs(palette) -> int:
    """Number of contiguous runs of one cell type's genes around the hue circle (3: each type owns one arc)."""
    kind = {g: k for k, v in GROUPS.items() for g in v}
    ring = [kind[g] for g in sorted(palette, key=lambda g: _hue(palette[g]))]
    return sum(a != b for a, b in zip(ring, ring[1:] + ring[:1], strict=True))


def _within_and_between(palette):
    within, between = [], []
    for ka, ga in GROUPS.items():
        for kb, gb in GROUPS.items():
            for a in ga:
                for b in gb:
                    if a < b:
                        (within if ka == kb else between).append(_hue_distance(palette[a], palette[b]))
    return np.mean(within), np.mean(between), np.max(within), np.min(between)


def test_hue_palette_is_evenly_spaced_sorted_and_saturated():
    pal = st2he.pp.make_palette(["b", "a", "c", "d"], method="hue")
    assert list(pal) == ["a", "b", "c", "d"]
    assert pal["a"] == "#ff0000"
    hues = [_hue(pal[g]) for g in "abcd"]
    np.testing.assert_allclose(np.diff(hues), 0.25, atol=0.01)
    assert st2he.pp.make_palette(["d", "c", "b", "a"], method="hue") == pal  # order of input is irrelevant
    for c in pal.values():
        r, g, b = (v / 255 for v in hex_to_rgb(c))
        _, s, v = colorsys.rgb_to_hsv(r, g, b)
        assert s > 0.95 and v > 0.95  # never grey


def test_coexpression_puts_coexpressed_genes_near_each_other():
    sd = _tissue()
    pal = st2he.pp.make_palette(sd, method="coexpression")
    assert sorted(pal) == sorted(sum(GROUPS.values(), []))
    mean_within, mean_between, _, _ = _within_and_between(pal)
    assert mean_within < 0.5 * mean_between
    assert _arcs(pal) == 3  # each cell type owns a contiguous arc of hues
    hue = st2he.pp.make_palette(sd, method="hue")
    w, b, _, _ = _within_and_between(hue)
    assert w > 0.5 * b and _arcs(hue) > 3  # the name-sorted palette does not know about co-expression


def test_coexpression_is_deterministic_and_independent_of_partitions():
    a = st2he.pp.make_palette(_tissue(npartitions=1))
    b = st2he.pp.make_palette(_tissue(npartitions=5))
    c = st2he.pp.make_palette(_tissue(npartitions=5))
    assert a == b == c


def test_sampled_coexpression_is_the_same_in_make_palette_and_rasterize_whatever_the_partitions(monkeypatch):
    from st2he.pp._palette import BinCounts

    # a budget of 2,000 molecules makes both subsample the ~12,000 molecules' bins, raising the level step by step
    monkeypatch.setattr(BinCounts.__init__, "__defaults__", (10.0, 2_000))
    df = _tissue(npartitions=1).points["transcripts"].compute()
    palettes = []
    for sizes in ([len(df)], [3000] * 3 + [len(df) - 9000], [len(df) - 120] + [20] * 6):  # even, and very uneven
        edges = np.cumsum([0, *sizes])
        parts = [dd.from_pandas(df.iloc[a:b], npartitions=1) for a, b in zip(edges[:-1], edges[1:], strict=True)]
        points = PointsModel.parse(dd.concat(parts), feature_key="gene")
        sd = SpatialData(points={"transcripts": points})
        assert sd.points["transcripts"].npartitions == len(sizes)
        palettes.append(st2he.pp.make_palette(sd))
        st2he.pp.rasterize_transcripts(sd, pixel_size=1.0)
        palettes.append(get_params(sd, "st2he_input")["palette"])
    assert all(p == palettes[0] for p in palettes)
    assert _arcs(palettes[0]) == 3  # still from co-expression: each cell type owns an arc of hues


def test_coexpression_from_a_table_and_from_anndata():
    rng = np.random.default_rng(2)
    genes = sum(GROUPS.values(), [])
    x = np.zeros((300, len(genes)))
    for i in range(300):
        k = i % 3
        cols = [genes.index(g) for g in list(GROUPS.values())[k]]
        x[i, cols] = rng.poisson(10, len(cols))
    adata = ad.AnnData(x, var=pd.DataFrame(index=genes))
    pal = st2he.pp.make_palette(adata)
    assert _arcs(pal) == 3
    sd = _tissue(n_cells=30)
    sd.tables["table"] = TableModel.parse(adata)
    assert st2he.pp.make_palette(sd, source="table") == pal
    assert st2he.pp.make_palette(sd, source="points") != pal  # the 30-cell points give another layout


def test_rasterize_stores_and_reuses_the_palette():
    sd = _tissue(n_cells=50)
    st2he.pp.rasterize_transcripts(sd, pixel_size=1.0)
    stored = get_params(sd, "st2he_input")["palette"]
    assert stored == st2he.pp.make_palette(sd)  # the same rule inside and outside rasterize
    other = _tissue(n_cells=50, seed=9)
    st2he.pp.rasterize_transcripts(other, pixel_size=1.0, palette=stored)
    assert get_params(other, "st2he_input")["palette"] == stored
    assert get_params(other, "st2he_input")["palette_method"] == "mapping"


def test_user_mappings_are_checked():
    genes = ["A", "B", "C"]
    assert st2he.pp.make_palette(genes, method={"A": "red", "B": (0, 1, 0), "C": "#0000FF"}) == {
        "A": "#ff0000",
        "B": "#00ff00",
        "C": "#0000ff",
    }
    with pytest.raises(ValueError, match="not in the panel.*'Z'"):
        st2he.pp.make_palette(genes, method={"A": "red", "B": "red", "C": "red", "Z": "red"})
    assert "Z" not in st2he.pp.make_palette(
        genes, method={"A": "red", "B": "red", "C": "red", "Z": "red"}, unknown="drop"
    )
    with pytest.raises(ValueError, match="no colour for 2 gene.*'B', 'C'"):
        st2he.pp.make_palette(genes, method={"A": "red"})
    filled = st2he.pp.make_palette(genes, method={"A": "#123456"}, missing="hue")
    assert filled["A"] == "#123456" and filled["B"] == st2he.pp.make_palette(genes, method="hue")["B"]
    with pytest.raises(ValueError, match="not a colour"):
        st2he.pp.make_palette(genes, method={"A": "no-such-colour", "B": "red", "C": "red"})
    with pytest.raises(ValueError, match="needs expression data"):
        st2he.pp.make_palette(genes, method="coexpression")
    with pytest.raises(ValueError, match="method must be"):
        st2he.pp.make_palette(genes, method="rainbow")


def test_controls_are_left_out_of_the_panel():
    df = pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [1.0, 1.0, 1.0], "gene": pd.Categorical(["A", "Blank-1", "NegPrb3"])})
    sd = SpatialData(points={"transcripts": PointsModel.parse(df, feature_key="gene")})
    assert list(st2he.pp.make_palette(sd, method="hue")) == ["A"]
    assert list(st2he.pp.make_palette(sd, method="hue", drop_controls=False)) == ["A", "Blank-1", "NegPrb3"]


def test_correlation_is_the_same_from_dense_and_sparse_counts_and_bins_make_the_expected_matrix():
    import scipy.sparse as sp

    from st2he.pp._palette import BinCounts, correlation

    rng = np.random.default_rng(3)
    counts = rng.poisson(rng.gamma(0.5, 2.0, (400, 12)))  # overdispersed: some genes absent from many bins
    counts[5] = 0  # an empty bin is left out
    dense = correlation(counts)
    np.testing.assert_allclose(dense, correlation(sp.csr_matrix(counts)), rtol=0, atol=1e-12)
    assert dense.shape == (12, 12) and np.allclose(np.diag(dense), 1.0) and np.allclose(dense, dense.T)
    # bins: counts of (bin, gene) pairs, bins in key order, whatever the order of the molecules
    keys = np.repeat(np.arange(400) * 7919, counts.sum(axis=1))
    codes = np.concatenate([np.repeat(np.arange(12), row) for row in counts])
    order = rng.permutation(len(keys))
    bins = BinCounts(budget=10**9)
    bins.add(keys[order], codes[order].astype(np.int32))
    m = bins.matrix(12)
    assert isinstance(m, np.ndarray)
    np.testing.assert_array_equal(m, counts[counts.sum(axis=1) > 0])
