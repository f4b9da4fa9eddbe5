"""Readers on the real crops in ../shared/data, on full-output folders built from them, and on bad input."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import shapely

import st2he
from st2he._grid import Grid

XENIUM = "xenium_cellline_crop"
MERSCOPE = "merscope_brain_cancer_crop"
COSMX = "cosmx_mouse_brain_quarter"
COSMX_ID = "Run5642_S3_Quarter"

XENIUM_CONTROLS = r"^(BLANK|NegControl|UnassignedCodeword|DeprecatedCodeword)"
COSMX_CONTROLS = r"^(NegPrb|FalseCode|SystemControl)"
MERSCOPE_CONTROLS = r"^Blank-"


def _read(reader, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reader(path, **kwargs)


def _inside(x, y, shapes) -> np.ndarray:
    """Whether each point lies within any of the shapes' polygons."""
    tree = shapely.STRtree(shapes.geometry.to_numpy())
    hits = tree.query(shapely.points(x, y), predicate="within")
    inside = np.zeros(len(x), dtype=bool)
    inside[hits[0]] = True
    return inside


def _stain(sdata, key):
    element = sdata.images[key]
    grid = Grid.from_element(element)
    data = element["scale0"].image if hasattr(element, "children") and "scale0" in element.children else element
    return np.asarray(data.data[0]).astype(np.float64), grid


def _pixel_values(image, grid, x, y):
    row, col = grid.to_pixel(x, y)
    ok = (row >= 0) & (row < grid.height) & (col >= 0) & (col < grid.width)
    return image[row[ok], col[ok]]


@pytest.fixture(scope="module")
def xenium(shared_data):
    return _read(st2he.io.read_xenium, shared_data / XENIUM)


@pytest.fixture(scope="module")
def merscope(shared_data):
    return _read(st2he.io.read_merscope, shared_data / MERSCOPE)


@pytest.fixture(scope="module")
def cosmx(shared_data):
    return _read(st2he.io.read_cosmx, shared_data / COSMX)


# --------------------------------------------------------------------------------------------------- Xenium


def test_xenium_molecules_lose_nothing(xenium, shared_data):
    raw = pd.read_parquet(shared_data / XENIUM / "transcripts.parquet")
    points = xenium["transcripts"]
    assert isinstance(points, dd.DataFrame)
    df = points.compute()
    assert len(df) == len(raw) == 5260
    assert points.attrs["spatialdata_attrs"]["feature_key"] == "gene"
    assert isinstance(df["gene"].dtype, pd.CategoricalDtype)
    assert int(df["is_control"].sum()) == int(raw["feature_name"].str.match(XENIUM_CONTROLS).sum()) == 3
    merged = df.merge(raw, on="transcript_id", validate="one_to_one")
    assert len(merged) == len(raw)
    np.testing.assert_allclose(merged["x"], merged["x_location"])
    np.testing.assert_allclose(merged["y"], merged["y_location"])
    np.testing.assert_allclose(merged["z"], merged["z_location"])
    np.testing.assert_allclose(merged["qv_x"], merged["qv_y"], rtol=1e-6)
    assert (merged["gene"].astype(str) == merged["feature_name"]).all()
    for column in ("cell_id", "overlaps_nucleus", "fov_name", "nucleus_distance"):
        assert column in df.columns


