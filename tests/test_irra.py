"""IRRA: the caption masking (vectorised, seeded per sample), its loader hook, and the model's contract."""

from __future__ import annotations

import random

import pytest
import torch

from tipr.methods.irra import CaptionMasking, IRRAConfig, IRRAModel, mask_caption
from tipr.tokenization import tokenize
from tiny import Tiny

MASK = 49405
CAPTIONS = ["a woman with long black hair is wearing a white shirt and blue jeans",
            "a man in a red jacket carrying a black backpack", "person"]


def reference_masking(tokens: list[int], rng: random.Random, mask: int = MASK) -> tuple[list[int], list[int]]:
    """The authors' loop (datasets/bases.py), one Python draw per token."""
    tokens, labels = list(tokens), []
    for i, token in enumerate(tokens):
        if 0 < token < mask:
            prob = rng.random()
            if prob < 0.15:
                prob /= 0.15
                if prob < 0.8:
                    tokens[i] = mask
                elif prob < 0.9:
                    tokens[i] = rng.choice(range(1, mask))
                labels.append(token)
            else:
                labels.append(0)
        else:
            labels.append(0)
    if all(label == 0 for label in labels):
        labels[1], tokens[1] = tokens[1], mask
    return tokens, labels


def _shares(pairs, ids, start: int = 0):
    """(chosen / words, masked / chosen, replaced / chosen, kept / chosen) over (masked, labels) pairs,
    counting positions from ``start`` on."""
    words = chosen = masked = replaced = kept = 0
    for (out, labels), row in zip(pairs, ids):
        out, labels, row = out[start:], labels[start:], row[start:]
        word = (row > 0) & (row < MASK)
        pick = labels != 0
        words += int(word.sum())
        chosen += int(pick.sum())
        masked += int((pick & (out == MASK)).sum())
        kept += int((pick & (out == row)).sum())
        replaced += int((pick & (out != MASK) & (out != row)).sum())
    return chosen / words, masked / chosen, replaced / chosen, kept / chosen


def test_masking_draws_the_references_shares():
    """20,000 captions: the vectorised masking and the authors' loop choose 15 % of the words and split
    them 80 / 10 / 10 (a random word may equal the original, 1 in 49,404). Binomial standard errors are
    below 0.001 for the choice and 0.004 for the splits; the bound is 0.01."""
    ids = tokenize(CAPTIONS * 6667, context_length=32)[:20000]
    generator = torch.Generator().manual_seed(0)
    ours = [mask_caption(row, generator, MASK) for row in ids]
    rng = random.Random(0)
    theirs = [tuple(torch.tensor(x) for x in reference_masking(row.tolist(), rng)) for row in ids]
    for a, b in zip(_shares(ours, ids), _shares(theirs, ids)):
        assert a == pytest.approx(b, abs=0.01)
    # After the first word (which the fallback masks when nothing was chosen), the recipe's own shares.
    chosen, masked, replaced, kept = _shares(ours, ids, start=2)
    assert chosen == pytest.approx(0.15, abs=0.01)
    assert (masked, replaced, kept) == pytest.approx((0.8, 0.1, 0.1), abs=0.015)


def test_masking_never_touches_padding_start_end_and_labels_only_chosen_words():
    ids = tokenize(CAPTIONS, context_length=32)
    generator = torch.Generator().manual_seed(1)
    for row in ids:
        for _ in range(50):
            out, labels = mask_caption(row, generator, MASK)
            special = (row == 0) | (row >= MASK)
            assert torch.equal(out[special], row[special])  # padding, start and end stay
            assert torch.equal(labels[labels != 0], row[labels != 0])  # the label is the original id
            assert bool((labels[special] == 0).all()) and bool((labels != 0).any())
            changed = out != row
            assert bool((labels[changed] != 0).all())  # nothing changes without a label
            assert int(out.max()) <= 49407 and int(out[out != 0].min()) >= 1


