"""One training run for the exactness tests: ``python tests/dist_worker.py`` (single process) or under
``torchrun --nproc_per_node 2`` / the ``deepspeed`` launcher. Writes the final LoRA weights per rank.

The global batch of step s holds ROWS samples of every task; rank r of N takes rows
[r*ROWS/N, (r+1)*ROWS/N) of each task, so the single-process run sees exactly the union.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ortho_lora_dist import OrthoLoRA  # noqa: E402
from ortho_lora_dist.blocks import block_grams, combine_region  # noqa: E402
from ortho_lora_dist.order import TaskOrder  # noqa: E402
from ortho_lora_dist.projection import combine_weights  # noqa: E402
from tests.models import VOCAB, lm_task_losses, lora_llama  # noqa: E402

T, ROWS, L = 3, 4, 8


def global_batch(step: int, conflict: bool):
    ids = []
    for t in range(T):
        gen = torch.Generator().manual_seed(1000 * step + t)
        rows = torch.randint(1, VOCAB, (ROWS, L), generator=gen)
        if conflict and t == 1:  # task 1's rank-0 half copies task 0 shifted: local/global conflicts differ
            rows[: ROWS // 2] = ids[0][: ROWS // 2].roll(1, dims=1)
        ids.append(rows)
    return ids


def local_batch(step, rank, world, conflict):
    per = ROWS // world
    parts = [x[rank * per : (rank + 1) * per] for x in global_batch(step, conflict)]
    return torch.cat(parts), torch.arange(T).repeat_interleave(per)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=["single", "ddp", "fsdp", "deepspeed"], required=True)
    p.add_argument("--strategy", default="ortho")
    p.add_argument("--granularity", default="factor")
    p.add_argument("--quant", default="none")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--ds-config", default="ds_configs/zero2.json")
    p.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = p.parse_args()
    torch.set_num_threads(1)
    comm = None
    if args.engine != "single":
        import torch.distributed as dist

        if args.engine == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
        else:
            dist.init_process_group("gloo")
        from ortho_lora_dist.comm import DistComm

        comm = DistComm()
    rank, world = (comm.rank, comm.world_size) if comm else (0, 1)

    torch.manual_seed(0)
    quant = None if args.quant == "none" else args.quant
    model = lora_llama(args.model, quant=quant, storage=torch.bfloat16 if quant else None)
    model.train()
    lora_names = [n for n, p_ in model.named_parameters() if p_.requires_grad]
    if args.engine == "fsdp":
        from ortho_lora_dist.capture import find_lora_factors
        from ortho_lora_dist.engines.fsdp import shard_base

        keep = [lin.weight for _, _, lin in find_lora_factors(model)]
        shard_base(model, keep)
    olr = OrthoLoRA(model, T, strategy=args.strategy, granularity=args.granularity, seed=7, comm=comm)
    lr = 1e-2
    if args.engine == "deepspeed":
        import deepspeed

        from ortho_lora_dist.engines.deepspeed_engine import DeepSpeedAdapter, load_ds_config

        cfg = load_ds_config(args.ds_config, micro_batch=ROWS * T // world, world_size=world, grad_clip=0.0, lr=lr)
        opt = torch.optim.AdamW(olr.lora_params, lr=lr, weight_decay=0.01)
        ds_engine, *_ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=olr.lora_params, config=cfg)
        engine = DeepSpeedAdapter(olr, ds_engine)
    else:
        from ortho_lora_dist.engines import TorchEngine

        if comm is not None:
            from ortho_lora_dist.engines.base import broadcast_trainable_

            broadcast_trainable_(model)
        engine = TorchEngine(olr, torch.optim.AdamW(olr.lora_params, lr=lr, weight_decay=0.01))

    probe = torch.randint(1, VOCAB, (2, L), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        olr.set_tasks(torch.zeros(2, dtype=torch.long))
        logits = model(input_ids=probe).logits.float()
    save_file({"logits": logits.contiguous()}, os.path.join(args.out, f"forward{rank}.safetensors")) if os.makedirs(args.out, exist_ok=True) is None else None
    record = {"orders": [], "project_then_reduce_rel": None}
    for step in range(args.steps):
        for micro in range(args.accum):
            ids, tids = local_batch(args.accum * step + micro, rank, world, conflict=True)
            olr.set_tasks(tids)
            losses = lm_task_losses(model, ids, tids, T)
            record.setdefault("losses", []).append(losses.tolist())
            olr.backward(losses / args.accum)
        if step == 0 and comm is not None:
            # what a wrong implementation would hand over: project locally, then average across ranks
            # (local Grams, same order as the real step draws; the local buffer holds every region)
            order = TaskOrder(T, 7).next() if step == 0 else None
            wrong = torch.cat([
                combine_region(olr.buffer[r], r, olr.layout,
                               combine_weights(block_grams(olr.buffer[r], r, olr.layout), order))
                for r in range(world)
            ])
            comm.dist.all_reduce(wrong)
            wrong /= world
        result = olr.project()
        record["orders"].append(result.order)
        record.setdefault("gnorm", []).append(result.task_grad_norms.tolist())
        if step == 0 and comm is not None:
            right = comm.gather_regions(result.combined).reshape(-1)
            record["project_then_reduce_rel"] = float((wrong - right).norm() / right.norm())
        engine.apply(result)

    sd = {n: p_.detach().float().contiguous().clone() for n, p_ in model.named_parameters() if n in lora_names}
    os.makedirs(args.out, exist_ok=True)
    save_file(sd, os.path.join(args.out, f"rank{rank}.safetensors"))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    if comm is not None:
        comm.dist.barrier()
        comm.dist.destroy_process_group()


if __name__ == "__main__":
    main()
