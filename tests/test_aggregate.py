"""st2he.pp.aggregate_transcripts: counts of molecules per square bin, pseudo-Visium spot and cell, checked exactly."""

from __future__ import annotations

import math
import warnings

import dask.dataframe as dd
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from spatialdata import SpatialData
from spatialdata.models import PointsModel, ShapesModel
from spatialdata.transformations import Identity, Scale

import st2he
from st2he._elements import get_params
from st2he._units import table_keys
from st2he.pp import MoleculesDroppedWarning


def _points(
    x, y, genes, *, qv=None, npartitions=1, extra=None, transformations=None, instance_key=None, categorical=True
):
    genes = pd.Categorical(genes) if categorical else np.asarray(genes, dtype=object)
    df = pd.DataFrame({"x": np.asarray(x, float), "y": np.asarray(y, float), "gene": genes})
    if qv is not None:
        df["qv"] = np.asarray(qv, float)
    for k, v in (extra or {}).items():
        df[k] = v
    return PointsModel.parse(
        dd.from_pandas(df, npartitions=npartitions, sort=False),
        feature_key="gene",
        instance_key=instance_key,
        transformations=transformations,
    )


def _sdata(x, y, genes, *, shapes=None, **kwargs) -> SpatialData:
    return SpatialData(points={"transcripts": _points(x, y, genes, **kwargs)}, shapes=shapes or {})


def _counts(table) -> dict[tuple[str, str], int]:
    """``{(unit id, gene): count}`` of the non-zero entries of a table."""
    coo = table.X.tocoo()
    names, genes = table.obs_names, table.var_names
    return {(names[i], genes[j]): int(v) for i, j, v in zip(coo.row, coo.col, coo.data, strict=True) if v}


def _aggregate(sdata, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MoleculesDroppedWarning)
        return st2he.pp.aggregate_transcripts(sdata, **kwargs)


# ----------------------------------------------------------------------------------------------- bins


def test_bins_count_every_molecule_in_its_bin_edges_included_and_filtered_as_the_rasteriser():
    # 8 µm bins anchored at 0: a molecule on an edge counts in the bin to its right / below
    rows = [
        (0.0, 0.0, "A", 30.0),  # 0_0
        (7.999, 7.999, "A", 30.0),  # 0_0
        (8.0, 0.0, "A", 30.0),  # 0_1: on the edge
        (8.0, 8.0, "B", 30.0),  # 1_1
        (15.9, 8.0, "B", np.nan),  # 1_1: no quality value is kept
        (-0.5, 3.0, "A", 20.0),  # 0_-1: qv == min_qv is kept
        (-8.0, -8.0, "C", 40.0),  # -1_-1
        (-8.001, -8.0, "C", 40.0),  # -1_-2
        (100.0, 40.0, "A", 19.9),  # low quality: dropped
        (4.0, 4.0, "BLANK_0001", 40.0),  # control probe by name: dropped
        (4.0, 4.0, "C", 40.0),  # control probe by the is_control column: dropped
        (np.nan, 4.0, "A", 40.0),  # non-finite: dropped
    ]
    x, y, g, q = (list(c) for c in zip(*rows, strict=True))
    control = [False] * len(rows)
    control[10] = True
    sdata = _sdata(x, y, g, qv=q, npartitions=3, extra={"is_control": control})
    report = r"kept 8 of 12 molecules; dropped 4: 2 control probes, 1 with qv < 20, 1 with NaN"
    with pytest.warns(MoleculesDroppedWarning, match=report):
        table = st2he.pp.aggregate_transcripts(sdata, by="bins", bin_size=8.0)
    assert "bins_8um" in sdata.shapes and sdata.tables["bins_8um_table"] is table
    assert _counts(table) == {
        ("0_0", "A"): 2,
        ("0_1", "A"): 1,
        ("1_1", "B"): 2,
        ("0_-1", "A"): 1,
        ("-1_-1", "C"): 1,
        ("-1_-2", "C"): 1,
    }
    # units sorted by row then column; ids, grid positions, centroids, areas
    assert list(table.obs_names) == ["-1_-2", "-1_-1", "0_-1", "0_0", "0_1", "1_1"]
    assert list(table.obs["instance_id"]) == list(table.obs_names)
    assert table.obs["array_row"].tolist() == [-1, -1, 0, 0, 0, 1]
    assert table.obs["array_col"].tolist() == [-2, -1, -1, 0, 1, 1]
    assert table.obs["total_counts"].tolist() == [1, 1, 1, 2, 1, 2]
    np.testing.assert_array_equal(table.obs["area_um2"], 64.0)
    expected_centres = [[-12, -4], [-4, -4], [-4, 4], [4, 4], [12, 4], [12, 12]]
    np.testing.assert_array_equal(table.obsm["spatial"], expected_centres)
    assert list(table.var_names) == ["A", "B", "C"]  # sorted, controls left out
    assert table.X.format == "csr" and table.X.dtype == np.float32
    # the shapes: 8 µm squares indexed by the same ids, annotated by the table
    shapes = sdata.shapes["bins_8um"]
    assert list(shapes.index) == list(table.obs_names)
    np.testing.assert_array_equal(shapely.bounds(shapes.geometry.values)[0], [-16, -8, -8, 0])
    np.testing.assert_array_equal(shapely.area(shapes.geometry.values), 64.0)
    regions, region_key, instance_key = table_keys(table)
    assert (regions, region_key, instance_key) == (["bins_8um"], "region", "instance_id")
    molecules = get_params(sdata, "bins_8um_table")["molecules"]
    assert molecules["kept"] == molecules["counted"] == 8
    assert (molecules["dropped_controls"], molecules["dropped_low_qv"], molecules["dropped_nonfinite"]) == (2, 1, 1)
    assert table.uns["st2he"]["molecules"]["counted"] == 8


