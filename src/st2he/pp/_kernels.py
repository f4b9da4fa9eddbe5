"""Compiled inner loops of the rasteriser (numba): which gene colours each pixel of one chunk."""

from __future__ import annotations

import numba
import numpy as np

#: Ranks take the low 16 bits of a pixel's packed int32 value; the next 15 bits hold the winning molecule's priority.
CODE_BITS = 16
CODE_MASK = (1 << CODE_BITS) - 1
#: Molecules are bucketed by blocks of ``BUCKET x BUCKET`` pixels, so a molecule's place in its bucket takes 16 bits
#: and, with its gene code, it is stored in one uint32: ``code << 16 | row_in_bucket << 8 | col_in_bucket``.
BUCKET_BITS = 8
BUCKET = 1 << BUCKET_BITS
MAX_GENES = 1 << 16


@numba.njit(cache=True, nogil=True)
def priority(row: int, col: int, gene: int) -> int:
    """Return a 15-bit pseudo-random priority of a molecule from its pixel and its gene.

    ``row`` and ``col`` are on the pixel lattice anchored at 0 µm; ``gene`` is a hash of the gene's name
    (:func:`gene_keys`). Where molecules meet, the one with the highest priority wins; being a function of what is
    drawn where, not of the order of the molecules, it makes the picture independent of that order and of the
    chunking.
    """
    h = np.uint64(row) * np.uint64(0x9E3779B97F4A7C15)
    h ^= np.uint64(col) + np.uint64(0x632BE59BD9B4E019) + (h << np.uint64(6))
    h ^= np.uint64(gene) * np.uint64(0xD6E8FEB86659FD93)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    return np.int64(h >> np.uint64(49))


def gene_keys(names) -> np.ndarray:
    """Hashes of gene names for :func:`priority`: the same gene gets the same key in every panel and run."""
    import zlib

    return np.array([zlib.crc32(str(n).encode()) for n in names], dtype=np.int64).reshape(-1)


@numba.njit(cache=True, nogil=True)
def paint_winners(
    packed: np.ndarray,
    rank_of: np.ndarray,
    rank_key: np.ndarray,
    row0: int,
    col0: int,
    grow0: int,
    gcol0: int,
    height: int,
    width: int,
    dy: np.ndarray,
    dx: np.ndarray,
    out: np.ndarray,
) -> None:
    """Draw one bucket of molecules into ``out`` (``height * width`` int32, ``-1`` where nothing is drawn).

    A molecule ``packed[i]`` = gene code << 16 | row << 8 | col, in a bucket whose first pixel lies at
    ``(row0, col0)`` relative to ``out`` and at ``(grow0, gcol0)`` on the global pixel lattice, covers the pixels
    ``(row + dy[k], col + dx[k])`` (those outside ``out`` are skipped). Its gene's rank is ``rank_of[code]``
    (``-1``: not drawn). Where molecules meet, the one with the highest :func:`priority` (of its pixel and
    ``rank_key[rank]``, a hash of its gene's name) wins (ties: the highest rank): each pixel keeps the maximum of
    ``priority << 16 | rank``, without a branch.
    """
    nk = dy.shape[0]
    for i in range(packed.shape[0]):
        v = np.int64(packed[i])
        rank = rank_of[np.uintp(v >> 16)]
        if rank < 0:
            continue
        r = (v >> BUCKET_BITS) & (BUCKET - 1)
        c = v & (BUCKET - 1)
        r0 = r + row0
        c0 = c + col0
        key = np.int32((priority(grow0 + r, gcol0 + c, rank_key[np.uintp(rank)]) << CODE_BITS) | rank)
        for k in range(nk):
            rr = r0 + dy[k]
            cc = c0 + dx[k]
            if rr < 0 or rr >= height or cc < 0 or cc >= width:
                continue
            p = np.uintp(rr * width + cc)
            out[p] = max(out[p], key)


