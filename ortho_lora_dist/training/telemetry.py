"""Run telemetry (rank 0): metrics.jsonl (one JSON object per logged step, always), conflicts.jsonl (per-block
conflict rate per logged step, for the heat map) and the trackers of ``train.report_to``: TensorBoard,
Weights & Biases, MLflow, each through its own API.

Resume: TensorBoard hides the events after the resume step (purge_step); the W&B and MLflow run ids are kept
in ``output_dir/trackers.json``, so a resumed run continues the same W&B run (``resume="allow"``) and the same
MLflow run. W&B reads its mode, project and entity from the environment (WANDB_MODE=offline,
WANDB_PROJECT, ...), MLflow its tracking URI and experiment (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ortho_lora_dist.config import missing_trackers
from ortho_lora_dist.runtime import jsonio
from ortho_lora_dist.runtime import run_files as rf
from ortho_lora_dist.runtime.fsutil import atomic_write_text

RUN_IDS = rf.TRACKERS


class TrackerError(RuntimeError):
    """A tracker of train.report_to cannot start (not installed, or its store refuses the run)."""


def _keep_until(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (written after the checkpoint a run resumes from), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut by a kill
            continue
    atomic_write_text(path, "".join(x + "\n" for x in kept))


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """{"loss": {"a": 1.0}, "lr": 0.1, "step": 3} -> {"loss/a": 1.0, "lr": 0.1} (numbers only; step left out)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            out[name] = float(value)
    return out


class _TensorBoard:
    def __init__(self, out: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step is not None else None  # TensorBoard hides events after the resume point
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=purge)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def _tracking(config: dict | None) -> dict:
    """train.tracking of the run's config (empty for configs written before it existed)."""
    return ((config or {}).get("train") or {}).get("tracking") or {}


class _WandB:
    def __init__(self, out: Path, run_id: str | None, config: dict | None) -> None:
        import wandb

        self.wandb = wandb
        names = _tracking(config)
        self.run = wandb.init(
            project=names.get("project") or os.environ.get("WANDB_PROJECT", "ortho-lora"),
            entity=names.get("entity"),  # None: WANDB_ENTITY / the user's default
            name=names.get("run_name") or os.environ.get("WANDB_NAME") or out.name,
            group=names.get("group"),  # None: WANDB_RUN_GROUP
            tags=names.get("tags") or None,  # None: WANDB_TAGS
            dir=str(out),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(quiet=not os.environ.get("ORTHO_LORA_VERBOSE")),  # no run-history table in logs
        )
        # our step is a metric (x axis), not wandb's own counter: a resumed run re-logs steps after its checkpoint
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")
        self.id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "train/step": step})

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, out: Path, run_id: str | None, config: dict | None) -> None:
        import mlflow

        self.mlflow = mlflow
        names = _tracking(config)
        tags = {t: "true" for t in names.get("tags") or []} | ({"group": names["group"]} if names.get("group") else {})
        try:
            if names.get("project") and not run_id and not os.environ.get("MLFLOW_EXPERIMENT_NAME"):
                mlflow.set_experiment(names["project"])
            if run_id:
                run = mlflow.start_run(run_id=run_id)
            else:
                run = mlflow.start_run(run_name=names.get("run_name") or out.name, tags=tags or None)
        except Exception as e:
            raise TrackerError(
                f"train.report_to: mlflow cannot start a run at {mlflow.get_tracking_uri()!r} ({e}); "
                "set MLFLOW_TRACKING_URI (a server, or a store this mlflow accepts)"
            ) from None
        self.id = run.info.run_id
        if run_id is None and config:
            train = config.get("train", {})
            mlflow.log_params(
                {
                    "model": config.get("model", {}).get("name_or_path"),
                    "strategy": train.get("strategy"),
                    "granularity": train.get("granularity"),
                    "lr": train.get("lr"),
                    "tasks": ",".join(t.get("name", "") for t in config.get("tasks", [])),
                    "output_dir": str(out),
                }
            )

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class Telemetry:
    """``resume_step``: None for a new run (files start empty); else the step resumed from (later records dropped).

    ``report_to``: trackers besides metrics.jsonl; ``config``: the run's config (W&B config, MLflow params).
    """

    def __init__(
        self,
        output_dir: str | Path,
        task_names: list[str],
        enabled: bool,
        resume_step: int | None = None,
        report_to=("tensorboard",),
        config: dict | None = None,
    ) -> None:
        self.enabled, self.task_names = enabled, task_names
        self.dir = Path(output_dir)
        self.trackers: dict = {}
        if not enabled:
            return
        missing = missing_trackers(report_to)
        if missing:
            raise TrackerError(f"train.report_to: {'; '.join(missing)}")
        self.dir.mkdir(parents=True, exist_ok=True)
        ids = self._run_ids() if resume_step is not None else {}
        try:  # trackers first: one that cannot start fails the run before any file is opened
            for name in dict.fromkeys(report_to):
                if name == "tensorboard":
                    self.trackers[name] = _TensorBoard(self.dir, resume_step)
                elif name == "wandb":
                    self.trackers[name] = _WandB(self.dir, ids.get("wandb"), config)
                elif name == "mlflow":
                    self.trackers[name] = _MLflow(self.dir, ids.get("mlflow"), config)
        except BaseException:
            self._close_trackers()
            raise
        new_ids = {n: t.id for n, t in self.trackers.items() if hasattr(t, "id")}
        if new_ids:
            atomic_write_text(self.dir / RUN_IDS, jsonio.dumps({**ids, **new_ids}))
        if resume_step is not None:
            for name in (rf.METRICS, rf.CONFLICTS):
                _keep_until(self.dir / name, resume_step)
        mode = "a" if resume_step is not None else "w"
        self.metrics = (self.dir / rf.METRICS).open(mode)
        self.conflicts = (self.dir / rf.CONFLICTS).open(mode)

    def _run_ids(self) -> dict:
        try:
            return json.loads((self.dir / RUN_IDS).read_text())
        except (OSError, ValueError):
            return {}

    def log(self, record: dict, blocks: dict | None = None) -> None:
        """One metrics.jsonl line (+ the trackers' scalars); ``blocks``: per-block data for conflicts.jsonl."""
        if not self.enabled:
            return
        self.metrics.write(jsonio.dumps(record) + "\n")
        self.metrics.flush()
        if blocks is not None:
            self.conflicts.write(jsonio.dumps({"step": record["step"], **blocks}) + "\n")
            self.conflicts.flush()
        values = scalars(record)
        for tracker in self.trackers.values():
            tracker.log(values, record["step"])

    def _close_trackers(self) -> None:
        trackers, self.trackers = self.trackers, {}
        for tracker in trackers.values():
            tracker.close()

    def close(self) -> None:
        if self.enabled and getattr(self, "metrics", None) is not None and not self.metrics.closed:
            self.metrics.close()
            self.conflicts.close()
        self._close_trackers()
