"""Open-ended chat / alpaca tasks are evaluated by their per-task loss by default (metric: loss): nothing is generated,
eval.json and the printed table hold the loss; a task that asks for exact_match is still generated and scored."""

from __future__ import annotations

import json

import yaml

from ortho_lora_dist.cli import main as cli
from tests.app.test_data_formats import _jsonl, llama  # noqa: F401 (the fixture)


def test_chat_task_is_evaluated_by_loss_and_generates_nothing(llama, tmp_path, monkeypatch, capsys):  # noqa: F811
    import ortho_lora_dist.models.causal_lm as causal_lm

    words = ["good", "bad", "movie", "film", "plot", "actor"]
    chat = [
        {
            "messages": [
                {"role": "user", "content": f"{words[i % 6]} {words[(i + 1) % 6]}"},
                {"role": "assistant", "content": " ".join(words[: 1 + i % 4])},
            ]
        }
        for i in range(16)
    ]
    tasks = [
        {
            "name": "open",
            "files": {"train": _jsonl(tmp_path / "a.jsonl", chat)},
            "format": "chat",
            "validation_fraction": 0.25,
        },
        {
            "name": "checked",
            "files": {"train": _jsonl(tmp_path / "b.jsonl", chat)},
            "format": "chat",
            "metric": "exact_match",
            "validation_fraction": 0.25,
            "generation": {"max_new_tokens": 3},
        },
    ]
    cfg = {
        "model": {"name_or_path": llama["chat"], "kind": "causal-lm", "max_length": 32},
        "lora": {"r": 2},
        "tasks": tasks,
        "train": {"steps": 2, "per_task_batch_size": 2, "plots": False},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    generated: list[int] = []
    real = causal_lm.generate
    monkeypatch.setattr(
        causal_lm,
        "generate",
        lambda m, t, prompts, *a, **k: generated.append(len(prompts)) or real(m, t, prompts, *a, **k),
    )
    assert cli(["train", str(path)]) == 0
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(ev["validation"]) == {"checked", "average"}  # metrics: only the task that asked for one
    assert ev["loss"]["validation"]["open"] > 0 and ev["perplexity"]["validation"]["open"] > 1
    assert sum(generated) == 4  # the 4 validation records of 'checked' (no test split); none of 'open'
    out = capsys.readouterr().out
    assert "open" in out and "│ loss" in out and f"{ev['loss']['validation']['open']:.4f}" in out
