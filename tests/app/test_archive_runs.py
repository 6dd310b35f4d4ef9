"""bench/archive_runs.py: keeps exactly the records compare reads of every FINISHED run (no adapter, no
checkpoint, no unfinished run) plus the comparison's summary files; bad arguments are one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _archive(*args):
    cmd = [sys.executable, str(ROOT / "bench" / "archive_runs.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_archive_keeps_finished_records_only(tmp_path):
    src, dst = tmp_path / "cmp", tmp_path / "kept"
    for run, finished in (("joint/seed0", True), ("single/seed0/sentiment", True), ("ortho-factor/seed0", False)):
        d = src / "runs" / run
        (d / "adapter").mkdir(parents=True)
        (d / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
        (d / "metrics.jsonl").write_text(f'{{"step": 1, "run": "{run}"}}\n')
        (d / "eval.json").write_text('{"test": {}}')
        if finished:
            (d / "finished.json").write_text('{"step": 1}')
    (src / "compare.md").write_text("| table |")
    r = _archive(src, dst)
    assert r.returncode == 0 and "2 finished runs archived" in r.stdout
    kept = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert kept == [
        "compare.md",
        *[f"runs/joint/seed0/{n}" for n in ("eval.json", "finished.json", "metrics.jsonl")],
        *[f"runs/single/seed0/sentiment/{n}" for n in ("eval.json", "finished.json", "metrics.jsonl")],
    ]
    assert (dst / "runs/joint/seed0/metrics.jsonl").read_text() == (src / "runs/joint/seed0/metrics.jsonl").read_text()


def test_archive_refuses_bad_arguments(tmp_path):
    r = _archive()
    assert r.returncode == 2 and r.stderr.startswith("usage:") and "Traceback" not in r.stderr
    r = _archive(tmp_path / "nope", tmp_path / "out")
    assert r.returncode == 2 and "nope/runs: no such folder" in r.stderr and not (tmp_path / "out").exists()
