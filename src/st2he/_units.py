"""Units of expression (cells, spots, bins) and the tables that count or predict genes in them.

One convention for every st2he function that reads or writes expression:

- a table of units annotates a shapes element the spatialdata way (``TableModel``: ``region``, ``region_key``,
  ``instance_key``); :func:`table_keys` reads these back;
- measured tables hold counts (``X``, sparse CSR); predicted tables hold log-normalised expression (dense);
- log-normalised expression is ``log1p(counts / total * 1e4)`` (scanpy's ``normalize_total(target_sum=1e4)`` then
  ``log1p``, HiST's and HEST's target), with ``total`` the unit's counts over every gene of the table;
- centroids in ``obsm["spatial"]`` are in micrometres of the table's coordinate system.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

#: Counts per unit that log-normalised expression scales to (counts per 10k).
TARGET_SUM = 1e4


def table_keys(table, *, name: str = "table") -> tuple[list[str], str, str]:
    """``(regions, region_key, instance_key)`` of a table that annotates shapes, with an error naming the fix."""
    from spatialdata.models import get_table_keys

    try:
        region, region_key, instance_key = get_table_keys(table)
    except (KeyError, ValueError, TypeError) as err:
        msg = (
            f"Table {name!r} does not annotate any element (no spatialdata region / instance keys): {err}. "
            "Parse it with spatialdata.models.TableModel.parse(adata, region=..., region_key=..., instance_key=...)."
        )
        raise ValueError(msg) from err
    if region is None or region_key is None or instance_key is None:
        msg = (
            f"Table {name!r} does not say which element it annotates (region={region!r}, region_key={region_key!r}, "
            f"instance_key={instance_key!r}). Parse it with spatialdata.models.TableModel.parse(adata, region=..., "
            "region_key=..., instance_key=...)."
        )
        raise ValueError(msg)
    regions = [region] if isinstance(region, str) else list(region)
    return regions, region_key, instance_key


def unit_centroids(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(centroids, empty)`` of unit geometries: ``(n, 2)`` x, y, NaN where a geometry is empty or missing (a
    degenerate segmentation: the unit has no place), and that mask."""
    import shapely

    geoms = np.asarray(geoms, dtype=object)
    empty = shapely.is_empty(geoms) | shapely.is_missing(geoms)
    out = np.full((len(geoms), 2), np.nan)
    if (~empty).any():
        out[~empty] = shapely.get_coordinates(shapely.centroid(geoms[~empty])).reshape(-1, 2)
    return out, empty


def total_counts(table) -> np.ndarray:
    """Counts per unit over every gene of a measured table (float64)."""
    return np.asarray(table.X.sum(axis=1), dtype=np.float64).ravel()


def lognormalise(counts, totals: np.ndarray | None = None, *, target_sum: float = TARGET_SUM) -> np.ndarray:
    """``log1p(counts / totals * target_sum)`` as dense float32; a unit with no counts gets zeros.

    Parameters
    ----------
    counts
        Units x genes counts (dense or scipy sparse), possibly a subset of the genes the totals count.
    totals
        Counts per unit over all genes (default: the row sums of ``counts``).
    target_sum
        Counts a unit is scaled to (10,000: counts per 10k).
    """
    import scipy.sparse as sp

    dense = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    dense = dense.astype(np.float64, copy=False)
    if totals is None:
        totals = dense.sum(axis=1)
    totals = np.asarray(totals, dtype=np.float64).ravel()
    if totals.shape[0] != dense.shape[0]:
        msg = f"totals has {totals.shape[0]} entries for {dense.shape[0]} units."
        raise ValueError(msg)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(dense * scale[:, None]).astype(np.float32)


def gene_columns(table, genes: Sequence[str], *, name: str = "table") -> np.ndarray:
    """Column indices of ``genes`` in ``table.var_names``; an error lists the genes that are absent."""
    index = pd.Index(table.var_names)
    missing = [g for g in genes if g not in index]
    if missing:
        shown = ", ".join(map(repr, missing[:10])) + (" ..." if len(missing) > 10 else "")
        msg = (
            f"{len(missing)} of {len(genes)} genes are not in table {name!r}: {shown}. "
            f"The table has {len(index)} genes (table.var_names); pass genes it has."
        )
        raise KeyError(msg)
    return index.get_indexer(list(genes))


def tumour_labels(obs: pd.DataFrame, tumour_key: str, tumour_values: Sequence | None = None) -> np.ndarray:
    """Tumour labels of units as float32: 1 tumour, 0 not, NaN unknown.

    ``obs[tumour_key]`` is boolean or 0/1 (NaN for unknown), or any column with ``tumour_values`` naming the values
    that mean tumour (every other non-missing value means not tumour).
    """
    if tumour_key not in obs.columns:
        msg = f"tumour_key {tumour_key!r} is not a column of the table's obs; it has {list(obs.columns)}."
        raise KeyError(msg)
    col = obs[tumour_key]
    missing = col.isna().to_numpy()
    if tumour_values is not None:
        values = set(tumour_values)
        out = col.map(lambda v: v in values).to_numpy(dtype=np.float32)
    elif pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
        out = col.to_numpy(dtype=np.float32, na_value=np.nan)
        bad = ~missing & ~np.isin(out, (0.0, 1.0))
        if bad.any():
            msg = (
                f"obs[{tumour_key!r}] holds values other than 0/1 (e.g. {out[bad][0]!r}); pass tumour_values= "
                "to say which values mean tumour."
            )
            raise ValueError(msg)
    else:
        shown = list(pd.unique(col.dropna()))[:8]
        msg = (
            f"obs[{tumour_key!r}] is not boolean (values like {shown}); pass tumour_values= naming the values "
            "that mean tumour, e.g. tumour_values=('gland_tumour', 'solid_tumour')."
        )
        raise ValueError(msg)
    out[missing] = np.nan
    return out
