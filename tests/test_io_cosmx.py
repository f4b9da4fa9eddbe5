"""CosMx per-FOV pictures: Morphology2D, CellComposite and CellLabels stitched into one element each, in µm.

The exports are built here, small and realistic: three FOVs of 64 x 64 pixels at known global pixel positions (one
of them off the pixel grid), 5-channel 16-bit Morphology2D TIFFs with CosMx's channel description, a bright DAPI blob
at a known place, CellLabels with known cells, and molecules and cell metadata whose local and global pixels agree
with the positions, as in the real crop (global = local + the FOV's position, for x and for y).
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import st2he
from st2he._grid import Grid
from st2he.io._cosmx import _description_channels

PX = 0.12028
SIZE = 64  # rows and columns of a FOV
DATASET = "Run1_S1"
#: FOV -> global pixel of its local pixel (0, 0); FOV 3 is off the pixel grid by 0.4 px in x and y
POSITIONS = {1: (1000.0, 2000.0), 2: (1064.0, 2000.0), 3: (1000.4, 2063.6)}
#: FOV -> cells (cell_ID, local x, local y of the 5 x 5 px square's centre pixel)
CELLS = {
    1: [(1, 10, 10), (2, 30, 40), (3, 50, 20)],
    2: [(1, 12, 50), (2, 40, 30), (5, 55, 8)],
    3: [(1, 20, 20), (2, 45, 45), (3, 8, 50)],
}
#: FOV -> local pixel (x, y) of its DAPI blob (one bright pixel, dimmer around it)
DAPI_BLOBS = {1: (5, 58), 2: (20, 10), 3: (5, 50)}
HISTONE_BLOB = (40, 5)  # a brighter blob in the Histone channel: a stain chosen from it would be wrong
TARGETS = ["Histone", "CK8/18", "rRNA", "GFAP", "DNA"]
GENES = ["Snap25", "Gfap", "Mbp", "Plp1", "NegPrb1"]


def _description() -> str:
    channels = [{"ChannelId": letter, "BiologicalTarget": target} for letter, target in zip("BGYRU", TARGETS)]
    return json.dumps({"ChannelOrder": "BGYRU", "MorphologyKit": {"Channels": channels}, "Magnification": 20})


def _to_file_row(y_local: int) -> int:
    """The file row holding local pixel row ``y_local``: CosMx pictures count local y from the bottom up."""
    return SIZE - 1 - y_local


def _morphology(fov: int) -> np.ndarray:
    image = np.random.default_rng(fov).integers(80, 400, (5, SIZE, SIZE)).astype(np.uint16)  # a dim, noisy field
    x, y = DAPI_BLOBS[fov]
    r = _to_file_row(y)
    image[4, r - 1 : r + 2, x - 1 : x + 2] = 2000
    image[4, r, x] = 5000
    hx, hy = HISTONE_BLOB
    image[0, _to_file_row(hy), hx] = 60000
    return image


def _labels(fov: int) -> np.ndarray:
    labels = np.zeros((SIZE, SIZE), np.uint16)
    for cell, x, y in CELLS[fov]:
        r = _to_file_row(y)
        labels[r - 2 : r + 3, x - 2 : x + 3] = cell
    return labels


def _molecules(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for fov, cells in CELLS.items():
        px, py = POSITIONS[fov]
        for cell, x, y in cells:
            for _ in range(6):  # inside the cell's square [x - 2, x + 3) x [y - 2, y + 3) local px
                lx, ly = x + rng.uniform(-1.5, 2.5), y + rng.uniform(-1.5, 2.5)  # 0.5 px in: FOV 3 is rounded
                rows.append((fov, cell, lx + px, ly + py, lx, ly, 0, GENES[rng.integers(4)], "Nuclear"))
        for _ in range(10):  # background
            lx, ly = rng.uniform(0, SIZE, 2)
            rows.append((fov, 0, lx + px, ly + py, lx, ly, 0, GENES[rng.integers(5)], "None"))
    columns = ["fov", "cell_ID", "x_global_px", "y_global_px", "x_local_px", "y_local_px", "z", "target", "CellComp"]
    return pd.DataFrame(rows, columns=columns)


def _write_export(
    folder: Path,
    *,
    positions="px",
    metadata=True,
    counts=True,
    morphology=True,
    composite=True,
    labels=True,
    skip_files=(),
    labels_dtype=np.uint16,
    turn=(False, False),
) -> Path:
    """A small export; ``turn`` = (rows, columns) of every picture file reversed against CosMx's convention."""
    import tifffile
    from PIL import Image

    folder.mkdir(parents=True)
    molecules = _molecules()
    molecules.to_csv(folder / f"{DATASET}_tx_file.csv", index=False)
    cells = [
        (fov, cell, x + 0.5, y + 0.5, x + 0.5 + POSITIONS[fov][0], y + 0.5 + POSITIONS[fov][1])
        for fov, per_fov in CELLS.items()
        for cell, x, y in per_fov
    ]
    centres = ["CenterX_local_px", "CenterY_local_px", "CenterX_global_px", "CenterY_global_px"]
    meta = pd.DataFrame(cells, columns=["fov", "cell_ID", *centres])
    meta["Area"] = 25
    if metadata:
        meta.to_csv(folder / f"{DATASET}_metadata_file.csv", index=False)
    if counts:
        table = molecules.groupby(["fov", "cell_ID", "target"]).size().unstack(fill_value=0).reset_index()
        table.to_csv(folder / f"{DATASET}_exprMat_file.csv", index=False)
    fovs = pd.DataFrame([(f, x, y) for f, (x, y) in POSITIONS.items()], columns=["fov", "x_global_px", "y_global_px"])
    if positions == "px":
        fovs.to_csv(folder / f"{DATASET}_fov_positions_file.csv", index=False)
    elif positions == "mm":
        mm = pd.DataFrame({"FOV": fovs.fov, "X_mm": fovs.x_global_px * PX / 1000, "Y_mm": fovs.y_global_px * PX / 1000})
        mm.to_csv(folder / f"{DATASET}_fov_positions_file.csv", index=False)
    elif positions == "shifted":  # a positions file one FOV off in y (some AtoMx exports)
        shifted = fovs.assign(y_global_px=fovs.y_global_px + SIZE)
        shifted.to_csv(folder / f"{DATASET}_fov_positions_file.csv", index=False)
    for kind, wanted in (("Morphology2D", morphology), ("CellComposite", composite), ("CellLabels", labels)):
        if wanted:
            (folder / kind).mkdir()
    rows = slice(None, None, -1 if turn[0] else 1)
    cols = slice(None, None, -1 if turn[1] else 1)
    for fov in CELLS:
        if morphology and ("Morphology2D", fov) not in skip_files:
            file = folder / "Morphology2D" / f"20230101_000000_S1_C902_P99_N99_F{fov:03d}.TIF"
            picture = np.ascontiguousarray(_morphology(fov)[:, rows, cols])
            tifffile.imwrite(file, picture, description=_description(), metadata=None)
        if composite and ("CellComposite", fov) not in skip_files:
            rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
            rgb[..., 2] = (_morphology(fov)[4] > 1000) * 255
            file = folder / "CellComposite" / f"CellComposite_F{fov:03d}.jpg"
            Image.fromarray(np.ascontiguousarray(rgb[rows, cols])).save(file, quality=95, subsampling=0)
        if labels and ("CellLabels", fov) not in skip_files:
            file = folder / "CellLabels" / f"CellLabels_F{fov:03d}.tif"
            tifffile.imwrite(file, np.ascontiguousarray(_labels(fov)[rows, cols]).astype(labels_dtype))
    return folder