def test_a_caption_with_no_chosen_word_masks_its_first_word():
    row = tokenize(["person"], context_length=8)[0]  # start, "person", end, padding
    generator = torch.Generator().manual_seed(0)
    fallbacks = 0
    for _ in range(100):
        out, labels = mask_caption(row, generator, MASK)
        if int(labels.count_nonzero()) == 1 and labels[1] == row[1] and out[1] == MASK:
            fallbacks += 1
        assert int(labels.count_nonzero()) == 1  # one word: chosen, or the fallback
    assert fallbacks > 80  # P(chosen as the mask) = 0.15 * 0.8; the fallback masks it too
    empty = tokenize([""], context_length=8)[0]  # start, end: nothing to mask, the end token stays
    out, labels = mask_caption(empty, generator, MASK)
    assert torch.equal(out, empty) and not labels.any()


def test_the_loader_hook_is_a_function_of_the_seed_and_follows_the_reference_in_place_masking():
    row = tokenize([CAPTIONS[0]], context_length=32)[0]
    hook = CaptionMasking(MASK)
    first = hook({"input_ids": row}, torch.Generator().manual_seed(7))
    again = hook({"input_ids": row}, torch.Generator().manual_seed(7))
    other = hook({"input_ids": row}, torch.Generator().manual_seed(8))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["mlm_labels"], other["mlm_labels"])
    # The reference's retrieval losses read the masked caption; the option gives them the original.
    assert torch.equal(first["input_ids"], first["mlm_input_ids"])
    plain = CaptionMasking(MASK, unmasked_retrieval_captions=True)({"input_ids": row}, torch.Generator().manual_seed(7))
    assert "input_ids" not in plain and torch.equal(plain["mlm_input_ids"], first["mlm_input_ids"])


def test_training_pairs_draw_the_masks_from_the_sample_seed(synthetic_root, tiny):
    """The same (index, seed) gives the same masked caption, whatever else was drawn before."""
    model = tiny.network(method="irra")
    data = tiny.data(synthetic_root, prune_prob=0.5)
    data.setup("fit")
    data.sample_fields = model.sample_fields()
    pairs = data.train_set
    a, b = pairs[(3, 12345)], pairs[(3, 12345)]
    pairs[(5, 999)]
    c = pairs[(3, 12345)]
    for key in ("mlm_input_ids", "mlm_labels", "input_ids", "pixel_values"):
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key
    assert any(not torch.equal(pairs[(3, seed)]["mlm_labels"], a["mlm_labels"]) for seed in range(5))


def test_the_model_names_missing_or_misshapen_masked_inputs():
    model = Tiny.network(method="irra", num_classes=3)
    assert model.mask_token_id == 49408 - 3
    images = torch.randn(2, 3, *Tiny.image_size)
    ids = tokenize(CAPTIONS[:2], context_length=Tiny.text_length)
    pids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="mlm_weight > 0 needs mlm_input_ids and mlm_labels"):
        model(images, ids, pids)
    with pytest.raises(ValueError, match=r"must have input_ids' shape \(2, 16\)"):
        model(images, ids, pids, ids[:, :8], ids[:, :8])
    out = Tiny.network(method="irra", num_classes=3, mlm_weight=0.0)(images, ids, pids)
    assert set(out) == {"loss", "sdm", "id"}  # MLM off: no masked inputs needed, the head stays
    with pytest.raises(ValueError, match="mask_token_id 49408 is outside the vocabulary"):
        Tiny.network(method="irra", mask_token_id=49408)
    with pytest.raises(ValueError, match="cross_modal_depth must be >= 1"):
        IRRAConfig(cross_modal_depth=0)


def test_a_local_call_on_one_rank_never_gathers():
    """The cross-rank gather is the training module's choice, not implied by an initialised process group."""
    model = Tiny.network(method="irra")
    assert model.gather_across_ranks is False
    tensor = torch.randn(3, 4)
    assert model.gather(tensor)[0] is tensor
    assert isinstance(model, IRRAModel)
