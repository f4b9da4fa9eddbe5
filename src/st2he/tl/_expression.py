"""``st2he.tl.train_expression`` and ``st2he.tl.predict_expression``: expression read back from H&E (HiST).

The geometry (units as output pixels of the model's lattice, chips, exact pooling across chips) is in
:mod:`st2he.tl._expression_units`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from st2he._grid import COORDINATE_SYSTEM, Grid

from ._expression_units import (
    WHITE,
    ChipPlan,
    UnitAccumulator,
    Units,
    _amp,
    _image_raster,
    _intersect,
    array_reader,
    lattice_units,
    lonely_units,
    make_plan,
    raster_reader,
    resolve_pooling,
    run_chips,
    shapes_units,
    snapped_grid,
    unit_pairs,
)

logger = logging.getLogger("st2he")

_UNITS = ("cells", "spots", "bins")
_LOSSES = ("mse", "poisson", "nb")


# ============================================================================================== training data


@dataclass
class Section:
    """One training section: its H&E on the lattice, its units' pixels, targets and tumour labels."""

    name: str
    image: np.ndarray  # (3, H, W) uint8
    grid: Grid  # input pixels
    rows: np.ndarray  # output-pixel pairs
    cols: np.ndarray
    units: np.ndarray
    targets: np.ndarray  # (n_units, G) log1p CP10k
    counts: np.ndarray | None  # (n_units, G) raw counts (poisson / nb)
    totals: np.ndarray  # (n_units,)
    tumour: np.ndarray  # (n_units,) 1 / 0 / NaN
    train_units: np.ndarray  # bool
    val_units: np.ndarray  # bool
    train_cols: int  # training crops stay left of this input-pixel column
    pool_counts: bool = False  # pool this section's units by the mean of counts (pooling="counts" / "auto")


def _table_units(sdata, table_key: str, coordinate_system: str):
    """``(table, Units aligned with the table's rows)`` of the shapes a table annotates."""
    from st2he._units import table_keys

    if table_key not in sdata.tables:
        msg = (
            f"table_key={table_key!r} is not a table of this SpatialData object (its tables are "
            f"{sorted(sdata.tables)}). "
            "Training needs a table of counts per unit: aggregate one with st2he.pp.aggregate_transcripts."
        )
        raise KeyError(msg)
    table = sdata.tables[table_key]
    regions, region_key, instance_key = table_keys(table, name=table_key)
    parts = []
    for region in regions:
        units = shapes_units(
            sdata, region, coordinate_system=coordinate_system, parameter=f"table {table_key!r} region"
        )
        rows = np.flatnonzero((table.obs[region_key].astype(str) == region).to_numpy())
        pos = pd.Index(units.ids).get_indexer(table.obs[instance_key].iloc[rows].to_numpy())
        if (pos < 0).any():
            missing = table.obs[instance_key].iloc[rows][pos < 0].head(5).tolist()
            msg = f"{int((pos < 0).sum())} units of table {table_key!r} are not in shapes {region!r} (e.g. {missing})."
            raise ValueError(msg)
        parts.append((rows, units, pos))
    n = table.n_obs
    geoms = np.empty(n, dtype=object)
    cents = np.zeros((n, 2))
    ids = np.empty(n, dtype=object)
    for rows, units, pos in parts:
        geoms[rows], cents[rows], ids[rows] = units.geoms[pos], units.centroids[pos], units.ids[pos]
    covered = np.zeros(n, bool)
    for rows, _, _ in parts:
        covered[rows] = True
    if not covered.all():
        msg = f"{int((~covered).sum())} rows of table {table_key!r} annotate no shapes element st2he can read."
        raise ValueError(msg)
    return table, Units(key=",".join(regions), ids=ids, geoms=geoms, centroids=cents)


def select_genes(tables: list, genes: Sequence[str] | None, n_genes: int, *, name: str = "table") -> list[str]:
    """The genes to train: ``genes`` (checked against every table), else the top ``n_genes`` highly variable genes.

    Highly variable genes: scanpy's ``highly_variable_genes(flavor="seurat")`` on log1p counts per 10k of the
    tables' units together (genes all tables share), ranked by normalised dispersion.
    """
    from st2he._units import gene_columns, lognormalise, total_counts

    if genes is not None:
        genes = [str(g) for g in genes]
        for t in tables:
            gene_columns(t, genes, name=name)
        return genes
    import anndata
    import scanpy as sc

    common = pd.Index(tables[0].var_names)
    for t in tables[1:]:
        common = common.intersection(pd.Index(t.var_names), sort=False)
    if not len(common):
        msg = "The training tables share no gene; pass genes= the model should predict."
        raise ValueError(msg)
    if n_genes >= len(common):
        return [str(g) for g in common]
    x = np.concatenate([lognormalise(t.X[:, gene_columns(t, common)], total_counts(t)) for t in tables])
    adata = anndata.AnnData(x, var=pd.DataFrame(index=[str(g) for g in common]))
    hvg = sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=int(n_genes), inplace=False)
    hvg.index = adata.var_names
    top = hvg[hvg["highly_variable"]].sort_values("dispersions_norm", ascending=False, kind="stable")
    return [str(g) for g in top.index[:n_genes]]


