"""IRRA's per-sample data need: the masked caption and its labels, drawn in the loader.

The reference masks each training caption in its dataset (BERT's recipe):
every token id ``t`` with ``0 < t < mask id`` (words, not padding, start, end or
mask) is chosen with probability ``p = 0.15``; one uniform draw ``u`` per position
decides both (chosen when ``u < p``; then ``u / p < 0.8`` puts the mask id, ``< 0.9``
a uniformly random word id in ``1 .. mask id - 1``, else the token stays). Labels
hold the original id at chosen positions, 0 elsewhere. When no token was chosen,
the first word (position 1) is masked, so every caption has a label (the reference
does it whatever position 1 holds; here only when it is a word, so an empty
caption keeps its end-of-text token and gets no label).

The reference masks the caption's array in place, so its retrieval losses (SDM,
ID) read the masked caption as well: :class:`CaptionMasking` does the same unless
``unmasked_retrieval_captions`` (see :class:`~tipr.methods.irra.IRRAConfig`).

Here the draws are vectorised over the caption's positions and come from the
sample's generator (seeded from the sample's seed), so they do not depend on the
loader workers, the number of processes or where a resumed run restarted.
"""

from __future__ import annotations

import torch

#: Shares among chosen tokens: the mask id below 0.8, a random word below 0.9, else unchanged.
MASK_SHARE, RANDOM_SHARE = 0.8, 0.9


def mask_caption(
    input_ids: torch.Tensor, generator: torch.Generator, mask_token_id: int, probability: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mlm_input_ids, mlm_labels)``, both int64 ``(L,)``, for one zero-padded caption ``(L,)``."""
    ids = input_ids.long()
    length = ids.shape[0]
    draw = torch.rand(length, generator=generator)  # (L,)
    random_words = torch.randint(1, mask_token_id, (length,), generator=generator)  # (L,)
    chosen = (ids > 0) & (ids < mask_token_id) & (draw < probability)
    share = draw / probability
    masked = torch.where(chosen & (share < MASK_SHARE), torch.full_like(ids, mask_token_id), ids)
    masked = torch.where(chosen & (share >= MASK_SHARE) & (share < RANDOM_SHARE), random_words, masked)
    labels = torch.where(chosen, ids, torch.zeros_like(ids))
    if not bool(chosen.any()) and length > 1 and 0 < int(ids[1]) < mask_token_id:  # the reference masks word 1
        labels[1], masked[1] = ids[1], mask_token_id
    return masked, labels


class CaptionMasking:
    """The training dataset's per-sample hook: ``{"mlm_input_ids", "mlm_labels"}`` of the sample's
    caption, and ``input_ids`` replaced by the masked caption too unless ``unmasked_retrieval_captions``
    (the reference's in-place masking)."""

    def __init__(self, mask_token_id: int, probability: float = 0.15, unmasked_retrieval_captions: bool = False):
        self.mask_token_id = int(mask_token_id)
        self.probability = float(probability)
        self.unmasked_retrieval_captions = bool(unmasked_retrieval_captions)

    def __call__(self, sample: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
        masked, labels = mask_caption(sample["input_ids"], generator, self.mask_token_id, self.probability)
        fields = {"mlm_input_ids": masked, "mlm_labels": labels}
        if not self.unmasked_retrieval_captions:
            fields["input_ids"] = masked
        return fields
