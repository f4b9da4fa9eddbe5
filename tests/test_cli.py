"""The ``st2he`` command line: each step writes only its own elements into the store, and fails with a message."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import spatialdata

import st2he
from st2he import _cli, _demo
from st2he._elements import get_params
from st2he._grid import _scale0
from st2he.models._expression import SHIPPED_EXPRESSION

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

SIZE_UM = 128  # a 128 µm square of simulated tissue: about 6,500 molecules


@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> Path:
    """A small simulated sample written as a zarr store (copied by each test that changes it)."""
    path = tmp_path_factory.mktemp("cli") / "base.zarr"
    with st2he.io._common.quiet_zarr_writes():
        st2he.datasets.synthetic_tissue(0, size_um=SIZE_UM).write(path)
    return path


@pytest.fixture
def store(base_store, tmp_path) -> Path:
    path = tmp_path / "sample.zarr"
    shutil.copytree(base_store, path)
    return path


def _files(store: Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Hash and time of every file of the store's elements (the root metadata aside): proof that none was rewritten."""
    out = {}
    for f in sorted(store.rglob("*")):
        rel = f.relative_to(store)
        if f.is_file() and len(rel.parts) > 2 and rel.parts[1] not in skip:
            out[str(rel)] = f"{hashlib.sha1(f.read_bytes()).hexdigest()} {f.stat().st_mtime_ns}"
    return out


def _names(sdata) -> dict[str, list[str]]:
    return {kind: sorted(getattr(sdata, kind)) for kind in ("images", "labels", "points", "shapes", "tables")}


def _pixels(sdata, key) -> np.ndarray:
    return np.asarray(_scale0(sdata.images[key]).values)


def _dense(x) -> np.ndarray:
    return np.asarray(x.todense() if hasattr(x, "todense") else x)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = _cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_rasterize_writes_the_picture_the_function_draws_and_nothing_else(store, capsys):
    before = _files(store)
    elements = _names(spatialdata.read_zarr(store))
    code, _, err = _run(capsys, "rasterize", store, "--pixel-size", "1", "--dot-size", "2", "--min-qv", "none")
    assert code == 0, err
    assert "st2he_input" in err  # what was written is said
    back = spatialdata.read_zarr(store)
    # the same picture as the function makes in memory, with its parameters (palette) kept in the store
    sdata = st2he.datasets.synthetic_tissue(0, size_um=SIZE_UM)
    with pytest.warns(st2he.pp.MoleculesDroppedWarning, match="dropped 28: 28 control probes"):
        st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0, dot_size=2, min_qv=None)
    want = _pixels(sdata, "st2he_input")
    assert want.shape[0] == 3 and want.shape[1] >= SIZE_UM and want.any()
    np.testing.assert_array_equal(_pixels(back, "st2he_input"), want)
    assert get_params(back, "st2he_input")["palette"] == get_params(sdata, "st2he_input")["palette"]
    assert get_params(back, "st2he_input")["min_qv"] is None
    # every element that was there is still there, its files untouched; only the new image was added
    assert _names(back) == {**elements, "images": sorted([*elements["images"], "st2he_input"])}
    assert _files(store, skip=("st2he_input",)) == before


def test_an_existing_element_is_replaced_only_with_overwrite(store, capsys):
    assert _run(capsys, "rasterize", store, "--pixel-size", "2", "-q")[0] == 0
    before = _files(store)
    code, _, err = _run(capsys, "rasterize", store, "--pixel-size", "1", "-q")
    assert code == 2
    assert "error: An element named 'st2he_input' already exists" in err and "pass --overwrite" in err
    assert "Traceback" not in err
    assert _files(store) == before  # nothing written
    assert _run(capsys, "rasterize", store, "--pixel-size", "1", "--overwrite", "-q")[0] == 0
    assert _pixels(spatialdata.read_zarr(store), "st2he_input").shape[1] >= SIZE_UM  # 1 µm pixels, not 2 µm
    # an element of another type is never replaced, not even with --overwrite
    code, _, err = _run(capsys, "rasterize", store, "--key-added", "table", "--overwrite")
    assert code == 2 and "--key-added 'table' names a table" in err


