"""Seams: gradient energy along tile borders against tile interiors, for the ways of stitching tiles.

On the demo's simulated sample (``synthetic_tissue(0)`` rasterised with the model's palette), the shipped model is
run over the whole picture in tiles that are (a) blended with st2he's smooth window (the default of
``virtual_he``), (b) averaged with flat weights where they overlap, and (c) laid side by side without overlap.
For each result the ratio of the mean squared intensity step across the tile borders to that across all other
neighbouring pixel pairs is printed (:func:`st2he.models._tiling.border_gradient_ratio`): about 1 means the
borders cannot be told from the interior; a visible seam gives a ratio above 1. The real H&E, measured at the
same borders, shows the natural level.

    python benchmarks/bench_seams.py [--tile 256] [--overlap 64] [--model PATH]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the shipped model)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import st2he
    from st2he.models import load_model
    from st2he.models._tiling import border_gradient_ratio, reader_from_array, render_region
    from st2he.tl._train import aligned_pair

    model = load_model(args.model)
    palette = model.metadata.get("palette") or "coexpression"
    sdata = st2he.datasets.synthetic_tissue(args.seed)
    st2he.pp.rasterize_transcripts(sdata, palette=palette)
    x, y, _ = aligned_pair(sdata)
    shape = x.shape[1:]
    read = reader_from_array(x)

    def predict(tiles, seeds):
        return model.predict(tiles, batch_size=4)

    rows = []
    for name, overlap, window in (
        ("smooth window (st2he)", args.overlap, "smooth"),
        ("flat average", args.overlap, "box"),
        ("no overlap", 0, "box"),
    ):
        t0 = time.perf_counter()
        out, _ = render_region(
            predict, read, shape, (0, shape[0], 0, shape[1]), tile=args.tile, overlap=overlap, window=window
        )
        dt = time.perf_counter() - t0
        ratio = border_gradient_ratio(out, args.tile, overlap)
        natural = border_gradient_ratio(y, args.tile, overlap)
        rows.append((name, overlap, ratio, natural, dt))
    print(
        f"model: {model.metadata.get('checkpoint', model.config.get('name'))}; image {shape[0]} x {shape[1]} px, tile {args.tile}"
    )
    print(f"{'stitching':<24}{'overlap':>8}{'border/interior':>17}{'real H&E there':>16}{'seconds':>9}")
    for name, overlap, ratio, natural, dt in rows:
        print(f"{name:<24}{overlap:>8}{ratio:>17.3f}{natural:>16.3f}{dt:>9.1f}")


if __name__ == "__main__":
    main()