def test_bins_min_counts_and_genes_and_what_is_left_out_is_accounted_for():
    x = [1.0, 2.0, 3.0, 9.0, 9.5, 17.0]
    y = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    g = ["A", "B", "A", "A", "C", "B"]
    sdata = _sdata(x, y, g)
    table = _aggregate(sdata, by="bins", bin_size=8, genes=["B", "A"], min_counts=2, key_added="t", shapes_added="b")
    # genes in the order given; bin 0_1 holds one A (C is not counted) -> below min_counts; 0_2 one B -> below
    assert list(table.var_names) == ["B", "A"]
    assert _counts(table) == {("0_0", "A"): 2, ("0_0", "B"): 1}
    m = table.uns["st2he"]["molecules"]
    assert (m["kept"], m["counted"], m["in_units_below_min_counts"], m["other_genes"], m["outside_units"]) == (
        6,
        3,
        2,
        1,
        0,
    )
    assert list(sdata.shapes["b"].index) == ["0_0"]


def _reference_bins(df: pd.DataFrame, bin_size: float, min_qv: float = 20.0) -> dict[tuple[str, str], int]:
    """The NumPy model: filter as documented, then count by floor(x / bin_size), floor(y / bin_size)."""
    control = df["gene"].astype(str).str.match(r"(?i)^(blank|negcontrol)")
    keep = np.isfinite(df["x"]) & np.isfinite(df["y"]) & ~control & ~(df["qv"] < min_qv)
    d = df[keep]
    rows = np.floor(d["y"].to_numpy() / bin_size).astype(int)
    cols = np.floor(d["x"].to_numpy() / bin_size).astype(int)
    ids = [f"{r}_{c}" for r, c in zip(rows, cols, strict=True)]
    index = pd.MultiIndex.from_arrays([ids, d["gene"].astype(str)])
    return pd.Series(1, index=index).groupby(level=[0, 1]).sum().to_dict()


def test_bins_match_a_numpy_model_and_transcript_density_on_random_molecules():
    rng = np.random.default_rng(3)
    n = 20000
    x = rng.uniform(-50, 150, n)
    y = rng.uniform(-30, 90, n)
    x[:500] = np.round(x[:500] / 4) * 4  # many on bin edges
    genes = rng.choice(["A", "B", "C", "BLANK_1"], n)
    qv = rng.uniform(0, 40, n)
    sdata = _sdata(x, y, genes, qv=qv, npartitions=4)
    df = pd.DataFrame({"x": x, "y": y, "gene": genes, "qv": qv})
    for bin_size in (2.0, 8.0, 16.0):
        table = _aggregate(sdata, by="bins", bin_size=bin_size, overwrite=True)
        assert _counts(table) == _reference_bins(df, bin_size)
    # genes as plain strings (no categories known before reading): the same table
    strings = _sdata(x, y, genes, qv=qv, npartitions=4, categorical=False)
    assert _counts(_aggregate(strings, by="bins", bin_size=16.0)) == _reference_bins(df, 16.0)
    # the same molecules through the rasteriser's density image on the same lattice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MoleculesDroppedWarning)
        st2he.pp.transcript_density(sdata, pixel_size=16.0, region=(-64, -32, 160, 96), key_added="density")
    density = np.asarray(sdata.images["density"].sel(c="total").values)
    table = sdata.tables["bins_16um_table"]
    grid = np.zeros_like(density)
    grid[table.obs["array_row"] + 2, table.obs["array_col"] + 4] = table.obs["total_counts"]
    np.testing.assert_array_equal(grid, density)


