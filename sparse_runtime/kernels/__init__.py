"""The project's own CPU sparse linear kernels and their PyTorch integration (see docs/kernels.md).

- :mod:`.layout`: the compressed layouts (``bitmask`` for AVX-512/portable, ``csr16`` for AVX2).
- :mod:`.reference`: the NumPy reference the kernels are tested against.
- :mod:`.native`: the compiled extension (ctypes over ``csrc/sparse_runtime.h``, with the struct
  check at load), CPU feature detection, ISA choice, call counters.
- :mod:`.decode`: the lean decode step's C model description (ctypes mirrors of the C structs).
- :mod:`.quant`: :class:`QuantLinear`, int8/int4 codes + fp32 scales (dense or bitmask layout,
  :func:`pack_quantized`; reference :func:`reference_qlinear`).
- :mod:`.ops`: ``torch.ops.sparse_runtime.sparse_linear`` and the eager :func:`sparse_linear`.
- :mod:`.module`: :class:`SparseLinear` and :func:`sparsify_linears` (model swap), dense/sparse
  dispatch by a measured batch threshold.

Everything imports without the compiled extension; :func:`available` says whether it loaded.
"""
from .native import (ENV_ISA, ENV_LAYOUT, available, counters, reset_counters, select_isa, select_layout,
                     supported_isas, unavailable_reason)
from .layout import LAYOUTS, PackedWeight, QuantPacked, pack, pack_bitmask, pack_csr16, pack_quantized, unpack
from .module import (SparseLinear, SparsifyReport, apply_dispatch, call_counts, choose_gemv_variant, gemv_choice,
                     measure_dispatch, measure_threshold, sparsify_linears)
from .ops import densify, sparse_linear
from .quant import QuantLinear
from .reference import reference_linear, reference_qlinear

__all__ = ["ENV_ISA", "ENV_LAYOUT", "available", "counters", "reset_counters", "select_isa", "select_layout",
           "supported_isas", "unavailable_reason", "LAYOUTS", "PackedWeight", "pack", "pack_bitmask",
           "pack_csr16", "unpack", "SparseLinear", "SparsifyReport", "call_counts", "choose_gemv_variant",
           "gemv_choice", "measure_threshold", "measure_dispatch", "apply_dispatch",
           "sparsify_linears", "densify", "sparse_linear", "reference_linear", "QuantPacked", "pack_quantized",
           "QuantLinear", "reference_qlinear"]
