"""The ``model`` and ``lora`` sections: what to load and the adapter put on it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ortho_lora_dist.config.base import Strict


class ModelConfig(Strict):
    name_or_path: str = Field(
        description="local directory, hub id, or pkg://PACKAGE/SUBDIR (a model shipped in a package)"
    )
    kind: Literal["encoder-classification", "causal-lm"] = "encoder-classification"
    """encoder-classification: an encoder with one head per task; causal-lm: prompt -> answer text (with defaults of
    its own, see the top of this page)"""
    quantization: Literal["none", "nf4", "int8"] = "none"
    """the frozen base in 4 bits (nf4: QLoRA) or 8 bits (int8), with bitsandbytes"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """weights and compute dtype (causal-lm default: bfloat16 where the GPU has it, else float32)"""
    pooling: Literal["mean", "cls"] = "mean"
    """encoder: the hidden states pooled for the heads (mean over tokens, or the first token)"""
    max_length: int = Field(128, gt=0)
    """tokens per sample, prompt + answer (causal-lm default 1024); longer ones: model.truncation"""
    truncation: Literal["drop", "truncate", "error"] = Field(
        "drop",
        description="causal-lm: a training sample longer than max_length is left out (drop), cut to the prompt's end "
        "and the answer's head (truncate), or refused at load (error); counted per task and logged once "
        "(data/lengths.py)",
    )
    trust_remote_code: bool = False
    """let transformers run the model repository's own code (only for repositories you trust)"""
    chat_template: str | None = Field(
        None,
        description="causal-lm: a Jinja chat template (the text, or a path to a .jinja file) replacing the "
        "tokenizer's, or giving a base model one; chat and sharegpt tasks render with it",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="causal-lm: transformers' attention implementation (default: transformers' choice, sdpa)"
    )

    @field_validator("chat_template")
    @classmethod
    def _template_text(cls, v: str | None) -> str | None:
        """A path to a .jinja file becomes its text, so that config.yaml and the adapter carry the template itself."""
        if v is None or "\n" in v or not v.strip().endswith(".jinja"):
            return v
        path = Path(v.strip())
        if not path.is_file():
            raise ValueError(f"chat_template file {path} does not exist")
        return path.read_text()


class LoraConfigModel(Strict):
    r: int = Field(8, gt=0)
    """LoRA rank"""
    alpha: float = Field(16, gt=0, description="LoRA scaling alpha / r (0 would make every LoRA gradient 0)")
    dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout on the factors' input"""
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: ["query", "value"])
    """the linear layers that get LoRA, by name (causal-lm default: all-linear)"""
    use_rslora: bool = False
    """rank-stabilised scaling alpha / sqrt(r)"""
