"""The PyTorch integration: ``torch.ops.sparse_runtime.sparse_linear`` over the compiled kernels.

The op takes the packed layout's tensors and hands their data pointers to the C kernel (no copy
of the weight, the GIL released, the engine's intra-op thread count). It is registered with
``torch.library.custom_op`` plus a fake (meta) implementation, so ``torch.compile`` and
``torch.export`` see one opaque op with a known output shape instead of tracing into ctypes.

:func:`sparse_linear` is the eager fast path with the same semantics: it skips the dispatcher
(about 10-20 us per call, which matters at 210 linears per decoded token of SmolLM2).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError
from . import native
from .layout import PackedWeight

_ISA_ID = {name: i for i, name in enumerate(native.ISAS)}


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise ConfigError(f"sparse kernel {what} failed: {native.ERRORS.get(rc, rc)}")


def _run(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
         bias: Optional[torch.Tensor], out_features: int, in_features: int, layout_id: int, isa_id: int) -> torch.Tensor:
    out_dtype = x.dtype
    if x.dtype == torch.bfloat16 and values.dtype == torch.bfloat16:
        x = x.float()  # bf16 activations are widened once; accumulation is fp32 either way
    elif x.dtype != torch.float32:
        raise ConfigError(f"the sparse kernels take float32 activations (or bf16 with bf16 values), got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ConfigError(f"sparse linear expects {in_features} input features, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    b = x2.shape[0]
    y = torch.empty((b, out_features), dtype=torch.float32)
    if b and out_features:
        lb = native.lib()
        if values.dtype == torch.bfloat16:
            fn = lb.sr_bitmask_linear_bf16 if layout_id == 0 else lb.sr_csr16_linear_bf16
        else:
            fn = lb.sr_bitmask_linear if layout_id == 0 else lb.sr_csr16_linear
        if bias is not None and bias.dtype != torch.float32:
            bias = bias.float()
        rc = fn(isa_id, x2.data_ptr(), b, in_features, out_features, index.data_ptr(), values.data_ptr(),
                row_ptr.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads())
        _check(rc, f"({native.ISAS[isa_id]}, layout {layout_id}, {values.dtype})")
    y = y.reshape(*lead, out_features)
    return y if out_dtype == torch.float32 else y.to(out_dtype)


@torch.library.custom_op("sparse_runtime::sparse_linear", mutates_args=())
def sparse_linear_op(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor,
                     bias: Optional[torch.Tensor], out_features: int, in_features: int, layout_id: int,
                     isa_id: int) -> torch.Tensor:
    """y = x W^T + b with W given by a packed layout (layout_id 0 = bitmask, 1 = csr16)."""
    return _run(x, index, values, row_ptr, bias, out_features, in_features, layout_id, isa_id)


@sparse_linear_op.register_fake
def _(x, index, values, row_ptr, bias, out_features, in_features, layout_id, isa_id):
    return x.new_empty((*x.shape[:-1], out_features))  # same dtype as x


def sparse_linear(x: torch.Tensor, packed: PackedWeight, bias: Optional[torch.Tensor] = None,
                  isa: Optional[str] = None, use_op: bool = False) -> torch.Tensor:
    """``x @ W^T + bias`` for a packed ``W`` on the chosen (or default) ISA path."""
    isa = native.select_isa(isa)
    if (packed.layout, isa) not in native.IMPLEMENTED:
        raise ConfigError(f"no {isa} kernel for the {packed.layout} layout; repack with "
                          f"layout={native.DEFAULT_LAYOUT[isa]!r} or choose another ISA")
    if packed.values.dtype == torch.bfloat16 and (packed.layout, isa) not in native.IMPLEMENTED_BF16:
        raise ConfigError(f"no {isa} kernel for bf16 values in the {packed.layout} layout; repack with "
                          f"layout={native.DEFAULT_LAYOUT[isa]!r} or use float32 values")
    args = (x, packed.index, packed.values, packed.row_ptr, bias, packed.out_features, packed.in_features,
            native.LAYOUT_IDS[packed.layout], _ISA_ID[isa])
    return sparse_linear_op(*args) if use_op else _run(*args)


def densify(packed: PackedWeight, threads: Optional[int] = None) -> torch.Tensor:
    """The dense weight (in the value dtype), rebuilt by the C scatter kernel for fp32 values."""
    if packed.values.dtype != torch.float32:
        from .layout import unpack

        return unpack(packed).to(packed.values.dtype)
    out = torch.empty((packed.out_features, packed.in_features), dtype=torch.float32)
    lb = native.lib()
    fn = lb.sr_bitmask_densify if packed.layout == "bitmask" else lb.sr_csr16_densify
    fn(packed.in_features, packed.out_features, packed.index.data_ptr(), packed.values.data_ptr(),
       packed.row_ptr.data_ptr(), out.data_ptr(), threads or torch.get_num_threads())
    return out
