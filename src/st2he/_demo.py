"""End-to-end demo: molecules in, virtual H&E, metrics and a figure out.

Run it with ``make demo`` (or ``st2he demo``, or ``st2he-demo``). Without ``--data`` it simulates a sample with a
paired ground-truth H&E; with ``--data`` it reads a Xenium, CosMx or MERSCOPE output folder instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("st2he")


def detect_platform(path: Path) -> str:
    """Guess the platform of an instrument output folder from the files it holds."""
    if not path.is_dir():
        msg = f"--data {path} is not a folder. Give the output folder of a Xenium, CosMx or MERSCOPE run."
        raise FileNotFoundError(msg)
    names = {p.name for p in path.iterdir()}
    if {"experiment.xenium", "transcripts.parquet", "transcripts.csv.gz", "transcripts.zarr.zip"} & names:
        return "xenium"
    if "detected_transcripts.csv" in names or "detected_transcripts.parquet" in names:
        return "merscope"
    if any(n.endswith(("_tx_file.csv", "_tx_file.csv.gz")) for n in names):
        return "cosmx"
    msg = (
        f"Cannot tell the platform of {path}: expected a Xenium folder (transcripts.parquet), a MERSCOPE folder "
        f"(detected_transcripts.csv) or a CosMx folder (*_tx_file.csv). It holds: {sorted(names)[:20]}"
    )
    raise ValueError(msg)


def model_palette(sdata, model) -> dict | str:
    """The generator's training palette when it names every gene drawn here, else ``"coexpression"``."""
    palette = (model.metadata.get("palette") if model is not None else None) or {}
    points = sdata.points["transcripts"]
    gene_key = points.attrs["spatialdata_attrs"]["feature_key"]
    genes = points[gene_key].cat.as_known().cat.categories if hasattr(points[gene_key], "cat") else []
    controls = set(points.loc[points["is_control"], gene_key].unique().compute()) if "is_control" in points else set()
    panel = {str(g) for g in genes} - {str(g) for g in controls}
    if palette and panel and panel <= set(palette):
        return {gene: palette[gene] for gene in sorted(panel)}
    if palette:
        logger.info("the generator's palette does not cover this panel: drawing with a co-expression palette")
    return "coexpression"


def run(data: Path | None, out: Path, *, method: str = "diffusion", seed: int = 0, pixel_size: float = 0.5) -> dict:
    """Run the whole pipeline and write the store, the figure and the metrics into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import st2he

    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    files = None
    t0 = time.perf_counter()
    if data is None:
        sdata = st2he.datasets.synthetic_tissue(seed=seed)
        source = f"simulated tissue (st2he.datasets.synthetic_tissue, seed {seed})"
    else:
        platform = detect_platform(data)
        reader = {"xenium": st2he.io.read_xenium, "cosmx": st2he.io.read_cosmx, "merscope": st2he.io.read_merscope}
        sdata = reader[platform](data)
        source = f"{platform} folder {data}"
        files = sdata.attrs.get("st2he", {}).get("files")
    timings["read_or_simulate_s"] = time.perf_counter() - t0
    logger.info("sample: %s", source)

    # colours mean genes: draw with the palette the generator was trained with when it covers this panel
    model = st2he.models.load_model() if method == "diffusion" else None
    palette = model_palette(sdata, model)
    t0 = time.perf_counter()
    st2he.pp.rasterize_transcripts(sdata, pixel_size=pixel_size, palette=palette, key_added="st2he_input")
    timings["rasterize_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    st2he.tl.virtual_he(sdata, method=method, model=model, input_key="st2he_input", key_added="virtual_he")
    timings["virtual_he_s"] = time.perf_counter() - t0

    metrics: dict = {}
    has_truth = "he_image" in sdata.images
    if has_truth:
        table = st2he.tl.evaluate_he(sdata, pred_key="virtual_he", true_key="he_image", key_added="he_metrics")
        metrics = dict(sdata.tables["he_metrics"].uns["overall"]) if "he_metrics" in sdata.tables else {}
        table.to_csv(out / "metrics_per_tile.csv", index=True)
        if method != "stain":
            st2he.tl.virtual_he(sdata, method="stain", input_key="st2he_input", key_added="virtual_he_stain")
            st2he.tl.evaluate_he(sdata, pred_key="virtual_he_stain", true_key="he_image", key_added="he_metrics_stain")
            metrics = {"virtual_he": metrics, "stain_baseline": dict(sdata.tables["he_metrics_stain"].uns["overall"])}

    # the store and the metrics first: a plotting error loses nothing
    store = out / "st2he.zarr"
    with st2he.io._common.quiet_zarr_writes():  # no zarr warnings about the libraries' own defaults
        sdata.write(store, overwrite=True)
    figure_path = out / "st2he_compare.png"
    summary = {
        "source": source,
        "method": method,
        "store": str(store),
        "figure": str(figure_path),
        "metrics": metrics,
        "timings": timings,
    }
    if files is not None:
        summary["files"] = files
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))

    axes = st2he.pl.compare(sdata, input_key="st2he_input", pred_key="virtual_he", true_key="he_image", save=figure_path)
    plt.close(axes.flat[0].figure)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the demo (``st2he-demo`` and ``st2he demo``)."""
    parser.add_argument("--data", type=Path, default=None, help="Xenium, CosMx or MERSCOPE output folder")
    parser.add_argument("--out", type=Path, default=Path("st2he_output"), help="output folder")
    parser.add_argument("--method", default="diffusion", choices=["diffusion", "stain"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pixel-size", type=float, default=0.5, help="µm per pixel of the input picture")


def execute(args: argparse.Namespace, *, prog: str = "st2he-demo") -> int:
    """Run the demo with parsed options; returns the exit status (2 with a message for bad input)."""
    try:
        summary = run(args.data, args.out, method=args.method, seed=args.seed, pixel_size=args.pixel_size)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(f"SpatialData store: {summary['store']}")
    print(f"Figure:            {summary['figure']}")
    print(f"Metrics:           {args.out / 'metrics.json'}")
    if summary.get("files") is not None:  # what the reader took from the --data folder, and what it left
        from st2he.io._common import describe_files

        print(describe_files(summary["files"]))
    if summary["metrics"]:
        print(json.dumps(summary["metrics"], indent=2, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of ``st2he-demo`` (the same as ``st2he demo``)."""
    parser = argparse.ArgumentParser(prog="st2he-demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return execute(args)


if __name__ == "__main__":
    raise SystemExit(main())
