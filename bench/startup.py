"""Start-up time of an N-rank run with and without the shared data preparation (distributed.data_cache).

    python bench/startup.py configs/demo_llm.yaml --ranks 2 --repeats 3 [--scale 32] [--out bench/results/startup.json]

Each measurement launches ``torchrun --nproc_per_node N`` on this file's worker, which builds the Trainer (data ->
tokenizer -> length policy -> process group -> model -> step -> engine: everything before the first step) and
reports per rank the seconds from interpreter start to the end of that setup, and the seconds spent getting the
data. Three settings, interleaved per repeat: ``every-rank`` (data_cache null: each rank reads, checks and fits every
task, as before), ``cold`` (an empty cache: rank 0 prepares, the others wait and read) and ``warm`` (the cache that
``cold`` wrote: a requeue or a second run on the same data). ``--scale K`` first writes a copy of the config's data
with every training file repeated K times (a data-heavy start, as with a real instruction set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.time()
ROOT = Path(__file__).resolve().parents[1]


def worker(config: str, overrides: list[str], out: str) -> None:
    """One rank: build the Trainer, time it, clean up, write {rank: [setup_s, data_s]}."""
    sys.path.insert(0, str(ROOT))
    from ortho_lora_dist.config import load_config
    from ortho_lora_dist.data import cache
    from ortho_lora_dist.training.recipe import Trainer

    spent = {"data": 0.0}
    original = cache.prepared_tasks

    def timed(*a, **k):
        start = time.time()
        try:
            return original(*a, **k)
        finally:
            spent["data"] += time.time() - start

    import ortho_lora_dist.training.recipe as recipe

    recipe.prepared_tasks = timed
    trainer = Trainer(load_config(config, overrides))
    setup = time.time() - T0
    trainer.cleanup()
    rank = os.environ.get("RANK", "0")
    Path(out, f"rank{rank}.json").write_text(json.dumps([setup, spent["data"]]))


def scaled_config(config: Path, scale: int, where: Path) -> Path:
    """A copy of ``config`` whose tasks read training files repeated ``scale`` times."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    base = config.parent.parent if (config.parent.parent / cfg["model"]["name_or_path"]).exists() else Path.cwd()
    cfg["model"]["name_or_path"] = str((base / cfg["model"]["name_or_path"]).resolve())
    for task in cfg["tasks"]:
        files = {}
        for split, path in task["files"].items():
            src = (base / path).resolve()
            dst = where / task["name"] / f"{split}.jsonl"
            dst.parent.mkdir(parents=True, exist_ok=True)
            text = src.read_text()
            dst.write_text(text * (scale if split == "train" else 1))
            files[split] = str(dst)
        task["files"] = files
    out = where / "config.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def launch(config: Path, ranks: int, cache: str | None, tmp: Path, tag: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / f"out-{tag}"
    out.mkdir()
    overrides = [f"output_dir={tmp / f'run-{tag}'}", f"distributed.data_cache={cache if cache else 'null'}"]
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        str(ranks),
        "--master_port",
        str(port),
        __file__,
        "--worker",
        str(config),
        str(out),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{proc.stderr[-4000:]}")
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    return {"setup_s": max(r[0] for r in per_rank), "data_s": max(r[1] for r in per_rank)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ortho-lora-startup-"))
    try:
        config = scaled_config(args.config.resolve(), args.scale, tmp / "data")
        rows: dict[str, list[dict]] = {"every-rank": [], "cold": [], "warm": []}
        for i in range(args.repeats):
            cache = tmp / f"cache{i}"
            rows["every-rank"].append(launch(config, args.ranks, None, tmp, f"none{i}"))
            rows["cold"].append(launch(config, args.ranks, str(cache), tmp, f"cold{i}"))
            rows["warm"].append(launch(config, args.ranks, str(cache), tmp, f"warm{i}"))
            print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]}" for k, v in rows.items()), flush=True)
        summary = {
            "config": str(args.config),
            "ranks": args.ranks,
            "scale": args.scale,
            "repeats": args.repeats,
            "median": {
                k: {m: statistics.median(r[m] for r in v) for m in ("setup_s", "data_s")} for k, v in rows.items()
            },
            "runs": rows,
        }
        print(json.dumps(summary["median"], indent=1))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(summary, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[4:], sys.argv[3])
    else:
        main()
