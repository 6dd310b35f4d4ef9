"""``ortho-lora launch``: ``train`` on one or many nodes via torchrun, deepspeed or accelerate (SLURM-aware)."""

from __future__ import annotations

import os
import sys


def add_parser(sub) -> None:
    la = sub.add_parser(
        "launch", help="run `train` on one or many nodes via torchrun, deepspeed or accelerate (SLURM-aware)"
    )
    la.add_argument("config", help="the YAML config to train")
    la.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train")
    la.add_argument(
        "--launcher",
        default="torchrun",
        choices=["torchrun", "deepspeed", "accelerate"],
        help="which launcher starts the ranks (default torchrun)",
    )
    la.add_argument("--nnodes", type=int, help="default: the SLURM allocation's node count, else 1")
    la.add_argument("--node-rank", type=int, help="default: SLURM_NODEID, else 0")
    la.add_argument("--nproc-per-node", type=int, help="default: GPUs per node (SLURM or visible), else 1")
    la.add_argument("--master-addr", help="default: the allocation's first node, else 127.0.0.1")
    la.add_argument("--master-port", type=int, help="default: derived from the SLURM job id, else 29500")
    la.add_argument("--accelerate-config", help="an accelerate config file (distributed_type MULTI_GPU)")
    la.add_argument("--resume", action="store_true", help="pass --resume to train (what requeued jobs do)")
    la.add_argument("--dry-run", action="store_true", help="print the exact command and exit")
    la.set_defaults(func=handle)


def handle(args) -> int:
    from ortho_lora_dist.config import ConfigError
    from ortho_lora_dist.runtime.resources import launcher_module

    plan_mod, run = launcher_module("plan"), launcher_module("run").run
    LaunchError, build_command, plan_from_args, render = (
        plan_mod.LaunchError,
        plan_mod.build_command,
        plan_mod.plan_from_args,
        plan_mod.render,
    )

    try:
        plan = plan_from_args(args, write_files=not args.dry_run)
    except (LaunchError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = build_command(plan)
    print(render(cmd), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ)
    if plan.launcher == "deepspeed":
        env.setdefault("PDSH_RCMD_TYPE", "ssh")
    return run(cmd, env)
