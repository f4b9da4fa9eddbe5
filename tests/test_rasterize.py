"""st2he.pp.rasterize_transcripts, transcript_density and the lazy layers other modules reuse."""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
import warnings

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from spatialdata import SpatialData
from spatialdata.models import PointsModel, ShapesModel
from spatialdata.transformations import Identity, Scale

import st2he
from st2he._elements import get_params, parse_image
from st2he._grid import Grid, _scale0
from st2he.pp._palette import hex_to_rgb
from st2he.pp._rasterize import density_layer, nuclear_stain_layer

PALETTE = {"A": "#ff0000", "B": "#00ff00", "C": "#0000ff"}


def _points(x, y, genes, *, qv=None, npartitions=1, extra=None, transformations=None):
    df = pd.DataFrame({"x": np.asarray(x, float), "y": np.asarray(y, float), "gene": pd.Categorical(genes)})
    if qv is not None:
        df["qv"] = np.asarray(qv, float)
    for k, v in (extra or {}).items():
        df[k] = v
    return PointsModel.parse(
        dd.from_pandas(df, npartitions=npartitions), feature_key="gene", transformations=transformations
    )


def _sdata(x, y, genes, **kwargs) -> SpatialData:
    return SpatialData(points={"transcripts": _points(x, y, genes, **kwargs)})


def _image(sdata, key="st2he_input") -> np.ndarray:
    return np.asarray(_scale0(sdata.images[key]).values)


def _random_sdata(n=3000, seed=0, side=60.0, npartitions=3) -> SpatialData:
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(0, side, n), rng.uniform(0, side, n)
    genes = rng.choice(list(PALETTE), n)
    return _sdata(x, y, genes, npartitions=npartitions)


# ----------------------------------------------------------------------------------------------- positions


def test_molecules_land_in_the_expected_pixels_with_their_colours():
    # pixel size 1 µm, region 0..10: pixel (row, col) covers y in [row, row + 1), x in [col, col + 1)
    xs = [0.0, 0.5, 3.0, 2.9999, 9.99, 10.0, 7.25]
    ys = [0.0, 0.5, 4.0, 4.0, 9.99, 10.0, 1.0]
    genes = ["A", "B", "C", "A", "B", "C", "A"]
    sd = _sdata(xs, ys, genes)
    st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=1.0, region=(0, 0, 10, 10), stain_key=None)
    img = _image(sd)
    # a molecule exactly on the far edge of the region still gets a pixel: the grid grows by one
    assert img.shape == (3, 11, 11)
    expected = {
        (0, 0): "A",  # corner: (0, 0) and (0.5, 0.5) share pixel (0, 0); see below
        (4, 3): "C",  # exactly on a pixel edge: belongs to the pixel that starts there
        (4, 2): "A",  # just before the edge
        (9, 9): "B",
        (10, 10): "C",  # exactly on the region's far edge
        (1, 7): "A",
    }
    drawn = np.argwhere(img.any(axis=0))
    assert {tuple(p) for p in drawn} == set(expected)
    for (r, c), gene in expected.items():
        if (r, c) == (0, 0):
            # two molecules (A and B) in one pixel: one of them, not a blend
            assert tuple(img[:, r, c]) in {hex_to_rgb(PALETTE["A"]), hex_to_rgb(PALETTE["B"])}
        else:
            assert tuple(img[:, r, c]) == hex_to_rgb(PALETTE[gene])


def test_image_overlays_the_molecules_exactly():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(12.3, 47.9, 500), rng.uniform(-20.1, 3.3, 500)
    genes = rng.choice(list(PALETTE), 500)
    sd = _sdata(x, y, genes)
    st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=0.7, stain_key=None)
    grid = Grid.from_element(sd.images["st2he_input"])
    img = _image(sd)
    rows, cols = grid.to_pixel(x, y)
    assert rows.min() >= 0 and cols.min() >= 0 and rows.max() < grid.height and cols.max() < grid.width
    # the pixel's global bounds (from the element's own transformation) contain its molecule
    assert np.all(grid.x0 + cols * grid.pixel_size <= x) and np.all(x < grid.x0 + (cols + 1) * grid.pixel_size)
    assert np.all(grid.y0 + rows * grid.pixel_size <= y) and np.all(y < grid.y0 + (rows + 1) * grid.pixel_size)
    assert img[:, rows, cols].any(axis=0).all()
    assert img.any(axis=0).sum() == len(set(zip(rows.tolist(), cols.tolist(), strict=True)))
    # colours: a pixel whose molecules are all of one gene has that gene's palette colour; a shared pixel one of them
    genes_at: dict[tuple[int, int], set[str]] = {}
    for r, c, g in zip(rows.tolist(), cols.tolist(), genes, strict=True):
        genes_at.setdefault((r, c), set()).add(str(g))
    assert sum(len(v) == 1 for v in genes_at.values()) > 350
    for (r, c), here in genes_at.items():
        assert tuple(img[:, r, c]) in {hex_to_rgb(PALETTE[g]) for g in here}, (r, c, here)


