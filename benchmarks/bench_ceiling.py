"""How high can expression read back from H&E go on the simulation? Oracle ceilings on the units the benchmarks score.

In ``st2he.datasets.synthetic_tissue`` a cell's expected expression is a fixed function of its cell type and state
(and, with ``niche=True``, of its distances to the tumour border and to vessels: ``NICHE_EFFECTS``). An oracle that
knows every cell and its true class, but not the genes of its molecules, predicts:

- ``class`` oracle, cells: the mean log1p CP10k of the cell's class (type + state) over the cells of that class of a
  training section (seed 5, never scored); a class absent there falls back to its type;
- ``class`` oracle, spots and bins: ``log1p CP10k`` of ``sum_c n_uc f_class(c)``: over the cells whose molecules fall
  in the unit, that cell's number of molecules in the unit (``n_uc``, counted exactly as
  ``st2he.pp.aggregate_transcripts`` counts: controls and ``qv < 20`` left out; checked against the measured totals)
  times its class's mean count fractions (pooled counts over pooled totals on the training section); molecules of no
  cell are not counted;
- ``class+niche`` oracle (``--niche`` sections; printed for clean sections too, where it equals a class oracle
  learnt on a ``niche=False`` training section): the class fractions of a ``niche=False`` training section times each
  cell's ``niche_factors`` (nuclear genes keep their share, as in the simulation). For cells it predicts the expected
  ``log1p(1e4 k / n)`` with ``k ~ Poisson(n f)`` and ``n`` the cell's measured total (a cell's own depth: the Bayes
  answer to MSE on log1p CP10k, which the class mean only approximates).
- ``visible class`` oracles: the same with the states the H&E does not draw (``INVISIBLE_STATES``: a cycling tumour
  cell is drawn like any other of its type) merged into their type's ``none``, i.e. what a reader of the H&E could
  know at best; for cells also with each cell's own depth (``visible class (E-log)``, which knows more than an image).

Scored with ``st2he.tl.evaluate_expression`` on exactly the units and genes the benchmarks score:

Rows ``(niche genes)``: the same, over the 8 genes ``NICHE_EFFECTS`` modulates only.

- ``bench_expression.py``: seeds 101-102, 768 µm; cells, 55 µm pseudo-spots on a 100 µm lattice, 16 µm bins; the
  units in tissue by the H&E (the ``in_tissue`` of ``predict_expression``'s table, here from ``method="mean"``), the
  shipped expression model's genes, mean per-gene Pearson pooled over the sections (mean of a gene's Pearsons);
- ``bench_super_resolution.py``: seeds 101-103, 512 µm, the 8 µm bins whose centres a spot holds (the bins
  ``super_resolve`` writes, here from ``method="bicubic"``) that hold molecules, every gene of the panel (column
  ``all``) and the top-50 highly variable genes of each section (``hvg``), as that benchmark reports them; and the
  shipped super-resolution model's 50 genes (``sr genes``, its ``--diffusion`` runs).

    python benchmarks/bench_ceiling.py                 # clean sections (the benchmarks' own)
    python benchmarks/bench_ceiling.py --niche         # niche=True sections (appearance does not matter)
    python benchmarks/bench_ceiling.py --skip-sr       # without the 8 µm bins of super-resolution

About 6 minutes of one free core (most of it simulating the 768 µm sections); 15 on a shared one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

TEST_SEEDS = (101, 102)
SIZE_UM = 768.0
SR_SEEDS = (101, 102, 103)
SR_SIZE_UM = 512.0
TRAIN_SEED = 5
MIN_QV = 20.0
#: Today's figures of the benchmarks (docs/models.md), printed beside the ceilings on clean sections.
REPORTED = {
    "cells": {"model": 0.713, "ridge": 0.690},
    "spots": {"model": 0.718, "ridge": 0.656},
    "bins16": {"model": 0.661, "ridge": 0.635},
    "sr_bins8 (sr genes)": {"regression": 0.535, "diffusion (one step)": 0.612},
}


#: Cell states the simulated H&E does not draw (a cycling tumour cell looks like any other of its type), so no reader of
#: the H&E can know them: the ``visible`` oracles merge them into their type's ``none``.
INVISIBLE_STATES = ("proliferating",)


def _classes(obs: pd.DataFrame, *, visible: bool = False) -> np.ndarray:
    state = obs["cell_state"].astype(str)
    if visible:
        state = state.where(~state.isin(INVISIBLE_STATES), "none")
    prefix = "visible:" if visible else ""
    return (prefix + obs["cell_type"].astype(str) + "|" + state).to_numpy()


def learn(sdata) -> dict:
    """Class (type|state) and type means of a training section: pooled count fractions, mean log1p CP10k."""
    from st2he._units import lognormalise

    t = sdata["table"]
    X = t.X.toarray().astype(np.float64)
    keep = X.sum(1) > 0
    X, obs = X[keep], t.obs[keep]
    logx = lognormalise(X).astype(np.float64)
    out = {"genes": list(t.var_names), "fraction": {}, "log": {}}
    labelings = (_classes(obs), _classes(obs, visible=True), obs["cell_type"].astype(str).to_numpy())
    for labels in labelings:
        for lab in np.unique(labels):
            m = labels == lab
            out["fraction"][lab] = X[m].sum(0) / X[m].sum()
            out["log"][lab] = logx[m].mean(0)
    return out


def _lookup(means: dict, obs: pd.DataFrame, what: str, *, visible: bool = False) -> np.ndarray:
    """Rows of ``means[what]`` for each cell: its class (its visible class with ``visible``), else its type."""
    classes, types = _classes(obs, visible=visible), obs["cell_type"].astype(str).to_numpy()
    table = means[what]
    return np.stack([table[c] if c in table else table[t] for c, t in zip(classes, types, strict=True)])


def _niche_fractions(base: np.ndarray, obs: pd.DataFrame) -> np.ndarray:
    """Class fractions times each cell's niche factors, nuclear genes keeping their share (as the simulation draws)."""
    from st2he.datasets._synthetic import GENES, NUCLEAR_GENES, niche_factors

    if "tumour_distance" not in obs:
        return base
    f = niche_factors(obs["cell_type"].astype(str).to_numpy(), obs["tumour_distance"], obs["vessel_distance"])
    nuclear = np.isin(np.arange(len(GENES)), [GENES.index(g) for g in NUCLEAR_GENES])
    out = base.copy()
    other = base[:, ~nuclear]
    scaled = other * f[:, ~nuclear]
    out[:, ~nuclear] = scaled / scaled.sum(1, keepdims=True) * other.sum(1, keepdims=True)
    return out


