#!/usr/bin/env bash
# One-command GPU check (at most 8 minutes on one H200): CUDA exactness of the one-backward capture against
# T backward passes (NF4 via bitsandbytes' CUDA kernels, bf16 autocast, reentrant checkpointing, mixed-task
# batches), then a Llama-2-7B-shaped QLoRA benchmark (random init, no download): tokens/s and peak memory of
# plain PEFT, joint, ortho, upgrad (global) and the T-backward reference, seq 1024/2048, T = 3/8.
#
#   bash scripts/gpu_check.sh                    # writes gpu_check.json, prints the same JSON on stdout
#   bash scripts/gpu_check.sh out.json --tiny    # tiny CPU path; further arguments go to bench/gpu_check.py
#
# Installs nothing. The machine must already have, in .venv/ (used if present) or the python3 on PATH:
#   torch with CUDA (>= 2.6), bitsandbytes (>= 0.46, CUDA build), this package and its dependencies
#   (`pip install -e '.[mtl]'`: transformers, peft, torchjd; the mtl extra brings quadprog for upgrad).
# No network access is needed (HF_HUB_OFFLINE=1; the models are built from configs).
# Exit status: that of the Python run (0: every exactness check passed and every method ran; 1: not so),
# 124 when the 480 s timeout hit (the JSON then holds what finished, with "complete": false).
set -uo pipefail
out=gpu_check.json
if [[ $# -gt 0 && $1 != -* ]]; then
    out=$1
    shift
fi
[[ $out = /* ]] || out="$PWD/$out"
cd "$(dirname "$0")/.." || exit 2
py=python3
[[ -x .venv/bin/python ]] && py=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rm -f "$out"
timeout -k 15 480 "$py" bench/gpu_check.py --out "$out" "$@"
rc=$?
if [[ $rc -ne 0 && $rc -ne 1 ]]; then  # killed (timeout, crash): no summary was printed; print what was written
    "$py" - "$out" "$rc" <<'EOF'
import json, sys

path, rc = sys.argv[1], int(sys.argv[2])
try:
    with open(path) as f:
        summary = json.load(f)
except (OSError, ValueError):
    summary = {"complete": False, "ok": False}
summary["ok"] = False
summary["error"] = {124: "timed out after 480 s", 137: "killed (SIGKILL: the 480 s timeout's -k, or out of host memory)"}.get(
    rc, f"the Python run died with exit status {rc}")
with open(path, "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary, indent=1))
EOF
fi
exit $rc
