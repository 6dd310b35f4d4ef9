"""Tests of the engine core (ortho_lora_dist/core): every gradient path against a slow reference."""
