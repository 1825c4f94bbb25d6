"""The ``--dtype``, ``--prefill-dtype``, ``--batch-dtype``, ``--act-dtype`` and ``--kv-dtype`` options of the
engine commands (``generate``, ``bench``, ``serve``): the compute dtype an engine loads the model in, or the
quantized values it runs (``int8``, ``int4``, or a full scheme name such as ``int4-g64-asym``:
int8/int4 codes with fp32 scales, on sparse-cpu / lean-cpu); the dtype of the lean engines' prompt
products, and (``serve``) of their batched decode steps' sparse products (``bfloat16``: bf16
operands with fp32 accumulation, on AMX tiles where the CPU has them, prompts also by the bf16 walk
on AVX512-BF16 CPUs; docs/kernels.md); and the
activations of their decode products on int8 codes (``int8``: W8A8, x quantized per token, integer
dot products on AVX-512 VNNI); and the values of their K/V cache (``float16``: half the bytes a decode
token reads from it). Each is checked against what the engine runs before anything is loaded."""
from __future__ import annotations

from typing import Optional

COMPUTE_DTYPES = ("float32", "bfloat16", "int8", "int4")


def parse_dtype(text: str) -> str:
    """A compute dtype, or a quantization scheme name (``int8``, ``int4-g128``, ``int4-g64-asym``)."""
    import argparse

    if text in COMPUTE_DTYPES[:2]:
        return text
    from ..errors import ConfigError
    from ..quant.scheme import QuantScheme

    try:
        return QuantScheme.parse(text).name
    except ConfigError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: use float32, bfloat16, or quantized values ({e})")


def add_dtype_argument(p) -> None:
    p.add_argument("--dtype", default=None, type=parse_dtype, metavar="{float32,bfloat16,int8,int4[-gG][-asym]}",
                   help="compute dtype the engine loads the model in (default: the engine's own, float32 on CPU "
                        "engines); bfloat16 halves weight memory: sparse-cpu keeps bf16 packed values with fp32 "
                        "accumulation, lean-cpu / torch-cpu are the dense bf16 baselines; int8 / int4[-g32|64|128]"
                        "[-asym] (sparse-cpu, lean-cpu): int8/int4 codes with fp32 scales (a quantized checkpoint's "
                        "own scheme and scales, else round-to-nearest at load)")


PREFILL_DTYPES = ("float32", "bfloat16")


PRODUCT_DTYPE_HELP = {
    "--prefill-dtype": "the dtype of prompt products of 16+ tokens (default float32, exact); bfloat16 rounds their "
                       "operands to bf16 (fp32 accumulation and output) and runs packed sparse and int8 weights "
                       "with the norms, SiLU and residual adds fused in, on AMX tiles where the CPU has AMX, else "
                       "by the bf16 walk where it has AVX512-BF16 (AMD Zen 4): faster prompts, logits moved by "
                       "bf16 rounding; decode unchanged",
    "--batch-dtype": "the dtype of the packed sparse products in decode steps of 4+ sequences at once (default "
                     "float32, exact); bfloat16 runs them on AMX tiles with bf16 operands and fp32 accumulation, "
                     "on CPUs with AMX (elsewhere float32): faster batched steps, logits moved by bf16 rounding; "
                     "single-sequence steps unchanged",
}


def _add_product_dtype(p, flag: str) -> None:
    p.add_argument(flag, default=None, choices=PREFILL_DTYPES,
                   help=f"sparse-cpu / lean-cpu: {PRODUCT_DTYPE_HELP[flag]}")


def add_prefill_dtype_argument(p) -> None:
    _add_product_dtype(p, "--prefill-dtype")


def add_batch_dtype_argument(p) -> None:
    _add_product_dtype(p, "--batch-dtype")


ACT_DTYPES = ("float32", "int8", "int8-g64", "int8-g128")  # kernels.decode.ACT_DTYPES (no torch import here)


def add_act_dtype_argument(p) -> None:
    p.add_argument("--act-dtype", default=None, choices=ACT_DTYPES,
                   help="sparse-cpu / lean-cpu with --dtype int8 or int4: the activations of the decode products "
                        "(default float32: weight-only codes); int8 quantizes each token's input to every product "
                        "to int8 and multiplies in integers on AVX-512 VNNI (W8A8; with int4 codes W4A8, held "
                        "dense): faster decode, logits moved by the activation rounding; int8 = one scale per "
                        "token (fastest; the only one int4 codes take), int8-g64 / int8-g128 = one per 64 / 128 "
                        "columns (a fraction of the rounding error, a little slower; docs/kernels.md#w8a8-decode); "
                        "prompt products of more than 8 tokens unchanged")


KV_DTYPES = ("float32", "float16")  # runtime.lean_llama.KV_DTYPES


def add_kv_dtype_argument(p) -> None:
    p.add_argument("--kv-dtype", default=None, choices=KV_DTYPES,
                   help="sparse-cpu / lean-cpu: the K/V cache's values (default float32); float16 stores K and V "
                        "rounded to fp16 (nearest even): half the cache's memory and half the bytes every decode "
                        "token reads from it, which decide decode at long contexts (docs/kernels.md#decode-attention); "
                        "logits move by the rounding")


def _engine_option(engine: str, flag: str, attr: str, value: str) -> None:
    """One line naming the fix when ``engine`` lacks ``value`` for ``flag`` (its class lists what
    it has in ``attr``)."""
    from ..errors import ConfigError
    from ..runtime import engine_names, get_engine

    if value not in getattr(get_engine(engine), attr, ()):
        able = [n for n in engine_names() if value in getattr(get_engine(n), attr, ())]
        raise ConfigError(f"engine {engine} has no {flag} {value}: leave it out, or use an engine that has it "
                          f"({', '.join(able)})")


def engine_dtype_options(engine: str, dtype: Optional[str], prefill_dtype: Optional[str] = None,
                         batch_dtype: Optional[str] = None, act_dtype: Optional[str] = None,
                         kv_dtype: Optional[str] = None) -> dict:
    """``{"dtype": ..., "prefill_dtype": ..., "batch_dtype": ..., "act_dtype": ..., "kv_dtype": ...}`` for ``engine``'s
    options (each only when given); one line naming the fix when the engine cannot run it."""
    from ..errors import ConfigError
    from ..runtime import engine_names, get_engine

    out = {}
    if prefill_dtype is not None:
        _engine_option(engine, "--prefill-dtype", "prefill_dtypes", prefill_dtype)
        out["prefill_dtype"] = prefill_dtype
    if batch_dtype is not None:
        _engine_option(engine, "--batch-dtype", "batch_dtypes", batch_dtype)
        out["batch_dtype"] = batch_dtype
    if act_dtype is not None:
        _engine_option(engine, "--act-dtype", "act_dtypes", act_dtype)
        out["act_dtype"] = act_dtype
    if kv_dtype is not None:
        _engine_option(engine, "--kv-dtype", "kv_dtypes", kv_dtype)
        out["kv_dtype"] = kv_dtype
    if dtype is None:
        return out

    cls = get_engine(engine)
    dtypes = tuple(getattr(cls, "dtypes", ("float32",)))
    if dtype.split("-")[0] not in dtypes:
        able = [n for n in engine_names() if dtype.split("-")[0] in getattr(get_engine(n), "dtypes", ("float32",))]
        raise ConfigError(f"engine {engine} runs {' or '.join(dtypes)}, not {dtype}: use --dtype {dtypes[0]}, or an "
                          f"engine that runs {dtype} ({', '.join(able)})")
    return {**out, "dtype": dtype}
