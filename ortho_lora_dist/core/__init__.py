"""The engine core: per-task LoRA gradients in one backward -> reduce across ranks -> combine -> engine -> step.

Imports torch, peft and torchjd only, nothing else of ortho_lora_dist (tests/core/test_import_graph.py checks it).
"""
