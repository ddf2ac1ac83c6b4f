"""``python -m tipr.data.synthetic``: write the synthetic benchmark (and a PNG grid of samples).

``--out`` is written only when it is missing or empty; one that already holds
the same benchmark is reused; one holding another spec (or anything else) is
left as it is and the command fails with a one-line message naming the folder,
the fields that differ and what to do.
"""

from __future__ import annotations

import argparse

from tipr.data.benchmarks import BENCHMARKS
from tipr.data.synthetic.writer import SyntheticConfig, SyntheticSpecError, ensure_synthetic, save_sample_grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tipr.data.synthetic",
                                     description="Write the synthetic person-description benchmark (and a PNG grid of samples).")
    parser.add_argument("--out", default="data/synthetic",
                        help="output folder (default data/synthetic); written only when missing or empty, reused when it "
                             "holds the same benchmark, refused when it holds another")
    parser.add_argument("--format", default="CUHK-PEDES", choices=sorted(BENCHMARKS))
    defaults = SyntheticConfig()
    for name in ("num_train_ids", "num_val_ids", "num_test_ids", "images_per_id", "captions_per_image", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--image-size", type=int, nargs=2, default=list(defaults.image_size), metavar=("H", "W"))
    parser.add_argument("--grid", default=None, help="also save a PNG grid of samples with their captions here")
    args = parser.parse_args(argv)
    config = SyntheticConfig(args.num_train_ids, args.num_val_ids, args.num_test_ids, args.images_per_id, args.captions_per_image,
                             tuple(args.image_size), args.seed, args.format)
    try:
        out = ensure_synthetic(args.out, config)
    except SyntheticSpecError as e:
        parser.exit(1, f"{parser.prog}: error: {e.advise('--out')}\n")
    except FileExistsError as e:  # a folder that is not a synthetic benchmark
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    print(f"synthetic benchmark ({config.format} format) in {out}")
    if args.grid:
        print(f"sample grid: {save_sample_grid(out, args.grid, format=config.format)}")


if __name__ == "__main__":
    main()
