"""Whole-slide virtual H&E with the pix2pix-turbo generator: overlapping tiles, smooth blending, chunk by chunk."""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import shutil
import tempfile
import threading
import uuid
import warnings
import weakref
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
    common, differ, unknown = compare_palettes(model_palette, input_palette)
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
            listed = ", ".join(
                f"{g} ({str(input_palette[g]).lower()} vs {str(model_palette[g]).lower()})" for g in differ[:10]
            )
            parts.append(f"{len(differ)} genes have other colours than in training: {listed}")
        if unknown:
            parts.append(f"{len(unknown)} genes were not in the training palette (e.g. {', '.join(unknown[:10])})")
        warnings.warn(
            f"Palette mismatch between {input_key!r} and the model: " + "; ".join(parts) + ". Colours mean genes: "
            "rasterise with the model's palette (palette=model.metadata['palette']) for faithful output.",
            UserWarning,
            stacklevel=3,
        )


#: What virtual_he does when the input picture was drawn with other gene colours than the model was trained with.
PALETTE_MISMATCH = ("redraw", "error", "warn")


def compare_palettes(model_palette: dict, input_palette: dict) -> tuple[list[str], list[str], list[str]]:
    """``(common, differ, unknown)``: genes in both, genes coloured differently, input genes the model never saw."""
    norm = {str(g): str(c).lower() for g, c in model_palette.items()}
    other = {str(g): str(c).lower() for g, c in input_palette.items()}
    common = sorted(set(norm) & set(other))
    differ = [g for g in common if norm[g] != other[g]]
    unknown = sorted(set(other) - set(norm))
    return common, differ, unknown


def palette_by_method(model_metadata: dict) -> str | None:
    """The panel-independent palette method a model was trained with (``"lineage"``), else ``None``.

    A model trained on pictures drawn with ``palette="lineage"`` reads lineage colours, not the gene -> colour
    map of its training panel: a picture of any panel drawn with the lineage palette of that panel suits it.
    """
    method = model_metadata.get("palette_method")
    return method if method == "lineage" else None


