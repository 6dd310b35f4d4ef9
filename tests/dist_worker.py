"""Training runs for the exactness tests: ``python tests/dist_worker.py --engine single`` (one process)
or under ``torchrun --nproc_per_node 2`` / the ``deepspeed`` launcher. For every variant
(strategy:granularity) it trains a fresh model and writes the final LoRA weights per rank.

The global batch of step s holds ROWS samples of every task; rank r of N takes rows
[r*ROWS/N, (r+1)*ROWS/N) of each task, so the single-process run sees exactly their union.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ortho_lora_dist import OrthoLoRA  # noqa: E402
from ortho_lora_dist.core.blocks import block_grams, combine_region  # noqa: E402
from ortho_lora_dist.core.order import TaskOrder  # noqa: E402
from ortho_lora_dist.core.projection import combine_weights  # noqa: E402
from tests.models import VOCAB, lm_task_losses, lora_llama  # noqa: E402

T, ROWS, L, SEED, LR = 3, 4, 8, 7, 1e-2


def global_batch(step: int) -> list[torch.Tensor]:
    ids = []
    for t in range(T):
        rows = torch.randint(1, VOCAB, (ROWS, L), generator=torch.Generator().manual_seed(1000 * step + t))
        if t == 1:  # half of task 1 is task 0 shifted: the ranks see different conflicts than the global batch
            rows[: ROWS // 2] = ids[0][: ROWS // 2].roll(1, dims=1)
        ids.append(rows)
    return ids


def local_batch(step: int, rank: int, world: int):
    per = ROWS // world
    return torch.cat([x[rank * per : (rank + 1) * per] for x in global_batch(step)]), torch.arange(T).repeat_interleave(
        per
    )


def project_then_reduce(olr: OrthoLoRA, comm) -> torch.Tensor:
    """What a wrong implementation would hand over: project each rank's LOCAL per-task grads, then average."""
    order = TaskOrder(T, SEED).next()  # the order the real first step draws
    world = comm.world_size
    wrong = torch.cat(
        [
            combine_region(
                olr.buffer[r], r, olr.layout, combine_weights(block_grams(olr.buffer[r], r, olr.layout, T), order)
            )
            for r in range(world)
        ]
    )
    comm.dist.all_reduce(wrong)
    return wrong / world


def build_engine(args, olr, model, comm, world):
    if args.engine == "deepspeed":
        import deepspeed

        from ortho_lora_dist.core.engines.deepspeed_engine import DeepSpeedAdapter
        from ortho_lora_dist.engines.deepspeed_config import load_ds_config

        cfg = load_ds_config(
            args.ds_config, micro_batch=ROWS * T // world, world_size=world, grad_clip=args.max_grad_norm, lr=LR
        )
        opt = torch.optim.AdamW(olr.lora_params, lr=LR, weight_decay=0.01)
        ds_engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=olr.lora_params, config=cfg)
        return DeepSpeedAdapter(olr, ds_engine)
    from ortho_lora_dist.core.engines import TorchEngine
    from ortho_lora_dist.core.engines.base import broadcast_trainable_

    if comm is not None:
        broadcast_trainable_(model)
    return TorchEngine(
        olr, torch.optim.AdamW(olr.lora_params, lr=LR, weight_decay=0.01), max_grad_norm=args.max_grad_norm
    )


def run_variant(args, variant: str, comm, rank: int, world: int) -> dict:
    parts = variant.split(":")
    bucket_mb = float(parts.pop()) if len(parts) == 4 else 25.0  # strategy:granularity:reduce:bucket_mb
    strategy, granularity, reduce = parts + ["factor", "step"][len(parts) - 1 :]
    torch.manual_seed(0)
    quant = None if args.quant == "none" else args.quant
    model = lora_llama(args.model, quant=quant, storage=torch.bfloat16 if quant else None)
    model.train()
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if args.engine == "fsdp":
        from ortho_lora_dist.core.capture import find_lora_factors
        from ortho_lora_dist.core.engines.fsdp import shard_base

        shard_base(model, [lin.weight for _, _, lin in find_lora_factors(model)])
    olr = OrthoLoRA(
        model, T, strategy=strategy, granularity=granularity, seed=SEED, comm=comm, reduce=reduce, bucket_mb=bucket_mb
    )
    init = {n: p.detach().float().clone() for n, p in model.named_parameters() if n in lora_names}
    engine = build_engine(args, olr, model, comm, world)
    sent0 = dict(getattr(comm, "sent_bytes", {}))
    out = os.path.join(args.out, variant.replace(":", "-"))
    os.makedirs(out, exist_ok=True)

    probe = torch.randint(1, VOCAB, (2, L), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        olr.set_tasks(torch.zeros(2, dtype=torch.long))
        save_file(
            {"logits": model(input_ids=probe).logits.float().contiguous()},
            os.path.join(out, f"forward{rank}.safetensors"),
        )

    record: dict = {"orders": [], "peak_buffer_bytes": 0, "grad_norms": [], "tasks": T}
    for step in range(args.steps):
        for micro in range(args.accum):
            ids, tids = local_batch(args.accum * step + micro, rank, world)
            olr.set_tasks(tids)
            olr.backward(lm_task_losses(model, ids, tids, T) / args.accum)
        local_check = step == 0 and comm is not None and reduce == "step" and not olr.loss_only
        wrong = project_then_reduce(olr, comm) if local_check else None
        result = olr.project()
        if wrong is not None:
            right = comm.gather_regions(result.combined).reshape(-1)
            record["project_then_reduce_rel"] = float((wrong - right).norm() / right.norm())
        record["orders"].append(result.order)
        record["peak_buffer_bytes"] = olr.grads.peak_bytes
        record["buckets"] = len(getattr(olr.grads, "buckets", []))
        record["reduce_calls"] = getattr(comm, "calls", {}).get("reduce_task_grads", 0)
        engine.apply(result)
        record["grad_norms"].append(engine.last_grad_norm)
    record["sent_bytes"] = {k: v - sent0.get(k, 0) for k, v in getattr(comm, "sent_bytes", {}).items()}
    final = {n: p.detach().float().contiguous().clone() for n, p in model.named_parameters() if n in lora_names}
    save_file(final, os.path.join(out, f"rank{rank}.safetensors"))
    save_file(init, os.path.join(out, f"init{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    return record


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=["single", "ddp", "fsdp", "deepspeed"], required=True)
    p.add_argument("--variants", default="joint,ortho:factor,ortho:global,ortho:factor:eager")
    p.add_argument("--quant", default="none")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--max-grad-norm", type=float, default=0.0)
    p.add_argument("--ds-config", default="ds_configs/zero2.json")
    p.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    p.add_argument("--plugin", default="", help="a module to import first (it registers a user's strategy)")
    args = p.parse_args()
    if args.plugin:
        importlib.import_module(args.plugin)
    torch.set_num_threads(1)
    comm = None
    if args.engine != "single":
        import torch.distributed as dist

        from ortho_lora_dist.core.comm import DistComm

        if args.engine == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
        else:
            dist.init_process_group("gloo")
        comm = DistComm()
    rank, world = (comm.rank, comm.world_size) if comm else (0, 1)
    for variant in args.variants.split(","):
        run_variant(args, variant, comm, rank, world)
    if comm is not None:
        comm.dist.barrier()
        comm.dist.destroy_process_group()


if __name__ == "__main__":
    main()
