"""Faults a user meets: data outside the region, bad options, damaged files, and what a notebook shows."""

from __future__ import annotations

import logging
import shutil
import sys
import types
import warnings

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from spatialdata import SpatialData
from spatialdata.models import PointsModel

import st2he
from st2he._elements import get_params, parse_image
from st2he._grid import Grid, _scale0
from st2he.pp._palette import hex_to_rgb
from st2he.pp._rasterize import nuclear_stain_layer

PALETTE = {"ACTB": "#ff0000", "CD3E": "#00ff00", "MS4A1": "#0000ff"}


def _sdata(x, y, genes, *, qv=None) -> SpatialData:
    df = pd.DataFrame({"x": np.asarray(x, float), "y": np.asarray(y, float), "gene": pd.Categorical(genes)})
    if qv is not None:
        df["qv"] = np.asarray(qv, float)
    points = PointsModel.parse(dd.from_pandas(df, npartitions=1), feature_key="gene")
    return SpatialData(points={"transcripts": points})


def _with_stain(sd: SpatialData, side: float = 20.0, ps: float = 0.5, origin=(0.0, 0.0)) -> SpatialData:
    n = int(side / ps)
    img = (np.arange(n * n).reshape(n, n) % 1000 + 10).astype(np.uint16)
    sd.images["morphology_focus"] = parse_image(img[None], Grid(*origin, ps, n, n), c_coords=["DAPI"])
    return sd


def _image(sd, key="st2he_input") -> np.ndarray:
    return np.asarray(_scale0(sd.images[key]).values)


def _three() -> SpatialData:
    return _sdata([1.5, 4.5, 8.5], [2.5, 2.5, 6.5], ["ACTB", "CD3E", "MS4A1"])


# ------------------------------------------------------------------------------------ a region without data


def test_a_region_without_molecules_or_stain_is_an_error_naming_both_extents():
    sd = _three()
    with pytest.raises(ValueError, match=r"region=\(500, 500, 510, 510\) µm holds no kept molecule and no stain"):
        st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=1.0, region=(500, 500, 510, 510))
    with pytest.raises(ValueError, match=r"molecules \(3 of 3 kept after filtering\) lie in x 1.5..8.5, y 2.5..6.5 µm"):
        st2he.pp.transcript_density(sd, pixel_size=1.0, region=(500, 500, 510, 510))
    assert "st2he_input" not in sd.images and "transcript_density" not in sd.images
    # molecules there, but all filtered out (controls): still nothing to show
    controls = _sdata([1.5, 2.5], [1.5, 1.5], ["BLANK_1", "BLANK_2"])
    with pytest.raises(ValueError, match=r"0 of 2 kept after filtering"):
        st2he.pp.transcript_density(controls, pixel_size=1.0, region=(0, 0, 5, 5))
    # the stain alone: an error when the region misses it too, its bounds named
    sd = _with_stain(_three())
    with pytest.raises(ValueError, match=r"the stain 'morphology_focus' covers x 0..20, y 0..20 µm"):
        st2he.pp.rasterize_transcripts(sd, style="stain", pixel_size=1.0, region=(-50, -50, -40, -40))


def test_a_region_with_stain_but_no_molecule_warns_and_a_partial_overlap_is_fine():
    sd = _with_stain(_three())
    with pytest.warns(UserWarning, match=r"holds no kept molecule, so the picture shows the stain alone.*x 1.5..8.5"):
        st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=1.0, region=(12, 12, 19, 19))
    img = _image(sd)
    assert (img[0] == img[1]).all() and img.any()  # grey stain, no dot
    # a region overlapping the molecules only in part: no complaint, the molecule inside drawn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st2he.pp.rasterize_transcripts(_three(), palette=PALETTE, pixel_size=1.0, region=(-5, -5, 3, 3))
        st2he.pp.transcript_density(_three(), pixel_size=1.0, region=(8, 6, 30, 30))


# ------------------------------------------------------------------------------------------------ percentiles


