"""Tiny models built from a config, saved to a temp dir and loaded back with from_pretrained (no Hub)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ortho_lora_dist import task_mean

VOCAB = 128


def save_tiny_llama(path, hidden: int = 64, layers: int = 2) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def save_tiny_bert(path) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(4321)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(cfg).save_pretrained(path)
    return str(path)


def lora_llama(path, quant: str | None = None, dropout: float = 0.0, seed: int = 0, storage=None, **lora_kw):
    """PEFT LoRA (r=4, all linear layers, random non-zero B so both factors get gradients) on the tiny Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    q, dtype = None, torch.float32
    if quant == "nf4":
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=storage or torch.uint8,
        )
        dtype = storage or torch.float32  # FSDP: every frozen base tensor in the 4-bit storage dtype
    elif quant == "int8":
        q = BitsAndBytesConfig(load_in_8bit=True)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype)
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False, **lora_kw
    )
    return get_peft_model(model, cfg)


def lm_task_losses(model, ids: torch.Tensor, task_ids: torch.Tensor, num_tasks: int, mask: torch.Tensor | None = None):
    """Per-task mean next-token loss over the real (mask=1) tokens of each task's samples."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view(
        ids.shape[0], -1
    )
    w = None if mask is None else mask[:, 1:].float()
    return task_mean(tok, task_ids[:, None].expand_as(tok), num_tasks, w)


class BertMultiHead(nn.Module):
    """A shared (LoRA-adapted) BERT encoder with one classification head per task."""

    def __init__(self, path, num_labels: list[int], dropout: float = 0.0):
        super().__init__()
        from peft import LoraConfig, get_peft_model
        from transformers import BertModel

        torch.manual_seed(0)
        enc = BertModel.from_pretrained(path)
        cfg = LoraConfig(
            r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=dropout, init_lora_weights=False
        )
        self.encoder = get_peft_model(enc, cfg)
        self.heads = nn.ModuleList(nn.Linear(enc.config.hidden_size, n) for n in num_labels)

    def task_params(self) -> dict[int, list[nn.Parameter]]:
        return {t: list(h.parameters()) for t, h in enumerate(self.heads)}

    def task_losses(self, ids, mask, labels, task_ids):
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        per = torch.zeros(ids.shape[0])
        for t, head in enumerate(self.heads):
            rows = (task_ids == t).nonzero().squeeze(1)
            if rows.numel():
                per = per.index_put((rows,), F.cross_entropy(head(h[rows]), labels[rows], reduction="none"))
        return task_mean(per, task_ids, len(self.heads))


WORDS = (
    "good great fine nice love happy best bad awful poor hate sad worst movie film plot actor scene "
    "stock market bank shares trade oil price goal match team player coach season vote election party "
    "the a is was and of to in it this that very not"
).split()


def save_word_tokenizer(path, kind: str):
    """A real word-level fast tokenizer over WORDS (BERT-style specials, or Llama-style without pad)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    else:
        specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1] if kind == "bert" else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return len(vocab)