def test_two_jobs_on_one_store_keep_each_others_elements_and_records(base_store, store, capsys, monkeypatch):
    opened = _cli.open_store

    def open_then_another_job_writes(path):
        sdata = opened(path)
        monkeypatch.setattr(_cli, "open_store", opened)
        # a job started later finishes first, while this one computes
        assert _cli.main(["rasterize", str(path), "--key-added", "other", "--pixel-size", "4", "-q"]) == 0
        return sdata

    monkeypatch.setattr(_cli, "open_store", open_then_another_job_writes)
    assert _run(capsys, "rasterize", store, "--pixel-size", "2", "-q")[0] == 0
    back = spatialdata.read_zarr(store)
    assert {"st2he_input", "other"} <= set(back.images)
    assert get_params(back, "other")["pixel_size"] == 4.0 and get_params(back, "st2he_input")["pixel_size"] == 2.0
    base = spatialdata.read_zarr(base_store).attrs["st2he"]
    assert base and all(back.attrs["st2he"][k] == v for k, v in base.items())  # what was recorded before stays


def test_missing_store_element_and_bad_values_exit_2_with_a_message(store, tmp_path, capsys):
    code, _, err = _run(capsys, "evaluate", tmp_path / "nothing.zarr")
    assert code == 2 and f"No SpatialData store at {str(tmp_path / 'nothing.zarr')!r}" in err
    code, _, err = _run(capsys, "rasterize", tmp_path)  # a folder that is not a store
    assert code == 2 and "is not a zarr store" in err
    code, _, err = _run(capsys, "virtual-he", store, "--method", "stain", "--input-key", "nope")
    assert code == 2 and "--input-key 'nope' is not an image of this SpatialData object" in err
    code, _, err = _run(capsys, "rasterize", store, "--pixel-size", "-1")  # the function's ValueError
    assert code == 2 and "pixel_size must be a positive number" in err.replace("--pixel-size", "pixel_size")
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:  # argparse: a word that is not a number
        _cli.main(["rasterize", str(store), "--pixel-size", "abc"])
    assert exit_info.value.code == 2
    assert "--pixel-size: expected float, got 'abc'" in capsys.readouterr().err