def _expected_log(fractions: np.ndarray, n: np.ndarray, k_max: int = 400) -> np.ndarray:
    """E[log1p(1e4 k / n)] for k ~ Poisson(n f), cell by cell (rows) and gene by gene."""
    from scipy.stats import poisson

    out = np.zeros_like(fractions)
    n = np.maximum(np.asarray(n, dtype=np.float64), 1.0)
    ks = np.arange(k_max + 1, dtype=np.float64)
    for i in range(len(fractions)):
        lam = n[i] * fractions[i]
        kk = ks[: int(min(k_max, lam.max() + 10 * math.sqrt(lam.max() + 1) + 10)) + 1]
        pmf = poisson.pmf(kk[None, :], lam[:, None])
        out[i] = pmf @ np.log1p(1e4 * kk / n[i])
    return out


def _molecules(sdata) -> pd.DataFrame:
    """The molecules aggregate_transcripts counts (controls and qv < 20 out), with the row of their cell (or -1)."""
    tx = sdata["transcripts"].compute()
    tx = tx[~tx["is_control"].to_numpy() & (tx["qv"].to_numpy() >= MIN_QV)]
    rows = pd.Series(np.arange(sdata["table"].n_obs), index=sdata["table"].obs["cell_id"].astype(str).to_numpy())
    cell = rows.reindex(tx["cell_id"].astype(str).to_numpy()).fillna(-1).to_numpy().astype(np.int64)
    return pd.DataFrame({"x": tx["x"].to_numpy(), "y": tx["y"].to_numpy(), "cell": cell})


