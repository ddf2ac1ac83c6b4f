#!/usr/bin/env bash
# The GPU check, one call on one CUDA GPU, about 6 to 9 minutes in all:
#   1. training samples/s and peak GPU memory of SEN with ViT-B/16-shaped random weights at
#      384x128, global batch 128, bf16-mixed, all SEN losses (SDM, ID, triplet, TIR), on the
#      synthetic benchmark written at 384x128 (the recipe of experiments/sen_base.yaml + sen_cuhk_pedes.yaml);
#   2. the same with the reference's precision (fp16 weights, --model.reference_fp16_weights);
#   3. the same for IRRA (experiments/irra_base.yaml + irra_cuhk_pedes.yaml: batch 64, SDM, ID, MLM),
#      bf16-mixed and the reference's fp16 weights;
#   4. evaluation time at ICFG-PEDES test size (19,848 x 19,848, 512-d) on the GPU;
#   5. indexing images/s and query latency of `tipr index` / `tipr search` with that model.
#
#   bash experiments/gpu_check.sh            # scratch files in a temporary folder, deleted at the end
#   TIPR_GPU_CHECK_DIR=/scratch bash experiments/gpu_check.sh   # keep (and reuse) the synthetic data there
#
# Needs the project installed (pip install -e .). Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}")
PY

work=${TIPR_GPU_CHECK_DIR:-}
if [ -z "$work" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
workers=$(( $(nproc) > 8 ? 8 : $(nproc) ))

# OpenAI CLIP ViT-B/16's shapes, random weights: nothing to download.
vitb16='{"vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
  "num_attention_heads": 12, "patch_size": 16, "image_size": 224, "hidden_act": "quick_gelu"},
  "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
  "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
  "projection_dim": 512}'
common=(--model.backbone "$vitb16" --trainer.devices 1
        --data.dataset synthetic --data.root "$work/data" --data.synthetic.image_size "[384, 128]"
        --data.num_workers "$workers" --steps 30 --warmup 5)
sen=(--config experiments/sen_base.yaml --config experiments/sen_cuhk_pedes.yaml "${common[@]}")
irra=(--config experiments/irra_base.yaml --config experiments/irra_cuhk_pedes.yaml "${common[@]}")

echo "== 1. SEN training, bf16-mixed (tipr's default)"
python experiments/bench_training.py "${sen[@]}" --trainer.precision bf16-mixed

echo "== 2. SEN training, the reference's fp16 weights"
python experiments/bench_training.py "${sen[@]}" --trainer.precision 32-true --model.reference_fp16_weights true

echo "== 3. IRRA training, bf16-mixed and the reference's fp16 weights"
python experiments/bench_training.py "${irra[@]}" --trainer.precision bf16-mixed
python experiments/bench_training.py "${irra[@]}" --trainer.precision 32-true --model.reference_fp16_weights true

echo "== 4. evaluation at ICFG-PEDES test size"
python experiments/bench_metrics.py --methods tipr --device cuda --repeats 2

echo "== 5. indexing and search"
python experiments/bench_indexing.py --backbone "$vitb16" --image-size 384 128 --images 4000 --device cuda \
  --workers "$workers" --batch-size 256 --folder "$work/search-images"
