"""Evaluation: metrics, per-task scores and losses across ranks, the report tables."""
