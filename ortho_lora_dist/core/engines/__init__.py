"""Engines: thin adapters that take the combined Ortho-LoRA gradient (a StepResult) and step.

  torch      one process, or plain data parallel with replicated LoRA factors (DDP semantics)
  fsdp       FSDP2 ``fully_shard`` of the frozen base (bf16 or NF4), LoRA factors and heads replicated
  deepspeed  DeepSpeed ZeRO-2 (optionally CPU optimizer offload) owning the LoRA factors' optimizer

Every engine runs the same step (step.OrthoLoRA): per-task capture -> per-task reduce -> Gram ->
weights -> combined. They differ only in how the combined gradient reaches the optimizer.
"""

from ortho_lora_dist.core.engines.base import Engine, TorchEngine

__all__ = ["Engine", "TorchEngine"]
