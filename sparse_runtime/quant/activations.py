"""Int8 activations (W8A8) emulated in PyTorch, for measuring what they cost in quality.

The CPU engines' ``--act-dtype int8`` (csrc/w8a8.inc; docs/kernels.md#w8a8-decode) quantizes each
token's input to every int8 product: ``amax = max |x|``, ``q = round-half-even(x * (127 / amax))``
clamped to [-127, 127], and multiplies ``q`` by the int8 codes in integers, scaled by ``amax / 127``
times the row's scale (``int8-g64`` / ``int8-g128``: the same per 64 / 128 columns of the token).
:func:`round_activations` gives ``q * amax / 127`` in fp32, the value the kernels effectively
multiply, so a model whose linears (quantized to int8, lm_head included) see rounded inputs has the
engines' W8A8 numerics up to fp32 summation order. Used by
``benchmarks/bench_quant_quality.py`` (its ``+a8`` rows); the kernels are tested bit for bit against
``sparse_runtime.kernels.reference.reference_w8a8`` instead.
"""
from __future__ import annotations

import torch
from torch import nn


def round_activations(x: torch.Tensor, group: int = 0) -> torch.Tensor:
    """Each row of ``x`` (the last dimension is one token's features) rounded to int8, one scale per
    token (``group`` 0) or per ``group`` columns of it (the last group may be partial)."""
    xf = x.float()
    K = xf.shape[-1]
    g = group or K
    pad = (-K) % g
    xs = torch.nn.functional.pad(xf, (0, pad)).reshape(*xf.shape[:-1], (K + pad) // g, g)
    amax = xs.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xs * inv).clamp_(-127, 127)  # torch.round: half to even, as the kernels
    out = (q * (amax / 127.0)).reshape(*xf.shape[:-1], K + pad)[..., :K]
    return out.to(x.dtype)


def attach_int8_activations(model: nn.Module, group: int = 0) -> list:
    """Round the input of every ``nn.Linear`` of ``model`` to int8 (per token, or per ``group``
    columns) with forward pre-hooks; returns the hook handles (``h.remove()`` undoes it). The engines
    round the products of decode steps and of prompts of up to 8 tokens; applied to a whole-sequence
    evaluation (perplexity, zero-shot) this measures every token as if it were decoded, which is what
    generation quality depends on."""
    return [m.register_forward_pre_hook(lambda mod, args: (round_activations(args[0], group), *args[1:]))
            for m in model.modules() if isinstance(m, nn.Linear)]
