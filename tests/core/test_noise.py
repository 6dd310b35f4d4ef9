"""Signal vs noise of per-task gradients (core/noise.py, study/diagnose.py).

* Exact: the 2T half-gradients of one backward sum to the T task gradients, and the estimators equal a literal
  computation from separate backward passes of each half's own token-mean loss (tiny Llama, answers of unequal
  length; fp32, 1e-5 relative).
* Known truth: tasks whose true gradients oppose are detected as conflicting (C_st < 0, CI excluding 0) under heavy
  noise; tasks with orthogonal true gradients and the same noise are not; the noise scale recovers tr(Sigma)/|G|^2.
* ``ortho-lora diagnose`` end to end, and 2 ranks == 1 process.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ortho_lora_dist import OrthoLoRA
from ortho_lora_dist.core.noise import step_estimates, summarise
from tests.models import VOCAB, lora_llama, without_dropout

T = 2


def _batch(seed: int = 0, n: int = 8):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 12), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for r in range(n):  # answers of 1-6 tokens at the end, the rest prompt
        labels[r, : 12 - int(torch.randint(1, 7, (1,), generator=gen))] = -100
    tasks = torch.tensor([r % T for r in range(n)])
    groups = 2 * tasks + (torch.arange(n) // T) % 2  # the r-th row of a task: half r % 2
    return ids, mask, labels, tasks, groups


def _token_losses(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    keep = target != -100
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.clamp_min(0).reshape(-1), reduction="none")
    return loss.view_as(target) * keep, keep


def _vectors(olr: OrthoLoRA) -> torch.Tensor:
    """[G, P] per-group LoRA gradients from the capture's buffer, factor by factor (the same order in every olr)."""
    return torch.cat([olr.grads.slot(i).reshape(olr.grad_tasks, -1) for i in range(len(olr.layout.factors))], 1)


def _losses(model, ids, mask, labels, rows_of, groups: int) -> torch.Tensor:
    """[groups] token-mean losses: group g's tokens summed over ``rows_of`` == g, divided by its own token count."""
    loss, keep = _token_losses(model, ids, mask, labels)
    sums = torch.zeros(groups).index_add(0, rows_of, loss.sum(1))
    counts = torch.zeros(groups).index_add(0, rows_of, keep.sum(1).float())
    return sums / counts


def test_estimators_equal_separate_backward_passes(llama_dir):
    ids, mask, labels, tasks, groups = _batch()
    model = lora_llama(llama_dir)
    olr = OrthoLoRA(model, 2 * T, strategy="joint")
    olr.set_tasks(groups)
    task_loss = _losses(model, ids, mask, labels, tasks, T)
    olr.backward(torch.stack([task_loss, torch.zeros(T)], 1).reshape(-1))  # loss on group 2t, split by the capture
    halves = _vectors(olr).double()
    result = olr.project()

    ref_tasks = OrthoLoRA(lora_llama(llama_dir), T, strategy="joint", mode="reference")  # T separate backward passes
    ref_tasks.backward(_losses(ref_tasks.model, ids, mask, labels, tasks, T))
    task_grads = _vectors(ref_tasks).double()
    assert float((halves.view(T, 2, -1).sum(1) - task_grads).norm() / task_grads.norm()) < 1e-5, "h_a + h_b == g_t"
    ref_halves = OrthoLoRA(lora_llama(llama_dir), 2 * T, strategy="joint", mode="reference")  # each half's own mean
    ref_halves.backward(_losses(ref_halves.model, ids, mask, labels, groups, 2 * T))
    own = _vectors(ref_halves).double()
    _, keep = _token_losses(model, ids, mask, labels)
    tokens = torch.zeros(2 * T, dtype=torch.float64).index_add(0, groups, keep.sum(1).double())
    samples = torch.bincount(groups, minlength=2 * T).double()
    est = step_estimates(result.grams.sum(0), tokens, samples)
    for t in range(T):
        ga, gb = own[2 * t], own[2 * t + 1]
        want_trace = float((ga - gb).square().sum() / (1 / samples[2 * t] + 1 / samples[2 * t + 1]))
        assert est["signal"][t].item() == pytest.approx(float(ga @ gb), rel=1e-5, abs=1e-9)
        assert est["trace"][t].item() == pytest.approx(want_trace, rel=1e-5)
    torch.testing.assert_close(est["raw"], task_grads @ task_grads.T, rtol=1e-5, atol=1e-9)


