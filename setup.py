"""Build the CPU sparse-kernel extension (``sparse_runtime.kernels._sparse_kernels``).

Metadata lives in pyproject.toml; this file only declares the compiled extension. It needs a C++
compiler and the Python headers, nothing else (no torch headers: pip's isolated build would pull a
CUDA torch). Every instruction-set path is compiled with ``#pragma GCC target`` inside the
source files, so no ``-march`` flag is used and the binary runs on any x86-64 CPU; the path is
chosen at run time (see docs/kernels.md).

The extension is ``optional``: if it fails to build, the package still installs and imports, and
the kernel tests skip with the reason (set SPARSE_RUNTIME_REQUIRE_KERNELS=1 to make them fail).
"""
import os
import sys

from setuptools import Extension, setup

_openmp = [] if os.environ.get("SPARSE_RUNTIME_NO_OPENMP") or sys.platform == "darwin" else ["-fopenmp"]

ext = Extension(
    "sparse_runtime.kernels._sparse_kernels",
    # the inference kernels (with the lean decode step and the ONNX Runtime op they include) and
    # SparseGPT's column solver, the bf16 rebuild of packed weights for prefill, the AMX prefill
    # product and prefill's C glue, one shared object
    sources=["csrc/sparse_kernels.cpp", "csrc/sparsegpt_solver.cpp", "csrc/densify.cpp", "csrc/amx_prefill.cpp",
             "csrc/prefill_glue.cpp", "csrc/prefill_attention.cpp"],
    # the C interface (sparse_runtime.h), the shared internals, the included parts, ORT's ABI
    depends=["csrc/sparse_runtime.h", "csrc/sr_common.h", "csrc/sr_avx2.h", "csrc/sr_avx512.h", "csrc/lean_decode.inc", "csrc/quant_kernels.inc", "csrc/bf16_walk.inc", "csrc/w8a8.inc",
             "csrc/w4a8.inc",
             "csrc/ort_op.inc", "csrc/ort_abi.h"],
    language="c++",
    extra_compile_args=["-O3", "-std=c++17", "-fno-exceptions", "-fno-rtti",
                        "-Wall", "-Wno-unused-function", "-Wno-maybe-uninitialized", "-Wno-uninitialized", *_openmp],
    extra_link_args=[*_openmp],
    optional=True,
)

setup(ext_modules=[ext])
