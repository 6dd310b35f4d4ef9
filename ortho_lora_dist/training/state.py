"""The training state a checkpoint saves besides tensors: steps, skips, the sampler's position, where it resumed
from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class TooManySkips(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class TrainingFailed(RuntimeError):
    """The run ended without a usable model (every step skipped, non-finite weights or eval outputs)."""


@dataclass
class TrainState:
    step: int = 0
    consecutive_skips: int = 0  # optimizer steps in a row with a non-finite loss or gradient
    skipped_total: int = 0
    resumed_from: Path | None = None  # the checkpoint this process started from (never pruned by keep_checkpoints)
    last_saved_step: int = -1
    written_checkpoints: int = 0  # by this process

    def count_step(self, skipped: bool, max_consecutive_skips: int) -> None:
        """One more optimizer step; TooManySkips after ``max_consecutive_skips`` skipped steps in a row."""
        self.step += 1
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        self.skipped_total += int(skipped)
        if self.consecutive_skips >= max_consecutive_skips:
            raise TooManySkips(
                f"{self.consecutive_skips} optimizer steps in a row had a NaN/Inf loss or gradient (step {self.step}); "
                "lower train.lr, enable train.max_grad_norm, or check the data"
            )

    def check_usable(self, weights_finite: bool) -> None:
        """TrainingFailed when no step was taken or the weights diverged: then no adapter is written."""
        if self.skipped_total >= self.step > 0 or not weights_finite:
            why = (
                f"all {self.step} optimizer steps were skipped (non-finite loss or gradient)"
                if self.skipped_total >= self.step > 0
                else "the final LoRA or head weights are not finite (the run diverged)"
            )
            raise TrainingFailed(
                f"{why}: no adapter written; lower train.lr, set train.max_grad_norm, or check the data"
            )

    def to_checkpoint(self, sampler: dict, world_size: int, tasks: list[str], config: dict) -> dict:
        """trainer_state.json's content (checkpoint.write_state adds the file checksums)."""
        return {
            "step": self.step,
            "sampler": sampler,
            "consecutive_skips": self.consecutive_skips,
            "skipped_total": self.skipped_total,
            "world_size": world_size,
            "tasks": tasks,
            "config": config,
        }

    @classmethod
    def from_checkpoint(cls, saved: dict, where: Path) -> TrainState:
        return cls(
            step=saved["step"],
            consecutive_skips=saved["consecutive_skips"],
            skipped_total=saved["skipped_total"],
            resumed_from=where,
            last_saved_step=saved["step"],
        )
