"""The ``appearance="realistic"`` look of :func:`st2he.datasets.synthetic_tissue`'s H&E.

A real H&E slide differs from a clean drawing in ways a classifier picks up at once: the stains differ from lab to
lab and day to day (their hue, how much of each the section took up), the scanner has its own white level, tint,
focus and JPEG compression, chromatin and cytoplasm are grainy at several scales, stroma is made of wavy collagen
fibres with pale clefts between them, and sections are cut unevenly, fold over and tear. This module adds all of
these to the stain concentration maps the simulation draws, before the same Beer-Lambert model
(:mod:`st2he.datasets._stain_model`) turns them into light, so every colour still comes from optical densities
that add.

Everything here is drawn from its own random generators, spawned from the sample's seed: the layout, the
molecules and the DAPI image of a sample are the same in both appearances, and switching one kind of artefact off
leaves every other draw as it was.
"""

from __future__ import annotations

import io

import numpy as np
from scipy import ndimage

from st2he.datasets import _stain_model as stain

#: Expected artefacts: ``fold`` and ``tear`` are counts per mm² of section (a default 384 µm sample is 0.15 mm²),
#: ``thickness`` the standard deviation of the log section thickness (a smooth field over tens of µm).
DEFAULT_ARTEFACTS: dict[str, float] = {"fold": 2.0, "tear": 3.0, "thickness": 0.15}

#: Centres and spreads of the stain absorbance vectors (R, G, B) of real scans, as colour deconvolution
#: (Macenko) finds them in TCGA, Kather CRC and CMU-1 tiles: haematoxylin about (0.52-0.70, 0.62-0.77,
#: 0.32-0.41), eosin about (0.22-0.25, 0.85-0.89, 0.38-0.46). Vectors are drawn around these and normalised.
_H_CENTRE, _H_SPREAD = np.array([0.55, 0.72, 0.42]), np.array([0.06, 0.04, 0.04])
_E_CENTRE, _E_SPREAD = np.array([0.24, 0.86, 0.45]), np.array([0.05, 0.03, 0.06])

_STREAM = {
    "stain": 1,
    "texture": 2,
    "fold": 3,
    "tear": 4,
    "thickness": 5,
    "scanner": 6,
    "noise": 7,
    "nuclei": 8,
    "nuclear_molecules": 9,
}


def check_artefacts(artefacts) -> dict[str, float]:
    """Merge ``artefacts`` (``None`` or a dict of rates) with :data:`DEFAULT_ARTEFACTS`, checking the keys."""
    out = dict(DEFAULT_ARTEFACTS)
    if artefacts is None:
        return out
    if not isinstance(artefacts, dict):
        msg = f"artefacts must be a dict like {DEFAULT_ARTEFACTS} (or None for those defaults), got {artefacts!r}."
        raise TypeError(msg)
    unknown = sorted(set(artefacts) - set(DEFAULT_ARTEFACTS))
    if unknown:
        msg = f"Unknown artefacts {unknown} in artefacts=; known are {sorted(DEFAULT_ARTEFACTS)}."
        raise ValueError(msg)
    for key, value in artefacts.items():
        if not (np.isfinite(value) and value >= 0):
            msg = f"artefacts[{key!r}] must be a non-negative number, got {value!r}."
            raise ValueError(msg)
        out[key] = float(value)
    return out


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5EA1, _STREAM[stream]])


def draw_look(seed: int) -> dict:
    """Stain and scanner parameters of one sample (drawn from its seed)."""
    rng = _rng(seed, "stain")
    h = np.clip(_H_CENTRE + rng.normal(0, 1, 3) * _H_SPREAD, 0.05, None)
    e = np.clip(_E_CENTRE + rng.normal(0, 1, 3) * _E_SPREAD, 0.02, None)
    # haemoglobin keeps its own absorbance (red cells are bright red in every lab)
    look = {
        "haematoxylin": (h / np.linalg.norm(h)).tolist(),
        "eosin": (e / np.linalg.norm(e)).tolist(),
        "h_intensity": float(np.exp(rng.normal(np.log(1.25), 0.2))),
        "e_intensity": float(np.exp(rng.normal(np.log(1.8), 0.25))),
    }
    srng = _rng(seed, "scanner")
    white = srng.uniform(238.0, 255.0)
    tint = srng.normal(0.0, 3.5, 3) + np.array([1.0, -3.0, 0.5])
    look.update(
        {
            "white": np.clip(white + tint, 215.0, 255.0).tolist(),
            "blur_um": float(srng.uniform(0.2, 0.45)),
            "noise": float(srng.uniform(1.5, 3.0)),
            "jpeg_quality": int(srng.integers(70, 96)),
        }
    )
    return look


def _noise(rng, shape, sigma_px):
    """Unit-variance Gaussian-filtered white noise (float32)."""
    field = rng.standard_normal(shape, dtype=np.float32)
    if sigma_px > 0:
        ndimage.gaussian_filter(field, sigma_px, output=field, mode="reflect")
    field /= field.std() + np.float32(1e-12)
    return field


