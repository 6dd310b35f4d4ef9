"""``ortho-lora launch``: build and run the torchrun / deepspeed / accelerate command for one node or
many, reading the allocation from SLURM when inside one, and forwarding preemption signals."""

from .plan import LaunchPlan, build_command, plan_from_args

__all__ = ["LaunchPlan", "build_command", "plan_from_args"]
