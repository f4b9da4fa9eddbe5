"""Zero-shot classification of H&E tiles with a tiny open_clip model the tests register themselves."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
import torch

import st2he
from st2he._raster import Raster
from st2he._elements import parse_image
from st2he._grid import Grid
from st2he.tl import _zero_shot as zs

ARCH = "st2he-tiny-clip"
# a tiny ResNet image tower (learns colour and texture in seconds on a CPU) and a one-layer text transformer;
# open_clip's default BPE tokenizer ships inside the package, so all of this works offline
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 1},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[str, Path]:
    import open_clip

    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / f"{ARCH}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder / f"{ARCH}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH)
    torch.save(model.state_dict(), folder / "tiny.pt")
    return ARCH, folder / "tiny.pt"


@pytest.fixture(scope="module")
def tiny_clip(tiny_checkpoint):
    # 64 px at 0.5 µm/px: tiles of 32 µm
    return st2he.models.load_clip(tiny_checkpoint)


def _toy_sdata(*, with_cells: bool = True, blank: bool = False):
    """A 128 µm square H&E at 0.5 µm/px: the left quarter is bare glass, the rest tissue; cells as circles."""
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    rng = np.random.default_rng(0)
    grid = Grid(100.0, 200.0, 0.5, 256, 256)
    img = np.empty((256, 256, 3), np.uint8)
    img[...] = (235, 160, 200)  # eosin pink
    img += rng.integers(0, 20, img.shape, dtype=np.uint8)
    yy, xx = np.mgrid[:256, :256]
    for cy, cx in rng.integers(0, 256, (60, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = (70, 50, 140)  # nuclei
    img[:, :64] = 245  # glass
    if blank:
        img[:] = 250
    sdata = SpatialData(images={"he": parse_image(np.moveaxis(img, -1, 0), grid)})
    # 4 x 4 tiles of 32 µm; the left column lies on glass
    boxes = [shapely.box(100 + 32 * c, 200 + 32 * r, 132 + 32 * c, 232 + 32 * r) for r in range(4) for c in range(4)]
    sdata["tiles"] = ShapesModel.parse(gpd.GeoDataFrame(geometry=boxes, index=pd.RangeIndex(10, 26)))
    if with_cells:
        xs = np.array([105.0, 140.0, 180.0, 215.0, 150.0, 199.0])
        ys = np.array([210.0, 210.0, 250.0, 300.0, 320.0, 222.0])
        cells = gpd.GeoDataFrame(
            {"radius": np.full(len(xs), 2.0)},
            geometry=gpd.points_from_xy(xs, ys),
            index=pd.Index([f"cell_{i}" for i in range(len(xs))]),
        )
        sdata["cell_circles"] = ShapesModel.parse(cells)
        import anndata as ad

        table = ad.AnnData(
            X=np.ones((len(xs), 2), np.float32),
            obs=pd.DataFrame(
                {"cell_id": cells.index.to_numpy(), "region": pd.Categorical(["cell_circles"] * len(xs))},
                index=cells.index.to_numpy(),
            ),
        )
        sdata["table"] = TableModel.parse(table, region="cell_circles", region_key="region", instance_key="cell_id")
    return sdata


def _open_clip_reference(tiny_checkpoint):
    """The tiny model as open_clip itself loads it from the checkpoint, with open_clip's own preprocessing."""
    import open_clip

    arch, ckpt = tiny_checkpoint
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(ckpt))
    return model.eval(), preprocess, open_clip.get_tokenizer(arch)


def _reference_image_embeddings(reference, tiles: np.ndarray) -> np.ndarray:
    """L2-normalised open_clip embeddings of ``(n, 64, 64, 3)`` uint8 tiles (the model's input size: no resize)."""
    from PIL import Image

    model, preprocess, _ = reference
    with torch.no_grad():
        x = torch.stack([preprocess(Image.fromarray(np.ascontiguousarray(t))) for t in tiles])
        return torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy()


def _reference_text_embeddings(reference, prompts: list[str]) -> np.ndarray:
    model, _, tokenizer = reference
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)), dim=-1).numpy()


# ---------------------------------------------------------------------------------------------------------------
# mechanics


def test_embeddings_are_unit_vectors_of_the_right_shape(tiny_clip):
    assert tiny_clip.image_size == 64 and tiny_clip.mpp == 0.5 and tiny_clip.tile_size_um == 32.0
    tiles = np.random.default_rng(0).integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)  # resized to 64 px
    emb = tiny_clip.encode_image(tiles)
    assert emb.shape == (5, 32)
    np.testing.assert_allclose(emb.norm(dim=1).numpy(), 1.0, atol=1e-5)
    txt = tiny_clip.encode_text(["an H&E image of tumor.", "stroma."])
    assert txt.shape == (2, 32)
    np.testing.assert_allclose(txt.norm(dim=1).numpy(), 1.0, atol=1e-5)
    # channels-first uint8 tensors give the same embeddings as channels-last arrays
    chw = torch.from_numpy(tiles).permute(0, 3, 1, 2)
    np.testing.assert_allclose(tiny_clip.encode_image(chw).numpy(), emb.numpy(), atol=1e-5)



