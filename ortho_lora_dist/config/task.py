"""One entry of ``tasks``: where its data is, its format, how it is scored and decoded."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ortho_lora_dist.config.base import Strict
from ortho_lora_dist.data.formats import FORMAT_NAMES, get_format


class GenerationOptions(Strict):
    """Decoding of a generation task (greedy, batched with left padding; see generation.py)."""

    max_new_tokens: int = Field(32, gt=0, description="tokens generated at most per answer")
    stop: list[str] = Field(default_factory=list, description="the answer ends before the first of these strings")


class TaskConfig(Strict):
    name: str
    """the task's name (unique): in logs, eval.json, the adapter and predict's input"""
    dataset: str | None = Field(None, description="HF dataset id (loaded with datasets.load_dataset)")
    dataset_config: str | None = None
    """the dataset's configuration name (e.g. main for openai/gsm8k)"""
    files: dict[Literal["train", "validation", "test"], str] | None = Field(
        None, description="local files: JSONL, JSON array (.json), CSV/TSV, Parquet, or a save_to_disk folder"
    )
    train_split: str = "train"
    """the dataset's training split"""
    eval_split: str | None = Field(
        "validation", description="the dataset's validation split (null: none; or validation_fraction)"
    )
    test_split: str | None = None
    """the dataset's test split (null: none); tables report test, choices use validation"""
    on_bad_record: Literal["error", "skip"] = Field(
        "error",
        description="a record that fails its format's checks: stop with an error naming its file and line (error), or "
        "leave it out, counted and the first one named in one warning per split (skip)",
    )
    text_field: str = "text"
    """text / raw: the field with the text"""
    text_pair_field: str | None = None
    """text: the second text of sequence-pair tasks (null: single texts)"""
    label_field: str = "label"
    """text: the field with the label (a class, a number, or the answer text)"""
    type: Literal["classification", "regression", "generation"] = "classification"
    """classification, regression (encoder) or generation (causal LM; every format but text)"""
    labels: list[str] | None = Field(None, description="label set (default: the labels seen in train, sorted)")
    metric: Literal["accuracy", "f1", "macro_f1", "mcc", "pearson", "spearman", "exact_match", "loss"] = Field(
        "accuracy",
        description="scored on validation / test; loss: the per-task loss (and perplexity) only, nothing generated "
        "(the default for alpaca and chat tasks: open-ended answers; set exact_match to generate and compare)",
    )
    loss_weight: float = Field(1.0, ge=0)
    """w_t in sum_t w_t L_t (0: trained on by no one, evaluated only)"""
    sampling_weight: float = Field(1.0, gt=0, description="train.task_sampling weighted: p_t ~ sampling_weight")
    max_epochs: float | None = Field(
        None, gt=0, description="this task leaves the batches after max_epochs passes over its training set"
    )
    prompt: str | None = Field(
        None,
        description="format text: '{text}' / '{text_pair}' template (default "
        "'{text}\\nAnswer:'); alpaca: '{instruction}' / '{input}' (default: Alpaca's templates)",
    )
    label_words: dict[str, str] | None = None
    """causal-lm classification: the answer text each label is scored as"""
    generation: GenerationOptions = Field(
        default_factory=GenerationOptions, description="generation tasks: max_new_tokens, stop"
    )
    answer_regex: str | None = Field(
        None, description="scored answer: first capture group (or whole match), on prediction and reference"
    )
    extract: Literal["none", "last_number", "gsm8k"] = Field(
        "none", description="named answer extractor (instead of answer_regex)"
    )
    normalize: Literal["default", "lowercase", "strip", "list"] = Field(
        "default", description="answer normalisation before exact_match (list: comma-separated items)"
    )
    max_train_samples: int | None = Field(None, gt=0)
    """use at most this many training records (the first ones)"""
    max_eval_samples: int | None = Field(None, gt=0)
    """use at most this many validation and test records"""
    format: Literal[FORMAT_NAMES] = Field(
        "text",
        description="record layout (data/formats/): text (+pair) and label; alpaca instruction/input/output; chat "
        "messages; sharegpt conversations; prompt_completion (TRL's); raw documents (continued pre-training)",
    )
    instruction_field: str = "instruction"
    """alpaca: the instruction field"""
    input_field: str = Field("input", description="alpaca: optional per record (missing or empty: no input)")
    output_field: str = "output"
    """alpaca: the answer field"""
    messages_field: str | None = Field(
        None,
        description="chat: a list of {role, content} (default 'messages'); sharegpt: a list of {from, value} "
        "(default 'conversations'); the last turn is the assistant's answer",
    )
    prompt_field: str = Field("prompt", description="prompt_completion: the prompt, used verbatim")
    completion_field: str = Field("completion", description="prompt_completion: the answer trained on")
    train_turns: Literal["all", "last"] = Field(
        "all",
        description="chat / sharegpt: the loss covers every assistant turn (all: TRL's assistant-only loss) or the "
        "last one only",
    )
    train_on_inputs: bool = Field(False, description="causal-lm: loss on the prompt tokens too (default: answer only)")
    validation_fraction: float | None = Field(
        None, gt=0, lt=1, description="hold out this share of train as validation"
    )
    validation_seed: int = Field(0, description="seed of the validation_fraction split (fixed across train.seed)")

    @model_validator(mode="after")
    def _source(self) -> TaskConfig:
        if (self.dataset is None) == (self.files is None):
            raise ValueError(f"task {self.name!r}: give exactly one of 'dataset' (HF id) or 'files' (local JSONL/CSV)")
        if self.files is not None and "train" not in self.files:
            raise ValueError(f"task {self.name!r}: files needs a 'train' entry")
        given = self.model_fields_set
        fmt = get_format(self.format)
        if self.messages_field is None and fmt.chat:
            self.messages_field = "conversations" if self.format == "sharegpt" else "messages"
        if fmt.generation:  # the answer is open text: generation, evaluated by its loss unless told otherwise
            if "type" not in given:
                self.type = "generation"
            elif self.type != "generation":
                raise ValueError(
                    f"task {self.name!r}: format {self.format!r} makes a generation task (its answer is "
                    f"text), not {self.type!r}: remove 'type' or set type: generation"
                )
            if "metric" not in given:
                self.metric = "loss"
        if fmt.placeholders is None and self.prompt is not None:
            how = "renders the messages with the tokenizer's chat template" if fmt.chat else "takes no prompt template"
            raise ValueError(f"task {self.name!r}: format {self.format!r} {how}: remove 'prompt'")
        if self.format == "text" and self.prompt is None:
            self.prompt = "{text}\nAnswer:"
        if self.prompt is not None:
            import string

            allowed = fmt.placeholders
            try:
                names = {f for _, f, _, _ in string.Formatter().parse(self.prompt) if f is not None}
            except ValueError as e:
                raise ValueError(
                    f"task {self.name!r}: prompt is not a valid template ({e}; write {{{{ and }}}} for braces)"
                ) from None
            bad = sorted(names - allowed)
            if bad:
                raise ValueError(
                    f"task {self.name!r}: prompt uses {', '.join('{' + b + '}' for b in bad)}; format "
                    f"{self.format!r} fills {', '.join('{' + a + '}' for a in sorted(allowed))}"
                )
        if self.validation_fraction is not None:
            if self.files is not None and "validation" in self.files:
                raise ValueError(f"task {self.name!r}: give either files.validation or validation_fraction, not both")
            if self.dataset is not None and "eval_split" in given:
                raise ValueError(f"task {self.name!r}: give either eval_split or validation_fraction, not both")
        return self

    @model_validator(mode="after")
    def _answer(self) -> TaskConfig:
        if self.answer_regex is not None:
            if self.extract != "none":
                raise ValueError(f"task {self.name!r}: give answer_regex or extract, not both")
            import re

            try:
                re.compile(self.answer_regex)
            except re.error as e:
                raise ValueError(
                    f"task {self.name!r}: answer_regex {self.answer_regex!r} is not a valid regular expression ({e})"
                ) from None
        return self
