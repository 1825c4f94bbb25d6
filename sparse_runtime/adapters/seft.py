"""SEFT's sparse-delta adapter ("Leave it to the Specialist", Xiao et al., arXiv 2505.24037;
docs/methods.md#seft). The topology evolution lives in :mod:`.seft_evolution`.

Parameterisation (the paper's Eq. 8, as reconstructed in docs/methods.md#seft-evolution)::

    W_eff = (W + scatter(I, d)) ⊙ M_t,      y = x W_eff^T + b

per wrapped linear: ``delta_index`` I (a buffer of K flat positions, row-major ``r * in + c``),
``delta`` d (the only trainable tensor, K fp32 values), and ``mask`` M_t (a stored bool buffer
that evolves; persistent, so it is saved with the adapter and a resume or merge sees the evolved
topology). The frozen base W is never modified: dropped deltas are discarded (SpIEL's rule) where
W != 0 and folded into a small store (``fold_index``/``fold_value``, added to W in the forward) at
resurrected positions (see :mod:`.seft_evolution`); re-pruned weights are only masked out, so the base checkpoint stays the reference for the merge
and for the "resurrected / newly pruned" counts (M_t vs M_0 = 1[W != 0]).

K ("slots") is set by ``density`` (fraction of the layer's in*out positions) or, by default, matched
to LoRA at ``rank`` r: K = r (in + out), the same trainable count as a rank-r LoRA pair
(docs/protocols.md#equal-budget). K may not exceed the layer's kept positions: the
initial index set lies inside the pruning mask (a delta at a pruned position is inert until the
evolution grows it, i.e. resurrects it).

Memory: the forward goes through :class:`SparseDeltaFunction`, which saves only x and references to
W, I, d, M and recomputes W_eff in backward (as LoRS does), so no out x in tensor lives between
forward and backward. The gradient of d is the masked dense gradient sampled at I,
dL/dd_k = M[I_k] · (g^T x)[I_k], computed either

- ``grad_impl="chunked"`` (default): g^T x in blocks of ``grad_chunk`` output rows (BLAS), each
  block gathered at the slots that fall in it and freed at once; or
- ``grad_impl="sampled"``: per slot the dot product g[:, r_k] · x[:, c_k], over blocks of slots
  (no out x in product at all; cheaper when K is tiny relative to in*out);

so at most one layer's (part of a) dense gradient exists at a time. The optimiser (AdamW) sees only
``delta``: its state is sized by K. Dense gradients are formed, one layer at a time inside the
backward, only while the evolution callback has opened a growth-selection window
(:meth:`SEFTAdapter.start_capture`); what is kept from them is O(K) growth candidates and, for the
sensitivity re-pruning, one fp32 number per kept weight (the window's accumulated gradient),
never a dense copy.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..sparsity import NMPattern, nm_compliant
from .base import AdapterConfig, SparseAdapter

log = logging.getLogger(__name__)

SCOPES = ("layer", "row", "global")
NM_MODES = ("active", "group")
INITS = ("gradient", "random")
DROP_SCHEDULES = ("cosine", "linear", "constant")
GRAD_IMPLS = ("chunked", "sampled")
OPTIMIZER_RESETS = ("seed", "zero")
NM_CANDIDATES = ("2:4", "4:8")


@dataclass
class SEFTConfig(AdapterConfig):
    """SEFT's options; defaults and their provenance are in docs/seft.md.

    Trainable size: ``density`` (fraction of in*out per layer) or, when it is None, ``rank``
    (K = rank * (in + out), LoRA-matched). Evolution: every ``update_every`` (k) optimiser steps,
    drop the fraction p of slots with the smallest |d| and grow as many at the largest gradient
    magnitude accumulated over the last ``accumulation_steps`` steps; p = ``drop_rate`` (p0) times
    the ``drop_schedule`` factor at t/T. ``resurrection`` lets growth reach pruned positions; the
    re-pruning by sensitivity |θ·g| restores the sparsity per ``scope`` (layer | row | global).
    N:M layers: ``nm_mode="active"`` grows only at kept positions (no mask change), ``"group"``
    re-prunes per M-group (the pattern stays exact either way).
    """

    mask_source: str = "stored"
    density: Optional[float] = None
    rank: Optional[int] = 8
    evolve: bool = True
    update_every: int = 60  # k: 60 for perplexity recovery (paper App. F.3), 10 for commonsense (F.4)
    drop_rate: float = 0.2  # p0 (SpIEL initial_reselection_rate; the paper's value is unknown)
    drop_schedule: str = "cosine"
    accumulation_steps: int = 5  # SpIEL selection_accumulation_steps
    resurrection: bool = True
    scope: str = "layer"
    nm_mode: str = "active"
    init: str = "gradient"
    init_samples: int = 16
    optimizer_reset: str = "seed"
    grad_impl: str = "chunked"
    grad_chunk: int = 256

    def validate(self) -> None:
        super().validate()
        if self.mask_source != "stored":
            raise ConfigError("SEFT's mask evolves, so it must be stored: mask_source must be 'stored'")
        if self.density is not None:
            if not isinstance(self.density, (int, float)) or not 0.0 < float(self.density) <= 1.0:
                raise ConfigError(f"density must be in (0, 1] (a fraction of each layer's positions), got "
                                  f"{self.density!r}; or leave it unset and give rank to match LoRA")
        elif not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank (LoRA-matched size, K = rank*(in+out)) must be a positive integer, got "
                              f"{self.rank!r}; or give density")
        if not isinstance(self.update_every, int) or self.update_every < 1:
            raise ConfigError(f"update_every (k) must be an integer >= 1, got {self.update_every!r}")
        if not 0.0 <= float(self.drop_rate) <= 1.0:
            raise ConfigError(f"drop_rate (p0) must be in [0, 1], got {self.drop_rate}")
        if not isinstance(self.accumulation_steps, int) or not 1 <= self.accumulation_steps <= self.update_every:
            raise ConfigError(f"accumulation_steps must be in [1, update_every={self.update_every}], got "
                              f"{self.accumulation_steps!r}")
        for name, val, choices in (("scope", self.scope, SCOPES), ("nm_mode", self.nm_mode, NM_MODES),
                                   ("init", self.init, INITS), ("drop_schedule", self.drop_schedule, DROP_SCHEDULES),
                                   ("grad_impl", self.grad_impl, GRAD_IMPLS),
                                   ("optimizer_reset", self.optimizer_reset, OPTIMIZER_RESETS)):
            if val not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got {val!r}")
        if self.init_samples < 1 or self.grad_chunk < 1:
            raise ConfigError("init_samples and grad_chunk must be >= 1")

    def slots_for(self, out_features: int, in_features: int, name: str = "layer") -> int:
        if self.density is not None:
            k = int(round(float(self.density) * out_features * in_features))
            if k < 1:
                raise ConfigError(f"density {self.density} gives 0 trainable positions in {name} "
                                  f"({out_features} x {in_features}); raise it")
            return k
        return int(self.rank) * (in_features + out_features)

    def drop_fraction(self, step: int, total: int) -> float:
        """p at optimiser step ``step`` of ``total``: p0 · f(t/T) (SpIEL's schedules)."""
        t = min(1.0, max(0.0, step / max(1, total)))
        if self.drop_schedule == "constant":
            f = 1.0
        elif self.drop_schedule == "linear":
            f = 1.0 - t
        else:
            f = 0.5 * (1.0 + math.cos(math.pi * t))
        return float(self.drop_rate) * f


def detect_pattern(keep: torch.Tensor) -> Optional[NMPattern]:
    """The finest N:M pattern (2:4, then 4:8) the mask already satisfies, else None. A mask that
    satisfies 2:4 also satisfies 4:8; keeping the finer one keeps both."""
    if not bool((~keep).any()):
        return None
    for c in NM_CANDIDATES:
        p = NMPattern.parse(c)
        if keep.shape[1] % p.m == 0 and nm_compliant(keep, p):
            return p
    return None


def effective_weight(W: torch.Tensor, idx: torch.Tensor, d: torch.Tensor, mask: torch.Tensor,
                     fold_idx: Optional[torch.Tensor] = None, fold_val: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(W + scatter(F, f) + scatter(I, d)) ⊙ M in fp32 (fp64 when the inputs are); (F, f) are the
    folded values of dropped deltas at resurrected positions (empty in most layers)."""
    dt = torch.promote_types(torch.promote_types(W.dtype, d.dtype), torch.float32)
    w = W.detach().to(dt, copy=True)
    if fold_idx is not None and fold_idx.numel():
        w.view(-1).index_add_(0, fold_idx, fold_val.detach().to(dt))
    w.view(-1).index_add_(0, idx, d.detach().to(dt))
    return w.mul_(mask)


ChunkPlan = tuple[torch.Tensor, list[tuple[int, int, int, int]]]


def chunk_plan(idx: torch.Tensor, in_features: int, out_features: int, chunk: int) -> ChunkPlan:
    """The slots of ``idx`` grouped by blocks of ``chunk`` output rows: (order, [(row0, row1, a, b)])
    where ``order[a:b]`` are the slots whose row lies in [row0, row1); empty blocks are left out.
    Computing it reads one small tensor back to the host; the backward reuses it for every step
    until the index set changes, so the per-block loop itself never waits for the device."""
    rows = torch.div(idx, in_features, rounding_mode="floor")
    block = torch.div(rows, chunk, rounding_mode="floor")
    order = torch.argsort(block, stable=True)
    counts = torch.bincount(block, minlength=(out_features + chunk - 1) // chunk).tolist()
    plan, a = [], 0
    for bi, n in enumerate(counts):
        if n:
            plan.append((bi * chunk, min(out_features, (bi + 1) * chunk), a, a + n))
        a += n
    return order, plan


def sampled_grad(g2: torch.Tensor, x2: torch.Tensor, idx: torch.Tensor, in_features: int, impl: str,
                 chunk: int, plan: Optional[ChunkPlan] = None) -> torch.Tensor:
    """(g^T x)[I] (unmasked) without forming more than a block of the out x in product.
    g2: tokens x out, x2: tokens x in (same dtype), idx: K flat positions; ``plan``: the
    :func:`chunk_plan` of ``idx`` (computed here when not given)."""
    K = idx.numel()
    out = torch.empty(K, dtype=g2.dtype, device=g2.device)
    if K == 0:
        return out
    if impl == "sampled":
        rows = torch.div(idx, in_features, rounding_mode="floor")
        cols = idx - rows * in_features
        T = max(1, g2.shape[0])
        step = max(1, (1 << 22) // T)  # ~16 MB of gathered fp32 per block and operand
        for a in range(0, K, step):
            b = min(K, a + step)
            out[a:b] = (g2[:, rows[a:b]] * x2[:, cols[a:b]]).sum(0)
        return out
    order, blocks = plan if plan is not None else chunk_plan(idx, in_features, g2.shape[1], chunk)
    for i, j, a, b in blocks:
        sel = order[a:b]
        G = g2[:, i:j].t() @ x2  # chunk x in, freed each iteration
        out[sel] = G.reshape(-1)[idx[sel] - i * in_features]
        del G
    return out


class SparseDeltaFunction(torch.autograd.Function):
    """y = x ((W + scatter(I, d)) ⊙ M)^T + b, saving only x and references to W, I, d, M."""

    @staticmethod
    def forward(ctx, x, W, bias, d, idx, mask, fold_idx, fold_val, adapter, compute_dtype):
        if W.requires_grad:
            raise RuntimeError("SEFT does not compute the gradient of the frozen base weight; freeze it")
        w = effective_weight(W, idx, d, mask, fold_idx, fold_val).to(compute_dtype)
        xc = x.to(compute_dtype)
        y = F.linear(xc, w, None if bias is None else bias.to(compute_dtype))
        ctx.save_for_backward(xc, W, d, idx, mask, fold_idx, fold_val)
        ctx.adapter, ctx.x_dtype = adapter, x.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        xc, W, d, idx, mask, fold_idx, fold_val = ctx.saved_tensors
        ad = ctx.adapter
        out_f, in_f = W.shape
        g2 = g.reshape(-1, out_f)
        grad_x = grad_bias = grad_d = None
        if ctx.needs_input_grad[0]:
            w = effective_weight(W, idx, d, mask, fold_idx, fold_val).to(g.dtype)  # weight recompute
            grad_x = (g2 @ w).reshape(*g.shape[:-1], in_f).to(ctx.x_dtype)
            del w
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if ctx.needs_input_grad[3] or ad._capture is not None:
            x2 = xc.reshape(-1, in_f).to(d.dtype)
            gf = g2.to(d.dtype)
            if ad._capture is not None:
                G = gf.t() @ x2  # the one dense gradient of this layer (growth window only)
                ad._capture_gradient(G)
                gi = G.reshape(-1)[idx]
                del G
            else:
                plan = ad.grad_plan(idx) if ad.cfg.grad_impl == "chunked" else None
                gi = sampled_grad(gf, x2, idx, in_f, ad.cfg.grad_impl, ad.cfg.grad_chunk, plan)
            grad_d = gi * mask.reshape(-1)[idx]
        return grad_x, None, grad_bias, grad_d, None, None, None, None, None, None


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError, RuntimeError):
        pass
    return x.dtype


_VARIABLE_BUFFERS = {"fold_index": torch.long, "fold_value": torch.float32}
_WINDOW_BUFFERS = {"seft_pool": torch.long, "seft_pool_sum": torch.float32, "seft_pool_sq": torch.float32,
                   "seft_pool_step": torch.float32, "seft_sens": torch.float32}


class SEFTAdapter(SparseAdapter):
    """See the module docstring. ``merge_check`` is "count" (per-layer nonzeros and any N:M pattern
    unchanged) for the layer and row scopes, "total" for the global scope."""

    method = "seft"
    merge_check = "count"
    cfg: SEFTConfig

    def __init__(self, base: nn.Linear, cfg: SEFTConfig, name: str = "") -> None:
        super().__init__(base, cfg, name)
        dev = base.weight.device
        keep = base.weight.detach() != 0
        self.register_buffer("mask", keep.clone(), persistent=True)  # M_t, evolves; saved
        self.pattern = detect_pattern(keep)
        if cfg.scope == "global":
            self.merge_check = "total"
        K = cfg.slots_for(base.out_features, base.in_features, name)
        kept = keep.reshape(-1).nonzero().squeeze(1)
        if K > kept.numel():
            raise ConfigError(self._too_many(cfg, K, kept.numel()))
        if cfg.init == "random":
            sel = kept[torch.randperm(kept.numel(), device=dev)[:K]]
        else:  # placeholder; the gradient initialisation replaces it before the first step
            sel = kept[torch.linspace(0, kept.numel() - 1, K, device=dev).long()] if K > 1 else kept[:1]
        self.register_buffer("delta_index", sel.clone())
        self.delta = nn.Parameter(torch.zeros(K, device=dev, dtype=torch.float32))
        for n, dt in {**_VARIABLE_BUFFERS, **_WINDOW_BUFFERS}.items():
            self.register_buffer(n, torch.zeros(0, dtype=dt, device=dev))
        self.register_buffer("seft_window_steps", torch.zeros((), dtype=torch.long, device=dev))
        self._capture: Optional[str] = None  # None | "init" | "window"

    # -- checks before anything changes -----------------------------------------------------------
    @staticmethod
    def _too_many(cfg: SEFTConfig, K: int, free: int) -> str:
        how = f"density {cfg.density}" if cfg.density is not None else f"rank {cfg.rank} (K = rank*(in+out))"
        return (f"{how} asks for {K} trainable positions, but the layer has only {free} kept (free) positions; "
                "lower the density/rank")

    @staticmethod
    def check_layer(cfg: SEFTConfig, name: str, lin: nn.Module) -> None:
        K = cfg.slots_for(lin.out_features, lin.in_features, name)
        keep = lin.weight.detach() != 0
        free = int(keep.sum())
        if K > free:
            raise ConfigError(f"{name}: " + SEFTAdapter._too_many(cfg, K, free))
        if cfg.scope == "global" and cfg.evolve and detect_pattern(keep) is not None:
            raise ConfigError(f"{name} is N:M sparse ({detect_pattern(keep)}): a global re-pruning scope cannot keep "
                              "the pattern; use scope 'layer' or 'row' (N:M layers then re-prune per M-group, "
                              "nm_mode 'group', or grow only at kept weights, nm_mode 'active')")

    # -- SparseAdapter -----------------------------------------------------------------------------
    def keep_mask(self) -> torch.Tensor:
        return self.mask

    @property
    def slots(self) -> int:
        return int(self.delta.numel())

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = _autocast_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return SparseDeltaFunction.apply(x, self.base.weight, self.base.bias, self.delta, self.delta_index,
                                             self.mask, self.fold_index, self.fold_value, self, cd)

    def merged_weight(self) -> torch.Tensor:
        return effective_weight(self.base.weight.detach(), self.delta_index, self.delta.detach(), self.mask,
                                self.fold_index, self.fold_value)

    @torch.no_grad()
    def theta(self) -> torch.Tensor:
        """Flat current weight values without the trainable deltas: W + folded values."""
        w = self.base.weight.detach().reshape(-1).float().clone()
        if self.fold_index.numel():
            w.index_add_(0, self.fold_index, self.fold_value)
        return w

    @torch.no_grad()
    def fold(self, pos: torch.Tensor, val: torch.Tensor) -> None:
        """Keep the values of dropped deltas at resurrected positions (W = 0 there, so discarding
        them would leave a kept weight equal to zero)."""
        if pos.numel() == 0:
            return
        allp = torch.cat([self.fold_index, pos])
        allv = torch.cat([self.fold_value, val.float()])
        uniq, inv = torch.unique(allp, return_inverse=True)
        self.fold_index = uniq
        self.fold_value = torch.zeros(uniq.numel(), device=allv.device).index_add_(0, inv, allv)

    @torch.no_grad()
    def unfold(self, pos: torch.Tensor) -> None:
        """Re-pruned positions leave the folded store."""
        if self.fold_index.numel():
            keep = ~torch.isin(self.fold_index, pos)
            self.fold_index, self.fold_value = self.fold_index[keep], self.fold_value[keep]

    def merge_info(self) -> dict[str, Any]:
        m0 = self.base.weight.detach() != 0
        return {"slots": self.slots, "merge_check": self.merge_check,
                "resurrected": int((self.mask & ~m0).sum()), "newly_pruned": int((~self.mask & m0).sum())}

    @property
    def grows_at_pruned(self) -> bool:
        """Growth may reach pruned positions: resurrection on, and not an N:M layer in 'active' mode."""
        return bool(self.cfg.resurrection) and not (self.pattern is not None and self.cfg.nm_mode == "active")

    def resize_for_state(self, key: str, shape) -> None:
        """Window accumulators vary in size (empty outside a growth window)."""
        kinds = {**_VARIABLE_BUFFERS, **_WINDOW_BUFFERS}
        if key in kinds:
            setattr(self, key, torch.zeros(tuple(shape), dtype=kinds[key], device=self.delta.device))

    # -- growth-selection window -----------------------------------------------------------------
    def grad_plan(self, idx: torch.Tensor) -> ChunkPlan:
        """:func:`chunk_plan` of the current index set, cached until the set changes (the evolution
        step replaces or edits it in place: the tensor's identity and version are the key)."""
        key = (id(idx), idx.data_ptr(), idx._version, idx.numel(), str(idx.device), self.cfg.grad_chunk)
        cached = getattr(self, "_grad_plan_cache", None)
        if cached is None or cached[0] != key:
            plan = chunk_plan(idx, self.base.in_features, self.base.out_features, self.cfg.grad_chunk)
            self._grad_plan_cache = (key, plan)
            return plan
        return cached[1]

    def start_capture(self, mode: str) -> None:
        """Open a window: each backward of this layer forms its dense gradient once and keeps
        O(K) growth candidates plus (mode "window") the accumulated gradient at kept positions."""
        self._capture = mode
        if self.seft_window_steps.item() == 0 and self.seft_pool.numel() == 0:
            self.seft_sens = torch.zeros(int(self.mask.sum()) if mode == "window" else 0, device=self.delta.device)

    def clear_window(self) -> None:
        self._capture = None
        for n, dt in _WINDOW_BUFFERS.items():
            setattr(self, n, torch.zeros(0, dtype=dt, device=self.delta.device))
        self.seft_window_steps.zero_()

    def in_index(self) -> torch.Tensor:
        flag = torch.zeros(self.mask.numel(), dtype=torch.bool, device=self.mask.device)
        flag[self.delta_index] = True
        return flag

    @torch.no_grad()
    def _capture_gradient(self, G: torch.Tensor) -> None:
        Gf = G.reshape(-1)
        if self.seft_pool.numel() == 0:
            # candidate pool: the top-K entries of |grad| among eligible positions (SpIEL)
            if self._capture == "init":
                eligible = self.mask.reshape(-1)
            else:
                eligible = ~self.in_index()
                if not self.grows_at_pruned:
                    eligible &= self.mask.reshape(-1)
            n = min(self.slots, int(eligible.sum()))
            score = torch.where(eligible, Gf.abs(), torch.full_like(Gf, -1.0))
            self.seft_pool = torch.topk(score, n, sorted=False).indices
            self.seft_pool_sum = torch.zeros(n, device=Gf.device)
            self.seft_pool_sq = torch.zeros(n, device=Gf.device)
            self.seft_pool_step = torch.zeros(n, device=Gf.device)
        self.seft_pool_step += Gf[self.seft_pool].float()
        if self._capture == "window" and self.seft_sens.numel():
            self.seft_sens += Gf[self.mask.reshape(-1)].float()

    @torch.no_grad()
    def end_window_step(self) -> None:
        """Close one optimiser step of the window: the step's gradient at the candidates."""
        if self.seft_pool.numel():
            self.seft_pool_sum += self.seft_pool_step
            self.seft_pool_sq += self.seft_pool_step ** 2
            self.seft_pool_step.zero_()
        self.seft_window_steps += 1

    @torch.no_grad()
    def select_initial(self) -> None:
        """Gradient initialisation: I = the K kept positions with the largest |accumulated grad|,
        d = 0 (SpIEL's first, full reselection, done at step 0 instead of after k random steps)."""
        self.end_window_step()
        pool, score = self.seft_pool, self.seft_pool_sum.abs()
        if pool.numel() == self.slots:
            order = torch.argsort(score, descending=True, stable=True)
            self.delta_index.copy_(pool[order])
        self.delta.zero_()
        self.clear_window()


__all__ = ["SEFTConfig", "SEFTAdapter", "SparseDeltaFunction", "effective_weight", "sampled_grad", "chunk_plan",
           "detect_pattern", "SCOPES", "NM_MODES"]
