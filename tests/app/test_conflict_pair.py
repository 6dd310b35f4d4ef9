"""bench/conflict_pair.py: the variations study's shuffled-label task keeps the texts and the label multiset and
loses the signal; a missing source folder is one error, exit 2."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _write(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        rows = [{"text": f"{split} text {i}", "label": "fresh" if i % 3 else "rotten"} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "bench" / "conflict_pair.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_shuffled_labels_keep_texts_and_balance(tmp_path):
    _write(tmp_path / "src", 300)
    for out in ("a", "b"):
        assert _run("--src", str(tmp_path / "src"), "--out", str(tmp_path / out)).returncode == 0
    for split in ("train", "validation", "test"):
        src, a, b = (_read(tmp_path / d / f"{split}.jsonl") for d in ("src", "a", "b"))
        assert [r["text"] for r in a] == [r["text"] for r in src]
        assert Counter(r["label"] for r in a) == Counter(r["label"] for r in src)
        assert a == b  # a fixed seed: the same file twice
        kept = sum(x["label"] == y["label"] for x, y in zip(src, a)) / len(src)
        assert kept < 0.7  # chance agreement for a 2:1 label mix is 5/9; the real labels would give 1.0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["test.jsonl", "train.jsonl", "validation.jsonl"]


def test_missing_source_is_one_error(tmp_path):
    r = _run("--src", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "nope: no train.jsonl, validation.jsonl, test.jsonl" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def _run_llm(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "bench" / "conflict_llm.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_llm_flip_pair_contradicts_on_the_same_prompts(tmp_path):
    """bench/conflict_llm.py --kind flip: the same questions of the same integers, opposite one-word answers, the
    right ones in ``parity``; the splits hold different integers; no model folder -> one error, exit 2."""
    (tmp_path / "model").mkdir()
    assert _run_llm("--kind", "flip", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "o")).returncode == 2
    (tmp_path / "model" / "config.json").write_text("{}")
    proc = _run_llm("--kind", "flip", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    seen = set()
    for split in ("train", "validation", "test"):
        right, flipped = (_read(tmp_path / "o" / t / f"{split}.jsonl") for t in ("parity", "parity_flipped"))
        assert len(right) == len(flipped) > 0
        numbers = set()
        for a, b in zip(right, flipped):
            assert a["messages"][0] == b["messages"][0]  # the same question
            k = int(a["messages"][0]["content"].split()[1])
            assert a["messages"][1]["content"] == ("yes" if k % 2 == 0 else "no")
            assert {a["messages"][1]["content"], b["messages"][1]["content"]} == {"yes", "no"}
            numbers.add(k)
        assert not numbers & seen
        seen |= numbers
    import yaml

    cfg = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert [t["name"] for t in cfg["tasks"]] == ["parity", "parity_flipped"]


def test_llm_constant_pair_answers_every_question_alike(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    proc = _run_llm("--kind", "constant", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    yes, no = (_read(tmp_path / "o" / t / "test.jsonl") for t in ("always_yes", "always_no"))
    assert [r["messages"][0] for r in yes] == [r["messages"][0] for r in no]
    assert {r["messages"][1]["content"] for r in yes} == {"yes"} and {r["messages"][1]["content"] for r in no} == {"no"}
