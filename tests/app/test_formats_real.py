"""The record formats on a REAL tokenizer and chat template (SmolLM2-135M-Instruct, ChatML, from its packaged GGUF):
multi-turn chat trains on every assistant turn (each labelled span decodes to that turn's content and end-of-turn),
ShareGPT reads as the same chat, TRL's prompt-completion trains on the completion, raw documents on every token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ortho_lora_dist.config import validate_config
from ortho_lora_dist.data.loading import load_tasks
from ortho_lora_dist.models.encoding import CausalEncoding
from ortho_lora_dist.models.loading import load_tokenizer
from tests.app.test_smollm2 import smol  # noqa: F401 (the fixture)

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And doubled, in words?"},
    {"role": "assistant", "content": "Ten, since 5 times 2 is 10."},
]
SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def encoding(smol, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("formats")
    conv = [{"from": SHAREGPT[m["role"]], "value": m["content"]} for m in CONVERSATION]
    tasks = [
        {"name": "chat", "files": {"train": _write(root / "c.jsonl", [{"messages": CONVERSATION}])}, "format": "chat"},
        {
            "name": "last",
            "files": {"train": _write(root / "c2.jsonl", [{"messages": CONVERSATION}])},
            "format": "chat",
            "train_turns": "last",
        },
        {
            "name": "share",
            "files": {"train": _write(root / "s.jsonl", [{"conversations": conv}])},
            "format": "sharegpt",
        },
        {
            "name": "pc",
            "files": {"train": _write(root / "p.jsonl", [{"prompt": "Q: 2+3=", "completion": " 5"}])},
            "format": "prompt_completion",
        },
        {
            "name": "raw",
            "files": {"train": _write(root / "r.jsonl", [{"text": "Plain text to continue."}])},
            "format": "raw",
        },
    ]
    cfg = validate_config(
        {"model": {"name_or_path": str(smol["model"]), "kind": "causal-lm"}, "tasks": tasks, "output_dir": str(root)}
    )
    loaded = load_tasks(cfg.tasks)
    return CausalEncoding(load_tokenizer(cfg.model), loaded, cfg.model.max_length), loaded


def _labelled_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for x, y in zip(ids, labels):
        if y != -100:
            current.append(x)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def _row(encoding, task: int):
    enc, tasks = encoding
    batch = enc.collate([tasks[task].splits["train"][0]], [task])
    n = int(batch["attention_mask"][0].sum())
    return batch["input_ids"][0, :n].tolist(), batch["labels"][0, :n].tolist()


def test_multi_turn_chat_trains_on_every_assistant_turn(encoding):
    enc, _ = encoding
    tok = enc.tokenizer
    ids, labels = _row(encoding, 0)
    whole = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(ids) == whole, "the row is the chat template's rendering of the whole conversation"
    spans = [tok.decode(s) for s in _labelled_spans(ids, labels)]
    assert spans == ["5<|im_end|>\n", "Ten, since 5 times 2 is 10.<|im_end|>\n"]
    ids_last, labels_last = _row(encoding, 1)
    assert ids_last == ids and [tok.decode(s) for s in _labelled_spans(ids_last, labels_last)] == spans[1:]


def test_sharegpt_reads_as_the_same_chat(encoding):
    assert _row(encoding, 2) == _row(encoding, 0)


def test_prompt_completion_and_raw(encoding):
    enc, _ = encoding
    tok = enc.tokenizer
    ids, labels = _row(encoding, 3)
    assert tok.decode(ids) == "Q: 2+3= 5" + tok.eos_token
    assert tok.decode(_labelled_spans(ids, labels)[0]) == " 5" + tok.eos_token
    ids, labels = _row(encoding, 4)
    assert tok.decode(ids) == "Plain text to continue." + tok.eos_token
    assert all(y != -100 for y in labels) and labels == ids


@pytest.mark.parametrize("max_length", [2048, 24])  # 24: every chat row cut (prompt's end, answer's head)
def test_rows_tokenised_once_at_preparation_equal_the_rows_tokenised_in_the_loop(encoding, max_length):
    """with_tokens (what rank 0 writes into the data cache) gives the training loop the very rows it would have
    tokenised itself, padded and packed, every format, cut or not; the records carry them."""
    import torch

    enc, tasks = encoding
    enc = CausalEncoding(enc.tokenizer, tasks, max_length)
    records = [tasks[t].splits["train"][0] for t in range(len(tasks))]
    prepared = [enc.with_tokens(t, tasks[t].splits["train"])[0] for t in range(len(tasks))]
    assert all("_input_ids" in r and "_labels" in r for r in prepared) and not any("_input_ids" in r for r in records)
    ids = list(range(len(tasks)))
    lengths = [enc.sample_lengths(t, tasks[t].splits["train"])[0] for t in ids]
    assert [r["_length"] for r in prepared] == lengths and (max(lengths) > max_length) == (max_length == 24)
    for collate in (enc.collate, enc.collate_packed):
        want, got = collate(records, ids), collate(prepared, ids)
        for k, v in want.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(got[k], v), (collate.__name__, k)
    fake = dict(prepared[0], _input_ids=[5, 6, 7], _labels=[-100, 6, 7])  # the loop reads the ids, tokenises nothing
    assert enc.collate([fake], [0])["input_ids"].tolist() == [[5, 6, 7]]