def _synthetic(true: torch.Tensor, noise: float, n: int, steps: int, seed: int):
    """Half-gradient Grams of ``steps`` steps: each half the mean of n/2 samples g = G_t + noise * N(0, I)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    T, D = true.shape
    for _ in range(steps):
        halves = (
            torch.stack(
                [true[t] + noise * torch.randn(n // 2, D, generator=gen).mean(0) for t in range(T) for _ in range(2)]
            ).double()
            / 2
        )  # h = (n_h / n_t) * half mean, equal halves
        out.append(step_estimates(halves @ halves.T, torch.full((2 * T,), n / 2), torch.full((2 * T,), n / 2)))
    return out


def test_true_conflict_is_detected_and_noise_is_not():
    D, n, noise = 512, 8, 0.5  # per-sample noise norm ~ 11 against true gradients of norm 1: mostly noise
    v = torch.randn(D, generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    w = torch.randn(D, generator=torch.Generator().manual_seed(1))
    w = w - (w @ v) * v
    w = w / w.norm()
    opposed = summarise(_synthetic(torch.stack([v, -0.8 * v + 0.6 * w]), noise, n, 300, 2), torch.tensor([n, n]))
    assert opposed["conflict"][0][1] == pytest.approx(-0.8, abs=0.15)
    assert opposed["conflict_ci"][1][0][1] < 0, "the CI excludes 0: a true conflict"
    orthogonal = summarise(_synthetic(torch.stack([v, w]), noise, n, 300, 3), torch.tensor([n, n]))
    lo, hi = orthogonal["conflict_ci"][0][0][1], orthogonal["conflict_ci"][1][0][1]
    assert lo < 0 < hi, "orthogonal true gradients: no conflict detected"
    assert orthogonal["raw_cosine"][0][1] == pytest.approx(0, abs=0.05)
    assert abs(opposed["raw_cosine"][0][1]) < 0.2, "what one step sees: the true -0.8 drowned in noise"
    # tr(Sigma) = noise^2 * D per sample, |G|^2 = 1: B = 128
    assert orthogonal["noise_scale"][0] == pytest.approx(noise**2 * D, rel=0.25)


@pytest.mark.slow
def test_diagnose_end_to_end_and_two_ranks_equal_one_process(env, tmp_path, capsys):  # noqa: F811
    import yaml

    from ortho_lora_dist.cli import main as cli
    from tests.app.test_app import make_config
    from tests.core.test_engine_resume import torchrun

    path = make_config(env, tmp_path / "run", per_task_batch_size=8)
    cfg = yaml.safe_load(path.read_text())
    without_dropout(cfg, tmp_path / "bert-no-dropout")
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["diagnose", str(path), "--steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "sentiment vs topic: C " in out and "verdict:" in out and "written:" in out
    one = json.loads((tmp_path / "run-diagnose" / "diagnose.json").read_text())
    assert one["task_names"] == ["sentiment", "topic"] and one["steps"] == 6
    cfg["train"]["per_task_batch_size"] = 4
    cfg["output_dir"] = str(tmp_path / "two")
    two_path = tmp_path / "two.yaml"
    two_path.write_text(yaml.safe_dump(cfg))
    torchrun(["diagnose", str(two_path), "--steps", "6"], tmp_path / "two.log")
    two = json.loads((tmp_path / "two-diagnose" / "diagnose.json").read_text())
    for key in ("signal_share", "raw_share", "noise_scale"):
        for a, b in zip(one[key], two[key]):
            assert (a is None and b is None) or b == pytest.approx(a, rel=1e-4), key
    c1, c2 = one["conflict"][0][1], two["conflict"][0][1]
    assert (c1 is None and c2 is None) or math.isclose(c1, c2, rel_tol=1e-4)
