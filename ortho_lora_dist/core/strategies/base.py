"""A strategy maps global block Gram matrices [B, T, T] to combination weights [B, T]; the registry of strategies.

Every rule, built in or a user's, is one StrategySpec in ``_REGISTRY``: its name, its builder, the options the
builder accepts (with defaults) and the facts the rest of the toolkit asks about (stateful, loss-only, needs the
solver extra). ``register_strategy`` adds one from user code; installed packages add theirs through the entry-point
group ``ortho_lora_dist.strategies`` (loaded the first time a name is not found).
"""

from __future__ import annotations

import difflib
import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

from ortho_lora_dist.core.options import checked_options, keyword_options

ENTRY_POINT_GROUP = "ortho_lora_dist.strategies"
SOLVER_HINT = "pip install 'ortho-lora-dist[mtl]'"
Rule = Callable[..., torch.Tensor]  # (grams [B, T, T] fp64, order, **options) -> weights [B, T]


class Strategy(ABC):
    """Maps global block Gram matrices [B, T, T] to combination weights [B, T] (fp64, on the Grams' device)."""

    def __init__(self, name: str, num_tasks: int, num_blocks: int) -> None:
        self.name, self.num_tasks, self.num_blocks = name, num_tasks, num_blocks

    def weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        """[B, T, T] Gram matrices (any float dtype) and this step's task order -> [B, T] fp64 weights."""
        if grams.dim() != 3 or grams.shape[1:] != (self.num_tasks, self.num_tasks):
            raise ValueError(f"grams must be [B, {self.num_tasks}, {self.num_tasks}], got {tuple(grams.shape)}")
        return self._weights(grams.detach().double(), order)

    @abstractmethod
    def _weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        """The strategy's weights for fp64 Grams."""

    def state_dict(self) -> dict:
        return {"name": self.name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"strategy state is for {state.get('name')!r}, this run uses {self.name!r}")


# (num_tasks, num_blocks, seed, checked options) -> Strategy
Builder = Callable[[int, int, int, dict[str, Any]], Strategy]


@dataclass(frozen=True)
class StrategySpec:
    """One multi-task rule: how to build it, the options it takes and what the toolkit must know of it."""

    name: str
    build: Builder
    options: Mapping[str, Any]  # the valid option names and their defaults
    stateful: bool = False  # keeps state across steps (checkpointed with the run)
    per_block: bool = False  # one instance of its state per block
    needs_solver: bool = False  # needs the solver extra (cvxpy / quadprog): SOLVER_HINT
    loss_only: bool = False  # coefficients of sum_t a_t L_t from the losses alone: ONE gradient, no per-task Grams
    summary: str = ""


_REGISTRY: dict[str, StrategySpec] = {}
_plugins_loaded = False


def add_spec(spec: StrategySpec, *, replace: bool = False) -> StrategySpec:
    """Register ``spec`` under its name (ValueError if the name is taken and ``replace`` is False)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", spec.name):
        raise ValueError(f"a strategy name is lower-case letters, digits and '_', got {spec.name!r}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"strategy {spec.name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[spec.name] = spec
    return spec


class _FunctionRule(Strategy):
    """A stateless user rule: weights = rule(grams, order, **options)."""

    def __init__(self, name: str, num_tasks: int, num_blocks: int, rule: Rule, options: dict[str, Any]) -> None:
        super().__init__(name, num_tasks, num_blocks)
        self.rule, self.options = rule, options

    def _weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        w = torch.as_tensor(self.rule(grams, list(order), **self.options))
        if w.shape != grams.shape[:-1]:
            raise ValueError(
                f"strategy {self.name!r} returned weights of shape {tuple(w.shape)}, need {grams.shape[:-1]}"
            )
        return w.to(torch.float64)


def register_strategy(
    name: str,
    rule: Rule | type[Strategy] | None = None,
    *,
    stateful: bool = False,
    needs_solver: bool = False,
    replace: bool = False,
) -> Any:
    """Add a Gram rule under ``name``; usable as a decorator (``@register_strategy("mine")``).

    ``rule`` is either a function ``rule(grams [B, T, T] fp64, order: list[int], *, option=default, ...) -> [B, T]``
    (stateless; its keyword-only parameters are the rule's options, given as ``train.strategy_options``), or a
    Strategy subclass built as ``cls(name, num_tasks, num_blocks, *, option=default, ...)``, which may keep state
    through ``state_dict`` / ``load_state_dict``. The rule sees global Grams (the same on every rank), so it is
    exact under data parallelism like the built-in ones."""

    def register(r: Rule | type[Strategy]) -> Rule | type[Strategy]:
        if inspect.isclass(r) and issubclass(r, Strategy):
            cls = r

            def build(T: int, B: int, seed: int, options: dict[str, Any]) -> Strategy:
                return cls(name, T, B, **options)

            options = keyword_options(cls.__init__)
        elif callable(r):
            fn = r

            def build(T: int, B: int, seed: int, options: dict[str, Any]) -> Strategy:
                return _FunctionRule(name, T, B, fn, options)

            options = keyword_options(fn)
        else:
            raise TypeError(f"register_strategy({name!r}, ...) needs a function or a Strategy subclass, got {r!r}")
        add_spec(StrategySpec(name, build, options, stateful=stateful, needs_solver=needs_solver), replace=replace)
        return r

    return register if rule is None else register(rule)


def _load_plugins() -> None:
    """Import the entry points of group ``ortho_lora_dist.strategies`` once; each registers its rules on import, or
    IS a rule (a function or Strategy subclass), registered under the entry point's name."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if ep.name not in _REGISTRY and (callable(obj) or inspect.isclass(obj)):
            register_strategy(ep.name, obj)


def strategy_names() -> tuple[str, ...]:
    """Every registered strategy's name: the built-in ones first, then the user's and plugins' in order of arrival."""
    _load_plugins()
    return tuple(_REGISTRY)


def get_spec(name: str) -> StrategySpec:
    """The spec of strategy ``name``; ValueError listing the valid names (and the closest one) if unknown."""
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown strategy {name!r}{hint}; it must be one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def is_loss_only(name: str) -> bool:
    """Whether ``name`` is a loss-only rule (ONE gradient, of sum_t a_t L_t)."""
    return get_spec(name).loss_only


def strategy_options(name: str) -> dict[str, Any]:
    """The options a strategy accepts, with their defaults."""
    return dict(get_spec(name).options)


def make_strategy(
    name: str, options: Mapping[str, Any] | None, num_tasks: int, num_blocks: int, seed: int = 0
) -> Strategy:
    """Build strategy ``name`` for T tasks and B blocks; ``options`` are checked against ``strategy_options(name)``."""
    spec = get_spec(name)
    checked = checked_options(name, options, spec.options)
    try:
        return spec.build(num_tasks, num_blocks, seed, checked)
    except ImportError as e:
        raise ImportError(f"strategy {name!r} needs the solver extra: {SOLVER_HINT} ({e})") from e
    except (TypeError, ValueError) as e:
        if str(e).startswith(f"strategy {name!r}"):
            raise
        raise ValueError(f"strategy {name!r}: bad options {checked}: {e}") from e
