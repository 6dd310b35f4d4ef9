"""A minimal single-process training step on a two-task problem built to conflict in the shared adapter."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from ortho_lora_dist import OrthoLoRA, task_mean
from ortho_lora_dist.core.layout import factor_rows


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)


def conflicting_problem(seed=0):
    """Task 0 wants y = +sum(x), task 1 wants y = -sum(x) + 2 x_0 on overlapping inputs: opposed gradients."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=gen)
    tids = torch.arange(64) % 2
    y = torch.where(tids == 0, x.sum(1), -x.sum(1) + 2 * x[:, 0])
    torch.manual_seed(seed)
    base = TwoLayer()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False))
    return model, x, y, tids


def losses(model, x, y, tids):
    return task_mean((model(x) - y) ** 2, tids, 2)


def run(strategy, steps, seed=0):
    model, x, y, tids = conflicting_problem(seed)
    olr = OrthoLoRA(model, 2, strategy=strategy, seed=seed)
    opt = torch.optim.AdamW(olr.lora_params, lr=1e-2, weight_decay=0.0)
    history, results = [], []
    for _ in range(steps):
        olr.zero_grad()
        olr.set_tasks(tids)
        task_losses = losses(model, x, y, tids)
        history.append(task_losses.detach())
        olr.backward(task_losses)
        result = olr.project()
        olr.write_grads(result)
        opt.step()
        results.append(result)
    return torch.stack(history), results, olr


def test_conflict_detected_and_updates_differ():
    _, res_o, olr_o = run("ortho", 1)
    _, res_j, olr_j = run("joint", 1)
    assert (res_o[0].mean_cosine < 0).any(), "the problem is built so that some blocks conflict"
    assert (res_o[0].conflict_rate > 0).any()
    assert not torch.allclose(res_o[0].combined, res_j[0].combined)
    plain_sum = torch.cat([factor_rows(olr_j.buffer[0], f, 2).sum(0) for f in olr_j.layout.factors])
    torch.testing.assert_close(res_j[0].combined, plain_sum)  # joint = plain sum


def test_both_task_losses_go_down_under_ortho():
    history, results, _ = run("ortho", 60)
    start, end = history[:3].mean(0), history[-3:].mean(0)
    assert (end < 0.7 * start).all(), f"task losses {start.tolist()} -> {end.tolist()}"
    assert sum(bool((r.conflict_rate > 0).any()) for r in results) > 0


def test_nonfinite_gradient_skips_the_step():
    model, x, y, tids = conflicting_problem()
    olr = OrthoLoRA(model, 2)
    olr.set_tasks(tids)
    olr.backward(losses(model, x, y, tids))
    olr.buffer[0, 3] = float("nan")
    result = olr.project()
    assert result.skipped
    olr.write_grads(result)
    assert all(p.grad is None for p in olr.lora_params)


@pytest.mark.parametrize("granularity,blocks", [("factor", 4), ("module", 2), ("global", 1)])
def test_granularity_blocks(granularity, blocks):
    model, x, y, tids = conflicting_problem()
    olr = OrthoLoRA(model, 2, granularity=granularity)
    assert olr.layout.num_blocks == blocks
    olr.set_tasks(tids)
    olr.backward(losses(model, x, y, tids))
    result = olr.project()
    from ortho_lora_dist.core.projection import project

    for b in range(blocks):  # combined columns of each block = project() of that block's task gradients
        cols = torch.cat(
            [
                factor_rows(olr.buffer[0], f, 2)
                for f, fb in zip(olr.layout.factors, olr.layout.block_of.tolist())
                if fb == b
            ],
            1,
        )
        got = torch.cat(
            [
                result.combined[f.offset : f.offset + f.numel]
                for f, fb in zip(olr.layout.factors, olr.layout.block_of.tolist())
                if fb == b
            ]
        )
        torch.testing.assert_close(got, project(cols, result.order), rtol=1e-5, atol=1e-6)


def test_order_is_seeded_and_resumable():
    model, *_ = conflicting_problem()
    a = OrthoLoRA(model, 2, seed=3)
    a.capture.remove()
    model2, *_ = conflicting_problem()
    b = OrthoLoRA(model2, 2, seed=3)
    assert [a.order.next() for _ in range(5)] == [b.order.next() for _ in range(5)]
    state = a.state_dict()
    nxt = a.order.next()
    b.load_state_dict(state)
    assert b.order.next() == nxt
