"""Strategies (aggregators.py) against TorchJD's own aggregators, the literal PCGrad loop and fp64 references.

Tolerances (relative: ||ours - ref|| / ||ref|| over the combined vector, ours in fp32, references in fp64):
  TREF  = 5e-7  engine in mode="reference" (its buffer IS the T-backward Jacobian): only fp32 output rounding
  TCAP  = 2e-5  engine in mode="one_backward": the captured per-task gradients differ from the reference in fp32
  TMAT  = 1e-9  seeded random fp64 matrices (everything in fp64), against TorchJD on J / ||J||_F (times ||J||_F)
Nash-MTL stops its inner loop on absolute thresholds (1e-3, 1e-6), so a perturbation of G at the 1e-7 level can
change its iterate at that level: it is compared at NASH_TOL instead.
"""

from __future__ import annotations

import io

import pytest
import torch

from ortho_lora_dist import OrthoLoRA
from ortho_lora_dist.core.blocks import block_grams
from ortho_lora_dist.core.gram import gram, gram_fp64
from ortho_lora_dist.core.layout import factor_rows
from ortho_lora_dist.core.projection import project
from ortho_lora_dist.core.reference import reference_task_grads
from ortho_lora_dist.core.strategies import (
    GRAM_STRATEGIES,
    SOLVER_STRATEGIES,
    STRATEGIES,
    make_strategy,
    strategy_options,
)
from tests.core.test_capture import batch
from tests.core.test_projection import literal_pcgrad
from tests.core.test_step import conflicting_problem
from tests.models import lm_task_losses, lora_llama

pytestmark = pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")
T = 3
TREF, TCAP, TMAT, NASH_TOL = 5e-7, 2e-5, 1e-9, 1e-5
TORCHJD = ("upgrad", "mgda", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "dualproj", "pcgrad", "gradvac")
RANDOM = ("pcgrad", "gradvac")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def torchjd_aggregator(name: str, num_tasks: int):
    from torchjd import aggregation as A

    return {
        "joint": A.Sum,
        "upgrad": A.UPGrad,
        "mgda": A.MGDA,
        "cagrad": lambda: A.CAGrad(c=0.4),
        "imtl_g": A.IMTLG,
        "nash_mtl": lambda: A.NashMTL(n_tasks=num_tasks),
        "aligned_mtl": A.AlignedMTL,
        "dualproj": A.DualProj,
        "pcgrad": A.PCGrad,
        "gradvac": A.GradVac,
    }[name]()


def norm_balance_ref(J: torch.Tensor) -> torch.Tensor:
    """sum_t (S / (T' ||g_t||)) g_t over nonzero tasks, on vectors (S: sum of norms, T': nonzero count)."""
    n = J.norm(dim=1)
    nz = n > 0
    return ((n.sum() / nz.sum()) * J[nz] / n[nz, None]).sum(0)


def step_seed(strategy) -> int:
    """The seed the strategy will hand TorchJD's global RNG at its next call (see _TorchJD._weights)."""
    g = torch.Generator()
    g.set_state(strategy.generator.get_state())
    return int(torch.randint(0, 2**62, (1,), generator=g))


def reference_blocks(
    name: str, blocks: list[torch.Tensor], order: list[int], seed: int | None, aggs=None, scale_free: bool = False
) -> list[torch.Tensor]:
    """The reference combined vector of each block [T, D_b] (fp64), TorchJD's Aggregator where one exists.

    scale_free: TorchJD's aggregator on J / ||J||_F, times ||J||_F (what the strategies compute by design for the
    methods fed G / trace G; differs from the raw call only through TorchJD's absolute eps: GradVac's 1e-8).
    """
    if name == "ortho":
        return [literal_pcgrad(J, order) for J in blocks]
    if name == "norm_balance":
        return [norm_balance_ref(J) for J in blocks]
    if seed is not None:
        torch.manual_seed(seed)
    aggs = aggs or [torchjd_aggregator(name, blocks[0].shape[0]) for _ in blocks]
    if scale_free and name not in ("joint", "pcgrad", "nash_mtl"):
        return [agg(J / J.norm()) * J.norm() for agg, J in zip(aggs, blocks)]
    return [agg(J) for agg, J in zip(aggs, blocks)]


