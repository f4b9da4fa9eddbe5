"""st2he.pp.make_tiles: square tiles over an image as a shapes element in global µm."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
from shapely.geometry import Point
from spatialdata import SpatialData
from spatialdata.models import ShapesModel
from spatialdata.transformations import Identity, get_transformation

import st2he
from st2he._elements import get_params, parse_image, record_params
from st2he._grid import Grid

GRID = Grid(x0=100.0, y0=50.0, pixel_size=0.5, height=100, width=130)


def _he(scale_factors=None) -> SpatialData:
    """A brightfield picture: tissue (pink) on the left 64 columns, white glass on the right."""
    img = np.full((3, GRID.height, GRID.width), 245, dtype=np.uint8)
    img[:, :, :64] = np.array([200, 120, 170], dtype=np.uint8)[:, None, None]
    return SpatialData(images={"he": parse_image(img, GRID, scale_factors=scale_factors, chunks=64)})


def test_grid_tiles_cover_the_image():
    sd = _he()
    tiles = st2he.pp.make_tiles(sd, "he", tile_size=32)
    assert "tiles" in sd.shapes
    # rows start at 0, 32, 64 and one flush with the bottom edge (68); columns 0, 32, 64, 96, 98
    assert len(tiles) == 4 * 5
    assert sorted(set(tiles["row0"])) == [0, 32, 64, 68] and sorted(set(tiles["col0"])) == [0, 32, 64, 96, 98]
    assert list(tiles["tile_id"]) == list(range(20))
    assert isinstance(get_transformation(sd.shapes["tiles"], "global"), Identity)
    # polygons in global µm: the tile's pixels through the image's transformation
    t = tiles.iloc[7]
    x0, y0, x1, y1 = t.geometry.bounds
    assert (x0, y0) == (GRID.x0 + t["col0"] * 0.5, GRID.y0 + t["row0"] * 0.5)
    assert (x1 - x0, y1 - y0) == (16.0, 16.0)
    covered = np.zeros(GRID.shape, bool)
    for r0, c0 in zip(tiles["row0"], tiles["col0"], strict=True):
        covered[r0 : r0 + 32, c0 : c0 + 32] = True
    assert covered.all()
    assert get_params(sd, "tiles")["tile_size"] == 32 and get_params(sd, "tiles")["tissue"] == "not_white"


def test_overlap_and_tissue_filter():
    sd = _he(scale_factors=[2])
    tiles = st2he.pp.make_tiles(sd, "he", tile_size=32, overlap=8, key_added="t")
    assert sorted(set(tiles["col0"])) == [0, 24, 48, 72, 96, 98]
    frac = dict(zip(tiles["col0"], tiles["tissue_fraction"], strict=False))
    assert frac[0] == pytest.approx(1.0) and frac[24] == pytest.approx(1.0)
    assert frac[48] == pytest.approx(0.5, abs=0.1)  # columns 48..80 straddle the tissue edge at 64
    assert frac[96] == pytest.approx(0.0)
    # by hand: starts every 32 - 8 = 24 px and one flush with the far edge; tissue fraction = the share of the
    # tile's 32 columns left of column 64; bounds = the image origin + start x 0.5 µm, 16 µm wide
    assert sorted(set(tiles["row0"])) == [0, 24, 48, 68] and len(tiles) == 4 * 6
    for t in tiles.itertuples():
        assert t.tissue_fraction == pytest.approx(max(0, min(t.col0 + 32, 64) - t.col0) / 32)
        x0, y0 = 100.0 + 0.5 * t.col0, 50.0 + 0.5 * t.row0
        assert t.geometry.bounds == pytest.approx((x0, y0, x0 + 16.0, y0 + 16.0))
    kept = st2he.pp.make_tiles(sd, "he", tile_size=32, overlap=8, min_tissue_fraction=0.6, key_added="k")
    assert set(kept["col0"]) == {0, 24} and (kept["tissue_fraction"] >= 0.6).all()
    assert get_params(sd, "k")["n_dropped"] == len(tiles) - len(kept)
    everything = st2he.pp.make_tiles(sd, "he", tile_size=32, tissue="none", min_tissue_fraction=1.0, key_added="n")
    assert len(everything) == 20


def test_input_picture_tissue_is_not_black():
    img = np.zeros((3, GRID.height, GRID.width), dtype=np.uint8)
    img[:, 60:, :] = 128  # stain in the bottom part
    sd = SpatialData(images={"st2he_input": parse_image(img, GRID)})
    record_params(sd, "st2he_input", {"style": "multicolor"})
    tiles = st2he.pp.make_tiles(sd, "st2he_input", tile_size=40, min_tissue_fraction=0.6)
    assert get_params(sd, "tiles")["tissue"] == "not_black"
    assert set(tiles["row0"]) == {60}


def test_tiles_centred_on_cells():
    sd = _he()
    cells = gpd.GeoDataFrame(geometry=[Point(110.0, 60.0), Point(130.0, 70.0), Point(100.5, 50.5)])
    sd.shapes["cells"] = ShapesModel.parse(cells.assign(radius=3.0), transformations={"global": Identity()})
    tiles = st2he.pp.make_tiles(sd, "he", tile_size=16, centers="cells", key_added="cell_tiles")
    assert len(tiles) == 3 and list(tiles["center_index"]) == [0, 1, 2]
    centre = tiles.iloc[0].geometry.centroid
    assert (centre.x, centre.y) == (110.0, 60.0)
    assert tuple(tiles.iloc[2][["row0", "col0"]]) == (0, 0)  # shifted inside the image
    arr = st2he.pp.make_tiles(sd, "he", tile_size=16, centers=np.array([[130.0, 70.0]]), key_added="arr")
    assert arr.iloc[0].geometry.equals(tiles.iloc[1].geometry)


def test_bad_input():
    sd = _he()
    with pytest.raises(KeyError, match="image_key='nope'"):
        st2he.pp.make_tiles(sd, "nope")
    with pytest.raises(ValueError, match="overlap"):
        st2he.pp.make_tiles(sd, "he", tile_size=16, overlap=16)
    with pytest.raises(ValueError, match="tile_size"):
        st2he.pp.make_tiles(sd, "he", tile_size=0)
    with pytest.raises(ValueError, match="min_tissue_fraction"):
        st2he.pp.make_tiles(sd, "he", min_tissue_fraction=2)
    with pytest.raises(KeyError, match="centers='cells'"):
        st2he.pp.make_tiles(sd, "he", centers="cells")
    st2he.pp.make_tiles(sd, "he", tile_size=64)
    with pytest.raises(KeyError, match="already exists"):
        st2he.pp.make_tiles(sd, "he", tile_size=32)
    assert len(sd.shapes["tiles"]) == 2 * 3
    assert len(st2he.pp.make_tiles(sd, "he", tile_size=32, overwrite=True)) == 20
    # an image smaller than a tile: one tile at its origin
    assert len(st2he.pp.make_tiles(sd, "he", tile_size=512, key_added="big")) == 1


def test_non_finite_centres_are_refused_naming_the_rows():
    sd = _he()
    centres = np.array([[110.0, 60.0], [np.nan, np.nan], [120.0, np.inf], [130.0, 70.0]])
    with pytest.raises(ValueError, match=r"2 of 4 rows .*rows 1, 2"):
        st2he.pp.make_tiles(sd, "he", tile_size=16, centers=centres, key_added="centred")
    assert "centred" not in sd  # nothing written, no tile at the origin
    # the finite rows alone give their tiles, and the call returns the element it stored
    tiles = st2he.pp.make_tiles(sd, "he", tile_size=16, centers=centres[[0, 3]], key_added="centred")
    assert tiles is sd.shapes["centred"]
    assert list(tiles["center_index"]) == [0, 1]
