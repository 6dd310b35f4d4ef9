#!/usr/bin/env bash
# The generative study: SmolLM2-135M-Instruct (converted from its PyPI GGUF) with one LoRA adapter on the LLM demo's
# four reasoning-gym chat tasks (configs/demo_llm.yaml: one epoch = 64 steps of 4 x 4 samples), exact match on
# greedy generation; rows zero_shot, single, joint, ortho, norm_balance (global), imtl_g (global), FAMO; 3 seeds,
# paired against joint, validation every 16 steps for time to accuracy; packed rows (train.packing, exact, ~1.5x
# faster here). About 47 minutes per seed on 2 cores (2 h 17 min for 3 seeds, 2026-12-01); resumable
# (finished runs are skipped, a stopped run resumes from its last checkpoint): run it again after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OL=.venv/bin/ortho-lora
bash scripts/prepare_data.sh llm   # .venv, the GGUF package, the converted model and tasks (once)
METHODS=${METHODS:-zero_shot,single,joint,ortho-factor,norm_balance-global,imtl_g-global,famo-global}
$OL compare configs/demo_llm.yaml train.packing=true train.checkpoint_every=16 train.report_to=[] \
  --seeds "${SEEDS:-3}" --methods "$METHODS" --eval-every "${EVAL_EVERY:-16}" --out "${OUT:-runs/generative}"