def test_xenium_old_and_alternative_tables(shared_data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pd.read_parquet(shared_data / XENIUM / "transcripts.parquet")
    # older Xenium releases wrote names as bytes; big files have many row groups (one partition per few)
    old = tmp_path / "old"
    old.mkdir()
    table = pa.Table.from_pandas(raw, preserve_index=False)
    for name in ("feature_name", "cell_id"):
        i = table.column_names.index(name)
        table = table.set_column(i, name, pa.array(raw[name].str.encode("utf-8"), type=pa.binary()))
    pq.write_table(table, old / "transcripts.parquet", row_group_size=500)
    sdata = _read(st2he.io.read_xenium, old)
    points = sdata["transcripts"]
    assert points.npartitions == 1  # row groups are batched into partitions of up to 2 million molecules
    df = points.compute()
    assert len(df) == 5260
    assert df["gene"].cat.categories.tolist() == sorted(raw["feature_name"].unique())
    assert (df["gene"].astype(str).to_numpy() == raw["feature_name"].to_numpy()).all()
    assert (df["cell_id"].astype(str).to_numpy() == raw["cell_id"].to_numpy()).all()
    assert int(df["is_control"].sum()) == 3
    # a partial folder with the csv.gz table only
    csv = tmp_path / "csv"
    csv.mkdir()
    shutil.copy(shared_data / XENIUM / "transcripts.csv.gz", csv / "transcripts.csv.gz")
    df = _read(st2he.io.read_xenium, csv)["transcripts"].compute()
    assert len(df) == 5260 and int(df["is_control"].sum()) == 3
    np.testing.assert_allclose(np.sort(df["qv"].to_numpy()), np.sort(raw["qv"].to_numpy()), rtol=1e-6)


def test_xenium_partitions_share_categories(shared_data, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from st2he.io import _common

    monkeypatch.setattr(_common, "_ROWS_PER_PARTITION", 1000)
    raw = pd.read_parquet(shared_data / XENIUM / "transcripts.parquet")
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(
        pq.read_table(shared_data / XENIUM / "transcripts.parquet"), folder / "transcripts.parquet", row_group_size=700
    )
    points = _read(st2he.io.read_xenium, folder)["transcripts"]
    assert points.npartitions > 4
    df = points.compute()
    assert len(df) == 5260
    assert (df["gene"].astype(str).to_numpy() == raw["feature_name"].to_numpy()).all()
    assert points["x"].sum().compute() == pytest.approx(raw["x_location"].sum())


def test_xenium_elements_and_source(xenium):
    assert {"morphology_focus", "morphology_mip"} <= set(xenium.images)
    assert {"cell_boundaries", "nucleus_boundaries"} <= set(xenium.shapes)
    table = xenium["table"]
    assert table.n_obs == 526
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "cell_boundaries"
    assert set(table.obs[attrs["instance_key"]]) <= set(xenium["cell_boundaries"].index)
    source = xenium.attrs["st2he"]["source"]
    assert source["platform"] == "xenium"
    assert source["native_pixel_size"] == pytest.approx(0.2125)
    assert source["nuclear_stain"] == "morphology_focus"
    assert source["assumptions"]  # the crop's image has no pixel size: what was assumed is recorded
    for element in [*xenium.images.values(), *xenium.shapes.values(), xenium["transcripts"]]:
        from spatialdata.transformations import get_transformation

        assert list(get_transformation(element, get_all=True)) == ["global"]


def test_xenium_image_grid_inferred_and_given(xenium, shared_data):
    grid = Grid.from_element(xenium["morphology_focus"])
    assert grid.shape == (237, 237)
    assert grid.pixel_size == pytest.approx(400 / 237, rel=1e-3)
    assert grid.x0 == pytest.approx(1000, abs=0.5)
    assert grid.y0 == pytest.approx(1000, abs=0.5)
    with pytest.warns(UserWarning, match="image_pixel_size"):
        st2he.io.read_xenium(shared_data / XENIUM)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing to assume when told
        given = st2he.io.read_xenium(shared_data / XENIUM, image_pixel_size=400 / 237, image_origin=(1000, 1000))
    assert Grid.from_element(given["morphology_focus"]) == Grid(1000.0, 1000.0, 400 / 237, 237, 237)


def test_xenium_alignment_with_nuclei(xenium):
    df = xenium["transcripts"].compute()
    nuclei = xenium["nucleus_boundaries"]
    inside = _inside(df["x"].to_numpy(), df["y"].to_numpy(), nuclei)
    assert inside[df["overlaps_nucleus"] == 1].mean() > 0.85
    assert inside[df["overlaps_nucleus"] == 0].mean() < 0.05
    image, grid = _stain(xenium, "morphology_focus")
    centroids = nuclei.geometry.centroid
    on_nuclei = _pixel_values(image, grid, centroids.x.to_numpy(), centroids.y.to_numpy())
    rng = np.random.default_rng(0)
    background = image[rng.integers(0, grid.height, 2000), rng.integers(0, grid.width, 2000)]
    flipped = _pixel_values(image[::-1], grid, centroids.x.to_numpy(), centroids.y.to_numpy())
    assert on_nuclei.mean() > 1.5 * background.mean()
    assert on_nuclei.mean() > 1.5 * flipped.mean()


# ------------------------------------------------------------------------------------------------- MERSCOPE


def test_merscope_molecules_lose_nothing(merscope, shared_data):
    raw = pd.read_csv(shared_data / MERSCOPE / "detected_transcripts.csv")
    df = merscope["transcripts"].compute()
    assert len(df) == len(raw) == 11135
    assert merscope["transcripts"].attrs["spatialdata_attrs"]["feature_key"] == "gene"
    assert int(df["is_control"].sum()) == int(raw["gene"].str.match(MERSCOPE_CONTROLS).sum()) == 209
    assert df["qv"].isna().all()
    np.testing.assert_allclose(df["x"].to_numpy(), raw["global_x"].to_numpy())
    np.testing.assert_allclose(df["y"].to_numpy(), raw["global_y"].to_numpy())
    np.testing.assert_allclose(df["x_local_px"].to_numpy(), raw["x"].to_numpy())
    assert (df["gene"].astype(str).to_numpy() == raw["gene"].to_numpy()).all()
    assert {"global_z", "fov", "barcode_id", "transcript_id"} <= set(df.columns)


def test_merscope_image_trusts_bbox(merscope, shared_data):
    manifest = json.loads((shared_data / MERSCOPE / "images" / "manifest.json").read_text())
    x0, y0, x1, y1 = manifest["bbox_microns"]
    grid = Grid.from_element(merscope["dapi"])
    assert grid.shape == (695, 695)
    assert grid.pixel_size == pytest.approx((x1 - x0) / 695, rel=1e-4)  # about 0.432, not the manifest's 0.108
    assert (grid.x0, grid.y0) == pytest.approx((x0, y0))
    source = merscope.attrs["st2he"]["source"]
    assert source["platform"] == "merscope"
    assert source["native_pixel_size"] == pytest.approx(0.108)
    assert source["nuclear_stain"] == "dapi"
    assert any("bbox_microns" in note for note in source["assumptions"])
    assert merscope["table"].n_obs == 1058
    assert merscope["table"].uns["spatialdata_attrs"]["region"] == "cell_boundaries"
    assert len(merscope["cell_boundaries"]) == 1058


def test_merscope_alignment_with_dapi(merscope):
    # the crop holds a dark hole in the tissue (about 5 % of the DAPI mosaic): molecules avoid it
    df = merscope["transcripts"].compute()
    image, grid = _stain(merscope, "dapi")
    dark = image < 40
    assert 0.02 < dark.mean() < 0.2
    x, y = df["x"].to_numpy(), df["y"].to_numpy()
    on_dark = _pixel_values(dark, grid, x, y).mean()
    assert on_dark < 0.01
    assert _pixel_values(dark[::-1], grid, x, y).mean() > 3 * on_dark
    assert _pixel_values(dark[:, ::-1], grid, x, y).mean() > 3 * on_dark


def test_merscope_stains_and_z(shared_data):
    sdata = _read(st2he.io.read_merscope, shared_data / MERSCOPE, stains="all", z_layers="max")
    assert {"dapi", "polyt", "cellbound1", "cellbound2", "cellbound3"} <= set(sdata.images)
    planes = _read(st2he.io.read_merscope, shared_data / MERSCOPE, z_layers=[1, 2])
    assert {"dapi_z1", "dapi_z2"} <= set(planes.images)
    with pytest.raises(ValueError, match="z plane"):
        _read(st2he.io.read_merscope, shared_data / MERSCOPE, z_layers=6)


# ---------------------------------------------------------------------------------------------------- CosMx


def test_cosmx_molecules_lose_nothing(cosmx, shared_data):
    raw = pd.read_csv(shared_data / COSMX / f"{COSMX_ID}_tx_file.csv")
    df = cosmx["transcripts"].compute()
    assert len(df) == len(raw) == 4188
    assert cosmx["transcripts"].attrs["spatialdata_attrs"]["feature_key"] == "gene"
    assert int(df["is_control"].sum()) == int(raw["target"].str.match(COSMX_CONTROLS).sum())
    assert df["qv"].isna().all()
    np.testing.assert_allclose(df["x"].to_numpy(), raw["x_global_px"].to_numpy() * 0.12028)
    np.testing.assert_allclose(df["y"].to_numpy(), raw["y_global_px"].to_numpy() * 0.12028)
    np.testing.assert_array_equal(df["z_index"].to_numpy(), raw["z"].to_numpy())
    assert {"fov", "cell_ID", "x_global_px", "x_local_px", "CellComp"} <= set(df.columns)
    source = cosmx.attrs["st2he"]["source"]
    assert source["platform"] == "cosmx"
    assert source["native_pixel_size"] == pytest.approx(0.12028)
    assert source["nuclear_stain"] is None


def test_cosmx_pixel_size_parameter(shared_data):
    sdata = _read(st2he.io.read_cosmx, shared_data / COSMX, pixel_size=0.18)
    raw = pd.read_csv(shared_data / COSMX / f"{COSMX_ID}_tx_file.csv")
    np.testing.assert_allclose(sdata["transcripts"]["x"].compute().to_numpy(), raw["x_global_px"].to_numpy() * 0.18)
    assert sdata.attrs["st2he"]["source"]["native_pixel_size"] == 0.18
    with pytest.raises(ValueError, match="pixel_size"):
        st2he.io.read_cosmx(shared_data / COSMX, pixel_size=0)


def test_cosmx_molecules_fall_in_their_cells(cosmx):
    df = cosmx["transcripts"].compute()
    cells = cosmx["cell_boundaries"]
    key = df["cell_ID"].astype(str) + "_" + df["fov"].astype(str)
    assigned = df[key.isin(cells.index)]
    assert len(assigned) > 1000
    polygons = shapely.buffer(cells.geometry.loc[key[key.isin(cells.index)]].to_numpy(), 0.5)
    assert shapely.contains(polygons, shapely.points(assigned["x"], assigned["y"])).mean() > 0.98
    # the same with y flipped puts most molecules outside their cell: the axes are consistent
    y_flip = cells.total_bounds[1] + cells.total_bounds[3] - assigned["y"].to_numpy()
    assert shapely.contains(polygons, shapely.points(assigned["x"], y_flip)).mean() < 0.6
    table = cosmx["table"]
    assert table.n_obs == 27
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "cell_boundaries"
    assert set(table.obs[attrs["instance_key"]]) == set(cells.index)
    assert table.var["is_control"].sum() == table.var_names.str.match(COSMX_CONTROLS).sum()


# ------------------------------------------------------------------------------------ full output folders


def _full_xenium(src: Path, dst: Path, shift: float = 1000.0) -> Path:
    """The crop as a full output folder: shifted so the image starts at (0, 0), plus the metadata files."""
    import zarr

    dst.mkdir()
    for name in ("morphology_focus.ome.tif", "morphology_mip.ome.tif", "cell_feature_matrix.h5"):
        shutil.copy(src / name, dst / name)
    for name, cols in (
        ("transcripts", ("x_location", "y_location")),
        ("cell_boundaries", ("vertex_x", "vertex_y")),
        ("nucleus_boundaries", ("vertex_x", "vertex_y")),
        ("cells", ("x_centroid", "y_centroid")),
    ):
        table = pd.read_parquet(src / f"{name}.parquet")
        for col in cols:
            table[col] -= shift
        table.to_parquet(dst / f"{name}.parquet")
    specs = {"pixel_size": 400 / 237, "analysis_sw_version": "xenium-1.0.2"}
    (dst / "experiment.xenium").write_text(json.dumps(specs))
    store = zarr.storage.ZipStore(dst / "cells.zarr.zip", mode="w")
    zarr.group(store=store)
    store.close()
    return dst


def test_xenium_full_folder_through_spatialdata_io(shared_data, tmp_path):
    folder = _full_xenium(shared_data / XENIUM, tmp_path / "xenium")
    sdata = _read(st2he.io.read_xenium, folder)
    source = sdata.attrs["st2he"]["source"]
    assert source["reader"] == "spatialdata_io.xenium"
    assert source["native_pixel_size"] == pytest.approx(400 / 237)
    assert Grid.from_element(sdata["morphology_focus"]) == Grid(0.0, 0.0, 400 / 237, 237, 237)
    df = sdata["transcripts"].compute()
    assert len(df) == 5260 and int(df["is_control"].sum()) == 3
    assert sdata["table"].n_obs == 526
    assert sdata["table"].uns["spatialdata_attrs"]["region"] == "cell_boundaries"
    nuclei = sdata["nucleus_boundaries"]
    assert nuclei.total_bounds[0] < 10  # µm, shifted; spatialdata-io's own frame would be pixels
    image, grid = _stain(sdata, "morphology_focus")
    centroids = nuclei.geometry.centroid
    on_nuclei = _pixel_values(image, grid, centroids.x.to_numpy(), centroids.y.to_numpy())
    assert on_nuclei.mean() > 1.5 * image.mean()
    with pytest.raises(FileNotFoundError, match="use_spatialdata_io"):
        st2he.io.read_xenium(shared_data / XENIUM, use_spatialdata_io=True)


def test_merscope_full_folder_through_spatialdata_io(shared_data, tmp_path):
    import geopandas as gpd

    folder = tmp_path / "merscope"
    shutil.copytree(shared_data / MERSCOPE, folder)
    manifest = json.loads((folder / "images" / "manifest.json").read_text())
    x0, y0, x1, y1 = manifest["bbox_microns"]
    scale = 695 / (x1 - x0)
    matrix = np.array([[scale, 0, -x0 * scale], [0, scale, -y0 * scale], [0, 0, 1]])
    np.savetxt(folder / "images" / "micron_to_mosaic_pixel_transform.csv", matrix)
    # instrument output: a GeoParquet of MultiPolygons per z plane, named Geometry
    raw = pd.read_parquet(folder / "cell_boundaries.parquet")
    geoms = [shapely.MultiPolygon([p]) for p in shapely.from_wkb(raw.pop("Geometry").to_numpy())]
    frame = gpd.GeoDataFrame(raw.assign(ZIndex=0), geometry=geoms).rename_geometry("Geometry")
    frame.to_parquet(folder / "cell_boundaries.parquet")
    sdata = _read(st2he.io.read_merscope, folder)
    source = sdata.attrs["st2he"]["source"]
    assert source["reader"] == "spatialdata_io.merscope"
    assert source["assumptions"] == []
    grid = Grid.from_element(sdata["dapi"])
    assert grid.pixel_size == pytest.approx(1 / scale)
    assert (grid.x0, grid.y0) == pytest.approx((x0, y0))
    assert len(sdata["cell_boundaries"]) == 1058
    bounds = sdata["cell_boundaries"].total_bounds
    assert bounds[0] == pytest.approx(6500, abs=1) and bounds[3] == pytest.approx(1500, abs=1)  # µm, not pixels
    table = sdata["table"]
    assert table.n_obs == 1058
    assert table.uns["spatialdata_attrs"]["region"] == "cell_boundaries"
    assert set(table.obs["EntityID"]) == set(sdata["cell_boundaries"].index)
    assert len(sdata["transcripts"].compute()) == 11135


def test_cosmx_full_folder_through_spatialdata_io(shared_data, tmp_path):
    import tifffile
    from PIL import Image

    folder = tmp_path / "cosmx"
    shutil.copytree(shared_data / COSMX, folder)
    fov = pd.DataFrame({"fov": [1], "x_global_px": [171400.0], "y_global_px": [11341.666667]})
    fov.to_csv(folder / f"{COSMX_ID}_fov_positions_file.csv", index=False)
    (folder / "CellComposite").mkdir()
    (folder / "CellLabels").mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "CellComposite" / "CellComposite_F001.jpg")
    tifffile.imwrite(folder / "CellLabels" / "CellLabels_F001.tif", np.zeros((64, 64), np.uint32))
    sdata = _read(st2he.io.read_cosmx, folder, use_spatialdata_io=True)  # st2he stitches them by default
    assert sdata.attrs["st2he"]["source"]["reader"] == "spatialdata_io.cosmx"
    assert "1_image" in sdata.images and "1_labels" in sdata.labels
    grid = Grid.from_element(sdata["1_image"])
    # the FOV's corner (local pixel 0, 0) lands at its global pixel position x 0.12028 µm
    assert grid.pixel_size == pytest.approx(0.12028, rel=1e-6)
    assert grid.x0 == pytest.approx(171400 * 0.12028, abs=0.05)
    assert grid.y0 == pytest.approx(11341.666667 * 0.12028, abs=0.05)
    assert len(sdata["transcripts"].compute()) == 4188
    assert sdata["table"].uns["spatialdata_attrs"]["region"] == "cell_boundaries"


# ---------------------------------------------------------------------------------------------- bad input

READERS = {
    "xenium": (st2he.io.read_xenium, XENIUM, "transcripts.parquet"),
    "merscope": (st2he.io.read_merscope, MERSCOPE, "detected_transcripts.csv"),
    "cosmx": (st2he.io.read_cosmx, COSMX, f"{COSMX_ID}_tx_file.csv"),
}


@pytest.mark.parametrize("platform", list(READERS))
def test_missing_path(platform, tmp_path):
    reader = READERS[platform][0]
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        reader(missing)


@pytest.mark.parametrize("platform", list(READERS))
def test_folder_without_transcripts(platform, tmp_path):
    reader = READERS[platform][0]
    with pytest.raises(FileNotFoundError, match="transcripts") as info:
        reader(tmp_path)
    assert str(tmp_path) in str(info.value)
    file = tmp_path / "x.txt"
    file.write_text("")
    with pytest.raises(NotADirectoryError, match="folder"):
        reader(file)


@pytest.mark.parametrize("platform", list(READERS))
def test_corrupt_transcripts(platform, shared_data, tmp_path):
    reader, crop, name = READERS[platform]
    folder = tmp_path / crop
    folder.mkdir()
    data = (shared_data / crop / name).read_bytes()
    if name.endswith(".parquet"):
        (folder / name).write_bytes(data[: len(data) // 3])  # truncated: no footer
    else:
        (folder / name).write_bytes(b"\x00\xff\x13garbage\x00" * 50)
    with pytest.raises(ValueError, match=re.escape(name)):
        _read(reader, folder)


@pytest.mark.parametrize("platform", list(READERS))
def test_transcripts_missing_columns(platform, shared_data, tmp_path):
    reader, crop, name = READERS[platform]
    folder = tmp_path / crop
    folder.mkdir()
    source = shared_data / crop / name
    raw = pd.read_parquet(source) if name.endswith(".parquet") else pd.read_csv(source)
    raw = raw.drop(columns=[c for c in ("x_location", "global_x", "x_global_px") if c in raw.columns])
    if name.endswith(".parquet"):
        raw.to_parquet(folder / name)
    else:
        raw.to_csv(folder / name, index=False)
    with pytest.raises(ValueError, match=r"lacks the column") as info:
        _read(reader, folder)
    assert name in str(info.value)


def test_corrupt_cell_table(shared_data, tmp_path):
    folder = tmp_path / XENIUM
    shutil.copytree(shared_data / XENIUM, folder)
    (folder / "cell_feature_matrix.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="cell_feature_matrix.h5"):
        _read(st2he.io.read_xenium, folder)


# ------------------------------------------------------------------------------------------------ zarr store


def test_zarr_round_trip_keeps_molecules_and_attrs(xenium, tmp_path):
    from spatialdata import read_zarr

    store = tmp_path / "xenium.zarr"
    xenium.write(store)
    back = read_zarr(store)
    assert len(back["transcripts"].compute()) == 5260
    assert int(back["transcripts"]["is_control"].sum().compute()) == 3
    assert back["transcripts"].attrs["spatialdata_attrs"]["feature_key"] == "gene"
    assert back.attrs["st2he"]["source"] == xenium.attrs["st2he"]["source"]
    assert Grid.from_element(back["morphology_focus"]) == Grid.from_element(xenium["morphology_focus"])
    assert back["table"].n_obs == 526
    assert len(back["cell_boundaries"]) == 526