@numba.njit(cache=True, nogil=True, inline="always")
def _compose_row(winners, base, q, l0, l1, l2, black, o0, o1, o2):
    """One output row: the gene's colour where one is drawn, else ``q`` (the grey, int32 in 0..255).

    Branch-free (a mask from the sign of ``winners``, a black LUT entry ``black``): which pixels hold molecules is
    as good as random, so a branch would be mispredicted often. Table indices are unsigned throughout these kernels:
    numba tests a signed index for a negative value (Python's wraparound), which keeps LLVM from vectorising.
    """
    for c in range(o0.shape[0]):
        g = winners[base + c]
        mask = np.int32(g >> 31)  # -1 where nothing is drawn, else 0
        idx = np.uintp((g & CODE_MASK & ~mask) | (mask & black))  # unsigned: no wraparound test, so LLVM vectorises
        qc = q[c] & mask
        o0[c] = np.uint8(np.int32(l0[idx]) | qc)
        o1[c] = np.uint8(np.int32(l1[idx]) | qc)
        o2[c] = np.uint8(np.int32(l2[idx]) | qc)


@numba.njit(cache=True, nogil=True, inline="always")
def _quantize_row(grey, q):
    """Grey values in [0, 1] (clipped) to integers 0..255, rounded to nearest."""
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for c in range(q.shape[0]):
        v = np.float32(grey[c])
        v = v if v > zero else zero  # NaN too
        v = v if v < one else one
        q[c] = np.int32(v * np.float32(255.0) + np.float32(0.5))


def lut_planes(lut: np.ndarray) -> np.ndarray:
    """The ``(n, 3)`` colours as the ``(3, n + 1)`` planes the compose kernels read, with a black entry last."""
    lut = np.asarray(lut, dtype=np.uint8).reshape(-1, 3)
    planes = np.zeros((3, lut.shape[0] + 1), dtype=np.uint8)
    planes[:, :-1] = lut.T
    return planes


