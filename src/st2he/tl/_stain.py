"""The stain-model baseline for virtual H&E: nuclear stain -> haematoxylin, transcript density -> eosin.

It uses the Beer-Lambert model that renders the ground-truth H&E of :func:`st2he.datasets.synthetic_tissue`
(:mod:`st2he.datasets._stain_model`). It sees only the nuclear stain and how many molecules lie where, not which
genes they are; whatever of the histology only gene identity predicts (cytoplasm tint per cell type, mucin,
keratin, red cells, collagen fibres between cells) it cannot draw. A learned model that reads the gene colours
of the input picture should beat it.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from st2he._elements import get_image, get_params
from st2he._grid import Grid
from st2he.datasets._stain_model import concentrations_to_od, od_to_rgb

logger = logging.getLogger("st2he")

#: Pixel size (µm) of the coarse density map that calibrates ``density_scale``.
_CALIBRATION_PIXEL_UM = 4.0


def stain_he(
    sdata,
    *,
    input_key: str = "st2he_input",
    chunk: int = 1024,
    haematoxylin: float = 2.0,
    eosin: float = 0.8,
    sigma_um: float = 1.5,
    density_scale: float | None = None,
    stain_floor: float = 0.05,
):
    """Render a virtual H&E from the nuclear stain and the molecule density with the Beer-Lambert stain model.

    The output lies on the pixel grid of ``sdata.images[input_key]`` and is made from the same sources as that
    picture (the parameters :func:`st2he.pp.rasterize_transcripts` recorded for it: ``points_key``, ``stain_key``,
    ``min_qv``, ``drop_controls``):

    - haematoxylin concentration ``haematoxylin * (s - stain_floor) / (1 - stain_floor)`` (0 below the floor)
      from the nuclear stain ``s`` in [0, 1] (robustly normalised; nuclei drawn from boundaries when there is no
      stain image): the floor keeps the dim background of a fluorescence image out of the haematoxylin;
    - eosin concentration ``eosin * (1 - exp(-rho / density_scale))`` from the molecule density ``rho``
      (molecules per µm², smoothed by a Gaussian of ``sigma_um``): the cytoplasm;
    - RGB ``= 255 exp(-OD)`` with ``OD = c_H v_H + c_E v_E`` (Ruifrok-Johnston stain vectors). Where there is
      neither stain nor molecules the image is the white of bare glass.

    The result is computed lazily, chunk by chunk (the smoothing with ``map_overlap``).

    Parameters
    ----------
    sdata
        SpatialData object holding the input picture and the molecules and stain it was made from.
    input_key
        Image element whose grid (and recorded sources) the virtual H&E takes.
    chunk
        Chunk edge in pixels; peak memory grows with it, not with the slide.
    haematoxylin
        Haematoxylin concentration (optical density units) of the brightest nuclear stain.
    eosin
        Eosin concentration of densely transcribed tissue.
    sigma_um
        Smoothing of the molecule density, in µm.
    density_scale
        Molecule density (per µm²) at which eosin reaches 63% of ``eosin``. Default: estimated from the data, the
        median density over the 4 µm squares that hold molecules.
    stain_floor
        Normalised nuclear stain below which there is no haematoxylin (background glow, autofluorescence).

    Returns
    -------
    A lazy dask array ``(3, height, width)`` of uint8 RGB on the grid of ``input_key``.
    """
    import dask.array as da

    from st2he.pp._rasterize import density_layer, nuclear_stain_layer

    _, grid = get_image(sdata, input_key, parameter="input_key")
    if int(chunk) != chunk or chunk < 16:
        msg = f"chunk must be a whole number of pixels >= 16, got {chunk!r}."
        raise ValueError(msg)
    chunk = int(chunk)
    for name, value in (("haematoxylin", haematoxylin), ("eosin", eosin), ("sigma_um", sigma_um)):
        if not (np.isfinite(value) and value >= 0):
            msg = f"{name} must be a non-negative number, got {value!r}."
            raise ValueError(msg)
    if not (0 <= stain_floor < 1):
        msg = f"stain_floor must be in [0, 1), got {stain_floor!r}."
        raise ValueError(msg)
    params = get_params(sdata, input_key)
    stain_key = params.get("stain_key", "auto") if params else "auto"
    points_key = params.get("points_key", "transcripts") if params else "transcripts"
    min_qv = params.get("min_qv", 20.0)
    drop_controls = params.get("drop_controls", True)

    stain = nuclear_stain_layer(sdata, grid, stain_key=stain_key, chunk=chunk)
    stain = stain.rechunk((chunk, chunk))

    area = grid.pixel_size**2
    if points_key is not None and points_key in sdata.points:
        counts = density_layer(
            sdata, grid, points_key=points_key, min_qv=min_qv, drop_controls=drop_controls, chunk=chunk
        )[0]
        density = counts.rechunk((chunk, chunk)).astype(np.float32) / np.float32(area)
        if density_scale is None:
            density_scale = _estimate_density_scale(sdata, grid, points_key, min_qv, drop_controls)
    else:
        logger.info("stain_he: no molecules (points_key=%r); eosin is left out.", points_key)
        density = da.zeros(grid.shape, dtype=np.float32, chunks=chunk)
        density_scale = 1.0 if density_scale is None else density_scale
    if not (np.isfinite(density_scale) and density_scale > 0):
        msg = f"density_scale must be a positive number of molecules per µm², got {density_scale!r}."
        raise ValueError(msg)

    sigma_px = sigma_um / grid.pixel_size
    if sigma_px > 0:
        depth = min(max(1, math.ceil(4 * sigma_px)), max(1, min(grid.shape)))
        density = density.map_overlap(
            _smooth, depth=depth, boundary=0.0, sigma=sigma_px, dtype=np.float32, meta=np.empty((0, 0), np.float32)
        )
    # map_overlap may rechunk small edge chunks: align the blocks of both layers
    density = density.rechunk(stain.chunks)
    return da.map_blocks(
        _render_block,
        stain,
        density,
        h_max=float(haematoxylin),
        floor=float(stain_floor),
        e_max=float(eosin),
        scale=float(density_scale),
        new_axis=0,
        chunks=((3,), *stain.chunks),
        dtype=np.uint8,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
    )


def _smooth(block: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(block.astype(np.float32), sigma, mode="constant", cval=0.0)


def _render_block(
    stain: np.ndarray, density: np.ndarray, *, h_max: float, floor: float, e_max: float, scale: float
) -> np.ndarray:
    h = np.float32(h_max) * np.clip((stain - np.float32(floor)) / np.float32(1 - floor), 0.0, 1.0)
    e = np.float32(e_max) * (1.0 - np.exp(-np.clip(density, 0.0, None) / np.float32(scale)))
    return od_to_rgb(concentrations_to_od(np.stack([h, e]).astype(np.float32)))


def _estimate_density_scale(sdata, grid: Grid, points_key, min_qv, drop_controls) -> float:
    """Median molecule density (per µm²) over the coarse squares of the grid's region that hold molecules."""
    from st2he.pp._rasterize import density_layer

    x0, y0, x1, y1 = grid.bounds
    coarse = Grid.from_bounds(x0, y0, x1, y1, max(_CALIBRATION_PIXEL_UM, grid.pixel_size))
    counts = density_layer(
        sdata, coarse, points_key=points_key, min_qv=min_qv, drop_controls=drop_controls, chunk=2048
    )[0].compute()
    density = counts[counts > 0] / coarse.pixel_size**2
    if density.size == 0:
        return 1.0
    return float(np.median(density))
