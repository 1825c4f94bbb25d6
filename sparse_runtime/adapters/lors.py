"""LoRS: low-rank adaptation for sparse LLMs with weight recompute and a rearranged graph
(arXiv 2501.08582; official code ``hyx1999/LoRS``; docs/methods.md#lors).

Forward (the same function as masked LoRA)::

    W̃ = (W + s · B A) ⊙ M,   M = 1[W != 0],   y = x W̃^T + b

through a custom autograd function that saves only (x, W, A, B) (and the mask only when it is a
stored buffer): W̃ and M are recomputed in backward ("weight recompute"), so no out x in tensor per
layer lives between forward and backward. Adapter gradients (package naming: A is r x in, B is
out x r; LoRS's own naming swaps them, docs/methods.md#lors-parameterisation):

- ``grad_mode="exact"`` (default): the true gradient of the masked product,
  dL/dB = s · [(g^T x) ⊙ M] A^T and dL/dA = s · B^T [(g^T x) ⊙ M]. The masked product g^T x ⊙ M
  cannot be factored, so it is formed in row chunks of ``grad_chunk`` output rows, used and freed
  at once: transient memory is chunk x in, nothing is kept.
- ``grad_mode="straight-through"``: the unmasked LoRA gradient, in the rearranged order that never
  forms an out x in matrix: dL/dB = s · g^T (x A^T), dL/dA = s · (g B)^T x (docs/methods.md#lors-backward,
  "computational-graph rearrangement"; the mask is passed straight through).
- ``grad_mode="official"``: as ``straight-through`` but without the factor s, bit-for-bit what the
  official backward computes (it omits both the mask and c; under Adam dropping c is a constant
  learning-rate rescale).

Only the abstract of the paper was available, so "the paper's" gradient could not be checked; the
exact masked gradient is the default because it is the gradient of the function the model computes
(house rule: paper first, official code as an option). grad_x = g W̃ uses the recomputed W̃ in
every mode.

Initialisation (docs/methods.md#lors-initialisation, LoRA-GA-style): the dense, unmasked gradient G of the loss w.r.t.
every target W, averaged over the first ``init_samples`` training examples (official: 128);
``svd_lowrank(G, q=min(4r, dims), niter=4)`` -> G ≈ U S V^T; A = V_r^T / γ (LoRS's "B"), B = 0
(LoRS's "A"), so ΔW = 0 at step 0 and the first gradient of B is s·(G ⊙ M) V_r / γ.
Scale: s = α / √r with α = r by default (the training script passes α = r: c = √r).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import FINETUNE_METHODS, FinetuneMethod, TrainingCallback, dense_weight_gradients
from .lora import LoRAAdapterBase, LoRAConfig

log = logging.getLogger(__name__)

GRAD_MODES = ("exact", "straight-through", "official")


@dataclass
class LoRSConfig(LoRAConfig):
    scaling: str = "rslora"
    init: str = "gradient-svd"
    grad_mode: str = "exact"
    grad_chunk: int = 1024  # output rows per chunk of the exact masked gradient
    # training examples averaged for the gradient-SVD initialisation (official: 128); never more
    # than the run trains on (steps x batch_size), so the init cannot dwarf a short run
    init_samples: int = 128
    # examples per forward/backward of that average (0 = the training micro-batch). The init holds
    # dense gradients of every adapted weight AND one micro-batch's activations at once, so at the
    # training micro-batch its peak exceeded the training loop's (SmolLM2-135M, Alpaca, 8 x 512, 8
    # init examples: peak RSS 5.2 GB after the init, the training step added nothing); one example
    # per pass drops the activation part (2.9 GB after the init, then 4.4 GB at the first training
    # step: training sets the peak). Same average up to float summation order, same work.
    init_micro_batch: int = 1
    stable_gamma: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.grad_mode not in GRAD_MODES:
            raise ConfigError(f"grad_mode must be one of {GRAD_MODES}, got {self.grad_mode!r}")
        if self.grad_chunk < 1 or self.init_samples < 1 or self.stable_gamma <= 0 or self.init_micro_batch < 0:
            raise ConfigError("grad_chunk and init_samples must be >= 1, init_micro_batch >= 0 and stable_gamma > 0")
        if self.dropout:
            raise ConfigError("LoRS has no adapter dropout (its fused forward has one input path); set dropout 0")

    def effective_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else float(self.rank)


def _masked_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                   mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(W + s B A) ⊙ M in fp32 (fp64 when the inputs are; M recomputed from W when not given)."""
    m = mask if mask is not None else (W != 0)
    dt = torch.promote_types(torch.promote_types(W.dtype, A.dtype), torch.float32)
    return (W.to(dt) + (B.to(dt) @ A.to(dt)) * scale) * m


