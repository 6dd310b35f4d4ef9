"""Loading a base model and its tokenizer, quantized or not, and wrapping it in ONE shared PEFT LoRA adapter."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ortho_lora_dist.config import Config, ConfigError, ModelConfig
from ortho_lora_dist.runtime.hub import ModelUnavailable, hub_hint, is_unreachable, resolve_model_path

log = logging.getLogger("ortho_lora_dist.models")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# a tokenizer saved by save_pretrained leaves at least one of these (fast, slow WordPiece / BPE, SentencePiece)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def check_model_folder(path: str, name: str) -> None:
    """A local model folder must hold config.json and tokenizer files: ModelUnavailable (exit 2) naming
    model.name_or_path otherwise (transformers would build a tokenizer with no vocabulary, or say to install
    sentencepiece)."""
    folder = Path(path)
    if not folder.is_dir():
        return
    if not (folder / "config.json").is_file():
        raise ModelUnavailable(
            f"model.name_or_path: {name} is a folder without config.json, not a Hugging Face model folder (it needs "
            "config.json, the weights and the tokenizer files, as save_pretrained writes them)"
        )
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelUnavailable(
            f"model.name_or_path: {name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): save the "
            "tokenizer into the model folder (tokenizer.save_pretrained)"
        )


def from_pretrained(load, path: str, name: str, what: str = "model", **kwargs):
    """``load(path, **kwargs)`` (a transformers from_pretrained); for a local folder, a failure is the folder's:
    ModelUnavailable (exit 2) naming model.name_or_path and what is wrong with it, instead of a traceback."""
    try:
        return load(path, **kwargs)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:
        if not Path(path).is_dir():
            if is_unreachable(e):
                raise ModelUnavailable(hub_hint("model.name_or_path", name)) from None
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = f"{type(e).__name__}: {first}"
        raise ModelUnavailable(f"model.name_or_path: cannot load the {what} from {name} ({why})") from None


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    check_model_folder(path, cfg.name_or_path)
    tok = from_pretrained(
        AutoTokenizer.from_pretrained, path, cfg.name_or_path, "tokenizer", trust_remote_code=cfg.trust_remote_code
    )
    if getattr(cfg, "chat_template", None):  # the text (a .jinja path is read at validation, config/model.py)
        tok.chat_template = cfg.chat_template
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ModelUnavailable(
                f"model.name_or_path: the tokenizer of {cfg.name_or_path} has no pad, eos or unk token to pad with"
            )
        tok.pad_token = fallback
        log.info("tokenizer of %s has no pad token: padding with %r", cfg.name_or_path, fallback)
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
            raise ConfigError(
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


# (logger, text) of the messages bitsandbytes' import logs about its optional CPU 4-bit kernel (see library_noise)
_BNB_KERNEL_MESSAGES = (
    ("bitsandbytes.backends.cpu.ops", "gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", "publisher trust check for 'kernels-community/quantization-bitsandbytes'"),
)


@contextlib.contextmanager
def library_noise(quantized: bool):
    """Silence, precisely, two messages our own calls trigger on every run and that ask nothing of the user.

    * ``import peft`` imports bitsandbytes (peft/helpers.py) even when nothing is quantized; on CPUs with
      AVX512-BF16 that import logs that bitsandbytes' optional CPU 4-bit kernel could not be fetched, and (with
      the ``kernels`` package that transformers >= 5.25 requires) that the kernel's publisher was not checked
      offline. Both dropped (those messages only) when ``quantized`` is False; a quantized run still sees them.
    * PEFT's PeftModel reads transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning, PEFT's
      code, not ours): that one warning is ignored inside this block.
    """
    dropped = [(logging.getLogger(name), _DropMessage(text)) for name, text in _BNB_KERNEL_MESSAGES]
    if not quantized:
        for logger, drop in dropped:
            logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            yield
    finally:
        for logger, drop in dropped:
            logger.removeFilter(drop)


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
