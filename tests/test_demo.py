"""The end-to-end demo: it writes its store and metrics before it plots."""

from __future__ import annotations

import json

import matplotlib
import pytest
import spatialdata

import st2he
from st2he import _demo

matplotlib.use("Agg")


def test_demo_keeps_its_store_when_plotting_fails(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a plotting error")

    monkeypatch.setattr(st2he.pl, "compare", broken)
    with pytest.raises(RuntimeError, match="a plotting error"):
        _demo.run(None, tmp_path, method="stain", seed=1)
    back = spatialdata.read_zarr(tmp_path / "st2he.zarr")
    assert {"st2he_input", "virtual_he", "he_image"} <= set(back.images)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 15 < metrics["metrics"]["psnr"] < 35  # the stain baseline scores about 20 dB on the simulated sample
    assert not (tmp_path / "st2he_compare.png").exists()


def test_demo_on_the_simulated_sample(tmp_path):
    summary = _demo.run(None, tmp_path, method="stain", seed=1)
    assert (tmp_path / "st2he_compare.png").stat().st_size > 10_000
    assert summary["metrics"]["psnr"] == pytest.approx(json.loads((tmp_path / "metrics.json").read_text())["metrics"]["psnr"])
