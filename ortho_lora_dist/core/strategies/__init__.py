"""Multi-task strategies as pure functions of block Gram matrices: grams [B, T, T] -> weights [B, T] (fp64).

The combined gradient of block b is sum_t w[b, t] g_t. Because only the T x T Gram matrices of the global
per-task gradients enter, every strategy is exact under data parallelism (see core/projection.py).

  base.py       Strategy, StrategySpec and the registry: register_strategy (user rules), make_strategy
  native.py     joint, ortho (Ortho-LoRA / PCGrad, one order per step), norm_balance
  torchjd.py    TorchJD's Gramian weightings and Nash-MTL, called per block (never re-implemented)
  loss_only.py  FAMO and initial-loss weights: coefficients of sum_t a_t L_t from the losses alone (ONE gradient)

Importing the package registers the built-in rules (each module registers its own). A new rule is one spec:
``register_strategy("name", rule)`` from user code or an installed package's entry point (group
``ortho_lora_dist.strategies``), or one module here that calls ``add_spec`` and is imported below.
"""

from __future__ import annotations

from ortho_lora_dist.core.strategies.base import (
    ENTRY_POINT_GROUP,
    SOLVER_HINT,
    Strategy,
    StrategySpec,
    get_spec,
    is_loss_only,
    make_strategy,
    register_strategy,
    strategy_names,
    strategy_options,
)
from ortho_lora_dist.core.strategies.loss_only import LOSS_STRATEGIES, LossOnly
from ortho_lora_dist.core.strategies.native import NATIVE_STRATEGIES
from ortho_lora_dist.core.strategies.torchjd import SOLVER_STRATEGIES, TORCHJD_STRATEGIES

__all__ = [
    "ENTRY_POINT_GROUP",
    "GRAM_STRATEGIES",
    "LOSS_STRATEGIES",
    "NATIVE_STRATEGIES",
    "STRATEGIES",
    "SOLVER_HINT",
    "SOLVER_STRATEGIES",
    "STATEFUL_STRATEGIES",
    "TORCHJD_STRATEGIES",
    "LossOnly",
    "Strategy",
    "StrategySpec",
    "get_spec",
    "is_loss_only",
    "make_strategy",
    "register_strategy",
    "strategy_names",
    "strategy_options",
]

# the BUILT-IN names (user and plugin rules: strategy_names()); functions of the per-task Grams, then loss-only rules
GRAM_STRATEGIES: tuple[str, ...] = (*NATIVE_STRATEGIES, *TORCHJD_STRATEGIES)
STRATEGIES: tuple[str, ...] = (*GRAM_STRATEGIES, *LOSS_STRATEGIES)
STATEFUL_STRATEGIES = frozenset(n for n in GRAM_STRATEGIES if get_spec(n).stateful)