def test_bins_through_the_points_transformation_and_in_another_coordinate_system():
    # points in pixels of 0.5 µm: their µm positions decide the bins; the units are written in µm with an identity
    px = np.array([0.0, 15.9, 16.0, 40.0])
    py = np.array([0.0, 0.0, 0.0, 17.0])
    scale = Scale([0.5, 0.5], axes=("x", "y"))
    sdata = _sdata(px, py, ["A"] * 4, transformations={"global": scale, "pixels": Identity()})
    table = _aggregate(sdata, by="bins", bin_size=8.0)
    assert _counts(table) == {("0_0", "A"): 2, ("0_1", "A"): 1, ("1_2", "A"): 1}
    from spatialdata.transformations import get_transformation

    assert isinstance(get_transformation(sdata.shapes["bins_8um"], "global"), Identity)
    pixels = _aggregate(sdata, by="bins", bin_size=8.0, coordinate_system="pixels", key_added="p", shapes_added="pb")
    assert _counts(pixels) == {("0_0", "A"): 1, ("0_1", "A"): 1, ("0_2", "A"): 1, ("2_5", "A"): 1}
    assert set(get_transformation(sdata.shapes["pb"], get_all=True)) == {"pixels"}
    with pytest.raises(ValueError, match="no transformation to the coordinate system 'aligned'"):
        _aggregate(sdata, by="bins", coordinate_system="aligned", key_added="q", shapes_added="qb")


# ----------------------------------------------------------------------------------------------- spots


def _centre(row, col, spacing=100.0):
    return (col + (row % 2) / 2) * spacing, row * spacing * math.sqrt(3) / 2


def test_spots_count_molecules_inside_their_disk_only():
    r = 27.5
    cases = []  # (x, y, gene, expected spot id or None)
    x0, y0 = _centre(0, 0)
    cases += [(x0, y0, "A", "0_0"), (x0 + r, y0, "A", "0_0"), (x0, y0 - r, "B", "0_0")]  # centre and edges
    cases += [(x0 + r + 1e-6, y0, "A", None), (50.0, 0.0, "A", None)]  # just beyond; between two spots
    x1, y1 = _centre(1, 0)  # odd row: shifted by half a spacing
    cases += [(x1, y1, "B", "1_0"), (x1 - r, y1, "B", "1_0"), (x1 + 20.0, y1 + 15.0, "A", "1_0")]
    x2, y2 = _centre(-1, -1)
    cases += [(x2 + 3.0, y2 - 4.0, "C", "-1_-1")]
    x3, y3 = _centre(2, 3)
    cases += [(x3 - 19.0, y3 + 19.0, "C", "2_3"), (x3 - 20.0, y3 + 20.0, "C", None)]  # 26.87 in, 28.28 out
    cases += [(x0 + 10.0, y0 + 10.0, "BLANK_7", None)]  # a control inside a spot: dropped
    x, y, g, want = (list(c) for c in zip(*cases, strict=True))
    sdata = _sdata(x, y, g, npartitions=2)
    table = _aggregate(sdata, by="spots", spot_diameter=55.0, spot_spacing=100.0)
    expected: dict[tuple[str, str], int] = {}
    for gene, spot in zip(g, want, strict=True):
        if spot is not None:
            expected[(spot, gene)] = expected.get((spot, gene), 0) + 1
    assert _counts(table) == expected
    assert list(table.obs_names) == ["-1_-1", "0_0", "1_0", "2_3"]
    assert table.obs["array_row"].tolist() == [-1, 0, 1, 2]
    assert table.obs["array_col"].tolist() == [-1, 0, 0, 3]
    centres = np.array([_centre(-1, -1), _centre(0, 0), _centre(1, 0), _centre(2, 3)])
    np.testing.assert_allclose(table.obsm["spatial"], centres, rtol=0, atol=1e-9)
    np.testing.assert_allclose(table.obs["area_um2"], math.pi * r * r)
    m = table.uns["st2he"]["molecules"]
    assert (m["kept"], m["counted"], m["outside_units"], m["dropped_controls"]) == (11, 8, 3, 1)
    # spatialdata's circles: points at the centres with a radius column
    shapes = sdata.shapes["spots_55um"]
    assert list(shapes.index) == list(table.obs_names)
    assert (shapely.get_type_id(shapes.geometry.values) == 0).all()
    np.testing.assert_allclose(shapely.get_coordinates(shapes.geometry.values), centres, atol=1e-9)
    np.testing.assert_array_equal(shapes["radius"], r)


def test_touching_spots_give_a_molecule_where_they_meet_to_the_lower_row_then_column():
    # diameter == spacing: disks of one row touch halfway between centres
    sdata = _sdata([50.0, 150.0], [0.0, 0.0], ["A", "A"])
    table = _aggregate(sdata, by="spots", spot_diameter=100.0, spot_spacing=100.0)
    assert _counts(table) == {("0_0", "A"): 1, ("0_1", "A"): 1}


