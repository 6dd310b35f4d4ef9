"""The model families users fine-tune, each from a tiny random config of its real architecture (transformers' own
classes): per-task LoRA gradients from one backward == T backward passes; packed rows == padded rows (or the
refusal naming why); the loss on the labelled positions only == the loss from the model's full logits (Gemma's
final logit soft-capping included); LoRA on lm_head with the family's tied / untied embeddings. fp32, 1e-5 relative.
FSDP2 at 2 ranks and an NF4 base per family: tests/core/test_families_distributed.py. The MoE families' experts
and routers are fused parameters under transformers 5 (PEFT ParamWrapper: refused by name, below), so their LoRA
sits on attention here. What each family supports, as these tests check it: tests/family_support.py.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from ortho_lora_dist import OrthoLoRA
from ortho_lora_dist.core.losses import task_mean
from ortho_lora_dist.data.packing import pack
from ortho_lora_dist.models.lm_head import check_packing, labelled_tasks, labelled_token_losses
from tests.core.test_lm_head_moe import _padded, _samples, rel  # the same batches: answers of 1-6 tokens
from tests.family_support import cell
from tests.models import FAMILIES, family_config, family_lora

T, VOCAB = 3, 64


def _model(family: str, seed: int = 0):
    cls, cfg = family_config(family, VOCAB)
    torch.manual_seed(1234)
    return family_lora(cls(cfg).float(), family, seed)


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
    """One backward == T backward passes; the labelled-positions loss == full logits; packed == padded; the LoRA
    targets include lm_head (tied or untied as the family's config says: tests/family_support.py)."""
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

    check_packing(model.base_model.model, family)  # every family builds its masks through masking_utils
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


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_moe_experts_is_refused_by_name(family):
    """``all-linear`` on Mixtral reaches its fused experts and router (PEFT ParamWrapper): one error naming them,
    never a silent zero gradient; on Qwen2-MoE PEFT adapts the shared expert and leaves the fused experts and router
    as they are; a dense family has none, and all-linear builds."""
    from peft import LoraConfig, get_peft_model

    cls, cfg = family_config(family, VOCAB)
    torch.manual_seed(0)
    model = get_peft_model(cls(cfg), LoraConfig(r=4, target_modules="all-linear"))
    said = cell(family, "LoRA on MoE experts / router")
    if said.startswith("refused"):
        with pytest.raises(ValueError, match=r"mlp\.(gate|experts).*ParamWrapper.*never train"):
            OrthoLoRA(model, T)
        return
    assert OrthoLoRA(model, T).capture is not None
    adapted = {n for n, p in model.named_parameters() if p.requires_grad and re.search(r"mlp\.(gate|experts)\.", n)}
    assert not adapted, adapted  # "not adapted": PEFT leaves them as they are (no trainable factor left unseen)
    if said.startswith("not adapted"):
        assert any("shared_expert." in n for n, p in model.named_parameters() if p.requires_grad)
