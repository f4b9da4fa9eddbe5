"""Whole-slide virtual H&E with the pix2pix-turbo generator: overlapping tiles, smooth blending, chunk by chunk."""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from typing import Any

import numpy as np

from st2he._elements import check_key_free, get_params, parse_image, write_elements
from st2he._grid import Grid

logger = logging.getLogger("st2he")

#: Relative difference of pixel sizes above which the model is warned to be used off its training scale.
PIXEL_SIZE_TOLERANCE = 0.1
#: Outputs up to this many bytes are assembled in memory; larger ones in a temporary zarr store on disk.
IN_MEMORY_BYTES = 1 << 30


def resolve_device(device: str | None = "auto"):
    """``"auto"`` -> CUDA when available, else MPS, else CPU."""
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def check_palette(model_palette: dict | None, input_palette: dict | None, *, input_key: str) -> None:
    """Warn when the input picture was drawn with other gene colours than the model was trained with."""
    if not model_palette or not input_palette:
        return
    norm = {str(g): str(c).lower() for g, c in model_palette.items()}
    other = {str(g): str(c).lower() for g, c in input_palette.items()}
    common = sorted(set(norm) & set(other))
    differ = [g for g in common if norm[g] != other[g]]
    unknown = sorted(set(other) - set(norm))
    if not common:
        warnings.warn(
            f"The genes of {input_key!r} share no gene with the palette the model was trained with: in the input "
            "picture colours mean genes, so the model cannot read these colours. Use a model trained on this panel.",
            UserWarning,
            stacklevel=3,
        )
        return
    if differ or unknown:
        parts = []
        if differ:
            listed = ", ".join(f"{g} ({other[g]} vs {norm[g]})" for g in differ[:10])
            parts.append(f"{len(differ)} genes have other colours than in training: {listed}")
        if unknown:
            parts.append(f"{len(unknown)} genes were not in the training palette (e.g. {', '.join(unknown[:10])})")
        warnings.warn(
            f"Palette mismatch between {input_key!r} and the model: " + "; ".join(parts) + ". Colours mean genes: "
            "rasterise with the model's palette (palette=model.metadata['palette']) for faithful output.",
            UserWarning,
            stacklevel=3,
        )


