"""Does a generator read a panel it never saw? Train on one simulated panel, score on another.

:func:`st2he.datasets.synthetic_tissue` draws the same tissue under the gene names of two commercial panels
(``panel="xenium_lung"``, ``"xenium_breast"``: 5 of 88 genes shared, every program marked on both). For each
palette (``"lineage"``, ``"coexpression"``) a generator is trained (within a time budget, or ``--steps``) on
lung-panel samples whose input pictures are drawn with that palette, then scored with
:func:`st2he.tl.evaluate_he` against the simulated H&E of held-out seeds. With ``"coexpression"`` one palette is
used for all pictures: the first training sample's, stored with the model, as ``benchmarks/train_small.py`` does.
With ``"lineage"`` every picture is drawn with ``palette="lineage"`` (the lineage palette of its own sample), so the
model records ``metadata["palette_method"] == "lineage"`` and ``virtual_he`` treats it as a lineage model.

- in-panel: held-out lung-panel samples drawn as the training samples were;
- cross-panel: the same seeds on the breast panel. The model's palette names lung genes, so the picture is drawn
  for the breast panel: with ``"lineage"``, the lineage palette of the breast sample itself (colours by lineage,
  whatever the genes); with ``"coexpression"``, the co-expression palette of the breast sample itself. Both are
  passed with ``palette_mismatch="warn"`` (used as drawn).
- cross, virtual_he defaults: what a user gets with the defaults: the breast picture drawn with
  ``rasterize_transcripts``' default palette (``"coexpression"``, the breast sample's own) and passed to
  ``virtual_he`` with its default ``palette_mismatch="redraw"``. A lineage model's input is drawn again with the
  lineage palette of the breast sample (every gene kept; the log says whether that picture equals the
  cross-panel one pixel for pixel); a co-expression model's with the model's colours for the genes the model knows
  (the 5 shared genes), the others left out.

Each row gives PSNR / SSIM of the generator and of the stain baseline (``virtual_he(method="stain")``) on the same
samples, and the share of the in-panel PSNR gain over the baseline that the cross-panel run keeps.

    python benchmarks/bench_cross_panel.py --minutes 8 --out .devdata/cross_panel

Figures and their caveats: ``docs/models.md`` (measured with ``--steps 20 --size-um 256``). The step count a time
budget reaches depends on the machine's load; ``--steps N`` trains exactly ``N`` steps (the cosine schedule over
``N``), for figures that can be compared between runs.

``--init shipped`` (default) fine-tunes the shipped ``small`` generator (trained on the default panel's
co-expression colours), ``--init scratch`` trains the ``small`` architecture from random weights. ``--init
small-real`` trains nothing: it scores the shipped lineage generator ``"small-real"`` (2888 steps on the default
panel's names and on pairs derived from real H&E) on the held-out seeds drawn with the panel it trained on and with
the two panels it never saw, each against the stain baseline::

    python benchmarks/bench_cross_panel.py --init small-real --out .devdata/cross_panel
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SUBTYPES = ["mixed", "mixed", "gland", "solid"]
TRAIN_SEEDS = list(range(1, 9))
TEST_SEEDS = [100, 101]
PANEL_A, PANEL_B = "xenium_lung", "xenium_breast"


def _sample(seed: int, panel: str, palette, size_um: float):
    import st2he

    sd = st2he.datasets.synthetic_tissue(seed, subtype=SUBTYPES[seed % len(SUBTYPES)], panel=panel, size_um=size_um)
    st2he.pp.rasterize_transcripts(sd, palette=palette, pixel_size=0.5)
    return sd


def _pixels(sd, key: str) -> np.ndarray:
    from st2he._raster import Raster

    return np.asarray(Raster(sd[key]).level0.values)


def _overall(df) -> dict:
    row = df[df["tile"] == "overall"].iloc[0] if "tile" in df.columns else df.loc["overall"]
    return {"psnr": float(row["psnr"]), "ssim": float(row["ssim"])}


def _score(sd, key: str) -> dict:
    import st2he

    res = st2he.tl.evaluate_he(sd, pred_key=key, true_key="he_image", key_added=f"metrics_{key}", overwrite=True)
    return _overall(res)


def _mean(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _evaluate(model, samples, *, palette_mismatch: str | None) -> tuple[dict, dict]:
    """Mean (model, stain baseline) PSNR / SSIM over ``samples`` (``palette_mismatch=None``: virtual_he's default)."""
    import warnings

    import st2he

    got, base = [], []
    options = {} if palette_mismatch is None else {"palette_mismatch": palette_mismatch}
    for sd in samples:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            st2he.tl.virtual_he(
                sd,
                method="diffusion",
                model=model,
                key_added="he_model",
                progress=False,
                overwrite=True,
                **options,
            )
        if "he_stain" not in sd.images:
            st2he.tl.virtual_he(sd, method="stain", key_added="he_stain")
        got.append(_score(sd, "he_model"))
        base.append(_score(sd, "he_stain"))
    return _mean(got), _mean(base)


def _row(palette: str, case: str, steps: int, m: dict, b: dict, reference_gain: float) -> dict:
    """One result row: the model's and the stain baseline's mean PSNR / SSIM, the gain and its share of a reference."""
    gain = m["psnr"] - b["psnr"]
    return {
        "palette": palette,
        "case": case,
        "steps": steps,
        "psnr": round(m["psnr"], 2),
        "ssim": round(m["ssim"], 3),
        "stain_psnr": round(b["psnr"], 2),
        "stain_ssim": round(b["ssim"], 3),
        "gain_db": round(gain, 2),
        "gain_kept_pct": round(100 * gain / reference_gain, 1) if reference_gain > 0 else float("nan"),
    }


def run(
    palette: str, *, minutes: float, init: str, size_um: float, out: Path, log, steps: int | None = None
) -> list[dict]:
    import torch

    import st2he
    from st2he._elements import get_params
    from st2he.models import load_model

    t0 = time.time()
    first = _sample(TRAIN_SEEDS[0], PANEL_A, palette, size_um)
    # lineage: each picture with the lineage palette of its own sample (recorded as such: a lineage model)
    pal = palette if palette == "lineage" else get_params(first, "st2he_input")["palette"]
    train = [first] + [_sample(s, PANEL_A, pal, size_um) for s in TRAIN_SEEDS[1:]]
    log(f"[{palette}] {len(train)} training samples drawn in {time.time() - t0:.0f} s")
    model = load_model() if init == "shipped" else "small"
    t1 = time.time()
    torch.manual_seed(0)
    net, history = st2he.tl.train_generator(
        train,
        model=model,
        validation=None,
        tile_size=128,
        steps=100_000 if steps is None else steps,
        time_budget=minutes * 60 if steps is None else None,
        calibration_steps=5,
        batch_size=4,
        lr=2e-4 if init == "shipped" else 4e-4,
        warmup_steps=20 if init == "shipped" else 100,
        lr_schedule="cosine",
        perceptual="ssim",
        perceptual_weight=0.5,
        gan_weight=0.0,
        stochastic_prob=0.2,
        ckpt_every=0,
        val_every=100_000,
        log_every=50,
        device="cpu",
        progress=False,
    )
    net.metadata["tile_size"] = 256
    steps = int(net.metadata["training"]["steps"])
    method = net.metadata.get("palette_method")
    log(f"[{palette}] trained {steps} steps in {time.time() - t1:.0f} s (init {init}; palette_method {method})")
    del train

    rows = []
    t2 = time.time()
    in_panel = [_sample(s, PANEL_A, pal, size_um) for s in TEST_SEEDS]
    m_in, b_in = _evaluate(net, in_panel, palette_mismatch="warn")
    cross_drawn = [_sample(s, PANEL_B, palette, size_um) for s in TEST_SEEDS]
    m_x, b_x = _evaluate(net, cross_drawn, palette_mismatch="warn")
    # the defaults: rasterize_transcripts' palette ("coexpression") and virtual_he's palette_mismatch ("redraw")
    cross_default = [_sample(s, PANEL_B, "coexpression", size_um) for s in TEST_SEEDS]
    m_r, b_r = _evaluate(net, cross_default, palette_mismatch=None)
    for sd_default, sd_drawn in zip(cross_default, cross_drawn, strict=True):
        params = get_params(sd_default, "he_model_input") if "he_model_input" in sd_default.images else {}
        kept = len(params.get("palette") or {})
        same = "-"
        if params:
            same = np.array_equal(_pixels(sd_default, "he_model_input"), _pixels(sd_drawn, "st2he_input"))
        log(
            f"[{palette}] virtual_he defaults: input redrawn with palette_method {params.get('palette_method')!r}, "
            f"{kept} genes kept; equal to the cross-panel picture: {same}"
        )
    log(f"[{palette}] evaluated in {time.time() - t2:.0f} s")
    gain_in = m_in["psnr"] - b_in["psnr"]
    for case, m, b in (("in-panel", m_in, b_in), ("cross-panel", m_x, b_x), ("cross, virtual_he defaults", m_r, b_r)):
        rows.append(_row(palette, case, steps, m, b, gain_in))
    (out / f"rows_{palette}.json").write_text(json.dumps(rows, indent=1))
    return rows


def run_small_real(*, size_um: float, out: Path, log) -> list[dict]:
    """The shipped lineage generator ``"small-real"`` as it is (no training) on the panel it trained on and on two
    panels it never saw, against the stain baseline on the same samples."""
    from st2he.models import load_model

    net = load_model("small-real")
    rows, gains = [], {}
    cases = (
        ("trained panel (default names)", "default", "lineage", "warn"),
        (f"unseen panel {PANEL_A}", PANEL_A, "lineage", "warn"),
        (f"unseen panel {PANEL_B}", PANEL_B, "lineage", "warn"),
        (f"unseen panel {PANEL_B}, virtual_he defaults", PANEL_B, "coexpression", None),
    )
    for case, panel, palette, mismatch in cases:
        t = time.time()
        samples = [_sample(s, panel, palette, size_um) for s in TEST_SEEDS]
        m, b = _evaluate(net, samples, palette_mismatch=mismatch)
        gains[case] = m["psnr"] - b["psnr"]
        rows.append(_row("lineage", case, 0, m, b, next(iter(gains.values()))))
        log(f"[small-real] {case}: {rows[-1]['psnr']} dB ({time.time() - t:.0f} s)")
    (out / "rows_small_real.json").write_text(json.dumps(rows, indent=1))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=8.0, help="training time budget per palette (minutes)")
    p.add_argument(
        "--steps", type=int, default=None, help="train exactly this many steps (default: as many as --minutes allows)"
    )
    p.add_argument(
        "--init",
        choices=["shipped", "scratch", "small-real"],
        default="shipped",
        help="small-real: score the shipped lineage generator as it is, on its training panel and on unseen ones",
    )
    p.add_argument("--palettes", nargs="+", default=["lineage", "coexpression"])
    p.add_argument("--size-um", type=float, default=384.0, help="edge of every simulated sample (µm)")
    p.add_argument("--out", type=Path, default=ROOT / ".devdata" / "cross_panel")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("st2he").setLevel(logging.WARNING)
    t0 = time.time()

    def log(msg):
        print(f"{time.time() - t0:7.0f} s  {msg}", flush=True)

    import pandas as pd

    rows = []
    if args.init == "small-real":
        rows += run_small_real(size_um=args.size_um, out=args.out, log=log)
    for palette in args.palettes if args.init != "small-real" else []:
        options = {"minutes": args.minutes, "init": args.init, "size_um": args.size_um, "steps": args.steps}
        rows += run(palette, out=args.out, log=log, **options)
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    df.to_csv(args.out / "cross_panel.csv", index=False)
    log("done")


if __name__ == "__main__":
    main()
