"""ortho-lora-dist: exact Ortho-LoRA (arXiv 2601.09684) multi-task LoRA / QLoRA at scale."""

from .capture import TaskGradCapture
from .losses import task_mean
from .projection import combine_weights, gram, joint_weights, project
from .step import OrthoLoRA, StepResult

__version__ = "0.1.0"
__all__ = ["OrthoLoRA", "StepResult", "TaskGradCapture", "combine_weights", "gram", "joint_weights", "project", "task_mean"]
