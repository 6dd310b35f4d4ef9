"""Causal-LM pairs whose true gradients oppose by construction, for ``ortho-lora diagnose`` and the rules.

``--kind shift``: the LLM demo's basic_arithmetic prompts twice, as ``arith`` (the right answers) and
``arith_shifted`` (the same prompts, every digit d of the answer replaced by (d + 5) mod 10: "-64" -> "-19", same
format and length, a contradictory target at every digit position). The shared part (format, sign, end of turn) is
aligned; the digits contradict.

``--kind flip``: ``parity`` asks "Is N an even number?" for random integers N (answer "yes" / "no", right) and
``parity_flipped`` asks the same questions of the same N with the opposite answer: no shared part beyond the turn's
end, a one-token target that the other task contradicts on every prompt. Scored on ``parity`` alone (the flipped
task is the antagonist): single-task training shows what ``parity`` reaches without it.

``--kind constant``: the same questions, ``always_yes`` answers "yes" to every one and ``always_no`` "no": the
contradiction needs no feature of the question, so it is one the model can represent from the first step.

    python bench/conflict_llm.py --kind flip --out data/conflict_flip
    ortho-lora diagnose data/conflict_flip/config.yaml --steps 30
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import yaml

SPLITS = ("train", "validation", "test")


def shifted(answer: str) -> str:
    """Every digit d -> (d + 5) mod 10; signs and everything else kept."""
    return "".join(str((int(c) + 5) % 10) if c.isdigit() else c for c in answer)


ANSWERS = {  # task -> its answer to "Is N an even number?"
    "flip": {"parity": lambda k: k % 2 == 0, "parity_flipped": lambda k: k % 2 == 1},
    "constant": {"always_yes": lambda k: True, "always_no": lambda k: False},
}


def write_questions(kind: str, out: Path, sizes: tuple[int, ...] = (512, 64, 128), seed: int = 0) -> list[str]:
    """The two tasks of ``kind`` (train, validation, test JSONL): the same questions of the same integers, disjoint
    across splits, answered "yes" / "no" by each task's rule."""
    rng = random.Random(seed)
    numbers = rng.sample(range(10, 100_000), sum(sizes))
    lo = 0
    for split, n in zip(SPLITS, sizes):
        for name, yes in ANSWERS[kind].items():
            path = out / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            text = ""
            for k in numbers[lo : lo + n]:
                q = {"role": "user", "content": f"Is {k} an even number? Answer yes or no."}
                a = {"role": "assistant", "content": "yes" if yes(k) else "no"}
                text += json.dumps({"messages": [q, a]}) + "\n"
            path.write_text(text)
        lo += n
    return list(ANSWERS[kind])


def write_shift(src: Path, out: Path) -> list[str]:
    """arith/ and arith_shifted/ (train, validation, test JSONL) from the LLM demo's basic_arithmetic."""
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
    return ["arith", "arith_shifted"]


def write_config(out: Path, names: list[str], model: Path, max_new_tokens: int) -> Path:
    """config.yaml in ``out``: the LLM demo's settings on the pair, joint, 40 steps of 8 samples per task."""
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
                "generation": {"max_new_tokens": max_new_tokens},
            }
            for name in names
        ],
        "train": {"strategy": "joint", "lr": 1.0e-3, "steps": 40, "per_task_batch_size": 8, "log_every": 4},
        "output_dir": str((out / "runs" / "joint").resolve()),
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["shift", *ANSWERS], default="shift")
    p.add_argument("--src", type=Path, default=Path("data/demo_llm/basic_arithmetic"), help="shift: the source task")
    p.add_argument("--model", type=Path, default=Path("data/demo_llm/model"))
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    out = a.out or Path("data/conflict_llm" if a.kind == "shift" else f"data/conflict_{a.kind}")
    missing = [s for s in SPLITS if a.kind == "shift" and not (a.src / f"{s}.jsonl").is_file()]
    if missing or not (a.model / "config.json").is_file():
        what = f"{a.src} has no {', '.join(missing)}.jsonl" if missing else f"{a.model} holds no model"
        print(f"error: {what}: run ortho-lora prepare-demo --llm", file=sys.stderr)
        return 2
    names = write_shift(a.src, out) if a.kind == "shift" else write_questions(a.kind, out)
    print(f"written: {write_config(out, names, a.model, 6 if a.kind == 'shift' else 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
