"""Writing one element of a backed SpatialData object to its zarr store, all or nothing."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

logger = logging.getLogger("st2he")

_STAGING = ".st2he-partial"


def write_element(sdata, key: str, *, overwrite: bool = False) -> Path:
    """Write element ``key`` of a zarr-backed SpatialData object to its store: the whole element, or nothing.

    A lazy element (a whole-slide virtual H&E, an input picture) is computed while it is written. spatialdata's
    ``sdata.write_element`` writes into the store as it computes, so an error half-way (a model that fails on a
    tile, a full disk, an interrupted job) leaves a half-written element on disk that blocks the retry. Here the
    element is written into a staging store beside the store first, then moved in with one rename; an existing
    element of that name is replaced only with ``overwrite=True`` and only once the new one is complete.

    Parameters
    ----------
    sdata
        A SpatialData object backed by a zarr store (``sdata.write(path)`` or ``spatialdata.read_zarr(path)``).
    key
        Name of the element to write.
    overwrite
        Replace an element of that name already in the store.

    Returns
    -------
    The element's folder in the store.
    """
    from spatialdata import SpatialData

    from st2he._elements import ELEMENT_TYPES, element_type

    if not sdata.is_backed() or sdata.path is None:
        msg = (
            "write_element needs a SpatialData object backed by a zarr store; write the whole object once with "
            "sdata.write(path) (or read it with spatialdata.read_zarr) and call write_element for later elements."
        )
        raise ValueError(msg)
    kind = element_type(sdata, key)
    if kind is None:
        names = sorted(name for k in ELEMENT_TYPES for name in getattr(sdata, k))
        msg = f"{key!r} is not an element of this SpatialData object; its elements are {names}."
        raise KeyError(msg)
    store = Path(sdata.path)
    target = store / kind / key
    on_disk = [k for k in ELEMENT_TYPES if (store / k / key).exists()]
    if on_disk and not overwrite:
        msg = (
            f"The store {str(store)!r} already holds an element {key!r} ({on_disk[0]}). Pass overwrite=True to "
            "replace it once the new one is written, or choose another name."
        )
        raise KeyError(msg)
    if on_disk and on_disk[0] != kind:
        msg = (
            f"The store {str(store)!r} holds {key!r} as {on_disk[0]}, and the element to write is of type {kind}; "
            "st2he never replaces an element of another type. Rename one of them."
        )
        raise ValueError(msg)
    for stale in store.parent.glob(f".{store.name}.{key}.*{_STAGING}"):  # left by a killed write of this element
        shutil.rmtree(stale, ignore_errors=True)
    staging = store.parent / f".{store.name}.{key}.{uuid.uuid4().hex[:8]}{_STAGING}"
    try:
        SpatialData(**{kind: {key: getattr(sdata, kind)[key]}}).write(staging)
        old = staging / "replaced"
        if on_disk:
            os.replace(target, old)  # the old element stays whole until the new one is in place
        if not (store / kind).exists():
            shutil.copytree(staging / kind, store / kind, ignore=shutil.ignore_patterns(key))
        try:
            os.replace(staging / kind / key, target)
        except OSError:
            if old.exists():
                os.replace(old, target)
            raise
        sdata.write_consolidated_metadata()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("write_element: %s %r written to %s", kind, key, store)
    return target

