"""Keep the records of a finished (or partly finished) ``ortho-lora compare`` in the repository: for every run
that finished, its finished.json, eval.json and metrics.jsonl (what compare reads to build its tables; no
adapter, no checkpoint), plus the comparison's compare.json / compare.md / compare.png.

    python bench/archive_runs.py runs/variations/capacity bench/results/variations/capacity

Copied back (``cp -r bench/results/variations/capacity runs/variations/``), compare treats those runs as done:
the same command re-aggregates them (e.g. with another ``--score``) or continues with more seeds.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

RECORDS = ("finished.json", "eval.json", "metrics.jsonl")
SUMMARY = ("compare.json", "compare.md", "compare.png")


def archive(src: Path, dst: Path) -> int:
    """Copy the records of every finished run under src/runs and src's summary files; returns the run count."""
    if not (src / "runs").is_dir():
        print(f"error: {src}/runs: no such folder (not an `ortho-lora compare --out` folder)", file=sys.stderr)
        raise SystemExit(2)
    count = 0
    for done in sorted((src / "runs").rglob("finished.json")):
        run = done.parent
        target = dst / run.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in RECORDS:
            shutil.copy2(run / name, target / name)
        count += 1
    for name in SUMMARY:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return count


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python bench/archive_runs.py COMPARE_OUT_DIR ARCHIVE_DIR", file=sys.stderr)
        raise SystemExit(2)
    n = archive(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{n} finished runs archived in {sys.argv[2]}")
