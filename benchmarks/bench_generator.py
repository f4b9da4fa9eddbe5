"""Generator throughput: tiles per second and peak memory.

CPU: the shipped ``small`` model (256 px tiles), batch 1 vs batched, contiguous vs channels-last.
GPU (when one is present): the SD-Turbo-sized architecture (random weights, LoRA adapters attached as in a
fine-tuned ST2HE model) at 512 px, the reference way (batch 1, fp32, contiguous, as the published inference code
runs) against batched + bf16 autocast + channels-last, in the same run; the ratio is printed.

    python benchmarks/bench_generator.py                # CPU part (and GPU part when CUDA is available)
    python benchmarks/bench_generator.py --gpu-only --batch 16 --json out.json

Runs without spatialdata (``st2he.models`` is imported on its own), so it also runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from _bare import import_models
from _memory import peak_rss_mb


def _rss_mb() -> float:
    return peak_rss_mb()


def time_predict(model, tiles, *, batch_size, autocast, channels_last, merge_lora=True, repeats=1):
    """Tiles per second of model.predict over ``tiles`` (after one warm-up batch)."""
    import torch

    kw = {"autocast": autocast, "channels_last": channels_last, "merge_lora": merge_lora}
    model.predict(tiles[:batch_size], batch_size=batch_size, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.predict(tiles, batch_size=batch_size, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {"tiles_per_s": repeats * len(tiles) / dt, "seconds": dt, "tiles": repeats * len(tiles)}
    if model.device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    # back to the default layout for the next arm
    model.unet.to(memory_format=torch.contiguous_format)
    model.vae.to(memory_format=torch.contiguous_format)
    return out


def bench_cpu(n_tiles: int, tile: int, threads: int | None) -> dict:
    import torch

    pix2pix, io = import_models("_pix2pix", "_io")
    if threads:
        torch.set_num_threads(threads)
    try:
        model = io.from_pretrained("small")
        which = "shipped small"
    except FileNotFoundError:
        model = pix2pix.Pix2PixTurbo.from_config("small").set_eval()
        which = "small (random weights: shipped weights not found)"
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (n_tiles, 3, tile, tile), dtype=np.uint8)
    res = {"model": which, "tile": tile, "threads": torch.get_num_threads(), "rss_before_mb": _rss_mb()}
    for name, bs, cl in (
        ("batch1_contiguous", 1, False),
        ("batch1_channels_last", 1, True),
        ("batch4_channels_last", 4, True),
    ):
        res[name] = time_predict(model, tiles, batch_size=bs, autocast=False, channels_last=cl)
        print(f"CPU {which} {tile}px {name}: {res[name]['tiles_per_s']:.2f} tiles/s", flush=True)
    res["peak_rss_mb"] = _rss_mb()
    print(f"CPU peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    return res


def bench_gpu(batch: int, tile: int, n_ref: int, n_fast: int, config: str = "sd-turbo", compile: bool = True) -> dict:
    import torch

    (pix2pix,) = import_models("_pix2pix")
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = pix2pix.Pix2PixTurbo.from_config(config, seed=0)
    model.set_eval()
    build = time.perf_counter() - t0
    n_par = {k: round(model.num_parameters(k) / 1e6, 1) for k in ("vae", "unet", "text_encoder")}
    print(f"GPU {torch.cuda.get_device_name()}: built {config} (M params {n_par}) in {build:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    tiles_ref = rng.integers(0, 256, (n_ref, 3, tile, tile), dtype=np.uint8)
    tiles_fast = rng.integers(0, 256, (n_fast, 3, tile, tile), dtype=np.uint8)
    res = {"device": torch.cuda.get_device_name(), "config": config, "tile": tile, "batch": batch, "params_m": n_par}
    # the reference: one tile at a time in fp32, LoRA layers unmerged, contiguous memory (PyTorch's default TF32
    # convolutions left on, as in the published inference code)
    arms = [
        (
            "reference_batch1_fp32",
            tiles_ref,
            {"batch_size": 1, "autocast": False, "channels_last": False, "merge_lora": False},
        ),
        (
            "batched_bf16",
            tiles_fast,
            {"batch_size": batch, "autocast": True, "channels_last": False, "merge_lora": False},
        ),
        ("batched_bf16_merged", tiles_fast, {"batch_size": batch, "autocast": True, "channels_last": False}),
        (
            "batched_bf16_merged_channels_last",
            tiles_fast,
            {"batch_size": batch, "autocast": True, "channels_last": True},
        ),
    ]
    for name, tiles, kw in arms:
        if not kw.get("merge_lora", True):
            model.unmerge_lora()
        res[name] = time_predict(model, tiles, **kw)
        print(f"GPU {name}: {res[name]}", flush=True)
    if compile:
        t0 = time.perf_counter()
        model.compile()
        for name, cl in (("batched_bf16_merged_compiled", False), ("batched_bf16_merged_compiled_channels_last", True)):
            try:
                res[name] = time_predict(model, tiles_fast, batch_size=batch, autocast=True, channels_last=cl)
            except Exception as err:  # noqa: BLE001 - report and go on
                print(f"GPU {name} failed: {type(err).__name__}: {err}", flush=True)
                continue
            res[name]["compile_and_warmup_s"] = time.perf_counter() - t0 - res[name]["seconds"]
            print(f"GPU {name}: {res[name]}", flush=True)
            t0 = time.perf_counter()
    ref = res["reference_batch1_fp32"]["tiles_per_s"]
    speedups = {k: v["tiles_per_s"] / ref for k, v in res.items() if isinstance(v, dict) and "tiles_per_s" in v}
    res["speedup_vs_reference"] = speedups
    for k, v in speedups.items():
        print(f"GPU speed-up {k}: {v:.1f}x", flush=True)
    return res


def _whole_slide_child(size: int, chunk: int, picture: str) -> None:
    """Run virtual_he over a ``size`` x ``size`` picture (``picture`` tiled, lazily) and print time and peak RSS."""
    import dask.array as da
    import spatialdata

    import st2he
    from st2he._elements import add_image
    from st2he._grid import Grid
    from st2he.models import load_model

    model = load_model()
    x = np.load(picture)
    reps = -(-size // x.shape[1])
    big = da.tile(da.from_array(x, chunks=x.shape), (1, reps, reps))[:, :size, :size]
    slide = spatialdata.SpatialData()
    add_image(slide, "st2he_input", big, Grid(0.0, 0.0, 0.5, size, size), scale_factors=None)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    st2he.tl.virtual_he(slide, model=model, chunk=chunk, progress=False)
    dt = time.perf_counter() - t0
    print(json.dumps({"size": size, "chunk": chunk, "seconds": dt, "peak_rss_mb": _rss_mb(), "rss_before_mb": rss0}))


def bench_whole_slide(size: int, chunks: list[int]) -> list[dict]:
    """virtual_he over a large picture with several chunk sizes, each in its own process (peak RSS per run)."""
    import subprocess
    import tempfile

    import st2he
    from st2he.models import load_model

    sd = st2he.datasets.synthetic_tissue(0)
    st2he.pp.rasterize_transcripts(sd, palette=load_model().metadata["palette"])
    picture = Path(tempfile.mkdtemp()) / "input.npy"
    np.save(picture, np.asarray(sd.images["st2he_input"]["scale0"].image.data.compute())[:, :768, :768])
    out = []
    for chunk in chunks:
        res = subprocess.run(
            [sys.executable, __file__, "--whole-slide-child", str(size), str(chunk), str(picture)],
            capture_output=True,
            text=True,
            check=True,
        )
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        out.append(rec)
        print(
            f"virtual_he {size} x {size} px, chunk {chunk}: {rec['seconds']:.0f} s, peak RSS {rec['peak_rss_mb']:.0f} MB "
            f"(before the call {rec['rss_before_mb']:.0f} MB)",
            flush=True,
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-tiles", type=int, default=8)
    p.add_argument("--cpu-tile", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gpu-only", action="store_true")
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--gpu-config", default="sd-turbo")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--n-ref", type=int, default=16)
    p.add_argument("--n-fast", type=int, default=128)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--whole-slide", type=int, default=0, help="also run virtual_he over a picture of this many pixels")
    p.add_argument("--chunks", type=int, nargs="+", default=[384, 1536])
    p.add_argument("--whole-slide-child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.whole_slide_child:
        size, chunk, picture = args.whole_slide_child
        _whole_slide_child(int(size), int(chunk), picture)
        return
    import torch

    out = {}
    if not args.gpu_only:
        out["cpu"] = bench_cpu(args.cpu_tiles, args.cpu_tile, args.threads)
    if not args.cpu_only:
        if torch.cuda.is_available():
            out["gpu"] = bench_gpu(args.batch, args.tile, args.n_ref, args.n_fast, args.gpu_config, not args.no_compile)
        else:
            print("No CUDA device: GPU part skipped.")
    if args.whole_slide:
        out["whole_slide"] = bench_whole_slide(args.whole_slide, args.chunks)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
