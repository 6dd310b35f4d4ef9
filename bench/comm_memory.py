"""Bytes communicated per step and extra memory per rank of distributed Ortho-LoRA vs joint training.

Measured: ``torchrun --nproc_per_node 2 bench/comm_memory.py --measure`` trains a Llama-shaped model
(LoRA r=16 on all linear layers) for one step per T on 2 gloo ranks and reads the bytes each
collective sent (ring-algorithm accounting in DistComm) and the sizes of the tensors the step
allocated. Computed: ``python bench/comm_memory.py`` applies the same formulas to a Llama-2-7B
adapter (r=16, q/k/v/o/gate/up/down of 32 layers: P = 39,976,960) for N = 8 and 64, T = 3 and 8.
``python bench/comm_memory.py --collectives``: collectives per micro-batch of reduce 'eager' for that
adapter, one per factor (448, before bucketing) vs the buckets of layout.plan_buckets (after).

Per rank, per optimizer step (one micro-batch), fp32, B blocks, ring collectives, R = (N-1)/N:
  joint (DDP all-reduce of the P grads):      sent 2 R P
  ortho, replicated LoRA (torch/DDP, FSDP2):  sent R T P (per-task reduce) + 2 R B T^2 (Grams) + R P (all-gather)
  ortho, DeepSpeed ZeRO-2:                    sent R T P + 2 R B T^2 on top of ZeRO-2's own 2 R P
  a loss-only rule (famo, initial_loss):      sent R P + R P = joint's 2 R P (one gradient; --measure rows
                                              with "strategy": "famo"; "ortho_sent" is then that rule's bytes)
Extra memory per rank over joint:
  reduce 'step':  local per-task buffer T P + reduced region T P / N + combined P / N
  reduce 'eager': owned region T P / N + buckets in flight (<= max(T P / 8N, one factor)) + combined P / N
  torch/FSDP2 engines also hold the gathered combined gradient (P) but never form joint's summed P
  gradients, so these cancel; DeepSpeed forms its own gradient buffers in joint and ortho alike.
The goal for the sharded case is T P / N + P extra floats.
"""

from __future__ import annotations

import argparse
import json

LLAMA2_7B = dict(hidden=4096, inter=11008, layers=32, r=16)


def lora_factors_7b(hidden=4096, inter=11008, layers=32, r=16) -> list[int]:
    shapes = [(hidden, hidden)] * 4 + [(hidden, inter)] * 2 + [(inter, hidden)]  # (in, out) per module
    return [n for _ in range(layers) for i, o in shapes for n in (r * i, o * r)]


def formulas(P: int, B: int, T: int, N: int, largest: int, policy: str, engine: str) -> dict:
    R = (N - 1) / N
    joint_sent = 2 * R * P * 4  # DDP all-reduce; ZeRO-2: reduce-scatter of grads + all-gather of params
    buffer = T * P + T * P / N if policy == "step" else T * P / N + max(T * P / N / 8, T * largest)
    if engine == "deepspeed":  # DeepSpeed's own gradient reduction and buffers are there in joint too
        ortho_sent = (R * T * P + 2 * R * B * T * T) * 4 + joint_sent
        extra = buffer + P / N + B * T * T
    else:  # the P summed gradients of joint are never formed; the combined one is all-gathered instead
        ortho_sent = (R * T * P + R * P + 2 * R * B * T * T) * 4
        extra = buffer + P / N + P + B * T * T - P
    return row(P, T, N, B, policy, engine, joint_sent, ortho_sent, extra * 4)


def row(P, T, N, B, policy, engine, joint_sent, ortho_sent, extra_bytes, **more) -> dict:
    return {
        "P": P,
        "T": T,
        "N": N,
        "blocks": B,
        "reduce": policy,
        "engine": engine,
        "joint_sent_MB": round(joint_sent / 2**20, 3),
        "ortho_sent_MB": round(ortho_sent / 2**20, 3),
        "sent_ratio": round(ortho_sent / joint_sent, 2),
        "extra_MB": round(extra_bytes / 2**20, 2),
        "extra_floats_over_P": round(extra_bytes / 4 / P, 3),
        "goal_floats_over_P": round(T / N + 1, 3),
        **more,
    }