def save_app_models(root) -> dict:
    """Tiny BERT and Llama with word-level tokenizers, saved like hub checkpoints."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    root = __import__("pathlib").Path(root)
    torch.manual_seed(0)
    n = save_word_tokenizer(root / "bert", "bert")
    BertModel(
        BertConfig(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    ).save_pretrained(root / "bert")
    n = save_word_tokenizer(root / "llama", "llama")
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).save_pretrained(root / "llama")
    return {"bert": str(root / "bert"), "llama": str(root / "llama")}


def write_app_tasks(root, n_train: int = 64, n_eval: int = 24) -> dict:
    """Two small real-looking text tasks (sentiment words, topic words) as JSONL train/validation/test."""
    import json
    import random
    from pathlib import Path

    rng = random.Random(0)
    pos, neg = WORDS[:7], WORDS[7:14]
    topics = {"finance": WORDS[19:25], "sport": WORDS[25:31], "politics": WORDS[31:34]}
    filler = WORDS[14:19] + WORDS[34:]

    def sentiment():
        label = rng.choice(["pos", "neg"])
        words = rng.sample(pos if label == "pos" else neg, 2) + rng.sample(filler, 4)
        rng.shuffle(words)
        return {"text": " ".join(words), "label": label}

    def topic():
        label = rng.choice(sorted(topics))
        words = rng.sample(topics[label], 2) + rng.sample(filler, 4)
        rng.shuffle(words)
        return {"text": " ".join(words), "label": label}

    out = {}
    for name, gen in (("sentiment", sentiment), ("topic", topic)):
        out[name] = {}
        for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
            p = Path(root) / name / f"{split}.jsonl"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("".join(json.dumps(gen()) + "\n" for _ in range(n)))
            out[name][split] = str(p)
    return out


def without_dropout(cfg: dict, where) -> None:
    """``cfg`` (a run's YAML as a dict) edited to train its model copied to ``where`` with hidden and attention dropout
    0, and LoRA dropout 0: dropout masks are per-rank random streams, so only without them can N ranks equal one
    process exactly."""
    import json
    import shutil
    from pathlib import Path

    where = Path(where)
    shutil.copytree(cfg["model"]["name_or_path"], where)
    mc = json.loads((where / "config.json").read_text())
    mc.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (where / "config.json").write_text(json.dumps(mc))
    cfg["model"]["name_or_path"] = str(where)
    cfg["lora"]["dropout"] = 0.0


# The model families users fine-tune, each a tiny random config of its real architecture (transformers' own classes).
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe"]
_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FAMILY_TARGETS = {  # LoRA targets: attention + MLP + lm_head. The MoE families' experts are fused parameters under
    # transformers 5: Mixtral's get PEFT ParamWrappers (refused by name), so attention + lm_head; on Qwen2-MoE the
    # MLP names reach its shared expert only (PEFT leaves the fused experts and the router unadapted)
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"],  # fused qkv / gate_up
    "mixtral": [*_ATTENTION, "lm_head"],
}


def family_config(family: str, vocab: int = 64, **overrides):
    """(model class, tiny config) of ``family``: 2 layers, hidden 32, 4 heads / 2 KV heads, sdpa (Gemma 2: eager,
    which is where it applies attention soft-capping); Gemma: final logit soft-capping 5, tied embeddings.
    ``overrides``: more config keys (e.g. tie_word_embeddings)."""
    import transformers as tr

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
        **overrides,
    )
    if family == "llama":
        return tr.LlamaForCausalLM, tr.LlamaConfig(**common)
    if family == "qwen2":
        return tr.Qwen2ForCausalLM, tr.Qwen2Config(**common)
    if family == "qwen3":
        return tr.Qwen3ForCausalLM, tr.Qwen3Config(head_dim=8, **common)
    if family == "mistral":
        return tr.MistralForCausalLM, tr.MistralConfig(**common)
    if family == "gemma2":
        eager = {**common, "attn_implementation": "eager"}
        return tr.Gemma2ForCausalLM, tr.Gemma2Config(head_dim=8, final_logit_softcapping=5.0, **eager)
    if family == "gemma3":
        return tr.Gemma3ForCausalLM, tr.Gemma3TextConfig(head_dim=8, final_logit_softcapping=5.0, **common)
    if family == "phi3":
        return tr.Phi3ForCausalLM, tr.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **common)
    if family == "mixtral":
        return tr.MixtralForCausalLM, tr.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
    if family == "qwen2_moe":
        return tr.Qwen2MoeForCausalLM, tr.Qwen2MoeConfig(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=24, **common
        )
    raise ValueError(family)


def family_lora(base, family: str, seed: int = 0):
    """PEFT LoRA r=4 on ``family``'s targets, random non-zero B (both factors get gradients), no dropout."""
    from peft import LoraConfig, get_peft_model

    targets = FAMILY_TARGETS.get(family, [*_ATTENTION, "gate_proj", "up_proj", "down_proj", "lm_head"])
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(base, lora)


def save_family(family: str, path, vocab: int = 64) -> str:
    """The tiny ``family`` model (seeded weights) saved for from_pretrained (a quantized load, other processes)."""
    cls, cfg = family_config(family, vocab)
    torch.manual_seed(1234)
    cls(cfg).save_pretrained(path)
    return str(path)