@pytest.mark.parametrize(
    "bad", [(99, 1), (50, 50), (-1, 99), (1, 100.5), (np.nan, 99), (1, np.inf), (1, 2, 3), "ab", None]
)
def test_percentiles_out_of_order_range_or_kind_are_refused(bad):
    sd = _with_stain(_three())
    with pytest.raises(ValueError, match=r"percentiles must be"):
        st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=1.0, percentiles=bad)
    with pytest.raises(ValueError, match=r"percentiles must be"):
        nuclear_stain_layer(sd, Grid(0, 0, 1.0, 4, 4), percentiles=bad)
    assert "st2he_input" not in sd.images


def test_valid_percentiles_are_recorded_as_given():
    sd = _with_stain(_three())
    st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=1.0, percentiles=np.array([0, 100]))
    stain = get_params(sd, "st2he_input")["stain"]
    assert stain["stain_percentiles"] == [0.0, 100.0] and stain["stain_range"] == [10.0, 1009.0]


# ------------------------------------------------------------------------------------------ number types


def test_numpy_scalars_are_accepted_as_sizes(shared_data):
    ref = _three()
    st2he.pp.rasterize_transcripts(ref, palette=PALETTE, pixel_size=0.5)
    for value in (np.float32(0.5), np.float64(0.5)):
        sd = _three()
        st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=value)
        np.testing.assert_array_equal(_image(sd), _image(ref))
        assert get_params(sd, "st2he_input")["pixel_size"] == 0.5
        st2he.pp.transcript_density(sd, pixel_size=value)
        assert float(_scale0(sd.images["transcript_density"]).sum()) == 3
    sd = _three()
    st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=np.int64(1))
    assert Grid.from_element(sd.images["st2he_input"]).pixel_size == 1.0
    for bad in (True, np.float32(np.nan), np.float32(-1)):
        with pytest.raises(ValueError, match="pixel_size must be a positive number"):
            st2he.pp.rasterize_transcripts(_three(), palette=PALETTE, pixel_size=bad)
    palette = st2he.pp.make_palette(_three(), bin_size=np.float32(5.0))
    assert sorted(palette) == sorted(PALETTE)
    he = st2he.io.read_he_image(shared_data / "he_cmu1_small_region.svs", pixel_size=np.float32(0.5))
    assert Grid.from_element(he.images["he_image"]).pixel_size == 0.5
    cosmx = st2he.io.read_cosmx(shared_data / "cosmx_mouse_brain_quarter", pixel_size=np.float32(0.18))
    assert cosmx.attrs["st2he"]["source"]["native_pixel_size"] == pytest.approx(0.18)


# ------------------------------------------------------------------------------------------- one gene string


def test_a_gene_string_is_one_gene_everywhere():
    sd = _three()
    st2he.pp.rasterize_transcripts(sd, palette=PALETTE, genes="CD3E", pixel_size=1.0)
    img = _image(sd)
    (row,), (col,) = Grid.from_element(sd.images["st2he_input"]).to_pixel(np.array([4.5]), np.array([2.5]))
    assert img.any(axis=0).sum() == 1 and tuple(img[:, row, col]) == hex_to_rgb(PALETTE["CD3E"])
    assert get_params(sd, "st2he_input")["genes"] == ["CD3E"]
    st2he.pp.transcript_density(sd, genes="MS4A1", pixel_size=1.0)
    density = sd.images["transcript_density"]
    assert list(density.coords["c"].values) == ["MS4A1"] and float(density.sum()) == 1
    assert st2he.pp.make_palette("ACTB", method="hue") == {"ACTB": "#ff0000"}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = st2he.pl.compare(sd, pred_key=None, true_key=None, genes="MS4A1")
    assert [ax.get_title().split(" ")[0] for ax in axes[1:]] == ["MS4A1"]
    plt.close("all")


# ------------------------------------------------------------------------------------ non-finite coordinates


