"""Where each LoRA factor lives in the flat [T, P] per-task gradient buffer, and which block it projects in.

Granularity (the paper's "structure-aware decoupling" is ``factor``):
  factor  every lora_A weight and every lora_B weight is its own block (default, the paper)
  module  lora_A and lora_B of one LoRA layer form one block
  global  all LoRA parameters form one block (flat PCGrad, the paper's "naive" variant)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Granularity = Literal["factor", "module", "global"]
GRANULARITIES: tuple[str, ...] = ("factor", "module", "global")


@dataclass(frozen=True)
class LoraFactor:
    """One LoRA factor weight: its module path, factor ('A' or 'B'), slice [offset, offset+numel) of P."""

    name: str
    layer_name: str
    factor: str
    module: nn.Linear
    offset: int
    numel: int

    @property
    def param(self) -> nn.Parameter:
        return self.module.weight


@dataclass(frozen=True)
class Layout:
    """All LoRA factors of a model in buffer order, with the block index of each."""

    factors: tuple[LoraFactor, ...]
    block_of: torch.Tensor  # [n_factors] long: block index of each factor
    block_names: tuple[str, ...]
    granularity: str

    @property
    def numel(self) -> int:
        return sum(f.numel for f in self.factors)

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def block_factor_kind(self) -> list[str]:
        """'A', 'B' or 'AB' per block (for telemetry grouped by factor)."""
        kinds: list[set[str]] = [set() for _ in self.block_names]
        for f, b in zip(self.factors, self.block_of.tolist()):
            kinds[b].add(f.factor)
        return ["".join(sorted(k)) for k in kinds]


def build_layout(lora_modules: list[tuple[str, str, nn.Linear]], granularity: str) -> Layout:
    """Assign offsets and blocks to ``(layer_name, factor, linear)`` triples, in the given order."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not lora_modules:
        raise ValueError("the model has no trainable LoRA factors (did target_modules match nothing?)")
    factors, blocks, names = [], [], {}
    offset = 0
    for layer_name, factor, linear in lora_modules:
        n = linear.weight.numel()
        factors.append(LoraFactor(f"{layer_name}.lora_{factor}", layer_name, factor, linear, offset, n))
        offset += n
        key = {"factor": f"{layer_name}.lora_{factor}", "module": layer_name, "global": "all"}[granularity]
        blocks.append(names.setdefault(key, len(names)))
    return Layout(tuple(factors), torch.tensor(blocks, dtype=torch.long), tuple(names), granularity)