def test_points_transformation_is_applied():
    # molecules stored in instrument pixels of 0.5 µm; the picture is placed in global µm
    sd = _sdata(
        [2.0, 10.0, 1.0],
        [4.0, 6.0, 1.0],
        ["A", "B", "C"],
        transformations={"global": Scale([0.5, 0.5], axes=("x", "y"))},
    )
    st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=1.0, region=(0, 0, 8, 8), stain_key=None)
    img = _image(sd)
    assert tuple(img[:, 2, 1]) == hex_to_rgb(PALETTE["A"])  # (1, 2) µm
    assert tuple(img[:, 3, 5]) == hex_to_rgb(PALETTE["B"])  # (5, 3) µm


# ----------------------------------------------------------------------------------------------- determinism


def test_same_pixels_across_calls_chunks_regions_and_molecule_order():
    sd = _random_sdata()
    st2he.pp.rasterize_transcripts(sd, pixel_size=0.5, region=(0, 0, 60, 60), chunk=32, dot_size=3, key_added="a")
    st2he.pp.rasterize_transcripts(sd, pixel_size=0.5, region=(0, 0, 60, 60), chunk=50, dot_size=3, key_added="b")
    a, b = _image(sd, "a"), _image(sd, "b")
    np.testing.assert_array_equal(a, b)
    assert get_params(sd, "a")["palette"] == get_params(sd, "b")["palette"]
    # two overlapping regions on the same pixel lattice draw identical pixels where they overlap
    st2he.pp.rasterize_transcripts(sd, pixel_size=0.5, region=(10, 20, 40, 50), chunk=16, dot_size=3, key_added="c")
    c = _image(sd, "c")
    np.testing.assert_array_equal(c[:, 2:-2, 2:-2], a[:, 40 + 2 : 40 + 61 - 2, 20 + 2 : 20 + 61 - 2])
    # the order of the molecules does not matter (several molecules per pixel pick the same winner)
    pts = sd.points["transcripts"].compute().sample(frac=1.0, random_state=3)
    shuffled = _sdata(pts["x"], pts["y"], pts["gene"].astype(str), npartitions=4)
    st2he.pp.rasterize_transcripts(
        shuffled, pixel_size=0.5, region=(0, 0, 60, 60), chunk=64, dot_size=3, palette=get_params(sd, "a")["palette"]
    )
    np.testing.assert_array_equal(_image(shuffled), a)
    # nor does the order of the gene categories (the genes' codes): priorities come from the genes' names
    df = pts.assign(gene=pd.Categorical(pts["gene"].astype(str), categories=["C", "B", "A"]))
    recoded = SpatialData(
        points={"transcripts": PointsModel.parse(dd.from_pandas(df, npartitions=2), feature_key="gene")}
    )
    st2he.pp.rasterize_transcripts(
        recoded, pixel_size=0.5, region=(0, 0, 60, 60), chunk=64, dot_size=3, palette=get_params(sd, "a")["palette"]
    )
    np.testing.assert_array_equal(_image(recoded), a)


@pytest.mark.parametrize("shared", [False, True], ids=["private", "spill_dir"])
def test_spilled_buckets_read_back_the_same(tmp_path, shared):
    from st2he.pp._molecules import bin_molecules, molecule_source

    sd = _random_sdata(n=5000, npartitions=4)
    grid = Grid.from_bounds(0, 0, 60, 60, 0.5)
    source = molecule_source(sd)
    in_memory = bin_molecules(source, grid, chunk=40)
    spilled = bin_molecules(source, grid, chunk=40, memory_limit=0, spill_dir=str(tmp_path) if shared else None)
    assert in_memory.spill_fd is None and spilled.spill_fd is not None
    assert len(spilled.parts) == 4 and all(p.fd is not None for p in spilled.parts)
    assert sorted(in_memory.index) == sorted(spilled.index) == [(0, 0)]  # 120 x 120 pixels: one 256 px block
    offsets, codes = spilled.block(0, 0)
    assert len(offsets) == in_memory.report.kept == spilled.report.kept
    for a, b in zip(in_memory.block(0, 0), (offsets, codes), strict=True):
        np.testing.assert_array_equal(a, b)
    # the offsets are the molecules' pixels, the codes their genes
    kept = source.points.compute()
    kept = kept[kept["qv"] >= 20] if "qv" in kept else kept
    rows, cols = grid.to_pixel(kept["x"].to_numpy(), kept["y"].to_numpy())
    assert sorted((rows * 256 + cols).tolist()) == sorted(offsets.tolist())
    names = np.asarray(spilled.genes)[codes]
    assert sorted(zip((rows * 256 + cols).tolist(), kept[source.gene_column].astype(str), strict=True)) == sorted(
        zip(offsets.tolist(), names.tolist(), strict=True)
    )
    # pickled for a worker process: the same molecules, by the file's name in a spill_dir, else by value
    copy = pickle.loads(pickle.dumps(spilled))
    assert all(p.fd is None and (p.packed is None) == shared for p in copy.parts)
    for a, b in zip(copy.block(0, 0), (offsets, codes), strict=True):
        np.testing.assert_array_equal(a, b)
    fd = spilled.spill_fd
    if shared:  # a named file, for the workers
        assert [f.name for f in tmp_path.iterdir()] == [os.path.basename(copy.parts[0].path)]
    else:  # unlinked as soon as it was opened: nothing is left behind even if the process is killed
        assert os.fstat(fd).st_nlink == 0
    del spilled, copy
    gc.collect()
    assert not any(tmp_path.iterdir())  # the files go with the object
    with pytest.raises(OSError):
        os.fstat(fd)  # and the descriptor is closed