def test_spots_match_brute_force_distances_on_random_molecules():
    rng = np.random.default_rng(7)
    n = 20000
    x, y = rng.uniform(-120, 420, n), rng.uniform(-90, 380, n)
    genes = rng.choice(["A", "B"], n)
    sdata = _sdata(x, y, genes, npartitions=3)
    diameter, spacing = 55.0, 100.0
    table = _aggregate(sdata, by="spots", spot_diameter=diameter, spot_spacing=spacing)
    # every centre of the lattice near the molecules, every distance
    rr, cc = np.meshgrid(np.arange(-3, 8), np.arange(-3, 7), indexing="ij")
    cx, cy = _centre(rr.ravel(), cc.ravel())
    d2 = (x[:, None] - cx[None]) ** 2 + (y[:, None] - cy[None]) ** 2
    hit = d2 <= (diameter / 2) ** 2
    assert hit.sum(axis=1).max() == 1  # disks do not overlap
    idx = np.flatnonzero(hit.any(axis=1))
    spot = hit[idx].argmax(axis=1)
    ids = [f"{rr.ravel()[k]}_{cc.ravel()[k]}" for k in spot]
    expected = pd.Series(1, index=pd.MultiIndex.from_arrays([ids, genes[idx]])).groupby(level=[0, 1]).sum().to_dict()
    assert _counts(table) == expected


# ----------------------------------------------------------------------------------------------- cells


def _cells() -> dict:
    squares = gpd.GeoDataFrame(
        geometry=[shapely.box(0, 0, 10, 10), shapely.box(10, 0, 20, 10), shapely.box(30, 30, 40, 40)],
        index=pd.Index(["c1", "c2", "c3"]),
    )
    return {"cells": ShapesModel.parse(squares, transformations={"global": Identity()})}


def test_cells_by_position_edges_to_the_first_cell_outside_to_none_and_every_cell_kept():
    x = [5.0, 10.0, 15.0, 20.0, 25.0, 5.0, 0.0]
    y = [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 10.0]
    g = ["A", "A", "B", "B", "A", "BLANK_1", "B"]
    sdata = _sdata(x, y, g, shapes=_cells(), npartitions=2)
    table = _aggregate(sdata, by="cells", shapes_key="cells")
    # x=10 lies on the edge c1 and c2 share: the first cell; x=20 on c2's edge; x=25 in no cell; corner (0, 10) in c1
    assert _counts(table) == {("c1", "A"): 2, ("c1", "B"): 1, ("c2", "B"): 2}
    assert list(table.obs_names) == ["c1", "c2", "c3"]  # every cell, in the shapes' order, c3 without molecules
    assert table.obs["total_counts"].tolist() == [3, 2, 0]
    np.testing.assert_array_equal(table.obs["area_um2"], [100.0, 100.0, 100.0])
    np.testing.assert_array_equal(table.obsm["spatial"], [[5, 5], [15, 5], [35, 35]])
    assert "array_row" not in table.obs
    assert table_keys(table) == (["cells"], "region", "instance_id")
    assert set(sdata.shapes) == {"cells"}  # nothing new written for cells
    m = table.uns["st2he"]["molecules"]
    assert (m["cells_by"], m["kept"], m["counted"], m["outside_units"]) == ("position", 6, 5, 1)


def test_cells_without_kept_molecules_give_a_table_of_zeros():
    sdata = _sdata([5.0, 15.0], [5.0, 5.0], ["A", "BLANK_2"], qv=[5.0, 30.0], shapes=_cells())
    table = _aggregate(sdata, by="cells", shapes_key="cells")
    assert table.shape == (3, 1) and table.X.nnz == 0
    assert table.obs["total_counts"].tolist() == [0, 0, 0]
    assert list(table.var_names) == ["A"]


def test_cells_of_circles_count_molecules_within_the_radius():
    circles = gpd.GeoDataFrame({"radius": [5.0, 2.0]}, geometry=shapely.points([[0, 0], [20, 0]]), index=["s1", "s2"])
    shapes = {"circles": ShapesModel.parse(circles, transformations={"global": Identity()})}
    sdata = _sdata([3.0, 5.0, 5.001, 21.0, 22.0, 22.1], [4.0, 0.0, 0.0, 1.0, 0.0, 0.0], ["A"] * 6, shapes=shapes)
    table = _aggregate(sdata, by="cells", shapes_key="circles")
    assert _counts(table) == {("s1", "A"): 2, ("s2", "A"): 2}
    np.testing.assert_allclose(table.obs["area_um2"], [25 * math.pi, 4 * math.pi])
    np.testing.assert_array_equal(table.obsm["spatial"], [[0, 0], [20, 0]])


