"""bench/peers.py end to end on a tiny random Llama (word-level tokenizer, a small chat template) and generated chat
tasks named like the LLM demo's: every mode (TRL padding-free and packed, ortho-lora train joint and ortho,
MultiTaskSFTTrainer) runs in its own process and reports positive useful tokens/s and a peak RSS, so the
benchmark cannot rot unnoticed (the real measurement, on SmolLM2-135M-Instruct, is docs/results.md's)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_demo(root: Path, per_task: int) -> tuple[Path, list[str]]:
    """A tiny chat Llama in root/model and per_task chat records of each demo task in root/<task>/train.jsonl."""
    import torch
    import yaml
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.models import WORDS, save_word_tokenizer

    n = save_word_tokenizer(root / "model", "llama")
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).save_pretrained(root / "model")
    tok = AutoTokenizer.from_pretrained(root / "model")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root / "model")
    tasks = [t["name"] for t in yaml.safe_load((ROOT / "configs" / "demo_llm.yaml").read_text())["tasks"]]
    rng = random.Random(0)
    for t, task in enumerate(tasks):
        (root / task).mkdir()
        rows = []
        for _ in range(per_task):
            prompt = " ".join(rng.choices(WORDS, k=4 + 3 * t))
            answer = " ".join(rng.choices(WORDS, k=1 + t))
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        (root / task / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "model", tasks


@pytest.mark.slow
def test_every_mode_runs_and_reports(tmp_path):
    pytest.importorskip("trl")
    steps = 2
    model, tasks = tiny_demo(tmp_path, per_task=4 * steps)
    out = tmp_path / "peers.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "peers.py"), "--repeats", "1", "--steps", str(steps)]
    cmd += ["--data", str(tmp_path), "--model", str(model), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    doc = json.loads(out.read_text())
    from bench.peers import MODES

    assert set(doc["summary"]) == set(MODES)
    assert {r["mode"] for r in doc["runs"]} == set(MODES)
    for run in doc["runs"]:
        assert run["steps"] == steps and run["timed_steps"] == steps - 1, run
        assert run["labelled_tokens_per_s"] > 0 and run["samples_per_s"] > 0 and run["peak_rss_mb"] > 0, run
        assert run["trainable_params"] > 0, run
    # the same LoRA everywhere, and the same 16 samples a step where batches count samples
    assert len({r["trainable_params"] for r in doc["runs"]}) == 1
    assert all(r["samples_per_step"] == 16 for r in doc["runs"] if r["mode"] != "trl-packed")
    assert doc["summary"]["trl-padding-free"]["vs_trl_padding_free"] == 1.0
    assert "| ours-joint |" in doc["table"] and doc["machine"]["nproc"] >= 1
