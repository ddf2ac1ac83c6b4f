"""``IRRAModel``: IRRA's network and objective as plain PyTorch, shareable with ``from_pretrained``.

The shared CLIP dual encoder and ID classifier (:class:`tipr.model.TIPRModel`)
and IRRA's implicit relation reasoning: the masked caption's token features
query the image's tokens through a cross-attention (no residual), a 4-block
cross-modal transformer and a layer norm, and an MLM head predicts the masked
tokens. ``forward(pixel_values, input_ids, pids, mlm_input_ids, mlm_labels)``
gives the training losses as an :class:`IRRAOutput`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from tipr.methods.irra.config import IRRAConfig
from tipr.methods.irra.masking import CaptionMasking
from tipr.model.base import TIPRModel
from tipr.model.blocks import clip_blocks, default_heads, init_clip_transformer
from tipr.model.config import EncoderConfig
from tipr.model.losses import identity_loss, itc_loss, masked_token_loss, sdm_loss


@dataclass
class IRRAOutput(ModelOutput):
    """The training losses of one batch: the weighted total and each computed term (unweighted);
    a term whose weight is 0 is ``None`` and absent from ``keys()``."""

    loss: torch.Tensor | None = None
    sdm: torch.Tensor | None = None
    id: torch.Tensor | None = None
    mlm: torch.Tensor | None = None
    itc: torch.Tensor | None = None


class IRRAModel(TIPRModel):
    """CLIP dual encoder + ID classifier + IRRA's cross-modal MLM head + its losses.

    With :attr:`gather_across_ranks` on, SDM and ITC run over every rank's features and
    MLM is normalised by the global batch's labelled tokens, so ``W`` processes train the
    loss of one; ID is this rank's mean.

    Modules (the reference's names): ``cross_attn`` (``nn.MultiheadAttention``, heads =
    width / 64), ``cross_modal_transformer`` (``cross_modal_depth`` OpenAI-style blocks,
    :func:`~tipr.model.blocks.clip_blocks`), ``ln_pre_t``, ``ln_pre_i``, ``ln_post``, and
    ``mlm_head`` (``dense``, ``gelu``, ``ln``, ``fc`` over the vocabulary).
    """

    config_class = IRRAConfig
    batch_fields = ("pixel_values", "input_ids", "pids", "mlm_input_ids", "mlm_labels")

    def __init__(self, encoder: EncoderConfig, config: IRRAConfig | None = None, clip=None):
        super().__init__(encoder, config if config is not None else IRRAConfig(), clip)
        dim, config = self.embed_dim, self.config
        self.mask_token_id = self.vocab_size - 3 if config.mask_token_id is None else int(config.mask_token_id)
        if not 1 < self.mask_token_id < self.vocab_size:
            raise ValueError(f"irra mask_token_id {self.mask_token_id} is outside the vocabulary (2.."
                             f"{self.vocab_size - 1}); expected the tokenizer's <|mask|> id")
        from timm.layers import QuickGELU

        heads = default_heads(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_modal_transformer = clip_blocks(dim, config.cross_modal_depth, heads)
        self.ln_pre_t = nn.LayerNorm(dim)
        self.ln_pre_i = nn.LayerNorm(dim)
        self.ln_post = nn.LayerNorm(dim)
        self.mlm_head = nn.Sequential(OrderedDict([
            ("dense", nn.Linear(dim, dim)),
            ("gelu", QuickGELU()),
            ("ln", nn.LayerNorm(dim)),
            ("fc", nn.Linear(dim, self.vocab_size)),
        ]))
        # The reference's initialisation (its mlm head biases keep nn.Linear's default).
        init_clip_transformer(self.cross_modal_transformer, self.cross_attn, dim)
        depth = config.cross_modal_depth
        nn.init.normal_(self.mlm_head.dense.weight, std=(2 * dim) ** -0.5)
        nn.init.normal_(self.mlm_head.fc.weight, std=dim**-0.5 * (2 * depth) ** -0.5)
        self.finish_init()

    def cross_former(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Implicit relation reasoning: ``(B, L, D)`` text queries over ``(B, 1 + N, D)`` image tokens
        -> ``(B, L, D)``: cross-attention (no residual), the cross-modal transformer, ``ln_post``."""
        image = self.ln_pre_i(image_tokens)
        x, _ = self.cross_attn(self.ln_pre_t(text_tokens), image, image, need_weights=False)  # (B, L, D)
        return self.ln_post(self.cross_modal_transformer(x))

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        pids: torch.Tensor,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        check_inputs: bool = True,
    ) -> IRRAOutput:
        """Training losses for a batch of paired images and captions.

        Args:
            pixel_values: ``(B, 3, H, W)``; input_ids: ``(B, L)`` zero-padded CLIP ids;
            pids: ``(B,)`` identity labels ``0 .. num_classes - 1``.
            mlm_input_ids, mlm_labels: ``(B, L)`` the masked captions and their labels (the
                original id at masked positions, 0 elsewhere; :mod:`tipr.methods.irra.masking`).
                Needed when ``mlm_weight > 0``.
            check_inputs: validate token ids and labels (a host sync); off once the data were checked.

        Returns:
            :class:`IRRAOutput`: ``loss`` (the weighted sum) and each term with weight > 0.
        """
        with self.precision_context(pixel_values.device):
            return self._losses(pixel_values, input_ids, pids, mlm_input_ids, mlm_labels, check_inputs)

    def _losses(self, pixel_values, input_ids, pids, mlm_input_ids, mlm_labels, check_inputs) -> IRRAOutput:
        self.check_batch(pixel_values, input_ids, pids, check_inputs)
        w, config = self.config.loss_weights, self.config
        image_tokens = self.image_tokens(pixel_values)  # (B, 1 + N, D)
        image_features = image_tokens[:, 0].float()  # (B, D)
        text_features = self.pooled(*self.text_tokens(input_ids, check=check_inputs)).float()  # (B, D)

        losses: dict[str, torch.Tensor] = {}
        if w["sdm"] > 0 or w["itc"] > 0:  # batch-level: over every rank's samples
            all_images, all_texts = self.gather(image_features, text_features)
            (all_pids,) = self.gather(pids, grad=False)
        if w["sdm"] > 0:
            losses["sdm"] = sdm_loss(all_images, all_texts, all_pids, config.temperature)
        if w["id"] > 0:
            losses["id"] = identity_loss(self.classifier(image_features), self.classifier(text_features), pids)
        if w["mlm"] > 0:
            if mlm_input_ids is None or mlm_labels is None:
                raise ValueError("irra mlm_weight > 0 needs mlm_input_ids and mlm_labels (the masked captions)")
            if mlm_input_ids.shape != input_ids.shape or mlm_labels.shape != input_ids.shape:
                raise ValueError(f"mlm_input_ids {tuple(mlm_input_ids.shape)} and mlm_labels "
                                 f"{tuple(mlm_labels.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
            masked_tokens, _ = self.text_tokens(mlm_input_ids, check=check_inputs)  # (B, L, D)
            hidden = self.cross_former(masked_tokens, image_tokens)  # (B, L, D)
            # The head is per token and the loss reads only labelled positions, so only those are
            # scored: the same loss as scoring all (the reference), without the (B, L, V) logits
            # (a synthetic IRRA step 4x faster on a CPU). Boolean indexing costs one host sync.
            labelled = mlm_labels != 0
            scores = self.mlm_head(hidden[labelled])  # (M, V)
            # The mean over the global batch's labelled tokens: ranks hold different counts of them.
            (counts,) = self.gather(labelled.sum()[None], grad=False)  # (W,)
            losses["mlm"] = masked_token_loss(scores, mlm_labels[labelled], num_labels=counts.float().mean())
        if w["itc"] > 0:
            losses["itc"] = itc_loss(all_images, all_texts, config.temperature)
        return IRRAOutput(loss=self.weighted_total(losses), **losses)

    def sample_fields(self) -> CaptionMasking:
        """Each training sample's masked caption and labels, drawn in the loader from its seed."""
        return CaptionMasking(self.mask_token_id, self.config.mlm_probability,
                              self.config.unmasked_retrieval_captions)