@numba.njit(cache=True, nogil=True)
def compose_rows(grey: np.ndarray, winners: np.ndarray, planes: np.ndarray, out: np.ndarray, r0: int) -> None:
    """Compose rows ``r0 : r0 + len(winners) // width`` of the ``(3, h, width)`` uint8 chunk ``out``.

    Each pixel takes its gene's colour where one is drawn, else the grey stain. ``grey`` is the chunk's ``(h,
    width)`` float grey in [0, 1], or empty for a black background. ``winners`` holds :func:`paint_winners`'
    values for those rows (``-1`` or priority << 16 | rank); ``planes[:, rank]`` is the colour (see
    :func:`lut_planes`).
    """
    w = out.shape[2]
    has_grey = grey.shape[0] == out.shape[1] and grey.shape[1] == w and w > 0
    black = planes.shape[1] - 1
    q = np.zeros(w, dtype=np.int32)
    for r in range(winners.shape[0] // max(w, 1)):
        if has_grey:
            _quantize_row(grey[r0 + r], q)
        o = r0 + r
        _compose_row(winners, r * w, q, planes[0], planes[1], planes[2], black, out[0, o], out[1, o], out[2, o])


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


# ----------------------------------------------------------------------------------------------- molecules


@numba.njit(cache=True, nogil=True, inline="always")
def _bin_key(x, y, inv_bin):
    """The key of the spatial bin (of ``1 / inv_bin`` µm, anchored at 0 µm) holding global point ``(x, y)``."""
    return (np.int64(np.floor(x * inv_bin)) + (1 << 30)) * (1 << 31) + (np.int64(np.floor(y * inv_bin)) + (1 << 30))


#: Per-molecule flags written by :func:`_classify`.
_INSIDE = 1  # kept and inside the grid: bucketed
_SAMPLED = 2  # kept, and its spatial bin is in the co-expression sample at the current level


@numba.njit(cache=True, nogil=True)
def _gene_codes(raw, table, codes):
    """``codes[i] = table[raw[i] + 1]``: the partition's category codes through its table (a scalar loop of gathers)."""
    for i in range(raw.shape[0]):
        codes[i] = table[np.uintp(np.int64(raw[i]) + 1)]


@numba.njit(cache=True, nogil=True)
def _classify(
    x,
    y,
    codes,
    control_col,
    qv,
    min_qv,
    affine,
    origin,
    pixel_size,
    limits,
    inv_bin,
    bin_mask,
    rows,
    cols,
    packed,
    flags,
):
    """Filter, place and pack each molecule: a branch-free loop that LLVM vectorises.

    ``codes``: gene codes (``-1`` no gene name, ``-2`` a control probe to drop). ``control_col`` and ``qv`` are
    arrays or ``None``; a ``None`` argument is compiled away, so each combination gets its own vectorised loop.
    ``affine`` = (a00, a01, a02, a10, a11, a12) maps to global µm (the identity is exact); ``origin`` = (x0, y0);
    ``limits`` = (lowest pixel, width, height): ``(0, w, h)`` keeps the molecules of a grid, ``(-inf, inf, inf)``
    all (pixel indices beyond 2**38, absurdly far, are held there, so that the caller sees the span and says so).
    Writes block row and column, packed molecule and flags (:data:`_INSIDE`, :data:`_SAMPLED`);
    returns the pixel range ``(row_min, row_max, col_min, col_max)`` of the molecules inside and the counts dropped
    for each reason.
    """
    a00, a01, a02, a10, a11, a12 = affine
    x0, y0 = origin
    lowest, wmax, hmax = limits
    far = np.float64(2**38)
    big = np.int64(2**62)
    rmin = cmin = big
    rmax = cmax = -big
    n1 = n2 = n3 = n4 = n_in = 0
    for i in range(x.shape[0]):
        xr = np.float64(x[i])
        yr = np.float64(y[i])
        xi = a00 * xr + a01 * yr + a02
        yi = a10 * xr + a11 * yr + a12
        c = codes[i]
        bad = (xi - xi != 0.0) | (yi - yi != 0.0)  # not finite
        ctrl = c == -2
        if control_col is not None:
            ctrl = ctrl | control_col[i]
        low = False
        if qv is not None:
            low = qv[i] < min_qv  # a NaN quality value is kept
        # the first reason counts: not finite, control probe, low quality, no gene name
        ok1 = ~bad
        ok2 = ok1 & ~ctrl
        ok3 = ok2 & ~low
        kept = ok3 & (c >= 0)
        n1 += np.int64(bad)
        n2 += np.int64(ok1 & ctrl)
        n3 += np.int64(ok2 & low)
        n4 += np.int64(ok3 & (c < 0))
        colf = np.floor((xi - x0) / pixel_size)
        rowf = np.floor((yi - y0) / pixel_size)
        inside = kept & (colf >= lowest) & (rowf >= lowest) & (colf < wmax) & (rowf < hmax)
        colf = colf if colf > -far else -far
        rowf = rowf if rowf > -far else -far
        col = np.int64((colf if colf < far else far) if inside else 0.0)
        row = np.int64((rowf if rowf < far else far) if inside else 0.0)
        rmin = min(rmin, row if inside else big)
        rmax = max(rmax, row if inside else -big)
        cmin = min(cmin, col if inside else big)
        cmax = max(cmax, col if inside else -big)
        n_in += np.int64(inside)
        rows[i] = np.int32(row >> BUCKET_BITS)  # floor division, also below 0
        cols[i] = np.int32(col >> BUCKET_BITS)
        packed[i] = np.uint32((max(c, 0) << 16) | ((row & (BUCKET - 1)) << BUCKET_BITS) | (col & (BUCKET - 1)))
        # the co-expression sample: is the molecule's spatial bin (anchored at 0 µm) selected at this level?
        key = _bin_key(xi if kept else 0.0, yi if kept else 0.0, inv_bin)
        sampled = kept & ((bin_hash(key) >> np.uint64(20)) & bin_mask == np.uint64(0))
        flags[i] = np.uint8(inside) | (np.uint8(sampled) << np.uint8(1))
    return rmin, rmax, cmin, cmax, n1, n2, n3, n4, n_in


@numba.njit(cache=True, nogil=True)
def bin_partition(
    x,
    y,
    raw_codes,
    lut,
    control_code,
    control_col,
    qv,
    affine,
    identity,
    drop_controls,
    min_qv,
    stats,
    x0,
    y0,
    pixel_size,
    height,
    width,
    bin_size,
    bin_level,
    box,
    scratch_rows,
    scratch_cols,
    scratch_packed,
    scratch_codes,
    flags,
    out_packed,
    bin_keys,
    bin_codes,
    max_blocks,
):
    """Filter one partition and bucket its kept molecules by blocks of pixels.

    Pixels are counted from the lattice origin ``(x0, y0)`` as :meth:`st2he._grid.Grid.to_pixel` does
    (``floor((x - x0) / pixel_size)``); block ``(I, J)`` holds pixel rows ``I * BUCKET ..`` and columns
    ``J * BUCKET ..`` (negative indices lie before the origin). With ``height > 0`` only the molecules in the
    ``height`` x ``width`` pixels from the origin are bucketed (the others are counted as outside); with
    ``height <= 0`` every kept molecule is, and the blocks are those the partition touches.

    Four loops over caller-owned work arrays of at least ``len(x)`` entries (reused across partitions: memory
    touched for the first time costs more than the work done in it, most of all in virtual machines): the gene codes
    through the partition's table; :func:`_classify`, which filters, places and packs every molecule without a
    branch (vectorised); the co-expression sample; and a counting sort that keeps the molecules' order.

    Writes the bucketed molecules to ``out_packed[:n_in]`` (gene code << 16 | row_in_block << 8 | col_in_block;
    ``out_packed`` needs ``len(x)`` entries: the molecules not bucketed are sorted after them), grows ``box`` =
    [col_min, row_min, col_max, row_max] (int64, lattice pixels) by the pixels of the bucketed molecules and adds to
    ``stats``. With ``bin_size > 0`` it also writes the spatial-bin keys and codes of the kept molecules selected at
    ``bin_level`` (see :func:`bin_hash`) for co-expression statistics to ``bin_keys``/``bin_codes``.

    Returns ``(block_row0, block_col0, block_rows, block_cols, starts, n_in, n_kept, n_bins)``: the molecules of
    block ``(block_row0 + a, block_col0 + b)`` are ``starts[a * block_cols + b]:starts[a * block_cols + b + 1]``.
    ``block_rows`` is -1 when the partition spans more than ``max_blocks`` blocks (nothing is sorted then).
    """
    n = x.shape[0]
    if n == 0:
        return 0, 0, 0, 0, np.zeros(1, dtype=np.int64), 0, 0, 0
    codes = scratch_codes[:n]
    if raw_codes.shape[0] == n:
        # the partition's categories to gene codes in one table: -1 for no name, -2 for a control probe to drop
        table = np.empty(lut.shape[0] + 1, dtype=np.int32)
        table[0] = -1
        for k in range(lut.shape[0]):
            c = lut[k]
            table[k + 1] = -2 if (drop_controls and c >= 0 and control_code[np.uintp(c)]) else c
        _gene_codes(raw_codes, table, codes)
    else:
        codes[:] = 0
    if identity:
        coef = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    else:
        coef = (affine[0, 0], affine[0, 1], affine[0, 2], affine[1, 0], affine[1, 1], affine[1, 2])
    limits = (0.0, np.float64(width), np.float64(height)) if height > 0 else (-np.inf, np.inf, np.inf)
    do_bins = bin_size > 0
    inv_bin = 1.0 / bin_size if do_bins else 0.0
    bin_mask = (np.uint64(1) << np.uint64(bin_level)) - np.uint64(1)
    args = (min_qv, coef, (x0, y0), pixel_size, limits, inv_bin, bin_mask, scratch_rows, scratch_cols, scratch_packed)
    if drop_controls and control_col.shape[0] == n:
        if qv.shape[0] == n:
            res = _classify(x, y, codes, control_col, qv, *args, flags)
        else:
            res = _classify(x, y, codes, control_col, None, *args, flags)
    elif qv.shape[0] == n:
        res = _classify(x, y, codes, None, qv, *args, flags)
    else:
        res = _classify(x, y, codes, None, None, *args, flags)
    prmin, prmax, pcmin, pcmax, n1, n2, n3, n4, n_in = res
    n_kept = n - n1 - n2 - n3 - n4
    n_bins = 0
    if do_bins:
        a00, a01, a02, a10, a11, a12 = coef
        for i in range(n):
            if flags[i] & _SAMPLED:
                xr = np.float64(x[i])
                yr = np.float64(y[i])
                xi = a00 * xr + a01 * yr + a02
                yi = a10 * xr + a11 * yr + a12
                bin_keys[n_bins] = _bin_key(xi, yi, inv_bin)
                bin_codes[n_bins] = codes[i]
                n_bins += 1
    stats[0] += n
    stats[1] += n1
    stats[2] += n2
    stats[3] += n3
    stats[4] += n4
    stats[5] += n_kept
    if n_in > 0:
        box[0] = min(box[0], pcmin)
        box[1] = min(box[1], prmin)
        box[2] = max(box[2], pcmax)
        box[3] = max(box[3], prmax)
    rmin, rmax = prmin >> BUCKET_BITS, prmax >> BUCKET_BITS
    cmin, cmax = pcmin >> BUCKET_BITS, pcmax >> BUCKET_BITS
    if n_in == 0:
        return 0, 0, 0, 0, np.zeros(1, dtype=np.int64), 0, n_kept, n_bins
    nbr = rmax - rmin + 1
    nbc = cmax - cmin + 1
    if nbr * nbc > max_blocks:
        return rmin, cmin, -1, nbc, np.zeros(1, dtype=np.int64), n_in, n_kept, n_bins
    # a plain counting sort (within a field of view the block changes from one molecule to the next as often as
    # not, so following runs of one block would cost more in mispredicted branches than it saves); molecules not
    # bucketed go to a last block, after the others
    nb = nbr * nbc
    counts = np.zeros(nb + 2, dtype=np.int64)
    for j in range(n):
        b = (np.int64(scratch_rows[j]) - rmin) * nbc + (np.int64(scratch_cols[j]) - cmin)
        counts[np.uintp((b if flags[j] & _INSIDE else nb) + 1)] += 1
    for b in range(nb + 1):
        counts[b + 1] += counts[b]
    pos = counts[: nb + 1].copy()
    for j in range(n):
        b = (np.int64(scratch_rows[j]) - rmin) * nbc + (np.int64(scratch_cols[j]) - cmin)
        b = np.uintp(b if flags[j] & _INSIDE else nb)
        k = pos[b]
        out_packed[np.uintp(k)] = scratch_packed[j]
        pos[b] = k + 1
    return rmin, cmin, nbr, nbc, counts[: nb + 1], n_in, n_kept, n_bins


@numba.njit(cache=True, nogil=True)
def extent_of(x, y, affine, identity, box):
    """Grow ``box`` = [x_min, y_min, x_max, y_max] by the molecules with finite global coordinates."""
    a00, a01, a02 = affine[0, 0], affine[0, 1], affine[0, 2]
    a10, a11, a12 = affine[1, 0], affine[1, 1], affine[1, 2]
    for i in range(x.shape[0]):
        xi = np.float64(x[i])
        yi = np.float64(y[i])
        if not identity:
            t = a00 * xi + a01 * yi + a02
            yi = a10 * xi + a11 * yi + a12
            xi = t
        if not (np.isfinite(xi) and np.isfinite(yi)):
            continue
        if xi < box[0]:
            box[0] = xi
        if yi < box[1]:
            box[1] = yi
        if xi > box[2]:
            box[2] = xi
        if yi > box[3]:
            box[3] = yi


@numba.njit(cache=True, nogil=True)
def bin_hash(key):
    """Scrambled bits of a bin key: a bin is kept at ``level`` when bits 20.. of its hash hold ``level`` zeros."""
    h = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    return h ^ (h >> np.uint64(29))


@numba.njit(cache=True, nogil=True)
def compact_level(keys, codes, level):
    """Move the entries of ``keys``/``codes`` kept at subsampling ``level`` to the front, in order; return how many."""
    mask = (np.uint64(1) << np.uint64(level)) - np.uint64(1)
    m = 0
    for i in range(keys.shape[0]):
        k = keys[i]
        if (bin_hash(k) >> np.uint64(20)) & mask == 0:
            keys[m] = k
            codes[m] = codes[i]
            m += 1
    return m


@numba.njit(cache=True, nogil=True)
def pool_mean(win, k):
    """Mean of each ``k x k`` block of ``win`` (incomplete blocks at the far edges dropped), as float32.

    Sums in float32, the ``k`` rows first (a loop LLVM vectorises), then ``k`` columns; sums of integers below
    2**24 are exact, so the mean is the correctly rounded one whatever the order.
    """
    hh = win.shape[0] // k
    ww = win.shape[1] // k
    out = np.empty((hh, ww), dtype=np.float32)
    rows = np.empty(ww * k, dtype=np.float32)
    n = np.float32(k * k)
    for i in range(hh):
        rows[:] = 0.0
        for di in range(k):
            src = win[i * k + di]
            for x in range(ww * k):
                rows[x] += np.float32(src[x])
        o = out[i]
        for j in range(ww):
            acc = np.float32(0.0)
            for dj in range(k):
                acc += rows[j * k + dj]
            o[j] = acc / n
    return out


@numba.njit(cache=True, nogil=True)
def _inside(mask) -> tuple[int, int]:
    """First and last + 1 index where ``mask`` (true on one contiguous run, or nowhere) is true."""
    n = mask.shape[0]
    lo = 0
    while lo < n and not mask[lo]:
        lo += 1
    hi = n
    while hi > lo and not mask[hi - 1]:
        hi -= 1
    return lo, hi


@numba.njit(cache=True, nogil=True, inline="always")
def _interpolate_row(a, i0x, i1x, wx, c0, c1, line):
    """One source row interpolated at the output columns ``c0:c1`` (float32)."""
    for c in range(c0, c1):
        v0 = a[np.uintp(i0x[c])]
        line[c] = v0 + (a[np.uintp(i1x[c])] - v0) * wx[c]


@numba.njit(cache=True, nogil=True, inline="always")
def _source_row(pieces, offsets, ys, xs, width, s, buf):
    """Row ``s`` of the source window into ``buf`` as float32 (exact for the source's small integers and float32).

    The window is made of up to 2 x 2 pieces of the source's chunks, read in place (never assembled):
    ``pieces`` = (top left, top right, bottom left, bottom right) chunks, each read from row ``offsets[k, 0]`` and
    column ``offsets[k, 1]``; the top ones give the window's first ``ys`` rows, the left ones its first ``xs`` of
    ``width`` columns. A single window is four times the same array.
    """
    k = 0 if s < ys else 2
    t = s if s < ys else s - ys
    c0 = offsets[k, 1]
    left = pieces[k][t + offsets[k, 0], c0 : c0 + xs]
    for c in range(xs):
        buf[c] = np.float32(left[c])
    if width > xs:
        c0 = offsets[k + 1, 1]
        right = pieces[k + 1][t + offsets[k + 1, 0], c0 : c0 + width - xs]
        rest = buf[xs:]
        for c in range(width - xs):
            rest[c] = np.float32(right[c])


@numba.njit(cache=True, nogil=True, inline="always")
def _stain_row(window, r, i0y, i1y, wy, iny, i0x, i1x, wx, c0, c1, lo, scale, lines, rows, buf, out):
    """Output row ``r`` of the separable bilinear resampling of the source window, normalised to [0, 1].

    The value is ``(v - lo) * scale``, clipped. ``window`` = (pieces, offsets, ys, xs, width): see
    :func:`_source_row` (``buf`` holds one of its rows). Writes float32 values into ``out`` (0 outside the source:
    ``iny`` false, or outside columns ``c0:c1``, where ``inx`` is true; see :func:`_inside`). ``lines`` (2 x w
    float32) and ``rows`` (the source rows they hold, initially -1) carry the x-interpolated source rows from one
    output row to the next, so each source row is interpolated along x once. All arithmetic is float32, the same for
    :func:`resample_bilinear` and :func:`compose_rows_resampled`, so they give the same values.
    """
    pieces, offsets, ys, xs, width = window
    zero = np.float32(0.0)
    one = np.float32(1.0)
    if not iny[r]:
        for c in range(out.shape[0]):
            out[c] = zero
        return
    s0 = i0y[r]
    s1 = i1y[r]
    if rows[0] == s0:
        ta = 0
    elif rows[1] == s0:
        ta = 1
    else:
        ta = 1 if rows[0] == s1 else 0  # keep the slot holding s1
        _source_row(pieces, offsets, ys, xs, width, s0, buf)
        _interpolate_row(buf, i0x, i1x, wx, c0, c1, lines[ta])
        rows[ta] = s0
    if rows[ta] == s1:
        tb = ta
    else:
        tb = 1 - ta
        if rows[tb] != s1:
            _source_row(pieces, offsets, ys, xs, width, s1, buf)
            _interpolate_row(buf, i0x, i1x, wx, c0, c1, lines[tb])
            rows[tb] = s1
    fy = wy[r]
    gy = np.float32(1.0) - fy
    la = lines[ta]
    lb = lines[tb]
    for c in range(c0):
        out[c] = zero
    for c in range(c0, c1):
        v = ((la[c] * gy + lb[c] * fy) - lo) * scale
        v = v if v > zero else zero  # a NaN of the source too
        out[c] = v if v < one else one
    for c in range(c1, out.shape[0]):
        out[c] = zero


@numba.njit(cache=True, nogil=True)
def resample_bilinear(win, i0y, i1y, wy, iny, i0x, i1x, wx, inx, lo, scale):
    """Separable bilinear resampling of ``win`` at the given indices/weights, then ``(v - lo) * scale`` in [0, 1].

    Output pixels outside the source (``iny``/``inx`` false) are 0. ``lo`` and ``scale`` are float32.
    """
    h = i0y.shape[0]
    w = i0x.shape[0]
    out = np.empty((h, w), dtype=np.float32)
    lines = np.empty((2, w), dtype=np.float32)
    rows = np.array([-1, -1], dtype=np.int64)
    buf = np.empty(max(win.shape[1], 1), dtype=np.float32)
    window = ((win, win, win, win), np.zeros((4, 2), dtype=np.int64), win.shape[0], win.shape[1], win.shape[1])
    c0, c1 = _inside(inx)
    for r in range(h):
        _stain_row(window, r, i0y, i1y, wy, iny, i0x, i1x, wx, c0, c1, lo, scale, lines, rows, buf, out[r])
    return out


def resampling_state(w: int, width: int) -> tuple[np.ndarray, ...]:
    """Work arrays of :func:`compose_rows_resampled` for one output chunk.

    For a chunk ``w`` pixels wide over a source window ``width`` pixels wide: the two x-interpolated source rows,
    which rows they hold, a source row, a grey row and its quantized values.
    """
    return (
        np.empty((2, w), dtype=np.float32),
        np.array([-1, -1], dtype=np.int64),
        np.empty(max(width, 1), dtype=np.float32),
        np.empty(w, dtype=np.float32),
        np.empty(w, dtype=np.int32),
    )


@numba.njit(cache=True, nogil=True)
def compose_rows_resampled(
    window, i0y, i1y, wy, iny, i0x, i1x, wx, inx, lo, scale, winners, planes, out, r0, lines, rows, buf, grey, q
):
    """:func:`compose_rows` over the stain resampled on the fly as :func:`resample_bilinear` does.

    The same arithmetic, so the same bytes, as composing over :func:`resample_bilinear`'s output, without the
    float32 intermediate image. The source window is ``(pieces, offsets, ys, xs, width)``: up to 2 x 2 of the
    source's chunks, read in place (see :func:`_source_row`); they may hold the source's small integers or float32
    unconverted (exact either way). ``lines`` .. ``q``: :func:`resampling_state`, kept from one call to the next
    for one chunk (rows drawn in order).
    """
    w = out.shape[2]
    black = planes.shape[1] - 1
    c0, c1 = _inside(inx)
    for r in range(winners.shape[0] // max(w, 1)):
        o = r0 + r
        _stain_row(window, o, i0y, i1y, wy, iny, i0x, i1x, wx, c0, c1, lo, scale, lines, rows, buf, grey)
        _quantize_row(grey, q)
        _compose_row(winners, r * w, q, planes[0], planes[1], planes[2], black, out[0, o], out[1, o], out[2, o])


@numba.njit(cache=True, nogil=True)
def count_molecules(packed, channel_of, row0, col0, out):
    """Add one bucket of molecules to the per-pixel counts ``out`` (``channels x h x w``).

    Bucket layout as in :func:`paint_winners` (its first pixel at ``(row0, col0)`` relative to ``out``; molecules
    outside are skipped). ``channel_of[gene code]`` is the channel (``-1``: not counted); an empty ``channel_of``
    counts every molecule in channel 0.
    """
    h = out.shape[1]
    w = out.shape[2]
    by_channel = channel_of.shape[0] > 0
    for i in range(packed.shape[0]):
        v = np.int64(packed[i])
        ch = 0
        if by_channel:
            ch = channel_of[v >> 16]
            if ch < 0:
                continue
        r = ((v >> BUCKET_BITS) & (BUCKET - 1)) + row0
        c = (v & (BUCKET - 1)) + col0
        if r < 0 or r >= h or c < 0 or c >= w:
            continue
        out[ch, r, c] += 1
