"""Reproduce the expression model shipped with st2he (src/st2he/models/weights/expression).

Trains ``st2he.tl.train_expression`` (size ``tiny`` at 0.5 µm per pixel, so a cell covers several 4 µm outputs;
every gene of the simulated panel; the tumour head on the simulated tumour regions) on simulated sections of seeds
0-4, each seen as cells, as pseudo-Visium spots and as 16 µm bins (so the model learns to pool into any unit); one
(section, unit) pair drawn at random is held out for validation. The model is saved with its baselines (mean,
kNN, ridge on the same encoder, fitted on the training units).
Held-out figures: ``benchmarks/bench_expression.py`` (seeds never trained on).

    python benchmarks/train_expression_small.py --steps 1800 --out src/st2he/models/weights/expression

About 15 minutes on 2 idle CPU cores. The defaults reproduce the shipped model. Options for other simulations:
``--niche`` trains on ``synthetic_tissue(..., niche=True)`` (niche-dependent expression), ``--appearance``
``clean`` (default), ``realistic`` or ``mixed`` (every training seed in both looks: the same molecules under two
H&E), ``--init PATH`` continues from a saved model (its genes and sizes) instead of a new one:

    python benchmarks/train_expression_small.py --niche --appearance mixed --init src/st2he/models/weights/expression \
        --steps 700 --out bench_output/expression_niche

``--pooling auto`` pools the spot sections by the mean of their pixels' counts in the loss (as
``predict_expression`` pools spots by default), the cells and bins by the mean of logs:

    python benchmarks/train_expression_small.py --init src/st2he/models/weights/expression --pooling auto \
        --steps 500 --work bench_output/expr_auto --out bench_output/expr_auto/model_out
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

TRAIN_SEEDS = (0, 1, 2, 3)
VAL_SEED = 4
SIZE_UM = 512.0
TUMOUR = ("gland_tumour", "solid_tumour")


def _with_units(sdata, unit: str):
    """The section with its table of ``unit`` (cells, spots, bins16) as ``table`` (sharing every other element)."""
    import st2he
    from spatialdata import SpatialData

    if unit == "cells":
        return sdata
    if unit == "spots":
        st2he.pp.aggregate_transcripts(sdata, by="spots", labels_key="regions", labels_column="tissue", overwrite=True)
        shapes, table = "spots_55um", "spots_55um_table"
    elif unit == "bins16":
        st2he.pp.aggregate_transcripts(
            sdata, by="bins", bin_size=16.0, labels_key="regions", labels_column="tissue", overwrite=True
        )
        shapes, table = "bins_16um", "bins_16um_table"
    else:
        msg = f"unknown units {unit!r}"
        raise ValueError(msg)
    return SpatialData(
        images={"he_image": sdata["he_image"]}, shapes={shapes: sdata[shapes]}, tables={"table": sdata[table]}
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--um-per-px", type=float, default=0.5)
    parser.add_argument("--chip-um", type=float, default=128.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None)
    parser.add_argument("--work", type=Path, default=Path("bench_output/expression_training"))
    parser.add_argument("--out", type=Path, default=None, help="copy the trained model here (the shipped folder)")
    parser.add_argument("--niche", action="store_true", help="simulate with niche-dependent expression")
    parser.add_argument("--appearance", default="clean", choices=["clean", "realistic", "mixed"])
    parser.add_argument("--init", type=Path, default=None, help="continue from this saved expression model")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --work from its latest checkpoint (same options)"
    )
    parser.add_argument(
        "--units", nargs="+", default=["cells", "spots", "bins16"], help="units to train on (each section once per kind)"
    )
    parser.add_argument(
        "--pooling", default="log", choices=["log", "counts", "auto"],
        help="how the loss pools the model's pixels into units (train_expression's pooling=; the shipped model: log)",
    )
    parser.add_argument(
        "--lr-schedule", default="constant", choices=["constant", "cosine"],
        help="train_expression's lr_schedule= (the shipped model: constant)",
    )
    parser.add_argument(
        "--train-seeds", type=int, nargs="+", default=list(TRAIN_SEEDS),
        help=f"simulated training sections (default {' '.join(map(str, TRAIN_SEEDS))}; seed {VAL_SEED} is added)",
    )
    args = parser.parse_args(argv)

    import torch

    import st2he
    from st2he.datasets._synthetic import GENES

    warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
    torch.manual_seed(0)
    t0 = time.time()
    looks = ("clean", "realistic") if args.appearance == "mixed" else (args.appearance,)
    # (the defaults call synthetic_tissue exactly as before)
    niche = {"niche": True} if args.niche else {}
    options = [({} if look == "clean" else {"appearance": look}) | niche for look in looks]
    simulated = [
        st2he.datasets.synthetic_tissue(s, size_um=SIZE_UM, **kwargs)
        for kwargs in options
        for s in (*args.train_seeds, VAL_SEED)
    ]
    print(f"simulated {len(simulated)} sections of {SIZE_UM:g} µm ({', '.join(looks)}) in {time.time() - t0:.0f} s")
    # the model pools its dense prediction into any unit: it learns that from cells, pseudo-spots and 16 µm bins of
    # the same sections (each kind of unit is one "section" for training; the validation section is seed 4)
    sections = []
    for unit in args.units:
        for sdata in simulated:
            sections.append(_with_units(sdata, unit))
    t0 = time.time()
    init = st2he.models.load_expression_model(args.init) if args.init is not None else args.size
    model = st2he.tl.train_expression(
        sections,
        model=init,
        genes=list(GENES),
        tumour_key="tissue",
        tumour_values=TUMOUR,
        um_per_px=args.um_per_px,
        chip_um=args.chip_um,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-3,
        lr_schedule=args.lr_schedule,
        pooling=args.pooling,
        val_fraction=1 / len(sections),
        val_every=max(args.steps // 8, 1),
        ckpt_every=max(args.steps // 4, 1),
        seed=0,
        device=args.device,
        output_dir=args.work,
        overwrite=not args.resume,
        resume="latest" if args.resume else False,
    )
    seconds = time.time() - t0
    history = model.metadata.get("history") or []
    print(f"trained {args.steps} steps in {seconds:.0f} s ({seconds / max(args.steps, 1):.2f} s a step)")
    if history:
        print("last validation:", json.dumps(history[-1]))
    if args.out is not None:
        import shutil

        src = args.work / "model"
        args.out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            shutil.copy2(f, args.out / f.name)
        print(f"copied {src} -> {args.out}")


if __name__ == "__main__":
    main()
