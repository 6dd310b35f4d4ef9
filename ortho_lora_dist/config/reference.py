"""The configuration reference, generated from the schema itself (every key: type, default, description), so it
cannot drift: ``ortho-lora config`` prints it, docs/reference/config.md is it (a test compares the two)."""

from __future__ import annotations

import re
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ortho_lora_dist.config.model import LoraConfigModel, ModelConfig
from ortho_lora_dist.config.schema import CAUSAL_LM_DEFAULTS, Config
from ortho_lora_dist.config.task import GenerationOptions, TaskConfig
from ortho_lora_dist.config.train import DistributedConfig, TrackingConfig, TrainConfig
from ortho_lora_dist.runtime import jsonio

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("model", ModelConfig),
    ("lora", LoraConfigModel),
    ("tasks[N]", TaskConfig),
    ("tasks[N].generation", GenerationOptions),
    ("train", TrainConfig),
    ("train.tracking", TrackingConfig),
    ("distributed", DistributedConfig),
]


def _type(annotation) -> str:
    """A field's type as a user writes it in YAML."""
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " \\| ".join([*(_type(a) for a in rest), "null"])
    sections = {cls: title for title, cls in SECTIONS}
    if isinstance(annotation, type) and annotation in sections:
        return f"section `{sections[annotation]}`"
    if typing.get_origin(annotation) is list and typing.get_args(annotation)[0] in sections:
        return f"list of `{sections[typing.get_args(annotation)[0]]}`"
    if typing.get_origin(annotation) in (list, dict):
        return re.sub(r"typing\.|<class '(\w+)'>", r"\1", str(annotation)).replace("|", "\\|")
    if args:
        return " \\| ".join(_type(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(its section)"
    return "`" + jsonio.dumps(value).replace("|", "\\|") + "`"


def _rows(cls: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        described = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {described} |")
    return rows


def reference_markdown() -> str:
    """The whole reference as Markdown."""
    machine = "`bfloat16` on a GPU with bf16, else `float32`"  # the callable defaults depend on the machine
    kind = ", ".join(f"`{s}.{k}`: {machine if callable(v) else f'`{v}`'}" for (s, k), v in CAUSAL_LM_DEFAULTS.items())
    out = [
        "# Configuration reference",
        "",
        "Generated from the schema (`ortho-lora config` prints the same); every key of a run's YAML, its type, default",
        "and meaning. Any key can be overridden on the command line: `ortho-lora train run.yaml train.lr=1e-4`.",
        "",
        f"`model.kind: causal-lm` changes these defaults where the config leaves them unset: {kind}.",
        "",
        "## Top level",
        "",
        *_rows(Config),
    ]
    for title, cls in SECTIONS:
        out += ["", f"## `{title}`", "", *_rows(cls)]
    return "\n".join(out) + "\n"
