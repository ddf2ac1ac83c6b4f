"""TIPRDataModule end to end on a tiny synthetic benchmark: batches, tokens, eval sets, cache, errors."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tipr.data.token_cache as token_cache
from tipr.training import TIPRDataModule
from tipr.data.datasets import GalleryImages, read_image
from tipr.data.pruning import prune_captions
from tipr.data.samplers import IdentitySampler, PackedIdentitySampler, RandomOrderSampler
from tipr.data.synthetic import SyntheticConfig, ensure_synthetic, generate_synthetic
from tipr.data.transforms import CLIP_MEAN, CLIP_STD, build_eval_transform, build_train_transform
from tipr.tokenization import tokenize
from tiny import Tiny

TINY = dict(synthetic=SyntheticConfig(**Tiny.synthetic))


def folder_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make(root, **kwargs):
    options = dict(dataset="synthetic", root=str(root), image_size=(48, 16), batch_size=8, eval_batch_size=5,
                   num_workers=0, text_length=40, **TINY)
    options.update(kwargs)
    return TIPRDataModule(**options)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make(root).prepare_data()  # generates data/synthetic and the token cache once
    return root


def test_train_batches_shapes_labels_and_tokens(root):
    dm = make(root, prune_prob=0.5)
    dm.setup("fit")
    train = dm.benchmark.split("train")
    full = tokenize(train.captions, context_length=40)
    pruned = tokenize(prune_captions(train.captions), context_length=40)
    loader = dm.train_dataloader()
    # The default: the reference identity sampler, groups of 1 or 2 per identity.
    assert isinstance(loader.sampler, IdentitySampler) and loader.sampler.num_instance == 2 and dm.num_instance == 2
    assert loader.batch_size == 8 and loader.drop_last and 1 <= len(loader) == loader.sampler.num_batches <= 24 // 8
    used = {"full": 0, "pruned": 0}
    for batch in loader:
        assert sorted(batch) == ["index", "input_ids", "pids", "pixel_values"]
        assert batch["pixel_values"].shape == (8, 3, 48, 16) and batch["pixel_values"].dtype == torch.float32
        assert batch["input_ids"].shape == (8, 40) and batch["input_ids"].dtype == torch.int64
        assert batch["pids"].dtype == torch.int64 and batch["index"].dtype == torch.int64
        lo = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        hi = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        assert (batch["pixel_values"] >= lo[:, None, None] - 1e-5).all() and (batch["pixel_values"] <= hi[:, None, None] + 1e-5).all()
        for i, tokens, pid in zip(batch["index"].tolist(), batch["input_ids"], batch["pids"].tolist()):
            # Label = contiguous label of the caption's image; tokens = its caption, full or pruned.
            assert pid == dm.benchmark.train_labels[train.caption_images[i]]
            if torch.equal(tokens, full[i]):
                used["full"] += 1
            else:
                assert torch.equal(tokens, pruned[i]), train.captions[i]
                used["pruned"] += 1
    assert used["full"] > 0 and used["pruned"] > 0
    assert dm.num_classes == 6 and sorted(set(dm.benchmark.train_labels.tolist())) == list(range(6))


def test_prune_prob_zero_and_one(root):
    for prob, captions in ((0.0, None), (1.0, "pruned")):
        dm = make(root, prune_prob=prob, sampler="random")
        dm.setup("fit")
        train = dm.benchmark.split("train")
        texts = prune_captions(train.captions) if captions else list(train.captions)
        expected = tokenize(texts, context_length=40)
        batch = next(iter(dm.train_dataloader()))
        assert torch.equal(batch["input_ids"], expected[batch["index"]])


def test_random_sampler_and_one_worker(root):
    dm = make(root, sampler="random", num_workers=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, RandomOrderSampler) and loader.drop_last and loader.persistent_workers
    batches = list(loader)
    assert len(batches) == 3
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == sorted(set(torch.cat([b["index"] for b in batches]).tolist()))


@pytest.mark.parametrize("sampler", ["identity", "packed_identities", "random"])
def test_global_batch_is_split_across_processes(root, sampler):
    """batch_size is the global batch: with a trainer of W processes each rank loads B / W of every global batch."""
    one = make(root, sampler=sampler, batch_size=8)
    one.setup("fit")
    global_plan = one.train_dataloader().sampler.plan()
    for world in (2, 4):
        slices = []
        for rank in range(world):
            dm = make(root, sampler=sampler, batch_size=8)
            dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
            loader = dm.train_dataloader()
            assert loader.batch_size == 8 // world and (loader.sampler.num_replicas, loader.sampler.rank) == (world, rank)
            assert len(loader) == len(global_plan)  # the one-process number of steps on every rank
            slices.append(torch.stack([b["index"] for b in loader]).numpy())
        assert np.array_equal(np.concatenate(slices, axis=1), global_plan)
    dm = make(root, sampler=sampler, batch_size=8)
    dm.trainer = SimpleNamespace(world_size=3, global_rank=0)
    with pytest.raises(ValueError, match=r"data.batch_size=8 is the global batch and must be divisible by the number "
                                         r"of processes, 3 \(trainer.devices x trainer.num_nodes\)"):
        dm.train_dataloader()


def test_packed_identities_sampler(root):
    dm = make(root, sampler="packed_identities")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, PackedIdentitySampler) and loader.sampler.num_instance == 2 and len(loader) == 24 // 8
    batches = list(loader)
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(24))  # every sample once
    assert batches[0]["pids"].unique(return_counts=True)[1].tolist() == [2, 2, 2, 2]  # 4 identities x 2


def test_too_few_identities_for_the_identity_sampler(root):
    with pytest.raises(ValueError, match=r"training set has 6 identities, fewer than "
                                         r"data.batch_size / data.num_instance = 16 / 2 = 8"):
        make(root, batch_size=16).train_dataloader()


def test_eval_sets_are_exactly_the_split(root):
    dm = make(root)
    dm.setup("fit")
    dm.setup("test")
    b = dm.benchmark
    for loaders, split in ((dm.val_dataloader(), b.split("val")), (dm.test_dataloader(), b.split("test"))):
        assert isinstance(loaders, list) and len(loaders) == 2
        queries, gallery = loaders
        q = list(queries)
        assert sorted(q[0]) == ["index", "input_ids", "pids"]
        assert torch.cat([x["index"] for x in q]).tolist() == list(range(split.num_captions))
        assert torch.cat([x["pids"] for x in q]).tolist() == split.caption_pids.tolist()  # the benchmark's own ids
        assert torch.equal(torch.cat([x["input_ids"] for x in q]), tokenize(split.captions, context_length=40))
        g = list(gallery)
        assert sorted(g[0]) == ["index", "pids", "pixel_values"]
        assert torch.cat([x["index"] for x in g]).tolist() == list(range(split.num_images))
        assert torch.cat([x["pids"] for x in g]).tolist() == split.image_pids.tolist()
        assert g[0]["pixel_values"].shape[1:] == (3, 48, 16) and g[0]["pixel_values"].dtype == torch.float32
    assert set(b.split("val").image_pids.tolist()).isdisjoint(b.split("test").image_pids.tolist())


def test_icfg_validates_on_test(tmp_path, caplog):
    generate_synthetic(tmp_path / "ICFG-PEDES", num_train_ids=4, num_test_ids=3, images_per_id=2, captions_per_image=1,
                       image_size=(64, 32), format="ICFG-PEDES")
    dm = TIPRDataModule("ICFG-PEDES", str(tmp_path), image_size=(48, 16), batch_size=4, num_workers=0, text_length=40)
    assert dm.num_classes == 4
    with caplog.at_level("INFO"):
        dm.setup("fit")
    assert "ICFG-PEDES has no val split: validation uses the test split" in caplog.text
    assert "public ids/images/captions" in caplog.text  # the split table, with the public numbers
    queries, gallery = dm.val_dataloader()
    assert torch.cat([x["pids"] for x in queries]).tolist() == dm.benchmark.split("test").caption_pids.tolist()
    assert len(gallery.dataset) == 6


def test_tokens_come_from_the_cache_the_second_time(root, monkeypatch):
    first = make(root)
    first.setup("fit")

    def forbidden(*args, **kwargs):
        raise AssertionError("tokenized or pruned again despite the cache")

    monkeypatch.setattr(token_cache, "tokenize", forbidden)
    monkeypatch.setattr(token_cache, "prune_captions", forbidden)
    second = make(root)
    second.setup("fit")
    for split, entry in first.caption_tokens().items():
        for kind, tokens in entry.items():
            assert torch.equal(second.caption_tokens()[split][kind], tokens)
    # Another context length is another key: it must tokenize (and here hit the forbidden stand-in).
    with pytest.raises(AssertionError, match="despite the cache"):
        make(root, text_length=30).setup("fit")
    assert len(list((root / "synthetic" / ".tipr_cache").glob("tokens-*.pt"))) == 1


def test_num_classes_is_lazy_and_a_wrong_root_fails_at_once(tmp_path):
    dm = make(tmp_path / "later")
    assert dm.num_classes == 6 and dm.image_size == (48, 16) and dm.text_length == 40
    assert not (tmp_path / "later").exists()  # nothing generated yet
    real = TIPRDataModule("CUHK-PEDES", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing" / "CUHK-PEDES")):
        real.num_classes


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cuhk'"):
        TIPRDataModule("cuhk", str(tmp_path))
    with pytest.raises(ValueError, match="data.sampler must be one of 'identity', 'packed_identities', 'random', got 'pk'"):
        TIPRDataModule(root=str(tmp_path), sampler="pk")
    with pytest.raises(ValueError, match="data.batch_size=9 is not a multiple of data.num_instance=2"):
        TIPRDataModule(root=str(tmp_path), batch_size=9)
    TIPRDataModule(root=str(tmp_path), batch_size=9, sampler="random")  # the constraint is the identity sampler's
    with pytest.raises(ValueError, match=r"prune_prob must be in \[0, 1\]"):
        TIPRDataModule(root=str(tmp_path), prune_prob=2.0)


def test_synthetic_options_are_one_nested_argument(tmp_path):
    """``synthetic`` takes a SyntheticConfig or a dict of its fields; the hyperparameters keep a plain dict
    (a checkpoint stays loadable with ``weights_only=True``); mistakes name ``data.synthetic.<field>``."""
    as_dict = make(tmp_path, synthetic=dict(TINY["synthetic"].__dict__))
    assert as_dict.synthetic == TINY["synthetic"] == make(tmp_path).synthetic
    assert make(tmp_path).hparams["synthetic"] == dict(TINY["synthetic"].__dict__)
    assert type(make(tmp_path).hparams["synthetic"]) is dict
    assert TIPRDataModule(root=str(tmp_path)).synthetic == SyntheticConfig()  # the default benchmark
    assert TIPRDataModule("CUHK-PEDES", str(tmp_path), synthetic={"num_train_ids": 3}).synthetic is None  # ignored
    with pytest.raises(ValueError, match=r"data\.synthetic has no option 'num_ids'; expected some of num_train_ids, "):
        make(tmp_path, synthetic={"num_ids": 3})
    with pytest.raises(ValueError, match=r"data\.synthetic\.num_test_ids=0: the synthetic benchmark needs >= 1"):
        make(tmp_path, synthetic={"num_test_ids": 0})
    with pytest.raises(ValueError, match=r"data\.synthetic\.image_size must be \(height, width\)"):
        make(tmp_path, synthetic={"image_size": (64,)})


def test_synthetic_in_another_format_is_read_with_that_reader(tmp_path, caplog):
    """``synthetic.format="ICFG-PEDES"``: written and read as ICFG-PEDES, so it has no val split and validates on test."""
    dm = make(tmp_path, synthetic=SyntheticConfig(num_train_ids=4, num_test_ids=3, images_per_id=2, captions_per_image=1,
                                                  image_size=(64, 32), format="ICFG-PEDES"), batch_size=4)
    with caplog.at_level("INFO"):
        dm.setup("fit")
    assert (tmp_path / "synthetic" / "ICFG-PEDES.json").is_file()
    assert sorted(dm.benchmark.splits) == ["test", "train"] and dm.num_classes == 4
    assert "synthetic has no val split: validation uses the test split" in caplog.text


def test_another_synthetic_spec_on_the_same_root_is_refused_and_the_benchmark_kept(tmp_path):
    """The README's example on a root holding the main job's benchmark (the default spec):
    ``--data.synthetic.num_train_ids=1000 --data.synthetic.format=ICFG-PEDES`` fails at once in one line naming
    the folder, the fields that differ and ``--data.root``; every file is kept. Another root works, and the same
    spec is reused as it is."""
    root = tmp_path / "data"
    folder = ensure_synthetic(root / "synthetic", SyntheticConfig())  # what `tipr fit --config experiments/synthetic.yaml` reads
    before = folder_bytes(folder)
    asked = make(root, synthetic={"num_train_ids": 1000, "format": "ICFG-PEDES"})
    assert asked.num_classes == 1000  # lazy: nothing read or written yet
    with pytest.raises(FileExistsError) as refused:
        asked.prepare_data()
    message = str(refused.value)
    assert message == (f"{folder} holds a synthetic benchmark of another spec (num_train_ids 500 -> 1000, format CUHK-PEDES "
                       f"-> ICFG-PEDES); it is not replaced: give another --data.root (e.g. --data.root={root}/synthetic-1000-icfg) "
                       f"or delete {folder} to regenerate it")
    assert folder_bytes(folder) == before  # reid_raw.json, every image of every split, synthetic.json
    assert sorted(p.name for p in root.iterdir()) == ["synthetic"]  # nothing written beside it

    tiny_icfg = {**Tiny.synthetic, "format": "ICFG-PEDES"}
    with pytest.raises(FileExistsError, match="images_per_id 4 -> 2, .*format CUHK-PEDES -> ICFG-PEDES"):
        make(root, synthetic=tiny_icfg).setup("fit")
    other = make(tmp_path / "icfg", synthetic=tiny_icfg)
    other.setup("fit")  # another root: generated there
    assert (tmp_path / "icfg" / "synthetic" / "ICFG-PEDES.json").is_file() and other.num_classes == Tiny.synthetic["num_train_ids"]
    stamp = (folder / "reid_raw.json").stat().st_mtime_ns
    same = make(root, synthetic=SyntheticConfig())
    assert same.benchmark.num_classes == 500 and (folder / "reid_raw.json").stat().st_mtime_ns == stamp  # reused
    assert folder_bytes(folder) == before


def test_undecodable_image_names_its_path(tmp_path):
    bad = tmp_path / "imgs" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    gallery = GalleryImages(tmp_path / "imgs", ["broken.jpg"], [3], build_eval_transform((48, 16)))
    with pytest.raises(RuntimeError, match=f"cannot read image {bad}"):
        gallery[0]


def test_transforms():
    mean_pixel = torch.tensor([round(255 * m) for m in CLIP_MEAN], dtype=torch.uint8)[:, None, None]
    out = build_eval_transform((24, 8))(mean_pixel.expand(3, 48, 16).clone())
    assert out.shape == (3, 24, 8) and out.abs().max() < 0.01
    white = torch.full((3, 30, 10), 255, dtype=torch.uint8)
    erase = build_train_transform((30, 10), flip=False, pad_crop=False, random_erasing=True, erasing_prob=1.0)
    out = erase(white)
    white_level = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    erased = out.abs().amax(0) < 0.01  # filled with the mean pixel -> 0 after normalisation
    assert 0.02 * 300 <= erased.sum() <= 0.4 * 300 + 10
    assert torch.allclose(out[:, ~erased], white_level[:, None].expand(3, int((~erased).sum())), atol=1e-5)
    torch.manual_seed(0)
    padded = build_train_transform((30, 10), flip=False, random_erasing=False)
    assert any((padded(white) < -1).any() for _ in range(5))  # zero padding shows up after some crops


def test_read_image_is_rgb(tmp_path):
    from PIL import Image

    Image.new("L", (5, 7), 100).save(tmp_path / "gray.png")
    image = read_image(tmp_path / "gray.png")
    assert image.shape == (3, 7, 5) and image.dtype == torch.uint8 and int(image[1, 0, 0]) == 100


def test_sample_draws_depend_on_the_plan_position_only_and_a_resumed_epoch_continues_exactly(root):
    """Augmentation and pruning come from a per-position seed: the same batches with 0 or 2 loader
    workers, and a loader resumed after 1 batch (its saved state) yields the uninterrupted batches 2 and 3."""
    def batches(num_workers, state=None):
        dm = make(root, prune_prob=0.5, num_workers=num_workers, sampler="random")  # 3 batches of 8
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(3)
        if state is not None:
            loader.load_state_dict(state)
        return list(loader)

    plain = batches(0)
    assert len(plain) == 3
    for other in (batches(2), batches(0)):
        for a, b in zip(plain, other, strict=True):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["pixel_values"], b["pixel_values"])
            assert torch.equal(a["input_ids"], b["input_ids"])
    # Augmentation is really on: the images are not the plain resized crops.
    dm = make(root)
    dm.setup("fit")
    plain_transform = build_eval_transform((48, 16))
    unaugmented = torch.stack([plain_transform(dm.train_set.images.load(int(dm.train_set.caption_images[i])))
                               for i in plain[0]["index"]])
    assert not torch.allclose(unaugmented, plain[0]["pixel_values"])
    # Resumed after one trained batch of epoch 3: exactly the uninterrupted batches 2 and 3.
    resumed = batches(0, state={"epoch": 3, "batches_done": 1})
    assert len(resumed) == 2
    for a, b in zip(plain[1:], resumed, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
    # The saved state names the epoch; without a trainer no batch counts as done.
    dm = make(root)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(5)
    assert loader.state_dict() == {"epoch": 5, "batches_done": 0}


TOKEN_CACHE_WORKER = """
import json, sys, time
from pathlib import Path

