"""Evaluation: batched left-padded generation (exact vs one at a time), stop strings, answer extraction and
normalisation, per-task validation loss (exact, pads excluded across ranks), eval logging in a real run,
and every shipped config validating."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from ortho_lora_dist.cli import main as cli
from ortho_lora_dist.config import TaskConfig, load_config, validate_config
from ortho_lora_dist.data.loading import TaskData
from ortho_lora_dist.models.generation import answer, canonical_number, cut_at_stop, extract, generate, normalize
from tests.app.test_app import make_config

ROOT = Path(__file__).resolve().parents[2]


# -- extraction and normalisation -------------------------------------------------------------------------
def test_extraction_and_normalisation():
    gsm = TaskConfig(name="g", files={"train": "x"}, type="generation", metric="exact_match", extract="gsm8k")
    assert answer(gsm, "She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,234") == "1234"
    assert answer(gsm, "So the answer is 72.\n#### $72.00 dollars") == "72"
    assert answer(gsm, "48 + 24 = 72 clips in total.") == "72"  # no "####": the last number
    assert answer(gsm, "I do not know") == "I do not know"  # nothing to extract: unchanged
    assert answer(gsm, "#### -5") == "-5"
    assert extract("a 3, 4 and 1,2345", "last_number") == "2345"
    assert extract("x = 1,000,000.5 then 7", "last_number") == "7"
    assert extract("answer: Paris.", regex=r"answer:\s*(\w+)") == "Paris"
    assert extract("the city is Paris", regex=r"Par\w+") == "Paris"  # no group: the whole match
    assert extract("nothing here", regex=r"answer: (\w+)") == "nothing here"
    assert (
        canonical_number("$1,234.50") == "1234.5"
        and canonical_number("42.") == "42"
        and canonical_number("-0.0") == "0"
    )
    assert canonical_number("12 apples") is None and canonical_number("1,23") is None
    assert normalize("  Hello \n  World ") == "Hello World"
    assert normalize("  Hello World ", "lowercase") == "hello world"
    assert normalize(" 1,234 ", "strip") == "1,234" and normalize(" 1,234 ") == "1234"
    assert cut_at_stop("a b\nQuestion: c", ["\nQuestion:", "zzz"]) == "a b" and cut_at_stop("abc", []) == "abc"
    rx = TaskConfig(name="r", files={"train": "x"}, answer_regex=r"is (\w+)", normalize="lowercase")
    assert answer(rx, "The topic is Finance.") == answer(rx, "finance") == "finance"
    with pytest.raises(ValueError, match="not both"):
        TaskConfig(name="r", files={"train": "x"}, answer_regex="x", extract="gsm8k")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        TaskConfig(name="r", files={"train": "x"}, answer_regex="(")


def test_every_shipped_config_validates():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(path)
        assert cfg.tasks, path
    gsm = next(t for t in load_config(ROOT / "configs" / "qlora7b_chat.yaml").tasks if t.name == "gsm8k")
    assert gsm.extract == "gsm8k" and gsm.generation.max_new_tokens >= 256 and "\nQuestion:" in gsm.generation.stop
    # what a GSM8K reference and a plausible model answer score as
    assert (
        answer(gsm, "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72")
        == answer(gsm, " 48+24 = 72.\n#### 72")
        == "72"
    )


# -- a model on the tiny Llama ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm(env):  # noqa: F811
    """CausalLMMultiTask (tiny Llama, word tokenizer): a verbalizer task and a generation task, non-zero LoRA."""
    from ortho_lora_dist.models.build import build_model
    from ortho_lora_dist.models.loading import load_tokenizer

    cfg = validate_config(
        {
            "model": {"name_or_path": env["models"]["llama"], "kind": "causal-lm", "max_length": 24},
            "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
            "tasks": [
                {
                    "name": "sentiment",
                    "files": {"train": "x"},
                    "prompt": "review: {text} verdict:",
                    "label_words": {"pos": " good", "neg": " bad"},
                },
                {
                    "name": "topic",
                    "files": {"train": "x"},
                    "type": "generation",
                    "metric": "exact_match",
                    "prompt": "text: {text} topic:",
                    "generation": {"max_new_tokens": 8},
                },
            ],
        }
    )
    rows = {
        n: [json.loads(x) for x in Path(env["data"][n]["validation"]).read_text().splitlines()][:7]
        for n in ("sentiment", "topic")
    }
    sent = TaskData(
        "sentiment",
        cfg.tasks[0],
        {"validation": [{**r, "label": ["neg", "pos"].index(r["label"])} for r in rows["sentiment"]]},
        labels=["neg", "pos"],
    )
    topic = TaskData("topic", cfg.tasks[1], {"validation": rows["topic"]})
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = build_model(cfg, [sent, topic], tok)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.eval(), [sent, topic], tok


def test_batched_left_padded_generation_equals_one_at_a_time(lm):
    model, tasks, tok = lm
    prompts = [model.prompts.prompt(1, r) for r in tasks[1].splits["validation"]]
    prompts += [
        "text: good topic:",
        "text: the movie was very bad and the plot was awful topic:",
    ]  # very different lengths
    side = tok.padding_side
    batched = generate(model.model, tok, prompts, 24, max_new_tokens=8)
    assert tok.padding_side == side, "padding side restored"
    alone = [generate(model.model, tok, [p], 24, max_new_tokens=8)[0] for p in prompts]
    assert batched == alone
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1 and any(batched)
    # stop strings: the text ends before the first stop string, the other rows are unaffected
    word = next(t.split()[1] for t in batched if len(t.split()) > 2)
    stopped = generate(model.model, tok, prompts, 24, max_new_tokens=8, stop=[f" {word}"])
    assert stopped == [cut_at_stop(t, [f" {word}"]).strip() for t in batched]
    assert stopped != batched
    # model.predict: the same texts, extracted and normalised (default: whitespace only here)
    batch = model.collate(tasks[1].splits["validation"], [1] * 7)
    pairs = model.predict(batch, return_text=True)
    assert [t for _, t in pairs] == batched[:7] and [p for p, _ in pairs] == [normalize(t) for t in batched[:7]]


def test_mixed_max_new_tokens_in_one_batch_equal_each_alone(lm):
    """Rows with different max_new_tokens share one batch (decoded to the largest): each row's text is what
    decoding it alone to its own limit gives."""
    model, tasks, tok = lm
    prompts = [model.prompts.prompt(1, r) for r in tasks[1].splits["validation"]][:5]
    limits = [1, 3, 8, 2, 5]
    mixed = generate(model.model, tok, prompts, 24, max_new_tokens=limits)
    alone = [generate(model.model, tok, [p], 24, max_new_tokens=n)[0] for p, n in zip(prompts, limits)]
    assert mixed == alone and len(set(mixed)) > 1


def test_eval_with_tasks_mixed_in_a_batch_equals_one_record_at_a_time(lm):
    """run_eval's batches mix tasks (a verbalizer task and a generation task here): the same metrics and the
    same losses (1e-5 relative: other padded shapes) as batches of one record."""
    from ortho_lora_dist.evaluation.evaluate import run_eval
    from ortho_lora_dist.training.engine_setup import DistInfo

    model, tasks, _ = lm
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    one = run_eval(model, tasks, "validation", info, batch_size=1, progress_bar=False)
    mixed = run_eval(model, tasks, "validation", info, batch_size=5, progress_bar=False)  # 7 + 7: batch 2 mixes
    assert mixed.metrics == one.metrics
    assert mixed.loss == pytest.approx(one.loss, rel=1e-5)


def test_batched_verbalizer_scoring_equals_one_sample_at_a_time(lm):
    """All (sample, label word) rows in one forward pick the same labels as scoring each sample's words alone."""
    model, tasks, _ = lm
    records = tasks[0].splits["validation"]
    mixed = model.collate(records + tasks[1].splits["validation"][:2], [0] * len(records) + [1, 1])  # mixed tasks
    got = model.predict(mixed)[: len(records)]
    want = []
    for r in records:
        words = [tasks[0].config.label_words[label] for label in tasks[0].labels]
        enc = model._encode([model.prompts.prompt(0, r)] * len(words), words)
        with torch.no_grad():
            logits = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1]
            target = enc["labels"][:, 1:]
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1).clamp_min(0), reduction="none"
            )
            loss = loss.view(target.shape) * (target != -100)
        want.append(int(loss.sum(1).argmin()))  # the full-logits computation, every label word's tokens summed
    assert got == want and len(set(got)) >= 1


