"""The cycle check: how much of the measured expression a virtual H&E keeps.

measured expression -> virtual H&E -> expression predicted from it -> per-gene Pearson against the measured
expression. With the real H&E of the same section the same is done on it, and the ratio r(virtual) / r(real) says
what share of the expression an expression model can read from real histology survives in the virtual one.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from st2he._elements import check_key_free, write_elements
from st2he._units import lognormalise, table_keys, total_counts

logger = logging.getLogger("st2he")


def cycle_check(
    sdata,
    *,
    he_key: str = "virtual_he",
    model: Any = None,
    true_key: str = "table",
    real_key: str | None = "auto",
    genes: list[str] | None = None,
    device: str | None = None,
    progress: bool = True,
    key_added: str = "cycle_check",
    overwrite: bool = False,
) -> pd.DataFrame:
    """Check how much measured expression a virtual H&E keeps: expression -> virtual H&E -> expression.

    An expression model (:func:`st2he.tl.train_expression`) reads expression from the virtual H&E ``he_key`` in the
    units the measured table ``true_key`` counts (cells, spots or bins); each gene's prediction is scored against
    the measured expression with :func:`st2he.tl.evaluate_expression` (signed Pearson over the units in tissue:
    the real H&E's tissue when there is one, so that both readings are scored over the same units).
    With a real H&E of the same section (``real_key``) the model reads it too, and
    ``ratio = r_virtual / r_real`` says what share of what the model can read from real histology the virtual
    H&E keeps.

    How to read it: ``r_real`` is the ceiling set by the model and the gene (a gene that does not show in
    histology has a low ``r_real`` whatever the virtual H&E does); ``r_virtual`` near ``r_real`` (ratio near 1)
    means the virtual H&E carries that gene's histological signal; a ratio near 0 means it lost it; a ratio
    above 1 means the virtual H&E shows the gene more plainly than the real one (it was drawn from the molecules,
    so it can). Ratios of genes with ``r_real`` below 0.1 are not reported (NaN): there is nothing to keep. The
    per-unit table shows where: ``obs["disagreement"]`` is the root mean square over genes of the difference
    between the expression read from the virtual H&E and from the real one (or the measured expression when
    there is no real H&E).

    Parameters
    ----------
    sdata
        SpatialData object with the virtual H&E, the measured table and the shapes it annotates.
    he_key
        The virtual H&E image (:func:`st2he.tl.virtual_he`), or any H&E image to check.
    model
        An expression model (:class:`st2he.models.ExpressionModel`) or the folder it was saved in; ``None``: the
        model shipped with st2he (trained on simulated tissue).
    true_key
        Table of measured counts annotating the units (cells, spots or bins).
    real_key
        The real H&E of the same section; ``"auto"`` takes ``"he_image"`` when present (and not ``he_key``),
        ``None`` skips it.
    genes
        Genes to check (default: the model's genes that the table has).
    device
        Torch device for the expression model (default: CUDA when available).
    progress
        Show progress bars.
    key_added
        Name of the table written: the units of ``true_key`` with the expression read from the virtual H&E in
        ``X``, from the real H&E in ``layers["real"]``, the measured log-normalised expression in
        ``layers["measured"]``, ``obs["disagreement"]``, ``obs["error_virtual"]`` and ``obs["error_real"]`` (root
        mean square over genes against the measured expression), the per-gene results in ``uns["per_gene"]`` and
        the summary in ``uns["summary"]``.
    overwrite
        Replace an existing table named ``key_added``.

    Returns
    -------
    Per gene: ``r_virtual``, ``r_real``, ``ratio`` and ``n_units``; the summary (mean and median of each, the
    ratio of the mean Pearsons) in ``df.attrs["summary"]``.
    """
    from spatialdata import SpatialData

    from ._evaluate_expression import _evaluate
    from ._expression import predict_expression

    if true_key not in sdata.tables:
        msg = f"true_key={true_key!r} is not a table of this object; its tables are {sorted(sdata.tables)}."
        raise KeyError(msg)
    if he_key not in sdata.images:
        msg = f"he_key={he_key!r} is not an image of this object; its images are {sorted(sdata.images)}."
        raise KeyError(msg)
    if real_key == "auto":
        real_key = "he_image" if "he_image" in sdata.images and he_key != "he_image" else None
    if real_key is not None and real_key not in sdata.images:
        msg = f"real_key={real_key!r} is not an image of this object; its images are {sorted(sdata.images)}."
        raise KeyError(msg)
    table = sdata.tables[true_key]
    regions, _, _ = table_keys(table, name=true_key)
    if len(regions) != 1:
        msg = f"Table {true_key!r} annotates {len(regions)} elements ({regions}); the cycle check needs one."
        raise ValueError(msg)
    units = regions[0]
    if units not in sdata.shapes:
        msg = f"Table {true_key!r} annotates {units!r}, which is not a shapes element of this object."
        raise KeyError(msg)
    check_key_free(sdata, key_added, overwrite=overwrite, kind="tables", inputs={true_key, he_key, units})

    # predictions and scores are made in a scratch object that shares the elements: only the result is stored
    images = {he_key: sdata.images[he_key]}
    if real_key is not None:
        images[real_key] = sdata.images[real_key]
    scratch = SpatialData(images=images, shapes={units: sdata.shapes[units]}, tables={true_key: table})
    reads = {"virtual": he_key} | ({"real": real_key} if real_key is not None else {})
    predicted, scores = {}, {}
    for name, image_key in reads.items():
        pred_key = f"_cycle_{name}"
        predicted[name] = predict_expression(
            scratch,
            image_key=image_key,
            model=model,
            units=units,
            genes=genes,
            device=device,
            progress=progress,
            key_added=pred_key,
        )
    if "real" in predicted:
        # both readings are scored over the same units: those in the real H&E's tissue
        scratch.tables["_cycle_virtual"].obs["in_tissue"] = predicted["real"].obs["in_tissue"].to_numpy()
    for name in reads:
        pred_key = f"_cycle_{name}"
        scores[name], _, _ = _evaluate(scratch, pred_key=pred_key, true_key=true_key)  # scored, nothing stored

    virtual = scratch.tables["_cycle_virtual"]
    gene_list = list(virtual.var_names)
    per_gene = pd.DataFrame(index=pd.Index(gene_list, name="gene"))
    per_gene["r_virtual"] = scores["virtual"]["pearson"].reindex(gene_list).to_numpy()
    per_gene["n_units"] = scores["virtual"]["n_units"].reindex(gene_list).to_numpy()
    if "real" in scores:
        r_real = scores["real"]["pearson"].reindex(gene_list).to_numpy()
        per_gene["r_real"] = r_real
        with np.errstate(divide="ignore", invalid="ignore"):
            per_gene["ratio"] = np.where(r_real >= MIN_R_REAL, per_gene["r_virtual"].to_numpy() / r_real, np.nan)
    else:
        per_gene["r_real"] = np.nan
        per_gene["ratio"] = np.nan

    # per unit: the expression read from each image, the measured one, and where they disagree
    # measured log-normalised expression, in the table's unit order, then in the predicted units' order
    measured_all = lognormalise(table[:, gene_list].X, total_counts(table))
    order = pd.Index(_unit_ids(table)).get_indexer(_unit_ids(virtual))
    if (order < 0).any():  # pragma: no cover - predict_expression predicts the units the table annotates
        msg = "The predicted units do not match the measured table's units."
        raise RuntimeError(msg)
    measured = measured_all[order]
    x_virtual = np.asarray(virtual.X, dtype=np.float32)
    out = virtual.copy()
    out.layers["measured"] = measured
    out.obs["error_virtual"] = _rms(x_virtual - measured)
    if "real" in predicted:
        x_real = np.asarray(predicted["real"].X, dtype=np.float32)
        out.layers["real"] = x_real
        out.obs["error_real"] = _rms(x_real - measured)
        out.obs["disagreement"] = _rms(x_virtual - x_real)
    else:
        out.obs["error_real"] = np.nan
        out.obs["disagreement"] = out.obs["error_virtual"].to_numpy()
    summary = _summary(per_gene, has_real="real" in predicted)
    out.uns["per_gene"] = {c: per_gene[c].tolist() for c in per_gene.columns} | {"gene": gene_list}
    out.uns["summary"] = summary
    params = {"he_key": he_key, "real_key": real_key, "true_key": true_key, "units": units, "genes": gene_list}
    inputs = {true_key, he_key, units}
    write_elements(sdata, {key_added: out}, overwrite=overwrite, inputs=inputs, params={key_added: params})
    per_gene.attrs["summary"] = summary
    return per_gene


#: Genes whose Pearson on the real H&E is below this get no ratio: there is nothing for the virtual H&E to keep.
MIN_R_REAL = 0.1


def _unit_ids(table) -> np.ndarray:
    _, _, instance_key = table_keys(table)
    return table.obs[instance_key].astype(str).to_numpy()


def _rms(diff: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(np.square(diff, dtype=np.float64), axis=1)).astype(np.float32)


def _summary(per_gene: pd.DataFrame, *, has_real: bool) -> dict:
    summary: dict = {
        "mean_r_virtual": float(np.nanmean(per_gene["r_virtual"])) if per_gene["r_virtual"].notna().any() else None,
        "median_r_virtual": float(np.nanmedian(per_gene["r_virtual"])) if per_gene["r_virtual"].notna().any() else None,
        "n_genes": len(per_gene),
    }
    if has_real:
        r_real = per_gene["r_real"]
        summary["mean_r_real"] = float(np.nanmean(r_real)) if r_real.notna().any() else None
        summary["median_r_real"] = float(np.nanmedian(r_real)) if r_real.notna().any() else None
        ratio = per_gene["ratio"]
        summary["median_ratio"] = float(np.nanmedian(ratio)) if ratio.notna().any() else None
        if summary["mean_r_real"]:
            summary["ratio_of_means"] = summary["mean_r_virtual"] / summary["mean_r_real"]
        summary["n_genes_with_ratio"] = int(ratio.notna().sum())
    return summary
