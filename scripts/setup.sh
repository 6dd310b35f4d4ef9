#!/usr/bin/env bash
# Create .venv (if missing) and install ortho-lora-dist with the CPU build of torch.
# Usage: bash scripts/setup.sh [extra ...]     e.g. bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build (GPU users: see README).
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || "${PIP[@]}" install torch==2.13.0
extras=$(IFS=,; echo "${*:-}")
"${PIP[@]}" install -e ".${extras:+[$extras]}"
