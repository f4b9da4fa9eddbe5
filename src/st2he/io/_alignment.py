"""Xenium Explorer's image alignment files: an H&E (or any post-run image) placed over the molecules.

Xenium Explorer exports two CSV files when an image is aligned to a run:

- the *image alignment file* (``*_imagealignment.csv``): a 3x3 affine matrix, no header, that maps the image's
  pixel coordinates ``(x = column, y = row, 1)`` to the morphology image's pixel coordinates (0.2125 µm per
  pixel; spatialdata-io's ``xenium_aligned_image`` reads it the same way);
- the *keypoints file* (``*_keypoints.csv``): the landmark pairs the alignment was fitted on, columns
  ``fixedX, fixedY`` (the run, in µm) and ``alignmentX, alignmentY`` (the image, in pixels).

st2he turns the matrix into µm (``diag(pixel_size, pixel_size, 1) @ M``) and, when the keypoints are given,
checks it against them: the residual of the landmarks tells whether the matrix was written in morphology pixels
(the documented form) or already in µm, and how well the image fits the run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger("st2he")

#: Keypoint residual (RMS, µm) above which an alignment is reported as poor.
POOR_FIT_UM = 20.0


def read_alignment_matrix(path: str | Path) -> np.ndarray:
    """The 3x3 affine matrix of a Xenium Explorer image alignment CSV, validated."""
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"Alignment file not found: {str(path)!r}. Give the *_imagealignment.csv Xenium Explorer exported."
        raise FileNotFoundError(msg)
    try:
        values = pd.read_csv(path, header=None).to_numpy(dtype=float)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        msg = f"{str(path)!r} is not a 3x3 matrix of numbers ({err}); it should be Xenium Explorer's alignment CSV."
        raise ValueError(msg) from err
    if values.shape != (3, 3) or not np.isfinite(values).all():
        msg = (
            f"{str(path)!r} holds a {values.shape[0]}x{values.shape[1] if values.ndim == 2 else 0} table; an image "
            "alignment file is a 3x3 affine matrix (no header) with finite values."
        )
        raise ValueError(msg)
    if not np.allclose(values[2], (0.0, 0.0, 1.0), atol=1e-6):
        msg = f"The last row of {str(path)!r} is {values[2].tolist()}, not [0, 0, 1]: not an affine matrix."
        raise ValueError(msg)
    if abs(np.linalg.det(values[:2, :2])) < 1e-12:
        msg = f"The matrix in {str(path)!r} is singular (determinant 0): it cannot place an image."
        raise ValueError(msg)
    return values


def read_keypoints(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(image_px, run_um)`` landmark pairs of a Xenium Explorer keypoints CSV, each ``(n, 2)`` as ``(x, y)``."""
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"Keypoints file not found: {str(path)!r}. Give the *_keypoints.csv Xenium Explorer exported, or omit it."
        raise FileNotFoundError(msg)
    table = pd.read_csv(path)
    needed = ["fixedX", "fixedY", "alignmentX", "alignmentY"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        msg = f"{str(path)!r} lacks the columns {missing}; a keypoints file has {needed}. It has {list(table.columns)}."
        raise ValueError(msg)
    if len(table) < 3:
        msg = f"{str(path)!r} holds {len(table)} keypoints; at least 3 are needed to check an affine alignment."
        raise ValueError(msg)
    image = table[["alignmentX", "alignmentY"]].to_numpy(dtype=float)
    run = table[["fixedX", "fixedY"]].to_numpy(dtype=float)
    return image, run


def alignment_to_um(
    matrix: np.ndarray, pixel_size: float, keypoints: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, dict]:
    """The image-pixel -> µm matrix, and a report: which unit the matrix was in and the keypoints' residual.

    Without keypoints the matrix is taken as documented (to morphology pixels of ``pixel_size`` µm). With them,
    both readings are tried and the one that fits the landmarks is kept.
    """
    in_pixels = np.diag([pixel_size, pixel_size, 1.0]) @ matrix
    report: dict = {"matrix_units": "morphology pixels", "keypoint_rms_um": None, "n_keypoints": 0}
    if keypoints is None:
        return in_pixels, report
    image, run = keypoints
    homogeneous = np.c_[image, np.ones(len(image))]

    def rms_dist(m):
        mapped = (homogeneous @ m.T)[:, :2]
        return float(np.sqrt(np.mean(np.sum((mapped - run) ** 2, axis=1))))

    fits = {"morphology pixels": (in_pixels, rms_dist(in_pixels)), "micrometres": (matrix, rms_dist(matrix))}
    units = min(fits, key=lambda k: fits[k][1])
    chosen, residual = fits[units]
    report.update(matrix_units=units, keypoint_rms_um=residual, n_keypoints=len(image))
    if units != "morphology pixels":
        logger.info("the alignment matrix fits the keypoints in micrometres, not morphology pixels: read it so")
    if residual > POOR_FIT_UM:
        import warnings

        msg = (
            f"The alignment matrix places the keypoints {residual:.1f} µm (RMS) from where the run has them: the "
            "image does not fit the molecules. Check that the alignment and keypoints files belong to this image "
            "and run, or align it again in Xenium Explorer."
        )
        warnings.warn(msg, UserWarning, stacklevel=3)
    return chosen, report