def _section(
    sdata,
    name: str,
    *,
    image_key: str,
    table_key: str,
    genes: list[str],
    tumour_key: str | None,
    tumour_values,
    um_per_px: float,
    stride: int,
    multiple: int,
    coordinate_system: str,
    need_counts: bool,
) -> Section:
    from st2he._units import gene_columns, lognormalise, total_counts, tumour_labels

    raster = _image_raster(sdata, image_key, coordinate_system)
    table, units = _table_units(sdata, table_key, coordinate_system)
    cols_idx = gene_columns(table, genes, name=table_key)
    area = _intersect(raster.bounds, units.bounds)
    if area[2] <= area[0] or area[3] <= area[1]:
        msg = (
            f"The units of table {table_key!r} do not overlap image {image_key!r} in {coordinate_system!r} (units "
            f"{tuple(round(v, 1) for v in units.bounds)}, image {tuple(round(v, 1) for v in raster.bounds)} µm)."
        )
        raise ValueError(msg)
    grid = snapped_grid(area, um_per_px, multiple)
    image = raster_reader(raster)(grid)
    s = stride * um_per_px
    out = Grid(grid.x0, grid.y0, s, grid.height // stride, grid.width // stride)
    rows, cols, which = unit_pairs(units, out)
    if not len(which):
        msg = f"No unit of table {table_key!r} covers a pixel of image {image_key!r}."
        raise ValueError(msg)
    totals = total_counts(table)
    counts = table.X[:, cols_idx]
    targets = lognormalise(counts, totals)
    raw = None
    if need_counts:
        import scipy.sparse as sp

        raw = (counts.toarray() if sp.issparse(counts) else np.asarray(counts)).astype(np.float32)
    tum = (
        tumour_labels(table.obs, tumour_key, tumour_values)
        if tumour_key is not None
        else np.full(table.n_obs, np.nan, np.float32)
    )
    n = table.n_obs
    return Section(
        name=name,
        image=image,
        grid=grid,
        rows=rows,
        cols=cols,
        units=which,
        targets=targets,
        counts=raw,
        totals=totals.astype(np.float32),
        tumour=tum,
        train_units=np.zeros(n, bool),
        val_units=np.zeros(n, bool),
        train_cols=grid.width,
    )


def _split(sections: list[Section], val_fraction: float, *, multiple: int, stride: int, chip: int, seed: int) -> None:
    """Mark training and validation units: whole sections held out when there are several, else a right-hand band.

    Within a section, the validation band is the right-most ``val_fraction`` of the width (at least one chip); training
    crops stay left of it and validation units lie wholly in it (a unit across the cut is in neither), so no pixel
    is seen on both sides.
    """
    for sec in sections:
        sec.train_units[:] = False
        sec.val_units[:] = False
    present = [np.unique(sec.units) for sec in sections]
    if val_fraction <= 0:
        for sec, p in zip(sections, present, strict=True):
            sec.train_units[p] = True
        return
    if len(sections) > 1:
        n_val = min(len(sections) - 1, max(1, int(round(val_fraction * len(sections)))))
        held = set(np.random.default_rng(seed).choice(len(sections), n_val, replace=False).tolist())
        for i, (sec, p) in enumerate(zip(sections, present, strict=True)):
            (sec.val_units if i in held else sec.train_units)[p] = True
            if i in held:
                sec.train_cols = 0
        return
    sec = sections[0]
    width = sec.grid.width
    cut = int(round(width * (1 - val_fraction) / multiple)) * multiple
    cut = min(cut, width - multiple)
    if cut < chip // 2 or cut <= 0:
        msg = (
            f"The section is {width * sec.grid.pixel_size:g} µm wide: too narrow to hold out {val_fraction:.0%} of it "
            f"for validation with chips of {chip * sec.grid.pixel_size:g} µm. Pass val_fraction=0, a smaller chip_um, "
            "or several sections (validation by section)."
        )
        raise ValueError(msg)
    cut_out = cut // stride
    n = len(sec.targets)
    left = np.zeros(n, bool)
    right = np.zeros(n, bool)
    in_left = sec.cols < cut_out
    np.logical_or.at(left, sec.units[in_left], True)
    np.logical_or.at(right, sec.units[~in_left], True)
    sec.train_units[:] = left & ~right
    sec.val_units[:] = right & ~left
    sec.train_cols = cut


# ============================================================================================== training


class _Sampler:
    """Random training chips (with the 8 flips / right-angle rotations) and the units wholly inside each."""

    def __init__(self, sections: list[Section], chip: int, stride: int) -> None:
        self.sections = [s for s in sections if s.train_units.any() and s.train_cols > 0]
        self.chip, self.stride = chip, stride
        self.totals = []
        weights = []
        for sec in self.sections:
            self.totals.append(np.bincount(sec.units, minlength=len(sec.targets)))
            h = max(sec.grid.height, chip)
            w = max(sec.train_cols, chip)
            weights.append(float((h - chip) // stride + 1) * ((w - chip) // stride + 1))
        if not self.sections:
            msg = "No training units: every unit is held out for validation; lower val_fraction or add sections."
            raise ValueError(msg)
        self.weights = np.asarray(weights, dtype=np.float64)

    def sample(self, n: int, gen, *, augment: bool = True):
        import torch

        hw = self.chip // self.stride
        images, pix, units_out, sec_of, unit_of = [], [], [], [], []
        idx = torch.multinomial(torch.from_numpy(self.weights), n, replacement=True, generator=gen).tolist()
        for b, i in enumerate(idx):
            sec = self.sections[i]
            H, W = sec.grid.height, sec.train_cols
            nr = max(0, (H - self.chip) // self.stride) + 1
            nc = max(0, (W - self.chip) // self.stride) + 1
            r0 = int(torch.randint(0, nr, (1,), generator=gen)) * self.stride
            c0 = int(torch.randint(0, nc, (1,), generator=gen)) * self.stride
            k = int(torch.randint(0, 8, (1,), generator=gen)) if augment else 0
            img = np.full((3, self.chip, self.chip), WHITE, np.uint8)
            part = sec.image[:, r0 : r0 + self.chip, c0 : min(c0 + self.chip, W)]
            img[:, : part.shape[1], : part.shape[2]] = part
            # the units wholly inside the chip (and inside the training columns)
            orr, occ = r0 // self.stride, c0 // self.stride
            h_lim = min(hw, (H - r0) // self.stride)
            w_lim = min(hw, (W - c0) // self.stride)
            inside = (sec.rows >= orr) & (sec.rows < orr + h_lim) & (sec.cols >= occ) & (sec.cols < occ + w_lim)
            inside &= sec.train_units[sec.units]
            u = sec.units[inside]
            full = np.bincount(u, minlength=len(sec.targets)) == self.totals[i]
            keep = inside.copy()
            keep[inside] = full[u]
            rr, cc, uu = sec.rows[keep] - orr, sec.cols[keep] - occ, sec.units[keep]
            flat = rr * hw + cc
            if k:
                img = _dihedral_np(img, k)
                ids = _dihedral_np(np.arange(hw * hw).reshape(1, hw, hw), k).ravel()
                inv = np.empty_like(ids)
                inv[ids] = np.arange(hw * hw)
                flat = inv[flat]
            images.append(img)
            pix.append(flat + b * hw * hw)
            units_out.append(uu)
            sec_of.append(np.full(len(uu), i))
            unit_of.append(uu)
        x = torch.from_numpy(np.stack(images))
        pixels = np.concatenate(pix)
        sec_idx = np.concatenate(sec_of)
        unit_idx = np.concatenate(unit_of)
        batch_of = pixels // (hw * hw)
        keys = np.stack([batch_of, sec_idx, unit_idx], axis=1)
        uniq, local = np.unique(keys, axis=0, return_inverse=True)
        return x, pixels, local.ravel(), uniq


def _dihedral_np(a: np.ndarray, k: int) -> np.ndarray:
    if k >= 4:
        a = a[..., ::-1]
    return np.ascontiguousarray(np.rot90(a, k % 4, axes=(-2, -1)))


def _unit_targets(sections: list[Section], uniq: np.ndarray, need_counts: bool):
    sec_idx, unit_idx = uniq[:, 1], uniq[:, 2]
    t = np.stack([sections[s].targets[u] for s, u in zip(sec_idx, unit_idx, strict=True)]) if len(uniq) else None
    tum = np.array([sections[s].tumour[u] for s, u in zip(sec_idx, unit_idx, strict=True)], np.float32)
    counts = totals = None
    if need_counts and len(uniq):
        counts = np.stack([sections[s].counts[u] for s, u in zip(sec_idx, unit_idx, strict=True)])
        totals = np.array([sections[s].totals[u] for s, u in zip(sec_idx, unit_idx, strict=True)], np.float32)
    return t, tum, counts, totals


def _count_pool(genes, chips: np.ndarray, stride: int, pix, loc, n: int):
    """Units' log1p of the tissue-weighted mean of their pixels' counts per 10k (``pooling="counts"``), in torch."""
    import torch

    from ._expression_units import _MAX_LOG1P_CP10K, _NO_TISSUE_WEIGHT, tissue_fraction_map
    from st2he.models._expression import unit_sums

    w = np.stack([tissue_fraction_map(c, stride) for c in chips])[:, None].astype(np.float32) + _NO_TISSUE_WEIGHT
    w = torch.from_numpy(w).to(genes.device)
    lin, _ = unit_sums(torch.expm1(genes.clamp(max=_MAX_LOG1P_CP10K)) * w, pix, loc, n)
    wsum, _ = unit_sums(w, pix, loc, n)
    return torch.log1p((lin / wsum).clamp_min(0.0))


def _gene_loss(kind: str, pred, target, counts, totals, log_theta):
    import torch
    import torch.nn.functional as F

    if kind == "mse":
        return F.mse_loss(pred, target)
    mu = torch.expm1(pred.clamp(max=15.0)).clamp_min(0) * (totals[:, None] / 1e4) + 1e-6
    if kind == "poisson":
        return (mu - counts * torch.log(mu)).mean()
    theta = torch.exp(log_theta)[None, :]
    ll = (
        torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1)
        + theta * (torch.log(theta) - torch.log(theta + mu))
        + counts * (torch.log(mu) - torch.log(theta + mu))
    )
    return -ll.mean()


def _evaluate(model, sections: list[Section], plan: ChipPlan, *, which: str, batch_size: int, device, features=False):
    """Per-unit pooled predictions over the units marked ``which`` (``"val"`` / ``"train"``) of each section."""
    results = []
    was = model.training
    model.eval()
    try:
        for sec in sections:
            mask = sec.val_units if which == "val" else sec.train_units
            if not mask.any():
                continue
            keep = mask[sec.units]
            rows, cols, units = sec.rows[keep], sec.cols[keep], sec.units[keep]
            acc = UnitAccumulator(
                len(sec.targets),
                len(model.genes),
                features=int(model.config["features"]) if features else 0,
                tumour=model.has_tumour,
                pooling="counts" if sec.pool_counts else "log",
            )
            s = plan.stride * plan.um_per_px
            out_x0, out_y0 = sec.grid.x0, sec.grid.y0

            def pairs_for(og, rows=rows, cols=cols, units=units, out_x0=out_x0, out_y0=out_y0, s=s):
                r0 = int(round((og.y0 - out_y0) / s))
                c0 = int(round((og.x0 - out_x0) / s))
                sel = (rows >= r0) & (rows < r0 + og.height) & (cols >= c0) & (cols < c0 + og.width)
                return rows[sel] - r0, cols[sel] - c0, units[sel]

            run_chips(
                model,
                plan,
                plan.cores(sec.grid),
                array_reader(sec.image, sec.grid),
                pairs_for,
                acc,
                batch_size=batch_size,
                device=device,
            )
            m = acc.means()
            idx = np.flatnonzero(mask & (acc.counts > 0))
            results.append((sec, idx, m))
    finally:
        model.train(was)
    return results


def mean_pearson(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over genes of the Pearson correlation across units (genes without variance in either left out)."""
    p = pred - pred.mean(axis=0)
    t = true - true.mean(axis=0)
    den = np.sqrt((p**2).sum(axis=0) * (t**2).sum(axis=0))
    ok = den > 0
    if not ok.any():
        return float("nan")
    return float(np.mean((p * t).sum(axis=0)[ok] / den[ok]))


def _val_record(model, sections, plan, batch_size, device, step) -> dict[str, Any]:
    res = _evaluate(model, sections, plan, which="val", batch_size=batch_size, device=device)
    if not res:
        return {}
    pred = np.concatenate([m["genes"][idx] for _, idx, m in res])
    true = np.concatenate([sec.targets[idx] for sec, idx, _ in res])
    rec = {"step": step, "val_loss": float(np.mean((pred - true) ** 2)), "val_pearson": mean_pearson(pred, true)}
    if model.has_tumour:
        prob = np.concatenate([m["tumour"][idx] for _, idx, m in res])
        lab = np.concatenate([sec.tumour[idx] for sec, idx, _ in res])
        ok = ~np.isnan(lab)
        if ok.any() and len(np.unique(lab[ok])) == 2:
            from sklearn.metrics import roc_auc_score

            rec["val_tumour_auroc"] = float(roc_auc_score(lab[ok], prob[ok]))
    rec["val_units"] = int(len(true))
    return rec


def _fingerprint(settings: dict[str, Any], model, sections: list[Section]) -> dict[str, Any]:
    h = hashlib.blake2b(digest_size=16)
    for sec in sections:
        for a in (sec.image, sec.rows, sec.cols, sec.units, sec.targets, sec.tumour, sec.train_units, sec.val_units):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.reshape(-1).view(np.uint8))
    fp = {k: v for k, v in settings.items() if k not in ("steps", "val_every", "ckpt_every", "progress", "device")}
    if settings.get("lr_schedule") == "cosine":  # the schedule is shaped by the step count: a resume keeps it
        fp["steps"] = settings["steps"]
    fp["architecture"] = model.config
    fp["data"] = h.hexdigest()
    return json.loads(json.dumps(fp, default=str))


def _save_ckpt(folder: Path, model, state: dict[str, Any], fingerprint: dict[str, Any]) -> Path:
    import torch

    from st2he.models._expression import save_expression_model
    from st2he.models._training import MANIFEST_NAME, STATE_NAME, _file_hash, _write_folder_atomically

    def write(tmp: Path) -> None:
        save_expression_model(model, tmp)
        torch.save(state, tmp / STATE_NAME)
        files = {
            f.name: {"size": f.stat().st_size, "blake2b": _file_hash(f)} for f in sorted(tmp.iterdir()) if f.is_file()
        }
        manifest = {"step": int(state["step"]), "fingerprint": fingerprint, "files": files}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest))

    return _write_folder_atomically(folder, write)


def _open_ckpt(resume, output_dir: Path | None):
    """``(folder, state, weights)`` of the checkpoint to resume from (checked against its manifest), or None."""
    import warnings

    from st2he.models._io import safe_torch_load
    from st2he.models._training import MANIFEST_NAME, STATE_NAME, _checkpoints, _file_hash

    if resume in (None, False):
        return None

    def read(folder: Path):
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        for name, want in manifest["files"].items():
            f = folder / name
            if not f.is_file() or f.stat().st_size != want["size"] or _file_hash(f) != want["blake2b"]:
                msg = f"{name} is missing, truncated or corrupt"
                raise ValueError(msg)
        state = safe_torch_load(folder / STATE_NAME, what="a training state")
        return folder, manifest, state

    if resume in (True, "latest"):
        if output_dir is None:
            msg = "resume='latest' needs output_dir."
            raise ValueError(msg)
        found = _checkpoints(output_dir)
        if not found:
            msg = f"No checkpoint to resume from in {output_dir} (folders checkpoint-<step>)."
            raise FileNotFoundError(msg)
        for _, folder in reversed(found):
            try:
                return read(folder)
            except (OSError, ValueError, KeyError) as err:
                warnings.warn(f"Skipping the damaged checkpoint {folder}: {err}.", UserWarning, stacklevel=3)
        msg = f"Every checkpoint in {output_dir} is damaged; start a new run (overwrite=True)."
        raise ValueError(msg)
    folder = Path(resume)
    if not (folder / STATE_NAME).is_file():
        msg = f"{folder} is not a training checkpoint (no {STATE_NAME} in it)."
        raise FileNotFoundError(msg)
    try:
        return read(folder)
    except (OSError, ValueError, KeyError) as err:
        msg = f"The checkpoint {folder} is damaged: {err}. Resume from another one, or resume='latest'."
        raise ValueError(msg) from err


def train_expression(
    sdatas,
    *,
    image_key: str = "he_image",
    table_key: str = "table",
    genes: Sequence[str] | None = None,
    n_genes: int = 50,
    tumour_key: str | None = None,
    tumour_values: Sequence | None = None,
    model: Any = "small",
    encoder: Any = None,
    um_per_px: float = 1.0,
    chip_um: float = 256.0,
    loss: str = "mse",
    pooling: str = "log",
    steps: int = 2000,
    batch_size: int = 8,
    lr: float = 1e-3,
    lr_schedule: str = "constant",
    weight_decay: float = 1e-4,
    val_fraction: float = 0.2,
    val_every: int = 200,
    ckpt_every: int = 500,
    seed: int = 0,
    device: str | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | bool | None = False,
    overwrite: bool = False,
    progress: bool = True,
    coordinate_system: str = COORDINATE_SYSTEM,
):
    """Train an expression model on paired H&E and spatial transcriptomics (HiST's task).

    Parameters
    ----------
    sdatas
        One SpatialData object or a list (sections), each with an H&E ``image_key`` and a table of counts
        ``table_key`` that annotates the units (cells, spots, bins: any shapes; read with
        :func:`st2he._units.table_keys`).
    genes, n_genes
        The genes to predict; default the top ``n_genes`` highly variable genes (scanpy, ``flavor="seurat"``, on log1p
        counts per 10k of all sections' units). Targets are log1p counts per 10k (totals over every gene of the table).
    tumour_key, tumour_values
        A column of the table's ``obs`` with tumour labels (boolean / 0-1, or any values with ``tumour_values`` naming
        those that mean tumour); the tumour head trains (BCE) on the units it labels. ``None``: no tumour head.
    model
        ``"tiny"`` / ``"small"`` (a new model with that ResNet encoder), or an :class:`~st2he.models.ExpressionModel`
        (trained further; its genes are used).
    encoder
        Another encoder for a new model: ``{"timm": name, "weights": local_file}`` (see
        :func:`st2he.models.build_expression_model`); overrides the size given by ``model``.
    um_per_px
        µm per pixel the H&E is read at (a new model's; a given model keeps its own).
    chip_um
        Side of the square training chips in µm (the model's context; rounded to its downsampling).
    loss
        ``"mse"`` on log1p CP10k (HiST), or ``"poisson"`` / ``"nb"`` (negative binomial with a learned dispersion per
        gene) on the counts, with the prediction read as the log1p CP10k rate (for sparse bins).
    pooling
        How a unit's prediction is pooled from the model's pixels in the loss (and the validation): ``"log"`` (default,
        as the shipped model was trained), the mean of the pixels' log1p CP10k; ``"counts"``, ``log1p`` of the
        tissue-weighted mean of their counts per 10k, as :func:`predict_expression` pools with ``pooling="counts"``;
        ``"auto"``: ``"counts"`` for the sections whose units have a median area of at least 1000 µm² (spots), else
        ``"log"``.
    steps, batch_size, lr, weight_decay
        AdamW optimisation: steps of ``batch_size`` chips.
    lr_schedule
        ``"constant"`` (default, as the shipped model was trained) or ``"cosine"``: the learning rate decays from
        ``lr`` to 5 % of it at ``steps`` (so ``steps`` shapes the schedule; a resumed run keeps its ``steps``).
    val_fraction
        Validation: with several sections, that fraction of the sections (at least one, never all) is held out whole;
        with one, the right-most band of that fraction of its width (training chips stay left of it; units crossing
        the cut belong to neither side). ``0``: no validation. Never the same pixels on both sides.
    val_every, ckpt_every
        Validation (loss, mean per-gene Pearson, tumour AUROC) and checkpoints every so many steps.
    seed
        Seed of the initial weights, the validation split and every random draw (chips, flips).
    device
        ``None`` / ``"auto"``: CUDA when available (mixed precision), else CPU.
    output_dir
        Checkpoints (``checkpoint-<step>``, written atomically with a fingerprint of the run) and the finished model
        (``model/``, :func:`st2he.models.save_expression_model`). A new run refuses a folder holding another unless
        ``overwrite=True``.
    resume
        ``"latest"`` / ``True`` or a checkpoint folder: continue an interrupted run (same data and settings, a larger
        ``steps`` allowed); the result equals an uninterrupted run.
    progress
        Show a progress bar.
    coordinate_system
        The coordinate system the H&E and the units are placed in.

    Notes
    -----
    Each section's H&E is read once, at ``um_per_px``, over the part its units cover, and held in memory as uint8
    (3 bytes per pixel: a 1 cm² section at 1 µm per pixel is 300 MB); chips are cut from it.

    Returns
    -------
    The trained :class:`~st2he.models.ExpressionModel` (eval mode) with its baselines fitted on the training units
    and ``model.history`` (a :class:`pandas.DataFrame`: training loss per logged step; ``val_loss``, ``val_pearson``,
    ``val_tumour_auroc`` per validation), also in ``model.metadata["training"]``.
    """
    import torch

    from st2he._progress import tqdm
    from st2he.models._expression import (
        ExpressionModel,
        build_expression_model,
        chip_multiple,
        fit_baselines,
        save_expression_model,
        unit_sums,
    )
    from st2he.models._training import (
        FINAL_NAME,
        LR_SCHEDULES,
        _check_fresh_output_dir,
        _remove_leftovers,
        _write_folder_atomically,
        lr_at,
    )

    objs = list(sdatas) if isinstance(sdatas, list | tuple) else [sdatas]
    if not objs:
        msg = "Give at least one SpatialData object to train on."
        raise ValueError(msg)
    if loss not in _LOSSES:
        msg = f"loss must be one of {_LOSSES}, got {loss!r}."
        raise ValueError(msg)
    resolve_pooling(pooling)
    if lr_schedule not in LR_SCHEDULES:
        msg = f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}."
        raise ValueError(msg)
    if not 0 <= float(val_fraction) < 1:
        msg = f"val_fraction must be in [0, 1), got {val_fraction}."
        raise ValueError(msg)
    if steps < 0 or batch_size < 1:
        msg = "steps must be >= 0 and batch_size >= 1."
        raise ValueError(msg)
    output_dir = Path(output_dir) if output_dir is not None else None
    if overwrite and resume not in (None, False):
        msg = "overwrite=True starts a new run; it cannot be combined with resume."
        raise ValueError(msg)
    opened = _open_ckpt(resume, output_dir)
    if opened is None and output_dir is not None:
        _check_fresh_output_dir(output_dir, overwrite=overwrite)
    for sd in objs:  # the cheap checks of every object before any work
        if table_key not in sd.tables:
            msg = (
                f"table_key={table_key!r} is not a table of this SpatialData object (its tables are "
                f"{sorted(sd.tables)}). Training needs a table of counts per unit: aggregate one with "
                "st2he.pp.aggregate_transcripts."
            )
            raise KeyError(msg)
        _image_raster(sd, image_key, coordinate_system)
    tables = [sd.tables[table_key] for sd in objs]

    if isinstance(model, ExpressionModel):
        net = model
        gene_list = net.genes
        select_genes(tables, gene_list, n_genes, name=table_key)
        if tumour_key is not None and not net.has_tumour:
            msg = "The given model has no tumour head; train a new one to learn tumour_key."
            raise ValueError(msg)
    elif isinstance(model, str):
        gene_list = select_genes(tables, genes, n_genes, name=table_key)
        net = build_expression_model(
            gene_list, encoder=encoder if encoder is not None else model, um_per_px=um_per_px,
            tumour=tumour_key is not None, seed=seed,
        )
    else:
        msg = f"model must be 'tiny', 'small' or an ExpressionModel, got {type(model).__name__}."
        raise TypeError(msg)

    from ._generate import resolve_device

    dev = resolve_device(device or "auto")
    mult = chip_multiple(net)
    need_counts = loss != "mse"
    sections = [
        _section(
            sd,
            f"section {i}",
            image_key=image_key,
            table_key=table_key,
            genes=gene_list,
            tumour_key=tumour_key,
            tumour_values=tumour_values,
            um_per_px=net.um_per_px,
            stride=net.stride,
            multiple=mult,
            coordinate_system=coordinate_system,
            need_counts=need_counts,
        )
        for i, sd in enumerate(objs)
    ]
    plan = make_plan(net, chip_um, 0)
    chip = plan.chip
    _split(sections, float(val_fraction), multiple=mult, stride=net.stride, chip=chip, seed=seed)
    px_area = (net.stride * net.um_per_px) ** 2
    for sec in sections:
        n_px = np.bincount(sec.units, minlength=len(sec.targets))
        area = float(np.median(n_px[n_px > 0])) * px_area if (n_px > 0).any() else 0.0
        sec.pool_counts = resolve_pooling(pooling, area) == "counts"
    sampler = _Sampler(sections, chip, net.stride)
    val_plan = make_plan(net, chip_um, None)

    settings = {
        "genes": gene_list, "tumour_key": tumour_key, "tumour_values": list(tumour_values or []), "chip_um": chip_um,
        "loss": loss, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "val_fraction": val_fraction, "seed": seed, "steps": steps, "val_every": val_every, "ckpt_every": ckpt_every,
        "image_key": image_key, "table_key": table_key, "coordinate_system": coordinate_system,
        # only when not the default: checkpoints written before pooling= existed (all "log") still resume
        **({"pooling": pooling} if pooling != "log" else {}),
        **({"lr_schedule": lr_schedule} if lr_schedule != "constant" else {}),
    }
    fingerprint = _fingerprint(settings, net, sections)
    gen = torch.Generator().manual_seed(seed)
    net.to(dev).train()
    log_theta = torch.zeros(len(gene_list), device=dev, requires_grad=True) if loss == "nb" else None
    params = [p for p in net.parameters() if p.requires_grad] + ([log_theta] if log_theta is not None else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    use_amp = dev.type == "cuda"
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if use_amp else None
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)
    step, history = 0, []
    if output_dir is not None and output_dir.is_dir():
        _remove_leftovers(output_dir)
    if opened is not None:
        from safetensors.torch import load_file

        from st2he.models._training import _compare_fingerprints

        folder, manifest, state = opened
        _compare_fingerprints(manifest.get("fingerprint") or {}, fingerprint, folder)
        if steps < int(state["step"]):
            msg = f"steps={steps} is below the step of the checkpoint {folder} ({state['step']}); pass steps >= it."
            raise ValueError(msg)
        tensors = load_file(folder / "model.safetensors")
        net.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
        opt.load_state_dict(state["optimizer"])
        if log_theta is not None and state.get("log_theta") is not None:
            with torch.no_grad():
                log_theta.copy_(state["log_theta"])
        gen.set_state(state["rng"])
        step = int(state["step"])
        history = json.loads(state["history"])
        logger.info("Resuming expression training from %s at step %d.", folder, step)

    def save_state(at: int) -> None:
        state = {
            "step": at,
            "optimizer": opt.state_dict(),
            "rng": gen.get_state(),
            "history": json.dumps(history),
            "log_theta": log_theta.detach().cpu() if log_theta is not None else None,
        }
        _save_ckpt(output_dir / f"checkpoint-{at}", net, state, fingerprint)

    has_val = any(s.val_units.any() for s in sections)
    eval_batch = max(1, batch_size)
    if has_val and step == 0 and val_every > 0:
        history.append(_val_record(net, sections, val_plan, eval_batch, dev, 0))
    bar = tqdm(total=steps, initial=step, desc="train expression", unit="step", disable=not progress)
    running: list = []
    import time

    t0, s0 = time.perf_counter(), step
    try:
        while step < steps:
            x, pixels, local, uniq = sampler.sample(batch_size, gen)
            chips = x.numpy()
            # the sampler numbers the sections it draws from (those with training units), not all sections
            targets, tum, counts, totals = _unit_targets(sampler.sections, uniq, need_counts)
            x = x.to(dev).float().div_(255)
            ctx = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else _null()
            with ctx:
                out = net(x)
            if targets is None:  # no unit wholly inside any chip: nothing to learn from this draw
                step += 1
                bar.update(1)
                continue
            pix = torch.from_numpy(pixels).to(dev)
            loc = torch.from_numpy(local).to(dev)
            n = len(uniq)
            sums, cnt = unit_sums(out["genes"].float(), pix, loc, n)
            pred = sums / cnt[:, None]
            by_counts = np.array([sampler.sections[i].pool_counts for i in uniq[:, 1]], dtype=bool)
            if by_counts.any():
                pred = torch.where(
                    torch.from_numpy(by_counts).to(dev)[:, None],
                    _count_pool(out["genes"].float(), chips, net.stride, pix, loc, n),
                    pred,
                )
            y = torch.from_numpy(targets).to(dev)
            c_t = torch.from_numpy(counts).to(dev) if counts is not None else None
            t_t = torch.from_numpy(totals).to(dev) if totals is not None else None
            loss_g = _gene_loss(loss, pred, y, c_t, t_t, log_theta)
            total = loss_g
            rec = {"loss_genes": loss_g.detach()}
            if net.has_tumour and "tumour" in out:
                lab = torch.from_numpy(tum).to(dev)
                ok = ~torch.isnan(lab)
                if bool(ok.any()):
                    s_t, c_tu = unit_sums(out["tumour"].float(), pix, loc, n)
                    logit = (s_t[:, 0] / c_tu)[ok]
                    loss_t = torch.nn.functional.binary_cross_entropy_with_logits(logit, lab[ok])
                    total = total + loss_t
                    rec["loss_tumour"] = loss_t.detach()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, lr, steps=steps, schedule=lr_schedule)
            opt.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            scaler.step(opt)
            scaler.update()
            step += 1
            rec["loss"] = total.detach()
            running.append(rec)
            bar.update(1)
            if step % 10 == 0 or step == steps:
                agg = {k: float(torch.stack([r[k] for r in running if k in r]).mean()) for k in running[-1]}
                history.append({"step": step, **agg})
                bar.set_postfix({k: f"{v:.4f}" for k, v in agg.items()})
                running = []
            if has_val and val_every > 0 and (step % val_every == 0 or step == steps):
                rec_v = _val_record(net, sections, val_plan, eval_batch, dev, step)
                history.append(rec_v)
                bar.set_postfix({"val_pearson": f"{rec_v.get('val_pearson', float('nan')):.3f}"}, refresh=True)
            if output_dir is not None and ckpt_every > 0 and step % ckpt_every == 0 and step < steps:
                save_state(step)
    finally:
        bar.close()
    trained_steps = step - s0
    seconds_per_step = (time.perf_counter() - t0) / trained_steps if trained_steps else None

    # the baselines, on the training units' embeddings (the fused features pooled over each unit)
    net.eval()
    res = _evaluate(net, sections, val_plan, which="train", batch_size=eval_batch, device=dev, features=True)
    emb = np.concatenate([m["features"][idx] for _, idx, m in res]) if res else np.zeros((0, 1))
    tgt = np.concatenate([sec.targets[idx] for sec, idx, _ in res]) if res else np.zeros((0, len(gene_list)))
    if len(emb) >= 2:
        net.baselines = fit_baselines(emb, tgt, seed=seed)
    else:
        logger.warning("Fewer than 2 training units: the baselines are not fitted.")
    net.history = pd.DataFrame(history)
    net.metadata["training"] = {
        "settings": json.loads(json.dumps(settings, default=str)),
        "steps": step,
        "seconds_per_step": seconds_per_step,
        "device": str(dev),
        "n_train_units": int(sum(s.train_units.sum() for s in sections)),
        "n_val_units": int(sum(s.val_units.sum() for s in sections)),
        "history": history,
    }
    net.metadata["normalisation"] = "log1p_cp10k"
    if output_dir is not None:
        save_state(step)
        _write_folder_atomically(output_dir / FINAL_NAME, lambda tmp: save_expression_model(net, tmp))
    return net


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


# ============================================================================================== prediction


def _resolve_model(model):
    from st2he.models._expression import ExpressionModel, load_expression_model

    if isinstance(model, ExpressionModel):
        return model, None
    if model is None:
        from st2he.models._expression import SHIPPED_EXPRESSION as shipped

        if (shipped / "config.json").is_file():
            return load_expression_model(shipped), str(shipped)
        msg = (
            "Pass model= (an ExpressionModel, or the folder st2he.tl.train_expression / "
            "st2he.models.save_expression_model wrote); st2he ships no expression model in this installation yet."
        )
        raise ValueError(msg)
    if isinstance(model, str | os.PathLike):
        return load_expression_model(model), os.fspath(model)
    msg = f"model must be an ExpressionModel or a path, got {type(model).__name__}."
    raise TypeError(msg)


def _cells_key(sdata) -> str:
    """The shapes of the cells: those a table annotates among cell-like names, else ``cell_boundaries``."""
    from st2he._units import table_keys

    if "cell_boundaries" in sdata.shapes:
        return "cell_boundaries"
    for name, table in sdata.tables.items():
        try:
            regions, _, _ = table_keys(table, name=name)
        except ValueError:
            continue
        for r in regions:
            if r in sdata.shapes and "cell" in r.lower():
                return r
    msg = (
        "units='cells' needs cell shapes: a shapes element named 'cell_boundaries' or one whose name contains 'cell' "
        f"that a table annotates. The shapes are {sorted(sdata.shapes)}; pass units=<shapes key>."
    )
    raise KeyError(msg)


def predict_expression(
    sdata,
    *,
    image_key: str = "he_image",
    model: Any = None,
    method: str = "multiscale",
    units: str = "cells",
    bin_size: float = 8.0,
    spot_diameter: float = 55.0,
    spot_spacing: float = 100.0,
    genes: Sequence[str] | None = None,
    pooling: str = "auto",
    chip_um: float = 512.0,
    margin_um: float | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    image_added: str | None = None,
    key_added: str | None = None,
    shapes_added: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    coordinate_system: str = COORDINATE_SYSTEM,
):
    """Predict gene expression and tumour probability per unit from an H&E image (real or virtual).

    Parameters
    ----------
    sdata
        SpatialData object with an RGB H&E-like image ``image_key`` (any transformation; read through
        :class:`st2he._raster.Raster` at the model's µm per pixel).
    model
        An :class:`~st2he.models.ExpressionModel` or the folder of a saved one.
    method
        ``"multiscale"`` (the model), or a baseline stored with the model, on the same unit embeddings (the fused
        features pooled over each unit): ``"mean"``, ``"knn"``, ``"ridge"`` (HEST's protocol).
    units
        ``"cells"`` (shapes ``cell_boundaries``, or the cell shapes a table annotates), ``"bins"`` (squares of
        ``bin_size`` µm anchored at the origin, ``array_row = floor(y / bin_size)``), ``"spots"`` (disks of
        ``spot_diameter`` on a hexagonal lattice of ``spot_spacing`` anchored at the origin), or the key of any shapes
        element. Bins and spots are laid over the image's tissue and written as a new shapes element
        ``shapes_added`` (default ``f"{key_added}_{units}"``).
    genes
        A subset of the model's genes to write (default all).
    pooling
        How ``method="multiscale"`` pools its dense prediction (log1p CP10k per output pixel) into a unit:
        ``"log"``, the mean of the pixels' log1p CP10k, as the model is trained; ``"counts"``, ``log1p`` of the mean
        of the pixels' counts per 10k, each pixel weighted by its tissue fraction: the composition of the molecules a
        unit holds, the right mean for units of several cells, where a mean of logs under-weights the cells that
        express a gene; ``"auto"`` (default): ``"counts"`` for units of median area at least
        1000 µm² (a 55 µm spot: 2376 µm², about ten cells), else ``"log"`` (cells, small bins).
        On st2he's held-out simulated sections ``"counts"`` raises the mean per-gene Pearson of 55 µm spots from
        0.668 to 0.718 and lowers it on cells and 16 µm bins (``docs/models.md``). The baselines pool features, not
        predictions, and ignore it.
    chip_um, margin_um
        Chips of ``chip_um`` µm are read with ``margin_um`` of context on each side (default an eighth of the chip)
        and only their centres kept; the per-unit sums and pixel counts are accumulated across chips, so a unit
        crossing chips is pooled exactly. Peak memory depends on the chip and ``batch_size``, not the slide.
    batch_size
        Chips per model call (default 4 on a GPU, 1 on the CPU).
    device
        ``None`` / ``"auto"``: CUDA when available (mixed precision), else CPU.
    image_added
        Also store a lazy multi-channel image of the predicted genes (``method="multiscale"``; one channel per gene,
        ``c`` coordinates = genes, output pixels of ``model.stride * model.um_per_px`` µm placed in µm), computed
        block by block from the H&E whenever it is read.
    key_added
        Name of the table (default ``f"{image_key}_expression"``).
    shapes_added
        Name of the new shapes element of bins or spots (default ``f"{key_added}_{units}"``).
    overwrite
        Replace existing elements of these names (never the image or the shapes read).
    progress
        Show a progress bar.
    coordinate_system
        The coordinate system the image and the units are placed in.

    Returns
    -------
    The new table: predicted log1p CP10k in ``X`` (dense float32, genes in ``var_names``), ``obs``:
    ``tumour_probability`` (NaN without a tumour head), ``tissue_fraction``, ``in_tissue`` (``>= 0.5``), ``n_pixels``
    (the output pixels pooled; 0 for a unit off the image, whose values are NaN), ``array_row`` / ``array_col`` for
    bins and spots; ``obsm["spatial"]`` the units' centroids in µm; ``uns["st2he"]`` the parameters.
    """
    import anndata
    import torch
    from spatialdata.models import TableModel

    from st2he._elements import check_key_free, write_elements
    from st2he._progress import tqdm
    from st2he.models._expression import METHODS, predict_baseline
    from st2he.tl._generate import resolve_device

    if method not in METHODS:
        msg = f"method must be one of {METHODS}, got {method!r}."
        raise ValueError(msg)
    resolve_pooling(pooling)
    if image_added and method != "multiscale":
        msg = "image_added= draws the model's dense prediction; use it with method='multiscale'."
        raise ValueError(msg)
    key_added = key_added or f"{image_key}_expression"
    raster = _image_raster(sdata, image_key, coordinate_system)
    # names first: nothing is computed for a call that could not store its result
    gridded = units in ("spots", "bins")
    if gridded:
        shapes_added = shapes_added or f"{key_added}_{units}"
    written = {key_added} | ({shapes_added} if gridded else set()) | ({image_added} if image_added else set())
    check_key_free(sdata, key_added, overwrite=overwrite, kind="tables", inputs={image_key}, replaced=written)
    if gridded:
        check_key_free(
            sdata, shapes_added, overwrite=overwrite, parameter="shapes_added", kind="shapes", inputs={image_key},
            replaced=written,
        )
    if image_added:
        check_key_free(
            sdata, image_added, overwrite=overwrite, parameter="image_added", kind="images", inputs={image_key},
            replaced=written,
        )
    if units not in _UNITS and units not in sdata.shapes:
        msg = (
            f"units={units!r} is neither 'cells', 'spots', 'bins' nor a shapes element of this SpatialData object "
            f"(its shapes are {sorted(sdata.shapes)})."
        )
        raise KeyError(msg)
    net, source = _resolve_model(model)
    if method != "multiscale" and method not in net.baselines:
        predict_baseline(net.baselines, method, np.zeros((0, 1)))  # raises, naming the fitted ones
    gene_list = net.genes if genes is None else [str(g) for g in genes]
    missing = [g for g in gene_list if g not in net.genes]
    if missing:
        msg = f"{len(missing)} genes are not predicted by the model: {missing[:10]}; it predicts {net.genes[:10]} ..."
        raise KeyError(msg)
    gene_idx = [net.genes.index(g) for g in gene_list]

    if units == "cells":
        unit_set = shapes_units(sdata, _cells_key(sdata), coordinate_system=coordinate_system)
    elif gridded:
        unit_set = lattice_units(
            raster, units, bin_size=bin_size, spot_diameter=spot_diameter, spot_spacing=spot_spacing, key=shapes_added
        )
    else:
        unit_set = shapes_units(sdata, units, coordinate_system=coordinate_system)
    if unit_set.key in written and not gridded:
        msg = f"units={unit_set.key!r} is an element this call would replace; pick another key_added / image_added."
        raise ValueError(msg)

    dev = resolve_device(device or "auto")
    was_training = net.training
    net.eval().to(dev)
    plan = make_plan(net, chip_um, margin_um)
    if batch_size is None:
        batch_size = 4 if dev.type == "cuda" else 1
    area = _intersect(raster.bounds, unit_set.bounds)
    if area[2] <= area[0] or area[3] <= area[1]:
        msg = (
            f"The units ({unit_set.key!r}, {tuple(round(v, 1) for v in unit_set.bounds)} µm) do not overlap image "
            f"{image_key!r} ({tuple(round(v, 1) for v in raster.bounds)} µm) in {coordinate_system!r}."
        )
        raise ValueError(msg)
    region = snapped_grid(area, net.um_per_px, plan.core)
    cores = plan.cores(region)
    import shapely

    tree = shapely.STRtree(unit_set.geoms)
    lonely = lonely_units(unit_set, plan.stride * plan.um_per_px)

    def pairs_for(og: Grid):
        # units near this core (their boxes reach it); a unit holding no pixel centre is claimed by the core that
        # holds its centroid
        near = tree.query(shapely.box(*og.bounds))
        return unit_pairs(unit_set, og, subset=np.sort(near), lonely=lonely)

    if method == "multiscale":
        pooling = resolve_pooling(pooling, float(np.median(shapely.area(unit_set.geoms))) if len(unit_set) else 0.0)
    else:
        pooling = "log"  # the baselines pool features
    acc = UnitAccumulator(
        len(unit_set), len(net.genes), features=int(net.config["features"]) if method != "multiscale" else 0,
        tumour=net.has_tumour, pooling=pooling,
    )
    try:
        with tqdm(total=len(cores), desc="predict expression", unit="chip", disable=not progress) as bar:
            run_chips(
                net, plan, cores, raster_reader(raster), pairs_for, acc, batch_size=batch_size, device=dev, bar=bar
            )
    finally:
        net.train(was_training)
    res = acc.means()
    n_px = res["counts"]
    if not (n_px > 0).any():
        msg = f"No unit of {unit_set.key!r} covers an output pixel of image {image_key!r}."
        raise ValueError(msg)
    if method == "multiscale":
        X = res["genes"][:, gene_idx]
    else:
        X = np.full((len(unit_set), len(gene_idx)), np.nan, np.float64)
        ok = n_px > 0
        X[ok] = predict_baseline(net.baselines, method, res["features"][ok])[:, gene_idx]
    tumour = (
        1.0 / (1.0 + np.exp(-res["tumour"])) if net.has_tumour else np.full(len(unit_set), np.nan)
    )
    tissue = np.where(n_px > 0, res["tissue"], 0.0)
    ids = [str(i) for i in unit_set.ids]
    obs = pd.DataFrame(
        {
            "instance_id": ids if gridded else list(unit_set.ids),
            "region": pd.Categorical([unit_set.key] * len(ids)),
            "tumour_probability": tumour.astype(np.float64),
            "tissue_fraction": tissue.astype(np.float64),
            "in_tissue": tissue >= 0.5,
            "n_pixels": n_px.astype(np.int64),
        },
        index=pd.Index(ids),
    )
    if gridded:
        obs["array_row"] = unit_set.array_rows.astype(np.int64)
        obs["array_col"] = unit_set.array_cols.astype(np.int64)
    params = {
        "method": method,
        "model": source or str(net.metadata.get("checkpoint") or "in memory"),
        "genes": gene_list,
        "um_per_px": net.um_per_px,
        "output_um_per_px": net.stride * net.um_per_px,
        "image_key": image_key,
        "units": units,
        "units_key": unit_set.key,
        "chip_um": plan.chip * net.um_per_px,
        "margin_um": plan.margin * net.um_per_px,
        "normalisation": "log1p_cp10k",
        "pooling": pooling if method == "multiscale" else "features (mean over the unit's pixels)",
        "coordinate_system": coordinate_system,
    }
    if gridded:
        params.update(bin_size=bin_size) if units == "bins" else params.update(
            spot_diameter=spot_diameter, spot_spacing=spot_spacing
        )
    adata = anndata.AnnData(
        X.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(gene_list)),
        obsm={"spatial": unit_set.centroids.astype(np.float64)},
    )
    adata.uns["st2he"] = json.loads(json.dumps(params, default=str))
    table = TableModel.parse(adata, region=unit_set.key, region_key="region", instance_key="instance_id")
    elements = {key_added: table}
    element_params = {key_added: params}
    if gridded:
        from spatialdata.transformations import Identity, set_transformation

        shapes = unit_set.shapes
        set_transformation(shapes, {coordinate_system: Identity()}, set_all=True)
        elements[shapes_added] = shapes
        element_params[shapes_added] = {**params, "what": f"{units} laid over the tissue of {image_key!r}"}
    if image_added:
        elements[image_added] = gene_image(net, raster, plan, gene_idx, gene_list, dev, coordinate_system)
        element_params[image_added] = {**params, "what": "predicted log1p CP10k per gene, one channel per gene"}
    inputs = {image_key, unit_set.key} - set(elements)
    stored = write_elements(sdata, elements, overwrite=overwrite, inputs=inputs, params=element_params)
    return stored[key_added]


def gene_image(net, raster, plan: ChipPlan, gene_idx, gene_list, device, coordinate_system: str):
    """A lazy ``(genes, y, x)`` image of the dense prediction over the image's footprint, one chip core per block."""
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Affine

    region = snapped_grid(raster.bounds, net.um_per_px, plan.core)
    s = plan.stride * plan.um_per_px
    out_core = plan.core // plan.stride
    H, W = region.height // plan.stride, region.width // plan.stride
    rows = tuple([out_core] * (H // out_core))
    cols = tuple([out_core] * (W // out_core))
    block = _GeneBlock(net, raster, plan, list(gene_idx), region, device)
    data = da.map_blocks(
        block, chunks=((len(gene_idx),), rows, cols), dtype=np.float32, meta=np.empty((0, 0, 0), np.float32)
    )
    affine = Affine(
        np.array([[s, 0, region.x0], [0, s, region.y0], [0, 0, 1]], dtype=np.float64),
        input_axes=("x", "y"),
        output_axes=("x", "y"),
    )
    return Image2DModel.parse(
        data, dims=("c", "y", "x"), c_coords=list(gene_list), transformations={coordinate_system: affine},
        chunks=(len(gene_idx), out_core, out_core),
    )


class _GeneBlock:
    """One block of the lazy gene image: the chip around one core, run through the model."""

    def __init__(self, net, raster, plan, gene_idx, region, device) -> None:
        self.net, self.raster, self.plan = net, raster, plan
        self.gene_idx, self.region, self.device = gene_idx, region, device

    def __call__(self, block_id=None):
        import torch

        _, i, j = block_id
        p = self.plan
        x0 = self.region.x0 + j * p.core * p.um_per_px
        y0 = self.region.y0 + i * p.core * p.um_per_px
        core = Grid(x0, y0, p.um_per_px, p.core, p.core)
        chip = raster_reader(self.raster)(p.chip_grid(core))
        x = torch.from_numpy(chip[None]).to(self.device).float().div_(255)
        with torch.inference_mode(), _amp(self.device):
            genes = self.net(x)["genes"][0].float().cpu().numpy()
        lo, n = p.margin // p.stride, p.core // p.stride
        return np.ascontiguousarray(genes[self.gene_idx, lo : lo + n, lo : lo + n], dtype=np.float32)
