"""Caption pruning speed: captions/s for tagging + pruning 10,000 person descriptions.

The captions come from a template, so they repeat word windows more than real
benchmark captions do; the second line (nltk's tagger with no memo) is the
rate for captions that share nothing.

    python experiments/bench_pruning.py [--n 10000]
"""

import argparse
import random
import time

from tipr.data.pruning import load_pos_tagger, prune_captions, split_words

SUBJECTS = ["A woman", "The man", "A young girl", "An old man", "The pedestrian", "A boy"]
CLOTHES = ["a white shirt", "blue jeans", "a red T-shirt", "black shorts", "a long grey coat",
           "brown boots", "a pink dress", "a navy jacket", "khaki pants", "white sneakers"]
EXTRAS = ["with long black hair", "carrying a backpack", "holding an umbrella", "with glasses", "wearing a cap"]


def caption(rng: random.Random) -> str:
    worn = rng.sample(CLOTHES, 3)
    return f"{rng.choice(SUBJECTS)} {rng.choice(EXTRAS)} is wearing {worn[0]}, {worn[1]} and {worn[2]}. " \
           f"The person is {rng.choice(EXTRAS)}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    rng = random.Random(0)
    captions = [caption(rng) for _ in range(args.n)]
    tagger = load_pos_tagger()  # loading the model (about 0.5 s) is not part of the rate
    start = time.perf_counter()
    prune_captions(captions)
    elapsed = time.perf_counter() - start
    words = sum(len(c.split()) for c in captions) / len(captions)
    print(f"prune_captions: {args.n} captions ({words:.1f} words each) in {elapsed:.2f} s: "
          f"{args.n / elapsed:.0f} captions/s")
    # Worst case, no repeated word windows: nltk's own tag() caption by caption.
    start = time.perf_counter()
    for c in captions:
        tagger.tag(split_words(c))
    elapsed = time.perf_counter() - start
    print(f"plain nltk tag() per caption: {args.n / elapsed:.0f} captions/s")


if __name__ == "__main__":
    main()
