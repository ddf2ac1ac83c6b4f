"""TIPRModule: training through a Lightning Trainer, schedule, parameter groups, checkpoints."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tipr.training import TIPRModule
from tipr.training.recipe import warmup_cosine_factor
from tipr.tokenization import tokenize
from tiny import Tiny


IMAGE_SIZE = Tiny.image_size
TEXT_LENGTH = Tiny.text_length
COLOURS = ["red", "blue", "green", "black"]


class ToyPairs(Dataset):
    """Four identities; the caption names the colour that fills the image."""

    def __init__(self, n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.pids = torch.arange(n) % 4
        palette = torch.tensor([[1.5, -1.0, -1.0], [-1.0, -1.0, 1.5], [-1.0, 1.5, -1.0], [-1.5, -1.5, -1.5]])
        self.images = palette[self.pids].view(n, 3, 1, 1) + 0.3 * torch.randn(n, 3, *IMAGE_SIZE, generator=g)
        self.input_ids = tokenize([f"a person dressed in {COLOURS[p]}" for p in self.pids], context_length=TEXT_LENGTH)

    def __len__(self):
        return len(self.pids)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "input_ids": self.input_ids[i], "pids": self.pids[i], "index": i}


class Queries(ToyPairs):
    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "pids": self.pids[i], "index": i}


class Gallery(ToyPairs):
    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "pids": self.pids[i], "index": i}


class ToyData(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(ToyPairs(8), batch_size=4, shuffle=False)

    def val_dataloader(self):
        return [DataLoader(Queries(8, seed=1), batch_size=3), DataLoader(Gallery(8, seed=1), batch_size=3)]

    test_dataloader = val_dataloader


class LrRecorder(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})


def _module(**kwargs):
    return Tiny.module(**{"lr": 1e-3, **kwargs})


def _trainer(tmp_path, **kwargs):
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def test_warmup_cosine_curve():
    assert warmup_cosine_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(5, 100, 10, 0.1) == pytest.approx(0.55)
    assert warmup_cosine_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine_factor(55, 100, 10, 0.1) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, 100, 10, 0.1) == pytest.approx(0.0)
    # The reference's per-epoch values at whole epochs (5 warm-up, 60 total).
    assert warmup_cosine_factor(2, 60, 5, 0.1) == pytest.approx(0.1 * (1 - 2 / 5) + 2 / 5)
    assert warmup_cosine_factor(20, 60, 5, 0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 55)))


def test_parameter_groups_follow_the_recipe():
    module = _module(lr=1e-5)
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert {k: (g["lr"], g["weight_decay"]) for k, g in groups.items()} == {
        "base": (1e-5, 4e-5), "boosted": (5e-5, 4e-5), "bias": (2e-5, 0.0), "boosted_bias": (5e-5, 0.0),
    }
    names = {id(p): n for n, p in module.network.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    trainable = {n for n, p in module.network.named_parameters() if p.requires_grad}
    assert sorted(n for m in members.values() for n in m) == sorted(trainable)  # each exactly once
    assert "clip.logit_scale" not in trainable
    assert {"classifier.weight", "restoration.cross_attn.in_proj_weight", "restoration.cross_attn.out_proj.weight",
            "restoration.transformer.0.attn.qkv.weight", "restoration.transformer.3.norm2.weight"} <= members["boosted"]
    assert {"restoration.decoder_embed.weight", "restoration.pixel_head.weight", "restoration.mask_token",
            "restoration.query_norm.weight", "clip.vision_model.encoder.layers.0.self_attn.k_proj.weight",
            "clip.text_model.embeddings.token_embedding.weight"} <= members["base"]
    assert all(n.endswith("bias") for n in members["bias"])
    # The reference applies its classifier rule after its bias rule: the classifier's bias
    # is boosted (no weight decay); every other bias, the cross-attention's too, gets 2x.
    assert members["boosted_bias"] == {"classifier.bias"}
    assert {"clip.vision_model.post_layernorm.bias", "restoration.cross_attn.in_proj_bias",
            "restoration.transformer.0.attn.qkv.bias"} <= members["bias"]
    plain = {g["name"]: g for g in _module(lr=1e-5, boosted_bias_modules=[]).parameter_groups()}
    assert "boosted_bias" not in plain and len(plain["bias"]["params"]) == len(groups["bias"]["params"]) + 1
    # Configurable boosted set, checked against the network.
    wider = _module(boosted_modules=["classifier", "restoration"])
    (boosted,) = [g["params"] for g in wider.parameter_groups() if g["name"] == "boosted"]
    wider_names = {n for n, p in wider.network.named_parameters() if any(p is q for q in boosted)}
    assert {"restoration.pixel_head.weight", "restoration.mask_token", "classifier.weight"} <= wider_names
    with pytest.raises(ValueError, match="'restoraton.cross_attn'"):
        _module(boosted_modules=["restoraton.cross_attn"])
    _module(restoration_weight=0.0)  # the TIR head exists (its loss is off): the reference set still fits


def test_irra_parameter_groups_follow_its_reference_rules():
    """'cross' 5x, then every bias 2x without decay, then classifier and mlm_head 5x (their biases
    without decay): the layer norms ln_pre_t/ln_pre_i/ln_post stay at the base rate."""
    module = _module(lr=1e-5, method="irra")
    names = {id(p): n for n, p in module.network.named_parameters()}
    members = {g["name"]: {names[id(p)] for p in g["params"]} for g in module.parameter_groups()}
    assert {"cross_attn.in_proj_weight", "cross_modal_transformer.0.attn.qkv.weight", "classifier.weight",
            "mlm_head.dense.weight", "mlm_head.ln.weight", "mlm_head.fc.weight"} <= members["boosted"]
    assert {"cross_attn.in_proj_bias", "cross_modal_transformer.1.mlp.fc2.bias", "ln_post.bias"} <= members["bias"]
    assert members["boosted_bias"] == {"classifier.bias", "mlm_head.dense.bias", "mlm_head.ln.bias", "mlm_head.fc.bias"}
    assert {"ln_pre_t.weight", "ln_pre_i.weight", "ln_post.weight"} <= members["base"]


def test_training_steps_per_iteration_schedule_and_validation_metrics(tmp_path):
    module = _module(warmup_epochs=1, lr=1e-3)
    before = {n: p.detach().clone() for n, p in module.network.named_parameters()}
    recorder = LrRecorder()
    # The sanity check sees one batch per loader (queries without their images): nothing is computed there.
    trainer = _trainer(tmp_path, callbacks=[recorder], num_sanity_val_steps=1)
    trainer.fit(module, datamodule=ToyData())
    assert trainer.global_step == 4  # 2 epochs x 2 batches
    # Warm-up over 1 epoch = 2 steps from 0.1x, then cosine to 0 over the remaining 2 steps.
    expected = [0.1, 0.55, 1.0, 0.5]
    assert [r["base"] for r in recorder.lrs] == pytest.approx([1e-3 * f for f in expected])
    assert [r["boosted"] for r in recorder.lrs] == pytest.approx([5e-3 * f for f in expected])
    assert [r["bias"] for r in recorder.lrs] == pytest.approx([2e-3 * f for f in expected])
    moved = [n for n, p in module.network.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("clip.vision_model.encoder") for n in moved)
    assert any(n.startswith("clip.text_model.encoder") for n in moved)
    assert any(n.startswith("restoration.transformer") for n in moved)
    metrics = trainer.callback_metrics
    for name in ("train/loss", "train/sdm_loss", "train/id_loss", "train/triplet_loss", "train/restoration_loss"):
        assert torch.isfinite(metrics[name]), name
    # The values themselves are checked against a direct ranking in the next test.
    assert {f"val/{name}" for name in ("R1", "R5", "R10", "mAP", "mINP")} <= set(metrics)


def test_validation_metrics_equal_a_direct_ranking(tmp_path):
    module = _module(image_to_text=True)
    trainer = _trainer(tmp_path)
    trainer.validate(module, datamodule=ToyData(), verbose=False)
    results = {name: float(value) for name, value in trainer.callback_metrics.items()}
    queries, gallery = Queries(8, seed=1), Gallery(8, seed=1)
    text = module.network.encode_text(queries.input_ids).detach()
    image = module.network.encode_image(gallery.images).detach()
    sim = module.network.similarity(text, image)
    r1 = 100 * sum(float(queries.pids[i] == gallery.pids[sim[i].argmax()]) for i in range(8)) / 8
    assert results["val/R1"] == pytest.approx(r1)
    i2t_r1 = 100 * sum(float(gallery.pids[j] == queries.pids[sim[:, j].argmax()]) for j in range(8)) / 8
    assert results["val/i2t_R1"] == pytest.approx(i2t_r1)


def test_checkpoint_round_trip_needs_neither_weights_nor_network(tmp_path):
    # A "pretrained" backbone in a local folder, deleted before loading the checkpoint.
    import shutil

    from tipr.model.backbone import build_clip

    torch.manual_seed(1)
    build_clip("tiny", text_length=TEXT_LENGTH).save_pretrained(tmp_path / "clip")
    module = _module(backbone=str(tmp_path / "clip"), mask_ratio=0.6, restoration_weight=5.0)
    assert module.hparams.method["name"] == "sen"  # hyperparameters hold plain values (weights_only loads)
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=True)  # fit end exports its checkpoint
    trainer.fit(module, datamodule=ToyData())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    shutil.rmtree(tmp_path / "clip")

    loaded = TIPRModule.load_from_checkpoint(tmp_path / "model.ckpt")
    assert loaded.network.config.mask_ratio == 0.6 and loaded.network.config.restoration_weight == 5.0
    assert isinstance(loaded.hparams.backbone, dict)
    for (name, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # The same network without Lightning, from the checkpoint and from the folder fit wrote.
    from tipr.pretrained import load_pretrained

    images, token_ids = ToyPairs(3).images, ToyPairs(3).input_ids
    expected = module.network.eval().encode_image(images), module.network.encode_text(token_ids)
    for source in (tmp_path / "model.ckpt", tmp_path / "pretrained"):
        model, processor = load_pretrained(source)
        assert not model.training and processor.image_size == IMAGE_SIZE and processor.text_length == TEXT_LENGTH
        assert torch.equal(model.encode_image(images), expected[0]), source
        assert torch.equal(model.encode_text(token_ids), expected[1]), source


def test_bf16_autocast_and_gradient_checkpointing_keep_fp32_weights(tmp_path):
    module = _module(gradient_checkpointing=True)
    assert module.network.clip.vision_model.encoder.layers[0].gradient_checkpointing
    trainer = _trainer(tmp_path, precision="bf16-mixed", max_epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=ToyData())
    assert trainer.global_step == 2
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_reference_fp16_weights_keep_norms_and_embeddings_fp32_and_train_with_fp16_adam_state(tmp_path):
    """The reference's precision as an option: fp16 linear/conv/attention weights, hence fp16 Adam
    state; norms, embeddings and the TIR mask token fp32; the module's own fp16 autocast."""
    module = _module(reference_fp16_weights=True)
    dtypes = {n: p.dtype for n, p in module.network.named_parameters()}
    half = {
        "clip.vision_model.embeddings.patch_embedding.weight", "clip.visual_projection.weight",
        "clip.text_model.encoder.layers.0.self_attn.q_proj.weight", "clip.text_model.encoder.layers.0.mlp.fc1.bias",
        "classifier.weight", "classifier.bias", "restoration.cross_attn.in_proj_weight",
        "restoration.cross_attn.out_proj.weight", "restoration.transformer.0.attn.qkv.weight",
        "restoration.pixel_head.weight",
    }
    assert all(dtypes[n] == torch.float16 for n in half)
    single = {n for n, d in dtypes.items() if d == torch.float32}
    assert {"clip.vision_model.embeddings.class_embedding", "clip.vision_model.embeddings.position_embedding.weight",
            "clip.text_model.embeddings.token_embedding.weight", "clip.vision_model.pre_layrnorm.weight",
            "restoration.mask_token", "restoration.transformer.0.norm1.weight"} <= single
    assert all("norm" in n or "embedding" in n or n.endswith(("mask_token", "logit_scale")) for n in single)

    with pytest.raises(ValueError, match="reference_fp16_weights.*32-true.*bf16-mixed"):
        _trainer(tmp_path, precision="bf16-mixed", max_epochs=1).fit(module, datamodule=ToyData())
    trainer = _trainer(tmp_path, precision="32-true", max_epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=ToyData())
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    weight = module.network.clip.visual_projection.weight
    assert weight.dtype == torch.float16
    assert trainer.optimizers[0].state[weight]["exp_avg_sq"].dtype == torch.float16
    # Evaluation runs under the same autocast.
    assert module.network.encode_text(ToyPairs(2).input_ids).dtype == torch.float16


