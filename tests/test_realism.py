"""synthetic_tissue(appearance=...): the clean look stays as it was, the realistic look varies like real slides."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import st2he
from st2he._elements import get_image

NO_ARTEFACTS = {"fold": 0.0, "tear": 0.0, "thickness": 0.0}


def _image(sdata, key="he_image") -> np.ndarray:
    return np.ascontiguousarray(np.asarray(get_image(sdata, key)[0].values))


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def pair():
    """The same seed in both appearances."""
    clean = st2he.datasets.synthetic_tissue(4, size_um=128, subtype="gland")
    real = st2he.datasets.synthetic_tissue(4, size_um=128, subtype="gland", appearance="realistic")
    return clean, real


def test_clean_is_byte_identical_to_before(pair):
    # checksums of the H&E and DAPI taken before the realistic appearance existed
    clean, _ = pair
    assert _digest(_image(clean)) == "ce26c138c68459af48587352fdcb7c9e65357e78c216d85d85bc269cf3b28880"
    assert _digest(_image(clean, "morphology_focus")) == (
        "f9120de15bc6ca99904db3abb57e271401680fc039cc9b0e50ba2db1b46c1ed6"
    )
    assert clean.attrs["st2he"]["source"]["appearance"] == "clean"


def test_realistic_keeps_dapi_and_molecules(pair):
    clean, real = pair
    assert np.array_equal(_image(clean, "morphology_focus"), _image(real, "morphology_focus"))
    tx_clean = clean.points["transcripts"].compute()
    tx_real = real.points["transcripts"].compute()
    assert len(tx_clean) == len(tx_real) > 1000
    for column in ("x", "y", "gene", "cell_id", "qv"):
        assert np.array_equal(np.asarray(tx_clean[column]), np.asarray(tx_real[column])), column
    assert (clean.tables["table"].X != real.tables["table"].X).nnz == 0
    # ... while the H&E differs, with tissue in the same place (mostly bright where the clean one is glass)
    he_clean, he_real = _image(clean).astype(float), _image(real).astype(float)
    assert np.abs(he_clean - he_real).mean() > 5
    glass = he_clean.mean(axis=0) > 240
    assert he_real.mean(axis=0)[glass].mean() > 215
    assert he_real.mean(axis=0)[~glass].mean() < he_real.mean(axis=0)[glass].mean() - 30


def test_realistic_same_seed_same_image(pair):
    _, real = pair
    again = st2he.datasets.synthetic_tissue(4, size_um=128, subtype="gland", appearance="realistic")
    assert np.array_equal(_image(real), _image(again))
    assert real.attrs["st2he"]["source"]["look"] == again.attrs["st2he"]["source"]["look"]


def _haematoxylin_direction(he: np.ndarray) -> np.ndarray:
    """Unit mean optical-density vector of the darkest 3 % of pixels (nuclei: mostly haematoxylin)."""
    od = -np.log(np.clip(he.reshape(3, -1).astype(float), 1, 255) / 255.0)
    total = od.sum(axis=0)
    dark = total >= np.quantile(total, 0.97)
    v = od[:, dark].mean(axis=1)
    return v / np.linalg.norm(v)


def test_realistic_stain_colour_varies_between_samples():
    directions = {}
    for look in ("clean", "realistic"):
        kwargs = {"artefacts": NO_ARTEFACTS} if look == "realistic" else {}
        samples = [
            st2he.datasets.synthetic_tissue(s, size_um=96, subtype="solid", appearance=look, **kwargs) for s in range(5)
        ]
        directions[look] = np.array([_haematoxylin_direction(_image(sdata)) for sdata in samples])
    spread = {}  # largest angle (degrees) between a sample's haematoxylin direction and the mean direction
    for look, v in directions.items():
        mean = v.mean(axis=0) / np.linalg.norm(v.mean(axis=0))
        spread[look] = np.degrees(np.arccos(np.clip(v @ mean, -1, 1))).max()
    # the clean look has one stain for all samples; the realistic one's haematoxylin hue moves by degrees
    assert spread["clean"] < 1.0
    assert spread["realistic"] > 2.5
    assert spread["realistic"] > 4 * spread["clean"]


def _render(seed, **artefacts):
    rates = dict(NO_ARTEFACTS, **artefacts)
    sdata = st2he.datasets.synthetic_tissue(seed, size_um=128, subtype="solid", appearance="realistic", artefacts=rates)
    return _image(sdata).astype(float), sdata.attrs["st2he"]["source"]["look"]["artefacts"]


def test_forced_fold_darkens_a_band_and_tear_opens_white_cracks():
    base, drawn = _render(1)
    assert drawn == []
    fold, drawn_fold = _render(1, fold=300.0)  # ~5 folds expected on 0.016 mm²
    tear, drawn_tear = _render(1, tear=300.0)
    assert any(d["kind"] == "fold" for d in drawn_fold)
    assert any(d["kind"] == "tear" for d in drawn_tear)
    for d in drawn_fold + drawn_tear:  # recorded in global µm, inside the sample (origin (1200, 800))
        assert 1200 <= d["x"] <= 1328 and 800 <= d["y"] <= 928
    # a fold doubles the tissue: where it changes the picture, it only darkens it (densities add)
    change = fold.mean(axis=0) - base.mean(axis=0)
    changed = np.abs(change) > 12
    assert changed.mean() > 0.02
    assert (change[changed] < 0).mean() > 0.97
    # a tear shows bare glass: tissue pixels that turned about as bright as the background
    tissue = base.mean(axis=0) < 200
    white = tear.mean(axis=0) > 225
    assert (tissue & white).sum() > 50
    assert (tear.mean(axis=0) - base.mean(axis=0))[tissue & white].mean() > 40
    # nothing else moved: outside the artefacts the pictures agree up to the JPEG round trip
    calm = ~changed & ~(tissue & white)
    assert np.abs(fold - base).mean(axis=0)[calm].mean() < 3


def test_thickness_field_changes_intensity_smoothly():
    base, _ = _render(2)
    thick, drawn = _render(2, thickness=0.3)
    assert [d["kind"] for d in drawn] == ["thickness"]
    od_base = -np.log(np.clip(base, 1, 255) / 255).sum(axis=0)
    od_thick = -np.log(np.clip(thick, 1, 255) / 255).sum(axis=0)
    tissue = od_base > 0.4
    ratio = np.log(od_thick[tissue] / od_base[tissue])
    assert 0.1 < ratio.std() < 0.6


def test_appearance_and_artefacts_are_checked():
    with pytest.raises(ValueError, match="appearance must be"):
        st2he.datasets.synthetic_tissue(0, size_um=64, appearance="photo")
    with pytest.raises(ValueError, match="only applies with appearance='realistic'"):
        st2he.datasets.synthetic_tissue(0, size_um=64, artefacts={"fold": 1.0})
    with pytest.raises(ValueError, match="Unknown artefacts"):
        st2he.datasets.synthetic_tissue(0, size_um=64, appearance="realistic", artefacts={"bubble": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        st2he.datasets.synthetic_tissue(0, size_um=64, appearance="realistic", artefacts={"fold": -1.0})
