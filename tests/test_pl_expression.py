"""st2he.pl.expression: measured and predicted maps over the H&E, tumour map and per-gene Pearson bars."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import Normalize

import st2he

# the hand-built tables of the evaluate_expression tests (bins of 8 µm on a 9 x 10 grid, ids "{row}_{col}")
_spec = importlib.util.spec_from_file_location(
    "_expression_tables", Path(__file__).with_name("test_evaluate_expression.py")
)
_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tables)


def _with_he(sdata):
    """Add an H&E (uint8 RGB, 1 µm pixels over the 80 x 72 µm of the bins) as ``he_image``."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    rng = np.random.default_rng(1)
    he = np.stack([np.full((72, 80), 200), np.full((72, 80), 120), np.full((72, 80), 190)]).astype(np.uint8)
    he = (he - rng.integers(0, 60, he.shape)).astype(np.uint8)
    sdata["he_image"] = Image2DModel.parse(
        he, dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations={"global": Identity()}
    )
    return sdata


@pytest.fixture
def sdata():
    return _with_he(_tables.make_expression_sdata())


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _measured_lognorm(sdata, gene):
    """Measured log1p(counts per 10k) of ``gene`` by instance id, computed here."""
    true = sdata.tables["measured"]
    counts = true.X.toarray().astype(np.float64)
    values = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)[:, list(true.var_names).index(gene)]
    return dict(zip(true.obs["instance_id"], values, strict=True))


def _unit_at(x, y, size=8.0):
    return f"{int(y // size)}_{int(x // size)}"


def _drawn(ax):
    """``{unit id: RGBA}`` of the one collection of a map panel (units found from their polygon centres)."""
    ax.figure.canvas.draw()
    (coll,) = ax.collections
    colours = coll.get_facecolors()
    out = {}
    for path, colour in zip(coll.get_paths(), colours, strict=True):
        cx, cy = (path.vertices.min(axis=0) + path.vertices.max(axis=0)) / 2
        out[_unit_at(cx, cy)] = colour
    return out


def test_maps_colours_titles_and_bars(sdata):
    genes = ["A", "C"]
    axes = st2he.pl.expression(sdata, genes=genes, pred_key="predicted", true_key="measured")
    assert set(sdata.tables) == {"measured", "predicted"}  # the Pearson r of the bars is not stored
    assert isinstance(axes, np.ndarray) and len(axes) == 2 * 2 + 2
    titles = [ax.get_title() for ax in axes]
    assert titles == [
        "A: measured (measured)",
        "A: predicted (predicted)",
        "C: measured (measured)",
        "C: predicted (predicted)",
        "tumour probability (predicted)",
        "Pearson r per gene",
    ]
    viridis = plt.get_cmap("viridis")
    pred = sdata.tables["predicted"]
    for k, gene in enumerate(genes):
        measured = _measured_lognorm(sdata, gene)
        values = np.array(list(measured.values()))
        norm = Normalize(values.min(), np.percentile(values, 99))  # the same limits on both maps of a gene
        drawn = _drawn(axes[2 * k])
        assert set(drawn) == set(measured)  # every measured unit, each once
        for unit, colour in drawn.items():
            np.testing.assert_allclose(colour[:3], viridis(norm(measured[unit]))[:3], atol=1e-6)
        predicted = dict(zip(pred.obs["instance_id"], pred[:, gene].X.ravel(), strict=True))
        drawn = _drawn(axes[2 * k + 1])
        assert set(drawn) == set(predicted)
        for unit, colour in drawn.items():
            np.testing.assert_allclose(colour[:3], viridis(norm(predicted[unit]))[:3], atol=1e-6)
        assert axes[2 * k].collections[0].get_clim() == axes[2 * k + 1].collections[0].get_clim()
    # the tumour map: the predicted probability on 0..1
    magma = plt.get_cmap("magma")
    prob = dict(zip(pred.obs["instance_id"], pred.obs["tumour_probability"], strict=True))
    for unit, colour in _drawn(axes[4]).items():
        np.testing.assert_allclose(colour[:3], magma(prob[unit])[:3], atol=1e-6)
    # the bars: Pearson r of each gene, as evaluate_expression computes it (nothing stored)
    want = st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", genes=genes)["pearson"]
    heights = [p.get_height() for p in axes[5].patches]
    np.testing.assert_allclose(heights, want.to_numpy(), rtol=1e-6)
    assert [t.get_text() for t in axes[5].get_xticklabels()] == genes
    # every map over a faded H&E (its pixels lightened towards white), with a scale bar, over the units' extent
    he = np.moveaxis(sdata.images["he_image"].values, 0, -1) / 255.0
    for ax in axes[:5]:
        (image,) = ax.get_images()
        np.testing.assert_allclose(np.asarray(image.get_array())[..., :3], 1 - (1 - he) * 0.35, atol=1e-6)
        assert any(a.get_gid() == "scale_bar" for a in ax.artists)
        assert ax.get_xlim() == pytest.approx((0, 80)) and ax.get_ylim() == pytest.approx((72, 0))


