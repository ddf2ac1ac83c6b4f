"""Build the Hugging Face CLIP tokenizer files shipped in ``src/tipr/assets/clip_bpe``.

Reads ``../shared/data/clip-bpe/bpe_simple_vocab_16e6.txt.gz`` (the CLIP byte-pair
merge list, MIT licence, as shipped by OpenAI CLIP and open_clip) and writes the
``vocab.json`` + ``merges.txt`` pair that ``transformers.CLIPTokenizer`` reads.
The vocabulary is laid out exactly as OpenAI's ``SimpleTokenizer`` builds it:
the 256 byte symbols, the same with an end-of-word marker, the 48,894 merges,
then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

This script is the only place that reads ``../shared``; the library and the
tests only read the generated files.

    python tools/build_clip_tokenizer.py [--bpe PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BPE = ROOT.parent / "shared" / "data" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_OUT = ROOT / "src" / "tipr" / "assets" / "clip_bpe"
EXPECTED_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build(bpe_path: Path, out_dir: Path) -> dict[str, int]:
    raw = bpe_path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != EXPECTED_SHA256:
        raise ValueError(f"{bpe_path}: sha256 {digest} differs from the CLIP merge list {EXPECTED_SHA256}")
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {token: i for i, token in enumerate(vocab)}
    if len(encoder) != 49408:
        raise AssertionError(f"expected 49408 distinct tokens, got {len(encoder)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpe", type=Path, default=DEFAULT_BPE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    encoder = build(args.bpe, args.out)
    print(f"wrote {len(encoder)} tokens to {args.out}/vocab.json and merges.txt")


if __name__ == "__main__":
    main()