def test_killed_runs_leave_no_spill_files(tmp_path):
    # a run killed after spilling (os._exit: no finalizers, no atexit) leaves nothing in the temporary folder
    code = (
        "import os, dask.dataframe as dd, pandas as pd\n"
        "from spatialdata import SpatialData\n"
        "from spatialdata.models import PointsModel\n"
        "from st2he.pp._molecules import bin_molecules, molecule_source\n"
        "df = pd.DataFrame({'x': [1.0, 2.0], 'y': [1.0, 2.0], 'gene': pd.Categorical(['A', 'B'])})\n"
        "pts = PointsModel.parse(dd.from_pandas(df, npartitions=1), feature_key='gene')\n"
        "binned = bin_molecules(molecule_source(SpatialData(points={'transcripts': pts})), pixel_size=1.0, "
        "memory_limit=0)\n"
        "assert binned.spill_fd is not None\n"
        "os._exit(0)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("st2he")] == []
    # in a spill_dir the workers share, files of runs that died on this machine are removed at the next spill
    from st2he.pp._molecules import _spill_name, bin_molecules, molecule_source

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    stale = tmp_path / _spill_name("0" * 32, pid=int(dead.stdout))
    elsewhere = tmp_path / f"st2he-molecules-another.host-{int(dead.stdout)}-{'0' * 32}.bin"
    stale.write_bytes(b"\0" * 8)
    elsewhere.write_bytes(b"\0" * 8)
    binned = bin_molecules(molecule_source(_random_sdata(n=100)), pixel_size=1.0, memory_limit=0, spill_dir=tmp_path)
    assert not stale.exists() and elsewhere.exists()  # another machine's run may still be alive
    assert len(binned.parts) > 0 and binned.parts[0].path is not None


def test_pictures_from_spilled_buckets_and_any_chunking_are_the_same(monkeypatch):
    import st2he.pp._molecules as molecules

    sd = _random_sdata(n=20_000, side=300.0, npartitions=5)  # 600 x 600 pixels: 3 x 3 blocks of 256 px
    st2he.pp.rasterize_transcripts(sd, pixel_size=0.5, chunk=1024, key_added="memory")
    # every bucket spilled to disk, and chunks that do not line up with the 256 px blocks
    defaults = molecules.bin_molecules.__kwdefaults__
    monkeypatch.setitem(defaults, "memory_limit", 0)
    palette = get_params(sd, "memory")["palette"]
    st2he.pp.rasterize_transcripts(sd, pixel_size=0.5, chunk=100, palette=palette, key_added="disk")
    np.testing.assert_array_equal(_image(sd, "disk"), _image(sd, "memory"))
    assert get_params(sd, "disk")["molecules"] == get_params(sd, "memory")["molecules"]
    assert _image(sd, "memory").any(axis=0).sum() > 15_000


def test_molecules_absurdly_far_apart_name_the_problem():
    sd = _sdata([1.0, 2.0, 5e7], [1.0, 2.0, 5e7], ["A", "B", "C"])
    with pytest.raises(ValueError, match=r"far from the others.*region=") as err:
        st2he.pp.rasterize_transcripts(sd, pixel_size=0.5)
    assert "'transcripts'" in str(err.value) and "5e+07" in str(err.value)
    # with a region, the stray molecule is simply outside it
    st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=0.5, region=(0, 0, 10, 10))
    assert get_params(sd, "st2he_input")["molecules"]["outside_region"] == 1
    # a stray molecule in a partition of its own: the picture would be absurdly large
    sd = _sdata([1.0, 2.0, 5e7], [1.0, 2.0, 5e7], ["A", "B", "C"], npartitions=3)
    with pytest.raises(ValueError, match=r"would be .* pixels .* x 1\.\.5e\+07"):
        st2he.pp.rasterize_transcripts(sd, pixel_size=0.5)


def test_dot_size_draws_discs():
    sd = _sdata([5.5], [5.5], ["A"])
    st2he.pp.rasterize_transcripts(sd, palette="hue", pixel_size=1.0, region=(0, 0, 11, 11), dot_size=3, stain_key=None)
    mask = _image(sd).any(axis=0)
    assert mask.sum() == 9 and mask[4:7, 4:7].all()
    st2he.pp.rasterize_transcripts(
        sd, palette="hue", pixel_size=1.0, region=(0, 0, 11, 11), dot_size=5, stain_key=None, overwrite=True
    )
    mask = _image(sd).any(axis=0)
    assert mask[5, 3:8].all() and mask[3:8, 5].all() and not mask[3, 3] and mask.sum() == 21


# ----------------------------------------------------------------------------------------------- styles, stain