def _direct_losses(model, task: TaskData, t: int, token_level: bool) -> float:
    """Per-sample forward (no batching, no padding): the token-weighted (or sample) mean of the task's loss."""
    total, count = 0.0, 0.0
    for r in task.splits["validation"]:
        b = model.collate([r], [t])
        with torch.no_grad():
            logits = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[0, :-1].float()
        target = b["labels"][0, 1:]
        keep = target != -100
        loss = F.cross_entropy(logits[keep], target[keep], reduction="sum")
        total += float(loss)
        count += float(keep.sum()) if token_level else 1.0
    return total / count


def test_eval_loss_is_exact_and_pads_are_excluded_across_ranks(lm, monkeypatch):
    """One process: the real loss and perplexity; then 3 simulated ranks (7 records: rank 2 pads 2 of 3 rows):
    the sums each rank all-reduces add up to the direct computation. Tolerance 1e-5 relative (float32 forwards
    of different padded shapes)."""
    import torch.distributed as dist

    from ortho_lora_dist.evaluation.evaluate import run_eval
    from ortho_lora_dist.training.engine_setup import DistInfo

    model, tasks, _ = lm
    direct = [_direct_losses(model, task, t, token_level=True) for t, task in enumerate(tasks)]
    one = run_eval(
        model, tasks, "validation", DistInfo(0, 1, 0, torch.device("cpu"), None), batch_size=3, progress_bar=False
    )
    assert one.loss == pytest.approx({"sentiment": direct[0], "topic": direct[1]}, rel=1e-5)
    assert one.perplexity["topic"] == pytest.approx(math.exp(direct[1]), rel=1e-5)
    assert set(one.metrics) == {"sentiment", "topic", "average"}

    reduced = []
    monkeypatch.setattr(dist, "all_reduce", lambda x, *a, **k: reduced.append(x.clone()))
    monkeypatch.setattr(
        dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj] + [[]] * (len(out) - 1))
    )
    monkeypatch.setattr(
        "ortho_lora_dist.evaluation.evaluate.compute", lambda *a: 0.0
    )  # one rank's predictions only: not scored here
    for rank in range(3):
        run_eval(
            model,
            tasks,
            "validation",
            DistInfo(rank, 3, 0, torch.device("cpu"), None),
            batch_size=2,
            progress_bar=False,
        )
    sums, counts = torch.stack(reduced).sum(0)
    assert (sums / counts).tolist() == pytest.approx(direct, rel=1e-5)
    one_counts = [
        sum(float((model.collate([r], [t])["labels"] != -100).sum()) for r in task.splits["validation"])
        for t, task in enumerate(tasks)
    ]
    assert counts.tolist() == one_counts, "every answer token counted once, pads never"


