"""The model families users fine-tune, each from a tiny random config of its real architecture (transformers' own
classes): per-task LoRA gradients from one backward == T backward passes; packed rows == padded rows (or the
refusal naming why); the loss on the labelled positions only == the loss from the model's full logits (Gemma's
final logit soft-capping included); LoRA on lm_head with the family's tied / untied embeddings. fp32, 1e-5 relative.
The 2-rank FSDP2 / DDP checks of the application run on Llama (tests/core/test_engine_resume.py,
tests/app/test_token_exact.py); the MoE families' experts are fused parameters under transformers 5 (refused by
name, tests/core/test_lm_head_moe.py), so their LoRA sits on attention here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ortho_lora_dist import OrthoLoRA
from ortho_lora_dist.core.losses import task_mean
from ortho_lora_dist.data.packing import pack
from ortho_lora_dist.models.lm_head import check_packing, labelled_tasks, labelled_token_losses
from tests.core.test_lm_head_moe import _padded, _samples, rel  # the same batches: answers of 1-6 tokens

T, VOCAB = 3, 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    attn_implementation="sdpa",
)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _config(family: str):
    import transformers as tr

    if family == "llama":
        return tr.LlamaForCausalLM, tr.LlamaConfig(**COMMON)
    if family == "qwen2":
        return tr.Qwen2ForCausalLM, tr.Qwen2Config(**COMMON)
    if family == "qwen3":
        return tr.Qwen3ForCausalLM, tr.Qwen3Config(head_dim=8, **COMMON)
    if family == "mistral":
        return tr.MistralForCausalLM, tr.MistralConfig(**COMMON)
    if family == "gemma2":  # soft-capped attention and final logits; tied embeddings
        common = {**COMMON, "attn_implementation": "eager"}  # Gemma 2 runs attention soft-capping in eager only
        return tr.Gemma2ForCausalLM, tr.Gemma2Config(head_dim=8, final_logit_softcapping=5.0, **common)
    if family == "gemma3":
        return tr.Gemma3ForCausalLM, tr.Gemma3TextConfig(head_dim=8, final_logit_softcapping=5.0, **COMMON)
    if family == "phi3":  # fused qkv_proj / gate_up_proj
        return tr.Phi3ForCausalLM, tr.Phi3Config(pad_token_id=0, **COMMON)
    if family == "mixtral":
        return tr.MixtralForCausalLM, tr.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **COMMON)
    if family == "qwen2_moe":
        return tr.Qwen2MoeForCausalLM, tr.Qwen2MoeConfig(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=24,
            **COMMON,
        )
    raise ValueError(family)


TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"],
    "mixtral": [*ATTENTION, "lm_head"],
    "qwen2_moe": [*ATTENTION, "lm_head"],
}
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe"]


def _model(family: str, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    cls, cfg = _config(family)
    torch.manual_seed(1234)
    base = cls(cfg).float()
    targets = TARGETS.get(family, [*ATTENTION, "gate_proj", "up_proj", "down_proj", "lm_head"])
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(base, lora)


def _ids(batch: dict) -> torch.Tensor:
    return batch["token_task_ids"] if "token_task_ids" in batch else batch["task_ids"]


def _losses(model, batch: dict) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    loss, _ = labelled_token_losses(model, batch["labels"], batch["input_ids"], **inputs)
    return task_mean(loss, labelled_tasks(batch["labels"], _ids(batch)), T)


def _task_grads(family: str, batch: dict, mode: str) -> torch.Tensor:
    model = _model(family)
    olr = OrthoLoRA(model, T, strategy="joint", mode=mode)
    olr.set_tasks(_ids(batch), labelled_tasks(batch["labels"], _ids(batch)))
    olr.backward(_losses(model, batch))
    return olr.buffer.clone()


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family):
    padded = _padded(*_samples())
    one, ref = _task_grads(family, padded, "one_backward"), _task_grads(family, padded, "reference")
    assert float(ref.abs().max()) > 0 and rel(one, ref) < 1e-5, "one backward == T backward passes"

    model = _model(family)  # the labelled-positions loss == the loss from the model's own full logits
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, :-1]
        target = padded["labels"][:, 1:]
        keep = target != -100
        full = F.cross_entropy(logits[keep].float(), target[keep], reduction="none")
        want = task_mean(full, labelled_tasks(padded["labels"], padded["task_ids"]), T)
        torch.testing.assert_close(_losses(model, padded), want, rtol=1e-5, atol=1e-6)

    try:
        check_packing(model.base_model.model, family)
    except ValueError as e:  # a refusal must name the reason; never silently wrong
        assert "packing" in str(e)
        return
    packed = pack(*_samples(), 24, 0)
    assert rel(_task_grads(family, packed, "one_backward"), ref) < 1e-5, "packed rows == padded rows"


def test_gemma_soft_capping_is_applied_to_the_labelled_logits():
    """Gemma 2 caps its logits at +-final_logit_softcapping: the labelled-positions path must see capped logits."""
    model = _model("gemma2")
    padded = _padded(*_samples())
    from ortho_lora_dist.models.lm_head import labelled_logits

    pick = torch.zeros_like(padded["labels"], dtype=torch.bool)
    pick[:, :-1] = padded["labels"][:, 1:] != -100
    with torch.no_grad():
        got = labelled_logits(model, padded["input_ids"], padded["attention_mask"], pick)
    assert float(got.abs().max()) <= 5.0 + 1e-6
