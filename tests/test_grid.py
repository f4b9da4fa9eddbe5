import numpy as np
import pytest
import spatialdata as sd
from spatialdata.transformations import get_transformation

from st2he._elements import add_image, check_key_free, get_image, get_params, record_params
from st2he._grid import Grid


def test_from_bounds_covers_points_on_the_far_edge():
    grid = Grid.from_bounds(1000.0, 1000.0, 1400.0, 1400.0, 0.5)
    assert grid.shape == (801, 801)
    row, col = grid.to_pixel(np.array([1000.0, 1400.0, 1000.49, 1000.5]), np.array([1000.0, 1400.0, 1000.0, 1000.0]))
    assert row.tolist() == [0, 800, 0, 0]
    assert col.tolist() == [0, 800, 0, 1]
    assert (row < grid.height).all() and (col < grid.width).all()


def test_transformation_maps_pixel_corners_to_micrometres():
    grid = Grid(1000.0, 2000.0, 0.25, 40, 80)
    matrix = grid.transformation().to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    # pixel corner (col=8, row=4) -> x = 1000 + 8 * 0.25, y = 2000 + 4 * 0.25
    np.testing.assert_allclose(matrix @ np.array([8, 4, 1]), [1002.0, 2001.0, 1.0])
    assert grid.bounds == (1000.0, 2000.0, 1020.0, 2010.0)
    sub = grid.crop(4, 10, 8, 100)
    assert (sub.x0, sub.y0, sub.shape) == (1002.0, 2001.0, (6, 72))


def test_invalid_grid_is_refused():
    with pytest.raises(ValueError, match="pixel_size"):
        Grid(0, 0, 0.0, 1, 1)
    with pytest.raises(ValueError, match="inverted"):
        Grid.from_bounds(10, 0, 0, 10, 1.0)


def test_add_image_round_trip_and_no_silent_overwrite(tmp_path):
    sdata = sd.SpatialData()
    grid = Grid(1000.0, 1000.0, 0.5, 600, 520)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 600, 520), dtype=np.uint8)
    add_image(sdata, "img", rgb, grid, params={"pixel_size": 0.5, "palette": {"EPCAM": "#ff0000"}})
    add_image(sdata, "other", rgb[::-1].copy(), grid)
    data, read_grid = get_image(sdata, "img")
    assert read_grid == grid
    np.testing.assert_array_equal(data.values, rgb)
    assert list(data.coords["c"].values) == ["r", "g", "b"]
    assert len(sdata.images["img"].children) == 2  # multiscale: 520 px short side -> one extra level

    with pytest.raises(KeyError, match="already exists"):
        add_image(sdata, "img", rgb, grid)
    with pytest.raises(KeyError, match="already exists"):
        check_key_free(sdata, "other")
    add_image(sdata, "img", 255 - rgb, grid, overwrite=True)
    np.testing.assert_array_equal(get_image(sdata, "img")[0].values, 255 - rgb)
    np.testing.assert_array_equal(get_image(sdata, "other")[0].values, rgb[::-1])

    store = tmp_path / "s.zarr"
    sdata.write(store)
    back = sd.read_zarr(store)
    assert get_params(back, "img") == {"pixel_size": 0.5, "palette": {"EPCAM": "#ff0000"}}
    assert get_image(back, "img")[1] == grid
    assert "global" in get_transformation(back.images["img"], get_all=True)


def test_get_image_names_what_exists():
    sdata = sd.SpatialData()
    add_image(sdata, "he_image", np.zeros((3, 8, 8), np.uint8), Grid(0, 0, 1.0, 8, 8))
    with pytest.raises(KeyError, match="he_image"):
        get_image(sdata, "virtual_he")
    record_params(sdata, "he_image", {"shape": (8, 8)})
    assert get_params(sdata, "he_image") == {"shape": [8, 8]}