def test_cells_by_the_points_cell_ids_with_unassigned_values_and_ids_of_other_cells():
    # positions say one thing, ids another: the ids win when they name the cells
    x = [5.0, 5.0, 5.0, 5.0, 5.0, 35.0, 50.0]
    y = [5.0, 5.0, 5.0, 5.0, 5.0, 35.0, 5.0]
    g = ["A", "B", "A", "A", "B", "B", "A"]
    ids = ["c2", "c2", "UNASSIGNED", "c9", "c1", "c3", "c1"]
    sdata = _sdata(x, y, g, shapes=_cells(), extra={"cell_id": ids}, instance_key="cell_id", npartitions=3)
    table = _aggregate(sdata, by="cells", shapes_key="cells")
    assert _counts(table) == {("c2", "A"): 1, ("c2", "B"): 1, ("c1", "B"): 1, ("c3", "B"): 1, ("c1", "A"): 1}
    m = table.uns["st2he"]["molecules"]
    assert (m["cells_by"], m["counted"], m["outside_units"], m["cell_ids_not_in_shapes"]) == ("cell_id", 5, 2, 1)
    assert table.uns["st2he"]["cell_id_column"] == "cell_id"
    # the same molecules by position
    by_position = _aggregate(sdata, by="cells", shapes_key="cells", cell_id_column=None, key_added="pos")
    assert _counts(by_position) == {("c1", "A"): 3, ("c1", "B"): 2, ("c3", "B"): 1}
    # nuclei carry their cell's id, but only the molecules inside them are theirs: placed by position
    sdata["nucleus_boundaries"] = _cells()["cells"]
    nuclei = _aggregate(sdata, by="cells", shapes_key="nucleus_boundaries", key_added="nuc")
    assert nuclei.uns["st2he"]["molecules"]["cells_by"] == "position"
    assert _counts(nuclei) == _counts(by_position)


def test_cells_with_an_empty_geometry_are_kept_by_id_never_by_position_and_say_so():
    """A degenerate segmentation (an empty outline): the cell stays a row; its centroid is NaN; nothing crashes."""
    squares = _cells()["cells"].copy()
    squares.loc["c2", "geometry"] = shapely.Polygon()
    shapes = {"cells": ShapesModel.parse(squares)}
    x, y, g = [5.0, 15.0, 15.0, 35.0], [5.0, 5.0, 5.0, 35.0], ["A", "A", "B", "B"]
    sdata = _sdata(x, y, g, shapes=shapes)
    with pytest.warns(UserWarning, match=r"1 of the 3 shapes of shapes_key='cells' have an empty geometry \(e\.g\. "
                      r"\['c2'\]\)"):
        table = _aggregate(sdata, by="cells", shapes_key="cells")
    assert _counts(table) == {("c1", "A"): 1, ("c3", "B"): 1}  # the molecules at x = 15 lie in no cell now
    assert list(table.obs_names) == ["c1", "c2", "c3"] and table.obs["total_counts"].tolist() == [1, 0, 1]
    np.testing.assert_array_equal(table.obsm["spatial"], [[5, 5], [np.nan, np.nan], [35, 35]])
    # by the molecules' cell ids the empty cell keeps its molecules
    sdata = _sdata(x, y, g, shapes=shapes, extra={"cell_id": ["c1", "c2", "c2", "c3"]}, instance_key="cell_id")
    with pytest.warns(UserWarning, match="empty geometry"):
        by_id = _aggregate(sdata, by="cells", shapes_key="cells")
    assert _counts(by_id) == {("c1", "A"): 1, ("c2", "A"): 1, ("c2", "B"): 1, ("c3", "B"): 1}


def test_cells_by_integer_ids_where_0_and_minus_1_mean_no_cell():
    squares = gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 10, 10), shapely.box(10, 0, 20, 10)], index=[1, 2])
    shapes = {"cells": ShapesModel.parse(squares, transformations={"global": Identity()})}
    ids = np.array([1, 2, 2, 0, -1, 7], dtype=np.int64)
    sdata = _sdata([1.0] * 6, [1.0] * 6, ["A"] * 6, shapes=shapes, extra={"cell_id": ids})
    table = _aggregate(sdata, by="cells", shapes_key="cells")
    assert _counts(table) == {("1", "A"): 1, ("2", "A"): 2}
    assert table.obs["instance_id"].tolist() == [1, 2]  # the shapes' own index values
    assert table.uns["st2he"]["molecules"]["cell_ids_not_in_shapes"] == 1  # 7; 0 and -1 are unassigned


