"""Every model family trained a few steps with one process or under ``torchrun --nproc_per_node 2`` with FSDP2
(``fully_shard`` of the base, LoRA replicated: core/engines/fsdp.py), optionally over an NF4 base:

    python tests/family_worker.py --models DIR --out OUT [--quant nf4] [--families llama,gemma2]

DIR holds one saved tiny model per family (tests/models.py: save_family). Step s draws 8 samples with answers of
1-6 tokens (tests/core/test_lm_head_moe.py: _samples); rank r of N takes samples r, r+N, ...; each task's loss is
its rank's token sum over the step's count of the task's labelled tokens (core/losses.py: step_mean_part), so the
N ranks' mean is the one-process token mean. Strategy ortho, AdamW. Writes OUT/FAMILY/rank{r}.safetensors (final
LoRA weights), init{r}.safetensors, and forward{r}.safetensors (logits of a probe before training).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ortho_lora_dist import OrthoLoRA  # noqa: E402
from ortho_lora_dist.core.losses import step_mean_part, task_sum  # noqa: E402
from ortho_lora_dist.models.lm_head import labelled_tasks, labelled_token_losses  # noqa: E402
from tests.core.test_lm_head_moe import T, _padded, _samples  # noqa: E402
from tests.models import FAMILIES, family_lora  # noqa: E402

STEPS, N, SEED, LR = 2, 8, 7, 1e-2


def load(path: str, family: str, quant: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q, dtype = None, torch.float32
    if quant == "nf4":  # FSDP over 4-bit: the packed storage and every frozen tensor in one dtype (bf16)
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=torch.bfloat16,
        )
        dtype = torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=dtype)
    if quant == "nf4" and not any(type(m).__name__ == "Linear4bit" for m in base.modules()):
        raise SystemExit(f"{family}: no layer was loaded in 4 bits")
    model = family_lora(base, family, seed=0)
    for p in model.parameters():  # LoRA in fp32 over any base (as the application keeps it)
        if p.requires_grad:
            p.data = p.data.float()
    return model


def run(family: str, path: str, quant: str, out: str, comm) -> None:
    from ortho_lora_dist.core.capture import find_lora_factors
    from ortho_lora_dist.core.engines import TorchEngine
    from ortho_lora_dist.core.engines.base import broadcast_trainable_
    from ortho_lora_dist.core.engines.fsdp import shard_base

    rank, world = (comm.rank, comm.world_size) if comm else (0, 1)
    model = load(path, family, quant)
    model.train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if comm is not None:
        shard_base(model, [lin.weight for _, _, lin in find_lora_factors(model)])
    olr = OrthoLoRA(model, T, strategy="ortho", seed=SEED, comm=comm)
    if comm is not None:
        broadcast_trainable_(model)
    engine = TorchEngine(olr, torch.optim.AdamW(olr.lora_params, lr=LR, weight_decay=0.01))
    os.makedirs(os.path.join(out, family), exist_ok=True)
    lora = {n: p for n, p in model.named_parameters() if n in names}

    def weights() -> dict:
        return {n: p.detach().float().contiguous().clone() for n, p in lora.items()}

    init = weights()
    probe = _padded(*_samples(seed=99, n=2))
    with torch.no_grad():
        olr.set_tasks(probe["task_ids"])
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    save_file({"logits": logits.float().contiguous()}, os.path.join(out, family, f"forward{rank}.safetensors"))
    for step in range(STEPS):
        ids, labels, tasks = _samples(seed=step, n=N)
        every = _padded(ids, labels, tasks)
        counts = torch.bincount(labelled_tasks(every["labels"], every["task_ids"]), minlength=T).float()
        mine = list(range(rank, N, world))
        batch = _padded([ids[i] for i in mine], [labels[i] for i in mine], [tasks[i] for i in mine])
        labelled = labelled_tasks(batch["labels"], batch["task_ids"])
        olr.set_tasks(batch["task_ids"], labelled)
        loss, _ = labelled_token_losses(
            model, batch["labels"], batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        sums, _ = task_sum(loss, labelled, T)
        olr.backward(step_mean_part(sums, counts, world))
        engine.apply(olr.project())
    save_file(weights(), os.path.join(out, family, f"rank{rank}.safetensors"))
    save_file(init, os.path.join(out, family, f"init{rank}.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--quant", choices=["none", "nf4"], default="none")
    p.add_argument("--families", default=",".join(FAMILIES))
    args = p.parse_args()
    torch.set_num_threads(1)
    comm = None
    if "RANK" in os.environ:
        import torch.distributed as dist

        from ortho_lora_dist.core.comm import DistComm

        dist.init_process_group("gloo")
        comm = DistComm()
    for family in args.families.split(","):
        run(family, os.path.join(args.models, family), args.quant, args.out, comm)
        print(f"{family}: done", flush=True)
    if comm is not None:
        comm.dist.barrier()
        comm.dist.destroy_process_group()


if __name__ == "__main__":
    main()
