"""Reading and writing SpatialData elements the st2he way: never drop what is there unless told to.

Every st2he function that writes elements follows one rule, implemented here:

- it builds the new element(s) first and stores them only once the call has succeeded; a call that writes several
  elements (tiles and the table that annotates them) validates every name before it stores any, so that it stores
  all of them or none;
- a name held by an element of another type (an image, labels, points, shapes or a table) is never taken over, not
  even with ``overwrite=True``: SpatialData names are unique across types, and a table named like an image would
  silently drop the image;
- an element the call reads (the points being drawn, the image being read) is never replaced by the call;
- an element that a table annotates is replaced only together with that table (else the table would annotate
  elements it was not made from);
- only the object in memory changes. When it is backed by a zarr store (``sdata.is_backed()``) nothing is deleted
  from or written to the store: the old element stays on disk until you save it yourself, with
  :func:`st2he.io.write_element` (all or nothing) or ``sdata.write(new_path)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from ._grid import COORDINATE_SYSTEM, Grid

logger = logging.getLogger("st2he")

ATTRS_KEY = "st2he"
RGB = ("r", "g", "b")
#: The element types of a SpatialData object, as its attributes name them.
ELEMENT_TYPES = ("images", "labels", "points", "shapes", "tables")
_TYPE_NAMES = {
    "images": "an image",
    "labels": "a labels element",
    "points": "a points element",
    "shapes": "a shapes element",
    "tables": "a table",
}


def element_type(sdata, key: str) -> str | None:
    """The type (``"images"``, ``"labels"``, ``"points"``, ``"shapes"`` or ``"tables"``) of element ``key``, or None."""
    for kind in ELEMENT_TYPES:
        if key in getattr(sdata, kind):
            return kind
    return None


def type_of(element) -> str:
    """The element type a SpatialData element or table would be stored as (validated by its spatialdata model)."""
    from spatialdata.models import (
        Image2DModel,
        Image3DModel,
        Labels2DModel,
        Labels3DModel,
        PointsModel,
        ShapesModel,
        TableModel,
        get_model,
    )

    model = get_model(element)
    kinds = {
        Image2DModel: "images",
        Image3DModel: "images",
        Labels2DModel: "labels",
        Labels3DModel: "labels",
        PointsModel: "points",
        ShapesModel: "shapes",
        TableModel: "tables",
    }
    return kinds[model]


def affine_to(element, coordinate_system: str, *, what: str) -> np.ndarray:
    """The 3x3 ``(x, y)`` affine matrix from ``element``'s intrinsic units to ``coordinate_system``.

    ``what`` names the element in the error raised when it has no transformation to that coordinate system.
    """
    from spatialdata.transformations import get_transformation

    transformations = get_transformation(element, get_all=True)
    if coordinate_system not in transformations:
        msg = (
            f"{what} has no transformation to the coordinate system {coordinate_system!r} (it has "
            f"{sorted(transformations)}); pass one of those as coordinate_system."
        )
        raise ValueError(msg)
    matrix = transformations[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    return np.asarray(matrix, dtype=np.float64)


def annotating_tables(sdata, key: str) -> list[str]:
    """Names of the tables of ``sdata`` that annotate element ``key`` (their ``region`` names it)."""
    out = []
    for name, table in sdata.tables.items():
        region = table.uns.get("spatialdata_attrs", {}).get("region")
        regions = [region] if isinstance(region, str) else list(region if region is not None else [])
        if key in [str(r) for r in regions] and name != key:
            out.append(name)
    return out


def check_key_free(
    sdata,
    key: str,
    *,
    overwrite: bool = False,
    parameter: str = "key_added",
    kind: str | None = None,
    inputs: Collection[str] = (),
    replaced: Collection[str] = (),
) -> None:
    """Raise unless element ``key`` may be written to ``sdata`` (see the module's rule).

    Parameters
    ----------
    sdata
        SpatialData object.
    key
        Name of the element to write.
    overwrite
        Whether the caller asked to replace an existing element of the same type.
    parameter
        The argument that named ``key``, for the messages.
    kind
        Type of the element to write (one of :data:`ELEMENT_TYPES`); an existing element of another type under
        ``key`` raises a :class:`KeyError` even with ``overwrite``. ``None`` skips this check.
    inputs
        Names of the elements the call reads: replacing one of them raises a :class:`ValueError`.
    replaced
        Names of all the elements the call writes: a table among them may annotate ``key``.
    """
    if not isinstance(key, str) or not key:
        msg = f"{parameter} must be a non-empty string, got {key!r}."
        raise ValueError(msg)
    if kind is not None and kind not in ELEMENT_TYPES:  # pragma: no cover - a programming error
        msg = f"kind must be one of {ELEMENT_TYPES}, got {kind!r}."
        raise ValueError(msg)
    if key not in sdata:
        return
    held = element_type(sdata, key)
    if kind is not None and held is not None and held != kind:
        msg = (
            f"{parameter}={key!r} names {_TYPE_NAMES[held]} of this SpatialData object, and this call writes "
            f"{_TYPE_NAMES[kind]}: element names are shared by all types, so it would replace that element. "
            f"Pick another {parameter} (overwrite=True never replaces an element of another type)."
        )
        raise KeyError(msg)
    if key in set(inputs):
        msg = (
            f"{parameter}={key!r} names an element this call reads; it cannot be replaced by what is made from it. "
            f"Pick another {parameter}."
        )
        raise ValueError(msg)
    if not overwrite:
        msg = (
            f"An element named {key!r} already exists in the SpatialData object. Choose another {parameter} "
            f"or pass overwrite=True to replace it."
        )
        raise KeyError(msg)
    tables = [t for t in annotating_tables(sdata, key) if t not in set(replaced)]
    if tables:
        msg = (
            f"{parameter}={key!r} names an element that the table(s) {tables} annotate; replacing it would leave them "
            f"annotating elements they were not made from. Pick another {parameter}, or delete those tables first "
            f"(del sdata[{tables[0]!r}])."
        )
        raise ValueError(msg)


def write_elements(
    sdata,
    elements: Mapping[str, Any],
    *,
    overwrite: bool = False,
    inputs: Collection[str] = (),
    parameters: Mapping[str, str] | None = None,
    params: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Store several new elements at once: all names are checked before any is stored, so all or none are.

    Parameters
    ----------
    sdata
        SpatialData object.
    elements
        Name -> new element (image, labels, points, shapes or table), already built.
    overwrite
        Replace existing elements of the same type (see :func:`check_key_free` for what is never replaced).
    inputs
        Names of the elements the call reads; none of them is replaced.
    parameters
        Name -> the argument that named it, for the messages (default ``"key_added"``).
    params
        Name -> the parameters to record for it with :func:`record_params`.

    Returns
    -------
    Name -> the element as stored in ``sdata``.
    """
    parameters = dict(parameters or {})
    kinds = {key: type_of(element) for key, element in elements.items()}  # validates every element first
    for key in elements:
        check_key_free(
            sdata,
            key,
            overwrite=overwrite,
            parameter=parameters.get(key, "key_added"),
            kind=kinds[key],
            inputs=inputs,
            replaced=elements,
        )
    # tables last, so that the elements they annotate are there when they arrive
    order = sorted(elements, key=lambda k: kinds[k] == "tables")
    old = {key: sdata[key] for key in order if key in sdata}
    done: list[str] = []
    try:
        for key in order:
            if key in sdata:
                del sdata[key]
            sdata[key] = elements[key]
            done.append(key)
    except BaseException:  # put everything back as it was
        for key in done:
            if key in sdata:
                del sdata[key]
        for key, element in old.items():
            if key not in sdata:
                sdata[key] = element
        raise
    for key, p in (params or {}).items():
        record_params(sdata, key, p)
    return {key: sdata[key] for key in elements}


def set_element(
    sdata,
    key: str,
    element,
    *,
    overwrite: bool = False,
    inputs: Collection[str] = (),
    parameter: str = "key_added",
):
    """Store ``element`` under ``key``; an existing element is replaced only as :func:`check_key_free` allows.

    Returns the element as stored.
    """
    return write_elements(sdata, {key: element}, overwrite=overwrite, inputs=inputs, parameters={key: parameter})[key]


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
    inputs: Collection[str] = (),
    c_coords: tuple[str, ...] | list[str] | None = RGB,
    scale_factors: list[int] | None | str = "auto",
    chunks: int = 1024,
    params: dict[str, Any] | None = None,
):
    """Parse and store an image element; record ``params`` (JSON-serialisable) for it in ``sdata.attrs``.

    The name is checked first (see :func:`check_key_free`; ``inputs`` are the elements the image is made from),
    the element is built, and only then stored. Returns the element as stored.
    """
    check_key_free(sdata, key, overwrite=overwrite, kind="images", inputs=inputs)
    element = parse_image(data, grid, c_coords=c_coords, scale_factors=scale_factors, chunks=chunks)
    return write_elements(
        sdata, {key: element}, overwrite=overwrite, inputs=inputs, params=None if params is None else {key: params}
    )[key]


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