def test_stored_metrics_circles_no_truth_and_save(sdata, tmp_path):
    st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", key_added="m")
    sdata.tables["m"].obs.loc[["B", "D"], "pearson"] = [0.25, -0.5]  # the bars show the stored values
    axes = st2he.pl.expression(
        sdata,
        genes=["D", "B"],
        pred_key="predicted",
        true_key="measured",
        metrics_key="m",
        tumour=False,
        region=(16, 8, 64, 56),
        save=tmp_path / "expression.png",
    )
    assert len(axes) == 2 * 2 + 1 and axes[-1].get_title() == "Pearson r per gene (m)"
    np.testing.assert_allclose([p.get_height() for p in axes[-1].patches], [-0.5, 0.25])
    # only the units that reach into the region are drawn
    drawn = _drawn(axes[0])
    assert set(drawn) == {f"{r}_{c}" for r in range(1, 7) for c in range(2, 8)} - {"4_5"}  # (a hole)
    png = (tmp_path / "expression.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # circles (spots), predicted maps only, no H&E: colours from the predicted values, discs of the spots' radius
    spots = _tables.make_expression_sdata(circles=True)
    del spots.tables["predicted"].obs["tumour_probability"]
    axes = st2he.pl.expression(spots, genes="B", pred_key="predicted", image_key=None)
    assert len(axes) == 1 and axes[0].get_title() == "B: predicted (predicted)" and not axes[0].get_images()
    axes[0].figure.canvas.draw()
    (coll,) = axes[0].collections
    pred = spots.tables["predicted"]
    values = pred[:, "B"].X.ravel()
    norm = Normalize(values.min(), np.percentile(values, 99))
    centres = np.asarray(coll.get_offsets())
    np.testing.assert_allclose(coll.get_widths(), 8.0)  # full widths: discs of radius 4 µm
    np.testing.assert_allclose(coll.get_heights(), 8.0)
    units = [_unit_at(x, y) for x, y in centres]
    assert units == list(pred.obs["instance_id"])
    np.testing.assert_allclose(coll.get_facecolors()[:, :3], plt.get_cmap("viridis")(norm(values))[:, :3], atol=1e-6)


def test_bad_input(sdata, tmp_path):
    def call(**kw):
        args = {"genes": ["A"], "pred_key": "predicted", "true_key": "measured"}
        return st2he.pl.expression(sdata, **{**args, **kw})

    with pytest.raises(KeyError, match=r"pred_key='nope' is not a table.*\['measured', 'predicted'\]"):
        call(pred_key="nope")
    with pytest.raises(KeyError, match=r"genes are not in table 'predicted': 'E'"):
        call(genes=["A", "E"])
    with pytest.raises(ValueError, match="genes is empty"):
        call(genes=[])
    with pytest.raises(KeyError, match=r"image_key='virtual_he' is not an image.*\['he_image'\].*image_key=None"):
        call(image_key="virtual_he")
    with pytest.raises(KeyError, match="metrics_key='m' is not a table"):
        call(metrics_key="m")
    st2he.tl.evaluate_expression(sdata, pred_key="predicted", true_key="measured", genes=["B"], key_added="m")
    with pytest.raises(KeyError, match=r"Genes \['A'\] are not scored in metrics_key='m'"):
        call(metrics_key="m")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        call(save=tmp_path / "no" / "x.png")
    del sdata.shapes["bins"]
    with pytest.raises(KeyError, match=r"annotates 'bins', which is not a shapes element"):
        call()


def test_units_placed_through_their_transformation():
    from spatialdata.transformations import Affine, set_transformation

    # the shapes placed in global µm by a scale of 2 and a shift of (10, 5)
    for circles in (False, True):
        sdata = _tables.make_expression_sdata(circles=circles)
        matrix = np.array([[2.0, 0, 10], [0, 2.0, 5], [0, 0, 1]])
        affine = Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y"))
        set_transformation(sdata.shapes["bins"], affine, to_coordinate_system="global")
        axes = st2he.pl.expression(sdata, genes="A", pred_key="predicted", image_key=None, tumour=False)
        (coll,) = axes[0].collections
        pred = sdata.tables["predicted"]
        k = list(pred.obs["instance_id"]).index("2_1")  # the bin at x 8..16, y 16..24 before the transformation
        if circles:
            np.testing.assert_allclose(coll.get_offsets()[k], [10 + 2 * 12, 5 + 2 * 20])
            np.testing.assert_allclose(coll.get_widths()[k], 2 * 8.0)  # diameter 8, scaled by 2
        else:
            v = coll.get_paths()[k].vertices
            np.testing.assert_allclose([*v.min(axis=0), *v.max(axis=0)], [26, 37, 42, 53])
        assert axes[0].get_xlim() == pytest.approx((10, 170)) and axes[0].get_ylim() == pytest.approx((149, 5))


def test_tables_over_different_units_show_maps_without_bars(sdata):
    from spatialdata import deepcopy

    # measured over the bins, predicted over a copy of them: both maps drawn, no bars (nothing to pair units by)
    pred = sdata.tables["predicted"]
    sdata["other_bins"] = deepcopy(sdata.shapes["bins"])
    del sdata.tables["predicted"]
    pred.obs["region"] = pd.Categorical(["other_bins"] * pred.n_obs)
    pred.uns["spatialdata_attrs"]["region"] = "other_bins"
    sdata.tables["predicted"] = pred
    with pytest.warns(UserWarning, match="No Pearson r bars.*annotate different elements"):
        axes = st2he.pl.expression(sdata, genes=["A"], pred_key="predicted", true_key="measured", tumour=False)
    assert [ax.get_title() for ax in axes] == ["A: measured (measured)", "A: predicted (predicted)"]


def test_multipolygon_unit_draws_every_part_in_its_colour():
    import shapely

    sdata = _tables.make_expression_sdata()
    shapes = sdata.shapes["bins"]
    # unit "2_1" is two squares: its own bin and one far away at x 100..108, y 0..8
    geoms = shapes.geometry.to_numpy().copy()
    k = list(shapes.index).index("2_1")
    geoms[k] = shapely.MultiPolygon([geoms[k], shapely.box(100, 0, 108, 8)])
    shapes.geometry = geoms
    axes = st2he.pl.expression(sdata, genes="A", pred_key="predicted", image_key=None, tumour=False)
    axes[0].figure.canvas.draw()
    (coll,) = axes[0].collections
    pred = sdata.tables["predicted"]
    assert len(coll.get_paths()) == pred.n_obs + 1
    boxes = [(*p.vertices.min(axis=0), *p.vertices.max(axis=0)) for p in coll.get_paths()]
    parts = [i for i, b in enumerate(boxes) if b in ((8, 16, 16, 24), (100, 0, 108, 8))]
    assert len(parts) == 2
    colours = coll.get_facecolors()
    np.testing.assert_allclose(colours[parts[0]], colours[parts[1]])
    values = pred[:, "A"].X.ravel()
    norm = Normalize(values.min(), np.percentile(values, 99))
    want = plt.get_cmap("viridis")(norm(values[list(pred.obs["instance_id"]).index("2_1")]))
    np.testing.assert_allclose(colours[parts[0]][:3], want[:3], atol=1e-6)
    assert axes[0].get_xlim() == pytest.approx((0, 108))  # the region takes in the far part


def test_super_resolved_counts_beside_their_input_and_the_truth():
    """Spots (input), true 8 µm bins and super-resolved counts: one colour scale, values log-normalised alike."""
    sdata = st2he.datasets.synthetic_tissue(3, size_um=192.0)
    st2he.pp.aggregate_transcripts(sdata, by="spots", key_added="spots")
    st2he.pp.aggregate_transcripts(sdata, by="bins", bin_size=8.0, key_added="truth")
    st2he.tl.super_resolve(sdata, table_key="spots", method="bicubic", key_added="sr", progress=False)
    genes = ["EPCAM", "COL1A1"]
    axes = st2he.pl.expression(
        sdata, genes=genes, pred_key="sr", true_key="truth", input_key="spots", prediction="counts"
    )
    titles = [ax.get_title() for ax in axes[:3]]
    assert titles == ["EPCAM: input (spots)", "EPCAM: measured (truth)", "EPCAM: predicted (sr)"]
    sr, truth, spots = (sdata.tables[k] for k in ("sr", "truth", "spots"))
    common = [g for g in sr.var_names if g in set(truth.var_names)]

    def lognorm(table, rows_genes):
        x = table[:, common].X
        x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
        return np.log1p(x / np.maximum(x.sum(axis=1, keepdims=True), 1e-12) * 1e4)[:, common.index(rows_genes)]

    for k, gene in enumerate(genes):
        low, true, pred = axes[3 * k : 3 * k + 3]
        drawn_pred = np.sort(np.asarray(pred.collections[0].get_array(), dtype=np.float64))
        np.testing.assert_allclose(drawn_pred, np.sort(lognorm(sr, gene)), atol=1e-5)
        drawn_true = np.sort(np.asarray(true.collections[0].get_array(), dtype=np.float64))
        np.testing.assert_allclose(drawn_true, np.sort(lognorm(truth, gene)), atol=1e-5)
        x = spots.X.toarray().astype(np.float64)
        want_low = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)[:, list(spots.var_names).index(gene)]
        drawn_low = np.sort(np.asarray(low.collections[0].get_array(), dtype=np.float64))
        np.testing.assert_allclose(drawn_low, np.sort(want_low), atol=1e-5)
        assert low.collections[0].get_clim() == true.collections[0].get_clim() == pred.collections[0].get_clim()
    want = st2he.tl.evaluate_expression(
        sdata, pred_key="sr", true_key="truth", genes=genes, prediction="counts", match="grid"
    )["pearson"]
    heights = [p.get_height() for p in axes[-1].patches]
    np.testing.assert_allclose(heights, want.to_numpy(), rtol=1e-6)
    assert np.all(want.to_numpy() > 0.2)  # spots spread onto bins follow the true bins
