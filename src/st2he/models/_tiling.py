"""Whole-image inference in overlapping tiles, blended with a smooth window so that no seam shows.

The tiles lie on one global grid (starts at multiples of ``tile - overlap`` from the image origin, plus a last tile
flush with the far edge), whatever block of the image is being computed. Each output pixel is the window-weighted
mean of the tiles covering it; the window rises as ``sin^2`` over the ``overlap`` pixels at every tile side that has
a neighbour and is flat elsewhere, so neighbouring tiles fade into each other and a block computed on its own equals
the same region of a whole-image computation. An identity model therefore gives back its input exactly.

Nothing here imports spatialdata; :func:`st2he.tl.virtual_he` drives it block by block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

PredictFn = Callable[[np.ndarray, list[int]], np.ndarray]


def tile_starts(length: int, tile: int, overlap: int) -> np.ndarray:
    """Return the starts of the tiles covering ``length`` pixels (one tile at 0 when the image is not longer than a tile)."""
    if tile <= overlap:
        msg = f"overlap ({overlap}) must be smaller than the tile size ({tile})."
        raise ValueError(msg)
    if length <= tile:
        return np.array([0], dtype=np.int64)
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    if not starts or starts[-1] != length - tile:
        starts.append(length - tile)
    return np.asarray(starts, dtype=np.int64)


def ramp(overlap: int) -> np.ndarray:
    """Rising half of the blending window: ``sin^2`` from near 0 to near 1 over ``overlap`` pixels (all > 0)."""
    if overlap <= 0:
        return np.ones(0)
    i = np.arange(overlap, dtype=np.float64)
    return np.sin(0.5 * np.pi * (i + 0.5) / overlap) ** 2


def window_1d(tile: int, overlap: int, *, low_edge: bool, high_edge: bool, kind: str = "smooth") -> np.ndarray:
    """Weights along one tile axis; no ramp on a side that lies on the image border.

    ``kind="box"`` gives flat weights (plain averaging of overlapping tiles), for comparison only.
    """
    w = np.ones(tile, dtype=np.float64)
    if kind == "box":
        return w
    r = ramp(min(overlap, tile // 2))
    if len(r):
        if not low_edge:
            w[: len(r)] = r
        if not high_edge:
            w[tile - len(r) :] = r[::-1]
    return w


def tiles_for_region(
    full_shape: tuple[int, int], region: tuple[int, int, int, int], tile: int, overlap: int
) -> list[tuple[int, int]]:
    """Global ``(row0, col0)`` of the tiles that touch ``region = (r0, r1, c0, c1)`` of an image of ``full_shape``."""
    r0, r1, c0, c1 = region
    rows = [int(s) for s in tile_starts(full_shape[0], tile, overlap) if s < r1 and s + tile > r0]
    cols = [int(s) for s in tile_starts(full_shape[1], tile, overlap) if s < c1 and s + tile > c0]
    return [(r, c) for r in rows for c in cols]


def tile_seed(seed: int, sample: int, row0: int, col0: int) -> int:
    """Seed of one tile's noise map: the same tile gets the same noise whichever block computes it."""
    return int(np.random.SeedSequence([seed, sample, row0, col0]).generate_state(1)[0])


