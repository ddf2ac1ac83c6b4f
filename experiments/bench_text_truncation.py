"""Query latency of ``encode_text``: run to the batch's last end-of-text (tipr) vs all 77 positions.

CLIP's text attention is causal, so both give the same features (to summation order,
tests/test_model_network.py); the truncated run is what ``tipr search`` and the
notebook API pay per query. ViT-B/16's text tower (12 layers, width 512), random weights.

    python experiments/bench_text_truncation.py            # one query, and a batch of 50
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tipr.methods.sen import SENModel
from tipr.tokenization import tokenize

TEXT_TOWER = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
              "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
               "patch_size": 16, "image_size": 224}
QUERY = "a woman in a white blouse and blue jeans carrying a black backpack"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = {"text_config": TEXT_TOWER, "vision_config": TINY_VISION, "projection_dim": 512}
    model = SENModel.from_backbone(backbone, num_classes=1, image_size=(224, 224), text_length=77).eval()
    for batch in (1, 50):
        ids = tokenize([QUERY] * batch, context_length=77)
        with torch.inference_mode():
            truncated = median_ms(lambda: model.encode_text(ids), args.repeats)
            full = median_ms(lambda: model.pooled(*model.text_tokens(ids)), args.repeats)
        tokens = int((ids[0] == model.eot_token_id).nonzero()[0]) + 1
        print(f"batch {batch:3d} ({tokens} of 77 positions): full context {full:7.1f} ms, to the last end-of-text "
              f"{truncated:7.1f} ms, {full / truncated:.1f}x faster ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
