"""One-backward per-task LoRA gradients equal T separate backward passes (the reference).

Tolerance: 1e-5 relative (Frobenius norm of the difference over that of the reference) in fp32; the
two routes run the same matmuls on the same numbers, only summed in another order. bf16 autocast:
1e-2, since the reference's single bf16 weight-grad matmul rounds differently from per-task ones.
"""

import pytest
import torch

from ortho_lora_dist import OrthoLoRA
from ortho_lora_dist.core.layout import factor_rows
from tests.models import VOCAB, BertMultiHead, lm_task_losses, lora_llama

T = 3


def rel(a, b):
    return float((a - b).norm() / b.norm())


def batch(B=6, L=12, seed=0, pad=True):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad:  # right padding of different lengths
        for b in range(B):
            n = int(torch.randint(L // 2, L + 1, (1,), generator=gen))
            mask[b, n:] = 0
            ids[b, n:] = 0
    tids = torch.arange(B) % T
    return ids, mask, tids


def both(build, run, seed=0):
    """Per-task buffers of the one-backward and the reference route, on identically built models."""
    out = {}
    for mode in ("one_backward", "reference"):
        model = build()
        olr = OrthoLoRA(model, T, mode=mode, task_params=getattr(model, "task_params", lambda: {})())
        torch.manual_seed(seed)  # same dropout masks on both routes
        run(model, olr)
        out[mode] = (olr, model)
    return out["one_backward"], out["reference"]


def llama_run(ids, mask, tids):
    def run(model, olr):
        olr.set_tasks(tids)
        olr.backward(lm_task_losses(model, ids, tids, T, mask))

    return run


@pytest.mark.parametrize(
    "pad,tids",
    [(False, [0, 1, 2, 0, 1, 2]), (True, [0, 1, 2, 0, 1, 2]), (True, [0, 0, 1, 1, 2, 2]), (True, [2, 0, 0, 0, 1, 1])],
    ids=["interleaved", "interleaved-padded", "sorted-equal", "contiguous-runs"],
)
def test_tiny_llama_mixed_batch(llama_dir, pad, tids):
    ids, mask, _ = batch(pad=pad)
    tids = torch.tensor(tids)
    (o1, m1), (o2, _) = both(lambda: lora_llama(llama_dir), llama_run(ids, mask, tids))
    assert o2.buffer.abs().sum() > 0
    assert rel(o1.buffer, o2.buffer) < 1e-5
    assert all(p.grad is None for p in o1.lora_params), "the summed LoRA gradient must not be formed"


@pytest.mark.parametrize("kw", [{"dropout": 0.1}, {"use_rslora": True}], ids=["dropout", "rslora"])
def test_tiny_llama_dropout_and_rslora(llama_dir, kw):
    ids, mask, tids = batch()
    (o1, _), (o2, _) = both(lambda: lora_llama(llama_dir, **kw), llama_run(ids, mask, tids))
    assert rel(o1.buffer, o2.buffer) < 1e-5


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_base(llama_dir, quant):
    ids, mask, tids = batch()
    (o1, m1), (o2, _) = both(lambda: lora_llama(llama_dir, quant=quant), llama_run(ids, mask, tids))
    kind = type(m1.base_model.model.model.layers[0].self_attn.q_proj).__name__
    assert kind == {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[quant]
    assert rel(o1.buffer, o2.buffer) < 1e-5


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(llama_dir, reentrant):
    """Checkpointed one-backward capture vs the reference on the same model without checkpointing."""
    ids, mask, tids = batch()
    ref_model = lora_llama(llama_dir, dropout=0.1)
    ref = OrthoLoRA(ref_model, T, mode="reference")
    torch.manual_seed(0)
    ref.backward(lm_task_losses(ref_model, ids, tids, T, mask))

    model = lora_llama(llama_dir, dropout=0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    model.train()
    olr = OrthoLoRA(model, T)
    olr.set_tasks(tids)
    torch.manual_seed(0)
    olr.backward(lm_task_losses(model, ids, tids, T, mask))
    assert rel(olr.buffer, ref.buffer) < 1e-5


def test_reference_mode_under_reentrant_checkpointing(llama_dir):
    """The reference itself must not silently lose gradients inside reentrant checkpointed blocks."""
    ids, mask, tids = batch()
    plain = lora_llama(llama_dir)
    ref = OrthoLoRA(plain, T, mode="reference")
    ref.backward(lm_task_losses(plain, ids, tids, T, mask))
    model = lora_llama(llama_dir)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.train()
    ck = OrthoLoRA(model, T, mode="reference")
    ck.backward(lm_task_losses(model, ids, tids, T, mask))
    assert ck.buffer.abs().sum() > 0
    assert rel(ck.buffer, ref.buffer) < 1e-5


def test_accumulation_over_per_task_micro_batches(llama_dir):
    micro = []
    for t in range(T):
        ids, mask, _ = batch(B=2, seed=10 + t)
        micro.append((ids, mask, torch.full((2,), t)))

    def run(model, olr):
        for ids, mask, tids in micro:
            olr.set_tasks(tids)
            olr.backward(lm_task_losses(model, ids, tids, T, mask))

    (o1, _), (o2, _) = both(lambda: lora_llama(llama_dir), run)
    assert rel(o1.buffer, o2.buffer) < 1e-5
    for t in range(T):  # each task's row came from its own micro-batch only
        assert sum(factor_rows(o1.buffer[0], f, T)[t].abs().sum() for f in o1.layout.factors) > 0


def test_bf16_autocast(llama_dir):
    ids, mask, tids = batch()

    def run(model, olr):
        olr.set_tasks(tids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = lm_task_losses(model, ids, tids, T, mask)
        olr.backward(losses)

    (o1, _), (o2, _) = both(lambda: lora_llama(llama_dir), run)
    assert o1.buffer.dtype == torch.float32
    assert rel(o1.buffer, o2.buffer) < 1e-2


def test_bert_with_task_heads(bert_dir):
    gen = torch.Generator().manual_seed(0)
    B, L = 9, 10
    ids = torch.randint(1, VOCAB, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[::2, 7:] = 0
    tids = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    labels = torch.randint(0, 2, (B,), generator=gen)

    def run(model, olr):
        olr.set_tasks(tids)
        olr.backward(model.task_losses(ids, mask, labels, tids))

    (o1, m1), (o2, m2) = both(lambda: BertMultiHead(bert_dir, [2, 2, 2], dropout=0.1), run)
    assert rel(o1.buffer, o2.buffer) < 1e-5
    for h1, h2 in zip(m1.heads, m2.heads):  # each head: exactly its own task's gradient
        for p1, p2 in zip(h1.parameters(), h2.parameters()):
            assert rel(p1.grad, p2.grad) < 1e-5


def test_refuses_dora(llama_dir):
    model = lora_llama(llama_dir, use_dora=True)
    with pytest.raises(ValueError, match="Dora|DoRA"):
        OrthoLoRA(model, T)


def test_refuses_shared_trainable_parameter(llama_dir):
    model = lora_llama(llama_dir)
    model.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="model.norm.weight"):
        OrthoLoRA(model, T)


def test_refuses_unbatched_input(llama_dir):
    model = lora_llama(llama_dir)
    olr = OrthoLoRA(model, T)
    olr.set_tasks(torch.tensor([0, 1]))
    ids, mask, _ = batch(B=3)
    with pytest.raises(RuntimeError, match="batch has 2 samples"):
        lm_task_losses(model, ids, torch.tensor([0, 1, 2]), T, mask)


class _FlatMoE(torch.nn.Module):
    """[batch, seq, h] -> a projection, then a shared MLP on the flattened tokens and a routed "expert" that sees
    every token in a routing order (a permutation): the case a 2-D input of batch * seq rows must not be guessed."""

    def __init__(self, h: int = 8) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(h, h)
        self.shared = torch.nn.Linear(h, h)
        self.experts = torch.nn.ModuleList([torch.nn.Linear(h, h)])

    def forward(self, x: torch.Tensor, routed: bool) -> torch.Tensor:
        b, s, h = x.shape
        flat = self.proj(x).reshape(-1, h)
        out = self.shared(flat)
        if routed:
            order = torch.arange(b * s).flip(0)
            out = out.index_add(0, order, self.experts[0](flat[order]))
        return out.view(b, s, h)


@pytest.mark.parametrize("routed", [False, True])
def test_flattened_tokens_captured_exactly_and_routed_experts_refused(routed):
    """A LoRA factor fed the batch's tokens flattened row-major (Qwen2-MoE's shared expert) is captured per task ==
    T backward passes; one under ``experts`` fed as many rows is refused, never assigned tasks by guess."""
    from peft import LoraConfig, get_peft_model

    def build():
        torch.manual_seed(0)
        cfg = LoraConfig(r=2, target_modules=["proj", "shared", "0"], init_lora_weights=False)
        return get_peft_model(_FlatMoE(), cfg)

    x, tids = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([2, 0, 1, 0])

    def run(model, olr):
        olr.set_tasks(tids)
        per_sample = model(x, routed=routed).pow(2).mean(dim=(1, 2))
        olr.backward(torch.stack([per_sample[tids == t].mean() for t in range(T)]))

    if routed:
        with pytest.raises(RuntimeError, match=r"experts\.0.*got input of shape \(20, 8\)"):
            both(build, run)
        return
    (one, _), (ref, _) = both(build, run)
    assert float(ref.buffer.abs().max()) > 0 and rel(one.buffer, ref.buffer) < 1e-6


def test_remove_restores_plain_linear(llama_dir):
    model = lora_llama(llama_dir)
    olr = OrthoLoRA(model, T)
    olr.capture.remove()
    ids, mask, tids = batch()
    lm_task_losses(model, ids, tids, T, mask).sum().backward()
    assert all(p.grad is not None for p in olr.lora_params)


def test_bucket_plan_covers_factors_in_backward_order(llama_dir):
    """Buckets: every factor once, reverse layout order, one region each, contiguous spans, <= max(cap, a factor)."""
    from ortho_lora_dist.core.capture import find_lora_factors
    from ortho_lora_dist.core.layout import REGION_PARTS, build_layout, plan_buckets

    layout = build_layout(find_lora_factors(lora_llama(llama_dir)), "factor", 2)
    assert len(plan_buckets(layout, T, 10**9)) == len(layout.factors), "14 factors per region: < 1/16 each"
    layout = build_layout(find_lora_factors(lora_llama(llama_dir)), "factor", 1)
    for cap in (1, 1500, 10**9):
        buckets = plan_buckets(layout, T, cap)
        order = [i for b in buckets for i in b.factors]
        assert order == list(reversed(range(len(layout.factors))))
        limit = min(cap, T * layout.region_size // REGION_PARTS)
        for b in buckets:
            fs = [layout.factors[i] for i in b.factors]
            assert {f.region for f in fs} == {b.region}
            assert b.size == T * sum(f.numel for f in fs) and b.lo == T * fs[-1].offset
            assert len(fs) == 1 or b.size <= limit
    assert len(plan_buckets(layout, T, 10**9)) < len(plan_buckets(layout, T, 1)) == len(layout.factors)


def eager_run(llama_dir, ids, mask, tids, **kw):
    model = lora_llama(llama_dir)
    olr = OrthoLoRA(model, T, reduce="eager", **kw)
    for micro in range(2):  # two micro-batches accumulate into the owned region
        olr.set_tasks(tids)
        olr.backward(lm_task_losses(model, ids, tids, T, mask) * (micro + 1))
    return model, olr


def test_eager_one_process_matches_step(llama_dir):
    ids, mask, tids = batch()
    _, eager = eager_run(llama_dir, ids, mask, tids)
    assert 2 < len(eager.grads.buckets) < len(eager.layout.factors)
    model = lora_llama(llama_dir)
    step = OrthoLoRA(model, T)
    for micro in range(2):
        step.set_tasks(tids)
        step.backward(lm_task_losses(model, ids, tids, T, mask) * (micro + 1))
    torch.testing.assert_close(eager.grads.reduced_region(), step.grads.reduced_region(), rtol=0, atol=0)


def test_eager_refuses_factor_run_twice_or_never(llama_dir):
    ids, mask, tids = batch()
    model, olr = eager_run(llama_dir, ids, mask, tids)
    olr.set_tasks(tids)
    twice = lm_task_losses(model, ids, tids, T, mask) + lm_task_losses(model, ids, tids, T, mask)
    with pytest.raises(RuntimeError, match="ran twice"):
        olr.backward(twice)
    model, olr = eager_run(llama_dir, ids, mask, tids)
    olr.set_tasks(tids)
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    hidden.sum().backward()  # reaches layer 0's factors only
    with pytest.raises(RuntimeError, match="did not reach"):
        olr.set_tasks(tids)
    with pytest.raises(RuntimeError, match="did not reach"):
        olr.project()


@pytest.mark.parametrize("reduce", ["step", "eager"])
def test_bf16_buffer_combined_gradient(llama_dir, reduce):
    """buffer_dtype bfloat16: half the bytes; combined gradient within 1e-2 relative of the fp32 buffer's.

    Each per-task gradient is an fp32 matmul rounded once per micro-batch into bf16 (unit roundoff 2^-9 ~ 2e-3,
    two micro-batches accumulate: ~2 roundings); Grams and weights are computed in fp32/fp64 from the rounded
    values, so the combined gradient moves by a few roundoffs: 1e-2 bounds it; it must also differ from fp32
    (else the buffer was not bf16).
    """
    ids, mask, tids = batch()
    out = {}
    for dtype in ("float32", "bfloat16"):
        _, olr = eager_run(llama_dir, ids, mask, tids, buffer_dtype=dtype) if reduce == "eager" else (None, None)
        if olr is None:
            model = lora_llama(llama_dir)
            olr = OrthoLoRA(model, T, buffer_dtype=dtype)
            for micro in range(2):
                olr.set_tasks(tids)
                olr.backward(lm_task_losses(model, ids, tids, T, mask) * (micro + 1))
        out[dtype] = (olr.grads.peak_bytes, olr.project().combined)
    (b32, c32), (b16, c16) = out["float32"], out["bfloat16"]
    assert b16 * 2 == b32
    assert 0 < rel(c16, c32) < 1e-2
