"""Loading a base model and its tokenizer, quantized or not, and wrapping it in ONE shared PEFT LoRA adapter."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ortho_lora_dist.config import Config, ModelConfig
from ortho_lora_dist.runtime.hub import ModelUnavailable, hub_hint, is_unreachable, resolve_model_path

log = logging.getLogger("ortho_lora_dist.models")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        if Path(path).exists() or not is_unreachable(e):
            raise
        raise ModelUnavailable(hub_hint("model.name_or_path", cfg.name_or_path)) from None
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ValueError(f"tokenizer of {cfg.name_or_path} has no pad, eos or unk token to pad with")
        tok.pad_token = fallback
        log.warning("tokenizer of %s has no pad token: padding with %r", cfg.name_or_path, fallback)
    return tok


def quantization(cfg: ModelConfig, storage: torch.dtype | None):
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = DTYPES[cfg.dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage or compute,
    )


def placement(cfg: ModelConfig) -> dict:
    """Quantized weights are created where they will run: on this rank's GPU when there is one."""
    if cfg.quantization != "none" and torch.cuda.is_available():
        return {"device_map": {"": torch.cuda.current_device()}}
    return {}


def add_lora(model: nn.Module, cfg: Config) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        use_rslora=cfg.lora.use_rslora,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"lora.target_modules {cfg.lora.target_modules} matched no module of {cfg.model.name_or_path}; "
                f"linear layers it has: {names}"
            ) from None
        raise


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def library_noise(quantized: bool):
    """Silence, precisely, two messages our own calls trigger on every run and that ask nothing of the user.

    * ``import peft`` imports bitsandbytes (peft/helpers.py) even when nothing is quantized; on CPUs with
      AVX512-BF16 that import logs that bitsandbytes' optional CPU 4-bit kernel could not be fetched. Dropped
      (that message only) when ``quantized`` is False; a quantized run still sees it.
    * PEFT's PeftModel reads transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning, PEFT's
      code, not ours): that one warning is ignored inside this block.
    """
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    drop = _DropMessage("gemm_4bit_forward from kernels-community")
    if not quantized:
        bnb_logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            yield
    finally:
        bnb_logger.removeFilter(drop)


def attach_lora(base: nn.Module, cfg: Config, adapter_dir: str | Path | None) -> nn.Module:
    """A new LoRA adapter (training) or a saved one, frozen, from ``adapter_dir`` (predict, merge)."""
    with library_noise(cfg.model.quantization != "none"):
        if adapter_dir is None:
            return add_lora(base, cfg)
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(adapter_dir))


@contextlib.contextmanager
def _held_load_reports():
    """Hold back transformers' LOAD REPORT records of the from_pretrained calls inside (see load_encoder)."""
    held: list[logging.LogRecord] = []
    logger = logging.getLogger("transformers.modeling_utils")

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            held.append(record)
            return False
        return True

    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)


def load_encoder(path: str, **kw) -> nn.Module:
    """AutoModel without its pooler (unused: we pool ourselves; without it no LoRA factor sits on a dead branch).

    transformers 5 reports the checkpoint's pooler weights as UNEXPECTED in a LOAD REPORT warning: expected
    here, since we asked for no pooler. That report is dropped when the pooler keys are all it lists; any
    other finding (missing, mismatched or other unexpected keys) is logged as transformers wrote it.
    """
    from transformers import AutoModel

    try:
        with _held_load_reports() as held:
            base, info = AutoModel.from_pretrained(path, add_pooling_layer=False, output_loading_info=True, **kw)
    except TypeError:  # a model class without add_pooling_layer
        return AutoModel.from_pretrained(path, **kw)
    pooler_only = (
        not info.get("missing_keys")
        and not info.get("mismatched_keys")
        and all(re.search(r"(^|\.)pooler\.", k) for k in info.get("unexpected_keys", ()))
    )
    if not pooler_only:
        logger = logging.getLogger("transformers.modeling_utils")
        for record in held:
            logger.handle(record)
    return base