def render_region(
    predict: PredictFn,
    read: Callable[[int, int, int, int], np.ndarray],
    full_shape: tuple[int, int],
    region: tuple[int, int, int, int],
    *,
    tile: int,
    overlap: int,
    batch_size: int = 4,
    n_samples: int = 1,
    seed: int = 0,
    window: str = "smooth",
    on_tiles: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Blend the model's output over ``region = (r0, r1, c0, c1)`` of an image of ``full_shape`` pixels.

    Parameters
    ----------
    predict
        ``predict(tiles, seeds)``: uint8 tiles ``(n, 3, tile, tile)`` and one noise seed per tile -> ``(n, 3, tile,
        tile)`` output (uint8 or float in 0..255).
    read
        ``read(r0, r1, c0, c1)``: the input ``(3, r1 - r0, c1 - c0)`` uint8, zero (no tissue) outside the image.
    n_samples
        Independent samples (different noise seeds); with more than one the second return value is the per-pixel
        standard deviation across samples (mean over channels, 0..1).
    window
        ``"smooth"`` (the default) or ``"box"`` (plain averaging, only to measure what the window buys).

    Returns
    -------
    ``(rgb, spread)``: the blended uint8 ``(3, h, w)`` mean over samples, and the float32 ``(1, h, w)`` spread or
    ``None``.
    """
    r0, r1, c0, c1 = region
    h, w = r1 - r0, c1 - c0
    padded = (max(full_shape[0], tile), max(full_shape[1], tile))
    positions = tiles_for_region(padded, region, tile, overlap)
    starts_r = tile_starts(padded[0], tile, overlap)
    starts_c = tile_starts(padded[1], tile, overlap)
    acc = np.zeros((n_samples, 3, h, w), dtype=np.float64)
    wsum = np.zeros((h, w), dtype=np.float64)
    for batch in _batches(positions, batch_size):
        tiles = np.stack([read(pr, pr + tile, pc, pc + tile) for pr, pc in batch])
        for k in range(n_samples):
            seeds = [tile_seed(seed, k, pr, pc) for pr, pc in batch]
            out = np.asarray(predict(tiles, seeds), dtype=np.float64)
            for (pr, pc), y in zip(batch, out, strict=True):
                wy = window_1d(tile, overlap, low_edge=pr == starts_r[0], high_edge=pr == starts_r[-1], kind=window)
                wx = window_1d(tile, overlap, low_edge=pc == starts_c[0], high_edge=pc == starts_c[-1], kind=window)
                # intersection of the tile with the region
                a0, a1 = max(pr, r0), min(pr + tile, r1)
                b0, b1 = max(pc, c0), min(pc + tile, c1)
                win = np.outer(wy[a0 - pr : a1 - pr], wx[b0 - pc : b1 - pc])
                acc[k, :, a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] += y[:, a0 - pr : a1 - pr, b0 - pc : b1 - pc] * win
                if k == 0:
                    wsum[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] += win
        if on_tiles is not None:
            on_tiles(len(batch))
    samples = acc / wsum
    mean = samples.mean(axis=0)
    rgb = np.clip(np.rint(mean), 0, 255).astype(np.uint8)
    spread = None
    if n_samples > 1:
        spread = (samples.std(axis=0).mean(axis=0, keepdims=True) / 255.0).astype(np.float32)
    return rgb, spread


def count_tiles(full_shape: tuple[int, int], region: tuple[int, int, int, int], tile: int, overlap: int) -> int:
    """Count the tiles :func:`render_region` runs for ``region``."""
    padded = (max(full_shape[0], tile), max(full_shape[1], tile))
    return len(tiles_for_region(padded, region, tile, overlap))


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), max(1, size)):
        yield items[i : i + size]


def reader_from_array(
    image: np.ndarray, origin: tuple[int, int] = (0, 0)
) -> Callable[[int, int, int, int], np.ndarray]:
    """Make a ``read`` function over an in-memory ``(3, H, W)`` array whose pixel ``(0, 0)`` is global ``origin``.

    Pixels outside the array read as 0 (no tissue).
    """
    oy, ox = origin

    def read(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        out = np.zeros((image.shape[0], r1 - r0, c1 - c0), dtype=image.dtype)
        a0, a1 = max(r0 - oy, 0), min(r1 - oy, image.shape[1])
        b0, b1 = max(c0 - ox, 0), min(c1 - ox, image.shape[2])
        if a1 > a0 and b1 > b0:
            out[:, a0 + oy - r0 : a1 + oy - r0, b0 + ox - c0 : b1 + ox - c0] = image[:, a0:a1, b0:b1]
        return out

    return read


def border_gradient_ratio(image: np.ndarray, tile: int, overlap: int) -> float:
    """Seam metric: mean squared gradient across the tile borders divided by that over all other pixel pairs.

    ``image`` is ``(c, H, W)``; the borders are the tile edges of :func:`tile_starts` (where one tile's
    contribution begins or ends). About 1 means the borders cannot be told apart from the interior; a visible seam
    gives a ratio well above 1.
    """
    img = np.asarray(image, dtype=np.float64)
    H, W = img.shape[1:]
    gy = (np.diff(img, axis=1) ** 2).mean(axis=0)  # between rows i and i+1: (H-1, W)
    gx = (np.diff(img, axis=2) ** 2).mean(axis=0)  # (H, W-1)
    rows = set()
    for s in tile_starts(H, tile, overlap):
        for edge in (s - 1, s + tile - 1):
            if 0 <= edge < H - 1:
                rows.add(int(edge))
    cols = set()
    for s in tile_starts(W, tile, overlap):
        for edge in (s - 1, s + tile - 1):
            if 0 <= edge < W - 1:
                cols.add(int(edge))
    row_mask = np.zeros(H - 1, bool)
    row_mask[list(rows)] = True
    col_mask = np.zeros(W - 1, bool)
    col_mask[list(cols)] = True
    border = np.concatenate([gy[row_mask].ravel(), gx[:, col_mask].ravel()])
    interior = np.concatenate([gy[~row_mask].ravel(), gx[:, ~col_mask].ravel()])
    if border.size == 0 or interior.size == 0 or interior.mean() == 0:
        return float("nan")
    return float(border.mean() / interior.mean())
