"""Model loading, family adapters and tiny test models."""
from .family import FAMILIES, FamilyAdapter, family_for_model_type, family_of
from .loading import DEFAULT_MODEL, LoadedModel, cache_dir, ensure_smollm2, load_model
from .tiny import ByteTokenizer, tiny_config, tiny_model

__all__ = ["FAMILIES", "FamilyAdapter", "family_for_model_type", "family_of", "DEFAULT_MODEL",
           "LoadedModel", "cache_dir", "ensure_smollm2", "load_model", "ByteTokenizer", "tiny_config",
           "tiny_model"]