def test_embeddings_are_open_clips_own_on_the_same_weights(tiny_clip, tiny_checkpoint):
    reference = _open_clip_reference(tiny_checkpoint)
    # tiles at the model's input size: open_clip's preprocessing (PIL, to tensor, normalise) and image tower
    tiles = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        tiny_clip.encode_image(tiles).numpy(), _reference_image_embeddings(reference, tiles), atol=1e-5
    )
    prompts = ["an H&E image of tumor.", "stroma.", "lymphocytes"]
    np.testing.assert_allclose(
        tiny_clip.encode_text(prompts).numpy(), _reference_text_embeddings(reference, prompts), atol=1e-5
    )
    assert tiny_clip.logit_scale == pytest.approx(float(reference[0].logit_scale.detach().exp()))
    # larger tiles are first resampled to 64 px (bilinear, antialiased), then embedded as above
    big = np.random.default_rng(2).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    x = torch.from_numpy(big).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor(tiny_clip.mean).view(1, 3, 1, 1), torch.tensor(tiny_clip.std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = torch.nn.functional.normalize(reference[0].encode_image((x - mean) / std), dim=-1).numpy()
    np.testing.assert_allclose(tiny_clip.encode_image(big).numpy(), want, atol=1e-5)


def test_prompt_ensemble_is_the_normalised_mean_over_names_and_templates(tiny_clip):
    classes = {"A": ["alpha", "first"], "B": "beta"}
    templates = ["an image of {}.", "{} is shown."]
    got = zs.class_text_embeddings(tiny_clip, classes, templates)
    assert got.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    for row, names in zip(got, (["alpha", "first"], ["beta"]), strict=True):
        prompts = [t.format(n) for n in names for t in templates]
        each = tiny_clip.encode_text(prompts).numpy()
        assert len(each) == 2 * len(names)
        mean = each.mean(axis=0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=1e-5)


def test_built_in_prompt_sets():
    assert set(st2he.tl.PROMPTS) == {"nsclc", "kaposi", "breast", "crc"}
    assert list(st2he.tl.get_prompts("nsclc")) == ["LUAD", "LUSC"]
    assert list(st2he.tl.get_prompts("kather")) == ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    assert all("{}" in t for t in st2he.tl.TEMPLATES)
    assert "an H&E image of {}." in st2he.tl.TEMPLATES
    with pytest.raises(KeyError, match="built-in sets"):
        st2he.tl.get_prompts("glioma")


def test_top_k_pooling_is_the_mean_of_the_k_best_tiles_per_class():
    sim = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.7], [0.0, 0.6], [0.2, 0.5]])
    out = zs.pool_top_k(sim, ["A", "B"], top_k=2, logit_scale=10.0)
    assert out["scores"] == pytest.approx({"A": 0.85, "B": 0.65})
    assert out["class"] == "A" and out["top_k"] == 2 and out["n_tiles"] == 5
    p = np.exp(10 * np.array([0.85, 0.65]))
    assert out["probabilities"]["A"] == pytest.approx(p[0] / p.sum())
    # k larger than the number of tiles: all tiles (mean pooling)
    out = zs.pool_top_k(sim, ["A", "B"], top_k=50)
    assert out["top_k"] == 5 and out["scores"]["B"] == pytest.approx(sim[:, 1].mean())
    # top-1 favours the class with the single best tile
    assert zs.pool_top_k(np.array([[0.95, 0.5], [0.1, 0.6], [0.1, 0.6]]), ["A", "B"], top_k=1)["class"] == "A"


