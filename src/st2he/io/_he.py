"""Reading a brightfield H&E image (whole-slide SVS/TIFF, or PNG/JPEG) into SpatialData, placed in global µm."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from st2he._elements import RGB, check_key_free, parse_image, record_params, set_element
from st2he._grid import COORDINATE_SYSTEM, Grid

from ._common import TruncatedImageError, check_tiff_complete, damaged_image, ome_pixel_size

_TIFF_SUFFIXES = (".svs", ".tif", ".tiff", ".btf", ".ndpi", ".scn", ".bif", ".qptiff")


def read_he_image(
    path: str | os.PathLike,
    *,
    pixel_size: float | None = None,
    key: str = "he_image",
    origin: tuple[float, float] = (0.0, 0.0),
    sdata=None,
    overwrite: bool = False,
    chunks: int = 1024,
):
    """Read an RGB H&E image as a SpatialData image element on a grid of known µm per pixel.

    Whole-slide TIFFs (Aperio ``.svs``, OME-TIFF, generic pyramidal TIFF) are read lazily with ``tifffile`` (JPEG
    tiles need ``imagecodecs``); PNG and JPEG tiles with Pillow. A slide's own pyramid levels become the element's
    levels (nothing is recomputed from full resolution); an image without one gets a multiscale pyramid built so
    that tools can read coarser levels.

    Parameters
    ----------
    path
        The image file.
    pixel_size
        µm per pixel. ``None`` reads it from the file: the ``MPP`` of an Aperio description, the OME
        ``PhysicalSizeX`` or the TIFF resolution tags in centimetres; an error asks for it when none is there.
    key
        Name of the image element.
    origin
        Global ``(x, y)`` in µm of the top-left corner of the image, to place it over other elements.
    sdata
        Add the image to this SpatialData object instead of making a new one.
    overwrite
        Replace an existing element named ``key`` in ``sdata``.
    chunks
        Dask chunk edge in pixels.

    Returns
    -------
    The SpatialData object holding the image as ``key`` (uint8, channels ``r, g, b``, in the ``global``
    coordinate system, 1 unit = 1 µm).
    """
    import dask.array as da
    from spatialdata import SpatialData

    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"H&E image file not found: {path}"
        raise FileNotFoundError(msg)
    if sdata is not None:
        check_key_free(sdata, key, overwrite=overwrite, parameter="key", kind="images")
    levels: list = []
    if path.suffix.lower() in _TIFF_SUFFIXES:
        levels, found = _read_tiff(path)
        data = levels[0]
    else:
        from PIL import Image

        try:
            with Image.open(path) as img:
                data = np.asarray(img.convert("RGB") if img.mode not in ("RGB", "L") else img)
                found = _pil_pixel_size(img)
        except OSError as err:  # PIL: "image file is truncated", "cannot identify image file"
            raise damaged_image(path, err) from err
    if data.ndim == 2 or (data.ndim == 3 and data.shape[-1] not in (3, 4)):
        msg = f"{path} is not an RGB image (shape {tuple(data.shape)}); an H&E image needs three colour channels."
        raise ValueError(msg)
    data = data[..., :3]
    if data.dtype != np.uint8:
        msg = f"{path} holds {data.dtype} pixels; brightfield H&E is expected as 8-bit RGB."
        raise ValueError(msg)
    if pixel_size is None:
        pixel_size = found
    if pixel_size is None:
        msg = (
            f"{path} does not record its pixel size; pass pixel_size= in µm per pixel (about 0.5 at 20x, 0.25 at 40x)."
        )
        raise ValueError(msg)
    pixel_size = float(pixel_size)
    grid = Grid(float(origin[0]), float(origin[1]), pixel_size, int(data.shape[0]), int(data.shape[1]))
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(chunks, chunks, 3))
    if len(levels) > 1:
        element = _slide_pyramid([data] + [lv[..., :3] for lv in levels[1:]], grid, chunks)
    else:
        element = parse_image(da.moveaxis(data, -1, 0), grid, c_coords=RGB, chunks=chunks)
    if sdata is None:
        sdata = SpatialData(images={key: element})
    else:
        set_element(sdata, key, element, overwrite=overwrite, parameter="key")
    record_params(sdata, key, {"path": str(path), "pixel_size": pixel_size, "origin": list(origin)})
    return sdata


def _read_tiff(path: Path):
    """The slide's pyramid levels, full resolution first, as ``(y, x, c)`` arrays (lazy where tiled), and its µm/px."""
    import dask.array as da
    import tifffile
    import zarr

    try:
        with tifffile.TiffFile(path) as tif:
            check_tiff_complete(tif, path)  # a cut-off file fails now, not when a tile is decoded later
            found = _tiff_pixel_size(tif)
            series = tif.series[0]
            shapes = [lv.shape for lv in series.levels] if series.levels else [series.shape]
        if len(shapes[0]) == 3 and shapes[0][0] in (3, 4) and shapes[0][-1] not in (3, 4):
            # planar (c, y, x) layout
            arr = tifffile.imread(path, series=0, level=0)
            return [np.moveaxis(arr, 0, -1)], found
        levels = []
        for i, shape in enumerate(shapes):
            if i and (len(shape) != 3 or shape[-1] not in (3, 4) or shape[0] >= shapes[i - 1][0]):
                break  # keep only levels that are RGB(A) and shrink
            store = tifffile.imread(path, aszarr=True, series=0, level=i)
            levels.append(da.from_zarr(zarr.open(store, mode="r")))
        return levels, found
    except TruncatedImageError:
        raise
    except Exception as err:
        raise damaged_image(path, err) from err


def _slide_pyramid(levels, grid: Grid, chunks: int):
    """A multiscale image element from a slide's own levels ``(y, x, 3)``, each placed by its size ratio."""
    import dask.array as da
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import set_transformation

    tree = xr.DataTree.from_dict(
        {
            f"scale{i}": xr.Dataset(
                {
                    "image": xr.DataArray(
                        da.moveaxis(lv, -1, 0).rechunk((3, chunks, chunks)), dims=("c", "y", "x"), coords={"c": list(RGB)}
                    )
                }
            )
            for i, lv in enumerate(levels)
        }
    )
    # spatialdata scales every level by its size ratio to scale0
    set_transformation(tree, {COORDINATE_SYSTEM: grid.transformation()}, set_all=True)
    Image2DModel().validate(tree)
    return tree


def _tiff_pixel_size(tif) -> float | None:
    page = tif.pages[0]
    description = page.description or ""
    m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", description)
    if m:
        return float(m.group(1))
    found = ome_pixel_size(tif.ome_metadata) if tif.is_ome else None
    if found is not None:
        return found
    tags = page.tags
    res, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
    if res is not None and unit is not None:
        num, den = res.value if isinstance(res.value, tuple) else (res.value, 1)
        per_unit = num / den if den else 0
        micrometres = {3: 1e4, 2: 25400.0}.get(int(unit.value))  # centimetre, inch
        if per_unit > 0 and micrometres is not None and per_unit * 1 > 1:
            size = micrometres / per_unit
            if 0.05 <= size <= 50:  # ignore the 72 dpi of images that only look like slides
                return size
    return None


def _pil_pixel_size(img) -> float | None:
    dpi = img.info.get("dpi")
    if dpi and dpi[0] and dpi[0] > 1000:  # real microscope tiles only; 72/96/300 dpi are screen/print defaults
        return 25400.0 / float(dpi[0])
    return None
