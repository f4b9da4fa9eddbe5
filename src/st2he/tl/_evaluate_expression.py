"""``st2he.tl.evaluate_expression``: predicted expression scored gene by gene against measured expression."""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from st2he._elements import check_key_free, write_elements
from st2he._units import gene_columns, lognormalise, table_keys, total_counts, tumour_labels

logger = logging.getLogger("st2he")

#: Per-gene metric columns whose mean and median the summary reports.
METRICS = (
    "pearson",
    "spearman",
    "rmse",
    "ssim",
    "pearson_hist_convention",
    "pearson_diffst_convention",
    "ssim_diffst_convention",
    "rmse_diffst_convention",
)
#: Diff-ST's metrics (``super_res_sample.py``), whose summary also has Diff-ST's average that skips zeros.
DIFFST_METRICS = ("pearson_diffst_convention", "ssim_diffst_convention", "rmse_diffst_convention")
#: Number of highly variable genes of the second summary (HEST's top-50 HVGs).
N_HVG = 50
#: What a predicted table may hold, how counts are normalised, and how units are matched.
PREDICTIONS = ("log1p_cp10k", "counts")
NORMALISATIONS = ("log1p_cp10k", "log1p")
MATCHES = ("instance", "grid")
#: SSIM window (skimage's default 7 x 7 uniform window): gene maps smaller than this get NaN.
SSIM_WIN = 7
#: Diff-ST's SSIM: each min-max normalised map as ``uint8(x * 225)``, Gaussian window (sigma 1.5: 11 x 11 taps).
DIFFST_LEVELS = 225
DIFFST_SIGMA = 1.5
DIFFST_WIN = 11


