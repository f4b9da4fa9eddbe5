"""Registration of an H&E image onto the nuclear stain of the same section.

The H&E's haematoxylin (colour deconvolution) and the nuclear stain (DAPI) both show nuclei, so they are compared
directly: normalised cross-correlation of the two, coarse to fine.

1. A global search at a coarse pixel size (about 300 px across the stain): every flip, rotations in 10 degree steps
   and a few scales; for each, the best translation by phase correlation; the best candidate by correlation.
2. Refinement of a rigid (rotation, translation) or affine (6 parameters) transformation by maximising the
   correlation (Powell's method) on finer and finer pixel sizes.
3. ``"elastic"``: a smooth displacement field on top of the affine, from optical flow (TV-L1) between the stain
   and the affinely placed haematoxylin, smoothed over ``smoothness_um``.

All of it happens in micrometres: the H&E is read through its current transformation (whatever it is, rotations
included), and the correction found is composed with it, so an H&E that is only roughly placed (or placed only by
its pixel size) is brought onto the stain.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from st2he._grid import COORDINATE_SYSTEM, Grid
from st2he._raster import Raster

logger = logging.getLogger("st2he")

TRANSFORMS = ("rigid", "affine", "elastic")
#: Rotation step (degrees) of the global search; the refinement corrects the rest.
ANGLE_STEP = 10


@dataclass
class _Frame:
    """An image read on an axis-aligned µm grid, normalised to [0, 1], with its tissue mask."""

    values: np.ndarray
    grid: Grid
    valid: np.ndarray


def register_he(
    sdata,
    *,
    he_key: str = "he_image",
    stain_key: str = "auto",
    transform: str = "affine",
    pixel_size: float | None = None,
    scales: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.25),
    max_residual_um: float = 10.0,
    min_overlap: float = 0.5,
    smoothness_um: float = 100.0,
    coordinate_system: str = COORDINATE_SYSTEM,
    key_added: str | None = None,
    overwrite: bool = False,
) -> pd.Series:
    """Register an H&E image onto the nuclear stain of the same section, and place it there.

    Parameters
    ----------
    sdata
        SpatialData object with the H&E and the nuclear stain.
    he_key
        The H&E image (RGB). Its current transformation is the starting point: it may be only roughly right
        (any rotation, flip, scale within ``scales`` and shift are found).
    stain_key
        The nuclear stain image; ``"auto"`` picks it as :func:`st2he.pp.rasterize_transcripts` does.
    transform
        ``"rigid"`` (rotation, flip and translation; the scale stays that of the starting point), ``"affine"``
        (any affine map) or ``"elastic"`` (affine plus a smooth displacement field).
    pixel_size
        Finest pixel size (µm) of the refinement; default: the coarser of 1 µm and the two images' own pixels.
    scales
        Scales tried by the global search, relative to the H&E's current scale.
    max_residual_um
        Refuse (raise, write nothing) when the residual misalignment left, measured patch by patch, is larger.
    min_overlap
        Refuse when less than this fraction of the stain's tissue is covered by the registered H&E's tissue.
    smoothness_um
        ``"elastic"``: scale (Gaussian sigma, µm) over which the displacement field is smoothed.
    coordinate_system
        The coordinate system both images are read in and the transformation is written to.
    key_added
        ``"elastic"`` only: name of the displacement field element (default ``f"{he_key}_displacement"``), an
        image of channels ``dx, dy`` (µm to add to a position of the stain to reach the affinely placed H&E)
        over the stain's grid.
    overwrite
        Replace an existing displacement element.

    Returns
    -------
    The report as a :class:`pandas.Series`: ``flip``, ``rotation_deg``, ``scale``, ``matrix`` (the 3x3 correction
    applied in µm), ``correlation`` (before and after), ``residual_um`` (RMS over patches), ``overlap``,
    ``n_patches``; also recorded in ``sdata.attrs["st2he"][he_key]["registration"]``. The H&E element's
    transformation to ``coordinate_system`` is replaced by the registered one (the element's pixels are not
    touched; save a backed object's transformations with ``sdata.write_transformations(he_key)``).
    """
    from spatialdata.transformations import get_transformation, set_transformation

    from st2he._elements import check_key_free, get_params, record_params
    from st2he.io._common import simplify
    from st2he.pp._rasterize import _auto_stain_image

    if transform not in TRANSFORMS:
        msg = f"transform must be one of {TRANSFORMS}, got {transform!r}."
        raise ValueError(msg)
    if he_key not in sdata.images:
        msg = f"he_key={he_key!r} is not an image of this object; its images are {sorted(sdata.images)}."
        raise KeyError(msg)
    if stain_key == "auto":
        stain_key = _auto_stain_image(sdata)
        if stain_key is None:
            msg = (
                f"No nuclear stain image to register {he_key!r} to; its images are {sorted(sdata.images)}. Pass "
                "stain_key= (the DAPI image)."
            )
            raise ValueError(msg)
    if stain_key not in sdata.images:
        msg = f"stain_key={stain_key!r} is not an image of this object; its images are {sorted(sdata.images)}."
        raise KeyError(msg)
    displacement_key = key_added or f"{he_key}_displacement"
    if transform == "elastic":
        check_key_free(sdata, displacement_key, overwrite=overwrite, kind="images", inputs={he_key, stain_key})

    he = Raster(sdata.images[he_key], coordinate_system, name=repr(he_key))
    stain = Raster(sdata.images[stain_key], coordinate_system, name=repr(stain_key))
    he.check_rgb(what=f"he_key={he_key!r}", step="register_he")
    finest = pixel_size if pixel_size is not None else max(1.0, he.pixel_size, stain.pixel_size)
    extent = stain.bounds
    span = max(extent[2] - extent[0], extent[3] - extent[1])
    coarse = max(finest, span / 300.0)

    # global search on the coarse level
    fixed = _stain_frame(stain, extent, coarse)
    moving = _he_frame(he, coarse)
    before = _ncc(fixed, moving, np.eye(3))
    best = _global_search(fixed, moving, scales)
    flip, angle, scale, matrix = best["flip"], best["angle"], best["scale"], best["matrix"]
    logger.info(
        "register_he: global search: flip=%s rotation=%.0f scale=%.2f correlation %.3f",
        flip,
        angle,
        scale,
        best["score"],
    )

    # refinement, coarse to fine
    size = coarse  # the global search's frames are the first level's
    while True:
        matrix = _refine(fixed, moving, matrix, rigid=transform == "rigid")
        if size <= finest * 1.001:
            break
        size = finest if size / 2 < finest * 1.5 else size / 2
        fixed = _stain_frame(stain, extent, size)
        moving = _he_frame(he, size)
    after = _ncc(fixed, moving, matrix)
    residual, n_patches = _residual(fixed, moving, matrix)
    overlap = _overlap(fixed, moving, matrix)
    report = {
        "flip": bool(flip),
        "rotation_deg": float(math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))),
        "scale": float(math.sqrt(abs(np.linalg.det(matrix[:2, :2])))),
        "matrix": matrix.tolist(),
        "correlation_before": float(before),
        "correlation": float(after),
        "residual_um": float(residual),
        "overlap": float(overlap),
        "n_patches": int(n_patches),
        "pixel_size": float(size),
        "transform": transform,
        "stain_key": stain_key,
    }
    if not (residual <= max_residual_um and overlap >= min_overlap):
        msg = (
            f"Registration of {he_key!r} onto {stain_key!r} failed its checks (residual {residual:.1f} µm over "
            f"{n_patches} patches, limit {max_residual_um:g}; overlap {overlap:.0%} of the stain's tissue, least "
            f"{min_overlap:.0%}; correlation {after:.2f}). Nothing was written. Check that both images are of the "
            "same section, give a closer starting placement, or widen scales=."
        )
        raise ValueError(msg)

    displacement = None
    if transform == "elastic":
        displacement = _elastic(fixed, moving, matrix, smoothness_um)
        report["elastic_rms_um"] = float(np.sqrt(np.mean(np.sum(displacement**2, axis=0))))

    # place the H&E: its transformation composed with the correction (µm of the moving frame -> µm of the stain)
    element = sdata.images[he_key]
    old = get_transformation(element, coordinate_system).to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    set_transformation(element, simplify(matrix @ old), to_coordinate_system=coordinate_system)
    if displacement is not None:
        from st2he._elements import add_image

        add_image(
            sdata,
            displacement_key,
            displacement.astype(np.float32),
            fixed.grid,
            c_coords=["dx", "dy"],
            overwrite=overwrite,
            params={"of": he_key, "what": "µm from a stain position to the affinely registered H&E"},
        )
    params = dict(get_params(sdata, he_key))
    params["registration"] = report
    record_params(sdata, he_key, params)
    logger.info(
        "register_he: %s registered onto %s: residual %.2f µm, overlap %.0f%%", he_key, stain_key, residual, overlap * 100
    )
    return pd.Series(report, name=he_key)


# ------------------------------------------------------------------------------------------------- frames


def _normalise(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    if not valid.any():
        return np.zeros_like(values, dtype=np.float32)
    lo, hi = np.percentile(values[valid], (1.0, 99.5))
    if not hi > lo:
        hi = lo + 1.0
    return np.clip((values - lo) / (hi - lo), 0, 1).astype(np.float32)


def _stain_frame(stain: Raster, extent, size: float) -> _Frame:
    from st2he.pp._rasterize import _nuclear_channel

    channel = _nuclear_channel(stain.level0)
    grid = Grid.from_bounds(*extent, size)
    values = stain.read(grid, channels=[channel], fill=np.nan)[0].astype(np.float64)
    valid = np.isfinite(values)
    values = np.where(valid, values, 0.0)
    return _Frame(_normalise(values, valid), grid, valid)


def _he_frame(he: Raster, size: float) -> _Frame:
    """The haematoxylin of the H&E on a µm grid over its footprint (through its current transformation)."""
    from skimage.color import rgb2hed

    grid = Grid.from_bounds(*he.bounds, size)
    rgb = he.read(grid, channels=[0, 1, 2], fill=np.nan)
    valid = np.isfinite(rgb).all(axis=0)
    rgb = np.where(valid, rgb, 255.0)
    hed = rgb2hed(np.clip(np.moveaxis(rgb, 0, -1) / 255.0, 0, 1))
    values = hed[..., 0]
    return _Frame(_normalise(values, valid), grid, valid)


def _index_map(fixed: _Frame, moving: _Frame, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(M, offset)`` for scipy's affine_transform: fixed pixel (row, col) -> moving pixel (row, col).

    ``matrix`` maps moving µm to fixed µm; its inverse takes a fixed pixel centre to the moving frame.
    """
    fg, mg = fixed.grid, moving.grid
    # fixed pixel (row, col) -> fixed µm (x, y)
    f_px = np.array([[0, fg.pixel_size, fg.x0 + 0.5 * fg.pixel_size], [fg.pixel_size, 0, fg.y0 + 0.5 * fg.pixel_size], [0, 0, 1]])
    # moving µm (x, y) -> moving pixel (row, col)
    m_px = np.array(
        [[0, 1 / mg.pixel_size, -mg.y0 / mg.pixel_size - 0.5], [1 / mg.pixel_size, 0, -mg.x0 / mg.pixel_size - 0.5], [0, 0, 1]]
    )
    full = m_px @ np.linalg.inv(matrix) @ f_px
    return full[:2, :2], full[:2, 2]


def _warp(fixed: _Frame, moving: _Frame, matrix: np.ndarray, values: np.ndarray | None = None, order: int = 1):
    from scipy.ndimage import affine_transform

    m, off = _index_map(fixed, moving, matrix)
    src = moving.values if values is None else values
    return affine_transform(src, m, offset=off, output_shape=fixed.values.shape, order=order, cval=np.nan)


def _ncc(fixed: _Frame, moving: _Frame, matrix: np.ndarray) -> float:
    warped = _warp(fixed, moving, matrix)
    both = np.isfinite(warped) & fixed.valid
    if both.sum() < 100:
        return -1.0
    a = fixed.values[both].astype(np.float64)
    b = warped[both].astype(np.float64)
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    if denom == 0:
        return -1.0
    # weight by the overlap so that a correction moving the H&E off the stain is not rewarded
    return float((a * b).sum() / denom) * min(1.0, both.sum() / max(fixed.valid.sum(), 1) / 0.5)


def _about(centre: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """3x3 matrix applying ``linear`` about ``centre`` (µm)."""
    m = np.eye(3)
    m[:2, :2] = linear
    m[:2, 2] = centre - linear @ centre
    return m


def _global_search(fixed: _Frame, moving: _Frame, scales) -> dict:
    from skimage.registration import phase_cross_correlation

    fg, mg = fixed.grid, moving.grid
    f_centre = np.array([fg.x0 + fg.width * fg.pixel_size / 2, fg.y0 + fg.height * fg.pixel_size / 2])
    m_centre = np.array([mg.x0 + mg.width * mg.pixel_size / 2, mg.y0 + mg.height * mg.pixel_size / 2])
    to_centre = np.eye(3)
    to_centre[:2, 2] = f_centre - m_centre
    best = {"score": -np.inf}
    for flip in (False, True):
        for angle in range(0, 360, ANGLE_STEP):
            t = math.radians(angle)
            rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
            if flip:
                rot = rot @ np.diag([-1.0, 1.0])
            for scale in scales:
                base = to_centre @ _about(m_centre, scale * rot)
                warped = _warp(fixed, moving, base)
                filled = np.nan_to_num(warped, nan=0.0)
                shift, _, _ = phase_cross_correlation(fixed.values, filled, normalization=None)
                move = np.eye(3)
                move[:2, 2] = (shift[1] * fg.pixel_size, shift[0] * fg.pixel_size)
                candidate = move @ base
                score = _ncc(fixed, moving, candidate)
                if score > best["score"]:
                    best = {"score": score, "flip": flip, "angle": angle, "scale": scale, "matrix": candidate}
    return best


def _refine(fixed: _Frame, moving: _Frame, matrix: np.ndarray, *, rigid: bool) -> np.ndarray:
    """Maximise the correlation over a rigid or affine correction of ``matrix`` (Powell's method)."""
    from scipy.optimize import minimize

    fg = fixed.grid
    centre = np.array([fg.x0 + fg.width * fg.pixel_size / 2, fg.y0 + fg.height * fg.pixel_size / 2])
    span = max(fg.width, fg.height) * fg.pixel_size

    def correction(p):
        if rigid:
            t, dx, dy = p
            lin = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        else:
            a, b, c, d, dx, dy = p
            lin = np.array([[1 + a, b], [c, 1 + d]])
        m = _about(centre, lin)
        m[:2, 2] += (dx * fg.pixel_size, dy * fg.pixel_size)
        return m

    # parameters scaled so that a unit step moves the image's edge by about one pixel
    unit = fg.pixel_size / (span / 2)

    def cost(p):
        q = np.asarray(p, dtype=float).copy()
        if rigid:
            q[0] *= unit
        else:
            q[:4] *= unit
        return -_ncc(fixed, moving, correction(q) @ matrix)

    x0 = np.zeros(3 if rigid else 6)
    result = minimize(cost, x0, method="Powell", options={"xtol": 0.1, "ftol": 1e-5, "maxfev": 1500})
    q = np.asarray(result.x, dtype=float)
    if rigid:
        q[0] *= unit
    else:
        q[:4] *= unit
    refined = correction(q) @ matrix
    return refined if -result.fun >= _ncc(fixed, moving, matrix) else matrix


def _residual(fixed: _Frame, moving: _Frame, matrix: np.ndarray, patch: int = 48) -> tuple[float, int]:
    """RMS (µm) of the shifts left between the stain and the registered haematoxylin, patch by patch."""
    from skimage.registration import phase_cross_correlation

    warped = _warp(fixed, moving, matrix)
    h, w = fixed.values.shape
    shifts = []
    for r in range(0, h - patch + 1, patch):
        for c in range(0, w - patch + 1, patch):
            a = fixed.values[r : r + patch, c : c + patch]
            b = warped[r : r + patch, c : c + patch]
            if not np.isfinite(b).all() or not fixed.valid[r : r + patch, c : c + patch].all():
                continue
            if a.std() < 0.05 or b.std() < 0.05:  # no structure to measure a shift on
                continue
            shift, _, _ = phase_cross_correlation(a, b, upsample_factor=10, normalization=None)
            if np.hypot(*shift) < patch / 4:  # a wild shift is a failed match, not a residual
                shifts.append(shift)
    if not shifts:
        return math.inf, 0
    s = np.asarray(shifts) * fixed.grid.pixel_size
    return float(np.sqrt(np.mean(np.sum(s**2, axis=1)))), len(shifts)


def _overlap(fixed: _Frame, moving: _Frame, matrix: np.ndarray) -> float:
    """Fraction of the stain's tissue (a smoothed foreground) that the registered H&E's tissue covers."""
    from scipy.ndimage import gaussian_filter
    from skimage.filters import threshold_otsu

    f = gaussian_filter(fixed.values, 2)
    if f.max() <= f.min():
        return 0.0
    f_tissue = f > threshold_otsu(f)
    inside = np.isfinite(_warp(fixed, moving, matrix, values=np.where(moving.valid, 1.0, np.nan), order=0))
    return float((f_tissue & inside).sum() / max(f_tissue.sum(), 1))


def _elastic(fixed: _Frame, moving: _Frame, matrix: np.ndarray, smoothness_um: float, rounds: int = 4) -> np.ndarray:
    """Smooth displacement (µm, ``(2, h, w)`` as dx, dy) from the stain's grid to the affinely placed H&E.

    The shift left between the stain and the placed haematoxylin is measured in overlapping windowed patches
    (phase correlation to a tenth of a pixel; patches without structure or with a wild shift are skipped), spread
    over the grid by normalised Gaussian smoothing of scale ``smoothness_um``, and the haematoxylin is warped by
    the field found; this is repeated ``rounds`` times, each round measuring what the field still misses.
    """
    from scipy.ndimage import gaussian_filter, map_coordinates
    from skimage.registration import phase_cross_correlation

    placed = _warp(fixed, moving, matrix)
    h, w = fixed.values.shape
    size = fixed.grid.pixel_size
    patch = int(min(max(16, round(smoothness_um / size)), 64))
    step = max(4, patch // 2)
    window = np.outer(np.hanning(patch), np.hanning(patch))
    sigma = smoothness_um / size
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    field = np.zeros((2, h, w))
    for _ in range(rounds):
        current = map_coordinates(placed, [rows + field[1] / size, cols + field[0] / size], order=1, cval=np.nan)
        sums = np.zeros((3, h, w))
        for r in range(0, h - patch + 1, step):
            for c in range(0, w - patch + 1, step):
                a = fixed.values[r : r + patch, c : c + patch]
                b = current[r : r + patch, c : c + patch]
                if not np.isfinite(b).all() or not fixed.valid[r : r + patch, c : c + patch].all():
                    continue
                if a.std() < 0.05 or b.std() < 0.05:
                    continue
                shift, _, _ = phase_cross_correlation(
                    (a - a.mean()) * window, (b - b.mean()) * window, upsample_factor=10, normalization=None
                )
                if np.hypot(*shift) >= patch / 4:
                    continue
                # stain(x) = current(x - shift): the H&E lies a further -shift away
                rc, cc = r + patch // 2, c + patch // 2
                sums[0, rc, cc] += -shift[1] * size
                sums[1, rc, cc] += -shift[0] * size
                sums[2, rc, cc] += 1.0
        if not sums[2].any():
            break
        weight = gaussian_filter(sums[2], sigma, mode="nearest")
        floor = weight.max() * 1e-3
        field[0] += gaussian_filter(sums[0], sigma, mode="nearest") / np.maximum(weight, floor)
        field[1] += gaussian_filter(sums[1], sigma, mode="nearest") / np.maximum(weight, floor)
    return field
