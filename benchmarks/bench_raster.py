"""The raster layer (``st2he.io.Raster``): reading a region of a whole-slide H&E, against spatialdata's own tools.

A simulated slide (``--size`` pixels square, uint8 RGB, a 4-level pyramid stored in a zarr store, chunks of 1024,
at 0.5 µm per pixel) is read over a ``--region`` pixel square four ways, each measured with the baseline in the
same run (median of ``--repeat`` runs):

- axis-aligned, at the slide's own pixels (the exact path: a copy of the pixels);
- axis-aligned, at 2 µm per pixel (level 2 of the pyramid, no pooling);
- the slide stored rotated by 30 degrees with an Affine, read back onto an axis-aligned grid at 0.5 µm;
- the same rotated slide at 2 µm per pixel.

It also prints how far the two results differ (mean absolute difference in 0-255 units). They are not the same
resampling: ``spatialdata.rasterize`` takes the nearest source pixel (a target pixel whose centre lies 20.6 source
pixels across gets pixel 21's value), st2he interpolates bilinearly after area averaging (20.6), so on this noise
slide the two differ by tens of grey levels; on smooth content by a fraction of a pixel's step.

The baseline is what a user does without st2he: ``spatialdata.bounding_box_query`` of the region, then
``spatialdata.rasterize`` of the result onto the target pixels (the same target grid). Peak memory is the
process's maximum resident size after each method (``psutil``), so run each method in its own process for memory
(``--only``).

    python benchmarks/bench_raster.py [--size 16384] [--region 2048] [--repeat 3] [--only raster|spatialdata]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path


def make_slide(folder: Path, size: int):
    import dask.array as da
    import numpy as np
    import spatialdata as sd
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Affine, Scale

    rng = da.random.default_rng(0)
    data = rng.integers(0, 256, size=(3, size, size), dtype=np.uint8, chunks=(3, 1024, 1024))
    t = math.radians(30)
    s = 0.5
    m = np.array([[s * math.cos(t), -s * math.sin(t), 0.0], [s * math.sin(t), s * math.cos(t), 0.0], [0, 0, 1]])
    images = {
        "he": Image2DModel.parse(data, dims=("c", "y", "x"), scale_factors=[2, 2, 2], transformations={"global": Scale([s, s], axes=("y", "x"))}),
        "he_rotated": Image2DModel.parse(
            data,
            dims=("c", "y", "x"),
            scale_factors=[2, 2, 2],
            transformations={"global": Affine(m, input_axes=("x", "y"), output_axes=("x", "y"))},
        ),
    }
    path = folder / "slide.zarr"
    sd.SpatialData(images=images).write(path)
    return sd.read_zarr(path)


def read_raster(sdata, key, region, pixel):
    from st2he._raster import Raster, region_grid

    return Raster(sdata.images[key]).read(region_grid(region, pixel), dtype="uint8")


def read_spatialdata(sdata, key, region, pixel):
    import spatialdata as sd

    x0, y0, x1, y1 = region
    sub = sd.bounding_box_query(sdata.images[key], axes=("x", "y"), min_coordinate=[x0, y0], max_coordinate=[x1, y1], target_coordinate_system="global")
    out = sd.rasterize(sub, axes=("x", "y"), min_coordinate=[x0, y0], max_coordinate=[x1, y1], target_coordinate_system="global", target_unit_to_pixels=1 / pixel)
    return out.data.compute() if hasattr(out.data, "compute") else out.data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--region", type=int, default=2048, help="region edge in pixels of the slide")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", choices=["raster", "spatialdata"], default=None)
    args = p.parse_args()

    import psutil

    with tempfile.TemporaryDirectory() as tmp:
        sdata = make_slide(Path(tmp), args.size)
        edge = args.region * 0.5
        # a region well inside both footprints (the rotated slide covers a diamond around the origin)
        c = args.size * 0.5 * 0.5
        region = (c * 0.3, c * 1.0, c * 0.3 + edge, c * 1.0 + edge)
        cases = [("he", 0.5, "axis-aligned, 0.5 µm"), ("he", 2.0, "axis-aligned, 2 µm"), ("he_rotated", 0.5, "rotated 30°, 0.5 µm"), ("he_rotated", 2.0, "rotated 30°, 2 µm")]
        methods = {"raster": read_raster, "spatialdata": read_spatialdata}
        if args.only:
            methods = {args.only: methods[args.only]}
        print(f"slide {args.size} px square (3 x uint8, 4 levels, zarr), region {args.region} px = {edge:g} µm square")
        print(f"{'case':24s} " + " ".join(f"{m:>14s}" for m in methods) + ("   spatialdata / raster" if len(methods) == 2 else ""))
        for key, pixel, label in cases:
            times, outs = {}, {}
            for name, fn in methods.items():
                runs = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    out = fn(sdata, key, region, pixel)
                    runs.append(time.perf_counter() - t0)
                times[name] = statistics.median(runs)
                outs[name] = out
            row = f"{label:24s} " + " ".join(f"{times[m]:12.3f} s" for m in methods)
            if len(methods) == 2:
                row += f"   {times['spatialdata'] / times['raster']:6.1f}x"
                a, b = outs["raster"].astype(float), outs["spatialdata"].astype(float)
                h, w = min(a.shape[1], b.shape[1]), min(a.shape[2], b.shape[2])
                row += f"   mean |difference| {abs(a[:, :h, :w] - b[:, :h, :w]).mean():.1f} of 255"
            print(row)
        print(f"peak resident memory: {psutil.Process().memory_info().rss / 2**30:.2f} GB (now; run --only for each)")


if __name__ == "__main__":
    main()
