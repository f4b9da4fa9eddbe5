"""Peak memory and speed of ``st2he.tl.super_resolve`` on whole simulated sections of two sizes (issue 11 §5).

A simulated section (seed 7) of each size is made once, its pseudo-spots counted
(``aggregate_transcripts(by="spots")``), and the spots, their table and the H&E written to a zarr store. Then, in a
fresh process per (method, size), the store is read and ``super_resolve`` run to 8 µm bins; the process reports
its peak resident memory (``VmHWM``, ``benchmarks/_memory.py``) after reading the store and after the call, the
seconds of the call and the size of the table it returns (the bins' counts, which grow with the section by
design). The working memory of a method is its peak minus the memory held after reading the store
minus its output: it should depend on the window (diffusion) or the image chunk, not on the section.

    python benchmarks/bench_super_resolution_memory.py                      # guided, regression, diffusion (1 step)
    python benchmarks/bench_super_resolution_memory.py --sizes 512 2048 --methods guided

Methods ``regression`` and ``diffusion`` use the shipped expression and super-resolution models.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

SEED = 7

_CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[3])
from _memory import peak_rss_mb
import spatialdata, st2he
sdata = spatialdata.read_zarr(sys.argv[1])
sdata["he_image"]  # opened lazily, as a user's store is
loaded = peak_rss_mb()
kwargs = json.loads(sys.argv[2])
t0 = time.perf_counter()
table = st2he.tl.super_resolve(sdata, table_key="spots", key_added="sr", progress=False, **kwargs)
took = time.perf_counter() - t0
X = table.X
out_mb = (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes if hasattr(X, "indptr") else X.nbytes) / 2**20
print(json.dumps({"seconds": took, "bins": table.n_obs, "genes": table.n_vars, "loaded_mb": loaded,
                  "peak_mb": peak_rss_mb(), "output_mb": out_mb}))
"""

METHODS = {
    "guided": {"method": "guided"},
    "regression": {"method": "regression"},
    "diffusion": {"method": "diffusion", "steps": 1},
}


def _store(size: float, folder: Path) -> tuple[Path, float]:
    """The section's spots, their table and its H&E in a zarr store; and the spots' area in mm²."""
    import st2he
    from spatialdata import SpatialData

    sdata = st2he.datasets.synthetic_tissue(SEED, size_um=size)
    st2he.pp.aggregate_transcripts(sdata, by="spots", key_added="spots", shapes_added="spots_55um")
    store = folder / f"section_{int(size)}.zarr"
    with st2he.io._common.quiet_zarr_writes():
        SpatialData(
            images={"he_image": sdata["he_image"]},
            shapes={"spots_55um": sdata["spots_55um"]},
            tables={"spots": sdata["spots"]},
        ).write(store)
    x0, y0, x1, y1 = sdata["spots_55um"].geometry.total_bounds
    return store, (x1 - x0) * (y1 - y0) / 1e6


def run(sizes=(512.0, 1024.0), methods=tuple(METHODS)) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            t0 = time.time()
            store, area = _store(size, Path(tmp))
            print(f"{size:g} µm section simulated and written in {time.time() - t0:.0f} s ({area:.2f} mm² of spots)")
            for name in methods:
                out = subprocess.run(
                    [sys.executable, "-c", _CHILD, str(store), json.dumps(METHODS[name]), str(Path(__file__).parent)],
                    capture_output=True,
                    text=True,
                )
                if out.returncode != 0:
                    print(out.stderr[-3000:])
                    raise SystemExit(f"{name} at {size:g} µm failed")
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                rec.update(method=name, size_um=size, s_per_mm2=rec["seconds"] / area)
                rec["working_mb"] = rec["peak_mb"] - rec["loaded_mb"] - rec["output_mb"]
                rows.append(rec)
                print(
                    f"  {name:<10} {rec['bins']:>6} bins x {rec['genes']} genes in {rec['seconds']:6.1f} s "
                    f"({rec['s_per_mm2']:6.1f} s/mm²); peak {rec['peak_mb']:6.0f} MB = read {rec['loaded_mb']:.0f} "
                    f"+ output {rec['output_mb']:.0f} + working {rec['working_mb']:.0f}"
                )
    if len(sizes) >= 2:
        a, b = sizes[0], sizes[-1]
        print(f"\narea x{(b / a) ** 2:.0f} ({a:g} -> {b:g} µm):")
        for name in methods:
            ra = next(r for r in rows if r["method"] == name and r["size_um"] == a)
            rb = next(r for r in rows if r["method"] == name and r["size_um"] == b)
            print(
                f"  {name:<10} peak x{rb['peak_mb'] / ra['peak_mb']:.2f}, working memory "
                f"x{rb['working_mb'] / max(ra['working_mb'], 1.0):.2f}, time x{rb['seconds'] / ra['seconds']:.1f}"
            )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[512.0, 1024.0], help="section sizes in µm")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    rows = run(tuple(args.sizes), tuple(args.methods))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
