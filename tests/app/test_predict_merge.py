"""The self-describing adapter directory, ``ortho-lora predict`` and ``ortho-lora merge`` (offline, tiny models)."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ortho_lora_dist.cli import main as cli
from ortho_lora_dist.config import load_config
from ortho_lora_dist.evaluation.metrics import compute
from tests.app.test_app import make_config

PKG_BERT = "pkg://olr_tiny_models/bert"  # the tiny BERT inside an importable package, as configs/demo.yaml does


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):  # noqa: F811
    """One tiny encoder run (base named pkg://...) and one tiny causal-LM run, trained once for the module."""
    root = tmp_path_factory.mktemp("runs")
    pkg = root / "site" / "olr_tiny_models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    shutil.copytree(env["models"]["bert"], pkg / "bert")
    sys.path.insert(0, str(root / "site"))
    importlib.invalidate_caches()
    enc = [str(make_config(env, root / "enc", steps=3, plots=False)), f"model.name_or_path={PKG_BERT}"]
    lm = [
        str(make_config(env, root / "lm", kind="causal-lm", steps=2, plots=False)),
        "tasks.0.max_eval_samples=8",
        "tasks.1.max_eval_samples=8",
    ]
    assert cli(["train", *enc]) == 0
    assert cli(["train", *lm]) == 0
    yield {"enc": root / "enc", "lm": root / "lm", "enc_args": enc, "lm_args": lm}
    sys.path.remove(str(root / "site"))


def _records(env, split="validation", limit=None):  # noqa: F811
    """Validation records of both tasks, interleaved (input order != task order)."""
    rows = {
        n: [json.loads(x) for x in Path(env["data"][n][split]).read_text().splitlines()][:limit]
        for n in ("sentiment", "topic")
    }
    return [
        {"task": n, "text": rows[n][i]["text"], "label": rows[n][i]["label"]}
        for i in range(len(rows["sentiment"]))
        for n in ("sentiment", "topic")
    ]


def _predict(adapter, records, tmp_path, capsys=None) -> list[dict]:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"task": r["task"], "text": r["text"]}) + "\n" for r in records))
    assert cli(["predict", str(adapter), "--input", str(src), "--output", str(out)]) == 0
    return [json.loads(x) for x in out.read_text().splitlines()]


def _in_process(args, run, records) -> list:
    """What the trained model itself predicts (built from the config, weights from the run's adapter)."""
    from ortho_lora_dist.evaluation.loader import load_for_eval
    from ortho_lora_dist.models.placement import to_device

    t = load_for_eval(load_config(args[0], args[1:]), run / "adapter")
    preds: list = [None] * len(records)
    for i, task in enumerate(t.tasks):  # one batch per task, as predict batches them
        rows = [j for j, r in enumerate(records) if r["task"] == task.name]
        batch = [{**records[j], "label": "" if task.config.type == "generation" else 0} for j in rows]
        for j, p in zip(rows, t.model.predict(to_device(t.model.collate(batch, [i] * len(rows)), t.info.device))):
            preds[j] = task.labels[p] if task.labels else p
    return preds


