"""sparse-runtime: prune an LLM, repair it, merge to exact sparse weights, export, and benchmark.

The public API (``import sparse_runtime as sr``); the ``sparse-runtime`` CLI is a thin layer over it.
Heavy optional backends (onnxruntime, optimum, deepsparse, CUDA) load only when used.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (CheckpointExistsError, ConfigError, DataNotFoundError, ManifestError, ModelLoadError,
                     SparseRuntimeError, UnsupportedModelError)
from .manifest import Manifest, build_manifest, read_manifest, save_checkpoint, verify_manifest
from .models import DEFAULT_MODEL, FAMILIES, LoadedModel, family_of, load_model, tiny_model
from .protocols import PROTOCOLS, Protocol, get_protocol
from .sparsity import NMPattern, nm_compliant, parse_structure, sparsity_of
from .eval.perplexity import PerplexityResult, wikitext2_perplexity
from .eval.zeroshot import TASK_SETS, ZEROSHOT_TASKS, ZeroShotResult, evaluate_zeroshot
from .prune import PruneConfig, PruneResult, prune_checkpoint, prune_model

__all__ = [
    "__version__", "CheckpointExistsError", "ConfigError", "DataNotFoundError", "ManifestError", "ModelLoadError",
    "SparseRuntimeError", "UnsupportedModelError", "Manifest", "build_manifest", "read_manifest",
    "save_checkpoint", "verify_manifest", "DEFAULT_MODEL", "FAMILIES", "LoadedModel", "family_of", "load_model",
    "tiny_model", "PROTOCOLS", "Protocol", "get_protocol", "NMPattern", "nm_compliant", "parse_structure",
    "sparsity_of", "PerplexityResult", "wikitext2_perplexity", "TASK_SETS", "ZEROSHOT_TASKS", "ZeroShotResult",
    "evaluate_zeroshot", "PruneConfig", "PruneResult", "prune_checkpoint", "prune_model",
]
