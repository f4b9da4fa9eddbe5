"""Every lazy result of st2he computes on a dask.distributed cluster of worker processes, byte for byte as at home.

The graphs hold no closures, locks or open files; the molecules travel once per worker (by value, or as the name of
a spill file in a folder the workers share), the generator as its weights (or its checkpoint path).
"""

from __future__ import annotations

import numpy as np
import pytest

import st2he
from st2he._elements import get_params
from st2he._grid import _scale0
from st2he.models import save_pretrained

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py: as the workers (one thread each)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None, silence_logs=40
    )
    with cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def sample():
    sdata = st2he.datasets.synthetic_tissue(0, size_um=64)  # 128 x 128 pixels of 0.5 µm
    st2he.pp.rasterize_transcripts(sdata, chunk=48)  # over the DAPI image: 3 x 3 chunks
    return sdata


@pytest.fixture(scope="module")
def tiny():
    from st2he.models import Pix2PixTurbo

    model = Pix2PixTurbo.from_config("tiny", seed=0)
    model.metadata["tile_size"] = 64
    return model.set_eval()


def _same_on_the_cluster(client, sdata, key, *, min_nonzero: float = 0.05):
    """Compute ``key`` on the cluster and with the synchronous scheduler; they must agree exactly."""
    data = _scale0(sdata.images[key]).data
    at_home = data.compute(scheduler="sync")
    assert (at_home != 0).mean() > min_nonzero  # something to compare
    on_cluster = client.compute(data).result()
    assert on_cluster.dtype == at_home.dtype
    np.testing.assert_array_equal(on_cluster, at_home)
    return at_home


def test_input_picture_with_and_without_the_stain(client, sample):
    picture = _same_on_the_cluster(client, sample, "st2he_input")
    st2he.pp.rasterize_transcripts(sample, chunk=48, stain_key=None, key_added="no_stain", overwrite=True)
    black = _same_on_the_cluster(client, sample, "no_stain", min_nonzero=0.01)

    def grey(img):
        return int(((img[0] == img[1]) & (img[1] == img[2]) & (img[0] > 0)).sum())

    assert grey(picture) > 1000 and grey(black) == 0  # the stain shows, in grey


def test_spilled_molecules_reach_the_workers(client, sample, tmp_path, monkeypatch):
    import st2he.pp._molecules as molecules

    palette = get_params(sample, "st2he_input")["palette"]
    expected = _scale0(sample.images["st2he_input"]).values
    # in a spill_dir the workers share: the graph names the file, each worker opens it
    st2he.pp.rasterize_transcripts(sample, chunk=48, palette=palette, spill_dir=tmp_path, key_added="shared")
    assert len(list(tmp_path.iterdir())) == 1
    np.testing.assert_array_equal(_same_on_the_cluster(client, sample, "shared"), expected)
    # spilled to this process's private (unlinked) file: the buckets travel by value
    monkeypatch.setitem(molecules.bin_molecules.__kwdefaults__, "memory_limit", 0)
    st2he.pp.rasterize_transcripts(sample, chunk=48, palette=palette, key_added="private")
    np.testing.assert_array_equal(_same_on_the_cluster(client, sample, "private"), expected)


def test_transcript_density(client, sample):
    st2he.pp.transcript_density(sample, genes={"all": list(get_params(sample, "st2he_input")["palette"])}, chunk=48)
    counts = _same_on_the_cluster(client, sample, "transcript_density", min_nonzero=0.001)
    assert counts.sum() > 1000


def test_stain_baseline(client, sample):
    st2he.tl.virtual_he(sample, method="stain", chunk=48, key_added="stain_he")
    _same_on_the_cluster(client, sample, "stain_he")


def test_virtual_he_from_a_model_object_and_from_a_checkpoint(client, sample, tiny, tmp_path):
    kwargs = {"lazy": True, "tile_size": 64, "overlap": 16, "chunk": 48, "progress": False}
    st2he.tl.virtual_he(sample, model=tiny, key_added="vhe", **kwargs)
    out = _same_on_the_cluster(client, sample, "vhe")
    # the eager run agrees: the graph is the same computation
    st2he.tl.virtual_he(sample, model=tiny, key_added="vhe_now", **{**kwargs, "lazy": False})
    np.testing.assert_array_equal(_scale0(sample.images["vhe_now"]).values, out)
    # a checkpoint path: each worker loads the model from it
    path = save_pretrained(tiny, tmp_path / "tiny")
    st2he.tl.virtual_he(sample, model=str(path), key_added="vhe_path", **kwargs)
    np.testing.assert_array_equal(_same_on_the_cluster(client, sample, "vhe_path"), out)
