"""The shipped CLIP tokenizer reproduces OpenAI CLIP's ids exactly."""

import json
from pathlib import Path

import pytest
import torch

from tipr.tokenization import load_tokenizer, tokenize

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "clip_tokenizer_reference.json").read_text())
CASES = REFERENCE["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["caption"][:30] for c in CASES])
def test_reference_ids_untruncated(case):
    expected = case["ids_untruncated"]
    ids = tokenize([case["caption"]], context_length=len(expected) + 5)[0]
    assert ids[: len(expected)].tolist() == expected
    assert ids[len(expected) :].eq(0).all(), "rows must be zero-padded after the end token"


@pytest.mark.parametrize("case", CASES, ids=[c["caption"][:30] for c in CASES])
def test_reference_ids_truncated_to_77(case):
    expected = case["ids_77"]
    ids = tokenize([case["caption"]])[0]
    assert ids.shape == (77,)
    assert ids[: len(expected)].tolist() == expected


def test_truncation_keeps_end_token_last():
    long_case = max(CASES, key=lambda c: len(c["ids_untruncated"]))
    assert len(long_case["ids_untruncated"]) > 77, "fixture must contain a caption longer than the context"
    ids = tokenize([long_case["caption"]], context_length=77)[0]
    assert ids[0].item() == 49406 and ids[-1].item() == 49407
    assert ids[1:-1].tolist() == long_case["ids_untruncated"][1:76]


def test_batch_matches_single_and_dtype():
    captions = [c["caption"] for c in CASES]
    batch = tokenize(captions)
    assert batch.dtype == torch.long and batch.shape == (len(captions), 77)
    for i, caption in enumerate(captions):
        assert torch.equal(batch[i], tokenize([caption])[0])


def test_bad_input():
    with pytest.raises(TypeError, match="single str"):
        tokenize("a man")
    with pytest.raises(TypeError, match="caption 1 is int"):
        tokenize(["a man", 3])
    with pytest.raises(ValueError, match="context_length"):
        tokenize(["a man"], context_length=1)


def test_checkpoint_folder_tokenizer_is_preferred(tmp_path):
    """A backbone folder with its own tokenizer files is used instead of the shipped one."""
    shipped = load_tokenizer()
    shipped.save_pretrained(tmp_path)
    # Make the folder's tokenizer recognisably different: one more special token.
    custom = load_tokenizer(tmp_path)
    custom.add_tokens(["<|person|>"], special_tokens=True)
    custom.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert "<|person|>" in loaded.get_vocab()
    assert "<|person|>" not in load_tokenizer().get_vocab()
    # A hub id or a folder without tokenizer files falls back to the shipped BPE, offline.
    assert load_tokenizer("openai/clip-vit-base-patch16") is load_tokenizer()
    assert load_tokenizer(tmp_path / "missing") is load_tokenizer()
