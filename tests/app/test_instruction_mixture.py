"""The run the workflow issue describes, end to end on CPU: five instruction tasks of unequal sizes in five formats
(multi-turn chat, ShareGPT, alpaca, prompt-completion, raw text) with the defaults (joint, all-linear LoRA), one
task with answers longer than max_length. It logs its epoch plan and truncation counts before training, evaluates
by loss (nothing generated), and a run checkpointed on 2 ranks resumes on 1 process equal to an uninterrupted run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ortho_lora_dist.cli import main as cli
from tests.app.test_data_formats import _jsonl, llama  # noqa: F401 (the fixture)
from tests.core.test_engine_resume import torchrun

pytestmark = pytest.mark.slow
WORDS = "good bad movie film plot actor scene stock market bank trade goal match team player vote party the a".split()


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n))


def _tasks(root: Path) -> list[dict]:
    chat = [
        {
            "messages": [
                {"role": "user", "content": _text(i, 3)},
                {"role": "assistant", "content": _text(i + 1, 1 + i % 3)},
                {"role": "user", "content": _text(i + 2, 2)},
                {"role": "assistant", "content": _text(i, 2)},
            ]
        }
        for i in range(24)
    ]
    share = [
        {"conversations": [{"from": "human", "value": _text(i, 4)}, {"from": "gpt", "value": _text(i, 1 + i % 4)}]}
        for i in range(8)
    ]
    alpaca = [
        {"instruction": _text(i, 3), "input": _text(i + 3, i % 2), "output": _text(i + 5, 1 + i % 5)} for i in range(40)
    ]
    pc = [{"prompt": _text(i, 2), "completion": _text(i + 1, 30 if i % 4 == 0 else 2)} for i in range(12)]
    raw = [{"text": _text(i, 5 + i)} for i in range(6)]
    specs = [
        ("dialog", "chat", chat),
        ("hermes", "sharegpt", share),
        ("alpaca", "alpaca", alpaca),
        ("pc", "prompt_completion", pc),
        ("raw", "raw", raw),
    ]
    tasks = [
        {
            "name": name,
            "format": fmt,
            "files": {"train": _jsonl(root / f"{name}.jsonl", rows)},
            "validation_fraction": 0.25,
        }
        for name, fmt, rows in specs
    ]
    tasks[2]["prompt"] = "{instruction} {input} :"  # Alpaca's own template is longer than this tiny max_length
    return tasks


def _config(llama, tmp_path: Path, out: str, batch: int, steps: int) -> Path:  # noqa: F811
    cfg = {
        "model": {"name_or_path": llama["chat"], "kind": "causal-lm", "max_length": 24},
        "lora": {"r": 2},
        "tasks": _tasks(tmp_path),
        "train": {
            "steps": steps,
            "per_task_batch_size": batch,
            "lr": 1e-3,
            "checkpoint_every": 2,
            "plots": False,
            "schedule": "constant",
        },
        "output_dir": str(tmp_path / out),
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_five_task_instruction_mixture(llama, tmp_path, caplog):  # noqa: F811
    full = _config(llama, tmp_path, "full", batch=2, steps=4)
    with caplog.at_level(logging.INFO, logger="ortho_lora_dist"):
        assert cli(["train", str(full)]) == 0
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "epoch plan: 4 steps of 15 per epoch (equal sampling)" in said  # 15: the largest task, 30, by 2
    assert "raw: 4 samples, 8 seen = 2.00 passes" in said and "alpaca: 30 samples, 8 seen = 0.27 passes" in said
    assert "task 'pc': 1 of 9 training samples over 24 tokens (model.max_length): dropped" in said
    run = tmp_path / "full"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["strategy"] == "joint" and saved["lora"]["target_modules"] == "all-linear"
    ev = json.loads((run / "eval.json").read_text())
    assert "validation" not in ev  # no task has a metric (all evaluated by loss): only loss and perplexity
    assert set(ev["loss"]["validation"]) == {"dialog", "hermes", "alpaca", "pc", "raw"}
    assert all(v is not None and v > 0 for v in ev["loss"]["validation"].values())

    cut = _config(llama, tmp_path, "cut", batch=1, steps=2)  # 2 ranks x 1 == 1 process x 2, then resume on 1
    torchrun(["train", str(cut)], tmp_path / "cut.log")
    assert cli(["train", str(cut), "--resume", "train.steps=4", "train.per_task_batch_size=2"]) == 0
    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
