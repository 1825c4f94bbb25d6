"""AdamW and the learning-rate schedules (constant, linear, cosine; linear warmup; a floor).

The schedule is a pure function of the step, wrapped in ``LambdaLR`` so its state (the step count)
is saved with a checkpoint and a resume continues the same curve.
"""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step`` (0-based count of finished optimiser steps)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        f = 1.0 - t
    else:  # cosine
        f = 0.5 * (1.0 + math.cos(math.pi * t))
    return min_ratio + (1.0 - min_ratio) * f


def build_optimizer(params, cfg, total_steps: int):
    """AdamW over ``params`` (the adapters' trainable tensors only) and its LambdaLR schedule."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))
    min_ratio = (cfg.min_lr or 0.0) / cfg.lr
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, warmup, cfg.schedule, min_ratio))
    return opt, sched
