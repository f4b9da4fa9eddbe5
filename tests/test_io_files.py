"""Every reader says which files of its folder it used and which it ignored (``sdata.attrs["st2he"]["files"]``)."""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import pytest

import st2he
from st2he import _cli, _demo
from st2he.io._common import FILES_LISTED, describe_files, files_report

COSMX_ID = "Run5642_S3_Quarter"


def _read(reader, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reader(path, **kwargs)


def _files(sdata) -> dict:
    return sdata.attrs["st2he"]["files"]


def test_xenium_crop(shared_data, caplog):
    with caplog.at_level(logging.INFO, logger="st2he"):
        sdata = _read(st2he.io.read_xenium, shared_data / "xenium_cellline_crop")
    files = _files(sdata)
    assert files["used"] == [
        "cell_boundaries.parquet",
        "cell_feature_matrix.h5",
        "cells.parquet",
        "morphology_focus.ome.tif",
        "morphology_mip.ome.tif",
        "nucleus_boundaries.parquet",
        "transcripts.parquet",
    ]
    # the csv.gz copies of the same tables are not read
    assert files["ignored"] == [
        "cell_boundaries.csv.gz",
        "cells.csv.gz",
        "nucleus_boundaries.csv.gz",
        "transcripts.csv.gz",
    ]
    assert files["unlisted"] == {"used": {}, "ignored": {}}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("read_xenium: files used")]
    assert len(lines) == 1 and "files ignored: cell_boundaries.csv.gz" in lines[0]


def test_merscope_crop(shared_data):
    folder = shared_data / "merscope_brain_cancer_crop"
    files = _files(_read(st2he.io.read_merscope, folder))
    assert files["used"] == [
        "cell_boundaries.parquet",
        "cell_by_gene.csv",
        "cell_metadata.csv",
        "detected_transcripts.csv",
        "images/manifest.json",
        "images/mosaic_DAPI_z3.tif",
    ]
    hdf5 = [f"cell_boundaries/feature_data_z2_z3_{i}.hdf5" for i in range(1, 5)]
    mosaics = ["Cellbound1_z3", "Cellbound2_z1", "Cellbound2_z3", "Cellbound3_z3", "DAPI_z1", "DAPI_z2"]
    mosaics = [f"images/mosaic_{m}.tif" for m in (*mosaics, "PolyT_z2", "PolyT_z3")]
    assert files["ignored"] == hdf5 + mosaics
    # every stain and plane read: only the hdf5 copies of the boundaries are left
    files = _files(_read(st2he.io.read_merscope, folder, stains="all", z_layers="max"))
    assert files["ignored"] == hdf5
    assert len(files["used"]) == 6 + 8


def test_cosmx_crop(shared_data):
    files = _files(_read(st2he.io.read_cosmx, shared_data / "cosmx_mouse_brain_quarter"))
    assert files["used"] == [
        f"{COSMX_ID}-polygons.csv",
        f"{COSMX_ID}_exprMat_file.csv",
        f"{COSMX_ID}_metadata_file.csv",
        f"{COSMX_ID}_tx_file.csv",
    ]
    assert files["ignored"] == []


def test_report_is_bounded_and_relative(tmp_path):
    folder = tmp_path / "run"
    (folder / "images").mkdir(parents=True)
    (folder / "analysis").mkdir()
    (folder / "analysis" / "x.csv").write_text("")
    for i in range(FILES_LISTED + 7):
        (folder / "images" / f"tile_{i:03d}.tif").write_text("")
    (folder / "a.csv").write_text("")
    (folder / ".hidden").write_text("")
    outside = tmp_path / "he.svs"
    outside.write_text("")
    used = [folder / "a.csv", folder / "images" / "tile_000.tif", outside]
    report = files_report(folder, used, subfolders=["images"])
    assert report["used"] == [str(outside.resolve()), "a.csv", "images/tile_000.tif"]
    # another folder at the top is one entry; the image folder is listed file by file, up to FILES_LISTED
    assert report["ignored"][0] == "analysis/"
    assert report["ignored"][1:] == [f"images/tile_{i:03d}.tif" for i in range(1, FILES_LISTED + 1)]
    assert report["unlisted"] == {"used": {}, "ignored": {"images": 6}}
    text = describe_files(report)
    assert text.splitlines()[1].endswith("... 6 more in images")
    # a used folder covers its files
    report = files_report(folder, [folder / "images"], subfolders=["images"])
    assert report["used"] == ["images/"] and report["ignored"] == ["a.csv", "analysis/"]


def test_read_and_demo_print_the_report(shared_data, tmp_path, capsys, monkeypatch):
    folder = shared_data / "cosmx_mouse_brain_quarter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _cli.main(["read", str(folder), str(tmp_path / "c.zarr"), "-q"]) == 0
    out = capsys.readouterr().out
    assert f"files used: {COSMX_ID}-polygons.csv, {COSMX_ID}_exprMat_file.csv" in out
    assert "files ignored: none" in out
    summary = {"store": "s", "figure": "f", "metrics": {}, "files": {"used": ["a"], "ignored": ["b"], "unlisted": {}}}
    monkeypatch.setattr(_demo, "run", lambda *a, **k: summary)
    args = argparse.Namespace(data=Path(folder), out=tmp_path, method="stain", seed=0, pixel_size=1.0)
    assert _demo.execute(args) == 0
    out = capsys.readouterr().out
    assert "files used: a\nfiles ignored: b" in out


def test_demo_records_the_report(shared_data, tmp_path):
    pytest.importorskip("matplotlib")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = _demo.run(shared_data / "cosmx_mouse_brain_quarter", tmp_path, method="stain", pixel_size=2.0)
    assert summary["files"]["used"][-1] == f"{COSMX_ID}_tx_file.csv"
