"""Reproduce the super-resolution model shipped with st2he (src/st2he/models/weights/super_resolution).

Trains ``st2he.tl.train_super_resolution`` (size ``small``, conditioned on the shipped expression model's prediction,
image features, alignment and adversarial loss all on, ``composition_weight=0.3``) for 3000 steps on simulated
512 µm sections of seeds 5-9: pseudo-Visium spots (55 µm disks at 100 µm) -> 8 µm bins of the same molecules, the 50
most variable genes. Seeds 0-4 are left out because the shipped expression model was trained on them (its prediction
there is in-sample and too good: the diffusion model would learn to trust it too much); seeds 101-103 are the
held-out benchmark (``benchmarks/bench_super_resolution.py``) and are never trained on. About 12 minutes on one CPU
thread; ``--time-budget`` (default 1800 s) stops it earlier on a slower machine. Weights are stored as float16.

    python benchmarks/train_super_resolution_small.py --out src/st2he/models/weights/super_resolution

What each part adds (``docs/models.md``): the same recipe with one part switched off, each scored with
``bench_super_resolution.py --diffusion``:

    python benchmarks/train_super_resolution_small.py --no-features --work bench_output/sr_parts/features \
        --out bench_output/sr_parts/no_features   # likewise --no-alignment, --no-adversarial, --no-expression,
                                                  # --composition-weight 0
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

TRAIN_SEEDS = (5, 6, 7, 8, 9)
SIZE_UM = 512.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(TRAIN_SEEDS), help="simulated training sections")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--time-budget", type=float, default=1800.0, help="seconds of optimisation at most")
    parser.add_argument("--size", default="small", choices=["tiny", "small", "large"])
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--composition-weight", type=float, default=0.3,
        help="weight of the loss on each bin's composition (log1p CP10k; train_super_resolution's composition_weight)",
    )
    for part in ("features", "alignment", "adversarial"):
        parser.add_argument(f"--no-{part}", action="store_true", help=f"switch the {part} part off (to measure it)")
    parser.add_argument(
        "--no-expression", action="store_true", help="do not condition on the shipped expression model (base: flat)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("bench_output/super_resolution_training"))
    parser.add_argument("--out", type=Path, default=None, help="also save the final model here (float16)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    import logging

    import torch

    import st2he
    from st2he.models import save_super_resolution_model

    torch.set_num_threads(args.threads)
    logging.getLogger("st2he").setLevel(logging.ERROR)
    t = time.perf_counter()
    sections = [st2he.datasets.synthetic_tissue(s, size_um=SIZE_UM) for s in args.seeds]
    model = st2he.tl.train_super_resolution(
        sections, size=args.size, n_genes=50, expression_model=None if args.no_expression else "shipped",
        steps=args.steps,
        batch_size=args.batch_size, window=args.window, lr=args.lr, composition_weight=args.composition_weight,
        features=not args.no_features, alignment=not args.no_alignment, adversarial=not args.no_adversarial,
        seed=0, out=args.work,
        checkpoint_every=200, time_budget=args.time_budget, device=args.device, progress=True,
    )
    info = model.metadata["training"]
    print(json.dumps({k: info[k] for k in ("steps_done", "seconds", "seconds_per_step", "validation")}, indent=1))
    print(f"total {time.perf_counter() - t:.0f} s")
    if args.out is not None:
        save_super_resolution_model(model, args.out, dtype=torch.float16)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
