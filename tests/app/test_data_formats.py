"""Bring-your-own data: every source format, chat / alpaca records, validation_fraction, task sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ortho_lora_dist.config import ConfigError, TaskConfig, validate_config
from ortho_lora_dist.data.loading import DataError, Records, load_task
from ortho_lora_dist.data.prompts import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from ortho_lora_dist.data.sampling import MultiTaskSampler, TaskStream, task_probabilities

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
ROWS = [{"text": f"good movie {i}", "label": ["pos", "neg", "mid"][i % 3], "extra": i} for i in range(12)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama whose word-level tokenizer has a small chat template (and a copy without one)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.models import save_word_tokenizer

    root = tmp_path_factory.mktemp("chatllama")
    n = save_word_tokenizer(root / "plain", "llama")
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).save_pretrained(root / "plain")
    import shutil

    shutil.copytree(root / "plain", root / "chat")
    tok = AutoTokenizer.from_pretrained(root / "chat")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root / "chat")
    return {"chat": str(root / "chat"), "plain": str(root / "plain")}


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- sources -----------------------------------------------------------------------------------------------------
def test_every_source_format_loads_the_same_records(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    files = {"jsonl": _jsonl(tmp_path / "a.jsonl", ROWS), "json-lines": _jsonl(tmp_path / "b.json", ROWS)}
    (tmp_path / "c.json").write_text(json.dumps(ROWS, indent=1))
    files["json-array"] = str(tmp_path / "c.json")
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_csv(str(tmp_path / "e.tsv"), index=False, sep="\t")
    ds.to_parquet(str(tmp_path / "f.parquet"))
    ds.save_to_disk(str(tmp_path / "g"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(str(tmp_path / "h"))
    files.update(
        csv=str(tmp_path / "d.csv"),
        tsv=str(tmp_path / "e.tsv"),
        parquet=str(tmp_path / "f.parquet"),
        disk=str(tmp_path / "g"),
        diskdict=str(tmp_path / "h"),
    )
    want = [{"text": r["text"], "label": ["mid", "neg", "pos"].index(r["label"])} for r in ROWS]
    for kind, f in files.items():
        data = load_task(TaskConfig(name="t", files={"train": f}))
        train = data.splits["train"]
        assert isinstance(train, Records) and not isinstance(train, list), kind
        assert data.labels == ["mid", "neg", "pos"], kind
        assert list(train) == want and [train[i] for i in range(len(train))] == want and train[-1] == want[-1], kind
        assert train.column("label") == [w["label"] for w in want], kind
    # a DatasetDict folder gives the split of the configured name; the local save_to_disk folder works as 'dataset'
    data = load_task(TaskConfig(name="t", dataset=str(tmp_path / "h")))
    assert len(data.splits["train"]) == 12 and len(data.splits["validation"]) == 3
    assert (
        len(load_task(TaskConfig(name="t", files={"train": files["parquet"]}, max_train_samples=5)).splits["train"])
        == 5
    )


def test_table_sources_name_the_row(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "a", "label": "x"}, {"text": None, "label": "y"}]).to_parquet(
        str(tmp_path / "p.parquet")
    )
    with pytest.raises(DataError, match=r"p.parquet, row 2: field 'text' is null \(task 't'\)"):
        load_task(TaskConfig(name="t", files={"train": str(tmp_path / "p.parquet")}))
    (tmp_path / "r.csv").write_text("text,label\na,1.5\nb,oops\n")
    with pytest.raises(DataError, match=r"r.csv, row 2: regression label 'oops' is not a number"):
        load_task(TaskConfig(name="t", files={"train": str(tmp_path / "r.csv")}, type="regression", metric="pearson"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="is not JSONL, JSON, CSV/TSV, Parquet"):
        load_task(TaskConfig(name="t", files={"train": str(tmp_path / "x.txt")}))


def test_validation_fraction_is_deterministic_and_disjoint(tmp_path):
    f = _jsonl(tmp_path / "t.jsonl", [{"text": f"r{i}", "label": "ab"[i % 2]} for i in range(40)])

    def split(seed=0):
        d = load_task(TaskConfig(name="t", files={"train": f}, validation_fraction=0.25, validation_seed=seed))
        return d.splits["train"].column("text"), d.splits["validation"].column("text")

    train, val = split()
    assert len(val) == 10 and len(train) == 30 and not set(train) & set(val) and len(set(train) | set(val)) == 40
    assert split() == (train, val), "same seed, same split"
    assert split(1)[1] != val, "another seed, another split"
    assert val == sorted(val, key=lambda s: int(s[1:])), "file order kept"
    with pytest.raises(ValueError, match="either files.validation or validation_fraction"):
        TaskConfig(name="t", files={"train": f, "validation": f}, validation_fraction=0.1)
    with pytest.raises(ValueError, match="either eval_split or validation_fraction"):
        TaskConfig(name="t", dataset="x/y", eval_split="dev", validation_fraction=0.1)


# -- chat and alpaca records ---------------------------------------------------------------------------------------
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "good movie"},
            {"role": "assistant", "content": "the plot"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "bad film"},
            {"role": "assistant", "content": "a scene"},
            {"role": "user", "content": "and"},
            {"role": "assistant", "content": "the actor was great"},
        ]
    },
]
ALPACA = [
    {"instruction": "good movie", "input": "the plot", "output": "great"},
    {"instruction": "bad film", "output": "poor"},
]


def test_chat_and_alpaca_records_are_checked(tmp_path):
    data = load_task(TaskConfig(name="c", files={"train": _jsonl(tmp_path / "c.jsonl", CHAT)}, format="chat"))
    assert data.config.type == "generation" and data.config.metric == "loss"  # open answers: evaluated by loss
    assert data.splits["train"][1] == {"messages": CHAT[1]["messages"][:-1], "label": "the actor was great"}
    bad = [
        ({"messages": "hi"}, r"line 2: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"line 2: messages\[0\].content is missing"),
        ({"messages": [{"role": "user", "content": 3}]}, r"line 2: messages\[0\].content must be a string, got int"),
        (
            {"messages": [{"role": "user", "content": "x"}]},
            r"line 2: the last message of 'messages' must be the assistant's",
        ),
        ({"conversation": []}, r"line 2: field 'messages' is missing \(task 'c'\)"),
    ]
    for row, msg in bad:
        f = _jsonl(tmp_path / "bad.jsonl", [CHAT[0], row])
        with pytest.raises(DataError, match=r"bad.jsonl, " + msg):
            load_task(TaskConfig(name="c", files={"train": f}, format="chat"))
    a = load_task(TaskConfig(name="a", files={"train": _jsonl(tmp_path / "a.jsonl", ALPACA)}, format="alpaca"))
    assert list(a.splits["train"]) == [
        {"instruction": "good movie", "input": "the plot", "label": "great"},
        {"instruction": "bad film", "input": "", "label": "poor"},
    ]
    f = _jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "a"}, {"answer": "b"}])
    with pytest.raises(DataError, match=r"m.jsonl, line 2: field 'question' is missing"):
        load_task(
            TaskConfig(
                name="a", files={"train": f}, format="alpaca", instruction_field="question", output_field="answer"
            )
        )
    with pytest.raises(ValueError, match="format 'alpaca' makes a generation task"):
        TaskConfig(name="a", files={"train": f}, format="alpaca", type="classification")
    with pytest.raises(ValueError, match=r"prompt uses \{text\}; format 'alpaca' fills \{input\}, \{instruction\}"):
        TaskConfig(name="a", files={"train": f}, format="alpaca", prompt="{text}")
    with pytest.raises(ValueError, match="remove 'prompt'"):
        TaskConfig(name="a", files={"train": f}, format="chat", prompt="{text}")


def _lm(llama, tasks_cfg, tmp_path, which="chat"):
    from ortho_lora_dist.data.loading import load_tasks
    from ortho_lora_dist.models.build import build_model
    from ortho_lora_dist.models.loading import load_tokenizer

    cfg = validate_config(
        {
            "model": {"name_or_path": llama[which], "kind": "causal-lm", "max_length": 64},
            "lora": {"r": 2, "target_modules": "all-linear"},
            "tasks": tasks_cfg,
            "output_dir": str(tmp_path / "run"),
        }
    )
    tasks = load_tasks(cfg.tasks)
    tok = load_tokenizer(cfg.model)
    return build_model(cfg, tasks, tok), tasks, tok


def _ids(out) -> list[int]:
    return out["input_ids"] if not isinstance(out, list) else out


@pytest.mark.parametrize("turns", ["last", "all"])
def test_chat_prompt_is_the_chat_template_and_labels_mask_it(llama, tmp_path, turns):
    """turns last: the loss on exactly the answer turn; all (the default): on every assistant turn, each span being
    what the template writes for that turn (its rendering up to the turn minus its rendering before it)."""
    f = _jsonl(tmp_path / "c.jsonl", CHAT)
    for on_inputs in (False, True):
        task = {
            "name": "c",
            "files": {"train": f},
            "format": "chat",
            "train_on_inputs": on_inputs,
            "train_turns": turns,
        }
        model, tasks, tok = _lm(llama, [task], tmp_path)
        records = [tasks[0].splits["train"][i] for i in range(2)]
        batch = model.collate(records, [0, 0])
        for row, r in enumerate(records):
            want = tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True)
            want = want["input_ids"] if not isinstance(want, list) else want
            assert tok(model.prompts.prompt(0, r))["input_ids"] == want, (
                "the prompt is apply_chat_template's, BOS not doubled"
            )
            full = tok.apply_chat_template(
                [*r["messages"], {"role": "assistant", "content": r["label"]}], tokenize=True
            )
            full = full["input_ids"] if not isinstance(full, list) else full
            n = int(batch["attention_mask"][row].sum())
            ids, labels = batch["input_ids"][row, :n].tolist(), batch["labels"][row, :n].tolist()
            assert ids == full, "prompt + answer turn = the whole conversation through the template"
            answer = tok(r["label"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            if on_inputs:
                assert labels == ids
                continue
            prompt_labels = [-100] * len(want)
            for j, m in enumerate(r["messages"]):
                if turns == "all" and m["role"] == "assistant":
                    before = _ids(tok.apply_chat_template(r["messages"][:j], add_generation_prompt=True, tokenize=True))
                    through = _ids(tok.apply_chat_template(r["messages"][: j + 1], tokenize=True))
                    prompt_labels[len(before) : len(through)] = ids[len(before) : len(through)]
            assert labels == prompt_labels + answer, "loss on exactly the assistant turns asked for"
            if turns == "all" and row == 1:
                assert labels[: len(want)] != [-100] * len(want), "the earlier assistant turn is trained on"
            assert (batch["labels"][row, n:] == -100).all()
    with pytest.raises(DataError, match=r"task 'c' \(tasks.0.format: chat\): the tokenizer of .* has no chat template"):
        _lm(llama, [{"name": "c", "files": {"train": f}, "format": "chat"}], tmp_path, which="plain")


def test_alpaca_prompt_and_custom_fields(llama, tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", ALPACA)
    model, tasks, tok = _lm(
        llama,
        [
            {"name": "a", "files": {"train": f}, "format": "alpaca"},
            {"name": "b", "files": {"train": f}, "format": "alpaca", "prompt": "do {instruction} with {input}:"},
        ],
        tmp_path,
    )
    r0, r1 = tasks[0].splits["train"][0], tasks[0].splits["train"][1]
    assert model.prompts.prompt(0, r0) == ALPACA_PROMPT.format(instruction="good movie", input="the plot")
    assert model.prompts.prompt(0, r1) == ALPACA_PROMPT_NO_INPUT.format(instruction="bad film")
    assert model.prompts.prompt(1, r0) == "do good movie with the plot:"
    batch = model.collate([r0], [1])
    n_prompt = len(tok("do good movie with the plot:")["input_ids"])
    assert batch["labels"][0].tolist() == [-100] * n_prompt + tok("great", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]


# -- task sampling -------------------------------------------------------------------------------------------------
def _old_equal(sizes, batch, seed, rank, world, steps):
    """The sampler before task_sampling existed (batching.py at 5904792), kept here as the reference."""
    streams = [TaskStream(n, seed, t) for t, n in enumerate(sizes)]
    out = []
    for _ in range(steps):
        mb = []
        for t, s in enumerate(streams):
            idx = s.take(batch * world)
            mb += [(t, i) for i in idx[rank * batch : (rank + 1) * batch]]
        out.append(mb)
    return out


def test_equal_sampling_is_unchanged():
    sizes = [7, 20, 3]
    for rank, world in ((0, 1), (1, 2)):
        s = MultiTaskSampler(sizes, 4, 5, rank, world)
        assert [s.next() for _ in range(12)] == _old_equal(sizes, 4, 5, rank, world, 12)
        assert "draws" not in s.state_dict()
    s = MultiTaskSampler(sizes, 4, 5)
    # hard numbers from the sampler at 5904792 (torch.randperm streams)
    assert s.next() == [
        (0, 4),
        (0, 3),
        (0, 6),
        (0, 1),
        (1, 10),
        (1, 12),
        (1, 18),
        (1, 0),
        (2, 1),
        (2, 2),
        (2, 0),
        (2, 1),
    ]
    assert s.steps_per_epoch(1) == 5 and s.steps_per_epoch(2) == 3


def test_temperature_sampling_frequencies_ranks_and_resume():
    sizes, batch = [900, 100, 4], 3
    p = task_probabilities(sizes, "temperature", 2.0)
    assert p == pytest.approx([30 / 42.0, 10 / 42.0, 2 / 42.0])
    assert task_probabilities(sizes, "proportional") == pytest.approx([n / 1004 for n in sizes])
    s = MultiTaskSampler(sizes, batch, 0, mode="temperature", temperature=2.0)
    counts = torch.tensor([s.allocation(d) for d in range(3000)], dtype=torch.float64)
    assert (counts.sum(1) == batch * 3).all()
    assert (counts.mean(0) / (batch * 3)).tolist() == pytest.approx(p, abs=0.01)
    assert bool((counts[:, 2] == 0).any()), "a small task may be absent from a micro-batch"
    assert s.steps_per_epoch(1) == 112 and s.steps_per_epoch(4) == 28  # ceil(1004 / (3 * 3 * accum))
    # two ranks: the same allocation, each its share; together the tasks' next k * world indices
    ranks = [MultiTaskSampler(sizes, batch, 0, r, 2, mode="temperature") for r in range(2)]
    streams = [TaskStream(n, 0, t) for t, n in enumerate(sizes)]
    for d in range(20):
        parts = [r.next() for r in ranks]
        k = s.allocation(d)
        for t in range(3):
            mine = [[i for tt, i in part if tt == t] for part in parts]
            assert [len(m) for m in mine] == [k[t], k[t]]
            assert mine[0] + mine[1] == streams[t].take(2 * k[t])
        assert [t for t, _ in parts[0]] == sorted(t for t, _ in parts[0]), "grouped by task"
    # resume: the state (JSON) continues exactly
    a = MultiTaskSampler(sizes, batch, 3, mode="proportional")
    for _ in range(7):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))
    b = MultiTaskSampler(sizes, batch, 3, mode="proportional")
    b.load_state_dict(state)
    assert [a.next() for _ in range(9)] == [b.next() for _ in range(9)]


def test_resume_on_another_world_size_with_drawn_shares():
    """Drawn task shares resume on another number of ranks when the global batch stays (the samples from there on
    differ from an uninterrupted run's, which the run logs); a changed global batch is refused as for equal."""
    from ortho_lora_dist.training.resume import ResumeMismatch, check_resume

    cfg = {"tasks": [{"name": "a"}], "train": {"per_task_batch_size": 4, "task_sampling": "temperature"}}
    check_resume(cfg, cfg, 2, 2, "ckpt")
    check_resume(cfg, {**cfg, "train": {**cfg["train"], "per_task_batch_size": 8}}, 2, 1, "ckpt")
    with pytest.raises(ResumeMismatch, match="global batch per task would change from 8"):
        check_resume(cfg, cfg, 2, 1, "ckpt")


# -- end to end ----------------------------------------------------------------------------------------------------
def test_train_chat_task_with_temperature_sampling_then_predict(llama, tmp_path, capsys):
    from ortho_lora_dist.cli import main as cli

    words = "good great fine nice bad awful poor movie film plot".split()
    chat = [
        {
            "messages": [
                {"role": "user", "content": f"{words[i % 10]} {words[(i * 3) % 10]}"},
                {"role": "assistant", "content": words[(i * 7) % 10]},
            ]
        }
        for i in range(30)
    ]
    text = [{"text": f"{words[i % 10]} movie", "label": "pos" if i % 10 < 4 else "neg"} for i in range(12)]
    cfg = {
        "model": {"name_or_path": llama["chat"], "kind": "causal-lm", "max_length": 32},
        "lora": {"r": 2, "target_modules": "all-linear"},
        "tasks": [
            {
                "name": "chat",
                "files": {"train": _jsonl(tmp_path / "chat.jsonl", chat)},
                "format": "chat",
                "validation_fraction": 0.2,
                "generation": {"max_new_tokens": 3},
            },
            {
                "name": "senti",
                "files": {"train": _jsonl(tmp_path / "t.jsonl", text)},
                "prompt": "{text}:",
                "label_words": {"pos": " good", "neg": " bad"},
                "validation_fraction": 0.25,
            },
        ],
        "train": {
            "steps": 3,
            "per_task_batch_size": 2,
            "task_sampling": "temperature",
            "temperature": 2.0,
            "log_every": 1,
            "plots": False,
            "lr": 1e-3,
        },
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(path)]) == 0, capsys.readouterr().err[-2000:]
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [s["step"] for s in steps] == [1, 2, 3]
    meta = json.loads((tmp_path / "run" / "adapter" / "tasks.json").read_text())
    assert [t["format"] for t in meta["tasks"]] == ["chat", "text"]
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["sampler"]["draws"] == 3
    # predict from the adapter alone: chat records carry messages
    inp = tmp_path / "in.jsonl"
    _jsonl(
        inp,
        [
            {"task": "chat", "messages": [{"role": "user", "content": "good film"}], "id": 1},
            {"task": "senti", "text": "bad movie"},
        ],
    )
    assert cli(["predict", str(tmp_path / "run"), "--input", str(inp), "--output", str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out[0]["id"] == 1 and isinstance(out[0]["prediction"], str) and out[1]["prediction"] in ("pos", "neg")
    _jsonl(inp, [{"task": "chat", "text": "hello"}])
    assert cli(["predict", str(tmp_path / "run"), "--input", str(inp), "--output", str(tmp_path / "o2.jsonl")]) == 2
    assert "in.jsonl, line 1: 'messages' must be a non-empty list" in capsys.readouterr().err


def test_config_errors_for_new_keys(tmp_path):
    base = {"model": {"name_or_path": "x"}, "tasks": [{"name": "a", "files": {"train": "f.jsonl"}}]}
    with pytest.raises(ConfigError, match="task_sampling"):
        validate_config({**base, "train": {"task_sampling": "random"}})
    with pytest.raises(ConfigError, match="temperature"):
        validate_config({**base, "train": {"temperature": 0}})
    with pytest.raises(ConfigError, match="validation_fraction"):
        validate_config({**base, "tasks": [{"name": "a", "files": {"train": "f"}, "validation_fraction": 1.5}]})


def test_bad_records_skipped_when_asked_and_counted(tmp_path, caplog):
    import logging

    rows = [ROWS[0], {"text": "no label here"}, ROWS[1], {"label": "pos"}]
    f = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: field 'label' is missing"):
        load_task(TaskConfig(name="t", files={"train": f}))
    with caplog.at_level(logging.WARNING, logger="ortho_lora_dist"):
        data = load_task(TaskConfig(name="t", files={"train": f}, on_bad_record="skip"))
    assert len(data.splits["train"]) == 2
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert warned == [
        "task 't': skipped 2 bad records (on_bad_record: skip); the first: "
        f"{f}, line 2: field 'label' is missing (task 't')"
    ]


def test_a_dataset_without_a_validation_split(tmp_path):
    """A dataset folder (read by datasets.load_dataset, as a Hub id is) that has only a train split: the default
    eval_split is refused naming the split and the ways out; eval_split: null trains without evaluation."""
    folder = tmp_path / "ds"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", ROWS)
    with pytest.raises(DataError, match=r"dataset .*ds has no split 'validation'.*eval_split: null"):
        load_task(TaskConfig(name="t", dataset=str(folder)))
    data = load_task(TaskConfig(name="t", dataset=str(folder), eval_split=None))
    assert list(data.splits) == ["train"] and len(data.splits["train"]) == len(ROWS)
