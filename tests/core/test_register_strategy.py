"""A user's own Gram rule, registered from this file, trains exactly like a built-in one: 2 DDP ranks == 1 process.

Two rules: a stateless function with an option (w_t = 1 / ||g_t||^power) and a stateful Strategy subclass (an
exponential moving average of each block's Gram, then norm balancing on it), whose state is checkpointed. The
worker (tests/dist_worker.py --plugin) imports this module, which registers both, then trains 3 AdamW steps.
Installed packages reach the registry through the entry-point group, tested with a real dist-info folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

import pytest
import torch
from safetensors.torch import load_file

from ortho_lora_dist.core.strategies import Strategy, get_spec, make_strategy, register_strategy, strategy_names
from tests.core.test_distributed import ROOT, launch, rel


@register_strategy("inverse_norm_test")
def inverse_norm(grams: torch.Tensor, order: Sequence[int], *, power: float = 1.0) -> torch.Tensor:
    """w_t = 1 / ||g_t||^power for a task with a gradient in the block, else 0."""
    sq = torch.diagonal(grams, dim1=-2, dim2=-1)
    return torch.where(sq > 0, sq.clamp_min(1e-300) ** (-power / 2), 0.0)


@register_strategy("ema_balance_test", stateful=True)
class EmaBalance(Strategy):
    """Norm balancing on an EMA of the block Grams: w_t = mean_k sqrt(E_kk) / sqrt(E_tt), E <- beta E + (1-beta) G."""

    def __init__(self, name: str, num_tasks: int, num_blocks: int, *, beta: float = 0.5) -> None:
        super().__init__(name, num_tasks, num_blocks)
        self.beta, self.ema = beta, None

    def _weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        self.ema = grams if self.ema is None else self.beta * self.ema + (1 - self.beta) * grams
        norms = torch.diagonal(self.ema, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        return torch.where(norms > 0, norms.mean(-1, keepdim=True) / norms.clamp_min(1e-300), 0.0)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ema": self.ema}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.ema = state["ema"]


def test_registered_rules_are_strategies():
    assert {"inverse_norm_test", "ema_balance_test"} <= set(strategy_names())
    assert get_spec("inverse_norm_test").options == {"power": 1.0}
    assert get_spec("ema_balance_test").stateful and get_spec("ema_balance_test").options == {"beta": 0.5}
    G = torch.diag_embed(torch.tensor([[4.0, 1.0, 0.0]], dtype=torch.float64))
    w = make_strategy("inverse_norm_test", {"power": 2.0}, 3, 1).weights(G, [0, 1, 2])
    torch.testing.assert_close(w, torch.tensor([[0.25, 1.0, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="strategy 'inverse_norm_test' has no option 'beta'; valid options: power"):
        make_strategy("inverse_norm_test", {"beta": 1}, 3, 1)
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("inverse_norm_test", inverse_norm)
    with pytest.raises(ValueError, match="did you mean 'inverse_norm_test'"):
        make_strategy("inverse_norm_tst", None, 3, 1)
    s = make_strategy("ema_balance_test", None, 3, 1)
    s.weights(G, [0, 1, 2])
    resumed = make_strategy("ema_balance_test", None, 3, 1)
    resumed.load_state_dict(s.state_dict())
    torch.testing.assert_close(resumed.weights(2 * G, [0, 1, 2]), s.weights(2 * G, [0, 1, 2]))


@pytest.mark.slow
def test_user_rule_two_ranks_equal_one_process(tmp_path, llama_dir):
    variants = "joint,inverse_norm_test:factor,ema_balance_test:global"
    plugin = ("--plugin", "tests.core.test_register_strategy", "--variants", variants)
    launch("single", tmp_path / "single", llama_dir, *plugin)
    launch("ddp", tmp_path / "ddp", llama_dir, *plugin)
    joint = load_file(tmp_path / "single" / "joint" / "rank0.safetensors")
    for v in ("inverse_norm_test-factor", "ema_balance_test-global"):
        r0, r1 = (load_file(tmp_path / "ddp" / v / f"rank{r}.safetensors") for r in (0, 1))
        ref = load_file(tmp_path / "single" / v / "rank0.safetensors")
        init = load_file(tmp_path / "single" / v / "init0.safetensors")
        assert all(torch.equal(r0[k], r1[k]) for k in r0), f"{v}: ranks differ"
        assert rel(ref, init) > 1e-2, f"{v}: training did not move the weights"
        assert rel(ref, joint) > 1e-3, f"{v}: the rule was not used (the run equals joint)"
        assert rel(r0, ref) < 1e-5, f"{v}: 2 ranks vs 1 process: {rel(r0, ref):.2e}"


def test_entry_point_plugin_reaches_the_config(tmp_path):
    """An installed package's rule (entry point group ortho_lora_dist.strategies) is found by name, also by the
    config check, without the user importing anything."""
    (tmp_path / "myrules.py").write_text(
        "import torch\n\ndef halves(grams, order):\n    return torch.full(grams.shape[:-1], 0.5, dtype=grams.dtype)\n"
    )
    info = tmp_path / "myrules-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myrules\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ortho_lora_dist.strategies]\nhalf_joint = myrules:halves\n")
    code = (
        "import torch\n"
        "from ortho_lora_dist.config.train import TrainConfig\n"
        "from ortho_lora_dist.core.strategies import make_strategy\n"
        "print(TrainConfig(strategy='half_joint').strategy)\n"
        "print(make_strategy('half_joint', None, 2, 1).weights(torch.eye(2)[None], [0, 1]).tolist())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["half_joint", "[[0.5, 0.5]]"]