def _unit_ids(x, y, kind: str, size: float) -> np.ndarray:
    """Instance ids (``"row_col"``) of the unit each molecule falls in, as aggregate_transcripts names them ("")."""
    if kind == "bins":
        rows, cols = np.floor(y / size).astype(np.int64), np.floor(x / size).astype(np.int64)
        inside = np.ones(len(x), dtype=bool)
    else:  # 55 µm spots on a 100 µm hexagonal lattice anchored at the origin (st2he.pp._aggregate._SpotAssigner)
        spacing, radius = 100.0, 27.5
        pitch = spacing * math.sqrt(3) / 2
        first = np.floor(y / pitch)
        best = np.full(len(x), np.inf)
        rows = np.zeros(len(x), dtype=np.int64)
        cols = np.zeros(len(x), dtype=np.int64)
        for r in (first, first + 1):
            r = r.astype(np.int64)
            c = np.ceil(x / spacing - (r % 2) / 2 - 0.5).astype(np.int64)
            cx, cy = (c + (r % 2) / 2) * spacing, r * pitch
            d = (x - cx) ** 2 + (y - cy) ** 2
            better = d < best
            best = np.where(better, d, best)
            rows, cols = np.where(better, r, rows), np.where(better, c, cols)
        inside = best <= radius**2
    ids = np.char.add(np.char.add(rows.astype(str), "_"), cols.astype(str)).astype(object)
    ids[~inside] = ""
    return ids


def unit_oracle(sdata, true_key: str, kind: str, size: float, cell_fractions: np.ndarray) -> pd.DataFrame:
    """Expected counts per unit (units of ``true_key`` x genes): sum over cells of n_uc x the cell's fractions."""
    import scipy.sparse as sp

    mol = _molecules(sdata)
    ids = _unit_ids(mol["x"].to_numpy(), mol["y"].to_numpy(), kind, size)
    true = sdata[true_key]
    region_ids = true.obs[true.uns["spatialdata_attrs"]["instance_key"]].astype(str).to_numpy()
    index = pd.Series(np.arange(len(region_ids)), index=region_ids)
    u = index.reindex(ids).fillna(-1).to_numpy().astype(np.int64)
    # every counted molecule falls in a unit of the table, and the totals agree with aggregate_transcripts'
    totals = np.bincount(u[u >= 0], minlength=len(region_ids))
    measured = np.asarray(true.X.sum(1)).ravel()
    if not np.array_equal(totals, measured.astype(np.int64)):
        off = np.abs(totals - measured).sum()
        msg = f"{true_key}: molecule counts per unit differ from aggregate_transcripts' ({off:g} off)."
        raise AssertionError(msg)
    ok = (u >= 0) & (mol["cell"].to_numpy() >= 0)
    n_uc = sp.csr_matrix(
        (np.ones(int(ok.sum())), (u[ok], mol["cell"].to_numpy()[ok])), shape=(len(region_ids), len(cell_fractions))
    )
    return pd.DataFrame(np.asarray(n_uc @ cell_fractions), index=region_ids)


def _score(sdata, template_key: str, true_key: str, values: pd.DataFrame, genes, *, log: bool) -> pd.DataFrame:
    """Put ``values`` (indexed by instance id; counts, or log1p CP10k with ``log``) in a copy of a predicted table."""
    import st2he
    from st2he._units import lognormalise

    tmpl = sdata[template_key]
    ikey = tmpl.uns["spatialdata_attrs"]["instance_key"]
    ids = tmpl.obs[ikey].astype(str).to_numpy()
    v = values.reindex(ids).fillna(0.0).to_numpy()
    X = v if log else lognormalise(v)
    pred = tmpl.copy()
    col = pd.Index(values.columns).get_indexer(list(pred.var_names))
    pred.X = np.asarray(X, dtype=np.float32)[:, col]
    sdata.tables["_oracle"] = pred
    df = st2he.tl.evaluate_expression(sdata, pred_key="_oracle", true_key=true_key, genes=genes, overwrite=True)
    del sdata.tables["_oracle"]
    return df


