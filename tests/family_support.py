"""What each model family supports, as the tests check it: the one source of the README's support table.

Every cell is asserted by a test (named in FEATURES): "yes" cells must pass, a "refused" cell must raise the error
it names. ``python scripts/support_table.py`` writes the README's table from this; tests/deploy/test_docs.py fails
when the README's table differs from it. Changing a cell therefore needs the test to agree, and the README follows.
"""

from __future__ import annotations

from tests.models import FAMILIES, family_config

FEATURES = {  # column -> the test that checks it
    "one backward == T passes": "tests/core/test_families.py::test_family",
    "packed == padded": "tests/core/test_families.py::test_family",
    "LoRA on lm_head": "tests/core/test_families.py::test_family",
    "FSDP2, 2 ranks == 1 process": "tests/core/test_families_distributed.py::test_fsdp2_two_ranks",
    "NF4 base, FSDP2 2 ranks": "tests/core/test_families_distributed.py::test_nf4_fsdp2_two_ranks",
    "LoRA on MoE experts / router": "tests/core/test_families.py::test_lora_on_moe_experts_is_refused_by_name",
}
NAMES = {
    "llama": "Llama",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "gemma2": "Gemma 2 (eager, soft-capping)",
    "gemma3": "Gemma 3 (text)",
    "phi3": "Phi-3 (fused qkv / gate_up)",
    "mixtral": "Mixtral",
    "qwen2_moe": "Qwen2-MoE",
}
EXPERTS = {  # what target_modules: all-linear makes of the fused experts and router (transformers 5, PEFT 0.18+)
    "mixtral": "refused (PEFT ParamWrapper)",
    "qwen2_moe": "not adapted (PEFT: shared expert only)",
}


def cell(family: str, feature: str) -> str:
    """'yes', 'n/a', 'refused (...)' or 'not adapted (...)': what the feature's test asserts for ``family``."""
    if feature == "LoRA on MoE experts / router":
        return EXPERTS.get(family, "n/a")
    if feature == "LoRA on lm_head":
        _, cfg = family_config(family)
        return "yes (tied)" if cfg.tie_word_embeddings else "yes (untied)"
    return "yes"


def table() -> str:
    """The support table in Markdown, a row per family."""
    lines = ["| family | " + " | ".join(FEATURES) + " |", "|---" * (len(FEATURES) + 1) + "|"]
    lines += [f"| {NAMES[f]} | " + " | ".join(cell(f, c) for c in FEATURES) + " |" for f in FAMILIES]
    return "\n".join(lines)
