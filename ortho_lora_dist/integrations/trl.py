"""TRL's ``SFTTrainer`` with exact per-task LoRA gradients: ``MultiTaskSFTTrainer`` (the optional extra ``trl``).

    trainer = MultiTaskSFTTrainer(model=peft_model, args=SFTConfig(...), train_dataset=ds, processing_class=tok,
                                  strategy="ortho", task_column="task")

TRL prepares the dataset as always (chat template, prompt-completion, ``completion_only_loss`` /
``assistant_only_loss`` labels); the task column rides along (TRL's tokenization keeps extra columns and our
collator wrapper takes it out before TRL's collator, see tasks.py), ``padding_free`` rows get per-token task ids.
The step is ``MultiTaskTrainer``'s (transformers.py): per-task loss = mean over the task's labelled (completion)
tokens in the optimizer step. TRL's ``packing=True`` is refused: it concatenates samples at dataset-preparation time
and drops every column but the token ids, so no task is left to attribute tokens to; ``padding_free`` packs the
micro-batch instead and keeps the tasks.
"""

from __future__ import annotations

from ortho_lora_dist.integrations.transformers import MultiTaskMixin, check_training_args

try:
    from trl import SFTTrainer
except ImportError as e:  # the optional extra
    raise ImportError("MultiTaskSFTTrainer needs TRL: pip install 'ortho-lora-dist[trl]'") from e


class MultiTaskSFTTrainer(MultiTaskMixin, SFTTrainer):
    """``trl.SFTTrainer`` whose LoRA update combines exact per-task gradients with ``strategy`` (see
    ``MultiTaskTrainer`` for the arguments and the loss)."""

    def _check_args(self, args, strategy: str) -> None:
        if getattr(args, "packing", False):
            raise ValueError(
                "MultiTaskSFTTrainer: SFTConfig(packing=True) drops the task column when it packs the dataset; use "
                "padding_free=True (packs each micro-batch, tasks kept per token) or packing=False"
            )
        check_training_args(args, strategy)
