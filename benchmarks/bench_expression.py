"""Expression read back from H&E: the learned model against its baselines, on simulated sections never trained on.

For each held-out section (seeds 101, 102; 768 µm squares) and each kind of unit (cells, pseudo-Visium spots of
55 µm on a 100 µm lattice, 16 µm bins), every method of ``st2he.tl.predict_expression`` (``mean``, ``knn``,
``ridge`` = HEST's protocol, ``multiscale`` = the learned model; all on the same encoder) is scored with
``st2he.tl.evaluate_expression``: signed per-gene Pearson over the units in tissue, pooled over the sections (the
mean of a gene's Pearsons). Printed: the mean and median per-gene Pearson of each method, the difference
multiscale - ridge, how many genes the model wins and a paired one-sided Wilcoxon test over genes, the tumour
AUROC, and HiST's convention (Pearson over the whole grid, background zero-filled) beside ours for the bins.

Then the cost: prediction time (H&E chips per second) and peak memory of a child process predicting 16 µm bins
over a 512 µm and a 1536 µm section (9 x the area) with the same chip: peak memory must depend on the chip, not
the slide.

    python benchmarks/bench_expression.py                 # the shipped model
    python benchmarks/bench_expression.py --model PATH    # another one
    python benchmarks/bench_expression.py --appearance realistic --skip-memory   # the realistic-looking H&E
    python benchmarks/bench_expression.py --niche --skip-memory   # niche-dependent expression (synthetic_tissue)
    python benchmarks/bench_expression.py --pooling counts --units cells bins16 bins32 spots --skip-memory

With ``--niche`` the sections are simulated with ``synthetic_tissue(..., niche=True)`` (five programs that depend on
the distance to the tumour border or to vessels) and each kind of unit also gets a line over the 8 genes those
programs modulate (``niche genes``): where the context around a cell, not only the cell itself, sets its expression.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

TEST_SEEDS = (101, 102)
SIZE_UM = 768.0
TUMOUR = ("gland_tumour", "solid_tumour")
METHODS = ("mean", "knn", "ridge", "multiscale")


UNITS = ("cells", "spots", "bins16", "bins32")


def _units(sdata, kinds=UNITS[:3]):
    """The kinds of unit of a simulated section asked for, each with its measured table and tumour labels."""
    import st2he

    out = {}
    for kind in kinds:
        if kind == "cells":
            out[kind] = ("cell_boundaries", "table")
        elif kind == "spots":
            st2he.pp.aggregate_transcripts(
                sdata, by="spots", spot_diameter=55.0, spot_spacing=100.0, labels_key="regions", labels_column="tissue"
            )
            out[kind] = ("spots_55um", "spots_55um_table")
        else:
            size = int(kind[4:])
            st2he.pp.aggregate_transcripts(
                sdata, by="bins", bin_size=float(size), labels_key="regions", labels_column="tissue"
            )
            out[kind] = (f"bins_{size}um", f"bins_{size}um_table")
    return out


def score(
    model, seeds=TEST_SEEDS, size_um=SIZE_UM, appearance="clean", niche=False, units=UNITS[:3], pooling="auto"
) -> pd.DataFrame:
    import st2he

    rows = []
    for seed in seeds:
        t0 = time.time()
        extra = {"niche": True} if niche else {}
        sdata = st2he.datasets.synthetic_tissue(seed, size_um=size_um, appearance=appearance, **extra)
        kinds = _units(sdata, units)
        print(f"section {seed}: simulated in {time.time() - t0:.0f} s")
        for unit, (shapes, true_key) in kinds.items():
            for method in METHODS:
                key = f"pred_{unit}_{method}"
                t0 = time.time()
                st2he.tl.predict_expression(
                    sdata, model=model, method=method, units=shapes, pooling=pooling, key_added=key, progress=False
                )
                took = time.time() - t0
                df = st2he.tl.evaluate_expression(
                    sdata, pred_key=key, true_key=true_key, tumour_key="tissue", tumour_values=TUMOUR
                )
                summary = df.attrs["summary"]
                for gene, r in df.iterrows():
                    rows.append(
                        {
                            "seed": seed,
                            "units": unit,
                            "method": method,
                            "gene": gene,
                            "pearson": r["pearson"],
                            "pearson_hist": r.get("pearson_hist_convention", np.nan),
                            "auroc": summary.get("tumour_auroc", np.nan),
                            "n_units": r["n_units"],
                            "seconds": took,
                        }
                    )
    return pd.DataFrame(rows)


def report(frame: pd.DataFrame, niche: bool = False) -> dict:
    from scipy.stats import wilcoxon

    from st2he.datasets._synthetic import NICHE_EFFECTS

    niche_genes = [g for effect in NICHE_EFFECTS for g in effect[2]]

    out = {}
    for unit, sub in frame.groupby("units", sort=False):
        per_gene = sub.groupby(["method", "gene"])["pearson"].mean().unstack(0)
        hist = sub.groupby(["method", "gene"])["pearson_hist"].mean().unstack(0)
        auroc = sub.groupby("method")["auroc"].mean()
        print(f"\n== {unit} ({int(sub['n_units'].max())} units in tissue at most per section) ==")
        table = pd.DataFrame(
            {
                "mean r": per_gene.mean(),
                "median r": per_gene.median(),
                "HiST convention (whole grid)": hist.mean(),
                "tumour AUROC": auroc,
            }
        ).loc[list(METHODS)]
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))
        both = per_gene[["multiscale", "ridge"]].dropna()
        diff = both["multiscale"] - both["ridge"]
        wins = int((diff > 0).sum())
        p = float(wilcoxon(both["multiscale"], both["ridge"], alternative="greater").pvalue) if len(both) > 5 else np.nan
        knn = per_gene[["multiscale", "knn"]].dropna()
        p_knn = float(wilcoxon(knn["multiscale"], knn["knn"], alternative="greater").pvalue) if len(knn) > 5 else np.nan
        print(
            f"multiscale - ridge: {diff.mean():+.3f} mean per-gene Pearson; model wins {wins} of {len(both)} genes; "
            f"Wilcoxon p = {p:.2g} (vs kNN: {(knn['multiscale'] - knn['knn']).mean():+.3f}, p = {p_knn:.2g})"
        )
        if niche:
            ng = per_gene.reindex(niche_genes)
            d = (ng["multiscale"] - ng["ridge"]).dropna()
            print(
                f"niche genes ({len(ng)}): mean r multiscale {ng['multiscale'].mean():.3f}, "
                f"ridge {ng['ridge'].mean():.3f}, kNN {ng['knn'].mean():.3f}; "
                f"multiscale - ridge {d.mean():+.3f}, wins {int((d > 0).sum())} of {len(d)}"
            )
            print("  " + ", ".join(f"{g} {r['multiscale']:.2f}/{r['ridge']:.2f}" for g, r in ng.iterrows()))
        out[unit] = {
            "niche_genes_mean_r": (
                per_gene.reindex(niche_genes)[list(METHODS)].mean().to_dict() if niche else None
            ),
            "mean_r": table["mean r"].to_dict(),
            "median_r": table["median r"].to_dict(),
            "hist_convention": table["HiST convention (whole grid)"].to_dict(),
            "tumour_auroc": table["tumour AUROC"].to_dict(),
            "multiscale_minus_ridge": float(diff.mean()),
            "wins": wins,
            "n_genes": len(both),
            "wilcoxon_p_ridge": p,
            "wilcoxon_p_knn": p_knn,
        }
    return out


_CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[3])
from _memory import peak_rss_mb
import spatialdata, st2he
sdata = spatialdata.read_zarr(sys.argv[1])
t0 = time.time()
table = st2he.tl.predict_expression(sdata, model=sys.argv[2], units="bins", bin_size=16.0, chip_um=512.0, progress=False)
took = time.time() - t0
print(json.dumps({"seconds": took, "units": table.n_obs, "peak_rss_mb": peak_rss_mb()}))
"""


