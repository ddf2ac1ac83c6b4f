"""Retrieval and TIR panels reach loggers that can show images."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger

from tipr.data import TIPRDataModule
from tipr.model import TIPRModule
from tipr.visualization import RetrievalPanels, to_pil


class ImageLogger(Logger):
    """Collects what ``log_image`` receives, like ``WandbLogger`` would show it."""

    def __init__(self):
        super().__init__()
        self.images = {}

    name = "images"
    version = 0

    def log_image(self, key, images, step=None):
        self.images[key] = images

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_to_pil_inverts_clip_normalisation():
    from tipr.data.transforms import CLIP_MEAN, CLIP_STD

    pixels = torch.tensor([0.0, 0.5, 1.0])[:, None, None].expand(3, 2, 2)
    normalised = (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert to_pil(normalised).getpixel((0, 0)) == (0, 128, 255)


@pytest.mark.parametrize("num_val_ids", [4, 0], ids=["val split", "no val split (ICFG-PEDES)"])
def test_panels_are_logged_after_validation(tmp_path, num_val_ids):
    """Also for a benchmark without a val split, which validates on test (ICFG-PEDES)."""
    torch.manual_seed(0)
    data = TIPRDataModule(dataset="synthetic", root=str(tmp_path), image_size=(32, 16), batch_size=8,
                          eval_batch_size=16, num_workers=0, text_length=48, num_train_ids=8, num_val_ids=num_val_ids,
                          num_test_ids=4, images_per_id=2, synthetic_image_size=(64, 32))
    model = TIPRModule(num_classes=data.num_classes, backbone="tiny", image_size=(32, 16), text_length=48)
    logger = ImageLogger()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0,
                         logger=logger, callbacks=[RetrievalPanels(num_queries=3, top_k=4, num_restorations=2)],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    assert data.eval_split("validate") == ("val" if num_val_ids else "test")
    retrieval = logger.images["val/retrieval"][0]
    tir = logger.images["val/tir"][0]
    # 3 query rows x 4 framed (36 x 20) images, 12 px labels, 4 px padding
    assert retrieval.size == (4 + 4 * (20 + 4), 4 + 3 * (36 + 12 + 4))
    # 2 rows of input / restored / target at 32 x 16
    assert tir.size == (4 + 3 * (16 + 4), 4 + 2 * (32 + 12 + 4))
    frames = {retrieval.getpixel((4 + c * 24, 4 + r * 52)) for r in range(3) for c in range(4)}
    assert frames <= {(0, 128, 0), (255, 0, 0)}, frames  # every result framed as hit (green) or miss (red)