def redraw_with_model_palette(
    sdata, input_key: str, model_palette: dict, grid: Grid, *, key: str, overwrite: bool, method: str | None = None
):
    """The input picture drawn again with the model's gene colours, or ``None`` when it already is.

    The picture is redrawn from the molecules and stain it was made from, with every parameter recorded for it
    (pixel size, region, stain, dot size, filters) and the model's palette for the genes the model knows; genes
    it never saw are left out (with a warning). With ``method="lineage"`` (a model trained with the lineage
    palette) a picture drawn with ``palette="lineage"`` is kept, and any other is redrawn with the lineage palette
    computed on its own panel, every gene kept. Returns ``(element, params)`` for storing under ``key``; nothing
    is stored here. Raises when the model shares no gene with the picture or the picture cannot be redrawn.
    """
    from spatialdata import SpatialData

    from st2he._elements import element_type
    from st2he.pp import rasterize_transcripts

    made = get_params(sdata, input_key)
    input_palette = made.get("palette")
    if method == "lineage":
        if made.get("palette_method") == "lineage" or not input_palette:
            return None
        common, differ, unknown = sorted(input_palette), list(input_palette), []
    else:
        if not model_palette or not input_palette:
            return None
        common, differ, unknown = compare_palettes(model_palette, input_palette)
    if not differ and not unknown:
        return None
    if not common:
        msg = (
            f"The genes of {input_key!r} share no gene with the palette the model was trained with: in the input "
            "picture colours mean genes, so this model cannot read this panel. Use a model trained on this panel "
            "(st2he.tl.train_generator)."
        )
        raise ValueError(msg)
    points_key = made.get("points_key")
    if made.get("style", "multicolor") != "multicolor" or points_key not in getattr(sdata, "points", {}):
        msg = (
            f"{input_key!r} was drawn with other gene colours than the model was trained with, and it cannot be "
            f"redrawn here (its molecules {points_key!r} are not in this object). Rasterise with the model's "
            "palette (palette=model.metadata['palette']), or pass palette_mismatch='warn' to use it as it is."
        )
        raise ValueError(msg)
    check_key_free(sdata, key, overwrite=overwrite, kind="images", inputs={input_key, points_key})
    if unknown:
        warnings.warn(
            f"{len(unknown)} genes of {input_key!r} are not in the model's palette and are left out of the picture "
            f"redrawn for it (e.g. {', '.join(unknown[:10])}): the model never saw them.",
            UserWarning,
            stacklevel=4,
        )
    stain = made.get("stain") or {}
    stain_key = stain.get("stain_key")
    elements = {points_key: sdata.points[points_key]}
    parts: dict = {"points": elements}
    if stain_key is not None:
        kind = element_type(sdata, stain_key)
        parts.setdefault(kind, {})[stain_key] = getattr(sdata, kind)[stain_key]
    tables = {}
    if method == "lineage":
        # the lineage palette places genes outside its marker table by their co-expression, read from a table of
        # cells when one covers the genes (as a direct drawing does): the tables come along, with what they annotate
        tables, annotated = _tables_and_annotated(sdata)
        for kind, name in annotated:
            parts.setdefault(kind, {}).setdefault(name, getattr(sdata, kind)[name])
    sub = SpatialData(**parts, tables=tables)
    palette = "lineage" if method == "lineage" else {g: model_palette[g] for g in common}
    ps = grid.pixel_size
    rasterize_transcripts(
        sub,
        points_key=points_key,
        stain_key=stain_key,
        style="multicolor",
        palette=palette,
        pixel_size=ps,
        dot_size=made.get("dot_size", 1),
        # the grid's pixels exactly (a region's far edge is inclusive: stop half a pixel short of it)
        region=(grid.x0, grid.y0, grid.x0 + (grid.width - 0.5) * ps, grid.y0 + (grid.height - 0.5) * ps),
        min_qv=made.get("min_qv"),
        drop_controls=made.get("drop_controls", True),
        genes=common,
        boundaries_key=None,
        percentiles=tuple(stain.get("stain_percentiles") or (1.0, 99.5)),
        chunk=made.get("chunk", 1024),
        key_added=key,
    )
    params = dict(get_params(sub, key))
    params["redrawn_from"] = input_key
    if method == "lineage":
        logger.warning(
            "%r was drawn with the %r palette and the model reads lineage colours: redrawn with palette='lineage' "
            "(computed on its own panel) as %r",
            input_key,
            made.get("palette_method", "mapping"),
            key,
        )
    else:
        logger.warning(
            "%r was drawn with %d gene colours other than the model's: redrawn with the model's palette as %r",
            input_key,
            len(differ),
            key,
        )
    return sub.images[key], params