def expression_units(seeds, size, means: dict, base_means: dict, genes, *, niche: bool) -> pd.DataFrame:
    """Per-gene Pearson of the oracles on bench_expression's units (cells, spots, bins16)."""
    import st2he
    from st2he.models._expression import SHIPPED_EXPRESSION

    model = st2he.models.load_expression_model(SHIPPED_EXPRESSION)
    rows = []
    for seed in seeds:
        t0 = time.time()
        sdata = st2he.datasets.synthetic_tissue(seed, size_um=size, **({"niche": True} if niche else {}))
        st2he.pp.aggregate_transcripts(sdata, by="spots", spot_diameter=55.0, spot_spacing=100.0)
        st2he.pp.aggregate_transcripts(sdata, by="bins", bin_size=16.0)
        obs = sdata["table"].obs
        frac = _lookup(means, obs, "fraction")
        frac_niche = _niche_fractions(_lookup(base_means, obs, "fraction"), obs)
        ids = obs["cell_id"].astype(str).to_numpy()
        cells_log = pd.DataFrame(_lookup(means, obs, "log"), index=ids)
        n = np.asarray(sdata["table"].X.sum(1)).ravel()
        cells_niche = pd.DataFrame(_expected_log(frac_niche, n), index=ids)
        cells_class_e = pd.DataFrame(_expected_log(_lookup(base_means, obs, "fraction"), n), index=ids)
        frac_visible = _lookup(means, obs, "fraction", visible=True)
        cells_visible = pd.DataFrame(_lookup(means, obs, "log", visible=True), index=ids)
        cells_visible_e = pd.DataFrame(_expected_log(frac_visible, n), index=ids)
        for unit, shapes, true_key, kind, bsize in (
            ("cells", "cell_boundaries", "table", None, None),
            ("spots", "spots_55um", "spots_55um_table", "spots", 100.0),
            ("bins16", "bins_16um", "bins_16um_table", "bins", 16.0),
        ):
            tmpl = f"_tmpl_{unit}"
            st2he.tl.predict_expression(sdata, model=model, method="mean", units=shapes, key_added=tmpl, progress=False)
            if unit == "cells":
                oracles = {
                    "class": (cells_log, True),
                    "class+niche": (cells_niche, True),
                    "class (E-log)": (cells_class_e, True),
                    "visible class": (cells_visible, True),
                    "visible class (E-log)": (cells_visible_e, True),
                }
            else:
                oracles = {
                    "class": (unit_oracle(sdata, true_key, kind, bsize, frac), False),
                    "class+niche": (unit_oracle(sdata, true_key, kind, bsize, frac_niche), False),
                    "visible class": (unit_oracle(sdata, true_key, kind, bsize, frac_visible), False),
                }
            for name, (vals, log) in oracles.items():
                vals.columns = means["genes"]
                df = _score(sdata, tmpl, true_key, vals, genes, log=log)
                rows += [
                    {"seed": seed, "units": unit, "oracle": name, "gene": g, "pearson": r, "n_units": int(k)}
                    for g, r, k in zip(df.index, df["pearson"], df["n_units"], strict=True)
                ]
        print(f"section {seed} ({size:g} µm{', niche' if niche else ''}): scored in {time.time() - t0:.0f} s")
    return pd.DataFrame(rows)


def sr_units(seeds, size, means: dict, base_means: dict, sr_genes, *, niche: bool) -> pd.DataFrame:
    """Per-gene Pearson of the oracles on bench_super_resolution's 8 µm bins (all genes, top-50 HVG, SR genes)."""
    import st2he

    rows = []
    for seed in seeds:
        t0 = time.time()
        sdata = st2he.datasets.synthetic_tissue(seed, size_um=size, **({"niche": True} if niche else {}))
        st2he.pp.aggregate_transcripts(sdata, by="spots", key_added="spots", shapes_added="spots_55um")
        st2he.pp.aggregate_transcripts(sdata, by="bins", bin_size=8.0, key_added="truth")
        st2he.tl.super_resolve(sdata, table_key="spots", key_added="sr", method="bicubic", progress=False)
        # the scored table of bench_super_resolution: the super-resolved bins, annotating the truth's bins
        import anndata as ad
        from spatialdata.models import TableModel

        t = sdata.tables["sr"]
        region = sdata.tables["truth"].uns["spatialdata_attrs"]["region"]
        tmpl = ad.AnnData(
            X=np.zeros((t.n_obs, t.n_vars), np.float32),
            obs=t.obs[["instance_id", "array_row", "array_col"]].copy(),
            var=t.var.copy(),
        )
        tmpl.obs["region"] = pd.Categorical([region] * tmpl.n_obs)
        sdata.tables["_tmpl"] = TableModel.parse(tmpl, region=region, region_key="region", instance_key="instance_id")
        obs = sdata["table"].obs
        for name, frac in (
            ("class", _lookup(means, obs, "fraction")),
            ("class+niche", _niche_fractions(_lookup(base_means, obs, "fraction"), obs)),
            ("visible class", _lookup(means, obs, "fraction", visible=True)),
        ):
            vals = unit_oracle(sdata, "truth", "bins", 8.0, frac)
            vals.columns = means["genes"]
            for scope, genes in (("all", None), ("sr genes", list(sr_genes))):
                df = _score(sdata, "_tmpl", "truth", vals, genes, log=False)
                rows += [
                    {"seed": seed, "units": "sr_bins8", "scope": scope, "oracle": name, "gene": g, "pearson": r,
                     "hvg": bool(h)}
                    for g, r, h in zip(df.index, df["pearson"], df["highly_variable"], strict=True)
                ]
        look = ", niche" if niche else ""
        print(f"section {seed} ({size:g} µm{look}, 8 µm bins): scored in {time.time() - t0:.0f} s")
    return pd.DataFrame(rows)