def test_encoder_eval_loss_is_the_sample_mean(env):  # noqa: F811
    from ortho_lora_dist.evaluation.evaluate import run_eval
    from ortho_lora_dist.models.build import build_model
    from ortho_lora_dist.models.loading import load_tokenizer
    from ortho_lora_dist.training.engine_setup import DistInfo

    cfg = validate_config(
        {
            "model": {"name_or_path": env["models"]["bert"], "max_length": 16},
            "lora": {"r": 4, "target_modules": ["query", "value"]},
            "tasks": [{"name": "sentiment", "files": {"train": "x"}}],
        }
    )
    rows = [json.loads(x) for x in Path(env["data"]["sentiment"]["validation"]).read_text().splitlines()][:5]
    task = TaskData(
        "sentiment",
        cfg.tasks[0],
        {"validation": [{**r, "label": ["neg", "pos"].index(r["label"])} for r in rows]},
        labels=["neg", "pos"],
    )
    model = build_model(cfg, [task], load_tokenizer(cfg.model)).eval()
    with torch.no_grad():
        per = [float(model.task_losses(model.collate([r], [0]))[0]) for r in task.splits["validation"]]
    res = run_eval(
        model, [task], "validation", DistInfo(0, 1, 0, torch.device("cpu"), None), batch_size=2, progress_bar=False
    )
    assert res.loss["sentiment"] == pytest.approx(sum(per) / len(per), rel=1e-5) and res.perplexity == {}


# -- a real run -----------------------------------------------------------------------------------------------
def test_run_logs_per_task_eval_loss_and_predict_uses_the_same_extraction(env, tmp_path):  # noqa: F811
    out = tmp_path / "lm"
    path = make_config(env, out, kind="causal-lm", steps=4, eval_every=2, log_every=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["tasks"][1].update(
        generation={"max_new_tokens": 4, "stop": ["zzz"]},
        answer_regex=r"(\w+)",
        normalize="lowercase",
        max_eval_samples=6,
    )
    cfg["tasks"][0]["max_eval_samples"] = 6
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(path)]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert set(r["eval_loss"]) == set(r["eval_ppl"]) == {"sentiment", "topic"}
        assert r["eval_ppl"]["topic"] == pytest.approx(math.exp(r["eval_loss"]["topic"]), rel=1e-4)
        assert set(r["eval"]) == {"sentiment", "topic", "average"}
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["loss"]) == {"validation", "test"} and set(ev["loss"]["validation"]) == {"sentiment", "topic"}
    assert ev["loss"]["validation"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    assert set(ev["perplexity"]["test"]) == {"sentiment", "topic"}
    assert (out / "loss.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval_loss/sentiment", "eval_loss/topic", "eval_ppl/topic"} <= tags

    # the adapter alone carries the generation and extraction settings; predict applies them
    meta = {t["name"]: t for t in json.loads((out / "adapter" / "tasks.json").read_text())["tasks"]}
    assert meta["topic"]["generation"] == {"max_new_tokens": 4, "stop": ["zzz"]}
    assert meta["topic"]["answer_regex"] == r"(\w+)" and meta["topic"]["normalize"] == "lowercase"
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(
        "".join(
            json.dumps({"task": t, "text": "good movie stock market"}) + "\n" for t in ("topic", "sentiment", "topic")
        )
    )
    assert cli(["predict", str(out), "--input", str(src), "--output", str(dst)]) == 0
    rows = [json.loads(x) for x in dst.read_text().splitlines()]
    task = TaskConfig(name="topic", files={"train": "x"}, answer_regex=r"(\w+)", normalize="lowercase")
    assert rows[0]["prediction"] == answer(task, rows[0]["output"]) and rows[0] == rows[2]
    assert "output" not in rows[1] and rows[1]["prediction"] in ("pos", "neg")
