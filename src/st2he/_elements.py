"""Reading and writing SpatialData elements the st2he way: never drop what is there unless told to."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from ._grid import COORDINATE_SYSTEM, Grid

logger = logging.getLogger("st2he")

ATTRS_KEY = "st2he"
RGB = ("r", "g", "b")


def check_key_free(sdata, key: str, *, overwrite: bool = False, parameter: str = "key_added") -> None:
    """Raise if ``key`` already names an element of ``sdata`` and ``overwrite`` is false.

    SpatialData element names are unique across images, labels, points, shapes and tables.
    """
    if not isinstance(key, str) or not key:
        msg = f"{parameter} must be a non-empty string, got {key!r}."
        raise ValueError(msg)
    if key in sdata and not overwrite:
        msg = (
            f"An element named {key!r} already exists in the SpatialData object. Choose another {parameter} "
            f"or pass overwrite=True to replace it."
        )
        raise KeyError(msg)


def set_element(sdata, key: str, element, *, overwrite: bool = False) -> None:
    """Store ``element`` under ``key``; an existing element is replaced only with ``overwrite=True``."""
    check_key_free(sdata, key, overwrite=overwrite)
    if key in sdata:
        del sdata[key]
    sdata[key] = element


def auto_scale_factors(shape: tuple[int, int], min_size: int = 256) -> list[int]:
    """Factors of 2 for a pyramid whose coarsest level is still at least ``min_size`` pixels on its short side."""
    factors: list[int] = []
    size = min(shape)
    while size // 2 >= min_size:
        factors.append(2)
        size //= 2
    return factors


def parse_image(
    data,
    grid: Grid,
    *,
    c_coords: tuple[str, ...] | list[str] | None = RGB,
    scale_factors: list[int] | None | str = "auto",
    chunks: int = 1024,
):
    """Wrap a ``(c, y, x)`` numpy or dask array as a spatialdata image placed on ``grid``."""
    import dask.array as da
    from spatialdata.models import Image2DModel

    if data.ndim != 3:
        msg = f"Image data must be (c, y, x), got {data.ndim} dimensions."
        raise ValueError(msg)
    if tuple(data.shape[1:]) != grid.shape:
        msg = f"Image of {data.shape[1:]} pixels does not match its grid of {grid.shape} pixels."
        raise ValueError(msg)
    if not isinstance(data, da.Array):
        data = da.from_array(data, chunks=(data.shape[0], chunks, chunks))
    if scale_factors == "auto":
        scale_factors = auto_scale_factors(grid.shape)
    return Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=list(c_coords) if c_coords is not None else None,
        scale_factors=scale_factors or None,
        transformations={COORDINATE_SYSTEM: grid.transformation()},
        chunks=(data.shape[0], chunks, chunks),
    )


def add_image(
    sdata,
    key: str,
    data,
    grid: Grid,
    *,
    overwrite: bool = False,
    c_coords: tuple[str, ...] | list[str] | None = RGB,
    scale_factors: list[int] | None | str = "auto",
    chunks: int = 1024,
    params: dict[str, Any] | None = None,
):
    """Parse and store an image element; record ``params`` (JSON-serialisable) for it in ``sdata.attrs``."""
    check_key_free(sdata, key, overwrite=overwrite)
    element = parse_image(data, grid, c_coords=c_coords, scale_factors=scale_factors, chunks=chunks)
    set_element(sdata, key, element, overwrite=overwrite)
    if params is not None:
        record_params(sdata, key, params)
    return element


def get_image(sdata, key: str, *, parameter: str = "image_key", coordinate_system: str = COORDINATE_SYSTEM):
    """The full-resolution ``(c, y, x)`` DataArray of image ``key`` and its axis-aligned :class:`~st2he._grid.Grid`.

    For images st2he writes (input pictures, virtual H&E); read any other image through :class:`st2he._raster.Raster`.
    """
    from ._raster import Raster

    if key not in sdata.images:
        available = sorted(sdata.images)
        msg = f"{parameter}={key!r} is not an image of this SpatialData object; its images are {available}."
        raise KeyError(msg)
    raster = Raster(sdata.images[key], coordinate_system, name=f"{parameter}={key!r}")
    return raster.level0, raster.grid()


def record_params(sdata, key: str, params: dict[str, Any]) -> None:
    """Keep the parameters that made element ``key`` in ``sdata.attrs['st2he'][key]`` (saved with the zarr store)."""
    store = sdata.attrs.setdefault(ATTRS_KEY, {})
    store[key] = json.loads(json.dumps(params, default=_jsonable))


def get_params(sdata, key: str) -> dict[str, Any]:
    """Parameters recorded for element ``key`` by :func:`record_params` (empty when none were)."""
    return dict(sdata.attrs.get(ATTRS_KEY, {}).get(key, {}))


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)