def _tables_and_annotated(sdata) -> tuple[dict, list[tuple[str, str]]]:
    """The tables of ``sdata`` and ``(kind, name)`` of the elements of ``sdata`` they annotate."""
    from st2he._elements import element_type
    from st2he._units import table_keys

    tables = dict(getattr(sdata, "tables", {}))
    annotated = []
    for table in tables.values():
        try:
            regions = table_keys(table)[0]
        except ValueError:  # a table without spatialdata attributes annotates nothing
            continue
        for name in regions:
            kind = element_type(sdata, name)
            if kind is not None and kind != "tables":
                annotated.append((kind, name))
    return tables, annotated


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
    palette_mismatch: str = "redraw",
):
    """Run the generator over image ``data`` (``(3, H, W)`` uint8 on ``grid``) and store the result; see ``virtual_he``."""
    import torch

    from st2he.models import Pix2PixTurbo, load_model
    from st2he.models._tiling import count_tiles

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
    check_finite_weights(net)
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
    if palette_mismatch not in PALETTE_MISMATCH:
        msg = f"palette_mismatch must be one of {PALETTE_MISMATCH}, got {palette_mismatch!r}."
        raise ValueError(msg)
    params_in = get_params(sdata, input_key)
    redrawn = None
    redrawn_key = f"{key_added}_input"
    by_method = palette_by_method(meta)
    if palette_mismatch == "redraw":
        redrawn = redraw_with_model_palette(
            sdata, input_key, meta.get("palette"), grid, key=redrawn_key, overwrite=overwrite, method=by_method
        )
    elif by_method is not None and params_in.get("palette"):
        if params_in.get("palette_method") != by_method:
            msg = (
                f"{input_key!r} was drawn with the {params_in.get('palette_method', 'mapping')!r} palette, but the "
                f"model was trained with palette={by_method!r}. Rasterise with palette={by_method!r} or pass "
                "palette_mismatch='redraw'."
            )
            if palette_mismatch == "error":
                raise ValueError(msg)
            warnings.warn(msg, UserWarning, stacklevel=3)
    elif palette_mismatch == "error" and meta.get("palette") and params_in.get("palette"):
        _, differ, unknown = compare_palettes(meta["palette"], params_in["palette"])
        if differ or unknown:
            msg = (
                f"{input_key!r} was drawn with other gene colours than the model was trained with ({len(differ)} "
                f"genes coloured differently, {len(unknown)} unknown to it). Rasterise with the model's palette "
                "(palette=model.metadata['palette']) or pass palette_mismatch='redraw'."
            )
            raise ValueError(msg)
    else:
        check_palette(meta.get("palette"), params_in.get("palette"), input_key=input_key)
    if redrawn is not None:
        from st2he._raster import Raster

        redrawn_element, redrawn_params = redrawn
        redrawn_raster = Raster(redrawn_element)
        if redrawn_raster.grid() != grid:  # pragma: no cover - the recorded region and pixel size give the same grid
            msg = f"The picture redrawn for the model does not cover {input_key!r} pixel for pixel."
            raise RuntimeError(msg)
        data = redrawn_raster.level0
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
    source = None if isinstance(model, Pix2PixTurbo) else ("small" if model is None else os.fspath(model))
    predict = Generator(net, source, device, batch_size=batch_size, prompt=prompt, r=r_arg)

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
        try:
            with (
                torch.inference_mode(),
                tqdm(total=total, desc="virtual H&E", unit="tile", disable=not progress) as bar,
            ):
                for b in blocks:
                    read = _dask_reader(arr, b, tile_size, (H, W))
                    out, spread_b = render_block(predict, read, (H, W), b, on_tiles=bar.update, **kwargs)
                    rgb_out[:, b[0] : b[1], b[2] : b[3]] = out
                    if spread_out is not None:
                        spread_out[:, b[0] : b[1], b[2] : b[3]] = spread_b
        except BaseException:
            _remove_store(rgb_out)
            _remove_store(spread_out)
            raise
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
    if redrawn is not None:
        elements[redrawn_key] = redrawn_element
        element_params[redrawn_key] = redrawn_params
        params["input_key"] = redrawn_key
        params["redrawn_input_from"] = input_key
    stored = write_elements(sdata, elements, overwrite=overwrite, inputs={input_key}, params=element_params)
    return stored[key_added]


def check_finite_weights(net) -> None:
    """Raise when the model has NaN or infinite weights (its every output would be NaN, drawn black)."""
    import torch

    bad = [name for name, p in net.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        msg = (
            f"The model has non-finite weights (NaN or infinite) in {len(bad)} parameter tensor(s): {shown}. Its "
            "virtual H&E would be NaN, drawn black. Load the checkpoint again, or retrain (a diverged training "
            "run leaves NaN weights)."
        )
        raise ValueError(msg)


_RLOCK = type(threading.RLock())


class _ModelPickler(pickle.Pickler):
    """Pickles a model: its locks are made anew on the other side, and so are the float32 wrappers of its layers.

    (:func:`st2he.models._pix2pix._keep_fp32` replaces a layer's ``forward`` by a closure, which cannot be
    pickled: the layer travels without it and gets it again.)
    """

    def reducer_override(self, obj):
        if isinstance(obj, _RLOCK):
            return threading.RLock, ()
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict) and state.get("_st2he_fp32") and "forward" in state:
            state = {k: v for k, v in state.items() if k not in ("forward", "_st2he_fp32")}
            return object.__new__, (type(obj),), state, None, None, _set_fp32_state
        return NotImplemented