def test_cell_ids_that_name_no_shape_are_not_used_and_a_named_column_that_matches_nothing_fails():
    ids = ["x1", "x2", "x3"]
    sdata = _sdata([5.0, 15.0, 50.0], [5.0, 5.0, 5.0], ["A", "A", "A"], shapes=_cells(), extra={"cell_id": ids})
    table = _aggregate(sdata, by="cells", shapes_key="cells")
    assert table.uns["st2he"]["molecules"]["cells_by"] == "position"
    assert _counts(table) == {("c1", "A"): 1, ("c2", "A"): 1}
    with pytest.raises(ValueError, match="No value of the points' cell_id_column='cell_id' names a shape"):
        _aggregate(sdata, by="cells", shapes_key="cells", cell_id_column="cell_id", key_added="t2")
    with pytest.raises(KeyError, match="cell_id_column='cell' is not a column"):
        _aggregate(sdata, by="cells", shapes_key="cells", cell_id_column="cell", key_added="t2")
    assert "t2" not in sdata.tables


# ----------------------------------------------------------------------------------------------- label transfer


def test_labels_transfer_the_value_of_the_region_holding_each_centroid():
    regions = gpd.GeoDataFrame(
        {"tissue": ["tumour", "stroma"], "score": [1.5, 2.5]},
        geometry=[shapely.box(0, 0, 16, 16), shapely.box(16, 0, 40, 8)],
        index=["r1", "r2"],
    )
    shapes = {"regions": ShapesModel.parse(regions, transformations={"global": Identity()})}
    sdata = _sdata([1.0, 9.0, 17.0, 33.0, 60.0], [1.0, 9.0, 1.0, 1.0, 1.0], ["A"] * 5, shapes=shapes)
    table = _aggregate(sdata, by="bins", bin_size=8.0, labels_key="regions", labels_column="tissue")
    labels = dict(zip(table.obs_names, table.obs["tissue"], strict=True))
    assert labels["0_0"] == "tumour" and labels["1_1"] == "tumour"
    assert labels["0_2"] == "stroma" and labels["0_4"] == "stroma"
    assert pd.isna(labels["0_7"])  # outside every region
    assert isinstance(table.obs["tissue"].dtype, pd.CategoricalDtype)
    scores = _aggregate(sdata, by="bins", labels_key="regions", labels_column="score", key_added="s", shapes_added="sb")
    assert list(scores.obs_names) == ["0_0", "0_2", "0_4", "0_7", "1_1"]
    np.testing.assert_array_equal(scores.obs["score"], [1.5, 2.5, 2.5, np.nan, 1.5])


# ----------------------------------------------------------------------------------------------- the simulated sample


@pytest.fixture(scope="module")
def simulated():
    return st2he.datasets.synthetic_tissue(0)


def test_simulated_cells_by_cell_id_equal_the_simulated_table(simulated):
    # the simulation's table counts the molecules of each cell with qv >= 20, control probes left out
    sdata = simulated
    ref = sdata.tables["table"]
    table = _aggregate(sdata, by="cells", shapes_key="cell_boundaries", key_added="cells_sim", overwrite=True)
    assert table.uns["st2he"]["molecules"]["cells_by"] == "cell_id"
    assert list(table.obs_names) == list(ref.obs_names)
    assert sorted(table.var_names) == sorted(ref.var_names)
    np.testing.assert_array_equal(table[:, ref.var_names].X.toarray(), ref.X.toarray())
    np.testing.assert_array_equal(table.obs["total_counts"], ref.obs["transcript_counts"])
    # areas and centroids of the cell polygons
    geoms = sdata.shapes["cell_boundaries"].geometry.values
    np.testing.assert_allclose(table.obs["area_um2"], shapely.area(geoms))
    np.testing.assert_allclose(table.obsm["spatial"], shapely.get_coordinates(shapely.centroid(geoms)))
    # by position the polygons decide: the same but for molecules near the drawn edges
    by_position = _aggregate(
        sdata, by="cells", shapes_key="cell_boundaries", cell_id_column=None, key_added="cells_pos", overwrite=True
    )
    moved = np.abs(by_position[:, ref.var_names].X.toarray() - ref.X.toarray()).sum()
    assert moved < 0.002 * ref.X.sum()


def test_simulated_bins_and_spots_count_every_kept_molecule_once(simulated):
    sdata = simulated
    df = sdata.points["transcripts"].compute()
    kept = df[~df["is_control"] & (df["qv"] >= 20)]
    bins = _aggregate(sdata, by="bins", bin_size=16.0, labels_key="regions", labels_column="tissue", overwrite=True)
    assert bins.X.sum() == len(kept)
    expected = _reference_bins(df, 16.0)
    assert _counts(bins) == expected
    # each bin's label is that of the first region covering its centre
    centre = shapely.points(bins.obsm["spatial"])
    expected_label = np.full(len(centre), None, dtype=object)
    for _, region in sdata.shapes["regions"].iterrows():
        hit = shapely.covers(region.geometry, centre) & pd.isna(expected_label)
        expected_label[hit] = region["tissue"]
    got = bins.obs["tissue"].astype(object)
    assert [None if pd.isna(v) else v for v in got] == list(expected_label)
    assert bins.obs["tissue"].notna().mean() > 0.9
    spots = _aggregate(sdata, by="spots", overwrite=True)
    m = spots.uns["st2he"]["molecules"]
    assert m["counted"] + m["outside_units"] == len(kept) and spots.X.sum() == m["counted"] > 0


