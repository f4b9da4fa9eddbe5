"""``st2he.tl.virtual_he``: a virtual H&E image from the ST2HE input picture, by a learned generator or the stain model."""

from __future__ import annotations

import logging
from typing import Any

from st2he._elements import add_image, check_key_free, get_image, get_params

logger = logging.getLogger("st2he")

_METHODS = ("diffusion", "stain")


def virtual_he(
    sdata,
    *,
    method: str = "diffusion",
    input_key: str = "st2he_input",
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
    """Generate a virtual H&E image from the ST2HE input picture and store it in ``sdata``.

    Parameters
    ----------
    sdata
        SpatialData object holding the input picture (see :func:`st2he.pp.rasterize_transcripts`).
    method
        ``"diffusion"``: the one-step pix2pix-turbo generator (:mod:`st2he.models`), run over the whole image in
        overlapping tiles that are blended with a smooth window. ``"stain"``: the physics baseline (nuclear stain
        -> haematoxylin, transcript density -> eosin) of :func:`st2he.tl._stain.stain_he`.
    input_key
        Image element with the input picture (uint8 RGB, channels ``r, g, b``).
    model
        ``method="diffusion"`` only: a :class:`st2he.models.Pix2PixTurbo`, a path to a checkpoint saved by
        :meth:`~st2he.models.Pix2PixTurbo.save_pretrained`, or a generator shipped with st2he: ``None`` /
        ``"small"`` (trained on simulated sections, the co-expression palette of the simulated panel) or
        ``"small-real"`` (also trained on pairs derived from real H&E, the panel-independent lineage palette: for
        real panels; see ``docs/models.md``).
    tissue
        Tissue name for the conditional prompt ``"This is a {tissue} H&E image"``; ``None`` keeps the model's own
        prompt.
    tile_size
        Edge of the square tiles (pixels of ``input_key``) the model sees; a multiple of 8. Default: the tile size
        the model was trained on (256 for the shipped model, 512 for SD-Turbo checkpoints).
    overlap
        Pixels shared by neighbouring tiles, blended with a smooth window. Default: a quarter of ``tile_size``.
    batch_size
        Tiles per model call. Default: 8 on a GPU, 1 on the CPU (batching does not pay on the CPU).
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ...
    n_samples
        Number of stochastic samples (pix2pix-turbo's noise map blended by ``r``). With ``n_samples > 1`` the mean
        is written to ``key_added`` and the per-pixel spread to ``{key_added}_uncertainty``.
    r
        pix2pix-turbo's blend of input latent and noise in ``[0, 1]``: 1 is deterministic, lower values give more
        varied samples. ``None``: 1 for one sample, 0.5 (or the model's recorded value) for several.
    seed
        Seed of the noise maps; the same seed gives the same image.
    chunk
        Edge of the blocks computed at a time (pixels); peak memory depends on it, not on the slide size. For
        ``method="diffusion"`` the default is a multiple of the tile stride near 1024 (CPU) or 2048 (GPU) pixels.
    key_added
        Name of the new image element.
    overwrite
        Replace an existing image named ``key_added`` (never ``input_key``, an element the picture is made from, or
        an element of another type). With ``n_samples > 1`` the image and its uncertainty are stored together.
    progress
        Show a progress bar.
    lazy
        ``method="diffusion"``: ``False`` (default) runs the model now, block by block, and stores the result
        (in memory, or in a temporary zarr store for outputs over 1 GB); ``True`` returns a dask-backed element
        that runs the model whenever it is computed (for out-of-core or distributed use; every computation, e.g.
        each pyramid level written, runs the model again). Write it into a backed object's store with
        :func:`st2he.io.write_element`: a failure while it computes then leaves nothing half-written on disk.
    palette_mismatch
        ``method="diffusion"``: what to do when ``input_key`` was drawn with other gene colours than the model was
        trained with (in the picture colours mean genes, so a model reads another palette's colours as other
        genes). ``"redraw"`` (default): draw the picture again from the same molecules and stain with every
        parameter recorded for it but the model's palette (genes the model never saw are left out, with a
        warning), store it as ``{key_added}_input`` next to the virtual H&E and generate from it; the input
        picture itself is kept as it is. ``"error"``: refuse. ``"warn"``: use the picture as it is, with a warning.
        A model that shares no gene with the picture is refused (``"warn"``: used with a warning), unless it was
        trained with the panel-independent ``palette="lineage"`` (``model.metadata["palette_method"]``): such a
        model takes a picture drawn with ``palette="lineage"`` on any panel as it is, and ``"redraw"`` draws any
        other picture again with the lineage palette computed on the picture's own panel (every gene drawn kept;
        genes outside the lineage marker table are placed by co-expression, over the cells of a table of the object
        that covers them as in a direct drawing, else over spatial bins of the molecules).

    Returns
    -------
    The new image element, ``sdata.images[key_added]`` (a multiscale uint8 RGB image carrying the transformation of
    ``input_key``).
    """
    if method not in _METHODS:
        msg = f"method must be one of {_METHODS}, got {method!r}."
        raise ValueError(msg)
    check_key_free(sdata, key_added, overwrite=overwrite, kind="images", inputs={input_key})
    data, grid = get_image(sdata, input_key, parameter="input_key")

    if method == "stain":
        from ._stain import stain_he

        kwargs = {} if chunk is None else {"chunk": chunk}
        rgb = stain_he(sdata, input_key=input_key, **kwargs)
        params = {"method": "stain", "input_key": input_key}
        # the baseline reads the stain and the molecules the input picture was drawn from, lazily
        made_from = get_params(sdata, input_key)
        inputs = {input_key} | {made_from[k] for k in ("points_key", "stain_key") if made_from.get(k)}
        return add_image(sdata, key_added, rgb, grid, overwrite=overwrite, inputs=inputs, params=params)

    from ._generate import generate_he

    return generate_he(
        sdata,
        data,
        grid,
        input_key=input_key,
        model=model,
        tissue=tissue,
        tile_size=tile_size,
        overlap=overlap,
        batch_size=batch_size,
        device=device,
        n_samples=n_samples,
        r=r,
        seed=seed,
        chunk=chunk,
        key_added=key_added,
        overwrite=overwrite,
        progress=progress,
        lazy=lazy,
        palette_mismatch=palette_mismatch,
    )
