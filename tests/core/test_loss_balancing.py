"""Loss-only rules (FAMO, initial-loss weights) against the paper's update equations and a plain-PEFT training loop."""

import math

import pytest
import torch

from ortho_lora_dist import OrthoLoRA
from ortho_lora_dist.core.strategies import GRAM_STRATEGIES, LOSS_STRATEGIES, STRATEGIES, strategy_options
from ortho_lora_dist.core.strategies.loss_only import FAMO, InitialLoss, make_loss_balancer
from tests.core.test_step import conflicting_problem, losses


class ReferenceFAMO:
    """FAMO as written in the paper (Liu et al. 2023, Algorithm 1) with min losses 0, transcribed literally:
    the model descends sum_i z_i log(l_i + eps) / c, c = sum_i z_i / (l_i + eps) (detached); after the step the
    logits descend d = (d z / d xi)^T delta, delta_i = log(l_i before + eps) - log(l_i after + eps), with Adam
    (lr w_lr, weight decay gamma)."""

    def __init__(self, T, w_lr=0.025, gamma=0.01, eps=1e-8):
        self.w = torch.zeros(T, dtype=torch.float64, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=w_lr, weight_decay=gamma)
        self.eps = eps

    def weighted_loss(self, task_losses):
        z = torch.softmax(self.w, -1).detach().to(task_losses.dtype)
        D = task_losses + self.eps
        c = (z / D).sum().detach()
        return (D.log() * z / c).sum()

    def update(self, before, after):
        delta = (before + self.eps).log() - (after + self.eps).log()
        d = torch.autograd.grad(torch.softmax(self.w, -1), self.w, grad_outputs=delta.double())[0]
        self.opt.zero_grad()
        self.w.grad = d
        self.opt.step()


def test_registry():
    assert set(LOSS_STRATEGIES) == {"famo", "initial_loss"}
    assert set(STRATEGIES) == set(GRAM_STRATEGIES) | set(LOSS_STRATEGIES)
    assert strategy_options("famo") == {"w_lr": 0.025, "gamma": 0.01, "eps": 1e-8}
    assert strategy_options("initial_loss") == {}
    with pytest.raises(ValueError, match="no option 'c'"):
        make_loss_balancer("famo", {"c": 1}, 3)
    with pytest.raises(ValueError, match="w_lr > 0"):
        make_loss_balancer("famo", {"w_lr": -1.0}, 3)


def test_famo_coefficients_are_the_gradient_of_the_paper_objective():
    """a_t = T * d/dL_t [sum_i z_i log(L_i + eps) / c] (c detached): the paper's model gradient, scaled by T."""
    gen = torch.Generator().manual_seed(0)
    famo, ref = FAMO(4), ReferenceFAMO(4)
    with torch.no_grad():
        famo.logits.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
        ref.w.copy_(famo.logits)
    L = torch.rand(4, generator=gen, dtype=torch.float64) * 3 + 0.01
    Lg = L.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ref.weighted_loss(Lg), Lg)
    torch.testing.assert_close(famo.coefficients(L), 4 * grad, rtol=1e-12, atol=0)
    # equal losses and uniform logits: joint training's weights (all 1)
    torch.testing.assert_close(FAMO(3).coefficients(torch.full((3,), 0.7)), torch.ones(3, dtype=torch.float64))


def test_famo_logit_update_is_the_softmax_jacobian_times_delta():
    """The logits' gradient J_softmax(xi)^T delta = z * (delta - z . delta), stepped by Adam, as the reference does."""
    gen = torch.Generator().manual_seed(1)
    famo, ref = FAMO(3, w_lr=0.1, gamma=0.02), ReferenceFAMO(3, w_lr=0.1, gamma=0.02)
    seq = [torch.rand(3, generator=gen, dtype=torch.float64) + 0.05 for _ in range(8)]
    famo.end_step(seq[0])
    assert torch.equal(famo.logits.detach(), torch.zeros(3, dtype=torch.float64)), "no update before a second loss"
    for before, after in zip(seq, seq[1:]):
        z = famo.weights()
        delta = before.log() - after.log()
        closed_form = z * (delta - (z * delta).sum())
        with torch.enable_grad():
            (jvp,) = torch.autograd.grad(torch.softmax(famo.logits, -1), famo.logits, grad_outputs=delta)
        torch.testing.assert_close(jvp, closed_form, rtol=1e-12, atol=1e-15)
        famo.end_step(after)
        ref.update(before, after)
        torch.testing.assert_close(famo.logits.detach(), ref.w.detach(), rtol=1e-12, atol=1e-15)
    assert not torch.allclose(famo.weights(), torch.full((3,), 1 / 3, dtype=torch.float64)), "the weights moved"