@pytest.mark.filterwarnings("ignore:.*no pixel size in its metadata.*:UserWarning")
def test_infinite_coordinates_leave_the_image_placed_and_are_named(shared_data, tmp_path):
    folder = tmp_path / "xenium"
    shutil.copytree(shared_data / "xenium_cellline_crop", folder)
    table = pd.read_parquet(folder / "transcripts.parquet")
    table.loc[table.index[:3], "x_location"] = np.inf
    table.loc[table.index[3], "y_location"] = np.nan
    table.to_parquet(folder / "transcripts.parquet")
    with pytest.warns(UserWarning, match=r"4 of 5260 molecules have NaN or infinite coordinates \(3 in x, 1 in y"):
        sd = st2he.io.read_xenium(folder)
    grid = Grid.from_element(sd.images["morphology_focus"])
    assert grid.pixel_size == pytest.approx(400 / 237, rel=2e-3)  # the crop's 400 µm over 237 pixels
    assert grid.x0 == pytest.approx(1000, abs=1) and grid.y0 == pytest.approx(1000, abs=1)
    assert any("NaN or infinite" in a for a in sd.attrs["st2he"]["source"]["assumptions"])
    # every molecule non-finite: an error that says so, not a bad pixel size
    table[["x_location"]] = np.inf
    table.to_parquet(folder / "transcripts.parquet")
    with pytest.raises(ValueError, match=r"All 5260 molecules have NaN or infinite coordinates"):
        st2he.io.read_xenium(folder)


# ---------------------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("size", [1_000_000, 1_275_949])
def test_truncated_whole_slide_fails_at_read_naming_the_file(shared_data, tmp_path, size):
    path = tmp_path / "slide.svs"
    shutil.copy(shared_data / "he_cmu1_small_region.svs", path)
    with open(path, "r+b") as f:
        f.truncate(size)
    with pytest.raises(ValueError, match=r"slide\.svs' is truncated"):
        st2he.io.read_he_image(path)


@pytest.mark.parametrize("reader", ["he", "xenium"])
def test_truncated_tiff_whose_header_survives_fails_at_read(shared_data, tmp_path, reader):
    # the Xenium morphology image keeps its header at the start: a cut-off copy still opens, then fails on decoding
    folder = tmp_path / "xenium"
    shutil.copytree(shared_data / "xenium_cellline_crop", folder)
    tif = folder / "morphology_focus.ome.tif"
    with open(tif, "r+b") as f:
        f.truncate(60_000)
    if reader == "he":
        import tifffile

        rgb = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
        tif = tmp_path / "tiles.tif"
        tifffile.imwrite(tif, rgb, tile=(128, 128), photometric="rgb", resolution=(20000, 20000), resolutionunit=3)
        with open(tif, "r+b") as f:
            f.truncate(tif.stat().st_size - 100_000)
        with pytest.raises(ValueError, match=r"tiles\.tif' is truncated: its pixel data run to byte"):
            st2he.io.read_he_image(tif)
    else:
        with pytest.raises(ValueError, match=r"morphology_focus\.ome\.tif' is truncated: .* missing"):
            st2he.io.read_xenium(folder)


def test_truncated_png_names_the_file(tmp_path):
    from PIL import Image

    path = tmp_path / "tile.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"tile\.png'.*truncated or damaged"):
        st2he.io.read_he_image(path, pixel_size=0.5)


# ---------------------------------------------------------------------------------- what a notebook shows


def test_dropped_molecules_are_one_warning_with_the_counts_and_no_log_line(caplog):
    from st2he.pp._molecules import MoleculesDroppedWarning

    x = [1.0, 2.0, 3.0, np.nan, np.inf, 6.0, 7.0]
    genes = ["ACTB", "BLANK_0001", "NegControlProbe_1", "ACTB", "CD3E", "CD3E", "MS4A1"]
    sd = _sdata(x, [1.0] * 7, genes, qv=[30, 30, 30, 30, 30, 10, 30])
    with caplog.at_level(logging.INFO, logger="st2he"), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=1.0)
    assert [w.category for w in record] == [MoleculesDroppedWarning]
    assert issubclass(MoleculesDroppedWarning, UserWarning)
    assert st2he.pp.MoleculesDroppedWarning is MoleculesDroppedWarning  # for warnings.filterwarnings
    assert str(record[0].message) == (
        "rasterize_transcripts: kept 2 of 7 molecules; dropped 5: 2 control probes, 1 with qv < 20, "
        "2 with NaN or infinite coordinates."
    )
    assert record[0].filename == __file__  # points at the caller's line
    assert "dropped" not in caplog.text
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        st2he.pp.transcript_density(sd, pixel_size=1.0, min_qv=None, drop_controls=False)
    assert [str(w.message) for w in record] == [
        "transcript_density: kept 5 of 7 molecules; dropped 2: 2 with NaN or infinite coordinates."
    ]
    # the layers st2he's tools build for themselves (the stain baseline's eosin) do not repeat it
    from st2he.pp._rasterize import density_layer

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(density_layer(sd, Grid(0, 0, 1.0, 3, 9)).sum().compute()) == 2
    # nothing dropped: no warning at all
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st2he.pp.rasterize_transcripts(_three(), palette=PALETTE, pixel_size=1.0)


