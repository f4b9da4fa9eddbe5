"""Benchmark: st2he.pp.rasterize_transcripts on whole-slide molecule counts, against the reference way.

Measures molecules per second (CPU time of one core: dask's synchronous scheduler, numba and BLAS on one
thread) and peak memory (the child process's maximum resident set size) of

* st2he: ``rasterize_transcripts`` on ``--sizes`` simulated molecules (default 10 and 100 million), every
  pixel of the full-resolution picture computed chunk by chunk (and discarded; the pyramid and zarr writing
  are not timed). Once with a black background (the molecules alone) and once over a lazily generated DAPI
  image of 0.425 µm pixels stored as a pyramid of 4 levels, as instruments write them (the full picture);
* the ST2HE reference: 512 px tiles drawn as its code (``src/xenium_input_generation.py``) does, each tile's
  molecules selected from the slide's table and drawn as a seaborn scatter plot (hue = gene) over the stain with
  matplotlib, saved as PNG (see :func:`case_matplotlib`); a few tiles are timed and the rate is extrapolated per
  molecule, per slide size;
* ``spatialdata.rasterize`` with the gene as ``value_key`` (one dense channel per gene) on a subset that fits
  in memory; its rate and memory are extrapolated per molecule.

Every case runs in its own subprocess so that peak memory is its own. Simulated slide: 1.5 molecules per µm²
(Xenium-like), 300 genes plus 1% control probes, quality values, molecules stored field of view by field of
view in partitions of 2 million rows, as if held in memory: producing a partition costs two float32 vector
additions (its coordinates), which the end-to-end rate includes. Reading files is not timed: what it costs depends
on the format and the storage, not on st2he.

Each st2he case runs ``--repeat`` times (default 3) and the median run is reported with the range. Run
``python benchmarks/bench_rasterize.py`` (about 5 minutes on 2 cores), ``--pixel-size 1.0`` to compare at the
reference's own pixel size, or ``--sizes 1e7 --repeat 1`` for a quick run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

DENSITY = 1.5  # molecules per µm²
N_GENES = 300
PARTITION = 2_000_000
PIXEL_SIZE = float(os.environ.get("ST2HE_BENCH_PIXEL_SIZE", 0.5))  # µm, for st2he and the reference alike
STAIN_PIXEL_SIZE = 0.425


# ----------------------------------------------------------------------------------------------- simulation


def _genes():
    import numpy as np

    names = [f"GENE{i:03d}" for i in range(N_GENES)] + [f"BLANK_{i:04d}" for i in range(3)]
    weights = np.r_[np.random.default_rng(1).lognormal(0, 1, N_GENES), np.full(3, 0.0)]
    weights[:N_GENES] *= 0.99 / weights[:N_GENES].sum()
    weights[N_GENES:] = 0.01 / 3
    return names, weights


def simulated_slide(n: int, *, stain: bool, seed: int = 0):
    """A SpatialData object with ``n`` molecules in FOV-ordered partitions (and optionally a lazy DAPI image)."""
    import dask.array as da
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd
    from spatialdata import SpatialData
    from spatialdata.models import PointsModel

    from st2he._elements import parse_image
    from st2he._grid import Grid

    names, weights = _genes()
    rng = np.random.default_rng(seed)
    # one partition's worth of molecules on a square "field of view", placed tile by tile over the slide
    side = float(np.sqrt(PARTITION / DENSITY))
    tx = rng.uniform(0, side, PARTITION)
    ty = rng.uniform(0, side, PARTITION)
    order = np.lexsort((np.floor(tx / 280), np.floor(ty / 280)))  # instrument order within the tile
    tx, ty = tx[order].astype(np.float32), ty[order].astype(np.float32)
    codes = rng.choice(len(names), PARTITION, p=weights).astype(np.int16)
    qv = np.where(rng.random(PARTITION) < 0.05, 10.0, 40.0).astype(np.float32)
    n_parts = int(np.ceil(n / PARTITION))
    cols = int(np.ceil(np.sqrt(n_parts)))
    rows = int(np.ceil(n_parts / cols))
    gene_dtype = pd.CategoricalDtype(names)

    def part(i: int) -> pd.DataFrame:
        # like a table already in memory: producing a partition costs its two coordinate columns (the field of
        # view's offset added in float32); the others are shared, and the frame is not consolidated (no copies)
        m = min(PARTITION, n - i * PARTITION)
        r, c = divmod(i, cols)
        return pd.DataFrame(
            {
                "x": tx[:m] + np.float32(c * side),
                "y": ty[:m] + np.float32(r * side),
                "gene": pd.Categorical.from_codes(codes[:m], dtype=gene_dtype, validate=False),
                "qv": qv[:m],
            },
            copy=False,
        )

    meta = part(0).iloc[:0]
    frame = dd.from_map(part, list(range(n_parts)), meta=meta, enforce_metadata=False)
    # PointsModel.parse adds a column selection (a copy of every column) and assignments to the graph; a points
    # element read back from a zarr store has none, so keep the frame as it is and take only parse's metadata
    parsed = PointsModel.parse(frame, feature_key="gene", sort=True)
    frame.attrs.update(parsed.attrs)
    points = frame
    sdata = SpatialData(points={"transcripts": points})
    if stain:
        grid = Grid(
            0.0, 0.0, STAIN_PIXEL_SIZE, int(rows * side / STAIN_PIXEL_SIZE), int(cols * side / STAIN_PIXEL_SIZE)
        )

        # a nucleus-like pattern, tiled: producing a chunk costs a copy, like reading an uncompressed one; stored as
        # a pyramid, as instruments write their morphology images (OME-TIFF levels): each level is read on its own
        def level(factor: int):
            yy, xx = np.mgrid[0:2048, 0:2048].astype(np.float32) * np.float32(0.35 * factor)
            pattern = ((np.sin(yy) * np.sin(xx) + 1.0) * 20000.0).astype(np.uint16)

            def read(block, block_info=None):
                (r0, r1), (c0, c1) = block_info[None]["array-location"][1:]
                return pattern[None, : r1 - r0, : c1 - c0].copy()

            return read

        template = da.zeros((1, grid.height, grid.width), dtype=np.uint16, chunks=(1, 2048, 2048))
        element = parse_image(
            template.map_blocks(level(1), dtype=np.uint16),
            grid,
            c_coords=["DAPI"],
            scale_factors=[2, 2, 2],
            chunks=2048,
        )
        for i, key in enumerate(sorted(element.children)[1:], start=1):
            arr = element[key]["image"]
            stored = da.zeros(arr.shape, dtype=np.uint16, chunks=(1, 2048, 2048)).map_blocks(
                level(2**i), dtype=np.uint16
            )
            element[key]["image"] = arr.copy(data=stored)
        sdata.images["morphology_focus"] = element
    return sdata


# ----------------------------------------------------------------------------------------------- cases


def _peak_rss_mb() -> float:
    from _memory import peak_rss_mb

    return peak_rss_mb()


def case_st2he(n: int, stain: bool, palette: str, chunk: int) -> dict:
    import dask
    import dask.array as da

    import st2he
    from st2he._grid import _scale0

    dask.config.set(scheduler="synchronous")

    class Discard:
        def __setitem__(self, key, value):
            pass

    # warm-up: load the compiled kernels (numba's cache) so that they are not timed
    t = time.perf_counter()
    small = simulated_slide(10_000, stain=stain)
    st2he.pp.rasterize_transcripts(small, palette=palette, pixel_size=PIXEL_SIZE, chunk=chunk)
    da.store(_scale0(small.images["st2he_input"]).data, Discard(), lock=False)
    warm = time.perf_counter() - t
    del small
    sdata = simulated_slide(n, stain=stain)
    rss_ready = _peak_rss_mb()
    # the cost of producing the simulated inputs, which a real run pays as reading files: st2he reads every
    # partition once and computes each chunk of the stain image once
    points = sdata.points["transcripts"]
    cpu_src = time.process_time()
    for part in points.to_delayed():
        dask.compute(part)
    if stain:
        # the pyramid level st2he reads: the coarsest at least as fine as the output
        level = max(0, min(3, int(math.floor(math.log2(PIXEL_SIZE / STAIN_PIXEL_SIZE) + 1e-9))))
        image = sdata.images["morphology_focus"][f"scale{level}"]["image"]
        da.store(image.data, Discard(), lock=False)
    source = time.process_time() - cpu_src
    cpu0, wall0 = time.process_time(), time.perf_counter()
    st2he.pp.rasterize_transcripts(sdata, palette=palette, pixel_size=PIXEL_SIZE, chunk=chunk)
    cpu1 = time.process_time()
    data = _scale0(sdata.images["st2he_input"]).data
    da.store(data, Discard(), lock=False)
    cpu2, wall2 = time.process_time(), time.perf_counter()
    report = st2he._elements.get_params(sdata, "st2he_input")["molecules"]
    return {
        "case": "st2he" + (" picture (DAPI)" if stain else " molecules"),
        "molecules": n,
        "kept": report["kept"],
        "pixels": int(data.shape[1] * data.shape[2]),
        "cpu_s": cpu2 - cpu0,
        "cpu_pass_s": cpu1 - cpu0,
        "cpu_draw_s": cpu2 - cpu1,
        "wall_s": wall2 - wall0,
        "rate": n / (cpu2 - cpu0),
        "source_cpu_s": source,
        "rate_rasterizer": n / max(cpu2 - cpu0 - source, 1e-9),
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_mb": rss_ready,
        "warmup_s": warm,
        "extrapolated": False,
    }


def case_matplotlib(tiles: int, table: int) -> dict:
    """The reference way: each 512 px tile drawn as the ST2HE code draws its Xenium input tiles.

    As its ``src/xenium_input_generation.py`` does, per tile: the tile's molecules are selected from the whole
    slide's table (held in memory) with a boolean mask of four comparisons and ``.loc[mask].copy()``; a palette is
    made for the genes of the tile (evenly spaced HSV hues, genes in order of appearance); a new 8 x 8 inch figure at
    64 dpi shows the grey stain with ``imshow`` and ``sns.scatterplot`` draws the molecules (``s=0.1``,
    ``alpha=1``, hue = gene, no legend); axes off, limits set, ``tight_layout(pad=0)``, saved as PNG with
    ``bbox_inches="tight", pad_inches=0``.

    The tile is drawn at st2he's pixel size, so that both make the same picture (the reference's own is 1 µm:
    ``--pixel-size 1.0``; per molecule it is about 10% faster there, its fixed cost per figure spread over 4x more
    molecules). Kept in the reference's favour: ``imshow`` shows the stain tile rather than the whole slide's image,
    the PNG goes to memory rather than to disk, and reading it back is not timed. The selection grows with the slide (every tile scans the whole table): it is timed on a
    table of ``table`` molecules and scaled linearly to each slide size, so the reference's rate is given per slide
    size. Its drawing alone is reported too.
    """
    import colorsys
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    import seaborn as sns
    from PIL import Image

    names, weights = _genes()
    rng = np.random.default_rng(0)
    size_um = 512 * PIXEL_SIZE
    per_tile = int(DENSITY * size_um * size_um)
    # the slide's table as a parquet reader gives it: float64 coordinates, gene names as strings
    side = float(np.sqrt(table / DENSITY))
    slide = pd.DataFrame(
        {
            "x_location": rng.uniform(0, side, table),
            "y_location": rng.uniform(0, side, table),
            "feature_name": np.asarray(names, dtype=object)[rng.choice(len(names), table, p=weights)],
        }
    )
    # the simulated DAPI pattern (see simulated_slide) sampled at the tile's pixels, with a little noise, in grey
    yy, xx = np.mgrid[0:512, 0:512].astype(np.float32) * np.float32(0.35 * PIXEL_SIZE / STAIN_PIXEL_SIZE)
    stain = (np.sin(yy) * np.sin(xx) + 1.0) * 120.0 + rng.normal(0, 3, (512, 512))
    stain = np.clip(stain, 0, 255).astype(np.uint8)
    select_times, draw_times, counts = [], [], []
    for _ in range(tiles):
        x1, y1 = rng.uniform(0, side - size_um, 2)
        x2, y2 = x1 + size_um, y1 + size_um
        t0 = time.process_time()
        mask = (
            (slide["x_location"] >= x1)
            & (slide["x_location"] <= x2)
            & (slide["y_location"] >= y1)
            & (slide["y_location"] <= y2)
        )
        tile = slide.loc[mask].copy()
        t1 = time.process_time()
        genes = list(dict.fromkeys(tile["feature_name"].tolist()))
        palette = {g: colorsys.hsv_to_rgb(i / max(len(genes), 1), 0.65, 0.95) for i, g in enumerate(genes)}
        plt.figure(figsize=(512 / 64, 512 / 64), dpi=64)
        plt.imshow(stain, cmap="gray", extent=(x1, x2, y2, y1))
        sns.scatterplot(
            x="x_location", y="y_location", data=tile, s=0.1, alpha=1, hue="feature_name", palette=palette, legend=False
        )
        plt.axis("off")
        plt.xlim(x1, x2)
        plt.ylim(y1, y2)
        plt.tight_layout(pad=0)
        buf = io.BytesIO()
        plt.savefig(buf, format="png", bbox_inches="tight", pad_inches=0)
        plt.close()
        t2 = time.process_time()
        select_times.append(t1 - t0)
        draw_times.append(t2 - t1)
        counts.append(len(tile))
        picture = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        assert picture.shape[0] > 400 and picture.shape[1] > 400, picture.shape
    draw = float(np.median(draw_times))
    select = float(np.median(select_times))
    return {
        "case": "reference: ST2HE's seaborn 512 px tiles",
        "molecules": int(np.sum(counts)),
        "per_tile_molecules": per_tile,
        "tiles": tiles,
        "cpu_s": float(np.sum(draw_times) + np.sum(select_times)),
        "s_per_tile": draw,
        "select_s_per_tile": select,
        "select_table": table,
        "select_s_per_molecule": select / table,
        "rate": per_tile / draw,  # drawing alone; see reference_rate() for a slide of n molecules
        "peak_rss_mb": _peak_rss_mb(),
        "extrapolated": True,
    }


def reference_rate(reference: dict, n: float) -> float:
    """The reference's molecules per second on a slide of ``n`` molecules: drawing plus selecting from the slide."""
    per_tile = reference["per_tile_molecules"]
    return per_tile / (reference["s_per_tile"] + reference["select_s_per_molecule"] * n)


