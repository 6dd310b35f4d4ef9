"""The Gram-based projection against a literal loop of Algorithm 1, plus property tests."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ortho_lora_dist.projection import combine_weights, gram, project, projection_coefficients  # the public path


def literal_pcgrad(grads: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Algorithm 1 written out on vectors, in float64: for i, for j != i, project g_i' off original g_j."""
    g = grads.double()
    out = torch.zeros(g.shape[1], dtype=torch.float64)
    for i in order:
        gi = g[i].clone()
        for j in order:
            if j == i:
                continue
            dot = gi @ g[j]
            nj = g[j] @ g[j]
            if dot < 0 and nj > 0:
                gi = gi - dot / nj * g[j]
        out += gi
    return out


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("T", range(1, 9))
def test_matches_literal_loop_random(T):
    gen = torch.Generator().manual_seed(T)
    for _ in range(20):
        grads = torch.randn(T, 50, generator=gen)
        order = torch.randperm(T, generator=gen).tolist()
        assert rel_err(project(grads, order), literal_pcgrad(grads, order)) < 1e-5


@pytest.mark.parametrize("T", [2, 3, 5, 8])
def test_all_conflict_and_no_conflict(T):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(50, generator=gen)
    # all conflicting: alternating directions around a common axis
    grads = torch.stack([(-1) ** t * base + 0.1 * torch.randn(50, generator=gen) for t in range(T)])
    order = list(range(T))[::-1]
    assert rel_err(project(grads, order), literal_pcgrad(grads, order)) < 1e-5
    # no conflicts: non-negative entries -> plain sum, exactly
    pos = torch.rand(T, 50, generator=gen)
    torch.testing.assert_close(project(pos, order), pos.sum(0), rtol=1e-6, atol=0)


def test_zero_vectors_are_never_divided_by():
    grads = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, -1.0, 1.0], [0.0, 0.0, 0.0]])
    for order in itertools.permutations(range(4)):
        out = project(grads, list(order))
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), literal_pcgrad(grads, list(order)), rtol=1e-6, atol=1e-7)


def test_exact_ties_are_not_conflicts():
    # g0 . g1 = 0 exactly (integers): no projection; g0 . g2 < 0: projection
    grads = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 1.0, 1.0]])
    for order in itertools.permutations(range(3)):
        torch.testing.assert_close(
            project(grads, list(order)).double(), literal_pcgrad(grads, list(order)), rtol=1e-6, atol=1e-7
        )
    torch.testing.assert_close(project(grads[:2], [0, 1]), grads[:2].sum(0))


def test_bf16_inputs_accumulate_in_fp64():
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(4, 4096, generator=gen).bfloat16()
    order = [2, 0, 3, 1]
    out = project(grads, order)
    assert out.dtype == torch.bfloat16
    ref = literal_pcgrad(grads.float(), order)  # same bf16 values, exact arithmetic
    assert rel_err(out, ref) < 1e-2  # only the final cast to bf16 rounds (2^-8 relative per entry)
    assert gram(grads).dtype == torch.float64  # fp32 squares under/overflow (see test_aggregators.py)


def test_batched_blocks_equal_one_at_a_time():
    gen = torch.Generator().manual_seed(5)
    grads = torch.randn(6, 3, 20, generator=gen)  # 6 blocks, 3 tasks
    G = gram(grads)
    w = combine_weights(G, [1, 2, 0])
    for b in range(6):
        torch.testing.assert_close(w[b], combine_weights(G[b], [1, 2, 0]))


def test_bad_order_is_refused():
    with pytest.raises(ValueError, match="permutation"):
        project(torch.randn(3, 4), [0, 1, 1])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=4, max_size=24).filter(
        lambda v: len(v) % 2 == 0
    ),
    st.booleans(),
)
def test_two_tasks_projected_grads_do_not_conflict(values, flip):
    g = torch.tensor(values, dtype=torch.float32).view(2, -1)
    C = projection_coefficients(gram(g), [1, 0] if flip else [0, 1])
    projected = C @ g.double()  # rows: g_0', g_1'
    gd = g.double()
    scale = float(gd.norm(dim=1).prod()) + 1e-12
    assert projected[0] @ gd[1] >= -1e-5 * scale
    assert projected[1] @ gd[0] >= -1e-5 * scale
    assert torch.isfinite(C).all()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_properties(T, D, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(T, D, generator=gen) * 10
    order = torch.randperm(T, generator=gen).tolist()
    out = project(grads, order)
    assert torch.isfinite(out).all()
    if T == 1:
        torch.testing.assert_close(out, grads[0])
    G = grads.double() @ grads.double().T
    if (G >= 0).all():
        torch.testing.assert_close(out, grads.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), literal_pcgrad(grads, order), rtol=1e-4, atol=1e-4)