def test_reader_assumptions_are_one_warning_each_not_a_log_line_too(shared_data, caplog):
    with caplog.at_level(logging.INFO, logger="st2he"), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        st2he.io.read_xenium(shared_data / "xenium_cellline_crop")
    notes = [str(w.message) for w in record if "no pixel size in its metadata" in str(w.message)]
    assert len(notes) == 1
    assert "no pixel size in its metadata" not in caplog.text


def test_progress_bars_do_not_warn_in_a_kernel_without_ipywidgets(monkeypatch):
    import tqdm

    from st2he import _progress

    # a Jupyter kernel (what tqdm.auto looks for: ipykernel's shell, or an IPKernelApp) without ipywidgets
    shell = type("ZMQInteractiveShell", (), {"config": {"IPKernelApp": {}}})()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import fails
    for name in ("tqdm.auto", "tqdm.autonotebook", "tqdm.notebook"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    _progress._tqdm_class.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            with _progress.tqdm(total=2, disable=True) as bar:
                bar.update(2)
        assert record == [] and type(bar) is tqdm.std.tqdm
        # the situation is real: tqdm.auto itself warns there
        with pytest.warns(tqdm.TqdmWarning, match="IProgress not found"):
            import tqdm.auto  # noqa: F401
    finally:
        _progress._tqdm_class.cache_clear()
    from st2he.models import _training
    from st2he.tl import _generate, _zero_shot

    for module in (_training, _generate, _zero_shot):  # every progress bar of st2he goes through the helper
        source = open(module.__file__, encoding="utf-8").read()
        assert "tqdm.auto" not in source and "from st2he._progress import tqdm" in source


def test_writing_a_store_emits_no_zarr_warnings(tmp_path):
    import anndata as ad
    from spatialdata.models import TableModel

    from st2he.io._common import quiet_zarr_writes

    sd = _with_stain(_three())
    st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=1.0)
    sd.tables["table"] = TableModel.parse(ad.AnnData(np.ones((3, 2), dtype=np.float32)))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with quiet_zarr_writes():
            sd.write(tmp_path / "a.zarr")
    assert [str(w.message) for w in record if "zarr" in str(w.message).lower() or "Scaler" in str(w.message)] == []
    back = SpatialData.read(tmp_path / "a.zarr")
    np.testing.assert_array_equal(_image(back), _image(sd))
    np.testing.assert_array_equal(back.tables["table"].X, np.ones((3, 2)))
    # without it the same write warns (what the helper is for), and the demo writes through it
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sd.write(tmp_path / "b.zarr")
    assert any("autosharding" in str(w.message) for w in record)
    from st2he import _demo

    assert "with st2he.io._common.quiet_zarr_writes():" in open(_demo.__file__, encoding="utf-8").read()


def test_cosmx_cells_without_metadata_are_one_warning(shared_data, tmp_path):
    folder = tmp_path / "cosmx"
    shutil.copytree(shared_data / "cosmx_mouse_brain_quarter", folder)
    metadata = folder / "Run5642_S3_Quarter_metadata_file.csv"
    pd.read_csv(metadata).iloc[2:].to_csv(metadata, index=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sd = st2he.io.read_cosmx(folder)
    assert [str(w.message) for w in record if "metadata" in str(w.message)] == [
        "2 cells of Run5642_S3_Quarter_exprMat_file.csv have no row in Run5642_S3_Quarter_metadata_file.csv; they "
        "were left out of the table. Check that the two files are of one export."
    ]
    assert sd.tables["table"].n_obs == 25