def _with_stain(sd: SpatialData, side=30.0, ps=0.25) -> SpatialData:
    n = int(side / ps)
    yy, xx = np.mgrid[0:n, 0:n]
    img = ((xx // int(5 / ps) + yy // int(5 / ps)) % 2 * 1000 + 100).astype(np.uint16)  # 5 µm checkerboard
    sd.images["morphology_focus"] = parse_image(img[None], Grid(0.0, 0.0, ps, n, n), c_coords=["DAPI"])
    return sd


def test_styles_and_stain_background():
    sd = _with_stain(_sdata([2.2, 7.7, 20.5], [2.2, 2.2, 20.5], ["A", "B", "C"]))
    st2he.pp.rasterize_transcripts(sd, style="stain", pixel_size=1.0, key_added="stain")
    stain = _image(sd, "stain")
    assert stain.shape == (3, 30, 30)
    assert (stain[0] == stain[1]).all() and (stain[1] == stain[2]).all()  # grey
    # bright where the checkerboard is bright: squares (0, 5) and (5, 0) µm
    assert stain[0, 2, 7] == 255 and stain[0, 2, 2] == 0 and stain[0, 7, 2] == 255
    st2he.pp.rasterize_transcripts(sd, style="single", color="yellow", pixel_size=1.0, key_added="single")
    single = _image(sd, "single")
    assert tuple(single[:, 2, 2]) == (255, 255, 0) and tuple(single[:, 2, 7]) == (255, 255, 0)
    np.testing.assert_array_equal(single[:, 10:20, :], stain[:, 10:20, :])
    st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=1.0, key_added="multi")
    # each molecule's pixel has its gene's palette colour, every other pixel the grey stain background
    multi = _image(sd, "multi")
    at = {(2, 2): "A", (2, 7): "B", (20, 20): "C"}
    for (r, c), gene in at.items():
        assert tuple(multi[:, r, c]) == hex_to_rgb(PALETTE[gene])
    elsewhere = np.ones(multi.shape[1:], bool)
    elsewhere[tuple(np.array(list(at)).T)] = False
    np.testing.assert_array_equal(multi[:, elsewhere], stain[:, elsewhere])
    params = get_params(sd, "multi")
    assert params["stain_key"] == "morphology_focus" and params["style"] == "multicolor"
    assert params["palette"] == PALETTE and params["pixel_size"] == 1.0


def test_nuclear_stain_layer_resamples_and_normalises():
    sd = _with_stain(_sdata([1.0], [1.0], ["A"]))
    grid = Grid(0.0, 0.0, 0.5, 60, 60)
    layer = nuclear_stain_layer(sd, grid, chunk=16)
    assert layer.dtype == np.float32 and layer.shape == (60, 60) and layer.chunksize == (16, 16)
    v = layer.compute()
    assert v.min() >= 0 and v.max() <= 1
    assert v[5, 15] == 1.0 and v[5, 5] == 0.0  # centres of a bright and a dark 5 µm square
    # outside the image: zeros
    outside = nuclear_stain_layer(sd, Grid(100.0, 100.0, 1.0, 8, 8)).compute()
    assert (outside == 0).all()


def test_nuclei_from_boundaries_when_there_is_no_stain_image():
    from shapely.geometry import Polygon

    sd = _sdata([1.0], [1.0], ["A"])
    nuclei = ShapesModel.parse(
        __import__("geopandas").GeoDataFrame(geometry=[Polygon([(2, 2), (6, 2), (6, 6), (2, 6)])]),
        transformations={"global": Identity()},
    )
    sd.shapes["nucleus_boundaries"] = nuclei
    v = nuclear_stain_layer(sd, Grid(0.0, 0.0, 1.0, 10, 10), chunk=4).compute()
    assert v[2:6, 2:6].all() and v.sum() == 16
    st2he.pp.rasterize_transcripts(sd, style="stain", pixel_size=1.0, region=(0, 0, 9.5, 9.5))
    assert get_params(sd, "st2he_input")["stain_key"] == "nucleus_boundaries"
    assert _image(sd)[0, 3, 3] == 255 and _image(sd)[0, 8, 8] == 0


def test_nuclei_from_labels_when_there_is_no_stain_image():
    from spatialdata.models import Labels2DModel

    labels = np.zeros((20, 20), np.int32)
    labels[4:8, 4:8] = 3  # a nucleus covering 8..16 µm: the labels have 2 µm pixels
    sd = _sdata([1.0], [1.0], ["A"])
    sd.labels["nucleus_labels"] = Labels2DModel.parse(
        labels, dims=("y", "x"), transformations={"global": Scale([2.0, 2.0], axes=("y", "x"))}
    )
    v = nuclear_stain_layer(sd, Grid(0.0, 0.0, 1.0, 40, 40), chunk=16).compute()
    assert v[9:15, 9:15].min() == 1.0 and v[:6].max() == 0.0 and v[20:].max() == 0.0
    assert v.sum() == pytest.approx(64.0)


def test_no_stain_at_all_gives_a_black_background_and_zeros():
    sd = _sdata([1.0], [1.0], ["A"])
    assert (nuclear_stain_layer(sd, Grid(0, 0, 1.0, 5, 5)).compute() == 0).all()
    st2he.pp.rasterize_transcripts(sd, palette={"A": "red"}, pixel_size=1.0, region=(0, 0, 4.5, 4.5))
    img = _image(sd)
    assert img.any(axis=0).sum() == 1 and get_params(sd, "st2he_input")["stain_key"] is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_output_is_a_multiscale_rgb_image_that_writes_and_reads(tmp_path):
    from spatialdata import read_zarr

    sd = _random_sdata(n=20000, side=400)
    st2he.pp.rasterize_transcripts(sd, pixel_size=0.5, chunk=256)
    element = sd.images["st2he_input"]
    assert "scale1" in element.children  # 800 px: a pyramid
    data = _scale0(element)
    assert list(data.coords["c"].values) == ["r", "g", "b"] and data.dtype == np.uint8
    assert data.data.chunksize == (3, 256, 256)
    sd.write(tmp_path / "s.zarr")
    back = read_zarr(tmp_path / "s.zarr")
    np.testing.assert_array_equal(_image(back), _image(sd))
    assert get_params(back, "st2he_input")["palette"] == get_params(sd, "st2he_input")["palette"]


# ----------------------------------------------------------------------------------------------- filtering


def test_controls_low_qv_and_nonfinite_are_dropped_and_reported():
    x = [1.0, 2.0, 3.0, np.nan, np.inf, 6.0, 7.0]
    y = [1.0] * 7
    genes = ["A", "BLANK_0001", "NegControlProbe_1", "A", "B", "B", "C"]
    qv = [30, 30, 30, 30, 30, 10, np.nan]  # NaN: no quality value, kept
    sd = _sdata(x, y, genes, qv=qv, npartitions=2)
    with pytest.warns(UserWarning) as record:
        st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=1.0, region=(0, 0, 9.5, 2.5))
    report = get_params(sd, "st2he_input")["molecules"]
    assert report["total"] == 7 and report["kept"] == 2
    assert report["dropped_controls"] == 2 and report["dropped_low_qv"] == 1 and report["dropped_nonfinite"] == 2
    (message,) = [str(w.message) for w in record if "dropped" in str(w.message)]  # one report, all reasons
    assert "kept 2 of 7 molecules; dropped 5: 2 control probes, 1 with qv < 20, 2 with NaN or infinite" in message
    img = _image(sd)
    assert img.any(axis=0).sum() == 2 and tuple(img[:, 1, 1]) == hex_to_rgb("#ff0000")
    # a boolean control column counts too; min_qv=None keeps low quality
    sd = _sdata([1.0, 2.0], [1.0, 1.0], ["A", "B"], qv=[5, 5], extra={"is_control": [True, False]})
    st2he.pp.rasterize_transcripts(sd, palette="hue", pixel_size=1.0, min_qv=None, region=(0, 0, 3, 2))
    assert get_params(sd, "st2he_input")["molecules"]["kept"] == 1


