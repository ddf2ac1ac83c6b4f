"""Caption pruning keeps nouns, adjectives and pronouns of pedestrian descriptions."""

import json
from pathlib import Path

import pytest

from tipr.data.pruning import prune_caption, prune_captions

CASES = json.loads((Path(__file__).parent / "fixtures" / "pedestrian_captions.json").read_text())


def test_method_example():
    caption = "A woman with long black hair is wearing a white shirt and blue jeans."
    assert prune_caption(caption) == "woman long black hair white shirt blue jeans"


def test_hand_checked_pedestrian_captions():
    assert len(CASES) >= 30
    pruned = prune_captions([c["caption"] for c in CASES])
    failures = []
    for case, out in zip(CASES, pruned):
        words = out.split()
        missing = [w for w in case["keep"] if w not in words]
        kept_wrongly = [w for w in case["drop"] if w in words]
        if missing or kept_wrongly:
            failures.append(f"{case['caption']!r} -> {out!r}: missing {missing}, not dropped {kept_wrongly}")
    assert not failures, "\n".join(failures)


def test_words_stay_in_order():
    caption = CASES[1]["caption"]
    words = prune_caption(caption).split()
    positions = [caption.index(w) for w in words]
    assert positions == sorted(positions)


def test_nothing_left_returns_original():
    assert prune_caption("is walking and running.") == "is walking and running."


def test_batched_equals_single():
    captions = [c["caption"] for c in CASES[:5]]
    assert prune_captions(captions) == [prune_caption(c) for c in captions]


@pytest.mark.parametrize("bad", ["", "   \n"])
def test_empty_caption_is_a_value_error(bad):
    with pytest.raises(ValueError, match="empty"):
        prune_caption(bad)


@pytest.mark.parametrize("bad", [None, 3, b"a man", ["a man"]])
def test_non_string_is_a_type_error(bad):
    with pytest.raises(TypeError, match="must be a str"):
        prune_caption(bad)


def test_error_names_the_caption_index():
    with pytest.raises(ValueError, match="caption 1"):
        prune_captions(["a man in a red coat", ""])


def test_memoised_tagging_equals_nltk():
    from tipr.data.pruning import _tag, load_pos_tagger, split_words

    tagger = load_pos_tagger()
    memo: dict = {}
    for case in CASES * 2:  # the second pass is served from the memo
        words = split_words(case["caption"])
        assert _tag(tagger, words, memo) == [t for _, t in tagger.tag(words)]
