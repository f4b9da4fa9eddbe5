"""read_visium and read_hest on tiny folders in the real formats (Space Ranger, HEST-1k), built here."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import st2he

GENES = ["GAPDH", "EPCAM", "PTPRC", "COL1A1", "KRT19"]


# ------------------------------------------------------------------------------------------------- builders


def _write_10x_h5(file: Path, barcodes: list[str], genes: list[str], counts: np.ndarray) -> None:
    """A feature-barcode matrix in the 10x HDF5 layout (CSC over barcodes) as Space Ranger writes it."""
    file.parent.mkdir(parents=True, exist_ok=True)
    csc = sparse.csc_matrix(counts.T.astype(np.int32))  # genes x barcodes
    with h5py.File(file, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["library_ids"] = np.array([b"sample"])
        f.attrs["chemistry_description"] = "Visium V2 Slide"
        f.attrs["software_version"] = "spaceranger-3.0.0"
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        m.create_dataset("data", data=csc.data.astype(np.int32))
        m.create_dataset("indices", data=csc.indices.astype(np.int64))
        m.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
        feats = m.create_group("features")
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        feats.create_dataset("id", data=np.array([f"ENSG{i:011d}" for i in range(len(genes))], dtype="S"))
        feats.create_dataset("name", data=np.array(genes, dtype="S"))
        feats.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(genes)))
        feats.create_dataset("genome", data=np.array([b"GRCh38"] * len(genes)))


def _he_crop(shared_data: Path, height: int, width: int) -> np.ndarray:
    import tifffile

    slide = tifffile.imread(shared_data / "he_cmu1_small_region.svs")
    return np.ascontiguousarray(slide[200 : 200 + height, 300 : 300 + width, :3])


def _png(file: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(file)


def _downscale(rgb: np.ndarray, factor: float) -> np.ndarray:
    from PIL import Image

    h, w = rgb.shape[:2]
    return np.asarray(Image.fromarray(rgb).resize((round(w * factor), round(h * factor)), Image.BILINEAR))


VISIUM_UM_PER_PX = 0.5  # spot_diameter_fullres = 110 px
VISIUM_HIRES = 0.25
VISIUM_LOWRES = 0.05


def _visium_spots():
    """Eight spots of a Visium hexagonal array (odd rows shifted), two of them outside the tissue."""
    rows, cols, barcodes = [], [], []
    for r in range(2):
        for k in range(4):
            c = 2 * k + (r % 2)
            rows.append(r)
            cols.append(c)
            barcodes.append(f"{'ACGT'[r]}{'ACGT'[k]}AACGTTGCAACG-1")
    rows, cols = np.array(rows), np.array(cols)
    # pixel centres on a slightly rotated, fractional lattice as Space Ranger's registration gives them
    pxl_col = 150.0 + cols * 100.0 + rows * 0.7
    pxl_row = 160.0 + rows * 173.2 - cols * 0.3
    in_tissue = np.array([1, 1, 1, 0, 1, 1, 0, 1])
    return barcodes, rows, cols, pxl_row, pxl_col, in_tissue


@pytest.fixture(scope="module")
def visium_dir(tmp_path_factory, shared_data) -> Path:
    """A Space Ranger 3 Visium folder: matrix, spatial/ (positions, scale factors, hires, lowres), the microscope image."""
    root = tmp_path_factory.mktemp("visium") / "outs"
    barcodes, rows, cols, pxl_row, pxl_col, in_tissue = _visium_spots()
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(len(barcodes), len(GENES)))
    counts[0] = [0, 7, 0, 1, 12]
    keep = in_tissue.astype(bool)  # the filtered matrix holds the spots under tissue
    _write_10x_h5(
        root / "filtered_feature_bc_matrix.h5",
        [b for b, k in zip(barcodes, keep, strict=True) if k],
        GENES,
        counts[keep],
    )
    spatial = root / "spatial"
    spatial.mkdir(parents=True)
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": in_tissue,
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": pxl_row,
            "pxl_col_in_fullres": pxl_col,
        }
    ).to_csv(spatial / "tissue_positions.csv", index=False)
    factors = {
        "tissue_hires_scalef": VISIUM_HIRES,
        "tissue_lowres_scalef": VISIUM_LOWRES,
        "fiducial_diameter_fullres": 164.99999,
        "spot_diameter_fullres": 55.0 / VISIUM_UM_PER_PX,
        "regist_target_img_scalef": VISIUM_HIRES,
    }
    (spatial / "scalefactors_json.json").write_text(json.dumps(factors))
    full = _he_crop(shared_data, 520, 960)
    _png(spatial / "tissue_hires_image.png", _downscale(full, VISIUM_HIRES))
    _png(spatial / "tissue_lowres_image.png", _downscale(full, VISIUM_LOWRES))
    import tifffile

    tifffile.imwrite(root / "sample_tissue_image.tif", full, photometric="rgb", tile=(256, 256))
    np.save(root.parent / "full.npy", full)
    np.save(root.parent / "counts.npy", counts[keep])
    return root


def _read(reader, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reader(*args, **kwargs)


def _pixel(sdata, x0: float, y0: float, size: float) -> np.ndarray:
    """The he_image's RGB over the square [x0, x0 + size) x [y0, y0 + size) µm, read at ``size`` µm per pixel."""
    raster = st2he.io.Raster(sdata.images["he_image"])
    return raster.read_region((x0, y0, x0 + size, y0 + size), pixel_size=size)[:, 0, 0]


