"""Training data pipeline throughput: samples/s per loader worker, and of a whole DataLoader.

Reads the built-in synthetic benchmark (generated under ``<root>/synthetic`` on
first use) through ``TIPRDataModule`` with the full training recipe at the
given image size (default 384x128: decode, resize, flip, pad + crop, random
erasing, normalise, caption lookup with pruning draw).

- "per worker": ``dataset[i]`` in a loop in this process, one torch thread,
  which is what one loader worker does;
- "DataLoader": ``--workers`` worker processes plus batching/collation, as in
  training.

    python experiments/bench_dataloader.py [--root data] [--image-size 384 128] [--workers 2] [--batches 20]
"""

import argparse
import time

import torch

from tipr.training import TIPRDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data")
    parser.add_argument("--image-size", type=int, nargs=2, default=[384, 128], metavar=("H", "W"))
    parser.add_argument("--samples", type=int, default=1000, help="samples for the per-worker figure")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dm = TIPRDataModule("synthetic", args.root, image_size=tuple(args.image_size), batch_size=args.batch_size,
                        num_workers=args.workers)
    dm.prepare_data()
    dm.setup("fit")
    dataset = dm.train_set
    n = min(args.samples, len(dataset))
    for i in range(20):  # warm-up
        dataset[i]
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    per_worker = n / (time.perf_counter() - start)
    print(f"per worker: {per_worker:,.0f} samples/s ({n} samples, image {args.image_size[0]}x{args.image_size[1]}, 1 thread)")

    loader = dm.train_dataloader()
    batches = iter(loader)
    next(batches)  # workers started
    count, start = 0, time.perf_counter()
    for _, batch in zip(range(args.batches), batches):
        count += batch["pixel_values"].shape[0]
    rate = count / (time.perf_counter() - start)
    print(f"DataLoader: {rate:,.0f} samples/s ({args.workers} workers, batch {args.batch_size}, {count} samples)")


if __name__ == "__main__":
    main()
