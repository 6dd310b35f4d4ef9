"""What evaluation results look like to a user: eval.json's layout and the printed table."""

from __future__ import annotations

import math

from ortho_lora_dist.evaluation.evaluate import EvalResult


def eval_document(header: dict, full: dict[str, EvalResult]) -> dict:
    """An eval.json (the run's, ``ortho-lora eval``'s, the zero-shot baseline's): ``header`` (step or adapter), then
    eval_report's layout."""
    return {**header, **eval_report(full)}


def eval_report(full: dict[str, EvalResult]) -> dict:
    """eval.json's layout: {split: {task: metric}}, plus "loss" and "perplexity" {split: {task: value}} when
    computed."""
    out: dict = {k: v.metrics for k, v in full.items() if v.metrics}
    for key in ("loss", "perplexity"):
        values = {k: getattr(v, key) for k, v in full.items() if getattr(v, key)}
        if values:
            out[key] = values
    return out


def scores(full: dict[str, EvalResult], tasks) -> dict[str, dict]:
    """{split: {task: score}}: each task's metric, or its loss for ``metric: loss``; "average" over the metrics.
    A task whose score this rank does not hold (metrics live on rank 0) is absent, not None."""
    out: dict[str, dict] = {}
    for split, result in full.items():
        sources = {t.name: result.loss if t.config.metric == "loss" else result.metrics for t in tasks}
        row = {name: source[name] for name, source in sources.items() if name in source}
        if "average" in result.metrics:
            row["average"] = result.metrics["average"]
        if result.metrics or result.loss:
            out[split] = row
    return out


def print_table(full: dict[str, EvalResult], tasks) -> None:
    """One row per task (its metric, or its loss for metric: loss) and the average of the metrics, per split."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Evaluation")
    table.add_column("task")
    table.add_column("metric")
    rows = scores(full, tasks)
    for s in rows:
        table.add_column(s, justify="right")
    for t in tasks:
        table.add_row(t.name, t.config.metric, *[_fmt(rows[s].get(t.name)) for s in rows])
    if any(t.config.metric != "loss" for t in tasks):
        table.add_row("average", "", *[_fmt(rows[s].get("average")) for s in rows])
    Console().print(table)


def _fmt(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"
