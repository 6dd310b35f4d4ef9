"""Packed rows (several samples of several tasks in one row, attention inside each sample) give the same per-task
losses, per-task LoRA gradients and combined gradient of every strategy as the same samples unpacked.

The tiny Llama (sdpa, fp32) runs the same samples twice: right-padded, one per row, with per-sample task ids; and
packed by data/packing.py into rows of at most 24 tokens, with per-token task ids. Tolerances (fp32): losses 1e-6
absolute, per-task buffers and combined gradients 1e-5 relative (Frobenius norm of the difference over the
reference's): the matmuls see the same numbers in other shapes, summed in another order. The unpacked one-backward
capture itself equals T backward passes (test_capture.py); here the packed one also equals them directly.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ortho_lora_dist import OrthoLoRA
from ortho_lora_dist.core.strategies import STRATEGIES
from ortho_lora_dist.data.packing import efficiency, first_fit_decreasing, pack
from tests.models import VOCAB, lora_llama

T = 3
SOLVERS = {"upgrad", "dualproj", "cagrad", "nash_mtl"}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def samples(n=9, seed=0):
    """n samples of 3-20 tokens, tasks 0..T-1 in a scattered order; loss on each sample's last few tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        k = int(torch.randint(3, 21, (1,), generator=gen))
        x = torch.randint(1, VOCAB, (k,), generator=gen).tolist()
        cut = int(torch.randint(1, k, (1,), generator=gen))
        ids.append(x)
        labels.append([-100] * cut + x[cut:])
    tasks = [int(t) for t in torch.randint(0, T, (n,), generator=gen)]
    tasks[:T] = list(range(T))  # every task present
    return ids, labels, tasks