def case_spatialdata(n: int) -> dict:
    """``spatialdata.rasterize`` with the gene as ``value_key`` on a square holding ``n`` molecules."""
    import dask
    import numpy as np
    import spatialdata

    dask.config.set(scheduler="synchronous")
    sdata = simulated_slide(n, stain=False)
    points = sdata.points["transcripts"]
    df = points.compute()
    side = float(np.sqrt(n / DENSITY))
    keep = (df["x"] < side) & (df["y"] < side)
    sub = spatialdata.models.PointsModel.parse(df[keep].reset_index(drop=True), feature_key="gene")
    m = int(keep.sum())
    rss_ready = _peak_rss_mb()
    t0 = time.process_time()
    out = spatialdata.rasterize(
        sub,
        axes=("x", "y"),
        min_coordinate=[0, 0],
        max_coordinate=[side, side],
        target_coordinate_system="global",
        target_unit_to_pixels=1 / PIXEL_SIZE,
        value_key="gene",
        return_single_channel=False,
    )
    values = np.asarray(out.data.compute() if hasattr(out.data, "compute") else out.data)
    cpu = time.process_time() - t0
    return {
        "case": "spatialdata.rasterize (value_key=gene)",
        "molecules": m,
        "cpu_s": cpu,
        "rate": m / cpu,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_mb": rss_ready,
        "output_shape": list(values.shape),
        "output_bytes_per_molecule": values.nbytes / m,
        "extrapolated": True,
    }


