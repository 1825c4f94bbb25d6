"""Repair methods: DSnoT (training-free mask refinement) and the mask-preserving fine-tuning
methods (masked LoRA, LoRS, SEFT, LoSA), each in its own module."""