class LoRSFunction(torch.autograd.Function):
    """y = x ((W + s B A) ⊙ M)^T + b, saving only x, W, A, B (and a stored mask)."""

    @staticmethod
    def forward(ctx, x, W, bias, A, B, scale: float, mask, grad_mode: str, chunk: int, compute_dtype):
        if W.requires_grad:
            raise RuntimeError("LoRS does not compute the gradient of the frozen base weight; "
                               "freeze it (requires_grad=False) or use masked-lora")
        w_eff = _masked_weight(W, A, B, scale, mask).to(compute_dtype)
        xc = x.to(compute_dtype)
        y = F.linear(xc, w_eff, None if bias is None else bias.to(compute_dtype))
        ctx.save_for_backward(xc, W, A, B, mask)
        ctx.scale, ctx.grad_mode, ctx.chunk, ctx.x_dtype = scale, grad_mode, chunk, x.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        xc, W, A, B, mask = ctx.saved_tensors
        s, mode = ctx.scale, ctx.grad_mode
        grad_x = grad_bias = grad_A = grad_B = None
        out_f, in_f = W.shape
        g2 = g.reshape(-1, out_f)
        if ctx.needs_input_grad[0]:
            w_eff = _masked_weight(W, A, B, s, mask).to(g.dtype)  # weight recompute
            grad_x = (g2 @ w_eff).reshape(*g.shape[:-1], in_f).to(ctx.x_dtype)
            del w_eff
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            x2 = xc.reshape(-1, in_f).to(A.dtype)
            gf = g2.to(A.dtype)
            if mode == "exact":
                grad_A = torch.zeros_like(A)
                grad_B = torch.empty_like(B)
                for i in range(0, out_f, ctx.chunk):
                    j = min(out_f, i + ctx.chunk)
                    m = mask[i:j] if mask is not None else (W[i:j] != 0)
                    G = (gf[:, i:j].t() @ x2) * m  # chunk x in, masked; freed each iteration
                    grad_B[i:j] = (G @ A.t()) * s
                    grad_A.addmm_(B[i:j].t(), G, alpha=s)
                    del G
            else:
                c = s if mode == "straight-through" else 1.0
                grad_B = (gf.t() @ (x2 @ A.t())) * c  # g^T (x A^T): tokens x r first
                grad_A = ((gf @ B).t() @ x2) * c  # (g B)^T x: tokens x r first
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None, None, None


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError, RuntimeError):  # older torch or exotic device
        pass
    return x.dtype


class LoRSAdapter(LoRAAdapterBase):
    method = "lors"
    merge_check = "mask"
    cfg: LoRSConfig

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = _autocast_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return LoRSFunction.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scale,
                                      self.mask, self.cfg.grad_mode, self.cfg.grad_chunk, cd)

    def merged_weight(self) -> torch.Tensor:
        return _masked_weight(self.base.weight.detach(), self.lora_A.detach(), self.lora_B.detach(),
                              self.scale, self.mask)

    @torch.no_grad()
    def init_from_gradient(self, G: torch.Tensor, generator_seed: int = 0) -> None:
        """A = V_r^T / γ, B = 0 from ``svd_lowrank`` of the dense gradient G (docs/methods.md#lors-initialisation)."""
        r = self.rank
        q = min(4 * r, *G.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator_seed)
            _, _, V = torch.svd_lowrank(G.float(), q=q, niter=4)
        self.lora_A.copy_(V[:, :r].t() / self.cfg.stable_gamma)
        self.lora_B.zero_()


class GradientSVDInit(TrainingCallback):
    """LoRS's initialisation at the start of training (skipped on resume: the state is restored)."""

    def on_train_begin(self, trainer, resumed: bool) -> None:
        adapters = {n: a for n, a in trainer.adapters.items() if isinstance(a, LoRSAdapter)}
        if resumed or not adapters:
            return
        cfg: LoRSConfig = next(iter(adapters.values())).cfg
        if cfg.init != "gradient-svd":
            return
        from ..progress import phase, progress

        trained = trainer.total_steps * trainer.cfg.batch_size  # examples the run will train on
        n = min(cfg.init_samples, trained, len(trainer.train_set))
        if n < cfg.init_samples and trained < cfg.init_samples:
            log.info("LoRS gradient-SVD init: %d examples instead of init_samples=%d, as the run trains on "
                     "only %d (steps x batch_size)", n, cfg.init_samples, trained)
        micro = cfg.init_micro_batch or trainer.micro
        ranks = sorted({ad.rank for ad in adapters.values()})
        # said before it starts: on a CPU this phase can take longer than a short training run
        log.info("LoRS gradient-SVD init: the dense gradient of %d layers averaged over %d training examples "
                 "(%d forward/backward passes of %d example(s), about %.1f optimiser steps of work; "
                 "--init-samples lowers it), then a randomized rank-%s SVD of each layer's gradient",
                 len(adapters), n, -(-n // min(micro, n)), min(micro, n), n / max(1, trainer.cfg.batch_size),
                 "/".join(map(str, ranks)))
        t0 = time.perf_counter()
        with dense_weight_gradients(adapters), phase("LoRS gradient-SVD init"):
            n = trainer.accumulate_dense_gradients(n, micro)
            for i, (name, ad) in enumerate(progress(list(adapters.items()), desc="SVD per layer")):
                ad.init_from_gradient(ad.base.weight.grad, generator_seed=trainer.cfg.seed + i)
                ad.base.weight.grad = None  # done with it: the memory goes back while the others are read
        log.info("LoRS gradient-SVD init from %d examples on %d layers: %.1f s", n, len(adapters),
                 time.perf_counter() - t0)


FINETUNE_METHODS.register("lors")(FinetuneMethod(
    "lors", LoRSAdapter, LoRSConfig,
    # official peft_sft.py: lr 2e-5 cosine to 1e-6, no warmup, weight decay 0 (docs/methods.md#lors-training-setup)
    train_defaults=dict(lr=2e-5, schedule="cosine", min_lr=1e-6, warmup_ratio=0.0, weight_decay=0.0),
    callbacks=lambda cfg: [GradientSVDInit()],
    description="LoRS: masked LoRA with weight recompute, rearranged backward and gradient-SVD init"))
