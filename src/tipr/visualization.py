"""Pictures of what the model does: retrieval grids and TIR restorations.

``RetrievalPanels`` is a Lightning callback that, after each validation, logs
two image panels to every logger that can show images (``WandbLogger``'s
``log_image``; other loggers are left alone):

- ``val/retrieval``: for a few caption queries, the top-k gallery images with
  their scores, green-framed when they show the query's identity;
- ``val/tir``: text-guided restoration triplets, per row the masked grayscale
  input the TIR head sees, its reconstruction (masked patches only, visible
  patches pasted back as MAE papers show them) and the colour target.

Both use what validation already computed on rank 0 (the features held by the
retrieval metric), plus one TIR forward pass on a handful of images.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback
from PIL import Image, ImageDraw

from tipr.data.transforms import CLIP_MEAN, CLIP_STD

__all__ = ["RetrievalPanels", "image_grid", "to_pil"]


def to_pil(image: torch.Tensor) -> Image.Image:
    """A CLIP-normalised ``(3, H, W)`` tensor as a PIL image."""
    mean = torch.tensor(CLIP_MEAN, device=image.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=image.device)[:, None, None]
    pixels = (image.float() * std + mean).clamp(0, 1).mul(255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())


def image_grid(rows: list[list[Image.Image]], labels: list[list[str]] | None = None, pad: int = 4) -> Image.Image:
    """Paste equally sized images into a grid, with an optional label under each."""
    width, height = rows[0][0].size
    label_h = 12 if labels else 0
    columns = max(len(r) for r in rows)
    sheet = Image.new("RGB", (columns * (width + pad) + pad, len(rows) * (height + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            x, y = pad + c * (width + pad), pad + r * (height + label_h + pad)
            sheet.paste(image, (x, y))
            if labels:
                draw.text((x, y + height), labels[r][c], fill="black")
    return sheet


class RetrievalPanels(Callback):
    """Log retrieval and TIR panels after validation (see the module docstring).

    Args:
        num_queries: caption queries shown in the retrieval panel.
        top_k: gallery images shown per query.
        num_restorations: rows of the TIR panel (0 turns it off).
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
        panels = {"val/retrieval": self.retrieval_panel(pl_module, queries, gallery)}
        if self.num_restorations and pl_module.network.restoration is not None:
            panels["val/tir"] = self.restoration_panel(pl_module, queries, gallery)
        for logger in loggers:
            for key, image in panels.items():
                if image is not None:
                    logger.log_image(key=key, images=[image], step=trainer.global_step)

    def retrieval_panel(self, pl_module, queries, gallery) -> Image.Image | None:
        ranks = pl_module.val_ranks
        if not ranks.query_features or not ranks.gallery_features:
            return None
        text = torch.nn.functional.normalize(torch.cat(ranks.query_features)[: self.num_queries].float(), dim=-1)
        images = torch.nn.functional.normalize(torch.cat(ranks.gallery_features).float(), dim=-1)
        query_index = torch.cat(ranks.query_index)[: self.num_queries]
        gallery_index = torch.cat(ranks.gallery_index)
        scores, top = (text @ images.T).topk(min(self.top_k, images.shape[0]), dim=1)  # (Q, k)
        rows, labels = [], []
        for q in range(text.shape[0]):
            query_pid = int(queries.pids[int(query_index[q])])
            row, row_labels = [], []
            for score, g in zip(scores[q].tolist(), top[q].tolist()):
                item = int(gallery_index[g])
                picture = to_pil(gallery[item]["images"])
                hit = int(gallery.pids[item]) == query_pid
                framed = Image.new("RGB", (picture.width + 4, picture.height + 4), "green" if hit else "red")
                framed.paste(picture, (2, 2))
                row.append(framed)
                row_labels.append(f"{score:.2f}")
            rows.append(row)
            labels.append(row_labels)
        return image_grid(rows, labels)

    @torch.no_grad()
    def restoration_panel(self, pl_module, queries, gallery) -> Image.Image:
        from tipr.model.restoration import patchify, to_grayscale, unpatchify

        network = pl_module.network
        n = min(self.num_restorations, len(gallery))
        images = torch.stack([gallery[i]["images"] for i in range(n)]).to(pl_module.device)
        # a caption of the same identity for each image
        caption_of = {int(pid): i for i, pid in reversed(list(enumerate(queries.pids.tolist())))}
        tokens = torch.stack([queries[caption_of[int(gallery.pids[i])]]["token_ids"] for i in range(n)])
        tokens = tokens.to(pl_module.device)
        generator = torch.Generator().manual_seed(0)
        noise = torch.rand(n, network.embeddings.num_patches, generator=generator).to(pl_module.device)
        with network.precision_context(images.device):
            text_tokens, eot = network.text_tokens(tokens)
            out = network.restore(images, text_tokens, eot, noise=noise)
        p, grid = network.embeddings.patch_size, network.embeddings.grid_size
        masked = out["mask"][..., None].bool()  # (B, N, 1), True where hidden
        gray = patchify(to_grayscale(images), p)
        seen = unpatchify(torch.where(masked, torch.full_like(gray, -2.0), gray), p, grid)
        restored = unpatchify(torch.where(masked, out["prediction"].float(), out["target"]), p, grid)
        rows = [[to_pil(seen[i]), to_pil(restored[i]), to_pil(images[i])] for i in range(n)]
        return image_grid(rows, [["input", "restored", "target"]] * n)
