"""Nothing is lost on overwrite or on failure: the writing rule of st2he._elements, through every writer.

A name held by another element type is never taken, an element the call reads is never replaced, an element a
table annotates is replaced only with that table, calls that write several elements store all or none, and every
``pp``/``tl`` writer returns the element it stored.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import st2he
from st2he._elements import check_key_free, get_params, parse_image, write_elements
from st2he._grid import Grid, _scale0


@pytest.fixture
def sample():
    """A small simulated sample (96 µm): he_image, morphology_focus, transcripts, cell shapes and their table."""
    return st2he.datasets.synthetic_tissue(0, size_um=96.0)


@pytest.fixture(scope="module")
def xenium_path(shared_data):
    return shared_data / "xenium_cellline_crop"


def _snapshot(sdata, key):
    """Type, identity and content of an element, to show it came through a refused call intact."""
    element = sdata[key]
    kind = next(k for k in ("images", "labels", "points", "shapes", "tables") if key in getattr(sdata, k))
    if kind == "tables":
        content = (element.obs.copy(), np.asarray(element.X.todense() if hasattr(element.X, "todense") else element.X))
    elif kind == "shapes":
        content = element.copy()
    elif kind == "points":
        content = element.compute()
    else:
        content = np.asarray(_scale0(element))
    return kind, element, content


def _assert_intact(sdata, key, snapshot):
    kind, element, content = snapshot
    assert key in getattr(sdata, kind), f"{key!r} is no longer a {kind} element"
    assert sdata[key] is element
    if kind == "tables":
        pd.testing.assert_frame_equal(sdata[key].obs, content[0])
        x = sdata[key].X
        np.testing.assert_array_equal(np.asarray(x.todense() if hasattr(x, "todense") else x), content[1])
    elif kind == "shapes":
        pd.testing.assert_frame_equal(pd.DataFrame(sdata[key]), pd.DataFrame(content))
    elif kind == "points":
        pd.testing.assert_frame_equal(sdata[key].compute(), content)
    else:
        np.testing.assert_array_equal(np.asarray(_scale0(sdata[key])), content)


# ---------------------------------------------------------------------------------------------------------------
# the rule itself


def test_the_rule_checks_every_name_before_it_stores_any(sample):
    table = _snapshot(sample, "table")
    grid = Grid(0.0, 0.0, 1.0, 8, 8)
    new = parse_image(np.zeros((3, 8, 8), np.uint8), grid)
    # the second name belongs to a table: the first image is not stored either
    with pytest.raises(KeyError, match="names a table"):
        write_elements(sample, {"fresh": new, "table": new}, overwrite=True)
    assert "fresh" not in sample
    _assert_intact(sample, "table", table)
    # type clash even with overwrite=True; inputs; elements a table annotates
    with pytest.raises(KeyError, match="Pick another key_added"):
        check_key_free(sample, "transcripts", overwrite=True, kind="images")
    with pytest.raises(ValueError, match="reads"):
        check_key_free(sample, "he_image", overwrite=True, kind="images", inputs={"he_image"})
    with pytest.raises(ValueError, match=r"table\(s\) \['table'\] annotate"):
        check_key_free(sample, "cell_boundaries", overwrite=True, kind="shapes")
    check_key_free(sample, "cell_boundaries", overwrite=True, kind="shapes", replaced={"cell_boundaries", "table"})
    # a successful overwrite replaces the element and returns it as stored
    stored = write_elements(sample, {"he_image": new}, overwrite=True)["he_image"]
    assert stored is sample.images["he_image"]
    assert Grid.from_element(sample.images["he_image"]) == grid


# ---------------------------------------------------------------------------------------------------------------
# each writer, on the simulated sample


def test_rasterize_never_takes_another_type_or_its_own_input(sample):
    keep = {key: _snapshot(sample, key) for key in ("table", "transcripts", "morphology_focus")}
    kwargs = {"pixel_size": 2.0, "palette": "hue", "overwrite": True}
    with pytest.raises(KeyError, match="names a table"):
        st2he.pp.rasterize_transcripts(sample, key_added="table", **kwargs)
    with pytest.raises(KeyError, match="names a points element"):
        st2he.pp.rasterize_transcripts(sample, key_added="transcripts", **kwargs)  # the very points drawn
    with pytest.raises(ValueError, match="reads"):
        st2he.pp.rasterize_transcripts(sample, key_added="morphology_focus", **kwargs)  # the stain it draws
    with pytest.raises(KeyError, match="names a table"):
        st2he.pp.transcript_density(sample, key_added="table", pixel_size=4.0, overwrite=True)
    with pytest.raises(KeyError, match="names a points element"):
        st2he.pp.transcript_density(sample, pixel_size=4.0, key_added="transcripts", overwrite=True)
    for key, snap in keep.items():
        _assert_intact(sample, key, snap)
    # a successful overwrite of its own picture replaces it, and the call returns what it stored
    first = st2he.pp.rasterize_transcripts(sample, pixel_size=2.0, palette="hue")
    assert first is sample.images["st2he_input"]
    second = st2he.pp.rasterize_transcripts(sample, pixel_size=4.0, palette="hue", overwrite=True)
    assert second is sample.images["st2he_input"] and second is not first
    assert Grid.from_element(second).pixel_size == 4.0 and get_params(sample, "st2he_input")["pixel_size"] == 4.0
    density = st2he.pp.transcript_density(sample, pixel_size=4.0)
    assert density is sample.images["transcript_density"]
    assert float(np.asarray(_scale0(density)).sum()) > 0


def test_make_tiles_never_replaces_what_a_table_annotates(sample):
    cells = _snapshot(sample, "cell_boundaries")
    table = _snapshot(sample, "table")
    with pytest.raises(ValueError, match=r"\['table'\] annotate"):
        st2he.pp.make_tiles(sample, "he_image", tile_size=32, key_added="cell_boundaries", overwrite=True)
    with pytest.raises(KeyError, match="names an image"):
        st2he.pp.make_tiles(sample, "he_image", tile_size=32, key_added="he_image", overwrite=True)
    with pytest.raises(KeyError, match="names a table"):
        st2he.pp.make_tiles(sample, "he_image", tile_size=32, key_added="table", overwrite=True)
    with pytest.raises(ValueError, match="reads"):
        st2he.pp.make_tiles(sample, "he_image", centers="regions", key_added="regions", overwrite=True)
    _assert_intact(sample, "cell_boundaries", cells)
    _assert_intact(sample, "table", table)
    # tiles nobody annotates are replaced
    first = st2he.pp.make_tiles(sample, "he_image", tile_size=96)
    assert first is sample.shapes["tiles"] and len(first) == 4
    second = st2he.pp.make_tiles(sample, "he_image", tile_size=48, overwrite=True)
    assert second is sample.shapes["tiles"] and len(second) == 16


def test_virtual_he_keeps_its_inputs_and_stores_mean_and_spread_together(sample):
    st2he.pp.rasterize_transcripts(sample, pixel_size=2.0, palette="hue")
    keep = {key: _snapshot(sample, key) for key in ("st2he_input", "table", "morphology_focus", "transcripts")}
    with pytest.raises(ValueError, match="reads"):
        st2he.tl.virtual_he(sample, method="stain", key_added="st2he_input", overwrite=True)
    with pytest.raises(ValueError, match="reads"):  # the stain baseline reads the picture's stain lazily
        st2he.tl.virtual_he(sample, method="stain", key_added="morphology_focus", overwrite=True)
    with pytest.raises(KeyError, match="names a table"):
        st2he.tl.virtual_he(sample, method="stain", key_added="table", overwrite=True)
    for key, snap in keep.items():
        _assert_intact(sample, key, snap)
    first = st2he.tl.virtual_he(sample, method="stain")
    assert first is sample.images["virtual_he"]
    # the uncertainty's name is held by a table: neither image is stored, the old virtual H&E stays
    old = _snapshot(sample, "virtual_he")
    sample.tables["virtual_he_uncertainty"] = sample.tables["table"].copy()
    with pytest.raises(KeyError, match="names a table"):
        st2he.tl.virtual_he(sample, n_samples=2, r=0.5, overwrite=True, progress=False)
    _assert_intact(sample, "virtual_he", old)
    second = st2he.tl.virtual_he(sample, method="stain", overwrite=True)
    assert second is sample.images["virtual_he"] and second is not first


def test_evaluate_he_stores_tiles_and_table_together(sample):
    st2he.pp.rasterize_transcripts(sample, pixel_size=2.0, palette="hue")
    st2he.tl.virtual_he(sample, method="stain")
    regions = _snapshot(sample, "regions")
    # the table's name is free but its tiles' name is a table: nothing is stored
    sample.tables["scores_tiles"] = sample.tables["table"].copy()
    with pytest.raises(KeyError, match="names a table"):
        st2he.tl.evaluate_he(sample, key_added="scores", overwrite=True)
    assert "scores" not in sample
    with pytest.raises(KeyError, match="names a shapes element"):
        st2he.tl.evaluate_he(sample, key_added="regions", overwrite=True)
    with pytest.raises(KeyError, match="names an image"):
        st2he.tl.evaluate_he(sample, key_added="virtual_he", overwrite=True)  # the image it scores
    _assert_intact(sample, "regions", regions)
    # a second run replaces the tiles and the table that annotates them, together
    st2he.tl.evaluate_he(sample, tile_size=48)  # 2 µm evaluation pixels: one 96 µm tile
    assert sample.tables["he_metrics"].n_obs == len(sample.shapes["he_metrics_tiles"]) == 1
    st2he.tl.evaluate_he(sample, tile_size=24, overwrite=True)
    assert sample.tables["he_metrics"].n_obs == len(sample.shapes["he_metrics_tiles"]) == 4


# ---------------------------------------------------------------------------------------------------------------
# the real Xenium crop


def test_xenium_crop_elements_survive_refused_overwrites(xenium_path):
    sdata = st2he.io.read_xenium(xenium_path)
    keep = {key: _snapshot(sdata, key) for key in ("table", "transcripts", "cell_boundaries", "morphology_focus")}
    with pytest.raises(KeyError, match="names a points element"):
        st2he.pp.rasterize_transcripts(sdata, key_added="transcripts", pixel_size=2.0, overwrite=True)
    with pytest.raises(KeyError, match="names a table"):
        st2he.pp.rasterize_transcripts(sdata, key_added="table", pixel_size=2.0, overwrite=True)
    with pytest.raises(ValueError, match="reads"):
        st2he.pp.rasterize_transcripts(sdata, key_added="morphology_focus", pixel_size=2.0, overwrite=True)
    with pytest.raises(ValueError, match="annotate"):
        st2he.pp.make_tiles(sdata, "morphology_focus", tile_size=64, key_added="cell_boundaries", overwrite=True)
    for key, snap in keep.items():
        _assert_intact(sdata, key, snap)
    # the cell table still annotates the cells, all of them
    assert set(sdata.tables["table"].obs["cell_id"].astype(str)) <= set(sdata.shapes["cell_boundaries"].index.astype(str))
    # replacing st2he's own picture works and returns it
    first = st2he.pp.rasterize_transcripts(sdata, pixel_size=2.0)
    second = st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0, overwrite=True)
    assert second is sdata.images["st2he_input"] and second is not first
    assert Grid.from_element(second).pixel_size == 1.0


# ---------------------------------------------------------------------------------------------------------------
# a store on disk


def test_backed_store_keeps_the_old_element_until_written(sample, tmp_path):
    from spatialdata import read_zarr

    st2he.pp.make_tiles(sample, "he_image", tile_size=96)
    sample.write(tmp_path / "s.zarr")
    backed = read_zarr(tmp_path / "s.zarr")
    assert backed.is_backed()
    with pytest.raises(ValueError, match="annotate"):
        st2he.pp.make_tiles(backed, "he_image", tile_size=48, key_added="cell_boundaries", overwrite=True)
    tiles = st2he.pp.make_tiles(backed, "he_image", tile_size=48, overwrite=True)
    assert len(backed.shapes["tiles"]) == len(tiles) == 16
    # nothing was deleted from (or written to) the store: the old tiles and the cells are there
    on_disk = read_zarr(tmp_path / "s.zarr")
    assert len(on_disk.shapes["tiles"]) == 4
    assert len(on_disk.shapes["cell_boundaries"]) == len(sample.shapes["cell_boundaries"])
    # saving is the user's step, e.g. to a new store
    backed.write(tmp_path / "new.zarr")
    assert len(read_zarr(tmp_path / "new.zarr").shapes["tiles"]) == 16


def test_evaluate_he_returns_the_values_it_stored(sample):
    st2he.pp.rasterize_transcripts(sample, pixel_size=2.0, palette="hue")
    st2he.tl.virtual_he(sample, method="stain")
    frame = st2he.tl.evaluate_he(sample, tile_size=24)
    table = sample.tables["he_metrics"]
    tiles = frame.drop(index=["mean_over_tiles", "overall"])
    assert list(tiles.index.astype(str)) == list(table.obs_names) == list(sample.shapes["he_metrics_tiles"].index)
    np.testing.assert_array_equal(tiles[["mse", "psnr", "ssim"]].to_numpy(), np.asarray(table.X))
    for row in ("overall", "mean_over_tiles"):
        assert frame.loc[row, ["mse", "psnr", "ssim"]].tolist() == pytest.approx(
            [table.uns[row][m] for m in ("mse", "psnr", "ssim")]
        )

