"""A causal-LM pair whose true gradients oppose by construction: the LLM demo's basic_arithmetic prompts twice, as
``arith`` (the right answers) and ``arith_shifted`` (the same prompts, every digit d of the answer replaced by
(d + 5) mod 10: "-64" -> "-19", same format and length, a contradictory target at every digit position). Both tasks
see the same inputs, so whatever raises the probability of one answer's digits lowers the other's: diagnose must
call the pair a conflict, and a projection rule has real conflict to act on.

    python bench/conflict_llm.py --src data/demo_llm/basic_arithmetic --out data/conflict_llm
    ortho-lora diagnose data/conflict_llm/config.yaml --steps 30
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

SPLITS = ("train", "validation", "test")


def shifted(answer: str) -> str:
    """Every digit d -> (d + 5) mod 10; signs and everything else kept."""
    return "".join(str((int(c) + 5) % 10) if c.isdigit() else c for c in answer)


def write_pair(src: Path, out: Path) -> Path:
    """arith/, arith_shifted/ (train, validation, test JSONL) and config.yaml (the LLM demo's settings) in ``out``."""
    for split in SPLITS:
        rows = [json.loads(x) for x in (src / f"{split}.jsonl").read_text().splitlines() if x.strip()]
        for name, answer in (("arith", lambda a: a), ("arith_shifted", shifted)):
            path = out / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            text = ""
            for r in rows:
                msgs = [dict(m) for m in r["messages"]]
                msgs[-1]["content"] = answer(msgs[-1]["content"])
                text += json.dumps({"messages": msgs}) + "\n"
            path.write_text(text)
    model = src.parent / "model"
    cfg = {
        "model": {"name_or_path": str(model.resolve()), "kind": "causal-lm", "max_length": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "tasks": [
            {
                "name": name,
                "files": {s: str((out / name / f"{s}.jsonl").resolve()) for s in SPLITS},
                "format": "chat",
                "metric": "exact_match",
                "normalize": "strip",
                "generation": {"max_new_tokens": 6},
            }
            for name in ("arith", "arith_shifted")
        ],
        "train": {"strategy": "joint", "lr": 1.0e-3, "steps": 40, "per_task_batch_size": 8, "log_every": 4},
        "output_dir": str((out / "runs" / "joint").resolve()),
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=Path("data/demo_llm/basic_arithmetic"))
    p.add_argument("--out", type=Path, default=Path("data/conflict_llm"))
    a = p.parse_args()
    missing = [s for s in SPLITS if not (a.src / f"{s}.jsonl").is_file()]
    if missing:
        print(f"error: {a.src} has no {', '.join(missing)}.jsonl: run ortho-lora prepare-demo --llm", file=sys.stderr)
        return 2
    print(f"written: {write_pair(a.src, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