def padded(ids, labels):
    width = max(map(len, ids))
    return {
        "input_ids": torch.tensor([x + [0] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
    }


def task_losses(model, batch, tasks_of_rows=None):
    """Per-task mean over the labelled tokens (full logits: the obviously-correct route)."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    logits, target = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    keep = target != -100
    tok = F.cross_entropy(logits[keep], target[keep], reduction="none")
    if tasks_of_rows is None:
        tasks = batch["token_task_ids"][:, 1:][keep]
    else:
        tasks = tasks_of_rows[keep.nonzero()[:, 0]]
    total = torch.zeros(T).index_add(0, tasks, tok)
    return total / torch.zeros(T).index_add(0, tasks, torch.ones_like(tok))


def run(llama_dir, strategy, packed_rows, mode="one_backward", seed=0):
    ids, labels, tasks = samples(seed=seed)
    model = lora_llama(llama_dir)
    olr = OrthoLoRA(model, T, strategy=strategy, granularity="factor", mode=mode)
    if packed_rows:
        batch = pack(ids, labels, tasks, 24, 0)
        olr.set_tasks(batch["token_task_ids"])
        losses = task_losses(model, batch)
    else:
        batch = padded(ids, labels)
        olr.set_tasks(torch.tensor(tasks))
        losses = task_losses(model, batch, torch.tensor(tasks))
    olr.backward(losses)
    result = olr.project()
    return losses.detach(), (olr.buffer.clone() if mode == "one_backward" else None), result


def test_packing_fills_rows_and_keeps_samples_apart():
    ids, labels, tasks = samples()
    batch = pack(ids, labels, tasks, 24, 0)
    assert batch["input_ids"].shape[1] <= 24
    assert batch["input_ids"].shape[0] < len(ids), "the test samples must share rows"
    real = batch["token_task_ids"] >= 0
    assert int(real.sum()) == sum(map(len, ids))
    assert efficiency(batch) > efficiency(padded(ids, labels)) > 0.5
    # every sample appears whole, positions 0..n-1, its first token unlabelled, its task on every token
    found = 0
    for r in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][r] == 0).nonzero()[:, 0].tolist() + [batch["input_ids"].shape[1]]
        for s, e in zip(starts, starts[1:]):
            if not real[r, s]:
                continue
            seg = batch["input_ids"][r, s:e].tolist()
            i = ids.index(seg)
            assert batch["labels"][r, s] == -100 and batch["labels"][r, s + 1 : e].tolist() == labels[i][1:]
            assert set(batch["token_task_ids"][r, s:e].tolist()) == {tasks[i]}
            found += 1
    assert found == len(ids)
    rows = first_fit_decreasing([5, 9, 3, 7, 2], 10)
    assert sorted(i for r in rows for i in r) == list(range(5)) and all(
        sum([5, 9, 3, 7, 2][i] for i in r) <= 10 for r in rows
    )
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([11], 10)


def test_packed_capture_equals_t_backward_passes(llama_dir):
    """Packed one-backward per-task buffers == T separate backward passes over the same packed rows."""
    _, one, _ = run(llama_dir, "joint", True)
    ids, labels, tasks = samples()
    model = lora_llama(llama_dir)
    ref = OrthoLoRA(model, T, strategy="joint", mode="reference")
    batch = pack(ids, labels, tasks, 24, 0)
    ref.set_tasks(batch["token_task_ids"])
    ref.backward(task_losses(model, batch))
    assert ref.buffer.abs().sum() > 0
    assert rel(one, ref.buffer) < 1e-5


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s not in SOLVERS] + ["upgrad"])
def test_packed_equals_unpacked(llama_dir, strategy):
    if strategy in SOLVERS:
        pytest.importorskip("cvxpy")
    loss_p, buf_p, res_p = run(llama_dir, strategy, True)
    loss_u, buf_u, res_u = run(llama_dir, strategy, False)
    torch.testing.assert_close(loss_p, loss_u, rtol=0, atol=1e-6)
    assert rel(buf_p, buf_u) < 1e-5
    assert res_u.combined.norm() > 0
    assert rel(res_p.combined, res_u.combined) < 1e-5, strategy


def test_attention_stays_inside_each_sample(llama_dir):
    """A packed row's loss of a sample == that sample alone (attention across samples would change it)."""
    ids, labels, tasks = samples()
    model = lora_llama(llama_dir)
    batch = pack(ids, labels, tasks, 24, 0)
    with torch.no_grad():
        packed = task_losses(model, batch)
        alone = [task_losses(model, padded([x], [y]), torch.tensor([t])) for x, y, t in zip(ids, labels, tasks)]
    # the token-weighted mean of the samples alone, per task
    ntok = torch.tensor([sum(v != -100 for v in y[1:]) for y in labels], dtype=torch.float)
    for t in range(T):
        mine = [i for i in range(len(ids)) if tasks[i] == t]
        want = sum(alone[i][t] * ntok[i] for i in mine) / ntok[mine].sum()
        assert abs(float(packed[t] - want)) < 1e-5


def test_per_token_task_ids_are_checked(llama_dir):
    model = lora_llama(llama_dir)
    olr = OrthoLoRA(model, T)
    with pytest.raises(ValueError, match=r"or -1 for a padding token"):
        olr.set_tasks(torch.tensor([[0, 1, -2]]))
    with pytest.raises(ValueError, match="no token of any task"):
        olr.set_tasks(torch.full((2, 3), -1))
    olr.set_tasks(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"per-token task ids are \[2, 5\]"):
        model(input_ids=torch.ones(2, 4, dtype=torch.long))


ROWS = st.integers(1, 4).flatmap(
    lambda t: st.tuples(st.just(t), st.lists(st.integers(-1, t - 1), min_size=1, max_size=40), st.booleans())
)


@settings(max_examples=300, deadline=None)
@given(ROWS)
def test_task_groups_assign_every_row_to_its_task(case):
    """Whatever path _task_groups picks (bmm, slices, one permutation), task t gets exactly the rows with id t, in
    their order, and padding rows (-1) none; sorted draws reach the bmm and slice paths."""
    from ortho_lora_dist.core.capture import _task_groups

    num_tasks, ids, ordered = case
    if ordered:
        ids = sorted(ids, key=lambda x: (x < 0, x))
    if all(i < 0 for i in ids):
        return  # set_tasks refuses a batch with no task row before grouping
    task_ids = torch.tensor(ids)
    got: dict[int, list[int]] = {}
    for g in _task_groups(task_ids, num_tasks):
        if g[0] == "bmm":
            got.update({t: list(range(t * g[2], (t + 1) * g[2])) for t in range(g[1])})
        elif g[0] == "slice":
            got[g[1]] = list(range(g[2], g[3]))
        else:
            order = g[1].tolist()
            got.update({t: order[lo:hi] for t, lo, hi in g[2]})
    want = {t: [i for i, x in enumerate(ids) if x == t] for t in range(num_tasks)}
    assert got == {t: rows for t, rows in want.items() if rows}