def test_genes_subset_and_controls_kept_when_asked():
    sd = _sdata([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], ["A", "B", "BLANK_1"])
    st2he.pp.rasterize_transcripts(
        sd, palette={"A": "#ff0000", "B": "#00ff00"}, genes=["A"], pixel_size=1.0, region=(0, 0, 4, 2)
    )
    assert _image(sd).any(axis=0).sum() == 1 and get_params(sd, "st2he_input")["palette"] == {"A": "#ff0000"}
    st2he.pp.rasterize_transcripts(
        sd, palette="hue", drop_controls=False, pixel_size=1.0, region=(0, 0, 4, 2), overwrite=True
    )
    assert _image(sd).any(axis=0).sum() == 3 and "BLANK_1" in get_params(sd, "st2he_input")["palette"]


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_input():
    sd = _sdata([1.0], [1.0], ["A"])
    with pytest.raises(KeyError, match="points_key='missing'"):
        st2he.pp.rasterize_transcripts(sd, points_key="missing")
    no_genes = SpatialData(points={"transcripts": PointsModel.parse(pd.DataFrame({"x": [1.0], "y": [1.0]}))})
    with pytest.raises(ValueError, match="no gene column"):
        st2he.pp.rasterize_transcripts(no_genes)
    # without genes a single-colour picture is still possible
    st2he.pp.rasterize_transcripts(no_genes, style="single", pixel_size=1.0, region=(0, 0, 2, 2))
    assert _image(no_genes).any(axis=0).sum() == 1
    with pytest.raises(ValueError, match="not in the panel.*'D'"):
        st2he.pp.rasterize_transcripts(sd, palette={"A": "red", "D": "blue"})
    with pytest.raises(ValueError, match="no colour for 1 gene"):
        st2he.pp.rasterize_transcripts(_sdata([1.0, 2.0], [1.0, 1.0], ["A", "B"]), palette={"A": "red"})
    with pytest.raises(ValueError, match="style"):
        st2he.pp.rasterize_transcripts(sd, style="sketch")
    with pytest.raises(ValueError, match="palette must be"):
        st2he.pp.rasterize_transcripts(sd, palette="rainbow")
    with pytest.raises(ValueError, match="pixel_size"):
        st2he.pp.rasterize_transcripts(sd, pixel_size=0)
    with pytest.raises(ValueError, match="dot_size"):
        st2he.pp.rasterize_transcripts(sd, dot_size=0)
    with pytest.raises(ValueError, match="twice the chunk"):
        st2he.pp.rasterize_transcripts(sd, dot_size=70, chunk=32)
    with pytest.raises(ValueError, match="region"):
        st2he.pp.rasterize_transcripts(sd, region=(0, 0, 1))


def test_nonfinite_only_and_empty_region_are_refused_or_show_the_stain():
    sd = _sdata([np.nan, 5.0], [1.0, 5.0], ["A", "B"])
    # a region with neither molecules nor stain would be a black picture: an error naming both extents
    with pytest.raises(ValueError, match=r"region=\(100, 100, 110, 110\) µm.*lie in x 5..5, y 5..5 µm"):
        st2he.pp.rasterize_transcripts(sd, palette="hue", pixel_size=1.0, region=(100, 100, 110, 110))
    assert "st2he_input" not in sd.images
    with pytest.warns(UserWarning, match="kept 1 of 2 molecules; dropped 1: 1 with NaN or infinite coordinates"):
        st2he.pp.rasterize_transcripts(sd, palette="hue", pixel_size=1.0, region=(0, 0, 10, 10))
    assert get_params(sd, "st2he_input")["molecules"]["outside_region"] == 0
    # with a stain image, an empty region shows the stain only
    sd = _with_stain(_sdata([1.0], [1.0], ["A"]))
    with pytest.warns(UserWarning, match="holds no kept molecule, so the picture shows the stain alone"):
        st2he.pp.rasterize_transcripts(sd, palette="hue", pixel_size=1.0, region=(10, 10, 19.5, 19.5))
    assert (_image(sd)[0] == _image(sd)[1]).all() and _image(sd).any()


