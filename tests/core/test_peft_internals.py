"""The PEFT internals that capture.py relies on (pyproject.toml bounds peft and transformers because of them).

capture.py swaps the class of each ``LoraLayer.lora_A[adapter]`` / ``lora_B[adapter]`` nn.Linear and assumes
LoRA's forward is ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` over ``active_adapters``. A PEFT
release that changes any of this fails here, with a message naming what changed, before it silently
changes the per-task gradients.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

from ortho_lora_dist.core.capture import TaskGradCapture, find_lora_factors
from ortho_lora_dist.core.layout import factor_rows


def require(ok: bool, what: str) -> None:
    if not ok:
        pytest.fail(
            f"PEFT {peft.__version__} changed an internal that ortho_lora_dist/capture.py relies on: {what}. "
            "Update capture.py (find_lora_factors, _TaskLinear) for this PEFT, then raise the peft bound in "
            "pyproject.toml.",
            pytrace=False,
        )


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


def lora_model(dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], lora_dropout=dropout, init_lora_weights=False)
    return get_peft_model(Tiny(), cfg)


def lora_layer(model):
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    require(len(layers) == 1, f"get_peft_model(target_modules=['lin']) gave {len(layers)} LoraLayer modules, not 1")
    return layers[0]


def test_lora_layer_structure():
    layer = lora_layer(lora_model(dropout=0.1))
    require(list(layer.active_adapters) == ["default"], f"LoraLayer.active_adapters is {layer.active_adapters!r}")
    for name in ("lora_A", "lora_B", "lora_dropout"):
        require(
            isinstance(getattr(layer, name, None), nn.ModuleDict), f"LoraLayer.{name} is no longer an nn.ModuleDict"
        )
    for name in ("lora_A", "lora_B"):
        lin = getattr(layer, name)["default"]
        require(
            type(lin) is nn.Linear,
            f"LoraLayer.{name}['default'] is a {type(lin).__name__}, not a plain nn.Linear (capture swaps its class)",
        )
        require(lin.bias is None, f"LoraLayer.{name}['default'] has a bias by default")
    require(
        isinstance(layer.scaling, dict) and "default" in layer.scaling, "LoraLayer.scaling is not a dict by adapter"
    )


def test_forward_is_b_of_a_of_dropout_times_scaling():
    model = lora_model(dropout=0.5)
    model.train()
    layer = lora_layer(model)
    seen = {}

    def keep(name):
        def hook(_module, inputs, output):
            seen[name] = (inputs[0].detach().clone(), output.detach().clone())

        return hook

    handles = [
        layer.lora_dropout["default"].register_forward_hook(keep("dropout")),
        layer.lora_A["default"].register_forward_hook(keep("A")),
        layer.lora_B["default"].register_forward_hook(keep("B")),
        layer.register_forward_hook(keep("layer")),
    ]
    x = torch.randn(4, 6)
    torch.manual_seed(1)
    model(x)
    for h in handles:
        h.remove()
    require(
        set(seen) == {"dropout", "A", "B", "layer"},
        f"LoRA forward did not call {sorted({'dropout', 'A', 'B'} - set(seen))}",
    )
    require(torch.equal(seen["dropout"][0], x), "lora_dropout no longer receives the layer input x")
    require(torch.equal(seen["A"][0], seen["dropout"][1]), "lora_A no longer receives dropout(x)")
    require(torch.equal(seen["B"][0], seen["A"][1]), "lora_B no longer receives lora_A(dropout(x))")
    base = layer.get_base_layer()
    expected = base(x) + seen["B"][1] * layer.scaling["default"]
    require(
        torch.allclose(seen["layer"][1], expected, atol=1e-6),
        "the LoRA layer output is no longer base(x) + lora_B(lora_A(dropout(x))) * scaling",
    )


def test_captured_factor_gradients_match_per_task_autograd():
    """Through the class swap, each factor sees the input it expects: per-task gradients equal one backward per task."""
    model = lora_model(dropout=0.0)
    reference = copy.deepcopy(model)
    x, tasks = torch.randn(6, 6), torch.tensor([0, 1, 0, 1, 1, 0])
    factors = find_lora_factors(model)
    require([f for _, f, _ in factors] == ["A", "B"], f"find_lora_factors found {[(n, f) for n, f, _ in factors]}")
    capture = TaskGradCapture(model, num_tasks=2)
    capture.set_tasks(tasks)
    out = model(x).pow(2).sum(-1)
    losses = torch.stack([out[tasks == t].mean() for t in range(2)])
    losses.sum().backward()
    full = capture.grads.all_local()
    got = torch.cat([factor_rows(full[f.region], f, 2) for f in capture.layout.factors], dim=1)  # [T, P]
    ref_factors = find_lora_factors(reference)
    for t in range(2):
        reference.zero_grad()
        ref = reference(x).pow(2).sum(-1)
        ref[tasks == t].mean().backward()
        want = torch.cat([lin.weight.grad.reshape(-1) for _, _, lin in ref_factors])
        require(
            torch.allclose(got[t], want, atol=1e-6),
            f"task {t}: the captured LoRA gradient differs from autograd's (max |diff| "
            f"{(got[t] - want).abs().max():.3g}): the factors no longer see the inputs capture.py assumes",
        )