def memory(model_path: str, sizes=(512.0, 1536.0)) -> list[dict]:
    """Peak memory and speed of whole-section prediction in a fresh process per section size (same chip)."""
    import st2he
    from spatialdata import SpatialData

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            sdata = st2he.datasets.synthetic_tissue(7, size_um=size, dapi_pixel_size=1.0)
            store = Path(tmp) / f"he_{int(size)}.zarr"
            with st2he.io._common.quiet_zarr_writes():
                SpatialData(images={"he_image": sdata["he_image"]}).write(store)
            del sdata
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(store), model_path, str(Path(__file__).parent)],
                capture_output=True,
                text=True,
                check=True,
            )
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            chips = (size / 512.0) ** 2  # chips of 512 µm the section's area holds
            rec.update(size_um=size, chips_per_second=chips / rec["seconds"])
            results.append(rec)
            print(
                f"{size:g} µm section: {rec['units']} bins in {rec['seconds']:.1f} s "
                f"({rec['chips_per_second']:.2f} chips of 512 µm a second), peak RSS {rec['peak_rss_mb']:.0f} MB"
            )
    if len(results) == 2:
        a, b = results
        print(
            f"area x{(b['size_um'] / a['size_um']) ** 2:.0f}: peak memory x{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}, "
            f"time x{b['seconds'] / a['seconds']:.1f}"
        )
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="expression model folder (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=Path("bench_output/bench_expression.json"))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--appearance", choices=["clean", "realistic"], default="clean",
        help="H&E of the held-out sections: synthetic_tissue's clean drawing or its realistic look",
    )
    parser.add_argument("--niche", action="store_true", help="sections with niche-dependent expression")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(TEST_SEEDS), help="held-out seeds")
    parser.add_argument("--size", type=float, default=SIZE_UM, help="side of the held-out sections (µm)")
    parser.add_argument(
        "--units", nargs="+", choices=UNITS, default=list(UNITS[:3]), help="kinds of unit scored (bins32: 32 µm bins)"
    )
    parser.add_argument(
        "--pooling", choices=["auto", "log", "counts"], default="auto",
        help="how the model's dense prediction is pooled into units (predict_expression's pooling=)",
    )
    args = parser.parse_args(argv)

    import st2he
    from st2he.models._expression import SHIPPED_EXPRESSION

    warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
    model_path = str(args.model or SHIPPED_EXPRESSION)
    model = st2he.models.load_expression_model(model_path)
    print(f"model {model_path}: {len(model.genes)} genes, encoder {model.config.get('encoder') if hasattr(model, 'config') else ''}")
    print(
        f"held-out sections: seeds {args.seeds}, {args.size:g} µm, appearance={args.appearance!r}, niche={args.niche}, "
        f"pooling={args.pooling!r}"
    )
    frame = score(
        model, seeds=args.seeds, size_um=args.size, appearance=args.appearance, niche=args.niche, units=args.units,
        pooling=args.pooling,
    )
    figures = {
        "appearance": args.appearance, "niche": args.niche, "pooling": args.pooling,
        "accuracy": report(frame, niche=args.niche),
    }
    if not args.skip_memory:
        print()
        figures["memory"] = memory(model_path)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, default=float))
    frame.to_csv(args.out.with_suffix(".csv"), index=False)
    print(f"\nfigures: {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
