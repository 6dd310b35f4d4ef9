"""Multi-task strategies as pure functions of block Gram matrices: grams [B, T, T] -> weights [B, T] (fp64).

The combined gradient of block b is sum_t w[b, t] g_t. Because only the T x T Gram matrices of the global
per-task gradients enter, every strategy is exact under data parallelism (see projection.py).

  joint         w_t = 1                                                   (plain sum)
  ortho         Ortho-LoRA / PCGrad with ONE order per step               (projection.combine_weights)
  norm_balance  w_t = p_t S / (P ||g_t||), S = sum_k ||g_k||, P = sum_k p_k over tasks with g_k != 0; else 0
  the rest      TorchJD's own Gramian weightings (upgrad, mgda, cagrad, imtl_g, aligned_mtl, dualproj,
                pcgrad, gradvac) and its Nash-MTL matrix weighting, called per block (never re-implemented)

Scale: upgrad, dualproj, cagrad, mgda, imtl_g, aligned_mtl and gradvac are invariant to G -> cG in exact
arithmetic but TorchJD applies absolute thresholds: below trace(G) = norm_eps = 1e-4 (common for one LoRA
factor) UPGrad and DualProj silently return the plain mean and CAGrad returns 0; IMTL-G zeroes when its
unnormalised sum < 1e-12, GradVac adds eps = 1e-8 to products of norms. They receive G / trace(G), which
makes those thresholds relative to the block's own scale.
pcgrad and nash_mtl (whose max_norm is absolute by design) receive G itself. A block whose G is exactly 0
gets weights 0 from the TorchJD strategies without calling them (no state update).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ortho_lora_dist.core.loss_balancing import (
    LOSS_STRATEGIES,
    LossBalancer,
    loss_balancer_options,
    make_loss_balancer,
)
from ortho_lora_dist.core.options import checked_options, keyword_options
from ortho_lora_dist.core.projection import combine_weights, joint_weights

__all__ = [
    "GRAM_STRATEGIES",
    "LOSS_STRATEGIES",
    "STRATEGIES",
    "SOLVER_STRATEGIES",
    "STATEFUL_STRATEGIES",
    "Strategy",
    "LossOnly",
    "make_strategy",
    "strategy_options",
]

TORCHJD_STRATEGIES = ("upgrad", "mgda", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "dualproj", "pcgrad", "gradvac")
# functions of the per-task block Grams (need the per-task gradients), and loss-only rules (loss_balancing.py)
GRAM_STRATEGIES: tuple[str, ...] = ("ortho", "joint", "norm_balance", *TORCHJD_STRATEGIES)
STRATEGIES: tuple[str, ...] = (*GRAM_STRATEGIES, *LOSS_STRATEGIES)
SOLVER_STRATEGIES = frozenset({"upgrad", "dualproj", "cagrad", "nash_mtl"})  # need torchjd[full] (extra 'mtl')
STATEFUL_STRATEGIES = frozenset({"nash_mtl", "gradvac", "pcgrad"})  # per-block state and/or a random stream
_PER_BLOCK = frozenset({"nash_mtl", "gradvac"})  # one weighting (with its state) per block
_RANDOM = frozenset({"pcgrad", "gradvac"})  # TorchJD draws torch.randperm from the global RNG: forked per step
_RAW_GRAM = frozenset({"pcgrad", "nash_mtl"})  # fed G itself; the others G / trace(G)
SOLVER_HINT = "pip install 'ortho-lora-dist[mtl]'"


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


class LossOnly(Strategy):
    """A loss-only rule: the step holds ONE gradient, of sum_t a_t L_t (a_t from ``balancer``), taken with weight 1."""

    def __init__(self, name: str, num_blocks: int, balancer: LossBalancer) -> None:
        super().__init__(name, 1, num_blocks)
        self.balancer = balancer

    def _weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        return torch.ones(grams.shape[0], 1, dtype=torch.float64, device=grams.device)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "balancer": self.balancer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.balancer.load_state_dict(state["balancer"])


class _Joint(Strategy):
    def _weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        """w_t = 1."""
        return joint_weights(grams)


class _Ortho(Strategy):
    def _weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        """PCGrad with one order per step, on the original g_j (projection.py)."""
        return combine_weights(grams, order)


class _NormBalance(Strategy):
    def __init__(self, name: str, num_tasks: int, num_blocks: int, pref_vector: torch.Tensor | None) -> None:
        super().__init__(name, num_tasks, num_blocks)
        self.pref = torch.ones(num_tasks, dtype=torch.float64) if pref_vector is None else pref_vector

    def _weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        """w_t = p_t S / (P ||g_t||) on Z = {t: g_t != 0}, S = sum_Z ||g_k||, P = sum_Z p_k; w_t = 0 off Z."""
        norms = torch.diagonal(grams, dim1=-2, dim2=-1).clamp_min(0).sqrt()  # [B, T]
        nonzero = norms > 0
        p = self.pref.to(grams.device).expand_as(norms)
        total = norms.sum(-1, keepdim=True)  # zero norms add nothing
        pref_sum = torch.where(nonzero, p, 0.0).sum(-1, keepdim=True)
        denom = torch.where(nonzero, pref_sum * norms, 1.0)
        return torch.where(nonzero, p * total / denom, 0.0)


class _TorchJD(Strategy):
    """One TorchJD weighting per block (stateful ones) or one shared (stateless), looped over blocks on CPU."""

    def __init__(self, name: str, num_tasks: int, num_blocks: int, build: Callable[[], Any], seed: int) -> None:
        super().__init__(name, num_tasks, num_blocks)
        self.per_block = [build() for _ in range(num_blocks if name in _PER_BLOCK else 1)]
        self.generator = torch.Generator().manual_seed(int(seed) + 0x5EED) if name in _RANDOM else None

    def _weighting(self, b: int) -> Any:
        return self.per_block[0] if len(self.per_block) == 1 else self.per_block[b]

    def _weights(self, grams: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
        """w[b] = TorchJD weighting of block b (G_b / trace(G_b), or G_b, or a factor M_b with M_b M_b^T = G_b)."""
        G = grams.cpu()
        out = torch.zeros(G.shape[:-1], dtype=torch.float64)
        trace = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)
        if self.generator is None:
            self._loop(G, trace, out)
        else:  # TorchJD draws from the global RNG: give it a stream that is ours, identical on every rank
            step_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(step_seed)
                self._loop(G, trace, out)
        return out.to(grams.device)

    def _loop(self, G: torch.Tensor, trace: torch.Tensor, out: torch.Tensor) -> None:
        with warnings.catch_warnings():  # cvxpy: Nash-MTL's problem is not DPP (recompiled every solve; known)
            warnings.filterwarnings("ignore", message="You are solving a parameterized problem that is not DPP")
            self._blocks(G, trace, out)

    def _blocks(self, G: torch.Tensor, trace: torch.Tensor, out: torch.Tensor) -> None:
        for b, tr in enumerate(trace.tolist()):
            if tr == 0:
                continue
            g = G[b] if self.name in _RAW_GRAM else G[b] / tr
            if self.name == "nash_mtl":  # a matrix weighting: it only ever uses M M^T = G and ||a^T M||
                lam, vec = torch.linalg.eigh(g)
                g = vec * lam.clamp_min(0).sqrt()
            out[b] = self._weighting(b)(g)

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"name": self.name}
        if self.generator is not None:
            state["rng"] = self.generator.get_state()
        if self.name in _PER_BLOCK:
            state["blocks"] = [_weighting_state(self.name, w) for w in self.per_block]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if self.generator is not None:
            self.generator.set_state(state["rng"])
        if "blocks" in state:
            if len(state["blocks"]) != len(self.per_block):
                raise ValueError(
                    f"{self.name} state has {len(state['blocks'])} blocks, this run has {len(self.per_block)}"
                )
            for w, s in zip(self.per_block, state["blocks"]):
                _load_weighting_state(self.name, w, s)


def _weighting_state(name: str, w: Any) -> dict:
    """The mutable state of TorchJD's GradVac / Nash-MTL weighting: tensors and Python scalars only."""
    if name == "gradvac":
        return {} if w._phi_t is None else {"phi": w._phi_t.clone()}
    return {
        "step": float(w.step),
        "prvs_alpha": torch.from_numpy(w.prvs_alpha.copy()),
        "normalization_factor": torch.from_numpy(w.normalization_factor.copy()),
    }


