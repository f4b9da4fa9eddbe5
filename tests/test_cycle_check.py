"""tl.cycle_check: measured expression -> virtual H&E -> expression read back, against the real H&E."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import st2he  # noqa: E402
from st2he._units import gene_columns, lognormalise, total_counts  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TUMOUR = ("gland_tumour", "solid_tumour")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return st2he.tl.train_expression(
        st2he.datasets.synthetic_tissue(0),
        model="tiny",
        n_genes=12,
        tumour_key="tissue",
        tumour_values=TUMOUR,
        chip_um=128.0,
        steps=30,
        batch_size=4,
        lr=3e-3,
        val_fraction=0,
        ckpt_every=0,
        progress=False,
    )


@pytest.fixture(scope="module")
def shipped():
    # trained to convergence: the comparison of the two readings below does not hang on a 30-step model's luck
    from st2he.models._expression import SHIPPED_EXPRESSION

    return st2he.models.load_expression_model(SHIPPED_EXPRESSION)


@pytest.fixture(scope="module")
def sample():
    sdata = st2he.datasets.synthetic_tissue(3, size_um=192)
    st2he.pp.rasterize_transcripts(sdata, pixel_size=1.0)
    st2he.tl.virtual_he(sdata, method="stain")  # a virtual H&E that keeps little of the expression
    return sdata


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_cycle_check_scores_virtual_against_real(shipped, sample):
    model = shipped
    df = st2he.tl.cycle_check(sample, he_key="virtual_he", model=model, progress=False)
    out = sample["cycle_check"]
    genes = list(df.index)
    assert genes == list(model.genes)
    # the real H&E's column is the expression model on the real H&E, scored as evaluate_expression scores it
    real = st2he.tl.predict_expression(sample, model=model, units="cell_boundaries", key_added="p_real", progress=False)
    np.testing.assert_allclose(out.layers["real"], np.asarray(real.X), rtol=1e-5, atol=1e-5)
    table = sample["table"]
    measured = lognormalise(table.X[:, gene_columns(table, genes)], total_counts(table))
    np.testing.assert_allclose(out.layers["measured"], measured, atol=1e-6)  # units in the same order here
    keep = np.asarray(real.obs["in_tissue"], dtype=bool)
    for k, g in enumerate(genes[:4]):
        expected = _pearson(np.asarray(real.X)[keep, k].astype(np.float64), measured[keep, k].astype(np.float64))
        assert df.loc[g, "r_real"] == pytest.approx(expected, abs=1e-5)
        assert df.loc[g, "r_virtual"] == pytest.approx(
            _pearson(out.X[keep, k].astype(np.float64), measured[keep, k].astype(np.float64)), abs=1e-5
        )
    ok = df["r_real"] >= 0.1
    np.testing.assert_allclose(df.loc[ok, "ratio"], df.loc[ok, "r_virtual"] / df.loc[ok, "r_real"])
    assert df.loc[~ok, "ratio"].isna().all()
    # the disagreement map: RMS over genes of virtual minus real, per unit
    expected = np.sqrt(np.mean((out.X.astype(np.float64) - out.layers["real"]) ** 2, axis=1))
    np.testing.assert_allclose(out.obs["disagreement"], expected, rtol=1e-5)
    # the model reads the real H&E better than the stain baseline's picture
    summary = df.attrs["summary"]
    assert summary["mean_r_real"] > summary["mean_r_virtual"]
    assert out.uns["summary"]["mean_r_real"] == pytest.approx(summary["mean_r_real"])


def test_cycle_check_refuses_and_keeps(model, sample):
    with pytest.raises(KeyError, match="he_key='nope'"):
        st2he.tl.cycle_check(sample, he_key="nope", model=model, progress=False)
    with pytest.raises(KeyError, match="true_key='nope'"):
        st2he.tl.cycle_check(sample, true_key="nope", model=model, progress=False)
    if "cycle_check" not in sample:
        st2he.tl.cycle_check(sample, model=model, progress=False)
    before = sample["cycle_check"]
    with pytest.raises(KeyError, match="already"):
        st2he.tl.cycle_check(sample, model=model, progress=False)
    assert sample["cycle_check"] is before
