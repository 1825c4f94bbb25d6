"""``sparse-runtime quantize IN --out OUT --scheme int8|int4-g128[-asym] --method rtn|gptq``:
quantize a checkpoint's kept weights (and the lm_head unless ``--keep-lm-head``), mask kept exactly."""
from __future__ import annotations

import json

from . import Command
from ._common import add_data_args, add_out_args, check_device, check_output, check_output_file


def add_arguments(p):
    p.add_argument("model", help="a checkpoint directory (pruned, repaired or merged; or dense) or a model name")
    p.add_argument("--scheme", default="int8",
                   help="int8 (per output channel), int4-g128, int4-g64, int4-g32, ...; add -asym for a zero point")
    p.add_argument("--method", default="rtn", help="rtn (round to nearest, no data) or gptq (GPTQ, mask fixed)")
    p.add_argument("--keep-lm-head", action="store_true",
                   help="leave the lm_head (and a tied embedding) in float32; default: quantize it too")
    add_out_args(p)
    add_data_args(p)
    p.add_argument("--nsamples", type=int, default=None, help="gptq calibration samples (default: the protocol's)")
    p.add_argument("--seqlen", type=int, default=None, help="gptq calibration length (default: the protocol's)")
    from ..quant.scheme import CLIPS

    p.add_argument("--clip", default="none", choices=CLIPS,
                   help="mse: shrink each group's range where that lowers its rounding error (GPTQ's mse search; "
                        "measured no gain on SmolLM2: docs/quantization.md); none (default): the full range of the "
                        "kept weights")
    p.add_argument("--percdamp", type=float, default=0.01, help="gptq dampening, a fraction of mean(diag H) (0.01)")
    p.add_argument("--device", default=None, help="compute device for the gptq pass (e.g. cuda)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the quantize report as JSON")


def run(args) -> int:
    from ..quant.apply import QuantizeConfig, quantize_checkpoint

    cfg = QuantizeConfig(scheme=args.scheme, method=args.method, lm_head=not args.keep_lm_head,
                         percdamp=args.percdamp, protocol=args.protocol, nsamples=args.nsamples,
                         seqlen=args.seqlen, device=args.device, clip=args.clip).validate()
    check_device(args.device)
    check_output(args.out, args.overwrite, inputs=[args.model])
    check_output_file(args.json_out)
    res = quantize_checkpoint(args.model, cfg, args.out, overwrite=args.overwrite, data_dir=args.data_dir)
    head = res.lm_head
    head_txt = ("lm_head kept in float32" if not head["quantized"] else
                "lm_head quantized" + (" (tied: the embedding holds the same values)" if head["tied"] else ""))
    clip = "" if res.clip == "none" else f" ({res.clip} clipping)"
    print(f"quantize: {res.scheme} by {res.method}{clip}, {len(res.layers)} weights, {res.kept} kept values; "
          f"{res.rounded_to_zero} kept values round to 0 ({res.rounded_to_zero / max(1, res.kept):.2%}; still kept "
          f"in the mask); {head_txt}; masks unchanged; {res.timing['quantize_s']:.1f} s; wrote {res.checkpoint}")
    if args.json_out:
        from ..manifest import write_file_atomic
        write_file_atomic(args.json_out, json.dumps(res.as_dict(), indent=1, default=str))
    return 0


COMMAND = Command("quantize", "quantize the kept weights (int8 / int4 groups; rtn or gptq), masks kept exactly",
                  add_arguments, run)