# -- (a) engine vs TorchJD on a tiny PEFT model
@pytest.fixture(scope="module")
def llama_engine(llama_dir):
    """(granularity, mode) -> (OrthoLoRA with its per-task buffer filled, J = [T, D] fp64 from T backward passes)."""
    ids, mask, tids = batch(B=6)
    lw = torch.full((T,), 10.0)  # every factor block's trace above TorchJD's absolute norm_eps = 1e-4
    cache = {}

    def get(granularity: str, mode: str):
        if (granularity, mode) not in cache:
            model = lora_llama(llama_dir)
            olr = OrthoLoRA(model, T, granularity=granularity, mode=mode)
            olr.set_tasks(tids)
            olr.backward(lm_task_losses(model, ids, tids, T, mask), lw)
            if olr.capture is not None:
                olr.capture.remove()
            J = reference_task_grads(lm_task_losses(model, ids, tids, T, mask) * lw, olr.lora_params).double()
            cache[granularity, mode] = olr, J
        return cache[granularity, mode]

    return get


def engine_vs_reference(llama_engine, name: str, granularity: str, mode: str) -> tuple[float, float]:
    """Relative (norm) and max-abs (over max |ref|) difference: OrthoLoRA.project() vs TorchJD block by block."""
    olr, J = llama_engine(granularity, mode)
    olr.strategy, olr.combiner = name, make_strategy(name, None, T, olr.layout.num_blocks, seed=0)
    seed = step_seed(olr.combiner) if name in RANDOM else None
    result = olr.project()
    assert not result.skipped and (torch.diagonal(result.grams, dim1=-2, dim2=-1).sum(-1) > 1e-2).all()
    cols = [[] for _ in range(olr.layout.num_blocks)]
    for f, b in zip(olr.layout.factors, olr.layout.block_of.tolist()):
        cols[b].append(torch.arange(f.offset, f.offset + f.numel))
    cols = [torch.cat(c) for c in cols]
    refs = reference_blocks(name, [J[:, c] for c in cols], result.order, seed)
    ref = torch.zeros(J.shape[1], dtype=torch.float64)
    for c, r in zip(cols, refs):
        ref[c] = r
    return rel(result.combined, ref), float((result.combined.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", GRAM_STRATEGIES)  # functions of the Grams (loss-only rules: test_loss_balancing.py)
@pytest.mark.parametrize("granularity", ["global", "module", "factor"])
def test_engine_equals_torchjd_reference_mode(llama_engine, name, granularity):
    err, _ = engine_vs_reference(llama_engine, name, granularity, "reference")
    assert err < (NASH_TOL if name == "nash_mtl" else TREF), f"{name}/{granularity}: rel {err:.2e}"


@pytest.mark.parametrize("name", ["ortho", "norm_balance", "upgrad", "imtl_g", "cagrad", "nash_mtl"])
def test_engine_equals_torchjd_one_backward(llama_engine, name):
    err, _ = engine_vs_reference(llama_engine, name, "factor", "one_backward")
    assert err < (NASH_TOL if name == "nash_mtl" else TCAP), f"{name}: rel {err:.2e}"


# -- (a') seeded random matrices
def random_blocks(seed: int, num_tasks: int, B: int = 4, D: int = 30) -> torch.Tensor:
    """[B, T, D] fp64 with conflicts: a shared direction with alternating signs plus noise."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(B, 1, D, generator=gen, dtype=torch.float64)
    signs = torch.tensor([(-1.0) ** t for t in range(num_tasks)], dtype=torch.float64)[None, :, None]
    scales = torch.rand(B, num_tasks, 1, generator=gen, dtype=torch.float64) * 3 + 0.1
    return (signs * base + torch.randn(B, num_tasks, D, generator=gen, dtype=torch.float64)) * scales


@pytest.mark.parametrize("name", GRAM_STRATEGIES)  # functions of the Grams (loss-only rules: test_loss_balancing.py)
@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_weights_equal_torchjd_on_random_matrices(name, num_tasks):
    for seed in range(3):
        J = random_blocks(seed, num_tasks)
        strategy = make_strategy(name, None, num_tasks, J.shape[0], seed=seed)
        order = torch.randperm(num_tasks, generator=torch.Generator().manual_seed(seed)).tolist()
        rseed = step_seed(strategy) if name in RANDOM else None
        w = strategy.weights(gram(J), order)
        assert w.dtype == torch.float64 and w.shape == (J.shape[0], num_tasks)
        ours = torch.einsum("bt,btd->bd", w, J)
        refs = reference_blocks(name, list(J), order, rseed, scale_free=True)
        for b in range(J.shape[0]):
            assert rel(ours[b], refs[b]) < (NASH_TOL if name == "nash_mtl" else TMAT), f"{name} T={num_tasks} block {b}"


def test_torchjd_pcgrad_equals_ortho_for_two_tasks_exactly():
    for seed in range(20):
        G = gram(random_blocks(seed, 2, B=8))
        order = [seed % 2, 1 - seed % 2]
        torch.testing.assert_close(
            make_strategy("pcgrad", None, 2, 8).weights(G, order),
            make_strategy("ortho", None, 2, 8).weights(G, order),
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize("name", ["nash_mtl", "gradvac"])
def test_stateful_over_steps_equals_torchjd_and_resumes_bitwise(name):
    steps = [random_blocks(100 + s, T) for s in range(5)]
    strategy = make_strategy(name, None, T, 4, seed=1)
    aggs = [torchjd_aggregator(name, T) for _ in range(4)]  # per-block state, as in the strategy
    outs = []
    for s, J in enumerate(steps):
        rseed = step_seed(strategy) if name in RANDOM else None
        w = strategy.weights(gram(J), [0, 1, 2])
        outs.append(w)
        refs = reference_blocks(name, list(J), [0, 1, 2], rseed, aggs, scale_free=True)
        for b in range(4):
            assert rel(w[b] @ J[b], refs[b]) < (NASH_TOL if name == "nash_mtl" else TMAT), f"step {s} block {b}"
        if s == 1:
            saved = strategy.state_dict()
    resumed = make_strategy(name, None, T, 4, seed=99)
    resumed.load_state_dict(saved)
    for s in range(2, 5):
        assert torch.equal(resumed.weights(gram(steps[s]), [0, 1, 2]), outs[s]), f"resume differs at step {s}"


# -- (c) scale: fp64 Grams, no fp32 under/overflow
def test_tiny_task_is_still_projected_against():
    g = torch.tensor([[1.0, 1.0], [-1e-24, 0.0]])
    out = project(g, [0, 1])
    assert out[1] == 1.0 and abs(float(out[0])) < 1e-12  # the rule: about [-5e-25, 1]; fp32 Grams gave [1, 1]
    x = float(g[1, 0])  # g_0' = g_0 - (x / x^2) g_1, g_1' = g_1 - (x / 2) g_0  ->  w = [1 - x / 2, 1 - 1 / x]
    w = make_strategy("ortho", None, 2, 1).weights(gram(g)[None], [0, 1])[0]
    torch.testing.assert_close(w, torch.tensor([1 - x / 2, 1 - 1 / x], dtype=torch.float64), rtol=1e-12, atol=0)


def test_block_grams_fp32_fast_path_and_fp64_fallback():
    """CPU: fp32 Grams within FP32_GRAM_RANGE (fp32 accuracy), exact fp64 for factors outside it."""
    model, *_ = conflicting_problem()
    olr = OrthoLoRA(model, T, granularity="factor")
    olr.capture.remove()
    region = olr.buffer[0].normal_(generator=torch.Generator().manual_seed(0))
    factor_rows(region, olr.layout.factors[0], T)[1] *= 1e-25  # ||g_1||^2 ~ 1e-48 in block 0: 0 in fp32
    got = block_grams(region, 0, olr.layout, T)
    ref = torch.stack([gram_fp64(factor_rows(region, f, T)) for f in olr.layout.factors])
    assert got.dtype == torch.float64 and got[0, 1, 1] > 0
    assert torch.equal(got[0], ref[0])  # recomputed in fp64
    assert rel(got[1:], ref[1:]) < 1e-6  # fp32 accumulation
    assert gram(torch.tensor([[1.0, 1.0], [-1e-24, 0.0]]))[1, 1] > 0  # fp32 gave 0


def scale_reference(name: str, J: torch.Tensor, order: list[int]) -> torch.Tensor:
    if name == "joint":
        return J.sum(0)
    return reference_blocks(name, [J], order, None, scale_free=True)[0]  # upgrad: TorchJD's UPGrad on J / ||J||_F


@pytest.mark.parametrize("name", ["ortho", "joint", "norm_balance", "upgrad"])
@pytest.mark.parametrize("mixed", [False, True], ids=["uniform", "mixed"])
def test_extreme_scales_through_the_engine(name, mixed):
    """Per-task gradient norms from 1e-30 to 1e30.

    uniform: all tasks at one scale; mixed: 1e-30, 1, 1e30 in one block.
    """
    model, *_ = conflicting_problem()
    olr = OrthoLoRA(model, T, strategy=name, granularity="module")
    olr.capture.remove()
    gen = torch.Generator().manual_seed(0)
    cases = (
        [[10.0**e] * T for e in range(-30, 31, 10)]
        if not mixed
        else [[1e-30, 1.0, 1e30], [1e30, 1e-30, 1e-30], [1e-20, 1e20, 1.0]]
    )
    for scales in cases:
        region = olr.buffer[0]
        for f in olr.layout.factors:
            rows = factor_rows(region, f, T)
            rows.copy_(torch.randn(rows.shape, generator=gen) * torch.tensor(scales)[:, None] / f.numel**0.5)
        result = olr.project()
        assert not result.skipped, scales
        assert torch.isfinite(result.combined).all() and torch.isfinite(result.weights).all(), scales
        for b in range(olr.layout.num_blocks):
            fs = [f for f, fb in zip(olr.layout.factors, olr.layout.block_of.tolist()) if fb == b]
            J = torch.cat([factor_rows(region, f, T) for f in fs], 1).double()
            got = torch.cat([result.combined[f.offset : f.offset + f.numel] for f in fs])
            assert rel(got, scale_reference(name, J, result.order)) < 1e-5, (scales, b)


@pytest.mark.parametrize("name", [n for n in GRAM_STRATEGIES if n != "nash_mtl"])
def test_scale_invariant_methods(name):
    """w(c^2 G) == w(G) from c = 1e-30 to 1e30 (Nash-MTL is not: its max_norm is absolute by design)."""
    J = random_blocks(7, T)
    w0 = make_strategy(name, None, T, 4, seed=3).weights(gram(J), [2, 0, 1])
    for e in range(-30, 31, 15):
        w = make_strategy(name, None, T, 4, seed=3).weights(gram(J * 10.0**e), [2, 0, 1])
        assert torch.isfinite(w).all()
        torch.testing.assert_close(w, w0, rtol=1e-7, atol=1e-9 * float(w0.abs().max()))


def test_zero_block_gets_zero_weights():
    G = gram(random_blocks(1, T))
    G[1] = 0
    for name in TORCHJD:
        w = make_strategy(name, None, T, 4).weights(G, [0, 1, 2])
        assert torch.isfinite(w).all() and (w[1] == 0).all(), name
    w = make_strategy("norm_balance", None, T, 4).weights(G, [0, 1, 2])
    assert (w[1] == 0).all() and torch.isfinite(w).all()


# -- registry, options, solver extra, engine state
def test_registry_and_options():
    assert {
        "joint",
        "ortho",
        "norm_balance",
        "upgrad",
        "mgda",
        "cagrad",
        "imtl_g",
        "nash_mtl",
        "aligned_mtl",
        "dualproj",
        "pcgrad",
    } <= set(STRATEGIES)
    assert strategy_options("cagrad") == {"c": 0.4, "norm_eps": 1e-4}
    assert set(strategy_options("nash_mtl")) == {"max_norm", "update_weights_every", "optim_niter"}
    with pytest.raises(ValueError, match=r"strategy 'cagrad' has no option 'cc'; valid options: c, norm_eps"):
        make_strategy("cagrad", {"cc": 0.4}, T, 2)
    with pytest.raises(ValueError, match=r"strategy 'pcgrad' has no option 'c'; valid options: none"):
        make_strategy("pcgrad", {"c": 1}, T, 2)
    with pytest.raises(ValueError, match=r"strategy 'upgrad'.*pref_vector must hold 3"):
        make_strategy("upgrad", {"pref_vector": [1, 2]}, T, 2)
    with pytest.raises(ValueError, match=r"strategy 'cagrad'.*c must be non-negative"):
        make_strategy("cagrad", {"c": -1}, T, 2)
    with pytest.raises(ValueError, match="must be one of"):
        make_strategy("nope", None, T, 2)
    # options reach TorchJD
    G = gram(random_blocks(2, T))
    a = make_strategy("cagrad", {"c": 0.1}, T, 4).weights(G, [0, 1, 2])
    b = make_strategy("cagrad", {"c": 0.9}, T, 4).weights(G, [0, 1, 2])
    assert not torch.allclose(a, b)
    w = make_strategy("norm_balance", {"pref_vector": [2.0, 1.0, 1.0]}, T, 4).weights(G, [0, 1, 2])
    contrib = w * torch.diagonal(G, dim1=-2, dim2=-1).sqrt()  # ||w_t g_t||: 2 : 1 : 1, summing to sum_t ||g_t||
    torch.testing.assert_close(
        contrib / contrib[:, 1:2], torch.tensor([[2.0, 1.0, 1.0]], dtype=torch.float64).expand(4, 3)
    )
    torch.testing.assert_close(contrib.sum(-1), torch.diagonal(G, dim1=-2, dim2=-1).sqrt().sum(-1))


@pytest.mark.parametrize("name", sorted(SOLVER_STRATEGIES))
def test_missing_solver_is_one_clear_error(name, monkeypatch):
    import torchjd._mixins as mixins

    monkeypatch.setattr(mixins, "find_spec", lambda module: None)
    with pytest.raises(
        ImportError, match=rf"strategy '{name}' needs the solver extra: pip install 'ortho-lora-dist\[mtl\]'"
    ):
        make_strategy(name, None, T, 2)


def test_engine_options_state_and_old_state():
    model, *_ = conflicting_problem()
    with pytest.raises(ValueError, match="no option 'foo'"):
        OrthoLoRA(model, 2, strategy="nash_mtl", strategy_options={"foo": 1})
    assert not any(type(m).__name__ == "_TaskLinear" for m in model.modules()), (
        "a refused strategy leaves the model as it was"
    )
    olr = OrthoLoRA(model, 2, strategy="nash_mtl", strategy_options={"max_norm": 0.0})
    state = olr.state_dict()
    assert state["strategy"]["name"] == "nash_mtl" and len(state["strategy"]["blocks"]) == olr.layout.num_blocks
    olr.load_state_dict({"order": state["order"]})  # a checkpoint from before strategies had state
    olr.load_state_dict(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)  # tensors and Python scalars only
