"""Beer-Lambert model of brightfield H&E: stain concentrations -> optical density -> RGB.

One model serves both the simulated ground-truth H&E (:func:`st2he.datasets.synthetic_tissue`) and the physics
baseline for virtual H&E (:func:`st2he.tl._stain.stain_he`), so the two speak the same colours.

Light of intensity ``I0`` passing a stained section leaves with ``I_c = I0 * exp(-OD_c)`` in each colour channel
``c``, and the optical density is a sum over stains: ``OD_c = sum_s conc_s * v_s[c]`` with a unit absorbance
vector ``v_s`` per stain. The haematoxylin and eosin vectors are those of Ruifrok & Johnston (2001), as in
:data:`skimage.color.rgb_from_hed`. A third chromophore, haemoglobin, gives red cells their bright red; it absorbs
green and blue, not red.
"""

from __future__ import annotations

import numpy as np

#: Unit optical-density vectors (R, G, B) of the stains, rows of the stain matrix.
STAIN_VECTORS: dict[str, np.ndarray] = {
    "haematoxylin": np.array([0.65, 0.70, 0.29]),
    "eosin": np.array([0.07, 0.99, 0.11]),
    "haemoglobin": np.array([0.10, 0.72, 0.69]),
}
for _name, _vector in STAIN_VECTORS.items():
    STAIN_VECTORS[_name] = _vector / np.linalg.norm(_vector)

#: Intensity of the light that reaches the camera through bare glass (a white background).
WHITE = 255.0

#: Neutral optical density of the bare glass and mounting medium (background pixels are about 250, not 255).
GLASS_OD = 0.02


def stain_matrix(stains: tuple[str, ...] = ("haematoxylin", "eosin")) -> np.ndarray:
    """Return the ``(n_stains, 3)`` matrix of unit optical-density vectors of ``stains``."""
    unknown = [s for s in stains if s not in STAIN_VECTORS]
    if unknown:
        msg = f"Unknown stains {unknown}; known are {sorted(STAIN_VECTORS)}."
        raise ValueError(msg)
    return np.stack([STAIN_VECTORS[s] for s in stains])


def concentrations_to_od(
    concentrations: np.ndarray, stains: tuple[str, ...] = ("haematoxylin", "eosin"), *, glass_od: float = GLASS_OD
) -> np.ndarray:
    """Optical density ``(3, ...)`` of stain concentrations ``(n_stains, ...)`` (Beer-Lambert: densities add)."""
    concentrations = np.asarray(concentrations, dtype=np.float32)
    matrix = stain_matrix(stains).astype(np.float32)
    if concentrations.shape[0] != len(stains):
        msg = f"Got {concentrations.shape[0]} concentration maps for {len(stains)} stains {stains}."
        raise ValueError(msg)
    od = np.tensordot(matrix.T, concentrations, axes=([1], [0]))
    return od + np.float32(glass_od)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """uint8 RGB ``(3, ...)`` transmitted through optical density ``od`` ``(3, ...)`` (``I = I0 exp(-OD)``)."""
    od = np.clip(np.asarray(od, dtype=np.float32), 0.0, None)
    rgb = np.float32(WHITE) * np.exp(-od)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density ``(3, ...)`` of uint8 RGB ``(3, ...)``, the inverse of :func:`od_to_rgb`."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return -np.log(np.clip(rgb, 1.0, WHITE) / np.float32(WHITE))


def render_rgb(
    concentrations: np.ndarray, stains: tuple[str, ...] = ("haematoxylin", "eosin"), *, glass_od: float = GLASS_OD
) -> np.ndarray:
    """uint8 RGB ``(3, ...)`` of a section holding ``concentrations`` ``(n_stains, ...)`` of ``stains``."""
    return od_to_rgb(concentrations_to_od(concentrations, stains, glass_od=glass_od))