def test_table_layout_tissue_filter_and_cell_assignment(tiny_clip, tiny_checkpoint, tmp_path):
    sdata = _toy_sdata()
    classes = {"tumour": ["tumor", "carcinoma"], "stroma": ["stroma"], "lymph": ["lymphocytes"]}
    table = st2he.tl.zero_shot(sdata, image_key="he", classes=classes, model=tiny_clip, tiles_key="tiles", top_k=3)
    assert table is sdata.tables["zero_shot"]  # the call returns the table it stored
    slide = table.uns["zero_shot"]["slide"]
    # the four tiles on glass are skipped; the rest annotate the tiles element by its index
    assert table.n_obs == 12
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "tiles" and attrs["region_key"] == "region" and attrs["instance_key"] == "tile_id"
    tiles = sdata.shapes["tiles"]
    assert set(table.obs["tile_id"]) <= set(tiles.index)
    assert not set(table.obs["tile_id"]) & {10, 14, 18, 22}  # the glass column
    assert (table.obs["tissue_fraction"] >= 0.25).all()
    # centres in obsm["spatial"], embeddings L2-normalised, probabilities sum to one
    centres = tiles.geometry.centroid.loc[table.obs["tile_id"]]
    np.testing.assert_allclose(table.obsm["spatial"], np.column_stack([centres.x, centres.y]))
    np.testing.assert_allclose(np.linalg.norm(table.obsm["embedding"], axis=1), 1.0, atol=1e-5)
    assert table.obsm["embedding"].shape == (12, 32)
    np.testing.assert_allclose(np.asarray(table.X).sum(axis=1), 1.0, atol=1e-5)
    assert list(table.var_names) == list(classes)
    assert list(table.obs["class"].cat.categories) == list(classes)
    np.testing.assert_array_equal(table.obs["class"].astype(str), np.asarray(list(classes))[table.X.argmax(1)])
    np.testing.assert_allclose(table.obs["prob_stroma"], table.X[:, 1])
    # probabilities are softmax(logit_scale * cosine) of the stored similarities
    logits = tiny_clip.logit_scale * table.obsm["similarity"]
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(table.X, e / e.sum(1, keepdims=True), atol=1e-5)
    # slide-level call: top-k pooling of the stored similarities
    info = table.uns["zero_shot"]
    assert info["slide"] == slide
    assert slide == zs.pool_top_k(table.obsm["similarity"], list(classes), top_k=3, logit_scale=tiny_clip.logit_scale)
    # the numbers, computed independently of st2he: each tile read by hand from the picture (64 x 64 px at 0.5 µm,
    # the model's input: no resampling), embedded by open_clip; classes as the mean of the normalised prompts
    reference = _open_clip_reference(tiny_checkpoint)
    picture = np.moveaxis(np.asarray(Raster(sdata.images["he"]).level0), 0, -1)
    rc = [divmod(t - 10, 4) for t in table.obs["tile_id"]]  # tile 10 + 4 r + c: rows and columns of 64 px
    by_hand = np.stack([picture[64 * r : 64 * (r + 1), 64 * c : 64 * (c + 1)] for r, c in rc])
    image_emb = _reference_image_embeddings(reference, by_hand)
    np.testing.assert_allclose(table.obsm["embedding"], image_emb, atol=1e-5)
    rows = []
    for names in classes.values():
        names = [names] if isinstance(names, str) else names
        each = _reference_text_embeddings(reference, [t.format(n) for n in names for t in st2he.tl.TEMPLATES])
        rows.append(each.mean(0) / np.linalg.norm(each.mean(0)))
    similarity = image_emb @ np.stack(rows).T
    np.testing.assert_allclose(table.obsm["similarity"], similarity, atol=1e-5)
    logits = float(reference[0].logit_scale.detach().exp()) * similarity
    probs = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(table.X, probs / probs.sum(1, keepdims=True), atol=1e-4)
    # the slide call by hand: per class the mean of its 3 highest tile similarities, the largest wins
    top3 = np.sort(similarity, axis=0)[-3:].mean(axis=0)
    assert slide["scores"] == pytest.approx(dict(zip(classes, top3)), abs=1e-5)
    assert slide["class"] == list(classes)[int(np.argmax(top3))]
    # the tissue fraction of a kept tile: every pixel of these tiles is stained (no glass)
    np.testing.assert_allclose(table.obs["tissue_fraction"], 1.0)
    assert info["params"]["tile_size_um"] == 32.0 and info["params"]["n_tiles_total"] == 16
    assert info["classes"]["tumour"] == ["tumor", "carcinoma"] and "{}" in info["templates"][0]
    # each cell has the class of the tile it lies in; the cell on glass (x=105) has none
    cells = sdata.tables["table"].obs
    by_tile = table.obs.set_index("tile_id")
    expected_tile = {"cell_1": 11, "cell_2": 16, "cell_3": 25, "cell_4": 23, "cell_5": 13}
    for cell, tile in expected_tile.items():
        assert cells.loc[cell, "zero_shot_class"] == by_tile.loc[tile, "class"]
        assert cells.loc[cell, "zero_shot_prob_tumour"] == pytest.approx(by_tile.loc[tile, "prob_tumour"])
    assert pd.isna(cells.loc["cell_0", "zero_shot_class"]) and np.isnan(cells.loc["cell_0", "zero_shot_prob_lymph"])
    assert cells["zero_shot_class"].dtype == "category"
    # scanpy-style grouping works on the cell table
    assert cells.groupby("zero_shot_class", observed=True).size().sum() == 5
    # everything survives a round trip through zarr
    from spatialdata import read_zarr

    sdata.write(tmp_path / "zs.zarr")
    back = read_zarr(tmp_path / "zs.zarr")
    assert back.tables["zero_shot"].uns["zero_shot"]["slide"]["class"] == slide["class"]
    assert "zero_shot_class" in back.tables["table"].obs


def test_existing_key_needs_overwrite(tiny_clip):
    sdata = _toy_sdata(with_cells=False)
    kwargs = {"image_key": "he", "classes": ["tumor", "stroma"], "model": tiny_clip, "tiles_key": "tiles"}
    first = st2he.tl.zero_shot(sdata, **kwargs, progress=False).uns["zero_shot"]["slide"]
    with pytest.raises(KeyError, match="overwrite"):
        st2he.tl.zero_shot(sdata, **kwargs)
    again = st2he.tl.zero_shot(sdata, **kwargs, overwrite=True, progress=False)
    assert again is sdata.tables["zero_shot"] and again.uns["zero_shot"]["slide"] == first


