"""Where each LoRA factor lives in the per-task gradient buffer, and which block it projects in.

The buffer is [N, T * n]: N regions (one per data-parallel rank, N = 1 in one process) of n columns
each, holding whole factors. Inside a region, factor f occupies the contiguous span
[T * offset, T * (offset + numel)) as a row-major [T, numel] matrix, so every factor's per-task
gradients are one contiguous tensor (in-place matmuls, per-factor reductions without copies) and a
reduce-scatter of the flat buffer hands rank r its region without copies. Region r is the part of
the global per-task gradients that rank r reduces, projects and hands to its engine. Factors are
split into N contiguous runs of near-equal size.

Granularity (the paper's "structure-aware decoupling" is ``factor``):
  factor  every lora_A weight and every lora_B weight is its own block (default, the paper)
  module  lora_A and lora_B of one LoRA layer form one block
  global  all LoRA parameters form one block (flat PCGrad, the paper's "naive" variant)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from torch import nn

Granularity = Literal["factor", "module", "global"]
GRANULARITIES: tuple[str, ...] = ("factor", "module", "global")


@dataclass(frozen=True)
class LoraFactor:
    """One LoRA factor weight: its module path, factor ('A' or 'B'), region and columns [offset, offset+numel)."""

    name: str
    layer_name: str
    factor: str
    module: nn.Linear
    region: int
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
    num_regions: int = 1
    region_size: int = 0  # n: columns per region (the largest region; the others are zero-padded)

    @property
    def numel(self) -> int:
        return sum(f.numel for f in self.factors)

    def region_factors(self, region: int) -> list[tuple[LoraFactor, int]]:
        """(factor, block) for the factors stored in ``region`` (computed once; read twice every step)."""
        return self._by_region[region]

    @cached_property
    def _by_region(self) -> list[list[tuple[LoraFactor, int]]]:
        out: list[list[tuple[LoraFactor, int]]] = [[] for _ in range(self.num_regions)]
        for f, b in zip(self.factors, self.block_of.tolist()):
            out[f.region].append((f, b))
        return out

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def block_factor_kind(self) -> list[str]:
        """'A', 'B' or 'AB' per block (for telemetry grouped by factor)."""
        kinds: list[set[str]] = [set() for _ in self.block_names]
        for f, b in zip(self.factors, self.block_of.tolist()):
            kinds[b].add(f.factor)
        return ["".join(sorted(k)) for k in kinds]


def factor_rows(region: torch.Tensor, f: LoraFactor, num_tasks: int, base: int = 0) -> torch.Tensor:
    """[T, numel] contiguous view of factor f's per-task gradients inside a flat [T * n] region (or a slice of
    it starting at column ``base``, e.g. a reduce bucket)."""
    lo = num_tasks * f.offset - base
    return region[lo : lo + num_tasks * f.numel].view(num_tasks, f.numel)


def _split(sizes: list[int], parts: int) -> list[int]:
    """Region of each item: contiguous runs whose sums are close to total / parts."""
    total, acc, regions = sum(sizes), 0, []
    for n in sizes:
        regions.append(min(parts - 1, int((acc + n / 2) * parts // max(total, 1))))
        acc += n
    return regions


def build_layout(lora_modules: list[tuple[str, str, nn.Linear]], granularity: str, num_regions: int = 1) -> Layout:
    """Assign regions, offsets and blocks to ``(layer_name, factor, linear)`` triples, in the given order."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not lora_modules:
        raise ValueError("the model has no trainable LoRA factors (did target_modules match nothing?)")
    sizes = [lin.weight.numel() for _, _, lin in lora_modules]
    regions = _split(sizes, num_regions)
    fill = [0] * num_regions
    factors, blocks, names = [], [], {}
    for (layer_name, factor, linear), n, r in zip(lora_modules, sizes, regions):
        factors.append(LoraFactor(f"{layer_name}.lora_{factor}", layer_name, factor, linear, r, fill[r], n))
        fill[r] += n
        key = {"factor": f"{layer_name}.lora_{factor}", "module": layer_name, "global": "all"}[granularity]
        blocks.append(names.setdefault(key, len(names)))
    return Layout(
        tuple(factors), torch.tensor(blocks, dtype=torch.long), tuple(names), granularity, num_regions, max(fill)
    )


@dataclass(frozen=True)
class Bucket:
    """Factors reduced by one collective: consecutive in backward order, one region, span [lo, hi) of the flat
    region."""

    region: int
    factors: tuple[int, ...]  # factor indices, in the order backward completes them
    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo


# A bucket holds at most 1/REGION_PARTS of a region, so that the buckets a non-owner keeps in flight stay a small
# fraction of the owned region (the T * P / N memory of reduce policy 'eager'), whatever bucket_mb says.
REGION_PARTS = 16


def plan_buckets(layout: Layout, num_tasks: int, cap_values: int) -> list[Bucket]:
    """Group factors, in reverse layout order (backward's), into buckets of <= min(cap, T n / REGION_PARTS) values.

    A bucket never spans two regions (its reduce goes to one owner) and holds at least one factor.
    """
    T = num_tasks
    cap = max(1, min(cap_values, T * layout.region_size // REGION_PARTS))
    buckets: list[Bucket] = []
    cur: list[int] = []

    def close() -> None:
        if cur:
            first, last = layout.factors[cur[-1]], layout.factors[cur[0]]  # lowest / highest offset
            buckets.append(Bucket(first.region, tuple(cur), T * first.offset, T * (last.offset + last.numel)))
            cur.clear()

    size = 0
    for i in reversed(range(len(layout.factors))):
        f = layout.factors[i]
        if cur and (f.region != layout.factors[cur[-1]].region or size + T * f.numel > cap):
            close()
            size = 0
        cur.append(i)
        size += T * f.numel
    close()
    return buckets
