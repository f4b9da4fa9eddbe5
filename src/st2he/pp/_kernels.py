"""Compiled inner loops of the rasteriser (numba): which gene colours each pixel of one chunk."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _winner_of(ranks: np.ndarray) -> int:
    """Most frequent rank; ties go to the smallest rank."""
    k = ranks.shape[0]
    if k <= 32:
        best, best_n = -1, 0
        for i in range(k):
            r = ranks[i]
            n = 0
            for j in range(k):
                if ranks[j] == r:
                    n += 1
            if n > best_n or (n == best_n and r < best):
                best, best_n = r, n
        return best
    s = np.sort(ranks)
    best, best_n = s[0], 0
    i = 0
    while i < k:
        j = i
        while j < k and s[j] == s[i]:
            j += 1
        if j - i > best_n:  # runs come in increasing rank, so ">" keeps the smallest rank on ties
            best, best_n = s[i], j - i
        i = j
    return best


@numba.njit(cache=True, nogil=True)
def paint_winners(
    rows: np.ndarray,
    cols: np.ndarray,
    ranks: np.ndarray,
    height: int,
    width: int,
    dy: np.ndarray,
    dx: np.ndarray,
) -> np.ndarray:
    """Per pixel of a ``height`` x ``width`` chunk, the rank of the gene drawn there (``-1``: none).

    Molecule ``i`` at ``(rows[i], cols[i])`` (chunk-relative, may lie outside for dots reaching in from a
    neighbouring chunk) covers the pixels ``(rows[i] + dy[k], cols[i] + dx[k])``. A pixel covered by several
    molecules shows the gene that covers it most often; ties go to the smallest rank. The result does not
    depend on the order of the molecules, so every tiling of the slide draws the same pixels.
    """
    npix = height * width
    out = np.full(npix, -1, dtype=np.int32)
    n = rows.shape[0]
    nk = dy.shape[0]
    count = np.zeros(npix, dtype=np.int32)
    for i in range(n):
        for k in range(nk):
            r = rows[i] + dy[k]
            c = cols[i] + dx[k]
            if r < 0 or r >= height or c < 0 or c >= width:
                continue
            p = r * width + c
            count[p] += 1
            if count[p] == 1:
                out[p] = ranks[i]
            elif out[p] != ranks[i]:
                out[p] = -2  # several genes: decided below
    # pixels where different genes meet: gather their ranks (CSR) and take the most frequent
    n_multi = 0
    for p in range(npix):
        if out[p] == -2:
            n_multi += 1
    if n_multi == 0:
        return out
    slot = np.full(npix, -1, dtype=np.int64)
    total = 0
    for p in range(npix):
        if out[p] == -2:
            slot[p] = total
            total += count[p]
    fill = np.zeros(npix, dtype=np.int32)
    gathered = np.empty(total, dtype=ranks.dtype)
    for i in range(n):
        for k in range(nk):
            r = rows[i] + dy[k]
            c = cols[i] + dx[k]
            if r < 0 or r >= height or c < 0 or c >= width:
                continue
            p = r * width + c
            if slot[p] >= 0:
                gathered[slot[p] + fill[p]] = ranks[i]
                fill[p] += 1
    for p in range(npix):
        if slot[p] >= 0:
            out[p] = _winner_of(gathered[slot[p] : slot[p] + count[p]])
    return out


@numba.njit(cache=True, nogil=True)
def compose_rgb(grey: np.ndarray, winners: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """``(3, h, w)`` uint8: ``grey`` (``(h, w)`` float in [0, 1]) where no gene is drawn, else ``lut[winner]``."""
    h, w = grey.shape
    out = np.empty((3, h, w), dtype=np.uint8)
    for r in range(h):
        for c in range(w):
            g = winners[r * w + c]
            if g >= 0:
                out[0, r, c] = lut[g, 0]
                out[1, r, c] = lut[g, 1]
                out[2, r, c] = lut[g, 2]
            else:
                v = grey[r, c]
                v = 0.0 if not (v > 0.0) else (1.0 if v > 1.0 else v)
                b = np.uint8(v * 255.0 + 0.5)
                out[0, r, c] = b
                out[1, r, c] = b
                out[2, r, c] = b
    return out


def disc_footprint(dot_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets ``(dy, dx)`` of a dot ``dot_size`` pixels across, centred on the molecule's pixel."""
    if dot_size <= 1:
        return np.zeros(1, np.int32), np.zeros(1, np.int32)
    r = dot_size / 2.0
    lo = -((dot_size - 1) // 2)
    hi = dot_size // 2
    ys, xs = np.mgrid[lo : hi + 1, lo : hi + 1]
    # centre of the dot: the molecule pixel's centre, shifted half a pixel for even sizes
    cy = cx = 0.0 if dot_size % 2 else 0.5
    keep = (ys - cy + 0.0) ** 2 + (xs - cx + 0.0) ** 2 <= r * r + 1e-9
    keep |= (ys == 0) & (xs == 0)
    return ys[keep].astype(np.int32).ravel(), xs[keep].astype(np.int32).ravel()
