"""Bad configuration fails before any training work, naming the option, its value and what was expected.

One test per mistake a user makes in a config or on the command line; each goes
through the constructor (or the data module's setup) that the CLI calls.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tiny import Tiny

def module(**kwargs):
    return Tiny.module(**kwargs)


@pytest.fixture(scope="module")
def root(synthetic_root):
    return synthetic_root


def data(root, **kwargs):
    return Tiny.data(root, **kwargs)


def test_a_batch_the_identity_sampler_cannot_fill(root):
    # 6 training identities cannot give the 64 / 2 = 32 distinct identities a round of batch 64 needs.
    with pytest.raises(ValueError, match=r"6 identities, fewer than data\.batch_size / data\.num_instance = 64 / 2"):
        data(root, batch_size=64).setup("fit")


def test_a_batch_that_num_instance_does_not_divide(root):
    with pytest.raises(ValueError, match=r"batch_size=9.*num_instance=2"):
        data(root, batch_size=9)


def test_devices_that_do_not_divide_the_global_batch(root):
    dm = data(root, batch_size=8)
    dm.trainer = SimpleNamespace(world_size=3, global_rank=0)  # what a 3-process trainer tells the data module
    with pytest.raises(ValueError, match=r"data\.batch_size=8 .*divisible by the number of processes, 3 \(trainer\.devices"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("mask_ratio", "message"),
    [
        (0.99, r"mask_ratio 0\.99 leaves no visible patch of the \(4, 2\) grid.*expected a lower mask_ratio"),
        (1.0, r"mask_ratio must be in \(0, 1\), got 1\.0"),  # no visible patch either
        (0.0, r"mask_ratio must be in \(0, 1\), got 0\.0"),  # no hidden patch
    ],
)
def test_a_mask_ratio_that_leaves_no_visible_or_no_hidden_patch(mask_ratio, message):
    with pytest.raises(ValueError, match=message):
        module(mask_ratio=mask_ratio)


def test_an_image_size_not_divisible_by_the_patch_size():
    with pytest.raises(ValueError, match=r"image_size \(30, 16\) must be positive multiples of the patch size 8"):
        module(image_size=(30, 16))


def test_a_text_length_over_the_position_table():
    backbone = {"text_config": {"max_position_embeddings": 20}, "vision_config": {"patch_size": 8, "image_size": 32}}
    with pytest.raises(ValueError, match=r"text_length 40 is longer than the text encoder's context \(20 positions\)"):
        module(backbone=backbone, text_length=40)


def test_an_unknown_backbone_and_a_missing_folder(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # Not a preset nor a folder, so it can only be a hub id: the error lists what was expected.
    with pytest.raises(OSError, match=r"model\.backbone='huge' \(expected a preset \['tiny'\], a local CLIP"):
        module(backbone="huge")
    with pytest.raises(FileNotFoundError, match=r"no-such-clip.*expected a CLIP checkpoint folder"):
        module(backbone=str(tmp_path / "no-such-clip"))


def test_a_hub_id_without_network(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on an offline compute node
    with pytest.raises(OSError, match=r"model\.backbone='openai/clip-vit-base-patch16'.*hub id"):
        module(backbone="openai/clip-vit-base-patch16")


def test_a_tokenizer_that_does_not_fit_the_backbone_is_named_once_at_fit_start(root, monkeypatch):
    """The shipped CLIP tokenizer's ids (up to 49407) against a 1,000-id text encoder: refused when fit
    starts, before a step. With fitting tables, training steps skip the per-batch checks (host syncs)."""
    import lightning.pytorch as pl

    dm = data(root)
    small_vocab = {"text_config": {"vocab_size": 1000, "eos_token_id": 999, "bos_token_id": 998,
                                   "max_position_embeddings": 16}, "vision_config": {"patch_size": 8, "image_size": 32}}
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=r"synthetic train captions \(tokens\) do not fit model\.backbone's text encoder"):
        trainer.fit(module(backbone=small_vocab, num_classes=6), datamodule=dm)

    net = module(num_classes=6)
    calls = []
    monkeypatch.setattr(net.network, "check_token_ids", lambda ids: calls.append(ids.shape))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    dm = data(root)
    trainer.fit(net, datamodule=dm)
    assert trainer.global_step == 2
    tables = [ids.shape for entry in dm.caption_tokens().values() for ids in entry.values()]
    assert calls == tables  # each whole table once at fit start, no batch checked in the 2 steps