def generate_he(
    sdata,
    data,
    grid: Grid,
    *,
    input_key: str,
    model: Any = None,
    tissue: str | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    n_samples: int = 1,
    r: float | None = None,
    seed: int = 0,
    chunk: int | None = None,
    key_added: str = "virtual_he",
    overwrite: bool = False,
    progress: bool = True,
    lazy: bool = False,
):
    """Run the generator over image ``data`` (``(3, H, W)`` uint8 on ``grid``) and store the result; see ``virtual_he``."""
    import torch

    from st2he.models import Pix2PixTurbo, load_model
    from st2he.models._tiling import count_tiles, render_region

    n_samples = int(n_samples)
    if n_samples < 1:
        msg = f"n_samples must be at least 1, got {n_samples}."
        raise ValueError(msg)
    spread_key = f"{key_added}_uncertainty"
    written = {key_added, spread_key} if n_samples > 1 else {key_added}
    check_key_free(sdata, key_added, overwrite=overwrite, kind="images", inputs={input_key}, replaced=written)
    if n_samples > 1:
        check_key_free(sdata, spread_key, overwrite=overwrite, kind="images", inputs={input_key}, replaced=written)
    if data.ndim != 3 or data.shape[0] != 3:
        channels = data.shape[0] if data.ndim == 3 else data.ndim
        msg = (
            f"The generator takes an RGB input picture (3 channels r, g, b); {input_key!r} has {channels} channels. "
            "Draw it with st2he.pp.rasterize_transcripts."
        )
        raise ValueError(msg)
    if data.dtype != np.uint8:
        msg = f"The input picture {input_key!r} must be uint8 RGB (as st2he.pp.rasterize_transcripts writes), got {data.dtype}."
        raise TypeError(msg)

    dev = resolve_device(device)
    net = load_model(model)
    if not isinstance(net, Pix2PixTurbo):  # pragma: no cover - load_model guarantees it
        msg = "model must be a Pix2PixTurbo."
        raise TypeError(msg)
    net = net.to(dev).set_eval()
    meta = net.metadata
    if tile_size is None:
        tile_size = int(meta.get("tile_size") or 512)
    tile_size = int(tile_size)
    f = net.downscale
    if tile_size <= 0 or tile_size % f:
        msg = f"tile_size must be a positive multiple of {f} (the model's downsampling), got {tile_size}."
        raise ValueError(msg)
    overlap = tile_size // 4 if overlap is None else int(overlap)
    if not 0 <= overlap < tile_size:
        msg = f"overlap must be at least 0 and smaller than tile_size ({tile_size}), got {overlap}."
        raise ValueError(msg)
    if batch_size is None:
        batch_size = 8 if dev.type == "cuda" else 1
    if r is None:
        r = 1.0 if n_samples == 1 else float(meta.get("r_sampling", 0.5))
    if not 0 <= r <= 1:
        msg = f"r must lie in [0, 1] (1: deterministic), got {r}."
        raise ValueError(msg)
    if n_samples > 1 and r >= 1:
        warnings.warn(
            "n_samples > 1 with r = 1 (deterministic) gives identical samples; pass r < 1 for stochastic samples.",
            UserWarning,
            stacklevel=3,
        )
    params_in = get_params(sdata, input_key)
    check_palette(meta.get("palette"), params_in.get("palette"), input_key=input_key)
    trained_px = meta.get("pixel_size")
    if trained_px and abs(grid.pixel_size - trained_px) > PIXEL_SIZE_TOLERANCE * trained_px:
        warnings.warn(
            f"{input_key!r} has {grid.pixel_size:g} µm pixels but the model was trained on {trained_px:g} µm pixels; "
            f"rasterise with pixel_size={trained_px:g} for faithful output.",
            UserWarning,
            stacklevel=3,
        )
    prompt = net.prompt_for(tissue)
    if chunk is None:
        stride = tile_size - overlap
        chunk = max(2048 // stride, 2) * stride if dev.type == "cuda" else max(1024 // stride, 1) * stride
    chunk = int(chunk)

    r_arg = None if r >= 1 else float(r)

    def predict(tiles, seeds):
        return net.predict(tiles, batch_size=batch_size, prompt=prompt, r=r_arg, seeds=seeds)

    H, W = grid.shape
    arr = data.data if hasattr(data, "data") else data
    params = {
        "method": "diffusion",
        "input_key": input_key,
        "model": str(meta.get("checkpoint") or net.config.get("name")),
        "prompt": prompt,
        "tile_size": tile_size,
        "overlap": overlap,
        "n_samples": n_samples,
        "r": r,
        "seed": seed,
        "device": str(dev),
    }
    blocks = [
        (r0, min(r0 + chunk, H), c0, min(c0 + chunk, W)) for r0 in range(0, H, chunk) for c0 in range(0, W, chunk)
    ]
    kwargs = {"tile": tile_size, "overlap": overlap, "batch_size": batch_size, "n_samples": n_samples, "seed": seed}

    if lazy:
        rgb, spread = _lazy(arr, predict, (H, W), chunk, tile_size, kwargs)
    else:
        from st2he._progress import tqdm

        total = sum(count_tiles((H, W), b, tile_size, overlap) for b in blocks)
        rgb_out = _output_array((3, H, W), np.uint8, chunk)
        spread_out = _output_array((1, H, W), np.float32, chunk) if n_samples > 1 else None
        with (
            torch.inference_mode(),
            tqdm(total=total, desc="virtual H&E", unit="tile", disable=not progress) as bar,
        ):
            for b in blocks:
                read = _dask_reader(arr, b, tile_size, (H, W))
                out, spread_b = render_region(predict, read, (H, W), b, on_tiles=bar.update, **kwargs)
                rgb_out[:, b[0] : b[1], b[2] : b[3]] = out
                if spread_out is not None:
                    spread_out[:, b[0] : b[1], b[2] : b[3]] = spread_b
        rgb = _as_dask(rgb_out, chunk)
        spread = _as_dask(spread_out, chunk) if spread_out is not None else None

    # both images are made before either is stored: the mean and its spread are stored together or not at all
    elements = {key_added: parse_image(rgb, grid, chunks=min(chunk, 1024))}
    element_params = {key_added: params}
    if spread is not None:
        elements[spread_key] = parse_image(spread, grid, c_coords=["uncertainty"], chunks=min(chunk, 1024))
        element_params[spread_key] = {
            **params,
            "of": key_added,
            "what": "per-pixel standard deviation across samples, 0..1",
        }
    stored = write_elements(sdata, elements, overwrite=overwrite, inputs={input_key}, params=element_params)
    return stored[key_added]


def _dask_reader(arr, block, tile, shape):
    """Read the input around ``block`` (the tiles that touch it) once, zero outside the image."""
    from st2he.models._tiling import reader_from_array

    r0, r1, c0, c1 = block
    a0, a1 = max(r0 - tile, 0), min(r1 + tile, shape[0])
    b0, b1 = max(c0 - tile, 0), min(c1 + tile, shape[1])
    region = arr[:, a0:a1, b0:b1]
    region = np.asarray(region.compute() if hasattr(region, "compute") else region)
    return reader_from_array(np.asarray(region), origin=(a0, b0))


def _output_array(shape, dtype, chunk):
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes <= IN_MEMORY_BYTES:
        return np.zeros(shape, dtype=dtype)
    import zarr

    path = tempfile.mkdtemp(prefix="st2he_virtual_he_")
    logger.info("virtual_he: assembling the %.1f GB output in %s", nbytes / 1e9, path)
    return zarr.open(path, mode="w", shape=shape, dtype=dtype, chunks=(shape[0], chunk, chunk))


def _as_dask(out, chunk):
    import dask.array as da

    if isinstance(out, np.ndarray):
        return da.from_array(out, chunks=(out.shape[0], chunk, chunk))
    return da.from_zarr(out)


def _lazy(arr, predict, shape, chunk, tile, kwargs):
    """Build a dask graph that runs the model when computed (each computation runs it again)."""
    import dask.array as da

    from st2he.models._tiling import reader_from_array, render_region

    x = da.asarray(arr)
    # a fourth (empty) channel, so that the blocks carry the uncertainty out along with r, g, b
    # blocks of at least a tile (dask's overlap needs blocks no thinner than its depth): a thin last block joins
    # the one before it
    chunk = max(chunk, tile)

    def sizes(n):
        out = [chunk] * (n // chunk)
        rest = n - sum(out)
        if rest and out and rest < tile:
            out[-1] += rest
        elif rest:
            out.append(rest)
        return tuple(out) or (n,)

    x = da.concatenate([x, da.zeros_like(x[:1])], axis=0).rechunk(((4,), sizes(shape[0]), sizes(shape[1])))
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in x.chunks[1:]]
    n_samples = kwargs["n_samples"]

    def block_fn(block, block_info=None):
        _, i, j = block_info[0]["chunk-location"]
        r0, c0 = int(starts[0][i]), int(starts[1][j])
        r1, c1 = r0 + x.chunks[1][i], c0 + x.chunks[2][j]
        er0, ec0 = max(r0 - tile, 0), max(c0 - tile, 0)
        read = reader_from_array(block[:3], origin=(er0, ec0))
        rgb, spread = render_region(predict, read, shape, (r0, r1, c0, c1), **kwargs)
        out = np.zeros((4, *block.shape[1:]), dtype=np.float32)
        out[:3, r0 - er0 : r1 - er0, c0 - ec0 : c1 - ec0] = rgb
        if spread is not None:
            out[3:, r0 - er0 : r1 - er0, c0 - ec0 : c1 - ec0] = spread
        return out

    y = da.map_overlap(
        block_fn,
        x,
        depth={0: 0, 1: tile, 2: tile},
        boundary="none",
        trim=True,
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )
    rgb = y[:3].astype(np.uint8)  # exact: the block function rounded and clipped already
    spread = y[3:] if n_samples > 1 else None
    return rgb, spread
