"""``alpaca``: Stanford Alpaca's instruction / input (optional) / output records, prompted with Alpaca's two
templates (or the task's ``prompt`` with '{instruction}' / '{input}')."""

from __future__ import annotations

from ortho_lora_dist.data.formats.base import RecordFormat, Row, strings_schema, text_value

# Stanford Alpaca's two templates (with / without an input), used when an alpaca task gives no prompt
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _normalise(row: Row, where: str, cfg) -> Row:
    instruction = text_value(row, cfg.instruction_field, where, cfg.name)
    output = text_value(row, cfg.output_field, where, cfg.name)
    given = text_value(row, cfg.input_field, where, cfg.name, optional=True)
    return {"instruction": instruction, "input": given or "", "label": output}


def _predict(row: Row, where: str, task: str) -> Row:
    return {
        "instruction": text_value(row, "instruction", where, task),
        "input": text_value(row, "input", where, task, optional=True) or "",
    }


def _prompt(cfg, r: Row) -> str:
    template = cfg.prompt or (ALPACA_PROMPT if r.get("input") else ALPACA_PROMPT_NO_INPUT)
    return template.format(instruction=r["instruction"], input=r.get("input", ""))


FORMAT = RecordFormat(
    name="alpaca",
    generation=True,
    chat=False,
    placeholders=frozenset({"instruction", "input"}),
    fields=lambda cfg: [cfg.instruction_field, cfg.input_field, cfg.output_field],
    normalise=_normalise,
    schema=lambda cfg: strings_schema("instruction", "input", "label"),
    predict=_predict,
    prompt_text=_prompt,
)
