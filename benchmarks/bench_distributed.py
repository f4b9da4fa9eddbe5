"""Benchmark: a lazy virtual H&E of a simulated slide on a ``dask.distributed`` cluster of 1 and 2 worker processes.

The slide is :func:`st2he.datasets.synthetic_tissue` (``--size-um`` µm square, 0.5 µm pixels), its input picture drawn
by :func:`st2he.pp.rasterize_transcripts`; the generator is the tiny test model (``--model tiny``, tiles of 64 px)
or the shipped small model (``--model small``, tiles of 256 px), on the CPU with one torch thread per worker. The
full-resolution virtual H&E (``virtual_he(lazy=True)``) is computed on a ``LocalCluster(processes=True,
threads_per_worker=1)`` of 1, then 2 workers; each figure is the median of ``--repeat`` runs after one warm-up
(which ships the model and the molecules to the workers). The result is checked against the synchronous scheduler.

Run ``python benchmarks/bench_distributed.py`` (about a minute on 2 cores); ``--size-um 1024 --model small`` for a
heavier slide. The ratio approaches the number of workers when the machine has a free core for each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _sample(size_um: float, model: str):
    import st2he
    from st2he.models import Pix2PixTurbo

    sdata = st2he.datasets.synthetic_tissue(0, size_um=size_um)
    st2he.pp.rasterize_transcripts(sdata, chunk=512)
    if model == "tiny":
        net = Pix2PixTurbo.from_config("tiny", seed=0)
        net.metadata["tile_size"] = 64
        net.set_eval()
        options = {"model": net, "tile_size": 64, "overlap": 16, "chunk": 192}
    else:
        options = {"model": "small", "chunk": 384}
    st2he.tl.virtual_he(sdata, lazy=True, progress=False, device="cpu", **options)
    return sdata


def main(argv: list[str] | None = None) -> dict:
    """Time the lazy virtual H&E on 1 and 2 worker processes; print and return the figures."""
    import numpy as np
    import torch
    from distributed import Client, LocalCluster

    from st2he._grid import _scale0

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-um", type=float, default=384.0, help="edge of the simulated slide in µm")
    parser.add_argument("--model", choices=("tiny", "small"), default="tiny", help="generator")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per cluster (the median is reported)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    sdata = _sample(args.size_um, args.model)
    data = _scale0(sdata.images["virtual_he"]).data
    t0 = time.perf_counter()
    expected = data.compute(scheduler="sync")
    sync_s = time.perf_counter() - t0
    print(
        f"slide {args.size_um:g} µm: {expected.shape[1]} x {expected.shape[2]} pixels, {data.npartitions} blocks, "
        f"model {args.model}; one process, synchronous: {sync_s:.2f} s",
        flush=True,
    )
    seconds = {}
    for workers in (1, 2):
        with (
            LocalCluster(
                processes=True, n_workers=workers, threads_per_worker=1, dashboard_address=None, silence_logs=40
            ) as cluster,
            Client(cluster) as client,
        ):
            out = client.compute(data).result()  # warm-up: the model and the molecules reach the workers
            assert np.array_equal(out, expected), "the cluster's result differs from the synchronous scheduler's"
            runs = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                client.compute(data).result()
                runs.append(time.perf_counter() - t0)
            seconds[workers] = statistics.median(runs)
            print(f"{workers} worker process(es): {seconds[workers]:.2f} s (runs {', '.join(f'{r:.2f}' for r in runs)})")
    ratio = seconds[1] / seconds[2]
    print(f"speed-up with 2 workers: {ratio:.2f}x (on {os.cpu_count()} cores)")
    return {"sync_s": sync_s, "seconds": seconds, "ratio": ratio}


if __name__ == "__main__":
    main()