def test_existing_key_is_an_error_unless_overwrite_and_nothing_is_lost():
    sd = _with_stain(_sdata([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], ["A", "B", "C"]))
    before = set(sd.images) | set(sd.points)
    with pytest.raises(KeyError, match="already exists"):
        st2he.pp.rasterize_transcripts(sd, key_added="morphology_focus")
    assert set(sd.images) | set(sd.points) == before
    assert _scale0(sd.images["morphology_focus"]).dtype == np.uint16  # untouched
    st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=1.0)
    first = _image(sd).copy()
    with pytest.raises(KeyError, match="overwrite=True"):
        st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=2.0)
    np.testing.assert_array_equal(_image(sd), first)
    st2he.pp.rasterize_transcripts(sd, palette=PALETTE, pixel_size=2.0, overwrite=True)
    assert _image(sd).shape[1] == first.shape[1] // 2
    assert set(sd.images) | set(sd.points) == before | {"st2he_input"}


# ----------------------------------------------------------------------------------------------- density


def test_transcript_density_counts_equal_bincount():
    rng = np.random.default_rng(4)
    n = 5000
    x, y = rng.uniform(0, 20, n), rng.uniform(0, 10, n)
    genes = rng.choice(list(PALETTE), n)
    sd = _sdata(x, y, genes, npartitions=3)
    grid = Grid.from_bounds(0, 0, 20, 10, 0.5)
    rows, cols = grid.to_pixel(x, y)

    def counts(mask):
        flat = np.bincount(rows[mask] * grid.width + cols[mask], minlength=grid.height * grid.width)
        return flat.reshape(grid.shape)

    total = density_layer(sd, grid, chunk=7)
    assert total.shape == (1, *grid.shape) and total.dtype == np.float32
    np.testing.assert_array_equal(total.compute()[0], counts(np.ones(n, bool)))
    per_gene = density_layer(sd, grid, genes=["C", "A"], chunk=16).compute()
    np.testing.assert_array_equal(per_gene[0], counts(genes == "C"))
    np.testing.assert_array_equal(per_gene[1], counts(genes == "A"))
    groups = density_layer(sd, grid, genes={"AB": ["A", "B"], "BC": ["B", "C"]}).compute()
    np.testing.assert_array_equal(groups[0], counts(genes != "C"))
    np.testing.assert_array_equal(groups[1], counts(genes != "A"))

    st2he.pp.transcript_density(
        sd, genes={"AB": ["A", "B"], "C": ["C"]}, pixel_size=0.5, region=(0, 0, 20, 10), dtype="uint16"
    )
    element = sd.images["transcript_density"]
    assert list(element.coords["c"].values) == ["AB", "C"] and element.dtype == np.uint16
    np.testing.assert_array_equal(element.values[1], counts(genes == "C"))
    assert Grid.from_element(element) == grid
    with pytest.raises(ValueError, match="not in the panel.*'Z'"):
        density_layer(sd, grid, genes=["A", "Z"])


# ----------------------------------------------------------------------------------------------- real crops