def _load_weighting_state(name: str, w: Any, s: Mapping[str, Any]) -> None:
    if name == "gradvac":
        w.reset()
        if "phi" in s:
            w._phi_t, w._state_key = s["phi"].clone(), (s["phi"].shape[0], s["phi"].dtype)
        return
    w.reset()
    w.prvs_alpha = s["prvs_alpha"].numpy().copy()
    w.normalization_factor = s["normalization_factor"].numpy().copy()
    w.step = float(s["step"])
    if w.step > 0:  # forward() builds the cvxpy problem only at step 0; its parameters are reset every solve
        w._init_optim_problem()


# -- builders: keyword-only parameters are the valid options (defaults are TorchJD's, except cagrad's c) ------------
def _projector(norm_eps: float, reg_eps: float) -> Any:
    from torchjd.linalg import QuadprogProjector

    return QuadprogProjector(norm_eps=norm_eps, reg_eps=reg_eps)


def _upgrad(T: int, *, pref_vector: Any = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> Any:
    from torchjd.aggregation import UPGradWeighting

    return UPGradWeighting(_pref(pref_vector, T), projector=_projector(norm_eps, reg_eps))


def _dualproj(T: int, *, pref_vector: Any = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> Any:
    from torchjd.aggregation import DualProjWeighting

    return DualProjWeighting(_pref(pref_vector, T), projector=_projector(norm_eps, reg_eps))


def _mgda(T: int, *, epsilon: float = 1e-3, max_iters: int = 100) -> Any:
    from torchjd.aggregation import MGDAWeighting

    return MGDAWeighting(epsilon=epsilon, max_iters=max_iters)


def _cagrad(T: int, *, c: float = 0.4, norm_eps: float = 1e-4) -> Any:
    from torchjd.aggregation import CAGradWeighting

    return CAGradWeighting(c=c, norm_eps=norm_eps)


def _imtl_g(T: int) -> Any:
    from torchjd.aggregation import IMTLGWeighting

    return IMTLGWeighting()


def _aligned_mtl(T: int, *, pref_vector: Any = None, scale_mode: str = "min") -> Any:
    from torchjd.aggregation import AlignedMTLWeighting

    if scale_mode not in ("min", "median", "rmse"):
        raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
    return AlignedMTLWeighting(_pref(pref_vector, T), scale_mode=scale_mode)


def _pcgrad(T: int) -> Any:
    from torchjd.aggregation import PCGradWeighting

    return PCGradWeighting()


def _gradvac(T: int, *, beta: float = 0.5, eps: float = 1e-8) -> Any:
    from torchjd.aggregation import GradVacWeighting

    return GradVacWeighting(beta=beta, eps=eps)


def _nash_mtl(T: int, *, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20) -> Any:
    from torchjd.aggregation import NashMTL

    return NashMTL(T, max_norm=max_norm, update_weights_every=update_weights_every, optim_niter=optim_niter).weighting


def _norm_balance(T: int, *, pref_vector: Any = None) -> torch.Tensor | None:
    p = _pref(pref_vector, T)
    if p is not None and not bool((p > 0).all()):
        raise ValueError(f"pref_vector must be positive for norm_balance, got {p.tolist()}")
    return p


def _none(T: int) -> None:
    return None


_BUILDERS: dict[str, Callable[..., Any]] = {
    "ortho": _none,
    "joint": _none,
    "norm_balance": _norm_balance,
    "upgrad": _upgrad,
    "mgda": _mgda,
    "cagrad": _cagrad,
    "imtl_g": _imtl_g,
    "nash_mtl": _nash_mtl,
    "aligned_mtl": _aligned_mtl,
    "dualproj": _dualproj,
    "pcgrad": _pcgrad,
    "gradvac": _gradvac,
}


def _pref(value: Any, T: int) -> torch.Tensor | None:
    """A per-task preference vector (list, tuple or tensor of T finite numbers) -> fp64 tensor, or None."""
    if value is None:
        return None
    p = torch.as_tensor(value, dtype=torch.float64).flatten()
    if p.numel() != T or not bool(torch.isfinite(p).all()):
        raise ValueError(f"pref_vector must hold {T} finite numbers (one per task), got {value!r}")
    return p


def strategy_options(name: str) -> dict[str, Any]:
    """The options a strategy accepts, with their defaults."""
    if name in LOSS_STRATEGIES:
        return loss_balancer_options(name)
    if name not in _BUILDERS:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    return keyword_options(_BUILDERS[name])


def make_strategy(
    name: str, options: Mapping[str, Any] | None, num_tasks: int, num_blocks: int, seed: int = 0
) -> Strategy:
    """Build strategy ``name`` for T tasks and B blocks; ``options`` are checked against ``strategy_options(name)``."""
    if name in LOSS_STRATEGIES:
        return LossOnly(name, num_blocks, make_loss_balancer(name, options, num_tasks))
    options = checked_options(name, options, strategy_options(name))

    def build() -> Any:
        try:
            return _BUILDERS[name](num_tasks, **options)
        except ImportError as e:
            raise ImportError(f"strategy {name!r} needs the solver extra: {SOLVER_HINT} ({e})") from e
        except (TypeError, ValueError) as e:
            raise ValueError(f"strategy {name!r}: bad options {options}: {e}") from e

    if name == "joint":
        return _Joint(name, num_tasks, num_blocks)
    if name == "ortho":
        return _Ortho(name, num_tasks, num_blocks)
    if name == "norm_balance":
        return _NormBalance(name, num_tasks, num_blocks, build())
    build()  # validate the options (and the solver packages) even where no block exists yet
    return _TorchJD(name, num_tasks, num_blocks, build, seed)