def test_a_data_module_without_the_methods_fields_gets_them_drawn_per_row_from_the_step(tmp_path):
    """ToyData draws no IRRA masks: the module draws them from (global step, rank, row) and trains."""
    module = _module(method="irra")
    batch = ToyPairs(4)[0]
    batch = {k: torch.as_tensor(v)[None].repeat(2, *[1] * torch.as_tensor(v).dim()) for k, v in batch.items()}
    drawn = module.draw_sample_fields(batch)
    assert torch.equal(drawn["mlm_input_ids"], module.draw_sample_fields(batch)["mlm_input_ids"])
    assert not torch.equal(drawn["mlm_labels"][0], drawn["mlm_labels"][1])  # each row its own draw
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=ToyData())
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/mlm_loss"])


class PoisonedPairs(ToyPairs):
    """ToyPairs whose samples from ``poison_from`` on have NaN pixels."""

    def __init__(self, n, poison_from):
        super().__init__(n)
        self.images[poison_from:] = float("nan")


def test_a_non_finite_loss_stops_the_run_naming_step_terms_and_last_good_checkpoint(tmp_path):
    """Batches of 4, NaN pixels from batch 3 (step 3) on, checks every 2 steps: the run stops at the
    check after step 3 and names it; last.ckpt stays the one written after step 2, with finite weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tipr.training.nonfinite import NonFiniteLossError

    class Poisoned(ToyData):
        def train_dataloader(self):
            return DataLoader(PoisonedPairs(24, poison_from=12), batch_size=4, shuffle=False)

    module = _module(nonfinite_check_interval=2)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[checkpoints], enable_checkpointing=True)
    with pytest.raises(NonFiniteLossError, match=r"non-finite sdm, id, triplet, restoration, loss, grad_norm at step 3") as error:
        trainer.fit(module, datamodule=Poisoned())
    last = tmp_path / "ckpt" / "last.ckpt"
    assert str(last) in str(error.value)
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3  # after steps 0, 1, 2: nothing written once step 3 went bad
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert trainer.global_step == 4  # stopped at the first check after the bad step


def test_a_non_finite_gradient_alone_is_named(tmp_path):
    """Finite losses but an infinite gradient (a hook on one weight): the real hooks name grad_norm only."""
    from tipr.training.nonfinite import NonFiniteLossError

    module = _module(nonfinite_check_interval=1)
    module.network.clip.visual_projection.weight.register_hook(lambda grad: grad * float("inf"))
    trainer = _trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    with pytest.raises(NonFiniteLossError, match=r"non-finite grad_norm at step 0 \(NaN or Inf\)"):
        trainer.fit(module, datamodule=ToyData())
