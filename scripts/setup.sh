#!/usr/bin/env bash
# Create the virtualenv (if missing) and install ortho-lora-dist with the CPU build of torch and the TESTED versions
# of every dependency (constraints.txt, written by scripts/lock.sh). pyproject.toml keeps ranges for users.
# Usage: bash scripts/setup.sh [extra ...]     e.g. bash scripts/setup.sh test
# Environment: VENV (default .venv); ORTHO_LORA_LATEST=1 installs the newest releases the ranges admit instead
# (scripts/test_latest.sh), to see a drift before users do.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build (GPU users: see README).
"$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || "${PIP[@]}" install torch==2.13.0
if [ "${ORTHO_LORA_LATEST:-0}" = 1 ]; then
  versions=(--upgrade --upgrade-strategy eager)
else
  versions=(-c constraints.txt)
fi
extras=$(IFS=,; echo "${*:-}")
"${PIP[@]}" install "${versions[@]}" -e ".${extras:+[$extras]}"
