"""distributed.data_cache: the training data is prepared once per fingerprint (by rank 0), read by the other ranks
and by later starts; a changed source prepares anew, a damaged folder is detected and rebuilt, a failed preparation
leaves nothing half-written. Two real processes (rank 0 slow to prepare, rank 1 started first) prepare once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ortho_lora_dist.config import load_config
from ortho_lora_dist.data.cache import MANIFEST, fingerprint, prepared_tasks
from ortho_lora_dist.data.errors import DataError
from ortho_lora_dist.data.loading import load_tasks

ROOT = Path(__file__).resolve().parents[2]


def _config(env, tmp_path: Path) -> Path:
    d = env["data"]
    cfg = {
        "model": {"name_or_path": env["models"]["bert"]},
        "tasks": [
            {"name": "sentiment", "files": {"train": d["sentiment"]["train"]}, "validation_fraction": 0.25},  # selected
            {"name": "topic", "files": d["topic"], "max_train_samples": 40},
        ],
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _contents(tasks) -> list:
    return [(t.name, t.labels, {s: list(r) for s, r in t.splits.items()}) for t in tasks]


def test_prepared_once_reused_refreshed_and_rebuilt(env, tmp_path, caplog):
    cfg = load_config(_config(env, tmp_path))
    calls = []

    def prepare():
        calls.append(1)
        return load_tasks(cfg.tasks)

    root, extra = tmp_path / "cache", {"kind": "encoder"}
    first = prepared_tasks(cfg.tasks, prepare, root, extra, preparer=True)
    expected = _contents(first)  # read now: the damage below rewrites a file that ``first`` maps
    assert expected == _contents(load_tasks(cfg.tasks)) and len(calls) == 1
    assert first[0].splits["train"][0]["label"] in (0, 1)  # class indices, as load_tasks gives them
    folder = root / fingerprint(cfg.tasks, extra)
    assert (folder / MANIFEST).is_file()
    again = prepared_tasks(cfg.tasks, prepare, root, extra, preparer=True)
    assert len(calls) == 1 and _contents(again) == expected
    assert prepared_tasks(cfg.tasks, prepare, root, {"kind": "other"}, preparer=True) and len(calls) == 2

    src = Path(env["data"]["topic"]["train"])  # a changed source: prepared anew
    saved = src.read_text()
    try:
        src.write_text(saved + saved.splitlines(keepends=True)[0])
        prepared_tasks(cfg.tasks, prepare, root, extra, preparer=True)
        assert len(calls) == 3
    finally:
        src.write_text(saved)

    prepared_tasks(cfg.tasks, prepare, root, extra, preparer=True)  # the restored file has a new time: anew
    assert len(calls) == 4
    folder = root / fingerprint(cfg.tasks, extra)
    arrow = next(folder.rglob("*.arrow"))  # damaged (a short write, a partial copy): detected and rebuilt
    arrow.write_bytes(arrow.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="ortho_lora_dist"):
        rebuilt = prepared_tasks(cfg.tasks, prepare, root, extra, preparer=True)
    assert len(calls) == 5 and _contents(rebuilt) == expected
    assert any("incomplete or damaged" in r.getMessage() for r in caplog.records)
    (folder / MANIFEST).unlink()  # a folder without its manifest: incomplete
    prepared_tasks(cfg.tasks, prepare, root, extra, preparer=True)
    assert len(calls) == 6

    def broken():
        raise DataError("task 'topic': bad record")

    with pytest.raises(DataError):
        prepared_tasks(cfg.tasks, broken, root, {"kind": "broken"}, preparer=True)
    assert not [p for p in root.iterdir() if ".tmp-" in p.name or ".bad-" in p.name]  # nothing half-written
    prepared_tasks(cfg.tasks, prepare, None, extra, preparer=True)  # null: no cache, prepared every time
    assert len(calls) == 7


WORKER = textwrap.dedent(
    """
    import json, sys, time
    from ortho_lora_dist.config import load_config
    from ortho_lora_dist.data.cache import prepared_tasks
    from ortho_lora_dist.data.loading import load_tasks

    cfg_path, root, counter, rank = sys.argv[1:5]
    cfg = load_config(cfg_path)

    def prepare():
        with open(counter, "a") as f:
            f.write(rank + "\\n")
        time.sleep(3)  # rank 1 must wait for it
        return load_tasks(cfg.tasks)

    tasks = prepared_tasks(cfg.tasks, prepare, __import__("pathlib").Path(root), {}, preparer=rank == "0")
    print(json.dumps([[t.name, len(t.splits["train"]), t.splits["train"][0]] for t in tasks]))
    """
)


def test_two_ranks_prepare_once(env, tmp_path):
    cfg, counter = _config(env, tmp_path), tmp_path / "prepared_by"
    env_vars = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", WORKER, str(cfg), str(tmp_path / "cache"), str(counter)]
    waiter = subprocess.Popen([*cmd, "1"], env=env_vars, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    preparer = subprocess.run([*cmd, "0"], env=env_vars, capture_output=True, text=True, timeout=300)
    out1, err1 = waiter.communicate(timeout=300)
    assert preparer.returncode == 0 and waiter.returncode == 0, preparer.stderr[-2000:] + err1[-2000:]
    assert counter.read_text() == "0\n"  # prepared once, by rank 0
    assert json.loads(out1) == json.loads(preparer.stdout) and len(json.loads(out1)) == 2