# ----------------------------------------------------------------------------------------------- real Xenium data


def test_xenium_crop_by_cells_and_bins(shared_data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = st2he.io.read_xenium(shared_data / "xenium_cellline_crop")
    ref = sdata.tables["table"]  # cell_feature_matrix.h5 of the whole run
    table = _aggregate(sdata, by="cells", shapes_key="cell_boundaries")
    m = table.uns["st2he"]["molecules"]
    assert (m["total"], m["dropped_controls"], m["kept"]) == (5260, 3, 5257)
    assert m["cells_by"] == "cell_id"
    # the crop's transcripts.parquet is a sample of about 1 in 9 of the run's molecules (5,260 against the matrix's
    # 45,726 in these cells): every count is at most the matrix's, and the cells' totals follow the matrix's
    assert sorted(table.var_names) == sorted(ref.var_names)
    ours = table[ref.obs_names, ref.var_names].X.toarray()
    theirs = ref.X.toarray()
    assert (ours <= theirs).all()
    assert np.corrcoef(ours.sum(axis=1), theirs.sum(axis=1))[0, 1] > 0.85
    df = sdata.points["transcripts"].compute()
    in_cells = df["cell_id"].isin(set(ref.obs_names)) & ~df["is_control"]
    assert ours.sum() == m["counted"] == in_cells.sum()  # 9 UNASSIGNED and 19 of cells beyond the crop left out
    bins = _aggregate(sdata, by="bins", bin_size=8.0)
    assert bins.X.sum() == 5257
    assert bins.uns["st2he"]["molecules"]["counted"] == 5257


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_input_fails_with_specific_errors_and_nothing_lost():
    sdata = _sdata([1.0, 9.0], [1.0, 1.0], ["A", "B"], shapes=_cells())
    with pytest.raises(KeyError, match=r"points_key='spots' is not a points element.*\['transcripts'\]"):
        _aggregate(sdata, points_key="spots")
    with pytest.raises(KeyError, match=r"shapes_key='cell_boundaries' is not a shapes element.*\['cells'\]"):
        _aggregate(sdata, by="cells", shapes_key="cell_boundaries")
    with pytest.raises(ValueError, match="by='cells' needs shapes_key"):
        _aggregate(sdata, by="cells")
    with pytest.raises(ValueError, match="by must be one of"):
        _aggregate(sdata, by="hexagons")
    for bad in (0, -8.0, np.nan, "8"):
        with pytest.raises(ValueError, match="bin_size must be a positive number"):
            _aggregate(sdata, bin_size=bad)
    with pytest.raises(ValueError, match=r"spot_diameter \(101 µm\) is larger than spot_spacing \(100 µm\)"):
        _aggregate(sdata, by="spots", spot_diameter=101.0)
    with pytest.raises(ValueError, match="min_counts must be a whole number >= 1"):
        _aggregate(sdata, min_counts=0)
    with pytest.raises(ValueError, match=r"1 gene\(s\) are not in the panel.*'Z'"):
        _aggregate(sdata, genes=["A", "Z"])
    with pytest.raises(TypeError, match="genes must be a list of gene names"):
        _aggregate(sdata, genes={"AB": ["A", "B"]})
    with pytest.raises(ValueError, match="labels_key and labels_column go together"):
        _aggregate(sdata, labels_key="cells")
    with pytest.raises(KeyError, match="labels_column='tissue' is not a column"):
        _aggregate(sdata, labels_key="cells", labels_column="tissue")
    with pytest.raises(ValueError, match="shapes_key is for by='cells'"):
        _aggregate(sdata, by="bins", shapes_key="cells")
    assert set(sdata.shapes) == {"cells"} and not sdata.tables  # nothing written by any of these

    first = _aggregate(sdata, by="bins")
    shapes_before = sdata.shapes["bins_8um"]
    sdata2 = _sdata([30.0], [1.0], ["A"])
    sdata["transcripts"] = sdata2["transcripts"]
    with pytest.raises(KeyError, match="already exists"):
        _aggregate(sdata, by="bins")
    assert sdata.tables["bins_8um_table"] is first and sdata.shapes["bins_8um"] is shapes_before
    # a table named like the new shapes, and the new shapes named like an existing element of another type
    with pytest.raises(ValueError, match="name the table differently"):
        _aggregate(sdata, by="bins", key_added="u", shapes_added="u")
    with pytest.raises(KeyError, match="names a points element"):
        _aggregate(sdata, by="bins", shapes_added="transcripts", key_added="u")
    assert sdata.tables["bins_8um_table"] is first
    # overwrite replaces both together
    again = _aggregate(sdata, by="bins", overwrite=True)
    assert _counts(again) == {("0_3", "A"): 1}
    assert list(sdata.shapes["bins_8um"].index) == ["0_3"]
    # shapes another table annotates are never replaced through another name
    with pytest.raises(ValueError, match="annotate"):
        _aggregate(sdata, by="bins", key_added="other_table", overwrite=True)
    # an empty result writes nothing
    with pytest.raises(ValueError, match="No bin holds 5 or more molecules"):
        _aggregate(sdata, by="bins", min_counts=5, key_added="v", shapes_added="vb")
    assert "v" not in sdata and "vb" not in sdata


def test_tables_survive_a_zarr_round_trip(tmp_path):
    from spatialdata import read_zarr

    sdata = _sdata([1.0, 9.0, 60.0], [1.0, 1.0, 1.0], ["A", "B", "A"], shapes=_cells())
    _aggregate(sdata, by="bins")
    _aggregate(sdata, by="spots")
    _aggregate(sdata, by="cells", shapes_key="cells")
    sdata.write(tmp_path / "s.zarr")
    back = read_zarr(tmp_path / "s.zarr")
    for key in ("bins_8um_table", "spots_55um_table", "cells_table"):
        assert _counts(back.tables[key]) == _counts(sdata.tables[key])
        assert list(back.tables[key].obs["instance_id"]) == list(sdata.tables[key].obs["instance_id"])
    np.testing.assert_array_equal(back.shapes["spots_55um"]["radius"], 27.5)
    assert get_params(back, "bins_8um_table")["molecules"]["counted"] == 3


def test_cells_in_pixels_are_placed_in_micrometres_and_repeated_ids_are_refused():
    # cell polygons stored in pixels of 0.5 µm: box(0, 0, 20, 20) px is 10 x 10 µm
    squares = gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 20, 20), shapely.box(20, 0, 40, 20)], index=["a", "b"])
    scale = Scale([0.5, 0.5], axes=("x", "y"))
    shapes = {"cells": ShapesModel.parse(squares, transformations={"global": scale})}
    sdata = _sdata([5.0, 9.9, 10.1, 25.0], [5.0, 5.0, 5.0, 5.0], ["A"] * 4, shapes=shapes)
    table = _aggregate(sdata, by="cells", shapes_key="cells")
    assert _counts(table) == {("a", "A"): 2, ("b", "A"): 1}
    np.testing.assert_array_equal(table.obs["area_um2"], [100.0, 100.0])
    np.testing.assert_array_equal(table.obsm["spatial"], [[5, 5], [15, 5]])
    twice = gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 1, 1), shapely.box(2, 0, 3, 1)], index=["a", "a"])
    sdata["twice"] = ShapesModel.parse(twice, transformations={"global": Identity()})
    with pytest.raises(ValueError, match=r"'twice' has repeated index values \(e.g. \['a'\]\)"):
        _aggregate(sdata, by="cells", shapes_key="twice")


