"""Train the part-of-speech tagger shipped in ``src/tipr/assets/pos_tagger``.

Reads the Universal Dependencies English Web Treebank from
``../shared/data/ud-english-ewt/`` (CC BY-SA 4.0; CoNLL-U column 5 holds the
Penn Treebank tag), trains nltk's averaged-perceptron ``PerceptronTagger`` on
``en_ewt-ud-train.conllu``, prints its token accuracy on the dev and test files,
and writes the model as one gzipped JSON file. A small lexicon of
caption words (``CAPTION_LEXICON``: colours, hair adjectives, "wears") is added to
the tagger's tag dictionary before the accuracy is measured. This script is the only place
that reads ``../shared``; the library only reads the generated file.

    python tools/train_pos_tagger.py [--ewt DIR] [--iterations 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EWT = ROOT.parent / "shared" / "data" / "ud-english-ewt"
DEFAULT_OUT = ROOT / "src" / "tipr" / "assets" / "pos_tagger" / "ewt_perceptron.json.gz"


def read_conllu(path: Path) -> list[list[tuple[str, str]]]:
    """Sentences as lists of (form, Penn Treebank tag); multi-word and empty nodes skipped."""
    sentences, current = [], []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            if current:
                sentences.append(current)
                current = []
            continue
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise ValueError(f"{path}:{line_no}: expected 10 tab-separated CoNLL-U columns, got {len(cols)}")
        if "-" in cols[0] or "." in cols[0]:
            continue
        current.append((cols[1], cols[4]))
    if current:
        sentences.append(current)
    return sentences


def accuracy(tagger, sentences) -> float:
    correct = total = 0
    for sentence in sentences:
        words, gold = zip(*sentence)
        predicted = [tag for _, tag in tagger.tag(list(words))]
        correct += sum(p == g for p, g in zip(predicted, gold))
        total += len(gold)
    return correct / total


# Person descriptions differ from web text: colour words and a few verbs are
# ambiguous in EWT ("red" is read as the past tense of "read", "wears" as a
# plural noun) but not in captions. These words get a fixed tag through the
# tagger's own tag dictionary (the mechanism it uses for unambiguous frequent
# words). Colours are tagged JJ; a colour used as a noun ("dressed in red")
# would be NN, which pruning keeps all the same.
CAPTION_LEXICON = {
    **dict.fromkeys(
        "black white red blue green yellow orange purple pink brown grey gray beige navy maroon "
        "khaki blonde blond silver golden tan violet turquoise burgundy crimson dark light pale bright "
        "long short curly wavy bald".split(),
        "JJ",
    ),
    "wears": "VBZ", "carries": "VBZ", "holds": "VBZ", "wear": "VBP",
}


def compact(weights: dict, digits: int) -> dict:
    """Round the averaged weights and drop the ones that round to zero (smaller file, same tags)."""
    out = {}
    for feature, per_class in weights.items():
        kept = {c: round(w, digits) for c, w in per_class.items() if round(w, digits) != 0}
        if kept:
            out[feature] = kept
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ewt", type=Path, default=DEFAULT_EWT)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits", type=int, default=3, help="decimal digits kept per weight")
    args = parser.parse_args()

    from nltk.tag.perceptron import PerceptronTagger

    train = read_conllu(args.ewt / "en_ewt-ud-train.conllu")
    dev = read_conllu(args.ewt / "en_ewt-ud-dev.conllu")
    test = read_conllu(args.ewt / "en_ewt-ud-test.conllu")
    print(f"EWT sentences: train {len(train)}, dev {len(dev)}, test {len(test)}")

    random.seed(args.seed)  # nltk shuffles the training sentences with `random`
    tagger = PerceptronTagger(load=False)
    start = time.perf_counter()
    tagger.train(train, nr_iter=args.iterations)
    print(f"trained {args.iterations} iterations in {time.perf_counter() - start:.0f} s")

    weights, tagdict, classes = tagger.encode_json_obj()
    tagger.model.weights = compact(weights, args.digits)
    for word, tag in CAPTION_LEXICON.items():
        tagdict[word] = tagdict[word.capitalize()] = tag
    print(f"dev token accuracy:  {100 * accuracy(tagger, dev):.2f}%")
    print(f"test token accuracy: {100 * accuracy(tagger, test):.2f}%")

    blob = {
        "source": "nltk PerceptronTagger trained on UD English EWT train (CC BY-SA 4.0) by tools/train_pos_tagger.py",
        "weights": tagger.model.weights,
        "tagdict": tagdict,
        "classes": sorted(classes),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(args.out, "wb", mtime=0) as f:
        f.write(json.dumps(blob, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
