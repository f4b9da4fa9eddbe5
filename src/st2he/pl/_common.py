"""What every st2he plot shares: images drawn through the raster layer, µm axes, scale bars and ``save=``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from st2he._grid import COORDINATE_SYSTEM
from st2he._raster import Raster, region_grid


def draw_image(axis, element, region, *, max_pixels: int, coordinate_system: str = COORDINATE_SYSTEM, name=None) -> bool:
    """Draw ``region`` of an image element, read at most ``max_pixels`` across through its full transformation.

    Parts of the region the image does not cover are left transparent over a black background. Returns True when
    the picture is dark (fluorescence, the ST2HE input), so overlays can pick a visible colour.
    """
    raster = Raster(element, coordinate_system, name=name)
    x0, y0, x1, y1 = region
    pixel_size = max(raster.pixel_size, max(x1 - x0, y1 - y0) / max(int(max_pixels), 1))
    grid = region_grid(region, pixel_size)
    n = min(3, int(raster.level0.shape[0])) if raster.level0.ndim == 3 else 1
    values = raster.read(grid, channels=slice(0, n), fill=np.nan, dtype=np.float32)
    covered = np.isfinite(values).all(axis=0)
    axis.set_facecolor("black")
    gx0, gy0, gx1, gy1 = grid.bounds
    extent = (gx0, gx1, gy1, gy0)
    if not covered.any():
        return True
    if n == 3:
        if raster.level0.dtype == np.uint8:
            picture = values / 255.0
        else:
            lo, hi = np.nanpercentile(values, (1, 99.5))
            picture = (values - lo) / max(hi - lo, 1e-12)
        rgba = np.concatenate([np.clip(np.nan_to_num(picture), 0, 1), covered[None].astype(np.float32)])
        rgba = np.moveaxis(rgba, 0, -1)
        axis.imshow(rgba, extent=extent, interpolation="nearest")
        return float(rgba[..., :3][covered].mean()) < 0.5
    grey = np.ma.masked_invalid(values[0])
    lo, hi = np.nanpercentile(values[0], (1, 99.5))
    axis.imshow(grey, extent=extent, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-12), interpolation="nearest")
    return True


def set_um_axes(axis, region, *, ticks: bool = False) -> None:
    """Show ``region`` (µm) with y growing downwards as in images; equal aspect; tick labels in µm when asked."""
    x0, y0, x1, y1 = region
    axis.set_xlim(x0, x1)
    axis.set_ylim(y1, y0)
    axis.set_aspect("equal")
    if ticks:
        axis.set_xlabel("x (µm)")
        axis.set_ylabel("y (µm)")
    else:
        axis.set_xticks([])
        axis.set_yticks([])


def nice_length(length: float) -> float:
    """Round ``length`` down to 1, 2 or 5 times a power of ten."""
    if not (np.isfinite(length) and length > 0):
        return 1.0
    power = 10 ** math.floor(math.log10(length))
    for step in (5, 2, 1):
        if step * power <= length:
            return float(step * power)
    return float(power)


def scale_bar(axis, region, length_um: float | str | None = "auto", *, color: str = "white") -> None:
    """A scale bar of ``length_um`` µm (``"auto"``: a round fifth of the width; ``None``: none) at the lower right."""
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    if length_um is None:
        return
    x0, y0, x1, y1 = region
    if isinstance(length_um, str):
        if length_um != "auto":
            msg = f"scale_bar_um must be a length in µm, 'auto' or None, got {length_um!r}."
            raise ValueError(msg)
        length_um = nice_length((x1 - x0) / 5)
    length_um = float(length_um)
    if not (math.isfinite(length_um) and length_um > 0):
        msg = f"scale_bar_um must be a positive length in µm, 'auto' or None, got {length_um!r}."
        raise ValueError(msg)
    label = f"{length_um:g} µm" if length_um < 1000 else f"{length_um / 1000:g} mm"
    bar = AnchoredSizeBar(
        axis.transData,
        length_um,
        label,
        loc="lower right",
        pad=0.4,
        sep=3,
        color=color,
        frameon=False,
        size_vertical=(y1 - y0) / 120,
        fontproperties=FontProperties(size=8),
    )
    bar.set_gid("scale_bar")
    axis.add_artist(bar)


def save_figure(figure, save: str | Path | None) -> None:
    """Write ``figure`` to ``save`` (format from the suffix) when a path is given."""
    if save is None:
        return
    path = Path(save)
    if not path.parent.is_dir():
        msg = f"save={str(save)!r}: the folder {str(path.parent)!r} does not exist."
        raise FileNotFoundError(msg)
    figure.savefig(path, dpi=150, bbox_inches="tight")

