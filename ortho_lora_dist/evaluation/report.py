"""What evaluation results look like to a user: eval.json's layout and the printed table."""

from __future__ import annotations

import math

from ortho_lora_dist.evaluation.evaluate import EvalResult


def eval_report(full: dict[str, EvalResult]) -> dict:
    """eval.json's layout: {split: {task: metric}}, plus "loss" and "perplexity" {split: {task: value}} when
    computed."""
    out: dict = {k: v.metrics for k, v in full.items() if v.metrics}
    for key in ("loss", "perplexity"):
        values = {k: getattr(v, key) for k, v in full.items() if getattr(v, key)}
        if values:
            out[key] = values
    return out


def print_table(results: dict, tasks) -> None:
    """{split: {task: metric}} as a rich table, one row per task and the average."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Evaluation")
    table.add_column("task")
    table.add_column("metric")
    splits = list(results)
    for s in splits:
        table.add_column(s, justify="right")
    for t in tasks:
        table.add_row(t.name, t.config.metric, *[_fmt(results[s].get(t.name)) for s in splits])
    table.add_row("average", "", *[_fmt(results[s].get("average")) for s in splits])
    Console().print(table)


def _fmt(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"
