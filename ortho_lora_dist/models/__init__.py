"""Models: Hub / local resolution, loading and LoRA wrapping, the multi-task encoder and causal LM, prompts,
generation."""
