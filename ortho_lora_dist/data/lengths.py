"""What happens to a causal-LM sample longer than ``model.max_length``: decided once, before training, per task.

``model.truncation``:
  drop      (default, as axolotl does) the training sample is left out; counted and logged once per task
  truncate  the sample is kept, cut to max_length: the prompt keeps its END (what leads into the answer) and at
            least min(its length, max_length // 2) tokens, the answer keeps its HEAD in the rest (no EOS once cut)
  error     the run is refused at load (exit 2), naming the task, how many samples and the first one

The policy applies to the training split. Evaluation keeps every sample (metrics must stay comparable): its loss
reads over-long samples as ``truncate`` does, generation and scoring read the prompt cut from the left. Rows never
exceed max_length, padded or packed, so packing never meets a sample that does not fit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ortho_lora_dist.data.errors import DataError
from ortho_lora_dist.data.loading import TaskData

POLICIES = ("drop", "truncate", "error")
log = logging.getLogger("ortho_lora_dist")


def fit(n_prompt: int, n_answer: int, max_length: int) -> tuple[int, int]:
    """(prompt tokens kept from its end, answer tokens kept from its head) so that the sum <= max_length."""
    if n_prompt + n_answer <= max_length:
        return n_prompt, n_answer
    keep_prompt = min(n_prompt, max(max_length // 2, max_length - n_answer))
    return keep_prompt, max_length - keep_prompt


def apply_length_policy(
    tasks: list[TaskData],
    lengths: Callable[[int, TaskData], list[int]],
    max_length: int,
    policy: str,
    announce: bool = True,
) -> list[TaskData]:
    """The tasks with the policy applied to their training split; ``lengths(i, task)``: the full token length
    (prompt + answer + EOS) of every training sample of task i. One log line per task with over-long samples."""
    if policy not in POLICIES:
        raise ValueError(f"model.truncation must be one of {POLICIES}, got {policy!r}")
    for i, task in enumerate(tasks):
        train = task.splits.get("train")
        if train is None or not len(train):
            continue
        sizes = lengths(i, task)
        over = [j for j, n in enumerate(sizes) if n > max_length]
        if not over:
            continue
        what = f"task {task.name!r}: {len(over)} of {len(sizes)} training samples over {max_length} tokens"
        if policy == "error":
            raise DataError(
                f"{what} (model.max_length; the first is record {over[0]}, {sizes[over[0]]} tokens): raise "
                "model.max_length, or set model.truncation: drop (leave them out) or truncate (keep their head)"
            )
        if policy == "drop":
            if len(over) == len(sizes):
                raise DataError(f"{what}: every one; model.truncation: drop would leave none. Raise model.max_length")
            drop = set(over)
            task.splits["train"] = train.select(j for j in range(len(sizes)) if j not in drop)
        if announce:
            log.info(
                "%s (model.max_length): %s (model.truncation: %s)",
                what,
                {"drop": "dropped", "truncate": "truncated"}[policy],
                policy,
            )
    return tasks
