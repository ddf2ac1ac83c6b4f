"""Pruning-based caption augmentation (SEN, section "semantic enhancement").

``prune_caption`` keeps the words of a caption whose Penn Treebank
part-of-speech tag starts with ``NN`` (nouns), ``JJ`` (adjectives) or ``PRP``
(pronouns, possessives included), in order, joined by spaces::

    >>> prune_caption("A woman with long black hair is wearing a white shirt and blue jeans.")
    'woman long black hair white shirt blue jeans'

The tagger is an averaged perceptron (nltk's ``PerceptronTagger``) trained on
the Universal Dependencies English Web Treebank by ``tools/train_pos_tagger.py``
and shipped in ``tipr/assets/pos_tagger`` (CC BY-SA 4.0, see NOTICE). Nothing is
downloaded: unlike the reference code, importing or running this never calls
``nltk.download``.

Pruning runs once per caption when a dataset is prepared (the data module
caches the result), never per sample per epoch. ``prune_captions`` is the
batched form to use for a whole dataset.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

KEPT_TAG_PREFIXES = ("NN", "JJ", "PRP")
TAGGER_ASSET = "assets/pos_tagger/ewt_perceptron.json.gz"

# Penn-Treebank-like word splitting, as in the EWT training data: clitics
# ('s, n't, 're, ...) and hyphens are tokens of their own; hyphenated words are
# joined back for the output.
_TOKEN = re.compile(r"\w+(?=n't\b)|n't\b|'(?:s|re|ve|m|ll|d)\b|\w+|[^\w\s]", re.IGNORECASE)


def split_words(text: str) -> list[str]:
    """Split a caption into the tokens the tagger was trained on."""
    return _TOKEN.findall(text)


@lru_cache(maxsize=1)
def load_pos_tagger():
    """The shipped averaged-perceptron tagger (loaded once, offline)."""
    from nltk.tag.perceptron import PerceptronTagger

    tagger = PerceptronTagger(load=False)
    with resources.files("tipr").joinpath(TAGGER_ASSET).open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        blob = json.load(f)
    tagger.decode_json_params((blob["weights"], blob["tagdict"], blob["classes"]))
    return tagger


def _tag(tagger, words: list[str], memo: dict) -> list[str]:
    """``tagger.tag(words)`` with a memo of identical feature windows.

    The perceptron's features for word i depend only on the word, the two
    previous tags and the words i-2..i+2, so a key made of those gives exactly
    the tag nltk would compute. Person descriptions repeat such windows a lot
    ("is wearing a", "shirt and blue"), which makes whole-dataset tagging
    several times faster than calling ``tagger.tag`` caption by caption.
    """
    prev, prev2 = tagger.START
    context = tagger.START + [tagger.normalize(w) for w in words] + tagger.END
    tags = []
    for i, word in enumerate(words):
        tag = tagger.tagdict.get(word)
        if not tag:
            key = (word, prev, prev2, *context[i : i + 5])
            tag = memo.get(key)
            if tag is None:
                tag, _ = tagger.model.predict(tagger._get_features(i, word, context, prev, prev2))
                memo[key] = tag
        tags.append(tag)
        prev2, prev = prev, tag
    return tags


def _check_caption(text: object, where: str = "caption") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str, got {type(text).__name__}: {text!r:.80}")
    if not text.strip():
        raise ValueError(f"{where} is empty; expected a non-empty description to prune")
    return text


def _prune_tagged(text: str, tagged: list[tuple[str, str]]) -> str:
    kept: list[str] = []
    # Re-join hyphenated compounds ("T - shirt" -> "T-shirt"): a compound is
    # kept whole when any of its parts is a noun, adjective or pronoun.
    group: list[str] = []
    group_kept = False
    previous_hyphen = False
    for word, tag in tagged:
        keep = tag.startswith(KEPT_TAG_PREFIXES)
        if word == "-" and group:
            group.append(word)
            previous_hyphen = True
            continue
        if previous_hyphen and word.isalnum():
            group.append(word)
            group_kept = group_kept or keep
            previous_hyphen = False
            continue
        if group and group_kept:
            kept.append("".join(group).strip("-"))
        group, group_kept, previous_hyphen = ([word], keep, False) if word.isalnum() or word[0] == "'" else ([], False, False)
    if group and group_kept:
        kept.append("".join(group).strip("-"))
    return " ".join(kept) if kept else text


def prune_caption(text: str) -> str:
    """Keep the nouns, adjectives and pronouns of ``text``, joined by spaces.

    Returns ``text`` unchanged when nothing would be left.

    Raises:
        TypeError: ``text`` is not a ``str``.
        ValueError: ``text`` is empty or only whitespace.
    """
    return prune_captions([text])[0]


def prune_captions(texts: Sequence[str]) -> list[str]:
    """Batched :func:`prune_caption` for a whole dataset's captions."""
    if isinstance(texts, str):
        raise TypeError("prune_captions expects a sequence of captions, got a single str; use prune_caption")
    for i, text in enumerate(texts):
        _check_caption(text, where=f"caption {i}")
    tagger = load_pos_tagger()
    from tipr.tokenization import clean_caption

    out = []
    memo: dict = {}
    for text in texts:
        words = split_words(clean_caption(text))
        # ALL-CAPS captions: capitalisation carries no part-of-speech signal
        # (the tagger would read every word as a proper noun), so tag the
        # lower-cased words and keep the original forms.
        tags = _tag(tagger, [w.lower() for w in words] if text.isupper() else words, memo)
        out.append(_prune_tagged(text, list(zip(words, tags))))
    return out
