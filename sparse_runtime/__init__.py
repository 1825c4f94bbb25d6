"""sparse-runtime: prune an LLM, repair it, merge to exact sparse weights, export, and benchmark.

The public API (``import sparse_runtime as sr``); the ``sparse-runtime`` CLI is a thin layer over it.
Six verbs, one shape each, ``verb(source, config, out) -> result`` (:mod:`sparse_runtime.verbs`):
``sr.prune``, ``sr.repair``, ``sr.finetune``, ``sr.merge``, ``sr.export``, ``sr.bench``.
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
from . import verbs as _verbs
from .verbs import bench, export, finetune, quantize

# ``prune``, ``repair`` and ``merge`` are modules too: they are made callable rather than hidden (verbs.py)
prune = _verbs.make_module_verb(f"{__name__}.prune", _verbs.prune)
repair = _verbs.make_module_verb(f"{__name__}.repair", _verbs.repair)
merge = _verbs.make_module_verb(f"{__name__}.merge", _verbs.merge)

__all__ = [
    "__version__", "CheckpointExistsError", "ConfigError", "DataNotFoundError", "ManifestError", "ModelLoadError",
    "SparseRuntimeError", "UnsupportedModelError", "Manifest", "build_manifest", "read_manifest",
    "save_checkpoint", "verify_manifest", "DEFAULT_MODEL", "FAMILIES", "LoadedModel", "family_of", "load_model",
    "tiny_model", "PROTOCOLS", "Protocol", "get_protocol", "NMPattern", "nm_compliant", "parse_structure",
    "sparsity_of", "PerplexityResult", "wikitext2_perplexity", "TASK_SETS", "ZEROSHOT_TASKS", "ZeroShotResult",
    "evaluate_zeroshot", "PruneConfig", "PruneResult", "prune_checkpoint", "prune_model",
    "prune", "repair", "finetune", "merge", "export", "bench", "quantize",
]