def _read(folder, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sdata = st2he.io.read_cosmx(folder, **kwargs)
    return sdata, [str(w.message) for w in caught]


def _scale0(element):
    return element["scale0"].image if hasattr(element, "children") and "scale0" in element.children else element


def _value_at(element, x_um, y_um) -> np.ndarray:
    grid = Grid.from_element(element)
    row, col = grid.to_pixel(np.asarray(x_um), np.asarray(y_um))
    data = np.asarray(_scale0(element).data)
    return data[..., row, col]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return _write_export(tmp_path_factory.mktemp("cosmx") / "export")


@pytest.fixture(scope="module")
def read(export):
    return _read(export)


# ------------------------------------------------------------------------------------------------- placement


def test_morphology_is_stitched_in_microns(read):
    sdata, caught = read
    assert caught == []
    image = sdata["morphology"]
    assert list(_scale0(image).coords["c"].values) == ["Histone", "CK8.18", "rRNA", "GFAP", "DAPI"]
    # one canvas from the top-left FOV's corner; FOV 3 lands on the nearest whole pixel
    assert Grid.from_element(image) == Grid(1000 * PX, 2000 * PX, PX, 2 * SIZE, 2 * SIZE)
    data = np.asarray(_scale0(image).data)
    assert data.dtype == np.uint16
    dapi = data[4]
    grid = Grid.from_element(image)
    for fov, (x, y) in DAPI_BLOBS.items():
        # the blob's true place: its local pixel centre + the FOV's position, in µm
        true_x, true_y = (POSITIONS[fov][0] + x + 0.5) * PX, (POSITIONS[fov][1] + y + 0.5) * PX
        row, col = grid.to_pixel(true_x, true_y)
        window = dapi[row - 3 : row + 4, col - 3 : col + 4]
        r, c = np.unravel_index(np.argmax(window), window.shape)
        ys, xs = grid.pixel_centers()
        assert window.max() == 5000
        assert abs(xs[col - 3 + c] - true_x) < PX and abs(ys[row - 3 + r] - true_y) < PX
    assert int(dapi.max()) == 5000 and int((dapi == 5000).sum()) == 3
    # with the y axis flipped (pictures read top-down), the blobs would be elsewhere
    fov, (x, y) = 2, DAPI_BLOBS[2]
    flipped = (POSITIONS[fov][0] + x + 0.5) * PX, (POSITIONS[fov][1] + _to_file_row(y) + 0.5) * PX
    assert _value_at(image, *flipped)[4] < 400
    source = sdata.attrs["st2he"]["source"]
    assert source["reader"] == "st2he"
    assert source["nuclear_stain"] == "morphology" and source["nuclear_stain_channel"] == "DAPI"
    assert source["image_origin"] == pytest.approx([1000 * PX, 2000 * PX])
    assert source["fovs"]["placed"] == 3 and source["fovs"]["by_positions_file"] == 3


def test_composite_lies_on_the_same_pixels(read):
    sdata, _ = read
    composite = sdata["cell_composite"]
    assert list(_scale0(composite).coords["c"].values) == ["r", "g", "b"]
    assert Grid.from_element(composite) == Grid.from_element(sdata["morphology"])
    blue = np.asarray(_scale0(composite).data[2]).astype(int)
    dapi = np.asarray(_scale0(sdata["morphology"]).data[4])
    assert blue[dapi == 5000].min() > 200  # the blobs' centres, bright in both
    assert np.median(blue[dapi < 400]) < 10


def test_labels_are_unique_across_fovs_and_under_their_molecules(read):
    sdata, _ = read
    labels = sdata["cell_labels"]
    assert Grid.from_element(labels) == Grid.from_element(sdata["morphology"])
    data = np.asarray(_scale0(labels).data)
    expected = {fov * 100_000 + cell for fov, cells in CELLS.items() for cell, _, _ in cells}
    assert set(np.unique(data).tolist()) == {0} | expected
    assert data.dtype == np.uint32
    for fov, cells in CELLS.items():
        for cell, _, _ in cells:
            assert int((data == fov * 100_000 + cell).sum()) == 25
    # every molecule of a cell lies on that cell's label
    molecules = sdata["transcripts"].compute()
    inside = molecules[molecules["cell_ID"] > 0]
    found = _value_at(labels, inside["x"].to_numpy(), inside["y"].to_numpy())
    np.testing.assert_array_equal(found, inside["fov"].to_numpy() * 100_000 + inside["cell_ID"].to_numpy())
    # the table's cells are the labels' cells
    table = sdata["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "cell_labels" and attrs["instance_key"] == "label"
    assert set(table.obs["label"].tolist()) == expected
    assert sdata.attrs["st2he"]["source"]["cell_labels"] == {
        "element": "cell_labels",
        "label": "fov * 100000 + cell_ID",
        "factor": 100000,
    }


def test_rasterize_takes_the_dapi_channel(read):
    sdata, _ = read
    from st2he.pp._rasterize import StainWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st2he.pp.rasterize_transcripts(sdata, pixel_size=PX, palette="coexpression", min_qv=None, key_added="pic")
    assert not [w for w in caught if issubclass(w.category, StainWarning)]
    params = st2he._elements.get_params(sdata, "pic")
    assert params["stain"]["stain_key"] == "morphology"
    assert params["stain"]["stain_channel"] == "DAPI"


def test_spatialdata_io_places_the_fovs_where_st2he_does(export):
    from spatialdata.transformations import get_transformation

    ours, _ = _read(export)
    theirs, _ = _read(export, use_spatialdata_io=True)
    assert theirs.attrs["st2he"]["source"]["reader"] == "spatialdata_io.cosmx"
    grid = Grid.from_element(ours["cell_labels"])
    stitched = np.asarray(_scale0(ours["cell_labels"]).data)
    for fov, cells in CELLS.items():
        element = theirs[f"{fov}_labels"]
        matrix = get_transformation(element, "global").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        per_fov = np.asarray(element.data)
        for cell, _, _ in cells:
            rows, cols = np.nonzero(per_fov == cell)
            centre = matrix @ np.array([cols.mean() + 0.5, rows.mean() + 0.5, 1.0])
            rows, cols = np.nonzero(stitched == fov * 100_000 + cell)
            ys, xs = grid.pixel_centers()
            assert abs(xs[cols].mean() - centre[0]) < PX and abs(ys[rows].mean() - centre[1]) < PX


# ------------------------------------------------------------------------------------------ partial exports


def test_positions_in_mm_and_without_a_positions_file(tmp_path, read):
    expected = Grid.from_element(read[0]["morphology"])
    mm, caught = _read(_write_export(tmp_path / "mm", positions="mm", labels_dtype=np.uint32))
    assert caught == []
    assert Grid.from_element(mm["morphology"]) == expected
    # 32-bit label files: the cell table bounds cell_ID, so the labels are the same
    np.testing.assert_array_equal(
        np.asarray(_scale0(mm["cell_labels"]).data), np.asarray(_scale0(read[0]["cell_labels"]).data)
    )
    bare, caught = _read(_write_export(tmp_path / "none", positions=None))
    assert Grid.from_element(bare["morphology"]) == expected
    assert any("no FOV positions file" in m and "metadata_file" in m for m in caught)
    fovs = bare.attrs["st2he"]["source"]["fovs"]
    assert fovs["by_local_and_global_pixels"] == 3 and fovs["checked_against"] == f"{DATASET}_metadata_file.csv"
    # without cell metadata either: the molecules' local and global pixels place them
    tx, caught = _read(_write_export(tmp_path / "tx", positions=None, metadata=False))
    assert Grid.from_element(tx["morphology"]) == expected
    assert "tx_file" in tx.attrs["st2he"]["source"]["fovs"]["checked_against"]


def test_a_shifted_positions_file_is_corrected_by_the_cells(tmp_path, read):
    sdata, caught = _read(_write_export(tmp_path / "shifted", positions="shifted"))
    assert Grid.from_element(sdata["morphology"]) == Grid.from_element(read[0]["morphology"])
    assert any("places them elsewhere" in m for m in caught)
    assert sdata.attrs["st2he"]["source"]["fovs"]["by_local_and_global_pixels"] == 3


def test_missing_pieces_are_reported_not_fatal(tmp_path):
    # images without labels, composite or positions: molecules still read, the stain still DAPI
    folder = _write_export(tmp_path / "a", labels=False, composite=False, skip_files={("Morphology2D", 2)})
    sdata, caught = _read(folder)
    assert set(sdata.images) == {"morphology"} and not sdata.labels
    assert any("no usable picture for FOV(s) 2" in m for m in caught)
    assert "table" in sdata.tables and "region" not in sdata["table"].uns.get("spatialdata_attrs", {})
    assert len(sdata["transcripts"].compute()) == len(_molecules())
    # labels without images; a FOV without its labels file: its cells are reported
    folder = _write_export(tmp_path / "b", morphology=False, composite=False, skip_files={("CellLabels", 3)})
    sdata, caught = _read(folder)
    assert set(sdata.labels) == {"cell_labels"} and not sdata.images
    assert any("3 of 9 cells" in m and "CellLabels" in m for m in caught)
    assert sdata.attrs["st2he"]["source"]["nuclear_stain"] is None
    # pictures that nothing places: left out with a warning, the rest read
    folder = _write_export(tmp_path / "c", positions=None, metadata=False)
    raw = pd.read_csv(folder / f"{DATASET}_tx_file.csv").drop(columns=["x_local_px", "y_local_px"])
    raw.to_csv(folder / f"{DATASET}_tx_file.csv", index=False)
    sdata, caught = _read(folder)
    assert not sdata.images and not sdata.labels
    assert any("no position" in m for m in caught)
    assert len(sdata["transcripts"].compute()) == len(raw)


def test_reads_without_spatialdata_io(export, monkeypatch, read):
    monkeypatch.setitem(sys.modules, "spatialdata_io", None)
    sdata, _ = _read(export)
    assert set(sdata.images) == {"morphology", "cell_composite"} and set(sdata.labels) == {"cell_labels"}
    np.testing.assert_array_equal(
        np.asarray(_scale0(sdata["cell_labels"]).data), np.asarray(_scale0(read[0]["cell_labels"]).data)
    )
    with pytest.raises(ImportError):
        st2he.io.read_cosmx(export, use_spatialdata_io=True)


def test_polygons_keep_the_table_on_the_boundaries(tmp_path, shared_data):
    folder = _write_export(tmp_path / "poly")
    polygons = pd.DataFrame(
        [
            (fov, cell, x + dx, y + dy, x + dx + POSITIONS[fov][0], y + dy + POSITIONS[fov][1])
            for fov, cells in CELLS.items()
            for cell, x, y in cells
            for dx, dy in ((-2, -2), (3, -2), (3, 3), (-2, 3))
        ],
        columns=["fov", "cellID", "x_local_px", "y_local_px", "x_global_px", "y_global_px"],
    )
    polygons.to_csv(folder / f"{DATASET}-polygons.csv", index=False)
    sdata, _ = _read(folder)
    table = sdata["table"]
    assert table.uns["spatialdata_attrs"]["region"] == "cell_boundaries"
    # each polygon covers exactly its cell's label pixels
    for key, polygon in sdata["cell_boundaries"].geometry.items():
        cell, fov = (int(v) for v in key.split("_"))
        centre = polygon.centroid
        assert _value_at(sdata["cell_labels"], centre.x, centre.y) == fov * 100_000 + cell
    assert (table.obs["label"] == table.obs["fov"].astype(int) * 100_000 + table.obs["cell_ID"].astype(int)).all()


def test_channel_description_variants():
    order, targets = _description_channels(
        json.dumps({"ChannelOrder": "UBG", "Channels": [{"ChannelId": "Channel-U", "BiologicalTarget": "DAPI"}]})
    )
    assert order == "UBG" and targets == {"U": "DAPI"}
    text = '{"ChannelOrder": "BGYRU", x "ChannelId": "G", "BiologicalTarget": "PanCK", '
    assert _description_channels(text) == ("BGYRU", {"G": "PanCK"})
    assert _description_channels("") == (None, {})


# ---------------------------------------------------------------------------------------------- files report


def test_files_report(export, read, tmp_path):
    sdata, _ = read
    files = sdata.attrs["st2he"]["files"]
    pictures = sorted(p.relative_to(export).as_posix() for p in export.glob("*/*"))
    assert files["used"] == sorted(
        [
            f"{DATASET}_exprMat_file.csv",
            f"{DATASET}_fov_positions_file.csv",
            f"{DATASET}_metadata_file.csv",
            f"{DATASET}_tx_file.csv",
            *pictures,
        ]
    )
    assert files["ignored"] == []
    # the picture folders st2he does not read, and stray files, are listed; big folders are counted
    folder = tmp_path / "more"
    shutil.copytree(export, folder)
    (folder / "CellOverlay").mkdir()
    for fov in range(1, 26):
        (folder / "CellOverlay" / f"CellOverlay_F{fov:03d}.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("")
    (folder / "RunSummary").mkdir()
    (folder / "RunSummary" / "latest.fovs.csv").write_text("")
    sdata, _ = _read(folder)
    files = sdata.attrs["st2he"]["files"]
    overlay = [f"CellOverlay/CellOverlay_F{fov:03d}.jpg" for fov in range(1, 21)]
    assert files["ignored"] == sorted([*overlay, "RunSummary/", "notes.txt"])
    assert files["unlisted"] == {"used": {}, "ignored": {"CellOverlay": 5}}


# ------------------------------------------------------------------------------------ how the files lie


def _dapi_blobs_in_place(sdata) -> list[bool]:
    """For each FOV, whether the brightest DAPI pixel near its blob's true place is that place."""
    image = sdata["morphology"]
    grid = Grid.from_element(image)
    dapi = np.asarray(_scale0(image).data)[4]
    found = []
    for fov, (x, y) in DAPI_BLOBS.items():
        row, col = grid.to_pixel((POSITIONS[fov][0] + x + 0.5) * PX, (POSITIONS[fov][1] + y + 0.5) * PX)
        found.append(int(dapi[row, col]) == 5000)
    return found


def test_the_orientation_of_the_files_is_checked_by_the_cell_labels(read):
    sdata, _ = read
    orientation = sdata.attrs["st2he"]["source"]["fovs"]["orientation"]
    assert orientation["checked"] is True and orientation["cells_checked"] == 9
    assert orientation["cells_on_their_label"] == 1.0
    assert orientation["files_store"].endswith("(CosMx's convention)")


@pytest.mark.parametrize(
    ("turn", "says"),
    [((True, True), "turned by 180 degrees"), ((True, False), "local y from the top row down, local x from left")],
)
def test_pictures_stored_another_way_are_found_and_placed_right(tmp_path, turn, says):
    """Some AtoMx exports (1.3.2 and later) store the pictures turned by 180 degrees against their molecules."""
    folder = _write_export(tmp_path / "turned", turn=turn)
    sdata, caught = _read(folder)
    assert [m for m in caught if says in m and "on their own cell" in m]
    orientation = sdata.attrs["st2he"]["source"]["fovs"]["orientation"]
    assert orientation["cells_on_their_label"] == 1.0 and says in orientation["files_store"]
    # every molecule of a cell lies on its label, and every DAPI blob at its place, as in the convention's export
    labels = sdata["cell_labels"]
    molecules = sdata["transcripts"].compute()
    inside = molecules[molecules["cell_ID"] > 0]
    found = _value_at(labels, inside["x"].to_numpy(), inside["y"].to_numpy())
    np.testing.assert_array_equal(found, inside["fov"].to_numpy() * 100_000 + inside["cell_ID"].to_numpy())
    assert _dapi_blobs_in_place(sdata) == [True, True, True]
    composite = np.asarray(_scale0(sdata["cell_composite"]).data)
    reference, _ = _read(_write_export(tmp_path / "convention"))
    np.testing.assert_array_equal(composite, np.asarray(_scale0(reference["cell_composite"]).data))


def test_without_cell_labels_the_convention_is_assumed_and_said(tmp_path):
    sdata, _ = _read(_write_export(tmp_path / "nolabels", labels=False))
    orientation = sdata.attrs["st2he"]["source"]["fovs"]["orientation"]
    assert orientation["checked"] is False
    assert any("not checked (no CellLabels)" in a for a in sdata.attrs["st2he"]["source"]["assumptions"])
    assert _dapi_blobs_in_place(sdata) == [True, True, True]