def _set_fp32_state(module, state) -> None:
    from st2he.models._pix2pix import _keep_fp32

    module.__setstate__(state)
    _keep_fp32(module)


#: Models the tasks of lazy virtual H&E loaded in this process, by :attr:`Generator.token`.
_MODELS: dict[str, Any] = {}
_MODELS_KEPT = 2
_MODELS_LOCK = threading.Lock()


class Generator:
    """``predict(tiles, seeds)`` with the model, as the tasks of a lazy virtual H&E hold it.

    Picklable, for the worker processes of a ``dask.distributed`` cluster: a model loaded from a checkpoint (or
    the shipped model) travels as its path and each worker process loads it once; a model object travels as
    itself (pickled, moved to ``device`` there). Loaded models are kept per process, by :attr:`token`.
    """

    def __init__(self, net, source, device, *, batch_size: int, prompt: str, r: float | None) -> None:
        self.net = net
        self.source = source  # the checkpoint path or name the model was loaded from; None: the object travels
        self.device = device
        self.batch_size, self.prompt, self.r = batch_size, prompt, r
        self.token = uuid.uuid4().hex

    def __call__(self, tiles, seeds):
        net = self.net if self.net is not None else self._load()
        return net.predict(tiles, batch_size=self.batch_size, prompt=self.prompt, r=self.r, seeds=seeds)

    def __dask_tokenize__(self):
        return ("st2he-generator", self.token)

    def __getstate__(self):
        # (pickled again on the way, e.g. by the scheduler, it keeps the model it carries)
        state = {"blob": None, **self.__dict__, "net": None}
        if self.source is None and self.net is not None:
            buffer = io.BytesIO()
            try:
                _ModelPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(self.net)
            except Exception as err:  # noqa: BLE001 - any failure means: use a checkpoint instead
                msg = (
                    f"The model cannot be sent to worker processes ({type(err).__name__}: {err}). Save it with "
                    "model.save_pretrained(path) and pass model=path: each worker then loads it from there."
                )
                raise TypeError(msg) from err
            state["blob"] = buffer.getvalue()
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)

    def _load(self):
        with _MODELS_LOCK:
            net = _MODELS.pop(self.token, None)
            if net is None:
                from st2he.models import load_model

                if self.blob is None and self.source is None:  # pragma: no cover - pickled without its model
                    msg = "The generator reached this process without its model."
                    raise RuntimeError(msg)
                net = pickle.loads(self.blob) if self.blob is not None else load_model(self.source)
                net = net.to(resolve_device(self.device)).set_eval()
                while len(_MODELS) >= _MODELS_KEPT:  # a long-lived worker keeps the latest few
                    _MODELS.pop(next(iter(_MODELS)))
            _MODELS[self.token] = net  # the most recently used last
        return net


def render_block(predict, read, shape, block, **kwargs):
    """:func:`st2he.models._tiling.render_region` over ``block``; non-finite outputs name their tiles."""
    from st2he.models._tiling import render_region, tile_seed, tiles_for_region

    try:
        return render_region(predict, read, shape, block, **kwargs)
    except FloatingPointError as err:
        tile, overlap = kwargs["tile"], kwargs["overlap"]
        padded = (max(shape[0], tile), max(shape[1], tile))
        where = {
            tile_seed(kwargs.get("seed", 0), k, pr, pc): (pr, pc)
            for k in range(kwargs.get("n_samples", 1))
            for pr, pc in tiles_for_region(padded, block, tile, overlap)
        }
        seeds = getattr(err, "seeds", None) or []
        tiles = sorted({where[s] for s in seeds if s in where})
        shown = ", ".join(f"rows {r}..{r + tile}, columns {c}..{c + tile}" for r, c in tiles[:5]) or "unknown"
        msg = (
            f"The generator gave non-finite values (NaN or infinite) for the tile(s) at {shown} of the input "
            f"picture: the model's weights or its computation overflow ({err}). Check the model (load the "
            "checkpoint again; on a GPU try another dtype or device='cpu')."
        )
        raise ValueError(msg) from err


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
    """An output array: in memory, or over :data:`IN_MEMORY_BYTES` a zarr store in a temporary folder.

    The folder is removed when the store (and so every dask array read from it) is garbage-collected, at exit,
    or by :func:`_remove_store` when the run fails.
    """
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes <= IN_MEMORY_BYTES:
        return np.zeros(shape, dtype=dtype)
    import zarr

    path = tempfile.mkdtemp(prefix="st2he_virtual_he_")
    logger.info("virtual_he: assembling the %.1f GB output in %s", nbytes / 1e9, path)
    try:
        out = zarr.open(path, mode="w", shape=shape, dtype=dtype, chunks=(shape[0], chunk, chunk))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    _STORES[id(out)] = weakref.finalize(out, _remove_folder, id(out), path)
    return out