import filelock
import torch

import tipr.data.token_cache as token_cache
from tipr.data.benchmarks import read_benchmark_folder

root, me = Path(sys.argv[1]), sys.argv[2]
barrier = root / "barrier"
benchmark = read_benchmark_folder(root / "synthetic", "CUHK-PEDES")

computed = []
real_prune = token_cache.prune_captions
def counting_prune(captions):  # called once per computation of the tables (train captions)
    computed.append(1)
    return real_prune(captions)
token_cache.prune_captions = counting_prune

class BarrierLock(filelock.FileLock):
    # Before racing for the lock, each worker touches barrier/<me> and waits until both files exist:
    # both have then looked for the cache and found none, so only the lock keeps one from computing.
    def acquire(self, *args, **kwargs):
        (barrier / me).touch()
        deadline = time.monotonic() + 120
        while len(list(barrier.iterdir())) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {me}: the other worker never reached the lock")
            time.sleep(0.005)
        return super().acquire(*args, **kwargs)
token_cache.FileLock = BarrierLock

tokens = token_cache.caption_tokens(benchmark, None, 33, root / "cache")
torch.save(tokens, root / f"tokens-of-worker-{me}.pt")
print(json.dumps({"computed": len(computed)}))
"""


def test_two_processes_starting_together_write_the_token_cache_once(tmp_path):
    """Two runs on one data folder, neither finding a cache: a file barrier holds both at the lock until both
    have looked for the cache and found none. One computes the tables, the other waits on the lock and reads
    what it wrote: the same tokens as computing them here; one cache file, no partial file left."""
    import json
    import subprocess
    import sys

    from tipr.data.benchmarks import read_benchmark_folder

    config = SyntheticConfig(**Tiny.synthetic)
    generate_synthetic(tmp_path / "synthetic", config)
    (tmp_path / "barrier").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", TOKEN_CACHE_WORKER, str(tmp_path), str(me)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(p.name for p in (tmp_path / "barrier").iterdir()) == ["0", "1"]  # both went through the barrier
    assert sorted(r["computed"] for r in results) == [0, 1]
    benchmark = read_benchmark_folder(tmp_path / "synthetic", config.format)
    expected = token_cache.compute_tokens(benchmark, None, 33)
    for me in range(2):
        got = torch.load(tmp_path / f"tokens-of-worker-{me}.pt", weights_only=True)
        assert {name: sorted(entry) for name, entry in got.items()} == {"train": ["pruned", "tokens"], "val": ["tokens"],
                                                                       "test": ["tokens"]}
        assert all(torch.equal(got[name][kind], expected[name][kind]) for name in expected for kind in expected[name])
    key = token_cache.cache_key(benchmark, None, 33)
    left = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name != f"tokens-{key[:20]}.pt.lock")
    assert left == [f"tokens-{key[:20]}.pt"]  # no partial file beside it


def test_a_cache_of_another_layout_or_version_is_rebuilt_not_misread(tmp_path, monkeypatch):
    make(tmp_path).prepare_data()
    (path,) = (tmp_path / "synthetic" / ".tipr_cache").glob("tokens-*.pt")
    good = torch.load(path, weights_only=True)
    # Same file name and key, but an older layout (no pruned tokens, other width): rebuilt.
    broken = {"key": good["key"], "splits": {name: {"tokens": e["tokens"][:, :10]} for name, e in good["splits"].items()}}
    torch.save(broken, path)
    again = make(tmp_path).caption_tokens()
    assert all(torch.equal(again[n][k], good["splits"][n][k]) for n in again for k in again[n])
    assert torch.load(path, weights_only=True)["splits"]["train"]["pruned"].shape == good["splits"]["train"]["pruned"].shape
    # Another tipr version is another key, hence another file: never read as this version's.
    import tipr

    monkeypatch.setattr(tipr, "__version__", "9.9.9")
    make(tmp_path).caption_tokens()
    assert len(list((tmp_path / "synthetic" / ".tipr_cache").glob("tokens-*.pt"))) == 2
