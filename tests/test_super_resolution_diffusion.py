"""super_resolve(method="diffusion") and the SuperResolutionModel: round trips, exact conservation, uncertainty, seeds,
switches, a tiny model trained briefly that beats bicubic on a held-out section, training resume, bad input."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import st2he
from st2he._units import lognormalise
from st2he.models import build_super_resolution_model, load_super_resolution_model, save_super_resolution_model

B = 8.0


def _sample(seed: int, size_um: float = 384.0):
    sdata = st2he.datasets.synthetic_tissue(seed, size_um=size_um)
    st2he.pp.aggregate_transcripts(sdata, by="spots", key_added="spots")
    st2he.pp.aggregate_transcripts(sdata, by="bins", bin_size=B, key_added="truth")
    return sdata


@pytest.fixture(scope="module")
def trained():
    """A tiny model (no expression model: fast) trained briefly (300 steps of 4 crops of 16 bins: ~40 s on one CPU
    thread) on two simulated sections (seeds 0, 1)."""
    sections = [st2he.datasets.synthetic_tissue(s, size_um=384.0) for s in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than 2 on a shared machine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = st2he.tl.train_super_resolution(
                sections, size="tiny", n_genes=24, steps=300, batch_size=4, window=16, seed=0, progress=False
            )
    finally:
        torch.set_num_threads(threads)
    return model


@pytest.fixture(scope="module")
def heldout():
    return _sample(101)


def _pearson_vs_truth(sdata, key: str, truth: str = "truth") -> float:
    """Mean per-gene Pearson (evaluate_expression) of a super-resolved table, log-normalised, against the true bins."""
    from spatialdata.models import TableModel

    t = sdata.tables[key]
    region = sdata.tables[truth].uns["spatialdata_attrs"]["region"]
    tab = ad.AnnData(
        X=lognormalise(np.asarray(t.X, dtype=np.float64)), obs=t.obs[["instance_id", "array_row", "array_col"]].copy(),
        var=t.var.copy(),
    )
    tab.obs["region"] = pd.Categorical([region] * tab.n_obs)
    sdata.tables["_scored"] = TableModel.parse(tab, region=region, region_key="region", instance_key="instance_id")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            df = st2he.tl.evaluate_expression(sdata, pred_key="_scored", true_key=truth, overwrite=True)
    finally:
        del sdata.tables["_scored"]
        if "_scored_metrics" in sdata.tables:
            del sdata.tables["_scored_metrics"]
    return float(df.attrs["summary"]["pearson_mean"])


def _spot_sums(table, counts_table):
    X = pd.DataFrame(np.asarray(table.X, dtype=np.float64), columns=list(table.var_names))
    sums = X.groupby(table.obs["source_unit"].astype(str).to_numpy()).sum()
    want = pd.DataFrame(
        counts_table[:, list(table.var_names)].X.toarray(), index=counts_table.obs_names.astype(str),
        columns=list(table.var_names),
    )
    return sums, want.loc[sums.index]


# ------------------------------------------------------------------------------------------ the model


def test_save_load_round_trip(tmp_path):
    model = build_super_resolution_model("tiny", genes=["A", "B", "C"], scales=[0.5, 1.0, 2.0], seed=3)
    with torch.no_grad():  # the denoiser's last layer starts at zero: give it values so the round trip means something
        model.unet.conv_out.weight.normal_()
    model.metadata = {"note": "x"}
    folder = save_super_resolution_model(model, tmp_path / "m")
    loaded = load_super_resolution_model(folder)
    assert loaded.config == model.config
    assert loaded.metadata["note"] == "x"
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((folder / "config.json").read_text())["genes"] == ["A", "B", "C"]
    # float16 halves the file and loads back as float32 within float16 rounding
    half = save_super_resolution_model(model, tmp_path / "h", dtype=torch.float16)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (folder / "model.safetensors").stat().st_size
    h = load_super_resolution_model(half).state_dict()
    for k in a:
        if a[k].is_floating_point():
            assert h[k].dtype == torch.float32
            torch.testing.assert_close(h[k], a[k], rtol=1e-3, atol=1e-3)
    # a missing file fails at once, naming it
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_super_resolution_model(folder)
    (half / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_super_resolution_model(half)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_super_resolution_model(tmp_path / "nothing")


def test_untrained_model_returns_its_base():
    """The denoiser's last layer starts at zero: an untrained model returns the base (the low map here) exactly."""
    model = build_super_resolution_model("tiny", genes=["A", "B"], features=False, adversarial=False)
    low = torch.rand(1, 2, 32, 32)
    out = model.sample(low, torch.ones(1, 1, 32, 32), steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, low)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        model.sample(low, torch.ones(1, 1, 32, 32), steps=0)