def buckets_7b(T: int, N: int, bucket_mb: float = 25.0, **shape) -> list[int]:
    """Values per eager bucket (layout.plan_buckets) of the Llama-2-7B adapter, built on the meta device."""
    from torch import nn

    from ortho_lora_dist.core.layout import build_layout, plan_buckets

    shape = {**LLAMA2_7B, **shape}
    h, i, r = shape["hidden"], shape["inter"], shape["r"]
    mods = [(h, h)] * 4 + [(h, i)] * 2 + [(i, h)]
    lins = [
        (f"layers.{layer}.m{m}", fac, nn.Linear(*((d_in, r) if fac == "A" else (r, d_out)), bias=False, device="meta"))
        for layer in range(shape["layers"])
        for m, (d_in, d_out) in enumerate(mods)
        for fac in "AB"
    ]
    layout = build_layout(lins, "factor", N)
    return [b.size for b in plan_buckets(layout, T, int(bucket_mb * 2**20) // 4)]


def eager_collectives(T_values, N_values=(2, 8, 64)) -> None:
    """Computed, 7B: collectives per micro-batch of reduce 'eager', one per factor (before) vs bucketed (after)."""
    sizes = lora_factors_7b(**LLAMA2_7B)
    for N in N_values:
        for T in T_values:
            b = buckets_7b(T, N)
            print(
                json.dumps(
                    {
                        "computed": "llama2-7b r=16 all linear",
                        "P": sum(sizes),
                        "T": T,
                        "N": N,
                        "collectives_per_micro_batch_before": len(sizes),
                        "collectives_per_micro_batch_after": len(b),
                        "largest_bucket_MB": round(max(b) * 4 / 2**20, 2),
                        "region_MB": round(T * sum(sizes) * 4 / N / 2**20, 1),
                        "sent_MB_per_micro_batch": round((N - 1) / N * T * sum(sizes) * 4 / 2**20, 1),
                    }
                )
            )


def measure(T_values) -> None:
    import torch
    import torch.distributed as dist

    from bench.step_time import build, task_losses
    from ortho_lora_dist import OrthoLoRA
    from ortho_lora_dist.core.comm import DistComm

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    args = argparse.Namespace(vocab=2000, hidden=256, layers=4, seq=64, rank=16, model=None)
    for T in T_values:
        for policy, strategy in (("step", "ortho"), ("eager", "ortho"), ("step", "famo"), ("eager", "famo")):
            model = build(args)
            comm = DistComm()
            olr = OrthoLoRA(model, T, comm=comm, reduce=policy, strategy=strategy, granularity="factor")
            ids = torch.randint(0, args.vocab, (T, args.seq), generator=torch.Generator().manual_seed(comm.rank))
            olr.set_tasks(torch.arange(T))
            olr.backward(task_losses(model, ids, torch.arange(T), T))
            per_micro = dict(comm.calls)  # collectives launched during the micro-batch's backward
            result = olr.project()
            olr.write_grads(result)
            P, N = olr.layout.numel, comm.world_size
            region = olr.grad_tasks * olr.layout.region_size * 4 if policy == "step" else 0  # reduce-scatter output
            extra = (
                olr.grads.peak_bytes
                + region
                + result.combined.nbytes
                + N * result.combined.nbytes
                + result.grams.nbytes
                - P * 4
            )
            sent = sum(comm.sent_bytes.values())
            out = row(
                P,
                T,
                N,
                olr.layout.num_blocks,
                policy,
                "torch",
                2 * (N - 1) / N * P * 4,
                sent,
                extra,
                measured=True,
                strategy=strategy,
                per_collective_MB={k: round(v / 2**20, 3) for k, v in comm.sent_bytes.items()},
                collectives_per_micro_batch=sum(per_micro.values()),
                lora_factors=len(olr.layout.factors),
                collectives_per_step=dict(comm.calls),
            )
            if comm.rank == 0:
                print(json.dumps(out))
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="measure on the ranks of this torchrun launch")
    p.add_argument("--tasks", type=int, nargs="+", default=[3, 8])
    p.add_argument("--collectives", action="store_true", help="computed, 7B: eager collectives per micro-batch")
    args = p.parse_args(argv)
    if args.measure:
        measure(args.tasks)
        return
    if args.collectives:
        eager_collectives(args.tasks)
        return
    sizes = lora_factors_7b(**LLAMA2_7B)
    for N in (8, 64):
        for T in args.tasks:
            for policy in ("step", "eager"):
                for engine in ("torch", "deepspeed"):
                    print(json.dumps(formulas(sum(sizes), len(sizes), T, N, max(sizes), policy, engine)))


if __name__ == "__main__":
    main()