def test_the_molecules_are_read_partition_by_partition_never_whole(monkeypatch):
    rng = np.random.default_rng(5)
    n = 3000
    x, y = rng.uniform(0, 40, n), rng.uniform(0, 40, n)
    ids = np.where(x < 20, "c1", "UNASSIGNED")
    sdata = _sdata(x, y, rng.choice(["A", "B"], n), shapes=_cells(), npartitions=6, extra={"cell_id": ids})
    expected = {by: _counts(_aggregate(sdata, by=by, **kw)) for by, kw in (("bins", {}), ("spots", {}))}

    def whole(*args, **kwargs):
        raise AssertionError("the whole points element was computed")

    monkeypatch.setattr(dd.DataFrame, "compute", whole)
    monkeypatch.setattr(dd.Series, "compute", whole)
    import dask

    seen = []
    real = dask.compute

    def one_partition(*args, **kwargs):
        (part,) = args
        out = real(part, **kwargs)
        seen.append(len(out[0]))
        return out

    monkeypatch.setattr(dask, "compute", one_partition)
    for by, kw in (("bins", {}), ("spots", {}), ("cells", {"shapes_key": "cells"})):
        seen.clear()
        table = _aggregate(sdata, by=by, key_added=f"{by}_again", shapes_added=None if by == "cells" else by, **kw)
        if by != "cells":
            assert _counts(table) == expected[by]
        # each read is one partition (cells also read one partition of the cell ids to choose how to assign)
        assert len(seen) == 6 + (by == "cells") and max(seen) <= n // 6 + 1
