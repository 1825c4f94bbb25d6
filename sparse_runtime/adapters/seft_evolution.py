"""SEFT's topology evolution (docs/methods.md#seft-evolution), as a :class:`~.base.TrainingCallback`.

Schedule. Evolution steps happen after optimiser steps s = t·k (t >= 1, s < T, k = ``update_every``).
The growth-selection window is the last a = ``accumulation_steps`` optimiser steps before each
(s-a+1 .. s): while it is open every SEFT layer forms its dense gradient once per backward (one
layer at a time) and keeps

- a candidate pool: the top-K positions by |grad| in the window's first backward, among positions
  not already in I (and, without resurrection, only kept ones); afterwards the per-step gradient is
  accumulated at the pool (sum and sum of squares: SpIEL's ``reallocation_hook``);
- the accumulated gradient at every kept position (one fp32 number per kept weight) for the
  sensitivity re-pruning.

Evolution step, per layer (p = p0 · schedule(s / T)):

1. **Drop** the n = floor(p·K) slots with the smallest |d|. At a weight that exists in the base
   (W != 0) the value is *discarded* (SpIEL's rule: the weight falls back to W). At a resurrected
   position (W = 0) discarding would leave a kept weight equal to zero (a wasted slot of the sparsity
   budget, and a "nonzero" that is zero), so its value is *folded* into a small per-layer store
   (``fold_index``/``fold_value``): the weight lives on with its learnt value and competes in later
   re-prunings like any other. The base W is never modified.
2. **Grow** n new indices: the pool candidates with the largest |accumulated gradient|. With
   ``resurrection`` they may be pruned positions: M_t is set there (the weight is resurrected with
   W = 0 + d, d = 0). Under a row / N:M-group scope a group only accepts as many resurrections as it
   has unprotected kept weights, so step 3 can always restore its count.
3. **Re-prune** by sensitivity s_i = |θ_i · ḡ_i| (θ = W, ḡ = the window's accumulated gradient;
   first-order Taylor saliency, App. E.2) among kept positions not in I (deltas are protected: a
   re-pruned delta slot would be dead weight), until each scope's count is back where it was before
   growth: per ``layer`` (default; keeps any OWL/ATP per-layer allocation the manifest records), per
   output ``row``, or ``global`` (one model-wide count; refused on N:M models). N:M layers keep their
   pattern exactly: ``nm_mode="active"`` grows only at kept weights (no mask change, the paper's
   N:M rule), ``"group"`` resurrects and re-prunes per M-group.
4. **Optimiser state** of the replaced slots: ``"seed"`` (default, SpIEL): exp_avg = mean window
   gradient, exp_avg_sq = mean squared window gradient, so the first updates of a new slot are no
   larger than lr; ``"zero"``: plain reset (with Adam's step count already large, a zeroed state
   makes the first update ≈ (1-β1)/√(1-β2) ≈ 3.2 lr).

``init="random"`` (SpIEL) starts from random kept positions and makes the first evolution a full
reselection (p = 1); ``init="gradient"`` (default) does that full selection at step 0 from the
gradient accumulated over ``init_samples`` training examples, so no k steps are spent training
deltas that are then all dropped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import ConfigError
from .base import FINETUNE_METHODS, FinetuneMethod, TrainingCallback
from .seft import SEFTAdapter, SEFTConfig

log = logging.getLogger(__name__)


@dataclass
class LayerChange:
    regrown: int = 0
    resurrected: int = 0
    repruned: int = 0
    resurrected_idx: Optional[torch.Tensor] = None
    mask_before: Optional[torch.Tensor] = None


def _within_group_rank(groups: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Rank (0 = best) of each item by descending ``score`` inside its group."""
    if groups.numel() == 0:
        return groups.clone()
    o1 = torch.argsort(score, descending=True, stable=True)
    o2 = o1[torch.argsort(groups[o1], stable=True)]
    g_sorted = groups[o2]
    _, counts = torch.unique_consecutive(g_sorted, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(g_sorted.numel(), device=groups.device) - torch.repeat_interleave(starts, counts)
    rank = torch.empty_like(rank_sorted)
    rank[o2] = rank_sorted
    return rank


def group_size(ad: SEFTAdapter) -> Optional[int]:
    """Flat positions per re-pruning group: an M-group (N:M 'group' mode), a row, the layer; None =
    global (no per-layer limit)."""
    if ad.pattern is not None:
        return ad.pattern.m
    scope = ad.cfg.scope
    if scope == "row":
        return ad.in_features
    if scope == "layer":
        return ad.mask.numel()
    return None


@torch.no_grad()
def grow(ad: SEFTAdapter, p: float, optimizer=None) -> LayerChange:
    """Steps 1, 2 and 4 for one layer; the mask gains the resurrected positions."""
    ch = LayerChange()
    K = ad.slots
    n_drop = min(K, int(p * K))
    pool = ad.seft_pool
    if n_drop == 0 or pool.numel() == 0:
        return ch
    in_i = ad.in_index()
    mask = ad.mask.reshape(-1)
    valid = ~in_i[pool]
    if not ad.grows_at_pruned:
        valid &= mask[pool]
    cand, csum, csq = pool[valid], ad.seft_pool_sum[valid], ad.seft_pool_sq[valid]
    score = csum.abs()
    at_pruned = ~mask[cand]
    gs = group_size(ad)
    if gs is not None and bool(at_pruned.any()):
        # after growth, each group must still hold one unprotected kept weight per resurrection; a
        # growth at a kept weight protects one more. So a group accepts at most as many growths
        # (of either kind) as it has unprotected kept weights now (conservative: drops free more).
        free = (mask & ~in_i).reshape(-1, gs).sum(1)
        gid = torch.div(cand, gs, rounding_mode="floor")
        allowed = _within_group_rank(gid, score) < free[gid]
        cand, csum, csq, score = cand[allowed], csum[allowed], csq[allowed], score[allowed]
    n = min(n_drop, cand.numel())
    if n == 0:
        return ch
    top = torch.topk(score, n, sorted=True).indices
    new, nsum, nsq = cand[top], csum[top], csq[top]
    slots = torch.topk(ad.delta.detach().abs(), n, largest=False, sorted=True).indices
    old_pos, old_val = ad.delta_index[slots].clone(), ad.delta.detach()[slots].clone()
    resurrected_old = (ad.base.weight.detach().reshape(-1)[old_pos] == 0) & mask[old_pos]
    ad.fold(old_pos[resurrected_old], old_val[resurrected_old])
    ad.delta_index[slots] = new
    ad.delta.data[slots] = 0.0
    ch.mask_before = ad.mask.clone()
    res = new[~mask[new]]
    mask[res] = True
    ch.regrown, ch.resurrected, ch.resurrected_idx = n, int(res.numel()), res
    if optimizer is not None:
        _reset_optimizer_state(optimizer, ad, slots, nsum, nsq)
    return ch


def _reset_optimizer_state(optimizer, ad: SEFTAdapter, slots: torch.Tensor, gsum: torch.Tensor,
                           gsq: torch.Tensor) -> None:
    st = optimizer.state.get(ad.delta)
    if not st:
        return
    nsteps = max(1, int(ad.seft_window_steps))
    seed = ad.cfg.optimizer_reset == "seed"
    for key, val in (("exp_avg", gsum / nsteps), ("exp_avg_sq", gsq / nsteps)):
        if key in st:
            st[key][slots] = val.to(st[key].dtype) if seed else 0.0


@torch.no_grad()
def reprune_scores(ad: SEFTAdapter, ch: LayerChange) -> torch.Tensor:
    """Flat sensitivity |W · ḡ| at kept, unprotected positions; +inf elsewhere."""
    before = ch.mask_before.reshape(-1) if ch.mask_before is not None else ad.mask.reshape(-1)
    W = ad.theta()
    score = torch.full_like(W, float("inf"))
    if ad.seft_sens.numel() == int(before.sum()):
        score[before] = (W[before] * ad.seft_sens).abs()
    else:  # no window gradient (cannot happen in a normal run): fall back to magnitude
        log.warning("%s: no window gradient for the sensitivity; re-pruning by magnitude", ad.layer_name)
        score[before] = W[before].abs()
    score[ad.delta_index] = float("inf")
    score[~ad.mask.reshape(-1)] = float("inf")
    return score


@torch.no_grad()
def prune_positions(ad: SEFTAdapter, flat: torch.Tensor) -> None:
    ad.mask.reshape(-1)[flat] = False
    ad.unfold(flat)


@torch.no_grad()
def reprune_local(ad: SEFTAdapter, ch: LayerChange) -> None:
    """Step 3 for the layer, row and M-group scopes: remove, in each group, as many kept weights as
    it gained by resurrection, lowest sensitivity first."""
    if not ch.resurrected:
        return
    gs = group_size(ad)
    score = reprune_scores(ad, ch)
    if gs == score.numel():
        flat = torch.topk(score, ch.resurrected, largest=False).indices
    else:
        excess = torch.bincount(torch.div(ch.resurrected_idx, gs, rounding_mode="floor"),
                                minlength=score.numel() // gs)
        kmax = int(excess.max())
        s2 = score.reshape(-1, gs)
        vals, cols = torch.topk(s2, kmax, dim=1, largest=False)
        take = torch.arange(kmax, device=s2.device).unsqueeze(0) < excess.unsqueeze(1)
        rows = torch.arange(s2.shape[0], device=s2.device).unsqueeze(1).expand_as(cols)
        flat = (rows * gs + cols)[take]
        vals = vals[take]
        if not bool(torch.isfinite(vals).all()):
            raise RuntimeError(f"{ad.layer_name}: a re-pruning group has no unprotected weight left (bug)")
    if not bool(torch.isfinite(score[flat]).all()):
        raise RuntimeError(f"{ad.layer_name}: re-pruning reached a protected position (bug)")
    prune_positions(ad, flat)
    ch.repruned = int(flat.numel())


@torch.no_grad()
def reprune_global(adapters: dict[str, SEFTAdapter], changes: dict[str, LayerChange]) -> None:
    """Step 3, global scope: the model-wide count is restored by pruning the lowest sensitivities
    over all layers (each layer offers its E smallest, E = total resurrections)."""
    E = sum(c.resurrected for c in changes.values())
    if E == 0:
        return
    offers = []
    for li, (name, ad) in enumerate(adapters.items()):
        score = reprune_scores(ad, changes[name])
        k = min(E, score.numel())
        v, i = torch.topk(score, k, largest=False)
        offers.append((v, torch.full_like(i, li), i))
    v = torch.cat([o[0] for o in offers])
    lid = torch.cat([o[1] for o in offers])
    idx = torch.cat([o[2] for o in offers])
    pick = torch.topk(v, E, largest=False).indices
    if not bool(torch.isfinite(v[pick]).all()):
        raise RuntimeError("global re-pruning ran out of unprotected weights (bug)")
    names = list(adapters)
    for li in torch.unique(lid[pick]).tolist():
        sel = pick[lid[pick] == li]
        prune_positions(adapters[names[li]], idx[sel])
        changes[names[li]].repruned = int(sel.numel())


@dataclass
class SEFTEvolution(TrainingCallback):
    """Opens the growth windows and runs the evolution step (see the module docstring)."""

    cfg: SEFTConfig = field(default_factory=SEFTConfig)
    history: list = field(default_factory=list)
    capture_open: bool = False
    _trainer: Any = field(default=None, repr=False, compare=False)

    def _seft(self, trainer) -> dict[str, SEFTAdapter]:
        return {n: a for n, a in trainer.adapters.items() if isinstance(a, SEFTAdapter)}

    def evolution_steps(self, total: int) -> list[int]:
        k = self.cfg.update_every
        return list(range(k, total, k)) if self.cfg.evolve else []

    def _open(self, trainer) -> None:
        for ad in self._seft(trainer).values():
            ad.start_capture("window")
        self.capture_open = True

    def on_train_begin(self, trainer, resumed: bool) -> None:
        self._trainer = trainer
        ads = self._seft(trainer)
        if not ads:
            return
        if trainer.dist.enabled and (self.cfg.evolve or self.cfg.init == "gradient"):
            raise ConfigError("SEFT's growth selection runs in one process for now: under torchrun use "
                              "evolve false and init random (a fixed-topology sparse-delta fine-tune), or one process")
        if resumed:
            return
        if self.cfg.init == "gradient":
            for ad in ads.values():
                ad.start_capture("init")
            trainer.accumulate_dense_gradients(self.cfg.init_samples)
            for ad in ads.values():
                ad.delta.grad = None
                ad.select_initial()
            log.info("SEFT: gradient-selected initial index sets on %d layers", len(ads))
        a, k = self.cfg.accumulation_steps, self.cfg.update_every
        if self.cfg.evolve and a == k and k < trainer.total_steps:
            self._open(trainer)

    def on_step_end(self, trainer, step: int) -> None:
        ads = self._seft(trainer)
        if not ads or not self.cfg.evolve:
            return
        if self.capture_open:
            for ad in ads.values():
                ad.end_window_step()
        if self.capture_open and step % self.cfg.update_every == 0:
            self.evolve(trainer, ads, step)
        nxt = step + self.cfg.accumulation_steps
        if nxt % self.cfg.update_every == 0 and nxt < trainer.total_steps and not self.capture_open:
            self._open(trainer)

    def drop_fraction(self, step: int, total: int) -> float:
        first = self.cfg.init == "random" and step == self.cfg.update_every
        return 1.0 if first else self.cfg.drop_fraction(step, total)

    @torch.no_grad()
    def evolve(self, trainer, ads: dict[str, SEFTAdapter], step: int) -> dict[str, Any]:
        p = self.drop_fraction(step, trainer.total_steps)
        opt = getattr(trainer, "optimizer", None)
        changes = {n: grow(ad, p, opt) for n, ad in ads.items()}
        if self.cfg.scope == "global":
            reprune_global(ads, changes)
        else:
            for n, ad in ads.items():
                reprune_local(ad, changes[n])
        for ad in ads.values():
            ad.clear_window()
        self.capture_open = False
        rec = {"step": step, "p": p, "regrown": sum(c.regrown for c in changes.values()),
               "resurrected": sum(c.resurrected for c in changes.values()),
               "repruned": sum(c.repruned for c in changes.values()),
               "slots": sum(ad.slots for ad in ads.values())}
        self.history.append(rec)
        log.info("SEFT evolution at step %d: p=%.3f, regrown %d, resurrected %d, re-pruned %d", step, p,
                 rec["regrown"], rec["resurrected"], rec["repruned"])
        return rec

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "capture_open": self.capture_open}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called on resume after the adapters' buffers (I, d, M_t and any half-filled window
        accumulators) were restored: reopen the window when the checkpoint was taken inside one."""
        self.history = list(state.get("history", []))
        self.capture_open = False
        if state.get("capture_open") and self._trainer is not None:
            self._open(self._trainer)


FINETUNE_METHODS.register("seft")(FinetuneMethod(
    "seft", SEFTAdapter, SEFTConfig,
    # the paper's lr and schedule are unknown (docs/methods.md#seft-evolution); SpIEL's sparse fine-tuning uses a
    # larger lr than dense FT; 2e-4 linear with 3 % warmup matches the package's LoRA baselines so
    # equal-budget comparisons differ only in the method.
    train_defaults=dict(lr=2e-4, schedule="linear", warmup_ratio=0.03, weight_decay=0.0),
    callbacks=lambda cfg: [SEFTEvolution(cfg)],
    description="SEFT: sparse deltas with evolving topology (drop/grow, sensitivity re-pruning)"))