def _remove_folder(key: int, path: str) -> None:
    _STORES.pop(key, None)
    shutil.rmtree(path, ignore_errors=True)


#: Removal of the temporary folders of the zarr outputs alive, by ``id`` of the zarr array.
_STORES: dict[int, weakref.finalize] = {}


def _remove_store(out) -> None:
    """Remove the temporary folder of a zarr output now (nothing for an array in memory or ``None``)."""
    remove = _STORES.pop(id(out), None) if out is not None else None
    if remove is not None:
        remove()


def _as_dask(out, chunk):
    import dask.array as da

    if isinstance(out, np.ndarray):
        return da.from_array(out, chunks=(out.shape[0], chunk, chunk))
    return da.from_zarr(out)


def _lazy(arr, predict, shape, chunk, tile, kwargs):
    """Build a dask graph that runs the model when computed (each computation runs it again).

    Nothing in it is a closure, a lock or an open file: it computes on a ``dask.distributed`` cluster too. The
    model (:class:`Generator`) is one key of the graph, shipped once to each worker.
    """
    import dask
    import dask.array as da
    from dask.array.overlap import overlap, trim_internal

    x = da.asarray(arr)
    # a fourth (empty) channel, so that the blocks carry the uncertainty out along with r, g, b
    # blocks of at least a tile (the overlap needs blocks no thinner than its depth): a thin last block joins the
    # one before it
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
    depth = {0: 0, 1: tile, 2: tile}
    render = _LazyBlock(tuple(x.chunks[1]), tuple(x.chunks[2]), tuple(shape), tile, dict(kwargs))
    y = da.map_blocks(
        render,
        dask.delayed(predict, traverse=False, pure=True),
        overlap(x, depth=depth, boundary="none"),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )
    y = trim_internal(y, depth, boundary="none")
    rgb = y[:3].astype(np.uint8)  # exact: the block function rounded and clipped already
    spread = y[3:] if kwargs["n_samples"] > 1 else None
    return rgb, spread


class _LazyBlock:
    """One block of a lazy virtual H&E from its input block with ``tile`` pixels of context on each side."""

    def __init__(self, rows, cols, shape, tile, kwargs) -> None:
        self.starts = (np.concatenate([[0], np.cumsum(rows)[:-1]]), np.concatenate([[0], np.cumsum(cols)[:-1]]))
        self.rows, self.cols, self.shape, self.tile, self.kwargs = rows, cols, shape, tile, kwargs

    def __call__(self, predict, block, block_id=None):
        from st2he.models._tiling import reader_from_array

        _, i, j = block_id
        r0, c0 = int(self.starts[0][i]), int(self.starts[1][j])
        r1, c1 = r0 + self.rows[i], c0 + self.cols[j]
        er0, ec0 = max(r0 - self.tile, 0), max(c0 - self.tile, 0)
        read = reader_from_array(block[:3], origin=(er0, ec0))
        rgb, spread = render_block(predict, read, self.shape, (r0, r1, c0, c1), **self.kwargs)
        out = np.zeros((4, *block.shape[1:]), dtype=np.float32)
        out[:3, r0 - er0 : r1 - er0, c0 - ec0 : c1 - ec0] = rgb
        if spread is not None:
            out[3:, r0 - er0 : r1 - er0, c0 - ec0 : c1 - ec0] = spread
        return out
