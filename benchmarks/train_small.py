"""Train, store and check the ``small`` generator shipped in ``src/st2he/models/weights/small``.

Three steps, split so that step 2 can also run on a machine without spatialdata (e.g. a bare GPU machine with
torch, transformers, peft and a diffusers wheel):

1. ``prepare`` (needs spatialdata): simulate samples with :func:`st2he.datasets.synthetic_tissue` (seeds 1-18 to
   train, 50-51 to validate; seed 0, the demo's sample, and seeds 100-103, the test samples, are never used), draw
   their input pictures with :func:`st2he.pp.rasterize_transcripts` (one palette for all: the co-expression palette
   of the first training sample, stored with the model) and cut aligned (input picture, H&E) pairs with
   :func:`st2he.tl._train.prepare_pairs` -- what :func:`st2he.tl.train_generator` does -- into ``pairs.npz``.
2. ``train`` (no spatialdata): the training core :func:`st2he.models._training.train`, which
   :func:`st2he.tl.train_generator` calls, with :data:`TRAIN_CONFIG`; the model is stored in float16
   (safetensors + JSON config with palette, pixel size, tile size, prompt and training history).
3. ``evaluate`` (needs spatialdata): on the held-out samples, ``virtual_he(method="diffusion")`` with the model and
   ``method="stain"``, both scored against the simulated real H&E with :func:`st2he.tl.evaluate_he`.

``all`` does the same in one process through :func:`st2he.tl.train_generator` itself.

Reproduce the shipped model (CPU: 1500 steps in 21 minutes on 2 cores, plus a few for preparing and evaluating)::

    python benchmarks/train_small.py prepare --out .devdata/small
    python benchmarks/train_small.py train --data .devdata/small --out .devdata/small/run --device cpu
    python benchmarks/train_small.py evaluate --model .devdata/small/run/model
    python benchmarks/train_small.py evaluate --appearance realistic   # the shipped model on the realistic look

``--recipe gpu`` trains larger crops and batches (16 crops of 256 px) with bf16 autocast within a 5-minute budget.
Measured on one H100 80GB HBM3 (torch 2.11+cu130, diffusers 0.42.1) with ``train --recipe gpu --device cuda
--ckpt-every 0 --val-every 250``: the budget allowed 1634 steps in 301 s (0.179 s per step after calibration, 5.4
steps/s, about 87 crops/s); validation PSNR 7.6 dB at step 0, 25.4 at 250, 26.5 at 500, 27.1 at 750, 27.2 at 1000,
27.5 at 1250 and 1500, 27.4 at the end (SSIM 0.82; the adversarial term, on from step 1200, changed little). On the
held-out seeds 100-103 (``evaluate``, one session): 27.03 dB / SSIM 0.844, against 26.67 / 0.835 for the shipped
CPU-trained weights and 20.51 / 0.782 for the stain baseline. Earlier GPU attempts did not learn (validation PSNR
stuck near 11 dB, still so after the UNet's last convolution and the x0 prediction were kept in float32; bf16
autocast on CPU gave NaN losses): the SSIM loss was computed under autocast, where its variances
(E[x^2] - E[x]^2 of unclamped outputs) cancel in bf16. The losses are now computed in float32 outside autocast. The
shipped weights are still those of the CPU recipe.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from _bare import import_models

ROOT = Path(__file__).resolve().parents[1]

TRAIN_SEEDS = list(range(1, 19))  # seed 0 is the demo's sample: kept out of training
VAL_SEEDS = [50, 51]  # validation during training
TEST_SEEDS = [100, 101, 102, 103]  # held out: the figures reported for the shipped model
SUBTYPES = ["mixed", "mixed", "gland", "solid"]
TILE = 256

#: The recipe of the shipped weights (a CPU run: 1500 steps in 21 minutes on 2 cores). Losses: L2 + 0.5 (1 - SSIM); the
#: adversarial term is off (it did not pay for its cost at this size), a fifth of the batches train the stochastic
#: mode (r in [0.4, 1]) so that n_samples > 1 gives a meaningful spread.
TRAIN_CONFIG = {
    "steps": 1500,
    "time_budget": None,
    "batch_size": 4,
    "crop_size": 128,
    "lr": 4e-4,
    "warmup_steps": 150,
    "lr_schedule": "cosine",
    "l2_weight": 1.0,
    "perceptual": "ssim",
    "perceptual_weight": 0.5,
    "gan_weight": 0.0,
    "gan_start": 1200,
    "stochastic_prob": 0.2,
    "r_range": (0.4, 1.0),
    "val_every": 500,
    "ckpt_every": 500,
    "log_every": 100,
    "seed": 0,
}
#: A GPU variant (bf16 autocast, larger crops and batches, stops within a time budget); measured on an H100, see
#: the module docstring.
GPU_CONFIG = {
    **TRAIN_CONFIG,
    "steps": 6000,
    "time_budget": 300,
    "batch_size": 16,
    "crop_size": 256,
    "gan_weight": 0.005,
}


def _sample(seed: int, palette=None, appearance: str = "clean"):
    import st2he

    sd = st2he.datasets.synthetic_tissue(seed, subtype=SUBTYPES[seed % len(SUBTYPES)], appearance=appearance)
    st2he.pp.rasterize_transcripts(sd, palette=palette if palette is not None else "coexpression")
    return sd


def prepare(out: Path) -> None:
    from st2he._elements import get_params
    from st2he.tl._train import prepare_pairs

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    first = _sample(TRAIN_SEEDS[0])
    palette = get_params(first, "st2he_input")["palette"]
    train = [first] + [_sample(s, palette) for s in TRAIN_SEEDS[1:]]
    val = [_sample(s, palette) for s in VAL_SEEDS]
    data = prepare_pairs(train, validation=val, tile_size=TILE)
    arrays = {f"train_input_{i}": x for i, x in enumerate(data["train_inputs"])}
    arrays.update({f"train_target_{i}": y for i, y in enumerate(data["train_targets"])})
    arrays["val_inputs"] = data["val_inputs"]
    arrays["val_targets"] = data["val_targets"]
    np.savez_compressed(out / "pairs.npz", **arrays)
    meta = {
        "palette": palette,
        "pixel_size": data["pixel_size"],
        "tile_size": TILE,
        "train_seeds": TRAIN_SEEDS,
        "val_seeds": VAL_SEEDS,
        "subtypes": SUBTYPES,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    size = (out / "pairs.npz").stat().st_size / 1e6
    print(
        f"prepared {len(train)} training samples, {len(data['val_inputs'])} validation tiles, {size:.1f} MB, {time.time() - t0:.0f} s"
    )


def train(
    data: Path, out: Path, device: str, steps: int | None, batch_size: int | None, recipe: str = "cpu", **overrides
) -> None:
    import torch

    # the training loop's notes (e.g. the step count a time budget allows) go to stderr
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("st2he").setLevel(logging.INFO)
    pix2pix, training, io = import_models("_pix2pix", "_training", "_io")
    meta = json.loads((data / "meta.json").read_text())
    npz = np.load(data / "pairs.npz")
    n = len([k for k in npz.files if k.startswith("train_input_")])
    xs = [npz[f"train_input_{i}"] for i in range(n)]
    ys = [npz[f"train_target_{i}"] for i in range(n)]
    cfg = dict(GPU_CONFIG if recipe == "gpu" else TRAIN_CONFIG)
    if steps is not None:
        cfg["steps"] = steps
    if batch_size is not None:
        cfg["batch_size"] = batch_size
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    print("training config:", json.dumps(cfg), flush=True)
    model = pix2pix.Pix2PixTurbo.from_config("small", seed=cfg["seed"])
    model.metadata.update(
        {
            "palette": meta["palette"],
            "pixel_size": meta["pixel_size"],
            "tile_size": meta["tile_size"],
            "input_key": "st2he_input",
            "r_sampling": 0.5,
            "trained_on": "st2he.datasets.synthetic_tissue seeds "
            f"{meta['train_seeds']} (subtypes cycling {meta['subtypes']}), validated on seeds {meta['val_seeds']}",
        }
    )
    t0 = time.time()
    model, history = training.train(
        model,
        xs,
        ys,
        npz["val_inputs"],
        npz["val_targets"],
        config=cfg,
        output_dir=out / "checkpoints" if cfg.get("ckpt_every") else None,
        device=device,
        progress=sys.stderr.isatty(),
    )
    elapsed = time.time() - t0
    model.metadata["training"]["seconds"] = round(elapsed, 1)
    model.metadata["training"]["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    model.to("cpu")
    io.save_pretrained(model, out / "model", dtype=torch.float16)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    vals = [h for h in history if "val_psnr" in h]
    for h in vals:
        print(f"step {h['step']:>6}: val PSNR {h['val_psnr']:.2f} dB, SSIM {h['val_ssim']:.4f}, L2 {h['val_l2']:.4f}")
    size = sum(p.stat().st_size for p in (out / "model").iterdir()) / 1e6
    done = model.metadata["training"]["steps"]  # fewer than cfg["steps"] when the time budget cut the run
    print(
        f"trained {done} steps in {elapsed:.0f} s ({done / elapsed:.2f} steps/s, batch {cfg['batch_size']}, "
        f"crop {cfg['crop_size']}); model {size:.1f} MB in {out / 'model'}"
    )


def evaluate(model_path: str | None, seeds: list[int], out: Path | None = None, appearance: str = "clean") -> None:
    """Score the model and the stain baseline on held-out samples drawn with ``appearance`` (the H&E's look)."""
    import pandas as pd

    import st2he
    from st2he.models import load_model

    model = load_model(model_path) if model_path else load_model()
    palette = model.metadata.get("palette")
    rows = []
    for seed in seeds:
        sd = _sample(seed, palette, appearance)
        t0 = time.time()
        st2he.tl.virtual_he(sd, method="diffusion", model=model, key_added="he_diffusion", progress=False)
        t_gen = time.time() - t0
        st2he.tl.virtual_he(sd, method="stain", key_added="he_stain")
        for key in ("he_diffusion", "he_stain"):
            res = st2he.tl.evaluate_he(sd, pred_key=key, true_key="he_image", key_added=f"metrics_{key}")
            overall = _overall(res)
            rows.append({"seed": seed, "appearance": appearance, "method": key.split("_")[1], **overall})
        rows[-2]["seconds"] = round(t_gen, 1)
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    summary = df.groupby("method")[["psnr", "ssim"]].mean()
    print(summary.to_string())
    if out is not None:
        df.to_csv(out, index=False)


def _overall(res) -> dict:
    """PSNR and SSIM over the whole image from evaluate_he's data frame."""
    df = res
    if "tile" in df.columns and (df["tile"] == "overall").any():
        row = df[df["tile"] == "overall"].iloc[0]
    elif "overall" in df.index:
        row = df.loc["overall"]
    else:
        row = df.mean(numeric_only=True)
    return {k: float(row[k]) for k in ("psnr", "ssim", "mse") if k in row}


def run_all(out: Path, device: str) -> None:
    """Prepare, train and evaluate in one process, through st2he.tl.train_generator."""
    import torch

    import st2he
    from st2he._elements import get_params
    from st2he.models import save_pretrained

    first = _sample(TRAIN_SEEDS[0])
    palette = get_params(first, "st2he_input")["palette"]
    train = [first] + [_sample(s, palette) for s in TRAIN_SEEDS[1:]]
    val = [_sample(s, palette) for s in VAL_SEEDS]
    cfg = dict(TRAIN_CONFIG)
    crop = cfg.pop("crop_size")
    model, history = st2he.tl.train_generator(
        train, model="small", validation=val, tile_size=crop, device=device, output_dir=out, **cfg
    )
    model.metadata.update({"r_sampling": 0.5, "tile_size": TILE})
    save_pretrained(model.to("cpu"), out / "model", dtype=torch.float16)
    print(history[history["val_psnr"].notna()].to_string(index=False))
    evaluate(str(out / "model"), TEST_SEEDS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--out", type=Path, default=ROOT / ".devdata" / "small")
    a = sub.add_parser("train")
    a.add_argument("--data", type=Path, default=ROOT / ".devdata" / "small")
    a.add_argument("--out", type=Path, default=ROOT / ".devdata" / "small" / "run")
    a.add_argument("--device", default="auto")
    a.add_argument("--steps", type=int, default=None)
    a.add_argument("--batch-size", type=int, default=None)
    a.add_argument("--recipe", choices=["cpu", "gpu"], default="cpu", help="cpu: the shipped weights' recipe")
    a.add_argument("--crop", type=int, default=None, help="training crop size (default 128)")
    a.add_argument("--time-budget", type=float, default=None, help="seconds (default 300)")
    a.add_argument("--lr", type=float, default=None)
    a.add_argument("--gan-weight", type=float, default=None)
    a.add_argument("--ckpt-every", type=int, default=None)
    a.add_argument("--val-every", type=int, default=None)
    a = sub.add_parser("evaluate")
    a.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    a.add_argument("--seeds", type=int, nargs="+", default=TEST_SEEDS)
    a.add_argument("--csv", type=Path, default=None)
    a.add_argument(
        "--appearance",
        choices=["clean", "realistic"],
        default="clean",
        help="H&E of the held-out samples: synthetic_tissue's clean drawing (the training data's) or realistic look",
    )
    a = sub.add_parser("all")
    a.add_argument("--out", type=Path, default=ROOT / ".devdata" / "small_all")
    a.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.out)
    elif args.cmd == "train":
        train(
            args.data,
            args.out,
            args.device,
            args.steps,
            args.batch_size,
            recipe=args.recipe,
            crop_size=args.crop,
            time_budget=args.time_budget,
            lr=args.lr,
            gan_weight=args.gan_weight,
            ckpt_every=args.ckpt_every,
            val_every=args.val_every,
        )
    elif args.cmd == "evaluate":
        evaluate(args.model, args.seeds, args.csv, appearance=args.appearance)
    else:
        run_all(args.out, args.device)


if __name__ == "__main__":
    main()
