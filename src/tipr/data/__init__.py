"""Data: benchmark readers, datasets, transforms, the identity sampler, the synthetic
benchmark and caption pruning (``TIPRDataModule``, the Lightning side, is in
:mod:`tipr.training`).

Names are imported lazily, so ``from tipr.data.pruning import prune_caption``
does not pull in torchvision. Nothing here imports Lightning.
"""

from tipr.lazy import lazy_exports

_EXPORTS = {
    "BENCHMARKS": "benchmarks",
    "PUBLIC_COUNTS": "benchmarks",
    "Benchmark": "benchmarks",
    "BenchmarkError": "benchmarks",
    "Split": "benchmarks",
    "read_benchmark": "benchmarks",
    "read_benchmark_folder": "benchmarks",
    "split_table": "benchmarks",
    "TrainPairs": "datasets",
    "GalleryImages": "datasets",
    "QueryCaptions": "datasets",
    "read_image": "datasets",
    "IdentitySampler": "samplers",
    "identity_batches": "samplers",
    "CLIP_MEAN": "transforms",
    "CLIP_STD": "transforms",
    "build_train_transform": "transforms",
    "build_eval_transform": "transforms",
    "SyntheticConfig": "synthetic",
    "generate_synthetic": "synthetic",
    "ensure_synthetic": "synthetic",
    "save_sample_grid": "synthetic",
    "prune_caption": "pruning",
    "prune_captions": "pruning",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
