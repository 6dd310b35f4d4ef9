#!/usr/bin/env bash
# The whole suite against the NEWEST releases that pyproject.toml's ranges admit (not constraints.txt), in its own
# virtualenv .venv-latest: a new release that breaks us is seen here before a user meets it. When it passes,
# scripts/lock.sh records those versions as the tested ones. Prints the versions it ran with first.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=.venv-latest ORTHO_LORA_LATEST=1
bash scripts/setup.sh test
.venv-latest/bin/python -m pip --disable-pip-version-check list 2>/dev/null \
  | grep -iE '^(torch|transformers|peft|accelerate|datasets|deepspeed|bitsandbytes|torchjd|trl|kernels) '
exec bash scripts/test.sh "$@"
