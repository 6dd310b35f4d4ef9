"""The conflicting pair of the variations study (bench/study_variations.sh): the demo's Rotten Tomatoes texts as
two tasks, ``sentiment`` (their real labels) and ``sentiment_shuffled`` (the same texts, the labels permuted
within each split by a fixed seed: class balance kept, no signal left). The second task can only be fitted by
memorising training texts, so its gradient pulls the shared adapter away from what sentiment needs: negative
transfer by construction. With a classification head per task, "opposite labels" would not conflict (the head
flips its sign and the adapter is shared at no cost), which is why the labels are shuffled, not flipped.

    python bench/conflict_pair.py --src data/demo/sentiment --out data/variations/sentiment_shuffled
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

SPLITS = ("train", "validation", "test")


def shuffled_split(records: list[dict], seed: int) -> list[dict]:
    """The records with their labels permuted (the same multiset of labels, reassigned at random)."""
    labels = [r["label"] for r in records]
    random.Random(seed).shuffle(labels)
    return [{**r, "label": y} for r, y in zip(records, labels)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default="data/demo/sentiment", help="a task folder with train/validation/test.jsonl")
    ap.add_argument("--out", default="data/variations/sentiment_shuffled")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src, out = Path(args.src), Path(args.out)
    missing = [s for s in SPLITS if not (src / f"{s}.jsonl").is_file()]
    if missing:
        print(
            f"error: {src}: no {', '.join(s + '.jsonl' for s in missing)} (run `ortho-lora prepare-demo`)",
            file=sys.stderr,
        )
        sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    for i, split in enumerate(SPLITS):
        records = [json.loads(line) for line in (src / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        rows = shuffled_split(records, args.seed + i)
        kept = sum(a["label"] == b["label"] for a, b in zip(records, rows)) / len(rows)
        tmp = out / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows))
        os.replace(tmp, out / f"{split}.jsonl")
        print(f"{out / split}.jsonl: {len(rows)} records, {kept:.1%} keep their real label")


if __name__ == "__main__":
    main()
