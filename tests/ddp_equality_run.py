"""Three training steps of a method through Lightning on 1 or N CPU processes (gloo), for test_ddp_equality.py.

    python tests/ddp_equality_run.py --method sen --devices 2 --root DATA --out OUT.pt

Every run starts from the same weights (seed 0) and reads the same synthetic
benchmark; the sampler's plan and each sample's augmentation, pruning and method
draws (SEN's masking noise, IRRA's masked captions) are functions of (seed,
epoch, plan position), so the global batches are the same whatever the number
of processes. Rank 0 writes the logged losses of each step
and the network's weights before the first and after the last step to ``--out``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch

from tipr.methods import method_spec
from tipr.training import TIPRDataModule, TIPRModule

STEPS = 3
#: The method's settings of these runs (a 1-block head each, to keep them short).
METHOD_FIELDS = {"sen": {"restoration_depth": 1}, "irra": {"cross_modal_depth": 1}}


def loss_keys(method: str) -> tuple[str, ...]:
    """``train/loss`` and ``train/<term>_loss`` of every term the method's defaults train."""
    config = method_spec(method).config_class(**METHOD_FIELDS[method])
    return ("train/loss", *(f"train/{name}_loss" for name, weight in config.loss_weights.items() if weight > 0))


def data_module(root: str) -> TIPRDataModule:
    """12 identities x 2 images x 2 captions = 48 pairs; global batch 8. Augmentation and pruning on:
    each sample's draws come from its plan position's seed, whatever the number of processes."""
    return TIPRDataModule(
        "synthetic", root, image_size=(32, 16), batch_size=8, num_workers=0, text_length=24, prune_prob=0.5,
        synthetic=dict(num_train_ids=12, num_val_ids=0, num_test_ids=2, images_per_id=2, captions_per_image=2,
                       image_size=(64, 32)),
    )


class LossRecorder(pl.Callback):
    def __init__(self, keys):
        self.keys = keys
        self.losses: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append({key: float(trainer.callback_metrics[key]) for key in self.keys})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=sorted(METHOD_FIELDS), required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    data = data_module(args.root)
    config = method_spec(args.method).config_class(**METHOD_FIELDS[args.method])
    module = TIPRModule(
        num_classes=data.num_classes, method=config, backbone="tiny", image_size=(32, 16), text_length=24, lr=1e-3,
        warmup_epochs=0.5,
    )
    initial = {name: value.detach().clone() for name, value in module.network.state_dict().items()}
    recorder = LossRecorder(loss_keys(args.method))
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto", max_steps=STEPS,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[recorder], default_root_dir=args.root,
    )
    trainer.fit(module, datamodule=data)
    if trainer.is_global_zero:
        weights = {name: value.detach().clone() for name, value in module.network.state_dict().items()}
        out = {"losses": recorder.losses, "initial": initial, "weights": weights, "world_size": trainer.world_size}
        torch.save(out, args.out)


if __name__ == "__main__":
    main()
