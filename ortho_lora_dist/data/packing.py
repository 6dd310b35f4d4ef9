"""Sequence packing: the samples of a micro-batch laid whole into rows of at most ``capacity`` tokens.

Inside a row the samples follow one another and ``position_ids`` restart at 0 at each: transformers' masking reads
sample boundaries from them (sdpa / eager: a block-diagonal causal mask, ``find_packed_sequence_indices``;
FlashAttention-2: varlen ``cu_seqlens`` from the position ids), so attention stays inside each sample. The first
token of every sample gets no label (unpacked, the shift drops it; packed, it would make the previous sample's
last token predict it). The padding at a row's end is a sequence of its own (positions 0, 1, ...), in no task
(``token_task_ids`` -1) and without labels: nothing real attends to it, so it changes no loss and no gradient.
"""

from __future__ import annotations

import torch

IGNORE = -100


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices with sum of lengths <= capacity: longest sample first, each into the first row with
    room (ties keep the original order; a row's samples in the original order)."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a row of {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return [sorted(r) for r in rows]


def pack(
    ids: list[list[int]], labels: list[list[int]], task_ids: list[int], capacity: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Packed rows [R, W] (W: the fullest row): input_ids, position_ids, labels, token_task_ids (-1: padding)."""
    rows = first_fit_decreasing([len(x) for x in ids], capacity)
    width = max(sum(len(ids[i]) for i in row) for row in rows)
    out = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE, dtype=torch.long),
        "token_task_ids": torch.full((len(rows), width), -1, dtype=torch.long),
    }
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(ids[i])
            out["input_ids"][r, at : at + n] = torch.tensor(ids[i])
            out["position_ids"][r, at : at + n] = torch.arange(n)
            out["labels"][r, at + 1 : at + n] = torch.tensor(labels[i][1:])
            out["token_task_ids"][r, at : at + n] = task_ids[i]
            at += n
        out["position_ids"][r, at:] = torch.arange(width - at)
    return out


def efficiency(batch: dict[str, torch.Tensor]) -> float:
    """Real tokens / all tokens of the rows (1.0: no padding)."""
    if "token_task_ids" in batch:
        return float((batch["token_task_ids"] >= 0).float().mean())
    return float(batch["attention_mask"].float().mean())
