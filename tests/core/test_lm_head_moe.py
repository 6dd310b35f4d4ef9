"""LoRA on the output layer, and MoE models: exact where the capture can see the factor, refused where it cannot.

* ``lm_head`` with LoRA runs on the N labelled positions only (models/lm_head.py gathers them): the capture reads
  its [N, features] input by the tasks declared with ``set_tasks(..., gathered=...)``. One backward == T backward
  passes (fp32, 1e-5 relative), tied and untied embeddings, padded and packed rows; and ``ortho-lora train`` with
  ``lm_head`` in target_modules runs (it ended the first step in a RuntimeError before).
* Mixtral under transformers 5: ``all-linear`` makes PEFT wrap the fused experts and the router as ParamWrapper
  (LoRA added to the weight, no lora_A forward): refused at set-up with one error naming the layer (before, their
  lora_B stayed exactly 0: silently never trained). Attention-only LoRA on Mixtral is captured exactly.
"""

from __future__ import annotations

import pytest
import torch

from ortho_lora_dist import OrthoLoRA
from ortho_lora_dist.core.losses import task_mean
from ortho_lora_dist.data.packing import pack
from ortho_lora_dist.models.lm_head import labelled_tasks, labelled_token_losses

T = 3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _samples(seed: int = 0, n: int = 7, vocab: int = 64):
    """n samples of 4-14 tokens with answers of 1-6 tokens, tasks scattered (every task present)."""
    gen = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        k = int(torch.randint(4, 15, (1,), generator=gen))
        x = torch.randint(1, vocab, (k,), generator=gen).tolist()
        cut = k - int(torch.randint(1, min(6, k - 1) + 1, (1,), generator=gen))
        ids.append(x)
        labels.append([-100] * cut + x[cut:])
    tasks = [int(t) for t in torch.randint(0, T, (n,), generator=gen)]
    tasks[:T] = list(range(T))
    return ids, labels, tasks


def _padded(ids, labels, tasks) -> dict:
    width = max(map(len, ids))
    return {
        "input_ids": torch.tensor([x + [0] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
        "task_ids": torch.tensor(tasks),
    }


def _packed(ids, labels, tasks) -> dict:
    return pack(ids, labels, tasks, 24, 0)


def _model(family: str, tied: bool, target_modules, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    from tests.models import family_config

    cls, config = family_config(family, 64, tie_word_embeddings=tied)  # llama or mixtral
    torch.manual_seed(1234)
    base = cls(config)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(base, cfg)


def _task_grads(model, batch: dict, mode: str) -> torch.Tensor:
    """[T, P] per-task LoRA gradients of the per-task token-mean losses: one backward, or T backward passes."""
    olr = OrthoLoRA(model, T, strategy="joint", mode=mode)
    ids = batch["token_task_ids"] if "token_task_ids" in batch else batch["task_ids"]
    olr.set_tasks(ids, labelled_tasks(batch["labels"], ids))
    inputs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    loss, _ = labelled_token_losses(model, batch["labels"], batch["input_ids"], **inputs)
    olr.backward(task_mean(loss, labelled_tasks(batch["labels"], ids), T))
    grads = olr.buffer.clone()
    if olr.capture is not None:
        olr.capture.remove()
    return grads


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("rows", ["padded", "packed"])
def test_lora_on_lm_head_is_exact(tied, rows):
    build = _padded if rows == "padded" else _packed
    batch = build(*_samples())
    targets = ["q_proj", "v_proj", "down_proj", "lm_head"]
    one = _task_grads(_model("llama", tied, targets), batch, "one_backward")
    ref = _task_grads(_model("llama", tied, targets), batch, "reference")
    assert one.shape == ref.shape and float(ref.abs().max()) > 0
    assert rel(one, ref) < 1e-5


def test_gathered_rows_without_their_tasks_get_one_clear_error():
    model = _model("llama", False, ["q_proj", "lm_head"])
    batch = _padded(*_samples())
    olr = OrthoLoRA(model, T, strategy="joint")
    olr.set_tasks(batch["task_ids"])  # no gathered=: lm_head's [N, features] input cannot be attributed
    with pytest.raises(RuntimeError, match=r"lm_head.*gathered labelled positions.*set_tasks\(task_ids, gathered"):
        labelled_token_losses(model, batch["labels"], batch["input_ids"], attention_mask=batch["attention_mask"])


def test_mixtral_fused_experts_are_refused_not_silently_frozen():
    model = _model("mixtral", False, "all-linear")
    with pytest.raises(ValueError, match=r"mlp\.(gate|experts).*ParamWrapper.*never train.*target_modules"):
        OrthoLoRA(model, T)


def test_mixtral_attention_lora_is_exact():
    batch = _padded(*_samples(seed=1))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    one = _task_grads(_model("mixtral", False, targets), batch, "one_backward")
    ref = _task_grads(_model("mixtral", False, targets), batch, "reference")
    assert float(ref.abs().max()) > 0 and rel(one, ref) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_train_with_lora_on_lm_head(env, tmp_path, packing):  # noqa: F811
    import yaml
    from safetensors.torch import load_file

    from ortho_lora_dist.cli import main as cli
    from tests.app.test_app import make_config

    path = make_config(env, tmp_path / "run", kind="causal-lm", steps=2, plots=False, packing=packing)
    cfg = yaml.safe_load(path.read_text())
    cfg["lora"]["target_modules"] = ["q_proj", "v_proj", "lm_head"]
    for t in cfg["tasks"]:
        t["max_eval_samples"] = 2
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(path)]) == 0
    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    head_b = [v for k, v in weights.items() if "lm_head" in k and "lora_B" in k]
    assert head_b and all(float(v.abs().max()) > 0 for v in head_b)  # trained (B starts at 0)
