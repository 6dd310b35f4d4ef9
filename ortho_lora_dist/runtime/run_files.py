"""The names of the files in a run folder (OUTPUT_DIR) and in its adapter folder, defined once.

OUTPUT_DIR/
  .lock, .lock.json     the run lock (training/run_dir.py) and who holds it
  config.yaml           the config as trained (resolved)
  metrics.jsonl         one strict-JSON record per log step and per evaluation
  conflicts.jsonl       per-block conflict rates and pairwise cosines per log step
  blocks.json           the rows and columns of the conflict map
  trackers.json         W&B / MLflow run ids (resume continues the same runs)
  checkpoints/          step-N/ folders (training/checkpoint.py)
  adapter/              the self-describing adapter (artifacts/adapter.py)
  eval.json             the final evaluation
  finished.json         written last: the run is complete
  loss.png, leverage.png, conflicts.png   the plots (artifacts/plots.py)
"""

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CONFLICTS = "conflicts.jsonl"
BLOCKS = "blocks.json"
TRACKERS = "trackers.json"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
EVAL = "eval.json"
FINISHED = "finished.json"
LOCK = ".lock"
LOCK_OWNER = ".lock.json"
LOSS_PLOT = "loss.png"
LEVERAGE_PLOT = "leverage.png"
CONFLICT_PLOT = "conflicts.png"
RUN_FILES = (CONFIG, METRICS, CONFLICTS, BLOCKS, EVAL, FINISHED)  # what `ortho-lora eval --output` may not overwrite

# inside adapter/
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's
HEADS = "heads.safetensors"
TASKS = "tasks.json"


def head_key(task: str, rest: str) -> str:
    """The key of a task head's tensor in heads.safetensors: ``heads.{task name}.{weight|bias}``."""
    return f"heads.{task}.{rest}"
