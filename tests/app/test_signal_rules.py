"""train.gram: a Gram rule on the debiased Gram (|G_t|^2 from each task's two half-gradients) or on an EMA of the
Grams. Exact: the debiased matrix equals core/noise.py's estimator (itself tested against separate backward passes),
the wrapped rule is the plain rule applied to it, 2 DDP ranks == 1 process on a causal LM with answers of unequal
length, the EMA resumes bitwise; both change the update (they are not joint / raw in disguise); bad combinations are
refused naming the key. A known-noise case: norm balancing on the raw Gram equalises noisy norms, on the debiased
Gram it recovers the true norms' ratio."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ortho_lora_dist.cli import main as cli
from ortho_lora_dist.config import ConfigError, load_config
from ortho_lora_dist.core.noise import debiased_grams, step_estimates
from ortho_lora_dist.core.strategies import make_strategy
from ortho_lora_dist.core.strategies.signal import Ema, HalfGroups, with_gram_estimate
from tests.app.test_app import make_config
from tests.app.test_token_exact import _adapter, _assert_same, _config
from tests.app.test_token_exact import setting as setting  # noqa: F401 (the fixture)
from tests.core.test_engine_resume import torchrun


def _halves(T: int, P: int, seed: int, true: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """[2T, P] half-gradient parts h (task t: rows 2t, 2t + 1, each half of equal tokens): h = (G_t + noise) / 2."""
    g = torch.Generator().manual_seed(seed)
    rows = [(true[t] + noise[t] * torch.randn(P, generator=g, dtype=torch.float64)) / 2 for t in range(T) for _ in "ab"]
    return torch.stack(rows)


def test_debiased_gram_is_the_noise_estimator_made_psd():
    T, P = 3, 50
    true = torch.randn(T, P, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = _halves(T, P, 1, true, torch.tensor([0.1, 0.1, 0.1]))
    H, tokens = h @ h.T, torch.tensor([5.0, 7.0, 3.0, 3.0, 4.0, 6.0])
    est = step_estimates(H, tokens, torch.ones(2 * T))["true"]
    D = debiased_grams(H[None], tokens)[0]
    assert bool((torch.linalg.eigvalsh(est) > 0).all())  # low noise: the estimate is a Gram matrix already
    torch.testing.assert_close(D, est)
    noisy = _halves(T, P, 2, true * 0.01, torch.tensor([3.0, 3.0, 3.0]))  # noise >> signal: negative estimates
    Hn = noisy @ noisy.T
    raw_est = step_estimates(Hn, tokens, torch.ones(2 * T))["true"]
    Dn = debiased_grams(Hn[None], tokens)[0]
    assert float(torch.linalg.eigvalsh(raw_est).min()) < 0 and float(torch.linalg.eigvalsh(Dn).min()) > -1e-9
    lam, vec = torch.linalg.eigh(raw_est)  # the nearest PSD matrix in Frobenius norm
    torch.testing.assert_close(Dn, (vec * lam.clamp_min(0)) @ vec.T)


def test_wrapped_rules_are_the_plain_rule_on_their_gram():
    T, B, P = 3, 2, 40
    true = torch.randn(B, T, P, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    H = torch.stack(
        [(lambda h: h @ h.T)(_halves(T, P, 4 + b, true[b], torch.tensor([1.0, 0.5, 2.0]))) for b in range(B)]
    )
    tokens = torch.tensor([4.0, 4.0, 2.0, 6.0, 3.0, 3.0])
    for name in ("norm_balance", "ortho", "imtl_g"):
        wrapped = with_gram_estimate(make_strategy(name, None, T, B), "debiased", halves=True)
        assert isinstance(wrapped, HalfGroups) and wrapped.num_tasks == 2 * T
        wrapped.observe_counts(tokens)
        w = wrapped.weights(H, [4, 5, 0, 1, 2, 3])  # the step's order over groups: tasks 2, 0, 1
        plain = make_strategy(name, None, T, B).weights(debiased_grams(H, tokens), [2, 0, 1])
        torch.testing.assert_close(w, plain.repeat_interleave(2, dim=-1))
    G = H.view(B, T, 2, T, 2).sum((2, 4))
    ema = with_gram_estimate(make_strategy("norm_balance", None, T, B), "ema", beta=0.75)
    assert isinstance(ema, Ema)
    ema.weights(G, [0, 1, 2])
    w2 = ema.weights(2 * G, [0, 1, 2])
    plain = make_strategy("norm_balance", None, T, B).weights(0.75 * G + 0.25 * 2 * G, [0, 1, 2])
    torch.testing.assert_close(w2, plain)
    resumed = with_gram_estimate(make_strategy("norm_balance", None, T, B), "ema", beta=0.75)
    resumed.load_state_dict(ema.state_dict())
    torch.testing.assert_close(resumed.weights(G, [0, 1, 2]), ema.weights(G, [0, 1, 2]))


def test_debiased_norm_balance_sees_true_norms_through_the_noise():
    """Task 0: |G| = 1, little noise; task 1: |G| = 0.2, noise ~10x its signal. The rule's own estimate of the two
    norms, averaged over 200 steps: raw |g_1| is dominated by noise (ratio far from 5), debiased recovers ~5."""
    T, P, steps = 2, 400, 200
    base = torch.randn(T, P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    true = base / base.norm(dim=1, keepdim=True) * torch.tensor([[1.0], [0.2]], dtype=torch.float64)
    noise = torch.tensor([0.01, 0.2])  # per coordinate: |noise| ~ 0.2 * sqrt(400) = 4 >> 0.2
    raw_sq, deb_sq = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    tokens = torch.ones(2 * T)
    for s in range(steps):
        h = _halves(T, P, 100 + s, true, noise)
        H = h @ h.T
        raw_sq += torch.diagonal(H.view(T, 2, T, 2).sum((1, 3)))
        deb_sq += torch.diagonal(step_estimates(H, tokens, torch.ones(2 * T))["true"])
    raw_ratio, deb_ratio = float((raw_sq[0] / raw_sq[1]).sqrt()), float((deb_sq[0] / deb_sq[1]).sqrt())
    assert raw_ratio < 1.0 and 4.0 < deb_ratio < 6.5, (raw_ratio, deb_ratio)


def test_bad_combinations_are_refused_naming_the_key(env, tmp_path):
    path = make_config(env, tmp_path / "run")
    with pytest.raises(ConfigError, match="train.gram 'debiased' splits each task's rows.*packing: false"):
        load_config(path, ["train.gram=debiased", "train.packing=true", "train.strategy=norm_balance"])
    with pytest.raises(ConfigError, match="train.gram 'ema' needs a Gram rule; 'famo' is loss-only"):
        load_config(path, ["train.gram=ema", "train.strategy=famo"])
    with pytest.raises(ConfigError, match="gram_ema_beta"):
        load_config(path, ["train.gram=ema", "train.gram_ema_beta=1"])


@pytest.mark.slow
def test_debiased_two_ranks_equal_one_process(setting, tmp_path):  # noqa: F811
    """Halves by row parity within each task of the global batch: 2 ranks x 2 rows == 1 process x 4 rows."""
    train = {"gram": "debiased"}
    ref, raw = tmp_path / "ref", tmp_path / "raw"
    assert cli(["train", str(_config(setting, ref, 4, strategy="norm_balance", train=train))]) == 0
    assert cli(["train", str(_config(setting, raw, 4, strategy="norm_balance"))]) == 0
    out = tmp_path / "ddp"
    torchrun(["train", str(_config(setting, out, 2, strategy="norm_balance", train=train))], tmp_path / "ddp.log")
    _assert_same(_adapter(ref), _adapter(out))
    a, b = _adapter(ref), _adapter(raw)
    diff = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5 / sum(float(b[k].norm() ** 2) for k in b) ** 0.5
    assert diff > 1e-4, "debiased norm balancing trained exactly like the raw one: the option did nothing"


def test_ema_resumes_bitwise(env, tmp_path):
    """The EMA is strategy state: resumed from checkpoint step 2 of 4, the run ends bitwise equal (heads included)."""
    path = make_config(env, tmp_path / "full", steps=4, checkpoint_every=2, plots=False, strategy="imtl_g")
    cfg = yaml.safe_load(path.read_text())
    cfg["train"].update(gram="ema", gram_ema_beta=0.5)
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(path)]) == 0
    full, cut = tmp_path / "full", tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-4")
    shutil.rmtree(cut / "adapter")
    (cut / "finished.json").unlink()
    assert cli(["train", str(path), f"output_dir={cut}", "--resume"]) == 0
    for f in ("adapter_model.safetensors", "heads.safetensors"):
        a, b = load_file(str(full / "adapter" / f)), load_file(str(cut / "adapter" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_noise_telemetry_logs_windows_and_leaves_the_update_alone(env, tmp_path):
    """train.noise_every: 2: a `noise` record every 2 steps (overall and attention: BERT's query / value LoRA), with
    every task's signal share and noise scale and the pair's debiased conflict with its CI; the update equals the run
    without telemetry (ortho: the rule sees the halves' summed Gram, i.e. the step's)."""
    import json

    plain = make_config(env, tmp_path / "plain", steps=4, plots=False, strategy="ortho")
    assert cli(["train", str(plain)]) == 0
    cfg = yaml.safe_load(plain.read_text())
    cfg["train"]["noise_every"] = 2
    cfg["output_dir"] = str(tmp_path / "noise")
    path = tmp_path / "noise.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(path)]) == 0
    records = [json.loads(x) for x in (tmp_path / "noise" / "metrics.jsonl").read_text().splitlines()]
    noise = [r for r in records if "noise" in r]
    assert [r["step"] for r in noise] == [2, 4] and all(r["noise_window"] == 2 for r in noise)
    for r in noise:
        assert set(r["noise"]) == {"all", "attention"}
        entry = r["noise"]["all"]
        assert set(entry["signal_share"]) == {"sentiment", "topic"}
        assert abs(sum(entry["signal_share"].values()) - 1) < 1e-4 or sum(entry["signal_share"].values()) == 0
        c, (lo, hi) = entry["conflict"]["sentiment/topic"], entry["conflict_ci"]["sentiment/topic"]
        assert c is None or lo <= c <= hi  # None: undefined (a summed signal estimate <= 0), strict JSON
    a = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "noise" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