def evaluate_expression(
    sdata,
    *,
    pred_key: str,
    true_key: str,
    genes: Sequence[str] | None = None,
    tumour_key: str | None = None,
    tumour_values: Sequence | None = None,
    tumour_probability: str = "tumour_probability",
    data_range: float | str = "measured",
    prediction: str = "log1p_cp10k",
    normalisation: str = "log1p_cp10k",
    match: str = "instance",
    key_added: str | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Score predicted expression against measured expression, gene by gene, over the units both tables hold.

    The predicted table (:func:`st2he.tl.predict_expression`) holds log-normalised expression; the measured table
    holds counts, which are log-normalised here as ``log1p(counts / total * 1e4)`` with ``total`` the unit's counts
    over *every* gene of the measured table (HiST's and HEST's target). Units are matched by instance id: both
    tables must annotate the same shapes element (the region of a spatialdata table). Every metric is computed from
    the shared units that lie in tissue (``obs["in_tissue"]`` of the predicted table when it has one, else every
    shared unit), each counted once; the two map metrics place them on their grid, with zeros everywhere else.

    Per gene (one row each):

    - ``pearson``, ``spearman``: signed correlation of measured and predicted values
      (:func:`scipy.stats.pearsonr`, :func:`scipy.stats.spearmanr`); NaN for a gene that has no variance in either
      table (reported in a warning and counted in the summary) or with fewer than two units;
    - ``rmse``: root mean squared difference of the log-normalised values;
    - ``ssim``: structural similarity (:func:`skimage.metrics.structural_similarity`, 7 x 7 window) of the two gene
      maps of gridded units (bins, spots: ``obs["array_row"]`` / ``obs["array_col"]``), each unit one pixel of the
      grid spanned by the scored units, units absent or out of tissue zero-filled (Visium's doubled spot columns,
      where every spot's ``array_row + array_col`` has one parity, are halved so that neighbouring spots are
      neighbouring pixels). Its data range is fixed per gene: the measured map's maximum minus its minimum
      (``data_range="measured"``), or the number given for every gene. NaN for units without array coordinates
      (cells), a grid under 7 x 7 or a measured map with no range;
    - ``pearson_hist_convention``: HiST's convention, **not comparable with** ``pearson``: the Pearson correlation
      over every position of the same gene maps, background (zeros where no unit is) included. The zeros agree in
      both maps, so it usually comes out higher wherever the tissue does not fill its bounding box; use it only to
      set st2he's numbers beside HiST's paper;
    - ``pearson_diffst_convention``, ``ssim_diffst_convention``, ``rmse_diffst_convention``: Diff-ST's conventions,
      **not comparable with** ``pearson``, ``ssim`` and ``rmse``: computed as Diff-ST's ``super_res_sample.py`` does
      on its Xenium test patches, here on the same whole-grid gene maps (of the same normalised values) as
      ``pearson_hist_convention``. The Pearson is the **absolute value** of ``pearson_hist_convention``, so an
      anti-correlated prediction scores as well as a correlated one. For SSIM and RMSE each map, measured and
      predicted alike, is min-max normalised to [0, 1] on its own: any offset or scale error of the prediction is
      forgiven, and the range is not fixed per gene. SSIM then compares ``uint8(x * 225)`` (truncated to 226 levels;
      nothing saturates, as x <= 1) with the data range of uint8, 255, and a Gaussian window (sigma 1.5, 11 x 11;
      :func:`skimage.metrics.structural_similarity` with ``gaussian_weights=True``: what Diff-ST's call computes on
      scikit-image >= 0.20, which ignores its ``multichannel=True``); RMSE is that of the two normalised maps. NaN
      where either map is constant (Diff-ST's code divides by zero there), for units without array coordinates
      (cells), and for SSIM on a grid under 11 x 11. Diff-ST's summary averages the entries that are not zero
      (``np.mean(x[np.nonzero(x)])``): the genes it skips hold 0 and drop out, and so does any gene scored exactly 0
      (``*_mean_nonzero`` below; NaN genes are left out too, where Diff-ST's average would turn NaN). Diff-ST scores
      each test patch and gene, st2he each gene over the whole map (evaluate crop by crop to score patches). Use
      these only to set st2he's numbers beside Diff-ST's paper and those that report in its style;
    - ``n_units``: units the gene was scored over; ``mean_true``, ``var_true``: mean and variance (``ddof=0``) of
      its measured log-normalised values over them; ``highly_variable``: whether it is one of the top-50 highly
      variable genes.

    Summary (``df.attrs["summary"]``, ``uns["summary"]`` of the stored table): for each metric its mean and median
    over all genes (``pearson_mean``, ``pearson_median``, ...) and over the top-50 highly variable genes
    (``pearson_mean_hvg``, ...), NaN genes left out; for the Diff-ST convention columns also Diff-ST's average,
    which leaves out the genes scored exactly 0 as well (``pearson_diffst_convention_mean_nonzero``, its ``_hvg``, and
    the same for ``ssim_diffst_convention`` and ``rmse_diffst_convention``); ``n_nan_genes`` and ``nan_genes`` (genes
    with NaN Pearson);
    the top-50 highly variable genes ``hvg``: of the evaluated genes, by :func:`scanpy.pp.highly_variable_genes`
    (``flavor="seurat"``) on their measured log-normalised values over the scored units (all genes when there are
    50 or fewer); ``tumour_auroc`` and ``tumour_auprc``: :func:`sklearn.metrics.roc_auc_score` and
    :func:`sklearn.metrics.average_precision_score` of the predicted ``obs[tumour_probability]`` against the
    tumour labels of ``tumour_key`` over the scored units with a label and a probability (NaN without
    ``tumour_key``, or when only one class is present); counts of units (``n_units_measured``,
    ``n_units_predicted``, ``n_units_shared``, ``n_units``, ``n_units_gridded``, ``n_tumour_units``).

    Parameters
    ----------
    sdata
        SpatialData object with both tables.
    pred_key
        Table of predicted log-normalised expression (dense or sparse), e.g. from :func:`st2he.tl.predict_expression`.
    true_key
        Table of measured counts over the same units (e.g. from :func:`st2he.pp.aggregate_transcripts`).
    genes
        Genes to score. Default: every gene of the predicted table that the measured table has.
    tumour_key
        Column of tumour labels in ``obs`` of the measured table (else of the predicted table): boolean or 0/1, or
        any column with ``tumour_values``. ``None``: no tumour metrics.
    tumour_values
        Values of ``tumour_key`` that mean tumour (every other non-missing value means not tumour).
    tumour_probability
        Column of the predicted table's ``obs`` with the predicted tumour probability.
    data_range
        SSIM data range: ``"measured"`` (per gene, the measured map's max - min) or one positive number for all genes.
    prediction
        What the predicted table holds: ``"log1p_cp10k"`` (log-normalised expression, as
        :func:`st2he.tl.predict_expression` writes) or ``"counts"`` (predicted counts, as :func:`st2he.tl.super_resolve`
        writes). Counts are normalised here by ``normalisation``, both tables the same way over the same genes.
    normalisation
        With ``prediction="counts"``: ``"log1p_cp10k"`` (``log1p(counts / total * 1e4)``, ``total`` each unit's
        counts in its own table over the same genes: every gene both tables hold) or ``"log1p"``
        (``log1p(counts)``, for units of equal area such as bins). Ignored otherwise (the measured table is then
        normalised over every gene, as above).
    match
        How units are matched: ``"instance"`` (same annotated shapes element, same instance id) or ``"grid"`` (both
        tables gridded bins of the same size: the same ``obs["array_row"]`` / ``obs["array_col"]``, whatever element
        each annotates; e.g. the bins of :func:`st2he.tl.super_resolve` against the bins of
        :func:`st2he.pp.aggregate_transcripts` over the true molecules).
    key_added
        Name of the table written. Default ``f"{pred_key}_metrics"``.
    overwrite
        Replace an existing table of that name.

    Returns
    -------
    Data frame with one row per gene (index: gene) and the columns above, the values of the new table
    ``sdata.tables[key_added]`` (genes in ``obs``, no region annotation), with ``attrs["summary"]`` and
    ``attrs["params"]`` (also in the table's ``uns`` and in ``sdata.attrs["st2he"][key_added]``).
    """
    if key_added is None:
        key_added = f"{pred_key}_metrics"
    check_key_free(sdata, key_added, overwrite=overwrite, kind="tables", inputs={pred_key, true_key})
    df, summary, params = _evaluate(
        sdata,
        pred_key=pred_key,
        true_key=true_key,
        genes=genes,
        tumour_key=tumour_key,
        tumour_values=tumour_values,
        tumour_probability=tumour_probability,
        data_range=data_range,
        prediction=prediction,
        normalisation=normalisation,
        match=match,
    )
    _store(sdata, df, summary, params, key_added, overwrite)
    logger.info(
        "evaluate_expression: %s vs %s, %d genes over %d units: mean Pearson %.3f (median %.3f), mean SSIM %.3f",
        pred_key,
        true_key,
        len(df),
        summary["n_units"],
        summary["pearson_mean"],
        summary["pearson_median"],
        summary["ssim_mean"],
    )
    df.attrs["summary"] = summary
    df.attrs["params"] = params
    return df


# ------------------------------------------------------------------------------------------------ the work


def _evaluate(
    sdata,
    *,
    pred_key: str,
    true_key: str,
    genes: Sequence[str] | None = None,
    tumour_key: str | None = None,
    tumour_values: Sequence | None = None,
    tumour_probability: str = "tumour_probability",
    data_range: float | str = "measured",
    prediction: str = "log1p_cp10k",
    normalisation: str = "log1p_cp10k",
    match: str = "instance",
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any]]:
    """The per-gene frame, the summary and the parameters of :func:`evaluate_expression`, nothing stored."""
    data_range = _check_data_range(data_range)
    _check_choice(prediction, "prediction", PREDICTIONS)
    _check_choice(normalisation, "normalisation", NORMALISATIONS)
    _check_choice(match, "match", MATCHES)
    pred = get_table(sdata, pred_key, "pred_key")
    true = get_table(sdata, true_key, "true_key")
    genes = _genes(pred, true, genes, pred_key, true_key)
    if match == "grid":
        ipred, itrue, region = match_grid(pred, true, pred_key, true_key)
    else:
        ipred, itrue, region = match_units(pred, true, pred_key, true_key)

    # units scored: shared and in tissue (the predicted table says where tissue is)
    if "in_tissue" in pred.obs.columns:
        in_tissue = pred.obs["in_tissue"].to_numpy()[ipred]
        in_tissue = pd.array(in_tissue, dtype="boolean").fillna(False).to_numpy(dtype=bool)
    else:
        in_tissue = np.ones(len(ipred), dtype=bool)
    ipred, itrue = ipred[in_tissue], itrue[in_tissue]
    n_units = len(ipred)
    if n_units == 0:
        msg = (
            f"None of the {len(in_tissue)} units that {pred_key!r} and {true_key!r} share lies in tissue "
            f"({pred_key!r}.obs['in_tissue'] is False for all of them); nothing to score."
        )
        raise ValueError(msg)

    if prediction == "counts":
        # both tables hold counts: normalised the same way over the same genes
        # totals over every gene both tables hold (not only the scored ones), the same genes in both tables
        common = shared_genes(pred, true)
        measured_all = _dense(true.X[itrue][:, gene_columns(true, common, name=true_key)])
        predicted_all = _dense(pred.X[ipred][:, gene_columns(pred, common, name=pred_key)])
        pick = pd.Index(common).get_indexer(genes)
        measured = _normalise_counts(measured_all, normalisation)[:, pick]
        predicted = predicted_all
        if (predicted < 0).any():
            msg = (
                f"prediction='counts' but the predicted table {pred_key!r} holds negative values: it does not hold "
                "counts; pass prediction='log1p_cp10k' for log-normalised predictions."
            )
            raise ValueError(msg)
        predicted = _normalise_counts(predicted, normalisation)[:, pick].astype(np.float32)
    else:
        # measured: log-normalised with totals over every gene of the measured table; predicted: as stored
        totals = total_counts(true)[itrue]
        measured = lognormalise(true.X[itrue][:, gene_columns(true, genes, name=true_key)], totals)
        predicted = _dense(pred.X[ipred][:, gene_columns(pred, genes, name=pred_key)])
    if not np.isfinite(predicted).all():
        bad = [g for g, ok in zip(genes, np.isfinite(predicted).all(axis=0), strict=True) if not ok]
        msg = f"The predicted table {pred_key!r} holds NaN or infinite values for genes {bad[:10]}; cannot score them."
        raise ValueError(msg)

    pearson, spearman = _correlations(measured, predicted)
    rmse = np.sqrt(np.mean((predicted.astype(np.float64) - measured) ** 2, axis=0))
    grid = _grid_positions(true, pred, itrue, ipred)
    maps = _map_metrics(measured, predicted, grid, data_range)
    hvg = _top_hvg(measured, genes)

    df = pd.DataFrame(
        {
            "pearson": pearson,
            "spearman": spearman,
            "rmse": rmse,
            **maps,
            "n_units": np.full(len(genes), n_units, dtype=np.int64),
            "mean_true": measured.mean(axis=0, dtype=np.float64),
            "var_true": measured.var(axis=0, dtype=np.float64),
            "highly_variable": np.isin(genes, hvg),
        },
        index=pd.Index(genes, name="gene"),
    )
    nan_genes = [g for g, r in zip(genes, pearson, strict=True) if not np.isfinite(r)]
    if nan_genes:
        shown = ", ".join(nan_genes[:10]) + (" ..." if len(nan_genes) > 10 else "")
        msg = (
            f"{len(nan_genes)} of {len(genes)} genes have no variance in the measured or the predicted values over the "
            f"{n_units} units scored (or too few units); their Pearson and Spearman are NaN: {shown}."
        )
        warnings.warn(msg, UserWarning, stacklevel=3)

    summary: dict[str, Any] = {"n_genes": len(genes)}
    hv = df["highly_variable"].to_numpy()
    for name in METRICS:
        values = df[name].to_numpy(dtype=np.float64)
        summary[f"{name}_mean"] = _nan_stat(np.nanmean, values)
        summary[f"{name}_median"] = _nan_stat(np.nanmedian, values)
        summary[f"{name}_mean_hvg"] = _nan_stat(np.nanmean, values[hv])
        summary[f"{name}_median_hvg"] = _nan_stat(np.nanmedian, values[hv])
        if name in DIFFST_METRICS:  # Diff-ST's average: the entries that are not zero (and here not NaN)
            summary[f"{name}_mean_nonzero"] = _nan_stat(np.mean, values[values != 0])
            summary[f"{name}_mean_nonzero_hvg"] = _nan_stat(np.mean, values[hv & (values != 0)])
    summary["n_nan_genes"] = len(nan_genes)
    summary["nan_genes"] = nan_genes
    summary["hvg"] = list(hvg)
    auroc, auprc, n_tumour = _tumour_metrics(
        pred, true, ipred, itrue, tumour_key, tumour_values, tumour_probability, pred_key, true_key
    )
    summary["tumour_auroc"] = auroc
    summary["tumour_auprc"] = auprc
    summary["n_tumour_units"] = n_tumour
    summary["n_units_measured"] = int(true.n_obs)
    summary["n_units_predicted"] = int(pred.n_obs)
    summary["n_units_shared"] = len(in_tissue)
    summary["n_units"] = n_units
    summary["n_units_gridded"] = n_units if grid is not None else 0
    params: dict[str, Any] = {
        "pred_key": pred_key,
        "true_key": true_key,
        "region": region,
        "genes": list(genes),
        "tumour_key": tumour_key,
        "tumour_values": None if tumour_values is None else list(tumour_values),
        "tumour_probability": tumour_probability,
        "data_range": data_range,
        "prediction": prediction,
        "normalisation": normalisation if prediction == "counts" else "log1p_cp10k",
        "match": match,
        "in_tissue": "in_tissue" in pred.obs.columns,
        "ssim_window": SSIM_WIN,
        "diffst_ssim": {"levels": DIFFST_LEVELS, "sigma": DIFFST_SIGMA, "window": DIFFST_WIN, "data_range": 255},
        "n_hvg": N_HVG,
        "hvg_flavor": "seurat",
    }
    return df, summary, params


def get_table(sdata, key: str, parameter: str):
    """Table ``key`` of ``sdata``; an error names the tables there are."""
    if not isinstance(key, str) or key not in sdata.tables:
        msg = f"{parameter}={key!r} is not a table of this SpatialData object; its tables are {sorted(sdata.tables)}."
        raise KeyError(msg)
    return sdata.tables[key]


def unit_ids(table, name: str) -> tuple[pd.Index, list[str]]:
    """``(region, instance id)`` of each row of a table that annotates shapes (ids as strings), and its regions."""
    regions, region_key, instance_key = table_keys(table, name=name)
    for column in (region_key, instance_key):
        if column not in table.obs.columns:
            msg = f"Table {name!r} has no obs column {column!r} although its spatialdata attributes name it."
            raise ValueError(msg)
    keys = pd.MultiIndex.from_arrays(
        [table.obs[region_key].astype(str).to_numpy(), table.obs[instance_key].astype(str).to_numpy()]
    )
    return keys, [str(r) for r in regions]


def match_units(pred, true, pred_key: str, true_key: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Row indices into ``pred`` and ``true`` of the units both hold (same annotated element, same instance id)."""
    kp, rp = unit_ids(pred, pred_key)
    kt, rt = unit_ids(true, true_key)
    shared_regions = [r for r in rp if r in rt]
    if not shared_regions:
        msg = (
            f"The tables annotate different elements: {pred_key!r} annotates {rp} and {true_key!r} annotates {rt}. "
            "Units are matched by instance id within one shapes element: predict over the measured table's units "
            f"(units={rt[0]!r})."
        )
        raise ValueError(msg)
    for keys, name in ((kp, pred_key), (kt, true_key)):
        if keys.has_duplicates:
            dup = keys[keys.duplicated()][0]
            msg = f"Table {name!r} holds unit {dup[1]!r} of {dup[0]!r} more than once; each unit must be one row."
            raise ValueError(msg)
    itrue = kt.get_indexer(kp)
    ipred = np.flatnonzero(itrue >= 0)
    itrue = itrue[ipred]
    if len(ipred) == 0:
        msg = (
            f"The tables {pred_key!r} ({pred.n_obs} units) and {true_key!r} ({true.n_obs} units) share no unit of "
            f"{shared_regions}: no instance id is in both (e.g. {kp[0][1] if len(kp) else None!r} and "
            f"{kt[0][1] if len(kt) else None!r}). Predict over the measured table's units."
        )
        raise ValueError(msg)
    if len(ipred) < max(pred.n_obs, true.n_obs):
        logger.info(
            "evaluate_expression: %d units shared; %d of %r and %d of %r are in one table only and not scored.",
            len(ipred),
            pred.n_obs - len(ipred),
            pred_key,
            true.n_obs - len(ipred),
            true_key,
        )
    return ipred, itrue, shared_regions


def match_grid(pred, true, pred_key: str, true_key: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Row indices into ``pred`` and ``true`` of the bins both hold, matched by ``array_row`` / ``array_col``."""
    keys = []
    for table, name in ((pred, pred_key), (true, true_key)):
        obs = table.obs
        missing = [c for c in ("array_row", "array_col") if c not in obs.columns]
        if missing:
            msg = (
                f"match='grid' needs gridded units, but table {name!r} has no obs column(s) {missing}; pass "
                "match='instance' to match units by instance id."
            )
            raise ValueError(msg)
        r = pd.to_numeric(obs["array_row"], errors="coerce").to_numpy(dtype=np.float64)
        c = pd.to_numeric(obs["array_col"], errors="coerce").to_numpy(dtype=np.float64)
        if not (np.isfinite(r).all() and np.isfinite(c).all()):
            msg = f"Table {name!r} has missing array_row / array_col values; match='grid' needs them for every unit."
            raise ValueError(msg)
        key = pd.MultiIndex.from_arrays([r.astype(np.int64), c.astype(np.int64)])
        if key.has_duplicates:
            dup = key[key.duplicated()][0]
            msg = f"Table {name!r} holds the grid position (array_row, array_col) = {dup} more than once."
            raise ValueError(msg)
        keys.append(key)
    areas = [
        np.unique(pd.to_numeric(t.obs["area_um2"], errors="coerce").to_numpy(dtype=np.float64))
        if "area_um2" in t.obs.columns
        else None
        for t in (pred, true)
    ]
    if all(a is not None and len(a) == 1 for a in areas) and not np.isclose(areas[0][0], areas[1][0], rtol=1e-6):
        msg = (
            f"match='grid' needs bins of one size in both tables, but {pred_key!r} has bins of {areas[0][0]:g} µm² and "
            f"{true_key!r} of {areas[1][0]:g} µm²; aggregate the truth with the same bin_size."
        )
        raise ValueError(msg)
    itrue = keys[1].get_indexer(keys[0])
    ipred = np.flatnonzero(itrue >= 0)
    itrue = itrue[ipred]
    if len(ipred) == 0:
        msg = f"The tables {pred_key!r} and {true_key!r} share no grid position (array_row, array_col)."
        raise ValueError(msg)
    regions = [str(r) for r in table_keys(true, name=true_key)[0]]
    return ipred, itrue, regions


def _check_choice(value, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        msg = f"{name} must be one of {choices}, got {value!r}."
        raise ValueError(msg)


def _normalise_counts(counts, normalisation: str) -> np.ndarray:
    """``log1p`` of counts, per 10k of each unit's counts over these genes (``"log1p_cp10k"``) or raw."""
    x = _dense(counts).astype(np.float64)
    if normalisation == "log1p":
        return np.log1p(np.clip(x, 0, None))
    return lognormalise(x, x.sum(axis=1))


def shared_genes(pred, true) -> list[str]:
    """Genes of the predicted table that the measured table also holds, in the predicted table's order."""
    measured = set(map(str, true.var_names))
    return [str(g) for g in pred.var_names if str(g) in measured]


def _genes(pred, true, genes, pred_key: str, true_key: str) -> list[str]:
    if genes is None:
        genes = shared_genes(pred, true)
        if not genes:
            msg = (
                f"The tables {pred_key!r} and {true_key!r} have no gene in common (e.g. {list(pred.var_names[:5])} and "
                f"{list(true.var_names[:5])}); nothing to score."
            )
            raise ValueError(msg)
        return genes
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        msg = "genes is empty; pass the genes to score, or None for every gene both tables have."
        raise ValueError(msg)
    if len(set(genes)) != len(genes):
        msg = f"genes names some genes more than once: {sorted({g for g in genes if genes.count(g) > 1})}."
        raise ValueError(msg)
    gene_columns(pred, genes, name=pred_key)
    gene_columns(true, genes, name=true_key)
    return genes


def _check_data_range(data_range):
    if isinstance(data_range, str):
        if data_range != "measured":
            msg = f"data_range must be 'measured' or a positive number, got {data_range!r}."
            raise ValueError(msg)
        return data_range
    if isinstance(data_range, numbers.Real) and not isinstance(data_range, bool):
        if math.isfinite(data_range) and data_range > 0:
            return float(data_range)
    msg = f"data_range must be 'measured' or a positive number, got {data_range!r}."
    raise ValueError(msg)


def _dense(x) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


def _correlations(measured: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed Pearson and Spearman per gene (columns); NaN where either has no variance or under two units."""
    from scipy.stats import pearsonr, spearmanr

    n_genes = measured.shape[1]
    pearson = np.full(n_genes, np.nan)
    spearman = np.full(n_genes, np.nan)
    if measured.shape[0] < 2:
        return pearson, spearman
    for j in range(n_genes):
        x = measured[:, j].astype(np.float64)
        y = predicted[:, j].astype(np.float64)
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        pearson[j] = pearsonr(x, y).statistic
        spearman[j] = spearmanr(x, y).statistic
    return pearson, spearman


def _grid_positions(true, pred, itrue, ipred) -> tuple[np.ndarray, np.ndarray, tuple[int, int]] | None:
    """``(rows, cols, shape)`` of the scored units on their array grid (origin at its top-left unit), or None."""
    for table, rows in ((true, itrue), (pred, ipred)):
        obs = table.obs
        if "array_row" not in obs.columns or "array_col" not in obs.columns:
            continue
        r = pd.to_numeric(obs["array_row"], errors="coerce").to_numpy(dtype=np.float64)[rows]
        c = pd.to_numeric(obs["array_col"], errors="coerce").to_numpy(dtype=np.float64)[rows]
        if not (np.isfinite(r).all() and np.isfinite(c).all()) or len(r) == 0:
            continue
        r, c = r.astype(np.int64), c.astype(np.int64)
        if len(r) > 1 and len(np.unique((r + c) % 2)) == 1:
            c = c // 2  # Visium numbers spot columns 0, 2, 4 on even rows and 1, 3, 5 on odd rows
        r, c = r - int(r.min()), c - int(c.min())
        shape = (int(r.max()) + 1, int(c.max()) + 1)
        if len(np.unique(r * shape[1] + c)) != len(r):
            logger.warning("evaluate_expression: several units share an array_row / array_col; no gene maps (SSIM).")
            return None
        return r, c, shape
    return None


def _map_metrics(measured, predicted, grid, data_range) -> dict[str, np.ndarray]:
    """Per gene, on gene maps with zero-filled background: SSIM, HiST's whole-grid Pearson and Diff-ST's metrics.

    NaN for every gene without a grid.
    """
    from scipy.stats import pearsonr
    from skimage.metrics import structural_similarity

    n_genes = measured.shape[1]
    out = {name: np.full(n_genes, np.nan) for name in ("ssim", "pearson_hist_convention", *DIFFST_METRICS)}
    if grid is None:
        return out
    rows, cols, shape = grid
    small = min(shape) < SSIM_WIN
    small_diffst = min(shape) < DIFFST_WIN
    for j in range(n_genes):
        a = np.zeros(shape, dtype=np.float64)
        b = np.zeros(shape, dtype=np.float64)
        a[rows, cols] = measured[:, j]
        b[rows, cols] = predicted[:, j]
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            r = pearsonr(a.ravel(), b.ravel()).statistic
            out["pearson_hist_convention"][j] = r
            # Diff-ST (XiaofeiWang2018/Diffusion-ST @ 1206110, super_res_sample.py lines 97-110, Xenium): |r| of the
            # maps; each map min-max normalised on its own; RMSE of those / the measured one's range (1); SSIM of
            # uint8(x * 225) by guided_diffusion/script_util.py get_ssim (line 32); summary: lines 147-149
            out["pearson_diffst_convention"][j] = abs(r)
            na = (a - a.min()) / np.ptp(a)
            nb = (b - b.min()) / np.ptp(b)
            out["rmse_diffst_convention"][j] = np.sqrt(np.mean((nb - na) ** 2))
            if not small_diffst:
                out["ssim_diffst_convention"][j] = structural_similarity(
                    (na * DIFFST_LEVELS).astype(np.uint8),  # truncated, as numpy's uint8() of a float
                    (nb * DIFFST_LEVELS).astype(np.uint8),
                    data_range=255,
                    gaussian_weights=True,
                    sigma=DIFFST_SIGMA,
                )
        rng = float(a.max() - a.min()) if data_range == "measured" else float(data_range)
        if small or rng <= 0:
            continue
        out["ssim"][j] = structural_similarity(a, b, data_range=rng, win_size=SSIM_WIN)
    return out


def _top_hvg(measured: np.ndarray, genes: list[str]) -> list[str]:
    """The top-50 highly variable genes (scanpy, seurat flavour) of the measured log-normalised values; all if <= 50."""
    if len(genes) <= N_HVG:
        return list(genes)
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(X=measured.astype(np.float32), var=pd.DataFrame(index=pd.Index(genes)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # genes without counts make scanpy warn about NaN dispersions
        table = sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=N_HVG, inplace=False)
    table.index = pd.Index(genes)
    return [g for g in genes if bool(table.loc[g, "highly_variable"])]


def _tumour_metrics(pred, true, ipred, itrue, tumour_key, tumour_values, tumour_probability, pred_key, true_key):
    """``(AUROC, AUPRC, units used)`` of the predicted tumour probability against the tumour labels."""
    if tumour_key is None:
        return float("nan"), float("nan"), 0
    if tumour_key in true.obs.columns:
        labels = tumour_labels(true.obs, tumour_key, tumour_values)[itrue]
    elif tumour_key in pred.obs.columns:
        labels = tumour_labels(pred.obs, tumour_key, tumour_values)[ipred]
    else:
        msg = (
            f"tumour_key={tumour_key!r} is not a column of obs of {true_key!r} ({list(true.obs.columns)}) nor of "
            f"{pred_key!r} ({list(pred.obs.columns)})."
        )
        raise KeyError(msg)
    if tumour_probability not in pred.obs.columns:
        msg = (
            f"tumour_probability={tumour_probability!r} is not a column of obs of the predicted table {pred_key!r} "
            f"({list(pred.obs.columns)}); pass the column that holds the predicted tumour probability."
        )
        raise KeyError(msg)
    scores = pd.to_numeric(pred.obs[tumour_probability], errors="coerce").to_numpy(dtype=np.float64)[ipred]
    ok = np.isfinite(labels) & np.isfinite(scores)
    y, s = labels[ok], scores[ok]
    if len(np.unique(y)) < 2:
        msg = (
            f"Tumour AUROC and AUPRC are NaN: over the {int(ok.sum())} scored units with a label in {tumour_key!r} and "
            f"a probability in {tumour_probability!r}, only one class is present (or none)."
        )
        warnings.warn(msg, UserWarning, stacklevel=4)
        return float("nan"), float("nan"), int(ok.sum())
    from sklearn.metrics import average_precision_score, roc_auc_score

    return float(roc_auc_score(y, s)), float(average_precision_score(y, s)), int(ok.sum())


def _nan_stat(fn, values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(fn(values)) if len(values) else float("nan")


def _store(sdata, df: pd.DataFrame, summary, params, key_added: str, overwrite: bool) -> None:
    import anndata as ad
    from spatialdata.models import TableModel

    obs = df.copy()
    obs.index = obs.index.astype(str)
    obs.index.name = None
    adata = ad.AnnData(obs=obs)
    adata.uns["summary"] = dict(summary)
    adata.uns["params"] = dict(params)
    table = TableModel.parse(adata)
    write_elements(
        sdata,
        {key_added: table},
        overwrite=overwrite,
        inputs={params["pred_key"], params["true_key"]},
        params={key_added: params},
    )
