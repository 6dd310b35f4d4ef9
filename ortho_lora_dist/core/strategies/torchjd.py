"""TorchJD's Gramian weightings as strategies: upgrad, mgda, cagrad, imtl_g, aligned_mtl, dualproj, pcgrad, gradvac and
its Nash-MTL matrix weighting, called per block (never re-implemented).

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ortho_lora_dist.core.options import keyword_options
from ortho_lora_dist.core.strategies.base import Strategy, StrategySpec, add_spec
from ortho_lora_dist.core.strategies.native import pref_vector_of as _pref

TORCHJD_STRATEGIES = ("upgrad", "mgda", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "dualproj", "pcgrad", "gradvac")
SOLVER_STRATEGIES = frozenset({"upgrad", "dualproj", "cagrad", "nash_mtl"})  # need torchjd[full] (extra 'mtl')
_PER_BLOCK = frozenset({"nash_mtl", "gradvac"})  # one weighting (with its state) per block
_RANDOM = frozenset({"pcgrad", "gradvac"})  # TorchJD draws torch.randperm from the global RNG: forked per step
_RAW_GRAM = frozenset({"pcgrad", "nash_mtl"})  # fed G itself; the others G / trace(G)


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


_BUILDERS: dict[str, Callable[..., Any]] = {
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


def _spec(name: str) -> StrategySpec:
    weighting = _BUILDERS[name]

    def build(T: int, B: int, seed: int, options: dict[str, Any]) -> Strategy:
        weighting(T, **options)  # validate the options (and the solver packages) even where no block exists yet
        return _TorchJD(name, T, B, lambda: weighting(T, **options), seed)

    return StrategySpec(
        name,
        build,
        keyword_options(weighting),
        stateful=name in _PER_BLOCK | _RANDOM,
        per_block=name in _PER_BLOCK,
        needs_solver=name in SOLVER_STRATEGIES,
        summary=f"TorchJD's {name}",
    )


for _name in TORCHJD_STRATEGIES:
    add_spec(_spec(_name))
