"""The expression model: save / load round trip, pooling into units, baselines against scikit-learn, encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from st2he.models import (  # noqa: E402
    ExpressionModel,
    build_expression_model,
    load_expression_model,
    pool_units,
    save_expression_model,
)
from st2he.models._expression import fit_baselines, predict_baseline  # noqa: E402

GENES = ["EPCAM", "KRT5", "COL1A1", "PTPRC", "CD68"]


@pytest.fixture(scope="module")
def tiny():
    return build_expression_model(GENES, encoder="tiny", um_per_px=0.5, seed=3).eval()


def test_forward_shapes_and_stride(tiny):
    x = torch.rand(2, 3, 128, 96)
    with torch.no_grad():
        out = tiny(x)
    assert tiny.stride == 8
    assert out["genes"].shape == (2, len(GENES), 16, 12)
    assert out["tumour"].shape == (2, 1, 16, 12)
    assert out["features"].shape == (2, tiny.config["features"], 16, 12)
    no_tumour = build_expression_model(GENES, encoder="tiny", tumour=False, field=False).eval()
    with torch.no_grad():
        assert "tumour" not in no_tumour(x)


def test_save_load_round_trip(tiny, tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 32))
    tgt = rng.gamma(2.0, size=(60, len(GENES)))
    tiny.baselines = fit_baselines(emb, tgt, seed=0)
    tiny.metadata = {"training": {"steps": 7}}
    save_expression_model(tiny, tmp_path / "m", metadata={"note": "x"})
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["genes"] == GENES and config["normalisation"] == "log1p_cp10k" and config["um_per_px"] == 0.5
    assert config["encoder"]["size"] == "tiny" and sorted(config["baselines"]) == ["knn", "mean", "ridge"]
    loaded = load_expression_model(tmp_path / "m")
    assert isinstance(loaded, ExpressionModel) and not loaded.training
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = tiny(x), loaded(x)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loaded.metadata["training"]["steps"] == 7 and loaded.metadata["note"] == "x"
    test = rng.normal(size=(10, 32))
    for method in ("mean", "knn", "ridge"):
        np.testing.assert_array_equal(
            predict_baseline(tiny.baselines, method, test), predict_baseline(loaded.baselines, method, test)
        )


def test_load_errors_name_what_is_missing(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_expression_model(tmp_path / "nothing")
    folder = save_expression_model(tiny, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_expression_model(folder)
    folder = save_expression_model(tiny, tmp_path / "m2")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architecture"]["genes"] = [*GENES, "EXTRA"]  # the head no longer fits the stored weights
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not fit the architecture"):
        load_expression_model(folder)
    (folder / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an st2he expression model"):
        load_expression_model(folder)


def test_pool_units_exact_against_a_loop():
    rng = np.random.default_rng(1)
    dense = torch.from_numpy(rng.normal(size=(2, 3, 7, 9)))
    labels = torch.from_numpy(rng.integers(-1, 6, size=(2, 7, 9)))
    labels[labels == 4] = -1  # unit 4 has no pixel: zeros
    out = pool_units(dense, labels, 6).numpy()
    d, lab = dense.numpy(), labels.numpy()
    for u in range(6):
        vals = [d[b, :, i, j] for b in range(2) for i in range(7) for j in range(9) if lab[b, i, j] == u]
        want = np.mean(vals, axis=0) if vals else np.zeros(3)
        np.testing.assert_allclose(out[u], want, rtol=0, atol=1e-12)


def test_ridge_equals_scikit_learn_pipeline():
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(2)
    for n, c in ((400, 300), (50, 20)):  # PCA(256); fewer units / features than 256
        x = rng.normal(size=(n, c)) * rng.uniform(0.1, 5, size=c)
        y = x[:, :4] @ rng.normal(size=(4, 6)) + rng.normal(size=(n, 6)) + 3
        test = rng.normal(size=(25, c)) * 2
        base = fit_baselines(x, y, seed=1)
        k = min(256, n, c)
        pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=k, random_state=1))])
        z = pipe.fit_transform(x)
        ridge = Ridge(solver="lsqr", alpha=100 / (k * 6), random_state=1, fit_intercept=False, max_iter=1000).fit(z, y)
        want = ridge.predict(pipe.transform(test)) + y.mean(axis=0)
        np.testing.assert_allclose(predict_baseline(base, "ridge", test), want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(predict_baseline(base, "mean", test), np.tile(y.mean(axis=0), (25, 1)), atol=1e-5)
        from sklearn.neighbors import KNeighborsRegressor

        knn = KNeighborsRegressor(n_neighbors=10).fit(z, y)
        np.testing.assert_allclose(predict_baseline(base, "knn", test), knn.predict(pipe.transform(test)), atol=1e-5)


def test_timm_encoder_from_local_weights_and_missing_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        build_expression_model(GENES, encoder={"timm": "resnet10t", "weights": str(tmp_path / "nowhere.safetensors")})
    ref = timm.create_model("resnet10t", pretrained=False)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "w.safetensors")
    model = build_expression_model(GENES, encoder={"timm": "resnet10t", "weights": str(tmp_path / "w.safetensors")})
    got = model.encoder.state_dict()
    for k, v in ref.state_dict().items():
        if k in got:
            assert torch.equal(got[k], v), k
    assert all(not p.requires_grad for p in model.encoder.parameters())  # a pretrained encoder is frozen
    # saved with every weight: loading needs no weights file
    save_expression_model(model, tmp_path / "m")
    (tmp_path / "w.safetensors").unlink()
    loaded = load_expression_model(tmp_path / "m")
    x = torch.rand(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)["genes"], loaded(x)["genes"])


def test_clip_image_tower_as_tile_encoder(tmp_path):
    import open_clip

    from st2he.models import load_clip

    arch = "st2he-tiny-clip-expr"
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / f"{arch}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    torch.manual_seed(0)
    clip_model = open_clip.create_model(arch)
    torch.save(clip_model.state_dict(), tmp_path / "clip.pt")
    spec = {"clip": (arch, str(tmp_path / "clip.pt")), "mpp": 0.5}
    model = build_expression_model(GENES, encoder=spec, um_per_px=0.5, features=8, field_channels=(8, 8, 8)).eval()
    assert model.stride == 32 and model.config["encoder"]["embed_dim"] == 16  # a 16 µm tile per location
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        maps = model.encoder(x)[0]
        out = model(x)
    assert maps.shape == (1, 16, 8, 8) and out["genes"].shape == (1, len(GENES), 8, 8)
    clip = load_clip((arch, tmp_path / "clip.pt"), mpp=0.5)
    tile = x[:, :, 64:96, 96:128]  # row 2, column 3
    np.testing.assert_allclose(maps[0, :, 2, 3].numpy(), clip.encode_image(tile, normalize=False)[0].numpy(), atol=1e-5)
    save_expression_model(model, tmp_path / "m")
    loaded = load_expression_model(tmp_path / "m")  # the CLIP weights come again from their source
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x)["genes"].numpy(), out["genes"].numpy(), atol=1e-6)
    (tmp_path / "clip.pt").unlink()
    with pytest.raises(FileNotFoundError):
        load_expression_model(tmp_path / "m")(x)
