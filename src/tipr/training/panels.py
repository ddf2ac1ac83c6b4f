"""Pictures of what the model does during training: retrieval panels and the method's own panels.

``RetrievalPanels`` is a Lightning callback that, after each validation, logs
image panels to every logger that can show images (``WandbLogger``'s
``log_image``; other loggers are left alone):

- ``val/retrieval``: one image per caption query, its top-k gallery images left
  to right with ``#rank score`` under each, framed green when they show the
  query's identity and red otherwise; the query text is the image's caption
  (``log_image(key=..., images=[...], caption=[query text, ...])``);
- ``val/<name>`` for each panel the method draws of its own heads
  (:meth:`tipr.model.TIPRModel.image_panels`; SEN's ``val/tir``: per row the
  masked grayscale input the TIR head sees, its reconstruction and the colour target).

Both use what validation already computed on rank 0 (the features held by the
retrieval metric), plus one forward pass of the method's heads on a handful of images. They are
drawn with :func:`tipr.render.image_grid`, the model's input scaled up by a
whole factor to at least ``PANEL_TILE_HEIGHT`` pixels so that text fits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import Callback
from PIL import Image, ImageOps

from tipr.data.transforms import CLIP_MEAN, CLIP_STD
from tipr.render import display_size, image_grid

__all__ = ["PANEL_TILE_HEIGHT", "RetrievalPanels", "to_pil"]

#: Panel tiles are the model's input size scaled up by a whole factor to at least this height.
PANEL_TILE_HEIGHT = 128
#: Pixels of the green (hit) / red (miss) frame around a retrieved image.
FRAME = 3


def to_pil(image: torch.Tensor) -> Image.Image:
    """A CLIP-normalised ``(3, H, W)`` tensor as a PIL image."""
    mean = torch.tensor(CLIP_MEAN, device=image.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=image.device)[:, None, None]
    pixels = (image.float() * std + mean).clamp(0, 1).mul(255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


def _scaled(image: torch.Tensor) -> Image.Image:
    """A CLIP-normalised tensor as a PIL image at panel size (pixels repeated, not blurred)."""
    picture = to_pil(image)
    h, w = display_size((picture.height, picture.width), PANEL_TILE_HEIGHT)
    return picture.resize((w, h), Image.Resampling.NEAREST)


class RetrievalPanels(Callback):
    """Log retrieval panels and the method's own panels after validation (see the module docstring).

    Args:
        num_queries: caption queries shown (one retrieval image each).
        top_k: gallery images shown per query.
        num_restorations: rows (images) of the method's panels, e.g. SEN's TIR (0 turns them off).
    """

    def __init__(self, num_queries: int = 4, top_k: int = 5, num_restorations: int = 4):
        self.num_queries = num_queries
        self.top_k = top_k
        self.num_restorations = num_restorations

    @staticmethod
    def _image_loggers(trainer) -> list:
        return [logger for logger in trainer.loggers if hasattr(logger, "log_image")]

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        loggers = self._image_loggers(trainer)
        if trainer.sanity_checking or not trainer.is_global_zero or not loggers:
            return
        datamodule = trainer.datamodule
        eval_sets = getattr(datamodule, "eval_sets", {})
        # The split validation ran on: "val", or "test" for benchmarks without one (ICFG-PEDES).
        split = datamodule.eval_split("validate") if hasattr(datamodule, "eval_split") else "val"
        if split not in eval_sets:
            return
        queries, gallery = eval_sets[split]
        benchmark = getattr(datamodule, "benchmark", None)
        captions = benchmark.split(split).captions if benchmark is not None else None
        panels = {"val/retrieval": self.retrieval_panels(pl_module, queries, gallery, captions)}
        if self.num_restorations:
            for name, (picture, caption) in self.method_panels(pl_module, queries, gallery).items():
                panels[f"val/{name}"] = ([picture], [caption])
        for logger in loggers:
            for key, (images, texts) in panels.items():
                if images:
                    logger.log_image(key=key, images=images, caption=texts, step=trainer.global_step)

    def retrieval_panels(
        self, pl_module, queries, gallery, captions: Sequence[str] | None = None
    ) -> tuple[list[Image.Image], list[str]]:
        """``(images, query texts)``: per query its top-k gallery images, by the features validation computed.

        ``captions``: the split's caption texts (indexed like ``queries``); without
        them the query's token ids are decoded.
        """
        ranks = pl_module.val_ranks
        if not ranks.query_features or not ranks.gallery_features:
            return [], []
        text = torch.nn.functional.normalize(torch.cat(ranks.query_features)[: self.num_queries].float(), dim=-1)
        images = torch.nn.functional.normalize(torch.cat(ranks.gallery_features).float(), dim=-1)
        query_index = torch.cat(ranks.query_index)[: self.num_queries].tolist()
        gallery_index = torch.cat(ranks.gallery_index)
        scores, top = (text @ images.T).topk(min(self.top_k, images.shape[0]), dim=1)  # (Q, k)
        panels, texts = [], []
        for q, index in enumerate(query_index):
            query_pid = int(queries.pids[index])
            tiles, labels = [], []
            for rank, (score, g) in enumerate(zip(scores[q].tolist(), top[q].tolist()), start=1):
                item = int(gallery_index[g])
                hit = int(gallery.pids[item]) == query_pid
                tiles.append(ImageOps.expand(_scaled(gallery[item]["pixel_values"]), FRAME, "green" if hit else "red"))
                labels.append(f"#{rank} {score:.3f}")
            panels.append(image_grid([tiles], [labels]))
            texts.append(str(captions[index]) if captions is not None else self._decode(pl_module, queries, index))
        return panels, texts

    @staticmethod
    def _decode(pl_module, queries, index: int) -> str:
        ids = [int(t) for t in queries[index]["input_ids"].tolist() if t != 0]  # 0 pads
        return pl_module.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @torch.no_grad()
    def method_panels(self, pl_module, queries, gallery) -> dict[str, tuple[Image.Image, str]]:
        """``{name: (picture, caption)}`` of the method's panels on the first gallery images, each
        with a caption of its identity (:meth:`tipr.model.TIPRModel.image_panels`)."""
        network = pl_module.network
        n = min(self.num_restorations, len(gallery))
        images = torch.stack([gallery[i]["pixel_values"] for i in range(n)]).to(pl_module.device)
        caption_of = {int(pid): i for i, pid in reversed(list(enumerate(queries.pids.tolist())))}
        tokens = torch.stack([queries[caption_of[int(gallery.pids[i])]]["input_ids"] for i in range(n)])
        generator = torch.Generator().manual_seed(0)
        drawn = network.image_panels(images, tokens.to(pl_module.device), generator)
        return {name: (image_grid([[_scaled(t) for t in row] for row in rows], [labels] * len(rows)), caption)
                for name, (rows, labels, caption) in drawn.items()}
