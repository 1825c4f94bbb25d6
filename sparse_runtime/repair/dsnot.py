"""DSnoT: training-free repair of a pruned layer by iterative prune-and-grow (Zhang et al., ICLR 2024).

Why it works. For output row r of a linear y = W x, pruning the set P_r changes the row's output by
eps_r(x) = sum_{j in P_r} W_rj x_j. DSnoT cannot see every token, so it controls the *expected*
error (docs/methods.md#dsnot-algorithm, step 2)

    e_r = E[eps_r] = sum_{j in P_r} W_rj * E[x_j]                                            (1)

and swaps one pruned weight for one kept weight per step, so the row's nonzero count (and an N:M
pattern) never changes. The growth candidate is the pruned weight that moves e_r furthest towards
zero per unit of input variance (the variance is the part of eps_r a mean cannot cancel):

    grow  i = argmax_{j in P_r, sign(c_rj) = sign(e_r)}  |c_rj| / Var(x_j)^p,   c_rj = W_rj E[x_j]   (2)

and the pruning partner is the kept weight whose removal also pushes e_r towards zero and that
matters least by Wanda's measure:

    prune k = argmin_{j in K_r, sign(c_rj) = -sign(e_r)}  |W_rj| * ||X_j||_2                       (3)

The swap gives e_r <- e_r - c_ri + c_rk. Lowering the mean error this way has a price: the grown
weight was pruned for a low score and the partner is kept for a higher one, so the error's
variance grows. The expected squared error of the row, with input channels taken as independent,

    E[eps_r^2] ~= e_r^2 + sum_{j in P_r} W_rj^2 Var(x_j)                                        (4)

holds both; by default a swap must lower (4) (``objective="mse"``; the official code watches e_r only).
The swap is accepted while |e_r| > threshold, for at most
``max_cycles`` cycles; a row whose swap is rejected stops for good (the official code's rule). Both
rankings are computed once from the initial mask, as in the official code, so a regrown weight is
never pruned again and a DSnoT-pruned weight is never regrown: every step makes progress.

N:M (docs/methods.md#dsnot-algorithm, N:M): the growth ranking is the same; the partner is the
kept weight of the *same M-group* with the smallest Wanda score (any sign), so the group keeps
exactly M-N nonzeros.

What this module does differently from the official code (each an option; ``DSnoTConfig.official()``
restores the code's behaviour; see docs/dsnot.md):

- candidate pools are restricted explicitly: the official pointers can walk past the pruned
  candidates of the right sign into kept entries (score 0); here an exhausted pool stops the row;
- a variance floor (the official code divides by Var(x_j) = 0 for a dead channel);
- the threshold is scale-independent by default (the official unit is a token sum, seqlen * E[x],
  whose meaning changes with seqlen and with the scale of activations and weights);
- all linears are refined by default (the official default skips the MLP);
- ``same_sign`` (a swap may not flip the sign of e_r) and ``require_decrease`` (a swap must lower
  |e_r|) are on by default. Together they make |e_r| non-increasing across accepted swaps, the
  property the tests check; the official unstructured default has neither and allows overshoot;
- after SparseGPT (kept weights already reconstructed), a regrown weight takes its ORIGINAL dense
  value, because SparseGPT's update overwrote nothing at pruned positions we could use
  (docs/methods.md#dsnot-defaults-and-surprises and #composition); kept weights keep their SparseGPT values;
- an optional block guard (``guard="block"``, off by default, run by the refiner in dsnot_passes
  after each block): where DSnoT did not lower the block's output error against the dense block,
  the pruner's masks are kept for that block (docs/dsnot.md#the-block-guard);
- an optional model-level held-out acceptance (``accept="heldout"``, module
  :mod:`sparse_runtime.repair.dsnot_heldout`): the pass feeds the pruner's block outputs forward,
  and at the end DSnoT's masks are kept only if they lower the model's perplexity on held-out
  windows, else the pruner's model comes back bit for bit (docs/dsnot.md#held-out-acceptance).

Everything per cycle is a handful of [rows] tensor operations: all rows swap in parallel, with no
Python loop over rows, and the rankings are top-k over at most ``max_cycles`` candidates.
"""
from __future__ import annotations