def test_famo_moves_weight_to_the_task_whose_loss_falls_slowest():
    famo = FAMO(2, w_lr=0.1, gamma=0.0)
    L = torch.tensor([1.0, 1.0], dtype=torch.float64)
    for _ in range(20):
        famo.end_step(L)
        L = L * torch.tensor([0.8, 0.99], dtype=torch.float64)  # task 0 improves fast, task 1 barely
    z = famo.weights()
    assert z[1] > 0.6 > z[0], z


def test_famo_state_round_trip_continues_exactly():
    gen = torch.Generator().manual_seed(2)
    seq = [torch.rand(3, generator=gen, dtype=torch.float64) + 0.1 for _ in range(10)]
    a, b = FAMO(3), FAMO(3)
    for x in seq[:5]:
        a.end_step(x)
    b.load_state_dict(a.state_dict())
    for x in seq[5:]:
        a.end_step(x)
        b.end_step(x)
    assert torch.equal(a.logits.detach(), b.logits.detach())
    with pytest.raises(ValueError, match="for 'famo'"):
        InitialLoss(3).load_state_dict(a.state_dict())


def test_initial_loss_weights():
    w = InitialLoss(3)
    first = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    a = w.coefficients(first)
    inv = 1 / first
    torch.testing.assert_close(a, 3 * inv / inv.sum())
    assert math.isclose(float(a.mean()), 1.0)
    torch.testing.assert_close(w.coefficients(torch.tensor([9.0, 9.0, 9.0])), a)  # static from then on
    restored = InitialLoss(3)
    restored.load_state_dict(w.state_dict())
    torch.testing.assert_close(restored.coefficients(torch.ones(3)), a)
    waiting = InitialLoss(2).coefficients(torch.tensor([float("nan"), 1.0]))  # no usable first loss yet
    assert torch.equal(waiting, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["one_backward", "reference"])
def test_famo_training_equals_a_plain_peft_loop(mode):
    """Four AdamW steps of our engine with strategy famo == plain PEFT: backward of T x the paper's weighted log
    loss, reference logit updates with the one-step delay. The buffer holds ONE gradient (P values, not T x P)."""
    model, x, y, tids = conflicting_problem(0)
    olr = OrthoLoRA(model, 2, strategy="famo", strategy_options={"w_lr": 0.2}, mode=mode)
    opt = torch.optim.AdamW(olr.lora_params, lr=1e-2, weight_decay=0.0)
    assert olr.grad_tasks == 1 and olr.grads.all_local().numel() == olr.layout.numel
    ref_model, *_ = conflicting_problem(0)
    ref_params = [p for p in ref_model.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.0)
    famo, previous = ReferenceFAMO(2, w_lr=0.2), None
    for _ in range(4):
        olr.zero_grad()
        olr.set_tasks(tids)
        olr.backward(losses(model, x, y, tids))
        result = olr.project()
        assert not result.per_task and result.grams.shape[-1] == 1
        olr.write_grads(result)
        opt.step()

        ref_opt.zero_grad()
        task_losses = losses(ref_model, x, y, tids)
        current = task_losses.detach().double()
        torch.testing.assert_close(result.loss_coefficients.float(), (2 * famo_coeffs(famo, current)).float())
        (2 * famo.weighted_loss(task_losses)).backward()
        ref_opt.step()
        if previous is not None:  # after the step: the loss change of the previous update (one step delayed)
            famo.update(previous, current)
        previous = current
    for p, q in zip(olr.lora_params, [p for n, p in ref_model.named_parameters() if "lora_" in n]):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    state = olr.state_dict()
    assert state["strategy"]["balancer"]["name"] == "famo"


def famo_coeffs(ref: ReferenceFAMO, L: torch.Tensor) -> torch.Tensor:
    Lg = L.clone().requires_grad_(True)
    return torch.autograd.grad(ref.weighted_loss(Lg), Lg)[0]
