"""The sequential, block-by-block calibration driver shared by every one-shot method.

Wanda's ``prune_wanda`` / SparseGPT's ``llama_sequential`` (docs/methods.md#the-sequential-driver), written once:

1. embed the calibration samples and catch the inputs of block 0 (hidden states plus the keyword
   arguments the model passes its blocks: masks, position ids, rotary embeddings);
2. for each block: hook its linears and run the samples through the *still dense* block to gather
   input statistics; hand each linear and its statistics to ``on_layer`` (which prunes it);
   re-run the samples through the pruned block; its outputs become the next block's inputs.

Only the current block has to sit on the compute device: with ``offload=True`` every other block
stays where it was loaded (CPU RAM, or accelerate-managed offload), so memory is bounded by one
block plus the activations. ``true_sequential`` re-runs the block between the family's groups
(q,k,v -> o -> gate,up -> down) so later groups see inputs produced by already pruned earlier ones.

Timing is recorded per phase (block forwards vs statistics/mask work) so a benchmark can show that
the mask computation is not the bottleneck.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .faults import fault_point
from .progress import progress


class _StopForward(Exception):
    pass


@dataclass
class InputStatistics:
    """Running statistics of one linear's inputs over the calibration tokens.

    - ``sq_sum``: (1/N) sum_n sum_t x_{n,t,j}^2 (Wanda's ``scaler_row``; N = number of samples);
    - ``token_sum``: (1/N) sum_n sum_t x_{n,t,j} (DSnoT's ``sum_metric_row``: seqlen * E[x_j]);
    - ``var``: per-sample population variance over tokens, averaged over samples (DSnoT's variance,
      docs/methods.md#dsnot-statistics: not pooled);
    - ``hessian``: H = (2/N_tok) sum x x^T in fp32 (SparseGPT).
    """

    in_features: int
    needs: frozenset
    nsamples: int = 0
    ntokens: int = 0
    sq_sum: Optional[torch.Tensor] = None
    token_sum: Optional[torch.Tensor] = None
    var: Optional[torch.Tensor] = None
    hessian: Optional[torch.Tensor] = None

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.dim() == 2:
            x = x.unsqueeze(0)
        b, t, _ = x.shape
        n_old, n_new = self.nsamples, self.nsamples + b
        if "norm" in self.needs:
            s = (x * x).sum(dim=(0, 1))
            self.sq_sum = s / n_new if self.sq_sum is None else self.sq_sum * (n_old / n_new) + s / n_new
        if "mean" in self.needs:
            s = x.sum(dim=(0, 1))
            self.token_sum = s / n_new if self.token_sum is None else self.token_sum * (n_old / n_new) + s / n_new
        if "var" in self.needs:
            # per-sample population variance over tokens, averaged over samples (equal token counts)
            v = x.var(dim=1, unbiased=False).sum(0)
            self.var = v / n_new if self.var is None else self.var * (n_old / n_new) + v / n_new
        if "hessian" in self.needs:
            flat = x.reshape(-1, x.shape[-1])
            tok_old, tok_new = self.ntokens, self.ntokens + flat.shape[0]
            if self.hessian is None:
                self.hessian = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
            # H <- H * n_old/n_new + (2/n_new) X^T X in one BLAS call (no scaled copy of X)
            self.hessian.addmm_(flat.t(), flat, beta=tok_old / tok_new, alpha=2.0 / tok_new)
        self.nsamples = n_new
        self.ntokens += b * t

    @property
    def norm(self) -> torch.Tensor:
        """sqrt(scaler_row): the Wanda activation norm per input channel."""
        assert self.sq_sum is not None, "statistics were gathered without 'norm'"
        return self.sq_sum.sqrt()


@dataclass
class LayerTask:
    """What the driver hands to ``on_layer`` for each linear."""

    block_index: int
    name: str  # full module name, e.g. model.layers.3.mlp.down_proj
    short: str  # block-relative name, e.g. mlp.down_proj
    linear: nn.Linear
    stats: InputStatistics


@dataclass
class DriverTiming:
    forward_s: float = 0.0  # block forwards (statistics passes and re-runs)
    layer_s: float = 0.0  # on_layer callbacks (mask computation, weight updates)
    embed_s: float = 0.0
    total_s: float = 0.0
    blocks: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]  # one tensor per mini-batch [b, seqlen, d]
    kwargs: dict[str, Any]


def _chunk_size(n: int, want: int) -> int:
    want = max(1, min(want, n))
    while n % want:
        want -= 1
    return want


@torch.no_grad()
def capture_block_inputs(model, family, ids: torch.Tensor, batch_size: int = 8,
                         device: Optional[torch.device] = None) -> BlockInputs:
    """Run the model until block 0 and return its inputs (per mini-batch) and keyword arguments."""
    blocks = family.blocks(model)
    b = _chunk_size(ids.shape[0], batch_size)
    caught: list[torch.Tensor] = []
    kwargs_holder: dict[str, Any] = {}

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append(hidden.detach())
        if not kwargs_holder:
            kwargs_holder.update({k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")})
        raise _StopForward

    h = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    dev = device or next(model.parameters()).device
    try:
        for i in range(0, ids.shape[0], b):
            try:
                model(ids[i:i + b].to(dev), use_cache=False)
            except _StopForward:
                pass
    finally:
        h.remove()
    kwargs_holder["use_cache"] = False
    return BlockInputs(caught, kwargs_holder)


def _input_leaders(family, chosen: dict[str, nn.Linear]) -> dict[str, str]:
    """Map each chosen linear to the first chosen member of its shared-input group (or itself).

    Consumers must treat statistics as read-only (SparseGPT clones its Hessian before dampening).
    """
    leader = {n: n for n in chosen}
    for group in getattr(family, "shared_input_groups", ()):
        members = [n for n in group if n in chosen]
        for n in members[1:]:
            leader[n] = members[0]
    return leader


def _block_forward(block, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    return obj


@torch.no_grad()
def sequential_pass(
    model,
    family,
    calib_ids: torch.Tensor,
    on_layer: Optional[Callable[[LayerTask], None]] = None,
    *,
    needs: Iterable[str] = ("norm",),
    layer_filter: Optional[Callable[[str], bool]] = None,
    true_sequential: bool = False,
    device: Optional[torch.device | str] = None,
    offload: bool = False,
    batch_size: int = 8,
    on_block_start: Optional[Callable[[int, nn.Module], None]] = None,
    on_block_end: Optional[Callable[[int, nn.Module, BlockInputs, list[torch.Tensor]], None]] = None,
    desc: str = "blocks",
    streamer: Optional[Any] = None,
) -> DriverTiming:
    """Walk the blocks in order; see the module docstring. ``layer_filter(full_name)`` picks the
    linears to hand to ``on_layer`` (default: all of the family's block linears).

    ``on_block_start(i, block)`` runs after the block reached the device and before its statistics
    pass (e.g. to restore dense weights for a repair that needs them).
    ``on_block_end(i, block, inputs, outputs)`` sees the block's inputs and its (pruned) outputs,
    e.g. for reconstruction errors. Returns phase timings.

    ``streamer`` (a :class:`sparse_runtime.models.streaming.BlockStreamer`, streaming mode): the
    model's blocks live on ``meta``; ``streamer.load(i, block)`` reads block i from the files before
    its turn and ``streamer.done(i, block)`` hands it on (written out) and releases it after, so
    one block is in memory at a time. The embedding is the streamer's to load and is released once
    the inputs are caught.
    """
    timing = DriverTiming()
    t_all = time.perf_counter()
    needs = frozenset(needs)
    if streamer is not None:
        streamer.streamed.load_embed()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    blocks = family.blocks(model)
    t0 = time.perf_counter()
    embed = family.embed(model)
    embed_home = next(embed.parameters()).device
    if offload or embed_home != dev:
        # Only the embedding (the rotary tables follow their input) goes to the device; blocks follow
        # one at a time. Without offload it goes back home after the capture, like the blocks.
        embed.to(dev)
    inputs = capture_block_inputs(model, family, calib_ids, batch_size, dev)
    if not offload and embed_home != dev:
        embed.to(embed_home)
    if streamer is not None:
        streamer.streamed.release_embed()
    timing.embed_s = time.perf_counter() - t0
    kwargs = {k: _move(v, dev) for k, v in inputs.kwargs.items()}
    hidden = [h.to(dev) for h in inputs.hidden]
    groups_all = family.sequential_groups if true_sequential else (tuple(family.linear_names),)
    for bi in progress(range(len(blocks)), desc=desc):
        block = blocks[bi]
        if streamer is not None:
            streamer.load(bi, block)
        home = next(block.parameters()).device
        if offload or home != dev:
            block.to(dev)
        if on_block_start is not None:
            on_block_start(bi, block)
        linears = family.block_linears(block)
        prefix = f"{family.blocks_path}.{bi}."
        for group in groups_all:
            chosen = {n: linears[n] for n in group if layer_filter is None or layer_filter(prefix + n)}
            if not chosen or on_layer is None:
                continue
            # One statistics object per distinct input: q/k/v (and gate/up) read the same tensor, so
            # their Hessians/norms are identical; gathering them once saves most of the stats cost.
            leader = _input_leaders(family, chosen)
            stats: dict[str, InputStatistics] = {}
            for n, lin in chosen.items():
                stats[n] = stats[leader[n]] if leader[n] in stats else InputStatistics(lin.in_features, needs)
            hooks = [lin.register_forward_hook(lambda m, a, o, s=stats[n]: s.add_batch(a[0]))
                     for n, lin in chosen.items() if leader[n] == n]
            t0 = time.perf_counter()
            try:
                for h in hidden:
                    _block_forward(block, h, kwargs)
            finally:
                for hk in hooks:
                    hk.remove()
            timing.forward_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            for n, lin in chosen.items():
                on_layer(LayerTask(bi, prefix + n, n, lin, stats[n]))
            del stats
            timing.layer_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = [_block_forward(block, h, kwargs) for h in hidden]
        timing.forward_s += time.perf_counter() - t0
        fault_point("calibration")  # test hook (sparse_runtime/faults.py); nothing when unset
        if on_block_end is not None:
            on_block_end(bi, block, BlockInputs(hidden, kwargs), outs)
        if offload or home != dev:
            block.to(home)
        if streamer is not None:
            streamer.done(bi, block)
        hidden = outs
        timing.blocks += 1
    if was_cache is not None:
        model.config.use_cache = was_cache
    timing.total_s = time.perf_counter() - t_all
    return timing