def table(expr: pd.DataFrame, sr: pd.DataFrame | None, *, reported: dict | None) -> pd.DataFrame:
    from st2he.datasets._synthetic import NICHE_EFFECTS

    niche_genes = [g for effect in NICHE_EFFECTS for g in effect[2]]
    out = {}
    if len(expr):
        for (unit, oracle), sub in expr.groupby(["units", "oracle"], sort=False):
            per_gene = sub.groupby("gene")["pearson"].mean()
            out.setdefault(unit, {})[oracle] = per_gene.mean()
            out.setdefault(f"{unit} (niche genes)", {})[oracle] = per_gene.reindex(niche_genes).mean()
    if sr is not None and len(sr):
        for (scope, oracle), sub in sr.groupby(["scope", "oracle"], sort=False):
            if scope == "all":
                # bench_super_resolution: mean over (section, gene) pairs, all genes and the top-50 HVG of each section
                out.setdefault("sr_bins8 (all genes)", {})[oracle] = sub["pearson"].mean()
                out.setdefault("sr_bins8 (top-50 HVG)", {})[oracle] = sub[sub["hvg"]]["pearson"].mean()
            else:
                out.setdefault("sr_bins8 (sr genes)", {})[oracle] = sub["pearson"].mean()
    frame = pd.DataFrame(out).T
    if reported:
        for unit, figs in reported.items():
            for k, v in figs.items():
                if unit in frame.index:
                    frame.loc[unit, f"today: {k}"] = v
    return frame


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--niche", action="store_true", help="niche=True sections (and training section)")
    parser.add_argument("--skip-sr", action="store_true", help="leave out super-resolution's 8 µm bins")
    parser.add_argument("--skip-expression", action="store_true", help="leave out bench_expression's units")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="other held-out seeds (both benchmarks)")
    parser.add_argument("--out", type=Path, default=None, help="default bench_output/bench_ceiling[_niche].json")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(f"bench_output/bench_ceiling{'_niche' if args.niche else ''}.json")

    import st2he
    from st2he.models._expression import SHIPPED_EXPRESSION
    from st2he.models._super_resolution import SHIPPED_SUPER_RESOLUTION

    warnings.simplefilter("ignore")
    genes = list(st2he.models.load_expression_model(SHIPPED_EXPRESSION).genes)
    sr_genes = list(st2he.models.load_super_resolution_model(SHIPPED_SUPER_RESOLUTION).genes)
    t0 = time.time()
    base = learn(st2he.datasets.synthetic_tissue(TRAIN_SEED, size_um=SIZE_UM))
    means = learn(st2he.datasets.synthetic_tissue(TRAIN_SEED, size_um=SIZE_UM, niche=True)) if args.niche else base
    print(f"class means learnt on seed {TRAIN_SEED} ({SIZE_UM:g} µm) in {time.time() - t0:.0f} s")
    expr = pd.DataFrame()
    if not args.skip_expression:
        expr = expression_units(args.seeds or TEST_SEEDS, SIZE_UM, means, base, genes, niche=args.niche)
    sr = None if args.skip_sr else sr_units(args.seeds or SR_SEEDS, SR_SIZE_UM, means, base, sr_genes, niche=args.niche)
    frame = table(expr, sr, reported=None if args.niche else REPORTED)
    print(f"\nOracle ceilings (mean per-gene Pearson; {'niche' if args.niche else 'clean'} sections):")
    print(frame.to_string(float_format=lambda v: f"{v:.3f}"))
    if not args.niche:
        print("today: docs/models.md (bench_expression.py, shipped model; bench_super_resolution.py --diffusion)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"niche": args.niche, "ceilings": frame.to_dict(orient="index")}, indent=2))
    per_gene = pd.concat([expr, sr]) if sr is not None else expr
    per_gene.to_csv(args.out.with_suffix(".csv"), index=False)
    print(f"figures: {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
