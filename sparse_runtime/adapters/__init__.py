"""Adapters for repairing sparse models by fine-tuning, behind one interface (:class:`SparseAdapter`)
and one registry (:data:`FINETUNE_METHODS`). Importing this package registers the built-in methods:
``masked-lora`` (autograd reference), ``lors`` (weight recompute, rearranged backward, gradient-SVD
init), ``dense-lora`` (plain LoRA, merged then re-pruned: the papers' LoRA*) and ``seft``; ``losa``
is listed here and loaded from :mod:`sparse_runtime.losa` on first use."""
from .base import (ADAPTERS, FINETUNE_METHODS, AdapterConfig, FinetuneMethod, SparseAdapter, TrainingCallback,
                   adapter_state_dict, adapters_of, attach_adapters, count_trainable, dense_weight_gradients,
                   detach_adapters, infer_masks_warning, iter_adapters, load_adapter_state_dict, parse_ranks,
                   trainable_parameters)
from .lora import LoRAAdapterBase, LoRAConfig
from .masked_lora import MaskedLoRA, MaskedLoRAConfig
from .lors import GRAD_MODES, LoRSAdapter, LoRSConfig, LoRSFunction
from .dense_lora import DenseLoRA, DenseLoRAConfig
from .seft import SEFTAdapter, SEFTConfig
from .seft_evolution import SEFTEvolution

__all__ = ["ADAPTERS", "FINETUNE_METHODS", "AdapterConfig", "FinetuneMethod", "SparseAdapter", "TrainingCallback",
           "adapter_state_dict", "adapters_of", "attach_adapters", "count_trainable", "dense_weight_gradients",
           "detach_adapters", "infer_masks_warning", "iter_adapters", "load_adapter_state_dict", "parse_ranks",
           "trainable_parameters", "LoRAAdapterBase", "LoRAConfig", "MaskedLoRA", "MaskedLoRAConfig", "GRAD_MODES",
           "LoRSAdapter", "LoRSConfig", "LoRSFunction", "DenseLoRA", "DenseLoRAConfig",
           "SEFTAdapter", "SEFTConfig", "SEFTEvolution"]

# LoSA's adapter lives with the rest of LoSA and registers itself there; it is named here, never
# imported: the registry imports it on the first lookup of "losa" (e.g. merging a saved LoSA adapter).
FINETUNE_METHODS.register_lazy("losa", "sparse_runtime.losa.adapter")