@pytest.mark.parametrize(
    "switches",
    [
        {"features": False},
        {"alignment": False},
        {"adversarial": False},
        {"features": False, "alignment": False, "adversarial": False},
    ],
)
def test_each_switch_off_builds_trains_and_runs(switches, heldout):
    section = st2he.datasets.synthetic_tissue(0, size_um=256.0)
    model = st2he.tl.train_super_resolution(
        section, size="tiny", n_genes=8, steps=3, batch_size=2, seed=0, progress=False, **switches
    )
    assert (model.encoder is None) == (not switches.get("features", True))
    assert (model.alignment is None) == (
        not switches.get("alignment", True) or not switches.get("features", True)
    )
    assert (model.discriminator is None) == (not switches.get("adversarial", True))
    assert model.metadata["training"]["steps_done"] == 3
    out = st2he.tl.super_resolve(
        heldout, table_key="spots", method="diffusion", model=model, steps=2, key_added="sw", overwrite=True,
        progress=False,
    )
    sums, want = _spot_sums(out, heldout.tables["spots"])
    assert np.abs(sums.to_numpy() - want.to_numpy()).max() < 1e-3
    assert list(out.var_names) == model.genes


def test_expression_channels_start_at_the_regression_answer(heldout):
    """With the expression model's channels, an untrained model gives exactly method='regression'."""
    genes = list(heldout.tables["spots"].var_names[:6])
    model = build_super_resolution_model("tiny", genes=genes, expression=True, expression_model="shipped")
    expr = st2he.models.load_expression_model(st2he.models._expression.SHIPPED_EXPRESSION)
    model.set_expression_model(expr)
    d = st2he.tl.super_resolve(
        heldout, table_key="spots", method="diffusion", model=model, steps=1, key_added="ex_d", progress=False
    )
    r = st2he.tl.super_resolve(
        heldout, table_key="spots", method="regression", model=expr, genes=genes, key_added="ex_r", progress=False
    )
    np.testing.assert_allclose(np.asarray(d.X), np.asarray(r.X), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ super_resolve


def test_counts_conserved_exactly_and_bins_as_the_other_methods(trained, heldout):
    out = st2he.tl.super_resolve(
        heldout, table_key="spots", method="diffusion", model=trained, key_added="dif", image_added="dif_image",
        progress=False,
    )
    sums, want = _spot_sums(out, heldout.tables["spots"])
    assert set(sums.index) == set(heldout.tables["spots"].obs_names.astype(str))
    assert np.abs(sums.to_numpy() - want.to_numpy()).max() < 1e-3
    assert (np.rint(sums.to_numpy()) == want.to_numpy()).all()
    bic = st2he.tl.super_resolve(
        heldout, table_key="spots", method="bicubic", genes=trained.genes, key_added="dif_bic", progress=False
    )
    assert list(out.obs_names) == list(bic.obs_names)
    np.testing.assert_array_equal(out.obsm["spatial"], bic.obsm["spatial"])
    assert out.uns["st2he"]["method"] == "diffusion"
    assert out.uns["st2he"]["steps"] == 1  # the one-step mode by default
    # not flat: the bins of a spot differ
    X = pd.DataFrame(np.asarray(out.X)).groupby(out.obs["source_unit"].astype(str).to_numpy()).std()
    assert np.nanmax(X.to_numpy()) > 0.05


def test_trained_tiny_model_beats_bicubic_on_held_out_section(trained, heldout):
    st2he.tl.super_resolve(
        heldout, table_key="spots", method="diffusion", model=trained, key_added="win_d", progress=False
    )
    st2he.tl.super_resolve(
        heldout, table_key="spots", method="bicubic", genes=trained.genes, key_added="win_b", progress=False
    )
    p_d, p_b = _pearson_vs_truth(heldout, "win_d"), _pearson_vs_truth(heldout, "win_b")
    # measured 0.586 vs 0.498 (one step, composition loss; 0.548 with 10 steps and no composition loss)
    assert p_d > p_b + 0.02, (p_d, p_b)


def test_samples_uncertainty_and_seeds(trained, heldout):
    kw = dict(table_key="spots", method="diffusion", model=trained, steps=3, progress=False)
    out = st2he.tl.super_resolve(heldout, key_added="unc", n_samples=3, image_added="unc_image", seed=7, **kw)
    assert "unc_uncertainty" in heldout.images
    unc = heldout.images["unc_uncertainty"]
    assert list(unc.coords["c"].values) == trained.genes
    from spatialdata.transformations import get_transformation

    A = get_transformation(unc, "global").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    A_img = get_transformation(heldout.images["unc_image"], "global").to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    np.testing.assert_array_equal(A, A_img)
    rows, cols = out.obs["array_row"].to_numpy(), out.obs["array_col"].to_numpy()
    std = np.asarray(unc.data)[:, rows - rows.min(), cols - cols.min()].T
    assert std.max() > 0.01
    # a gene a spot did not catch is 0 in every sample: no spread there
    counts = heldout.tables["spots"][:, trained.genes].X.toarray()
    unit_index = pd.Index(heldout.tables["spots"].obs_names.astype(str)).get_indexer(
        out.obs["source_unit"].astype(str)
    )
    zero = counts[unit_index] == 0
    assert zero.any()
    assert np.abs(std[zero]).max() == 0
    # the mean still conserves each spot's counts
    sums, want = _spot_sums(out, heldout.tables["spots"])
    assert np.abs(sums.to_numpy() - want.to_numpy()).max() < 1e-3
    assert out.uns["st2he"]["n_samples"] == 3
    # seeds: the same seed gives the same samples, another seed others
    again = st2he.tl.super_resolve(heldout, key_added="unc2", n_samples=3, seed=7, **kw)
    np.testing.assert_array_equal(np.asarray(again.X), np.asarray(out.X))
    np.testing.assert_array_equal(np.asarray(heldout.images["unc2_uncertainty"].data), np.asarray(unc.data))
    other = st2he.tl.super_resolve(heldout, key_added="unc3", n_samples=3, seed=8, **kw)
    assert np.abs(np.asarray(other.X) - np.asarray(out.X)).max() > 1e-3


def test_windows_blend_on_a_grid_larger_than_a_window(trained):
    """A section wider than several windows: every bin gets a value, spots conserve, and the result does not depend
    on where the windows fall (a crop of the section gives the same bins away from its edges, within tolerance)."""
    sdata = _sample(102, size_um=640.0)
    out = st2he.tl.super_resolve(
        sdata, table_key="spots", method="diffusion", model=trained, steps=1, key_added="big", progress=False
    )
    assert out.obs["array_col"].max() - out.obs["array_col"].min() + 1 > 2 * trained.config["window"]
    sums, want = _spot_sums(out, sdata.tables["spots"])
    assert np.abs(sums.to_numpy() - want.to_numpy()).max() < 1e-3
    assert np.isfinite(np.asarray(out.X)).all()


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input(trained, heldout):
    kw = dict(table_key="spots", method="diffusion", model=trained, progress=False)
    heldout.tables["taken"] = heldout.tables["spots"].copy()
    with pytest.raises(KeyError, match="taken"):
        st2he.tl.super_resolve(heldout, key_added="taken", **kw)
    # the uncertainty image's name is checked before any work, and nothing is written
    from spatialdata.models import Image2DModel

    heldout.images["bad_uncertainty"] = Image2DModel.parse(np.zeros((1, 4, 4), np.float32), dims=("c", "y", "x"))
    with pytest.raises(KeyError, match="bad_uncertainty"):
        st2he.tl.super_resolve(heldout, key_added="bad", n_samples=2, **kw)
    assert "bad" not in heldout.tables and "bad_bins" not in heldout.shapes
    for steps in (0, -1, 1.5):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            st2he.tl.super_resolve(heldout, key_added="s0", steps=steps, **kw)
    with pytest.raises(ValueError, match="n_samples"):
        st2he.tl.super_resolve(heldout, key_added="s0", n_samples=0, **kw)
    foreign = build_super_resolution_model("tiny", genes=["NOT_A_GENE", trained.genes[0]])
    with pytest.raises(ValueError, match="NOT_A_GENE"):
        st2he.tl.super_resolve(heldout, table_key="spots", method="diffusion", model=foreign, key_added="s0")
    with pytest.raises(ValueError, match="not generated"):
        st2he.tl.super_resolve(heldout, key_added="s0", genes=["NOT_A_GENE"], **kw)
    with pytest.raises(ValueError, match="bin_size"):
        st2he.tl.super_resolve(heldout, key_added="s0", bin_size=4.0, **kw)
    with pytest.raises(FileNotFoundError, match="not found"):
        st2he.tl.super_resolve(heldout, table_key="spots", method="diffusion", model="/no/such/model", key_added="s0")
    assert "s0" not in heldout.tables


# ------------------------------------------------------------------------------------------ training


def test_training_resumes_where_it_stopped(tmp_path):
    section = st2he.datasets.synthetic_tissue(1, size_um=256.0)
    kw = dict(size="tiny", n_genes=6, batch_size=2, seed=1, progress=False)
    whole = st2he.tl.train_super_resolution(section, steps=4, **kw)
    st2he.tl.train_super_resolution(section, steps=2, out=tmp_path / "a", **kw)
    assert (tmp_path / "a" / "model.safetensors").is_file()
    assert (tmp_path / "a" / "last" / "training_state.pt").is_file()
    resumed = st2he.tl.train_super_resolution(section, steps=4, resume=tmp_path / "a" / "last", **kw)
    a, b = whole.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # the same seed gives the same model
    again = st2he.tl.train_super_resolution(section, steps=4, **kw)
    for k, v in again.state_dict().items():
        assert torch.equal(v, a[k]), k
    with pytest.raises(FileNotFoundError, match="training_state.pt"):
        st2he.tl.train_super_resolution(section, steps=4, resume=tmp_path, **kw)
    # a checkpoint is resumed only with the loss it was trained with; one written before the composition loss
    # existed (no composition_weight in its settings) trained without it
    with pytest.raises(ValueError, match="composition_weight=0.3 to resume"):
        st2he.tl.train_super_resolution(section, steps=4, resume=tmp_path / "a" / "last", composition_weight=0.1, **kw)
    config = json.loads((tmp_path / "a" / "last" / "config.json").read_text())
    del config["metadata"]["settings"]["composition_weight"]
    (tmp_path / "a" / "last" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="composition_weight=0 to resume"):
        st2he.tl.train_super_resolution(section, steps=4, resume=tmp_path / "a" / "last", **kw)
    old = st2he.tl.train_super_resolution(section, steps=3, resume=tmp_path / "a" / "last", composition_weight=0, **kw)
    assert old.metadata["training"]["steps_done"] == 3


def test_composition_loss_against_numpy_and_recorded():
    from st2he.tl._train_super_resolution import _composition_loss, _composition_scales

    rng = np.random.default_rng(3)
    G, H, W = 5, 4, 6
    scales = rng.uniform(0.3, 1.2, G)
    counts = rng.poisson(rng.uniform(0, 3, (1, G, H, W))).astype(np.float64)
    counts[0, :, 0, 0] = 0  # a bin without molecules: left out of the loss
    pred_counts = rng.uniform(0, 4, (1, G, H, W))
    weight = (rng.random((1, 1, H, W)) > 0.3).astype(np.float64)
    comp_scales = rng.uniform(0.5, 2.0, G)

    def comp(c):
        total = c.sum(axis=1, keepdims=True)
        return np.log1p(np.divide(c, total, out=np.zeros_like(c), where=total > 0) * 1e4), total

    pc, _ = comp(pred_counts)
    tc, total = comp(counts)
    w = weight * (total > 0)
    want = ((((pc - tc) / comp_scales[None, :, None, None]) ** 2) * w).sum() / (w.sum() * G)

    def t(a):
        return torch.tensor(a, dtype=torch.float64)

    got = _composition_loss(
        t(np.log1p(pred_counts) / scales[None, :, None, None]), t(np.log1p(counts) / scales[None, :, None, None]),
        t(weight), t(scales).view(1, -1, 1, 1), t(comp_scales).view(1, -1, 1, 1),
    )
    assert float(got) == pytest.approx(want, rel=1e-5)
    # per-gene spread over the bins holding molecules, floored
    flat = counts[0].reshape(G, -1).T
    held = flat.sum(axis=1) > 0
    spread = np.log1p(flat[held] / flat[held].sum(axis=1, keepdims=True) * 1e4).std(axis=0)
    np.testing.assert_allclose(_composition_scales(flat), np.maximum(spread, 0.05))

    section = st2he.datasets.synthetic_tissue(0, size_um=256.0)
    kw = dict(size="tiny", n_genes=6, steps=3, batch_size=2, seed=0, progress=False)
    model = st2he.tl.train_super_resolution(section, composition_weight=0.5, **kw)
    info = model.metadata["training"]
    assert info["settings"]["composition_weight"] == 0.5
    assert all(np.isfinite(h["loss_composition"]) and h["loss_composition"] > 0 for h in info["history"])
    plain = st2he.tl.train_super_resolution(section, composition_weight=0, **kw)
    assert plain.metadata["training"]["settings"]["composition_weight"] == 0
    assert "loss_composition" not in plain.metadata["training"]["history"][0]
    for bad in (-1.0, True, float("nan"), "0.3"):
        with pytest.raises(ValueError, match="composition_weight"):
            st2he.tl.train_super_resolution(section, composition_weight=bad, **kw)


def test_training_on_an_expression_model_resumes_and_saves_only_its_own_weights(tmp_path):
    # the expression model is used, not owned: it is neither in the saved weights nor among the trained parameters,
    # and a checkpoint of such a training resumes (it failed on the expression model's "missing" weights)
    from safetensors import safe_open

    section = st2he.datasets.synthetic_tissue(1, size_um=256.0)
    kw = dict(size="tiny", n_genes=6, batch_size=2, seed=1, progress=False, expression_model="shipped")
    whole = st2he.tl.train_super_resolution(section, steps=3, **kw)
    assert whole.expression_model() is not None
    assert not any("_expression" in k for k in whole.state_dict())
    assert not any("_expression" in n for n, _ in whole.named_parameters())
    st2he.tl.train_super_resolution(section, steps=2, out=tmp_path / "a", **kw)
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        assert not any("_expression" in k for k in f.keys())
    resumed = st2he.tl.train_super_resolution(section, steps=3, resume=tmp_path / "a" / "last", **kw)
    assert resumed.metadata["training"]["steps_done"] == 3
    a, b = whole.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # the shipped model carries no copy of its expression model either
    from st2he.models._super_resolution import SHIPPED_SUPER_RESOLUTION

    with safe_open(str(SHIPPED_SUPER_RESOLUTION / "model.safetensors"), "pt") as f:
        assert not any("_expression" in k for k in f.keys())
