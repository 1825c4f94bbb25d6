"""``torch-cuda-24``: PyTorch on CUDA with 2:4 semi-structured weights (fp16 by default).

Every linear whose weight is exactly 2:4 (two zeros in every four consecutive inputs of a row)
becomes a ``torch.sparse.SparseSemiStructuredTensor`` (CUTLASS or cuSPARSELt kernels, sparse tensor
cores, Ampere or newer); other linears stay dense. A dense checkpoint therefore runs as plain dense
fp16 on the same engine, which is the pairing the benchmark needs. Accepts a checkpoint/spec or a
``semi-structured`` export. Without CUDA the engine is unavailable (tests and benchmarks skip).

Evidence: the CUDA kernels the profiler saw during one forward (names containing ``sparse``/
``cutlass``/``cusparselt``/``spgemm`` for the 2:4 path; ``gemm``/``cublas`` for dense).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..errors import ConfigError
from .base import Engine, EngineUnavailableError, Scenario, benchmark_ids
from .registry import ENGINES

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def cuda_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
    major, _ = torch.cuda.get_device_capability(0)
    if major < 8:
        return f"{torch.cuda.get_device_name(0)} has compute capability {major}.x; 2:4 sparse tensor cores need 8.0+"
    return None


def to_semi_structured(model, family, backend: str = "auto") -> list[str]:
    """Replace every exactly-2:4 linear weight with a SparseSemiStructuredTensor; returns their names."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    from ..sparsity import NMPattern, nm_compliant

    if backend not in ("auto", "cutlass", "cusparselt"):
        raise ConfigError(f"unknown 2:4 backend {backend!r}; choose auto, cutlass or cusparselt")
    if backend == "auto":
        cslt = getattr(torch.backends, "cusparselt", None)
        backend = "cusparselt" if cslt is not None and cslt.is_available() else "cutlass"
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    done = []
    for name, lin in family.iter_linears(model):
        w = lin.weight.detach()
        if (w == 0).any() and nm_compliant(w, NMPattern(2, 4)):
            lin.weight = torch.nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
            done.append(name)
    return done


@ENGINES.register("torch-cuda-24")
class TorchCuda24Engine(Engine):
    name = "torch-cuda-24"
    dtypes = ("float16", "bfloat16")
    description = "PyTorch CUDA, 2:4 linears as SparseSemiStructuredTensor (CUTLASS/cuSPARSELt), fp16"
    install_hint = "a CUDA build of torch on a machine with an Ampere-or-newer NVIDIA GPU"
    exploits_sparsity = "2:4 only"

    @classmethod
    def check_available(cls) -> None:
        why = cuda_reason()
        if why:
            raise EngineUnavailableError(f"torch-cuda-24 cannot run here: {why}; it needs {cls.install_hint}")

    def _load(self, model: str, dtype: str = "float16", backend: str = "auto", **_: Any) -> None:
        from ..models import family_of
        from .torch_cpu import load_torch_model

        if dtype not in _DTYPES:
            raise ConfigError(f"the 2:4 CUDA kernels run float16 or bfloat16, not {dtype!r}")
        self.dtype = dtype
        m, self.tokenizer, self.path = load_torch_model(model, "float32")
        self.model = m.to(device="cuda", dtype=_DTYPES[dtype]).eval()
        self.semi_structured = to_semi_structured(self.model, family_of(self.model), backend)
        self.backend = backend
        self._cache = None
        self._kernels: Optional[dict[str, int]] = None

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def _forward(self, ids, cache):
        with torch.inference_mode():
            return self.model(input_ids=torch.as_tensor(ids, dtype=torch.long, device="cuda"),
                              past_key_values=cache, use_cache=True)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        from transformers import DynamicCache

        out = self._forward(ids, DynamicCache())
        self._cache = out.past_key_values
        return out.logits.float().cpu().numpy()

    def decode(self, ids: np.ndarray) -> np.ndarray:
        out = self._forward(ids, self._cache)
        self._cache = out.past_key_values
        return out.logits.float().cpu().numpy()

    def _snapshot(self) -> int:
        return int(self._cache.get_seq_length())

    def _restore(self, snap: int) -> None:
        self._cache.crop(snap)

    def timer(self, scenario: Scenario, seed: int = 0) -> Callable[[], float]:
        """Like the base timer but synchronising the GPU and never copying logits to the host."""
        from transformers import DynamicCache

        ids = torch.as_tensor(benchmark_ids(self.vocab_size, scenario.batch, scenario.tokens, seed), device="cuda")
        if scenario.kind == "prefill":
            def run_prefill() -> float:
                torch.cuda.synchronize()
                t = time.perf_counter()
                self._forward(ids, DynamicCache())
                torch.cuda.synchronize()
                return time.perf_counter() - t
            return run_prefill
        out = self._forward(ids, DynamicCache())
        cache, n = out.past_key_values, ids.shape[1]
        steps = torch.as_tensor(benchmark_ids(self.vocab_size, scenario.batch, scenario.steps, seed + 1), device="cuda")

        def run_decode() -> float:
            cache.crop(n)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(scenario.steps):
                self._forward(steps[:, i:i + 1], cache)
            torch.cuda.synchronize()
            return time.perf_counter() - t
        return run_decode

    def kernel_names(self, tokens: int = 16) -> dict[str, int]:
        """CUDA kernels (name -> calls) the profiler records during one prefill of ``tokens``."""
        from torch.profiler import ProfilerActivity, profile

        from transformers import DynamicCache

        ids = torch.as_tensor(benchmark_ids(self.vocab_size, 1, tokens), device="cuda")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self._forward(ids, DynamicCache())
            torch.cuda.synchronize()
        names: dict[str, int] = {}
        for ev in prof.key_averages():
            if ev.device_type is not None and "CUDA" in str(ev.device_type):
                names[ev.key] = names.get(ev.key, 0) + int(ev.count)
        return names

    def evidence(self) -> dict[str, Any]:
        if self._kernels is None:
            self._kernels = self.kernel_names()
        sparse = {k: v for k, v in self._kernels.items()
                  if any(s in k.lower() for s in ("sparse", "cusparselt", "cutlass", "spgemm", "sp_"))}
        gemm = {k: v for k, v in self._kernels.items() if "gemm" in k.lower() and k not in sparse}
        return {"sparse_path": f"{len(self.semi_structured)} linears as SparseSemiStructuredTensor ({self.backend})",
                "sparse_kernels": dict(sorted(sparse.items(), key=lambda kv: -kv[1])[:5]),
                "dense_gemm_kernels": dict(sorted(gemm.items(), key=lambda kv: -kv[1])[:3]),
                "gpu": torch.cuda.get_device_name(0)}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "torch": torch.__version__, "dtype": self.dtype, "gpu": torch.cuda.get_device_name(0),
                "cuda": torch.version.cuda}

    def memory(self) -> dict[str, Any]:
        return {"cuda_peak_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)}