# ----------------------------------------------------------------------------------------------------- Visium


@pytest.mark.parametrize("use_spatialdata_io", [True, False])
def test_visium_spots_table_and_image_in_um(visium_dir, use_spatialdata_io):
    sdata = _read(st2he.io.read_visium, visium_dir, use_spatialdata_io=use_spatialdata_io)
    barcodes, rows, cols, pxl_row, pxl_col, in_tissue = _visium_spots()
    keep = in_tissue.astype(bool)
    counts = np.load(visium_dir.parent / "counts.npy")
    source = sdata.attrs["st2he"]["source"]
    assert source["reader"] == ("spatialdata_io.visium" if use_spatialdata_io else "st2he (files)")
    assert source["microns_per_pixel"] == pytest.approx(VISIUM_UM_PER_PX)

    table = sdata.tables["table"]
    ids = [b for b, k in zip(barcodes, keep, strict=True) if k]
    assert list(table.obs_names) == ids
    assert sparse.isspmatrix_csr(table.X) and table.X.dtype == np.float32
    np.testing.assert_array_equal(table.X.toarray(), counts)
    assert list(table.var_names) == GENES
    np.testing.assert_array_equal(table.obs["total_counts"].to_numpy(), counts.sum(axis=1))
    np.testing.assert_array_equal(table.obs["array_row"].to_numpy(), rows[keep])
    np.testing.assert_array_equal(table.obs["array_col"].to_numpy(), cols[keep])
    assert table.obs["in_tissue"].dtype == bool and table.obs["in_tissue"].all()
    expected = np.column_stack([pxl_col[keep], pxl_row[keep]]) * VISIUM_UM_PER_PX
    np.testing.assert_allclose(table.obsm["spatial"], expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(table.obs["area_um2"], np.pi * 27.5**2)

    from spatialdata.models import get_table_keys

    region, region_key, instance_key = get_table_keys(table)
    assert region == "spots"
    spots = sdata.shapes["spots"]
    assert list(spots.index) == list(table.obs[instance_key])
    np.testing.assert_allclose(spots["radius"], 27.5)
    np.testing.assert_allclose(np.column_stack([spots.geometry.x, spots.geometry.y]), expected, atol=1e-9)
    from spatialdata.transformations import get_transformation

    assert set(get_transformation(spots, get_all=True)) == {"global"}

    # the full-resolution image: pixel (row, col) covers [col, col + 1) x [row, row + 1) pixels of 0.5 µm
    full = np.load(visium_dir.parent / "full.npy")
    assert source["image"]["kind"] == "full" and source["image"]["file"].endswith("sample_tissue_image.tif")
    for row, col in [(0, 0), (173, 411), (519, 959), (int(pxl_row[4]), int(pxl_col[4]))]:
        got = _pixel(sdata, col * VISIUM_UM_PER_PX, row * VISIUM_UM_PER_PX, VISIUM_UM_PER_PX)
        np.testing.assert_allclose(got, full[row, col], atol=1e-3)
    x0, y0, x1, y1 = st2he.io.Raster(sdata.images["he_image"]).bounds
    assert (x0, y0, x1, y1) == pytest.approx((0, 0, 960 * VISIUM_UM_PER_PX, 520 * VISIUM_UM_PER_PX))


def test_visium_partial_folder_hires_and_lowres(visium_dir, tmp_path):
    """Without the microscope image (and through the files alone) he_image is the hires, then the lowres PNG."""
    import shutil

    part = tmp_path / "outs"
    shutil.copytree(visium_dir, part, ignore=shutil.ignore_patterns("*tissue_image.tif"))
    sdata = _read(st2he.io.read_visium, part)
    source = sdata.attrs["st2he"]["source"]
    assert source["image"]["kind"] == "hires"
    assert source["image"]["pixel_size"] == pytest.approx(VISIUM_UM_PER_PX / VISIUM_HIRES)
    assert "hires" in " ".join(source["assumptions"])
    from PIL import Image

    hires = np.asarray(Image.open(part / "spatial" / "tissue_hires_image.png"))
    size = VISIUM_UM_PER_PX / VISIUM_HIRES  # 2 µm per hires pixel
    for row, col in [(0, 0), (40, 100), (129, 239)]:
        np.testing.assert_allclose(_pixel(sdata, col * size, row * size, size), hires[row, col], atol=1e-3)
    np.testing.assert_allclose(sdata.shapes["spots"]["radius"], 27.5)

    lowres = _read(st2he.io.read_visium, part, image="lowres")
    assert lowres.attrs["st2he"]["source"]["image"]["pixel_size"] == pytest.approx(10.0)
    assert st2he.io.Raster(lowres.images["he_image"]).bounds == pytest.approx((0, 0, 480, 260))

    (part / "spatial" / "tissue_hires_image.png").unlink()
    (part / "spatial" / "tissue_lowres_image.png").unlink()
    with pytest.warns(UserWarning, match="no H&E image"):
        bare = st2he.io.read_visium(part, use_spatialdata_io=False)
    assert "he_image" not in bare.images and bare.tables["table"].n_obs == 6
    with pytest.raises(FileNotFoundError, match="tissue_hires_image.png"):
        st2he.io.read_visium(part, image="hires")
    none = _read(st2he.io.read_visium, part, image=None)
    assert "he_image" not in none.images


def test_visium_fullres_image_file_and_old_positions(visium_dir, tmp_path):
    """Space Ranger 1 positions (no header), a prefixed matrix and a microscope image passed by path."""
    import shutil

    part = tmp_path / "outs"
    shutil.copytree(visium_dir, part, ignore=shutil.ignore_patterns("*tissue_image.tif"))
    (part / "filtered_feature_bc_matrix.h5").rename(part / "S1_filtered_feature_bc_matrix.h5")
    positions = pd.read_csv(part / "spatial" / "tissue_positions.csv")
    positions.to_csv(part / "spatial" / "tissue_positions_list.csv", index=False, header=False)
    (part / "spatial" / "tissue_positions.csv").unlink()
    image = tmp_path / "elsewhere" / "slide.tif"
    image.parent.mkdir()
    shutil.copy(visium_dir / "sample_tissue_image.tif", image)
    for use in (True, False):
        sdata = _read(st2he.io.read_visium, part, fullres_image_file=image, use_spatialdata_io=use)
        assert sdata.attrs["st2he"]["source"]["image"]["kind"] == "full"
        table = sdata.tables["table"]
        expected = positions.set_index("barcode").loc[table.obs_names]
        np.testing.assert_allclose(
            table.obsm["spatial"], expected[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy() * 0.5
        )
        np.testing.assert_array_equal(table.X.toarray(), np.load(visium_dir.parent / "counts.npy"))


def test_visium_bad_input(visium_dir, tmp_path, shared_data):
    import shutil

    with pytest.raises(FileNotFoundError, match="does not exist"):
        st2he.io.read_visium(tmp_path / "nowhere")
    no_matrix = tmp_path / "no_matrix"
    shutil.copytree(visium_dir, no_matrix)
    (no_matrix / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(FileNotFoundError, match="filtered_feature_bc_matrix.h5"):
        st2he.io.read_visium(no_matrix)
    no_factors = tmp_path / "no_factors"
    shutil.copytree(visium_dir, no_factors)
    (no_factors / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(FileNotFoundError, match="scalefactors_json.json"):
        st2he.io.read_visium(no_factors)
    no_positions = tmp_path / "no_positions"
    shutil.copytree(visium_dir, no_positions)
    (no_positions / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(FileNotFoundError, match="tissue_positions"):
        st2he.io.read_visium(no_positions)
    bad_factors = tmp_path / "bad_factors"
    shutil.copytree(visium_dir, bad_factors)
    (bad_factors / "spatial" / "scalefactors_json.json").write_text(json.dumps({"tissue_hires_scalef": 0.25}))
    with pytest.raises(ValueError, match="spot_diameter_fullres"):
        st2he.io.read_visium(bad_factors)
    with pytest.raises(ValueError, match="image must be one of"):
        st2he.io.read_visium(visium_dir, image="medium")
    with pytest.raises(FileNotFoundError, match="fullres_image_file"):
        st2he.io.read_visium(visium_dir, fullres_image_file="missing.tif")
    tile = shared_data / "he_tcga_tiles" / "TCGA-3X-AAVA-01Z-00-DX1" / "0_0_0_506.jpg"  # 128 µm: 1 of the 6 spots
    with pytest.warns(UserWarning, match=r"spans x 0-128, y 0-128 µm but only 17% of the spot or bin centres"):
        st2he.io.read_visium(visium_dir, fullres_image_file=tile)
    stray = tmp_path / "stray"
    shutil.copytree(visium_dir, stray)
    positions = pd.read_csv(stray / "spatial" / "tissue_positions.csv")
    positions.iloc[1:].to_csv(stray / "spatial" / "tissue_positions.csv", index=False)
    for use in (True, False):
        with pytest.raises(ValueError, match="position"):
            _read(st2he.io.read_visium, stray, use_spatialdata_io=use)


# -------------------------------------------------------------------------------------------------- Visium HD

HD_UM_PER_PX = 0.25
HD_HIRES = 0.1


def _hd_bins(size: int):
    """Bins of ``size`` µm over a 96 x 64 µm area, the last one outside the tissue."""
    n_rows, n_cols = 64 // size, 96 // size
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    barcodes = [f"s_{size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
    side_px = size / HD_UM_PER_PX
    pxl_col = 40.5 + side_px * (cols + 0.5)
    pxl_row = 60.25 + side_px * (rows + 0.5)
    in_tissue = np.ones(len(rows), dtype=np.int32)
    in_tissue[-1] = 0
    return barcodes, rows, cols, pxl_row, pxl_col, in_tissue


def _hd_factors(bin_size: float) -> dict:
    return {
        "spot_diameter_fullres": bin_size / HD_UM_PER_PX,
        "bin_size_um": float(bin_size),
        "microns_per_pixel": HD_UM_PER_PX,
        "tissue_lowres_scalef": 0.01,
        "fiducial_diameter_fullres": 1000.0,
        "tissue_hires_scalef": HD_HIRES,
        "regist_target_img_scalef": HD_HIRES,
    }


@pytest.fixture(scope="module")
def hd_dir(tmp_path_factory, shared_data) -> Path:
    """A Space Ranger 3 Visium HD folder: feature_slice.h5, spatial/, binned_outputs/square_008um and square_016um."""
    import tifffile

    root = tmp_path_factory.mktemp("visium_hd") / "outs"
    rng = np.random.default_rng(1)
    for size in (8, 16):
        barcodes, rows, cols, pxl_row, pxl_col, in_tissue = _hd_bins(size)
        counts = rng.poisson(1.0, size=(len(barcodes), len(GENES)))
        bin_dir = root / "binned_outputs" / f"square_{size:03d}um"
        keep = in_tissue.astype(bool)
        _write_10x_h5(
            bin_dir / "filtered_feature_bc_matrix.h5",
            [b for b, k in zip(barcodes, keep, strict=True) if k],
            GENES,
            counts[keep],
        )
        np.save(root.parent / f"counts_{size}.npy", counts[keep])
        (bin_dir / "spatial").mkdir(parents=True)
        pd.DataFrame(
            {
                "barcode": barcodes,
                "in_tissue": in_tissue,
                "array_row": rows,
                "array_col": cols,
                "pxl_row_in_fullres": pxl_row,
                "pxl_col_in_fullres": pxl_col,
            }
        ).to_parquet(bin_dir / "spatial" / "tissue_positions.parquet", index=False)
        (bin_dir / "spatial" / "scalefactors_json.json").write_text(json.dumps(_hd_factors(size)))
    (root / "spatial").mkdir()
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(_hd_factors(2)))
    full = _he_crop(shared_data, 400, 480)  # 120 x 100 µm
    _png(root / "spatial" / "tissue_hires_image.png", _downscale(full, HD_HIRES))
    tifffile.imwrite(root / "sample_tissue_image.btf", full, photometric="rgb", tile=(128, 128), bigtiff=True)
    np.save(root.parent / "full.npy", full)
    with h5py.File(root / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps({"file_format": "1.0"})})
    return root


@pytest.mark.parametrize("use_spatialdata_io", [True, False])
def test_visium_hd_bins_in_um(hd_dir, use_spatialdata_io):
    sdata = _read(st2he.io.read_visium, hd_dir, use_spatialdata_io=use_spatialdata_io)
    source = sdata.attrs["st2he"]["source"]
    assert source["platform"] == "visium_hd" and source["bin_size"] == 8
    assert source["reader"] == ("spatialdata_io.visium_hd" if use_spatialdata_io else "st2he (files)")
    barcodes, rows, cols, pxl_row, pxl_col, in_tissue = _hd_bins(8)
    keep = in_tissue.astype(bool)
    table = sdata.tables["table"]
    assert list(table.obs_names) == [b for b, k in zip(barcodes, keep, strict=True) if k]
    np.testing.assert_array_equal(table.X.toarray(), np.load(hd_dir.parent / "counts_8.npy"))
    np.testing.assert_array_equal(table.obs["array_row"], rows[keep])
    np.testing.assert_array_equal(table.obs["array_col"], cols[keep])
    np.testing.assert_allclose(table.obs["area_um2"], 64.0)
    centres = np.column_stack([pxl_col[keep], pxl_row[keep]]) * HD_UM_PER_PX
    np.testing.assert_allclose(table.obsm["spatial"], centres, atol=1e-9)
    # 8 µm squares: the first one spans x 10.125-18.125, y 15.0625-23.0625 µm
    bins = sdata.shapes["bins_8um"]
    assert list(bins.index) == list(table.obs["instance_id"])
    bounds = bins.geometry.bounds.to_numpy()
    np.testing.assert_allclose(bounds, np.column_stack([centres - 4.0, centres + 4.0]), atol=1e-9)
    np.testing.assert_allclose(bins.geometry.area, 64.0)
    assert bounds[0] == pytest.approx([10.125, 15.0625, 18.125, 23.0625])

    full = np.load(hd_dir.parent / "full.npy")
    assert source["image"]["kind"] == "full" and source["image"]["file"].endswith(".btf")
    for row, col in [(0, 0), (123, 321), (399, 479)]:
        got = _pixel(sdata, col * HD_UM_PER_PX, row * HD_UM_PER_PX, HD_UM_PER_PX)
        np.testing.assert_allclose(got, full[row, col], atol=1e-3)


def test_visium_hd_bin_sizes_and_partial_folders(hd_dir, tmp_path):
    import shutil

    sixteen = _read(st2he.io.read_visium, hd_dir, bin_size=16, image="hires")
    table = sixteen.tables["table"]
    _, rows, cols, pxl_row, pxl_col, in_tissue = _hd_bins(16)
    keep = in_tissue.astype(bool)
    np.testing.assert_allclose(table.obsm["spatial"], np.column_stack([pxl_col[keep], pxl_row[keep]]) * 0.25)
    np.testing.assert_allclose(sixteen.shapes["bins_16um"].geometry.area, 256.0)
    np.testing.assert_array_equal(table.X.toarray(), np.load(hd_dir.parent / "counts_16.npy"))
    assert sixteen.attrs["st2he"]["source"]["image"]["pixel_size"] == pytest.approx(HD_UM_PER_PX / HD_HIRES)
    with pytest.raises(FileNotFoundError, match=r"No 2 µm bins.*\[8, 16\]"):
        st2he.io.read_visium(hd_dir, bin_size=2)

    # one bin folder copied on its own, no feature_slice.h5, no image: read file by file
    alone = tmp_path / "square_008um"
    shutil.copytree(hd_dir / "binned_outputs" / "square_008um", alone)
    with pytest.warns(UserWarning, match="no H&E image"):
        sdata = st2he.io.read_visium(alone)
    assert sdata.attrs["st2he"]["source"]["reader"] == "st2he (files)"
    _, rows, cols, pxl_row, pxl_col, in_tissue = _hd_bins(8)
    keep = in_tissue.astype(bool)
    np.testing.assert_allclose(sdata.tables["table"].obsm["spatial"], np.column_stack([pxl_col, pxl_row])[keep] * 0.25)
    with pytest.raises(FileNotFoundError, match="feature_slice.h5"):
        st2he.io.read_visium(alone, use_spatialdata_io=True)
    (alone / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"square_008um/spatial/scalefactors_json.json"):
        st2he.io.read_visium(alone)

    # Space Ranger 4 also segments cells; spatialdata-io would load them, so the bins are read file by file
    segmented = tmp_path / "segmented"
    shutil.copytree(hd_dir, segmented)
    (segmented / "segmented_outputs").mkdir()
    (segmented / "segmented_outputs" / "cell_segmentations.geojson").write_text("not read")
    sdata = _read(st2he.io.read_visium, segmented, image=None)
    assert sdata.attrs["st2he"]["source"]["reader"] == "st2he (files)"
    np.testing.assert_array_equal(sdata.tables["table"].X.toarray(), np.load(hd_dir.parent / "counts_8.npy"))

    missing = tmp_path / "outs"
    shutil.copytree(hd_dir, missing)
    (missing / "binned_outputs" / "square_008um" / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"square_008um/filtered_feature_bc_matrix.h5"):
        st2he.io.read_visium(missing)
    (missing / "binned_outputs" / "square_016um" / "spatial" / "tissue_positions.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"square_016um/spatial/tissue_positions.parquet"):
        st2he.io.read_visium(missing, bin_size=16)


# ------------------------------------------------------------------------------------------------------- HEST

HEST_PX = 0.4994  # pixel_size_um_estimated
HEST_ID = "TENX999"


def _write_pyramid(file: Path, rgb: np.ndarray) -> None:
    """A tiled pyramidal TIFF (full resolution + 2 halvings as sub-IFDs), as HEST-1k ships its WSIs."""
    import tifffile

    file.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(file) as tif:
        tif.write(rgb, photometric="rgb", tile=(128, 128), subifds=2)
        level = rgb
        for _ in range(2):
            level = level[::2, ::2]
            tif.write(level, photometric="rgb", tile=(128, 128), subfiletype=1)


def _hest_sample(root: Path, shared_data: Path, sample_id: str, technology: str = "Visium", meta: dict | None = None):
    import anndata as ad

    rng = np.random.default_rng(2)
    n = 7
    rows, cols = np.arange(n) // 4, np.arange(n) % 4 * 2 + np.arange(n) // 4 % 2
    xy = np.column_stack([300.0 + cols * 100.2, 250.0 + rows * 173.5])  # pixels of the WSI
    counts = rng.poisson(4.0, size=(n, len(GENES))).astype(np.float32)
    adata = ad.AnnData(
        sparse.csr_matrix(counts),
        obs=pd.DataFrame(
            {
                "in_tissue": np.ones(n, dtype=np.int64),
                "pxl_col_in_fullres": xy[:, 0],
                "pxl_row_in_fullres": xy[:, 1],
                "array_row": rows,
                "array_col": cols,
                "pathology": ["tumour", "stroma", "tumour", "tumour", "stroma", "tumour", "stroma"],
            },
            index=[f"{r}x{c}" for r, c in zip(rows, cols, strict=True)],
        ),
        var=pd.DataFrame(index=GENES),
    )
    adata.obsm["spatial"] = xy
    adata.uns["spatial"] = {"ST": {"scalefactors": {"spot_diameter_fullres": 55.0 / HEST_PX}}}
    (root / "st").mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    full = _he_crop(shared_data, 700, 900)
    _write_pyramid(root / "wsis" / f"{sample_id}.tif", full)
    (root / "metadata").mkdir(exist_ok=True)
    metadata = {
        "pixel_size_um_embedded": 0.5,
        "pixel_size_um_estimated": HEST_PX,
        "spot_diameter": 55.0,
        "inter_spot_dist": 100.0,
        "st_technology": technology,
        "fullres_px_width": 900,
        "fullres_px_height": 700,
        "spots_under_tissue": n,
    }
    metadata.update(meta or {})
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(metadata))
    return xy, counts, full


@pytest.fixture(scope="module")
def hest_dir(tmp_path_factory, shared_data) -> Path:
    root = tmp_path_factory.mktemp("hest_data")
    xy, counts, full = _hest_sample(root, shared_data, HEST_ID)
    np.save(root / "xy.npy", xy)
    np.save(root / "counts.npy", counts)
    np.save(root / "full.npy", full)
    return root


def test_hest_spots_table_and_wsi_in_um(hest_dir):
    sdata = _read(st2he.io.read_hest, hest_dir, HEST_ID)
    xy, counts, full = (np.load(hest_dir / f"{k}.npy") for k in ("xy", "counts", "full"))
    table = sdata.tables["table"]
    np.testing.assert_allclose(table.obsm["spatial"], xy * HEST_PX, atol=1e-9)
    np.testing.assert_array_equal(table.X.toarray(), counts)
    assert sparse.isspmatrix_csr(table.X) and table.X.dtype == np.float32
    np.testing.assert_array_equal(table.obs["total_counts"], counts.sum(axis=1))
    assert table.obs["in_tissue"].dtype == bool
    assert list(table.obs["pathology"][:3]) == ["tumour", "stroma", "tumour"]  # the h5ad's own columns are kept
    spots = sdata.shapes["spots"]
    np.testing.assert_allclose(spots["radius"], 27.5)
    np.testing.assert_allclose(np.column_stack([spots.geometry.x, spots.geometry.y]), xy * HEST_PX, atol=1e-9)
    assert list(spots.index) == list(table.obs["instance_id"]) == ["0x0", "0x2", "0x4", "0x6", "1x1", "1x3", "1x5"]
    source = sdata.attrs["st2he"]["source"]
    assert source["pixel_size"] == HEST_PX and source["pixel_size_from"] == "pixel_size_um_estimated"
    assert source["spot_shape"] == "circle" and source["sample_id"] == HEST_ID

    # lazy and pyramidal: the WSI's own levels, each placed by its size
    image = sdata.images["he_image"]
    assert len(image.children) == 3
    raster = st2he.io.Raster(image)
    assert raster.bounds == pytest.approx((0, 0, 900 * HEST_PX, 700 * HEST_PX))
    for row, col in [(0, 0), (250, 300), (699, 899)]:
        np.testing.assert_allclose(_pixel(sdata, col * HEST_PX, row * HEST_PX, HEST_PX), full[row, col], atol=1e-3)


def test_hest_options_technologies_and_cells(hest_dir, tmp_path, shared_data):
    import geopandas as gpd
    import shapely

    xy = np.load(hest_dir / "xy.npy")
    by_file = _read(st2he.io.read_hest, hest_dir / "st" / f"{HEST_ID}.h5ad", image=False)
    assert by_file.attrs["st2he"]["source"]["sample_id"] == HEST_ID
    np.testing.assert_allclose(by_file.tables["table"].obsm["spatial"], xy * HEST_PX)
    given = _read(st2he.io.read_hest, hest_dir, pixel_size=0.25, spot_diameter=60.0, image=False)
    np.testing.assert_allclose(given.tables["table"].obsm["spatial"], xy * 0.25)
    np.testing.assert_allclose(given.shapes["spots"]["radius"], 30.0)
    assert "he_image" not in given.images

    # a Xenium sample pooled by HEST into 100 µm squares; only the embedded pixel size in its metadata
    root = tmp_path / "hest"
    _hest_sample(
        root,
        shared_data,
        "TENX158",
        technology="Xenium",
        meta={"spot_diameter": 100.0, "inter_spot_dist": 100.0, "pixel_size_um_estimated": None},
    )
    cells = gpd.GeoDataFrame(
        {"class": ["Neoplastic", "Connective"]},
        geometry=[shapely.box(10, 20, 30, 50), shapely.Polygon([(100, 100), (120, 100), (110, 130)])],
    )
    (root / "cellvit_seg").mkdir()
    cells.to_parquet(root / "cellvit_seg" / "TENX158_cellvit_seg.parquet")
    sdata = _read(st2he.io.read_hest, root, cells=True)
    source = sdata.attrs["st2he"]["source"]
    assert source["pixel_size"] == 0.5 and source["pixel_size_from"] == "pixel_size_um_embedded"
    assert source["spot_shape"] == "square"
    squares = sdata.shapes["spots"].geometry
    np.testing.assert_allclose(squares.area, 100.0**2)
    np.testing.assert_allclose(np.column_stack([squares.centroid.x, squares.centroid.y]), xy * 0.5, atol=1e-9)
    got = sdata.shapes["cellvit"]
    assert got.geometry.iloc[0].bounds == pytest.approx((5, 10, 15, 25))
    assert list(got["class"]) == ["Neoplastic", "Connective"]


def test_hest_bad_input(hest_dir, tmp_path, shared_data):
    import shutil

    with pytest.raises(FileNotFoundError, match=r"No HEST sample 'TENX1'.*st/TENX1.h5ad.*TENX999"):
        st2he.io.read_hest(hest_dir, "TENX1")
    with pytest.raises(FileNotFoundError, match="no st/ folder"):
        st2he.io.read_hest(tmp_path)
    root = tmp_path / "copy"
    shutil.copytree(hest_dir, root)
    (root / "metadata" / f"{HEST_ID}.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"metadata/{HEST_ID}.json"):
        st2he.io.read_hest(root, HEST_ID)
    assert _read(st2he.io.read_hest, root, HEST_ID, pixel_size=0.5, spot_diameter=55).tables["table"].n_obs == 7
    (root / "wsis" / f"{HEST_ID}.tif").unlink()
    with pytest.raises(FileNotFoundError, match=rf"wsis/{HEST_ID}.tif.*image=False"):
        st2he.io.read_hest(root, HEST_ID, pixel_size=0.5)
    with pytest.raises(FileNotFoundError, match="cellvit_seg"):
        st2he.io.read_hest(hest_dir, HEST_ID, cells=True)
    _hest_sample(root, shared_data, "TENX2")
    with pytest.raises(ValueError, match=rf"2 samples \(TENX2, {HEST_ID}\).*sample_id="):
        st2he.io.read_hest(root)


def test_zarr_round_trip_and_table_keys(visium_dir, hest_dir, tmp_path):
    from spatialdata import read_zarr

    from st2he._units import table_keys

    for name, sdata in (
        ("visium", _read(st2he.io.read_visium, visium_dir)),
        ("hest", _read(st2he.io.read_hest, hest_dir, HEST_ID)),
    ):
        assert table_keys(sdata.tables["table"]) == (["spots"], "region", "instance_id")
        store = tmp_path / f"{name}.zarr"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sdata.write(store)
            back = read_zarr(store)
        table = back.tables["table"]
        np.testing.assert_array_equal(table.X.toarray(), sdata.tables["table"].X.toarray())
        np.testing.assert_allclose(table.obsm["spatial"], sdata.tables["table"].obsm["spatial"])
        assert list(back.shapes["spots"].index) == list(table.obs["instance_id"])
        assert back.attrs["st2he"]["source"] == sdata.attrs["st2he"]["source"]
        raster, original = st2he.io.Raster(back.images["he_image"]), st2he.io.Raster(sdata.images["he_image"])
        assert raster.bounds == pytest.approx(original.bounds)


def test_visium_reads_images_beyond_pillows_bomb_limit(visium_dir, monkeypatch):
    """A whole Visium microscope JPEG (20k x 20k px) is beyond Pillow's decompression-bomb limit; it is the user's."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the hires PNG (130 x 240 px) is "too large" now
    sdata = _read(st2he.io.read_visium, visium_dir, image="hires", use_spatialdata_io=False)
    assert st2he.io.Raster(sdata.images["he_image"]).bounds == pytest.approx((0, 0, 480, 260))
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_visium_and_hest_say_which_files_they_used(visium_dir, hest_dir):
    files = _read(st2he.io.read_visium, visium_dir).attrs["st2he"]["files"]
    assert files["used"] == [
        "filtered_feature_bc_matrix.h5",
        "sample_tissue_image.tif",
        "spatial/scalefactors_json.json",
        "spatial/tissue_positions.csv",
    ]
    assert files["ignored"] == ["spatial/tissue_hires_image.png", "spatial/tissue_lowres_image.png"]
    files = _read(st2he.io.read_visium, visium_dir, image="hires").attrs["st2he"]["files"]
    assert "spatial/tissue_hires_image.png" in files["used"] and "sample_tissue_image.tif" in files["ignored"]
    files = _read(st2he.io.read_hest, hest_dir, sample_id=HEST_ID).attrs["st2he"]["files"]
    assert files["used"] == [f"metadata/{HEST_ID}.json", f"st/{HEST_ID}.h5ad", f"wsis/{HEST_ID}.tif"]
    assert all(not f.startswith(("st/", "wsis/", "metadata/")) for f in files["ignored"])
