"""What a SLURM allocation says about the nodes: names (via ``scontrol show hostnames``), this node's
rank, devices per node. Read only from the environment SLURM sets and from scontrol."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class SlurmAllocation:
    job_id: str
    nodes: list[str]
    node_rank: int
    gpus_per_node: int | None

    @property
    def master_addr(self) -> str:
        return self.nodes[0]

    def default_port(self) -> int:
        """A port derived from the job id, so every node of the job picks the same one."""
        digits = re.sub(r"\D", "", self.job_id) or "0"
        return 20000 + int(digits) % 20000


def in_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ and "SLURM_JOB_NODELIST" in os.environ


def hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``n[1-3],gpu7``) with scontrol, as SLURM itself does."""
    if shutil.which("scontrol") is None:
        raise RuntimeError("inside a SLURM job but scontrol is not on PATH: cannot expand SLURM_JOB_NODELIST")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True).stdout
    return [h for h in out.split() if h]


def _gpus(env: dict) -> int | None:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key)
        if value:
            m = re.search(r"(\d+)\s*$", value)  # "4" or "a100:4"
            if m:
                return int(m.group(1))
    return None


def allocation_from_env(env: dict | None = None) -> SlurmAllocation:
    env = dict(os.environ if env is None else env)
    nodes = hostnames(env["SLURM_JOB_NODELIST"])
    node_rank = int(env.get("SLURM_NODEID", "0"))
    if not 0 <= node_rank < len(nodes):
        raise RuntimeError(f"SLURM_NODEID={node_rank} is outside the {len(nodes)} nodes of the allocation")
    return SlurmAllocation(env["SLURM_JOB_ID"], nodes, node_rank, _gpus(env))