# ----------------------------------------------------------------------------------------------- driver


def _child(args: list[str]) -> dict:
    env = dict(
        os.environ,
        ST2HE_BENCH_PIXEL_SIZE=str(PIXEL_SIZE),
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        NUMBA_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--case", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        msg = f"benchmark case {args} failed"
        raise RuntimeError(msg)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every case in its own process and print a table; returns the results."""
    global PIXEL_SIZE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e7, 1e8], help="numbers of molecules")
    parser.add_argument("--palette", default="coexpression", help="palette method for st2he (default coexpression)")
    parser.add_argument("--chunk", type=int, default=1024, help="chunk edge in pixels")
    parser.add_argument(
        "--pixel-size",
        type=float,
        default=PIXEL_SIZE,
        help="output pixel size in µm, for st2he and the reference alike (default 0.5, st2he's; the reference's "
        "own is 1.0)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each st2he case (the median is reported)")
    parser.add_argument("--tiles", type=int, default=3, help="reference tiles to time")
    parser.add_argument("--table", type=int, default=10_000_000, help="slide table the reference selects tiles from")
    parser.add_argument("--sd-molecules", type=int, default=30_000, help="molecules for spatialdata.rasterize")
    parser.add_argument("--no-stain", action="store_true", help="skip the cases with a DAPI background")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    PIXEL_SIZE = args.pixel_size
    if args.case:
        kind, *rest = args.case
        if kind == "st2he":
            result = case_st2he(int(float(rest[0])), rest[1] == "1", rest[2], int(rest[3]))
        elif kind == "matplotlib":
            result = case_matplotlib(int(rest[0]), int(rest[1]))
        else:
            result = case_spatialdata(int(rest[0]))
        print(json.dumps(result))
        return [result]

    results = []
    for n in args.sizes:
        for stain in [False] if args.no_stain else [False, True]:
            print(f"st2he: {n:.0e} molecules{' over a DAPI image' if stain else ''} x {args.repeat} ...", flush=True)
            runs = [
                _child(["st2he", str(int(n)), "1" if stain else "0", args.palette, str(args.chunk)])
                for _ in range(args.repeat)
            ]
            # the median run by rate (timings on shared virtual machines vary by tens of percent between runs)
            runs.sort(key=lambda r: r["rate"])
            median = dict(runs[len(runs) // 2])
            median["rates"] = [r["rate"] for r in runs]
            results.append(median)
    print(f"reference: {args.tiles} matplotlib tiles ...", flush=True)
    reference = _child(["matplotlib", str(args.tiles), str(args.table)])
    results.append(reference)
    print(f"spatialdata.rasterize: {args.sd_molecules} molecules ...", flush=True)
    sd = _child(["spatialdata", str(args.sd_molecules)])
    results.append(sd)
    _table(results, reference, sd, max(args.sizes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def _table(results: list[dict], reference: dict, sd: dict, biggest: float) -> None:
    print()
    head = (
        f"{'case':44s} {'molecules':>12s} {'CPU s':>8s} {'M mol/s':>9s} {'raster':>8s} {'x ref':>7s} {'x draw':>7s} "
        f"{'x sd':>8s} {'peak GB':>8s}"
    )
    print(head)
    for r in results:
        rate = r["rate"]
        mark = "*" if r["extrapolated"] else " "
        own = f"{r['rate_rasterizer'] / 1e6:8.1f}" if "rate_rasterizer" in r else f"{'':8s}"
        ref = (
            f"{rate / reference_rate(reference, r['molecules']):7.0f}" if r["case"].startswith("st2he") else f"{'':7s}"
        )
        print(
            f"{r['case']:44s} {r['molecules']:12,d} {r['cpu_s']:8.2f} {rate / 1e6:8.3f}{mark} {own} {ref} "
            f"{rate / reference['rate']:7.0f} {rate / sd['rate']:8.0f} {r['peak_rss_mb'] / 1024:8.2f}"
        )
    print("M mol/s: molecules per CPU second on one core, including producing the simulated inputs;")
    print("raster: the same without that (what reading them costs depends on the storage); * extrapolated;")
    print("x ref: against the reference on a slide of the same size (drawing + selecting each tile from the slide);")
    print("x draw: against the reference's drawing alone (its tile selection left out).")
    print(
        f"reference: {reference['s_per_tile']:.2f} s to draw a 512 px tile of {reference['per_tile_molecules']:,d} "
        f"molecules, plus {reference['select_s_per_tile']:.2f} s to select them from a {reference['select_table']:.0e}-"
        f"molecule table ({reference['select_s_per_molecule'] * 1e9:.1f} ns per molecule of the slide); a "
        f"{biggest:.0e}-molecule slide would take {biggest / reference_rate(reference, biggest) / 3600:.1f} h on one core."
    )
    dense_gb = sd["output_bytes_per_molecule"] * biggest / 1e9
    print(
        f"spatialdata.rasterize: dense output {sd['output_shape']} = {sd['output_bytes_per_molecule']:,.0f} bytes per "
        f"molecule, i.e. about {dense_gb:,.0f} GB in memory for {biggest:.0e} molecules."
    )
    print()
    for r in results:
        if r["case"].startswith("st2he"):
            ref = reference_rate(reference, r["molecules"])
            spread = ""
            if len(r.get("rates", [])) > 1:
                spread = (
                    f" (median of {len(r['rates'])} runs: {min(r['rates']) / 1e6:.1f}..{max(r['rates']) / 1e6:.1f})"
                )
            print(
                f"{r['case']} at {r['molecules']:.0e}: {r['rate'] / 1e6:.1f} M molecules/s on one core{spread}, "
                f"{r['rate_rasterizer'] / 1e6:.1f} M/s without producing the inputs ({r['source_cpu_s']:.2f} s); "
                f"pass {r['cpu_pass_s']:.2f} s + drawing {r['cpu_draw_s']:.2f} s of {r['pixels'] / 1e6:.0f} M pixels, "
                f"wall {r['wall_s']:.2f} s; peak {r['peak_rss_mb'] / 1024:.2f} GB, of which "
                f"{r['rss_before_mb'] / 1024:.2f} GB before rasterising (Python, imports, the simulated inputs). "
                f"Targets: >= 20 M/s {'met' if r['rate'] >= 20e6 else 'NOT met'}, "
                f">= 500x reference {'met' if r['rate'] >= 500 * ref else 'NOT met'} "
                f"({r['rate'] / ref:.0f}x; {r['rate'] / reference['rate']:.0f}x its drawing alone), "
                f"< 3 GB {'met' if r['peak_rss_mb'] < 3 * 1024 else 'NOT met'}."
            )


if __name__ == "__main__":
    main()