import importlib
import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

import torch

from ..errors import ConfigError
from ..sparsity import NMPattern

log = logging.getLogger(__name__)

THRESHOLD_UNITS = ("initial", "output_rms", "per_token", "token_sum")
LAYER_SETS = ("all", "attention", "mlp")
OBJECTIVES = ("mse", "mean", "gram")
GUARDS = ("block", "none")
ACCEPTS = ("always", "heldout", "compare")
HELDOUT_SETS = ("c4", "wikitext2-valid")


@dataclass
class DSnoTConfig:
    """Options, with the paper's defaults where the paper has one.

    - ``max_cycles``: at most this many swaps per row (paper/code: 50).
    - ``threshold``: a row keeps swapping while |e_r| exceeds it (paper/code: 0.1); its unit is
      ``threshold_unit``:

      * ``"initial"`` (default): a fraction of the row's own initial error, |e_r| > threshold *
        |e_r^0|: 0.1 means "until pruning's expected error is cut to a tenth". Invariant to the scale
        of activations and weights and to seqlen.
      * ``"output_rms"``: a fraction of rms_r = sqrt(sum_j W_rj^2 E[x_j^2]), the root-mean-square
        output of the dense row under independent inputs. Also scale-free, but on SmolLM2 at 60 %
        the initial |e_r| is only ~3 % of rms_r (median), so 0.1 here stops almost every row at once.
      * ``"per_token"``: |e_r| in the output's own unit (E[x] per token).
      * ``"token_sum"``: the official unit, |e_r| * T with T tokens per calibration sample
        (``sum_metric_row`` is the token sum per sample). The official 0.1 at seqlen 2048 is
        0.1 / 2048 = 4.9e-5 per token: below almost every row's error, so in practice the
        official run stops on ``max_cycles``, an exhausted pool or the sign rule, not the threshold.
    - ``var_power``: p in Eq. (2) (``pow_of_var_regrowing``, 1); 0 ranks by |c_rj| alone.
    - ``var_floor``: Var(x_j) is floored at ``var_floor * mean_j Var(x_j)`` (plus 1e-20) so a dead or
      constant channel does not divide by zero (the official code has no floor: use 0 for it).
    - ``layers``: which sublayers to refine: ``"all"`` (default), ``"attention"`` (the official code's
      default, ``skip_layer=mlp``), or ``"mlp"``.
    - ``same_sign``: reject a swap that flips the sign of e_r relative to its initial sign. ``None``
      means the official per-mode behaviour (off for unstructured, on for N:M).
    - ``require_decrease``: reject a swap that does not lower ``objective`` (not in the official code).
    - ``objective`` watched by ``require_decrease``: ``"mse"`` (default), the row's expected squared
      error under independent input channels, e_r^2 + sum_{j in P_r} W_rj^2 Var(x_j) (Eq. 4), or
      ``"mean"``, |e_r| alone (Eq. 1). Lowering |e_r| by regrowing a low-score weight and pruning a
      higher-score one raises the variance term; on SmolLM2 that made perplexity worse, so the
      default only accepts a swap that lowers the total. ``"gram"``: the row's exact squared error
      on the calibration tokens, D_r G D_r^T with G = E[x x^T] (Eq. 5; no independence assumption;
      needs the inputs' second-moment matrix, SparseGPT's Hessian / 2, so the pass gathers it). A
      swap is then accepted only if the layer's calibration output error goes down.
    - ``guard`` (our addition, not in the paper or the official code; OFF by default): ``"block"``
      checks every block after DSnoT and keeps the pruner's masks for the whole block when DSnoT did
      not lower the block's output error against the dense block (same inputs, the first
      ``guard_samples`` calibration windows). ``"none"`` (default): the paper's behaviour. Measured
      at Wanda 50 % on SmolLM2-135M it reverted two blocks and made perplexity WORSE than unguarded
      DSnoT, so it is not the default (docs/dsnot.md#the-block-guard).
    - ``guard_samples``: how many calibration windows the block guard forwards (two extra block
      forwards over them per block, plus re-running the block where it reverts).
    - ``accept`` (our addition, not in the paper or the official code): ``"always"`` keeps DSnoT's
      masks (the paper); ``"heldout"`` keeps them only if they lower the whole model's loss on
      held-out windows (``heldout``, ``heldout_windows``), else every linear gets the pruner's weights
      back. To make that fallback exactly the pruner's model, the pass then feeds each block's
      *pruner* outputs to the next block (DSnoT's weights are written after the block's forward), so
      the pruner's masks, and DSnoT's statistics, come from the pruner's own trajectory. Why: at
      Wanda 50 % on SmolLM2-135M the fused DSnoT model was worse than plain Wanda, and reverting all
      of DSnoT's swaps did not bring the plain model back (docs/dsnot.md#why-dsnot-was-worse-at-50-percent).
      ``"compare"`` runs the pruner's own pass and then the paper's fused pass, both from the same
      dense weights (a second, plain pass: twice the pruning time, two copies of the linears'
      weights), and keeps whichever model has the lower held-out loss: never worse than the pruner
      on the held-out windows, with the paper's downstream effect kept (at 60/70 %/2:4 most of
      DSnoT's gain, docs/dsnot.md#compare-against-the-pruners-own-pass). Only in a pruning pass
      (``prune --refine dsnot``), not in standalone ``repair``.
    - ``heldout``: ``"c4"`` (fresh C4 windows, calibration seed + 1000, the calibration's own
      distribution) or ``"wikitext2-valid"``; never a test split. ``heldout_windows``: how many
      windows of the protocol's evaluation length.
    """

    max_cycles: int = 50
    threshold: float = 0.1
    threshold_unit: str = "initial"
    var_power: float = 1.0
    var_floor: float = 1e-6
    layers: str = "all"
    same_sign: Optional[bool] = True
    require_decrease: bool = True
    objective: str = "mse"
    guard: str = "none"
    guard_samples: int = 8
    accept: str = "always"
    heldout: str = "c4"
    heldout_windows: int = 16

    def validate(self) -> "DSnoTConfig":
        if not isinstance(self.max_cycles, int) or isinstance(self.max_cycles, bool) or self.max_cycles < 0:
            raise ConfigError(f"dsnot max_cycles must be an integer >= 0, got {self.max_cycles!r}")
        try:
            t = float(self.threshold)
        except (TypeError, ValueError):
            raise ConfigError(f"dsnot threshold must be a number >= 0 (or inf), got {self.threshold!r}") from None
        if not t >= 0:
            raise ConfigError(f"dsnot threshold must be >= 0 (or inf to disable swaps), got {self.threshold!r}")
        if self.threshold_unit not in THRESHOLD_UNITS:
            raise ConfigError(f"dsnot threshold_unit {self.threshold_unit!r} is unknown; choose one of "
                              f"{', '.join(THRESHOLD_UNITS)}")
        if not self.var_power >= 0 or not math.isfinite(float(self.var_power)):
            raise ConfigError(f"dsnot var_power must be a finite number >= 0, got {self.var_power!r}")
        if not self.var_floor >= 0:
            raise ConfigError(f"dsnot var_floor must be >= 0, got {self.var_floor!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"dsnot objective {self.objective!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
        if self.guard not in GUARDS:
            raise ConfigError(f"dsnot guard {self.guard!r} is unknown; choose one of {', '.join(GUARDS)}")
        if (not isinstance(self.guard_samples, int) or isinstance(self.guard_samples, bool)
                or self.guard_samples < 1):
            raise ConfigError(f"dsnot guard_samples must be an integer >= 1, got {self.guard_samples!r}")
        if self.accept not in ACCEPTS:
            raise ConfigError(f"dsnot accept {self.accept!r} is unknown; choose one of {', '.join(ACCEPTS)}")
        if self.heldout not in HELDOUT_SETS:
            raise ConfigError(f"dsnot heldout {self.heldout!r} is unknown; choose one of {', '.join(HELDOUT_SETS)} "
                              "(never a test set)")
        if (not isinstance(self.heldout_windows, int) or isinstance(self.heldout_windows, bool)
                or self.heldout_windows < 1):
            raise ConfigError(f"dsnot heldout_windows must be an integer >= 1, got {self.heldout_windows!r}")
        if self.accept != "always" and self.guard != "none":
            raise ConfigError(f"dsnot accept={self.accept} and guard=block cannot be combined: choose one check "
                              "(accept is the model-level one, docs/dsnot.md#held-out-acceptance)")
        if self.layers not in LAYER_SETS:
            raise ConfigError(f"dsnot layers {self.layers!r} is unknown; choose one of {', '.join(LAYER_SETS)}")
        return self

    @classmethod
    def official(cls, **overrides) -> "DSnoTConfig":
        """The released code's behaviour (zyxxmu/DSnoT @ 4c029df): token-sum threshold, no variance
        floor, attention only, same-sign off for unstructured / on for N:M, overshoot allowed, no
        block guard, no held-out acceptance."""
        base = cls(threshold_unit="token_sum", var_floor=0.0, layers="attention", same_sign=None,
                   require_decrease=False, objective="mean", guard="none", accept="always")
        return replace(base, **overrides).validate()

    def applies_to(self, short_name: str) -> bool:
        """Whether the block-relative linear name (e.g. ``mlp.down_proj``) is refined."""
        if self.layers == "all":
            return True
        is_mlp = short_name.split(".")[0] in ("mlp", "feed_forward", "ffn")
        return is_mlp if self.layers == "mlp" else not is_mlp

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DSnoTResult:
    """The refined keep-mask and what happened, per row."""

    keep: torch.Tensor  # [R, C] bool, True = kept
    swaps: torch.Tensor  # [R] accepted swaps per row
    error_before: torch.Tensor  # [R] e_r of Eq. (1), per-token unit
    error_after: torch.Tensor  # [R]
    threshold: torch.Tensor  # [R] the per-row threshold in the per-token unit
    cycles: int  # cycles run until every row stopped (<= max_cycles)
    trace: Optional[list[torch.Tensor]] = None  # e_r after each cycle (when asked for)

    def summary(self) -> dict[str, float]:
        b, a = self.error_before.abs(), self.error_after.abs()
        return {
            "rows": int(self.swaps.numel()),
            "rows_changed": int((self.swaps > 0).sum()),
            "swaps": int(self.swaps.sum()),
            "mean_abs_error_before": float(b.mean()),
            "mean_abs_error_after": float(a.mean()),
            "rows_above_threshold_before": int((b > self.threshold).sum()),
            "cycles": self.cycles,
        }


def row_thresholds(cfg: DSnoTConfig, weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor,
                   sq_mean: Optional[torch.Tensor], tokens_per_sample: float,
                   current: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The threshold of every row, converted into the per-token unit of e_r (Eq. 1).
    ``current`` are the pruned weights when they differ from dense * keep (SparseGPT)."""
    if current is None:
        initial_error = weight.float().masked_fill(keep.to(weight.device, torch.bool), 0.0) @ mean.float().reshape(-1)
    else:
        initial_error = (weight.float() - current.to(weight.device).float()) @ mean.float().reshape(-1)
    rows = weight.shape[0]
    t = float(cfg.threshold)
    if cfg.threshold_unit == "per_token" or math.isinf(t):
        return torch.full((rows,), t, dtype=torch.float32, device=weight.device)
    if cfg.threshold_unit == "token_sum":
        return torch.full((rows,), t / max(float(tokens_per_sample), 1.0), dtype=torch.float32, device=weight.device)
    if cfg.threshold_unit == "initial":
        return t * initial_error.abs().float()
    if sq_mean is None:
        raise ConfigError("dsnot threshold_unit='output_rms' needs the inputs' second moment (the 'norm' statistic)")
    rms = ((weight.float() ** 2) @ sq_mean.float().clamp_min(0)).sqrt()
    return t * rms


def _take(pool: torch.Tensor, ptr: torch.Tensor) -> torch.Tensor:
    return pool.gather(1, ptr.clamp_max(pool.shape[1] - 1).unsqueeze(1)).squeeze(1)


@torch.no_grad()
def dsnot_refine_mask(weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                      wanda_norm: torch.Tensor, cfg: Optional[DSnoTConfig] = None, *,
                      pattern: Optional[NMPattern] = None, threshold: Optional[torch.Tensor] = None,
                      current: Optional[torch.Tensor] = None, gram: Optional[torch.Tensor] = None,
                      trace: bool = False) -> DSnoTResult:
    """Refine ``keep`` (True = kept) of the dense ``weight`` [R, C] by DSnoT's prune-and-grow.

    ``mean`` = E[x_j] per token, ``var`` = Var(x_j), ``wanda_norm`` = ||X_j||_2 (any positive scale):
    all [C]. ``threshold`` is per row in the per-token unit (default: ``cfg.threshold`` taken as
    per-token). Pure: the inputs are not modified. Every accepted swap exchanges one kept and one
    pruned entry of the same row (same M-group for N:M), so per-row counts and N:M are exact.

    ``current`` are the pruned layer's actual weights (default ``weight * keep``). After SparseGPT
    they differ from the dense ones at kept positions, and the error is that of the actual layer:
    e_r = sum_j (W_rj - V_rj) E[x_j] over all j; pruning a kept weight removes its current value
    V_rk (its contribution V_rk E[x_k], its score |V_rk| ||X_k||), regrowing restores the dense W_ri.

    ``gram`` = G = E[x x^T] [C, C] (needed by ``objective="gram"``): the row's calibration error is
    then exactly E[eps_r^2] = D_r G D_r^T (Eq. 5, D = W - V), tracked through g_r = D_r G, so a swap
    that moves D by delta (delta_i = -W_ri at the grown i, +V_rk at the pruned k) changes it by
    2 delta.g_r + delta G delta^T, read off in O(1) per row; accepted rows update g_r in O(C).
    """
    cfg = (cfg or DSnoTConfig()).validate()
    w = weight.detach().float()
    rows, cols = w.shape
    dev = w.device
    keep = keep.detach().to(dev, torch.bool).clone()
    if keep.shape != w.shape:
        raise ConfigError(f"dsnot: mask shape {tuple(keep.shape)} differs from weight shape {tuple(w.shape)}")
    if pattern is not None:
        pattern.check_divides(cols)
    mean = mean.detach().to(dev).float().reshape(-1)
    var = var.detach().to(dev).float().reshape(-1).clamp_min(0)
    v = None if current is None else current.detach().to(dev).float()
    # the kept weights' current values decide their score and contribution (dense unless SparseGPT)
    wanda = (w if v is None else v).abs() * wanda_norm.detach().to(dev).float().reshape(1, -1)
    thr = (torch.full((rows,), float(cfg.threshold), device=dev) if threshold is None
           else threshold.to(dev).float().reshape(-1).expand(rows))

    contrib = w * mean.unsqueeze(0)  # c_rj (Eq. 2), per-token unit: what regrowing W_rj restores
    contrib_kept = contrib if v is None else v * mean.unsqueeze(0)  # what pruning V_rj removes
    err = w.masked_fill(keep, 0.0) @ mean if v is None else (w - v) @ mean  # e_r, Eq. (1)
    err0 = err.clone()
    sign0 = torch.sign(err0)
    swaps = torch.zeros(rows, dtype=torch.long, device=dev)
    traces: Optional[list[torch.Tensor]] = [err.clone()] if trace else None
    if cfg.max_cycles == 0 or math.isinf(float(cfg.threshold)) and threshold is None:
        return DSnoTResult(keep, swaps, err0, err, thr, 0, traces)

    use_gram = cfg.require_decrease and cfg.objective == "gram"
    if use_gram:
        if gram is None:
            raise ConfigError("dsnot objective='gram' needs the inputs' second-moment matrix (the 'hessian' statistic)")
        gmat = gram.detach().to(dev).float()
        gdiag = gmat.diagonal()
        gerr = (w.masked_fill(keep, 0.0) if v is None else w - v) @ gmat  # g_r = D_r G, [R, C]
    floor = cfg.var_floor * float(var.mean()) + 1e-20 if cfg.var_floor > 0 else 0.0
    varp = var.clamp_min(floor) ** cfg.var_power if cfg.var_power else torch.ones_like(var)
    # Eq. (2) over the pruned weights only (kept = 0). Positive entries form the pool used when
    # e_r > 0 (largest first), negative ones the pool used when e_r < 0 (most negative first); a
    # zero contribution is never a candidate. Counts bound each pool explicitly.
    growth = (contrib / varp.unsqueeze(0)).masked_fill(keep, 0.0)
    if floor == 0.0:
        growth = torch.nan_to_num(growth, nan=0.0)  # 0/0 on a dead channel without a floor
    k = max(1, min(cfg.max_cycles, cols))
    val, grow_pos = torch.topk(growth, k, dim=1, largest=True, sorted=True)
    n_grow_pos = (val > 0).sum(1)  # pool sizes, capped at k (a pointer never passes k)
    val, grow_neg = torch.topk(growth, k, dim=1, largest=False, sorted=True)
    n_grow_neg = (val < 0).sum(1)
    del growth
    if pattern is None:
        # pruning pools (Eq. 3): kept weights of the opposite sign, smallest Wanda score first
        inf = float("inf")
        val, prune_neg = torch.topk(torch.where(keep & (contrib_kept < 0), wanda, inf), k, dim=1, largest=False,
                                    sorted=True)
        n_prune_neg = (val < inf).sum(1)
        val, prune_pos = torch.topk(torch.where(keep & (contrib_kept > 0), wanda, inf), k, dim=1, largest=False,
                                    sorted=True)
        n_prune_pos = (val < inf).sum(1)
        ptr_prune_neg = torch.zeros(rows, dtype=torch.long, device=dev)
        ptr_prune_pos = torch.zeros_like(ptr_prune_neg)
    else:
        m, kept_n, groups = pattern.m, pattern.kept, cols // pattern.m
        # each M-group's initially kept weights in ascending Wanda order: the partners, used in turn
        # (a regrown weight is never a partner, so the smallest remaining is simply the next one)
        grouped = torch.where(keep, wanda, float("inf")).reshape(rows, groups, m)
        val, order = torch.topk(grouped, kept_n, dim=-1, largest=False, sorted=True)
        partners = (order + torch.arange(groups, device=dev).view(1, groups, 1) * m).reshape(rows, groups * kept_n)
        n_partners = torch.isfinite(val).sum(-1)  # [R, G]; < kept_n where a kept weight was already 0
        used = torch.zeros(rows, groups, dtype=torch.long, device=dev)
        del grouped, order, val
    same_sign = cfg.same_sign if cfg.same_sign is not None else pattern is not None
    ptr_grow_pos = torch.zeros(rows, dtype=torch.long, device=dev)
    ptr_grow_neg = torch.zeros_like(ptr_grow_pos)
    active = torch.ones(rows, dtype=torch.bool, device=dev)
    row_idx = torch.arange(rows, device=dev)
    cycles = 0
    for _ in range(cfg.max_cycles):
        if not bool(active.any()):
            break
        cycles += 1
        pos = err > 0  # e_r > 0: grow a positive contribution, prune a negative one
        g_ptr = torch.where(pos, ptr_grow_pos, ptr_grow_neg)
        g_ok = g_ptr < torch.where(pos, n_grow_pos, n_grow_neg)
        g_idx = torch.where(pos, _take(grow_pos, ptr_grow_pos), _take(grow_neg, ptr_grow_neg))
        if pattern is None:
            p_ptr = torch.where(pos, ptr_prune_neg, ptr_prune_pos)
            p_ok = p_ptr < torch.where(pos, n_prune_neg, n_prune_pos)
            p_idx = torch.where(pos, _take(prune_neg, ptr_prune_neg), _take(prune_pos, ptr_prune_pos))
            skip = torch.zeros_like(active)
        else:
            grp = torch.div(g_idx, m, rounding_mode="floor")
            u = used[row_idx, grp]
            p_ok = u < n_partners[row_idx, grp]
            p_idx = partners[row_idx, grp * kept_n + u.clamp_max(kept_n - 1)]
            skip = ~p_ok
        c_grow = contrib[row_idx, g_idx]
        c_prune = contrib_kept[row_idx, p_idx]
        after = err - c_grow + c_prune
        base = active & (err.abs() > thr) & (err != 0) & g_ok
        ok = base & p_ok
        if same_sign:
            ok &= torch.sign(after) == sign0
        if cfg.require_decrease:
            if cfg.objective == "mse":  # Eq. (4): e^2 + sum_P W^2 Var, before vs after the swap
                w_p, w_g = w[row_idx, p_idx], w[row_idx, g_idx]
                # variance change of the error: D_k goes from W_k - V_k to W_k, D_i from W_i to 0
                if v is None:
                    d_p = w_p * w_p
                else:
                    v_p = v[row_idx, p_idx]
                    d_p = w_p * w_p - (w_p - v_p) * (w_p - v_p)
                d_var = d_p * var[p_idx] - w_g * w_g * var[g_idx]
                ok &= after * after - err * err + d_var < 0
            elif use_gram:  # Eq. (5): exact change of D_r G D_r^T
                d_g = -w[row_idx, g_idx]  # the grown weight leaves the error
                d_p = (w if v is None else v)[row_idx, p_idx]  # the pruned one's current value enters it
                change = (2 * (d_g * gerr[row_idx, g_idx] + d_p * gerr[row_idx, p_idx])
                          + d_g * d_g * gdiag[g_idx] + d_p * d_p * gdiag[p_idx] + 2 * d_g * d_p * gmat[g_idx, p_idx])
                ok &= change < 0
            else:
                ok &= after.abs() < err.abs()
        skip = base & skip  # N:M only: no partner in this M-group; try the next candidate
        active = ok | skip
        # apply the accepted swaps (one in, one out per row)
        r = row_idx[ok]
        if use_gram and bool(ok.any()):
            gerr[r] += d_g[ok].unsqueeze(1) * gmat[g_idx[ok]] + d_p[ok].unsqueeze(1) * gmat[p_idx[ok]]
        keep[r, g_idx[ok]] = True
        keep[r, p_idx[ok]] = False
        err = torch.where(ok, after, err)
        swaps += ok.long()
        moved = ok | skip
        ptr_grow_pos += (moved & pos).long()
        ptr_grow_neg += (moved & ~pos).long()
        if pattern is None:
            ptr_prune_neg += (ok & pos).long()
            ptr_prune_pos += (ok & ~pos).long()
        else:
            used[r, grp[ok]] += 1
        if traces is not None:
            traces.append(err.clone())
    return DSnoTResult(keep, swaps, err0, err, thr, cycles, traces)


@dataclass
class InputMoments:
    """Per-channel input moments in per-token units, from the driver's :class:`InputStatistics`."""

    mean: torch.Tensor  # E[x_j]
    var: torch.Tensor  # per-sample Var(x_j), averaged over samples (the official statistic)
    sq_mean: torch.Tensor  # E[x_j^2]
    norm: torch.Tensor  # Wanda's ||X_j||_2 (sqrt of scaler_row)
    tokens_per_sample: float
    gram: Optional[torch.Tensor] = None  # E[x x^T] (SparseGPT's H / 2), only for objective="gram"

    @classmethod
    def from_stats(cls, stats) -> "InputMoments":
        missing = [n for n, v in (("mean", stats.token_sum), ("var", stats.var), ("norm", stats.sq_sum)) if v is None]
        if missing:
            raise ConfigError(f"dsnot needs the input statistics {sorted(DSNOT_NEEDS)}; gathered without {missing}")
        tps = stats.ntokens / max(1, stats.nsamples)  # token_sum and sq_sum are per-sample token sums
        gram = None if stats.hessian is None else stats.hessian / 2
        return cls(stats.token_sum / tps, stats.var, stats.sq_sum / tps, stats.sq_sum.sqrt(), tps, gram)


DSNOT_NEEDS = frozenset({"norm", "mean", "var"})


def dsnot_needs(cfg: "DSnoTConfig") -> frozenset:
    """The input statistics DSnoT gathers: the moments, plus the Gram matrix for objective='gram'."""
    return DSNOT_NEEDS | ({"hessian"} if cfg.require_decrease and cfg.objective == "gram" else set())


@torch.no_grad()
def refine_linear(dense_weight: torch.Tensor, pruned_weight: torch.Tensor, moments: InputMoments,
                  cfg: Optional[DSnoTConfig] = None, pattern: Optional[NMPattern] = None,
                  keep: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, DSnoTResult]:
    """DSnoT on one linear: returns the new weight (zeros where pruned) and the per-row record.

    ``keep`` defaults to ``pruned_weight != 0``. Kept weights keep their values in ``pruned_weight``
    (SparseGPT's reconstructed ones included); regrown weights take their dense values.
    """
    cfg = (cfg or DSnoTConfig()).validate()
    if dense_weight.shape != pruned_weight.shape:
        raise ConfigError(f"dsnot: dense weight {tuple(dense_weight.shape)} and pruned weight "
                          f"{tuple(pruned_weight.shape)} differ; the dense source is not this model's")
    if keep is None:
        keep = pruned_weight != 0
    dense = dense_weight.detach().to(pruned_weight.device)
    exact = bool(torch.equal(pruned_weight.detach(), dense.to(pruned_weight.dtype) * keep.to(pruned_weight.device)))
    current = None if exact else pruned_weight  # kept weights were updated (SparseGPT)
    thr = row_thresholds(cfg, dense, keep, moments.mean.to(dense.device), moments.sq_mean.to(dense.device),
                         moments.tokens_per_sample, current)
    res = dsnot_refine_mask(dense, keep, moments.mean, moments.var, moments.norm, cfg, pattern=pattern, threshold=thr,
                            current=current, gram=moments.gram)
    # only the swapped positions change: pruned ones become 0, regrown ones take their dense value
    idx = (res.keep != keep.to(res.keep.device)).nonzero(as_tuple=True)
    new = pruned_weight.detach().clone()
    new[idx] = torch.where(res.keep[idx], dense[idx].to(new.dtype), torch.zeros((), dtype=new.dtype, device=new.device))
    return new, res


# -- the method over a whole model lives in dsnot_passes (options glue, fused refiner, standalone
# repair); its names stay importable from here, and importing this module registers the refiner.
_PASSES_NAMES = frozenset({"make_config", "LayerRecord", "DSnoTRefiner", "RepairReport", "repair_dsnot_checkpoint",
                           "SparseRuntimeInvariantError", "REFINERS"})


def __getattr__(name: str) -> Any:
    if name in _PASSES_NAMES:
        return getattr(_passes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Imported last and through importlib: dsnot_passes imports names from this module, which exist by now.
_passes = importlib.import_module(f"{__package__}.dsnot_passes")
