"""st2he.pl.compare: input, virtual H&E, real H&E and gene panels over one region."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

import st2he


@pytest.fixture(scope="module")
def sample():
    sdata = st2he.datasets.synthetic_tissue(4, size_um=128)
    st2he.pp.rasterize_transcripts(sdata)
    st2he.tl.virtual_he(sdata, method="stain")
    return sdata


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _has_scale_bar(ax) -> bool:
    return any(a.get_gid() == "scale_bar" for a in ax.artists)


def test_default_panels(sample):
    axes = st2he.pl.compare(sample)
    assert isinstance(axes, np.ndarray) and len(axes) == 3 + 2  # three images and the two top genes
    titles = [ax.get_title() for ax in axes]
    assert titles[0].startswith("input") and titles[1].startswith("virtual H&E") and titles[2].startswith("H&E")
    assert all("molecules" in t for t in titles[3:])
    # the default genes are markers of different cell types, not housekeeping genes
    from st2he.datasets._synthetic import PROGRAMS, STATE_PROGRAMS

    program_of = {g: name for name, genes in {**PROGRAMS, **STATE_PROGRAMS}.items() for g in genes}
    shown = [t.split(" ")[0] for t in titles[3:]]
    assert all(g in program_of for g in shown)
    assert len({program_of[g] for g in shown}) == len(shown)
    assert all(_has_scale_bar(ax) for ax in axes)
    # every panel shows the same region, y downwards
    x0, y0, x1, y1 = st2he._grid.Grid.from_element(sample.images["st2he_input"]).bounds
    for ax in axes:
        assert ax.get_xlim() == pytest.approx((x0, x1))
        assert ax.get_ylim() == pytest.approx((y1, y0))
    # what is drawn: the input and virtual H&E panels show the elements' own pixels over their bounds
    from matplotlib.colors import to_rgb

    from st2he._grid import _scale0

    for ax, key in zip(axes[:2], ("st2he_input", "virtual_he"), strict=True):
        drawn = np.asarray(ax.get_images()[0].get_array())
        pixels = np.moveaxis(np.asarray(_scale0(sample.images[key]).values), 0, -1)
        np.testing.assert_allclose(drawn[..., :3] * 255, pixels, atol=1e-3)
        assert ax.get_images()[0].get_extent() == pytest.approx([x0, x1, y1, y0])
    # each gene panel: a dot at every molecule of that gene, in the gene's colour, counted in the title
    tx = sample["transcripts"].compute()
    palette = st2he._elements.get_params(sample, "st2he_input")["palette"]
    for ax, gene in zip(axes[3:], shown, strict=True):
        dots = np.asarray(ax.collections[0].get_offsets())
        want = tx.loc[tx["gene"] == gene, ["x", "y"]].to_numpy()
        assert sorted(map(tuple, dots.round(6))) == sorted(map(tuple, want.round(6)))
        assert ax.get_title() == f"{gene} ({len(want):,} molecules)"
        # (the palette colour, lightened towards white until it shows on the black background: c = p + t (1 - p))
        dot, base = np.asarray(ax.collections[0].get_facecolors()[0][:3]), np.asarray(to_rgb(palette[gene]))
        t = (dot - base)[np.argmax(1 - base)] / (1 - base).max()
        assert 0 <= t < 1
        np.testing.assert_allclose(dot, base + t * (1 - base), atol=1e-6)


def test_chosen_genes_region_and_given_axes(sample):
    region = (1230.0, 830.0, 1290.0, 870.0)
    fig, given = plt.subplots(1, 4)
    axes = st2he.pl.compare(sample, genes=["COL1A1"], region=region, scale_bar_um=10, ax=given)
    assert list(axes) == list(given)
    assert axes[3].get_title().startswith("COL1A1")
    assert axes[0].get_xlim() == pytest.approx((1230.0, 1290.0))
    assert axes[0].get_ylim() == pytest.approx((870.0, 830.0))
    fig.canvas.draw()  # renders without error


def test_missing_true_image_is_left_out(sample):
    he = sample.images["he_image"]
    del sample["he_image"]
    try:
        axes = st2he.pl.compare(sample, genes=["KRT5", "PTPRC"])
        assert len(axes) == 4
        assert not any(ax.get_title().startswith("H&E") for ax in axes)
    finally:
        sample["he_image"] = he


def test_panels_can_be_left_out_and_bad_input(sample):
    axes = st2he.pl.compare(sample, input_key=None, pred_key=None, genes=[])
    assert len(axes) == 1 and axes[0].get_title().startswith("H&E")
    with pytest.raises(KeyError, match="pred_key"):
        st2he.pl.compare(sample, pred_key="nothing")
    with pytest.raises(ValueError, match="not in the panel"):
        st2he.pl.compare(sample, genes=["NOT_A_GENE"])
    with pytest.raises(ValueError, match="region"):
        st2he.pl.compare(sample, region=(10.0, 10.0, 5.0, 20.0))
    with pytest.raises(ValueError, match="ax holds"):
        _, ax = plt.subplots(1, 2)
        st2he.pl.compare(sample, ax=ax)


def test_big_images_are_read_from_a_coarser_level(sample):
    dapi = sample.images["morphology_focus"]
    full = dapi["scale0"].image.shape[1]
    axes = st2he.pl.compare(
        sample, input_key=None, pred_key=None, true_key="morphology_focus", genes=[], max_pixels=250
    )
    shown = axes[0].get_images()[0].get_array()
    assert shown.ndim == 2  # a single-channel image in grey
    assert max(shown.shape) <= 250 < full  # at most max_pixels across
    # read from the coarser level that resolves 250 px across: the same values as that level resampled
    from st2he._raster import Raster, region_grid

    raster = Raster(dapi)
    x0, y0, x1, y1 = raster.bounds
    pixel = max(x1 - x0, y1 - y0) / 250
    assert raster.level_for(pixel) >= 1
    want = raster.read(region_grid(raster.bounds, pixel), level=raster.level_for(pixel), dtype=np.float32)[0]
    np.testing.assert_allclose(np.asarray(shown), want, rtol=1e-6)


def test_rotated_he_and_odd_sized_pyramids_plot(sample, tmp_path):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Affine

    from st2he._raster import Raster

    he = Raster(sample.images["he_image"])
    data = np.asarray(he.level0.values)[:, :-1, :-3]  # odd height and width
    h, w = data.shape[1:]
    s, x0, y0 = he.affine[0, 0], he.affine[0, 2], he.affine[1, 2]
    rotated = np.ascontiguousarray(np.rot90(data, k=1, axes=(1, 2)))
    m = np.array([[0.0, -s, x0 + w * s], [s, 0.0, y0], [0, 0, 1]])
    sample.images["he_rotated"] = Image2DModel.parse(
        rotated,
        dims=("c", "y", "x"),
        scale_factors=[2, 2],
        transformations={"global": Affine(m, input_axes=("x", "y"), output_axes=("x", "y"))},
    )
    try:
        region = (x0 + 5, y0 + 7, x0 + 45, y0 + 37)
        axes = st2he.pl.compare(
            sample, input_key=None, pred_key="he_rotated", true_key="he_image", genes=[], region=region,
            save=tmp_path / "rotated.png",
        )
        a = axes[0].get_images()[0].get_array()
        b = axes[1].get_images()[0].get_array()
        np.testing.assert_array_equal(a, b)  # the rotated copy shows exactly the axis-aligned picture
        assert (tmp_path / "rotated.png").stat().st_size > 1000
        # coarse reads of the odd-sized pyramid (levels with x and y scales a hair apart) work too
        axes = st2he.pl.compare(sample, input_key=None, pred_key="he_rotated", true_key=None, genes=[], max_pixels=50)
        assert max(axes[0].get_images()[0].get_array().shape[:2]) <= 50
    finally:
        del sample["he_rotated"]
