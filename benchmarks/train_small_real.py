"""Train and score a ``small`` generator on simulated pairs plus pairs derived from real H&E, with the lineage palette.

Issue 12 §4: a generator that paints real-looking H&E. Pairs derived from real H&E come from
:func:`st2he.datasets.pairs_from_he` (the H&E's haematoxylin as the nuclear stain, nuclei segmented, molecules of
each nucleus's lineage program placed in its cell); every input picture is drawn with ``palette="lineage"``, so
the model reads lineage colours and can be used on any panel (``virtual_he`` redraws other pictures with the
lineage palette of their own panel).

Data (the real H&E in ``../shared/data``, see its README):

- train: simulated seeds 1-18 (as :mod:`train_small`); CMU-1-Small-Region (skin) above row 2161 (the top 73 %);
  Kather CRC tiles of the classes ADI, LYM, MUS, STR, TUM (20 tiles, each repeated so that the Kather tiles give
  about a fifth of the training crops; crops are drawn in proportion to each image's area);
- validate during training: simulated seeds 50-51 (as :mod:`train_small`);
- held out, never seen: the CMU-1 region below row 2225 (the bottom quarter, a 64-row gap), the TCGA tiles (9 JPEG
  tiles of two slides and one CRC TIFF tile), the Kather tiles of the classes DEB, MUC, NORM (12 tiles), and the
  simulated seeds 100-103.

Steps::

    python benchmarks/train_small_real.py prepare --out bench_output/real
    python benchmarks/train_small_real.py train --data bench_output/real --out bench_output/real/run --time-budget 2700
    python benchmarks/train_small_real.py evaluate --model bench_output/real/run/model --csv bench_output/real/eval.csv
    cp bench_output/real/run/model/* src/st2he/models/weights/small_real/   # st2he's shipped "small-real"

``train`` starts from the shipped weights (``--init shipped``, the default; ``--init scratch`` for random weights)
and stops within ``--time-budget`` seconds (the step count is calibrated so that the learning-rate schedule ends
with the budget). ``evaluate`` scores ``virtual_he(method="diffusion")`` against ``method="stain"`` with
:func:`st2he.tl.evaluate_he` on the held-out derived pairs and the held-out simulated seeds; with ``--model
shipped`` it scores the default shipped model (``"small"``) the same way (its pictures are redrawn with its own
palette), with ``--model small-real`` the shipped generator for real panels (the output of the steps above: 2888
steps in 51 minutes on two CPU cores; figures in ``docs/models.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: the real H&E: ``../shared/data`` of the project root (of a worktree: two levels up)
DATA = next((d for d in (ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data") if d.exists()), None)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_small import SUBTYPES, TEST_SEEDS, TILE, TRAIN_CONFIG, TRAIN_SEEDS, VAL_SEEDS, _overall  # noqa: E402

CMU = "he_cmu1_small_region.svs"
CMU_TRAIN_ROWS = 2161  # rows [0, 2161) train
CMU_TEST_ROW = 2225  # rows [2225, end) held out (64 rows apart)
KATHER_TRAIN = ("ADI", "LYM", "MUS", "STR", "TUM")
KATHER_TEST = ("DEB", "MUC", "NORM")
KATHER_SHARE = 0.2  # about this share of the training crops come from Kather tiles


def _quiet():
    import st2he

    warnings.simplefilter("ignore", st2he.pp.MoleculesDroppedWarning)
    warnings.filterwarnings("ignore", message=".*pixel.*")


def _sim(seed: int):
    import st2he

    sd = st2he.datasets.synthetic_tissue(seed, subtype=SUBTYPES[seed % len(SUBTYPES)])
    st2he.pp.rasterize_transcripts(sd, palette="lineage")
    return sd


def _derived(image, name: str, seed: int = 0, origin=(0.0, 0.0)):
    import st2he

    sd = st2he.datasets.pairs_from_he(image, seed=seed, origin_um=origin)
    sd.attrs["st2he"]["source"]["name"] = name
    st2he.pp.rasterize_transcripts(sd, palette="lineage")
    return sd


def _cmu(part: str):
    import tifffile

    rgb = tifffile.imread(DATA / CMU, key=0)
    if part == "train":
        return _derived(rgb[:CMU_TRAIN_ROWS], "cmu1_train")
    return _derived(rgb[CMU_TEST_ROW:], "cmu1_heldout", seed=1, origin=(0.0, CMU_TEST_ROW * 0.5))


def _kather(classes) -> list[tuple[str, Path]]:
    return sorted((p.name, p) for p in (DATA / "he_kather_crc_32").glob("*.png") if p.name.split("-")[0] in classes)


def kather_split(split: str = "classes") -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """``(train, held out)`` Kather tiles: ``"classes"`` holds out whole classes (DEB, MUC, NORM), ``"tiles"`` the
    second and fourth tile of every class (so every tissue class is seen in training, never the same tile)."""
    if split == "classes":
        return _kather(KATHER_TRAIN), _kather(KATHER_TEST)
    if split == "tiles":
        every = _kather(KATHER_TRAIN + KATHER_TEST)
        by_class: dict[str, list] = {}
        for name, p in every:
            by_class.setdefault(name.split("-")[0], []).append((name, p))
        train = [t for tiles in by_class.values() for t in tiles[0::2]]
        test = [t for tiles in by_class.values() for t in tiles[1::2]]
        return sorted(train), sorted(test)
    msg = f"split must be 'classes' or 'tiles', got {split!r}."
    raise ValueError(msg)


def heldout_real(split: str = "classes") -> list[tuple[str, str, object]]:
    """``(group, name, sdata)`` of every held-out derived pair."""
    out = [("cmu1_heldout", "cmu1_heldout", _cmu("test"))]
    tcga = sorted((DATA / "he_tcga_tiles").rglob("*.jpg")) + sorted((DATA / "he_tcga_tiles").glob("*.tif"))
    for i, p in enumerate(tcga):
        out.append(("tcga", p.name, _derived(p, p.name, seed=10 + i)))
    for i, (name, p) in enumerate(kather_split(split)[1]):
        out.append(("kather_heldout", name, _derived(p, name, seed=30 + i)))
    return out


def prepare(out: Path, split: str = "classes") -> None:
    from st2he._elements import get_params
    from st2he.tl._train import prepare_pairs

    _quiet()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sims = [_sim(s) for s in TRAIN_SEEDS]
    val = [_sim(s) for s in VAL_SEEDS]
    cmu = _cmu("train")
    kather_train = kather_split(split)[0]
    kather = [_derived(p, name, seed=100 + i) for i, (name, p) in enumerate(kather_train)]
    data = prepare_pairs(sims + [cmu] + kather, validation=val, tile_size=TILE)
    xs, ys = data["train_inputs"], data["train_targets"]
    crop = TRAIN_CONFIG["crop_size"]

    def positions(x):
        return (x.shape[1] - crop + 1) * (x.shape[2] - crop + 1)

    n_sim = len(sims) + 1
    other = sum(positions(x) for x in xs[:n_sim])
    per_copy = sum(positions(x) for x in xs[n_sim:])
    repeat = max(1, round(KATHER_SHARE / (1 - KATHER_SHARE) * other / per_copy))
    arrays = {}
    k = 0
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        for _ in range(repeat if i >= n_sim else 1):
            arrays[f"train_input_{k}"] = x
            arrays[f"train_target_{k}"] = y
            k += 1
    arrays["val_inputs"] = data["val_inputs"]
    arrays["val_targets"] = data["val_targets"]
    np.savez_compressed(out / "pairs.npz", **arrays)
    palette = get_params(sims[0], "st2he_input")["palette"]
    meta = {
        "palette": palette,
        "palette_method": "lineage",
        "pixel_size": data["pixel_size"],
        "tile_size": TILE,
        "train_seeds": TRAIN_SEEDS,
        "val_seeds": VAL_SEEDS,
        "subtypes": SUBTYPES,
        "real": {
            "cmu1_rows": [0, CMU_TRAIN_ROWS],
            "kather_split": split,
            "kather_classes": sorted({name.split("-")[0] for name, _ in kather_train}),
            "kather_tiles": [name for name, _ in kather_train],
            "kather_repeat": repeat,
            "cmu1_cells": cmu.attrs["st2he"]["source"]["cell_types"],
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    share = {
        "simulated": sum(positions(x) for x in xs[: len(sims)]),
        "cmu1": positions(xs[len(sims)]),
        "kather": per_copy * repeat,
    }
    total = sum(share.values())
    print(
        f"prepared {k} training images ({', '.join(f'{n} {v / total:.0%}' for n, v in share.items())} of the crops; "
        f"Kather tiles repeated {repeat}x), {len(data['val_inputs'])} validation tiles, "
        f"{(out / 'pairs.npz').stat().st_size / 1e6:.1f} MB, {time.time() - t0:.0f} s",
        flush=True,
    )


def train(data: Path, out: Path, *, device: str, init: str, time_budget: float | None, steps: int, lr: float) -> None:
    import torch

    from st2he.models import Pix2PixTurbo, load_model, save_pretrained
    from st2he.models import _training as training

    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("st2he").setLevel(logging.INFO)
    meta = json.loads((data / "meta.json").read_text())
    npz = np.load(data / "pairs.npz")
    n = len([k for k in npz.files if k.startswith("train_input_")])
    xs = [npz[f"train_input_{i}"] for i in range(n)]
    ys = [npz[f"train_target_{i}"] for i in range(n)]
    cfg = dict(TRAIN_CONFIG)
    cfg.update({"steps": steps, "time_budget": time_budget, "lr": lr, "val_every": 250, "ckpt_every": 250})
    print("training config:", json.dumps(cfg), f"init={init}", flush=True)
    if init == "shipped":
        model = load_model()
        model = model.float() if hasattr(model, "float") else model
        model.metadata.pop("training", None)
    else:
        model = Pix2PixTurbo.from_config("small", seed=cfg["seed"])
    model.metadata.update(
        {
            "palette": meta["palette"],
            "palette_method": "lineage",
            "pixel_size": meta["pixel_size"],
            "tile_size": meta["tile_size"],
            "input_key": "st2he_input",
            "r_sampling": 0.5,
            "trained_on": (
                f"st2he.datasets.synthetic_tissue seeds {meta['train_seeds']} (subtypes cycling {meta['subtypes']}) "
                "and pairs derived from real H&E with st2he.datasets.pairs_from_he: CMU-1-Small-Region (skin) rows "
                f"{meta['real']['cmu1_rows']}, Kather CRC-VAL-HE-7K tiles {meta['real'].get('kather_tiles')} "
                f"(classes {meta['real']['kather_classes']}); "
                f"all drawn with palette='lineage'; validated on seeds {meta['val_seeds']}"
                + ("; fine-tuned from the previous shipped weights" if init == "shipped" else "")
            ),
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
        output_dir=out / "checkpoints",
        device=device,
        progress=False,
        overwrite=True,
    )
    elapsed = time.time() - t0
    model.metadata["training"]["seconds"] = round(elapsed, 1)
    model.metadata["training"]["device"] = "cpu"
    model.to("cpu")
    save_pretrained(model, out / "model", dtype=torch.float16)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    for h in history:
        if "val_psnr" in h:
            print(f"step {h['step']:>6}: val PSNR {h['val_psnr']:.2f} dB, SSIM {h['val_ssim']:.4f}", flush=True)
    done = model.metadata["training"]["steps"]
    print(f"trained {done} steps in {elapsed:.0f} s; model in {out / 'model'}", flush=True)


def evaluate(model_path: str, out: Path | None, pictures: Path | None, split: str = "classes") -> None:
    import pandas as pd

    import st2he
    from st2he.models import load_model

    _quiet()
    model = load_model(None if model_path == "shipped" else model_path)
    rows = []
    samples = heldout_real(split) + [("simulated", f"seed {s}", _sim(s)) for s in TEST_SEEDS]
    for group, name, sd in samples:
        t0 = time.time()
        st2he.tl.virtual_he(sd, method="diffusion", model=model, key_added="he_diffusion", progress=False)
        t_gen = time.time() - t0
        st2he.tl.virtual_he(sd, method="stain", key_added="he_stain")
        for key in ("he_diffusion", "he_stain"):
            res = st2he.tl.evaluate_he(sd, pred_key=key, true_key="he_image", key_added=f"metrics_{key}")
            rows.append({"group": group, "name": name, "method": key.split("_")[1], **_overall(res)})
        rows[-2]["seconds"] = round(t_gen, 1)
        if pictures is not None and name in ("cmu1_heldout", "seed 100") or (
            pictures is not None and name.startswith(("NORM", "Tile_(22016"))
        ):
            _save_pictures(sd, pictures / f"{group}_{name.split('.')[0].replace(' ', '_')}.png")
    df = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(df.to_string(index=False))
    df["derived"] = np.where(df["group"] == "simulated", "simulated", "derived (all held out)")
    kather = df["group"] == "kather_heldout"
    df["class"] = np.where(kather, "kather " + df["name"].str.split("-").str[0], df["group"])
    for col in ("group", "class", "derived"):
        print(df.groupby([col, "method"])[["psnr", "ssim"]].mean().round(3).to_string())
    if out is not None:
        df.to_csv(out, index=False)


def _save_pictures(sd, path: Path) -> None:
    """Real H&E | input picture | diffusion | stain baseline, side by side (a 512-pixel crop)."""
    from PIL import Image

    from st2he._raster import Raster

    path.parent.mkdir(parents=True, exist_ok=True)
    drawn = "he_diffusion_input" if "he_diffusion_input" in sd.images else "st2he_input"
    keys = ["he_image", drawn, "he_diffusion", "he_stain"]
    tiles = []
    for k in keys:
        a = np.moveaxis(np.asarray(Raster(sd.images[k]).level0.values), 0, -1)
        h, w = a.shape[:2]
        r0, c0 = max(0, (h - 512) // 2), max(0, (w - 512) // 2)
        tiles.append(a[r0 : r0 + 512, c0 : c0 + 512])
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    split_help = "Kather tiles held out: whole classes DEB, MUC, NORM (default) or the 2nd and 4th tile of each class"
    a = sub.add_parser("prepare")
    a.add_argument("--out", type=Path, default=ROOT / "bench_output" / "real")
    a.add_argument("--split", choices=["classes", "tiles"], default="classes", help=split_help)
    a = sub.add_parser("train")
    a.add_argument("--data", type=Path, default=ROOT / "bench_output" / "real")
    a.add_argument("--out", type=Path, default=ROOT / "bench_output" / "real" / "run")
    a.add_argument("--device", default="cpu")
    a.add_argument("--init", choices=["shipped", "scratch"], default="shipped")
    a.add_argument("--time-budget", type=float, default=2700.0, help="seconds (default 45 minutes)")
    a.add_argument("--steps", type=int, default=3000, help="at most this many steps")
    a.add_argument("--lr", type=float, default=3e-4)
    a = sub.add_parser("evaluate")
    a.add_argument("--model", default="shipped", help="checkpoint folder, 'shipped' ('small') or 'small-real'")
    a.add_argument("--csv", type=Path, default=None)
    a.add_argument("--pictures", type=Path, default=None, help="folder for side-by-side PNGs")
    a.add_argument("--split", choices=["classes", "tiles"], default="classes", help=split_help)
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.out, args.split)
    elif args.cmd == "train":
        train(
            args.data,
            args.out,
            device=args.device,
            init=args.init,
            time_budget=args.time_budget,
            steps=args.steps,
            lr=args.lr,
        )
    else:
        evaluate(args.model, args.csv, args.pictures, args.split)


if __name__ == "__main__":
    main()