def _smooth(rng, shape, sigma_px):
    """Unit-variance smooth field with correlation length ``sigma_px`` (made on a coarse grid, then zoomed)."""
    f = max(1, int(sigma_px // 4))
    small = (max(2, -(-shape[0] // f) + 1), max(2, -(-shape[1] // f) + 1))
    field = _noise(rng, small, sigma_px / f)
    big = ndimage.zoom(field, (shape[0] / small[0] * 1.0001, shape[1] / small[1] * 1.0001), order=1)
    return big[: shape[0], : shape[1]].astype(np.float32)


def texture(seed: int, conc: np.ndarray, maps: dict, ps: float) -> None:
    """Chromatin, cytoplasm and collagen texture, in place on ``conc`` ``(3, H, W)`` (H, E, Hb concentrations).

    ``maps`` holds flat per-pixel arrays: ``label`` (nearest cell), ``in_cell``, ``ecm`` (extracellular tissue),
    ``stroma`` (collagen pixels), ``cover`` (nuclear coverage 0-1), ``direction`` (of the collagen fibres, radians)
    and per-cell ``tumour`` flags.
    """
    rng = _rng(seed, "texture")
    shape = conc.shape[1:]
    H, E = conc[0].reshape(-1), conc[1].reshape(-1)
    fine = _noise(rng, shape, 0.5).ravel()
    mid = _noise(rng, shape, 0.9 / ps).ravel()
    coarse = _noise(rng, shape, 2.5 / ps).ravel()
    label, cover = maps["label"], maps["cover"]
    n_cells = int(label.max()) + 1 if len(label) else 0

    # cytoplasm: granular at three scales
    c = maps["in_cell"]
    E[c] *= np.exp(0.25 * fine[c] + 0.2 * mid[c] + 0.12 * coarse[c])
    H[c] *= np.exp(0.15 * fine[c] + 0.10 * mid[c])
    # nuclei: stain uptake from nucleus to nucleus (hyperchromatic tumour nuclei), coarse clumped chromatin;
    # a few tumour cells retract from their nucleus (a pale perinuclear halo)
    cell_h = np.exp(rng.normal(0.0, 0.22, n_cells) + 0.12 * maps["tumour"])
    halo_cell = (rng.random(n_cells) < 0.35) & maps["tumour"]
    nuc = c & (cover > 0.01)
    w = cover[nuc]
    H[nuc] *= (0.7 * cell_h[label[nuc]]) ** w * np.exp(w * (0.25 * fine[nuc] + 0.25 * mid[nuc]))
    E[nuc] += w * 0.25 * cell_h[label[nuc]]
    ring = ndimage.gaussian_filter(cover.reshape(shape), 0.9 / ps).ravel() - cover
    ring = np.clip(ring * 2.5, 0.0, 1.0)
    halo = c & halo_cell[label] & (ring > 0.05)
    E[halo] *= 1.0 - 0.75 * ring[halo]
    H[halo] *= 1.0 - 0.75 * ring[halo]

    # stroma: long wavy collagen fibres along the local direction (smoothed across the bundles' borders, with a
    # wave), drawn by integrating noise along that direction (line-integral convolution); pale clefts between
    # bundles
    ecm = maps["stroma"]
    if ecm.any():
        theta = maps["direction"].reshape(shape)
        cos2 = ndimage.gaussian_filter(np.cos(2 * theta).astype(np.float32), 6.0 / ps)
        sin2 = ndimage.gaussian_filter(np.sin(2 * theta).astype(np.float32), 6.0 / ps)
        theta = 0.5 * np.arctan2(sin2, cos2) + 0.3 * _smooth(rng, shape, 6.0 / ps)
        rows, cols = np.nonzero(ecm.reshape(shape))
        dr, dc = np.sin(theta[rows, cols]), np.cos(theta[rows, cols])
        fine_sheet = _noise(rng, shape, 0.9)
        wide_sheet = _noise(rng, shape, 2.5 / ps)
        fibre = np.zeros(len(rows), dtype=np.float32)
        bundle = np.zeros(len(rows), dtype=np.float32)
        taps = np.arange(-8, 9) * (1.0 / ps)  # ±8 µm at 1 µm steps
        for t in taps:
            at = [rows + t * dr, cols + t * dc]
            fibre += ndimage.map_coordinates(fine_sheet, at, order=1, mode="reflect")
            bundle += ndimage.map_coordinates(wide_sheet, at, order=1, mode="reflect")
        fibre /= fibre.std() + 1e-6
        bundle /= bundle.std() + 1e-6
        density = np.clip(0.8 + 0.35 * fibre + 0.2 * bundle, 0.05, None) * np.exp(0.25 * fine[ecm] + 0.15 * coarse[ecm])
        density = density * np.clip((bundle + 1.25) / 0.3, 0.15, 1.0)
        E[ecm] = 0.45 * density
        H[ecm] = 0.03 * np.exp(0.3 * fine[ecm])


def artefacts(
    seed: int, conc: np.ndarray, tissue: np.ndarray, ps: float, rates: dict, origin=(0.0, 0.0)
) -> list[dict]:
    """Uneven thickness, folds and tears, in place on ``conc`` ``(n, H, W)``; returns what was drawn.

    Positions in what is returned are global µm (``origin`` is the global ``(x, y)`` of the image's corner).
    """
    shape = conc.shape[1:]
    height_um, width_um = shape[0] * ps, shape[1] * ps
    area_mm2 = height_um * width_um / 1e6
    drawn: list[dict] = []
    rows, cols = np.indices(shape, dtype=np.float32)
    ys, xs = (rows + 0.5) * ps, (cols + 0.5) * ps
    tissue_rc = np.argwhere(tissue.reshape(shape))

    def centre(rng):
        r, c = tissue_rc[rng.integers(len(tissue_rc))] if len(tissue_rc) else (shape[0] // 2, shape[1] // 2)
        return (c + 0.5) * ps, (r + 0.5) * ps

    if rates["thickness"] > 0:
        rng = _rng(seed, "thickness")
        field = _smooth(rng, shape, 60.0 / ps)
        conc *= np.exp(np.float32(rates["thickness"]) * field)[None]
        drawn.append({"kind": "thickness", "sd_log": rates["thickness"]})

    rng = _rng(seed, "fold")
    for _ in range(rng.poisson(rates["fold"] * area_mm2)):
        cx, cy = centre(rng)
        theta = rng.uniform(0, np.pi)
        width = rng.uniform(6.0, 18.0)
        curve = rng.normal(0, 0.004)
        nx, ny = -np.sin(theta), np.cos(theta)
        t = (xs - cx) * np.cos(theta) + (ys - cy) * np.sin(theta)
        s = (xs - cx) * nx + (ys - cy) * ny - curve * t * t
        band = (s > 0) & (s < width)
        if not band.any():
            continue
        # the tissue on the other side of the crease lies on top of this band: optical densities add
        mr = (ys[band] - 2 * s[band] * ny) / ps - 0.5
        mc = (xs[band] - 2 * s[band] * nx) / ps - 0.5
        for k in range(conc.shape[0]):
            conc[k][band] += ndimage.map_coordinates(conc[k], [mr, mc], order=1, mode="constant", cval=0.0)
        drawn.append(
            {"kind": "fold", "x": float(cx + origin[0]), "y": float(cy + origin[1]), "angle": float(theta), "width_um": float(width)}
        )

    rng = _rng(seed, "tear")
    for _ in range(rng.poisson(rates["tear"] * area_mm2)):
        cx, cy = centre(rng)
        theta = rng.uniform(0, np.pi)
        length = rng.uniform(30.0, 160.0)
        width = rng.uniform(1.2, 4.5)
        amp, freq, phase = rng.uniform(1.0, 5.0), rng.uniform(0.02, 0.08), rng.uniform(0, 2 * np.pi)
        t = (xs - cx) * np.cos(theta) + (ys - cy) * np.sin(theta)
        s = (xs - cx) * -np.sin(theta) + (ys - cy) * np.cos(theta)
        u = np.clip(t / length + 0.5, 0.0, 1.0)
        half = 0.5 * width * np.sin(np.pi * u) ** 0.6 * ((t > -length / 2) & (t < length / 2))
        off = s - amp * np.sin(2 * np.pi * freq * t + phase) - 0.8 * amp * np.sin(2 * np.pi * 2.7 * freq * t)
        crack = np.abs(off) < half
        if not crack.any():
            continue
        conc[:, crack] = 0.0
        drawn.append(
            {
                "kind": "tear",
                "x": float(cx + origin[0]),
                "y": float(cy + origin[1]),
                "angle": float(theta),
                "length_um": float(length),
                "width_um": float(width),
            }
        )
    return drawn


def scan(seed: int, conc: np.ndarray, look: dict, ps: float) -> np.ndarray:
    """Concentrations ``(3, H, W)`` (H, E, Hb) -> optical density with this sample's stains -> scanner RGB."""
    matrix = np.stack(
        [
            np.asarray(look["haematoxylin"]) * look["h_intensity"],
            np.asarray(look["eosin"]) * look["e_intensity"],
            stain.STAIN_VECTORS["haemoglobin"],
        ]
    ).astype(np.float32)
    conc = ndimage.gaussian_filter(conc, (0, look["blur_um"] / ps, look["blur_um"] / ps))
    od = np.tensordot(matrix.T, conc, axes=([1], [0])) + np.float32(stain.GLASS_OD)
    rng = _rng(seed, "noise")
    white = np.asarray(look["white"], dtype=np.float32)[:, None, None]
    rgb = white * np.exp(-np.clip(od, 0, None)) + rng.normal(0, look["noise"], od.shape).astype(np.float32)
    rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return jpeg(rgb, look["jpeg_quality"])


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """``(3, H, W)`` uint8 through a JPEG encoder at ``quality`` (as slide scanners store their tiles)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0))).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB")).transpose(2, 0, 1).copy()