# -- the adapter directory ----------------------------------------------------------------------------------
def test_adapter_dir_describes_itself(runs):
    enc, lm = runs["enc"] / "adapter", runs["lm"] / "adapter"
    conf = json.loads((enc / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == PKG_BERT and conf["task_type"] == "FEATURE_EXTRACTION"
    conf = json.loads((lm / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == load_config(runs["lm_args"][0]).model.name_or_path
    assert conf["task_type"] == "CAUSAL_LM"
    meta = json.loads((enc / "tasks.json").read_text())
    assert meta["model"]["kind"] == "encoder-classification" and meta["model"]["name_or_path"] == PKG_BERT
    assert {k: meta["model"][k] for k in ("pooling", "max_length", "quantization", "dtype")} == {
        "pooling": "mean",
        "max_length": 16,
        "quantization": "none",
        "dtype": "float32",
    }
    heads = load_file(str(enc / "heads.safetensors"))
    for t in meta["tasks"]:
        assert t["metric"] == "accuracy" and t["labels"] and set(t["head"]) <= set(heads)
    lm_tasks = {t["name"]: t for t in json.loads((lm / "tasks.json").read_text())["tasks"]}
    assert lm_tasks["sentiment"]["label_words"] == {"pos": " good", "neg": " bad"}
    assert lm_tasks["topic"]["type"] == "generation" and lm_tasks["topic"]["prompt"] == "text: {text} topic:"
    card = (enc / "README.md").read_text()
    ev = json.loads((runs["enc"] / "eval.json").read_text())
    for text in (
        "sentiment",
        "topic",
        "train.strategy: joint",
        "train.granularity: factor",
        "lora target_modules",
        "ortho-lora predict",
        f"{ev['validation']['sentiment']:.4f}",
        f"{ev['test']['topic']:.4f}",
    ):
        assert text in card, text
    assert "Not evaluated yet" not in card


# -- predict ----------------------------------------------------------------------------------------------
def test_predict_encoder_from_a_copied_adapter(env, runs, tmp_path, capsys):  # noqa: F811
    moved = tmp_path / "elsewhere" / "my-adapter"
    shutil.copytree(runs["enc"] / "adapter", moved)  # the adapter alone: no config, no data, no run dir
    records = _records(env)
    out = _predict(moved, records, tmp_path)
    assert "predict: 48/48" in capsys.readouterr().err
    assert [o["task"] for o in out] == [r["task"] for r in records]
    assert [o["prediction"] for o in out] == _in_process(runs["enc_args"], runs["enc"], records)
    ev = json.loads((runs["enc"] / "eval.json").read_text())["validation"]
    for name in ("sentiment", "topic"):
        mine = [(r["label"], o["prediction"]) for r, o in zip(records, out) if r["task"] == name]
        assert compute("accuracy", *zip(*mine)) == pytest.approx(ev[name])
    # non-finite outputs are null, never a label
    heads = load_file(str(moved / "heads.safetensors"))
    heads["heads.sentiment.weight"][:] = float("nan")
    save_file(heads, str(moved / "heads.safetensors"))
    out = _predict(moved, records[:4], tmp_path)
    assert [o["prediction"] is None for o in out] == [True, False, True, False]


def test_predict_causal_lm(env, runs, tmp_path):  # noqa: F811
    records = _records(env, limit=4)
    out = _predict(runs["lm"], records, tmp_path)
    assert [o["prediction"] for o in out] == _in_process(runs["lm_args"], runs["lm"], records)
    assert all(o["prediction"] in ("pos", "neg") for o in out[::2]) and all(
        isinstance(o["prediction"], str) for o in out
    )


BAD = [
    ('{"task": "sentiment", "text": "good"}\n{"task": "sentiment", "text": \n', 2, "not valid JSON"),
    ('{"task": "sentimnet", "text": "good"}\n', 1, "unknown task 'sentimnet' (did you mean 'sentiment'?)"),
    ('{"task": "topic"}\n', 1, "field 'text' is missing (task 'topic')"),
    ('{"text": "good"}\n', 1, "field 'task' is missing"),
    ('\n["sentiment", "good"]\n', 2, "expected a JSON object"),
    ('{"task": "topic", "text": "a", "text_pair": "b"}\n', 1, "trained on single texts"),
    (b'{"task": "topic", "text": "ok"}\n{"task": "topic", "text": "caf\xe9"}\n', 2, "not UTF-8 text"),
]


@pytest.mark.parametrize("content,line,message", BAD)
def test_predict_refuses_bad_input(runs, tmp_path, capsys, content, line, message):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert cli(["predict", str(runs["enc"]), "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src}, line {line}: " in err and message in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == [src], "no partial output"


def test_predict_refuses_an_old_adapter(runs, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(runs["enc"] / "adapter", old)
    (old / "tasks.json").write_text(
        json.dumps({"tasks": [{"name": "sentiment", "type": "classification", "labels": ["neg", "pos"]}]})
    )
    (tmp_path / "in.jsonl").write_text('{"task": "sentiment", "text": "good"}\n')
    assert cli(["predict", str(old), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "older version" in capsys.readouterr().err


# -- merge ------------------------------------------------------------------------------------------------
def test_merge_encoder_equals_base_plus_adapter(env, runs, tmp_path, capsys):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "merged"
    assert cli(["merge", str(runs["enc"]), str(out)]) == 0
    merged, info = AutoModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    base = AutoModel.from_pretrained(env["models"]["bert"], add_pooling_layer=False)
    ref = PeftModel.from_pretrained(base, str(runs["enc"] / "adapter")).eval()
    enc = AutoTokenizer.from_pretrained(str(out))(
        ["good movie", "the match was awful and sad"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        torch.testing.assert_close(
            merged.eval()(**enc).last_hidden_state, ref(**enc).last_hidden_state, atol=1e-5, rtol=0
        )
    heads, saved = (
        load_file(str(out / "heads.safetensors")),
        load_file(str(runs["enc"] / "adapter" / "heads.safetensors")),
    )
    assert heads.keys() == saved.keys() and all(torch.equal(heads[k], saved[k]) for k in heads)
    assert json.loads((out / "tasks.json").read_text())["tasks"][0]["head"] == [
        "heads.sentiment.weight",
        "heads.sentiment.bias",
    ]
    assert cli(["merge", str(runs["enc"]), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli(["merge", str(runs["enc"]), str(out), "--force"]) == 0


def test_merge_causal_lm_equals_base_plus_adapter(env, runs, tmp_path):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert cli(["merge", str(runs["lm"] / "adapter"), str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(env["models"]["llama"]), str(runs["lm"] / "adapter")
    ).eval()
    ids = torch.tensor([[1, 5, 9, 14, 30, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("quant,bits", [("nf4", "4-bit"), ("int8", "8-bit")])
def test_merge_refuses_quantized_base(runs, tmp_path, capsys, quant, bits):
    fake = tmp_path / "adapter"
    shutil.copytree(runs["enc"] / "adapter", fake)
    meta = json.loads((fake / "tasks.json").read_text())
    meta["model"]["quantization"] = quant
    (fake / "tasks.json").write_text(json.dumps(meta))
    assert cli(["merge", str(fake), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert f"{bits} ({quant}) base" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "merged").exists()
