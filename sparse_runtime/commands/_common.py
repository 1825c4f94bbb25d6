"""Arguments shared by several subcommands."""
from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", nargs="?", default="smollm2-135m",
                       help="HF directory, .gguf file, 'smollm2-135m' (default) or tiny-llama|tiny-mistral|tiny-qwen2")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory (off by default)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="data directory (default: $SPARSE_RUNTIME_DATA, then the HF hub)")
    p.add_argument("--protocol", default="quick", help="measurement protocol: quick (default) or paper")


def add_out_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--out", required=required, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="where the model runs: cpu (default) or cuda[:N]; checkpoints are always written from the CPU")


def check_device(device) -> None:
    """A clear error before any loading when the named device is not there."""
    if not device or device == "cpu":
        return
    import torch

    from ..errors import ConfigError

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this PyTorch sees no CUDA device (torch {torch.__version__}); "
                          "use --device cpu or install a CUDA build of PyTorch")
