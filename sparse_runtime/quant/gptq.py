"""GPTQ-style quantization of one linear, with a fixed mask or jointly with SparseGPT's mask selection.

The SparseGPT paper (Frantar & Alistarh 2023, Sec. 3.5 "Joint sparsification and quantization",
Algorithm 1 with the quantize step) runs GPTQ's column loop (Frantar et al. 2023) and SparseGPT's
pruning in the same pass: for each column i, in order, over the upper Cholesky factor
``U = chol(H^-1)^T`` of the layer Hessian ``H = (2/N) sum x x^T``:

    q_i   = quant(w_i) where kept, 0 where pruned        (the column's final value)
    err_i = (w_i - q_i) / U_ii
    W[:, i:] -= err_i U[i, i:]                           (OBS update of the columns not yet done)

so the error of both pruning and rounding goes to the columns still to come, which absorb it. Lazy
block updates (blocks of ``blocksize`` columns; the rest of the matrix is updated once per block)
are GPTQ's and SparseGPT's.

Two modes, one loop (:func:`obs_quantize`):

- **fixed mask** (``keep`` given: quantizing an already pruned model). Pruned positions are set to
  0 when their column comes, so whatever the updates of earlier columns put there is itself an
  error handed on to later columns: the errors end up only in the KEPT weights of later columns
  of each row, and pruned weights stay exactly zero (SparseGPT's Algorithm 1 with its mask given).
- **joint** (``keep`` None: the SparseGPT pruner's ``quant`` option). The mask is chosen as
  SparseGPT chooses it (adaptive, per block of ``blocksize`` columns on the current weights,
  saliency ``w^2 / U_ii^2``, or N:M per M-group), then the same loop quantizes the kept weights.

The grid (:mod:`sparse_runtime.quant.scheme`, the shared definition of codes, scales and zeros):

- per output channel (``group`` 0): computed once before the loop, as GPTQ's ``find_params(W)``;
  with a fixed mask over the kept weights, in the joint mode over all weights of the row (the
  mask is not chosen yet; SparseGPT's joint code also takes the dense weight's range);
- per group: when the loop reaches the group's first column, from the CURRENT (already updated)
  weights of its columns (GPTQ's groupwise rule), over the entries that may still be kept: the
  kept ones with a fixed mask or an unstructured joint mask (chosen at the block's start), all
  entries for a joint N:M mask (its M-groups are chosen as the loop reaches them).

Where this differs from the official code (docs/quantization.md#gptq): the symmetric grid is the
restricted range [-qmax, qmax] with zero 0 (the official symmetric grid is [0, 2^b - 1] with zero
2^(b-1)); a group's parameters are computed from the weights with the updates of the block's
earlier columns applied (the official code reads the matrix outside the block, which lacks them
when the group is smaller than the block); no act-order and no static groups (both optional in
GPTQ, off by default there).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError
from ..sparsity import NMPattern
from .scheme import QuantizedWeight, QuantScheme, grid_params


def check_blocksize(scheme: QuantScheme, blocksize: int) -> None:
    """A quantization group must lie inside one column block (its grid is taken at its first column)."""
    if scheme.group and blocksize % scheme.group:
        raise ConfigError(f"blocksize {blocksize} is not a multiple of the quantization group {scheme.group}: "
                          "use blocksize 128 (the default)")


@torch.no_grad()
def obs_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, *,
                 keep: Optional[torch.Tensor] = None, sparsity: float = 0.0, pattern: Optional[NMPattern] = None,
                 percdamp: float = 0.01, blocksize: int = 128, name: str = "layer",
                 clip: str = "none") -> QuantizedWeight:
    """Quantize ``weight`` [N, K] on ``scheme`` with GPTQ's column loop; see the module docstring.
    ``clip``: how each group's (or row's) range is chosen, as in :func:`~.scheme.grid_params`.

    ``keep`` (bool [N, K]): the fixed mask (default ``weight != 0`` when neither ``sparsity`` nor
    ``pattern`` asks for pruning). Otherwise the mask is chosen jointly, as SparseGPT does, at
    ``sparsity`` or ``pattern``. Returns the :class:`QuantizedWeight`, on the CPU (its
    ``dequantize()`` is the new weight: on the grid, exact zeros where pruned); the loop runs where
    ``weight`` is.
    """
    from ..pruning.sparsegpt import _inverse_cholesky, _select_group

    W = weight.detach().float().clone()
    rows, cols = W.shape
    scheme.check(cols, name)
    check_blocksize(scheme, blocksize)
    joint = keep is None and (pattern is not None or sparsity > 0)
    if keep is None and not joint:
        keep = W != 0
    H = hessian.detach().float().to(W.device).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    if joint:
        W[:, dead] = 0  # SparseGPT's treatment: a dead input's weights are free to prune
    Hinv = _inverse_cholesky(H, percdamp, name)
    G = scheme.n_groups(cols)
    dev = W.device
    scales = torch.ones(rows, G, device=dev)
    zeros = None if scheme.symmetric else torch.zeros(rows, G, device=dev)
    if scheme.group == 0:
        s, z = grid_params(W, scheme, keep if keep is not None else torch.ones_like(W, dtype=torch.bool), clip)
        scales[:] = s
        if zeros is not None:
            zeros[:] = z
    code_dtype = torch.int8 if scheme.symmetric else torch.uint8
    Wt = W.t().contiguous()  # a column of W is a contiguous row here (the loop's hot path)
    codes_t = torch.zeros(cols, rows, dtype=code_dtype, device=dev)
    pruned_t = torch.zeros(cols, rows, dtype=torch.bool, device=dev) if joint else (~keep).t().contiguous()
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = Wt[i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        mask1 = pruned_t[i1:i2].clone()  # True = pruned
        if joint and pattern is None:
            k = int(W1.numel() * sparsity)
            if k:
                sal = W1 ** 2 / d1.reshape(-1, 1) ** 2
                mask1.view(-1)[torch.topk(sal.reshape(-1), k, largest=False, sorted=False)[1]] = True
        spare = torch.empty_like(W1)  # _select_group also writes SparseGPT's error factors; unused here
        for i in range(count):
            col = i1 + i
            if joint and pattern is not None and i % pattern.m == 0:
                _select_group(W1, d1, mask1, spare, i, pattern)
            g = col // scheme.group if scheme.group else 0
            if scheme.group and col % scheme.group == 0:
                sl = slice(i, i + scheme.group)
                may_keep = ~mask1[sl] if not (joint and pattern is not None) else torch.ones_like(mask1[sl])
                s, z = grid_params(W1[sl].t(), scheme, may_keep.t(), clip)
                scales[:, g] = s[:, 0]
                if zeros is not None:
                    zeros[:, g] = z[:, 0]
            w = W1[i]
            s = scales[:, g]
            if zeros is None:
                q = torch.round(w / s).clamp_(scheme.qmin, scheme.qmax)
                deq = q * s
            else:
                z = zeros[:, g]
                q = torch.round(w / s + z).clamp_(scheme.qmin, scheme.qmax)
                deq = (q - z) * s
            pr = mask1[i]
            deq = torch.where(pr, torch.zeros((), dtype=deq.dtype, device=dev), deq)
            codes_t[col] = torch.where(pr, torch.zeros((), dtype=q.dtype, device=dev), q).to(code_dtype)
            err = torch.div(w - deq, d1[i], out=Err1[i])
            W1[i:].addmm_(Hinv1[i, i:].unsqueeze(1), err.unsqueeze(0), alpha=-1)
        pruned_t[i1:i2] = mask1
        if i2 < cols:  # lazy batch update of the columns after this block
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
    keep_final = ~pruned_t.t()  # the result lives on the CPU, where checkpoints are written from
    return QuantizedWeight(codes_t.t().contiguous().cpu(), scales.contiguous().cpu(),
                           None if zeros is None else zeros.contiguous().cpu(), keep_final.contiguous().cpu(), scheme)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme,
                  keep: Optional[torch.Tensor] = None, *, percdamp: float = 0.01, blocksize: int = 128,
                  name: str = "layer", clip: str = "none") -> QuantizedWeight:
    """GPTQ with the mask fixed (default ``weight != 0``): the pruned model's sparsity, N:M included,
    is unchanged; only the kept values move (onto the grid, and by the error updates)."""
    keep = (weight != 0) if keep is None else keep.bool()
    return obs_quantize(weight, hessian, scheme, keep=keep, percdamp=percdamp, blocksize=blocksize, name=name,
                        clip=clip)