def _check_crop(sd, *, min_controls=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st2he.pp.rasterize_transcripts(sd, pixel_size=0.5)
    params = get_params(sd, "st2he_input")
    report = params["molecules"]
    assert report["total"] == len(sd.points["transcripts"])
    assert report["dropped_controls"] >= min_controls
    assert (
        report["kept"]
        == report["total"]
        - report["dropped_controls"]
        - report["dropped_low_qv"]
        - report["dropped_nonfinite"]
        - report["dropped_missing_gene"]
    )
    assert report["outside_region"] == 0
    img = _image(sd)
    grid = Grid.from_element(sd.images["st2he_input"])
    colours = {hex_to_rgb(c) for c in params["palette"].values()}
    flat = img.reshape(3, -1).T
    coloured = np.array([tuple(p) in colours for p in map(tuple, flat)])
    # every kept molecule is in a coloured pixel; pixels with several molecules make the count a little lower
    pts = sd.points["transcripts"].compute()
    genes = pts["gene"].astype(str)
    kept = genes.isin(list(params["palette"])) & ~pts["is_control"].to_numpy(bool)
    if "qv" in pts and pts["qv"].notna().any():
        kept &= ~(pts["qv"] < 20)
    rows, cols = grid.to_pixel(pts["x"].to_numpy()[kept], pts["y"].to_numpy()[kept])
    assert kept.sum() == report["kept"]
    unique_pixels = len(set(zip(rows.tolist(), cols.tolist(), strict=True)))
    assert coloured.sum() == unique_pixels
    assert coloured.reshape(grid.shape)[rows, cols].all()
    return pts, kept, rows, cols, grid


@pytest.mark.filterwarnings("ignore:.*(pixel size|µm per pixel).*:UserWarning")
def test_real_xenium_crop(shared_data):
    sd = st2he.io.read_xenium(shared_data / "xenium_cellline_crop")
    pts, kept, rows, cols, grid = _check_crop(sd)
    assert get_params(sd, "st2he_input")["stain_key"] == "morphology_focus"
    # alignment: molecules the instrument puts over a nucleus land in the nuclei drawn from its boundaries
    nuclei = nuclear_stain_layer(sd, grid, stain_key="nucleus_boundaries").compute()
    over = pts["overlaps_nucleus"].to_numpy()[kept] == 1
    assert nuclei[rows[over], cols[over]].mean() > 0.85 and nuclei[rows[~over], cols[~over]].mean() < 0.1
    # and the grey DAPI background is bright in those nuclei; shifting it away lowers the agreement
    stain = nuclear_stain_layer(sd, grid).compute()
    assert stain[nuclei > 0].mean() > stain[nuclei == 0].mean() + 0.15

    def agreement(dy, dx):
        return np.corrcoef(np.roll(stain, (dy, dx), (0, 1)).ravel(), nuclei.ravel())[0, 1]

    here = agreement(0, 0)
    assert here > 0.3
    assert all(agreement(dy, dx) < here * 0.6 for dy, dx in [(20, 0), (0, 20), (-20, -20)])  # 10 µm shifts


@pytest.mark.filterwarnings("ignore:.*(pixel size|µm per pixel).*:UserWarning")
def test_real_merscope_crop(shared_data):
    sd = st2he.io.read_merscope(shared_data / "merscope_brain_cancer_crop")
    _check_crop(sd, min_controls=1)  # Blank-* barcodes
    assert get_params(sd, "st2he_input")["stain"]["stain_channel"] == "DAPI"
    # the grey background is the DAPI mosaic: bright where the mosaic is bright
    img = _image(sd)
    grey = img[0] == img[1]
    assert img[0][grey].max() == 255 and img[0][grey].min() == 0


@pytest.mark.filterwarnings("ignore:.*(pixel size|µm per pixel).*:UserWarning")
def test_real_cosmx_crop(shared_data):
    sd = st2he.io.read_cosmx(shared_data / "cosmx_mouse_brain_quarter")
    _check_crop(sd, min_controls=1)  # NegPrb*


def _compose_in_bands(compose, h, w, winners, band=16):
    """A ``(3, h, w)`` chunk composed as the rasteriser does, ``band`` rows at a time."""
    out = np.empty((3, h, w), np.uint8)
    for r0 in range(0, h, band):
        compose(out, r0, winners[r0 * w : min(h, r0 + band) * w])
    return out


def test_composing_over_the_stain_on_the_fly_equals_composing_over_the_resampled_stain():
    from st2he.pp._kernels import compose_rows, compose_rows_resampled, lut_planes, resample_bilinear, resampling_state
    from st2he.pp._rasterize import _axis_weights, _source_window

    def compose_rgb(grey, winners, planes, h, w):
        return _compose_in_bands(lambda out, r0, band: compose_rows(grey, band, planes, out, r0), h, w, winners)

    def compose_rgb_resampled(window, *resampling, winners, planes, h, w):
        state = resampling_state(w, window[4])  # carried from one band to the next

        def compose(out, r0, band):
            compose_rows_resampled(window, *resampling, band, planes, out, r0, *state)

        return _compose_in_bands(compose, h, w, winners)

    rng = np.random.default_rng(5)
    win = rng.integers(0, 4000, (70, 90)).astype(np.uint16)  # a DAPI window of 0.425 µm pixels
    h, w = 50, 64  # an output chunk of 0.5 µm pixels, partly outside the window
    i0y, i1y, wy, iny = _axis_weights(2.0, h, 0.5, 0.0, 0.425, 70)
    i0x, i1x, wx, inx = _axis_weights(-3.0, w, 0.5, 0.0, 0.425, 90)
    lo, scale = np.float32(100.0), np.float32(1.0 / 3000.0)
    winners = np.where(rng.random(h * w) < 0.3, rng.integers(0, 5, h * w), -1).astype(np.int32)
    planes = lut_planes(rng.integers(0, 256, (5, 3)))
    grey = resample_bilinear(win, i0y, i1y, wy, iny, i0x, i1x, wx, inx, lo, scale)
    assert grey.min() == 0.0 and grey.max() == 1.0 and (grey[:, : int(np.argmax(inx))] == 0).all()
    expected = compose_rgb(grey, winners, planes, h, w)
    args = (i0y, i1y, wy, iny, i0x, i1x, wx, inx, lo, scale)
    kw = {"winners": winners, "planes": planes, "h": h, "w": w}
    got = compose_rgb_resampled(_source_window(win, 1), *args, **kw)
    np.testing.assert_array_equal(got, expected)
    # the window read in place from the source chunks it overlaps (2 x 2, 2 x 1, 1 x 2), never assembled; over
    # 3 x 3 chunks, assembled
    big = np.zeros((100, 130), np.uint16)
    big[17:87, 23:113] = win  # the window within a source chunked by ys x xs pixels
    for ys, xs in ((50, 60), (200, 60), (50, 200), (40, 50)):
        yb, xb = [0, *range(ys, 100, ys), 100], [0, *range(xs, 130, xs), 130]
        chunks = [
            [big[a:b, c:d].copy() for c, d in zip(xb[:-1], xb[1:], strict=True)]
            for a, b in zip(yb[:-1], yb[1:], strict=True)
        ]
        rows = [i for i in range(len(yb) - 1) if yb[i] < 87 and yb[i + 1] > 17]
        cols = [j for j in range(len(xb) - 1) if xb[j] < 113 and xb[j + 1] > 23]
        cut = (
            [(max(17, yb[i]) - yb[i], min(87, yb[i + 1]) - yb[i]) for i in rows],
            [(max(23, xb[j]) - xb[j], min(113, xb[j + 1]) - xb[j]) for j in cols],
        )
        window = ([[chunks[i][j] for j in cols] for i in rows], cut)
        pieces = _source_window(window, 1)
        in_place = len(rows) <= 2 and len(cols) <= 2
        assert (pieces[0][0] is not pieces[0][3]) == in_place and (len(rows), len(cols)) != (1, 1)
        np.testing.assert_array_equal(compose_rgb_resampled(pieces, *args, **kw), expected)
        for row in window[0]:  # chunks read from a read-only file
            for chunk in row:
                chunk.flags.writeable = False
        np.testing.assert_array_equal(compose_rgb_resampled(_source_window(window, 1), *args, **kw), expected)
    # a 2 x 2 mean of a finer source first: the window is assembled, then pooled
    fine = np.repeat(np.repeat(big, 2, axis=0), 2, axis=1)
    halves = [[fine[:100, :130], fine[:100, 130:]], [fine[100:, :130], fine[100:, 130:]]]
    cut = ([(34, 100), (0, 74)], [(46, 130), (0, 96)])  # rows 34:174 and columns 46:226 of the finer source
    pooled = _source_window((halves, cut), 2)
    np.testing.assert_array_equal(pooled[0][0], win)
    np.testing.assert_array_equal(compose_rgb_resampled(pooled, *args, **kw), expected)
    # drawn pixels take the gene's colour, the others the stain's grey in all three channels
    drawn = (winners >= 0).reshape(h, w)
    assert (got[:, drawn] == planes[:, winners[winners >= 0]]).all()
    assert (got[0][~drawn] == np.round(np.clip(grey[~drawn], 0, 1) * 255)).mean() > 0.99


def test_where_molecules_share_a_pixel_the_highest_priority_wins():
    from st2he.pp._kernels import disc_footprint, gene_keys, priority

    rng = np.random.default_rng(11)
    xs, ys = rng.uniform(0, 3, 300), rng.uniform(0, 3, 300)  # about 33 molecules per 1 µm pixel
    gs = rng.choice(list(PALETTE), 300)
    order = sorted(PALETTE)
    keys = dict(zip(order, gene_keys(order), strict=True))
    # sparse one-pixel dots compare priorities lazily, dense ones and larger dots store them: all must agree
    for dot_size, x, y, genes in (
        (1, xs[:20], ys[:20], gs[:20]),
        (1, xs, ys, gs),
        (2, xs, ys, gs),
        (3, xs, ys, gs),
    ):
        dy, dx = disc_footprint(dot_size)
        expected = {}
        for xi, yi, g in zip(x, y, genes, strict=True):
            r, c = int(np.floor(yi)), int(np.floor(xi))
            key = (priority(r, c, keys[g]) << 16) | order.index(g)  # from the molecule's own pixel and gene
            for rr, cc in zip(r + dy, c + dx, strict=True):
                expected[(rr, cc)] = max(expected.get((rr, cc), -1), key)
        sd = _sdata(x, y, genes, npartitions=3)
        st2he.pp.rasterize_transcripts(
            sd, palette=PALETTE, pixel_size=1.0, region=(-2, -2, 5.5, 5.5), dot_size=dot_size
        )
        img = _image(sd)
        drawn = {(r - 2, c - 2) for r, c in np.argwhere(img.any(axis=0))}
        assert drawn == set(expected), dot_size
        for (r, c), key in expected.items():
            assert tuple(img[:, r + 2, c + 2]) == hex_to_rgb(PALETTE[order[key & 0xFFFF]]), (dot_size, r, c)


def test_a_region_far_too_large_is_refused_before_any_work():
    # e.g. a region given in nanometres: 4 * 10^14 pixels, hundreds of millions of chunks to build
    sd = _random_sdata(n=100)
    with pytest.raises(ValueError, match=r"20000001 x 20000001 pixels in 381499024 chunks.*larger pixel_size"):
        st2he.pp.rasterize_transcripts(sd, region=(0, 0, 1e7, 1e7), pixel_size=0.5)
    with pytest.raises(ValueError, match=r"region \(0, 0, 10000000\.0, 10000000\.0\) µm"):
        st2he.pp.transcript_density(sd, region=(0, 0, 1e7, 1e7), pixel_size=0.5)
    # not too many pixels, but far too many chunks
    with pytest.raises(ValueError, match=r"in 156275001 chunks of 16 px.*larger chunk"):
        st2he.pp.rasterize_transcripts(sd, region=(0, 0, 1e5, 1e5), pixel_size=0.5, chunk=16, stain_key=None)
    assert "st2he_input" not in sd and "transcript_density" not in sd
    # a large region that is still sensible is only lazy work
    st2he.pp.transcript_density(sd, region=(0, 0, 1e5, 1e5), pixel_size=0.5)
    assert _scale0(sd.images["transcript_density"]).shape == (1, 200001, 200001)
