"""Quantization of the kept weights after pruning and repair (``docs/quantization.md``)."""
from .scheme import QuantScheme, QuantizedWeight, codes_from, grid_params, quantize_rtn

__all__ = ["QuantScheme", "QuantizedWeight", "codes_from", "grid_params", "quantize_rtn"]
