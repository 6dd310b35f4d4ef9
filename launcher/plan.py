"""The launch plan (nodes, ranks, rendezvous) and the exact command for each launcher."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHERS = ("torchrun", "deepspeed", "accelerate")


class LaunchError(ValueError):
    """A launch that cannot work, said before anything starts."""


@dataclass
class LaunchPlan:
    launcher: str
    config: str
    overrides: list[str]
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    nodes: list[str] = field(default_factory=list)
    job_id: str = "local"
    resume: bool = False
    hostfile: str | None = None
    accelerate_config: str | None = None

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def _train_args(plan: LaunchPlan) -> list[str]:
    return ["train", plan.config, *plan.overrides, *(["--resume"] if plan.resume else [])]


def build_command(plan: LaunchPlan) -> list[str]:
    """The command that this node runs (one launcher process per node)."""
    bindir = Path(sys.executable).parent
    if plan.launcher == "torchrun":
        return [
            str(bindir / "torchrun"),
            f"--nnodes={plan.nnodes}",
            f"--nproc-per-node={plan.nproc_per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={plan.master_addr}:{plan.master_port}",
            f"--rdzv-id={plan.job_id}",
            "--max-restarts=0",
            "-m",
            "ortho_lora_dist.cli",
            *_train_args(plan),
        ]
    if plan.launcher == "deepspeed":
        cmd = [
            str(bindir / "deepspeed"),
            f"--hostfile={plan.hostfile}",
            f"--master_addr={plan.master_addr}",
            f"--master_port={plan.master_port}",
            "--no_local_rank",
        ]
        if plan.nnodes > 1:  # each node starts its own local launcher: no ssh / pdsh needed inside SLURM
            cmd += ["--no_ssh", f"--node_rank={plan.node_rank}"]
        return cmd + ["--module", "ortho_lora_dist.cli", *_train_args(plan)]
    cmd = [
        str(bindir / "accelerate"),
        "launch",
        f"--num_machines={plan.nnodes}",
        f"--num_processes={plan.world_size}",
        f"--machine_rank={plan.node_rank}",
        f"--main_process_ip={plan.master_addr}",
        f"--main_process_port={plan.master_port}",
    ]
    if plan.accelerate_config:
        cmd.append(f"--config_file={plan.accelerate_config}")
    else:
        if plan.world_size > 1:
            cmd.append("--multi_gpu")  # accelerate's torch.distributed launch; on CPU the ranks use gloo
        # said explicitly (accelerate warns about defaults otherwise); precision is model.dtype, never accelerate's
        cmd += ["--mixed_precision=no", "--dynamo_backend=no"]
    return cmd + ["-m", "ortho_lora_dist.cli", *_train_args(plan)]


def write_hostfile(plan: LaunchPlan, directory: str | Path) -> str:
    """DeepSpeed's MPI-style hostfile: one ``host slots=N`` line per node of the allocation."""
    path = Path(directory) / f"hostfile-{plan.job_id}"
    path.parent.mkdir(parents=True, exist_ok=True)
    nodes = plan.nodes or ["localhost"]
    path.write_text("".join(f"{n} slots={plan.nproc_per_node}\n" for n in nodes))
    return str(path)


def _check(plan: LaunchPlan, engine: str) -> None:
    from ortho_lora_dist.engines import ENGINES, engine_spec

    if plan.launcher not in LAUNCHERS:
        raise LaunchError(f"--launcher must be one of {LAUNCHERS}, got {plan.launcher!r}")
    spec = engine_spec(engine)
    if plan.launcher not in spec.launchers:
        fit = [e.name for e in ENGINES.values() if plan.launcher in e.launchers]
        raise LaunchError(
            f"the {plan.launcher} launcher needs distributed.engine: {' or '.join(fit)} (the config says {engine!r}); "
            "use torchrun"
        )
    if plan.launcher == "accelerate" and plan.accelerate_config:
        import yaml

        kind = str((yaml.safe_load(Path(plan.accelerate_config).read_text()) or {}).get("distributed_type", "")).upper()
        if kind in ("FSDP", "DEEPSPEED") or kind not in spec.accelerate_types:
            raise LaunchError(
                f"{plan.accelerate_config}: distributed_type {kind} would wrap the model in accelerate's own "
                f"{kind.lower()} engine; ortho-lora runs its own (distributed.engine: {engine}). Use an accelerate "
                "config with distributed_type MULTI_GPU, or no config"
            )
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # pragma: no cover - torch is a dependency
        gpus = 0
    if gpus and plan.nproc_per_node > gpus:
        raise LaunchError(f"{plan.nproc_per_node} processes per node but this node has {gpus} GPUs")
    if not 0 <= plan.node_rank < plan.nnodes:
        raise LaunchError(f"node rank {plan.node_rank} is outside [0, {plan.nnodes - 1}]")


def plan_from_args(args: argparse.Namespace, env: dict | None = None, write_files: bool = True) -> LaunchPlan:
    """Flags first, then the SLURM allocation (inside one), then single-node defaults."""
    from ortho_lora_dist.config import load_config

    from .slurm import allocation_from_env

    env = dict(os.environ if env is None else env)
    cfg = load_config(args.config, args.overrides)  # validate before anything starts
    nodes, job_id, nnodes, node_rank, addr, port, gpus = [], "local", 1, 0, "127.0.0.1", 29500, None
    if "SLURM_JOB_ID" in env and "SLURM_JOB_NODELIST" in env:
        alloc = allocation_from_env(env)
        nodes, job_id, nnodes, node_rank = alloc.nodes, alloc.job_id, len(alloc.nodes), alloc.node_rank
        addr, port, gpus = alloc.master_addr, alloc.default_port(), alloc.gpus_per_node
    nproc = args.nproc_per_node or gpus
    if nproc is None:
        try:
            import torch

            nproc = torch.cuda.device_count() or 1
        except Exception:  # pragma: no cover
            nproc = 1
    plan = LaunchPlan(
        launcher=args.launcher,
        config=str(args.config),
        overrides=list(args.overrides),
        nnodes=args.nnodes or nnodes,
        node_rank=args.node_rank if args.node_rank is not None else node_rank,
        nproc_per_node=nproc,
        master_addr=args.master_addr or env.get("MASTER_ADDR") or addr,
        master_port=args.master_port or int(env.get("MASTER_PORT", port)),
        nodes=nodes,
        job_id=job_id,
        resume=args.resume,
        accelerate_config=getattr(args, "accelerate_config", None),
    )
    _check(plan, cfg.distributed.engine)
    if plan.launcher == "deepspeed":
        where = Path(cfg.output_dir) / ".launch"
        plan.hostfile = write_hostfile(plan, where) if write_files else str(where / f"hostfile-{plan.job_id}")
    return plan


def render(cmd: list[str]) -> str:
    return shlex.join(cmd)
