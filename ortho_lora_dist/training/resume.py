"""What a resumed run may change from the checkpoint's config, and the refusal when it changes more.

Changeable on resume (they do not alter what the finished steps computed):
  train.steps / train.epochs (extend or shorten the run), train.log_every, train.eval_every,
  train.checkpoint_every, train.keep_checkpoints, train.plots, train.report_to, train.max_consecutive_skips,
  train.bucket_mb (groups the same sums into other collectives),
  train.per_task_batch_size together with the number of ranks when the global batch
  (ranks x per_task_batch_size) stays the same (with drawn task shares the samples from there on differ from an
  uninterrupted run's; DeepSpeed keeps its own number of ranks), tasks.N.max_eval_samples, output_dir,
  distributed.backend.
Everything else (model, LoRA, tasks and their order, data, strategy, lr, schedule, seed, engine, ...)
must be equal: a difference is refused with one error listing every differing key and both values.
"""

from __future__ import annotations

import re
from typing import Any

from ortho_lora_dist.config import Config
from ortho_lora_dist.engines import EngineSpec

MUTABLE = (
    r"train\.steps",
    r"train\.epochs",
    r"train\.log_every",
    r"train\.eval_every",
    r"train\.checkpoint_every",
    r"train\.keep_checkpoints",
    r"train\.plots",
    r"train\.max_consecutive_skips",
    r"train\.per_task_batch_size",
    r"train\.eval_batch_size",
    r"tasks\.\d+\.max_eval_samples",
    r"output_dir",
    r"distributed\.backend",
    r"train\.report_to(?:\.\d+)?",
    r"train\.bucket_mb",
    r"train\.tracking\..*",  # the trackers' names: the resumed run continues the same tracker runs
    r"train\.packing",  # the same samples and math either way (float rounding aside)
)
_MUTABLE = re.compile("|".join(f"(?:{m})" for m in MUTABLE))


class ResumeMismatch(ValueError):
    """The config differs from the checkpoint's in keys that may not change on resume."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": [1, 2]}} -> {"a.b.0": 1, "a.b.1": 2} (empty containers kept as values)."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and tree:
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def with_defaults(saved: dict) -> dict:
    """The checkpoint's config as this version reads it: keys added since it was written take their defaults."""
    try:
        return Config.model_validate(saved).model_dump()
    except ValueError:  # a key this version no longer knows: compare as saved (the difference is then listed)
        return saved


def check_resume(saved: dict, current: dict, saved_world: int, world: int, where: str) -> None:
    """Raise ResumeMismatch listing every key (besides the changeable ones) whose value differs."""
    saved = with_defaults(saved)
    old_names = [t["name"] for t in saved.get("tasks", [])]
    new_names = [t["name"] for t in current.get("tasks", [])]
    if old_names != new_names:
        raise ResumeMismatch(
            f"--resume: the tasks differ from the checkpoint {where}: {old_names} there, {new_names} now "
            "(heads, optimizer state and sampler positions belong to the tasks by name and order); "
            "resume with the same tasks in the same order, or start a new output_dir"
        )
    old, new = flatten(saved), flatten(current)
    diffs = [
        f"  {k}: {old.get(k, '<unset>')!r} in the checkpoint, {new.get(k, '<unset>')!r} now"
        for k in sorted(set(old) | set(new))
        if old.get(k, "<unset>") != new.get(k, "<unset>") and not _MUTABLE.fullmatch(k)
    ]
    if diffs:
        raise ResumeMismatch(
            f"--resume: the config differs from the one the checkpoint {where} was trained with:\n"
            + "\n".join(diffs)
            + "\nput those keys back (only steps/epochs, logging, eval and checkpoint frequency may change), "
            "or start a new output_dir"
        )
    old_batch = saved["train"]["per_task_batch_size"] * saved_world
    new_batch = current["train"]["per_task_batch_size"] * world
    if old_batch != new_batch:
        raise ResumeMismatch(
            f"--resume: the global batch per task would change from {old_batch} ({saved_world} ranks x "
            f"per_task_batch_size {saved['train']['per_task_batch_size']}) to {new_batch} ({world} ranks x "
            f"{current['train']['per_task_batch_size']}); set train.per_task_batch_size={old_batch // world} "
            f"if {old_batch} divides by {world}, or resume on {saved_world} ranks"
            if old_batch % world == 0
            else f"--resume: the global batch per task would change from {old_batch} ({saved_world} ranks x "
            f"{saved['train']['per_task_batch_size']}) to {new_batch} ({world} ranks x "
            f"{current['train']['per_task_batch_size']}), and {old_batch} does not divide by {world} ranks: "
            f"resume on {saved_world} ranks (or a divisor of {old_batch})"
        )


def check_engine_resume(engine: EngineSpec, saved_world: int, world: int, where: str) -> None:
    """An engine whose optimizer state is partitioned by rank (ZeRO-2) resumes on its own number of ranks."""
    if engine.partitioned_state and saved_world != world:
        raise ResumeMismatch(
            f"--resume: {where} was written by {saved_world} ranks of engine {engine.name} and this run has {world}: "
            f"{engine.partitioned_state}, so resume it on {saved_world} ranks, or warm-start a new "
            "run on any number of ranks from its adapter (train.init_adapter: OUTPUT_DIR/adapter, a new optimizer)"
        )
