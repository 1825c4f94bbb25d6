"""``sparse-runtime export DIR --format onnx|onnx-int8|onnx-int4|gguf|deepsparse|semi-structured|bitmask --out DIR2``.

Common flags map to exporter options only when given; ``-o KEY=VALUE`` passes any other option
(values read as YAML scalars: ``-o cache_length=512 -o decode=false``). Unknown options are errors
that list the format's known ones.
"""
from __future__ import annotations

from . import Command
from ._common import add_out_args, check_output

FLAG_OPTIONS = ("dtype", "optimize", "sparse_initializers", "external_data", "opset", "prefill_length",
                "cache_length", "batch_size", "min_sparsity", "write_sparsity_config")


def add_arguments(p):
    p.add_argument("model", help="sparse-runtime checkpoint directory, HF directory, 'smollm2-135m' or tiny-*")
    p.add_argument("--format", required=True, help="onnx | onnx-int8 | onnx-int4 | gguf | deepsparse | semi-structured | bitmask")
    add_out_args(p)
    p.add_argument("--dtype", default=None, help="STORED dtype of the exported weights: float32 | float16 | bfloat16 "
                                                 "(format default if omitted; --load-dtype is the compute dtype)")
    p.add_argument("--load-dtype", dest="load_dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype the source model is loaded and verified in (default float32; bfloat16 halves "
                        "its memory, bitmask, semi-structured and gguf only; the bitmask then stores bf16 unless --dtype "
                        "says otherwise)")
    p.add_argument("--optimize", default=None, help="onnx: ORT offline graph optimisation none|basic|extended")
    p.add_argument("--sparse-initializers", dest="sparse_initializers", action="store_const", const=True,
                   default=None, help="onnx: store weights as ONNX sparse initializers (ORT densifies them on load)")
    p.add_argument("--external-data", dest="external_data", default=None, help="onnx: auto|always|never")
    p.add_argument("--opset", type=int, default=None, help="onnx/deepsparse: ONNX opset")
    p.add_argument("--prefill-length", dest="prefill_length", type=int, default=None, help="deepsparse: static prefill length")
    p.add_argument("--cache-length", dest="cache_length", type=int, default=None, help="deepsparse: fixed KV-cache length")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="deepsparse: static batch size")
    p.add_argument("--min-sparsity", dest="min_sparsity", type=float, default=None,
                   help="bitmask: compress only layers at least this sparse")
    p.add_argument("--write-sparsity-config", dest="write_sparsity_config", action="store_const", const=True,
                   default=None, help="bitmask: add compressed-tensors 0.14's sparsity_config to config.json")
    p.add_argument("--no-verify", dest="verify", action="store_false", default=True,
                   help="skip the reload-and-compare check (not recommended)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="any other exporter option")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    p.add_argument("--stream", default="auto", choices=("auto", "on", "off"),
                   help="bitmask: convert tensor by tensor from the shards, so memory holds one tensor: auto "
                        "(default: when the whole model would not fit comfortably), on, off")


def collect_options(args) -> dict:
    import yaml

    from ..errors import ConfigError

    opts = {k: getattr(args, k) for k in FLAG_OPTIONS if getattr(args, k, None) is not None}
    if not args.verify:
        opts["verify"] = False
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-o expects KEY=VALUE, got {item!r}")
        opts[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return opts


def run(args) -> int:
    from exporters import export

    check_output(args.out, args.overwrite, inputs=[args.model])
    res = export(args.model, args.format, args.out, overwrite=args.overwrite,
                 trust_remote_code=args.trust_remote_code, stream=args.stream,
                 load_dtype=getattr(args, "load_dtype", "float32"), **collect_options(args))
    v = res.verification
    print(f"exported {args.model} as {res.format} to {res.out}: {res.total_bytes / 2**20:.1f} MiB in "
          f"{len(res.files)} files, {res.export_seconds:.1f} s (+{res.verify_seconds:.1f} s verify)")
    for c in v.get("logits", []):
        if "relative_l2" in c:  # quantized formats gate the relative L2 error (exporters/onnx_quant.py)
            print(f"  {c['name']}: relative L2 error {c['relative_l2']:.3g} (tolerance {c['tolerance']:.3g}), max "
                  f"|logit diff| {c['max_abs_diff']:.3g}, argmax agreement {c['argmax_agreement']:.3f}")
            continue
        print(f"  {c['name']}: max |logit diff| {c['max_abs_diff']:.3g} (tolerance {c['tolerance']:.3g}), "
              f"argmax agreement {c['argmax_agreement']:.3f}")
    if "masks" in v:
        print(f"  masks: {v['masks']['matched']}/{v['masks']['layers']} layers match the source")
    ds = v.get("deepsparse")
    if ds:
        print("  deepsparse: " + (f"{ds['fraction_of_supported_ops']:.1%} of ops optimised" if ds.get("checked")
                                  else ds.get("reason", "not checked")))
    for n in res.manifest.get("notes", []):
        print(f"  note: {n}")
    for line in how_to_read(res.format, res.out):
        print(f"  {line}")
    return 0


def how_to_read(fmt: str, out) -> list[str]:
    """The other tools' way in, printed with the export: the formats whose own clients need a flag or
    a version the user cannot guess (docs/formats.md, docs/ecosystem.md)."""
    if fmt == "deepsparse":
        from ..runtime.deepsparse_env import env_dir

        return ["DeepSparse's own benchmark reads the prefill graph with the engine's KV-cache rewrites off "
                "(without them it stops at 'Unexpected external input name: position_ids'):",
                f"    {env_dir() / 'bin' / 'deepsparse.benchmark'} {out}/prefill.onnx "
                "--disable-kv-cache-overrides --no-internal-kv-cache"]
    if fmt == "gguf":
        return [f"run it with llama.cpp: llama-cli -m {out}/model.gguf, llama-server -m {out}/model.gguf, or "
                f"llama-bench -m {out}/model.gguf -t THREADS (llama.cpp multiplies the zeros: dense speed)"]
    if fmt == "bitmask":
        return ["read it with exporters.bitmask.load_bitmask, or with compressed-tensors 0.14 "
                "(pip install 'compressed-tensors==0.14.0.1'; 0.15 and later have no sparse-bitmask "
                "compressor and cannot read it)"]
    return []


COMMAND = Command("export", "export a model as onnx | onnx-int8 | onnx-int4 | gguf | deepsparse | semi-structured | bitmask "
                  "(verified on load)",
                  add_arguments, run)
