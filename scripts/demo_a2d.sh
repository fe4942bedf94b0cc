#!/usr/bin/env bash
# The whole RND1 recipe in miniature, on CPU (~6 minutes on 2 cores):
#   1. AR-pretrain the debug MoE on the Python stdlib source (byte-level tokens);
#   2. SCP-convert that checkpoint into an A2D diffusion LM (bidirectional attention from step 0);
#   3. print a few diffusion samples from the converted model, and AR samples from the base.
# Usage: scripts/demo_a2d.sh [AR_STEPS] [SCP_STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
AR_STEPS=${1:-600}
SCP_STEPS=${2:-300}
OUT=${OUT:-outputs/demo}

echo "== 1/3 AR pretraining ($AR_STEPS steps)"
python -m rnd1.train --config train_configs/debug_ar.toml --job.dump_folder="$OUT/ar" \
  --training.steps="$AR_STEPS" --metrics.log_freq=50 --eval.interval=0 --job.print_config=false

echo "== 2/3 SCP conversion to A2D ($SCP_STEPS steps, from the AR checkpoint)"
python -m rnd1.train --config train_configs/debug_model.toml --job.dump_folder="$OUT/a2d" \
  --model.init=pretrained --checkpoint.initial_load_path="$OUT/ar/checkpoint" \
  --training.steps="$SCP_STEPS" --metrics.log_freq=50 --eval.interval=0 --job.print_config=false

echo "== 3/3 samples"
PROMPTS=(--prompt $'def __init__(self' --prompt $'import os\nimport sys\n' --prompt $'    for i in range(')
echo "-- diffusion (A2D, 64 tokens, 32 steps, blocks of 16, confidence, T=0.7)"
python scripts/generate.py --checkpoint "$OUT/a2d/checkpoint" --objective a2d "${PROMPTS[@]}" \
  --gen-length 64 --steps 32 --block-length 16 --temperature 0.7 --top-p 0.9 --seed 0
echo "-- the AR base, greedy, for comparison"
python scripts/generate.py --checkpoint "$OUT/ar/checkpoint" --objective ar "${PROMPTS[@]}" --gen-length 64
