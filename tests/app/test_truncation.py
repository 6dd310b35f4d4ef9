"""model.truncation: a causal-LM sample longer than model.max_length is dropped (default), cut (the prompt's end,
the answer's head) or refused at load, decided before training with one line per task; rows never exceed
max_length, padded or packed (before: the prompt was cut to ~1 token and the row ran past max_length; packed, a
bare ValueError ended the run at the first such sample)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from ortho_lora_dist.cli import main as cli
from ortho_lora_dist.config import load_config
from ortho_lora_dist.data.lengths import fit
from ortho_lora_dist.data.loading import load_tasks
from ortho_lora_dist.models.encoding import CausalEncoding
from ortho_lora_dist.models.loading import load_tokenizer
from tests.models import WORDS

MAX = 24


def test_fit_keeps_the_prompts_end_and_the_answers_head():
    assert fit(10, 5, MAX) == (10, 5)  # fits: untouched
    assert fit(30, 4, MAX) == (20, 4)  # a long prompt: cut from the left, the whole answer kept
    assert fit(6, 40, MAX) == (6, 18)  # a long answer, short prompt: the whole prompt, the answer's head
    assert fit(30, 40, MAX) == (12, 12)  # both long: half the row each
    for p in range(1, 60):
        for a in range(1, 60):
            kp, ka = fit(p, a, MAX)
            assert kp + ka == min(p + a, MAX) and 0 < kp <= p and 0 <= ka <= a


def _config(env, tmp_path: Path, **model) -> Path:
    """Task 'short' (answers of 1 word) and task 'long' whose every 4th answer is 30 words (over max_length 24)."""
    words = list(WORDS)
    files = {}
    for name in ("short", "long"):
        files[name] = {}
        for split, n in (("train", 16), ("validation", 4), ("test", 4)):
            rows = []
            for i in range(n):
                text = " ".join(words[(i + j) % len(words)] for j in range(6))
                k = 30 if name == "long" and i % 4 == 0 else 1 + i % 3
                rows.append({"text": text, "label": " ".join(words[(i + j) % len(words)] for j in range(k))})
            p = tmp_path / "data" / name / f"{split}.jsonl"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(json.dumps(r) + "\n" for r in rows))
            files[name][split] = str(p)
    cfg = {
        "model": {"name_or_path": env["models"]["llama"], "kind": "causal-lm", "max_length": MAX, **model},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "tasks": [
            {
                "name": n,
                "files": f,
                "type": "generation",
                "metric": "exact_match",
                "prompt": "text: {text} answer:",
                "max_eval_samples": 2,
            }
            for n, f in files.items()
        ],
        "train": {"steps": 2, "per_task_batch_size": 4, "plots": False},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("packing", [False, True])
def test_truncate_keeps_rows_within_max_length(env, tmp_path, packing):
    cfg = load_config(_config(env, tmp_path, truncation="truncate"))
    tasks = load_tasks(cfg.tasks)
    enc = CausalEncoding(load_tokenizer(cfg.model), tasks, MAX)
    records = [tasks[1].splits["train"][i] for i in range(4)]  # record 0: a 30-word answer
    lengths = enc.sample_lengths(1, tasks[1].splits["train"])
    assert lengths[0] > MAX and all(n <= MAX for n in lengths[1:4])
    batch = enc.collate_packed(records, [1] * 4) if packing else enc.collate(records, [1] * 4)
    assert batch["input_ids"].shape[1] <= MAX
    if not packing:
        row, labels = batch["attention_mask"][0], batch["labels"][0]
        assert int(row.sum()) == MAX
        prompt = int((labels[: int(row.sum())] == -100).sum())
        p_len = lengths[0] - len(enc.tokenizer(records[0]["label"], add_special_tokens=False)["input_ids"]) - 1
        assert prompt == min(p_len, MAX // 2) and prompt > 1  # the prompt survives


@pytest.mark.slow
def test_drop_is_the_default_and_is_announced(env, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ortho_lora_dist"):
        assert cli(["train", str(_config(env, tmp_path))]) == 0
    lines = [r.getMessage() for r in caplog.records if "training samples over" in r.getMessage()]
    assert lines == [
        "task 'long': 4 of 16 training samples over 24 tokens (model.max_length): dropped (model.truncation: drop)"
    ]


def test_error_refuses_before_anything_is_written(env, tmp_path, capsys):
    path = _config(env, tmp_path, truncation="error")
    assert cli(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "task 'long': 4 of 16 training samples over 24 tokens" in err and "record 0" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_task_left_empty_by_drop_is_refused(env, tmp_path, capsys):
    path = _config(env, tmp_path, max_length=6)
    assert cli(["train", str(path)]) == 2
    assert "would leave none" in capsys.readouterr().err