def test_rasterize_palette_of_a_lineage_generator_is_the_lineage_palette_of_the_sample(store, tmp_path, capsys):
    from st2he.models import Pix2PixTurbo, save_pretrained

    model = Pix2PixTurbo.from_config("tiny", seed=0)
    # trained on another panel: its stored colour map names none of this sample's genes
    model.metadata["palette"] = {"KRT19": "#ff9900", "CD19": "#00ccff"}
    model.metadata["palette_method"] = "lineage"
    path = save_pretrained(model.set_eval(), tmp_path / "lineage_model")
    assert _run(capsys, "rasterize", store, "--pixel-size", "2", "--palette", path, "-q")[0] == 0
    drawn = get_params(spatialdata.read_zarr(store), "st2he_input")
    sdata = st2he.datasets.synthetic_tissue(0, size_um=SIZE_UM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
        st2he.pp.rasterize_transcripts(sdata, pixel_size=2, palette="lineage")
    assert drawn["palette_method"] == "lineage"
    assert drawn["palette"] == get_params(sdata, "st2he_input")["palette"]


def test_asking_for_cuda_without_a_gpu_says_so(store, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    before = _files(store)
    code, _, err = _run(capsys, "virtual-he", store, "--device", "cuda")
    assert code == 2 and "--device cuda: no CUDA GPU is available on this machine" in err and "--device cpu" in err
    assert _files(store) == before


def test_virtual_he_and_evaluate_write_what_the_functions_make(store, tmp_path, capsys):
    from st2he.models import Pix2PixTurbo, save_pretrained

    model = Pix2PixTurbo.from_config("tiny", seed=0)
    model.metadata["tile_size"] = 64
    sdata = st2he.datasets.synthetic_tissue(0, size_um=SIZE_UM)
    panel = sorted(set(sdata.tables["table"].var_names))
    model.metadata["palette"] = {gene: f"#{(37 * i) % 256:02x}{(91 * i) % 256:02x}ff" for i, gene in enumerate(panel)}
    path = save_pretrained(model.set_eval(), tmp_path / "tiny")
    # the picture drawn with the palette the generator was trained with: --palette <its folder>
    assert _run(capsys, "rasterize", store, "--pixel-size", "2", "--palette", path, "-q")[0] == 0
    drawn = get_params(spatialdata.read_zarr(store), "st2he_input")["palette"]
    assert drawn and all(drawn[g] == model.metadata["palette"][g] for g in drawn)
    before = _files(store)
    code, _, err = _run(capsys, "virtual-he", store, "--model", path, "--overlap", "16", "--device", "cpu", "-q")
    assert code == 0, err
    json_path = tmp_path / "m.json"
    code, out, err = _run(
        capsys,
        "evaluate",
        store,
        *"--virtual-key virtual_he --real-key he_image --tile-size 32".split(),
        "--json",
        json_path,
    )
    assert code == 0, err
    back = spatialdata.read_zarr(store)
    # the functions on the same input give the same image and the same metrics
    sdata = spatialdata.read_zarr(store)
    for key in ("virtual_he", "he_metrics", "he_metrics_tiles"):
        del sdata[key]
    st2he.tl.virtual_he(sdata, model=str(path), overlap=16, device="cpu", progress=False)
    np.testing.assert_array_equal(_pixels(back, "virtual_he"), _pixels(sdata, "virtual_he"))
    frame = st2he.tl.evaluate_he(sdata, tile_size=32)
    report = json.loads(json_path.read_text())
    assert report["n_tiles"] == len(frame) - 2 == 4  # 64 px in common at 2 µm: 2 x 2 tiles
    for row in ("overall", "mean_over_tiles"):
        for metric in ("psnr", "ssim", "mse"):
            assert report[row][metric] == pytest.approx(frame.loc[row, metric], rel=1e-9)
    # the table printed
    assert f"{frame.loc['overall', 'psnr']:.4f}" in out and "ssim" in out
    assert set(back.tables) == {"table", "he_metrics"} and "he_metrics_tiles" in back.shapes
    assert back.tables["he_metrics"].n_obs == 4
    assert _files(store, skip=("virtual_he", "he_metrics", "he_metrics_tiles")) == before


def test_zero_shot_writes_its_tables_and_the_cells_new_columns(store, tmp_path, capsys):
    import open_clip
    import torch

    arch = "st2he-cli-tiny-clip"
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / f"{arch}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model(arch).state_dict(), tmp_path / "tiny.pt")
    before = _files(store, skip=("table",))
    options = "--prompts TUM=tumour|carcinoma STR=stroma --image-key he_image --tile-size-um 32 --device cpu -q"
    code, out, err = _run(capsys, "zero-shot", store, "--model", arch, tmp_path / "tiny.pt", *options.split())
    assert code == 0, err
    sdata = spatialdata.read_zarr(store)
    table = sdata.tables["zero_shot"]
    slide = table.uns["zero_shot"]["slide"]
    assert f"slide-level call: {slide['class']}" in out
    assert list(table.var_names) == ["TUM", "STR"]
    assert list(table.uns["zero_shot"]["classes"]["TUM"]) == ["tumour", "carcinoma"]
    assert "zero_shot_tiles" in sdata.shapes
    # the cell table gained the columns zero_shot gives it in memory, and kept all it had
    ref = st2he.datasets.synthetic_tissue(0, size_um=SIZE_UM).tables["table"]
    cells = sdata.tables["table"]
    assert {"zero_shot_class", "zero_shot_prob_TUM"} <= set(cells.obs.columns)
    pd.testing.assert_frame_equal(cells.obs[list(ref.obs.columns)], ref.obs, check_categorical=False)
    np.testing.assert_array_equal(_dense(cells.X), _dense(ref.X))
    assert _files(store, skip=("table", "zero_shot", "zero_shot_tiles")) == before


def test_train_writes_the_model_and_its_history(store, tmp_path, capsys):
    assert _run(capsys, "rasterize", store, "-q")[0] == 0
    out_dir = tmp_path / "run"
    options = "--model tiny --tile-size 32 --validation 0.4 --batch-size 1 --val-every 2 --ckpt-every 2 -q"
    code, out, err = _run(capsys, "train", store, "--output-dir", out_dir, "--steps", "2", *options.split())
    assert code == 0, err
    history = pd.read_csv(out_dir / "history.csv")
    assert history["step"].max() == 2 and "val_psnr" in history
    model = st2he.models.from_pretrained(out_dir / "model")
    assert model.metadata["training"]["steps"] == 2 and model.metadata["tile_size"] == 32
    assert str(out_dir / "model") in out
    # a second run into the same folder is refused without --overwrite (the function's FileExistsError)
    code, _, err = _run(capsys, "train", store, "--output-dir", out_dir, "--steps", "1", *options.split())
    assert code == 2 and "already holds a training run" in err and "--overwrite" in err


def test_read_xenium_crop_gives_the_readers_elements(shared_data, tmp_path, capsys):
    folder = shared_data / "xenium_cellline_crop"
    out = tmp_path / "xenium.zarr"
    code, _, err = _run(capsys, "read", folder, out, "-q")
    assert code == 0, err
    back = spatialdata.read_zarr(out)
    with pytest.warns(UserWarning, match="has no pixel size"):
        direct = st2he.io.read_xenium(folder)
    assert _names(back) == _names(direct)
    assert len(back.points["transcripts"]) == len(direct.points["transcripts"]) == 5260
    np.testing.assert_array_equal(_pixels(back, "morphology_focus"), _pixels(direct, "morphology_focus"))
    assert back.attrs["st2he"]["source"]["platform"] == "xenium"
    # an existing store is kept unless --overwrite; an option of another platform's reader is refused
    code, _, err = _run(capsys, "read", folder, out)
    assert code == 2 and "already exists. Pass --overwrite" in err
    code, _, err = _run(capsys, "read", folder, tmp_path / "other.zarr", "--stains", "DAPI")
    assert code == 2 and "--stains: not an option of the xenium reader" in err
    assert not (tmp_path / "other.zarr").exists()
    # with an H&E image
    he = shared_data / "he_kather_crc_32" / sorted(os.listdir(shared_data / "he_kather_crc_32"))[0]
    options = "--overwrite --he-pixel-size 0.5 --he-origin 1000 1000 -q"
    code, _, err = _run(capsys, "read", folder, out, "--he-image", he, *options.split())
    assert code == 0, err
    back = spatialdata.read_zarr(out)
    assert _names(back)["images"] == sorted([*_names(direct)["images"], "he_image"])
    assert st2he.io.Raster(back.images["he_image"]).bounds == pytest.approx((1000, 1000, 1112, 1112))
    assert not list(tmp_path.glob(".*st2he-*"))  # no staging folder left
    # with Xenium Explorer's alignment: the reader places the H&E by the matrix (pixels -> morphology pixels)
    matrix = np.array([[0.0, 0.5 / 0.2125, 1010 / 0.2125], [0.5 / 0.2125, 0.0, 1020 / 0.2125], [0, 0, 1]])
    np.savetxt(tmp_path / "alignment.csv", matrix, delimiter=",")
    aligned = tmp_path / "aligned.zarr"
    code, _, err = _run(capsys, "read", folder, aligned, "--he-image", he, "--alignment", tmp_path / "alignment.csv", "-q")
    assert code == 0, err
    affine = st2he.io.Raster(spatialdata.read_zarr(aligned).images["he_image"]).affine
    np.testing.assert_allclose(affine, [[0, 0.5, 1010], [0.5, 0, 1020], [0, 0, 1]], atol=1e-9)
    code, _, err = _run(capsys, "read", folder, tmp_path / "x.zarr", "--he-image", he, "--alignment", tmp_path / "alignment.csv", "--he-origin", "0", "0")
    assert code == 2 and "--he-origin: not used when --alignment places the H&E" in err


def test_options_are_the_functions_keyword_arguments():
    parser = _cli.build_parser()
    words = "--region 0 0 64 64 --percentiles 2 98 --min-qv none --genes EPCAM --no-drop-controls --stain-key none"
    args = parser.parse_args(["rasterize", "s.zarr", *words.split()])
    options = _cli.function_options(args)
    assert options == {
        "region": [0.0, 0.0, 64.0, 64.0],
        "percentiles": (2.0, 98.0),
        "min_qv": None,
        "genes": ["EPCAM"],
        "drop_controls": False,
        "stain_key": None,
    }
    # a list, or one of the single values the argument also takes
    merscope = "--stains DAPI --z-layers 3"
    assert _cli.function_options(parser.parse_args(["read", "f", "s.zarr", *merscope.split()])) == {
        "stains": ["DAPI"],
        "z_layers": 3,
    }
    merscope = "--stains all --z-layers 1 2"
    assert _cli.function_options(parser.parse_args(["read", "f", "s.zarr", *merscope.split()])) == {
        "stains": "all",
        "z_layers": [1, 2],
    }
    # options not given are not passed: the function's own defaults apply
    assert _cli.function_options(parser.parse_args(["virtual-he", "s.zarr"])) == {}
    args = parser.parse_args(["virtual-he", "s.zarr", "--tile-size", "64", "--r", "0.5", "--lazy"])
    assert _cli.function_options(args) == {"tile_size": 64, "r": 0.5, "lazy": True}


def test_every_command_has_its_help(capsys):
    for name in _cli.COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            _cli.main([name, "--help"])
        assert exit_info.value.code == 0 and f"usage: st2he {name}" in capsys.readouterr().out
    assert list(_cli.COMMANDS) == [
        "read",
        "register",
        "rasterize",
        "virtual-he",
        "zero-shot",
        "evaluate",
        "aggregate",
        "super-resolve",
        "train",
        "train-expression",
        "predict-expression",
        "evaluate-expression",
        "cycle-check",
        "demo",
    ]


def test_demo_help_and_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: st2he demo" in text and "--data" in text and "--pixel-size" in text
    with pytest.raises(SystemExit):  # st2he-demo keeps its options
        _demo.main(["--help"])
    assert "--data" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"st2he {st2he.__version__}"


def test_the_entry_points_name_the_mains():
    import tomllib

    scripts = tomllib.loads((Path(_cli.__file__).parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"st2he": "st2he._cli:main", "st2he-demo": "st2he._demo:main"}  # make demo calls st2he-demo


def test_the_command_runs_as_a_program(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(_cli.__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "st2he", "evaluate", str(tmp_path / "missing.zarr")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert "st2he evaluate: error: No SpatialData store at" in result.stderr and "Traceback" not in result.stderr


def test_expression_steps_and_register(store, tmp_path, capsys):
    import math

    from spatialdata.transformations import Affine, get_transformation, set_transformation

    # aggregate: the table in the store equals the function's
    code, _, err = _run(capsys, "aggregate", store, "--by", "bins", "--bin-size", "16", "-q")
    assert code == 0, err
    back = spatialdata.read_zarr(store)
    direct = spatialdata.read_zarr(store)
    del direct.tables["bins_16um_table"], direct.shapes["bins_16um"]
    st2he.pp.aggregate_transcripts(direct, by="bins", bin_size=16.0)
    np.testing.assert_array_equal(_dense(back["bins_16um_table"].X), _dense(direct["bins_16um_table"].X))

    # register: the H&E moved in the store is brought back, only its transformation rewritten
    sdata = spatialdata.read_zarr(store)
    t = math.radians(8)
    old = get_transformation(sdata["he_image"], "global").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    move = np.array([[math.cos(t), -math.sin(t), 10.0], [math.sin(t), math.cos(t), -6.0], [0, 0, 1]])
    set_transformation(sdata["he_image"], Affine(move @ old, input_axes=("x", "y"), output_axes=("x", "y")), "global")
    sdata.write_transformations("he_image")
    pixels = _files(store, skip=())
    code, out, err = _run(capsys, "register", store, "--transform", "rigid", "--pixel-size", "1", "--scales", "1.0", "-q")
    assert code == 0, err
    assert "residual_um" in out
    placed = st2he.io.Raster(spatialdata.read_zarr(store)["he_image"]).affine
    np.testing.assert_allclose(placed, old, atol=0.02 * 128)  # back within a few µm over the sample
    unchanged = {k: v for k, v in _files(store).items() if "he_image" in k and k.endswith(tuple("0123456789"))}
    assert unchanged and all(pixels[k] == v for k, v in unchanged.items())  # pixel chunks not rewritten

    # train an expression model, predict with it, score it, read it back through the cycle check
    model_dir = tmp_path / "expr"
    code, _, err = _run(
        capsys, "train-expression", store, "--model", "tiny", "--genes", "EPCAM", "KRT5", "COL1A1",
        "--steps", "2", "--batch-size", "1", "--chip-um", "64", "--val-fraction", "0", "--ckpt-every", "0",
        "--output-dir", model_dir, "-q",
    )
    assert code == 0, err
    code, _, err = _run(capsys, "predict-expression", store, "--model", model_dir / "model", "--units", "cell_boundaries", "-q")
    assert code == 0, err
    code, _, err = _run(
        capsys, "predict-expression", store, "--model", model_dir / "model", "--units", "cell_boundaries",
        "--pooling", "counts", "--key-added", "by_counts", "-q",
    )
    assert code == 0, err
    back = spatialdata.read_zarr(store)
    assert list(back["he_image_expression"].var_names) == ["EPCAM", "KRT5", "COL1A1"]
    assert back["he_image_expression"].uns["st2he"]["pooling"] == "log"  # cells: auto pools by the mean of logs
    assert back["by_counts"].uns["st2he"]["pooling"] == "counts"
    code, out, err = _run(
        capsys, "evaluate-expression", store, "--pred-key", "he_image_expression", "--true-key", "table",
        "--json", tmp_path / "m.json", "-q",
    )
    assert code == 0, err
    assert "mean_pearson" in out or "pearson" in out
    per_gene = json.loads((tmp_path / "m.json").read_text())
    stored = spatialdata.read_zarr(store)["he_image_expression_metrics"].obs
    assert per_gene["EPCAM"]["pearson"] == pytest.approx(float(stored.loc["EPCAM", "pearson"]))
    # without --model: the shipped expression model, as st2he.tl.predict_expression(model=None)
    code, _, err = _run(
        capsys, "predict-expression", store, "--units", "cell_boundaries", "--key-added", "shipped", "-q"
    )
    assert code == 0, err
    shipped = st2he.models.load_expression_model(SHIPPED_EXPRESSION)
    assert list(spatialdata.read_zarr(store)["shipped"].var_names) == list(shipped.genes)
    code, out, err = _run(capsys, "cycle-check", store, "--model", model_dir / "model", "--he-key", "he_image", "-q")
    assert code == 0, err
    assert "r_virtual" in out and "cycle_check" in spatialdata.read_zarr(store).tables


def test_super_resolve_step_writes_bins_that_keep_each_spots_counts(store, capsys):
    """aggregate -> super-resolve from the shell: the bins of each spot sum to its counts; the inputs untouched."""
    code, _, err = _run(capsys, "aggregate", store, "--by", "spots", "--key-added", "spots", "-q")
    assert code == 0, err
    before = _files(store)
    code, _, err = _run(
        capsys, "super-resolve", store, "--table-key", "spots", "--image-key", "he_image", "--bin-size", "8", "-q"
    )
    assert code == 0, err
    back = spatialdata.read_zarr(store)
    sr, spots = back["super_resolved"], back["spots"]
    assert sr.uns["st2he"]["method"] == "guided"
    sums = pd.DataFrame(np.asarray(sr.X)).groupby(sr.obs["source_unit"].astype(str).to_numpy()).sum()
    measured = pd.DataFrame(spots.X.toarray(), index=spots.obs["instance_id"].astype(str).to_numpy())
    np.testing.assert_allclose(sums.to_numpy(), measured.loc[sums.index].to_numpy(), rtol=1e-5, atol=1e-3)
    assert "super_resolved_bins" in back.shapes
    after = _files(store)
    assert all(after[k] == v for k, v in before.items())  # nothing that was there rewritten
    code, _, err = _run(capsys, "super-resolve", store, "--table-key", "spots", "--image-key", "he_image", "-q")
    assert code == 2 and "super_resolved" in err  # an existing key is refused, nothing lost