def test_failed_overwrite_keeps_the_old_tiles_and_table(tiny_clip, monkeypatch):
    sdata = _toy_sdata(with_cells=False)
    kwargs = {"image_key": "he", "classes": ["tumor", "stroma"], "model": tiny_clip, "progress": False}
    first = st2he.tl.zero_shot(sdata, **kwargs)
    tiles = sdata.shapes["zero_shot_tiles"]
    # the model fails half-way through a second run with other tiles: the old tiles and table are kept as they were
    def broken(*args, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(tiny_clip, "encode_image", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        st2he.tl.zero_shot(sdata, **kwargs, tile_size_um=64.0, overwrite=True)
    monkeypatch.undo()
    assert sdata.shapes["zero_shot_tiles"] is tiles and len(tiles) == 16
    assert sdata.tables["zero_shot"] is first
    assert first.uns["spatialdata_attrs"]["region"] == "zero_shot_tiles"
    assert set(first.obs["tile_id"]) <= set(tiles.index)
    # a name of another type is never taken; tiles another table annotates are not replaced
    with pytest.raises(KeyError, match="names an image"):
        st2he.tl.zero_shot(sdata, **kwargs, key_added="he", overwrite=True)
    with pytest.raises(KeyError, match="names a shapes element"):
        st2he.tl.zero_shot(sdata, **kwargs, key_added="tiles", overwrite=True)
    sdata.tables["other"] = sdata.tables["zero_shot"].copy()  # a second table annotating the same tiles
    with pytest.raises(ValueError, match=r"\['other'\] annotate"):
        st2he.tl.zero_shot(sdata, **kwargs, tile_size_um=64.0, overwrite=True)
    del sdata.tables["other"]
    assert sdata.shapes["zero_shot_tiles"] is tiles and sdata.tables["zero_shot"] is first
    # a successful overwrite replaces both, together
    table = st2he.tl.zero_shot(sdata, **kwargs, tile_size_um=64.0, overwrite=True)
    assert table is sdata.tables["zero_shot"] and len(sdata.shapes["zero_shot_tiles"]) == 4
    assert set(table.obs["tile_id"]) <= set(sdata.shapes["zero_shot_tiles"].index)


def test_tiles_far_below_the_model_input_are_refused(tiny_clip):
    # the tiny model reads 64 px tiles; the toy image has 0.5 µm pixels: tiles under 16 µm (32 px) are refused
    sdata = _toy_sdata(with_cells=False)
    kwargs = {"image_key": "he", "classes": ["tumor", "stroma"], "model": tiny_clip, "progress": False}
    with pytest.raises(ValueError, match=r"fewer than 32 pixels.*at least 16 µm"):
        st2he.tl.zero_shot(sdata, **kwargs, tile_size_um=8.0)
    small = [shapely.box(100 + 4 * i, 200, 104 + 4 * i, 204) for i in range(3)]
    from spatialdata.models import ShapesModel

    sdata["small"] = ShapesModel.parse(gpd.GeoDataFrame(geometry=small))
    with pytest.raises(ValueError, match=r"tiles_key='small'.*3 of 3 tiles"):
        st2he.tl.zero_shot(sdata, **kwargs, tiles_key="small")
    assert "zero_shot" not in sdata and "zero_shot_tiles" not in sdata
    # half the model's input is enough
    table = st2he.tl.zero_shot(sdata, **kwargs, tile_size_um=16.0, min_tissue_fraction=0.0)
    assert table.uns["zero_shot"]["params"]["tile_size_um"] == 16.0


def test_agreement_between_two_different_runs_has_the_expected_kappa(tiny_clip):
    """Calls that differ on known tiles: kappa, agreement and correlations against values worked out by hand."""
    from scipy.stats import pearsonr

    sdata = _toy_sdata(with_cells=False)
    kwargs = {"image_key": "he", "classes": ["tumor", "stroma"], "model": tiny_clip, "tiles_key": "tiles"}
    st2he.tl.zero_shot(sdata, **kwargs, progress=False)
    st2he.tl.zero_shot(sdata, **kwargs, key_added="other", progress=False)
    a, b = sdata.tables["zero_shot"], sdata.tables["other"]
    assert a.n_obs == b.n_obs == 12
    # set the calls: a says tumour on its first 6 tiles, b on the first 5 and the last 2 (9 of 12 agree)
    calls_a = ["tumor"] * 6 + ["stroma"] * 6
    calls_b = ["tumor"] * 5 + ["stroma"] * 5 + ["tumor"] * 2
    rng = np.random.default_rng(0)
    for table, calls in ((a, calls_a), (b, calls_b)):
        p = np.where(np.asarray(calls) == "tumor", rng.uniform(0.55, 0.95, 12), rng.uniform(0.05, 0.45, 12))
        table.X = np.column_stack([p, 1 - p]).astype(np.float32)
        table.obs["class"] = pd.Categorical(calls, categories=["tumor", "stroma"])
    # b's rows in another order: tiles are matched by position, not by row
    order = rng.permutation(12)
    sdata.tables["other"] = b[order].copy()
    agree = st2he.tl.evaluate_zero_shot(sdata, other_key="other")["agreement"]
    # observed agreement 9/12; chance agreement (6/12)(7/12) + (6/12)(5/12) = 1/2: kappa = (3/4 - 1/2) / (1/2) = 1/2
    assert agree["n_tiles"] == 12
    assert agree["fraction_agreeing"] == pytest.approx(0.75)
    assert agree["cohen_kappa"] == pytest.approx(0.5)
    per_tile = agree["per_tile"].set_index("tile_id")
    assert per_tile.loc[a.obs["tile_id"].to_numpy(), "agree"].tolist() == [c == d for c, d in zip(calls_a, calls_b)]
    assert (per_tile["other_class"] == pd.Series(calls_b, index=a.obs["tile_id"].to_numpy())).all()
    for j, cls in enumerate(["tumor", "stroma"]):
        want = pearsonr(np.asarray(a.X)[:, j], np.asarray(b.X)[:, j]).statistic
        assert agree["probability_correlation"][cls] == pytest.approx(want)


def test_assign_points_to_overlapping_tiles_prefers_the_nearest_centre():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    pts = np.array([[6.0, 5.0], [9.0, 5.0], [2.0, 2.0], [18.0, 18.0], [np.nan, 1.0], [10.0, 5.0]])
    np.testing.assert_array_equal(zs.assign_points_to_tiles(pts, boxes), [0, 1, 0, -1, -1, 1])


def test_tiles_are_read_from_a_coarser_level_when_the_model_sees_less_detail(tiny_clip):
    sdata = _toy_sdata(with_cells=False)
    assert len(Raster(sdata.images["he"]).levels) == 1
    # a 4-level pyramid of the same picture
    from spatialdata import SpatialData

    data = Raster(sdata.images["he"]).level0.data
    grid = Grid.from_element(sdata.images["he"])
    big = parse_image(data, grid, scale_factors=[2, 2])
    from spatialdata.models import ShapesModel

    boxes = [shapely.box(100 + 64 * c, 200 + 64 * r, 164 + 64 * c, 264 + 64 * r) for r in range(2) for c in range(2)]
    pyramid = SpatialData(images={"he": big}, shapes={"tiles": ShapesModel.parse(gpd.GeoDataFrame(geometry=boxes))})
    # 64 µm tiles for a 64 px model: 1 µm/px is enough, so level 1 (1 µm/px) is read, not level 0 (0.5 µm/px)
    box = np.array([[164.0, 200.0, 228.0, 264.0]])
    tiles, px = zs.read_tiles(pyramid, "he", box, out_size=64)
    assert px == pytest.approx(1.0) and tiles[0].shape == (64, 64, 3)
    full, px0 = zs.read_tiles(pyramid, "he", box)
    assert px0 == 0.5 and full[0].shape == (128, 128, 3)
    st2he.tl.zero_shot(pyramid, image_key="he", classes="nsclc", model=tiny_clip, tiles_key="tiles", progress=False)
    params = pyramid.tables["zero_shot"].uns["zero_shot"]["params"]
    assert params["read_mpp"] == pytest.approx(1.0)
    # boxes over the edge are padded with white (background)
    edge, _ = zs.read_tiles(pyramid, "he", np.array([[-20.0, 180.0, 12.0, 212.0]]))
    assert (edge[0] == 255).all()


def test_default_tiles_from_make_tiles(tiny_clip):
    sdata = _toy_sdata(with_cells=False)
    table = st2he.tl.zero_shot(sdata, image_key="he", classes="breast", model=tiny_clip, progress=False)
    assert table is sdata.tables["zero_shot"]
    slide = table.uns["zero_shot"]["slide"]
    assert "zero_shot_tiles" in sdata.shapes
    tiles = sdata.shapes["zero_shot_tiles"]
    bounds = tiles.geometry.bounds
    np.testing.assert_allclose(bounds["maxx"] - bounds["minx"], 32.0)
    table = sdata.tables["zero_shot"]
    assert table.uns["spatialdata_attrs"]["region"] == "zero_shot_tiles"
    assert 0 < table.n_obs < len(tiles) and slide["n_tiles"] == table.n_obs
    assert set(slide["probabilities"]) == {"tumor", "normal"}
    # by hand: the 128 µm square at (100, 200) µm in 4 x 4 tiles of 32 µm; the left column (x < 132 µm) is glass
    want = {(100.0 + 32 * c, 200.0 + 32 * r, 132.0 + 32 * c, 232.0 + 32 * r) for r in range(4) for c in range(4)}
    assert len(tiles) == 16
    assert {tuple(np.round(row, 6)) for row in bounds.to_numpy()} == want
    kept = bounds.loc[table.obs["tile_id"].to_numpy()]
    assert table.n_obs == 12 and (kept["minx"] >= 132.0).all()


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input(tiny_clip, tiny_checkpoint):
    sdata = _toy_sdata(with_cells=False)
    ok = {"image_key": "he", "classes": ["tumor", "stroma"], "model": tiny_clip, "tiles_key": "tiles"}
    with pytest.raises(KeyError, match="is not an image"):
        st2he.tl.zero_shot(sdata, **{**ok, "image_key": "virtual_he"})
    with pytest.raises(ValueError, match="no names"):
        st2he.tl.zero_shot(sdata, **{**ok, "classes": {"tumor": [], "stroma": ["stroma"]}})
    with pytest.raises(ValueError, match="no names"):
        st2he.tl.zero_shot(sdata, **{**ok, "classes": {"tumor": ["  "], "stroma": ["stroma"]}})
    with pytest.raises(ValueError, match="at least two classes"):
        st2he.tl.zero_shot(sdata, **{**ok, "classes": {"tumor": ["tumor"]}})
    with pytest.raises(ValueError, match="smaller than one pixel"):
        st2he.tl.zero_shot(sdata, **{**ok, "tile_size_um": 0.2, "tiles_key": None})
    with pytest.raises(ValueError, match="positive"):
        st2he.tl.zero_shot(sdata, **{**ok, "tile_size_um": -5.0})
    with pytest.raises(KeyError, match="not a shapes element"):
        st2he.tl.zero_shot(sdata, **{**ok, "tiles_key": "nope"})
    with pytest.raises(ValueError, match="placeholder"):
        st2he.tl.zero_shot(sdata, **{**ok, "templates": ["no slot here"]})
    # an image-only tower cannot read prompts
    with pytest.raises(ValueError, match="no text tower"):
        st2he.tl.zero_shot(sdata, **{**ok, "model": tiny_clip.model.visual})
    with pytest.raises(ValueError, match="no text tower"):
        st2he.models.load_clip(tiny_clip.model.visual)
    # nothing was written by the failed calls
    assert "zero_shot" not in sdata and "zero_shot_tiles" not in sdata
    # no tissue at all
    blank = _toy_sdata(with_cells=False, blank=True)
    with pytest.raises(ValueError, match="tissue fraction"):
        st2he.tl.zero_shot(blank, **{**ok, "tiles_key": None})
    assert "zero_shot_tiles" not in blank


# ---------------------------------------------------------------------------------------------------------------
# real H&E: labelled Kather tiles and a slide, through the same pipeline


def _kather_mosaic(folder: Path):
    """The 32 labelled 224 px tiles (0.5 µm/px) side by side in one image element, with a tiles element."""
    from PIL import Image
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel

    files = sorted(folder.glob("*.png"))
    assert len(files) == 32
    tiles = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    labels = [f.name.split("-")[0] for f in files]
    ncol, size = 8, 224
    nrow = len(files) // ncol
    mosaic = np.full((nrow * size, ncol * size, 3), 255, np.uint8)
    boxes = []
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncol)
        mosaic[r * size : (r + 1) * size, c * size : (c + 1) * size] = tile
        boxes.append(shapely.box(c * 112.0, r * 112.0, (c + 1) * 112.0, (r + 1) * 112.0))
    sdata = SpatialData(
        images={"he": parse_image(np.moveaxis(mosaic, -1, 0), Grid(0.0, 0.0, 0.5, nrow * size, ncol * size))},
        shapes={"kather": ShapesModel.parse(gpd.GeoDataFrame({"label": labels}, geometry=boxes))},
    )
    return sdata, tiles, labels


def test_kather_tiles_through_the_tile_pipeline(shared_data, tiny_checkpoint):
    import matplotlib

    matplotlib.use("Agg")
    sdata, tiles, labels = _kather_mosaic(shared_data / "he_kather_crc_32")
    bounds = np.asarray(sdata.shapes["kather"].geometry.bounds)
    # at the model's resolution (224 px at 0.5 µm/px) the pipeline reads exactly the published pixels
    read, px = zs.read_tiles(sdata, "he", bounds, out_size=224)
    assert px == 0.5
    for got, want in zip(read, tiles, strict=True):
        np.testing.assert_array_equal(got, want)
    frac = zs.tissue_fraction(np.stack(tiles))
    by_label = pd.Series(frac).groupby(labels).mean()
    assert by_label.drop("ADI").min() > 0.6 and by_label["ADI"] < by_label.drop("ADI").min()  # fat is mostly white
    # classify with the colorectal prompt set
    clip = st2he.models.load_clip(tiny_checkpoint, mpp=112.0 / 64)  # the tiny model sees each tile whole
    assert clip.tile_size_um == pytest.approx(112.0)
    table = st2he.tl.zero_shot(
        sdata, image_key="he", classes="crc", model=clip, tiles_key="kather", min_tissue_fraction=0.0, progress=False
    )
    assert table is sdata.tables["zero_shot"]
    slide = table.uns["zero_shot"]["slide"]
    assert table.n_obs == 32 and table.n_vars == 9 and slide["class"] in table.var_names
    with pytest.warns(UserWarning, match="left out"):
        # no background (BACK) tiles here, and labels that are not classes are left out with a warning
        res = st2he.tl.evaluate_zero_shot(sdata, labels=["junk"] + labels[1:])
    assert res["n_tiles"] == 31
    res = st2he.tl.evaluate_zero_shot(sdata, labels="label")
    cm = res["confusion_matrix"]
    assert cm.shape == (9, 9) and cm.to_numpy().sum() == 32
    assert cm.loc["BACK"].sum() == 0 and (cm.drop(index="BACK").sum(axis=1) == 4).all()
    assert 0.0 <= res["roc_auc"] <= 1.0 and np.isnan(res["roc_auc_per_class"]["BACK"])
    assert 0.0 <= res["balanced_accuracy"] <= 1.0
    # the metrics, computed directly with scikit-learn from the stored probabilities and the tile labels
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    tile_labels = np.asarray(labels)[np.asarray(table.obs["tile_id"]).astype(int)]
    classes = list(table.var_names)
    probs = np.asarray(table.X, dtype=float)
    called = np.asarray(classes)[probs.argmax(1)]
    per_class = {c: roc_auc_score(tile_labels == c, probs[:, j]) for j, c in enumerate(classes) if c != "BACK"}
    assert res["roc_auc_per_class"] == pytest.approx({**per_class, "BACK": np.nan}, nan_ok=True)
    assert res["roc_auc"] == pytest.approx(np.mean(list(per_class.values())))
    assert res["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(tile_labels, called))
    assert res["accuracy"] == pytest.approx(np.mean(tile_labels == called))
    want_cm = pd.crosstab(pd.Categorical(tile_labels, classes), pd.Categorical(called, classes), dropna=False)
    np.testing.assert_array_equal(cm.to_numpy(), want_cm.to_numpy())
    axes = st2he.pl.zero_shot(sdata, class_name="TUM")
    assert len(axes) == 2 and axes[1].get_title().startswith("P(TUM)")
    he, faded = (np.asarray(ax.get_images()[0].get_array(), dtype=np.float32) for ax in axes)
    np.testing.assert_allclose(faded[..., :3], 1 - (1 - he[..., :3]) * 0.35, atol=1e-6)  # the H&E, faded, once read
    assert axes[0].get_images()[0].get_extent() == axes[1].get_images()[0].get_extent()
    ax = st2he.pl.roc(res)
    assert len(ax.get_lines()) == 9  # eight classes present, plus the diagonal
    import matplotlib.pyplot as plt

    plt.close("all")


def test_read_he_image_places_tiles_and_slides_in_micrometres(shared_data):
    from PIL import Image

    png = next((shared_data / "he_kather_crc_32").glob("TUM-*.png"))
    with pytest.raises(ValueError, match="pixel_size"):
        st2he.io.read_he_image(png)  # a PNG does not say how big its pixels are
    sdata = st2he.io.read_he_image(png, pixel_size=0.5, origin=(10.0, 20.0), key="tile")
    assert Grid.from_element(sdata.images["tile"]) == Grid(10.0, 20.0, 0.5, 224, 224)
    np.testing.assert_array_equal(
        np.moveaxis(np.asarray(Raster(sdata.images["tile"]).level0), 0, -1), np.asarray(Image.open(png).convert("RGB"))
    )
    with pytest.raises(KeyError, match="already exists"):
        st2he.io.read_he_image(png, pixel_size=0.5, key="tile", sdata=sdata)
    with pytest.raises(FileNotFoundError, match="not found"):
        st2he.io.read_he_image(shared_data / "missing.svs")


def test_real_slide_through_the_tile_pipeline(shared_data, tiny_clip):
    sdata = st2he.io.read_he_image(shared_data / "he_cmu1_small_region.svs")
    grid = Grid.from_element(sdata.images["he_image"])
    assert grid.pixel_size == pytest.approx(0.499) and grid.shape == (2967, 2220)
    assert len(Raster(sdata.images["he_image"]).levels) == 4
    # 160 µm tiles for a 64 px model: 2.5 µm/px suffices, read from the 4x level (~2 µm/px)
    table = st2he.tl.zero_shot(
        sdata, image_key="he_image", classes="breast", model=tiny_clip, tile_size_um=160.0, progress=False
    )
    assert table is sdata.tables["zero_shot"]
    slide = table.uns["zero_shot"]["slide"]
    params = table.uns["zero_shot"]["params"]
    assert params["read_mpp"] == pytest.approx(0.499 * 4, rel=0.01)
    n_tiles = len(sdata.shapes["zero_shot_tiles"])
    assert n_tiles == params["n_tiles_total"] >= 6 * 9
    # the scan is two-thirds glass: many tiles are skipped, the tissue ones are kept
    assert 10 <= table.n_obs < n_tiles and slide["n_tiles"] == table.n_obs
    assert (table.obs["tissue_fraction"] >= 0.25).all()


# ---------------------------------------------------------------------------------------------------------------
# the honest end-to-end check


TISSUE_CLASS = {"gland_tumour": "gland", "solid_tumour": "solid", "stroma": "stroma"}
CLASSES = {
    "gland": ["gland-forming adenocarcinoma", "adenocarcinoma"],
    "solid": ["solid squamous cell carcinoma", "squamous cell carcinoma"],
    "stroma": ["stroma", "tumor-associated stroma"],
}
TILE_UM = 48.0


def _labelled_crops(sdata, rng, n_draws: int, size_um: float):
    """Random H&E crops lying (70 % of their area or more) inside one annotated region, with that region's class."""
    element = sdata.images["he_image"]
    grid = Grid.from_element(element)
    img = np.moveaxis(np.asarray(element["scale0"].image), 0, -1)
    regions = sdata.shapes["regions"]
    n = int(round(size_um / grid.pixel_size))
    crops, labels = [], []
    for _ in range(n_draws):
        r, c = rng.integers(0, img.shape[0] - n), rng.integers(0, img.shape[1] - n)
        x0, y0 = grid.x0 + c * grid.pixel_size, grid.y0 + r * grid.pixel_size
        box = shapely.box(x0, y0, x0 + size_um, y0 + size_um)
        hit = regions[regions.intersection(box).area >= 0.7 * box.area]
        if len(hit):
            crops.append(img[r : r + n, c : c + n])
            labels.append(TISSUE_CLASS[hit.iloc[0]["tissue"]])
    return np.stack(crops), np.array(labels)


def _fine_tune(model, tokenizer, x_all, y_all, rng, *, n_steps: int, batch_size: int = 32, n_prompts: int = 8):
    """Fine-tune a CLIP model on labelled tiles with CLIP's symmetric contrastive loss against the class prompts.

    Each step draws ``n_prompts`` prompts per class (a random name in a random template) and averages their
    embeddings, as the zero-shot prompt ensemble does. The loss runs both ways, as CLIP's does: each tile against
    the class prompts, and each class prompt against the batch's tiles (all tiles of its class are positives). The
    second direction ranks the tiles of a slide for each class, which is what the slide-level top-k pooling reads:
    trained one way only, a stroma tile could match the gland prompt better than the solid tiles match the solid
    prompt, and the call of a held-out solid slide flipped with the torch seed, the thread count or a library's
    float rounding. The learning rate decays to zero, so the model does not end wherever its last batches pushed it.
    """
    templates = st2he.tl.TEMPLATES
    n_classes = len(CLASSES)
    model.token_embedding.requires_grad_(False)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, n_steps)
    torch.manual_seed(0)
    model.train()
    for step in range(n_steps):
        idx = torch.randint(0, len(x_all), (batch_size,))
        xb = torch.rot90(x_all[idx], step % 4, dims=(2, 3))
        prompts = [
            templates[rng.integers(len(templates))].format(names[rng.integers(len(names))])
            for names in CLASSES.values()
            for _ in range(n_prompts)
        ]
        image = torch.nn.functional.normalize(model.encode_image(xb), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
        text = torch.nn.functional.normalize(text.view(n_classes, n_prompts, -1).mean(1), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T  # (tiles, classes)
        tile_to_text = torch.nn.functional.cross_entropy(logits, y_all[idx])
        positives = torch.nn.functional.one_hot(y_all[idx], n_classes).T.float()  # (classes, tiles)
        present = positives.sum(1) > 0
        text_to_tile = -(torch.log_softmax(logits.T, dim=1) * positives).sum(1)[present] / positives.sum(1)[present]
        loss = (tile_to_text + text_to_tile.mean()) / 2
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        scheduler.step()
    model.eval()


def test_fine_tuned_tiny_model_classifies_held_out_tiles(tiny_checkpoint, tmp_path):
    import open_clip
    from spatialdata.models import ShapesModel

    arch, ckpt = tiny_checkpoint
    # labelled tiles of two simulated samples (both tumour subtypes and stroma in each)
    rng = np.random.default_rng(0)
    train = [st2he.datasets.synthetic_tissue(seed) for seed in (101, 102)]
    crops, labels = zip(*(_labelled_crops(s, rng, 500, TILE_UM) for s in train), strict=True)
    crops, labels = np.concatenate(crops), np.concatenate(labels)
    assert set(labels) == set(CLASSES) and len(labels) > 600
    # fine-tune contrastively: each tile against one prompt per class (random name and template), prompts averaged
    # over 8 draws as the zero-shot prompt ensemble does
    model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=str(ckpt))
    tokenizer = open_clip.get_tokenizer(arch)
    clip = st2he.models.load_clip(model, tokenizer=tokenizer, mpp=TILE_UM / 64)
    x_all = clip.preprocess(crops)
    y_all = torch.as_tensor([list(CLASSES).index(label) for label in labels])
    _fine_tune(model, tokenizer, x_all, y_all, rng, n_steps=300)
    tuned = tmp_path / "tuned.pt"
    torch.save(model.state_dict(), tuned)

    # held-out sample, another seed: its H&E tiled on a grid, classified zero-shot through st2he.tl.zero_shot
    test = st2he.datasets.synthetic_tissue(202)
    x_min, y_min, x_max, y_max = Grid.from_element(test.images["he_image"]).bounds
    boxes = [
        shapely.box(x, y, x + TILE_UM, y + TILE_UM)
        for y in np.arange(y_min, y_max - TILE_UM + 1e-6, TILE_UM)
        for x in np.arange(x_min, x_max - TILE_UM + 1e-6, TILE_UM)
    ]
    test["grid_tiles"] = ShapesModel.parse(gpd.GeoDataFrame(geometry=boxes))
    model_arg = (arch, tuned)
    st2he.tl.zero_shot(
        test,
        image_key="he_image",
        classes=CLASSES,
        model=st2he.models.load_clip(model_arg, mpp=TILE_UM / 64),
        tiles_key="grid_tiles",
        progress=False,
    )
    # tile labels from the annotated regions: the centre rule labels every tile, border tiles included ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tiles outside every region are left out, with a warning
        centre = st2he.tl.evaluate_zero_shot(test, regions="regions", region_label="tissue", label_map=TISSUE_CLASS)
        # ... the tiles of one tissue (70 % of their area, as the training crops) have a clear truth
        res = st2he.tl.evaluate_zero_shot(
            test, regions="regions", region_label="tissue", min_region_fraction=0.7, label_map=TISSUE_CLASS
        )
    print(f"held-out tiles, centre rule: ROC AUC {centre['roc_auc']:.3f} on {centre['n_tiles']} tiles")
    assert centre["roc_auc"] > 0.8
    assert res["n_tiles"] < centre["n_tiles"]
    print(f"held-out tiles: ROC AUC {res['roc_auc']:.3f}, balanced accuracy {res['balanced_accuracy']:.3f}")
    print(res["confusion_matrix"])
    assert res["n_tiles"] >= 30
    assert res["roc_auc"] > 0.9
    assert res["balanced_accuracy"] > 0.7
    # cells inherit their tile's class: most tumour cells are called as their subtype
    cells = test.tables["table"].obs
    for tissue, cls in (("gland_tumour", "gland"), ("solid_tumour", "solid")):
        called = cells.loc[cells["tissue"] == tissue, "zero_shot_class"].dropna()
        assert (called == cls).mean() > 0.6

    # agreement between the calls on two images of the same slide: identical copies agree perfectly
    test["virtual_he"] = parse_image(
        test.images["he_image"]["scale0"].image.data, Grid.from_element(test.images["he_image"])
    )
    st2he.tl.zero_shot(
        test,
        image_key="virtual_he",
        classes=CLASSES,
        model=st2he.models.load_clip(model_arg, mpp=TILE_UM / 64),
        tiles_key="grid_tiles",
        key_added="zero_shot_virtual",
        cells_table=None,
        progress=False,
    )
    agree = st2he.tl.evaluate_zero_shot(test, key="zero_shot_virtual", other_key="zero_shot")["agreement"]
    assert agree["cohen_kappa"] == pytest.approx(1.0) and agree["fraction_agreeing"] == 1.0
    assert agree["n_tiles"] == test.tables["zero_shot"].n_obs
    assert all(r == pytest.approx(1.0) for r in agree["probability_correlation"].values())
    assert agree["per_tile"]["agree"].all()

    # slide-level subtyping (MI-Zero top-k pooling) of held-out samples with one tumour subtype each (and stroma),
    # two slides of each subtype, each called right and clearly so
    subtypes = {k: CLASSES[k] for k in ("gland", "solid")}
    for seed in (303, 304):
        for subtype in subtypes:
            slide_sdata = st2he.datasets.synthetic_tissue(seed, size_um=192.0, subtype=subtype)
            slide = st2he.tl.zero_shot(
                slide_sdata,
                image_key="he_image",
                classes=subtypes,
                model=st2he.models.load_clip(model_arg, mpp=TILE_UM / 64),
                top_k=5,
                progress=False,
            ).uns["zero_shot"]["slide"]
            print(f"slide {seed} ({subtype}): {slide['scores']}")
            assert slide["class"] == subtype, slide
            assert slide["probabilities"][subtype] > 0.75, slide
